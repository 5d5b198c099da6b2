// Selected-block attention kernels for head dims Dk = 256, Dv = 256 (bf16 and fp16); one file per pair,
// as for the dense family (cuda/dense/hdim256.cu), so that the build compiles them in parallel.
#include "cuda/selection/instantiate.h"

NSA_INSTANTIATE_SELECTION(256, 256)
