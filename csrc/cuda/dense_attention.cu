// CUDA kernels of the dense-tiled attention family (sliding window, compressed tokens).
//
// Entry points: bf16 / fp16 calls with a supported head-dim pair go to the tiled tensor-core kernels
// (cuda/dense/, chosen in cuda/dense/dispatch.h); everything else runs the baseline kernels below.
//
// Baseline implementation: one warp per (query row, head) in the forward and dq passes, one warp per
// (key row, kv head) in the dk/dv pass, fp32 (fp64) accumulation, masks and sequence spans shared with
// the CPU kernel (common/masks.h, common/attention_params.h). It is exact and deterministic but does
// not use tensor cores; it serves fp32 / fp64, other head dims and unaligned rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include "cuda/dense/dispatch.h"
#include "kernels.h"

namespace nsa {
namespace {

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

// Dynamic shared memory: per warp, head_dim_v accumulators.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionParams p) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % 32;
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / 32) * p.head_dim_v;
  const WarpRow wr = warp_row(p.max_seqlen_q);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.q_len) return;
  const int64_t head = blockIdx.y, head_k = head / (p.num_heads_q / p.num_heads_k);
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + p.q_strides.offset(s.batch, s.q_row_begin + wr.row, head);
  const KeyRange keys = p.mask.keys_for(s.query_offset + wr.row, s.k_len);

  for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] = 0;
  acc_t row_max = -INFINITY, row_sum = 0;
  for (int64_t key = keys.begin; key < keys.end; ++key) {
    const scalar_t* k = static_cast<const scalar_t*>(p.k) + p.k_strides.offset(s.batch, s.k_row_begin + key, head_k);
    const scalar_t* v = static_cast<const scalar_t*>(p.v) + p.v_strides.offset(s.batch, s.k_row_begin + key, head_k);
    const acc_t score = row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale);
    const acc_t new_max = score > row_max ? score : row_max;
    const acc_t rescale = fast_exp(row_max - new_max);
    const acc_t prob = fast_exp(score - new_max);
    row_sum = row_sum * rescale + prob;
    row_max = new_max;
    for (int64_t d = lane; d < p.head_dim_v; d += 32) acc[d] = acc[d] * rescale + prob * static_cast<acc_t>(v[d]);
  }
  const bool seen = row_sum > 0;
  scalar_t* o = static_cast<scalar_t*>(p.o) + p.o_strides.offset(s.batch, s.q_row_begin + wr.row, head);
  for (int64_t d = lane; d < p.head_dim_v; d += 32) o[d] = static_cast<scalar_t>(seen ? acc[d] / row_sum : acc_t(0));
  if (lane == 0)
    static_cast<acc_t*>(p.lse)[p.lse_strides.offset(s.batch, s.q_row_begin + wr.row, head)] =
        seen ? row_max + log(row_sum) : -INFINITY;
}

// delta = rowsum(dout * out) - dlse of one (query row, head).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t softmax_delta(const AttentionBwdParams& p, const SeqSpan& s, int64_t row,
                                               int64_t head, int lane) {
  const int64_t r = s.q_row_begin + row;
  const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + p.dout_strides.offset(s.batch, r, head);
  const scalar_t* out = static_cast<const scalar_t*>(p.o) + p.o_strides.offset(s.batch, r, head);
  const acc_t dlse = p.dlse ? static_cast<const acc_t*>(p.dlse)[p.dlse_strides.offset(s.batch, r, head)] : acc_t(0);
  return row_dot<scalar_t, acc_t>(dout, out, p.head_dim_v, lane) - dlse;
}

// Per warp, head_dim_qk accumulators for dq.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) dq_kernel(const AttentionBwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % 32;
  acc_t* dq_acc = reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / 32) * p.head_dim_qk;
  const WarpRow wr = warp_row(p.max_seqlen_q);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.q_len) return;
  const int64_t head = blockIdx.y, head_k = head / (p.num_heads_q / p.num_heads_k);
  const int64_t r = s.q_row_begin + wr.row;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + p.q_strides.offset(s.batch, r, head);
  const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + p.dout_strides.offset(s.batch, r, head);
  const acc_t lse = static_cast<const acc_t*>(p.lse)[p.lse_strides.offset(s.batch, r, head)];
  const acc_t delta = softmax_delta<scalar_t, acc_t>(p, s, wr.row, head, lane);
  const KeyRange keys = p.mask.keys_for(s.query_offset + wr.row, s.k_len);

  for (int64_t d = lane; d < p.head_dim_qk; d += 32) dq_acc[d] = 0;
  if (lse != -INFINITY) {
    for (int64_t key = keys.begin; key < keys.end; ++key) {
      const scalar_t* k = static_cast<const scalar_t*>(p.k) + p.k_strides.offset(s.batch, s.k_row_begin + key, head_k);
      const scalar_t* v = static_cast<const scalar_t*>(p.v) + p.v_strides.offset(s.batch, s.k_row_begin + key, head_k);
      const acc_t prob = fast_exp(row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale) - lse);
      const acc_t dscore = prob * (row_dot<scalar_t, acc_t>(dout, v, p.head_dim_v, lane) - delta);
      for (int64_t d = lane; d < p.head_dim_qk; d += 32) dq_acc[d] += dscore * static_cast<acc_t>(k[d]);
    }
  }
  scalar_t* dq = static_cast<scalar_t*>(p.dq) + p.dq_strides.offset(s.batch, r, head);
  for (int64_t d = lane; d < p.head_dim_qk; d += 32) dq[d] = static_cast<scalar_t>(dq_acc[d] * acc_t(p.scale));
}

// Per warp, head_dim_qk + head_dim_v accumulators for dk and dv. Queries in ascending order, heads of
// the group in ascending order: a fixed summation order, hence bitwise-reproducible.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const AttentionBwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % 32;
  acc_t* dk_acc = reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / 32) * (p.head_dim_qk + p.head_dim_v);
  acc_t* dv_acc = dk_acc + p.head_dim_qk;
  const WarpRow wr = warp_row(p.max_key_rows);
  const SeqSpan s = seq_span(p, wr.seq);
  if (wr.row >= s.k_len) return;
  const int64_t head_k = blockIdx.y, group = p.num_heads_q / p.num_heads_k;
  const int64_t kr = s.k_row_begin + wr.row;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + p.k_strides.offset(s.batch, kr, head_k);
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + p.v_strides.offset(s.batch, kr, head_k);
  const QueryRange queries = queries_seeing(p.mask, wr.row, wr.row + 1, s.query_offset, s.q_len, s.k_len);

  for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk_acc[d] = 0;
  for (int64_t d = lane; d < p.head_dim_v; d += 32) dv_acc[d] = 0;
  for (int64_t row = queries.begin; row < queries.end; ++row) {
    const KeyRange keys = p.mask.keys_for(s.query_offset + row, s.k_len);
    if (wr.row < keys.begin || wr.row >= keys.end) continue;
    for (int64_t head = head_k * group; head < (head_k + 1) * group; ++head) {
      const int64_t r = s.q_row_begin + row;
      const acc_t lse = static_cast<const acc_t*>(p.lse)[p.lse_strides.offset(s.batch, r, head)];
      if (lse == -INFINITY) continue;
      const scalar_t* q = static_cast<const scalar_t*>(p.q) + p.q_strides.offset(s.batch, r, head);
      const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + p.dout_strides.offset(s.batch, r, head);
      const acc_t prob = fast_exp(row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane) * acc_t(p.scale) - lse);
      const acc_t delta = softmax_delta<scalar_t, acc_t>(p, s, row, head, lane);
      const acc_t dscore = prob * (row_dot<scalar_t, acc_t>(dout, v, p.head_dim_v, lane) - delta);
      for (int64_t d = lane; d < p.head_dim_v; d += 32) dv_acc[d] += prob * static_cast<acc_t>(dout[d]);
      for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk_acc[d] += dscore * static_cast<acc_t>(q[d]);
    }
  }
  scalar_t* dk = static_cast<scalar_t*>(p.dk) + p.dk_strides.offset(s.batch, kr, head_k);
  scalar_t* dv = static_cast<scalar_t*>(p.dv) + p.dv_strides.offset(s.batch, kr, head_k);
  for (int64_t d = lane; d < p.head_dim_qk; d += 32) dk[d] = static_cast<scalar_t>(dk_acc[d] * acc_t(p.scale));
  for (int64_t d = lane; d < p.head_dim_v; d += 32) dv[d] = static_cast<scalar_t>(dv_acc[d]);
}

dim3 grid_for(int64_t num_seqs, int64_t rows_per_seq, int64_t heads) {
  const int64_t blocks = num_seqs * ((rows_per_seq + kWarpsPerBlock - 1) / kWarpsPerBlock);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "nsa: problem too large for one launch (", blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, const Params& p, dim3 grid, size_t smem_per_warp) {
  if (grid.x == 0) return;
  const size_t smem = smem_per_warp * kWarpsPerBlock;
  TORCH_CHECK(smem <= 48 * 1024, "nsa: head dims too large for the CUDA baseline kernel");
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dense_attention_fwd_cuda(const AttentionParams& p, at::ScalarType dtype) {
  if (tiled::try_fwd(p, dtype)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_dense_attention_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch(forward_kernel<scalar_t, acc_t>, p, grid_for(p.num_seqs, p.max_seqlen_q, p.num_heads_q),
           sizeof(acc_t) * p.head_dim_v);
  });
}

void dense_attention_bwd_cuda(const AttentionBwdParams& p, at::ScalarType dtype) {
  if (tiled::try_bwd(p, dtype)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_dense_attention_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch(dq_kernel<scalar_t, acc_t>, p, grid_for(p.num_seqs, p.max_seqlen_q, p.num_heads_q),
           sizeof(acc_t) * p.head_dim_qk);
    launch(dkv_kernel<scalar_t, acc_t>, p, grid_for(p.num_seqs, p.max_key_rows, p.num_heads_k),
           sizeof(acc_t) * (p.head_dim_qk + p.head_dim_v));
  });
}

}  // namespace nsa
