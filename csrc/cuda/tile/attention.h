#pragma once
// FlashAttention-2-style tensor-core kernels for bf16 / fp16, shared by every attention family
// (dense: sliding window and compressed tokens, csrc/cuda/dense/; selected blocks,
// csrc/cuda/selection/). What differs between families is which keys a query tile visits and which
// queries a key tile serves; that is a policy type, the kernels are one template each:
//   fwd_kernel<Kt, Schedule, TileMma>  one block per (query tile, kv head): online softmax over the
//                              key tiles the schedule lists; TileMma: mma.sync (WarpMma) or, on sm_90a,
//                              wgmma (WarpgroupMma).
//   delta_kernel               delta = rowsum(dO * O) - dlse per (query row, head).
//   dq_kernel<Kt, Schedule, TileMma>  one block per (query tile, kv head): dQ = scale * sum over key
//                              tiles of dS K (TileMma as the forward's).
//   dkv_kernel<Kt, KeyBlock>   one block per (key tile, kv head, column slice): dK, dV over the query
//                              rows the KeyBlock policy lists. No atomics anywhere: every output element
//                              is written by one thread after a fixed-order loop, so reruns are bitwise equal.
//
// GQA: a query tile stacks the G query heads of one kv head. Stacked row r of a sequence is query
// position r / G, query head kv_head * G + r % G; one K/V tile in shared memory then serves all G heads.
//
// Schedule (fwd, dq), built per block after the query tile is known:
//   Schedule::Params, BwdParams   the forward's and the backward's parameter structs.
//   Schedule::tile(p, rows)    the block's QueryTile; OutElement<Element>, output<Out>(p, qt, row) and
//                              dq_output<Out>(p, qt, row): where the forward and dq kernels write a row
//                              (StackedTiles: stacked rows, o, lse and dq in place).
//   Schedule(p, qt, scratch, own, warp, lane)  may use `scratch` (the K/V stages, free until the first
//                              load) and Schedule::kSmemBytes of its own after the kernel's tiles; it
//                              must be called by every thread (it may synchronise the block).
//   steps()                    number of kBlockN-key tiles visited; at(step) -> Step{key0, key_limit}:
//                              the tile's first key and the key rows it may read (loads zero-fill the rest).
//   warp_active(step)          false when none of the warp's rows sees the tile (warp-uniform): skip it.
//   needs_mask(step), visible(step, h, key): whether key is visible to this thread's row half h.
// KeyBlock (dkv): see dkv_kernel.
// c10 headers only, not ATen: the per-head-dim files then compile in a fraction of the time.
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "common/attention_params.h"
#include "common/selection.h"
#include "cuda/runtime.h"
#include "cuda/tile/device_utils.h"
#include "cuda/tile/traits.h"
#include "cuda/tile/wgmma.h"

namespace nsa {
namespace tiled {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct QueryHead {
  int64_t query;  // query row of the sequence
  int64_t head;
};

// Element offset of (query row `row` of the sequence, head) in a [.., Hq, D] tensor or [.., Hq] (lse).
__device__ __forceinline__ int64_t query_offset(const Strides& st, const SeqSpan& s, int64_t row, int64_t head) {
  return st.offset(s.batch, s.q_row_begin + row, head);
}

// One tile of query rows of one sequence and kv head, G heads per query: row r is head
// kv_head * G + r % G of query r / G of the sequence (stacked rows), or, when `entries` is set, of the
// query of entries[r / G] (reverse-index entries, common/selection.h: the queries that chose a block).
struct QueryTile {
  SeqSpan span;
  int64_t group;
  int64_t kv_head;
  int64_t row_begin;  // rows [row_begin, row_end), row_end clamped to the sequence (or the entries)
  int64_t row_end;
  const int64_t* entries = nullptr;

  __device__ QueryHead query(int64_t row) const {
    const int64_t q = row / group;
    return {entries ? entry_query(entries[q]) : q, kv_head * group + row % group};
  }
  // Element offset of row `row` in a [.., Hq, D] tensor (q, o, dout, dq) or [.., Hq] (lse).
  __device__ int64_t offset(const Strides& st, int64_t row) const {
    const QueryHead qh = query(row);
    return query_offset(st, span, qh.query, qh.head);
  }
};

// blockIdx.x = sequence * tiles_per_seq + tile; tiles run in reverse so that the tiles with the most
// keys (late queries) start first. blockIdx.y = kv head.
template <typename Params>
__device__ __forceinline__ QueryTile query_tile(const Params& p, int64_t rows_per_tile) {
  QueryTile qt;
  qt.group = p.num_heads_q / p.num_heads_k;
  const int64_t tiles_per_seq = (p.max_seqlen_q * qt.group + rows_per_tile - 1) / rows_per_tile;
  const int64_t seq = blockIdx.x / tiles_per_seq;
  const int64_t tile = tiles_per_seq - 1 - blockIdx.x % tiles_per_seq;
  qt.kv_head = blockIdx.y;
  qt.span = seq_span(p, seq);
  const int64_t rows = qt.span.q_len * qt.group;
  qt.row_begin = tile * rows_per_tile;
  qt.row_end = qt.row_begin + rows_per_tile < rows ? qt.row_begin + rows_per_tile : rows;
  return qt;
}

__device__ __forceinline__ int64_t key_offset(const Strides& st, const SeqSpan& s, int64_t key, int64_t kv_head) {
  return st.offset(s.batch, s.k_row_begin + key, kv_head);
}

// A [kRows, kCols] tile into shared memory, row r from row_ptr(r) (nullptr: zero row): rows of kStride
// elements (kStride > 0; ldmatrix reads them) or, with kStride = kCoreMatrices, the core-matrix
// layout that wgmma reads (cuda/tile/wgmma.h).
constexpr int kCoreMatrices = 0;
template <int kRows, int kCols, int kStride, int kThreads, typename Element, typename RowPtr>
__device__ __forceinline__ void load_tile(Element* smem, const Element* any_valid, RowPtr row_ptr) {
  if constexpr (kStride == kCoreMatrices) load_core_tile_async<kRows, kCols, kThreads>(smem, any_valid, row_ptr);
  else load_tile_async<kRows, kCols, kStride, kThreads>(smem, any_valid, row_ptr);
}

// [kRows, kDim] tile of the query tile's rows [row_begin, row_begin + kRows) of a [.., Hq, D] tensor
// (q, dout) into shared memory; rows at or past row_end are zero-filled.
template <int kRows, int kDim, int kStride, int kThreads, typename Element>
__device__ __forceinline__ void load_query_rows(Element* smem, const void* base, const Strides& st,
                                                const QueryTile& qt) {
  const Element* t = static_cast<const Element*>(base);
  load_tile<kRows, kDim, kStride, kThreads>(smem, t, [&](int r) -> const Element* {
    return qt.row_begin + r < qt.row_end ? t + qt.offset(st, qt.row_begin + r) : nullptr;
  });
}

// [kRows, kDim] tile of key rows [key0, key0 + kRows) of a [.., Hk, D] tensor (k, v); rows at or past
// key_limit (at most the sequence's key rows) are zero-filled and never read.
template <int kRows, int kDim, int kStride, int kThreads, typename Element>
__device__ __forceinline__ void load_key_rows(Element* smem, const void* base, const Strides& st, const SeqSpan& s,
                                              int64_t key0, int64_t key_limit, int64_t kv_head) {
  const Element* t = static_cast<const Element*>(base);
  load_tile<kRows, kDim, kStride, kThreads>(smem, t, [&](int r) -> const Element* {
    return key0 + r < key_limit ? t + key_offset(st, s, key0 + r, kv_head) : nullptr;
  });
}

// Where the forward writes a row: its Dv outputs (contiguous) and its lse.
template <typename Out>
struct OutputRow {
  Out* o;
  float* lse;
};

// The default query tiles of the forward and dq kernels: stacked rows of one sequence (query_tile),
// written in place to o and lse. Schedules derive from it and override what differs.
struct StackedTiles {
  template <typename Element>
  using OutElement = Element;
  template <typename Params>
  __device__ static QueryTile tile(const Params& p, int rows) {
    return query_tile(p, rows);
  }
  template <typename Out, typename Params>
  __device__ OutputRow<Out> output(const Params& p, const QueryTile& qt, int64_t row) const {
    return {static_cast<Out*>(p.o) + qt.offset(p.o_strides, row),
            static_cast<float*>(p.lse) + qt.offset(p.lse_strides, row)};
  }
  // Where the dq kernel writes a row's Dk outputs.
  template <typename Out, typename Params>
  __device__ Out* dq_output(const Params& p, const QueryTile& qt, int64_t row) const {
    return static_cast<Out*>(p.dq) + qt.offset(p.dq_strides, row);
  }
};

// How the forward and dq kernels multiply (their TileMma parameter). Both leave a warp's 16-row
// results in the mma.m16n8k16 accumulator layout, so everything between the products is shared.
//   WarpMma:      mma.sync, each warp its 16 rows; tiles in padded rows read by ldmatrix (sm_80+).
//   WarpgroupMma: wgmma, each warpgroup its 64 rows in one instruction per 16-wide k-step; tiles as
//                 core matrices read by the tensor cores directly (sm_90a; cuda/tile/wgmma.h).
// Tiles: the block's query-row tile ([kRows][..]: Q, dO) is the A of abt for the warp's rows; key tiles
// ([kBlockN][..]: K, V) are the B of abt (rows = n) and of pb (rows = the k of P's columns).
template <typename Kt>
struct WarpMma {
  using Element = typename Kt::Element;
  // Elements per shared-memory row of a tile of kCols columns, and the stride load_tile takes.
  template <int kCols>
  static constexpr int kRowElements = kCols + Kt::kPad;
  template <int kCols>
  static constexpr int kLoadStride = kCols + Kt::kPad;
  static constexpr bool kPerWarp = true;  // a warp may skip a tile none of its rows sees
  static constexpr bool kTensorCoreReads = false;  // shared memory is read by ldmatrix
  static constexpr int kFwdStages = 2;  // K/V pipeline stages of the forward (see fwd_kernel)
  static constexpr int kFwdSmem = Kt::kFwdSmem, kDqSmem = Kt::kDqSmem;

  // acc (zeroed) = A B^T over kK columns: A the warp's 16 rows of a query-row tile, B kNOut key rows.
  // Both products are complete on return (kWait is the asynchronous policy's; the forward's overlap,
  // which leaves products running, is WarpgroupMma's only).
  template <int kNOut, int kK, bool kWait = true>
  __device__ static void abt(float (&acc)[kNOut / 8][4], const Element* a, const Element* b, int warp, int lane) {
    constexpr int kStride = kRowElements<kK>;
    gemm_ss<Element, kNOut, kK>(acc, a + warp * 16 * kStride, kStride, b, kStride, lane);
  }
  // acc += P B: P as A fragments over kKeys key rows, B their [kKeys][kNOut] tile.
  template <int kNOut, int kKeys>
  __device__ static void pb(float (&acc)[kNOut / 8][4], const uint32_t (&pa)[kKeys / 16][4], const Element* b, int,
                            int lane) {
    gemm_rs<Element, kNOut, kKeys>(acc, pa, b, kRowElements<kNOut>, lane);
  }
};

template <typename Kt>
struct WarpgroupMma {
  using Element = typename Kt::Element;
  static constexpr int kM = Kt::kRows, kN = Kt::kBlockN, kDqk = Kt::kHeadDimQK, kDv = Kt::kHeadDimV;
  template <int kCols>
  static constexpr int kRowElements = kCols;
  template <int kCols>
  static constexpr int kLoadStride = kCoreMatrices;
  static constexpr bool kPerWarp = false;  // wgmma is issued by all four warps of a warpgroup
  static constexpr bool kTensorCoreReads = true;  // shared memory is read by wgmma (the async proxy)
  // A third K/V stage lets the forward's P V product of one key tile run under the next tile's
  // softmax (fwd_kernel), for ~15 more registers per thread. Taken where registers leave the block
  // alone on its SM anyway: two warpgroups at Dv = 128 (178 registers without it). 64/64 (125)
  // keeps two blocks per SM, and one-warpgroup blocks (192/128, 256/256) two stages, so that two
  // still fit on an SM.
  static constexpr int kFwdStages = Kt::kWarps >= 8 && kDv >= 128 ? 3 : 2;
  static constexpr int kFwdSmem = Kt::kElem * (kM * kDqk + kFwdStages * kN * (kDqk + kDv));
  static constexpr int kDqSmem = Kt::kElem * (kM + 2 * kN) * (kDqk + kDv);
  static constexpr int kOutCols = 64;  // the n of the P B instructions
  static_assert(Kt::kWarps % 4 == 0 && (kN == 32 || kN == 64) && kDqk % kOutCols == 0 && kDv % kOutCols == 0,
                "wgmma shapes");

  // kWait = false leaves a product running: its accumulators (and pb's A registers and either's
  // shared memory) stay untouchable until wait<k>(acc) has waited for it.
  template <int kNOut, int kK, bool kWait = true>
  __device__ static void abt(float (&acc)[kNOut / 8][4], const Element* a, const Element* b, int warp, int) {
    const uint32_t a_tile = smem_addr(a), b_tile = smem_addr(b);
    const int row0 = warp / 4 * 64;  // this warpgroup's rows of the query tile
    fence_registers(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
      wgmma_ss<Element, 0, kNOut>(acc, mma::k_major_descriptor(a_tile, kM, row0, 16 * kk),
                                  mma::k_major_descriptor(b_tile, kNOut, 0, 16 * kk), kk > 0);
    wgmma_commit();
    if constexpr (kWait) wait<0>(acc);
  }
  template <int kNOut, int kKeys, bool kWait = true>
  __device__ static void pb(float (&acc)[kNOut / 8][4], const uint32_t (&pa)[kKeys / 16][4], const Element* b, int,
                            int) {
    const uint32_t b_tile = smem_addr(b);
    fence_registers(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int c = 0; c < kNOut / kOutCols; ++c)
        wgmma_rs<Element, 1, kOutCols>(reinterpret_cast<float(&)[kOutCols / 8][4]>(acc[c * kOutCols / 8]), pa[kk],
                                       mma::n_major_descriptor(b_tile, kKeys, 16 * kk, c * kOutCols), 1);
    wgmma_commit();
    if constexpr (kWait) wait<0>(acc);
  }
  // Waits until at most kPending of the thread's products are running (they complete in order).
  template <int kPending, int kN>
  __device__ static void wait(float (&acc)[kN][4]) {
    wgmma_wait<kPending>();
    fence_registers(acc);
  }
};

// The kBlockN-key tile starting at key0 of K and V into pipeline stage `stage` (forward and dq
// kernels), in the layout TileMma reads.
template <typename Kt, typename TileMma>
__device__ __forceinline__ void load_kv_stage(typename Kt::Element* sK, typename Kt::Element* sV,
                                              const AttentionParams& p, const SeqSpan& s, int64_t kv_head,
                                              int64_t key0, int64_t key_limit, int stage) {
  constexpr int kN = Kt::kBlockN, kDqk = Kt::kHeadDimQK, kDv = Kt::kHeadDimV;
  load_key_rows<kN, kDqk, TileMma::template kLoadStride<kDqk>, Kt::kThreads>(
      sK + stage * kN * TileMma::template kRowElements<kDqk>, p.k, p.k_strides, s, key0, key_limit, kv_head);
  load_key_rows<kN, kDv, TileMma::template kLoadStride<kDv>, Kt::kThreads>(
      sV + stage * kN * TileMma::template kRowElements<kDv>, p.v, p.v_strides, s, key0, key_limit, kv_head);
}

// The pipeline step at the top of each iteration: afterwards this step's tiles (stage step % kStages)
// are in shared memory and visible to every thread, and step + 1 (when there is one) is loading
// into stage (step + 1) % kStages by load_step(step + 1, stage).
//   2 stages: starts that load first; the stage it overwrites was released by the barrier that
//             ended the previous iteration.
//   3 stages: for kernels that read a tile's stage during the next step too (the forward on wgmma:
//             P V of step - 1 runs during step): loads after the barrier, into the stage of
//             step - 2, whose last reader (its P V) every thread waited for during step - 1.
// kTensorCoreReads: the tiles are read by wgmma (the async proxy), which sees this thread's cp.async
// writes only after a proxy fence before the barrier.
template <int kStages = 2, bool kTensorCoreReads = false, typename LoadStep>
__device__ __forceinline__ void advance_pipeline(int64_t step, int64_t steps, LoadStep&& load_step) {
  static_assert(kStages == 2 || kStages == 3, "pipeline depths");
  const bool more = step + 1 < steps;
  const int next_stage = static_cast<int>((step + 1) % kStages);
  if (kStages == 2 && more) {
    load_step(step + 1, next_stage);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  if constexpr (kTensorCoreReads) fence_async_shared();
  __syncthreads();
  if (kStages == 3 && more) {
    load_step(step + 1, next_stage);
    cp_async_commit();
  }
}

// Applies the schedule's mask to a 16 x kN accumulator tile: masked elements become `masked`.
template <int kN, typename Schedule, typename Step>
__device__ __forceinline__ void apply_mask(float (&acc)[kN / 8][4], const Schedule& sched, const Step& at, int t,
                                           float masked) {
  if (!sched.needs_mask(at)) return;
  const int key0 = static_cast<int>(at.key0);
#pragma unroll
  for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!sched.visible(at, i >> 1, key0 + nb * 8 + 2 * t + (i & 1))) acc[nb][i] = masked;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------

// One online-softmax step on a warp's 16 x kN scores in log2 units (masked ones -inf): sc becomes P
// (unnormalised), the running max and sum are updated, and `rescale` is the factor the output
// accumulators need (rescale_rows). Per accumulator row half (c0 c1: row g, c2 c3: row g + 8).
template <int kN>
__device__ __forceinline__ void online_softmax(float (&sc)[kN / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&rescale)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = row_max[h];
#pragma unroll
    for (int nb = 0; nb < kN / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[nb][2 * h], sc[nb][2 * h + 1]));
    mx = quad_max(mx);
    // A row that has seen only masked keys keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
    const float base = mx == -INFINITY ? 0.f : mx;
    rescale[h] = fast_exp2(row_max[h] - base);
    row_max[h] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < kN / 8; ++nb) {
      sc[nb][2 * h] = fast_exp2(sc[nb][2 * h] - base);
      sc[nb][2 * h + 1] = fast_exp2(sc[nb][2 * h + 1] - base);
      sum += sc[nb][2 * h] + sc[nb][2 * h + 1];
    }
    // The row's sum over its quad now rather than once at the end: the shuffles come after every
    // exponential, and ptxas does not move a wgmma wait that follows them (fwd_kernel's overlap)
    // above a warp collective, as it does above plain arithmetic.
    row_sum[h] = row_sum[h] * rescale[h] + quad_sum(sum);
  }
}

template <int kDv>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kDv / 8][4], const float (&rescale)[2]) {
#pragma unroll
  for (int nb = 0; nb < kDv / 8; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_o[nb][i] *= rescale[i >> 1];
  }
}

template <typename Kt, typename Schedule, typename TileMma = WarpMma<Kt>>
__global__ void __launch_bounds__(Kt::kThreads) fwd_kernel(const typename Schedule::Params p) {
  using Element = typename Kt::Element;
  constexpr int kM = Kt::kRows, kN = Kt::kBlockN, kDqk = Kt::kHeadDimQK, kDv = Kt::kHeadDimV;
  constexpr int kSqk = TileMma::template kRowElements<kDqk>, kSv = TileMma::template kRowElements<kDv>;
  constexpr int kThreads = Kt::kThreads, kStages = TileMma::kFwdStages;
  NSA_DYNAMIC_SMEM(smem_raw);
  Element* sQ = reinterpret_cast<Element*>(smem_raw);  // [kM][kSqk]
  Element* sK = sQ + kM * kSqk;                          // [kStages][kN][kSqk]
  Element* sV = sK + kStages * kN * kSqk;                // [kStages][kN][kSv]

  const QueryTile qt = Schedule::tile(p, kM);
  if (qt.row_begin >= qt.row_end) return;
  const SeqSpan& s = qt.span;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = mma::thread_in_group(lane);
  const Schedule sched(p, qt, sK, smem_raw + TileMma::kFwdSmem, warp, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;  // scores kept in log2 units

  float acc_o[kDv / 8][4];  // O: [16 x kDv] per warp
  zero(acc_o);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // over the quad (online_softmax sums it per tile)

  const int64_t steps = sched.steps();
  if (steps > 0) {
    auto load_step = [&](int64_t step, int stage) {
      const auto at = sched.at(step);
      load_kv_stage<Kt, TileMma>(sK, sV, p, s, qt.kv_head, at.key0, at.key_limit, stage);
    };
    load_query_rows<kM, kDqk, TileMma::template kLoadStride<kDqk>, kThreads, Element>(sQ, p.q, p.q_strides, qt);
    load_step(0, 0);
    cp_async_commit();

    // Three stages (WarpgroupMma at 128/128, see kFwdStages): O += P V of tile i - 1 is issued after
    // S of tile i and runs under tile i's softmax (FlashAttention-3's in-warpgroup overlap); O is
    // rescaled once it is done. Two stages: P V right after the softmax, and a barrier before the
    // next tile's loads reuse the stage.
    constexpr bool kOverlap = kStages == 3;
    static_assert(!kOverlap || !TileMma::kPerWarp, "the overlap assumes every warp computes every tile");
    uint32_t pa[kN / 16][4];  // P as A fragments: [16 x kN], kept for the next tile's P V when kOverlap
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step % kStages);
      advance_pipeline<kStages, TileMma::kTensorCoreReads>(step, steps, load_step);

      const auto at = sched.at(step);
      if (!TileMma::kPerWarp || sched.warp_active(at)) {
        float sc[kN / 8][4];  // S = Q K^T: [16 x kN] per warp, then P
        zero(sc);
        TileMma::template abt<kN, kDqk, !kOverlap>(sc, sQ, sK + stage * kN * kSqk, warp, lane);
        if constexpr (kOverlap) {
          if (step > 0) {
            const int previous = static_cast<int>((step - 1) % kStages);
            TileMma::template pb<kDv, kN, false>(acc_o, pa, sV + previous * kN * kSv, warp, lane);
            TileMma::template wait<1>(sc);  // S only
          } else {
            TileMma::template wait<0>(sc);
          }
        }
#pragma unroll
        for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
          for (int i = 0; i < 4; ++i) sc[nb][i] *= scale_log2;
        }
        apply_mask<kN>(sc, sched, at, t, -INFINITY);
        float rescale[2];
        online_softmax<kN>(sc, row_max, row_sum, rescale);
        if constexpr (kOverlap) TileMma::template wait<0>(acc_o);  // the previous P V
        rescale_rows<kDv>(acc_o, rescale);
        accumulators_to_a<Element, kN>(pa, sc);
        if constexpr (!kOverlap) TileMma::template pb<kDv, kN>(acc_o, pa, sV + stage * kN * kSv, warp, lane);
      }
      if constexpr (!kOverlap) __syncthreads();  // the next iteration reloads the other stage
    }
    if constexpr (kOverlap)
      TileMma::template pb<kDv, kN>(acc_o, pa, sV + static_cast<int>((steps - 1) % kStages) * kN * kSv, warp, lane);
  }

  float inv_sum[2], lse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float total = row_sum[h];
    const bool seen = total > 0.f;  // a row that sees no key: out 0, lse -inf
    inv_sum[h] = seen ? 1.f / total : 0.f;
    lse[h] = seen ? (row_max[h] + log2f(total)) * kLn2 : -INFINITY;
  }
  using Out = typename Schedule::template OutElement<Element>;
  store_rows<Out, kDv>(acc_o, inv_sum[0], inv_sum[1], lane, [&](int r) -> Out* {
    const int64_t row = qt.row_begin + warp * 16 + r;
    return row < qt.row_end ? sched.template output<Out>(p, qt, row).o : nullptr;
  });
  if (t == 0) {
    const int g = mma::group_id(lane);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = qt.row_begin + warp * 16 + g + 8 * h;
      if (row < qt.row_end) *sched.template output<Out>(p, qt, row).lse = lse[h];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

constexpr int kDeltaWarps = 4;

// delta = rowsum(dO * O) - dlse, one warp per (query row, head); blockIdx.y = query head.
template <typename Element>
__global__ void __launch_bounds__(kDeltaWarps * 32) delta_kernel(const AttentionBwdParams p) {
  const int64_t blocks_per_seq = (p.max_seqlen_q + kDeltaWarps - 1) / kDeltaWarps;
  const int64_t seq = blockIdx.x / blocks_per_seq;
  const int64_t row = (blockIdx.x % blocks_per_seq) * kDeltaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const SeqSpan s = seq_span(p, seq);
  if (row >= s.q_len) return;
  const int64_t head = blockIdx.y, r = s.q_row_begin + row;
  const Element* dout = static_cast<const Element*>(p.dout) + p.dout_strides.offset(s.batch, r, head);
  const Element* out = static_cast<const Element*>(p.o) + p.o_strides.offset(s.batch, r, head);
  float sum = 0.f;
  for (int64_t d = lane; d < p.head_dim_v; d += 32) sum += to_float(dout[d]) * to_float(out[d]);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    const float dlse = p.dlse ? static_cast<const float*>(p.dlse)[p.dlse_strides.offset(s.batch, r, head)] : 0.f;
    p.softmax_delta[p.lse_strides.offset(s.batch, r, head)] = sum - dlse;
  }
}

// lse in log2 units for P = exp2(s * scale_log2 - lse_log2); +inf for rows that saw nothing (lse
// = -inf) and rows past the sequence, which makes their P exactly 0 in every tile.
__device__ __forceinline__ float lse_log2_of(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

template <typename Kt, typename Schedule, typename TileMma = WarpMma<Kt>>
__global__ void __launch_bounds__(Kt::kThreads) dq_kernel(const typename Schedule::BwdParams p) {
  using Element = typename Kt::Element;
  constexpr int kM = Kt::kRows, kN = Kt::kBlockN, kDqk = Kt::kHeadDimQK, kDv = Kt::kHeadDimV;
  constexpr int kSqk = TileMma::template kRowElements<kDqk>, kSv = TileMma::template kRowElements<kDv>;
  constexpr int kThreads = Kt::kThreads;
  NSA_DYNAMIC_SMEM(smem_raw);
  Element* sQ = reinterpret_cast<Element*>(smem_raw);  // [kM][kSqk]
  Element* sdO = sQ + kM * kSqk;                         // [kM][kSv]
  Element* sK = sdO + kM * kSv;                          // [2 stages][kN][kSqk]
  Element* sV = sK + 2 * kN * kSqk;                      // [2 stages][kN][kSv]

  const QueryTile qt = Schedule::tile(p, kM);
  if (qt.row_begin >= qt.row_end) return;
  const SeqSpan& s = qt.span;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = mma::group_id(lane), t = mma::thread_in_group(lane);
  const Schedule sched(p, qt, sK, smem_raw + TileMma::kDqSmem, warp, lane);
  const int64_t steps = sched.steps();
  // dq is zero-filled by the host: tiles without keys have nothing to add.
  if (steps == 0) return;

  float my_lse[2], my_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = qt.row_begin + warp * 16 + g + 8 * h;
    const bool valid = row < qt.row_end;
    const int64_t off = valid ? qt.offset(p.lse_strides, row) : 0;
    my_lse[h] = valid ? lse_log2_of(static_cast<const float*>(p.lse)[off]) : INFINITY;
    my_delta[h] = valid ? p.softmax_delta[off] : 0.f;
  }
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  auto load_step = [&](int64_t step, int stage) {
    const auto at = sched.at(step);
    load_kv_stage<Kt, TileMma>(sK, sV, p, s, qt.kv_head, at.key0, at.key_limit, stage);
  };

  load_query_rows<kM, kDqk, TileMma::template kLoadStride<kDqk>, kThreads, Element>(sQ, p.q, p.q_strides, qt);
  load_query_rows<kM, kDv, TileMma::template kLoadStride<kDv>, kThreads, Element>(sdO, p.dout, p.dout_strides, qt);
  load_step(0, 0);
  cp_async_commit();

  float acc_dq[kDqk / 8][4];  // dQ / scale: [16 x kDqk] per warp
  zero(acc_dq);
  for (int64_t step = 0; step < steps; ++step) {
    const int stage = static_cast<int>(step & 1);
    advance_pipeline<2, TileMma::kTensorCoreReads>(step, steps, load_step);
    const auto at = sched.at(step);
    if (!TileMma::kPerWarp || sched.warp_active(at)) {
      const Element* k_tile = sK + stage * kN * kSqk;
      float pr[kN / 8][4];  // S = Q K^T, then P = exp(scale S - lse): [16 x kN]
      zero(pr);
      TileMma::template abt<kN, kDqk>(pr, sQ, k_tile, warp, lane);
      float ds[kN / 8][4];  // dP = dO V^T, then dS = P (dP - delta): [16 x kN]
      zero(ds);
      TileMma::template abt<kN, kDv>(ds, sdO, sV + stage * kN * kSv, warp, lane);
#pragma unroll
      for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) pr[nb][i] = fast_exp2(fmaf(pr[nb][i], scale_log2, -my_lse[i >> 1]));
      }
      apply_mask<kN>(pr, sched, at, t, 0.f);
#pragma unroll
      for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[nb][i] = pr[nb][i] * (ds[nb][i] - my_delta[i >> 1]);
      }
      uint32_t da[kN / 16][4];
      accumulators_to_a<Element, kN>(da, ds);
      TileMma::template pb<kDqk, kN>(acc_dq, da, k_tile, warp, lane);  // dQ += dS K
    }
    __syncthreads();
  }

  using Out = typename Schedule::template OutElement<Element>;
  const float scale = static_cast<float>(p.scale);
  store_rows<Out, kDqk>(acc_dq, scale, scale, lane, [&](int r) -> Out* {
    const int64_t row = qt.row_begin + warp * 16 + r;
    return row < qt.row_end ? sched.template dq_output<Out>(p, qt, row) : nullptr;
  });
}

// KeyBlock (dkv), built per block from blockIdx.x / blockIdx.y:
//   span, kv_head, key0, key_limit  the block's keys [key0, min(key0 + kRows, key_limit)); nothing to do
//                              when key0 >= key_limit.
//   rows                       the query rows it serves, numbered [0, rows): a stacked row of the
//                              sequence (dense) or of the block's reverse-index list (selection).
//   query(row)                 {query row of the sequence, query head}, for row < rows.
//   keys_of(query)             keys [begin, end) that query sees (the mask of boundary tiles).
//   boundary(r0, r1)           whether query rows [r0, r1) need the mask at all.
//   warp_active(warp)          false when the warp's 16 keys all lie past the block's keys (warp-uniform).
template <typename Kt, typename KeyBlock>
__global__ void __launch_bounds__(Kt::kThreads) dkv_kernel(const typename KeyBlock::Params p) {
  using Element = typename Kt::Element;
  constexpr int kN = Kt::kRows, kM = Kt::kBlockM, kDqk = Kt::kHeadDimQK, kDv = Kt::kHeadDimV;
  constexpr int kSqk = Kt::kStrideQK, kSv = Kt::kStrideV, kThreads = Kt::kThreads;
  constexpr int kSliceQK = Kt::kSliceQK, kSliceV = Kt::kSliceV;
  NSA_DYNAMIC_SMEM(smem_raw);
  Element* sK = reinterpret_cast<Element*>(smem_raw);  // [kN][kSqk]
  Element* sV = sK + kN * kSqk;                          // [kN][kSv]
  Element* sQ = sV + kN * kSv;                           // [2 stages][kM][kSqk]
  Element* sdO = sQ + 2 * kM * kSqk;                     // [2 stages][kM][kSv]
  float* s_lse = reinterpret_cast<float*>(sdO + 2 * kM * kSv);  // [2 stages][kM], log2 units
  float* s_delta = s_lse + 2 * kM;                              // [2 stages][kM]
  int* s_key_begin = reinterpret_cast<int*>(s_delta + 2 * kM);  // [2 stages][kM]
  int* s_key_end = s_key_begin + 2 * kM;                        // [2 stages][kM]

  const KeyBlock kb(p, kN);
  // dk / dv are zero-filled by the host: keys no query sees are done.
  if (kb.key0 >= kb.key_limit || kb.rows <= 0) return;
  const SeqSpan& s = kb.span;
  const int64_t key0 = kb.key0, kv_head = kb.kv_head;
  const int num_tiles = static_cast<int>((kb.rows + kM - 1) / kM);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = mma::group_id(lane), t = mma::thread_in_group(lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const bool warp_active = kb.warp_active(warp);

  load_key_rows<kN, kDqk, kSqk, kThreads, Element>(sK, p.k, p.k_strides, s, key0, kb.key_limit, kv_head);
  load_key_rows<kN, kDv, kSv, kThreads, Element>(sV, p.v, p.v_strides, s, key0, kb.key_limit, kv_head);
  // Query rows [r0, r0 + kM) into `stage`: Q and dO by cp.async, per-row lse / delta / key range by
  // plain stores (read only after the barrier that follows the matching cp.async wait).
  auto load_queries = [&](int64_t r0, int stage) {
    const Element* q = static_cast<const Element*>(p.q);
    const Element* dout = static_cast<const Element*>(p.dout);
    load_tile_async<kM, kDqk, kSqk, kThreads>(sQ + stage * kM * kSqk, q, [&](int r) -> const Element* {
      if (r0 + r >= kb.rows) return nullptr;
      const QueryHead qh = kb.query(r0 + r);
      return q + query_offset(p.q_strides, s, qh.query, qh.head);
    });
    load_tile_async<kM, kDv, kSv, kThreads>(sdO + stage * kM * kSv, dout, [&](int r) -> const Element* {
      if (r0 + r >= kb.rows) return nullptr;
      const QueryHead qh = kb.query(r0 + r);
      return dout + query_offset(p.dout_strides, s, qh.query, qh.head);
    });
    for (int r = threadIdx.x; r < kM; r += kThreads) {
      float lse = INFINITY, delta = 0.f;
      KeyRange keys{0, 0};
      if (r0 + r < kb.rows) {
        const QueryHead qh = kb.query(r0 + r);
        const int64_t off = query_offset(p.lse_strides, s, qh.query, qh.head);
        lse = lse_log2_of(static_cast<const float*>(p.lse)[off]);
        delta = p.softmax_delta[off];
        keys = kb.keys_of(qh.query);
      }
      s_lse[stage * kM + r] = lse;
      s_delta[stage * kM + r] = delta;
      s_key_begin[stage * kM + r] = static_cast<int>(keys.begin);
      s_key_end[stage * kM + r] = static_cast<int>(keys.end);
    }
  };
  load_queries(0, 0);
  cp_async_commit();

  float acc_dk[kSliceQK / 8][4];  // dK / scale, columns [slice * kSliceQK, +kSliceQK): [16 x kSliceQK]
  float acc_dv[kSliceV / 8][4];   // dV, columns [slice * kSliceV, +kSliceV): [16 x kSliceV]
  zero(acc_dk);
  zero(acc_dv);
  const int slice = blockIdx.z;
  const int my_key[2] = {static_cast<int>(key0) + warp * 16 + g, static_cast<int>(key0) + warp * 16 + g + 8};

  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it & 1;
    const int64_t r0 = static_cast<int64_t>(it) * kM;
    advance_pipeline(it, num_tiles, [&](int64_t next, int next_stage) { load_queries(next * kM, next_stage); });
    if (warp_active) {
      const Element* q_tile = sQ + stage * kM * kSqk;
      const Element* do_tile = sdO + stage * kM * kSv;
      const float* lse = s_lse + stage * kM;
      const float* delta = s_delta + stage * kM;
      const int* kbeg = s_key_begin + stage * kM;
      const int* kend = s_key_end + stage * kM;
      const bool boundary = kb.boundary(r0, r0 + kM < kb.rows ? r0 + kM : kb.rows);

      float pt[kM / 8][4];  // S^T = K Q^T, then P^T: [16 keys x kM queries] per warp
      zero(pt);
      gemm_ss<Element, kM, kDqk>(pt, sK + warp * 16 * kSqk, kSqk, q_tile, kSqk, lane);
#pragma unroll
      for (int nb = 0; nb < kM / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = nb * 8 + 2 * t + (i & 1);  // query row within the tile
          float prob = fast_exp2(fmaf(pt[nb][i], scale_log2, -lse[col]));
          if (boundary) {
            const int key = my_key[i >> 1];
            if (key < kbeg[col] || key >= kend[col]) prob = 0.f;
          }
          pt[nb][i] = prob;
        }
      }
      uint32_t fa[kM / 16][4];
      accumulators_to_a<Element, kM>(fa, pt);
      gemm_rs<Element, kSliceV, kM>(acc_dv, fa, do_tile + slice * kSliceV, kSv, lane);  // dV += P^T dO

      float ds[kM / 8][4];  // dP^T = V dO^T, then dS^T = P^T (dP^T - delta): [16 keys x kM queries]
      zero(ds);
      gemm_ss<Element, kM, kDv>(ds, sV + warp * 16 * kSv, kSv, do_tile, kSv, lane);
#pragma unroll
      for (int nb = 0; nb < kM / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[nb][i] = pt[nb][i] * (ds[nb][i] - delta[nb * 8 + 2 * t + (i & 1)]);
      }
      accumulators_to_a<Element, kM>(fa, ds);
      gemm_rs<Element, kSliceQK, kM>(acc_dk, fa, q_tile + slice * kSliceQK, kSqk, lane);  // dK += dS^T Q
    }
    __syncthreads();
  }

  Element* dk = static_cast<Element*>(p.dk);
  Element* dv = static_cast<Element*>(p.dv);
  const int64_t key_end = key0 + kN < kb.key_limit ? key0 + kN : kb.key_limit;
  store_rows<Element, kSliceQK>(acc_dk, static_cast<float>(p.scale), static_cast<float>(p.scale), lane,
                                [&](int r) -> Element* {
                                  const int64_t key = key0 + warp * 16 + r;
                                  return key < key_end ? dk + key_offset(p.dk_strides, s, key, kv_head) +
                                                             slice * kSliceQK
                                                       : nullptr;
                                });
  store_rows<Element, kSliceV>(acc_dv, 1.f, 1.f, lane, [&](int r) -> Element* {
    const int64_t key = key0 + warp * 16 + r;
    return key < key_end ? dv + key_offset(p.dv_strides, s, key, kv_head) + slice * kSliceV : nullptr;
  });
}

// ---------------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------------

inline dim3 checked_grid(int64_t x, int64_t y, int64_t z = 1) {
  TORCH_CHECK(x < (int64_t(1) << 31) && y < 65536 && z < 65536, "nsa: problem too large for one launch (grid ", x,
              " x ", y, " x ", z, ")");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// The delta kernel every backward starts with (p.softmax_delta must be set).
template <typename Element>
void launch_delta(const AttentionBwdParams& p) {
  const int64_t blocks = (p.max_seqlen_q + kDeltaWarps - 1) / kDeltaWarps;
  launch_kernel(delta_kernel<Element>, checked_grid(p.num_seqs * blocks, p.num_heads_q), kDeltaWarps * 32, 0, p);
}

}  // namespace tiled
}  // namespace nsa
