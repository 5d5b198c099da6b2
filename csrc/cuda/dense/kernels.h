#pragma once
// The dense attention family (sliding window, compressed tokens) on the shared tensor-core kernels of
// cuda/tile/attention.h: its Schedule (which key tiles a query tile visits) and KeyBlock (which query
// rows a key tile serves) policies, and the launch templates.
//
// A tile of 16 * warps stacked rows spans only (16 * warps) / G positions, so a window's key range per
// tile grows by that many keys instead of 16 * warps (G = 16, 128 rows: 8 positions, about w + 8 keys
// visited for w needed; one head per block would load every K/V tile G times).
//
// Masks: the VisibilityMask (common/masks.h) is the mask functor; key tiles outside the tile's key
// range are never visited (key_tiles_for_rows), interior tiles run without a mask and only
// boundary tiles compare key indices (common/tile_schedule.h). A window w at length T costs
// O(T * (w + tile)).
#include "common/tile_schedule.h"
#include "cuda/tile/attention.h"

namespace nsa {
namespace tiled {

// Key range [begin, end) of stacked row `row` (empty past the tile's rows), as 32-bit ints: the
// launchers check that key rows fit.
struct RowKeys {
  int begin;
  int end;
};

template <int kBlockN>
struct DenseSchedule : StackedTiles {
  using Params = AttentionParams;
  using BwdParams = AttentionBwdParams;
  static constexpr int kSmemBytes = 0;
  struct Step {
    int64_t key0;
    int64_t key_limit;
    bool boundary;
  };

  KeyTiles keys;
  int64_t k_len;
  RowKeys my_keys[2];  // this thread's accumulator rows g and g + 8 of the warp's slab

  __device__ DenseSchedule(const AttentionParams& p, const QueryTile& qt, void*, void*, int warp, int lane)
      : k_len(qt.span.k_len) {
    const StackedRows pos = stacked_positions(qt.row_begin, qt.row_end, qt.group);
    keys = key_tiles_for_rows(p.mask, qt.span.query_offset, pos.first_position, pos.last_position, qt.span.k_len,
                              kBlockN);
    for (int h = 0; h < 2; ++h) {
      const int64_t row = qt.row_begin + warp * 16 + mma::group_id(lane) + 8 * h;
      my_keys[h] = {0, 0};
      if (row < qt.row_end) {
        const KeyRange r = p.mask.keys_for(qt.span.query_offset + row / qt.group, qt.span.k_len);
        my_keys[h] = {static_cast<int>(r.begin), static_cast<int>(r.end)};
      }
    }
  }
  __device__ int64_t steps() const { return keys.end - keys.begin; }
  __device__ Step at(int64_t step) const {
    const int64_t tile = keys.begin + step;
    return {tile * kBlockN, k_len, !keys.interior(tile)};
  }
  __device__ bool warp_active(const Step&) const { return true; }
  __device__ bool needs_mask(const Step& at) const { return at.boundary; }
  __device__ bool visible(const Step&, int h, int key) const {
    return key >= my_keys[h].begin && key < my_keys[h].end;
  }
};

// Key tile blockIdx.x % tiles of sequence blockIdx.x / tiles: the stacked query rows that see it
// (queries_seeing), in order.
struct DenseKeyBlock {
  using Params = AttentionBwdParams;
  SeqSpan span;
  int64_t kv_head, group, key0, key_limit;
  int64_t first_row;  // stacked row of row 0
  int64_t rows;
  int64_t tile_end = 0;  // key0 + the tile's rows: interior means every row sees all of them
  VisibilityMask mask;

  __device__ DenseKeyBlock(const AttentionBwdParams& p, int key_rows)
      : kv_head(blockIdx.y), group(p.num_heads_q / p.num_heads_k), first_row(0), rows(0), mask(p.mask) {
    const int64_t tiles_per_seq = (p.max_key_rows + key_rows - 1) / key_rows;
    span = seq_span(p, blockIdx.x / tiles_per_seq);
    key0 = (blockIdx.x % tiles_per_seq) * key_rows;
    key_limit = span.k_len;
    if (key0 >= key_limit) return;
    const int64_t key_end = key0 + key_rows < span.k_len ? key0 + key_rows : span.k_len;
    const QueryRange seeing = queries_seeing(mask, key0, key_end, span.query_offset, span.q_len, span.k_len);
    first_row = seeing.begin * group;
    rows = seeing.end > seeing.begin ? (seeing.end - seeing.begin) * group : 0;
    tile_end = key0 + key_rows;
  }
  __device__ QueryHead query(int64_t row) const {
    const int64_t r = first_row + row;
    return {r / group, kv_head * group + r % group};
  }
  __device__ KeyRange keys_of(int64_t query) const { return mask.keys_for(span.query_offset + query, span.k_len); }
  // Keys past the sequence in its last tile are computed and not stored: no branch for them.
  __device__ bool warp_active(int) const { return true; }
  __device__ bool boundary(int64_t r0, int64_t r1) const {
    return !tile_is_interior(mask, span.query_offset, (first_row + r0) / group, (first_row + r1 - 1) / group, key0,
                             tile_end, span.k_len);
  }
};

template <typename Kt>
void launch_fwd(const AttentionParams& p) {
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t tiles = (p.max_seqlen_q * group + Kt::kRows - 1) / Kt::kRows;
  const dim3 grid = checked_grid(p.num_seqs * tiles, p.num_heads_k);
  using Schedule = DenseSchedule<Kt::kBlockN>;
  if (use_warpgroup_mma())
    launch_kernel(fwd_kernel<Kt, Schedule, WarpgroupMma<Kt>>, grid, Kt::kThreads, WarpgroupMma<Kt>::kFwdSmem, p);
  else
    launch_kernel(fwd_kernel<Kt, Schedule>, grid, Kt::kThreads, Kt::kFwdSmem, p);
}

template <typename Element, typename DqKt, typename DkvKt>
void launch_bwd(const AttentionBwdParams& p) {
  launch_delta<Element>(p);
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t q_tiles = (p.max_seqlen_q * group + DqKt::kRows - 1) / DqKt::kRows;
  const dim3 q_grid = checked_grid(p.num_seqs * q_tiles, p.num_heads_k);
  using Schedule = DenseSchedule<DqKt::kBlockN>;
  if (use_warpgroup_mma())
    launch_kernel(dq_kernel<DqKt, Schedule, WarpgroupMma<DqKt>>, q_grid, DqKt::kThreads, WarpgroupMma<DqKt>::kDqSmem,
                  p);
  else
    launch_kernel(dq_kernel<DqKt, Schedule>, q_grid, DqKt::kThreads, DqKt::kDqSmem, p);
  const int64_t k_tiles = (p.max_key_rows + DkvKt::kRows - 1) / DkvKt::kRows;
  launch_kernel(dkv_kernel<DkvKt, DenseKeyBlock>, checked_grid(p.num_seqs * k_tiles, p.num_heads_k, DkvKt::kSplitD),
                DkvKt::kThreads, DkvKt::kDkvSmem, p);
}

}  // namespace tiled
}  // namespace nsa
