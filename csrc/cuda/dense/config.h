#pragma once
// Tile configuration per (dtype, head dims) of the tiled kernels, and their entry points.
// Traits<Element, Dqk, Dv, warps, key tile (fwd/dq), query tile (dk/dv), dK/dV column slices>.
// Accumulator registers per thread (f32): forward Dv/2 + kBlockN/2, dq Dqk/2 + kBlockN, dk/dv
// (Dqk + Dv)/(2 * slices) + kBlockM; ptxas adds the unrolled fragment loads on top, so the large head
// dims sit at 255 registers. tests/test_cuda_build.py fails on any spill (local memory or stack).
#include "common/attention_params.h"
#include "cuda/tile/traits.h"

namespace nsa {
namespace tiled {

template <typename Element, int kHeadDimQK, int kHeadDimV>
struct Config;

template <typename E>
struct Config<E, 64, 64> {
  using Fwd = Traits<E, 64, 64, 8, 64, 16, 1>;  // 128 query rows x 64 keys
  using Dq = Traits<E, 64, 64, 4, 64, 16, 1>;
  using Dkv = Traits<E, 64, 64, 4, 16, 64, 1>;  // 64 keys x 64 query rows
};

template <typename E>
struct Config<E, 128, 128> {
  using Fwd = Traits<E, 128, 128, 8, 64, 16, 1>;
  using Dq = Traits<E, 128, 128, 4, 64, 16, 1>;
  using Dkv = Traits<E, 128, 128, 4, 16, 32, 1>;
};

template <typename E>
struct Config<E, 192, 128> {
  using Fwd = Traits<E, 192, 128, 4, 64, 16, 1>;
  using Dq = Traits<E, 192, 128, 4, 32, 16, 1>;
  using Dkv = Traits<E, 192, 128, 4, 16, 32, 2>;
};

template <typename E>
struct Config<E, 256, 256> {
  using Fwd = Traits<E, 256, 256, 4, 32, 16, 1>;
  using Dq = Traits<E, 256, 256, 4, 32, 16, 1>;
  using Dkv = Traits<E, 256, 256, 4, 16, 16, 2>;  // 32 query rows spilled 16-24 bytes
};

// Defined in instantiate.h, instantiated once per head-dim file (hdim*.cu).
template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_fwd(const AttentionParams& p);
template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_bwd(const AttentionBwdParams& p);

}  // namespace tiled
}  // namespace nsa
