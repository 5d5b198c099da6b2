#pragma once
// Included by the selection head-dim files only: defines the entry points for one head-dim pair.
#include "cuda/tile/instantiate.h"

#include "cuda/selection/config.h"
#include "cuda/selection/kernels.h"

namespace nsa {
namespace tiled {

template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_selection_fwd(const SelectionAttentionParams& p) {
  launch_selection_fwd<typename SelectionConfig<Element, kHeadDimQK, kHeadDimV>::Fwd>(p);
}

template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_selection_bwd(const SelectionAttentionParams& p) {
  using C = SelectionConfig<Element, kHeadDimQK, kHeadDimV>;
  launch_selection_bwd<Element, typename C::Dq, typename C::Dkv>(p);
}

}  // namespace tiled
}  // namespace nsa

#define NSA_INSTANTIATE_SELECTION(DQK, DV)                                                                 \
  NSA_INSTANTIATE_ENTRY_POINTS(run_selection_fwd, SelectionAttentionParams, run_selection_bwd, SelectionAttentionParams, \
                               DQK, DV)
