// Host-side checks and allocations shared by every attention op (see attention_common.h).
#include "api/attention_common.h"

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/host_layout.h"
#include "common/masks.h"

namespace nsa {

Strides strides_of(const at::Tensor& t, bool packed) {
  return row_head_strides(t, packed, /*has_dim=*/t.dim() == (packed ? 3 : 4));  // lse has no head-dim axis
}

DescribedInputs check_and_describe(const AttentionInputs& in) {
  const at::Tensor& q = in.q;
  const bool packed = in.packed();
  NSA_CHECK_ARG(packed == in.cu_seqlens_k.has_value(), packed ? "cu_seqlens_k" : "cu_seqlens_q",
                "must be given together with the other cu_seqlens (packed layout) or not at all (padded layout)");
  const int64_t rank = packed ? 3 : 4;
  const char* q_shape = packed ? "[total_q, Hq, Dk]" : "[B, TQ, Hq, Dk]";
  const char* k_shape = packed ? "[total_k, Hk, Dk]" : "[B, TK, Hk, Dk]";
  const char* v_shape = packed ? "[total_k, Hk, Dv]" : "[B, TK, Hk, Dv]";
  const char *k_name = in.k_name, *v_name = in.v_name;
  check_qkv_tensor(q, "q", rank, q.device(), q_shape);
  check_qkv_tensor(in.k, k_name, rank, q.device(), k_shape);
  check_qkv_tensor(in.v, v_name, rank, q.device(), v_shape);
  check_same_dtype(in.k, k_name, q);
  check_same_dtype(in.v, v_name, q);
  const int64_t head_axis = rank - 2;
  const int64_t heads_q = q.size(head_axis), heads_k = in.k.size(head_axis);
  // As decode_attention and select_blocks: a group of zero query heads would select blocks for nobody.
  NSA_CHECK_ARG(heads_q >= 1, "q", "must have Hq >= 1 heads, got shape ", q.sizes());
  NSA_CHECK_ARG(heads_k >= 1 && heads_q % heads_k == 0, k_name,
                "must have a number of heads Hk >= 1 that divides q's Hq = ", heads_q, ", got Hk = ", heads_k);
  check_size(in.v, v_name, head_axis, heads_k, "the heads of k, Hk");
  check_size(in.k, k_name, -1, q.size(-1), "the head dim of q, Dk");
  check_size(in.v, v_name, head_axis - 1, in.k.size(head_axis - 1), "the key rows of k");
  NSA_CHECK_ARG(q.size(-1) >= 1 && in.v.size(-1) >= 1, "q", "and v must have head dims >= 1, got Dk = ", q.size(-1),
                ", Dv = ", in.v.size(-1));
  if (!packed) {
    check_size(in.k, k_name, 0, q.size(0), "the batch size of q");
    check_size(in.v, v_name, 0, q.size(0), "the batch size of q");
  }

  DescribedInputs described{};
  AttentionParams& p = described.params;
  p.num_heads_q = heads_q;
  p.num_heads_k = heads_k;
  p.head_dim_qk = q.size(-1);
  p.head_dim_v = in.v.size(-1);
  p.max_seqlen_q = in.max_seqlen_q;
  p.key_positions = in.max_seqlen_k;
  p.max_key_rows = in.compressed() ? num_compressed_tokens(in.max_seqlen_k, in.compress_block, in.compress_stride)
                                   : in.max_seqlen_k;
  if (packed) {
    const int64_t n = check_cu_seqlens(*in.cu_seqlens_q, "cu_seqlens_q", q.device(), q.size(0), in.max_seqlen_q,
                                       "max_seqlen_q");
    // Compressed: cu_seqlens_k counts original keys, which the op never sees, so no row bound here.
    const int64_t n_k = check_cu_seqlens(*in.cu_seqlens_k, "cu_seqlens_k", q.device(),
                                         in.compressed() ? std::numeric_limits<int64_t>::max() : in.k.size(0),
                                         in.max_seqlen_k, "max_seqlen_k");
    NSA_CHECK_ARG(n == n_k, "cu_seqlens_k", "must have as many sequences as cu_seqlens_q (", n, "), got ", n_k);
    p.num_seqs = n;
    p.q_rows = q.size(0);
    p.key_rows = in.k.size(0);
    p.cu_seqlens_q = in.cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_seqlens_k->data_ptr<int32_t>();
    p.cu_seqlens_key_rows = p.cu_seqlens_k;
    if (in.compressed()) {
      described.cu_seqlens_key_rows = compressed_row_offsets(*in.cu_seqlens_k, in.compress_block, in.compress_stride);
      check_compressed_rows(described.cu_seqlens_key_rows, in.k, k_name);
      p.cu_seqlens_key_rows = described.cu_seqlens_key_rows.data_ptr<int32_t>();
    }
  } else {
    NSA_CHECK_ARG(in.max_seqlen_q == q.size(1), "max_seqlen_q", "must equal q.size(1) = ", q.size(1),
                  " in padded layout, got ", in.max_seqlen_q);
    if (in.compressed()) {
      NSA_CHECK_ARG(in.max_seqlen_k >= 0, "max_seqlen_k", "(the original key length TK) must be >= 0, got ",
                    in.max_seqlen_k);
      NSA_CHECK_ARG(in.k.size(1) >= p.max_key_rows, k_name, "has ", in.k.size(1), " tokens, but TK = ",
                    in.max_seqlen_k, " makes ", p.max_key_rows, " compressed tokens");
    } else {
      NSA_CHECK_ARG(in.max_seqlen_k == in.k.size(1), "max_seqlen_k", "must equal k.size(1) = ", in.k.size(1),
                    " in padded layout, got ", in.max_seqlen_k);
    }
    p.num_seqs = q.size(0);
  }
  p.q = q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.q_strides = strides_of(q, packed);
  p.k_strides = strides_of(in.k, packed);
  p.v_strides = strides_of(in.v, packed);
  return described;
}

void check_scale(double scale) { NSA_CHECK_ARG(std::isfinite(scale), "scale", "must be finite, got ", scale); }

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> lse_shape(const at::Tensor& q) {
  auto sizes = q.sizes().vec();
  sizes.pop_back();
  return sizes;
}

namespace {

std::vector<int64_t> out_shape(const AttentionInputs& in) {
  auto shape = in.q.sizes().vec();
  shape.back() = in.v.size(-1);
  return shape;
}

}  // namespace

ForwardState prepare_forward(const AttentionInputs& in, const AttentionParams& described) {
  const bool packed = in.packed();
  const auto options = in.q.options();
  const auto lse_options = options.dtype(lse_dtype(in.q));
  ForwardState s{described, {}, {}, false};
  // Packed rows that belong to no sequence are defined too: o = 0, lse = -inf.
  s.out = packed ? at::zeros(out_shape(in), options) : at::empty(out_shape(in), options);
  s.lse = packed ? at::full(lse_shape(in.q), -std::numeric_limits<double>::infinity(), lse_options)
                 : at::empty(lse_shape(in.q), lse_options);
  AttentionParams& p = s.params;
  p.o = s.out.data_ptr();
  p.lse = s.lse.data_ptr();
  p.o_strides = strides_of(s.out, packed);
  p.lse_strides = strides_of(s.lse, packed);
  s.has_work = in.q.numel() > 0 && p.num_seqs > 0;
  return s;
}

BackwardState prepare_backward(const AttentionInputs& in, const AttentionParams& described, const at::Tensor& dout,
                               const std::optional<at::Tensor>& dlse, const at::Tensor& out, const at::Tensor& lse) {
  const bool packed = in.packed();
  const auto expected_out = out_shape(in);
  NSA_CHECK_ARG(out.sizes() == at::IntArrayRef(expected_out) && out.scalar_type() == in.q.scalar_type(), "out",
                "must have shape ", at::IntArrayRef(expected_out), " and q's dtype, got ", out.sizes(), " ",
                out.scalar_type());
  NSA_CHECK_ARG(out.device() == in.q.device() && out.stride(-1) == 1, "out",
                "must be on q's device with a contiguous last dimension");
  NSA_CHECK_ARG(dout.sizes() == out.sizes() && dout.scalar_type() == out.scalar_type(), "dout",
                "must match out (shape ", out.sizes(), ", dtype ", out.scalar_type(), "), got ", dout.sizes(), " ",
                dout.scalar_type());
  NSA_CHECK_ARG(dout.device() == in.q.device(), "dout", "must be on q's device");
  const auto lse_sizes = lse_shape(in.q);
  NSA_CHECK_ARG(lse.sizes() == at::IntArrayRef(lse_sizes) && lse.scalar_type() == lse_dtype(in.q) &&
                    lse.device() == in.q.device(),
                "lse", "must have shape ", at::IntArrayRef(lse_sizes), " and dtype ", lse_dtype(in.q),
                " on q's device, got ", lse.sizes(), " ", lse.scalar_type());
  if (dlse) {
    NSA_CHECK_ARG(dlse->sizes() == lse.sizes() && dlse->device() == in.q.device(), "dlse",
                  "must have lse's shape ", lse.sizes(), " on q's device, got ", dlse->sizes());
  }

  BackwardState s{};
  AttentionBwdParams& p = s.params;
  static_cast<AttentionParams&>(p) = described;
  s.dout = dout.stride(-1) == 1 ? dout : dout.contiguous();
  s.lse = lse.contiguous();
  s.dlse = dlse ? dlse->to(lse.scalar_type()).contiguous() : at::Tensor();
  p.o = out.data_ptr();
  p.lse = s.lse.data_ptr();
  p.dout = s.dout.data_ptr();
  p.dlse = dlse ? s.dlse.data_ptr() : nullptr;
  p.o_strides = strides_of(out, packed);
  p.lse_strides = strides_of(s.lse, packed);
  p.dout_strides = strides_of(s.dout, packed);
  p.dlse_strides = dlse ? strides_of(s.dlse, packed) : Strides{};

  // Zero-filled: rows no sequence covers, and keys no query sees, get zero gradient.
  s.dq = at::zeros_like(in.q, at::MemoryFormat::Contiguous);
  s.dk = at::zeros_like(in.k, at::MemoryFormat::Contiguous);
  s.dv = at::zeros_like(in.v, at::MemoryFormat::Contiguous);
  p.dq = s.dq.data_ptr();
  p.dk = s.dk.data_ptr();
  p.dv = s.dv.data_ptr();
  p.dq_strides = strides_of(s.dq, packed);
  p.dk_strides = strides_of(s.dk, packed);
  p.dv_strides = strides_of(s.dv, packed);
  s.has_work = in.q.numel() > 0 && in.k.numel() > 0 && p.num_seqs > 0;
  return s;
}

}  // namespace nsa
