#pragma once
// Selected-block attention (spec section 4) on the shared tensor-core kernels of cuda/tile/attention.h:
//   SelectionSchedule (forward, dq): a tile of whole query positions (G heads each, see config.h)
//     visits the sorted union of the blocks its positions chose, in 32-key tiles; each block carries
//     the mask of the tile's positions that chose it. Row r sees key s of block j iff its position
//     chose j and s <= its position (the causal mask inside its own block), s < TK.
//   SelectionBlockSchedule (forward, dq; opt-in, NSA_SELECTION_SCHEDULE=blocks): one select block
//     per tile, over rows of the queries that chose it; partial results combined per row afterwards.
//   SelectionKeyBlock (dk, dv): one 64-key slice of one block per thread block, over the queries that
//     chose the block, ascending, read from the reverse index (common/selection.h reverse_entry) that
//     the host builds on the GPU before the launch (selection_attention.cu).
// Ids are checked (block_counts) before any key of their block is read: -1, out-of-range and future
// ids never touch memory, and a repeated id is one pair of the union (its mask bit is set once).
#include <cstdint>

#include "common/selection.h"
#include "cuda/selection/config.h"
#include "cuda/tile/attention.h"

namespace nsa {
namespace tiled {

// Sorts a[0, size) ascending (size a power of two) with every thread of the block; ends synchronised.
template <int kThreads>
__device__ __forceinline__ void bitonic_sort(uint64_t* a, int size) {
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < size; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool ascending = (i & k) == 0;
          const uint64_t x = a[i], y = a[partner];
          if ((x > y) == ascending) {
            a[i] = y;
            a[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The tile's blocks: ids[0, count) ascending, choosers[u] the positions (bit = position - first
// position of the tile) that chose ids[u]. `pairs` (kMaxTilePairs) is scratch. Every thread calls it.
template <int kThreads>
__device__ int build_tile_blocks(const SelectionAttentionParams& p, const QueryTile& qt, uint64_t* pairs, int* ids,
                                 uint64_t* choosers, int* count) {
  const SeqSpan& s = qt.span;
  const SelectedBlocks& sel = p.selection;
  const int64_t first = qt.row_begin / qt.group;
  const int positions = static_cast<int>((qt.row_end - 1) / qt.group - first + 1);
  const int n = static_cast<int>(sel.count);
  const int used = positions * n;  // <= kMaxTilePairs: the host sized the tile (selection_tile_rows)
  int size = 1;
  while (size < used) size <<= 1;
  const int64_t num_blocks = num_select_blocks(s.k_len, sel.block);
  for (int x = threadIdx.x; x < size; x += kThreads) {
    uint64_t pair = kNoPair;
    if (x < used) {
      const int pos = x / n;
      const int64_t query = first + pos;
      const int64_t id = sel.indices[sel.strides.offset(s.batch, s.q_row_begin + query, qt.kv_head) + x % n];
      if (block_counts(id, num_blocks, sel.block, s.query_offset + query)) pair = tile_pair(id, pos);
    }
    pairs[x] = pair;
  }
  __syncthreads();
  bitonic_sort<kThreads>(pairs, size);
  // Warp 0 compacts the sorted pairs: a run of equal ids becomes one block and its position mask.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int x0 = 0; x0 < size; x0 += 32) {
      const int x = x0 + lane;
      const uint64_t pair = x < size ? pairs[x] : kNoPair;
      const bool head = pair != kNoPair && (x == 0 || pair_block(pairs[x - 1]) != pair_block(pair));
      uint64_t bits = 0;
      if (head) {
        for (int y = x; y < size && pairs[y] != kNoPair && pair_block(pairs[y]) == pair_block(pair); ++y)
          bits |= uint64_t(1) << pair_position(pairs[y]);
      }
      const unsigned heads = __ballot_sync(0xffffffffu, head);
      if (head) {
        const int u = base + __popc(heads & ((1u << lane) - 1u));
        ids[u] = static_cast<int>(pair_block(pair));
        choosers[u] = bits;
      }
      base += __popc(heads);
    }
    if (lane == 0) *count = base;
  }
  __syncthreads();
  return *count;
}

template <int kBlockN, int kThreads>
struct SelectionSchedule : StackedTiles {
  using Params = SelectionAttentionParams;
  using BwdParams = SelectionAttentionParams;
  // Own shared memory after the kernel's tiles: the union's ids and position masks, and its size.
  static constexpr int kSmemBytes = kMaxTilePairs * (8 + 4) + 16;
  // Key indices and positions are 32-bit (the launcher checks fits_int32): fewer registers next to
  // the large head dims' accumulators.
  struct Step {
    int key0;
    int key_limit;  // end of the block's keys within the sequence
    uint64_t choosers;
  };

  const int* ids;
  const uint64_t* choosers;
  int count;
  int subtiles;  // kBlockN-key tiles per block
  int block;
  int k_len;
  uint64_t warp_bits;  // tile positions of the warp's rows
  int warp_last;       // largest position of the warp's rows
  int bit[2];          // this thread's rows g and g + 8: position within the tile
  int position[2];     // and absolute position (-1: past the tile's rows, sees nothing)

  __device__ static QueryTile tile(const SelectionAttentionParams& p, int) { return query_tile(p, p.tile_rows); }

  __device__ SelectionSchedule(const SelectionAttentionParams& p, const QueryTile& qt, void* scratch, void* own,
                               int warp, int lane)
      : block(static_cast<int>(p.selection.block)), k_len(static_cast<int>(qt.span.k_len)) {
    uint64_t* own_masks = static_cast<uint64_t*>(own);
    int* own_ids = reinterpret_cast<int*>(own_masks + kMaxTilePairs);
    count = build_tile_blocks<kThreads>(p, qt, static_cast<uint64_t*>(scratch), own_ids, own_masks,
                                   own_ids + kMaxTilePairs);
    ids = own_ids;
    choosers = own_masks;
    subtiles = static_cast<int>((block + kBlockN - 1) / kBlockN);
    const int64_t first = qt.row_begin / qt.group;
    const int64_t warp_row = qt.row_begin + warp * 16;
    const int64_t warp_end = warp_row + 16 < qt.row_end ? warp_row + 16 : qt.row_end;
    warp_bits = warp_row < warp_end ? position_bits(warp_row / qt.group - first, (warp_end - 1) / qt.group - first) : 0;
    warp_last = static_cast<int>(qt.span.query_offset + (warp_end - 1) / qt.group);
    for (int h = 0; h < 2; ++h) {
      const int64_t row = warp_row + mma::group_id(lane) + 8 * h;
      const bool valid = row < qt.row_end;
      bit[h] = valid ? static_cast<int>(row / qt.group - first) : 0;
      position[h] = valid ? static_cast<int>(qt.span.query_offset + row / qt.group) : -1;
    }
  }
  __device__ int64_t steps() const { return static_cast<int64_t>(count) * subtiles; }
  __device__ Step at(int64_t step) const {
    const int u = static_cast<int>(step / subtiles), sub = static_cast<int>(step % subtiles);
    const int64_t start = static_cast<int64_t>(ids[u]) * block;
    const int64_t end = start + block < k_len ? start + block : k_len;
    return {static_cast<int>(start + sub * kBlockN), static_cast<int>(end), choosers[u]};
  }
  // No row of the warp chose the block, or the tile lies wholly in the future of the warp's rows.
  __device__ bool warp_active(const Step& at) const { return (at.choosers & warp_bits) != 0 && at.key0 <= warp_last; }
  __device__ bool needs_mask(const Step&) const { return true; }
  __device__ bool visible(const Step& at, int h, int key) const {
    return ((at.choosers >> bit[h]) & 1) != 0 && key <= position[h] && key < at.key_limit;
  }
};

// The schedule by blocks of the forward and dq kernels (small groups; cuda/selection_attention.cu runs
// it chunk by chunk): block x of the launch is work tile x of the chunk, a tile of kRows rows of one
// reverse-index slot (kv head, sequence, select block): its entries in the chunk (the queries that
// chose the block, ascending) times their G heads, found by binary search over slot_tiles. It visits
// that block's keys only and writes every row's partial result for a combine kernel: the forward o
// normalised over the block and its lse, dq the block's share of dQ. Every row of every tile chose
// the block, so no mma row pays for a block it did not choose.
template <int kBlockN>
struct SelectionBlockSchedule {
  using Params = SelectionAttentionParams;
  using BwdParams = SelectionAttentionParams;
  template <typename Element>
  using OutElement = float;
  static constexpr int kSmemBytes = 0;
  struct Step {
    int key0;
    int key_limit;
  };

  int block_id;
  int key0, key_limit, subtiles;
  int warp_last;    // position of the warp's last row (entries ascend): -1 when the warp has no rows
  int position[2];  // this thread's rows g and g + 8 (-1: past the tile's rows, sees nothing)

  __device__ static QueryTile tile(const SelectionAttentionParams& p, int rows) {
    QueryTile qt{};
    const int64_t slots = p.reverse_slots();
    const int64_t x = blockIdx.x;
    if (x >= p.slot_tiles[slots]) return qt;  // the launch's bound exceeds the chunk's tiles
    int64_t lo = 0, hi = slots;  // the last slot whose first tile is <= x
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.slot_tiles[mid] <= x) lo = mid; else hi = mid;
    }
    qt.group = p.num_heads_q / p.num_heads_k;
    qt.kv_head = lo / (p.num_seqs * p.blocks_per_seq);
    qt.span = seq_span(p, lo / p.blocks_per_seq % p.num_seqs);
    const int64_t first = p.slot_entries[2 * lo], entries = p.slot_entries[2 * lo + 1] - first;
    qt.entries = p.reverse_entries + first;
    qt.row_begin = (x - p.slot_tiles[lo]) * rows;
    qt.row_end = qt.row_begin + rows < entries * qt.group ? qt.row_begin + rows : entries * qt.group;
    return qt;
  }

  __device__ SelectionBlockSchedule(const SelectionAttentionParams& p, const QueryTile& qt, void*, void*, int warp,
                                    int lane) {
    const int64_t block = p.selection.block;
    block_id = static_cast<int>(entry_slot(qt.entries[0]) % p.blocks_per_seq);
    key0 = static_cast<int>(block_id * block);
    key_limit = static_cast<int>(key0 + block < qt.span.k_len ? key0 + block : qt.span.k_len);
    subtiles = (key_limit - key0 + kBlockN - 1) / kBlockN;
    const int64_t warp_row = qt.row_begin + warp * 16;
    const int64_t warp_end = warp_row + 16 < qt.row_end ? warp_row + 16 : qt.row_end;
    warp_last = warp_row < warp_end ? static_cast<int>(qt.span.query_offset + qt.query(warp_end - 1).query) : -1;
    for (int h = 0; h < 2; ++h) {
      const int64_t row = warp_row + mma::group_id(lane) + 8 * h;
      position[h] = row < qt.row_end ? static_cast<int>(qt.span.query_offset + qt.query(row).query) : -1;
    }
  }
  __device__ int64_t steps() const { return subtiles; }
  __device__ Step at(int64_t step) const { return {key0 + static_cast<int>(step) * kBlockN, key_limit}; }
  // The warp has rows, and the tile is not wholly in the future of its last (latest) one.
  __device__ bool warp_active(const Step& at) const { return at.key0 <= warp_last; }
  __device__ bool needs_mask(const Step&) const { return true; }
  __device__ bool visible(const Step& at, int h, int key) const { return key <= position[h] && key < at.key_limit; }

  // The row's partials: (chunk row, head, slot k) where slot k of its index row is the first that holds
  // this block (the one that counts, first_counting_slot; the reverse index has an entry only for it).
  __device__ int64_t partial(const SelectionAttentionParams& p, const QueryTile& qt, int64_t row) const {
    const QueryHead qh = qt.query(row);
    const SelectedBlocks& sel = p.selection;
    const int32_t* ids = sel.indices + sel.strides.offset(qt.span.batch, qt.span.q_row_begin + qh.query, qt.kv_head);
    int64_t k = 0;
    while (k + 1 < sel.count && ids[k] != block_id) ++k;
    const int64_t part_row = index_row(p, qt.span, qh.query) - p.chunk_row_begin;
    return (part_row * p.num_heads_q + qh.head) * sel.count + k;
  }
  template <typename Out>
  __device__ OutputRow<Out> output(const SelectionAttentionParams& p, const QueryTile& qt, int64_t row) const {
    const int64_t part = partial(p, qt, row);
    return {p.partial_o + part * p.head_dim_v, p.partial_lse + part};
  }
  template <typename Out>
  __device__ Out* dq_output(const SelectionAttentionParams& p, const QueryTile& qt, int64_t row) const {
    return p.partial_dq + partial(p, qt, row) * p.head_dim_qk;
  }
};

// blockIdx.x = (sequence * blocks_per_seq + block) * slices + slice: keys [slice * kRows, +kRows) of
// the block; blockIdx.y = kv head. Rows are the block's reverse-index entries times the G heads.
struct SelectionKeyBlock {
  using Params = SelectionAttentionParams;
  SeqSpan span;
  int64_t kv_head, group, key0, key_limit, tile_end;
  int64_t rows;
  const int64_t* entries;

  __device__ SelectionKeyBlock(const SelectionAttentionParams& p, int key_rows)
      : kv_head(blockIdx.y), group(p.num_heads_q / p.num_heads_k), rows(0), entries(nullptr) {
    const int64_t block = p.selection.block;
    const int64_t slices = (block + key_rows - 1) / key_rows;
    const int64_t slot = blockIdx.x / slices;
    const int64_t seq = slot / p.blocks_per_seq, j = slot % p.blocks_per_seq;
    span = seq_span(p, seq);
    key0 = j * block + (blockIdx.x % slices) * key_rows;
    key_limit = (j + 1) * block < span.k_len ? (j + 1) * block : span.k_len;
    tile_end = key0 + key_rows < key_limit ? key0 + key_rows : key_limit;
    if (key0 >= key_limit) return;  // past the sequence's blocks (packed) or its last keys
    const int64_t r = reverse_slot(kv_head, seq, j, p.num_seqs, p.blocks_per_seq);
    entries = p.reverse_entries + p.reverse_offsets[r];
    rows = (p.reverse_offsets[r + 1] - p.reverse_offsets[r]) * group;
  }
  __device__ QueryHead query(int64_t row) const {
    return {entry_query(entries[row / group]), kv_head * group + row % group};
  }
  // The slice's keys up to the query's position (empty when the query sits before the slice).
  __device__ KeyRange keys_of(int64_t query) const {
    const int64_t end = span.query_offset + query + 1 < key_limit ? span.query_offset + query + 1 : key_limit;
    return {key0, end};
  }
  // A select block shorter than the tile (32 keys) leaves the last warps without keys.
  __device__ bool warp_active(int warp) const { return key0 + warp * 16 < key_limit; }
  // Entries ascend, so the tile's first row has the earliest position: if it sees the whole tile, all do.
  __device__ bool boundary(int64_t r0, int64_t) const {
    return span.query_offset + entry_query(entries[r0 / group]) < tile_end - 1;
  }
};

// The forward: by query tiles, or, when p.partial_o is set, by blocks over p.work_tiles blocks (an
// upper bound of the chunk's tiles; the surplus exits at once).
template <typename Kt>
void launch_selection_fwd(const SelectionAttentionParams& p) {
  static_assert(Kt::kRows == kSelectionRows, "the host sizes tiles by kSelectionRows");
  if (p.partial_o != nullptr) {
    launch_kernel(fwd_kernel<Kt, SelectionBlockSchedule<Kt::kBlockN>>, checked_grid(p.work_tiles, 1), Kt::kThreads,
                  Kt::kFwdSmem, p);
    return;
  }
  using Schedule = SelectionSchedule<Kt::kBlockN, Kt::kThreads>;
  static_assert(2 * Kt::kBlockN * Kt::kStrideQK * Kt::kElem >= kMaxTilePairs * 8, "pair buffer exceeds K stages");
  constexpr int kSmem = Kt::kFwdSmem + Schedule::kSmemBytes;
  static_assert(kSmem <= kMaxSharedBytes, "selection forward exceeds shared memory");
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t tiles = (p.max_seqlen_q * group + p.tile_rows - 1) / p.tile_rows;
  launch_kernel(fwd_kernel<Kt, Schedule>, checked_grid(p.num_seqs * tiles, p.num_heads_k), Kt::kThreads, kSmem, p);
}

// The backward: delta, dq by query tiles, dk / dv by blocks. With p.dq_by_blocks the dq pass goes by
// blocks instead, one chunk per launch with p.partial_dq set (after the launch of delta and dk / dv).
template <typename Element, typename DqKt, typename DkvKt>
void launch_selection_bwd(const SelectionAttentionParams& p) {
  if (p.partial_dq != nullptr) {
    static_assert(DqKt::kRows == kSelectionRows, "the host sizes tiles by kSelectionRows");
    launch_kernel(dq_kernel<DqKt, SelectionBlockSchedule<DqKt::kBlockN>>, checked_grid(p.work_tiles, 1),
                  DqKt::kThreads, DqKt::kDqSmem, p);
    return;
  }
  using Schedule = SelectionSchedule<DqKt::kBlockN, DqKt::kThreads>;
  static_assert(2 * DqKt::kBlockN * DqKt::kStrideQK * DqKt::kElem >= kMaxTilePairs * 8, "pair buffer exceeds K stages");
  constexpr int kDqSmem = DqKt::kDqSmem + Schedule::kSmemBytes;
  static_assert(kDqSmem <= kMaxSharedBytes, "selection dq exceeds shared memory");
  launch_delta<Element>(p);
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t q_tiles = (p.max_seqlen_q * group + p.tile_rows - 1) / p.tile_rows;
  if (!p.dq_by_blocks)
    launch_kernel(dq_kernel<DqKt, Schedule>, checked_grid(p.num_seqs * q_tiles, p.num_heads_k), DqKt::kThreads,
                  kDqSmem, p);
  const int64_t slices = (p.selection.block + DkvKt::kRows - 1) / DkvKt::kRows;
  launch_kernel(dkv_kernel<DkvKt, SelectionKeyBlock>,
                checked_grid(p.num_seqs * p.blocks_per_seq * slices, p.num_heads_k, DkvKt::kSplitD), DkvKt::kThreads,
                DkvKt::kDkvSmem, p);
}

}  // namespace tiled
}  // namespace nsa
