#pragma once
// Helpers of the CPU kernels: fp32/fp64 scratch tiles that ATen's BLAS can multiply, loads of head
// rows (optionally the G query heads of a group stacked into one matrix) and the parallel loop over
// (sequence, kv head, tile) tasks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/attention_params.h"

namespace nsa::cpu {

// Accumulation type of a CPU kernel for inputs of scalar_t: float64 for float64, float32 otherwise.
template <typename scalar_t>
using accumulate_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr at::ScalarType acc_scalar_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// Row-major scratch matrix; view(rows, cols) is a compact tensor over its memory.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> data;
  acc_t* reserve(int64_t n) {
    if (static_cast<int64_t>(data.size()) < n) data.resize(n);
    return data.data();
  }
  at::Tensor view(int64_t rows, int64_t cols) {
    return at::from_blob(reserve(rows * cols), {rows, cols}, at::TensorOptions().dtype(acc_scalar_type<acc_t>()));
  }
};

// dst[r, :] = rows row0 .. row0+rows of one head, converted to acc_t.
template <typename scalar_t, typename acc_t>
void load_head_rows(acc_t* dst, const void* base, const Strides& st, int64_t batch, int64_t row0, int64_t rows,
                    int64_t head, int64_t dim) {
  const scalar_t* src = static_cast<const scalar_t*>(base);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = src + st.offset(batch, row0 + r, head);
    for (int64_t d = 0; d < dim; ++d) dst[r * dim + d] = static_cast<acc_t>(row[d]);
  }
}

// The G query heads of kv head `head_k`, rows [row0, row0+rows), stacked: stacked row g*rows + i.
template <typename scalar_t, typename acc_t>
void load_head_group(acc_t* dst, const void* base, const Strides& st, int64_t batch, int64_t row0, int64_t rows,
                     int64_t head_k, int64_t group, int64_t dim) {
  for (int64_t g = 0; g < group; ++g)
    load_head_rows<scalar_t, acc_t>(dst + g * rows * dim, base, st, batch, row0, rows, head_k * group + g, dim);
}

// Runs task(b, head_k, tile_start) for every sequence, kv head and tile of `tile` rows out of
// `max_rows`, in parallel; tasks beyond a sequence's own length must return at once.
template <typename Task>
void parallel_tiles(int64_t num_seqs, int64_t num_heads_k, int64_t max_rows, int64_t tile, const Task& task) {
  const int64_t tiles = (max_rows + tile - 1) / tile;
  const int64_t total = num_seqs * num_heads_k * tiles;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (num_heads_k * tiles);
      const int64_t head_k = (t / tiles) % num_heads_k;
      task(b, head_k, (t % tiles) * tile);
    }
  });
}

}  // namespace nsa::cpu
