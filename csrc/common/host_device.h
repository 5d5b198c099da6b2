#pragma once
// Marks helpers that CPU kernels, CUDA kernels and CPU tests all share.
#if defined(__CUDACC__)
#define NSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NSA_HOST_DEVICE inline
#endif
