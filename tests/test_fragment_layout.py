"""Index math of the tiled CUDA kernels, checked on the CPU: the mma.m16n8k16 / ldmatrix fragment
tables of csrc/common/mma_layout.h against the PTX ISA, the wgmma shared-memory layout and descriptors
against the PTX ISA's canonical layouts, and the key-tile schedule of
csrc/common/tile_schedule.h against brute force over the visibility masks."""

import itertools

import pytest

import nsa_ext

_C = nsa_ext._C


# --- PTX ISA tables, written out independently of the C++ header --------------------------------
# PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 A and B,
# .f32 C/D) and 9.7.14.5.15 "ldmatrix" (each thread receives row laneid/4, elements 2*(laneid%4)+{0,1}
# of every matrix; lanes 8j..8j+7 address the rows of matrix j).

def ptx_a(lane, i):
    group, tig = lane >> 2, lane % 4
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b(lane, i):
    group, tig = lane >> 2, lane % 4
    row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
    return row, group


def ptx_c(lane, i):
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def ptx_ldmatrix(lane, i, trans):
    row, col = lane // 4, 2 * (lane % 4) + i
    return (col, row) if trans else (row, col)


def table(kind):
    return [[tuple(cell) for cell in lane] for lane in _C._fragment_layout(kind)]


@pytest.mark.parametrize("kind,count,oracle", [("mma_a", 8, ptx_a), ("mma_b", 4, ptx_b), ("mma_c", 4, ptx_c)])
def test_mma_fragments_match_ptx(kind, count, oracle):
    assert table(kind) == [[oracle(lane, i) for i in range(count)] for lane in range(32)]


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_fragments_match_ptx(trans):
    got = table("ldmatrix_trans" if trans else "ldmatrix")
    assert got == [[ptx_ldmatrix(lane, i, trans) for i in range(2)] for lane in range(32)]


@pytest.mark.parametrize("kind,shape", [("mma_a", (16, 16)), ("mma_b", (16, 8)), ("mma_c", (16, 8))])
def test_fragments_cover_each_element_once(kind, shape):
    cells = [cell for lane in table(kind) for cell in lane]
    assert sorted(cells) == sorted(itertools.product(range(shape[0]), range(shape[1])))


def simulate_ldmatrix_x4(addresses, trans):
    """What ldmatrix.x4 delivers per PTX: register j of each lane is matrix j, whose row r is the
    16 bytes at the address lane 8j + r supplied. Returns [lane][reg*2 + half] -> tile (row, col)."""
    out = []
    for lane in range(32):
        cells = []
        for reg in range(4):
            for half in range(2):
                r, c = ptx_ldmatrix(lane, half, trans)  # element (r, c) of matrix `reg`
                base_row, base_col = addresses[reg * 8 + r]
                cells.append((base_row, base_col + c))
        out.append(cells)
    return out


@pytest.mark.parametrize("operand,trans", [("a", False), ("b_rows", False), ("b_trans", True)])
def test_ldmatrix_x4_addressing_yields_the_header_table(operand, trans):
    addresses = [lane[0] for lane in table(f"x4_address_{operand}")]
    assert simulate_ldmatrix_x4(addresses, trans) == table(f"x4_element_{operand}")


def test_ldmatrix_x4_a_gives_the_a_fragment():
    # Tile coordinates (row, col) = (m, k); registers {a0a1, a2a3, a4a5, a6a7}.
    got = table("x4_element_a")
    assert got == [[ptx_a(lane, i) for i in range(8)] for lane in range(32)]


def test_ldmatrix_x4_b_rows_gives_two_b_fragments():
    # K stored n-major (row = n, col = k): register 2*nb + j holds b(2j, 2j+1) of n-block nb.
    got = table("x4_element_b_rows")
    for lane in range(32):
        for nb in range(2):
            for i in range(4):
                k, n = ptx_b(lane, i)
                assert got[lane][nb * 4 + i] == (n + 8 * nb, k)


def test_ldmatrix_x4_b_trans_gives_two_b_fragments():
    # V stored k-major (row = k, col = n) and read with .trans.
    got = table("x4_element_b_trans")
    for lane in range(32):
        for nb in range(2):
            for i in range(4):
                k, n = ptx_b(lane, i)
                assert got[lane][nb * 4 + i] == (k, n + 8 * nb)


def test_accumulators_become_the_next_a_fragment():
    # A[16 x 16] element i of a lane comes from C of n-block n_block_of_a(i), element c_index_of_a(i):
    # the same (row, col) once the n-block's 8-column offset is added.
    sources = table("a_from_c")
    for lane in range(32):
        for i, (n_block, c_index) in enumerate(sources[lane]):
            row, col = ptx_c(lane, c_index)
            assert ptx_a(lane, i) == (row, col + 8 * n_block)


# --- tile schedule ---------------------------------------------------------------------------------

def keys_for(kind, a, b, position, num_keys):
    if kind == "window":
        begin, end = max(position - a + 1, 0), position + 1
    else:
        begin, end = 0, ((position - a + 1) // b + 1) if position >= a - 1 else 0
    end = min(end, num_keys)
    return begin, max(end, begin)


def visible(kind, a, b, position, key, num_keys):
    begin, end = keys_for(kind, a, b, position, num_keys)
    return begin <= key < end


MASKS = [("window", 1, 0), ("window", 5, 0), ("window", 64, 0), ("window", 100, 0), ("window", 1000, 0),
         ("compressed", 32, 16), ("compressed", 16, 16), ("compressed", 64, 8)]


@pytest.mark.parametrize("kind,a,b", MASKS)
@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_key_tiles_visit_exactly_the_needed_tiles(kind, a, b, block_n):
    for num_queries, num_keys in [(97, 97), (40, 300), (1, 1), (64, 64), (200, 13)]:
        offset = num_keys - num_queries if kind == "window" else 0
        if kind == "compressed":  # keys are compressed tokens of num_keys original keys
            offset, num_keys = num_keys - num_queries, max(0, (num_keys - a) // b + 1)
        for first in range(0, num_queries, 7):
            for rows in (1, 3, 16, 64):
                last = min(first + rows, num_queries) - 1
                begin, end, ib, ie = _C._key_tiles(kind, a, b, offset, first, last, num_keys, block_n)
                positions = [offset + r for r in range(first, last + 1)]
                needed = {key // block_n for p in positions for key in range(num_keys)
                          if visible(kind, a, b, p, key, num_keys)}
                visited = set(range(begin, end))
                assert needed <= visited, (first, last, needed - visited)
                # Only tiles that some row needs, except gaps inside the span (there are none for these masks).
                assert visited == needed
                for tile in range(begin, end):
                    keys = range(tile * block_n, (tile + 1) * block_n)
                    full = all(key < num_keys and visible(kind, a, b, p, key, num_keys) for p in positions for key in keys)
                    assert (ib <= tile < ie) == full, (first, last, tile)
                    assert _C._tile_is_interior(kind, a, b, offset, first, last, keys.start, keys.stop, num_keys) == full


@pytest.mark.parametrize("kind,a,b", MASKS)
def test_queries_seeing_a_key_tile(kind, a, b):
    num_queries, num_keys = 90, 130
    offset = 40
    if kind == "compressed":
        num_keys = max(0, (num_keys - a) // b + 1)
    for key_begin in range(0, num_keys, 5):
        for width in (1, 16, 64):
            key_end = min(key_begin + width, num_keys)
            first, end = _C._queries_seeing(kind, a, b, key_begin, key_end, offset, num_queries, num_keys)
            expected = [r for r in range(num_queries)
                        if any(visible(kind, a, b, offset + r, key, num_keys) for key in range(key_begin, key_end))]
            if expected:
                assert (first, end) == (expected[0], expected[-1] + 1)
            else:
                assert first >= end


def test_window_of_512_at_64k_visits_order_w_keys():
    # O(T * w): a 128-row tile of stacked G = 16 heads (8 positions) visits at most w + 8 + 2 tiles' keys.
    t, w, block_n = 65536, 512, 64
    for first in (0, 1000, 40000, t - 8):
        begin, end, ib, ie = _C._key_tiles("window", w, 0, 0, first, first + 7, t, block_n)
        assert (end - begin) * block_n <= w + 8 + 2 * block_n
        assert ie - ib >= (w - 8) // block_n - 2 or first < w


# --- wgmma operands (csrc/common/mma_layout.h, cuda/tile/wgmma.h) ----------------------------------
# PTX ISA 9.7.15.5.1.2 "Shared Memory Matrix Layout": descriptor bits 13-0 start address, 29-16 leading
# dimension byte offset (LBO), 45-32 stride dimension byte offset (SBO), each (x & 0x3FFFF) >> 4, bits
# 63-62 swizzle (0: none). Canonical layouts without swizzling, in elements, T = 8 16-bit elements per
# 16 bytes: K-major ((8,m),(T,2k)):((1T,SBO),(1,LBO)); MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)).

def decode(desc):
    assert desc >> 62 == 0 and (desc >> 49) & 7 == 0  # no swizzle, base offset 0
    return tuple(((desc >> shift) & 0x3FFF) << 4 for shift in (0, 16, 32))  # start, LBO, SBO in bytes


def ptx_k_major(desc, mn, k):
    start, lbo, sbo = decode(desc)
    return start + (mn % 8) * 16 + (mn // 8) * sbo + (k % 8) * 2 + (k // 8) * lbo


def ptx_mn_major(desc, k, mn):
    start, lbo, sbo = decode(desc)
    return start + (mn % 8) * 2 + (k % 8) * 16 + (mn // 8) * sbo + (k // 8) * lbo


def test_descriptor_bits_match_the_ptx_example():
    # PTX's K-major no-swizzle example: LBO 64 tf32 (256 bytes) encodes as 16, SBO 32 tf32 as 8.
    desc = _C._core_descriptor(False, 4096, 16, 0, 0)  # a 16-row tile: LBO = 16 * 16, SBO = 128
    assert decode(desc) == (4096, 256, 128)
    assert (desc >> 16) & 0x3FFF == 16 and (desc >> 32) & 0x3FFF == 8


@pytest.mark.parametrize("rows", [32, 64, 128])
def test_k_major_operand_reads_the_tile_the_loader_wrote(rows):
    """Q (A, 64 rows of a warpgroup) and K (B, all rows) of Q K^T: every element of each 16-wide k-step
    the descriptor names is where core_offset put it."""
    base = 2048
    for row0 in range(0, rows, 64) if rows >= 64 else [0]:
        m = min(64, rows)
        for col0 in (0, 16, 48):
            desc = _C._core_descriptor(False, base, rows, row0, col0)
            for mn, k in itertools.product(range(m), range(16)):
                assert ptx_k_major(desc, mn, k) == base + _C._core_offset(rows, row0 + mn, col0 + k)


@pytest.mark.parametrize("rows", [32, 64])
def test_n_major_operand_reads_the_tile_the_loader_wrote(rows):
    """V (B of P V, keys down the rows): k-step kk covers keys 16kk .. 16kk + 15, an instruction 64
    columns from col0."""
    base = 8192
    for row0, col0 in itertools.product(range(0, rows, 16), (0, 64, 192)):
        desc = _C._core_descriptor(True, base, rows, row0, col0)
        for k, mn in itertools.product(range(16), range(64)):
            assert ptx_mn_major(desc, k, mn) == base + _C._core_offset(rows, row0 + k, col0 + mn)


def test_core_offset_is_a_bijection_onto_the_tile():
    rows, cols = 64, 192
    offsets = {_C._core_offset(rows, r, c) for r in range(rows) for c in range(cols)}
    assert offsets == set(range(0, rows * cols * 2, 2))
