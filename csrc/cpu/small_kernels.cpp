// See small_kernels.h. The AVX2 code lives in functions compiled for that target
// (__attribute__((target))) and is called only after checking the CPU, so the library still loads
// and runs (on the portable loops) on x86 CPUs without AVX2 and on other architectures.
#include "cpu/small_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NSA_X86_AVX2 1
#include <immintrin.h>
#endif

namespace nsa::cpu {
namespace {

// --- portable loops --------------------------------------------------------------------------------

template <typename T>
void gemm_loops(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                T* c, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < m; ++r) {
    T* c_row = c + r * ldc;
    if (!accumulate) std::fill(c_row, c_row + n, T(0));
    for (int64_t x = 0; x < k; ++x) {
      const T a_rx = a[r * a_row + x * a_col];
      const T* b_row = b + x * ldb;
      for (int64_t j = 0; j < n; ++j) c_row[j] += a_rx * b_row[j];
    }
  }
}

template <typename T>
T max_loop(const T* x, int64_t n) {
  T result = x[0];
  for (int64_t j = 1; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

template <typename T>
T exp_loop(T* x, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

template <typename T>
void softmax_grad_loop(T* p, const T* dp, int64_t n, T delta) {
  for (int64_t j = 0; j < n; ++j) p[j] *= dp[j] - delta;
}

template <typename T>
void scale_add_loop(T* y, T alpha, const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = alpha * y[j] + x[j];
}

#ifdef NSA_X86_AVX2
#define NSA_AVX2 __attribute__((target("avx2,fma")))

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Lanes [0, count) set.
NSA_AVX2 inline __m256i lane_mask(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Micro-kernel: rows [0, MR) of C, columns [0, 8 * NV) (the last vector limited to `mask` when
// MASKED), summing over x in order.
template <int MR, int NV, bool MASKED>
NSA_AVX2 void gemm_tile(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                        float* c, int64_t ldc, bool accumulate, __m256i mask) {
  // Fully unrolled, so that the accumulators live in registers (gcc otherwise keeps the array on the stack).
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t x = 0; x < k; ++x) {
    const float* b_row = b + x * ldb;
    __m256 bv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASKED && v == NV - 1) ? _mm256_maskload_ps(b_row + 8 * v, mask) : _mm256_loadu_ps(b_row + 8 * v);
    const float* a_col_x = a + x * a_col;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 a_rx = _mm256_broadcast_ss(a_col_x + r * a_row);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a_rx, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      float* dst = c + r * ldc + 8 * v;
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

using GemmTile = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool,
                          __m256i);

template <int MR>
struct TileTable {
  static constexpr GemmTile full[3] = {gemm_tile<MR, 1, false>, gemm_tile<MR, 2, false>, gemm_tile<MR, 3, false>};
  static constexpr GemmTile masked[3] = {gemm_tile<MR, 1, true>, gemm_tile<MR, 2, true>, gemm_tile<MR, 3, true>};
};

NSA_AVX2 GemmTile pick_tile(int64_t rows, int64_t vectors, bool masked) {
  switch (rows) {
    case 1: return (masked ? TileTable<1>::masked : TileTable<1>::full)[vectors - 1];
    case 2: return (masked ? TileTable<2>::masked : TileTable<2>::full)[vectors - 1];
    case 3: return (masked ? TileTable<3>::masked : TileTable<3>::full)[vectors - 1];
    default: return (masked ? TileTable<4>::masked : TileTable<4>::full)[vectors - 1];
  }
}

// Panels of 24 columns outside, 4 rows inside: the B panel stays in L1 while A's rows stream by.
NSA_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                        const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 24) {
    const int64_t width = std::min<int64_t>(24, n - j);
    const int64_t vectors = (width + 7) / 8;
    const bool masked = width % 8 != 0;
    const __m256i mask = lane_mask(width - 8 * (vectors - 1));
    for (int64_t r = 0; r < m; r += 4) {
      const int64_t rows = std::min<int64_t>(4, m - r);
      pick_tile(rows, vectors, masked)(k, a + r * a_row, a_row, a_col, b + j, ldb, c + r * ldc + j, ldc, accumulate,
                                       mask);
    }
  }
}

// Reduces the 8 lanes of v with `op` (_mm_add_ps, _mm_max_ps, ...).
template <typename Op>
NSA_AVX2 inline float horizontal(__m256 v, Op op) {
  __m128 s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = op(s, _mm_movehl_ps(s, s));
  s = op(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

NSA_AVX2 inline float horizontal_sum(__m256 v) {
  return horizontal(v, [](__m128 a, __m128 b) NSA_AVX2 { return _mm_add_ps(a, b); });
}

NSA_AVX2 inline float horizontal_max(__m256 v) {
  return horizontal(v, [](__m128 a, __m128 b) NSA_AVX2 { return _mm_max_ps(a, b); });
}

// exp of 8 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp on [-87, 88]).
// Results below ~1e-38 flush to 0; NaN propagates (min/max return their second operand on NaN).
NSA_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

NSA_AVX2 float max_avx2(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + j));
  float result = horizontal_max(best);
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

NSA_AVX2 float exp_avx2(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < n) {
    const __m256i mask = lane_mask(n - j);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), s)), _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(x + j, mask, e);
    sum = _mm256_add_ps(sum, e);
  }
  return horizontal_sum(sum);
}

NSA_AVX2 void softmax_grad_avx2(float* p, const float* dp, int64_t n, float delta) {
  const __m256 d = _mm256_set1_ps(delta);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dp + j), d)));
  for (; j < n; ++j) p[j] *= dp[j] - delta;
}

NSA_AVX2 void scale_add_avx2(float* y, float alpha, const float* x, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(y + j), _mm256_loadu_ps(x + j)));
  for (; j < n; ++j) y[j] = std::fma(alpha, y[j], x[j]);
}
#else
bool cpu_has_avx2() { return false; }
#endif

}  // namespace

template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                T* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return gemm_avx2(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
#endif
  gemm_loops(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

template <typename T>
T row_max(const T* x, int64_t n) {
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return max_avx2(x, n);
  }
#endif
  return max_loop(x, n);
}

template <typename T>
T exp_shifted(T* x, int64_t n, T shift) {
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return exp_avx2(x, n, shift);
  }
#endif
  return exp_loop(x, n, shift);
}

template <typename T>
void softmax_grad(T* p, const T* dp, int64_t n, T delta) {
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return softmax_grad_avx2(p, dp, n, delta);
  }
#endif
  softmax_grad_loop(p, dp, n, delta);
}

template <typename T>
void scale_add(T* y, T alpha, const T* x, int64_t n) {
#ifdef NSA_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return scale_add_avx2(y, alpha, x, n);
  }
#endif
  scale_add_loop(y, alpha, x, n);
}

#define NSA_INSTANTIATE(T)                                                                                  \
  template void small_gemm<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, \
                              int64_t, bool);                                                               \
  template T row_max<T>(const T*, int64_t);                                                                 \
  template T exp_shifted<T>(T*, int64_t, T);                                                                \
  template void softmax_grad<T>(T*, const T*, int64_t, T);                                                  \
  template void scale_add<T>(T*, T, const T*, int64_t);
NSA_INSTANTIATE(float)
NSA_INSTANTIATE(double)
#undef NSA_INSTANTIATE

}  // namespace nsa::cpu
