#pragma once
// Included by the per-head-dim files only: defines the entry points for one head-dim pair.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/dense/config.h"
#include "cuda/dense/kernels.h"

namespace nsa {
namespace tiled {

template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_fwd(const AttentionParams& p) {
  launch_fwd<typename Config<Element, kHeadDimQK, kHeadDimV>::Fwd>(p);
}

template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_bwd(const AttentionBwdParams& p) {
  using C = Config<Element, kHeadDimQK, kHeadDimV>;
  launch_bwd<Element, typename C::Dq, typename C::Dkv>(p);
}

}  // namespace tiled
}  // namespace nsa

#define NSA_INSTANTIATE_TILED(DQK, DV)                                                  \
  namespace nsa::tiled {                                                                \
  template void run_fwd<__nv_bfloat16, DQK, DV>(const AttentionParams&);                \
  template void run_fwd<__half, DQK, DV>(const AttentionParams&);                       \
  template void run_bwd<__nv_bfloat16, DQK, DV>(const AttentionBwdParams&);             \
  template void run_bwd<__half, DQK, DV>(const AttentionBwdParams&);                    \
  }
