#pragma once
// AVX2+FMA at run time in a library built for the baseline x86-64 ISA: functions marked NSA_AVX2 are
// compiled for AVX2+FMA and may only run after has_avx2() has said the CPU has both. NSA_X86_AVX2 is
// defined where this is possible (x86-64 with GCC or Clang); elsewhere callers use portable loops.
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NSA_X86_AVX2 1
#define NSA_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>

namespace nsa::cpu {

inline bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Lanes [0, count) set.
NSA_AVX2 inline __m256i lane_mask(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

}  // namespace nsa::cpu
#endif
