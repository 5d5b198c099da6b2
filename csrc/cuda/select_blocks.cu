// CUDA kernels of fused top-n block selection (spec section 3). bf16 / fp16 with a compiled head dim,
// G <= 64 and aligned rows run the tensor-core kernel of cuda/selection/select_kernel.h. Everything
// else runs the baseline below: one thread block per (query, kv head), CUDA cores, fp32 (fp64)
// accumulation. Both are fused as the spec asks: the compressed tokens' scores never leave shared
// memory. The baseline:
//   1. each warp takes tokens in turn: p = exp(scale * q.k - lse) summed over the group's G heads in
//      head order, into tokens[i];
//   2. each thread takes blocks in turn: S[j] = sum over the tokens overlapping j of w(i, j) tokens[i],
//      tokens ascending (a fixed order, no atomics: the result is the same on every run);
//   3. the forced candidates are kept; n - forced rounds of a block-wide arg-max then pick the best
//      free candidates, each round the best below the previous pick in the order (score descending,
//      block ascending: the spec's tie rule), NaN scores ranking lowest as on the CPU;
//   4. the kept ids are written ascending, -1 padded.
// Shared memory holds one query's token and block scores: TC + TK / l' values (48 KB + opt-in bound TK).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/selection.h"
#include "cuda/baseline.h"
#include "cuda/dense/dispatch.h"
#include "cuda/runtime.h"
#include "cuda/selection/config.h"
#include "cuda/selection/select_kernel.h"
#include "kernels.h"

namespace nsa {
namespace {

using baseline::row_dot;
using baseline::row_of;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// A candidate in the pick order: higher score first, lower block id on equal scores.
template <typename acc_t>
struct Pick {
  acc_t score;
  int block;  // -1: none
};
template <typename acc_t>
__device__ __forceinline__ bool better(const Pick<acc_t>& a, const Pick<acc_t>& b) {
  if (b.block < 0) return a.block >= 0;
  if (a.block < 0) return false;
  return a.score > b.score || (a.score == b.score && a.block < b.block);
}

template <typename acc_t>
__device__ __forceinline__ Pick<acc_t> warp_best(Pick<acc_t> p) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Pick<acc_t> other{__shfl_xor_sync(0xffffffffu, p.score, offset), __shfl_xor_sync(0xffffffffu, p.block, offset)};
    if (better(other, p)) p = other;
  }
  return p;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) select_kernel(const SelectParams p, int64_t max_tokens) {
  NSA_DYNAMIC_SMEM(smem_raw);
  auto* warp_picks = reinterpret_cast<Pick<acc_t>*>(smem_raw);                        // [kWarps]
  acc_t* tokens = reinterpret_cast<acc_t*>(smem_raw + kWarps * sizeof(Pick<acc_t>));  // [max_tokens]
  acc_t* scores = tokens + max_tokens;                                                  // [max blocks]

  const int64_t seq = blockIdx.x / p.max_seqlen_q, row = blockIdx.x % p.max_seqlen_q, head_k = blockIdx.y;
  const SeqSpan s = seq_span(p, seq);
  if (row >= s.q_len) return;  // packed rows of no sequence stay -1 (host-filled)
  const BlockSelection& sel = p.selection;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t position = s.query_offset + row;
  const int64_t num_blocks = num_select_blocks(s.query_offset + s.q_len, sel.select_block);
  const int64_t token_end = sel.visibility().keys_for(position, s.k_len).end;
  const int64_t cand = sel.candidates_end(position, num_blocks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t i = warp; i < token_end; i += kWarps) {
    const scalar_t* k = row_of<scalar_t>(p.k, p.k_strides, s.batch, s.k_row_begin + i, head_k);
    acc_t sum = 0;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = head_k * group + g;
      const acc_t lse = static_cast<const acc_t*>(p.lse)[p.lse_strides.offset(s.batch, s.q_row_begin + row, head)];
      const scalar_t* q = row_of<scalar_t>(p.q, p.q_strides, s.batch, s.q_row_begin + row, head);
      const acc_t dot = row_dot<scalar_t, acc_t>(q, k, p.head_dim_qk, lane);
      if (lse != -INFINITY) sum += exp(dot * acc_t(p.scale) - lse);
    }
    if (lane == 0) tokens[i] = sum;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cand; j += kThreads) {
    const int64_t first = j * sel.block_chunks() - sel.token_chunks() + 1;
    const int64_t last = (j + 1) * sel.block_chunks() < token_end ? (j + 1) * sel.block_chunks() : token_end;
    acc_t score = 0;
    for (int64_t i = first > 0 ? first : 0; i < last; ++i) score += acc_t(sel.overlap(i, j)) * tokens[i];
    scores[j] = isnan(score) ? -INFINITY : score;
  }
  __syncthreads();

  // Forced candidates count first; then rounds of arg-max over the free ones.
  const int64_t own = cand > 0 ? sel.own_block(position) : 0;
  const int64_t forced = sel.forced_count(cand, own);
  const int64_t free_slots = sel.select_count - forced;
  const int64_t rounds = free_slots < cand - forced ? free_slots : cand - forced;
  Pick<acc_t> last{acc_t(0), -1};  // the previous pick; candidates must come after it in the order
  int32_t* out = p.indices + p.index_strides.offset(s.batch, s.q_row_begin + row, head_k);
  for (int64_t r = 0; r < rounds; ++r) {
    Pick<acc_t> best{acc_t(0), -1};
    for (int64_t j = threadIdx.x; j < cand; j += kThreads) {
      const Pick<acc_t> c{scores[j], static_cast<int>(j)};
      if (!sel.forced_candidate(j, own) && (last.block < 0 || better(last, c)) && better(c, best)) best = c;
    }
    best = warp_best(best);
    if (lane == 0) warp_picks[warp] = best;
    __syncthreads();
    best = warp_picks[0];
    for (int w = 1; w < kWarps; ++w)
      if (better(warp_picks[w], best)) best = warp_picks[w];
    last = best;
    // Mark the pick by its slot: the ids are sorted below, so any order works here.
    if (threadIdx.x == 0) out[r] = best.block;
    __syncthreads();
  }
  if (threadIdx.x == 0) sel.finish_row(cand, own, rounds, out);  // + forced, ascending, -1 padded
}

template <typename Element>
bool run_tiled_head_dim(const SelectParams& p, int64_t tile_rows) {
#define NSA_SELECT_HEAD_DIM(D)                      \
  if (p.head_dim_qk == D) {                         \
    tiled::launch_select<Element, D>(p, tile_rows); \
    return true;                                    \
  }
#ifdef NSA_TILED_HDIM_64
  NSA_SELECT_HEAD_DIM(64)
#endif
#ifdef NSA_TILED_HDIM_128
  NSA_SELECT_HEAD_DIM(128)
#endif
#ifdef NSA_TILED_HDIM_192
  NSA_SELECT_HEAD_DIM(192)
#endif
#ifdef NSA_TILED_HDIM_256
  NSA_SELECT_HEAD_DIM(256)
#endif
#undef NSA_SELECT_HEAD_DIM
  return false;
}

// The tensor-core kernel when it applies; false: run the baseline.
bool try_tiled(const SelectParams& p, at::ScalarType dtype) {
  const int64_t group = p.num_heads_q / p.num_heads_k;
  if (group > 64 || !tiled::select_ring_fits(p.selection) || !tiled::fits_int32(p) ||
      !tiled::rows_aligned(p.q, p.q_strides) || !tiled::rows_aligned(p.k, p.k_strides))
    return false;
  const int64_t tile_rows = selection_tile_rows(group, p.selection.select_count, 64, tiled::kSelectPairs);
  if (tile_rows <= 0) return false;
  if (dtype == at::kBFloat16) return run_tiled_head_dim<__nv_bfloat16>(p, tile_rows);
  if (dtype == at::kHalf) return run_tiled_head_dim<__half>(p, tile_rows);
  return false;
}

}  // namespace

void select_blocks_cuda(const SelectParams& p, at::ScalarType dtype) {
  if (try_tiled(p, dtype)) return;
  const int64_t max_tokens = num_compressed_tokens(p.key_positions, p.selection.compress_block,
                                                   p.selection.compress_stride);
  const int64_t max_blocks = num_select_blocks(p.key_positions, p.selection.select_block);
  const int64_t grid = p.num_seqs * p.max_seqlen_q;
  if (grid == 0 || p.num_heads_k == 0) return;
  TORCH_CHECK(grid < (int64_t(1) << 31) && p.num_heads_k < 65536, "nsa: select_blocks problem too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_select_blocks_cuda", [&] {
    using acc_t = baseline::accumulate_t<scalar_t>;
    const int64_t smem = (max_tokens + max_blocks) * static_cast<int64_t>(sizeof(acc_t)) +
                         kWarps * static_cast<int64_t>(sizeof(Pick<acc_t>));
    constexpr int64_t kMaxSmem = 160 * 1024;
    TORCH_CHECK(smem <= kMaxSmem, "nsa: select_blocks on CUDA holds one query's ", max_tokens, " token and ",
                max_blocks, " block scores in shared memory, more than ", kMaxSmem, " bytes; use shorter keys");
    const dim3 blocks(static_cast<unsigned>(grid), static_cast<unsigned>(p.num_heads_k));
    launch_kernel(select_kernel<scalar_t, acc_t>, blocks, kThreads, smem, p, max_tokens);
  });
}

}  // namespace nsa
