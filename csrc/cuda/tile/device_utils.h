#pragma once
// Warp-level building blocks of the tiled attention kernels: tensor-core mma, ldmatrix, cp.async,
// quad reductions, and two warp GEMMs. Fragment ownership comes from common/mma_layout.h, which the
// CPU tests check against the PTX ISA tables.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/mma_layout.h"
#include "cuda/runtime.h"

namespace nsa {
namespace tiled {

#ifndef NSA_EMULATE_CUDA
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// --- cp.async: 16-byte global -> shared copies that bypass registers ------------------------------

// Copies 16 bytes, or writes 16 zero bytes when !valid (rows past a sequence end: zero keys give
// finite scores that the mask removes, zero values give 0 * p = 0 instead of NaN * 0).
#ifdef NSA_EMULATE_CUDA
inline void cp_async_16(void* smem, const void* gmem, bool valid) { emu::cp_async_16(smem, gmem, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
void cp_async_wait() { emu::cp_async_wait(kPending); }
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }
#endif

// Loads a [kRows, kCols] tile, row r from row_ptr(r) (nullptr: zero row), into shared memory with
// row stride kStride elements. Every thread of the block takes part.
template <int kRows, int kCols, int kStride, int kThreads, typename Element, typename RowPtr>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* any_valid, RowPtr row_ptr) {
  constexpr int kChunksPerRow = kCols / 8;  // 8 16-bit elements per 16-byte chunk
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 8 == 0, "rows must be whole 16-byte chunks");
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const Element* src = row_ptr(r);
      cp_async_16(smem + r * kStride + col, src ? src + col : any_valid, src != nullptr);
    }
  }
}

// --- ldmatrix --------------------------------------------------------------------------------------

#ifdef NSA_EMULATE_CUDA
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, true); }
#else
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
#endif

// --- mma.sync m16n8k16, f32 accumulators ----------------------------------------------------------

template <typename Element>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef NSA_EMULATE_CUDA
    emu::mma_m16n8k16(d, a, b0, b1, true);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lower column) in the low half
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef NSA_EMULATE_CUDA
    emu::mma_m16n8k16(d, a, b0, b1, false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Mma<Element>::run(d, a, b0, b1);
}

// --- math ------------------------------------------------------------------------------------------

// 2^x by the hardware approximation (relative error ~2^-22); 2^-inf = +0, which masked scores rely on.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef NSA_EMULATE_CUDA
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The four lanes of a quad (same groupID) hold the same accumulator rows: reduce across them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// --- warp GEMMs on 16-row slabs --------------------------------------------------------------------

// acc[16 x kN] += A[16 x kK] * B^T, A row-major in shared memory (stride lda), B stored n-major
// ([kN rows][kK cols], stride ldb) as K is for Q K^T. acc[n-block][c-element].
template <typename Element, int kN, int kK>
__device__ __forceinline__ void gemm_ss(float (&acc)[kN / 8][4], const Element* a, int lda, const Element* b,
                                        int ldb, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "warp GEMM works on 16 x 16 steps");
  const mma::RowCol ao = mma::ldmatrix_x4_address(mma::Operand::kA, lane);
  const mma::RowCol bo = mma::ldmatrix_x4_address(mma::Operand::kBRows, lane);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + ao.row * lda + kk * 16 + ao.col);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t bf[4];  // {b0b1, b2b3} of n-block 2nn, then of n-block 2nn+1
      ldmatrix_x4(bf, b + (nn * 16 + bo.row) * ldb + kk * 16 + bo.col);
      mma_16816<Element>(acc[2 * nn], af, bf[0], bf[1]);
      mma_16816<Element>(acc[2 * nn + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16 x kN] += A[16 x kK] * B, A given as register fragments (a[k-step][4], e.g. probabilities
// converted from accumulators), B stored k-major ([kK rows][kN cols], stride ldb) as V is for P V:
// read with ldmatrix .trans.
template <typename Element, int kN, int kK>
__device__ __forceinline__ void gemm_rs(float (&acc)[kN / 8][4], const uint32_t (&a)[kK / 16][4], const Element* b,
                                        int ldb, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "warp GEMM works on 16 x 16 steps");
  const mma::RowCol bo = mma::ldmatrix_x4_address(mma::Operand::kBTrans, lane);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + bo.row) * ldb + nn * 16 + bo.col);
      mma_16816<Element>(acc[2 * nn], a[kk], bf[0], bf[1]);
      mma_16816<Element>(acc[2 * nn + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// Accumulators of a 16 x kN product -> A fragments of the next product (k = the same kN columns):
// n-blocks 2j and 2j+1 form k-step j (mma::n_block_of_a / c_index_of_a).
template <typename Element, int kN>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[kN / 16][4], const float (&c)[kN / 8][4]) {
#pragma unroll
  for (int j = 0; j < kN / 16; ++j) {
    a[j][0] = Mma<Element>::pack(c[2 * j][0], c[2 * j][1]);          // row g,   cols 2t..    (a0 a1)
    a[j][1] = Mma<Element>::pack(c[2 * j][2], c[2 * j][3]);          // row g+8, cols 2t..    (a2 a3)
    a[j][2] = Mma<Element>::pack(c[2 * j + 1][0], c[2 * j + 1][1]);  // row g,   cols 8+2t..  (a4 a5)
    a[j][3] = Mma<Element>::pack(c[2 * j + 1][2], c[2 * j + 1][3]);  // row g+8, cols 8+2t..  (a6 a7)
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Stores a warp's 16 x kN f32 accumulators (times `factor`) as rows of Element (16-bit, or float):
// row_ptr(r) gives the destination of accumulator row r (0..15), nullptr for rows past the end.
template <typename Element, int kN, typename RowPtr>
__device__ __forceinline__ void store_rows(const float (&acc)[kN / 8][4], float factor_lo, float factor_hi,
                                           int lane, RowPtr row_ptr) {
  const int g = mma::group_id(lane), t = mma::thread_in_group(lane);
  Element* lo = row_ptr(g);
  Element* hi = row_ptr(g + 8);
#pragma unroll
  for (int nb = 0; nb < kN / 8; ++nb) {
    const int col = nb * 8 + 2 * t;
    if constexpr (std::is_same_v<Element, float>) {
      if (lo) *reinterpret_cast<float2*>(lo + col) = make_float2(acc[nb][0] * factor_lo, acc[nb][1] * factor_lo);
      if (hi) *reinterpret_cast<float2*>(hi + col) = make_float2(acc[nb][2] * factor_hi, acc[nb][3] * factor_hi);
    } else {
      if (lo) *reinterpret_cast<uint32_t*>(lo + col) = Mma<Element>::pack(acc[nb][0] * factor_lo, acc[nb][1] * factor_lo);
      if (hi) *reinterpret_cast<uint32_t*>(hi + col) = Mma<Element>::pack(acc[nb][2] * factor_hi, acc[nb][3] * factor_hi);
    }
  }
}

}  // namespace tiled
}  // namespace nsa
