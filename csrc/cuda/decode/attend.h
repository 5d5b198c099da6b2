#pragma once
// The attend kernel of fused NSA decoding (csrc/cuda/decode_attention.cu describes the four launches):
// one thread block runs an online softmax over some rows of one branch, for the query heads of one
// group it takes, and stores its output, max and sum as one record of its task. The compressed branch
// also sums the scores of its selection blocks (Eq. 9). Two ways to do the arithmetic, one loop:
//   SimtMath: fp32 / fp64 and head dims without a tensor-core instantiation: a thread scores one key
//             row against eight heads, straight from global memory;
//   MmaMath:  bf16 / fp16 with a compiled head-dim pair (decode/hdim*.cu): 64-row chunks of keys and
//             values stream through shared memory by cp.async, double-buffered, and tensor cores
//             compute scores (16 heads x 16 keys per warp) and P V (16 heads x Dv/4 columns per
//             warp). Decoding reads every row once per group, so a step is bound by memory only if
//             its arithmetic keeps up: at G = 16, Dk = 192 that is 16 flops per byte, ~50 TFLOP/s at
//             3 TB/s, beyond what fp32 FMAs sustain next to conversions and address math.
#include <cstdint>
#include <type_traits>

#include "common/decode_params.h"
#include "common/decode_split.h"
#include "common/mma_layout.h"
#include "cuda/baseline.h"
#include "cuda/runtime.h"
#include "cuda/tile/device_utils.h"

namespace nsa {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 64;           // key rows per online-softmax step
constexpr int64_t kMinSplitRows = 2 * kChunk;
constexpr int kMmaHeads = 16;        // the rows of an mma tile: query heads per tensor-core block

using baseline::fast_exp;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

NSA_HOST_DEVICE int64_t round_up(int64_t value, int64_t multiple) { return ceil_div(value, multiple) * multiple; }

// Thread blocks per split and task: a group larger than block_heads is cut into head slices.
NSA_HOST_DEVICE int64_t head_slices(int64_t group, int64_t block_heads) {
  return group > block_heads ? ceil_div(group, block_heads) : 1;
}

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
  int64_t max_blocks;   // selection blocks of a full cache
  int64_t block_heads;  // query heads one attend block takes (the whole group for SimtMath)
};

// The task of a thread block: grid (split * head slices + slice, kv head, sequence * TQ + query).
// The select and combine kernels take whole groups (block_heads = G, one slice, split 0).
struct Task {
  int64_t b, query, head_k, group, id;
  int64_t split;
  int head0, heads;  // the group's query heads [head0, head0 + heads) of this block
  int64_t length;    // live keys, clamped to the capacity
  int64_t position;  // the query's position (< 0 when cache_seqlens[b] < TQ: the query sees nothing)

  __device__ Task(const DecodeParams& p, int64_t block_heads)
      : b(blockIdx.z / static_cast<unsigned>(p.num_queries)),  // the host checks B * TQ <= 65535
        query(blockIdx.z % static_cast<unsigned>(p.num_queries)),
        head_k(blockIdx.y),
        group(p.num_heads_q / p.num_heads_k),
        id(static_cast<int64_t>(blockIdx.z) * p.num_heads_k + blockIdx.y),
        split(blockIdx.x / head_slices(group, block_heads)),
        head0(static_cast<int>(blockIdx.x % head_slices(group, block_heads) * block_heads)),
        heads(static_cast<int>(imin(block_heads, group - head0))),
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

// The per-head softmax state and chunk scores both arithmetics keep in shared memory, and the
// branch's key ranges.
template <typename acc_t>
struct SoftmaxSmem {
  acc_t* scores;       // [kChunk][score_stride]: scores, then exp(score - max), of the current chunk
  int score_stride;    // >= the block's heads
  acc_t* max;          // [heads] running max
  acc_t* sum;          // [heads] running sum
  acc_t* alpha;        // [heads] rescale factor of the current chunk
  KeyRange* ranges;    // [n] key ranges of the branch
  int64_t* range_end;  // [n] their cumulative row counts
};

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// One online-softmax step: a warp per head, a lane per key. Scores of rows [0, rows) become
// exp(score - new max); rows before `skip` are left out of the sum.
template <typename acc_t>
__device__ void chunk_softmax(const SoftmaxSmem<acc_t>& s, int heads, int rows, int skip) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < heads; h += kWarps) {
    acc_t top = s.max[h];
    for (int r = lane; r < rows; r += 32) top = max(top, s.scores[r * s.score_stride + h]);
    top = warp_max(top);
    acc_t total = 0;
    for (int r = lane; r < rows; r += 32) {
      const acc_t prob = fast_exp(s.scores[r * s.score_stride + h] - top);
      s.scores[r * s.score_stride + h] = prob;
      if (r >= skip) total += prob;
    }
    total = baseline::warp_sum(total);
    __syncwarp();  // every lane has read s.max[h] (shuffles order no memory)
    if (lane == 0) {
      s.alpha[h] = fast_exp(s.max[h] - top);  // 0 on the first chunk (max was -inf)
      s.sum[h] = s.sum[h] * s.alpha[h] + total;
      s.max[h] = top;
    }
  }
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

// --- SimtMath: one key row and eight heads per thread ----------------------------------------------

template <typename scalar_t, typename acc_t_>
struct SimtMath {
  using acc_t = acc_t_;
  static constexpr int kHeadsPerPass = 8;  // heads whose dot products or outputs a thread keeps in registers

  // Heads padded to a multiple of kHeadsPerPass and the query dim to a multiple of 4, with zeros, so
  // that threads read them as aligned vectors without bounds checks.
  struct Sizes {
    int64_t heads_padded, dim_padded;
    __host__ __device__ explicit Sizes(const DecodeParams& p)
        : heads_padded(round_up(p.num_heads_q / p.num_heads_k, kHeadsPerPass)), dim_padded(round_up(p.head_dim_qk, 4)) {}
  };

  static int64_t smem_bytes(const DecodeParams& p) {
    const Sizes z(p);
    const int64_t group = p.num_heads_q / p.num_heads_k;
    return (z.heads_padded * (z.dim_padded + kChunk) + group * (p.head_dim_v + 3)) * int64_t(sizeof(acc_t)) +
           p.selection.select_count * static_cast<int64_t>(sizeof(KeyRange) + sizeof(int64_t)) +
           2 * kChunk * static_cast<int64_t>(sizeof(int64_t));
  }

  SoftmaxSmem<acc_t> s;
  acc_t* queries;          // [heads_padded][dim_padded], pre-scaled
  int64_t* key_offsets;    // [kChunk] element offset of each key row of the current chunk
  int64_t* value_offsets;  // [kChunk] and of its value row
  acc_t* acc;              // [G][Dv]
  int heads_padded, dim_padded;

  __device__ void init(const DecodeParams& p, const Task& t, unsigned char* raw) {
    const Sizes z(p);
    heads_padded = static_cast<int>(z.heads_padded);
    dim_padded = static_cast<int>(z.dim_padded);
    queries = reinterpret_cast<acc_t*>(raw);
    s.scores = queries + z.heads_padded * z.dim_padded;
    s.score_stride = heads_padded;
    // Both arrays above span a multiple of 32 elements, so what follows stays 16-byte aligned.
    s.ranges = reinterpret_cast<KeyRange*>(s.scores + kChunk * z.heads_padded);
    s.range_end = reinterpret_cast<int64_t*>(s.ranges + p.selection.select_count);
    key_offsets = s.range_end + p.selection.select_count;
    value_offsets = key_offsets + kChunk;
    acc = reinterpret_cast<acc_t*>(value_offsets + kChunk);
    s.max = acc + t.group * p.head_dim_v;
    s.sum = s.max + t.group;
    s.alpha = s.sum + t.group;
    const scalar_t* q = static_cast<const scalar_t*>(p.q);
    const int dk = static_cast<int>(p.head_dim_qk), group = static_cast<int>(t.group);
    for (int e = threadIdx.x; e < heads_padded * dim_padded; e += kThreads) {
      const int g = e / dim_padded, x = e % dim_padded;
      const int64_t head = t.head_k * t.group + g;
      const bool real = g < group && x < dk;  // else padding
      queries[e] = real ? static_cast<acc_t>(q[p.q_strides.offset(t.b, t.query, head) + x]) * acc_t(p.scale)
                        : acc_t(0);
    }
  }

  __device__ void reset(const DecodeParams& p, const Task& t) {
    const int dv = static_cast<int>(p.head_dim_v);
    for (int e = threadIdx.x; e < t.heads * dv; e += kThreads) acc[e] = 0;
  }

  // Loads go straight from global memory: nothing to prefetch.
  __device__ void prepare(const Task&, const Rows&, int64_t, int, int) {}
  __device__ void arrive() {}
  __device__ void issue(const Rows&, int, int) {}

  // Scores of rows [c0, c0 + rows) into s.scores[r][g], the rows' key and value offsets into
  // key_offsets / value_offsets. The lanes of a warp read different rows and the same queries (a
  // shared-memory broadcast), so the dot products need no shuffles.
  __device__ void scores(const DecodeParams& p, const Task& t, const Rows& src, int64_t c0, int rows, int) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      const int64_t key = src.key_row(c0 + r);
      key_offsets[r] = src.k_strides.offset(t.b, key, t.head_k);
      value_offsets[r] = src.v_strides.offset(t.b, key, t.head_k);
    }
    __syncthreads();
    const int dk = static_cast<int>(p.head_dim_qk);
    const scalar_t* keys = static_cast<const scalar_t*>(src.k);
    for (int item = threadIdx.x; item < rows * (heads_padded / kHeadsPerPass); item += kThreads) {
      const int r = item % rows, g0 = item / rows * kHeadsPerPass;
      const scalar_t* key = keys + key_offsets[r];
      acc_t dot[kHeadsPerPass] = {};
      for (int x = 0; x < dim_padded; x += 4) {
        acc_t k[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) k[e] = x + e < dk ? static_cast<acc_t>(key[x + e]) : acc_t(0);
#pragma unroll
        for (int i = 0; i < kHeadsPerPass; ++i) {
          acc_t q[4];
          load_aligned(queries + (g0 + i) * dim_padded + x, q);
          dot[i] += q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + q[3] * k[3];
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerPass; ++i) s.scores[r * s.score_stride + g0 + i] = dot[i];
    }
  }

  // acc = acc * alpha + P V over the chunk's rows [skip, rows). A thread takes one output column x
  // and kHeadsPerPass heads: each value is read once per pass.
  __device__ void accumulate(const DecodeParams& p, const Task& t, const Rows& src, int rows, int skip, int) {
    const int group = static_cast<int>(t.group), dv = static_cast<int>(p.head_dim_v);
    const scalar_t* values = static_cast<const scalar_t*>(src.v);
    for (int item = threadIdx.x; item < dv * (heads_padded / kHeadsPerPass); item += kThreads) {
      const int x = item % dv, g0 = item / dv * kHeadsPerPass;
      acc_t out[kHeadsPerPass];
#pragma unroll
      for (int i = 0; i < kHeadsPerPass; ++i) out[i] = g0 + i < group ? acc[(g0 + i) * dv + x] * s.alpha[g0 + i] : acc_t(0);
      for (int r = skip; r < rows; ++r) {
        const acc_t value = static_cast<acc_t>(values[value_offsets[r] + x]);
        acc_t prob[kHeadsPerPass];
        load_aligned(s.scores + r * s.score_stride + g0, prob);
#pragma unroll
        for (int i = 0; i < kHeadsPerPass; ++i) out[i] += prob[i] * value;
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerPass; ++i)
        if (g0 + i < group) acc[(g0 + i) * dv + x] = out[i];
    }
  }

  // The group's output rows of a record (`out`: its [G][Dv]), from shared memory (the caller syncs first).
  __device__ void store_out(const DecodeParams& p, const Task& t, acc_t* out) const {
    const int dv = static_cast<int>(p.head_dim_v);
    for (int e = threadIdx.x; e < t.heads * dv; e += kThreads) out[e] = acc[e];
  }
};

// --- MmaMath: tensor cores over chunks streamed through shared memory ------------------------------

// Shared memory of MmaMath<.., dk, dv> for n selected blocks, in carve order.
struct MmaLayout {
  static constexpr int kPad = 8;           // 16 bytes per row: conflict-free ldmatrix (as tile/traits.h)
  static constexpr int kScoreStride = 20;  // 16 heads + 4: fragment-order score accesses hit 32 banks
  int64_t stride_qk, stride_v;
  int64_t q, k, v, scores, offsets, softmax, ranges, total;  // byte offsets, then the size
  __host__ __device__ MmaLayout(int64_t dk, int64_t dv, int64_t select_count)
      : stride_qk(dk + kPad), stride_v(dv + kPad) {
    q = 0;
    k = q + 2 * kMmaHeads * stride_qk;
    v = k + 2 * 2 * kChunk * stride_qk;  // two stages
    scores = v + 2 * 2 * kChunk * stride_v;
    offsets = scores + 4 * kChunk * kScoreStride;
    softmax = offsets + 8 * 2 * 2 * kChunk;  // key and value offsets of two stages
    ranges = softmax + 4 * 3 * kMmaHeads;
    total = ranges + select_count * static_cast<int64_t>(sizeof(KeyRange) + sizeof(int64_t));
  }
};

template <typename Element, int kHeadDimQK, int kHeadDimV>
struct MmaMath {
  using acc_t = float;
  static constexpr int kCols = kHeadDimV / kWarps;  // output columns per warp
  static constexpr int kStrideQK = kHeadDimQK + MmaLayout::kPad;
  static constexpr int kStrideV = kHeadDimV + MmaLayout::kPad;
  static_assert(kHeadDimQK % 16 == 0 && kCols % 16 == 0, "whole mma steps");

  static int64_t smem_bytes(const DecodeParams& p) {
    return MmaLayout(kHeadDimQK, kHeadDimV, p.selection.select_count).total;
  }

  SoftmaxSmem<float> s;
  Element* queries;         // [16][kStrideQK], zero rows past the block's heads
  Element* keys;            // [2][kChunk][kStrideQK]
  Element* values;          // [2][kChunk][kStrideV]
  int64_t* key_offsets;     // [2][kChunk] element offsets of the rows of the chunk in each stage
  int64_t* value_offsets;   // [2][kChunk]
  float scale;
  float acc[kCols / 8][4];  // this warp's output columns, mma accumulator layout

  __device__ void init(const DecodeParams& p, const Task& t, unsigned char* raw) {
    const MmaLayout layout(kHeadDimQK, kHeadDimV, p.selection.select_count);
    queries = reinterpret_cast<Element*>(raw + layout.q);
    keys = reinterpret_cast<Element*>(raw + layout.k);
    values = reinterpret_cast<Element*>(raw + layout.v);
    s.scores = reinterpret_cast<float*>(raw + layout.scores);
    s.score_stride = MmaLayout::kScoreStride;
    key_offsets = reinterpret_cast<int64_t*>(raw + layout.offsets);
    value_offsets = key_offsets + 2 * kChunk;
    s.max = reinterpret_cast<float*>(raw + layout.softmax);
    s.sum = s.max + kMmaHeads;
    s.alpha = s.sum + kMmaHeads;
    s.ranges = reinterpret_cast<KeyRange*>(raw + layout.ranges);
    s.range_end = reinterpret_cast<int64_t*>(s.ranges + p.selection.select_count);
    scale = static_cast<float>(p.scale);
    const Element* q = static_cast<const Element*>(p.q);
    for (int e = threadIdx.x; e < kMmaHeads * kHeadDimQK; e += kThreads) {
      const int h = e / kHeadDimQK, x = e % kHeadDimQK;
      const int64_t head = t.head_k * t.group + t.head0 + h;
      queries[h * kStrideQK + x] = h < t.heads ? q[p.q_strides.offset(t.b, t.query, head) + x] : Element(0.f);
    }
  }

  __device__ void reset(const DecodeParams&, const Task&) { tiled::zero(acc); }

  // The element offsets of the chunk's rows, for issue() after the next barrier.
  __device__ void prepare(const Task& t, const Rows& src, int64_t c0, int rows, int stage) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      const int64_t key = src.key_row(c0 + r);
      key_offsets[stage * kChunk + r] = src.k_strides.offset(t.b, key, t.head_k);
      value_offsets[stage * kChunk + r] = src.v_strides.offset(t.b, key, t.head_k);
    }
  }

  __device__ void arrive() { tiled::cp_async_wait<0>(); }

  // cp.async of the chunk's key and value rows into `stage`; rows past `rows` are zero-filled.
  __device__ void issue(const Rows& src, int rows, int stage) {
    const Element* k = static_cast<const Element*>(src.k);
    const Element* v = static_cast<const Element*>(src.v);
    const int64_t* ko = key_offsets + stage * kChunk;
    const int64_t* vo = value_offsets + stage * kChunk;
    tiled::load_tile_async<kChunk, kHeadDimQK, kStrideQK, kThreads>(
        keys + stage * kChunk * kStrideQK, k, [&](int r) { return r < rows ? k + ko[r] : nullptr; });
    tiled::load_tile_async<kChunk, kHeadDimV, kStrideV, kThreads>(
        values + stage * kChunk * kStrideV, v, [&](int r) { return r < rows ? v + vo[r] : nullptr; });
    tiled::cp_async_commit();
  }

  // Warp w scores keys [16w, 16w + 16) of the chunk against the 16 head rows; keys past `rows` get -inf.
  __device__ void scores(const DecodeParams&, const Task&, const Rows&, int64_t, int rows, int stage) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float product[2][4];
    tiled::zero(product);
    tiled::gemm_ss<Element, 16, kHeadDimQK>(product, queries, kStrideQK,
                                            keys + (stage * kChunk + 16 * warp) * kStrideQK, kStrideQK, lane);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const mma::RowCol c = mma::c_element(lane, i);
        const int key = 16 * warp + 8 * nb + c.col;
        s.scores[key * s.score_stride + c.row] = key < rows ? product[nb][i] * scale : -INFINITY;
      }
  }

  // acc = acc * alpha + P V: warp w takes output columns [w kCols, (w + 1) kCols) over the chunk's 64
  // keys; P comes from s.scores as A fragments, zero outside heads [0, heads) and keys [skip, rows).
  __device__ void accumulate(const DecodeParams&, const Task& t, const Rows&, int rows, int skip, int stage) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_lo = mma::c_element(lane, 0).row, row_hi = mma::c_element(lane, 2).row;
    const float alpha_lo = row_lo < t.heads ? s.alpha[row_lo] : 0.f;
    const float alpha_hi = row_hi < t.heads ? s.alpha[row_hi] : 0.f;
#pragma unroll
    for (int nb = 0; nb < kCols / 8; ++nb) {
      acc[nb][0] *= alpha_lo;
      acc[nb][1] *= alpha_lo;
      acc[nb][2] *= alpha_hi;
      acc[nb][3] *= alpha_hi;
    }
    uint32_t probs[kChunk / 16][4];
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        float pair[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const mma::RowCol a = mma::a_element(lane, 2 * reg + half);
          const int key = 16 * kk + a.col;
          pair[half] = a.row < t.heads && key >= skip && key < rows ? s.scores[key * s.score_stride + a.row] : 0.f;
        }
        probs[kk][reg] = tiled::Mma<Element>::pack(pair[0], pair[1]);
      }
    tiled::gemm_rs<Element, kCols, kChunk>(acc, probs, values + stage * kChunk * kStrideV + warp * kCols, kStrideV,
                                           lane);
  }

  // This warp's columns of the block's head rows of a record (`out`: row head0 of its [G][Dv]).
  __device__ void store_out(const DecodeParams&, const Task& t, float* out) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int nb = 0; nb < kCols / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const mma::RowCol c = mma::c_element(lane, i);
        if (c.row < t.heads) out[c.row * kHeadDimV + warp * kCols + 8 * nb + c.col] = acc[nb][i];
      }
  }
};

// --- the attend kernel ---------------------------------------------------------------------------

enum Branch : int { kCompressedBranch = 0, kSparseBranch = 1 };  // sparse: the selected and window splits

// One thread block's online softmax over some rows of one branch, for its heads of the group.
template <typename Math>
struct Attend {
  using acc_t = typename Math::acc_t;
  const DecodeParams& p;
  Task t;
  Math m;

  __device__ Attend(const DecodeParams& params, const Partials<acc_t>& w, unsigned char* smem)
      : p(params), t(params, w.block_heads) {
    m.init(p, t, smem);
  }

  // The branch's rows as one key range [begin, end), written by thread 0 (the caller syncs).
  __device__ void set_single_range(int64_t begin, int64_t end) {
    if (threadIdx.x == 0) {
      m.s.ranges[0] = {begin, end};
      m.s.range_end[0] = end - begin;
    }
  }

  // Online softmax over the logical rows [begin, end) of src. Rows before owned_begin are scored,
  // and their block scores summed, but left out of the output and the sum. With `blocks` (the
  // compressed branch), every chunk adds its tokens' weighted probabilities to the split's blocks.
  __device__ void run(const Rows& src, int64_t begin, int64_t owned_begin, int64_t end, const Partials<acc_t>& w,
                      const CompressedSplit* blocks) {
    for (int h = threadIdx.x; h < t.heads; h += kThreads) {
      m.s.max[h] = -INFINITY;
      m.s.sum[h] = 0;
    }
    m.reset(p, t);
    if (begin < end) m.prepare(t, src, begin, static_cast<int>(imin(kChunk, end - begin)), 0);
    __syncthreads();
    if (begin < end) m.issue(src, static_cast<int>(imin(kChunk, end - begin)), 0);
    int stage = 0;
    for (int64_t c0 = begin; c0 < end; c0 += kChunk, stage ^= 1) {
      const int rows = static_cast<int>(imin(kChunk, end - c0));
      const int skip = static_cast<int>(imax(0, imin(rows, owned_begin - c0)));
      const int next_rows = static_cast<int>(imax(0, imin(kChunk, end - c0 - kChunk)));
      if (next_rows > 0) m.prepare(t, src, c0 + kChunk, next_rows, stage ^ 1);
      m.arrive();  // this chunk's rows have landed (the next chunk is not issued yet)
      __syncthreads();
      if (next_rows > 0) m.issue(src, next_rows, stage ^ 1);  // overlaps this chunk's arithmetic
      m.scores(p, t, src, c0, rows, stage);
      __syncthreads();
      chunk_softmax(m.s, t.heads, rows, skip);
      __syncthreads();
      if (blocks) sum_block_scores(w, *blocks, c0, rows);
      m.accumulate(p, t, src, rows, skip, stage);
    }
    __syncthreads();
  }

  // Eq. 9 within a compressed split: the blocks of the split that this chunk's tokens meet, one
  // thread per (head, block), tokens in order; a block's sum is kept with the max it is relative to.
  __device__ void sum_block_scores(const Partials<acc_t>& w, const CompressedSplit& split, int64_t c0, int count) {
    // Token and block ids fit in int (cache_seqlens is int32); 32-bit division is inline, 64-bit a call.
    const BlockSelection& sel = p.selection;
    const int block_chunks = static_cast<int>(sel.block_chunks()), token_chunks = static_cast<int>(sel.token_chunks());
    acc_t* block_sum = w.block_sum + t.id * t.group * w.max_blocks;
    acc_t* block_max = w.block_max + t.id * t.group * w.max_blocks;
    const int chunk = static_cast<int>(c0);
    const int first = max(static_cast<int>(split.block_begin), chunk / block_chunks);
    const int last = min(static_cast<int>(split.block_end) - 1, (chunk + count + token_chunks - 2) / block_chunks);
    const int blocks = last - first + 1;  // a chunk meets few blocks
    for (int item = threadIdx.x; item < t.heads * blocks; item += kThreads) {
      const int h = item / blocks, j = first + item % blocks;
      // First token of the split that meets block j; earlier chunks hold those before `chunk`.
      const int reach = max(static_cast<int>(split.scored_begin), j * block_chunks - token_chunks + 1);
      acc_t total = 0;
      for (int r = max(reach - chunk, 0); r < min(count, (j + 1) * block_chunks - chunk); ++r)
        total += acc_t(sel.overlap(c0 + r, j)) * m.s.scores[r * m.s.score_stride + h];
      const int64_t slot = (t.head0 + h) * w.max_blocks + j;
      if (reach < chunk) total += block_sum[slot] * fast_exp(block_max[slot] - m.s.max[h]);
      block_sum[slot] = total;
      block_max[slot] = m.s.max[h];
    }
  }

  // The block's output, max and sum per head, as record `record` of the task.
  __device__ void store(const Partials<acc_t>& w, int64_t record) const {
    const int64_t first_row = (t.id * w.splits.total() + record) * t.group + t.head0;
    m.store_out(p, t, w.out + first_row * p.head_dim_v);
    for (int h = threadIdx.x; h < t.heads; h += kThreads) {
      w.max[first_row + h] = m.s.max[h];
      w.sum[first_row + h] = m.s.sum[h];
    }
  }
};

template <typename Math>
__global__ void __launch_bounds__(kThreads, 1) decode_attend_kernel(const __grid_constant__ DecodeParams p,
                                                                 const __grid_constant__ Partials<typename Math::acc_t> w,
                                                                 int branch) {
  NSA_DYNAMIC_SMEM(smem_raw);
  Attend<Math> a(p, w, smem_raw);
  const Task& t = a.t;
  const BlockSelection& sel = p.selection;
  if (branch == kCompressedBranch) {
    const int64_t tokens = t.visible_tokens(p);
    const CompressedSplit split = compressed_split(sel, tokens, w.splits.compressed, t.split);
    a.set_single_range(0, tokens);
    __syncthreads();
    const Rows rows{p.k_cmp, p.v_cmp, p.k_cmp_strides, p.v_cmp_strides, a.m.s.ranges, a.m.s.range_end, 1};
    a.run(rows, split.scored_begin, split.token_begin, split.token_end, w, &split);
    a.store(w, t.split);
    return;
  }
  const bool window = t.split >= w.splits.selected;
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
        a.m.s.ranges[n] = {begin, end};
        rows += end - begin;
        a.m.s.range_end[n++] = rows;
      }
    }
    __syncthreads();
    rows = num_ranges ? a.m.s.range_end[num_ranges - 1] : 0;
  } else if (t.position >= 0) {
    const int64_t window_begin = imax(0, t.position + 1 - p.window);
    rows = t.position + 1 - window_begin;
    a.set_single_range(window_begin, t.position + 1);
  }
  __syncthreads();
  const KeyRange part = window ? even_split(rows, w.splits.window, t.split - w.splits.selected)
                               : even_split(rows, w.splits.selected, t.split);
  const Rows src{window ? p.k_swa : p.k,
                 window ? p.v_swa : p.v,
                 window ? p.k_swa_strides : p.k_strides,
                 window ? p.v_swa_strides : p.v_strides,
                 a.m.s.ranges,
                 a.m.s.range_end,
                 num_ranges};
  a.run(src, part.begin, part.begin, part.end, w, nullptr);
  a.store(w, w.splits.compressed + t.split);
}

// Grid (splits * head slices, kv heads, sequences * TQ) of one branch's attend kernel.
template <typename Math>
void launch_attend(const DecodeParams& p, const Partials<typename Math::acc_t>& w, Branch branch) {
  const int64_t splits = branch == kCompressedBranch ? w.splits.compressed : w.splits.selected + w.splits.window;
  const int64_t slices = head_slices(p.num_heads_q / p.num_heads_k, w.block_heads);
  const dim3 grid(static_cast<unsigned>(splits * slices), static_cast<unsigned>(p.num_heads_k),
                  static_cast<unsigned>(p.num_seqs * p.num_queries));
  launch_kernel(decode_attend_kernel<Math>, grid, kThreads, Math::smem_bytes(p), p, w, static_cast<int>(branch));
}

// The tensor-core attend kernel of one head-dim pair; defined per pair in decode/hdim*.cu.
template <typename Element, int kHeadDimQK, int kHeadDimV>
void launch_tiled_attend(const DecodeParams& p, const Partials<float>& w, Branch branch);

}  // namespace decode
}  // namespace nsa
