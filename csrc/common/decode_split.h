#pragma once
// How the CUDA decoding kernels split one step's rows over thread blocks (flash-decoding), shared
// with CPU tests through test hooks. A task is one (sequence, new query, kv head); its rows are the
// visible compressed tokens, the selected blocks' keys and the window's keys, each branch cut into
// a fixed number of splits. The counts depend on shapes only (capacities, not live lengths), so a
// captured CUDA graph stays valid for any cache_seqlens; each split finds its rows on the device.
#include <cstdint>

#include "common/host_device.h"
#include "common/selection.h"

namespace nsa {

NSA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DecodeSplits {
  int64_t compressed;  // splits of the compressed tokens (cut at selection-block boundaries)
  int64_t selected;    // splits of the selected blocks' rows
  int64_t window;      // splits of the window's rows
  NSA_HOST_DEVICE int64_t total() const { return compressed + selected + window; }
};

// Splits per task of the compressed kernel and of the sparse kernel (selected and window splits share
// one row count per split). Each minimises its launch's time in a simple model: the blocks run in
// waves of `slots` (resident blocks on the device), and a block takes time for its rows plus a fixed
// cost of min_rows / 2 rows (queries, first load, record); ties go to fewer splits (fewer records to
// combine). So a split count that leaves a last wave nearly empty loses to one that fills its waves,
// and no split has fewer than min_rows rows unless the branch has fewer. The row counts are the most
// a task can have per branch; min_rows >= 1.
NSA_HOST_DEVICE int64_t modelled_split_time(int64_t tasks, int64_t slots, int64_t min_rows, int64_t blocks_per_task,
                                            int64_t rows_per_split) {
  return ceil_div(tasks * blocks_per_task, slots) * (rows_per_split + min_rows / 2);
}

NSA_HOST_DEVICE DecodeSplits plan_decode_splits(int64_t tasks, int64_t slots, int64_t min_rows, int64_t token_rows,
                                                int64_t selected_rows, int64_t window_rows) {
  const auto count = [](int64_t rows, int64_t per) { return rows > per ? ceil_div(rows, per) : int64_t(1); };
  // Candidate rows per split: ceil(rows / s) for s = 1, 2, ... while that stays >= min_rows.
  const auto best_rows_per_split = [&](int64_t rows, auto blocks_per_task) {
    int64_t best = 0, best_time = 0;
    for (int64_t s = 1; s == 1 || ceil_div(rows, s) >= min_rows; ++s) {
      const int64_t per = rows > s ? ceil_div(rows, s) : 1;
      const int64_t time = modelled_split_time(tasks, slots, min_rows, blocks_per_task(per), per);
      if (s == 1 || time < best_time) {
        best = per;
        best_time = time;
      }
    }
    return best;
  };
  const int64_t compressed_rows = best_rows_per_split(token_rows, [&](int64_t per) { return count(token_rows, per); });
  const int64_t sparse_rows = best_rows_per_split(
      selected_rows + window_rows, [&](int64_t per) { return count(selected_rows, per) + count(window_rows, per); });
  return {count(token_rows, compressed_rows), count(selected_rows, sparse_rows), count(window_rows, sparse_rows)};
}

// Split `index` of `splits` over `rows` rows: [begin, end), near-equal parts in order.
NSA_HOST_DEVICE KeyRange even_split(int64_t rows, int64_t splits, int64_t index) {
  const int64_t per = ceil_div(rows, splits);
  const int64_t begin = per * index < rows ? per * index : rows;
  return {begin, begin + per < rows ? begin + per : rows};
}

// Split `index` of the compressed branch of a query that sees tokens [0, tokens). The splits cut the
// selection blocks the tokens meet, [0, last_block(tokens - 1)], into near-equal runs; a split owns
// the tokens whose first block is one of its blocks (each token in exactly one split: its softmax
// terms) and also scores the few earlier tokens that reach into its first block, so that every score
// of its blocks (Eq. 9) is summed by the split alone.
struct CompressedSplit {
  int64_t block_begin, block_end;  // blocks [block_begin, block_end) whose scores the split sums
  int64_t token_begin, token_end;  // tokens it owns
  int64_t scored_begin;            // first token it scores (<= token_begin)
};

NSA_HOST_DEVICE CompressedSplit compressed_split(const BlockSelection& sel, int64_t tokens, int64_t splits,
                                                 int64_t index) {
  const int64_t blocks = tokens > 0 ? sel.last_block(tokens - 1) + 1 : 0;
  const KeyRange own = even_split(blocks, splits, index);
  const int64_t chunks = sel.block_chunks();
  CompressedSplit s;
  s.block_begin = own.begin;
  s.block_end = own.end;
  s.token_begin = own.begin * chunks < tokens ? own.begin * chunks : tokens;
  s.token_end = own.end * chunks < tokens ? own.end * chunks : tokens;
  const int64_t reach = own.begin * chunks - sel.token_chunks() + 1;  // first token that meets block_begin
  s.scored_begin = own.empty() ? s.token_begin : (reach > 0 ? reach : 0);
  return s;
}

}  // namespace nsa
