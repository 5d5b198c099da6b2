#pragma once
// Explicit instantiation of a family's two entry points, fwd<Element, Dqk, Dv>(const FwdParams&) and
// bwd<...>(const BwdParams&), for bf16 and fp16: one line per head-dim file (dense/, selection/hdim*.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define NSA_INSTANTIATE_ENTRY_POINTS(FWD, FWD_PARAMS, BWD, BWD_PARAMS, DQK, DV) \
  namespace nsa::tiled {                                                       \
  template void FWD<__nv_bfloat16, DQK, DV>(const FWD_PARAMS&);                \
  template void FWD<__half, DQK, DV>(const FWD_PARAMS&);                       \
  template void BWD<__nv_bfloat16, DQK, DV>(const BWD_PARAMS&);                \
  template void BWD<__half, DQK, DV>(const BWD_PARAMS&);                       \
  }
