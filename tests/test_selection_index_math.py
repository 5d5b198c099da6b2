"""The index math of the CUDA selected-block attention kernels (common/selection.h), run on the host
through test hooks and checked against brute force: which ids of a row count, the tile shape per
group size, the warps' position masks and the reverse index's ordering."""

import itertools

import pytest

from nsa_ext import _C


def brute_counts(ids, num_blocks, block, position):
    seen, out = set(), []
    for j in ids:
        ok = 0 <= j < num_blocks and j * block <= position and j not in seen
        out.append(ok)
        if ok:
            seen.add(j)
    return out


@pytest.mark.parametrize("position", [-5, 0, 31, 32, 63, 64, 200])
def test_counting_slots_match_brute_force(position):
    rows = [[-1, 0, 0, 1], [3, 2, 1, 0], [2**31 - 1, -2**31, 5, 5], [1, -1, 1, 2], [7, 6, 0]]
    for ids, num_blocks, block in itertools.product(rows, (1, 4, 7), (32, 64)):
        assert _C._counting_slots(ids, num_blocks, block, position) == brute_counts(ids, num_blocks, block, position)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16, 18, 64, 65, 200])
@pytest.mark.parametrize("count", [1, 3, 16, 64, 512, 513, 1100])
def test_tile_rows_fit_the_pair_buffer_and_the_position_mask(group, count):
    rows = _C._selection_tile_rows(group, count, 64, 1024, 0)
    if rows == 0:  # the baseline kernel runs instead; only when n is too large
        assert count > 512
        return
    assert 0 < rows <= 64
    for row_begin in range(0, 40 * rows, rows):  # every tile of a sequence
        first, last = row_begin // group, (row_begin + rows - 1) // group
        assert last - first + 1 <= 64 and (last - first + 1) * count <= 1024
    if group < 64:
        assert rows % group == 0  # whole positions
    if group <= 16 and count <= 16:
        assert rows >= 64 - 64 % group  # small groups pack many positions: a full 64-row tile


def test_tile_positions_can_be_capped():
    assert _C._selection_tile_rows(1, 16, 64, 1024, 4) == 4
    assert _C._selection_tile_rows(2, 16, 64, 1024, 100) == 64
    assert _C._selection_tile_rows(4, 16, 64, 1024, 0) == 64


def test_position_bits():
    for first in range(64):
        for last in range(first, 64):
            assert _C._position_bits(first, last) == sum(1 << b for b in range(first, last + 1))


def test_reverse_entries_sort_by_head_sequence_block_then_query():
    seqs, blocks = 3, 5
    keys = [(h, b, j, i) for h in range(2) for b in range(seqs) for j in range(blocks) for i in (0, 1, 7, 2**31 - 1)]
    entries = [_C._reverse_entry(h, b, j, i, seqs, blocks) for h, b, j, i in keys]
    assert sorted(entries) == entries and len(set(entries)) == len(entries)
    assert all(e & 0xffffffff == k[3] for e, k in zip(entries, keys))
