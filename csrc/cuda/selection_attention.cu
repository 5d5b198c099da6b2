// CUDA kernels of selected-block attention (spec section 4).
//
// bf16 / fp16 with a compiled head-dim pair and 16-byte aligned rows run the tiled tensor-core kernels
// (cuda/selection/kernels.h); everything else (fp32, fp64, other head dims, unaligned rows, n too large
// for a tile's index buffer) runs the baseline kernels (cuda/baseline.h) with the SelectedKeys policy
// below, with the same semantics.
//
// The backward's dk / dv pass goes block by block over the queries that chose the block. That reverse
// index is built here on the GPU without floating-point or ordering-dependent atomics:
//   1. reverse_entries_kernel writes one int64 entry (slot << 32 | query) per (query, kv head, slot of
//      its index row) that counts (block_counts, first occurrence of the id in the row), else kNoEntry;
//   2. sorting the entries (radix sort: distinct keys, so one possible result) groups them by slot
//      (kv head, sequence, block) with ascending queries;
//   3. searchsorted of every slot's first key gives the offsets (the count + exclusive scan of a
//      counting sort).
// Every dk / dv element is then summed by one thread (tiled) or warp (baseline) in query order:
// bitwise-reproducible.
#include <ATen/ATen.h>

#include <cstdlib>

#include "common/selection.h"
#include "cuda/baseline.h"
#include "cuda/dense/dispatch.h"
#include "cuda/runtime.h"
#include "cuda/selection/config.h"
#include "kernels.h"

namespace nsa {
namespace {

// The keys of the blocks that count for a query row, in slot order, each id once, cut at the query's
// position and the sequence end; the queries of a key's block from the reverse index, ascending.
struct SelectedKeys {
  using Params = SelectionAttentionParams;
  using BwdParams = SelectionAttentionParams;
  template <typename Visit>
  __device__ static void for_each_key(const SelectionAttentionParams& p, const SeqSpan& s, int64_t row,
                                      int64_t kv_head, Visit&& visit) {
    const SelectedBlocks& sel = p.selection;
    const int32_t* ids = sel.indices + sel.strides.offset(s.batch, s.q_row_begin + row, kv_head);
    const int64_t position = s.query_offset + row, num_blocks = num_select_blocks(s.k_len, sel.block);
    for (int64_t slot = 0; slot < sel.count; ++slot) {
      if (!first_counting_slot(ids, slot, num_blocks, sel.block, position)) continue;
      const int64_t start = ids[slot] * sel.block;
      int64_t end = start + sel.block < s.k_len ? start + sel.block : s.k_len;
      if (end > position + 1) end = position + 1;
      for (int64_t key = start; key < end; ++key) visit(key);
    }
  }
  template <typename Visit>
  __device__ static void for_each_query(const SelectionAttentionParams& p, int64_t seq, const SeqSpan& s,
                                        int64_t key, int64_t kv_head, Visit&& visit) {
    const int64_t slot = reverse_slot(kv_head, seq, key / p.selection.block, p.num_seqs, p.blocks_per_seq);
    for (int64_t e = p.reverse_offsets[slot]; e < p.reverse_offsets[slot + 1]; ++e) {
      const int64_t row = entry_query(p.reverse_entries[e]);
      if (key <= s.query_offset + row) visit(row);  // the causal mask inside the query's own block
    }
  }
};

// Entry e = (row * Hk + kv_head) * n + slot of the index tensor's rows (padded: b * TQ + i; packed:
// the packed row, placed in its sequence by binary search over cu_seqlens_q).
__global__ void reverse_entries_kernel(const SelectionAttentionParams p, int64_t rows, int64_t* entries) {
  const int64_t n = p.selection.count, heads_k = p.num_heads_k;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * heads_k * n) return;
  const int64_t slot = e % n, kv_head = (e / n) % heads_k, row = e / (n * heads_k);
  int64_t seq, query;
  if (p.cu_seqlens_q == nullptr) {
    seq = row / p.max_seqlen_q;
    query = row % p.max_seqlen_q;
  } else {
    int64_t lo = 0, hi = p.num_seqs;  // the sequence whose rows [cu[b], cu[b+1]) hold `row`, or none
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (p.cu_seqlens_q[mid + 1] <= row) lo = mid + 1; else hi = mid;
    }
    seq = lo;
    query = lo < p.num_seqs ? row - p.cu_seqlens_q[lo] : -1;
  }
  int64_t entry = kNoEntry;
  if (seq < p.num_seqs && query >= 0) {
    const SeqSpan s = seq_span(p, seq);
    const SelectedBlocks& sel = p.selection;
    const int32_t* ids = sel.indices + sel.strides.offset(s.batch, s.q_row_begin + query, kv_head);
    if (query < s.q_len &&
        first_counting_slot(ids, slot, num_select_blocks(s.k_len, sel.block), sel.block, s.query_offset + query))
      entry = reverse_entry(reverse_slot(kv_head, seq, ids[slot], p.num_seqs, p.blocks_per_seq), query);
  }
  entries[e] = entry;
}

// The reverse index of p (see the top of the file); the tensors stay alive with the returned pair.
std::pair<at::Tensor, at::Tensor> build_reverse_index(SelectionAttentionParams& p, const at::TensorOptions& options,
                                                      int64_t index_rows) {
  const auto long_options = options.dtype(at::kLong);
  const int64_t slots = p.num_heads_k * p.num_seqs * p.blocks_per_seq;
  // reverse_entry packs a slot into the upper 32 bits (queries fit 32 bits: q rows are checked).
  TORCH_CHECK(slots < (int64_t(1) << 31), "nsa: too many (kv head, sequence, block) slots for the reverse index: ",
              slots);
  at::Tensor entries = at::empty({index_rows * p.num_heads_k * p.selection.count}, long_options);
  constexpr int kBlock = 256;
  const int64_t blocks = (entries.numel() + kBlock - 1) / kBlock;
  if (blocks > 0) {
    TORCH_CHECK(blocks < (int64_t(1) << 31), "nsa: selection index too large for one launch");
    launch_kernel(reverse_entries_kernel, static_cast<unsigned>(blocks), kBlock, 0, p, index_rows,
                  entries.data_ptr<int64_t>());
  }
  entries = std::get<0>(entries.sort());
  const at::Tensor firsts = at::arange(slots + 1, long_options) * (int64_t(1) << 32);  // reverse_entry(slot, 0)
  at::Tensor offsets = at::searchsorted(entries, firsts);
  p.reverse_entries = entries.data_ptr<int64_t>();
  p.reverse_offsets = offsets.data_ptr<int64_t>();
  return {entries, offsets};
}

SelectionAttentionParams selection_params(const AttentionParams& params, const SelectedBlocks& selection) {
  SelectionAttentionParams p{};
  static_cast<AttentionParams&>(p) = params;
  p.selection = selection;
  p.blocks_per_seq = num_select_blocks(params.max_key_rows, selection.block);
  return p;
}

// Stacked rows per tile of the tiled kernels; NSA_SELECTION_TILE_POSITIONS caps the positions per
// tile, for benchmarks that measure the packing of small groups (config.h).
int64_t tile_rows_for(const SelectionAttentionParams& p) {
  const char* env = std::getenv("NSA_SELECTION_TILE_POSITIONS");
  const int64_t wanted = env ? std::atoll(env) : 0;
  return selection_tile_rows(p.num_heads_q / p.num_heads_k, p.selection.count, 64, tiled::kMaxTilePairs, wanted);
}

// Whether the tiled kernels can run: aligned rows, 32-bit key indices, a tile shape for n.
bool tiled_applies(const SelectionAttentionParams& p, bool backward) {
  if (p.tile_rows <= 0 || !tiled::fits_int32(p) || !tiled::rows_aligned(p.q, p.q_strides) ||
      !tiled::rows_aligned(p.k, p.k_strides) || !tiled::rows_aligned(p.v, p.v_strides))
    return false;
  return !backward || tiled::rows_aligned(p.dout, p.dout_strides);
}

}  // namespace

void selection_attention_fwd_cuda(const AttentionParams& params, const SelectedBlocks& selection,
                                  at::ScalarType dtype) {
  SelectionAttentionParams p = selection_params(params, selection);
  p.tile_rows = tile_rows_for(p);
  if (tiled_applies(p, false) &&
      tiled::dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() { tiled::run_selection_fwd<E, kDqk, kDv>(p); }))
    return;
  baseline::run_fwd<SelectedKeys>(p, dtype);
}

void selection_attention_bwd_cuda(const AttentionBwdParams& params, const SelectedBlocks& selection,
                                  at::ScalarType dtype, const at::Tensor& q, const at::Tensor& lse) {
  SelectionAttentionParams p = selection_params(params, selection);
  static_cast<AttentionBwdParams&>(p) = params;
  p.tile_rows = tile_rows_for(p);
  const int64_t index_rows = p.cu_seqlens_q ? q.size(0) : q.size(0) * q.size(1);
  const auto index = build_reverse_index(p, q.options(), index_rows);
  if (tiled_applies(p, true) && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    // rowsum(dout * out) - dlse per (row, head), laid out like lse.
    const at::Tensor delta = at::empty(lse.sizes(), lse.options().dtype(at::kFloat));
    p.softmax_delta = delta.data_ptr<float>();
    if (tiled::dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() {
          tiled::run_selection_bwd<E, kDqk, kDv>(p);
        }))
      return;
    p.softmax_delta = nullptr;
  }
  baseline::run_bwd<SelectedKeys, SelectedKeys>(p, dtype);
}

}  // namespace nsa
