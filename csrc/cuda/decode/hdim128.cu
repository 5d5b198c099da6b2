// Tensor-core decoding attend kernel for head dims Dk = 128, Dv = 128 (bf16 and fp16); one file per
// head-dim pair, as dense/ and selection/, so that NSA_CUDA_HEAD_DIMS can leave some out.
#include "cuda/decode/instantiate.h"

NSA_INSTANTIATE_DECODE(128, 128)
