// float row operations of the CPU softmax (see vec_math.h): AVX2+FMA when the CPU has it, else
// loops written so that compilers vectorise them for the baseline ISA (this file is compiled with
// -fno-trapping-math, which lets GCC turn the clamps into vector min/max).
#include "cpu/vec_math.h"

#include <bit>
#include <limits>

#include "cpu/avx2.h"

namespace nsa::cpu {
namespace {

float exp_scaled_sum_loop(float* row, int64_t n, float scale, float shift) {
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

#ifdef NSA_X86_AVX2
// Reduces the 8 lanes of v with `op` (_mm_add_ps, _mm_max_ps).
template <typename Op>
NSA_AVX2 inline float horizontal(__m256 v, Op op) {
  __m128 s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = op(s, _mm_movehl_ps(s, s));
  s = op(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The same polynomial as exp_scaled_sum_loop on 8 floats (range reduction by ln 2 in two parts,
// degree-5 polynomial). Results below ~1e-38 flush to 0; NaN propagates (min/max return their
// second operand on NaN).
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

NSA_AVX2 float exp_scaled_sum_avx2(float* row, int64_t n, float scale, float shift) {
  const __m256 a = _mm256_set1_ps(scale), s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), a, s));
    _mm256_storeu_ps(row + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < n) {
    const __m256i mask = lane_mask(n - j);
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_maskload_ps(row + j, mask), a, s));
    _mm256_maskstore_ps(row + j, mask, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
  }
  return horizontal(sum, [](__m128 x, __m128 y) NSA_AVX2 { return _mm_add_ps(x, y); });
}

NSA_AVX2 float row_max_avx2(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + j));
  float result = horizontal(best, [](__m128 a, __m128 b) NSA_AVX2 { return _mm_max_ps(a, b); });
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

NSA_AVX2 void softmax_grad_avx2(float* p, const float* dp, int64_t n, float delta) {
  const __m256 d = _mm256_set1_ps(delta);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dp + j), d)));
  loops::softmax_grad(p + j, dp + j, n - j, delta);
}

NSA_AVX2 void scale_add_avx2(float* y, float alpha, const float* x, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(y + j), _mm256_loadu_ps(x + j)));
  loops::scale_add(y + j, alpha, x + j, n - j);
}
#endif

}  // namespace

#ifdef NSA_X86_AVX2
#define NSA_DISPATCH(avx2_call, loop_call) return has_avx2() ? avx2_call : loop_call
#else
#define NSA_DISPATCH(avx2_call, loop_call) return loop_call
#endif

float exp_scaled_sum(float* row, int64_t n, float scale, float shift) {
  NSA_DISPATCH(exp_scaled_sum_avx2(row, n, scale, shift), exp_scaled_sum_loop(row, n, scale, shift));
}

float row_max(const float* x, int64_t n) { NSA_DISPATCH(row_max_avx2(x, n), loops::row_max(x, n)); }

void softmax_grad(float* p, const float* dp, int64_t n, float delta) {
  NSA_DISPATCH(softmax_grad_avx2(p, dp, n, delta), loops::softmax_grad(p, dp, n, delta));
}

void scale_add(float* y, float alpha, const float* x, int64_t n) {
  NSA_DISPATCH(scale_add_avx2(y, alpha, x, n), loops::scale_add(y, alpha, x, n));
}

#undef NSA_DISPATCH

}  // namespace nsa::cpu
