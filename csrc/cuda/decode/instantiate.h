#pragma once
// Included by the per-head-dim files only: the tensor-core attend kernel of fused decoding for one
// head-dim pair, bf16 and fp16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/decode/attend.h"

namespace nsa {
namespace decode {

template <typename Element, int kHeadDimQK, int kHeadDimV>
void launch_tiled_attend(const DecodeParams& p, const Partials<float>& w, Branch branch) {
  launch_attend<MmaMath<Element, kHeadDimQK, kHeadDimV>>(p, w, branch);
}

}  // namespace decode
}  // namespace nsa

#define NSA_INSTANTIATE_DECODE(DQK, DV)                                                                    \
  namespace nsa::decode {                                                                                \
  template void launch_tiled_attend<__nv_bfloat16, DQK, DV>(const DecodeParams&, const Partials<float>&, \
                                                            Branch);                                     \
  template void launch_tiled_attend<__half, DQK, DV>(const DecodeParams&, const Partials<float>&, Branch); \
  }
