#pragma once
// Parameters of the attention ops (the dense-tiled family, sliding window and compressed; selected
// blocks add SelectedBlocks): raw pointers and int64 element strides, filled once on the host and
// passed by value to CPU and CUDA kernels. Tensors are [batch, row, head, dim] (padded) or
// [row, head, dim] (packed; batch stride 0).
#include <cstdint>

#include "common/host_device.h"
#include "common/masks.h"

namespace nsa {

struct Strides {
  int64_t batch;
  int64_t row;
  int64_t head;
  NSA_HOST_DEVICE int64_t offset(int64_t b, int64_t r, int64_t h) const { return b * batch + r * row + h * head; }
};

struct AttentionParams {
  const void* q;   // [.., Hq, Dk]
  const void* k;   // [.., Hk, Dk]
  const void* v;   // [.., Hk, Dv]
  void* o;         // [.., Hq, Dv]
  void* lse;       // [.., Hq], float32 (float64 for float64 inputs)
  Strides q_strides, k_strides, v_strides, o_strides, lse_strides;

  int64_t num_seqs;
  int64_t num_heads_q;
  int64_t num_heads_k;
  int64_t head_dim_qk;
  int64_t head_dim_v;
  // Padded layout: every sequence has exactly max_seqlen_q queries, max_key_rows key rows and
  // key_positions original keys. Packed layout: these are upper bounds (they size the grid) and the
  // cu_seqlens arrays below give each sequence's own lengths.
  int64_t max_seqlen_q;
  int64_t max_key_rows;
  int64_t key_positions;
  const int32_t* cu_seqlens_q;         // [N+1] or null (padded)
  const int32_t* cu_seqlens_key_rows;  // [N+1] row offsets of k/v (compressed tokens for that branch)
  const int32_t* cu_seqlens_k;         // [N+1] original key lengths, which place the queries
  // Packed: the rows of q and of k / v, which seq_span holds every sequence to (device cu_seqlens are
  // not read by the host, so malformed ones must not take a kernel out of the tensors).
  int64_t q_rows;
  int64_t key_rows;

  double scale;  // cast to the accumulation type in kernels; float64 inputs keep it exact
  VisibilityMask mask;
};

struct AttentionBwdParams : AttentionParams {
  const void* dout;  // [.., Hq, Dv]
  const void* dlse;  // [.., Hq] or null
  void* dq;          // [.., Hq, Dk]
  void* dk;          // [.., Hk, Dk]
  void* dv;          // [.., Hk, Dv]
  Strides dout_strides, dlse_strides, dq_strides, dk_strides, dv_strides;
  // Scratch for the tiled CUDA backward: rowsum(dout * out) - dlse per (query row, head), float32,
  // laid out like lse (lse_strides). Null where the kernel does not need it.
  float* softmax_delta;
};

// Selected-block attention (spec section 4): which blocks of keys every (query, kv head) row attends to.
// (BlockSelection, in common/selection.h, is the configuration of select_blocks that produces them.)
struct SelectedBlocks {
  const int32_t* indices;  // [.., Hk, count] block ids; -1, out-of-range and future ids are ignored
  Strides strides;         // of the (query row, kv head) rows; the last dim is contiguous
  int64_t count;           // n: ids per row
  int64_t block;           // l': keys per block, block j covering keys [j*l', (j+1)*l')
};

// Where sequence b lives and how its queries line up with its keys.
struct SeqSpan {
  int64_t batch;        // batch index (0 in packed layout)
  int64_t q_row_begin;  // first query row
  int64_t q_len;
  int64_t k_row_begin;  // first key row
  int64_t k_len;        // key rows
  int64_t query_offset; // absolute position of query row 0: TK - TQ (bottom-right aligned)
};

NSA_HOST_DEVICE int64_t clamped(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

struct RowRange {
  int64_t begin, len;
};
// Where sequence b's rows [cu[b], cu[b+1]) lie, cut to rows [0, rows) and at most max_len long; well-formed
// offsets (what the host checks on the CPU) pass unchanged. Malformed ones get spans inside the tensor,
// possibly empty or overlapping: wrong results for wrong input, but no access outside it.
NSA_HOST_DEVICE RowRange packed_rows(const int32_t* cu, int64_t b, int64_t rows, int64_t max_len) {
  const int64_t begin = clamped(cu[b], 0, rows);
  const int64_t end = clamped(cu[b + 1], begin, begin + (max_len < rows - begin ? max_len : rows - begin));
  return {begin, end - begin};
}

NSA_HOST_DEVICE SeqSpan seq_span(const AttentionParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) {
    return {b, 0, p.max_seqlen_q, 0, p.max_key_rows, p.key_positions - p.max_seqlen_q};
  }
  const RowRange q = packed_rows(p.cu_seqlens_q, b, p.q_rows, p.max_seqlen_q);
  const RowRange k = packed_rows(p.cu_seqlens_key_rows, b, p.key_rows, p.max_key_rows);
  const int64_t positions = clamped(int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b], 0, p.key_positions);
  return {0, q.begin, q.len, k.begin, k.len, positions - q.len};
}

}  // namespace nsa
