"""The split math of the CUDA decoding kernels (common/decode_split.h), run on the host through test
hooks: split counts, even row splits, and the compressed branch's splits, whose blocks and tokens
must be cut so that every token's softmax term is counted once and every block's score (Eq. 9) is
summed by one split alone, chunk after chunk as the attend kernel does on the compressed branch; and
that algorithm in fp64, merged as the later kernels merge it, against the direct softmax and block
scores."""

import itertools

import pytest
import torch

from nsa_ext import _C, reference

CHUNK = 64  # kChunk of cuda/decode/attend.h
# (l, d, l'): the paper's, small ones, l = d = l', and l > l' (a token meets up to three blocks).
CONFIGS = [(32, 16, 64), (8, 4, 16), (8, 8, 8), (16, 8, 32), (32, 8, 16), (4, 1, 64)]


def num_blocks(tokens, l, d, l_sel):
    """Selection blocks that tokens [0, tokens) meet."""
    return (tokens - 1 + l // d - 1) // (l_sel // d) + 1 if tokens else 0


def test_even_split_cuts_rows_in_order():
    for rows, splits in itertools.product(range(0, 140), range(1, 12)):
        parts = [_C._even_split(rows, splits, s) for s in range(splits)]
        assert parts[0][0] == 0 and parts[-1][1] == rows
        for (b0, e0), (b1, e1) in zip(parts, parts[1:]):
            assert b0 <= e0 == b1 <= e1
        assert max(e - b for b, e in parts) <= -(-rows // splits)


def _count(rows, per):
    return -(-rows // per) if rows > per else 1


def _modelled_time(tasks, slots, min_rows, blocks_per_task, rows_per_split):
    """decode_split.h's model: waves of `slots` blocks, each taking its rows plus min_rows / 2."""
    return -(-tasks * blocks_per_task // slots) * (rows_per_split + min_rows // 2)


def _best_modelled_time(tasks, slots, min_rows, row_counts):
    """Brute force over rows per split ceil(total / s), s = 1, 2, ... (>= min_rows rows unless s = 1)."""
    total = sum(row_counts)
    options = [max(-(-total // s), 1) for s in range(1, total + 2) if s == 1 or -(-total // s) >= min_rows]
    return min(_modelled_time(tasks, slots, min_rows, sum(_count(r, per) for r in row_counts), per) for per in options)


@pytest.mark.parametrize("tasks", [1, 3, 128, 264, 300, 528, 5000])
def test_split_counts_fill_the_waves_with_enough_rows_each(tasks):
    slots, min_rows = 264, 128
    for rows in [(0, 0, 1), (10, 64, 12), (511, 1024, 512), (4095, 1024, 512), (65535, 2048, 4096)]:
        counts = _C._decode_splits(tasks, slots, min_rows, *rows)
        assert all(c >= 1 for c in counts)
        for r, c in zip(rows, counts):
            assert c == 1 or -(-r // c) >= min_rows // 2, (rows, counts)  # no split of a few rows
        # Optimal in the model (the counts' longest split stands for the rows per split).
        for branch_rows, branch_counts in (rows[:1], counts[:1]), (rows[1:], counts[1:]):
            longest = max(-(-r // c) for r, c in zip(branch_rows, branch_counts))
            time = _modelled_time(tasks, slots, min_rows, sum(branch_counts), longest)
            assert time <= _best_modelled_time(tasks, slots, min_rows, branch_rows), (rows, counts)
        # Each kernel fills the device on its own when the rows allow it.
        sparse_rows = rows[1] + rows[2]
        assert tasks * counts[0] >= min(slots, tasks * (rows[0] // min_rows)) // 2, (rows, counts)
        assert tasks * (counts[1] + counts[2]) >= min(slots, tasks * (sparse_rows // min_rows)) // 2, (rows, counts)


def test_split_counts_avoid_a_nearly_empty_last_wave():
    # The decode shape on an H200 with two resident blocks per SM: 128 tasks, 264 slots, 4095
    # compressed tokens, 1024 selected and 512 window rows. Three splits per task (384 blocks) would
    # leave the second wave 45% full; the plan fills its waves.
    tasks, slots = 128, 264
    counts = _C._decode_splits(tasks, slots, 128, 4095, 1024, 512)
    for blocks in (tasks * counts[0], tasks * (counts[1] + counts[2])):
        waves = -(-blocks // slots)
        assert blocks / (waves * slots) > 0.9, counts


@pytest.mark.parametrize("l,d,l_sel", CONFIGS)
def test_compressed_splits_own_every_token_once_and_sum_whole_blocks(l, d, l_sel):
    for tokens, splits in itertools.product([0, 1, 2, 3, 5, 17, 64, 65, 130, 200], [1, 2, 3, 7]):
        blocks = num_blocks(tokens, l, d, l_sel)
        weights = reference.overlap_weights(tokens, blocks, l, d, l_sel)  # Eq. 9's w(token, block)
        parts = [_C._compressed_split(tokens, splits, s, l, d, l_sel) for s in range(splits)]
        assert parts[0][0] == 0 and parts[-1][1] == blocks
        assert parts[0][2] == 0 and parts[-1][3] == tokens
        for a, b in zip(parts, parts[1:]):
            assert a[1] == b[0] and a[3] == b[2]  # blocks and owned tokens follow each other
        for block_begin, block_end, token_begin, token_end, scored_begin in parts:
            assert 0 <= scored_begin <= token_begin <= token_end <= tokens
            assert token_begin - scored_begin <= max(0, l // d - 1)
            for j in range(block_begin, block_end):
                meeting = weights[:, j].nonzero().flatten().tolist()
                assert meeting and scored_begin <= meeting[0] and meeting[-1] < token_end
                _check_chunk_walk(j, meeting, weights, scored_begin, token_end, block_begin, block_end, l, d, l_sel)


def _check_chunk_walk(j, meeting, weights, scored_begin, token_end, block_begin, block_end, l, d, l_sel):
    """The kernel's walk over chunks of CHUNK scored tokens: block j is updated by exactly the chunks
    holding its tokens, the first of them starts its sum and the later ones continue it."""
    block_chunks, token_chunks = l_sel // d, l // d
    reach = max(scored_begin, j * block_chunks - token_chunks + 1)
    updates = []
    for c0 in range(scored_begin, token_end, CHUNK):
        count = min(CHUNK, token_end - c0)
        first = max(block_begin, c0 // block_chunks)
        last = min(block_end - 1, (c0 + count - 1 + token_chunks - 1) // block_chunks)
        if first <= j <= last:
            rows = range(max(reach - c0, 0), min(count, (j + 1) * block_chunks - c0))
            updates.append((c0, [c0 + r for r in rows if weights[c0 + r, j]], reach < c0))
    assert [t for _, ts, _ in updates for t in ts] == meeting
    assert [continued for _, _, continued in updates] == [False] + [True] * (len(updates) - 1)


@pytest.mark.parametrize("l,d,l_sel", CONFIGS)
@pytest.mark.parametrize("splits,chunk", [(1, CHUNK), (3, 5), (7, 2)])
def test_split_walk_reproduces_lse_block_scores_and_output(l, d, l_sel, splits, chunk):
    """The compressed branch of decode_attend_kernel in fp64 (splits of the shared split math, chunks of
    `chunk` tokens with running max, block sums continued across chunks) merged as decode_select_kernel
    and decode_combine_kernel merge it, against the direct softmax and Eq. 9 over all tokens."""
    gen = torch.Generator().manual_seed(l * 1000 + d * 10 + splits)
    group, dim, tokens = 3, 8, 61
    q = torch.randn(group, dim, dtype=torch.float64, generator=gen) * 2
    k = torch.randn(tokens, dim, dtype=torch.float64, generator=gen)
    v = torch.randn(tokens, dim, dtype=torch.float64, generator=gen)
    scores = q @ k.T  # [group, tokens]
    blocks = num_blocks(tokens, l, d, l_sel)
    weights = reference.overlap_weights(tokens, blocks, l, d, l_sel)  # [tokens, blocks]

    records, block_sum, block_max = [], {}, {}
    block_chunks, token_chunks = l_sel // d, l // d
    for s in range(splits):
        split = _C._compressed_split(tokens, splits, s, l, d, l_sel)
        block_begin, block_end, token_begin, token_end, scored_begin = split
        top = torch.full((group,), float("-inf"), dtype=torch.float64)
        total, out = torch.zeros(group, dtype=torch.float64), torch.zeros(group, dim, dtype=torch.float64)
        for c0 in range(scored_begin, token_end, chunk):
            rows = torch.arange(c0, min(c0 + chunk, token_end))
            new_top = torch.maximum(top, scores[:, rows].max(1).values)
            prob, alpha = (scores[:, rows] - new_top[:, None]).exp(), (top - new_top).exp()
            owned = rows >= token_begin
            total = total * alpha + prob[:, owned].sum(1)
            out = out * alpha[:, None] + prob[:, owned] @ v[rows[owned]]
            top = new_top
            first = max(block_begin, c0 // block_chunks)
            last = min(block_end - 1, (int(rows[-1]) + token_chunks - 1) // block_chunks)
            for j in range(first, last + 1):
                reach = max(scored_begin, j * block_chunks - token_chunks + 1)
                part = prob @ weights[rows, j]
                if reach < c0:
                    part = part + block_sum[j] * (block_max[j] - top).exp()
                block_sum[j], block_max[j] = part, top.clone()
        records.append((top, total, out))

    merged_top = torch.stack([r[0] for r in records]).max(0).values
    factors = [(r[0] - merged_top).exp() for r in records]
    total = sum(f * r[1] for f, r in zip(factors, records))
    out = sum(f[:, None] * r[2] for f, r in zip(factors, records)) / total[:, None]
    lse = merged_top + total.log()
    torch.testing.assert_close(lse, scores.logsumexp(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(out, scores.softmax(1) @ v, rtol=1e-12, atol=1e-14)
    assert sorted(block_sum) == list(range(blocks))  # every block summed, by one split
    block_scores = torch.stack([(block_sum[j] * (block_max[j] - lse).exp()).sum() for j in range(blocks)])
    expected = ((scores - lse[:, None]).exp().sum(0) @ weights)  # Eq. 9 summed over the group
    torch.testing.assert_close(block_scores, expected, rtol=1e-12, atol=1e-15)
