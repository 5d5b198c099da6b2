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
// positions chose, which grows with T when neighbouring positions choose differently (random picks at
// T = 64k: a 16-row warp at G = 1 visits ~12x the blocks its rows need). bench.py's --tile-positions
// (NSA_SELECTION_TILE_POSITIONS) caps the positions per tile to measure the packing.
//
// The alternative, FSA's design, is the schedule by blocks of the forward and dq kernels
// (NSA_SELECTION_SCHEDULE=blocks, SelectionBlockSchedule, selection_attention.cu): one block outermost,
// gathering the queries that chose it through the reverse index (as the dk/dv kernel does), so every
// mma row is used, for the price of the index (a sort; the backward builds it anyway) and of Dv + 1
// (forward) or Dk (dq) floats written and read back per (row, slot). Which is faster per G and T is
// for a GPU to measure (scripts/gpu_check.sh times both); until then tiles stay the default.
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

// Stacked query rows per forward / dq tile (4 warps); the host sizes tiles by it.
constexpr int kSelectionRows = 64;

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
