#pragma once
// Which keys a query sees, for the dense-tiled branches (sliding window, compressed tokens).
// One mask object serves the CPU kernel, the CUDA forward and the CUDA backward; its Python twin is
// in nsa_ext/reference.py. Both bounds of a row's key range never decrease with the query position,
// which is what lets kernels skip whole tiles and find a key tile's queries by binary search.
#include <cstdint>

#include "common/host_device.h"

namespace nsa {

// Keys [begin, end) of one query row; empty when begin >= end.
struct KeyRange {
  int64_t begin;
  int64_t end;
  NSA_HOST_DEVICE bool empty() const { return begin >= end; }
};

// TC = max(0, (TK - l) // d + 1): compressed tokens of a sequence of num_keys keys (spec section 1).
NSA_HOST_DEVICE int64_t num_compressed_tokens(int64_t num_keys, int64_t compress_block, int64_t compress_stride) {
  return num_keys < compress_block ? 0 : (num_keys - compress_block) / compress_stride + 1;
}

struct VisibilityMask {
  enum Kind : int32_t { kWindow = 0, kCompressed = 1 };
  Kind kind;
  int64_t window;          // kWindow: keys t - window < s <= t
  int64_t compress_block;  // kCompressed: token i visible iff i*stride + block - 1 <= t
  int64_t compress_stride;

  static VisibilityMask sliding_window(int64_t window) { return {kWindow, window, 0, 0}; }
  static VisibilityMask compressed(int64_t block, int64_t stride) { return {kCompressed, 0, block, stride}; }

  // position: the query's absolute position in its sequence (may be negative when TQ > TK);
  // num_keys: key rows (tokens) of the sequence.
  NSA_HOST_DEVICE KeyRange keys_for(int64_t position, int64_t num_keys) const {
    int64_t begin = 0;
    int64_t end = 0;
    if (kind == kWindow) {
      begin = position - window + 1 > 0 ? position - window + 1 : 0;
      end = position + 1;
    } else if (position >= compress_block - 1) {
      end = (position - compress_block + 1) / compress_stride + 1;
    }
    if (end > num_keys) end = num_keys;
    if (end < begin) end = begin;
    return {begin, end};
  }
};

// Query rows [first, last) of a sequence whose key range meets keys [key_begin, key_end), found by
// binary search over the monotone bounds. query_offset is the position of query row 0.
struct QueryRange {
  int64_t begin;
  int64_t end;
};

NSA_HOST_DEVICE QueryRange queries_seeing(const VisibilityMask& mask, int64_t key_begin, int64_t key_end,
                                          int64_t query_offset, int64_t num_queries, int64_t num_keys) {
  // First row whose range ends after key_begin.
  int64_t lo = 0, hi = num_queries;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (mask.keys_for(query_offset + mid, num_keys).end > key_begin) hi = mid; else lo = mid + 1;
  }
  const int64_t first = lo;
  // First row whose range begins at or after key_end (or is empty at the start of the sequence).
  hi = num_queries;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (mask.keys_for(query_offset + mid, num_keys).begin >= key_end) hi = mid; else lo = mid + 1;
  }
  return {first, lo};
}

}  // namespace nsa
