// CPU kernels of selected-block attention (spec section 4).
//
// Forward: a task takes one (sequence, kv head) and a tile of consecutive queries. The union of the
// blocks these queries chose is visited in ascending block order; for each block, the rows of the
// queries that chose it (the G heads of the group stacked, so a block serves the whole group at
// once) go through one small product with K^T, an online-softmax update and one product with V.
// Consecutive queries share most of their blocks (the forced initial and local ones always), so a
// block is usually multiplied once for many queries, not once per query.
//
// Backward, two passes in which every output element is summed by one task in a fixed order, so
// the result is deterministic and independent of the thread count:
//   dq pass : per query tile as in the forward (it also stores delta = rowsum(dout * out) - dlse);
//   dkv pass: per (sequence, kv head, block), over the queries that chose the block in ascending
//             order, found through a reverse index (block -> queries) built by count / scan / fill.
//
// A row's blocks are the distinct ids in [0, ceil(TK / l')) whose first key is at or before the
// query's position; -1, out-of-range and future ids are skipped and a repeated id counts once, so no
// index value can make a kernel read outside k and v. Inside a block, the query sees keys up to its
// own position (the causal mask only bites in its own block) and never the keys past TK of a
// partial last block.
//
// Products run through the small GEMM of cpu/small_gemm.h, whose operands are strided matrices or
// tables of row pointers: a group of scattered queries is used in place, never copied. K^T (and V^T
// in the backward) are copied once per call into per-block fp32 (fp64) tiles; rows of q, k, v and
// dout are read straight from the inputs, or from one converted copy when the input dtype is not
// the accumulation type (bf16, fp16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common/selection.h"
#include "cpu/small_gemm.h"
#include "cpu/tiles.h"
#include "cpu/vec_math.h"
#include "kernels.h"

namespace nsa {
namespace {

using cpu::acc_scalar_type;
using cpu::row_max;
using cpu::scale_add;
using cpu::small_gemm;
using cpu::softmax_grad;

// Forward / dq tasks take a tile of up to kTileRows stacked rows (queries x G), at most
// kMaxTileQueries queries: the more queries, the more of them share each block they visit. Small
// problems get smaller tiles (down to kMinTileQueries) until there are kMinTasks tasks; this depends
// on the problem only, never on the thread count.
constexpr int64_t kTileRows = 1024;
constexpr int64_t kMaxTileQueries = 256;
constexpr int64_t kMinTileQueries = 16;
constexpr int64_t kMinTasks = 32;
constexpr int64_t kChunkRows = 256;       // stacked rows per product in the dkv pass, at most

// The blocks of ids[0 .. count) that a query at `position` sees, distinct and ascending, into `out`
// (room for count); returns how many.
int64_t visible_blocks(const int32_t* ids, int64_t count, int64_t num_blocks, int64_t block, int64_t position,
                       int32_t* out) {
  int64_t kept = 0;
  for (int64_t s = 0; s < count; ++s) {
    if (block_counts(ids[s], num_blocks, block, position)) out[kept++] = ids[s];
  }
  std::sort(out, out + kept);
  return std::unique(out, out + kept) - out;
}

// Runs fn(t) for t in [0, count), tasks handed out in order from a shared counter (dynamic load
// balancing). Which thread runs a task never changes what the task computes.
template <typename Fn>
void run_tasks(int64_t count, const Fn& fn) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < count; t = next++) fn(t);
  });
}

// Sequences and blocks of one call. Blocks are numbered globally, sequence after sequence; keys
// and queries of the sequences are numbered compactly (no padding rows) for the per-call buffers.
struct BlockLayout {
  int64_t block;
  std::vector<int64_t> first_block;  // [N + 1]: global number of each sequence's block 0
  std::vector<int64_t> key_base;     // [N]: compact number of each sequence's key 0
  std::vector<int64_t> query_base;   // [N]: compact number of each sequence's query 0
  std::vector<int64_t> seq_of_block;
  int64_t total_keys = 0;
  int64_t total_queries = 0;

  BlockLayout(const AttentionParams& p, int64_t block_size) : block(block_size), first_block{0} {
    for (int64_t b = 0; b < p.num_seqs; ++b) {
      const SeqSpan s = seq_span(p, b);
      key_base.push_back(total_keys);
      query_base.push_back(total_queries);
      total_keys += s.k_len;
      total_queries += s.q_len;
      first_block.push_back(first_block.back() + num_select_blocks(s.k_len, block));
      seq_of_block.resize(first_block.back(), b);
    }
  }
  int64_t num_blocks() const { return first_block.back(); }
  int64_t cols(const SeqSpan& s, int64_t j) const { return std::min(block, s.k_len - j * block); }
};

// A matrix operand of small_gemm: strided, or a table of row pointers.
template <typename acc_t>
using Operand = cpu::Matrix<acc_t>;

// Asks for rows [0, rows) x [0, cols) of an operand to be brought into cache (L2) ahead of use: the
// blocks a tile visits are scattered through memory, and a group's products are too short for the
// hardware prefetcher to hide the first misses.
template <typename acc_t>
void prefetch(const Operand<acc_t>& op, int64_t rows, int64_t cols) {
  constexpr int64_t kLine = 64 / sizeof(acc_t);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += kLine) __builtin_prefetch(op.row_ptr(r) + c, 0, 2);
}

// Per-block transposed copies of k or v in acc_t: block j of sequence b, kv head h, is a [dim x cols]
// matrix at (key_base[b] + j*l') * Hk * dim + h * cols * dim, the B operand of products with q (dout).
template <typename scalar_t, typename acc_t>
class TransposedBlocks {
 public:
  TransposedBlocks() = default;
  TransposedBlocks(const AttentionParams& p, const BlockLayout& layout, const void* src, const Strides& st,
                   int64_t dim)
      : dim_(dim), heads_k_(p.num_heads_k) {
    storage_ = at::empty({layout.total_keys * p.num_heads_k * dim}, at::TensorOptions().dtype(acc_scalar_type<acc_t>()));
    acc_t* dst = storage_.data_ptr<acc_t>();
    const scalar_t* base = static_cast<const scalar_t*>(src);
    at::parallel_for(0, layout.num_blocks(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t gb = begin; gb < end; ++gb) {
        const int64_t b = layout.seq_of_block[gb], j = gb - layout.first_block[b];
        const SeqSpan s = seq_span(p, b);
        const int64_t cols = layout.cols(s, j);
        for (int64_t h = 0; h < heads_k_; ++h) {
          acc_t* out = dst + offset(layout, b, j, h, cols);
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t* row = base + st.offset(s.batch, s.k_row_begin + j * layout.block + c, h);
            for (int64_t d = 0; d < dim; ++d) out[d * cols + c] = static_cast<acc_t>(row[d]);
          }
        }
      }
    });
  }

  Operand<acc_t> get(const BlockLayout& layout, int64_t b, int64_t j, int64_t h, int64_t cols) const {
    return Operand<acc_t>::strided(storage_.data_ptr<acc_t>() + offset(layout, b, j, h, cols), cols);
  }

 private:
  int64_t offset(const BlockLayout& layout, int64_t b, int64_t j, int64_t h, int64_t cols) const {
    return (layout.key_base[b] + j * layout.block) * heads_k_ * dim_ + h * cols * dim_;
  }
  at::Tensor storage_;
  int64_t dim_ = 0;
  int64_t heads_k_ = 0;
};

// The rows of one input (q, k, v or dout) in acc_t, by (sequence, row of the sequence, head):
// pointers straight into the input when its dtype is acc_t, else into a converted copy made once
// per call (rows compacted sequence after sequence). Key inputs follow the sequences' key rows,
// query inputs (q, dout) their query rows.
template <typename scalar_t, typename acc_t>
class InputRows {
 public:
  InputRows() = default;
  InputRows(const AttentionParams& p, const BlockLayout& layout, const void* src, const Strides& st, int64_t heads,
            int64_t dim, bool keys)
      : src_(static_cast<const scalar_t*>(src)), st_(st), keys_(keys) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      base_ = keys ? layout.key_base : layout.query_base;
      copy_st_ = {0, heads * dim, dim};
      const int64_t total = keys ? layout.total_keys : layout.total_queries;
      copy_ = at::empty({total * heads * dim}, at::TensorOptions().dtype(acc_scalar_type<acc_t>()));
      acc_t* dst = copy_.data_ptr<acc_t>();
      at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = std::upper_bound(base_.begin(), base_.end(), r) - base_.begin() - 1;
          const SeqSpan s = seq_span(p, b);
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* in = src_ + st_.offset(s.batch, first_row(s) + r - base_[b], h);
            for (int64_t d = 0; d < dim; ++d) dst[r * heads * dim + h * dim + d] = static_cast<acc_t>(in[d]);
          }
        }
      });
    }
  }

  // Row i of sequence b (span s), head h; consecutive rows of a sequence are row_stride() apart.
  const acc_t* row(const SeqSpan& s, int64_t b, int64_t i, int64_t h) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src_ + st_.offset(s.batch, first_row(s) + i, h);
    } else {
      return copy_.data_ptr<acc_t>() + (base_[b] + i) * copy_st_.row + h * copy_st_.head;
    }
  }
  int64_t row_stride() const { return std::is_same_v<scalar_t, acc_t> ? st_.row : copy_st_.row; }
  // The block of keys [j*l', j*l' + cols) of head h as a [cols x dim] operand.
  Operand<acc_t> block(const BlockLayout& layout, const SeqSpan& s, int64_t b, int64_t j, int64_t h) const {
    return Operand<acc_t>::strided(row(s, b, j * layout.block, h), row_stride());
  }

 private:
  int64_t first_row(const SeqSpan& s) const { return keys_ ? s.k_row_begin : s.q_row_begin; }
  const scalar_t* src_ = nullptr;
  Strides st_{};
  bool keys_ = true;
  std::vector<int64_t> base_;
  Strides copy_st_{};
  at::Tensor copy_;
};

// dst[(i*G + g) * dim + d] = factor * src(row0 + i, head_k*G + g)[d]: a kv group's G heads stacked per query.
template <typename scalar_t, typename acc_t>
void load_stacked(acc_t* dst, const void* base, const Strides& st, int64_t batch, int64_t row0, int64_t rows,
                  int64_t head_k, int64_t group, int64_t dim, acc_t factor) {
  const scalar_t* src = static_cast<const scalar_t*>(base);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t g = 0; g < group; ++g) {
      const scalar_t* row = src + st.offset(batch, row0 + i, head_k * group + g);
      acc_t* out = dst + (i * group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] = factor * static_cast<acc_t>(row[d]);
    }
}

template <typename scalar_t, typename acc_t>
void store_stacked(void* base, const Strides& st, int64_t batch, int64_t row0, int64_t rows, int64_t head_k,
                   int64_t group, int64_t dim, const acc_t* src, acc_t factor) {
  scalar_t* dst = static_cast<scalar_t*>(base);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t g = 0; g < group; ++g) {
      scalar_t* row = dst + st.offset(batch, row0 + i, head_k * group + g);
      const acc_t* in = src + (i * group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<scalar_t>(factor * in[d]);
    }
}

// The blocks chosen by a tile of queries: groups, one per block in ascending order, each listing
// the tile's queries that chose it in ascending order.
class TileBlocks {
 public:
  void build(const SelectedBlocks& sel, const SeqSpan& s, int64_t head_k, int64_t q0, int64_t rows,
             int64_t num_blocks) {
    pairs_.clear();
    ids_.resize(sel.count);
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t* row = sel.indices + sel.strides.offset(s.batch, s.q_row_begin + q0 + i, head_k);
      const int64_t n = visible_blocks(row, sel.count, num_blocks, sel.block, s.query_offset + q0 + i, ids_.data());
      for (int64_t u = 0; u < n; ++u) pairs_.push_back((uint64_t(ids_[u]) << 32) | uint64_t(i));
    }
    std::sort(pairs_.begin(), pairs_.end());
    starts_.clear();
    for (size_t x = 0; x < pairs_.size(); ++x)
      if (x == 0 || (pairs_[x] >> 32) != (pairs_[x - 1] >> 32)) starts_.push_back(static_cast<int64_t>(x));
    starts_.push_back(static_cast<int64_t>(pairs_.size()));
    queries_.resize(pairs_.size());
    for (size_t x = 0; x < pairs_.size(); ++x) queries_[x] = static_cast<int32_t>(pairs_[x] & 0xffffffffu);
  }
  int64_t groups() const { return static_cast<int64_t>(starts_.size()) - 1; }
  int64_t block(int64_t group) const { return static_cast<int64_t>(pairs_[starts_[group]] >> 32); }
  int64_t size(int64_t group) const { return starts_[group + 1] - starts_[group]; }
  const int32_t* queries(int64_t group) const { return queries_.data() + starts_[group]; }

 private:
  std::vector<int32_t> ids_;
  std::vector<uint64_t> pairs_;
  std::vector<int64_t> starts_;
  std::vector<int32_t> queries_;
};

// One block's share of a task: the queries that chose it (ascending and distinct, numbered from
// the task's query `first`) and how many of the block's keys each one sees (keys up to its own
// position, never past the end of the sequence).
struct BlockQueries {
  int64_t block = 0, start = 0, cols = 0, count = 0;
  const int32_t* queries = nullptr;
  std::vector<int64_t> visible;

  void set(const BlockLayout& layout, const SeqSpan& s, int64_t j, const int32_t* chosen, int64_t n, int64_t first) {
    block = j;
    start = j * layout.block;
    cols = layout.cols(s, j);
    queries = chosen;
    count = n;
    visible.resize(n);
    for (int64_t u = 0; u < n; ++u) visible[u] = std::min(cols, s.query_offset + first + chosen[u] - start + 1);
  }
  // Columns of the block's products: the last query sees the most keys.
  int64_t keys() const { return visible[count - 1]; }
  bool consecutive() const { return queries[count - 1] - queries[0] == count - 1; }
};

// The block's queries' values in `rows` (group_dim per query: their G stacked rows), one query after
// the other: a view into `rows` when the queries are consecutive, else a copy in `buffer`.
template <typename acc_t>
const acc_t* gather_queries(const acc_t* rows, const BlockQueries& bq, int64_t group_dim, std::vector<acc_t>& buffer) {
  if (bq.consecutive()) return rows + bq.queries[0] * group_dim;
  buffer.resize(bq.count * group_dim);
  for (int64_t u = 0; u < bq.count; ++u)
    std::memcpy(buffer.data() + u * group_dim, rows + bq.queries[u] * group_dim, group_dim * sizeof(acc_t));
  return buffer.data();
}

// The G rows of each of the block's queries, stacked (row u*G + g: row_of(queries[u], g)), as a
// gathered matrix operand: no copy, the row pointers kept in `pointers`.
template <typename acc_t, typename RowOf>
cpu::Matrix<acc_t> query_rows(const BlockQueries& bq, int64_t group, std::vector<const acc_t*>& pointers,
                              const RowOf& row_of) {
  pointers.resize(bq.count * group);
  for (int64_t u = 0; u < bq.count; ++u)
    for (int64_t g = 0; g < group; ++g) pointers[u * group + g] = row_of(bq.queries[u], g);
  return cpu::Matrix<acc_t>::gathered(pointers.data());
}

// Row i*G + g of a stacked tile (`dim` values per row).
template <typename acc_t>
auto tile_rows(const std::vector<acc_t>& tile, int64_t group, int64_t dim) {
  return [&tile, group, dim](int64_t i, int64_t g) { return tile.data() + (i * group + g) * dim; };
}

// P = exp(scale * S - lse) on the visible keys of each row, 0 elsewhere (also on rows whose lse is -inf).
template <typename acc_t>
void probabilities(acc_t* scores, int64_t cols, const acc_t* lse, int64_t group, int64_t count,
                   const int64_t* visible, acc_t scale) {
  for (int64_t u = 0; u < count; ++u)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = u * group + g;
      acc_t* row = scores + r * cols;
      const bool live = lse[r] != -std::numeric_limits<acc_t>::infinity();
      const int64_t vis = live ? visible[u] : 0;
      if (vis > 0) cpu::exp_scaled_sum(row, vis, scale, lse[r]);
      std::fill(row + vis, row + cols, acc_t(0));
    }
}

// Calls visit(bq, next) for every block the queries [q0, q0 + rows) of sequence s chose for kv head
// head_k, in ascending block order; next is the block visited after this one (-1 for none), for
// prefetching.
template <typename Visit>
void for_each_tile_block(const SelectedBlocks& sel, const BlockLayout& layout, const SeqSpan& s, int64_t head_k,
                         int64_t q0, int64_t rows, const Visit& visit) {
  TileBlocks blocks;
  blocks.build(sel, s, head_k, q0, rows, num_select_blocks(s.k_len, layout.block));
  BlockQueries bq;
  for (int64_t grp = 0; grp < blocks.groups(); ++grp) {
    bq.set(layout, s, blocks.block(grp), blocks.queries(grp), blocks.size(grp), q0);
    visit(static_cast<const BlockQueries&>(bq), grp + 1 < blocks.groups() ? blocks.block(grp + 1) : int64_t(-1));
  }
}

// Everything a call shares across its tasks.
template <typename scalar_t, typename acc_t>
struct Selection {
  const AttentionParams& p;
  const SelectedBlocks& sel;
  BlockLayout layout;
  int64_t group, dk, dv, tile_queries;
  TransposedBlocks<scalar_t, acc_t> k_t, v_t;  // K^T, V^T per block
  InputRows<scalar_t, acc_t> k_rows, v_rows;

  Selection(const AttentionParams& params, const SelectedBlocks& selection)
      : p(params),
        sel(selection),
        layout(params, selection.block),
        group(params.num_heads_q / params.num_heads_k),
        dk(params.head_dim_qk),
        dv(params.head_dim_v),
        tile_queries(std::clamp<int64_t>(kTileRows / group, 1, kMaxTileQueries)) {
    while (tile_queries > kMinTileQueries && tile_tasks() < kMinTasks) tile_queries /= 2;
  }

  // The operands of block j that the forward (K^T, V) or the dq pass (K^T, V^T, K) reads.
  void prefetch_forward(const SeqSpan& s, int64_t b, int64_t head_k, int64_t j) const {
    const int64_t cols = layout.cols(s, j);
    prefetch(k_t.get(layout, b, j, head_k, cols), dk, cols);
    prefetch(v_rows.block(layout, s, b, j, head_k), cols, dv);
  }
  void prefetch_backward(const SeqSpan& s, int64_t b, int64_t head_k, int64_t j) const {
    const int64_t cols = layout.cols(s, j);
    prefetch(k_t.get(layout, b, j, head_k, cols), dk, cols);
    prefetch(v_t.get(layout, b, j, head_k, cols), dv, cols);
    prefetch(k_rows.block(layout, s, b, j, head_k), cols, dk);
  }

  int64_t tiles() const { return (p.max_seqlen_q + tile_queries - 1) / tile_queries; }
  int64_t tile_tasks() const { return p.num_seqs * p.num_heads_k * tiles(); }
  // Task t of the forward / dq pass: (sequence, kv head, first query of the tile).
  void tile_task(int64_t t, int64_t& b, int64_t& head_k, int64_t& q0) const {
    b = t / (p.num_heads_k * tiles());
    head_k = (t / tiles()) % p.num_heads_k;
    q0 = (t % tiles()) * tile_queries;
  }
};

template <typename scalar_t, typename acc_t>
void forward_tile(const Selection<scalar_t, acc_t>& c, int64_t b, int64_t head_k, int64_t q0) {
  const AttentionParams& p = c.p;
  const SeqSpan s = seq_span(p, b);
  if (q0 >= s.q_len) return;
  const int64_t G = c.group, dk = c.dk, dv = c.dv;
  const int64_t rows = std::min(c.tile_queries, s.q_len - q0), tile_m = rows * G;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  std::vector<acc_t> q_tile(tile_m * dk), acc(tile_m * dv, 0), run_max(tile_m, kNegInf), run_sum(tile_m, 0);
  load_stacked<scalar_t, acc_t>(q_tile.data(), p.q, p.q_strides, s.batch, s.q_row_begin + q0, rows, head_k, G, dk,
                                acc_t(p.scale));
  std::vector<acc_t> scores, out_tmp, rescale;
  std::vector<const acc_t*> q_ptrs;
  for_each_tile_block(c.sel, c.layout, s, head_k, q0, rows, [&](const BlockQueries& bq, int64_t next) {
    const int64_t j = bq.block, m = bq.count * G, n = bq.keys();
    const auto q_rows = query_rows(bq, G, q_ptrs, tile_rows(q_tile, G, dk));
    if (next >= 0) c.prefetch_forward(s, b, head_k, next);

    scores.resize(m * n);
    small_gemm(m, n, dk, q_rows, c.k_t.get(c.layout, b, j, head_k, bq.cols), scores.data(), n, false);
    rescale.resize(m);
    for (int64_t u = 0; u < bq.count; ++u)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = u * G + g, R = bq.queries[u] * G + g;
        acc_t* row = scores.data() + r * n;
        const acc_t new_max = std::max(run_max[R], row_max(row, bq.visible[u]));
        rescale[r] = std::exp(run_max[R] - new_max);  // 0 while the row has seen nothing
        run_sum[R] = run_sum[R] * rescale[r] + cpu::exp_scaled_sum(row, bq.visible[u], acc_t(1), new_max);
        run_max[R] = new_max;
        std::fill(row + bq.visible[u], row + n, acc_t(0));
      }
    out_tmp.resize(m * dv);
    small_gemm(m, dv, n, Operand<acc_t>::strided(scores.data(), n), c.v_rows.block(c.layout, s, b, j, head_k),
               out_tmp.data(), dv, false);
    for (int64_t r = 0; r < m; ++r)
      scale_add(acc.data() + (bq.queries[r / G] * G + r % G) * dv, rescale[r], out_tmp.data() + r * dv, dv);
  });

  acc_t* lse = static_cast<acc_t*>(p.lse);
  for (int64_t R = 0; R < tile_m; ++R) {
    const bool seen = run_sum[R] > 0;
    const acc_t inv = seen ? acc_t(1) / run_sum[R] : acc_t(0);
    for (int64_t d = 0; d < dv; ++d) acc[R * dv + d] *= inv;
    lse[p.lse_strides.offset(s.batch, s.q_row_begin + q0 + R / G, head_k * G + R % G)] =
        seen ? run_max[R] + std::log(run_sum[R]) : kNegInf;
  }
  store_stacked<scalar_t, acc_t>(p.o, p.o_strides, s.batch, s.q_row_begin + q0, rows, head_k, G, dv, acc.data(),
                                 acc_t(1));
}

// For every (sequence, kv head, block): the queries of the sequence that chose the block, ascending.
class ReverseIndex {
 public:
  ReverseIndex(const AttentionParams& p, const SelectedBlocks& sel, const BlockLayout& layout) : heads_k_(p.num_heads_k) {
    offsets_.resize(heads_k_ * (layout.num_blocks() + p.num_seqs));
    queries_.resize(heads_k_ * sel.count * layout.total_queries);
    run_tasks(p.num_seqs * heads_k_, [&](int64_t t) {
      const int64_t b = t / heads_k_, head_k = t % heads_k_;
      const SeqSpan s = seq_span(p, b);
      const int64_t num_blocks = num_select_blocks(s.k_len, sel.block);
      int64_t* offsets = offsets_.data() + offsets_base(layout, b, head_k);
      int32_t* queries = queries_.data() + queries_base(layout, sel, s, b, head_k);
      std::vector<int32_t> ids(sel.count);
      auto for_each_choice = [&](auto&& visit) {
        for (int64_t i = 0; i < s.q_len; ++i) {
          const int32_t* row = sel.indices + sel.strides.offset(s.batch, s.q_row_begin + i, head_k);
          const int64_t n = visible_blocks(row, sel.count, num_blocks, sel.block, s.query_offset + i, ids.data());
          for (int64_t u = 0; u < n; ++u) visit(ids[u], i);
        }
      };
      std::fill(offsets, offsets + num_blocks + 1, 0);
      for_each_choice([&](int64_t j, int64_t) { ++offsets[j + 1]; });
      std::partial_sum(offsets, offsets + num_blocks + 1, offsets);
      std::vector<int64_t> cursor(offsets, offsets + num_blocks);
      for_each_choice([&](int64_t j, int64_t i) { queries[cursor[j]++] = static_cast<int32_t>(i); });
    });
  }

  // Queries [0, count) of block j of sequence b, kv head head_k.
  const int32_t* queries(const BlockLayout& layout, const SelectedBlocks& sel, const SeqSpan& s, int64_t b,
                         int64_t head_k, int64_t j, int64_t& count) const {
    const int64_t* offsets = offsets_.data() + offsets_base(layout, b, head_k);
    count = offsets[j + 1] - offsets[j];
    return queries_.data() + queries_base(layout, sel, s, b, head_k) + offsets[j];
  }

 private:
  int64_t offsets_base(const BlockLayout& layout, int64_t b, int64_t head_k) const {
    const int64_t num_blocks = layout.first_block[b + 1] - layout.first_block[b];
    return heads_k_ * (layout.first_block[b] + b) + head_k * (num_blocks + 1);
  }
  int64_t queries_base(const BlockLayout& layout, const SelectedBlocks& sel, const SeqSpan& s, int64_t b,
                       int64_t head_k) const {
    return (heads_k_ * layout.query_base[b] + head_k * s.q_len) * sel.count;
  }
  int64_t heads_k_;
  std::vector<int64_t> offsets_;
  std::vector<int32_t> queries_;
};

// Backward state beyond Selection: the rows of q and dout for the dkv pass, and per (kv head,
// query) the lse and delta = rowsum(dout * out) - dlse of the G heads, stacked: the dq pass writes
// them (it loads them anyway), the dkv pass gathers them.
template <typename scalar_t, typename acc_t>
struct SelectionBackward : Selection<scalar_t, acc_t> {
  const AttentionBwdParams& bp;
  InputRows<scalar_t, acc_t> q_rows, do_rows;
  std::vector<acc_t> lse_stacked, delta_stacked;

  SelectionBackward(const AttentionBwdParams& params, const SelectedBlocks& selection)
      : Selection<scalar_t, acc_t>(params, selection),
        bp(params),
        lse_stacked(this->layout.total_queries * params.num_heads_q),
        delta_stacked(this->layout.total_queries * params.num_heads_q) {}

  // Stacked position of (sequence b, query i, kv head head_k), head 0 of the group.
  int64_t stacked_row(int64_t b, int64_t head_k, int64_t i) const {
    return ((head_k * this->layout.total_queries) + this->layout.query_base[b] + i) * this->group;
  }
};

template <typename scalar_t, typename acc_t>
void dq_tile(SelectionBackward<scalar_t, acc_t>& c, int64_t b, int64_t head_k, int64_t q0) {
  const AttentionBwdParams& p = c.bp;
  const SeqSpan s = seq_span(p, b);
  if (q0 >= s.q_len) return;
  const int64_t G = c.group, dk = c.dk, dv = c.dv;
  const int64_t rows = std::min(c.tile_queries, s.q_len - q0), tile_m = rows * G;
  const int64_t row0 = s.q_row_begin + q0;

  std::vector<acc_t> q_tile(tile_m * dk), do_tile(tile_m * dv), o_tile(tile_m * dv), dq_acc(tile_m * dk, 0);
  std::vector<acc_t> lse(tile_m), delta(tile_m);
  load_stacked<scalar_t, acc_t>(q_tile.data(), p.q, p.q_strides, s.batch, row0, rows, head_k, G, dk, acc_t(p.scale));
  load_stacked<scalar_t, acc_t>(do_tile.data(), p.dout, p.dout_strides, s.batch, row0, rows, head_k, G, dv, acc_t(1));
  load_stacked<scalar_t, acc_t>(o_tile.data(), p.o, p.o_strides, s.batch, row0, rows, head_k, G, dv, acc_t(1));
  const acc_t* lse_in = static_cast<const acc_t*>(p.lse);
  const acc_t* dlse_in = static_cast<const acc_t*>(p.dlse);
  for (int64_t R = 0; R < tile_m; ++R) {
    const int64_t i = R / G, head = head_k * G + R % G;
    lse[R] = lse_in[p.lse_strides.offset(s.batch, row0 + i, head)];
    acc_t dot = 0;
    for (int64_t d = 0; d < dv; ++d) dot += do_tile[R * dv + d] * o_tile[R * dv + d];
    delta[R] = dot - (dlse_in ? dlse_in[p.dlse_strides.offset(s.batch, row0 + i, head)] : acc_t(0));
  }
  std::copy(lse.begin(), lse.end(), c.lse_stacked.begin() + c.stacked_row(b, head_k, q0));
  std::copy(delta.begin(), delta.end(), c.delta_stacked.begin() + c.stacked_row(b, head_k, q0));

  std::vector<acc_t> lse_buf, scores, dprobs, dq_tmp;
  std::vector<const acc_t*> q_ptrs, do_ptrs;
  for_each_tile_block(c.sel, c.layout, s, head_k, q0, rows, [&](const BlockQueries& bq, int64_t next) {
    const int64_t j = bq.block, m = bq.count * G, n = bq.keys();
    const auto q_rows = query_rows(bq, G, q_ptrs, tile_rows(q_tile, G, dk));
    const auto do_rows = query_rows(bq, G, do_ptrs, tile_rows(do_tile, G, dv));
    const acc_t* lse_rows = gather_queries(lse.data(), bq, G, lse_buf);
    if (next >= 0) c.prefetch_backward(s, b, head_k, next);

    scores.resize(m * n);
    dprobs.resize(m * n);
    small_gemm(m, n, dk, q_rows, c.k_t.get(c.layout, b, j, head_k, bq.cols), scores.data(), n, false);
    probabilities(scores.data(), n, lse_rows, G, bq.count, bq.visible.data(), acc_t(1));  // q is scaled
    small_gemm(m, n, dv, do_rows, c.v_t.get(c.layout, b, j, head_k, bq.cols), dprobs.data(), n, false);
    for (int64_t r = 0; r < m; ++r)
      softmax_grad(scores.data() + r * n, dprobs.data() + r * n, n, delta[bq.queries[r / G] * G + r % G]);
    dq_tmp.resize(m * dk);
    small_gemm(m, dk, n, Operand<acc_t>::strided(scores.data(), n), c.k_rows.block(c.layout, s, b, j, head_k),
               dq_tmp.data(), dk, false);
    for (int64_t r = 0; r < m; ++r)
      scale_add(dq_acc.data() + (bq.queries[r / G] * G + r % G) * dk, acc_t(1), dq_tmp.data() + r * dk, dk);
  });
  store_stacked<scalar_t, acc_t>(p.dq, p.dq_strides, s.batch, row0, rows, head_k, G, dk, dq_acc.data(),
                                 acc_t(p.scale));
}

template <typename scalar_t, typename acc_t>
void dkv_block(SelectionBackward<scalar_t, acc_t>& c, const ReverseIndex& reverse, int64_t head_k, int64_t gb) {
  const AttentionBwdParams& p = c.bp;
  const int64_t b = c.layout.seq_of_block[gb], j = gb - c.layout.first_block[b];
  const SeqSpan s = seq_span(p, b);
  int64_t total = 0;
  const int32_t* chosen_by = reverse.queries(c.layout, c.sel, s, b, head_k, j, total);
  if (total == 0) return;
  const int64_t G = c.group, dk = c.dk, dv = c.dv;
  const int64_t chunk = std::max<int64_t>(1, kChunkRows / G);
  BlockQueries bq;
  bq.set(c.layout, s, j, chosen_by, 0, 0);
  const int64_t start = bq.start, cols = bq.cols;
  const Operand<acc_t> kt = c.k_t.get(c.layout, b, j, head_k, cols);
  const Operand<acc_t> vt = c.v_t.get(c.layout, b, j, head_k, cols);
  // lse and delta of the sequence's queries for this kv head (query i at i * G); their q and dout rows.
  const acc_t* lse_all = c.lse_stacked.data() + c.stacked_row(b, head_k, 0);
  const acc_t* delta_all = c.delta_stacked.data() + c.stacked_row(b, head_k, 0);
  const auto q_of = [&](int64_t i, int64_t g) { return c.q_rows.row(s, b, i, head_k * G + g); };
  const auto do_of = [&](int64_t i, int64_t g) { return c.do_rows.row(s, b, i, head_k * G + g); };

  std::vector<acc_t> dk_acc(cols * dk, 0), dv_acc(cols * dv, 0);
  std::vector<acc_t> lse_buf, delta_buf, scores, dprobs;
  std::vector<const acc_t*> q_ptrs, do_ptrs;
  for (int64_t u0 = 0; u0 < total; u0 += chunk) {
    bq.set(c.layout, s, j, chosen_by + u0, std::min(chunk, total - u0), 0);
    const int64_t m = bq.count * G, n = bq.keys();
    // The next chunk's rows are scattered through q and dout: ask for them early.
    for (int64_t u = u0 + chunk; u < std::min(total, u0 + 2 * chunk); ++u)
      for (int64_t g = 0; g < G; ++g) {
        prefetch(Operand<acc_t>::strided(q_of(chosen_by[u], g), dk), 1, dk);
        prefetch(Operand<acc_t>::strided(do_of(chosen_by[u], g), dv), 1, dv);
      }
    const auto q_rows = query_rows(bq, G, q_ptrs, q_of);
    const auto do_rows = query_rows(bq, G, do_ptrs, do_of);
    const acc_t* lse = gather_queries(lse_all, bq, G, lse_buf);
    const acc_t* delta = gather_queries(delta_all, bq, G, delta_buf);
    scores.resize(m * n);
    dprobs.resize(m * n);
    small_gemm(m, n, dk, q_rows, kt, scores.data(), n, false);
    probabilities(scores.data(), n, lse, G, bq.count, bq.visible.data(), acc_t(p.scale));
    // dV += P^T dO and, below, dK += dS^T q (scaled when stored): A is P (dS) read transposed.
    const auto scores_t = Operand<acc_t>::strided(scores.data(), 1, n);
    small_gemm(n, dv, m, scores_t, do_rows, dv_acc.data(), dv, true);
    small_gemm(m, n, dv, do_rows, vt, dprobs.data(), n, false);
    for (int64_t r = 0; r < m; ++r) softmax_grad(scores.data() + r * n, dprobs.data() + r * n, n, delta[r]);
    small_gemm(n, dk, m, scores_t, q_rows, dk_acc.data(), dk, true);
  }
  scalar_t* dk_out = static_cast<scalar_t*>(p.dk);
  scalar_t* dv_out = static_cast<scalar_t*>(p.dv);
  for (int64_t x = 0; x < cols; ++x) {
    const int64_t row = s.k_row_begin + start + x;
    scalar_t* dk_row = dk_out + p.dk_strides.offset(s.batch, row, head_k);
    scalar_t* dv_row = dv_out + p.dv_strides.offset(s.batch, row, head_k);
    for (int64_t d = 0; d < dk; ++d) dk_row[d] = static_cast<scalar_t>(acc_t(p.scale) * dk_acc[x * dk + d]);
    for (int64_t d = 0; d < dv; ++d) dv_row[d] = static_cast<scalar_t>(dv_acc[x * dv + d]);
  }
}

template <typename scalar_t, typename acc_t>
void forward(const AttentionParams& p, const SelectedBlocks& sel) {
  Selection<scalar_t, acc_t> c(p, sel);
  c.k_t = TransposedBlocks<scalar_t, acc_t>(p, c.layout, p.k, p.k_strides, c.dk);
  c.v_rows = InputRows<scalar_t, acc_t>(p, c.layout, p.v, p.v_strides, p.num_heads_k, c.dv, true);
  run_tasks(c.tile_tasks(), [&](int64_t t) {
    int64_t b, head_k, q0;
    c.tile_task(t, b, head_k, q0);
    forward_tile(c, b, head_k, q0);
  });
}

template <typename scalar_t, typename acc_t>
void backward(const AttentionBwdParams& p, const SelectedBlocks& sel) {
  SelectionBackward<scalar_t, acc_t> c(p, sel);
  c.k_t = TransposedBlocks<scalar_t, acc_t>(p, c.layout, p.k, p.k_strides, c.dk);
  c.v_t = TransposedBlocks<scalar_t, acc_t>(p, c.layout, p.v, p.v_strides, c.dv);
  c.k_rows = InputRows<scalar_t, acc_t>(p, c.layout, p.k, p.k_strides, p.num_heads_k, c.dk, true);
  c.q_rows = InputRows<scalar_t, acc_t>(p, c.layout, p.q, p.q_strides, p.num_heads_q, c.dk, false);
  c.do_rows = InputRows<scalar_t, acc_t>(p, c.layout, p.dout, p.dout_strides, p.num_heads_q, c.dv, false);
  const ReverseIndex reverse(p, sel, c.layout);

  run_tasks(c.tile_tasks(), [&](int64_t t) {
    int64_t b, head_k, q0;
    c.tile_task(t, b, head_k, q0);
    dq_tile(c, b, head_k, q0);
  });

  // Blocks with the most queries first, so that no long task starts last.
  std::vector<int64_t> order, work;
  for (int64_t head_k = 0; head_k < p.num_heads_k; ++head_k)
    for (int64_t gb = 0; gb < c.layout.num_blocks(); ++gb) {
      const int64_t b = c.layout.seq_of_block[gb];
      int64_t count = 0;
      reverse.queries(c.layout, sel, seq_span(p, b), b, head_k, gb - c.layout.first_block[b], count);
      if (count == 0) continue;
      order.push_back(head_k * c.layout.num_blocks() + gb);
      work.push_back(count);
    }
  std::vector<int64_t> rank(order.size());
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(), [&](int64_t x, int64_t y) { return work[x] > work[y]; });
  run_tasks(static_cast<int64_t>(rank.size()), [&](int64_t t) {
    const int64_t task = order[rank[t]];
    dkv_block(c, reverse, task / c.layout.num_blocks(), task % c.layout.num_blocks());
  });
}

}  // namespace

void selection_attention_fwd_cpu(const AttentionParams& params, const SelectedBlocks& selection,
                                 at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_selection_attention_fwd_cpu", [&] {
    using acc_t = cpu::accumulate_t<scalar_t>;
    forward<scalar_t, acc_t>(params, selection);
  });
}

void selection_attention_bwd_cpu(const AttentionBwdParams& params, const SelectedBlocks& selection,
                                 at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_selection_attention_bwd_cpu", [&] {
    using acc_t = cpu::accumulate_t<scalar_t>;
    backward<scalar_t, acc_t>(params, selection);
  });
}

}  // namespace nsa
