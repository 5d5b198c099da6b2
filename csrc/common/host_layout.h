#pragma once
// Host helpers that describe tensors to the kernels: element strides of [batch, row, head, ..]
// tensors and the compressed-token row offsets of a packed batch.
#include <ATen/ATen.h>

#include "common/attention_params.h"
#include "common/checks.h"

namespace nsa {

// Padded [B, T, H, D] / [B, T, H]; packed [T, H, D] / [T, H] (no batch dimension: batch stride 0).
// has_dim: whether the tensor has a trailing per-head dimension (q, k, indices) or not (lse).
inline Strides row_head_strides(const at::Tensor& t, bool packed, bool has_dim) {
  const int64_t head_axis = has_dim ? t.dim() - 2 : t.dim() - 1;
  return {packed ? 0 : t.stride(0), t.stride(head_axis - 1), t.stride(head_axis)};
}

// cu_seqlens_c: int32 [N+1] cumulative compressed-token counts max(0, (len - l) // d + 1) of the
// original key lengths in cu_seqlens_k, on cu_seqlens_k's device (no host sync). The Python twin is
// nsa_ext.compressed_seqlens.
inline at::Tensor compressed_row_offsets(const at::Tensor& cu_seqlens_k, int64_t compress_block,
                                         int64_t compress_stride) {
  const at::Tensor lengths = cu_seqlens_k.slice(0, 1).to(at::kLong) - cu_seqlens_k.slice(0, 0, -1).to(at::kLong);
  const at::Tensor tokens = at::div(lengths - compress_block, compress_stride, "floor").add_(1).clamp_min_(0);
  return at::cat({at::zeros({1}, lengths.options()), tokens.cumsum(0)}).to(at::kInt);
}

// In packed layout, the compressed keys must have a row for every token cu_seqlens_c counts
// (checked where host_checks_values: reading the last offset costs nothing there).
inline void check_compressed_rows(const at::Tensor& cu_seqlens_c, const at::Tensor& k_cmp, const char* name) {
  if (!host_checks_values(cu_seqlens_c)) return;
  const int64_t needed = cu_seqlens_c.data_ptr<int32_t>()[cu_seqlens_c.size(0) - 1];
  NSA_CHECK_ARG(k_cmp.size(0) >= needed, name, "must have at least ", needed,
                " rows, the compressed tokens of the key lengths in cu_seqlens_k, got ", k_cmp.size(0));
}

}  // namespace nsa
