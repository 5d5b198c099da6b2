#pragma once
// Dense building blocks for CPU kernels that work one block of keys at a time, where a BLAS call
// (or at::mm) costs more than the product itself: a row-major GEMM for matrices of a few to a few
// hundred rows, and the row operations of softmax. float runs AVX2+FMA code when the CPU has it,
// chosen at run time (the library itself is compiled for the baseline ISA); double, and float on
// other CPUs, run plain loops. Each output element is summed in a fixed order whatever the shape
// of the call, so results do not depend on how rows are grouped into calls.
#include <cstdint>

namespace nsa::cpu {

// C[m, n] = A B (+ C when accumulate), row-major: A(r, x) = a[r * a_row + x * a_col] (so A or its
// transpose may be the stored matrix), B(x, j) = b[x * ldb + j], C(r, j) = c[r * ldc + j].
template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                T* c, int64_t ldc, bool accumulate);

// max(x[0 .. n)), n >= 1.
template <typename T>
T row_max(const T* x, int64_t n);

// x[j] = exp(x[j] - shift) for j < n; returns their sum.
template <typename T>
T exp_shifted(T* x, int64_t n, T shift);

// p[j] *= dp[j] - delta: the softmax gradient dS = P (dP - delta) of one row.
template <typename T>
void softmax_grad(T* p, const T* dp, int64_t n, T delta);

// y[j] = alpha * y[j] + x[j].
template <typename T>
void scale_add(T* y, T alpha, const T* x, int64_t n);

}  // namespace nsa::cpu
