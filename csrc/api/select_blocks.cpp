// Host API of fused top-n block selection (spec section 3): checks every input and the block
// configuration, allocates the int32 indices, fills SelectParams once and runs the CPU or CUDA kernel.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "api/selection_config.h"
#include "common/checks.h"
#include "common/host_layout.h"
#include "kernels.h"

namespace nsa {
namespace {

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k_cmp, const at::Tensor& lse, int64_t compress_block,
                         int64_t compress_stride, int64_t select_block, int64_t select_count, int64_t init_blocks,
                         int64_t local_blocks, double scale, const std::optional<at::Tensor>& cu_seqlens_q,
                         const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  SelectParams p{};
  p.selection = check_selection_config(compress_block, compress_stride, select_block, select_count, init_blocks,
                                       local_blocks);
  NSA_CHECK_ARG(std::isfinite(scale), "scale", "must be finite, got ", scale);
  const bool packed = cu_seqlens_q.has_value();
  NSA_CHECK_ARG(packed == cu_seqlens_k.has_value(), packed ? "cu_seqlens_k" : "cu_seqlens_q",
                "must be given together with the other cu_seqlens (packed layout) or not at all (padded layout)");
  const int64_t rank = packed ? 3 : 4;
  check_qkv_tensor(q, "q", rank, q.device(), packed ? "[total_q, Hq, Dk]" : "[B, TQ, Hq, Dk]");
  check_qkv_tensor(k_cmp, "k_cmp", rank, q.device(), packed ? "[total_c, Hk, Dk]" : "[B, TC, Hk, Dk]");
  check_same_dtype(k_cmp, "k_cmp", q);
  const int64_t head_axis = rank - 2;
  const int64_t heads_q = q.size(head_axis), heads_k = k_cmp.size(head_axis);
  NSA_CHECK_ARG(heads_k >= 1 && heads_q % heads_k == 0, "k_cmp",
                "must have a number of heads Hk >= 1 that divides q's Hq = ", heads_q, ", got Hk = ", heads_k);
  NSA_CHECK_ARG(heads_q >= 1 && q.size(-1) >= 1, "q", "must have Hq >= 1 heads and a head dim Dk >= 1, got shape ",
                q.sizes());
  check_size(k_cmp, "k_cmp", -1, q.size(-1), "the head dim of q, Dk");
  if (!packed) check_size(k_cmp, "k_cmp", 0, q.size(0), "the batch size of q");
  auto lse_sizes = q.sizes().vec();
  lse_sizes.pop_back();
  const at::ScalarType lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  NSA_CHECK_ARG(lse.sizes() == at::IntArrayRef(lse_sizes) && lse.scalar_type() == lse_dtype, "lse", "must have shape ",
                at::IntArrayRef(lse_sizes), " and dtype ", lse_dtype, ", got ", lse.sizes(), " ", lse.scalar_type());
  NSA_CHECK_ARG(lse.device() == q.device(), "lse", "must be on ", q.device(), " like q, got ", lse.device());

  p.num_heads_q = heads_q;
  p.num_heads_k = heads_k;
  p.head_dim_qk = q.size(-1);
  p.max_seqlen_q = max_seqlen_q;
  p.scale = scale;
  p.mask = p.selection.visibility();
  at::Tensor cu_seqlens_c;
  if (packed) {
    const int64_t n = check_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", q.device(), q.size(0), max_seqlen_q,
                                       "max_seqlen_q");
    // cu_seqlens_k holds original key lengths: they index no tensor, so only max_seqlen_k bounds them.
    const int64_t n_k = check_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", q.device(),
                                         std::numeric_limits<int64_t>::max(), max_seqlen_k, "max_seqlen_k");
    NSA_CHECK_ARG(n == n_k, "cu_seqlens_k", "must have as many sequences as cu_seqlens_q (", n, "), got ", n_k);
    cu_seqlens_c = compressed_row_offsets(*cu_seqlens_k, compress_block, compress_stride);
    check_compressed_rows(cu_seqlens_c, k_cmp, "k_cmp");
    p.num_seqs = n;
    p.q_rows = q.size(0);
    p.key_rows = k_cmp.size(0);
    p.max_key_rows = num_compressed_tokens(max_seqlen_k, compress_block, compress_stride);
    p.key_positions = max_seqlen_k;
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
    p.cu_seqlens_key_rows = cu_seqlens_c.data_ptr<int32_t>();
  } else {
    NSA_CHECK_ARG(max_seqlen_q == q.size(1), "max_seqlen_q", "must equal q.size(1) = ", q.size(1),
                  " in padded layout, got ", max_seqlen_q);
    NSA_CHECK_ARG(max_seqlen_k >= 0, "max_seqlen_k", "must be >= 0 (the original key length TK), got ",
                  max_seqlen_k);
    const int64_t tokens = num_compressed_tokens(max_seqlen_k, compress_block, compress_stride);
    NSA_CHECK_ARG(k_cmp.size(1) >= tokens, "k_cmp", "must have at least TC = ", tokens,
                  " compressed tokens (dim 1) for TK = max_seqlen_k = ", max_seqlen_k, ", got shape ", k_cmp.sizes());
    p.num_seqs = q.size(0);
    p.max_key_rows = tokens;
    p.key_positions = max_seqlen_k;
  }

  const at::OptionalDeviceGuard device_guard(at::device_of(q));
  auto out_shape = q.sizes().vec();
  out_shape[head_axis] = heads_k;
  out_shape.back() = select_count;
  // Packed rows that belong to no sequence select nothing (-1); every other row is written.
  const auto options = q.options().dtype(at::kInt);
  at::Tensor indices = packed ? at::full(out_shape, -1, options) : at::empty(out_shape, options);
  p.q = q.data_ptr();
  p.k = k_cmp.data_ptr();
  p.lse = const_cast<void*>(lse.const_data_ptr());
  p.q_strides = row_head_strides(q, packed, true);
  p.k_strides = row_head_strides(k_cmp, packed, true);
  p.lse_strides = row_head_strides(lse, packed, false);
  p.indices = indices.data_ptr<int32_t>();
  p.index_strides = row_head_strides(indices, packed, true);
  if (indices.numel() == 0 || p.num_seqs == 0) return indices;
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(q)) {
    select_blocks_cuda(p, q.scalar_type());
    return indices;
  }
#endif
  TORCH_CHECK(q.is_cpu(), "nsa: select_blocks has no kernel for device ", q.device());
  select_blocks_cpu(p, q.scalar_type());
  return indices;
}

}  // namespace

TORCH_LIBRARY_IMPL(nsa, CPU, m) { m.impl("select_blocks", &select_blocks); }

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa, CUDA, m) { m.impl("select_blocks", &select_blocks); }
#endif

}  // namespace nsa
