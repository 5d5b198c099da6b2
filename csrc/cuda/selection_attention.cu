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
//   2. sorting the entries (a radix sort over the bits in use only: distinct keys, so one possible
//      result) groups them by slot (kv head, sequence, block) with ascending queries;
//   3. searchsorted of every slot's first key gives the offsets (the count + exclusive scan of a
//      counting sort).
// Every dk / dv element is then summed by one thread (tiled) or warp (baseline) in query order:
// bitwise-reproducible.
#include <ATen/ATen.h>
#ifndef NSA_EMULATE_CUDA
#include <ATen/cuda/cub.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

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

// Blocks of kBlock threads, one thread per item, for the index kernels below.
constexpr int kBlock = 256;
unsigned blocks_for(int64_t items) {
  const int64_t blocks = (items + kBlock - 1) / kBlock;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "nsa: selection index too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Entry e = (row * Hk + kv_head) * n + slot of the index tensor's rows (padded: b * TQ + i; packed:
// the packed row, placed in its sequence by binary search over cu_seqlens_q).
__global__ void reverse_entries_kernel(const SelectionAttentionParams p, int64_t rows, int64_t* entries) {
  const int64_t n = p.selection.count, heads_k = p.num_heads_k;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * heads_k * n) return;
  const int64_t slot = e % n, kv_head = (e / n) % heads_k, row = e / (n * heads_k);
  const auto [seq, query, s] = locate_index_row(p, row);
  int64_t entry = kNoEntry;
  if (seq < p.num_seqs) {
    const SelectedBlocks& sel = p.selection;
    const int32_t* ids = sel.indices + sel.strides.offset(s.batch, s.q_row_begin + query, kv_head);
    if (first_counting_slot(ids, slot, num_select_blocks(s.k_len, sel.block), sel.block, s.query_offset + query))
      entry = reverse_entry(reverse_slot(kv_head, seq, ids[slot], p.num_seqs, p.blocks_per_seq), query);
  }
  entries[e] = entry;
}

// Rows of the index tensor: packed total_q, padded B * TQ (index_row).
int64_t index_rows_of(const SelectionAttentionParams& p, const at::Tensor& q) {
  return p.cu_seqlens_q ? q.size(0) : q.size(0) * q.size(1);
}

// Sorts the reverse entries by their bits [0, end_bit) (radix sort: stable). Only the slot's bits above
// the 32 query bits are in use, so end_bit < 64 saves whole passes over what at::sort (64 bits, and
// an index per entry) would do. kNoEntry has every bit set and still sorts last.
at::Tensor sort_entries(const at::Tensor& entries, int end_bit) {
#ifdef NSA_EMULATE_CUDA
  // CPU tensors: the same sort, as a stable sort of the keys cut to [0, end_bit).
  const at::Tensor keys = at::bitwise_and(entries, (int64_t(1) << end_bit) - 1);
  return entries.index_select(0, std::get<1>(keys.sort(std::optional<bool>(true), 0)));
#else
  if (entries.numel() > INT32_MAX || entries.numel() == 0) return std::get<0>(entries.sort());  // cub's limit
  at::Tensor sorted = at::empty_like(entries);
  at::cuda::cub::radix_sort_keys(entries.const_data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), entries.numel(),
                                 false, 0, end_bit);
  return sorted;
#endif
}

// The reverse index of p (see the top of the file); the tensors stay alive with the returned pair.
std::pair<at::Tensor, at::Tensor> build_reverse_index(SelectionAttentionParams& p, const at::TensorOptions& options,
                                                      int64_t index_rows) {
  const auto long_options = options.dtype(at::kLong);
  const int64_t slots = p.reverse_slots();
  // reverse_entry packs a slot into the upper 32 bits (queries fit 32 bits: q rows are checked).
  TORCH_CHECK(slots < (int64_t(1) << 31), "nsa: too many (kv head, sequence, block) slots for the reverse index: ",
              slots);
  at::Tensor entries = at::empty({index_rows * p.num_heads_k * p.selection.count}, long_options);
  launch_kernel(reverse_entries_kernel, blocks_for(entries.numel()), kBlock, 0, p, index_rows,
                entries.data_ptr<int64_t>());
  int slot_bits = 1;  // slots <= 2^slot_bits - 1: no slot is all ones, as kNoEntry is
  while ((int64_t(1) << slot_bits) <= slots) ++slot_bits;
  entries = sort_entries(entries, 32 + slot_bits);
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
  return selection_tile_rows(p.num_heads_q / p.num_heads_k, p.selection.count, tiled::kSelectionRows,
                             tiled::kMaxTilePairs, wanted);
}

// Whether the tiled kernels can run: aligned rows, 32-bit key indices, a tile shape for n.
bool tiled_applies(const SelectionAttentionParams& p, bool backward) {
  if (p.tile_rows <= 0 || !tiled::fits_int32(p) || !tiled::rows_aligned(p.q, p.q_strides) ||
      !tiled::rows_aligned(p.k, p.k_strides) || !tiled::rows_aligned(p.v, p.v_strides))
    return false;
  return !backward || tiled::rows_aligned(p.dout, p.dout_strides);
}

// --- The schedule by blocks ------------------------------------------------------------------------
// For small groups the query tiles of the tiled forward and dq kernels visit the union of their
// positions' blocks, and a warp's 16 rows pay for every block any of them chose. The schedule by
// blocks (SelectionBlockSchedule) instead runs one tile per kSelectionRows rows of the queries that
// chose a block (the reverse index), so that every mma row is used, and writes each (row, head,
// slot)'s partial result over its block; a combine kernel then merges the n partials of a row in slot
// order (deterministic). The forward's partials are o over the block and its lse (merged as
// flash-decoding does), dq's the block's share of dQ (summed). They take Hq * n * (Dv + 1) or Dk floats
// per index row, so the rows go in chunks under a memory budget.

// Per slot (kv head, sequence, block): its entries whose query lies in the chunk, and its tile count.
__global__ void chunk_slots_kernel(const SelectionAttentionParams p, int64_t* slot_entries, int64_t* slot_tile_count) {
  const int64_t slots = p.reverse_slots();
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= slots) return;
  const SeqSpan s = seq_span(p, slot / p.blocks_per_seq % p.num_seqs);
  const int64_t first_row = index_row(p, s, 0);
  auto clamp_query = [&](int64_t row) {  // the sequence's query of an index row, clamped to [0, q_len]
    return row < first_row ? 0 : (row - first_row < s.q_len ? row - first_row : s.q_len);
  };
  // First entry of the slot at or after `query` (entries ascend by query within a slot).
  auto lower_bound = [&](int64_t query) {
    const int64_t key = reverse_entry(slot, query);
    int64_t lo = p.reverse_offsets[slot], hi = p.reverse_offsets[slot + 1];
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (p.reverse_entries[mid] < key) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const int64_t begin = lower_bound(clamp_query(p.chunk_row_begin)), end = lower_bound(clamp_query(p.chunk_row_end));
  const int64_t group = p.num_heads_q / p.num_heads_k;
  slot_entries[2 * slot] = begin;
  slot_entries[2 * slot + 1] = end;
  slot_tile_count[slot] = ((end - begin) * group + tiled::kSelectionRows - 1) / tiled::kSelectionRows;
}

// The (chunk row, query head) a combine kernel's warp merges: one warp per pair, slots in index order.
struct CombinedRow {
  SeqSpan span;
  int64_t query, head;
  int64_t partials;  // index of its slot 0 in the chunk's partials ([chunk rows][Hq][n])
  const int32_t* ids;
  int64_t num_blocks, position;

  // False past the chunk or for a packed row no sequence holds (no output, as in the other kernels).
  __device__ bool locate(const SelectionAttentionParams& p, int64_t warp) {
    const int64_t heads = p.num_heads_q;
    if (warp >= (p.chunk_row_end - p.chunk_row_begin) * heads) return false;
    head = warp % heads;
    partials = warp * p.selection.count;
    const IndexRow r = locate_index_row(p, p.chunk_row_begin + warp / heads);
    if (r.seq >= p.num_seqs) return false;
    span = r.span;
    query = r.query;
    const SelectedBlocks& sel = p.selection;
    ids = sel.indices + sel.strides.offset(span.batch, span.q_row_begin + query, head / (heads / p.num_heads_k));
    num_blocks = num_select_blocks(span.k_len, sel.block);
    position = span.query_offset + query;
    return true;
  }
  // visit(k) for the slots that count (first_counting_slot, those the partials hold), ascending, on
  // every lane of the warp; each lane tests one slot of every 32.
  template <typename Visit>
  __device__ void for_each_counting_slot(const SelectionAttentionParams& p, int lane, Visit&& visit) const {
    const int64_t n = p.selection.count;
    for (int64_t k0 = 0; k0 < n; k0 += 32) {
      const bool counts =
          k0 + lane < n && first_counting_slot(ids, k0 + lane, num_blocks, p.selection.block, position);
      const unsigned counting = __ballot_sync(0xffffffffu, counts);
      for (int b = 0; b < 32; ++b)
        if ((counting >> b) & 1u) visit(k0 + b);
    }
  }
};

// The forward's o and lse of the chunk's rows from their partials. A row whose slots all fail
// first_counting_slot has o = 0, lse = -inf.
template <typename Element, int kDv>
__global__ void combine_partials_kernel(const SelectionAttentionParams p) {
  const int lane = threadIdx.x % 32;
  CombinedRow r;
  if (!r.locate(p, (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32)) return;
  const float* part_lse = p.partial_lse + r.partials;
  const float* part_o = p.partial_o + r.partials * kDv;
  float max_lse = -INFINITY;
  r.for_each_counting_slot(p, lane, [&](int64_t k) { max_lse = fmaxf(max_lse, part_lse[k]); });
  float sum = 0.f, acc[kDv / 32] = {};
  r.for_each_counting_slot(p, lane, [&](int64_t k) {
    const float weight = expf(part_lse[k] - max_lse);
    sum += weight;
#pragma unroll
    for (int i = 0; i < kDv / 32; ++i) acc[i] += weight * part_o[k * kDv + 32 * i + lane];
  });
  const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
  Element* o = static_cast<Element*>(p.o) + p.o_strides.offset(r.span.batch, r.span.q_row_begin + r.query, r.head);
#pragma unroll
  for (int i = 0; i < kDv / 32; ++i) o[32 * i + lane] = static_cast<Element>(acc[i] * inv_sum);
  if (lane == 0)
    static_cast<float*>(p.lse)[p.lse_strides.offset(r.span.batch, r.span.q_row_begin + r.query, r.head)] =
        sum > 0.f ? max_lse + logf(sum) : -INFINITY;
}

// dq of the chunk's rows: the sum of their partials (scaled already), 0 for a row that sees nothing.
template <typename Element, int kDqk>
__global__ void combine_dq_partials_kernel(const SelectionAttentionParams p) {
  const int lane = threadIdx.x % 32;
  CombinedRow r;
  if (!r.locate(p, (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32)) return;
  const float* part_dq = p.partial_dq + r.partials * kDqk;
  float acc[kDqk / 32] = {};
  r.for_each_counting_slot(p, lane, [&](int64_t k) {
#pragma unroll
    for (int i = 0; i < kDqk / 32; ++i) acc[i] += part_dq[k * kDqk + 32 * i + lane];
  });
  Element* dq = static_cast<Element*>(p.dq) + p.dq_strides.offset(r.span.batch, r.span.q_row_begin + r.query, r.head);
#pragma unroll
  for (int i = 0; i < kDqk / 32; ++i) dq[32 * i + lane] = static_cast<Element>(acc[i]);
}

// Index rows per chunk: the partials of a chunk, `floats` per (index row, query head, slot), fit in
// NSA_SELECTION_PARTIAL_BYTES (default 1 GiB).
int64_t chunk_rows_for(const SelectionAttentionParams& p, int64_t index_rows, int64_t floats) {
  const char* env = std::getenv("NSA_SELECTION_PARTIAL_BYTES");
  const int64_t budget = env ? std::atoll(env) : (int64_t(1) << 30);
  const int64_t row_bytes = p.num_heads_q * p.selection.count * floats * int64_t(sizeof(float));
  const int64_t rows = budget / row_bytes;
  return rows < 1 ? 1 : (rows < index_rows ? rows : index_rows);
}

// Whether the forward and dq kernels go by blocks: NSA_SELECTION_SCHEDULE=blocks (tiles, the default,
// otherwise), until a GPU has measured where each is faster.
bool schedule_by_blocks() {
  const char* env = std::getenv("NSA_SELECTION_SCHEDULE");
  return env != nullptr && std::string(env) == "blocks";
}

// Runs `launch` (a chunk's by-blocks kernel and its combine) for each chunk of `chunk` index rows, with
// the chunk's rows, slot entries, work list and work-tile bound set in p. p has its reverse index.
template <typename Launch>
void for_each_chunk(SelectionAttentionParams& p, const at::TensorOptions& options, int64_t index_rows, int64_t chunk,
                    Launch&& launch) {
  const auto long_options = options.dtype(at::kLong);
  const int64_t slots = p.reverse_slots(), n = p.selection.count, group = p.num_heads_q / p.num_heads_k;
  const at::Tensor slot_entries = at::empty({slots, 2}, long_options);
  const at::Tensor slot_tile_count = at::empty({slots}, long_options);
  at::Tensor slot_tiles = at::zeros({slots + 1}, long_options);
  p.slot_entries = slot_entries.data_ptr<int64_t>();
  p.slot_tiles = slot_tiles.data_ptr<int64_t>();
  at::Tensor scan = slot_tiles.narrow(0, 1, slots);
  for (int64_t row = 0; row < index_rows; row += chunk) {
    p.chunk_row_begin = row;
    p.chunk_row_end = row + chunk < index_rows ? row + chunk : index_rows;
    launch_kernel(chunk_slots_kernel, blocks_for(slots), kBlock, 0, p, slot_entries.data_ptr<int64_t>(),
                  slot_tile_count.data_ptr<int64_t>());
    at::cumsum_out(scan, slot_tile_count, 0);
    // At most n entries per (index row, kv head); a slot's tiles round its rows up once.
    const int64_t entries = (p.chunk_row_end - p.chunk_row_begin) * p.num_heads_k * n;
    p.work_tiles = (entries * group + tiled::kSelectionRows - 1) / tiled::kSelectionRows + std::min(slots, entries);
    launch();
  }
}

// Blocks of a combine kernel over the chunk's (row, query head) pairs, a warp each.
unsigned combine_blocks(const SelectionAttentionParams& p) {
  return blocks_for((p.chunk_row_end - p.chunk_row_begin) * p.num_heads_q * 32);
}

template <typename Element, int kDqk, int kDv>
void run_forward_by_blocks(SelectionAttentionParams p, const at::Tensor& q) {
  static_assert(kDv % 32 == 0, "the combine kernel's lanes split Dv");
  const int64_t index_rows = index_rows_of(p, q);
  const auto index = build_reverse_index(p, q.options(), index_rows);
  const auto float_options = q.options().dtype(at::kFloat);
  const int64_t heads = p.num_heads_q, n = p.selection.count;
  const int64_t chunk = chunk_rows_for(p, index_rows, p.head_dim_v + 1);
  const at::Tensor partial_o = at::empty({chunk, heads, n, p.head_dim_v}, float_options);
  const at::Tensor partial_lse = at::empty({chunk, heads, n}, float_options);
  p.partial_o = partial_o.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  for_each_chunk(p, q.options(), index_rows, chunk, [&] {
    tiled::run_selection_fwd<Element, kDqk, kDv>(p);
    launch_kernel(combine_partials_kernel<Element, kDv>, combine_blocks(p), kBlock, 0, p);
  });
}

// The tiled backward with dq by blocks; p has its reverse index and softmax_delta.
template <typename Element, int kDqk, int kDv>
void run_backward_by_blocks(SelectionAttentionParams p, const at::Tensor& q) {
  static_assert(kDqk % 32 == 0, "the combine kernel's lanes split Dk");
  p.dq_by_blocks = true;
  tiled::run_selection_bwd<Element, kDqk, kDv>(p);  // delta, dk, dv
  const int64_t index_rows = index_rows_of(p, q);
  const int64_t chunk = chunk_rows_for(p, index_rows, p.head_dim_qk);
  const at::Tensor partial_dq =
      at::empty({chunk, p.num_heads_q, p.selection.count, p.head_dim_qk}, q.options().dtype(at::kFloat));
  p.partial_dq = partial_dq.data_ptr<float>();
  for_each_chunk(p, q.options(), index_rows, chunk, [&] {
    tiled::run_selection_bwd<Element, kDqk, kDv>(p);
    launch_kernel(combine_dq_partials_kernel<Element, kDqk>, combine_blocks(p), kBlock, 0, p);
  });
}

}  // namespace

void selection_attention_fwd_cuda(const AttentionParams& params, const SelectedBlocks& selection,
                                  at::ScalarType dtype, const at::Tensor& q) {
  SelectionAttentionParams p = selection_params(params, selection);
  p.tile_rows = tile_rows_for(p);
  if (tiled_applies(p, false) && tiled::dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() {
        if (schedule_by_blocks())
          run_forward_by_blocks<E, kDqk, kDv>(p, q);
        else
          tiled::run_selection_fwd<E, kDqk, kDv>(p);
      }))
    return;
  baseline::run_fwd<SelectedKeys>(p, dtype);
}

void selection_attention_bwd_cuda(const AttentionBwdParams& params, const SelectedBlocks& selection,
                                  at::ScalarType dtype, const at::Tensor& q, const at::Tensor& lse) {
  SelectionAttentionParams p = selection_params(params, selection);
  static_cast<AttentionBwdParams&>(p) = params;
  p.tile_rows = tile_rows_for(p);
  const auto index = build_reverse_index(p, q.options(), index_rows_of(p, q));
  if (tiled_applies(p, true) && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    // rowsum(dout * out) - dlse per (row, head), laid out like lse.
    const at::Tensor delta = at::empty(lse.sizes(), lse.options().dtype(at::kFloat));
    p.softmax_delta = delta.data_ptr<float>();
    if (tiled::dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() {
          if (schedule_by_blocks())
            run_backward_by_blocks<E, kDqk, kDv>(p, q);
          else
            tiled::run_selection_bwd<E, kDqk, kDv>(p);
        }))
      return;
    p.softmax_delta = nullptr;
  }
  baseline::run_bwd<SelectedKeys, SelectedKeys>(p, dtype);
}

}  // namespace nsa
