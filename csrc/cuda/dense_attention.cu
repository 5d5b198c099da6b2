// CUDA kernels of the dense-tiled attention family (sliding window, compressed tokens).
//
// Entry points: bf16 / fp16 calls with a supported head-dim pair go to the tiled tensor-core kernels
// (cuda/dense/, chosen in cuda/dense/dispatch.h); everything else runs the baseline kernels below.
//
// Baseline implementation (cuda/baseline.h) with the masks and sequence spans shared with the CPU
// kernel (common/masks.h, common/attention_params.h): exact and deterministic, no tensor cores; it
// serves fp32 / fp64, other head dims and unaligned rows.
#include <ATen/ATen.h>

#include "cuda/baseline.h"
#include "cuda/dense/dispatch.h"
#include "cuda/runtime.h"
#include "kernels.h"

namespace nsa {
namespace {

// The mask's key range per query row; the queries whose range holds a key row (binary search).
struct MaskedKeys {
  using Params = AttentionParams;
  using BwdParams = AttentionBwdParams;
  template <typename Visit>
  __device__ static void for_each_key(const AttentionParams& p, const SeqSpan& s, int64_t row, int64_t,
                                      Visit&& visit) {
    const KeyRange keys = p.mask.keys_for(s.query_offset + row, s.k_len);
    for (int64_t key = keys.begin; key < keys.end; ++key) visit(key);
  }
  template <typename Visit>
  __device__ static void for_each_query(const AttentionParams& p, int64_t, const SeqSpan& s, int64_t key, int64_t,
                                        Visit&& visit) {
    const QueryRange queries = queries_seeing(p.mask, key, key + 1, s.query_offset, s.q_len, s.k_len);
    for (int64_t row = queries.begin; row < queries.end; ++row) {
      const KeyRange keys = p.mask.keys_for(s.query_offset + row, s.k_len);
      if (key >= keys.begin && key < keys.end) visit(row);
    }
  }
};

}  // namespace

void dense_attention_fwd_cuda(const AttentionParams& p, at::ScalarType dtype) {
  if (tiled::try_fwd(p, dtype)) return;
  baseline::run_fwd<MaskedKeys>(p, dtype);
}

void dense_attention_bwd_cuda(const AttentionBwdParams& p, at::ScalarType dtype) {
  if (tiled::try_bwd(p, dtype)) return;
  baseline::run_bwd<MaskedKeys, MaskedKeys>(p, dtype);
}

}  // namespace nsa
