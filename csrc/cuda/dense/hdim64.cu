// Tiled attention kernels for head dims Dk = 64, Dv = 64 (bf16 and fp16). One file per head-dim
// pair so that the build compiles them in parallel and NSA_CUDA_HEAD_DIMS can leave some out.
#include "cuda/dense/instantiate.h"

NSA_INSTANTIATE_TILED(64, 64)
