#pragma once
// Row operations of the CPU softmax, written so that GCC vectorises them (this file's users compile
// with -fno-trapping-math, which lets it turn the clamps into vector min/max), with an AVX2 clone
// chosen at load time. exp is the Cephes single-precision polynomial (<= 2 ulp over the softmax
// range); std::exp cost more than the tile products themselves (measured: 5.8 vs 1.9 ns/element).
#include <bit>
#include <cmath>
#include <cstdint>

namespace nsa::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NSA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NSA_VECTOR_CLONES
#endif

// row[j] = exp(row[j] * scale - shift) for j in [0, n); arguments <= 0 in softmax use, so results
// underflow to 0 rather than overflow. Returns the sum of the results.
NSA_VECTOR_CLONES inline float exp_scaled_sum(float* row, int64_t n, float scale, float shift) {
  for (int64_t j = 0; j < n; ++j) {
    float x = row[j] * scale - shift;
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n_float = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
    const int32_t n_int = static_cast<int32_t>(n_float);
    const float r = x - n_float * 0.693359375f + n_float * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    row[j] = p * std::bit_cast<float>((n_int + 127) << 23);
  }
  // Eight running sums in a fixed order: vectorisable and still deterministic.
  constexpr int kLanes = 8;
  float partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += row[j + lane];
  float sum = 0;
  for (; j < n; ++j) sum += row[j];
  for (int lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

inline double exp_scaled_sum(double* row, int64_t n, double scale, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] * scale - shift));
  return sum;
}

}  // namespace nsa::cpu
