// Selected-block attention kernels for head dims Dk = 64, Dv = 64 (bf16 and fp16); one file per pair,
// as for the dense family (cuda/dense/hdim64.cu), so that the build compiles them in parallel.
#include "cuda/selection/instantiate.h"

NSA_INSTANTIATE_SELECTION(64, 64)
