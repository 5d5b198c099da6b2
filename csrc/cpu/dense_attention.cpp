// CPU kernels of the dense-tiled attention family (sliding window, compressed tokens).
//
// Work is split into tasks of one (sequence, kv head, tile); a task stacks the G query heads of its
// group into one matrix so each key/value tile is converted once and multiplied once for the whole
// group. Products run through ATen's BLAS (at::mm_out) on fp32 (fp64) scratch tiles; softmax is
// online, as in FlashAttention. The backward runs two passes so that every output element is written
// by exactly one task in a fixed order (deterministic, thread-count independent):
//   dq pass  : per query tile, over the key tiles it sees;
//   dkv pass : per key tile, over the query tiles that see it (found by binary search on the mask).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/tiles.h"
#include "cpu/vec_math.h"
#include "kernels.h"

namespace nsa {
namespace {

using cpu::load_head_group;
using cpu::load_head_rows;
using cpu::Scratch;

constexpr int64_t kQueryTile = 64;  // query rows per head in one task
constexpr int64_t kKeyTile = 128;   // key rows per product

template <typename scalar_t, typename acc_t>
void store_rows(void* base, const Strides& st, int64_t batch, int64_t row0, int64_t rows, int64_t head, int64_t dim,
                const acc_t* src, acc_t factor) {
  scalar_t* dst = static_cast<scalar_t*>(base);
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = dst + st.offset(batch, row0 + r, head);
    for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<scalar_t>(src[r * dim + d] * factor);
  }
}

// Keys and values [key0, key0 + cols) of kv head head_k, converted to acc_t.
template <typename scalar_t, typename acc_t>
void load_kv_tile(const AttentionParams& p, const SeqSpan& s, int64_t head_k, int64_t key0, int64_t cols,
                  Scratch<acc_t>& k_buf, Scratch<acc_t>& v_buf) {
  const int64_t row0 = s.k_row_begin + key0;
  load_head_rows<scalar_t, acc_t>(k_buf.reserve(cols * p.head_dim_qk), p.k, p.k_strides, s.batch, row0, cols, head_k,
                                  p.head_dim_qk);
  load_head_rows<scalar_t, acc_t>(v_buf.reserve(cols * p.head_dim_v), p.v, p.v_strides, s.batch, row0, cols, head_k,
                                  p.head_dim_v);
}

// Visible keys of query row i of a tile, as a column range [lo, hi) of the key tile at key0.
struct ColumnRange {
  int64_t lo;
  int64_t hi;
};

inline ColumnRange visible_columns(const AttentionParams& p, const SeqSpan& s, int64_t query, int64_t key0,
                                   int64_t cols) {
  const KeyRange keys = p.mask.keys_for(s.query_offset + query, s.k_len);
  return {std::clamp<int64_t>(keys.begin - key0, 0, cols), std::clamp<int64_t>(keys.end - key0, 0, cols)};
}

// max_j(row[j] * scale) over n >= 1 scores. Rounding is monotonic, so for scale >= 0 this is exactly
// max(row) * scale, which the vector row_max finds; a negative scale flips it to the minimum.
template <typename acc_t>
acc_t scaled_max(const acc_t* row, int64_t n, acc_t scale) {
  if (scale >= 0) return cpu::row_max(row, n) * scale;
  return *std::min_element(row, row + n) * scale;
}

// Rows [lo, hi) of the tile's visible keys, for the rows of a stacked group tile (row = g*rows + i).
// P[r, j] = exp(scale * S[r, j] - lse[r]) on visible columns, 0 elsewhere (also when lse is -inf).
template <typename acc_t>
void probabilities_from_lse(const AttentionParams& p, const SeqSpan& s, int64_t q0, int64_t rows, int64_t group,
                            int64_t key0, int64_t cols, acc_t* scores, const acc_t* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    const ColumnRange c = visible_columns(p, s, q0 + i, key0, cols);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = g * rows + i;
      acc_t* row = scores + r * cols;
      if (lse[r] == -std::numeric_limits<acc_t>::infinity() || c.lo >= c.hi) {
        std::fill(row, row + cols, acc_t(0));
        continue;
      }
      cpu::exp_scaled_sum(row + c.lo, c.hi - c.lo, acc_t(p.scale), lse[r]);
      std::fill(row, row + c.lo, acc_t(0));
      std::fill(row + c.hi, row + cols, acc_t(0));
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_task(const AttentionParams& p, int64_t b, int64_t head_k, int64_t q0) {
  const SeqSpan s = seq_span(p, b);
  if (q0 >= s.q_len) return;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t rows = std::min(kQueryTile, s.q_len - q0);
  const int64_t m = group * rows;
  const int64_t dk = p.head_dim_qk, dv = p.head_dim_v;
  // Key ranges of the first and last row bound those of every row in between.
  const int64_t key_begin = p.mask.keys_for(s.query_offset + q0, s.k_len).begin;
  const int64_t key_end = p.mask.keys_for(s.query_offset + q0 + rows - 1, s.k_len).end;

  Scratch<acc_t> q_buf, k_buf, v_buf, s_buf, acc_buf;
  std::vector<acc_t> row_max(m, -std::numeric_limits<acc_t>::infinity()), row_sum(m, 0);
  at::Tensor q_tile = q_buf.view(m, dk);
  load_head_group<scalar_t, acc_t>(q_buf.data.data(), p.q, p.q_strides, s.batch, s.q_row_begin + q0, rows, head_k,
                                   group, dk);
  at::Tensor acc = acc_buf.view(m, dv);
  acc.zero_();

  for (int64_t key0 = key_begin; key0 < key_end; key0 += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, key_end - key0);
    at::Tensor k_tile = k_buf.view(cols, dk), v_tile = v_buf.view(cols, dv), scores = s_buf.view(m, cols);
    load_kv_tile<scalar_t, acc_t>(p, s, head_k, key0, cols, k_buf, v_buf);
    at::mm_out(scores, q_tile, k_tile.t());

    acc_t* sc = s_buf.data.data();
    acc_t* ac = acc_buf.data.data();
    for (int64_t i = 0; i < rows; ++i) {
      const ColumnRange c = visible_columns(p, s, q0 + i, key0, cols);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = g * rows + i;
        acc_t* row = sc + r * cols;
        if (c.lo >= c.hi) {
          std::fill(row, row + cols, acc_t(0));
          continue;
        }
        const acc_t tile_max = scaled_max(row + c.lo, c.hi - c.lo, acc_t(p.scale));
        const acc_t new_max = std::max(row_max[r], tile_max);
        const acc_t rescale = std::exp(row_max[r] - new_max);  // 0 when row_max is -inf
        const acc_t sum = cpu::exp_scaled_sum(row + c.lo, c.hi - c.lo, acc_t(p.scale), new_max);
        std::fill(row, row + c.lo, acc_t(0));
        std::fill(row + c.hi, row + cols, acc_t(0));
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = new_max;
        if (rescale != acc_t(1))
          for (int64_t d = 0; d < dv; ++d) ac[r * dv + d] *= rescale;
      }
    }
    acc.addmm_(scores, v_tile);
  }

  acc_t* ac = acc_buf.data.data();
  acc_t* lse = static_cast<acc_t*>(p.lse);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = head_k * group + g;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = g * rows + i;
      const bool seen = row_sum[r] > 0;
      const acc_t inv = seen ? acc_t(1) / row_sum[r] : acc_t(0);
      store_rows<scalar_t, acc_t>(p.o, p.o_strides, s.batch, s.q_row_begin + q0 + i, 1, head, dv, ac + r * dv, inv);
      lse[p.lse_strides.offset(s.batch, s.q_row_begin + q0 + i, head)] =
          seen ? row_max[r] + std::log(row_sum[r]) : -std::numeric_limits<acc_t>::infinity();
    }
  }
}

// Loads q, dout, lse and delta = rowsum(dout * out) - dlse of a stacked group tile.
template <typename scalar_t, typename acc_t>
struct GroupRows {
  Scratch<acc_t> q, dout, out;
  std::vector<acc_t> lse, delta;

  void load(const AttentionBwdParams& p, const SeqSpan& s, int64_t head_k, int64_t group, int64_t q0, int64_t rows) {
    const int64_t m = group * rows, dk = p.head_dim_qk, dv = p.head_dim_v;
    const int64_t row0 = s.q_row_begin + q0;
    q.reserve(m * dk);
    dout.reserve(m * dv);
    out.reserve(m * dv);
    load_head_group<scalar_t, acc_t>(q.data.data(), p.q, p.q_strides, s.batch, row0, rows, head_k, group, dk);
    load_head_group<scalar_t, acc_t>(dout.data.data(), p.dout, p.dout_strides, s.batch, row0, rows, head_k, group,
                                     dv);
    load_head_group<scalar_t, acc_t>(out.data.data(), p.o, p.o_strides, s.batch, row0, rows, head_k, group, dv);
    lse.assign(m, 0);
    delta.assign(m, 0);
    const acc_t* lse_in = static_cast<const acc_t*>(p.lse);
    const acc_t* dlse_in = static_cast<const acc_t*>(p.dlse);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = head_k * group + g;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = g * rows + i;
        lse[r] = lse_in[p.lse_strides.offset(s.batch, row0 + i, head)];
        acc_t dot = 0;
        for (int64_t d = 0; d < dv; ++d) dot += dout.data[r * dv + d] * out.data[r * dv + d];
        delta[r] = dot - (dlse_in ? dlse_in[p.dlse_strides.offset(s.batch, row0 + i, head)] : acc_t(0));
      }
    }
  }
};

// scores <- dS = P * (dP - delta), given P in `scores` and dP in `dprobs`.
template <typename acc_t>
void softmax_backward(acc_t* scores, const acc_t* dprobs, const std::vector<acc_t>& delta, int64_t m, int64_t cols) {
  for (int64_t r = 0; r < m; ++r) cpu::softmax_grad(scores + r * cols, dprobs + r * cols, cols, delta[r]);
}

template <typename scalar_t, typename acc_t>
void dq_task(const AttentionBwdParams& p, int64_t b, int64_t head_k, int64_t q0) {
  const SeqSpan s = seq_span(p, b);
  if (q0 >= s.q_len) return;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t rows = std::min(kQueryTile, s.q_len - q0);
  const int64_t m = group * rows, dk = p.head_dim_qk, dv = p.head_dim_v;
  const int64_t key_begin = p.mask.keys_for(s.query_offset + q0, s.k_len).begin;
  const int64_t key_end = p.mask.keys_for(s.query_offset + q0 + rows - 1, s.k_len).end;

  GroupRows<scalar_t, acc_t> g_rows;
  g_rows.load(p, s, head_k, group, q0, rows);
  Scratch<acc_t> k_buf, v_buf, s_buf, dp_buf, dq_buf;
  at::Tensor q_tile = g_rows.q.view(m, dk), dout_tile = g_rows.dout.view(m, dv);
  at::Tensor dq = dq_buf.view(m, dk);
  dq.zero_();
  for (int64_t key0 = key_begin; key0 < key_end; key0 += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, key_end - key0);
    at::Tensor k_tile = k_buf.view(cols, dk), v_tile = v_buf.view(cols, dv);
    at::Tensor scores = s_buf.view(m, cols), dprobs = dp_buf.view(m, cols);
    load_kv_tile<scalar_t, acc_t>(p, s, head_k, key0, cols, k_buf, v_buf);
    at::mm_out(scores, q_tile, k_tile.t());
    probabilities_from_lse(p, s, q0, rows, group, key0, cols, s_buf.data.data(), g_rows.lse.data());
    at::mm_out(dprobs, dout_tile, v_tile.t());
    softmax_backward(s_buf.data.data(), dp_buf.data.data(), g_rows.delta, m, cols);
    dq.addmm_(scores, k_tile);
  }
  for (int64_t g = 0; g < group; ++g)
    store_rows<scalar_t, acc_t>(p.dq, p.dq_strides, s.batch, s.q_row_begin + q0, rows, head_k * group + g, dk,
                                dq_buf.data.data() + g * rows * dk, acc_t(p.scale));
}

template <typename scalar_t, typename acc_t>
void dkv_task(const AttentionBwdParams& p, int64_t b, int64_t head_k, int64_t key0) {
  const SeqSpan s = seq_span(p, b);
  if (key0 >= s.k_len) return;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t cols = std::min(kKeyTile, s.k_len - key0);
  const int64_t dk = p.head_dim_qk, dv = p.head_dim_v;
  const QueryRange queries = queries_seeing(p.mask, key0, key0 + cols, s.query_offset, s.q_len, s.k_len);

  Scratch<acc_t> k_buf, v_buf, s_buf, dp_buf, dk_buf, dv_buf;
  at::Tensor k_tile = k_buf.view(cols, dk), v_tile = v_buf.view(cols, dv);
  load_kv_tile<scalar_t, acc_t>(p, s, head_k, key0, cols, k_buf, v_buf);
  at::Tensor dk_acc = dk_buf.view(cols, dk), dv_acc = dv_buf.view(cols, dv);
  dk_acc.zero_();
  dv_acc.zero_();
  GroupRows<scalar_t, acc_t> g_rows;
  for (int64_t q0 = queries.begin; q0 < queries.end; q0 += kQueryTile) {
    const int64_t rows = std::min(kQueryTile, queries.end - q0);
    const int64_t m = group * rows;
    g_rows.load(p, s, head_k, group, q0, rows);
    at::Tensor q_tile = g_rows.q.view(m, dk), dout_tile = g_rows.dout.view(m, dv);
    at::Tensor scores = s_buf.view(m, cols), dprobs = dp_buf.view(m, cols);
    at::mm_out(scores, q_tile, k_tile.t());
    probabilities_from_lse(p, s, q0, rows, group, key0, cols, s_buf.data.data(), g_rows.lse.data());
    dv_acc.addmm_(scores.t(), dout_tile);
    at::mm_out(dprobs, dout_tile, v_tile.t());
    softmax_backward(s_buf.data.data(), dp_buf.data.data(), g_rows.delta, m, cols);
    dk_acc.addmm_(scores.t(), q_tile);
  }
  store_rows<scalar_t, acc_t>(p.dk, p.dk_strides, s.batch, s.k_row_begin + key0, cols, head_k, dk,
                              dk_buf.data.data(), acc_t(p.scale));
  store_rows<scalar_t, acc_t>(p.dv, p.dv_strides, s.batch, s.k_row_begin + key0, cols, head_k, dv,
                              dv_buf.data.data(), acc_t(1));
}

}  // namespace

void dense_attention_fwd_cpu(const AttentionParams& params, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_dense_attention_fwd_cpu", [&] {
    using acc_t = cpu::accumulate_t<scalar_t>;
    cpu::parallel_tiles(params.num_seqs, params.num_heads_k, params.max_seqlen_q, kQueryTile,
                        [&](int64_t b, int64_t h, int64_t q0) { forward_task<scalar_t, acc_t>(params, b, h, q0); });
  });
}

void dense_attention_bwd_cpu(const AttentionBwdParams& params, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_dense_attention_bwd_cpu", [&] {
    using acc_t = cpu::accumulate_t<scalar_t>;
    cpu::parallel_tiles(params.num_seqs, params.num_heads_k, params.max_seqlen_q, kQueryTile,
                        [&](int64_t b, int64_t h, int64_t q0) { dq_task<scalar_t, acc_t>(params, b, h, q0); });
    cpu::parallel_tiles(params.num_seqs, params.num_heads_k, params.max_key_rows, kKeyTile,
                        [&](int64_t b, int64_t h, int64_t k0) { dkv_task<scalar_t, acc_t>(params, b, h, k0); });
  });
}

}  // namespace nsa
