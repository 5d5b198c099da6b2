#pragma once
// Hopper's warpgroup tensor-core product (wgmma.mma_async, sm_90a only): the four warps of a
// warpgroup multiply a 64 x 16 A (shared memory or registers) by a 16 x N B (shared memory) in one
// instruction, reading shared memory directly: no ldmatrix, no register copies of B. mma.sync (HMMA)
// reaches a fraction of Hopper's tensor-core rate; wgmma (HGMMA in SASS) is what can approach the peak.
//
// Register layouts equal mma.m16n8k16's per warp (PTX ISA, "Matrix Fragments for wgmma .m64nNk16"):
// warp w of the warpgroup holds rows 16w .. 16w + 15; its D registers d[j][0..3] are the C fragment of
// columns 8j .. 8j + 7, and register A is the A fragment of its 16 rows. So the accumulators feed the
// same softmax, mask and fragment-conversion code as the mma.sync kernels.
//
// Shared memory operands use the canonical no-swizzle layout ("interleaved"): 8 x 8 core matrices of
// 16-bit elements, each 8 rows of 16 contiguous bytes. A tile of kRows rows x kCols columns is stored
// column-chunk-major (core_offset): chunk c (columns 8c .. 8c + 7) of rows 8g .. 8g + 7 is the 128
// bytes at c * kRows * 16 + g * 128. Read as a K-major operand (rows = M or N, columns = K), the
// core matrices next along K are kRows * 16 bytes apart (leading byte offset) and those next along
// M / N 128 bytes apart (stride byte offset); read as an N-major B (rows = K, as V is for P V) the
// two swap. The offsets and descriptors are in common/mma_layout.h (tests/test_fragment_layout.py
// checks them against the PTX ISA's canonical layouts; the emulator decodes descriptors independently).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/tile/device_utils.h"

namespace nsa {
namespace tiled {

#ifdef NSA_EMULATE_CUDA
inline uint32_t smem_addr(const void* p) { return emu::shared_offset(p); }
#endif

// Loads a [kRows, kCols] tile, row r from row_ptr(r) (nullptr: zero row), into the core-matrix layout.
// Eight consecutive threads fill one core matrix (128 contiguous bytes: no bank conflicts) from eight
// rows; a warp reads 64 contiguous bytes of each of its rows.
template <int kRows, int kCols, int kThreads, typename Element, typename RowPtr>
__device__ __forceinline__ void load_core_tile_async(Element* smem, const Element* any_valid, RowPtr row_ptr) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kRows % 8 == 0 && kCols % 8 == 0, "whole core matrices");
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int chunk = c / 8 % kChunksPerRow;
      const int r = c / 8 / kChunksPerRow * 8 + c % 8;
      const Element* src = row_ptr(r);
      cp_async_16(base + mma::core_offset(kRows, r, chunk * 8), src ? src + chunk * 8 : any_valid, src != nullptr);
    }
  }
}

// --- the instructions -------------------------------------------------------------------------------

// Orders this thread's cp.async / ordinary shared-memory writes before later reads by the tensor
// cores (the async proxy); each writing thread runs it before the barrier that publishes the tile.
__device__ __forceinline__ void fence_async_shared() {
#if defined(NSA_EMULATE_CUDA)
  emu::fence_proxy_async();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#ifdef NSA_EMULATE_CUDA
inline void wgmma_fence() { emu::wgmma_fence(); }
inline void wgmma_commit() { emu::wgmma_commit(); }
template <int kPending = 0>
void wgmma_wait() {
  emu::wgmma_wait(kPending);
}
#else
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending of this thread's committed groups are still running (groups complete
// in order): the accumulators of the others are then readable.
template <int kPending = 0>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
#endif

// Keeps the compiler from moving accesses to accumulators across the asynchronous region.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&acc)[kN][4]) {
#ifndef NSA_EMULATE_CUDA
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(acc[i][j])::"memory");
#endif
}

template <typename Element>
constexpr bool kIsBf16 = std::is_same_v<Element, __nv_bfloat16>;

#if !defined(NSA_EMULATE_CUDA)
#define NSA_WGMMA_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define NSA_WGMMA_D16 NSA_WGMMA_D4(0), NSA_WGMMA_D4(1), NSA_WGMMA_D4(2), NSA_WGMMA_D4(3)
#define NSA_WGMMA_D32 NSA_WGMMA_D16, NSA_WGMMA_D4(4), NSA_WGMMA_D4(5), NSA_WGMMA_D4(6), NSA_WGMMA_D4(7)
#define NSA_WGMMA_R16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define NSA_WGMMA_R32                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
// A and B from shared memory (descriptors); operands after the D registers: a, b, accumulate, trans-b.
#define NSA_WGMMA_SS(SHAPE, TYPE, REGS, OUTS, A, B, SCALE, TRANS)                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\nwgmma.mma_async.sync.aligned." SHAPE \
               ".f32." TYPE "." TYPE " " REGS ", " A ", " B ", p, 1, 1, 0, " TRANS ";\n}\n"             \
               : OUTS                                                                                 \
               : "l"(a), "l"(b), "r"(accumulate), "n"(kTransB))
// A from registers: operands a0..a3, b, accumulate, trans-b.
#define NSA_WGMMA_RS(SHAPE, TYPE, REGS, OUTS, A, B, SCALE, TRANS)                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\nwgmma.mma_async.sync.aligned." SHAPE   \
               ".f32." TYPE "." TYPE " " REGS ", " A ", " B ", p, 1, 1, " TRANS ";\n}\n"                \
               : OUTS                                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransB))
#endif

// D[64 x kN] = A * B (+ D when accumulate), kN = 32 or 64. kTransB: B is N-major (else K-major).
template <typename Element, int kTransB, int kN>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 8][4], uint64_t a, uint64_t b, int accumulate) {
  static_assert(kN == 32 || kN == 64, "instantiated shapes");
#if defined(NSA_EMULATE_CUDA)
  emu::wgmma_m64nNk16(&d[0][0], kN, nullptr, a, b, accumulate != 0, kTransB != 0, kIsBf16<Element>);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kN == 64) {
    if constexpr (kIsBf16<Element>) NSA_WGMMA_SS("m64n64k16", "bf16", NSA_WGMMA_R32, NSA_WGMMA_D32, "%32", "%33", "%34", "%35");
    else NSA_WGMMA_SS("m64n64k16", "f16", NSA_WGMMA_R32, NSA_WGMMA_D32, "%32", "%33", "%34", "%35");
  } else {
    if constexpr (kIsBf16<Element>) NSA_WGMMA_SS("m64n32k16", "bf16", NSA_WGMMA_R16, NSA_WGMMA_D16, "%16", "%17", "%18", "%19");
    else NSA_WGMMA_SS("m64n32k16", "f16", NSA_WGMMA_R16, NSA_WGMMA_D16, "%16", "%17", "%18", "%19");
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without wgmma: the host never launches this
#endif
}

template <typename Element, int kTransB, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
  static_assert(kN == 32 || kN == 64, "instantiated shapes");
#if defined(NSA_EMULATE_CUDA)
  emu::wgmma_m64nNk16(&d[0][0], kN, a, 0, b, accumulate != 0, kTransB != 0, kIsBf16<Element>);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kN == 64) {
    if constexpr (kIsBf16<Element>)
      NSA_WGMMA_RS("m64n64k16", "bf16", NSA_WGMMA_R32, NSA_WGMMA_D32, "{%32, %33, %34, %35}", "%36", "%37", "%38");
    else NSA_WGMMA_RS("m64n64k16", "f16", NSA_WGMMA_R32, NSA_WGMMA_D32, "{%32, %33, %34, %35}", "%36", "%37", "%38");
  } else {
    if constexpr (kIsBf16<Element>)
      NSA_WGMMA_RS("m64n32k16", "bf16", NSA_WGMMA_R16, NSA_WGMMA_D16, "{%16, %17, %18, %19}", "%20", "%21", "%22");
    else NSA_WGMMA_RS("m64n32k16", "f16", NSA_WGMMA_R16, NSA_WGMMA_D16, "{%16, %17, %18, %19}", "%20", "%21", "%22");
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace tiled
}  // namespace nsa
