// CUDA kernels of fused NSA decoding (the algorithm of cpu/decode_attention.cpp, which is their
// oracle), split across the keys as in flash-decoding, so that a small batch still fills the GPU.
// A task is one (sequence, new query, kv head); the G query heads of its group go together, so every
// key row is read once per group. Four launches on the current stream, no host sync, split counts
// fixed by shapes alone (common/decode_split.h), so a captured graph replays for any lengths:
//   1. decode_attend_kernel (cuda/decode/attend.h) on the compressed branch, one block per
//      (compressed split, task, head slice): online softmax over the split's tokens (partial output,
//      max and sum per head) and the scores of the split's selection blocks (Eq. 9) as per-head
//      partial sums, each kept with the max it is relative to;
//   2. decode_select_kernel, one block per task: the compressed lse per head from the partials, the
//      block scores summed over the group, forced blocks plus the best free ones (one warp, n
//      arg-max rounds, ties to the lower id), ascending, -1 padded, written to `indices`;
//   3. decode_attend_kernel on the selected and window splits, one block per (split, task, head
//      slice): online softmax over the split's rows of the picked blocks (keys s <= t) or of the
//      window (t - w < s <= t);
//   4. decode_combine_kernel, one block per task: each branch's partials merged in split order, the
//      gated sum written once in the output dtype.
// The attend kernel uses tensor cores for bf16 / fp16 with a compiled head-dim pair and 16-byte
// aligned cache rows (16 query heads per block, larger groups in slices), else one SIMT thread per key
// row and eight heads.
// Lengths are clamped to the caches' capacities (a host check would cost a sync per step), so no
// cache_seqlens value reads out of bounds. No atomics: reruns are bitwise equal.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/decode_params.h"
#include "common/decode_split.h"
#include "cuda/decode/attend.h"
#include "cuda/dense/dispatch.h"
#include "cuda/runtime.h"
#include "kernels.h"

namespace nsa {
namespace decode {
namespace {

constexpr int64_t kSimtBlocksPerSm = 3;  // ~130 registers per thread fit three blocks of 128 threads

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
  const Task t(p, p.num_heads_q / p.num_heads_k);
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
      __syncwarp();  // every lane has read s.taken (shuffles order no memory) ...
      if (lane == 0) s.taken[best_block] = 1;
      __syncwarp();  // ... and sees this write in the next round
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
__global__ void __launch_bounds__(kThreads, 1) decode_combine_kernel(const __grid_constant__ DecodeParams p,
                                                                  const __grid_constant__ Partials<acc_t> w) {
  const Task t(p, p.num_heads_q / p.num_heads_k);
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

}  // namespace
}  // namespace decode

void decode_attention_cuda(const DecodeParams& p, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(p.num_seqs * p.num_queries <= 65535 && p.num_heads_k <= 65535, "nsa: argument 'q' has ",
                    p.num_seqs, " sequences of ", p.num_queries, " new queries and ", p.num_heads_k,
                    " kv heads: the CUDA decoding kernels take at most 65535 (sequence, query) pairs and kv heads");
  const DeviceLimits device = current_device_limits();
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t tasks = p.num_seqs * p.num_queries * p.num_heads_k;
  const int64_t max_blocks = num_select_blocks(p.key_capacity, p.selection.select_block);
  using namespace decode;
  using tiled::rows_aligned;
  // Tensor cores when a tiled head-dim pair is compiled for the dtype and cp.async can stream the rows.
  const bool tensor_cores = rows_aligned(p.k, p.k_strides) && rows_aligned(p.v, p.v_strides) &&
                            rows_aligned(p.k_swa, p.k_swa_strides) && rows_aligned(p.v_swa, p.v_swa_strides) &&
                            rows_aligned(p.k_cmp, p.k_cmp_strides) && rows_aligned(p.v_cmp, p.v_cmp_strides) &&
                            tiled::dispatch_dtype(dtype, p, []<typename E, int kDqk, int kDv>() {});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nsa_decode_attention_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using Simt = SimtMath<scalar_t, acc_t>;
    const int64_t attend_smem =
        tensor_cores ? MmaLayout(p.head_dim_qk, p.head_dim_v, p.selection.select_count).total : Simt::smem_bytes(p);
    const int64_t select_smem = select_smem_bytes(p, sizeof(acc_t), max_blocks);
    const int64_t limit = device.smem_per_block;
    TORCH_CHECK_VALUE(attend_smem <= limit, "nsa: arguments 'q' and 'v_cache': a group of ", group,
                      " query heads with Dk = ", p.head_dim_qk, " and Dv = ", p.head_dim_v, " needs ", attend_smem,
                      " bytes of shared memory in the CUDA decoding kernels, more than the device's ", limit);
    TORCH_CHECK_VALUE(select_smem <= limit, "nsa: argument 'k_cache' holds ", p.key_capacity,
                      " keys per sequence: its ", max_blocks, " selection blocks need ", select_smem,
                      " bytes of shared memory, more than the device's ", limit);

    // Resident blocks per SM, the slots of the planner's waves: as many as shared memory allows for
    // the tensor-core kernel (about: the per-block limit stands in for the SM's; at most 4), three for
    // the SIMT one (~130 registers per thread).
    const int64_t block_heads = tensor_cores ? kMmaHeads : std::max<int64_t>(group, 1);
    const int64_t blocks_per_sm = tensor_cores ? std::clamp<int64_t>(limit / std::max<int64_t>(attend_smem, 1), 1, 4)
                                               : kSimtBlocksPerSm;
    const DecodeSplits splits = plan_decode_splits(
        tasks * head_slices(group, block_heads), blocks_per_sm * device.sm_count, kMinSplitRows, p.token_capacity,
        p.selection.select_count * p.selection.select_block, std::min(p.window, p.key_capacity));
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
    w.block_heads = block_heads;

    const auto attend = [&](Branch branch) {
      if constexpr (std::is_same_v<acc_t, float>) {
        if (tensor_cores) {
          tiled::dispatch_dtype(dtype, p, [&]<typename E, int kDqk, int kDv>() {
            launch_tiled_attend<E, kDqk, kDv>(p, w, branch);
          });
          return;
        }
      }
      launch_attend<Simt>(p, w, branch);
    };
    const auto launch_task_kernel = [&](auto kernel, int64_t smem) {
      const dim3 grid(1, static_cast<unsigned>(p.num_heads_k), static_cast<unsigned>(p.num_seqs * p.num_queries));
      launch_kernel(kernel, grid, kThreads, smem, p, w);
    };
    attend(kCompressedBranch);
    launch_task_kernel(decode_select_kernel<acc_t>, select_smem);
    attend(kSparseBranch);
    launch_task_kernel(decode_combine_kernel<scalar_t, acc_t>, 0);
  });
}

}  // namespace nsa
