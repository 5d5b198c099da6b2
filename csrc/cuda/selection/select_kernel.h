#pragma once
// Fused top-n block selection (spec section 3) on tensor cores, for bf16 / fp16: one thread block per
// (tile of whole query positions with their G heads, kv head), the same 64-row tiles as the selection
// attention kernels (selection_tile_rows). Compressed tokens stream through shared memory 32 at a
// time (cp.async, double-buffered):
//   1. S = Q K^T on tensor cores (mma.sync, gemm_ss), P = exp(scale S - lse) per row, 0 for tokens
//      the row's position does not see; P goes to shared memory (never to global memory).
//   2. Per (position, block the tile's tokens overlap): sum over the group's G rows, times the overlap
//      weight w(i, j), added to the block's score in a ring of kSelectRing in-flight blocks per position.
//   3. A block is final once every token that overlaps it has streamed by: its position's thread
//      inserts it (unless forced, or not a candidate) into the position's running top list, kept in
//      the pick order (score descending, block ascending: the spec's tie rule; blocks arrive
//      ascending, so an equal score never displaces an earlier block).
//   4. At the end each position's thread writes forced blocks and its list, ascending, -1 padded.
// Every sum runs in a fixed order (tokens ascending, heads ascending): the picks are reproducible.
#include <cstdint>

#include "common/selection.h"
#include "cuda/tile/attention.h"

namespace nsa {
namespace tiled {

constexpr int kSelectTokens = 32;  // compressed tokens per tile
constexpr int kSelectRing = 64;    // block scores in flight per position (a power of two)
constexpr int kSelectWarps = 4;    // 64 stacked rows per tile
constexpr int kSelectPairs = 1024; // positions * n: the running top lists

// Whether the ring holds every block a token tile can leave open: blocks overlapping the tokens
// [t, t + 32) and not yet final after token t, at most (30 + l/d) / (l'/d) + 2.
inline bool select_ring_fits(const BlockSelection& sel) {
  return (kSelectTokens - 2 + sel.token_chunks()) / sel.block_chunks() + 2 <= kSelectRing;
}

template <typename Element, int kHeadDim>
struct SelectTile {
  static constexpr int kRows = 16 * kSelectWarps;
  static constexpr int kThreads = 32 * kSelectWarps;
  static constexpr int kStride = kHeadDim + 8;  // as Traits: conflict-free ldmatrix rows
  static constexpr int kProbStride = kSelectTokens + 1;
  static constexpr int kSmem = 2 * (kRows * kStride + 2 * kSelectTokens * kStride) +
                               4 * (kRows * kProbStride + kRows * kSelectRing + 2 * kSelectPairs + kRows);
  static_assert(kSmem <= kMaxSharedBytes, "select tile exceeds shared memory");
};

// Inserts (score, block) into a list kept in the pick order, capacity `cap`; `len` grows up to cap.
__device__ __forceinline__ void insert_pick(float* scores, int* blocks, int& len, int cap, float score, int block) {
  if (cap <= 0) return;
  if (len == cap && !(score > scores[len - 1])) return;  // not better than the worst kept
  int at = len < cap ? len : cap - 1;
  while (at > 0 && score > scores[at - 1]) {  // strict: an equal, earlier (lower) block stays ahead
    scores[at] = scores[at - 1];
    blocks[at] = blocks[at - 1];
    --at;
  }
  scores[at] = score;
  blocks[at] = block;
  if (len < cap) ++len;
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(SelectTile<Element, kHeadDim>::kThreads)
    select_tiled_kernel(const SelectParams p, int64_t tile_rows) {
  using T = SelectTile<Element, kHeadDim>;
  constexpr int kM = T::kRows, kN = kSelectTokens, kS = T::kStride, kThreads = T::kThreads, kR = kSelectRing;
  NSA_DYNAMIC_SMEM(smem_raw);
  Element* sQ = reinterpret_cast<Element*>(smem_raw);            // [kM][kS]
  Element* sK = sQ + kM * kS;                                      // [2 stages][kN][kS]
  float* sP = reinterpret_cast<float*>(sK + 2 * kN * kS);          // [kM][kProbStride]
  float* ring = sP + kM * T::kProbStride;                          // [positions][kR]
  float* list_score = ring + kM * kR;                              // [positions][n]
  int* list_block = reinterpret_cast<int*>(list_score + kSelectPairs);
  int* list_len = list_block + kSelectPairs;                       // [positions]

  const QueryTile qt = query_tile(p, tile_rows);
  if (qt.row_begin >= qt.row_end) return;
  const SeqSpan& s = qt.span;
  const BlockSelection& sel = p.selection;
  const int64_t group = qt.group, first = qt.row_begin / group;
  const int positions = static_cast<int>((qt.row_end - 1) / group - first + 1);
  const int n = static_cast<int>(sel.select_count);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = mma::group_id(lane), t = mma::thread_in_group(lane);
  const int64_t num_blocks = num_select_blocks(s.query_offset + s.q_len, sel.select_block);
  const VisibilityMask mask = sel.visibility();
  const int64_t last_position = s.query_offset + first + positions - 1;
  const int64_t token_end = mask.keys_for(last_position, s.k_len).end;  // the last position sees the most
  const int64_t cand_end = sel.candidates_end(last_position, num_blocks);

  for (int x = threadIdx.x; x < positions * kR; x += kThreads) ring[x] = 0.f;
  for (int x = threadIdx.x; x < positions; x += kThreads) list_len[x] = 0;
  __syncthreads();  // the ring is cleared by every thread, read per position

  // This thread's accumulator rows g and g + 8: lse (log2 units, +inf: sees nothing) and token end.
  float my_lse[2];
  int my_end[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = qt.row_begin + warp * 16 + g + 8 * h;
    const bool valid = row < qt.row_end;
    my_lse[h] = valid ? lse_log2_of(static_cast<const float*>(p.lse)[qt.offset(p.lse_strides, row)]) : INFINITY;
    my_end[h] = valid ? static_cast<int>(mask.keys_for(s.query_offset + row / group, s.k_len).end) : 0;
  }
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const bool warp_rows = qt.row_begin + warp * 16 < qt.row_end;

  // Position pos (< positions) finalises blocks [from, to): inserts the free candidates, clears the ring.
  auto finalise = [&](int pos, int64_t from, int64_t to) {
    const int64_t position = s.query_offset + first + pos;
    const int64_t cand = sel.candidates_end(position, num_blocks);
    const int64_t own = cand > 0 ? sel.own_block(position) : 0;
    const int64_t forced = sel.forced_count(cand, own);
    float* scores = list_score + pos * n;
    int* blocks = list_block + pos * n;
    int len = list_len[pos];
    for (int64_t j = from; j < to; ++j) {
      float& slot = ring[pos * kR + (j & (kR - 1))];
      if (j < cand && !sel.forced_candidate(j, own))
        insert_pick(scores, blocks, len, static_cast<int>(n - forced), isnan(slot) ? -INFINITY : slot,
                    static_cast<int>(j));
      slot = 0.f;
    }
    list_len[pos] = len;
  };

  const int64_t steps = (token_end + kN - 1) / kN;
  int64_t finalised = 0;  // blocks [0, finalised) are in the lists
  if (steps > 0) {
    auto load_step = [&](int64_t step, int stage) {
      load_key_rows<kN, kHeadDim, kS, kThreads, Element>(sK + stage * kN * kS, p.k, p.k_strides, s, step * kN,
                                                          token_end, qt.kv_head);
    };
    load_query_rows<kM, kHeadDim, kS, kThreads, Element>(sQ, p.q, p.q_strides, qt);
    load_step(0, 0);
    cp_async_commit();
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      advance_pipeline(step, steps, load_step);
      const int t0 = static_cast<int>(step * kN);
      const int t1 = t0 + kN < token_end ? t0 + kN : static_cast<int>(token_end);
      if (warp_rows) {
        float sc[kN / 8][4];
        zero(sc);
        gemm_ss<Element, kN, kHeadDim>(sc, sQ + warp * 16 * kS, kS, sK + stage * kN * kS, kS, lane);
#pragma unroll
        for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int h = i >> 1, col = nb * 8 + 2 * t + (i & 1);
            const float prob = fast_exp2(fmaf(sc[nb][i], scale_log2, -my_lse[h]));
            sP[(warp * 16 + g + 8 * h) * T::kProbStride + col] = t0 + col < my_end[h] ? prob : 0.f;
          }
        }
      }
      __syncthreads();
      // Per (position, block the tokens [t0, t1) overlap): group sum times overlap, into the ring.
      const int64_t jb0 = sel.first_block(t0), blocks = sel.last_block(t1 - 1) + 1 - jb0;
      for (int64_t x = threadIdx.x; x < positions * blocks; x += kThreads) {
        const int pos = static_cast<int>(x / blocks);
        const int64_t j = jb0 + x % blocks;
        const int64_t lo = j * sel.block_chunks() - sel.token_chunks() + 1, hi = (j + 1) * sel.block_chunks();
        float add = 0.f;
        for (int64_t c = lo > t0 ? lo : t0; c < (hi < t1 ? hi : t1); ++c) {
          float sum = 0.f;
          for (int64_t h = 0; h < group; ++h) sum += sP[(pos * group + h) * T::kProbStride + (c - t0)];
          add += static_cast<float>(sel.overlap(c, j)) * sum;
        }
        ring[pos * kR + (j & (kR - 1))] += add;
      }
      __syncthreads();
      // Blocks whose tokens have all streamed by are final (the last step: all of them).
      const int64_t done = step + 1 < steps ? (t1 / sel.block_chunks() < cand_end ? t1 / sel.block_chunks() : cand_end)
                                            : cand_end;
      for (int pos = threadIdx.x; pos < positions; pos += kThreads) finalise(pos, finalised, done);
      finalised = done;
    }
  }
  if (finalised < cand_end) {  // no token at all: every candidate scores 0
    for (int pos = threadIdx.x; pos < positions; pos += kThreads) finalise(pos, finalised, cand_end);
  }

  // Forced blocks and the list, ascending, -1 padded (n is small: one thread per position).
  for (int pos = threadIdx.x; pos < positions; pos += kThreads) {
    const int64_t position = s.query_offset + first + pos;
    const int64_t cand = sel.candidates_end(position, num_blocks);
    const int64_t own = cand > 0 ? sel.own_block(position) : 0;
    int32_t* out = p.indices + p.index_strides.offset(s.batch, s.q_row_begin + first + pos, qt.kv_head);
    for (int e = 0; e < list_len[pos]; ++e) out[e] = list_block[pos * n + e];
    sel.finish_row(cand, own, list_len[pos], out);
  }
}

template <typename Element, int kHeadDim>
void launch_select(const SelectParams& p, int64_t tile_rows) {
  using T = SelectTile<Element, kHeadDim>;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t tiles = (p.max_seqlen_q * group + tile_rows - 1) / tile_rows;
  launch_kernel(select_tiled_kernel<Element, kHeadDim>, checked_grid(p.num_seqs * tiles, p.num_heads_k), T::kThreads,
                T::kSmem, p, tile_rows);
}

}  // namespace tiled
}  // namespace nsa
