// CPU kernel of fused top-n block selection (spec section 3).
//
// One task is (sequence, kv head, tile of kQueryTile queries), with the G query heads of the group
// stacked into one [G*rows, Dk] matrix. The task never forms a head's [TQ, TC] score matrix: per tile
// of kTokenTile compressed tokens it computes the scores with at::mm_out (fp32; fp64 for fp64 inputs),
// turns them into the compressed branch's probabilities exp(scale*s - lse), sums them over the group
// and spreads each token's group probability over the selection blocks it overlaps (Eq. 9). It keeps
// only the block scores [rows, NB] of its queries, then picks per row: forced blocks, then the best
// free candidates (ties to the lower block id), written ascending and padded with -1. Every output
// row is written by exactly one task, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/selection.h"
#include "cpu/tiles.h"
#include "kernels.h"

namespace nsa {
namespace {

constexpr int64_t kQueryTile = 64;   // query rows per head in one task
constexpr int64_t kTokenTile = 128;  // compressed tokens per product

// The blocks the tokens [key0, key0 + cols) overlap, as a sparse band: token key0 + j meets blocks
// first[j] .. first[j] + count[j] - 1 with weights weight[j * span + e].
template <typename acc_t>
struct TokenBlockBand {
  int64_t span = 0;
  std::vector<int64_t> first, count;
  std::vector<acc_t> weight;

  void build(const BlockSelection& sel, int64_t key0, int64_t cols) {
    // A run of c chunks meets at most c / block_chunks + 2 blocks.
    span = sel.token_chunks() / sel.block_chunks() + 2;
    first.resize(cols);
    count.resize(cols);
    weight.assign(cols * span, acc_t(0));
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t token = key0 + j;
      first[j] = sel.first_block(token);
      count[j] = sel.last_block(token) - first[j] + 1;
      for (int64_t e = 0; e < count[j]; ++e) weight[j * span + e] = acc_t(sel.overlap(token, first[j] + e));
    }
  }
};

template <typename acc_t>
struct Candidate {
  acc_t score;
  int32_t block;
};

// Higher score first; equal scores go to the lower block id. Scores are never NaN here.
template <typename acc_t>
bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.block < b.block);
}

// Writes the selection of the query at `position` from its block scores (candidates [0, cand)).
template <typename acc_t>
void pick_blocks(const BlockSelection& sel, int64_t position, int64_t num_blocks, const acc_t* scores,
                 std::vector<Candidate<acc_t>>& free, std::vector<int32_t>& kept, int32_t* out) {
  const int64_t cand = sel.candidates_end(position, num_blocks);
  kept.clear();
  free.clear();
  for (int64_t j = 0; j < cand; ++j) {
    if (sel.forced(j, position)) {
      kept.push_back(static_cast<int32_t>(j));
    } else {
      // Inputs with NaN/inf must not break the ordering: a NaN score ranks lowest.
      const acc_t s = std::isnan(scores[j]) ? -std::numeric_limits<acc_t>::infinity() : scores[j];
      free.push_back({s, static_cast<int32_t>(j)});
    }
  }
  const int64_t slots = sel.select_count - static_cast<int64_t>(kept.size());  // >= 0: n >= n_init + n_local
  const int64_t take = std::min<int64_t>(slots, static_cast<int64_t>(free.size()));
  if (take > 0 && take < static_cast<int64_t>(free.size()))
    std::nth_element(free.begin(), free.begin() + take, free.end(), better<acc_t>);
  for (int64_t e = 0; e < take; ++e) kept.push_back(free[e].block);
  std::sort(kept.begin(), kept.end());
  for (int64_t e = 0; e < sel.select_count; ++e)
    out[e] = e < static_cast<int64_t>(kept.size()) ? kept[e] : int32_t(-1);
}

template <typename scalar_t, typename acc_t>
void select_task(const SelectParams& p, int64_t b, int64_t head_k, int64_t q0) {
  const SeqSpan s = seq_span(p, b);
  if (q0 >= s.q_len) return;
  const BlockSelection& sel = p.selection;
  const VisibilityMask mask = sel.visibility();
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t rows = std::min(kQueryTile, s.q_len - q0);
  const int64_t m = group * rows, dk = p.head_dim_qk;
  const int64_t num_blocks = num_select_blocks(s.query_offset + s.q_len, sel.select_block);
  // The last row sees the most tokens and has the most candidates.
  const int64_t last_position = s.query_offset + q0 + rows - 1;
  const int64_t token_end = mask.keys_for(last_position, s.k_len).end;
  const int64_t width = std::max<int64_t>(sel.candidates_end(last_position, num_blocks), 1);

  std::vector<acc_t> block_scores(rows * width, acc_t(0));  // [rows, width]: group score of each block
  if (token_end > 0) {
    cpu::Scratch<acc_t> q_buf, k_buf, s_buf;
    at::Tensor q_tile = q_buf.view(m, dk);
    cpu::load_head_group<scalar_t, acc_t>(q_buf.data.data(), p.q, p.q_strides, s.batch, s.q_row_begin + q0, rows,
                                          head_k, group, dk);
    std::vector<acc_t> lse(m);
    const acc_t* lse_in = static_cast<const acc_t*>(p.lse);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < rows; ++i)
        lse[g * rows + i] = lse_in[p.lse_strides.offset(s.batch, s.q_row_begin + q0 + i, head_k * group + g)];
    std::vector<int64_t> visible(rows);
    std::vector<acc_t> group_probs;
    TokenBlockBand<acc_t> band;
    const acc_t scale = acc_t(p.scale);

    for (int64_t key0 = 0; key0 < token_end; key0 += kTokenTile) {
      const int64_t cols = std::min(kTokenTile, token_end - key0);
      at::Tensor k_tile = k_buf.view(cols, dk), scores = s_buf.view(m, cols);
      cpu::load_head_rows<scalar_t, acc_t>(k_buf.data.data(), p.k, p.k_strides, s.batch, s.k_row_begin + key0, cols,
                                           head_k, dk);
      at::mm_out(scores, q_tile, k_tile.t());  // [G*rows, cols]
      band.build(sel, key0, cols);

      // group_probs[i, j] = sum over the group's heads of p[t_i, h, key0 + j], visible tokens only.
      group_probs.assign(rows * cols, acc_t(0));
      for (int64_t i = 0; i < rows; ++i)
        visible[i] = std::clamp<int64_t>(mask.keys_for(s.query_offset + q0 + i, s.k_len).end - key0, 0, cols);
      const acc_t* sc = s_buf.data.data();
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = g * rows + i;
          // lse = -inf: the row sees no token (or its lse says so); it adds nothing.
          if (lse[r] == -std::numeric_limits<acc_t>::infinity()) continue;
          const acc_t* row = sc + r * cols;
          acc_t* gp = group_probs.data() + i * cols;
          for (int64_t j = 0; j < visible[i]; ++j) gp[j] += std::exp(row[j] * scale - lse[r]);
        }
      }
      // block_scores[i, blk] += w(token, blk) * group_probs[i, token].
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t* gp = group_probs.data() + i * cols;
        acc_t* bs = block_scores.data() + i * width;
        for (int64_t j = 0; j < visible[i]; ++j) {
          const acc_t* w = band.weight.data() + j * band.span;
          acc_t* dst = bs + band.first[j];
          for (int64_t e = 0; e < band.count[j]; ++e) dst[e] += w[e] * gp[j];
        }
      }
    }
  }

  std::vector<Candidate<acc_t>> free;
  std::vector<int32_t> kept;
  for (int64_t i = 0; i < rows; ++i) {
    int32_t* out = p.indices + p.index_strides.offset(s.batch, s.q_row_begin + q0 + i, head_k);
    pick_blocks(sel, s.query_offset + q0 + i, num_blocks, block_scores.data() + i * width, free, kept, out);
  }
}

}  // namespace

void select_blocks_cpu(const SelectParams& params, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_select_blocks_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::parallel_tiles(params.num_seqs, params.num_heads_k, params.max_seqlen_q, kQueryTile,
                        [&](int64_t b, int64_t h, int64_t q0) { select_task<scalar_t, acc_t>(params, b, h, q0); });
  });
}

}  // namespace nsa
