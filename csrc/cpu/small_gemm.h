#pragma once
// A row-major GEMM for the small products of CPU kernels that work one block of keys at a time
// (a few to a few hundred rows), where a BLAS call (or at::mm) costs more than the product itself.
// float runs an AVX2+FMA micro-kernel when the CPU has it (cpu/avx2.h); double, and float on other
// CPUs, run plain loops. Each output element is summed in a fixed order whatever the shape of the
// call, so results do not depend on how rows are grouped into calls.
#include <cstdint>

namespace nsa::cpu {

// An operand of small_gemm: element (r, x) at rows[r][x * col] when `rows` is set (rows gathered
// from anywhere, no copy), else at data[r * row + x * col] (so a matrix or its transpose).
template <typename T>
struct Matrix {
  const T* data = nullptr;
  int64_t row = 0;
  int64_t col = 1;
  const T* const* rows = nullptr;

  static Matrix strided(const T* data, int64_t row, int64_t col = 1) { return {data, row, col, nullptr}; }
  static Matrix gathered(const T* const* rows) { return {nullptr, 0, 1, rows}; }
  const T* row_ptr(int64_t r) const { return rows ? rows[r] : data + r * row; }
};

// C[m, n] = A B (+ C when accumulate), C(r, j) = c[r * ldc + j]. B's rows must be contiguous (b.col == 1).
template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const Matrix<T>& a, const Matrix<T>& b, T* c, int64_t ldc,
                bool accumulate);

}  // namespace nsa::cpu
