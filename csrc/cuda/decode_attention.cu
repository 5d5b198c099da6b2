// CUDA kernel of fused NSA decoding (the algorithm of cpu/decode_attention.cpp, which is its oracle).
//
// One thread block per (new query, kv head, sequence), the G query heads of the group together, so
// every key row is read from global memory once for the whole group. Decoding is bound by memory,
// not by tensor cores: the block streams its key rows in chunks of kChunk, each warp taking rows, the
// lanes splitting the head dim, with an online softmax per head.
//   1. compressed branch over the visible tokens: o_cmp and lse per head;
//   2. the same tokens again (now from L2), p = exp(s - lse) summed over the group, spread over the
//      blocks by the overlap weights (Eq. 9): each block's score is summed by one thread in
//      ascending token order, so the selection is deterministic;
//   3. forced blocks plus the top free ones (one warp, n arg-max rounds, ties to the lower id),
//      ascending, -1 padded, written to `indices`;
//   4. selected branch over the union of the picked blocks (keys s <= t), window branch over
//      t - w < s <= t, and the gated sum, written once in the output dtype.
// Lengths are clamped to the cache's capacity (a host check would cost a sync per step), so no
// cache_seqlens value reads out of bounds. No atomics: reruns are bitwise equal.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include "common/decode_params.h"
#include "kernels.h"

namespace nsa {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 64;          // key rows per online-softmax step
constexpr int kMaxDimPerLane = 8;   // head dims up to 256: a lane holds 8 elements of a key row

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float exp_of(float x) { return __expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Shared memory of one block, carved from the dynamic allocation: 8-byte items first, so that every
// array is aligned whatever the sizes (decode_smem_bytes counts the same items).
template <typename acc_t>
struct Smem {
  KeyRange* ranges;     // [n] key rows of the current branch: one per selected block, or one range
  int64_t* range_end;   // [n] cumulative row counts of the ranges
  int64_t* chunk_keys;  // [kChunk] key row of each row of the current chunk
  acc_t* queries;       // [G][Dk], pre-scaled
  acc_t* acc;           // [G][Dv] the current branch's unnormalised output
  acc_t* out;           // [G][Dv] the gated sum
  acc_t* max;           // [G] running max of the current branch
  acc_t* sum;           // [G] running sum
  acc_t* alpha;         // [G] rescale factor of the current chunk
  acc_t* lse;           // [G] the compressed branch's lse
  acc_t* scores;        // [G][kChunk] scores, then probabilities, of the current chunk
  acc_t* group_probs;   // [kChunk] compressed-token probabilities summed over the group
  acc_t* block_scores;  // [max_blocks]
  int32_t* picked;      // [n] the selected blocks, ascending, -1 padded
  unsigned char* taken; // [max_blocks] 1 once a block is kept
};

int64_t decode_smem_bytes(const DecodeParams& p, int64_t acc_bytes, int64_t max_blocks) {
  const int64_t group = p.num_heads_q / p.num_heads_k, n = p.selection.select_count;
  const int64_t accs = group * (p.head_dim_qk + 2 * p.head_dim_v + 4 + kChunk) + kChunk + max_blocks;
  return n * static_cast<int64_t>(sizeof(KeyRange) + sizeof(int64_t) + sizeof(int32_t)) + kChunk * 8 +
         accs * acc_bytes + max_blocks;
}

template <typename acc_t>
__device__ Smem<acc_t> carve(unsigned char* raw, const DecodeParams& p, int64_t group, int64_t max_blocks) {
  const int64_t n = p.selection.select_count;
  Smem<acc_t> s;
  s.ranges = reinterpret_cast<KeyRange*>(raw);
  s.range_end = reinterpret_cast<int64_t*>(s.ranges + n);
  s.chunk_keys = s.range_end + n;
  s.queries = reinterpret_cast<acc_t*>(s.chunk_keys + kChunk);
  s.acc = s.queries + group * p.head_dim_qk;
  s.out = s.acc + group * p.head_dim_v;
  s.max = s.out + group * p.head_dim_v;
  s.sum = s.max + group;
  s.alpha = s.sum + group;
  s.lse = s.alpha + group;
  s.scores = s.lse + group;
  s.group_probs = s.scores + group * kChunk;
  s.block_scores = s.group_probs + kChunk;
  s.picked = reinterpret_cast<int32_t*>(s.block_scores + max_blocks);
  s.taken = reinterpret_cast<unsigned char*>(s.picked + n);
  return s;
}

// Where the rows of one branch live: `count` logical rows over `num_ranges` key ranges of a cache.
struct Rows {
  const void* k;
  const void* v;
  Strides k_strides, v_strides;
  const KeyRange* ranges;
  const int64_t* range_end;  // cumulative row counts
  int num_ranges;

  __device__ int64_t key_row(int64_t r) const {
    int i = 0;
    while (i + 1 < num_ranges && r >= range_end[i]) ++i;
    return ranges[i].begin + r - (i ? range_end[i - 1] : 0);
  }
};

template <typename scalar_t, typename acc_t>
struct DecodeBlock {
  const DecodeParams& p;
  Smem<acc_t> s;
  int64_t b, head_k, group, dk, dv;
  int warp, lane;

  // Scores of rows [c0, c0 + rows) against the group's queries into s.scores[g][r]; their key rows
  // stay in s.chunk_keys for the values.
  __device__ void chunk_scores(const Rows& src, int64_t c0, int rows) {
    for (int r = threadIdx.x; r < rows; r += kThreads) s.chunk_keys[r] = src.key_row(c0 + r);
    __syncthreads();
    for (int r = warp; r < rows; r += kWarps) {
      const scalar_t* key = static_cast<const scalar_t*>(src.k) + src.k_strides.offset(b, s.chunk_keys[r], head_k);
      acc_t k_lane[kMaxDimPerLane];
#pragma unroll
      for (int e = 0; e < kMaxDimPerLane; ++e) {
        const int64_t x = lane + 32 * e;
        k_lane[e] = x < dk ? static_cast<acc_t>(key[x]) : acc_t(0);
      }
      for (int64_t g = 0; g < group; ++g) {
        acc_t dot = 0;
#pragma unroll
        for (int e = 0; e < kMaxDimPerLane; ++e) {
          const int64_t x = lane + 32 * e;
          if (x < dk) dot += s.queries[g * dk + x] * k_lane[e];
        }
        dot = warp_sum(dot);
        if (lane == 0) s.scores[g * kChunk + r] = dot;
      }
    }
  }

  // Softmax attention of the group over `count` rows: leaves lse per head in s.lse when wanted and adds
  // gate * output to s.out (gate index `branch` of the gates row).
  __device__ void attend(const Rows& src, int64_t count, int branch, bool keep_lse) {
    for (int64_t g = threadIdx.x; g < group; g += kThreads) {
      s.max[g] = -INFINITY;
      s.sum[g] = 0;
    }
    for (int64_t e = threadIdx.x; e < group * dv; e += kThreads) s.acc[e] = 0;
    __syncthreads();
    for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
      const int rows = static_cast<int>(imin(kChunk, count - c0));
      chunk_scores(src, c0, rows);
      __syncthreads();
      for (int64_t g = threadIdx.x; g < group; g += kThreads) {
        acc_t* row = s.scores + g * kChunk;
        acc_t top = s.max[g];
        for (int r = 0; r < rows; ++r) top = max(top, row[r]);
        acc_t total = 0;
        for (int r = 0; r < rows; ++r) total += (row[r] = exp_of(row[r] - top));
        s.alpha[g] = exp_of(s.max[g] - top);  // 0 on the first chunk (max was -inf)
        s.sum[g] = s.sum[g] * s.alpha[g] + total;
        s.max[g] = top;
      }
      __syncthreads();
      for (int64_t e = threadIdx.x; e < group * dv; e += kThreads) {
        const int64_t g = e / dv, x = e % dv;
        acc_t a = s.acc[e] * s.alpha[g];
        for (int r = 0; r < rows; ++r) {
          const scalar_t* value =
              static_cast<const scalar_t*>(src.v) + src.v_strides.offset(b, s.chunk_keys[r], head_k);
          a += s.scores[g * kChunk + r] * static_cast<acc_t>(value[x]);
        }
        s.acc[e] = a;
      }
      __syncthreads();
    }
    const scalar_t* gates = static_cast<const scalar_t*>(p.gates);
    for (int64_t e = threadIdx.x; e < group * dv; e += kThreads) {
      const int64_t g = e / dv;
      if (count > 0) {
        const acc_t gate = static_cast<acc_t>(gates[p.gate_strides.offset(b, blockIdx.x, head_k * group + g) + branch]);
        s.out[e] += gate * s.acc[e] / s.sum[g];
      }
    }
    if (keep_lse)
      for (int64_t g = threadIdx.x; g < group; g += kThreads) s.lse[g] = count > 0 ? s.max[g] + log(s.sum[g]) : -INFINITY;
    __syncthreads();
  }

  // Block scores of the candidates [0, candidates) from the compressed tokens [0, tokens).
  __device__ void score_blocks(const Rows& tokens_src, int64_t tokens, int64_t candidates) {
    const BlockSelection& sel = p.selection;
    for (int64_t j = threadIdx.x; j < candidates; j += kThreads) s.block_scores[j] = 0;
    __syncthreads();
    for (int64_t c0 = 0; c0 < tokens; c0 += kChunk) {
      const int rows = static_cast<int>(imin(kChunk, tokens - c0));
      chunk_scores(tokens_src, c0, rows);
      __syncthreads();
      for (int r = threadIdx.x; r < rows; r += kThreads) {
        acc_t prob = 0;
        for (int64_t g = 0; g < group; ++g) prob += exp_of(s.scores[g * kChunk + r] - s.lse[g]);
        s.group_probs[r] = prob;
      }
      __syncthreads();
      const int64_t first = sel.first_block(c0), last = imin(sel.last_block(c0 + rows - 1), candidates - 1);
      for (int64_t j = first + threadIdx.x; j <= last; j += kThreads) {
        acc_t score = s.block_scores[j];
        for (int r = 0; r < rows; ++r) {
          const int64_t weight = sel.overlap(c0 + r, j);
          if (weight > 0) score += acc_t(weight) * s.group_probs[r];
        }
        s.block_scores[j] = score;
      }
      __syncthreads();
    }
  }

  // Forced blocks and the best free candidates (one warp), ascending, -1 padded, into s.picked and
  // the indices row.
  __device__ void pick(int64_t position, int64_t candidates) {
    const BlockSelection& sel = p.selection;
    const int64_t own = candidates > 0 ? sel.own_block(position) : 0;
    for (int64_t j = threadIdx.x; j < candidates; j += kThreads) s.taken[j] = sel.forced_candidate(j, own);
    __syncthreads();
    if (warp == 0) {
      int64_t kept = 0;
      for (int64_t j = 0; j < candidates; ++j) kept += s.taken[j];
      for (; kept < sel.select_count && kept < candidates; ++kept) {
        acc_t best = -INFINITY;
        int64_t best_block = -1;
        for (int64_t j = lane; j < candidates; j += 32) {
          const acc_t score = isnan(s.block_scores[j]) ? -INFINITY : s.block_scores[j];
          if (!s.taken[j] && (best_block < 0 || score > best)) {
            best = score;
            best_block = j;
          }
        }
        for (int offset = 16; offset > 0; offset >>= 1) {  // arg-max, ties to the lower id
          const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
          const int64_t other_block = __shfl_xor_sync(0xffffffffu, best_block, offset);
          if (other_block >= 0 && (best_block < 0 || other > best || (other == best && other_block < best_block))) {
            best = other;
            best_block = other_block;
          }
        }
        if (lane == 0) s.taken[best_block] = 1;
        __syncwarp();
      }
      if (lane == 0) {
        int64_t e = 0;
        for (int64_t j = 0; j < candidates && e < sel.select_count; ++j)
          if (s.taken[j]) s.picked[e++] = static_cast<int32_t>(j);
        for (; e < sel.select_count; ++e) s.picked[e] = -1;
      }
    }
    __syncthreads();
    int32_t* out = p.indices + p.index_strides.offset(b, blockIdx.x, head_k);
    for (int64_t e = threadIdx.x; e < sel.select_count; e += kThreads) out[e] = s.picked[e];
  }

  __device__ void run() {
    const BlockSelection& sel = p.selection;
    const int64_t length = imin(p.cache_seqlens[b], p.key_capacity);
    const int64_t position = length - p.num_queries + blockIdx.x;
    for (int64_t e = threadIdx.x; e < group * dv; e += kThreads) s.out[e] = 0;
    const scalar_t* q = static_cast<const scalar_t*>(p.q);
    for (int64_t e = threadIdx.x; e < group * dk; e += kThreads) {
      const int64_t g = e / dk, x = e % dk;
      s.queries[e] = static_cast<acc_t>(q[p.q_strides.offset(b, blockIdx.x, head_k * group + g) + x]) * acc_t(p.scale);
    }
    __syncthreads();
    int64_t candidates = 0;
    if (position >= 0) {
      const int64_t tokens = imin(
          sel.visibility().keys_for(position, num_compressed_tokens(length, sel.compress_block, sel.compress_stride)).end,
          p.token_capacity);
      if (threadIdx.x == 0) {
        s.ranges[0] = {0, tokens};
        s.range_end[0] = tokens;
      }
      __syncthreads();
      const Rows compressed{p.k_cmp, p.v_cmp, p.k_cmp_strides, p.v_cmp_strides, s.ranges, s.range_end, 1};
      attend(compressed, tokens, 0, true);
      const int64_t num_blocks = num_select_blocks(length, sel.select_block);
      candidates = sel.candidates_end(position, num_blocks);
      score_blocks(compressed, tokens, candidates);
    }
    pick(position, candidates);
    if (position >= 0) {
      if (threadIdx.x == 0) {
        int n = 0;
        int64_t rows = 0;
        for (int64_t e = 0; e < sel.select_count; ++e) {
          if (s.picked[e] < 0) continue;
          const int64_t begin = s.picked[e] * sel.select_block;
          const int64_t end = imin(begin + sel.select_block, position + 1);
          s.ranges[n] = {begin, end};
          rows += end - begin;
          s.range_end[n++] = rows;
        }
      }
      __syncthreads();
      int num_ranges = 0;
      for (int64_t e = 0; e < sel.select_count; ++e) num_ranges += s.picked[e] >= 0;
      const int64_t selected_rows = num_ranges ? s.range_end[num_ranges - 1] : 0;
      const Rows selected{p.k, p.v, p.k_strides, p.v_strides, s.ranges, s.range_end, num_ranges};
      attend(selected, selected_rows, 1, false);
      const int64_t window_begin = imax(0, position + 1 - p.window);
      if (threadIdx.x == 0) {
        s.ranges[0] = {window_begin, position + 1};
        s.range_end[0] = position + 1 - window_begin;
      }
      __syncthreads();
      const Rows window{p.k_swa, p.v_swa, p.k_swa_strides, p.v_swa_strides, s.ranges, s.range_end, 1};
      attend(window, position + 1 - window_begin, 2, false);
    }
    scalar_t* out = static_cast<scalar_t*>(p.out);
    for (int64_t e = threadIdx.x; e < group * dv; e += kThreads) {
      const int64_t g = e / dv, x = e % dv;
      out[p.out_strides.offset(b, blockIdx.x, head_k * group + g) + x] = static_cast<scalar_t>(s.out[e]);
    }
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ DecodeParams p, int64_t max_blocks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t group = p.num_heads_q / p.num_heads_k;
  DecodeBlock<scalar_t, acc_t> block{p, carve<acc_t>(smem_raw, p, group, max_blocks), blockIdx.z, blockIdx.y, group,
                                     p.head_dim_qk, p.head_dim_v, static_cast<int>(threadIdx.x / 32),
                                     static_cast<int>(threadIdx.x % 32)};
  block.run();
}

}  // namespace

void decode_attention_cuda(const DecodeParams& p, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(p.head_dim_qk <= 32 * kMaxDimPerLane, "nsa: argument 'q' must have a head dim Dk <= ",
                    32 * kMaxDimPerLane, " for the CUDA decoding kernel, got ", p.head_dim_qk);
  TORCH_CHECK_VALUE(p.num_seqs <= 65535 && p.num_heads_k <= 65535 && p.num_queries <= (int64_t(1) << 31) - 1,
                    "nsa: argument 'q' has too many sequences, kv heads or queries for one launch");
  const int64_t max_blocks = num_select_blocks(p.key_capacity, p.selection.select_block);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_decode_attention_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t smem = decode_smem_bytes(p, sizeof(acc_t), max_blocks);
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(smem <= limit, "nsa: argument 'k_cache' holds ", p.key_capacity,
                      " keys per sequence: ", max_blocks, " selection blocks and the group's rows need ", smem,
                      " bytes of shared memory, more than the device's ", limit);
    auto kernel = decode_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>(p.num_queries), static_cast<unsigned>(p.num_heads_k),
                    static_cast<unsigned>(p.num_seqs));
    kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p, max_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace nsa
