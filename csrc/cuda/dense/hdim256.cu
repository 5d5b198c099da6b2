// Tiled attention kernels for head dims Dk = 256, Dv = 256 (bf16 and fp16). One file per head-dim
// pair so that the build compiles them in parallel and NSA_CUDA_HEAD_DIMS can leave some out.
#include "cuda/dense/instantiate.h"

NSA_INSTANTIATE_TILED(256, 256)
