// CPU kernel of fused NSA decoding: for a few new queries per sequence, the compressed branch, block
// selection, the selected and window branches and the gated sum in one pass over the cache.
//
// One task is (sequence, kv head, new query), with the G query heads of the group stacked into a
// [G, Dk] matrix. The compressed branch's probabilities are the selection's scores too (spec section
// 3 step 1 uses exactly that softmax), so the task computes them once: scores over the visible
// compressed tokens, softmax, o_cmp; group sum spread over the blocks by the overlap weights; forced
// plus top free blocks (cpu/block_pick.h, as select_blocks); then attention over the union of the
// selected blocks and over the window, each from the cache rows in place of a packed copy. A
// decoding step thus reads what NSA needs (TC tokens, n*l' + w keys per kv head), not the cache.
//
// Everything is accumulated in float32 (float64 for float64 inputs), branch outputs included, and
// rounded once when the gated sum is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/decode_params.h"
#include "cpu/block_pick.h"
#include "cpu/small_gemm.h"
#include "cpu/tiles.h"
#include "cpu/vec_math.h"
#include "kernels.h"

namespace nsa {
namespace {

template <typename scalar_t, typename acc_t>
struct DecodeTask {
  const DecodeParams& p;
  int64_t group, dk, dv;
  // Scratch reused by the thread's tasks: stacked queries (transposed, [Dk, G]), gathered key/value
  // rows, scores and outputs.
  cpu::Scratch<acc_t> q_buf, k_buf, v_buf, scores_t_buf, score_buf, out_buf, block_buf, gate_buf, acc_buf;
  std::vector<cpu::Candidate<acc_t>> free;
  std::vector<int32_t> kept;
  std::vector<KeyRange> ranges;  // key rows of the cache a branch reads: one per selected block or window

  explicit DecodeTask(const DecodeParams& params)
      : p(params), group(params.num_heads_q / params.num_heads_k), dk(params.head_dim_qk), dv(params.head_dim_v) {}

  // Loads the rows of `ranges` of one kv head from k/v into k_buf/v_buf; returns their count.
  int64_t gather(const void* k, const Strides& ks, const void* v, const Strides& vs, int64_t b, int64_t head_k) {
    int64_t rows = 0;
    for (const KeyRange& r : ranges) rows += r.end - r.begin;
    acc_t* keys = k_buf.reserve(rows * dk);
    acc_t* values = v_buf.reserve(rows * dv);
    int64_t row = 0;
    for (const KeyRange& r : ranges) {
      cpu::load_head_rows<scalar_t, acc_t>(keys + row * dk, k, ks, b, r.begin, r.end - r.begin, head_k, dk);
      cpu::load_head_rows<scalar_t, acc_t>(values + row * dv, v, vs, b, r.begin, r.end - r.begin, head_k, dv);
      row += r.end - r.begin;
    }
    return rows;
  }

  // Softmax attention of the stacked (pre-scaled) queries over the `rows` gathered keys: leaves the
  // probabilities [G, rows] in score_buf and adds gate[g] * output into acc [G, Dv]. No rows: adds 0.
  void attend(int64_t rows, const acc_t* gate, acc_t* acc) {
    if (rows == 0) return;
    // scores^T [rows, G] = K Q^T (small_gemm wants its B operand row-contiguous), then transposed.
    acc_t* scores_t = scores_t_buf.reserve(rows * group);
    cpu::small_gemm<acc_t>(rows, group, dk, cpu::Matrix<acc_t>::strided(k_buf.data.data(), dk),
                           cpu::Matrix<acc_t>::strided(q_buf.data.data(), group), scores_t, group, false);
    acc_t* scores = score_buf.reserve(group * rows);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t g = 0; g < group; ++g) scores[g * rows + j] = scores_t[j * group + g];
    for (int64_t g = 0; g < group; ++g) {
      acc_t* row = scores + g * rows;
      const acc_t sum = cpu::exp_scaled_sum(row, rows, acc_t(1), cpu::row_max(row, rows));
      const acc_t inv = acc_t(1) / sum;
      for (int64_t j = 0; j < rows; ++j) row[j] *= inv;
    }
    acc_t* out = out_buf.reserve(group * dv);
    cpu::small_gemm<acc_t>(group, dv, rows, cpu::Matrix<acc_t>::strided(scores, rows),
                           cpu::Matrix<acc_t>::strided(v_buf.data.data(), dv), out, dv, false);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t x = 0; x < dv; ++x) acc[g * dv + x] += gate[g] * out[g * dv + x];
  }

  void run(int64_t b, int64_t head_k, int64_t i) {
    const BlockSelection& sel = p.selection;
    const int64_t length = p.cache_seqlens[b];
    const int64_t position = length - p.num_queries + i;  // >= 0: the host checks length >= TQ
    // The group's queries as Q^T [Dk, G], pre-scaled so that products give scale * q.k.
    acc_t* queries_t = q_buf.reserve(dk * group);
    const scalar_t* q_in = static_cast<const scalar_t*>(p.q);
    for (int64_t g = 0; g < group; ++g) {
      const scalar_t* row = q_in + p.q_strides.offset(b, i, head_k * group + g);
      for (int64_t x = 0; x < dk; ++x) queries_t[x * group + g] = static_cast<acc_t>(row[x]) * acc_t(p.scale);
    }
    acc_t* gate = gate_buf.reserve(3 * group);
    const scalar_t* gate_in = static_cast<const scalar_t*>(p.gates);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t branch = 0; branch < 3; ++branch)
        gate[branch * group + g] =
            static_cast<acc_t>(gate_in[p.gate_strides.offset(b, i, head_k * group + g) + branch]);
    acc_t* acc = acc_buf.reserve(group * dv);
    std::fill(acc, acc + group * dv, acc_t(0));

    // Compressed branch: tokens [0, visible) (i*d + l - 1 <= t).
    const int64_t visible = sel.visibility().keys_for(position, num_compressed_tokens(length, sel.compress_block,
                                                                                      sel.compress_stride)).end;
    ranges.assign(1, {0, visible});
    const int64_t tokens = gather(p.k_cmp, p.k_cmp_strides, p.v_cmp, p.v_cmp_strides, b, head_k);
    attend(tokens, gate, acc);

    // Block scores: the group's token probabilities spread over blocks by the overlap weights (Eq. 9).
    const int64_t num_blocks = num_select_blocks(length, sel.select_block);
    const int64_t candidates = sel.candidates_end(position, num_blocks);
    acc_t* scores = block_buf.reserve(std::max<int64_t>(candidates, 1));
    std::fill(scores, scores + candidates, acc_t(0));
    const acc_t* probs = score_buf.data.data();
    for (int64_t token = 0; token < tokens; ++token) {
      acc_t group_prob = 0;
      for (int64_t g = 0; g < group; ++g) group_prob += probs[g * tokens + token];
      for (int64_t blk = sel.first_block(token); blk <= sel.last_block(token) && blk < candidates; ++blk)
        scores[blk] += acc_t(sel.overlap(token, blk)) * group_prob;
    }
    int32_t* picked = p.indices + p.index_strides.offset(b, i, head_k);
    cpu::pick_blocks(sel, position, num_blocks, scores, free, kept, picked);

    // Selected branch: keys s <= t of the picked blocks (ascending, distinct).
    ranges.clear();
    for (int64_t e = 0; e < sel.select_count; ++e) {
      if (picked[e] < 0) continue;
      const int64_t begin = picked[e] * sel.select_block;
      ranges.push_back({begin, std::min(begin + sel.select_block, position + 1)});
    }
    attend(gather(p.k, p.k_strides, p.v, p.v_strides, b, head_k), gate + group, acc);

    // Window branch: keys t - w < s <= t.
    ranges.assign(1, {std::max<int64_t>(0, position + 1 - p.window), position + 1});
    attend(gather(p.k_swa, p.k_swa_strides, p.v_swa, p.v_swa_strides, b, head_k), gate + 2 * group,
           acc);

    scalar_t* out = static_cast<scalar_t*>(p.out);
    for (int64_t g = 0; g < group; ++g) {
      scalar_t* row = out + p.out_strides.offset(b, i, head_k * group + g);
      for (int64_t x = 0; x < dv; ++x) row[x] = static_cast<scalar_t>(acc[g * dv + x]);
    }
  }
};

}  // namespace

void decode_attention_cpu(const DecodeParams& params, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_decode_attention_cpu", [&] {
    using acc_t = cpu::accumulate_t<scalar_t>;
    const int64_t per_seq = params.num_heads_k * params.num_queries;
    at::parallel_for(0, params.num_seqs * per_seq, 1, [&](int64_t begin, int64_t end) {
      DecodeTask<scalar_t, acc_t> task(params);
      for (int64_t t = begin; t < end; ++t)
        task.run(t / per_seq, (t / params.num_queries) % params.num_heads_k, t % params.num_queries);
    });
  });
}

}  // namespace nsa
