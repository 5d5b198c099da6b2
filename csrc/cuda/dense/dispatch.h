#pragma once
// The one place that decides which CUDA kernel serves a dense-attention call: the tiled tensor-core
// kernels for bf16 / fp16 with a supported (and compiled) head-dim pair and 16-byte aligned rows,
// else the baseline kernel (explicit fallback, same semantics). All switches live here.
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/attention_params.h"
#include "cuda/dense/config.h"

namespace nsa {
namespace tiled {

// cp.async moves 16-byte chunks: every row a kernel streams must start 16-byte aligned.
inline bool rows_aligned(const void* base, const Strides& st) {
  constexpr int64_t kElems = 8;  // 16 bytes of 16-bit elements
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && st.batch % kElems == 0 && st.row % kElems == 0 &&
         st.head % kElems == 0;
}

inline bool fits_int32(const AttentionParams& p) {
  // Key indices are compared as 32-bit ints in the masks.
  return p.max_key_rows < (int64_t(1) << 31) - 1024 && p.key_positions < (int64_t(1) << 31) - 1024;
}

#define NSA_TILED_HEAD_DIM_CASE(DQK, DV, ...)                         \
  if (p.head_dim_qk == DQK && p.head_dim_v == DV) {                  \
    constexpr int kDqk = DQK, kDv = DV;                              \
    __VA_ARGS__;                                                     \
    return true;                                                     \
  }

// Calls fn.template operator()<Element, Dqk, Dv>() for a supported pair; false when there is none.
template <typename Element, typename Params, typename Fn>
bool dispatch_head_dims(const Params& p, Fn&& fn) {
#ifdef NSA_TILED_HDIM_64
  NSA_TILED_HEAD_DIM_CASE(64, 64, fn.template operator()<Element, kDqk, kDv>())
#endif
#ifdef NSA_TILED_HDIM_128
  NSA_TILED_HEAD_DIM_CASE(128, 128, fn.template operator()<Element, kDqk, kDv>())
#endif
#ifdef NSA_TILED_HDIM_192
  NSA_TILED_HEAD_DIM_CASE(192, 128, fn.template operator()<Element, kDqk, kDv>())
#endif
#ifdef NSA_TILED_HDIM_256
  NSA_TILED_HEAD_DIM_CASE(256, 256, fn.template operator()<Element, kDqk, kDv>())
#endif
  return false;  // other head dims: the baseline kernel
}

template <typename Params, typename Fn>
bool dispatch_dtype(at::ScalarType dtype, const Params& p, Fn&& fn) {
  if (dtype == at::kBFloat16) return dispatch_head_dims<__nv_bfloat16>(p, fn);
  if (dtype == at::kHalf) return dispatch_head_dims<__half>(p, fn);
  return false;  // float32 / float64: the baseline kernel
}

// Runs the tiled forward when it applies; false means the caller must run the baseline.
inline bool try_fwd(const AttentionParams& p, at::ScalarType dtype) {
  if (!fits_int32(p) || !rows_aligned(p.q, p.q_strides) || !rows_aligned(p.k, p.k_strides) ||
      !rows_aligned(p.v, p.v_strides))
    return false;
  return dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() { run_fwd<E, kDqk, kDv>(p); });
}

// The backward also streams dout; it needs p.softmax_delta (float32, laid out like lse).
inline bool try_bwd(const AttentionBwdParams& p, at::ScalarType dtype) {
  if (p.softmax_delta == nullptr || !fits_int32(p) || !rows_aligned(p.q, p.q_strides) ||
      !rows_aligned(p.k, p.k_strides) || !rows_aligned(p.v, p.v_strides) || !rows_aligned(p.dout, p.dout_strides))
    return false;
  return dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() { run_bwd<E, kDqk, kDv>(p); });
}

}  // namespace tiled
}  // namespace nsa
