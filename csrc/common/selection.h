#pragma once
// Index math of the selected branch (spec section 3), shared by the CPU kernel and future CUDA
// kernels (the token count num_compressed_tokens and token visibility live in masks.h); its Python
// twins are reference.overlap_weights and the candidate/forced masks of reference.select_blocks.
//
// Keys are cut into chunks of `compress_stride` (d) keys. Compressed token i covers chunks
// [i, i + l/d) (keys [i*d, i*d + l)); selection block j covers chunks [j*l'/d, (j+1)*l'/d)
// (keys [j*l', (j+1)*l')). Everything below is integer arithmetic on those chunk ranges.
#include <cstdint>

#include "common/attention_params.h"
#include "common/host_device.h"
#include "common/masks.h"

namespace nsa {

// Selection blocks of a sequence of `keys` keys: ceil(TK / l'), without overflow for any l' >= 1.
NSA_HOST_DEVICE int64_t num_select_blocks(int64_t keys, int64_t select_block) {
  return keys <= 0 ? 0 : (keys - 1) / select_block + 1;
}

// The block-selection configuration (l, d, l', n, n_init, n_local); the host checks it (d divides l
// and l', n >= n_init + n_local, sizes positive) before any kernel sees it.
struct BlockSelection {
  int64_t compress_block;   // l
  int64_t compress_stride;  // d
  int64_t select_block;     // l'
  int64_t select_count;     // n
  int64_t init_blocks;      // n_init
  int64_t local_blocks;     // n_local

  NSA_HOST_DEVICE int64_t token_chunks() const { return compress_block / compress_stride; }
  NSA_HOST_DEVICE int64_t block_chunks() const { return select_block / compress_stride; }

  // Which compressed tokens a query sees: i*d + l - 1 <= t (spec section 2).
  NSA_HOST_DEVICE VisibilityMask visibility() const {
    VisibilityMask mask{};  // as VisibilityMask::compressed, which is host-only
    mask.kind = VisibilityMask::kCompressed;
    mask.compress_block = compress_block;
    mask.compress_stride = compress_stride;
    return mask;
  }

  // Eq. 9 of the paper as chunk counting: w(i, j) = chunks shared by token i and block j.
  NSA_HOST_DEVICE int64_t overlap(int64_t token, int64_t block) const {
    const int64_t lo = token > block * block_chunks() ? token : block * block_chunks();
    const int64_t token_end = token + token_chunks(), block_end = (block + 1) * block_chunks();
    const int64_t hi = token_end < block_end ? token_end : block_end;
    return hi > lo ? hi - lo : 0;
  }
  // Token i meets blocks [first_block(i), last_block(i)] and no other (w > 0 on exactly those).
  NSA_HOST_DEVICE int64_t first_block(int64_t token) const { return token / block_chunks(); }
  NSA_HOST_DEVICE int64_t last_block(int64_t token) const {
    return (token + token_chunks() - 1) / block_chunks();
  }

  // Candidates of a query at `position` are blocks [0, candidates_end) (j*l' <= t), within the
  // sequence's num_blocks. A token the query sees only meets candidate blocks.
  NSA_HOST_DEVICE int64_t candidates_end(int64_t position, int64_t num_blocks) const {
    if (position < 0) return 0;
    const int64_t end = position / select_block + 1;
    return end < num_blocks ? end : num_blocks;
  }
  // The block that holds the query at `position` (>= 0).
  NSA_HOST_DEVICE int64_t own_block(int64_t position) const { return position / select_block; }
  // Forced candidates: the first n_init blocks and the n_local blocks ending at the query's own.
  // forced_candidate assumes `block` is a candidate of a query whose own block is `own`.
  NSA_HOST_DEVICE bool forced_candidate(int64_t block, int64_t own) const {
    return block < init_blocks || (block > own - local_blocks && block <= own);
  }
  // How many of the candidates [0, cand) of a query whose own block is `own` are forced.
  NSA_HOST_DEVICE int64_t forced_count(int64_t cand, int64_t own) const {
    int64_t count = 0;
    for (int64_t j = 0; j < cand; ++j) count += forced_candidate(j, own) ? 1 : 0;
    return count;
  }
  // out[0, picked) holds a query's free picks: appends its forced candidates, sorts the ids ascending
  // and pads with -1 up to n (the CUDA kernels' last step; n is small).
  NSA_HOST_DEVICE void finish_row(int64_t cand, int64_t own, int64_t picked, int32_t* out) const {
    int64_t kept = picked;
    for (int64_t j = 0; j < cand; ++j)
      if (forced_candidate(j, own)) out[kept++] = static_cast<int32_t>(j);
    for (int64_t a = 1; a < kept; ++a) {  // insertion sort
      const int32_t v = out[a];
      int64_t b = a - 1;
      while (b >= 0 && out[b] > v) {
        out[b + 1] = out[b];
        --b;
      }
      out[b + 1] = v;
    }
    for (int64_t e = kept; e < select_count; ++e) out[e] = -1;
  }
  NSA_HOST_DEVICE bool forced(int64_t block, int64_t position) const {
    if (position < 0 || block < 0 || block * select_block > position) return false;
    return forced_candidate(block, own_block(position));
  }
};

// Whether block id `id` of a row counts for a query at `position` (spec section 4): within the
// sequence's num_blocks and not in the query's future. -1 and every other out-of-range id fail, so
// kernels test this before reading a single key of the block.
NSA_HOST_DEVICE bool block_counts(int64_t id, int64_t num_blocks, int64_t select_block, int64_t position) {
  return id >= 0 && id < num_blocks && id * select_block <= position;
}

// --- CUDA selected-block attention: index math the kernels share with CPU tests ------------------

// Forward / dq tiles stack the G heads of whole query positions: tile_positions positions of G rows
// (for G >= max_rows: max_rows rows, which span at most 2 positions). The tile's blocks are the union
// of its positions' ids, sorted in shared memory as positions * n (id, position) pairs, at most
// max_pairs; and each block records which of the tile's positions chose it in a 64-bit mask, so a
// tile spans at most 64 positions. Returns the stacked rows per tile; 0 when n is too large for the
// pair buffer (the caller then runs the baseline kernel). `wanted` > 0 caps the positions (benchmarks).
NSA_HOST_DEVICE int64_t selection_tile_rows(int64_t group, int64_t count, int64_t max_rows, int64_t max_pairs,
                                            int64_t wanted = 0) {
  if (group >= max_rows) return 2 * count <= max_pairs ? max_rows : 0;
  int64_t positions = max_rows / group;
  if (positions > 64) positions = 64;
  if (positions * count > max_pairs) positions = max_pairs / count;
  if (wanted > 0 && wanted < positions) positions = wanted;
  return positions * group;
}

// Bits [first, last] (0 <= first <= last < 64) of a tile's position mask: the positions a warp's rows hold.
NSA_HOST_DEVICE uint64_t position_bits(int64_t first, int64_t last) {
  const int64_t n = last - first + 1;
  return (n >= 64 ? ~uint64_t(0) : ((uint64_t(1) << n) - 1)) << first;
}

// Sort key of a tile's (block id, position within the tile < 64) pair; invalid pairs sort last.
constexpr uint64_t kNoPair = ~uint64_t(0);
NSA_HOST_DEVICE uint64_t tile_pair(int64_t id, int64_t position) { return (uint64_t(id) << 6) | uint64_t(position); }
NSA_HOST_DEVICE int64_t pair_block(uint64_t pair) { return static_cast<int64_t>(pair >> 6); }
NSA_HOST_DEVICE int64_t pair_position(uint64_t pair) { return static_cast<int64_t>(pair & 63); }

// Reverse index of the backward: one entry (slot << 32) | query per (query, kv head, block it chose),
// slot = (kv_head * num_seqs + seq) * blocks_per_seq + block. Sorted, the entries of a slot are
// contiguous and its queries ascending: a deterministic order for the dk / dv sums.
constexpr int64_t kNoEntry = INT64_MAX;
NSA_HOST_DEVICE int64_t reverse_slot(int64_t kv_head, int64_t seq, int64_t block, int64_t num_seqs,
                                     int64_t blocks_per_seq) {
  return (kv_head * num_seqs + seq) * blocks_per_seq + block;
}
NSA_HOST_DEVICE int64_t reverse_entry(int64_t slot, int64_t query) { return (slot << 32) | query; }
NSA_HOST_DEVICE int64_t entry_query(int64_t entry) { return entry & 0xffffffff; }
NSA_HOST_DEVICE int64_t entry_slot(int64_t entry) { return entry >> 32; }

// Row of the index tensor (and of the schedule by blocks' partials) that holds query `query` of
// a sequence: padded b * TQ + i, packed the packed row.
NSA_HOST_DEVICE int64_t index_row(const AttentionParams& p, const SeqSpan& s, int64_t query) {
  return s.batch * p.max_seqlen_q + s.q_row_begin + query;
}
// Its inverse: the sequence, its span and the query (0 <= query < span.q_len) of index row `row`;
// seq == num_seqs (span unset) for a packed row that no sequence holds (past cu_seqlens_q[N], or
// outside the span seq_span gives malformed offsets).
struct IndexRow {
  int64_t seq;
  int64_t query;
  SeqSpan span;  // seq_span(p, seq)
};
NSA_HOST_DEVICE IndexRow locate_index_row(const AttentionParams& p, int64_t row) {
  if (p.cu_seqlens_q == nullptr) {
    const int64_t b = row / p.max_seqlen_q;
    return {b, row % p.max_seqlen_q, seq_span(p, b)};
  }
  int64_t lo = 0, hi = p.num_seqs;  // the sequence whose rows [cu[b], cu[b+1]) hold `row`, or none
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (p.cu_seqlens_q[mid + 1] <= row) lo = mid + 1; else hi = mid;
  }
  if (lo == p.num_seqs) return {lo, 0, {}};
  // The span's own begin, so that index_row(p, span, query) == row whatever the offsets.
  const SeqSpan s = seq_span(p, lo);
  const int64_t query = row - s.q_row_begin;
  return query >= 0 && query < s.q_len ? IndexRow{lo, query, s} : IndexRow{p.num_seqs, 0, {}};
}

// Whether slot s of an index row (count ids) counts: block_counts, and not a repeat of an earlier slot.
NSA_HOST_DEVICE bool first_counting_slot(const int32_t* ids, int64_t slot, int64_t num_blocks, int64_t select_block,
                                         int64_t position) {
  const int64_t id = ids[slot];
  if (!block_counts(id, num_blocks, select_block, position)) return false;
  for (int64_t earlier = 0; earlier < slot; ++earlier)
    if (ids[earlier] == id) return false;
  return true;
}

// Parameters of the CUDA selected-block attention kernels: the attention params (the forward fills
// only the AttentionParams part), the selection, the tile shape and the backward's reverse index.
struct SelectionAttentionParams : AttentionBwdParams {
  SelectedBlocks selection;
  int64_t tile_rows;               // stacked query rows per forward / dq tile (selection_tile_rows)
  int64_t blocks_per_seq;          // ceil(max_key_rows / l'): reverse-index slots per (kv head, sequence)
  const int64_t* reverse_offsets;  // [Hk * N * blocks_per_seq + 1]: entries of slot s are [off[s], off[s+1])
  const int64_t* reverse_entries;  // sorted reverse_entry values
  // The schedule by blocks (cuda/selection_attention.cu), one chunk of index rows at a time:
  int64_t chunk_row_begin;         // index rows [chunk_row_begin, chunk_row_end)
  int64_t chunk_row_end;
  const int64_t* slot_entries;     // [slots][2]: the slot's entries whose query lies in the chunk
  const int64_t* slot_tiles;       // [slots + 1]: first work tile of each slot (exclusive scan), total last
  int64_t work_tiles;              // blocks launched: a bound of the chunk's tiles known without a sync
  float* partial_o;                // forward: [chunk rows][Hq][n][Dv], o of (row, head) over slot n's block
  float* partial_lse;              // [chunk rows][Hq][n]
  // The backward with dq by blocks: the tiled launch runs delta and dk / dv only (dq_by_blocks), then
  // a launch per chunk with partial_dq set runs dq by blocks.
  bool dq_by_blocks;
  float* partial_dq;               // [chunk rows][Hq][n][Dk]: dQ of (row, head) over slot n's block

  // Reverse-index slots (kv head, sequence, block), reverse_slot's range.
  NSA_HOST_DEVICE int64_t reverse_slots() const { return num_heads_k * num_seqs * blocks_per_seq; }
};

// select_blocks reads q, k_cmp (as k, compressed-token rows) and lse through the attention params
// (v and o stay null) and writes int32 indices [.., Hk, n] with a contiguous last dimension.
struct SelectParams : AttentionParams {
  int32_t* indices;
  Strides index_strides;
  BlockSelection selection;
};

}  // namespace nsa
