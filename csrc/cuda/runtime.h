#pragma once
// Everything the CUDA sources take from the CUDA runtime, in one place: kernel launches, dynamic
// shared memory and device limits. With NSA_EMULATE_CUDA the same kernels compile as C++ and run on
// the CPU under csrc/emulation/simt.h (scripts/emulate.sh, tests/test_cuda_emulated.py), which is
// how they are tested on machines without a GPU.
#include <c10/core/TensorOptions.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>

#ifdef NSA_EMULATE_CUDA
#include "emulation/simt.h"
// Blocks run one after another, so one buffer per launch is every block's dynamic shared memory.
#define NSA_DYNAMIC_SMEM(name) unsigned char* const name = ::nsa::emu::dynamic_smem()
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#define NSA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace nsa {

struct DeviceLimits {
  int sm_count;
  int smem_per_block;  // opt-in maximum of dynamic shared memory per block, bytes
};

// The current device's limits (an H200's under emulation).
inline DeviceLimits current_device_limits() {
#ifdef NSA_EMULATE_CUDA
  return {emu::kSmCount, emu::kMaxSmemPerBlock};
#else
  const c10::DeviceIndex device = c10::cuda::current_device();
  DeviceLimits limits{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limits;
#endif
}

#ifndef NSA_EMULATE_CUDA
// Above 48 KiB, dynamic shared memory must be opted into per kernel and device. The opt-in is the most
// the kernel can have (the device's maximum less its static shared memory), not a launch's size: the
// attribute belongs to the kernel, and a smaller size set by another thread's launch must not undercut
// a larger one's (a cap: occupancy still follows each launch's own size). Being fixed, it is set once
// per (kernel, device), keeping the driver queries off the launch path.
inline void opt_in_max_dynamic_smem(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> opted_in;
  const std::pair<const void*, int> key{kernel, c10::cuda::current_device()};
  const std::lock_guard<std::mutex> lock(mutex);
  if (opted_in.count(key) != 0) return;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int cap = current_device_limits().smem_per_block - static_cast<int>(attributes.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cap));
  opted_in.insert(key);
}
#endif

// Runs kernel<<<grid, block, smem, current stream>>>(args...); an empty grid launches nothing.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
#ifdef NSA_EMULATE_CUDA
  emu::launch(grid, block, smem, [&] { kernel(args...); });
#else
  if (smem > 48 * 1024) opt_in_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Whether the forward kernels use Hopper's warpgroup tensor-core instructions (wgmma): a compute
// capability 9.x device, a build with sm_90a code (NSA_CUDA_ARCHS), and NSA_WGMMA=1 — opt-in until
// they have run on a GPU (scripts/gpu_check.sh tests and times both paths). The emulator is an H200.
inline bool use_warpgroup_mma() {
  const char* opt_in = std::getenv("NSA_WGMMA");
  if (opt_in == nullptr || std::strcmp(opt_in, "1") != 0) return false;
#ifdef NSA_EMULATE_CUDA
  return true;
#else
  if (std::strstr(NSA_CUDA_ARCHS, "9.0a") == nullptr) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()));
  return major == 9;
#endif
}

// Options of a workspace tensor on the current device (the CPU under emulation).
inline c10::TensorOptions current_device_options(c10::ScalarType dtype) {
#ifdef NSA_EMULATE_CUDA
  return c10::TensorOptions().dtype(dtype);
#else
  return c10::TensorOptions().dtype(dtype).device(c10::kCUDA, c10::cuda::current_device());
#endif
}

}  // namespace nsa
