// Host API of the dense-tiled attention family: sliding-window attention (spec section 5).
// Checks every input, allocates outputs, fills AttentionParams once and hands them to the CPU or CUDA
// kernel. The same functions are registered for both dispatch keys; only the launch differs.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "kernels.h"

namespace nsa {
namespace {

Strides strides_of(const at::Tensor& t, bool packed) {
  // Padded [B, T, H, D] / [B, T, H]; packed [T, H, D] / [T, H] (no batch dimension).
  const int64_t rank = t.dim();
  const bool has_dim = (packed ? 3 : 4) == rank;  // lse has no head-dim axis
  const int64_t head_axis = has_dim ? rank - 2 : rank - 1;
  return {packed ? 0 : t.stride(0), t.stride(head_axis - 1), t.stride(head_axis)};
}

// Shapes shared by the forward and backward of every dense op. Fills the layout part of params.
struct DenseInputs {
  at::Tensor q, k, v;
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
};

AttentionParams check_and_describe(const DenseInputs& in) {
  const at::Tensor& q = in.q;
  const bool packed = in.cu_seqlens_q.has_value();
  NSA_CHECK_ARG(packed == in.cu_seqlens_k.has_value(), packed ? "cu_seqlens_k" : "cu_seqlens_q",
                "must be given together with the other cu_seqlens (packed layout) or not at all (padded layout)");
  const int64_t rank = packed ? 3 : 4;
  const char* q_shape = packed ? "[total_q, Hq, Dk]" : "[B, TQ, Hq, Dk]";
  const char* k_shape = packed ? "[total_k, Hk, Dk]" : "[B, TK, Hk, Dk]";
  const char* v_shape = packed ? "[total_k, Hk, Dv]" : "[B, TK, Hk, Dv]";
  check_qkv_tensor(q, "q", rank, q.device(), q_shape);
  check_qkv_tensor(in.k, "k", rank, q.device(), k_shape);
  check_qkv_tensor(in.v, "v", rank, q.device(), v_shape);
  check_same_dtype(in.k, "k", q);
  check_same_dtype(in.v, "v", q);
  const int64_t head_axis = rank - 2;
  const int64_t heads_q = q.size(head_axis), heads_k = in.k.size(head_axis);
  NSA_CHECK_ARG(heads_k >= 1 && heads_q % heads_k == 0, "k",
                "must have a number of heads Hk >= 1 that divides q's Hq = ", heads_q, ", got Hk = ", heads_k);
  check_size(in.v, "v", head_axis, heads_k, "the heads of k, Hk");
  check_size(in.k, "k", -1, q.size(-1), "the head dim of q, Dk");
  check_size(in.v, "v", head_axis - 1, in.k.size(head_axis - 1), "the key rows of k");
  NSA_CHECK_ARG(q.size(-1) >= 1 && in.v.size(-1) >= 1, "q", "and v must have head dims >= 1, got Dk = ", q.size(-1),
                ", Dv = ", in.v.size(-1));
  if (!packed) {
    check_size(in.k, "k", 0, q.size(0), "the batch size of q");
    check_size(in.v, "v", 0, q.size(0), "the batch size of q");
  }

  AttentionParams p{};
  p.num_heads_q = heads_q;
  p.num_heads_k = heads_k;
  p.head_dim_qk = q.size(-1);
  p.head_dim_v = in.v.size(-1);
  p.max_seqlen_q = in.max_seqlen_q;
  p.max_key_rows = in.max_seqlen_k;
  p.key_positions = in.max_seqlen_k;
  if (packed) {
    const int64_t n = check_cu_seqlens(*in.cu_seqlens_q, "cu_seqlens_q", q.device(), q.size(0), in.max_seqlen_q,
                                       "max_seqlen_q");
    const int64_t n_k = check_cu_seqlens(*in.cu_seqlens_k, "cu_seqlens_k", q.device(), in.k.size(0), in.max_seqlen_k,
                                         "max_seqlen_k");
    NSA_CHECK_ARG(n == n_k, "cu_seqlens_k", "must have as many sequences as cu_seqlens_q (", n, "), got ", n_k);
    p.num_seqs = n;
    p.cu_seqlens_q = in.cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_seqlens_k->data_ptr<int32_t>();
    p.cu_seqlens_key_rows = p.cu_seqlens_k;
  } else {
    NSA_CHECK_ARG(in.max_seqlen_q == q.size(1), "max_seqlen_q", "must equal q.size(1) = ", q.size(1),
                  " in padded layout, got ", in.max_seqlen_q);
    NSA_CHECK_ARG(in.max_seqlen_k == in.k.size(1), "max_seqlen_k", "must equal k.size(1) = ", in.k.size(1),
                  " in padded layout, got ", in.max_seqlen_k);
    p.num_seqs = q.size(0);
  }
  p.q = q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.q_strides = strides_of(q, packed);
  p.k_strides = strides_of(in.k, packed);
  p.v_strides = strides_of(in.v, packed);
  return p;
}

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> lse_shape(const at::Tensor& q) {
  auto sizes = q.sizes().vec();
  sizes.pop_back();
  return sizes;
}

std::tuple<at::Tensor, at::Tensor> run_forward(const DenseInputs& in, AttentionParams p) {
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  const bool packed = in.cu_seqlens_q.has_value();
  auto out_shape = in.q.sizes().vec();
  out_shape.back() = in.v.size(-1);
  // Packed rows that belong to no sequence are defined too: o = 0, lse = -inf.
  at::Tensor out = packed ? at::zeros(out_shape, in.q.options()) : at::empty(out_shape, in.q.options());
  at::Tensor lse = packed ? at::full(lse_shape(in.q), -std::numeric_limits<double>::infinity(),
                                     in.q.options().dtype(lse_dtype(in.q)))
                          : at::empty(lse_shape(in.q), in.q.options().dtype(lse_dtype(in.q)));
  p.o = out.data_ptr();
  p.lse = lse.data_ptr();
  p.o_strides = strides_of(out, packed);
  p.lse_strides = strides_of(lse, packed);
  if (in.q.numel() == 0 || p.num_seqs == 0) return {out, lse};
#ifdef NSA_WITH_CUDA
  if (in.q.is_cuda()) {
    dense_attention_fwd_cuda(p, in.q.scalar_type());
    return {out, lse};
  }
#endif
  TORCH_CHECK(in.q.is_cpu(), "nsa: no kernel for device ", in.q.device());
  dense_attention_fwd_cpu(p, in.q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const DenseInputs& in, AttentionParams fwd,
                                                            const at::Tensor& dout,
                                                            const std::optional<at::Tensor>& dlse,
                                                            const at::Tensor& out, const at::Tensor& lse) {
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  const bool packed = in.cu_seqlens_q.has_value();
  auto out_shape = in.q.sizes().vec();
  out_shape.back() = in.v.size(-1);
  NSA_CHECK_ARG(out.sizes() == at::IntArrayRef(out_shape) && out.scalar_type() == in.q.scalar_type(), "out",
                "must have shape ", at::IntArrayRef(out_shape), " and q's dtype, got ", out.sizes(), " ",
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

  AttentionBwdParams p{};
  static_cast<AttentionParams&>(p) = fwd;
  const at::Tensor dout_c = dout.stride(-1) == 1 ? dout : dout.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse ? dlse->to(lse.scalar_type()).contiguous() : at::Tensor();
  p.o = out.data_ptr();
  p.lse = lse_c.data_ptr();
  p.dout = dout_c.data_ptr();
  p.dlse = dlse ? dlse_c.data_ptr() : nullptr;
  p.o_strides = strides_of(out, packed);
  p.lse_strides = strides_of(lse_c, packed);
  p.dout_strides = strides_of(dout_c, packed);
  p.dlse_strides = dlse ? strides_of(dlse_c, packed) : Strides{};

  // Zero-filled: rows no sequence covers, and keys no query sees, get zero gradient.
  at::Tensor dq = at::zeros_like(in.q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(in.k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::zeros_like(in.v, at::MemoryFormat::Contiguous);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides_of(dq, packed);
  p.dk_strides = strides_of(dk, packed);
  p.dv_strides = strides_of(dv, packed);
  if (in.q.numel() == 0 || in.k.numel() == 0 || p.num_seqs == 0) return {dq, dk, dv};
#ifdef NSA_WITH_CUDA
  if (in.q.is_cuda()) {
    dense_attention_bwd_cuda(p, in.q.scalar_type());
    return {dq, dk, dv};
  }
#endif
  TORCH_CHECK(in.q.is_cpu(), "nsa: no kernel for device ", in.q.device());
  dense_attention_bwd_cpu(p, in.q.scalar_type());
  return {dq, dk, dv};
}

void check_scale(double scale) {
  NSA_CHECK_ARG(std::isfinite(scale), "scale", "must be finite, got ", scale);
}

AttentionParams describe_window(const DenseInputs& in, int64_t window, double scale) {
  NSA_CHECK_ARG(window >= 1, "window", "must be >= 1, got ", window);
  check_scale(scale);
  AttentionParams p = check_and_describe(in);
  p.scale = scale;
  p.mask = VisibilityMask::sliding_window(window);
  return p;
}

std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, double scale,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const DenseInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return run_forward(in, describe_window(in, window, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, int64_t window, double scale,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const DenseInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return run_backward(in, describe_window(in, window, scale), dout, dlse, out, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(nsa, CPU, m) {
  m.impl("sliding_window_attention_fwd", &sliding_window_attention_fwd);
  m.impl("sliding_window_attention_bwd", &sliding_window_attention_bwd);
}

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa, CUDA, m) {
  m.impl("sliding_window_attention_fwd", &sliding_window_attention_fwd);
  m.impl("sliding_window_attention_bwd", &sliding_window_attention_bwd);
}
#endif

}  // namespace nsa
