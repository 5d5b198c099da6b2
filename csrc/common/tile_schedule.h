#pragma once
// Which key tiles a tile of query rows visits, and which of them need no mask, for the tiled CUDA
// kernels (and a CPU test through nsa_ext._C._key_tiles). Only the monotonicity of
// VisibilityMask::keys_for is used: both bounds of a row's key range never decrease with its position,
// so the first row has the smallest begin and end and the last row the largest.
#include <cstdint>

#include "common/host_device.h"
#include "common/masks.h"

namespace nsa {

// Key tiles [begin, end) of block_n keys that at least one row of the query tile sees, and the
// interior ones [interior_begin, interior_end) (a sub-range, possibly empty) that every row sees
// entirely: those run without a mask.
struct KeyTiles {
  int64_t begin;
  int64_t end;
  int64_t interior_begin;
  int64_t interior_end;
  NSA_HOST_DEVICE bool interior(int64_t tile) const { return tile >= interior_begin && tile < interior_end; }
};

// Every query row of [first_row, last_row] (rows of one sequence; position = query_offset + row)
// sees all of keys [key_begin, key_end).
NSA_HOST_DEVICE bool tile_is_interior(const VisibilityMask& mask, int64_t query_offset, int64_t first_row,
                                      int64_t last_row, int64_t key_begin, int64_t key_end, int64_t num_keys) {
  return mask.keys_for(query_offset + last_row, num_keys).begin <= key_begin &&
         mask.keys_for(query_offset + first_row, num_keys).end >= key_end;
}

NSA_HOST_DEVICE KeyTiles key_tiles_for_rows(const VisibilityMask& mask, int64_t query_offset, int64_t first_row,
                                            int64_t last_row, int64_t num_keys, int64_t block_n) {
  const KeyRange first = mask.keys_for(query_offset + first_row, num_keys);
  const KeyRange last = mask.keys_for(query_offset + last_row, num_keys);
  // The rows' ranges are ordered, so their union lies in [first.begin, last.end).
  if (last.end <= first.begin) return {0, 0, 0, 0};
  const int64_t begin = first.begin / block_n;
  const int64_t end = (last.end + block_n - 1) / block_n;
  int64_t interior_begin = (last.begin + block_n - 1) / block_n;
  int64_t interior_end = first.end / block_n;
  if (interior_begin < begin) interior_begin = begin;
  if (interior_end > end) interior_end = end;
  if (interior_begin >= interior_end) interior_begin = interior_end = begin;
  return {begin, end, interior_begin, interior_end};
}

// Rows of a query tile that stacks the G query heads of one kv head: row r of a sequence is query
// position r / G, head (kv_head * G + r % G). Returns the position range of rows [row_begin, row_end).
struct StackedRows {
  int64_t first_position;
  int64_t last_position;  // inclusive
};

NSA_HOST_DEVICE StackedRows stacked_positions(int64_t row_begin, int64_t row_end, int64_t group) {
  return {row_begin / group, (row_end - 1) / group};
}

}  // namespace nsa
