#pragma once
// The block-selection configuration check shared by the ops that select blocks (select_blocks, the
// fused decode).
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/selection.h"

namespace nsa {

// Spec, Notation: sizes positive, d divides l and l', n >= n_init + n_local, n_init, n_local >= 0.
inline BlockSelection check_selection_config(int64_t compress_block, int64_t compress_stride, int64_t select_block,
                                      int64_t select_count, int64_t init_blocks, int64_t local_blocks) {
  NSA_CHECK_ARG(compress_block >= 1, "compress_block", "must be >= 1, got ", compress_block);
  NSA_CHECK_ARG(compress_stride >= 1, "compress_stride", "must be >= 1, got ", compress_stride);
  NSA_CHECK_ARG(select_block >= 1, "select_block", "must be >= 1, got ", select_block);
  NSA_CHECK_ARG(select_count >= 1, "select_count", "must be >= 1, got ", select_count);
  NSA_CHECK_ARG(init_blocks >= 0, "init_blocks", "must be >= 0, got ", init_blocks);
  NSA_CHECK_ARG(local_blocks >= 0, "local_blocks", "must be >= 0, got ", local_blocks);
  NSA_CHECK_ARG(compress_block % compress_stride == 0, "compress_stride", "must divide compress_block (",
                compress_block, "), got ", compress_stride);
  NSA_CHECK_ARG(select_block % compress_stride == 0, "compress_stride", "must divide select_block (", select_block,
                "), got ", compress_stride);
  NSA_CHECK_ARG(select_count >= init_blocks + local_blocks, "select_count", "must be >= init_blocks + local_blocks = ",
                init_blocks + local_blocks, ", got ", select_count);
  NSA_CHECK_ARG(select_count <= std::numeric_limits<int32_t>::max(), "select_count", "must fit in int32, got ",
                select_count);
  return {compress_block, compress_stride, select_block, select_count, init_blocks, local_blocks};
}

}  // namespace nsa
