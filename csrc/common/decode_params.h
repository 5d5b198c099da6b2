#pragma once
// Parameters of fused NSA decoding (spec sections 2-7 for a few new queries per sequence): the new
// queries of every sequence attend, in one op, to the compressed tokens, the blocks selected from
// them and the sliding window, over a padded cache [B, capacity, Hk, D] whose live length per
// sequence is cache_seqlens[b] (as in FlashAttention). Raw pointers and int64 element strides,
// filled once on the host and passed by value to CPU and CUDA kernels.
#include <cstdint>

#include "common/attention_params.h"
#include "common/selection.h"

namespace nsa {

struct DecodeParams {
  const void* q;        // [B, TQ, Hq, Dk], query i of sequence b at position cache_seqlens[b] - TQ + i
  const void* k;        // [B, capacity, Hk, Dk]: the selection branch's keys
  const void* v;        // [B, capacity, Hk, Dv]
  const void* k_swa;    // the window branch's keys and values (k, v when the branches share them)
  const void* v_swa;
  const void* k_cmp;    // [B, token_capacity, Hk, Dk]: compressed tokens, TC(cache_seqlens[b]) live
  const void* v_cmp;    // [B, token_capacity, Hk, Dv]
  const void* gates;    // [B, TQ, Hq, 3]: g_cmp, g_slc, g_swa
  const int32_t* cache_seqlens;  // [B] live keys per sequence (new tokens included)
  void* out;            // [B, TQ, Hq, Dv]
  int32_t* indices;     // [B, TQ, Hk, n]: the selected blocks, as select_blocks writes them
  Strides q_strides, k_strides, v_strides, k_swa_strides, v_swa_strides, k_cmp_strides, v_cmp_strides,
      gate_strides, out_strides, index_strides;

  int64_t num_seqs;
  int64_t num_queries;  // TQ
  int64_t num_heads_q;
  int64_t num_heads_k;
  int64_t head_dim_qk;
  int64_t head_dim_v;
  int64_t key_capacity;    // rows of k, v, k_swa, v_swa per sequence
  int64_t token_capacity;  // rows of k_cmp, v_cmp per sequence

  BlockSelection selection;
  int64_t window;
  double scale;
};

}  // namespace nsa
