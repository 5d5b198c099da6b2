// Selected-block attention kernels for head dims Dk = 192, Dv = 128 (bf16 and fp16); one file per pair,
// as for the dense family (cuda/dense/hdim192_128.cu), so that the build compiles them in parallel.
#include "cuda/selection/instantiate.h"

NSA_INSTANTIATE_SELECTION(192, 128)
