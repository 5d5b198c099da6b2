#pragma once
// Host-side pieces every attention op shares (csrc/api/*.cpp): the checks of q, k, v and cu_seqlens
// that fill the layout part of AttentionParams, the allocation of (out, lse), and the checks and
// allocations of the backward. Every failure is a ValueError naming the argument (common/checks.h).
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/attention_params.h"

namespace nsa {

// Element strides of a padded [B, T, H, D] / [B, T, H] or packed [T, H, D] / [T, H] tensor.
Strides strides_of(const at::Tensor& t, bool packed);

// Inputs shared by the forward and backward of every attention op. Keys are either the sequence's
// own keys or its compressed tokens (compress_block > 0): then k/v hold TC(TK) tokens per sequence,
// TK being max_seqlen_k (padded) or the lengths in cu_seqlens_k (packed).
struct AttentionInputs {
  at::Tensor q, k, v;
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  int64_t compress_block = 0;
  int64_t compress_stride = 0;
  const char* k_name = "k";
  const char* v_name = "v";

  bool compressed() const { return compress_block > 0; }
  bool packed() const { return cu_seqlens_q.has_value(); }
};

// Params plus the tensors they point into that the op creates itself.
struct DescribedInputs {
  AttentionParams params;
  at::Tensor cu_seqlens_key_rows;  // compressed-token offsets (packed compressed layout)
};

// Checks q, k, v, cu_seqlens and max_seqlens and fills everything in AttentionParams but the
// outputs, scale and mask.
DescribedInputs check_and_describe(const AttentionInputs& in);

void check_scale(double scale);
at::ScalarType lse_dtype(const at::Tensor& q);
std::vector<int64_t> lse_shape(const at::Tensor& q);

// The forward's outputs, allocated, and params pointing at them. has_work is false when there is
// nothing to compute (no query or no sequence): the outputs are then final already.
struct ForwardState {
  AttentionParams params;
  at::Tensor out, lse;
  bool has_work;
};
ForwardState prepare_forward(const AttentionInputs& in, const AttentionParams& described);

// The backward's extra inputs (checked; contiguous copies where the kernels need them, kept alive
// here) and its zero-filled gradients, with params pointing at all of them.
struct BackwardState {
  AttentionBwdParams params;
  at::Tensor dout, lse, dlse, dq, dk, dv;
  bool has_work;
};
BackwardState prepare_backward(const AttentionInputs& in, const AttentionParams& described, const at::Tensor& dout,
                               const std::optional<at::Tensor>& dlse, const at::Tensor& out, const at::Tensor& lse);

}  // namespace nsa
