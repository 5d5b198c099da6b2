#pragma once
// Included by the per-head-dim files only: defines the entry points for one head-dim pair.
#include "cuda/tile/instantiate.h"

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

#define NSA_INSTANTIATE_TILED(DQK, DV) NSA_INSTANTIATE_ENTRY_POINTS(run_fwd, AttentionParams, run_bwd, AttentionBwdParams, DQK, DV)
