// CUDA kernels of fused NSA decoding (the algorithm of cpu/decode_attention.cpp, which is their
// oracle), split across the keys as in flash-decoding, so that a small batch still fills the GPU.
// A task is one (sequence, new query, kv head); the G query heads of its group go together, so every
// key row is read once per group. Four launches on the current stream, no host sync, split counts
// fixed by shapes alone (common/decode_split.h), so a captured graph replays for any lengths:
//   1. decode_compressed_kernel, one block per (compressed split, task): online softmax over the
//      split's tokens (partial output, max and sum per head) and the scores of the split's selection
//      blocks (Eq. 9) as per-head partial sums, each kept with the max it is relative to;
//   2. decode_select_kernel, one block per task: the compressed lse per head from the partials, the
//      block scores summed over the group, forced blocks plus the best free ones (one warp, n
//      arg-max rounds, ties to the lower id), ascending, -1 padded, written to `indices`;
//   3. decode_sparse_kernel, one block per (selected or window split, task): online softmax over the
//      split's rows of the picked blocks (keys s <= t) or of the window (t - w < s <= t);
//   4. decode_combine_kernel, one block per task: each branch's partials merged in split order, the
//      gated sum written once in the output dtype.
// Decoding is bound by memory, not by tensor cores: a thread takes a key row and eight heads of the
// group for the scores, a value column and eight heads for the output, so no shuffles are needed.
// Lengths are clamped to the caches' capacities (a host check would cost a sync per step), so no
// cache_seqlens value reads out of bounds. No atomics: reruns are bitwise equal.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/decode_params.h"
#include "common/decode_split.h"
#include "cuda/baseline.h"
#include "cuda/runtime.h"
#include "kernels.h"

namespace nsa {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 64;           // key rows per online-softmax step
constexpr int kHeadsPerPass = 8;     // heads whose dot products or outputs a thread keeps in registers
constexpr int kBlocksPerSm = 3;      // splits aim at this many blocks per SM (~130 registers/thread fit 3)
constexpr int64_t kMinSplitRows = 2 * kChunk;

using baseline::fast_exp;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Every split's results, in a workspace allocated per step. A task's records are its compressed
// splits, then its selected splits, then its window splits.
template <typename acc_t>
struct Partials {
  acc_t* out;        // [tasks][records][G][Dv] output relative to the record's max, not normalised
  acc_t* max;        // [tasks][records][G]
  acc_t* sum;        // [tasks][records][G]
  acc_t* block_sum;  // [tasks][G][max_blocks] sum over a block's tokens of w * exp(score - block_max)
  acc_t* block_max;  // [tasks][G][max_blocks]
  DecodeSplits splits;
  int64_t max_blocks;  // selection blocks of a full cache
};

// Records [first, last) of a task (`base`: its first record) for head g merged as flash-decoding
// combines splits: their common max, and their sums and, for a column x >= 0, their outputs, each
// rescaled to that max. sum stays 0 when no record saw a key.
template <typename acc_t>
struct Merged {
  acc_t top, sum, value;
};

template <typename acc_t>
__device__ Merged<acc_t> merge_records(const Partials<acc_t>& w, int64_t base, int64_t group, int64_t dv, int64_t g,
                                       int64_t first, int64_t last, int64_t x) {
  Merged<acc_t> m{-INFINITY, 0, 0};
  for (int64_t r = first; r < last; ++r) m.top = max(m.top, w.max[(base + r) * group + g]);
  if (m.top == -INFINITY) return m;
  for (int64_t r = first; r < last; ++r) {
    const acc_t factor = fast_exp(w.max[(base + r) * group + g] - m.top);
    m.sum += factor * w.sum[(base + r) * group + g];
    if (x >= 0) m.value += factor * w.out[((base + r) * group + g) * dv + x];
  }
  return m;
}

// The task of this thread block: grid (split, kv head, sequence * TQ + query).
struct Task {
  int64_t b, query, head_k, group, id;
  int64_t length;    // live keys, clamped to the capacity
  int64_t position;  // the query's position (< 0 when cache_seqlens[b] < TQ: the query sees nothing)

  __device__ explicit Task(const DecodeParams& p)
      : b(blockIdx.z / static_cast<unsigned>(p.num_queries)),  // the host checks B * TQ <= 65535
        query(blockIdx.z % static_cast<unsigned>(p.num_queries)),
        head_k(blockIdx.y),
        group(p.num_heads_q / p.num_heads_k),
        id(static_cast<int64_t>(blockIdx.z) * p.num_heads_k + blockIdx.y),
        length(imin(imax(p.cache_seqlens[b], 0), p.key_capacity)),
        position(length - p.num_queries + query) {}

  // Compressed tokens [0, tokens) the query sees, within the token capacity.
  __device__ int64_t visible_tokens(const DecodeParams& p) const {
    if (position < 0) return 0;
    const BlockSelection& sel = p.selection;
    const int64_t live = num_compressed_tokens(length, sel.compress_block, sel.compress_stride);
    return imin(sel.visibility().keys_for(position, live).end, p.token_capacity);
  }
};

// Where the rows of one branch live: logical rows over `num_ranges` key ranges of a cache.
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

NSA_HOST_DEVICE int64_t round_up(int64_t value, int64_t multiple) { return ceil_div(value, multiple) * multiple; }

// Shared memory of the attention kernels, carved from the dynamic allocation (attend_smem_bytes counts
// the same items). Heads are padded to a multiple of kHeadsPerPass and the query dim to a multiple of
// 4, with zeros, so that threads read them as aligned vectors without bounds checks.
template <typename acc_t>
struct AttendSmem {
  acc_t* queries;          // [heads_padded][dim_padded], pre-scaled
  acc_t* scores;           // [kChunk][heads_padded] scores, then exp(score - max), of the current chunk
  KeyRange* ranges;        // [n] key ranges of the branch
  int64_t* range_end;      // [n] their cumulative row counts
  int64_t* key_offsets;    // [kChunk] element offset of each key row of the current chunk
  int64_t* value_offsets;  // [kChunk] and of its value row
  acc_t* acc;              // [G][Dv]
  acc_t* max;              // [G] running max
  acc_t* sum;              // [G] running sum
  acc_t* alpha;            // [G] rescale factor of the current chunk
  int heads_padded, dim_padded;
};

struct AttendSizes {
  int64_t heads_padded, dim_padded;
  __host__ __device__ explicit AttendSizes(const DecodeParams& p)
      : heads_padded(round_up(p.num_heads_q / p.num_heads_k, kHeadsPerPass)), dim_padded(round_up(p.head_dim_qk, 4)) {}
};

int64_t attend_smem_bytes(const DecodeParams& p, int64_t acc_bytes) {
  const AttendSizes z(p);
  const int64_t group = p.num_heads_q / p.num_heads_k;
  return (z.heads_padded * (z.dim_padded + kChunk) + group * (p.head_dim_v + 3)) * acc_bytes +
         p.selection.select_count * static_cast<int64_t>(sizeof(KeyRange) + sizeof(int64_t)) +
         2 * kChunk * static_cast<int64_t>(sizeof(int64_t));
}

template <typename acc_t>
__device__ AttendSmem<acc_t> carve_attend(unsigned char* raw, const DecodeParams& p, int64_t group) {
  const AttendSizes z(p);
  AttendSmem<acc_t> s;
  s.heads_padded = static_cast<int>(z.heads_padded);
  s.dim_padded = static_cast<int>(z.dim_padded);
  s.queries = reinterpret_cast<acc_t*>(raw);
  s.scores = s.queries + z.heads_padded * z.dim_padded;
  // Both arrays above span a multiple of 32 elements, so what follows stays 16-byte aligned.
  s.ranges = reinterpret_cast<KeyRange*>(s.scores + kChunk * z.heads_padded);
  s.range_end = reinterpret_cast<int64_t*>(s.ranges + p.selection.select_count);
  s.key_offsets = s.range_end + p.selection.select_count;
  s.value_offsets = s.key_offsets + kChunk;
  s.acc = reinterpret_cast<acc_t*>(s.value_offsets + kChunk);
  s.max = s.acc + group * p.head_dim_v;
  s.sum = s.max + group;
  s.alpha = s.sum + group;
  return s;
}

// N consecutive values from 16-byte aligned shared memory, as 16-byte loads.
template <int N, typename T>
__device__ __forceinline__ void load_aligned(const T* src, T (&dst)[N]) {
  using Vec = std::conditional_t<std::is_same_v<T, double>, double2, float4>;
  constexpr int kPer = sizeof(Vec) / sizeof(T);
  static_assert(N % kPer == 0, "whole 16-byte vectors");
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    const Vec vec = reinterpret_cast<const Vec*>(src)[v];
#pragma unroll
    for (int e = 0; e < kPer; ++e) dst[v * kPer + e] = reinterpret_cast<const T*>(&vec)[e];
  }
}

// One thread block's online softmax over some rows of one branch, for the whole group.
template <typename scalar_t, typename acc_t>
struct Attend {
  const DecodeParams& p;
  AttendSmem<acc_t> s;
  Task t;

  __device__ Attend(const DecodeParams& params, unsigned char* smem) : p(params), t(params) {
    s = carve_attend<acc_t>(smem, p, t.group);
    const scalar_t* q = static_cast<const scalar_t*>(p.q);
    const int dk = static_cast<int>(p.head_dim_qk), group = static_cast<int>(t.group);
    for (int e = threadIdx.x; e < s.heads_padded * s.dim_padded; e += kThreads) {
      const int g = e / s.dim_padded, x = e % s.dim_padded;
      const int64_t head = t.head_k * t.group + g;
      const bool real = g < group && x < dk;  // else padding
      s.queries[e] = real ? static_cast<acc_t>(q[p.q_strides.offset(t.b, t.query, head) + x]) * acc_t(p.scale)
                          : acc_t(0);
    }
  }

  // The branch's rows as one key range [begin, end), written by thread 0 (the caller syncs).
  __device__ void set_single_range(int64_t begin, int64_t end) {
    if (threadIdx.x == 0) {
      s.ranges[0] = {begin, end};
      s.range_end[0] = end - begin;
    }
  }

  // Scores of rows [c0, c0 + rows) against the group's queries into s.scores[r][g], the rows' key and
  // value offsets into s.key_offsets / s.value_offsets. A thread takes one row and kHeadsPerPass heads:
  // the lanes of a warp read different rows and the same queries (a shared-memory broadcast), so the
  // dot products need no shuffles.
  __device__ void chunk_scores(const Rows& src, int64_t c0, int rows) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      const int64_t key = src.key_row(c0 + r);
      s.key_offsets[r] = src.k_strides.offset(t.b, key, t.head_k);
      s.value_offsets[r] = src.v_strides.offset(t.b, key, t.head_k);
    }
    __syncthreads();
    const int dk = static_cast<int>(p.head_dim_qk);
    const scalar_t* keys = static_cast<const scalar_t*>(src.k);
    for (int item = threadIdx.x; item < rows * (s.heads_padded / kHeadsPerPass); item += kThreads) {
      const int r = item % rows, g0 = item / rows * kHeadsPerPass;
      const scalar_t* key = keys + s.key_offsets[r];
      acc_t dot[kHeadsPerPass] = {};
      for (int x = 0; x < s.dim_padded; x += 4) {
        acc_t k[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) k[e] = x + e < dk ? static_cast<acc_t>(key[x + e]) : acc_t(0);
#pragma unroll
        for (int i = 0; i < kHeadsPerPass; ++i) {
          acc_t q[4];
          load_aligned(s.queries + (g0 + i) * s.dim_padded + x, q);
          dot[i] += q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + q[3] * k[3];
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerPass; ++i) s.scores[r * s.heads_padded + g0 + i] = dot[i];
    }
  }

  // Online softmax over the logical rows [begin, end) of src. Rows before owned_begin are scored, and
  // seen by each_chunk, but left out of the output and the sum. each_chunk(c0, rows) runs once per
  // chunk while s.scores holds exp(score - max) under the updated s.max; it must only read them.
  template <typename ChunkHook>
  __device__ void run(const Rows& src, int64_t begin, int64_t owned_begin, int64_t end, const ChunkHook& each_chunk) {
    // int indices inside the block: 64-bit division is a slow subroutine call on the GPU.
    const int group = static_cast<int>(t.group), dv = static_cast<int>(p.head_dim_v);
    for (int g = threadIdx.x; g < group; g += kThreads) {
      s.max[g] = -INFINITY;
      s.sum[g] = 0;
    }
    for (int e = threadIdx.x; e < group * dv; e += kThreads) s.acc[e] = 0;
    __syncthreads();
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int rows = static_cast<int>(imin(kChunk, end - c0));
      const int skip = static_cast<int>(imax(0, imin(rows, owned_begin - c0)));
      chunk_scores(src, c0, rows);
      __syncthreads();
      for (int g = threadIdx.x; g < group; g += kThreads) {
        acc_t* column = s.scores + g;  // s.scores[r][g] at column[r * heads_padded]
        acc_t top = s.max[g];
        for (int r = 0; r < rows; ++r) top = max(top, column[r * s.heads_padded]);
        acc_t total = 0;
        for (int r = 0; r < rows; ++r) {
          const acc_t prob = fast_exp(column[r * s.heads_padded] - top);
          column[r * s.heads_padded] = prob;
          if (r >= skip) total += prob;
        }
        s.alpha[g] = fast_exp(s.max[g] - top);  // 0 on the first chunk (max was -inf)
        s.sum[g] = s.sum[g] * s.alpha[g] + total;
        s.max[g] = top;
      }
      __syncthreads();
      each_chunk(c0, rows);
      // A thread takes one output column x and kHeadsPerPass heads: each value is read once per pass.
      const scalar_t* values = static_cast<const scalar_t*>(src.v);
      for (int item = threadIdx.x; item < dv * (s.heads_padded / kHeadsPerPass); item += kThreads) {
        const int x = item % dv, g0 = item / dv * kHeadsPerPass;
        acc_t out[kHeadsPerPass];
#pragma unroll
        for (int i = 0; i < kHeadsPerPass; ++i)
          out[i] = g0 + i < group ? s.acc[(g0 + i) * dv + x] * s.alpha[g0 + i] : acc_t(0);
        for (int r = skip; r < rows; ++r) {
          const acc_t value = static_cast<acc_t>(values[s.value_offsets[r] + x]);
          acc_t prob[kHeadsPerPass];
          load_aligned(s.scores + r * s.heads_padded + g0, prob);
#pragma unroll
          for (int i = 0; i < kHeadsPerPass; ++i) out[i] += prob[i] * value;
        }
#pragma unroll
        for (int i = 0; i < kHeadsPerPass; ++i)
          if (g0 + i < group) s.acc[(g0 + i) * dv + x] = out[i];
      }
      __syncthreads();
    }
  }

  // The block's output, max and sum per head, as record `record` of the task.
  __device__ void store(const Partials<acc_t>& w, int64_t record) const {
    const int64_t base = t.id * w.splits.total() + record;
    const int group = static_cast<int>(t.group), dv = static_cast<int>(p.head_dim_v);
    for (int e = threadIdx.x; e < group * dv; e += kThreads) w.out[base * group * dv + e] = s.acc[e];
    for (int g = threadIdx.x; g < group; g += kThreads) {
      w.max[base * group + g] = s.max[g];
      w.sum[base * group + g] = s.sum[g];
    }
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) decode_compressed_kernel(const __grid_constant__ DecodeParams p,
                                                                     const __grid_constant__ Partials<acc_t> w) {
  NSA_DYNAMIC_SMEM(smem_raw);
  Attend<scalar_t, acc_t> a(p, smem_raw);
  const BlockSelection& sel = p.selection;
  const int64_t tokens = a.t.visible_tokens(p);
  const CompressedSplit split = compressed_split(sel, tokens, w.splits.compressed, blockIdx.x);
  a.set_single_range(0, tokens);
  __syncthreads();
  const Rows rows{p.k_cmp, p.v_cmp, p.k_cmp_strides, p.v_cmp_strides, a.s.ranges, a.s.range_end, 1};
  // Token and block ids fit in int (cache_seqlens is int32); 32-bit division is inline, 64-bit a call.
  const int group = static_cast<int>(a.t.group), block_chunks = static_cast<int>(sel.block_chunks()),
            token_chunks = static_cast<int>(sel.token_chunks());
  acc_t* block_sum = w.block_sum + a.t.id * group * w.max_blocks;
  acc_t* block_max = w.block_max + a.t.id * group * w.max_blocks;
  a.run(rows, split.scored_begin, split.token_begin, split.token_end, [&](int64_t c0, int count) {
    // The split's blocks that this chunk's tokens meet; one thread per (head, block), tokens in order.
    const int chunk = static_cast<int>(c0);
    const int first = max(static_cast<int>(split.block_begin), chunk / block_chunks);
    const int last = min(static_cast<int>(split.block_end) - 1, (chunk + count + token_chunks - 2) / block_chunks);
    const int blocks = last - first + 1;  // a chunk meets few blocks
    for (int item = threadIdx.x; item < group * blocks; item += kThreads) {
      const int g = item / blocks, j = first + item % blocks;
      // First token of the split that meets block j; earlier chunks hold those before `chunk`.
      const int reach = max(static_cast<int>(split.scored_begin), j * block_chunks - token_chunks + 1);
      acc_t total = 0;
      for (int r = max(reach - chunk, 0); r < min(count, (j + 1) * block_chunks - chunk); ++r)
        total += acc_t(sel.overlap(c0 + r, j)) * a.s.scores[r * a.s.heads_padded + g];
      const int64_t slot = g * w.max_blocks + j;
      if (reach < chunk) total += block_sum[slot] * fast_exp(block_max[slot] - a.s.max[g]);
      block_sum[slot] = total;
      block_max[slot] = a.s.max[g];
    }
  });
  a.store(w, blockIdx.x);
}

// Shared memory of the selection kernel.
template <typename acc_t>
struct SelectSmem {
  acc_t* lse;           // [G] the compressed branch's lse per head
  acc_t* block_scores;  // [max_blocks]
  int32_t* picked;      // [n]
  unsigned char* taken; // [max_blocks] 1 once a block is kept
};

int64_t select_smem_bytes(const DecodeParams& p, int64_t acc_bytes, int64_t max_blocks) {
  const int64_t group = p.num_heads_q / p.num_heads_k;
  return (group + max_blocks) * acc_bytes + p.selection.select_count * static_cast<int64_t>(sizeof(int32_t)) +
         max_blocks;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) decode_select_kernel(const __grid_constant__ DecodeParams p,
                                                                 const __grid_constant__ Partials<acc_t> w) {
  NSA_DYNAMIC_SMEM(smem_raw);
  const Task t(p);
  const BlockSelection& sel = p.selection;
  const int64_t group = t.group;
  SelectSmem<acc_t> s;
  s.lse = reinterpret_cast<acc_t*>(smem_raw);
  s.block_scores = s.lse + group;
  s.picked = reinterpret_cast<int32_t*>(s.block_scores + w.max_blocks);
  s.taken = reinterpret_cast<unsigned char*>(s.picked + sel.select_count);

  const int64_t base = t.id * w.splits.total();
  for (int64_t g = threadIdx.x; g < group; g += kThreads) {
    const Merged<acc_t> m = merge_records(w, base, group, 0, g, 0, w.splits.compressed, -1);
    s.lse[g] = m.sum > 0 ? m.top + log(m.sum) : -INFINITY;
  }
  __syncthreads();

  const int64_t tokens = t.visible_tokens(p);
  const int64_t touched = tokens > 0 ? sel.last_block(tokens - 1) + 1 : 0;  // blocks the tokens meet
  const int64_t candidates = sel.candidates_end(t.position, num_select_blocks(t.length, sel.select_block));
  const acc_t* block_sum = w.block_sum + t.id * group * w.max_blocks;
  const acc_t* block_max = w.block_max + t.id * group * w.max_blocks;
  for (int64_t j = threadIdx.x; j < candidates; j += kThreads) {
    acc_t score = 0;
    if (j < touched)
      for (int64_t g = 0; g < group; ++g)
        if (s.lse[g] > -INFINITY)
          score += fast_exp(block_max[g * w.max_blocks + j] - s.lse[g]) * block_sum[g * w.max_blocks + j];
    s.block_scores[j] = score;
  }
  const int64_t own = candidates > 0 ? sel.own_block(t.position) : 0;
  for (int64_t j = threadIdx.x; j < candidates; j += kThreads) s.taken[j] = sel.forced_candidate(j, own);
  __syncthreads();

  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
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
  int32_t* out = p.indices + p.index_strides.offset(t.b, t.query, t.head_k);
  for (int64_t e = threadIdx.x; e < sel.select_count; e += kThreads) out[e] = s.picked[e];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) decode_sparse_kernel(const __grid_constant__ DecodeParams p,
                                                                 const __grid_constant__ Partials<acc_t> w) {
  NSA_DYNAMIC_SMEM(smem_raw);
  Attend<scalar_t, acc_t> a(p, smem_raw);
  const BlockSelection& sel = p.selection;
  const Task& t = a.t;
  const bool window = blockIdx.x >= w.splits.selected;
  int64_t rows = 0;
  int num_ranges = 1;
  if (!window) {
    // The picked blocks (ascending, -1 padded by decode_select_kernel), the query's own cut at t.
    const int32_t* ids = p.indices + p.index_strides.offset(t.b, t.query, t.head_k);
    num_ranges = 0;
    for (int64_t e = 0; e < sel.select_count; ++e) num_ranges += ids[e] >= 0;
    if (threadIdx.x == 0) {
      int n = 0;
      for (int64_t e = 0; e < sel.select_count; ++e) {
        if (ids[e] < 0) continue;
        const int64_t begin = ids[e] * sel.select_block;
        const int64_t end = imin(begin + sel.select_block, t.position + 1);
        a.s.ranges[n] = {begin, end};
        rows += end - begin;
        a.s.range_end[n++] = rows;
      }
    }
    __syncthreads();
    rows = num_ranges ? a.s.range_end[num_ranges - 1] : 0;
  } else if (t.position >= 0) {
    const int64_t window_begin = imax(0, t.position + 1 - p.window);
    rows = t.position + 1 - window_begin;
    a.set_single_range(window_begin, t.position + 1);
  }
  __syncthreads();
  const KeyRange part = window ? even_split(rows, w.splits.window, blockIdx.x - w.splits.selected)
                               : even_split(rows, w.splits.selected, blockIdx.x);
  const Rows src{window ? p.k_swa : p.k,
                 window ? p.v_swa : p.v,
                 window ? p.k_swa_strides : p.k_strides,
                 window ? p.v_swa_strides : p.v_strides,
                 a.s.ranges,
                 a.s.range_end,
                 num_ranges};
  a.run(src, part.begin, part.begin, part.end, [](int64_t, int) {});
  a.store(w, w.splits.compressed + blockIdx.x);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) decode_combine_kernel(const __grid_constant__ DecodeParams p,
                                                                  const __grid_constant__ Partials<acc_t> w) {
  const Task t(p);
  const int64_t group = t.group, dv = p.head_dim_v, base = t.id * w.splits.total();
  const int64_t bounds[4] = {0, w.splits.compressed, w.splits.compressed + w.splits.selected, w.splits.total()};
  const scalar_t* gates = static_cast<const scalar_t*>(p.gates);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  for (int e = threadIdx.x; e < group * dv; e += kThreads) {
    const int g = e / static_cast<int>(dv), x = e % static_cast<int>(dv);
    const int64_t head = t.head_k * group + g;
    acc_t result = 0;
    for (int branch = 0; branch < 3; ++branch) {
      const Merged<acc_t> m = merge_records(w, base, group, dv, g, bounds[branch], bounds[branch + 1], x);
      if (m.sum > 0) {  // else the branch saw no key
        const acc_t gate = static_cast<acc_t>(gates[p.gate_strides.offset(t.b, t.query, head) + branch]);
        result += gate * m.value / m.sum;
      }
    }
    out[p.out_strides.offset(t.b, t.query, head) + x] = static_cast<scalar_t>(result);
  }
}

template <typename Kernel, typename acc_t>
void launch(Kernel kernel, int64_t splits, int64_t smem, const DecodeParams& p, const Partials<acc_t>& w) {
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.num_heads_k),
                  static_cast<unsigned>(p.num_seqs * p.num_queries));
  launch_kernel(kernel, grid, kThreads, smem, p, w);
}

}  // namespace

void decode_attention_cuda(const DecodeParams& p, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(p.num_seqs * p.num_queries <= 65535 && p.num_heads_k <= 65535, "nsa: argument 'q' has ",
                    p.num_seqs, " sequences of ", p.num_queries, " new queries and ", p.num_heads_k,
                    " kv heads: the CUDA decoding kernels take at most 65535 (sequence, query) pairs and kv heads");
  const DeviceLimits device = current_device_limits();
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t tasks = p.num_seqs * p.num_queries * p.num_heads_k;
  const int64_t max_blocks = num_select_blocks(p.key_capacity, p.selection.select_block);
  const DecodeSplits splits = plan_decode_splits(
      tasks, int64_t(kBlocksPerSm) * device.sm_count, kMinSplitRows, p.token_capacity,
      p.selection.select_count * p.selection.select_block, std::min(p.window, p.key_capacity));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_decode_attention_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t attend_smem = attend_smem_bytes(p, sizeof(acc_t));
    const int64_t select_smem = select_smem_bytes(p, sizeof(acc_t), max_blocks);
    const int64_t limit = device.smem_per_block;
    TORCH_CHECK_VALUE(attend_smem <= limit, "nsa: arguments 'q' and 'v_cache': a group of ", group,
                      " query heads with Dk = ", p.head_dim_qk, " and Dv = ", p.head_dim_v, " needs ", attend_smem,
                      " bytes of shared memory in the CUDA decoding kernels, more than the device's ", limit);
    TORCH_CHECK_VALUE(select_smem <= limit, "nsa: argument 'k_cache' holds ", p.key_capacity,
                      " keys per sequence: its ", max_blocks, " selection blocks need ", select_smem,
                      " bytes of shared memory, more than the device's ", limit);

    const int64_t records = splits.total();
    const int64_t block_items = tasks * group * max_blocks;
    at::Tensor workspace = at::empty({tasks * records * group * (p.head_dim_v + 2) + 2 * block_items},
                                     current_device_options(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    Partials<acc_t> w;
    w.out = workspace.data_ptr<acc_t>();
    w.max = w.out + tasks * records * group * p.head_dim_v;
    w.sum = w.max + tasks * records * group;
    w.block_sum = w.sum + tasks * records * group;
    w.block_max = w.block_sum + block_items;
    w.splits = splits;
    w.max_blocks = max_blocks;

    launch(decode_compressed_kernel<scalar_t, acc_t>, splits.compressed, attend_smem, p, w);
    launch(decode_select_kernel<acc_t>, 1, select_smem, p, w);
    launch(decode_sparse_kernel<scalar_t, acc_t>, splits.selected + splits.window, attend_smem, p, w);
    launch(decode_combine_kernel<scalar_t, acc_t>, 1, 0, p, w);
  });
}

}  // namespace nsa
