// Host API of the dense-tiled attention family: sliding-window attention (spec section 5) and
// compressed attention (spec section 2).
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

// Inputs shared by the forward and backward of every dense op. Keys are either the sequence's own
// keys (sliding window) or its compressed tokens (compress_block > 0): then k/v hold TC(TK) tokens
// per sequence, TK being max_seqlen_k (padded) or the lengths in cu_seqlens_k (packed).
struct DenseInputs {
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

// cu_seqlens_c: cumulative compressed-token counts of the sequences, computed on their device.
at::Tensor compressed_row_offsets(const at::Tensor& cu_seqlens_k, int64_t block, int64_t stride) {
  const at::Tensor lengths = (cu_seqlens_k.slice(0, 1) - cu_seqlens_k.slice(0, 0, -1)).to(at::kLong);
  const at::Tensor tokens = at::clamp_min(at::floor_divide(lengths - block, stride) + 1, 0);
  return at::cat({at::zeros({1}, tokens.options()), tokens.cumsum(0)}).to(at::kInt);
}

DescribedInputs check_and_describe(const DenseInputs& in) {
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
    p.cu_seqlens_q = in.cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_seqlens_k->data_ptr<int32_t>();
    p.cu_seqlens_key_rows = p.cu_seqlens_k;
    if (in.compressed()) {
      described.cu_seqlens_key_rows = compressed_row_offsets(*in.cu_seqlens_k, in.compress_block, in.compress_stride);
      if (q.is_cpu()) {
        const int64_t needed = described.cu_seqlens_key_rows[-1].item<int64_t>();
        NSA_CHECK_ARG(needed <= in.k.size(0), k_name, "has ", in.k.size(0), " rows, but the key lengths in ",
                      "cu_seqlens_k make ", needed, " compressed tokens");
      }
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

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> lse_shape(const at::Tensor& q) {
  auto sizes = q.sizes().vec();
  sizes.pop_back();
  return sizes;
}

std::tuple<at::Tensor, at::Tensor> run_forward(const DenseInputs& in, DescribedInputs described) {
  AttentionParams& p = described.params;
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  const bool packed = in.packed();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const DenseInputs& in, const DescribedInputs& described,
                                                            const at::Tensor& dout,
                                                            const std::optional<at::Tensor>& dlse,
                                                            const at::Tensor& out, const at::Tensor& lse) {
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  const bool packed = in.packed();
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
  static_cast<AttentionParams&>(p) = described.params;
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

DescribedInputs describe_window(const DenseInputs& in, int64_t window, double scale) {
  NSA_CHECK_ARG(window >= 1, "window", "must be >= 1, got ", window);
  check_scale(scale);
  DescribedInputs described = check_and_describe(in);
  described.params.scale = scale;
  described.params.mask = VisibilityMask::sliding_window(window);
  return described;
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

DenseInputs compressed_inputs(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
                              int64_t compress_block, int64_t compress_stride,
                              const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k) {
  NSA_CHECK_ARG(compress_stride >= 1, "compress_stride", "must be >= 1, got ", compress_stride);
  NSA_CHECK_ARG(compress_block >= 1 && compress_block % compress_stride == 0, "compress_block",
                "must be a positive multiple of compress_stride (", compress_stride, "), got ", compress_block);
  return {q, k_cmp, v_cmp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
          compress_block, compress_stride, "k_cmp", "v_cmp"};
}

DescribedInputs describe_compressed(const DenseInputs& in, double scale) {
  check_scale(scale);
  DescribedInputs described = check_and_describe(in);
  described.params.scale = scale;
  described.params.mask = VisibilityMask::compressed(in.compress_block, in.compress_stride);
  return described;
}

std::tuple<at::Tensor, at::Tensor> compressed_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp, int64_t compress_block,
    int64_t compress_stride, double scale, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const DenseInputs in = compressed_inputs(q, k_cmp, v_cmp, compress_block, compress_stride, cu_seqlens_q,
                                           cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return run_forward(in, describe_compressed(in, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k_cmp,
    const at::Tensor& v_cmp, const at::Tensor& out, const at::Tensor& lse, int64_t compress_block,
    int64_t compress_stride, double scale, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const DenseInputs in = compressed_inputs(q, k_cmp, v_cmp, compress_block, compress_stride, cu_seqlens_q,
                                           cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return run_backward(in, describe_compressed(in, scale), dout, dlse, out, lse);
}

}  // namespace

// The host functions pick the CPU or CUDA kernel from q's device.
void register_dense_ops(torch::Library& m) {
  m.impl("sliding_window_attention_fwd", &sliding_window_attention_fwd);
  m.impl("sliding_window_attention_bwd", &sliding_window_attention_bwd);
  m.impl("compressed_attention_fwd", &compressed_attention_fwd);
  m.impl("compressed_attention_bwd", &compressed_attention_bwd);
}

TORCH_LIBRARY_IMPL(nsa, CPU, m) { register_dense_ops(m); }

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa, CUDA, m) { register_dense_ops(m); }
#endif

}  // namespace nsa
