#pragma once
// The last step of block selection (spec section 3, steps 4-6), shared by the select_blocks and
// decode kernels on the CPU: from a query's block scores, the forced blocks plus the best other
// candidates (ties to the lower id), ascending, -1 padded.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/selection.h"

namespace nsa::cpu {

template <typename acc_t>
struct Candidate {
  acc_t score;
  int32_t block;
};

// Higher score first; equal scores go to the lower block id. Scores are never NaN here.
template <typename acc_t>
bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.block < b.block);
}

// Writes the selection of the query at `position` from its block scores (candidates [0, cand)).
template <typename acc_t>
void pick_blocks(const BlockSelection& sel, int64_t position, int64_t num_blocks, const acc_t* scores,
                 std::vector<Candidate<acc_t>>& free, std::vector<int32_t>& kept, int32_t* out) {
  const int64_t cand = sel.candidates_end(position, num_blocks);
  const int64_t own = cand > 0 ? sel.own_block(position) : 0;
  kept.clear();
  free.clear();
  for (int64_t j = 0; j < cand; ++j) {
    if (sel.forced_candidate(j, own)) {
      kept.push_back(static_cast<int32_t>(j));
    } else {
      // Inputs with NaN/inf must not break the ordering: a NaN score ranks lowest.
      const acc_t s = std::isnan(scores[j]) ? -std::numeric_limits<acc_t>::infinity() : scores[j];
      free.push_back({s, static_cast<int32_t>(j)});
    }
  }
  const int64_t slots = sel.select_count - static_cast<int64_t>(kept.size());  // >= 0: n >= n_init + n_local
  const int64_t take = std::min<int64_t>(slots, static_cast<int64_t>(free.size()));
  if (take > 0 && take < static_cast<int64_t>(free.size()))
    std::nth_element(free.begin(), free.begin() + take, free.end(), better<acc_t>);
  for (int64_t e = 0; e < take; ++e) kept.push_back(free[e].block);
  std::sort(kept.begin(), kept.end());
  for (int64_t e = 0; e < sel.select_count; ++e)
    out[e] = e < static_cast<int64_t>(kept.size()) ? kept[e] : int32_t(-1);
}

}  // namespace nsa::cpu
