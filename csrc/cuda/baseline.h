#pragma once
// The baseline CUDA kernels' building blocks, shared by every attention family (dense_attention.cu,
// selection_attention.cu): one warp per (query row, head) in the forward and dq passes, one warp per
// (key row, kv head) in the dk/dv pass, fp32 (fp64) accumulation in shared memory. Exact and
// deterministic, no tensor cores: they serve fp32 / fp64, head dims without a tiled kernel and
// unaligned rows. The families differ in which keys a query row sees and which queries a key row
// serves, a policy type:
//   KeySet::Params, BwdParams: the forward's and the backward's parameter structs;
//   KeySet::for_each_key(p, s, row, kv_head, visit(key))                     (forward, dq)
//   QuerySet::for_each_query(p, seq, s, key, kv_head, visit(row)), rows ascending (dk, dv)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/attention_params.h"
#include "cuda/runtime.h"

namespace nsa {
namespace baseline {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_dot(const scalar_t* a, const scalar_t* b, int64_t dim, int lane) {
  acc_t sum = 0;
  for (int64_t d = lane; d < dim; d += 32) sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return warp_sum(sum);
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Decodes blockIdx.x into (sequence, first row of this warp) over rows_per_seq rows per sequence.
struct WarpRow {
  int64_t seq;
  int64_t row;
};

__device__ __forceinline__ WarpRow warp_row(int64_t rows_per_seq) {
  const int64_t blocks_per_seq = (rows_per_seq + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t seq = blockIdx.x / blocks_per_seq;
  const int64_t row = (blockIdx.x % blocks_per_seq) * kWarpsPerBlock + threadIdx.x / 32;
  return {seq, row};
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_of(const void* base, const Strides& st, int64_t batch, int64_t row,
                                                  int64_t head) {
  return static_cast<const scalar_t*>(base) + st.offset(batch, row, head);
}

// Online softmax of one (query row, head) over keys fed one at a time; O accumulates in `acc`
// (head_dim_v values of shared memory owned by the warp).
template <typename scalar_t, typename acc_t>
struct SoftmaxRow {
  const AttentionParams& p;
  const SeqSpan& s;
  const scalar_t* q;
  int64_t kv_head;
  acc_t* acc;
  int lane;
  acc_t row_max = -INFINITY;
  acc_t row_sum = 0;

  __device__ SoftmaxRow(const AttentionParams& params, const SeqSpan& span, int64_t row, int64_t head,
                        acc_t* accumulators, int lane_id)
      : p(params), s(span), q(row_of<scalar_t>(params.q, params.q_strides, span.batch, span.q_row_begin + row, head)),
        kv_head(head / (params.num_heads_q / params.num_heads_k)), acc(accumulators), lane(lane_id) {
    for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] = 0;
  }
  __device__ void add(int64_t key) {
    const scalar_t* k = row_of<scalar_t>(p.k, p.k_strides, s.batch, s.k_row_begin + key, kv_head);
    const scalar_t* v = row_of<scalar_t>(p.v, p.v_strides, s.batch, s.k_row_begin + key, kv_head);
    const acc_t score = row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale);
    const acc_t new_max = score > row_max ? score : row_max;
    const acc_t rescale = fast_exp(row_max - new_max);
    const acc_t prob = fast_exp(score - new_max);
    row_sum = row_sum * rescale + prob;
    row_max = new_max;
    for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] = acc[d] * rescale + prob * static_cast<acc_t>(v[d]);
  }
  // o = acc / sum and lse; a row that saw no key gets o = 0, lse = -inf.
  __device__ void store(int64_t row, int64_t head) const {
    const bool seen = row_sum > 0;
    scalar_t* o = static_cast<scalar_t*>(p.o) + p.o_strides.offset(s.batch, s.q_row_begin + row, head);
    for (int64_t d = lane; d < p.head_dim_v; d += 32) o[d] = static_cast<scalar_t>(seen ? acc[d] / row_sum : acc_t(0));
    if (lane == 0)
      static_cast<acc_t*>(p.lse)[p.lse_strides.offset(s.batch, s.q_row_begin + row, head)] =
          seen ? row_max + log(row_sum) : -INFINITY;
  }
};

// delta = rowsum(dout * out) - dlse of one (query row, head).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t softmax_delta(const AttentionBwdParams& p, const SeqSpan& s, int64_t row,
                                               int64_t head, int lane) {
  const int64_t r = s.q_row_begin + row;
  const scalar_t* dout = row_of<scalar_t>(p.dout, p.dout_strides, s.batch, r, head);
  const scalar_t* out = row_of<scalar_t>(p.o, p.o_strides, s.batch, r, head);
  const acc_t dlse = p.dlse ? static_cast<const acc_t*>(p.dlse)[p.dlse_strides.offset(s.batch, r, head)] : acc_t(0);
  return row_dot<scalar_t, acc_t>(dout, out, p.head_dim_v, lane) - dlse;
}

// dq of one (query row, head), keys fed one at a time; dq / scale accumulates in `acc` (head_dim_qk).
template <typename scalar_t, typename acc_t>
struct DqRow {
  const AttentionBwdParams& p;
  const SeqSpan& s;
  const scalar_t *q, *dout;
  int64_t kv_head;
  acc_t* acc;
  int lane;
  acc_t lse, delta;

  __device__ DqRow(const AttentionBwdParams& params, const SeqSpan& span, int64_t row, int64_t head,
                   acc_t* accumulators, int lane_id)
      : p(params), s(span), q(row_of<scalar_t>(params.q, params.q_strides, span.batch, span.q_row_begin + row, head)),
        dout(row_of<scalar_t>(params.dout, params.dout_strides, span.batch, span.q_row_begin + row, head)),
        kv_head(head / (params.num_heads_q / params.num_heads_k)), acc(accumulators), lane(lane_id),
        lse(static_cast<const acc_t*>(params.lse)[params.lse_strides.offset(span.batch, span.q_row_begin + row, head)]),
        delta(softmax_delta<scalar_t, acc_t>(params, span, row, head, lane_id)) {
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) acc[d] = 0;
  }
  // Whether the row has any gradient (lse finite).
  __device__ bool live() const { return lse != -INFINITY; }
  __device__ void add(int64_t key) {
    const scalar_t* k = row_of<scalar_t>(p.k, p.k_strides, s.batch, s.k_row_begin + key, kv_head);
    const scalar_t* v = row_of<scalar_t>(p.v, p.v_strides, s.batch, s.k_row_begin + key, kv_head);
    const acc_t prob = fast_exp(row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale) - lse);
    const acc_t dscore = prob * (row_dot<scalar_t, acc_t>(dout, v, p.head_dim_v, lane) - delta);
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) acc[d] += dscore * static_cast<acc_t>(k[d]);
  }
  __device__ void store(int64_t row, int64_t head) const {
    scalar_t* dq = static_cast<scalar_t*>(p.dq) + p.dq_strides.offset(s.batch, s.q_row_begin + row, head);
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) dq[d] = static_cast<scalar_t>(acc[d] * acc_t(p.scale));
  }
};

// dk, dv of one (key row, kv head), (query row, head) pairs fed one at a time in a fixed order;
// dk / scale and dv accumulate in `acc` (head_dim_qk + head_dim_v).
template <typename scalar_t, typename acc_t>
struct DkvRow {
  const AttentionBwdParams& p;
  const SeqSpan& s;
  const scalar_t *k, *v;
  acc_t *dk_acc, *dv_acc;
  int lane;

  __device__ DkvRow(const AttentionBwdParams& params, const SeqSpan& span, int64_t key, int64_t kv_head,
                    acc_t* accumulators, int lane_id)
      : p(params), s(span), k(row_of<scalar_t>(params.k, params.k_strides, span.batch, span.k_row_begin + key, kv_head)),
        v(row_of<scalar_t>(params.v, params.v_strides, span.batch, span.k_row_begin + key, kv_head)),
        dk_acc(accumulators), dv_acc(accumulators + params.head_dim_qk), lane(lane_id) {
    // Each lane zeroes the elements it accumulates and stores: no other lane touches them, so no
    // barrier is needed (zeroing [0, Dk + Dv) in one lane-strided loop handed dv_acc's elements to
    // other lanes when Dk % 32 != 0: a race that the CUDA emulator found).
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk_acc[d] = 0;
    for (int64_t d = lane; d < p.head_dim_v; d += 32) dv_acc[d] = 0;
  }
  __device__ void add(int64_t row, int64_t head) {
    const int64_t r = s.q_row_begin + row;
    const acc_t lse = static_cast<const acc_t*>(p.lse)[p.lse_strides.offset(s.batch, r, head)];
    if (lse == -INFINITY) return;
    const scalar_t* q = row_of<scalar_t>(p.q, p.q_strides, s.batch, r, head);
    const scalar_t* dout = row_of<scalar_t>(p.dout, p.dout_strides, s.batch, r, head);
    const acc_t prob = fast_exp(row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale) - lse);
    const acc_t delta = softmax_delta<scalar_t, acc_t>(p, s, row, head, lane);
    const acc_t dscore = prob * (row_dot<scalar_t, acc_t>(dout, v, p.head_dim_v, lane) - delta);
    for (int64_t d = lane; d < p.head_dim_v; d += 32) dv_acc[d] += prob * static_cast<acc_t>(dout[d]);
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk_acc[d] += dscore * static_cast<acc_t>(q[d]);
  }
  __device__ void store(int64_t key, int64_t kv_head) const {
    const int64_t kr = s.k_row_begin + key;
    scalar_t* dk = static_cast<scalar_t*>(p.dk) + p.dk_strides.offset(s.batch, kr, kv_head);
    scalar_t* dv = static_cast<scalar_t*>(p.dv) + p.dv_strides.offset(s.batch, kr, kv_head);
    for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk[d] = static_cast<scalar_t>(dk_acc[d] * acc_t(p.scale));
    for (int64_t d = lane; d < p.head_dim_v; d += 32) dv[d] = static_cast<scalar_t>(dv_acc[d]);
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t* warp_scratch(unsigned char* smem, int64_t per_warp) {
  return reinterpret_cast<acc_t*>(smem) + (threadIdx.x / 32) * per_warp;
}

template <typename scalar_t, typename acc_t, typename KeySet>
__global__ void __launch_bounds__(kThreads) forward_kernel(const typename KeySet::Params p) {
  NSA_DYNAMIC_SMEM(smem_raw);
  const WarpRow wr = warp_row(p.max_seqlen_q);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.q_len) return;
  const int64_t head = blockIdx.y;
  SoftmaxRow<scalar_t, acc_t> row(p, s, wr.row, head, warp_scratch<acc_t>(smem_raw, p.head_dim_v), threadIdx.x % 32);
  KeySet::for_each_key(p, s, wr.row, row.kv_head, [&](int64_t key) { row.add(key); });
  row.store(wr.row, head);
}

template <typename scalar_t, typename acc_t, typename KeySet>
__global__ void __launch_bounds__(kThreads) dq_kernel(const typename KeySet::BwdParams p) {
  NSA_DYNAMIC_SMEM(smem_raw);
  const WarpRow wr = warp_row(p.max_seqlen_q);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.q_len) return;
  const int64_t head = blockIdx.y;
  DqRow<scalar_t, acc_t> row(p, s, wr.row, head, warp_scratch<acc_t>(smem_raw, p.head_dim_qk), threadIdx.x % 32);
  if (row.live()) KeySet::for_each_key(p, s, wr.row, row.kv_head, [&](int64_t key) { row.add(key); });
  row.store(wr.row, head);
}

// Queries in ascending order, heads of the group in ascending order: a fixed summation order, hence
// bitwise-reproducible.
template <typename scalar_t, typename acc_t, typename QuerySet>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const typename QuerySet::BwdParams p) {
  NSA_DYNAMIC_SMEM(smem_raw);
  const WarpRow wr = warp_row(p.max_key_rows);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.k_len) return;
  const int64_t head_k = blockIdx.y, group = p.num_heads_q / p.num_heads_k;
  DkvRow<scalar_t, acc_t> key(p, s, wr.row, head_k, warp_scratch<acc_t>(smem_raw, p.head_dim_qk + p.head_dim_v),
                              threadIdx.x % 32);
  QuerySet::for_each_query(p, wr.seq, s, wr.row, head_k, [&](int64_t row) {
    for (int64_t head = head_k * group; head < (head_k + 1) * group; ++head) key.add(row, head);
  });
  key.store(wr.row, head_k);
}

inline dim3 grid_for(int64_t num_seqs, int64_t rows_per_seq, int64_t heads) {
  const int64_t blocks = num_seqs * ((rows_per_seq + kWarpsPerBlock - 1) / kWarpsPerBlock);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "nsa: problem too large for one launch (", blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, const Params& p, dim3 grid, size_t smem_per_warp) {
  if (grid.x == 0) return;
  const size_t smem = smem_per_warp * kWarpsPerBlock;
  TORCH_CHECK(smem <= 48 * 1024, "nsa: head dims too large for the CUDA baseline kernel");
  launch_kernel(kernel, grid, kThreads, smem, p);
}

template <typename scalar_t>
using accumulate_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename KeySet>
void run_fwd(const typename KeySet::Params& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_baseline_fwd", [&] {
    using acc_t = accumulate_t<scalar_t>;
    launch(forward_kernel<scalar_t, acc_t, KeySet>, p, grid_for(p.num_seqs, p.max_seqlen_q, p.num_heads_q),
           sizeof(acc_t) * p.head_dim_v);
  });
}

template <typename KeySet, typename QuerySet>
void run_bwd(const typename KeySet::BwdParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_baseline_bwd", [&] {
    using acc_t = accumulate_t<scalar_t>;
    launch(dq_kernel<scalar_t, acc_t, KeySet>, p, grid_for(p.num_seqs, p.max_seqlen_q, p.num_heads_q),
           sizeof(acc_t) * p.head_dim_qk);
    launch(dkv_kernel<scalar_t, acc_t, QuerySet>, p, grid_for(p.num_seqs, p.max_key_rows, p.num_heads_k),
           sizeof(acc_t) * (p.head_dim_qk + p.head_dim_v));
  });
}

}  // namespace baseline
}  // namespace nsa
