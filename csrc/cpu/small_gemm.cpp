// See small_gemm.h. The AVX2 micro-kernel is compiled for that target and called only after
// checking the CPU (cpu/avx2.h), so the library still loads and runs on other CPUs.
#include "cpu/small_gemm.h"

#include <algorithm>

#include "cpu/avx2.h"

namespace nsa::cpu {
namespace {

// --- portable loops --------------------------------------------------------------------------------

template <typename T>
void gemm_loops(int64_t m, int64_t n, int64_t k, const Matrix<T>& a, const Matrix<T>& b, T* c, int64_t ldc,
                bool accumulate) {
  for (int64_t r = 0; r < m; ++r) {
    T* c_row = c + r * ldc;
    if (!accumulate) std::fill(c_row, c_row + n, T(0));
    const T* a_row = a.row_ptr(r);
    for (int64_t x = 0; x < k; ++x) {
      const T a_rx = a_row[x * a.col];
      const T* b_row = b.row_ptr(x);
      for (int64_t j = 0; j < n; ++j) c_row[j] += a_rx * b_row[j];
    }
  }
}

#ifdef NSA_X86_AVX2

// Micro-kernel: rows [0, MR) of C, columns [j0, j0 + 8 * NV) (the last vector limited to `mask`
// when MASKED), summing over x in order. Row r of A starts at a[r]; B row x at b_rows[x] (GATHERED)
// or b + x * ldb.
template <int MR, int NV, bool MASKED, bool GATHERED>
NSA_AVX2 void gemm_tile(int64_t k, const float* const* a, int64_t a_col, const float* b, int64_t ldb,
                        const float* const* b_rows, int64_t j0, float* c, int64_t ldc, bool accumulate,
                        __m256i mask) {
  // Fully unrolled, so that the accumulators live in registers (gcc otherwise keeps the array on the stack).
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t x = 0; x < k; ++x) {
    const float* b_row = (GATHERED ? b_rows[x] : b + x * ldb) + j0;
    __m256 bv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASKED && v == NV - 1) ? _mm256_maskload_ps(b_row + 8 * v, mask) : _mm256_loadu_ps(b_row + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 a_rx = _mm256_broadcast_ss(a[r] + x * a_col);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a_rx, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      float* dst = c + r * ldc + j0 + 8 * v;
      if (MASKED && v == NV - 1) {
        if (accumulate) acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_maskload_ps(dst, mask));
        _mm256_maskstore_ps(dst, mask, acc[r][v]);
      } else {
        if (accumulate) acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_loadu_ps(dst));
        _mm256_storeu_ps(dst, acc[r][v]);
      }
    }
  }
}

using GemmTile = void (*)(int64_t, const float* const*, int64_t, const float*, int64_t, const float* const*, int64_t,
                          float*, int64_t, bool, __m256i);

// The micro-kernel for `rows` rows (1..4), `vectors` vectors of columns (1..3), the last one masked or not.
template <bool GATHERED>
NSA_AVX2 GemmTile pick_tile(int64_t rows, int64_t vectors, bool masked) {
  static constexpr GemmTile table[4][3][2] = {
#define NSA_TILES(MR)                                                                          \
  {{gemm_tile<MR, 1, false, GATHERED>, gemm_tile<MR, 1, true, GATHERED>},                      \
   {gemm_tile<MR, 2, false, GATHERED>, gemm_tile<MR, 2, true, GATHERED>},                      \
   {gemm_tile<MR, 3, false, GATHERED>, gemm_tile<MR, 3, true, GATHERED>}}
      NSA_TILES(1), NSA_TILES(2), NSA_TILES(3), NSA_TILES(4)
#undef NSA_TILES
  };
  return table[rows - 1][vectors - 1][masked];
}

// Panels of 24 columns outside, 4 rows inside: the B panel stays in L1 while A's rows stream by.
NSA_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const Matrix<float>& a, const Matrix<float>& b, float* c,
                        int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 24) {
    const int64_t width = std::min<int64_t>(24, n - j);
    const int64_t vectors = (width + 7) / 8;
    const bool masked = width % 8 != 0;
    const __m256i mask = lane_mask(width - 8 * (vectors - 1));
    for (int64_t r = 0; r < m; r += 4) {
      const int64_t rows = std::min<int64_t>(4, m - r);
      const float* a_rows[4];
      for (int64_t i = 0; i < rows; ++i) a_rows[i] = a.row_ptr(r + i);
      const GemmTile tile = b.rows ? pick_tile<true>(rows, vectors, masked) : pick_tile<false>(rows, vectors, masked);
      tile(k, a_rows, a.col, b.data, b.row, b.rows, j, c + r * ldc, ldc, accumulate, mask);
    }
  }
}

#endif

}  // namespace

template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const Matrix<T>& a, const Matrix<T>& b, T* c, int64_t ldc,
                bool accumulate) {
  if (m <= 0 || n <= 0) return;
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2()) return gemm_avx2(m, n, k, a, b, c, ldc, accumulate);
  }
#endif
  gemm_loops(m, n, k, a, b, c, ldc, accumulate);
}

template void small_gemm<float>(int64_t, int64_t, int64_t, const Matrix<float>&, const Matrix<float>&, float*,
                                int64_t, bool);
template void small_gemm<double>(int64_t, int64_t, int64_t, const Matrix<double>&, const Matrix<double>&, double*,
                                 int64_t, bool);

}  // namespace nsa::cpu
