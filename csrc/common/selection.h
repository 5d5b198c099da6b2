#pragma once
// Index math of the selected branch (spec section 3), shared by the CPU kernel and future CUDA
// kernels (the token count num_compressed_tokens and token visibility live in masks.h); its Python
// twins are reference.overlap_weights and the candidate/forced masks of reference.select_blocks.
//
// Keys are cut into chunks of `compress_stride` (d) keys. Compressed token i covers chunks
// [i, i + l/d) (keys [i*d, i*d + l)); selection block j covers chunks [j*l'/d, (j+1)*l'/d)
// (keys [j*l', (j+1)*l')). Everything below is integer arithmetic on those chunk ranges.
#include <cstdint>

#include "common/attention_params.h"
#include "common/host_device.h"
#include "common/masks.h"

namespace nsa {

// Selection blocks of a sequence of `keys` keys: ceil(TK / l'), without overflow for any l' >= 1.
NSA_HOST_DEVICE int64_t num_select_blocks(int64_t keys, int64_t select_block) {
  return keys <= 0 ? 0 : (keys - 1) / select_block + 1;
}

// The block-selection configuration (l, d, l', n, n_init, n_local); the host checks it (d divides l
// and l', n >= n_init + n_local, sizes positive) before any kernel sees it.
struct BlockSelection {
  int64_t compress_block;   // l
  int64_t compress_stride;  // d
  int64_t select_block;     // l'
  int64_t select_count;     // n
  int64_t init_blocks;      // n_init
  int64_t local_blocks;     // n_local

  NSA_HOST_DEVICE int64_t token_chunks() const { return compress_block / compress_stride; }
  NSA_HOST_DEVICE int64_t block_chunks() const { return select_block / compress_stride; }

  // Which compressed tokens a query sees: i*d + l - 1 <= t (spec section 2).
  NSA_HOST_DEVICE VisibilityMask visibility() const {
    VisibilityMask mask{};  // as VisibilityMask::compressed, which is host-only
    mask.kind = VisibilityMask::kCompressed;
    mask.compress_block = compress_block;
    mask.compress_stride = compress_stride;
    return mask;
  }

  // Eq. 9 of the paper as chunk counting: w(i, j) = chunks shared by token i and block j.
  NSA_HOST_DEVICE int64_t overlap(int64_t token, int64_t block) const {
    const int64_t lo = token > block * block_chunks() ? token : block * block_chunks();
    const int64_t token_end = token + token_chunks(), block_end = (block + 1) * block_chunks();
    const int64_t hi = token_end < block_end ? token_end : block_end;
    return hi > lo ? hi - lo : 0;
  }
  // Token i meets blocks [first_block(i), last_block(i)] and no other (w > 0 on exactly those).
  NSA_HOST_DEVICE int64_t first_block(int64_t token) const { return token / block_chunks(); }
  NSA_HOST_DEVICE int64_t last_block(int64_t token) const {
    return (token + token_chunks() - 1) / block_chunks();
  }

  // Candidates of a query at `position` are blocks [0, candidates_end) (j*l' <= t), within the
  // sequence's num_blocks. A token the query sees only meets candidate blocks.
  NSA_HOST_DEVICE int64_t candidates_end(int64_t position, int64_t num_blocks) const {
    if (position < 0) return 0;
    const int64_t end = position / select_block + 1;
    return end < num_blocks ? end : num_blocks;
  }
  // The block that holds the query at `position` (>= 0).
  NSA_HOST_DEVICE int64_t own_block(int64_t position) const { return position / select_block; }
  // Forced candidates: the first n_init blocks and the n_local blocks ending at the query's own.
  // forced_candidate assumes `block` is a candidate of a query whose own block is `own`.
  NSA_HOST_DEVICE bool forced_candidate(int64_t block, int64_t own) const {
    return block < init_blocks || (block > own - local_blocks && block <= own);
  }
  NSA_HOST_DEVICE bool forced(int64_t block, int64_t position) const {
    if (position < 0 || block < 0 || block * select_block > position) return false;
    return forced_candidate(block, own_block(position));
  }
};

// select_blocks reads q, k_cmp (as k, compressed-token rows) and lse through the attention params
// (v and o stay null) and writes int32 indices [.., Hk, n] with a contiguous last dimension.
struct SelectParams : AttentionParams {
  int32_t* indices;
  Strides index_strides;
  BlockSelection selection;
};

}  // namespace nsa
