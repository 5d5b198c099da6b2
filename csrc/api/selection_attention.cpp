// Host API of selected-block attention (spec section 4): q/k/v are checked as for every attention op
// (attention_common.h), plus the block indices. The same functions serve the CPU and CUDA dispatch
// keys; only the kernel launch differs.
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

// Params plus the block selection and the (contiguous) indices tensor it points into.
struct DescribedSelection {
  DescribedInputs inputs;
  at::Tensor indices;
  SelectedBlocks selection;
};

// indices: int32 [B, TQ, Hk, n] (packed [total_q, Hk, n]) on q's device, n >= 1. Its values are
// not checked: kernels ignore -1, out-of-range and future ids (validate_block_indices reports them).
DescribedSelection describe_selection(const AttentionInputs& in, const at::Tensor& indices, int64_t select_block,
                                      double scale) {
  NSA_CHECK_ARG(select_block >= 1, "select_block", "must be >= 1, got ", select_block);
  check_scale(scale);
  DescribedSelection d{check_and_describe(in), {}, {}};
  d.inputs.params.scale = scale;

  const bool packed = in.packed();
  const int64_t rank = packed ? 3 : 4;
  const char* shape = packed ? "[total_q, Hk, n]" : "[B, TQ, Hk, n]";
  NSA_CHECK_ARG(indices.scalar_type() == at::kInt, "indices", "must be int32, got ", indices.scalar_type());
  NSA_CHECK_ARG(indices.dim() == rank, "indices", "must have shape ", shape, " (rank ", rank, "), got ",
                indices.sizes());
  NSA_CHECK_ARG(indices.device() == in.q.device(), "indices", "must be on ", in.q.device(), " like q, got ",
                indices.device());
  for (int64_t dim = 0; dim < rank - 2; ++dim)
    check_size(indices, "indices", dim, in.q.size(dim), packed ? "q's rows, total_q" : (dim ? "q's TQ" : "q's B"));
  check_size(indices, "indices", rank - 2, d.inputs.params.num_heads_k, "the heads of k, Hk");
  NSA_CHECK_ARG(indices.size(-1) >= 1, "indices", "must hold n >= 1 block ids per row, got shape ", indices.sizes());

  d.indices = indices.contiguous();
  d.selection.indices = d.indices.data_ptr<int32_t>();
  d.selection.strides = strides_of(d.indices, packed);
  d.selection.count = d.indices.size(-1);
  d.selection.block = select_block;
  return d;
}

std::tuple<at::Tensor, at::Tensor> selection_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices, int64_t select_block,
    double scale, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  const DescribedSelection d = describe_selection(in, indices, select_block, scale);
  const at::OptionalDeviceGuard device_guard(at::device_of(q));
  ForwardState s = prepare_forward(in, d.inputs.params);
  if (!s.has_work) return {s.out, s.lse};
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(q)) {
    selection_attention_fwd_cuda(s.params, d.selection, q.scalar_type(), q);
    return {s.out, s.lse};
  }
#endif
  TORCH_CHECK(q.is_cpu(), "nsa: no selection_attention kernel for device ", q.device());
  selection_attention_fwd_cpu(s.params, d.selection, q.scalar_type());
  return {s.out, s.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selection_attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& indices, const at::Tensor& out, const at::Tensor& lse,
    int64_t select_block, double scale, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionInputs in{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  const DescribedSelection d = describe_selection(in, indices, select_block, scale);
  const at::OptionalDeviceGuard device_guard(at::device_of(q));
  BackwardState s = prepare_backward(in, d.inputs.params, dout, dlse, out, lse);
  if (!s.has_work) return {s.dq, s.dk, s.dv};
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(q)) {
    selection_attention_bwd_cuda(s.params, d.selection, q.scalar_type(), q, s.lse);
    return {s.dq, s.dk, s.dv};
  }
#endif
  TORCH_CHECK(q.is_cpu(), "nsa: no selection_attention kernel for device ", q.device());
  selection_attention_bwd_cpu(s.params, d.selection, q.scalar_type());
  return {s.dq, s.dk, s.dv};
}

}  // namespace

void register_selection_ops(torch::Library& m) {
  m.impl("selection_attention_fwd", &selection_attention_fwd);
  m.impl("selection_attention_bwd", &selection_attention_bwd);
}

TORCH_LIBRARY_IMPL(nsa, CPU, m) { register_selection_ops(m); }

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa, CUDA, m) { register_selection_ops(m); }
#endif

}  // namespace nsa
