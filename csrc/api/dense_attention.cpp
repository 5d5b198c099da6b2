// Host API of the dense-tiled attention family: sliding-window attention (spec section 5) and
// compressed attention (spec section 2).
// Checks every input, allocates outputs, fills AttentionParams once and hands them to the CPU or CUDA
// kernel. The same functions are registered for both dispatch keys; only the launch differs.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "api/attention_common.h"
#include "common/checks.h"
#include "kernels.h"

namespace nsa {
namespace {

std::tuple<at::Tensor, at::Tensor> run_forward(const AttentionInputs& in, const DescribedInputs& described) {
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  ForwardState s = prepare_forward(in, described.params);
  if (!s.has_work) return {s.out, s.lse};
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(in.q)) {
    dense_attention_fwd_cuda(s.params, in.q.scalar_type());
    return {s.out, s.lse};
  }
#endif
  TORCH_CHECK(in.q.is_cpu(), "nsa: no kernel for device ", in.q.device());
  dense_attention_fwd_cpu(s.params, in.q.scalar_type());
  return {s.out, s.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const AttentionInputs& in,
                                                            const DescribedInputs& described,
                                                            const at::Tensor& dout,
                                                            const std::optional<at::Tensor>& dlse,
                                                            const at::Tensor& out, const at::Tensor& lse) {
  const at::OptionalDeviceGuard device_guard(at::device_of(in.q));
  BackwardState s = prepare_backward(in, described.params, dout, dlse, out, lse);
  if (!s.has_work) return {s.dq, s.dk, s.dv};
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(in.q)) {
    // rowsum(dout * out) - dlse per (row, head) for the tiled bf16 / fp16 kernels, laid out like lse.
    at::Tensor delta;
    if (in.q.scalar_type() == at::kHalf || in.q.scalar_type() == at::kBFloat16) {
      delta = at::empty(s.lse.sizes(), s.lse.options().dtype(at::kFloat));
      s.params.softmax_delta = delta.data_ptr<float>();
    }
    dense_attention_bwd_cuda(s.params, in.q.scalar_type());
    return {s.dq, s.dk, s.dv};
  }
#endif
  TORCH_CHECK(in.q.is_cpu(), "nsa: no kernel for device ", in.q.device());
  dense_attention_bwd_cpu(s.params, in.q.scalar_type());
  return {s.dq, s.dk, s.dv};
}

DescribedInputs describe_window(const AttentionInputs& in, int64_t window, double scale) {
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
  const AttentionInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return run_forward(in, describe_window(in, window, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, int64_t window, double scale,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return run_backward(in, describe_window(in, window, scale), dout, dlse, out, lse);
}

AttentionInputs compressed_inputs(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
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

DescribedInputs describe_compressed(const AttentionInputs& in, double scale) {
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
  const AttentionInputs in = compressed_inputs(q, k_cmp, v_cmp, compress_block, compress_stride, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return run_forward(in, describe_compressed(in, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compressed_attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k_cmp,
    const at::Tensor& v_cmp, const at::Tensor& out, const at::Tensor& lse, int64_t compress_block,
    int64_t compress_stride, double scale, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionInputs in = compressed_inputs(q, k_cmp, v_cmp, compress_block, compress_stride, cu_seqlens_q,
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
