#pragma once
// Tile shapes of the tiled (tensor-core) dense attention kernels, and the shared memory they need.
// One traits template per head-dim configuration; csrc/cuda/dense/config.h and csrc/cuda/selection/config.h pick them.
#include <cstdint>

namespace nsa {
namespace tiled {

// Largest dynamic shared memory one block may opt into on sm_80 (A100); sm_90 allows 227 KB, but
// every instantiation is built for both, so the smaller bound applies.
constexpr int kMaxSharedBytes = 163 * 1024;

// Element: __nv_bfloat16 or __half. Each warp owns 16 rows of the operand it iterates over (query
// rows in the forward and dq kernels, key rows in the dk/dv kernel), so the row tile is 16 * kWarps.
//   kBlockN: key tile of the forward / dq kernels.
//   kBlockM: query tile of the dk/dv kernel.
//   kSplitD: the dk/dv kernel computes dK and dV in kSplitD column slices (blockIdx.z), so that a
//            thread's accumulators fit in registers for large head dims; the slices recompute the
//            scores (1.5x the backward FLOPs for 2 slices), which is the price of not spilling.
template <typename Element_, int kHeadDimQK_, int kHeadDimV_, int kWarps_, int kBlockN_, int kBlockM_, int kSplitD_>
struct Traits {
  using Element = Element_;
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // query rows (fwd, dq) or key rows (dk/dv) per block
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kSplitD = kSplitD_;
  static constexpr int kSliceQK = kHeadDimQK / kSplitD;
  static constexpr int kSliceV = kHeadDimV / kSplitD;

  // Rows padded by 8 elements (16 bytes): the 8 row addresses of one ldmatrix phase then fall into
  // 8 different 16-byte bank groups (conflict-free) without an XOR swizzle.
  static constexpr int kPad = 8;
  static constexpr int kStrideQK = kHeadDimQK + kPad;
  static constexpr int kStrideV = kHeadDimV + kPad;
  static constexpr int kElem = 2;

  // Forward: Q [kRows][QK] + 2 stages of K [kBlockN][QK] and V [kBlockN][V].
  static constexpr int kFwdSmem = kElem * (kRows * kStrideQK + 2 * kBlockN * (kStrideQK + kStrideV));
  // dq: Q and dO [kRows] + 2 stages of K and V [kBlockN].
  static constexpr int kDqSmem = kElem * (kRows * (kStrideQK + kStrideV) + 2 * kBlockN * (kStrideQK + kStrideV));
  // dk/dv: K and V [kRows] + 2 stages of Q and dO [kBlockM] + per query row lse, delta, key range.
  static constexpr int kRowMetaBytes = 4 * 4;
  static constexpr int kDkvSmem =
      kElem * (kRows * (kStrideQK + kStrideV) + 2 * kBlockM * (kStrideQK + kStrideV)) + 2 * kBlockM * kRowMetaBytes;

  static_assert(kHeadDimQK % 16 == 0 && kHeadDimV % 16 == 0, "head dims are whole mma k-steps");
  static_assert(kSliceQK % 16 == 0 && kSliceV % 16 == 0, "dK/dV slices are whole mma n-steps");
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "tiles are whole mma steps");
  static_assert(kFwdSmem <= kMaxSharedBytes, "forward tiles exceed shared memory");
  static_assert(kDqSmem <= kMaxSharedBytes, "dq tiles exceed shared memory");
  static_assert(kDkvSmem <= kMaxSharedBytes, "dk/dv tiles exceed shared memory");
};

}  // namespace tiled
}  // namespace nsa
