#pragma once
// Tile configuration of the selected-block attention kernels per (dtype, head dims), and their entry
// points. The forward and dq kernels use key tiles of 32 keys: every select block of 32, 64 or 128
// keys is then a whole number of tiles (no tile straddles two blocks' worth of wasted keys), and
// Dk = Dv = 256 still fits double-buffered. Their query tile is 4 warps = 64 stacked rows, of which a
// tile uses selection_tile_rows (common/selection.h): whole positions with their G heads.
//
// Small groups: G heads of one position fill G of the 16 rows of an mma tile. Instead of padding G to
// 16 (G = 1 would use 1/16 of the tensor core), a tile packs 64 / G adjacent positions and visits the
// union of their blocks once, each block masked per row to the positions that chose it (a 64-bit mask
// per block), and a warp skips blocks none of its 16 rows chose. Adjacent queries share the forced
// blocks (first, local) and mostly the top-scored ones, so the union is a small multiple of n while
// every K/V block loaded serves up to 64 rows. The cost is the masked rows of blocks only some
// positions chose; bench.py reports the kernel time with NSA_SELECTION_TILE_POSITIONS set to cap the
// positions per tile, which measures that trade-off per G (the alternative, one block outermost
// gathering the queries that chose it, is what the dk/dv kernel does through the reverse index).
//
// The dk/dv kernel reuses the dense family's Dkv tiles (64 keys, query tile kBlockM, column slices):
// a block of 32 keys leaves warps 2-3 idle rather than paying a second instantiation.
#include "common/selection.h"
#include "cuda/dense/config.h"
#include "cuda/tile/traits.h"

namespace nsa {
namespace tiled {

// (id, position) pairs a forward / dq tile sorts: positions * n <= kMaxTilePairs (the sort buffer
// borrows the K/V stages, 8 bytes per pair).
constexpr int kMaxTilePairs = 1024;

template <typename Element, int kHeadDimQK, int kHeadDimV>
struct SelectionConfig {
  using Fwd = Traits<Element, kHeadDimQK, kHeadDimV, 4, 32, 16, 1>;
  using Dq = Traits<Element, kHeadDimQK, kHeadDimV, 4, 32, 16, 1>;
  using Dkv = typename Config<Element, kHeadDimQK, kHeadDimV>::Dkv;
};

// Defined in cuda/selection/instantiate.h, instantiated once per head-dim file (selection/hdim*.cu).
template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_selection_fwd(const SelectionAttentionParams& p);
template <typename Element, int kHeadDimQK, int kHeadDimV>
void run_selection_bwd(const SelectionAttentionParams& p);

}  // namespace tiled
}  // namespace nsa
