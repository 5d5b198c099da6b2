#pragma once
// Row operations of the CPU softmax. The float versions (cpu/vec_math.cpp) run AVX2+FMA code when
// the CPU has it, chosen at run time, and the portable loops below otherwise; the double versions
// are the loops. exp is the Cephes single-precision polynomial (<= 2 ulp over the softmax range):
// std::exp cost more than the tile products themselves (measured: 5.8 vs 1.9 ns/element; 0.84 with
// AVX2). Each result is computed in a fixed order, whatever the thread or call layout.
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace nsa::cpu {

namespace loops {

template <typename T>
T row_max(const T* x, int64_t n) {
  return *std::max_element(x, x + n);
}

template <typename T>
void softmax_grad(T* p, const T* dp, int64_t n, T delta) {
  for (int64_t j = 0; j < n; ++j) p[j] *= dp[j] - delta;
}

template <typename T>
void scale_add(T* y, T alpha, const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = alpha * y[j] + x[j];
}

}  // namespace loops

// row[j] = exp(row[j] * scale - shift) for j in [0, n); returns the sum of the results. In softmax
// use the arguments are <= 0, so results underflow to 0 rather than overflow.
float exp_scaled_sum(float* row, int64_t n, float scale, float shift);

inline double exp_scaled_sum(double* row, int64_t n, double scale, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] * scale - shift));
  return sum;
}

// max(x[0 .. n)), n >= 1.
float row_max(const float* x, int64_t n);
inline double row_max(const double* x, int64_t n) { return loops::row_max(x, n); }

// p[j] *= dp[j] - delta: the softmax gradient dS = P (dP - delta) of one row.
void softmax_grad(float* p, const float* dp, int64_t n, float delta);
inline void softmax_grad(double* p, const double* dp, int64_t n, double delta) {
  loops::softmax_grad(p, dp, n, delta);
}

// y[j] = alpha * y[j] + x[j].
void scale_add(float* y, float alpha, const float* x, int64_t n);
inline void scale_add(double* y, double alpha, const double* x, int64_t n) { loops::scale_add(y, alpha, x, n); }

}  // namespace nsa::cpu
