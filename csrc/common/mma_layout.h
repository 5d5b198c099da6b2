#pragma once
// Who holds what in the warp-level tensor-core instructions the CUDA attention kernels use:
// mma.sync.aligned.m16n8k16 with 16-bit inputs (f16 / bf16) and f32 accumulators, and
// ldmatrix.sync.aligned.m8n8.x4{.trans}.b16. The kernels index their register fragments and shared
// memory addresses through these functions; tests/test_fragment_layout.py checks them against the
// PTX ISA tables through nsa_ext._C._fragment_layout, so a wrong index fails on a machine without a GPU.
//
// Notation (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   groupID = lane / 4, threadID_in_group = lane % 4.
//   A is 16 x 16 (M x K), 8 halves per lane: a0..a7, packed two per 32-bit register.
//   B is 16 x 8  (K x N), 4 halves per lane: b0..b3.
//   C/D is 16 x 8 (M x N), 4 floats per lane: c0..c3.
#include <cstdint>

#include "common/host_device.h"

namespace nsa {
namespace mma {

struct RowCol {
  int row;
  int col;
};

NSA_HOST_DEVICE constexpr int group_id(int lane) { return lane >> 2; }
NSA_HOST_DEVICE constexpr int thread_in_group(int lane) { return lane & 3; }

// Element i (0..7) of the A fragment of `lane`: a0,a1 and a4,a5 sit on row groupID, the others on
// groupID + 8; a0..a3 in columns 0..7, a4..a7 in columns 8..15.
NSA_HOST_DEVICE constexpr RowCol a_element(int lane, int i) {
  return {group_id(lane) + (((i >> 1) & 1) ? 8 : 0), thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}

// Element i (0..3) of the B fragment (K x N): b0,b1 in rows (k) 0..7, b2,b3 in rows 8..15; column
// (n) groupID. Two consecutive k per register: B is read "column-major" by the instruction.
NSA_HOST_DEVICE constexpr RowCol b_element(int lane, int i) {
  return {thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0), group_id(lane)};
}

// Element i (0..3) of the C/D fragment: c0,c1 on row groupID, c2,c3 on groupID + 8; two adjacent
// columns. This is also why the accumulator of one 16 x 16 product, converted to 16-bit, is
// exactly an A fragment: C of n-block 2j gives a0..a3, C of n-block 2j+1 gives a4..a7.
NSA_HOST_DEVICE constexpr RowCol c_element(int lane, int i) {
  return {group_id(lane) + (i >= 2 ? 8 : 0), thread_in_group(lane) * 2 + (i & 1)};
}

// A-fragment element i comes from accumulator element c_index_of_a(i) of n-block n_block_of_a(i)
// (n-blocks of 8 columns within the 16 columns of one k-step).
NSA_HOST_DEVICE constexpr int n_block_of_a(int i) { return i >= 4 ? 1 : 0; }
NSA_HOST_DEVICE constexpr int c_index_of_a(int i) { return i & 3; }

// ldmatrix.x4: lanes 8j..8j+7 give the addresses of rows 0..7 of matrix j; every lane receives, of
// each matrix j (in destination register j), row groupID, columns 2*threadID_in_group + {0,1}.
// With .trans it receives the transpose: rows 2*threadID_in_group + {0,1}, column groupID.
NSA_HOST_DEVICE constexpr int ldmatrix_matrix_of_lane(int lane) { return lane >> 3; }
NSA_HOST_DEVICE constexpr int ldmatrix_row_of_lane(int lane) { return lane & 7; }
NSA_HOST_DEVICE constexpr RowCol ldmatrix_element(int lane, int i, bool trans) {
  return trans ? RowCol{thread_in_group(lane) * 2 + i, group_id(lane)}
               : RowCol{group_id(lane), thread_in_group(lane) * 2 + i};
}

// Which row / column (within a 16 x 16 tile in shared memory, row-major) lane addresses so that one
// ldmatrix.x4 yields exactly the fragment the kernels need:
//  - kA:      the A fragment of a 16 (m) x 16 (k) tile: registers = {a0a1, a2a3, a4a5, a6a7}.
//             Matrices: 0 = rows 0-7 cols 0-7, 1 = rows 8-15 cols 0-7, 2 = rows 0-7 cols 8-15, 3 = rows 8-15 cols 8-15.
//  - kBRows:  B fragments of two n-blocks from a tile stored n-major (row = n, col = k, e.g. K rows
//             for Q K^T): registers = {b0b1, b2b3} of n-block 0 then of n-block 1.
//             Matrices: 0 = n 0-7 k 0-7, 1 = n 0-7 k 8-15, 2 = n 8-15 k 0-7, 3 = n 8-15 k 8-15.
//  - kBTrans: B fragments of two n-blocks from a tile stored k-major (row = k, col = n, e.g. V rows
//             for P V), loaded with .trans: registers = {b0b1, b2b3} of n-block 0 then of n-block 1.
//             Matrices: 0 = k 0-7 n 0-7, 1 = k 8-15 n 0-7, 2 = k 0-7 n 8-15, 3 = k 8-15 n 8-15.
enum class Operand : int { kA = 0, kBRows = 1, kBTrans = 2 };

NSA_HOST_DEVICE constexpr RowCol ldmatrix_x4_address(Operand op, int lane) {
  const int m = ldmatrix_matrix_of_lane(lane), r = ldmatrix_row_of_lane(lane);
  if (op == Operand::kBRows) return {r + (m >> 1) * 8, (m & 1) * 8};
  return {r + (m & 1) * 8, (m >> 1) * 8};  // kA and kBTrans share the addressing
}

// The 16 x 16 tile element that register `reg` (0..3), half `half` (0/1) of `lane` holds after
// ldmatrix_x4_address(op, lane) + ldmatrix.x4 (.trans for kBTrans). For kA this must equal
// a_element(lane, 2*reg + half); for the B operands b_element of n-block reg / 2, element
// 2*(reg % 2) + half, shifted by 8 columns for n-block 1 (checked by the tests).
NSA_HOST_DEVICE constexpr RowCol ldmatrix_x4_element(Operand op, int lane, int reg, int half) {
  // Lane `lane` receives element `half` of matrix `reg` at (row, col) within that 8 x 8 matrix.
  const RowCol in_matrix = ldmatrix_element(lane, half, op == Operand::kBTrans);
  // Where that matrix sits in the 16 x 16 tile: the addresses lanes 8*reg .. 8*reg+7 supplied.
  const RowCol origin = ldmatrix_x4_address(op, reg * 8);
  return {origin.row + in_matrix.row, origin.col + in_matrix.col};
}

// --- wgmma shared-memory operands (cuda/tile/wgmma.h) ---------------------------------------------
// A 16-bit tile of `rows` rows in the canonical no-swizzle core-matrix layout, column-chunk-major:
// chunk c (columns 8c .. 8c + 7) of rows 8g .. 8g + 7 is one 8 x 16-byte core matrix at
// c * rows * 16 + g * 128 bytes.

// Byte offset of element (row, col) of such a tile.
NSA_HOST_DEVICE constexpr int core_offset(int rows, int row, int col) {
  return (col / 8) * rows * 16 + (row / 8) * 128 + (row % 8) * 16 + (col % 8) * 2;
}

// The 64-bit shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets, each encoded as (x & 0x3FFFF) >> 4; no swizzle, base offset 0.
NSA_HOST_DEVICE constexpr uint64_t matrix_descriptor(uint32_t smem_address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return uint64_t((smem_address & 0x3FFFF) >> 4) | uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16 |
         uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32;
}

// Descriptor of the K-major operand that starts at row `row0`, column `col0` (a multiple of 8) of a
// core-matrix tile with kRows rows (Q as A, K as B of Q K^T).
NSA_HOST_DEVICE constexpr uint64_t k_major_descriptor(uint32_t tile_address, int rows, int row0, int col0) {
  return matrix_descriptor(tile_address + core_offset(rows, row0, col0), rows * 16, 128);
}

// Descriptor of the N-major B whose K runs down the tile's rows from `row0` and N along its columns
// from `col0` (V as B of P V, rows = keys).
NSA_HOST_DEVICE constexpr uint64_t n_major_descriptor(uint32_t tile_address, int rows, int row0, int col0) {
  return matrix_descriptor(tile_address + core_offset(rows, row0, col0), 128, rows * 16);
}

}  // namespace mma
}  // namespace nsa
