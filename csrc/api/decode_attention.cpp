// Host API of fused NSA decoding (csrc/common/decode_params.h): checks every input, allocates the
// output and the selected-block indices, fills DecodeParams once and runs the kernel.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "api/selection_config.h"
#include "common/checks.h"
#include "common/decode_params.h"
#include "common/host_layout.h"
#include "kernels.h"

namespace nsa {
namespace {

// A cache tensor [B, rows, Hk, D] of q's dtype and batch, with the given heads and head dim.
void check_cache(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t heads_k, int64_t dim,
                 const char* dim_name) {
  check_qkv_tensor(t, name, 4, q.device(), "[B, capacity, Hk, D]");
  check_same_dtype(t, name, q);
  check_size(t, name, 0, q.size(0), "the batch size of q");
  check_size(t, name, 2, heads_k, "Hk, the kv heads of k_cache");
  check_size(t, name, 3, dim, dim_name);
}

std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
    const std::optional<at::Tensor>& k_swa_in, const std::optional<at::Tensor>& v_swa_in, const at::Tensor& gates,
    const at::Tensor& cache_seqlens, int64_t compress_block, int64_t compress_stride, int64_t select_block,
    int64_t select_count, int64_t init_blocks, int64_t local_blocks, int64_t window, double scale) {
  DecodeParams p{};
  p.selection = check_selection_config(compress_block, compress_stride, select_block, select_count, init_blocks,
                                       local_blocks);
  NSA_CHECK_ARG(window >= 1, "window", "must be >= 1, got ", window);
  NSA_CHECK_ARG(std::isfinite(scale), "scale", "must be finite, got ", scale);
  check_qkv_tensor(q, "q", 4, q.device(), "[B, TQ, Hq, Dk]");
  NSA_CHECK_ARG(q.size(2) >= 1 && q.size(3) >= 1, "q", "must have Hq >= 1 heads and a head dim Dk >= 1, got shape ",
                q.sizes());
  check_qkv_tensor(k, "k_cache", 4, q.device(), "[B, capacity, Hk, Dk]");
  const int64_t heads_k = k.size(2);
  NSA_CHECK_ARG(heads_k >= 1 && q.size(2) % heads_k == 0, "k_cache",
                "must have a number of heads Hk >= 1 that divides q's Hq = ", q.size(2), ", got Hk = ", heads_k);
  check_cache(k, "k_cache", q, heads_k, q.size(3), "the head dim of q, Dk");
  check_qkv_tensor(v, "v_cache", 4, q.device(), "[B, capacity, Hk, Dv]");
  const int64_t head_dim_v = v.size(3);
  NSA_CHECK_ARG(head_dim_v >= 1, "v_cache", "must have a head dim Dv >= 1, got shape ", v.sizes());
  check_cache(v, "v_cache", q, heads_k, head_dim_v, "Dv, the head dim of v_cache");
  check_size(v, "v_cache", 1, k.size(1), "the capacity of k_cache");
  NSA_CHECK_ARG(k_swa_in.has_value() == v_swa_in.has_value(), k_swa_in ? "v_swa_cache" : "k_swa_cache",
                "must be given together with the other window key/value tensor or not at all");
  const at::Tensor& k_swa = k_swa_in ? *k_swa_in : k;
  const at::Tensor& v_swa = v_swa_in ? *v_swa_in : v;
  check_cache(k_swa, "k_swa_cache", q, heads_k, q.size(3), "the head dim of q, Dk");
  check_cache(v_swa, "v_swa_cache", q, heads_k, head_dim_v, "Dv, the head dim of v_cache");
  check_size(v_swa, "v_swa_cache", 1, k_swa.size(1), "the capacity of k_swa_cache");
  check_cache(k_cmp, "k_cmp_cache", q, heads_k, q.size(3), "the head dim of q, Dk");
  check_cache(v_cmp, "v_cmp_cache", q, heads_k, head_dim_v, "Dv, the head dim of v_cache");
  check_size(v_cmp, "v_cmp_cache", 1, k_cmp.size(1), "the token capacity of k_cmp_cache");
  NSA_CHECK_ARG(gates.dim() == 4 && gates.size(0) == q.size(0) && gates.size(1) == q.size(1) &&
                    gates.size(2) == q.size(2) && gates.size(3) == 3,
                "gates", "must have shape [B, TQ, Hq, 3] = [", q.size(0), ", ", q.size(1), ", ", q.size(2),
                ", 3] (g_cmp, g_slc, g_swa), got ", gates.sizes());
  check_same_dtype(gates, "gates", q);
  NSA_CHECK_ARG(gates.device() == q.device(), "gates", "must be on ", q.device(), " like q, got ", gates.device());
  NSA_CHECK_ARG(gates.stride(3) == 1, "gates", "must have a contiguous last dimension, got strides ",
                gates.strides());
  NSA_CHECK_ARG(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens", "must be int32, got ",
                cache_seqlens.scalar_type());
  NSA_CHECK_ARG(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0), "cache_seqlens",
                "must have shape [B] = [", q.size(0), "], got ", cache_seqlens.sizes());
  NSA_CHECK_ARG(cache_seqlens.device() == q.device(), "cache_seqlens", "must be on ", q.device(), " like q, got ",
                cache_seqlens.device());
  NSA_CHECK_ARG(cache_seqlens.is_contiguous(), "cache_seqlens", "must be contiguous");
  const int64_t key_capacity = std::min(k.size(1), k_swa.size(1));
  if (host_checks_values(cache_seqlens)) {  // on the GPU this would cost a sync; the kernel clamps instead
    const int32_t* lengths = cache_seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < cache_seqlens.size(0); ++b) {
      NSA_CHECK_ARG(lengths[b] >= q.size(1) && lengths[b] <= key_capacity, "cache_seqlens", "entry ", b, " (",
                    lengths[b], ") must count the TQ = ", q.size(1),
                    " new queries and fit the cache: it must lie in [TQ, ", key_capacity, "]");
      const int64_t tokens = num_compressed_tokens(lengths[b], compress_block, compress_stride);
      NSA_CHECK_ARG(tokens <= k_cmp.size(1), "k_cmp_cache", "must hold the ", tokens, " compressed tokens of sequence ",
                    b, " (", lengths[b], " keys), got capacity ", k_cmp.size(1));
    }
  }

  const at::OptionalDeviceGuard device_guard(at::device_of(q));
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), head_dim_v}, q.options());
  at::Tensor indices = at::empty({q.size(0), q.size(1), heads_k, select_count}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, indices};

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_swa = k_swa.data_ptr();
  p.v_swa = v_swa.data_ptr();
  p.k_cmp = k_cmp.data_ptr();
  p.v_cmp = v_cmp.data_ptr();
  p.gates = gates.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.indices = indices.data_ptr<int32_t>();
  p.q_strides = row_head_strides(q, false, true);
  p.k_strides = row_head_strides(k, false, true);
  p.v_strides = row_head_strides(v, false, true);
  p.k_swa_strides = row_head_strides(k_swa, false, true);
  p.v_swa_strides = row_head_strides(v_swa, false, true);
  p.k_cmp_strides = row_head_strides(k_cmp, false, true);
  p.v_cmp_strides = row_head_strides(v_cmp, false, true);
  p.gate_strides = row_head_strides(gates, false, true);
  p.out_strides = row_head_strides(out, false, true);
  p.index_strides = row_head_strides(indices, false, true);
  p.num_seqs = q.size(0);
  p.num_queries = q.size(1);
  p.num_heads_q = q.size(2);
  p.num_heads_k = heads_k;
  p.head_dim_qk = q.size(3);
  p.head_dim_v = head_dim_v;
  p.key_capacity = key_capacity;
  p.token_capacity = k_cmp.size(1);
  p.window = window;
  p.scale = scale;
#ifdef NSA_WITH_CUDA
  if (uses_cuda_kernels(q)) {
    decode_attention_cuda(p, q.scalar_type());
    return {out, indices};
  }
#endif
  TORCH_CHECK(q.is_cpu(), "nsa: decode_attention has no kernel for device ", q.device());
  decode_attention_cpu(p, q.scalar_type());
  return {out, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(nsa, CPU, m) { m.impl("decode_attention", &decode_attention); }
#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa, CUDA, m) { m.impl("decode_attention", &decode_attention); }
#endif

}  // namespace nsa
