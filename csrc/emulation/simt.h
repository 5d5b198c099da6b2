#pragma once
// CUDA's execution model on the CPU, so that the CUDA kernels run where no GPU is: the sources
// compile as C++ with NSA_EMULATE_CUDA (scripts/emulate.sh) and tests/test_cuda_emulated.py runs the
// CUDA tests against that build.
//
// A block's threads are fibers on the calling OS thread. Each runs until it reaches __syncthreads or
// a warp collective (shuffle, ballot, __syncwarp, ldmatrix, mma), which completes once every thread it
// names has arrived; blocks run one after another, so a function-local `static` is exactly a block's
// shared memory. The instructions are emulated from the PTX ISA's definitions (fragment layouts of
// mma.m16n8k16 and ldmatrix, cp.async groups), independently of common/mma_layout.h, whose tables the
// kernels use: a kernel that misreads a layout computes wrong numbers here.
//
// Checked (an emulation error fails the launch with a message): a warp collective that not every named
// lane reaches, or that lanes reach with different operations or masks; a barrier that some threads
// never reach (deadlock) or that threads reach at different __syncthreads call sites; launch shapes a
// GPU rejects (block > 1024 threads, grid.y/z > 65535, dynamic shared memory above an H200's limit);
// ldmatrix or cp.async addresses outside the block's dynamic shared memory, misaligned ones. Dynamic
// shared memory is filled with NaN bytes before every block and a cp.async destination is poisoned
// until its group is waited for, so reading either too early gives NaN. NSA_EMULATE_ORDER=reverse runs
// blocks and threads in descending order: a result that changes with it depends on a race between
// threads (a missing barrier).
// wgmma is asynchronous here as on a GPU (wgmma_m64nNk16): its accumulators hold NaN until a
// wgmma_wait covers its group, and it is an error to issue one without a wgmma_fence since the
// thread's last wait, to write its accumulators or A registers or the shared memory it reads before
// that wait, to read shared memory that a cp.async wrote without the writer's fence_proxy_async
// since (ordinary stores are not tracked), for the warps of a warpgroup to issue different wgmma
// sequences, and to end a thread with one in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

// CUDA's keywords as C++ (crt/host_defines.h turns them into unknown attributes).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Static __shared__ variables would be one object for every block; kernels use dynamic shared memory
// only (NSA_DYNAMIC_SMEM), which the emulator gives each block fresh and poisoned.
#define __shared__ nsa_emulation_supports_dynamic_shared_memory_only
#define __launch_bounds__(...)
#define __grid_constant__

namespace nsa {
namespace emu {

constexpr int kSmCount = 132;                 // an H200
constexpr int kMaxSmemPerBlock = 227 * 1024;  // opt-in dynamic shared memory per block

struct Indices {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// What ran since the last reset; warp instructions count once per warp (test hook _emulation_counters).
struct Counters {
  int64_t launches = 0, blocks = 0, mma = 0, ldmatrix = 0, cp_async = 0;
  int64_t wgmma = 0;  // in units of m16n8k16 (a warp's share of an m64nNk16 counts n / 8)
};
Counters& counters();

// Runs body once per thread of every block of the grid; throws c10::Error on an emulation error.
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

Indices indices();  // the running thread's (a copy: the race check sees only what a thread owns)
unsigned char* dynamic_smem();   // the running block's
void sync_block(const char* file, int line);  // __syncthreads at file:line

// Warp collective: every lane in `mask` passes its input; once all have arrived, combine(inputs,
// outputs, mask) runs once with the 32 lanes' pointers (null for lanes outside the mask), then every
// lane continues with its output. `op` names the operation for the divergence check.
using Combine = void (*)(const void* const* inputs, void* const* outputs, unsigned mask);
void warp_collective(unsigned mask, const char* op, Combine combine, const void* input, void* output);

// cp.async: one thread's copies, applied (or zero-filled) when a wait covers their group.
void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// ldmatrix .m8n8.x4.b16 (trans: .trans) from each lane's row address; mma.m16n8k16 f32 accumulate.
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

// The shared-window address of p (__cvta_generic_to_shared): its offset in the block's dynamic shared memory.
uint32_t shared_offset(const void* p);
// wgmma.mma_async.m64nNk16 .f32 with .bf16 / .f16 inputs: this warp's 16 rows (warp % 4 of its
// warpgroup) of D[64 x n] = A * B (+ D when accumulate). A from a_regs (the lane's four A registers)
// or, when a_regs is null, from the K-major descriptor desc_a; B from desc_b, N-major when trans_b.
// Descriptors are decoded as the PTX ISA defines them (no swizzle only). The product is computed from
// the operands as they are at issue; d's registers hold NaN until the wgmma_wait that covers it, and
// a wgmma onto the same in-flight d (same shape) continues its chain as the hardware does.
void wgmma_m64nNk16(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool accumulate,
                    bool trans_b, bool bf16);
void wgmma_fence();            // wgmma.fence.sync.aligned
void wgmma_commit();           // wgmma.commit_group.sync.aligned
void wgmma_wait(int pending);  // wgmma.wait_group.sync.aligned pending
void fence_proxy_async();      // fence.proxy.async.shared::cta: this thread's cp.async writes become visible to wgmma

// Test hook (selftest.cpp): runs a small kernel that breaks one rule; returns the emulator's error, or
// "" when the launch succeeded.
std::vector<std::string> selftest_cases();
std::string selftest(const std::string& name);

template <typename T>
struct ShuffleIn {
  T value;
  int lane_mask;
};
// Not instrumented in race-check builds: it reads and writes other lanes' locals on their behalf.
template <typename T>
__attribute__((no_sanitize("thread"))) void shuffle_xor_combine(const void* const* in, void* const* out,
                                                                unsigned mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!out[lane]) continue;
    const auto* mine = static_cast<const ShuffleIn<T>*>(in[lane]);
    const int source = lane ^ mine->lane_mask;
    // A source lane outside the mask gives an undefined value: NaN / all ones here.
    T value;
    if (in[source]) value = static_cast<const ShuffleIn<T>*>(in[source])->value;
    else std::memset(&value, 0xff, sizeof(T));
    *static_cast<T*>(out[lane]) = value;
  }
}
void ballot_combine(const void* const* in, void* const* out, unsigned mask);
void syncwarp_combine(const void* const* in, void* const* out, unsigned mask);

}  // namespace emu
}  // namespace nsa

#define threadIdx (::nsa::emu::indices().thread_idx)
#define blockIdx (::nsa::emu::indices().block_idx)
#define blockDim (::nsa::emu::indices().block_dim)
#define gridDim (::nsa::emu::indices().grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::nsa::emu::sync_block(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::nsa::emu::warp_collective(mask, "__syncwarp", ::nsa::emu::syncwarp_combine, nullptr, nullptr);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T>);
  const ::nsa::emu::ShuffleIn<T> in{value, lane_mask};
  T out;
  ::nsa::emu::warp_collective(mask, "__shfl_xor_sync", ::nsa::emu::shuffle_xor_combine<T>, &in, &out);
  return out;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int in = predicate != 0;
  unsigned out;
  ::nsa::emu::warp_collective(mask, "__ballot_sync", ::nsa::emu::ballot_combine, &in, &out);
  return out;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __expf(float x) { return std::exp(x); }
using std::isinf;
using std::isnan;

namespace nsa {
// CUDA's device overloads of min and max take mixed integer types.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
}  // namespace nsa
