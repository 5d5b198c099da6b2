"""Fused top-n block selection (spec section 3): kernel vs the fp64 reference (forced blocks exactly,
free blocks by score), layouts, the block configuration rules, opcheck, torch.compile and bad inputs."""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from utils import DEVICES, cu_seqlens, poisoned_outputs, seqlens_kwargs

OPS = torch.ops.nsa


@dataclass(frozen=True)
class Config:
    compress_block: int
    compress_stride: int
    select_block: int
    select_count: int
    init_blocks: int = 1
    local_blocks: int = 2

    @property
    def kwargs(self) -> dict:
        return dict(compress_block=self.compress_block, compress_stride=self.compress_stride,
                    select_block=self.select_block, select_count=self.select_count, init_blocks=self.init_blocks,
                    local_blocks=self.local_blocks)


PAPER = Config(32, 16, 64, 16, 1, 2)


@dataclass
class Inputs:
    """q, k_cmp and the compressed branch's lse in one layout (k_lens are ORIGINAL key lengths)."""
    q: torch.Tensor
    k_cmp: torch.Tensor
    lse: torch.Tensor
    k_lens: list
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None

    seqlens = property(seqlens_kwargs)

    def to(self, dtype) -> "Inputs":
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return Inputs(self.q.to(dtype), self.k_cmp.to(dtype), self.lse.to(lse_dtype), self.k_lens,
                      self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)

    def to_device(self, device) -> "Inputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Inputs(self.q.to(device), self.k_cmp.to(device), self.lse.to(device), self.k_lens,
                      move(self.cu_seqlens_q), move(self.cu_seqlens_k), self.max_seqlen_q, self.max_seqlen_k)


def make_inputs(q_lens, k_lens, heads_q, heads_k, dim, cfg, packed, seed, scale=None, extra_rows=0) -> Inputs:
    """Random fp64 q and k_cmp (TC(TK) rows per sequence, plus extra_rows unused padded rows) and the
    lse that reference.compressed_attention returns for them."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [reference.num_compressed_tokens(n, cfg.compress_block, cfg.compress_stride) for n in k_lens]
    if packed:
        q = torch.randn(sum(q_lens), heads_q, dim, dtype=torch.float64, generator=gen)
        k_cmp = torch.randn(sum(tokens), heads_k, dim, dtype=torch.float64, generator=gen)
        seq = dict(cu_seqlens_q=cu_seqlens(q_lens), cu_seqlens_k=cu_seqlens(k_lens),
                   max_seqlen_q=max(q_lens, default=0), max_seqlen_k=max(k_lens, default=0))
    else:
        assert len(set(q_lens)) == 1 and len(set(k_lens)) == 1
        q = torch.randn(len(q_lens), q_lens[0], heads_q, dim, dtype=torch.float64, generator=gen)
        k_cmp = torch.randn(len(q_lens), tokens[0] + extra_rows, heads_k, dim, dtype=torch.float64, generator=gen)
        seq = dict(max_seqlen_k=k_lens[0])
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, compress_block=cfg.compress_block,
                                            compress_stride=cfg.compress_stride, scale=scale, **seq)
    return Inputs(q, k_cmp, lse, list(k_lens), **seq)


def run(x: Inputs, cfg: Config, scale=None):
    return nsa_ext.select_blocks(x.q, x.k_cmp, x.lse, scale=scale, **cfg.kwargs, **x.seqlens)


def run_reference(x: Inputs, cfg: Config, scale=None):
    return reference.select_blocks(x.q, x.k_cmp, x.lse, scale=scale, **cfg.kwargs, **x.seqlens)


def sequences(x: Inputs, cfg: Config):
    """(query rows, q, lse, k_cmp, TK) of every sequence, from either layout."""
    if x.cu_seqlens_q is None:
        for b in range(x.q.shape[0]):
            yield b, x.q[b], x.lse[b], x.k_cmp[b], x.k_lens[b]
        return
    cq = x.cu_seqlens_q.tolist()
    cc = reference.compressed_seqlens(x.cu_seqlens_k, cfg.compress_block, cfg.compress_stride).tolist()
    for b in range(len(cq) - 1):
        rows = slice(cq[b], cq[b + 1])
        yield rows, x.q[rows], x.lse[rows], x.k_cmp[cc[b]:cc[b + 1]], x.k_lens[b]


def group_scores(q, lse, k_cmp, k_len, cfg, scale):
    """Spec section 3 steps 1-3 in fp64, written out: S [TQ, Hk, NB], candidate and forced [TQ, NB]."""
    q, lse, k_cmp = q.double(), lse.double(), k_cmp.double()
    tq, heads_q = q.shape[:2]
    heads_k = k_cmp.shape[1]
    tokens = reference.num_compressed_tokens(k_len, cfg.compress_block, cfg.compress_stride)
    blocks = math.ceil(k_len / cfg.select_block)
    t = torch.arange(tq)[:, None] + (k_len - tq)
    i = torch.arange(tokens)[None, :]
    visible = i * cfg.compress_stride + cfg.compress_block - 1 <= t  # [TQ, TC]
    k_rep = k_cmp[:tokens].repeat_interleave(heads_q // heads_k, dim=1)
    logits = torch.einsum("qhd,khd->qhk", q, k_rep) * scale - lse[..., None]
    probs = torch.where(visible[:, None, :], logits.exp(), torch.zeros_like(logits))
    weights = reference.overlap_weights(tokens, blocks, cfg.compress_block, cfg.compress_stride, cfg.select_block)
    per_head = probs @ weights  # [TQ, Hq, NB]
    scores = per_head.view(tq, heads_k, heads_q // heads_k, blocks).sum(2)
    j = torch.arange(blocks)[None, :]
    candidate = j * cfg.select_block <= t
    own = torch.div(t, cfg.select_block, rounding_mode="floor")
    forced = candidate & ((j < cfg.init_blocks) | ((j > own - cfg.local_blocks) & (j <= own)))
    return scores, candidate, forced


def check_selection(actual: torch.Tensor, x: Inputs, cfg: Config, rel: float, scale=None, floor: float = 0.0):
    """Forced blocks, the count and the -1 padding exactly; free picks by score: sorted by score, the
    k-th free pick of the kernel scores within `rel` of the reference's k-th free pick, or both score
    below `floor` (scores that underflow in the kernel's accumulation type all rank as 0)."""
    expected = run_reference(x.to(torch.float64), cfg, scale)
    assert actual.dtype == torch.int32 and actual.shape == expected.shape
    scale = x.q.shape[-1] ** -0.5 if scale is None else scale
    differing = 0
    for rows, q, lse, k_cmp, k_len in sequences(x, cfg):
        scores, candidate, forced = group_scores(q, lse, k_cmp, k_len, cfg, scale)
        act, exp = actual[rows], expected[rows]
        for t in range(q.shape[0]):
            n_cand = int(candidate[t].sum())
            want_forced = set(torch.nonzero(forced[t]).flatten().tolist())
            for g in range(act.shape[1]):
                a, e = act[t, g].tolist(), exp[t, g].tolist()
                count = min(cfg.select_count, n_cand)
                where = f"row {t} group {g}: kernel {a}, reference {e}"
                assert all(v >= 0 for v in a[:count]) and all(v == -1 for v in a[count:]), where
                assert a[:count] == sorted(set(a[:count])), where  # ascending, distinct
                assert all(candidate[t, v] for v in a[:count]), where
                assert want_forced <= set(a[:count]), where
                a_free = sorted((float(scores[t, g, v]) for v in set(a[:count]) - want_forced), reverse=True)
                e_free = sorted((float(scores[t, g, v]) for v in set(e[:count]) - want_forced), reverse=True)
                assert len(a_free) == len(e_free), where
                for sa, se in zip(a_free, e_free):
                    assert abs(sa - se) <= rel * max(abs(sa), abs(se)) or max(abs(sa), abs(se)) < floor, \
                        f"{where}: score {sa!r} vs {se!r}"
                differing += a != e
    return differing


# (q_lens, k_lens, Hq, Hk, Dk, config): every G in 1, 2, 4, 8, 16, 18, odd lengths and head dims.
SHAPES = [
    ([150, 150], [150, 150], 4, 2, 16, Config(16, 16, 16, 4, 1, 1)),  # l = d = l': s = p
    ([600], [2000], 4, 2, 32, PAPER),                                 # paper config, TQ < TK, NB = 32 > n
    ([20, 20], [20, 20], 2, 1, 8, PAPER),                             # shorter than one token: no score
    ([97], [97], 8, 8, 24, Config(8, 4, 12, 3, 1, 1)),                # G=1, tokens straddle blocks
    ([130], [211], 16, 4, 40, Config(32, 8, 16, 5, 2, 2)),           # G=4, l > l': a token meets 3 blocks
    ([77], [300], 8, 1, 64, Config(16, 8, 32, 6, 0, 0)),             # G=8, nothing forced
    ([90], [90], 16, 1, 12, Config(12, 4, 8, 4, 1, 1)),              # G=16
    ([45], [260], 36, 2, 8, Config(24, 8, 40, 7, 2, 3)),             # G=18
    ([1, 1], [1, 1], 4, 4, 8, Config(4, 2, 4, 2, 1, 1)),             # single tokens
    ([33], [33], 4, 2, 128, Config(8, 8, 8, 40, 1, 2)),              # n > number of blocks: -1 padding
]


def _shape_id(shape):
    q_lens, k_lens, hq, hk, dk, cfg = shape
    return f"T{q_lens[0]}-{k_lens[0]}_G{hq // hk}_D{dk}_l{cfg.compress_block}d{cfg.compress_stride}" \
           f"s{cfg.select_block}n{cfg.select_count}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(shape, dtype, packed, device):
    q_lens, k_lens, hq, hk, dk, cfg = shape
    x = make_inputs(q_lens, k_lens, hq, hk, dk, cfg, packed, seed=hash((q_lens[0], k_lens[0], hq, dk)) % 2**31)
    with poisoned_outputs():
        actual = run(x.to(dtype).to_device(device), cfg)
    assert actual.device.type == device
    differing = check_selection(actual.cpu(), x, cfg, rel=1e-9 if dtype == torch.float64 else 1e-5)
    if dtype == torch.float64:
        assert differing == 0  # no near-ties at fp64 on random data: the picks are the reference's


def test_selection_is_not_trivial():
    # Guards the comparison above against vacuity: in the paper config at T=2000 most rows have more
    # candidates than slots, and the free picks are not simply the lowest or the latest blocks.
    x = make_inputs([600], [2000], 4, 2, 32, PAPER, packed=False, seed=1)
    ids = run(x, PAPER)
    last = ids[0, -1, 0].tolist()
    assert -1 not in last and len(set(last)) == 16
    assert last != list(range(13)) + [29, 30, 31] and last != list(range(16, 32))


def test_l_equals_d_equals_select_block_picks_top_probabilities():
    # With l = d = l' block j is token j: the free picks are the tokens of highest summed probability.
    cfg = Config(16, 16, 16, 5, 1, 1)
    x = make_inputs([120], [120], 6, 2, 16, cfg, packed=False, seed=2)
    ids = run(x, cfg)
    probs = torch.einsum("qhd,khd->qhk", x.q[0], x.k_cmp[0].repeat_interleave(3, dim=1)) * 0.25 - x.lse[0][..., None]
    group = probs.exp().view(120, 2, 3, -1).sum(2)  # [TQ, Hk, TC]
    t = 119
    own = t // 16
    for g in range(2):
        tokens = group[t, g, :own].clone()  # token `own` is not visible yet (needs keys up to 16*own+15)
        tokens[0] = -1  # forced
        best = torch.topk(tokens, 3).indices.tolist()
        assert sorted(best + [0, own]) == ids[0, t, g].tolist()


def test_lse_is_used_as_given():
    # Shifting one head's lse reweights the heads of a group; kernel and reference must agree.
    cfg = Config(16, 8, 32, 4, 1, 1)
    x = make_inputs([200], [200], 4, 1, 16, cfg, packed=False, seed=3)
    x.lse = x.lse + torch.tensor([0.0, 3.0, -3.0, 1.0])
    assert check_selection(run(x, cfg), x, cfg, rel=1e-9) == 0
    assert not torch.equal(run(x, cfg), run(make_inputs([200], [200], 4, 1, 16, cfg, packed=False, seed=3), cfg))


def test_scale_argument():
    cfg = Config(16, 8, 32, 4, 1, 1)
    x = make_inputs([150], [150], 4, 2, 16, cfg, packed=False, seed=4, scale=0.9)
    assert check_selection(run(x, cfg, scale=0.9), x, cfg, rel=1e-9, scale=0.9) == 0


def test_padded_k_cmp_may_have_extra_rows():
    cfg = Config(16, 8, 32, 4, 1, 2)
    x = make_inputs([70], [70], 4, 2, 8, cfg, packed=False, seed=5, extra_rows=9)
    assert check_selection(run(x, cfg), x, cfg, rel=1e-9) == 0


def test_forced_blocks_rules():
    # No scores (T shorter than one token): the output is exactly the forced blocks, then the lowest
    # free candidates (ties to the lower id). init 2, local 1 at position t: {0, 1, t // 4}.
    cfg = Config(64, 4, 4, 4, 2, 1)
    x = make_inputs([40], [40], 2, 1, 8, cfg, packed=False, seed=6)
    ids = run(x, cfg)[0, :, 0]
    for t in range(40):
        cand = t // 4 + 1
        expected = sorted({0, 1, t // 4} & set(range(cand)))
        expected += [j for j in range(cand) if j not in expected][: 4 - len(expected)]
        expected = sorted(expected) + [-1] * (4 - len(expected))
        assert ids[t].tolist() == expected, t


def test_nothing_forced_and_zero_local_blocks():
    for init, local in [(0, 0), (0, 3), (2, 0)]:
        cfg = Config(16, 8, 16, 4, init, local)
        x = make_inputs([100], [160], 2, 1, 8, cfg, packed=False, seed=7)
        assert check_selection(run(x, cfg), x, cfg, rel=1e-9) == 0


def test_rows_before_the_sequence_select_nothing():
    # Padded TQ > TK puts the first queries before position 0: no candidate at all.
    cfg = Config(8, 4, 8, 3, 1, 1)
    x = make_inputs([12], [12], 2, 1, 8, cfg, packed=False, seed=8)
    x.max_seqlen_k = 9
    ids = run(x, cfg)
    assert torch.equal(ids[0, :3], torch.full_like(ids[0, :3], -1))
    x.k_lens = [9]
    assert check_selection(ids, x, cfg, rel=1e-9) == 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_with_lse_of_the_compressed_attention_op(packed):
    # The pipeline as the layer runs it: lse from nsa_ext.compressed_attention in fp32.
    q_lens, k_lens = ([100, 100], [300, 300]) if not packed else ([100, 0, 37], [300, 5, 37])
    cfg = Config(32, 16, 64, 3, 1, 1)  # 5 blocks at T=300: free picks matter
    x = make_inputs(q_lens, k_lens, 8, 2, 32, cfg, packed, seed=20).to(torch.float32)
    _, x.lse = nsa_ext.compressed_attention(x.q, x.k_cmp, x.k_cmp, compress_block=32, compress_stride=16,
                                            **x.seqlens)
    check_selection(run(x, cfg), x, cfg, rel=1e-5)


# --- layouts -------------------------------------------------------------------------------------

def test_packed_equals_padded_per_sequence():
    cfg = Config(16, 8, 32, 5, 1, 2)
    q_lens = [0, 1, 17, 64, 3, 0, 130, 40]
    k_lens = [0, 1, 40, 64, 15, 7, 130, 300]  # TQ <= TK, some shorter than one token
    x = make_inputs(q_lens, k_lens, 8, 2, 24, cfg, packed=True, seed=9).to(torch.float32)
    with poisoned_outputs():
        ids = run(x, cfg)
    check_selection(ids, x, cfg, rel=1e-5)
    cq = x.cu_seqlens_q.tolist()
    cc = nsa_ext.compressed_seqlens(x.cu_seqlens_k, 16, 8).tolist()
    for b, (n_q, n_k) in enumerate(zip(q_lens, k_lens)):
        if n_q == 0:
            continue
        q = x.q[cq[b]:cq[b + 1]][None]
        k_cmp = x.k_cmp[cc[b]:cc[b + 1]][None]
        single = nsa_ext.select_blocks(q, k_cmp, x.lse[cq[b]:cq[b + 1]][None], **cfg.kwargs, max_seqlen_k=n_k)
        assert torch.equal(single[0], ids[cq[b]:cq[b + 1]])


def test_packed_rows_outside_every_sequence_are_minus_one():
    cfg = Config(8, 4, 8, 3, 1, 1)
    x = make_inputs([5], [20], 2, 1, 8, cfg, packed=True, seed=10)
    q = torch.cat([x.q, torch.randn(3, 2, 8, dtype=torch.float64)])
    lse = torch.cat([x.lse, torch.zeros(3, 2, dtype=torch.float64)])
    with poisoned_outputs():
        ids = nsa_ext.select_blocks(q, x.k_cmp, lse, **cfg.kwargs, **x.seqlens)
    assert torch.equal(ids[5:], torch.full_like(ids[5:], -1))
    assert (ids[:5, :, 0] == 0).all()


def test_compressed_seqlens():
    cu = cu_seqlens([0, 31, 32, 33, 47, 48, 100])
    tokens = [0, 0, 1, 1, 1, 2, 5]  # TC = max(0, (TK - 32) // 16 + 1)
    assert nsa_ext.compressed_seqlens(cu, 32, 16).tolist() == [sum(tokens[:i]) for i in range(8)]
    assert nsa_ext.compressed_seqlens(cu, 32, 16).dtype == torch.int32
    assert reference.compressed_seqlens is nsa_ext.compressed_seqlens


def test_deterministic_across_thread_counts():
    x = make_inputs([300], [700], 8, 2, 32, PAPER, packed=False, seed=11).to(torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (threads, 1):
            torch.set_num_threads(n)
            results.append(run(x, PAPER))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_low_precision_inputs():
    # bf16/fp16 q and k_cmp, fp32 lse: accumulation is fp32; picks must be valid and keep forced blocks.
    cfg = Config(16, 8, 32, 4, 1, 2)
    x = make_inputs([150], [150], 4, 2, 16, cfg, packed=False, seed=12)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        ids = run(low, cfg)
        exact = Inputs(low.q.double(), low.k_cmp.double(), low.lse.double(), x.k_lens, **x.seqlens)
        check_selection(ids, exact, cfg, rel=1e-5)


def test_nan_inputs_do_not_crash():
    cfg = Config(16, 8, 32, 4, 1, 2)
    x = make_inputs([120], [120], 4, 2, 16, cfg, packed=False, seed=13)
    x.q[0, 60:, 1] = float("nan")
    x.lse[0, 80:, 2] = float("inf")
    ids = run(x, cfg)
    t = torch.arange(120)
    count = torch.clamp(t // 32 + 1, max=4)
    for row in range(120):
        for g in range(2):
            r = ids[0, row, g].tolist()
            n = int(count[row])
            assert r[:n] == sorted(set(r[:n])) and all(0 <= v <= row // 32 for v in r[:n]) and r[n:] == [-1] * (4 - n)


# --- configuration -------------------------------------------------------------------------------

def test_validate_config_accepts_edge_cases():
    nsa_ext.validate_config(32, 16, 64, 16, 1, 2)
    nsa_ext.validate_config(1, 1, 1, 1, 0, 0)
    nsa_ext.validate_config(16, 16, 16, 3, 0, 3)
    nsa_ext.validate_config(64, 8, 16, 2, 2, 0)


BAD_CONFIGS = {
    "compress_block 0": (dict(compress_block=0), "compress_block"),
    "compress_stride 0": (dict(compress_stride=0), "compress_stride"),
    "select_block 0": (dict(select_block=0), "select_block"),
    "select_count 0": (dict(select_count=0, init_blocks=0, local_blocks=0), "select_count"),
    "stride does not divide block": (dict(compress_block=20), "compress_stride"),
    "stride does not divide select_block": (dict(select_block=40), "compress_stride"),
    "select_count below forced": (dict(select_count=2), "select_count"),
    "init_blocks negative": (dict(init_blocks=-1), "init_blocks"),
    "local_blocks negative": (dict(local_blocks=-2), "local_blocks"),
}


@pytest.mark.parametrize("entry", ["validate_config", "function", "op"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_bad_config(case, entry):
    overrides, name = BAD_CONFIGS[case]
    cfg = dict(PAPER.kwargs, **overrides)
    x = make_inputs([8], [8], 2, 1, 8, PAPER, packed=False, seed=14)
    with pytest.raises(ValueError, match=f"'{name}'"):
        if entry == "validate_config":
            nsa_ext.validate_config(**cfg)
        elif entry == "function":
            nsa_ext.select_blocks(x.q, x.k_cmp, x.lse, **cfg)
        else:
            OPS.select_blocks(x.q, x.k_cmp, x.lse, cfg["compress_block"], cfg["compress_stride"], cfg["select_block"],
                              cfg["select_count"], cfg["init_blocks"], cfg["local_blocks"], 0.3, None, None, 8, 8)


def test_validate_config_rejects_non_integers():
    with pytest.raises(ValueError, match="'select_block'"):
        nsa_ext.validate_config(32, 16, 64.0, 16)
    with pytest.raises(ValueError, match="'init_blocks'"):
        nsa_ext.validate_config(32, 16, 64, 16, True, 2)


# --- torch.library / compile ----------------------------------------------------------------------

def opcheck_samples():
    cfg = Config(8, 4, 8, 3, 1, 1)
    padded = make_inputs([20, 20], [30, 30], 4, 2, 8, cfg, packed=False, seed=15).to(torch.float32)
    packed = make_inputs([9, 0, 4], [12, 3, 25], 4, 2, 8, cfg, packed=True, seed=16).to(torch.float32)
    args = (8, 4, 8, 3, 1, 1, 0.3)
    samples = [(padded.q, padded.k_cmp, padded.lse, *args, None, None, 20, 30),
               (packed.q, packed.k_cmp, packed.lse, *args, packed.cu_seqlens_q, packed.cu_seqlens_k, 9, 25)]
    grad_sample = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                        else a for a in samples[0])
    return samples + [grad_sample]


def test_opcheck():
    for args in opcheck_samples():
        torch.library.opcheck(OPS.select_blocks.default, args)


def test_fake_outputs_match_real_shapes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for args in opcheck_samples():
        real = OPS.select_blocks(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = OPS.select_blocks(*fake_args)
        assert real.shape == fake.shape and real.stride() == fake.stride() and real.dtype == fake.dtype


def test_output_does_not_require_grad():
    args = opcheck_samples()[-1]
    ids = OPS.select_blocks(*args)
    assert args[0].requires_grad and not ids.requires_grad


def test_compile_fullgraph_padded():
    torch._dynamo.reset()
    cfg = Config(16, 8, 32, 4, 1, 2)

    def fn(q, k_cmp, lse):
        return nsa_ext.select_blocks(q, k_cmp, lse, **cfg.kwargs, max_seqlen_k=q.shape[1])

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for t in (70, 99):  # two lengths: the second reuses the dynamic graph
        x = make_inputs([t], [t], 4, 2, 16, cfg, packed=False, seed=t).to(torch.float32)
        assert torch.equal(compiled(x.q, x.k_cmp, x.lse), fn(x.q, x.k_cmp, x.lse))


def test_compile_packed_no_graph_break():
    torch._dynamo.reset()
    cfg = Config(16, 8, 32, 4, 1, 2)
    x = make_inputs([5, 0, 40], [30, 0, 90], 4, 2, 16, cfg, packed=True, seed=17).to(torch.float32)

    def fn(q, k_cmp, lse, cu_q, cu_k):
        return nsa_ext.select_blocks(q, k_cmp, lse, **cfg.kwargs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=40, max_seqlen_k=90)

    args = (x.q, x.k_cmp, x.lse, x.cu_seqlens_q, x.cu_seqlens_k)
    assert torch._dynamo.explain(fn)(*args).graph_break_count == 0
    assert torch.equal(torch.compile(fn, fullgraph=True)(*args), fn(*args))


# --- input validation: one case per check, each naming the argument -----------------------------

def _good():
    return make_inputs([8], [40], 4, 2, 16, Config(8, 4, 8, 3, 1, 1), packed=False, seed=18).to(torch.float32)


def _packed():
    return make_inputs([3, 5], [20, 9], 4, 2, 16, Config(8, 4, 8, 3, 1, 1), packed=True, seed=19).to(torch.float32)


BAD_INPUTS = {
    "q rank": (lambda x: dict(q=x.q[0]), "q"),
    "k_cmp rank": (lambda x: dict(k_cmp=x.k_cmp[0]), "k_cmp"),
    "q dtype int": (lambda x: dict(q=x.q.to(torch.int32)), "q"),
    "k_cmp dtype mismatch": (lambda x: dict(k_cmp=x.k_cmp.double()), "k_cmp"),
    "lse float64 for float32 q": (lambda x: dict(lse=x.lse.double()), "lse"),
    "lse shape": (lambda x: dict(lse=x.lse[:, :4]), "lse"),
    "q last dim not contiguous": (lambda x: dict(q=x.q.transpose(-1, -2).contiguous().transpose(-1, -2)), "q"),
    "heads not divisible": (lambda x: dict(k_cmp=x.k_cmp[:, :, :1].expand(-1, -1, 3, -1).contiguous()), "k_cmp"),
    "k_cmp head dim": (lambda x: dict(k_cmp=x.k_cmp[..., :8]), "k_cmp"),
    "batch mismatch": (lambda x: dict(k_cmp=torch.cat([x.k_cmp, x.k_cmp])), "k_cmp"),
    "k_cmp too few tokens for TK": (lambda x: dict(max_seqlen_k=200), "k_cmp"),
    "max_seqlen_k negative": (lambda x: dict(max_seqlen_k=-1), "max_seqlen_k"),
    "scale nan": (lambda x: dict(scale=float("nan")), "scale"),
    "max_seqlen_q wrong in padded layout": (lambda x: dict(max_seqlen_q=3), "max_seqlen_q"),
    "only cu_seqlens_q": (lambda x: dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), "cu_seqlens_k"),
}

BAD_PACKED = {
    "cu_seqlens_q int64": (lambda x: dict(cu_seqlens_q=x.cu_seqlens_q.long()), "cu_seqlens_q"),
    "cu_seqlens_k 2-D": (lambda x: dict(cu_seqlens_k=x.cu_seqlens_k[None]), "cu_seqlens_k"),
    "cu_seqlens_k decreasing": (lambda x: dict(cu_seqlens_k=torch.tensor([0, 20, 9], dtype=torch.int32)),
                                "cu_seqlens_k"),
    "cu_seqlens_q past the rows": (lambda x: dict(cu_seqlens_q=torch.tensor([0, 3, 10], dtype=torch.int32),
                                                  max_seqlen_q=7), "cu_seqlens_q"),
    "different sequence counts": (lambda x: dict(cu_seqlens_k=torch.tensor([0, 20], dtype=torch.int32)),
                                  "cu_seqlens_k"),
    "max_seqlen_k too small": (lambda x: dict(max_seqlen_k=10), "max_seqlen_k"),
    "k_cmp rows fewer than the tokens": (lambda x: dict(k_cmp=x.k_cmp[:-1]), "k_cmp"),
    "keys longer than k_cmp holds": (lambda x: dict(cu_seqlens_k=torch.tensor([0, 20, 40], dtype=torch.int32),
                                                    max_seqlen_k=20), "k_cmp"),
}


def _call_with(x, overrides):
    args = dict(q=x.q, k_cmp=x.k_cmp, lse=x.lse, **Config(8, 4, 8, 3, 1, 1).kwargs, **x.seqlens)
    args.update(overrides)
    q, k_cmp, lse = args.pop("q"), args.pop("k_cmp"), args.pop("lse")
    return nsa_ext.select_blocks(q, k_cmp, lse, **args)


def test_good_inputs_pass():
    assert _call_with(_good(), {}).shape == (1, 8, 2, 3)
    assert _call_with(_packed(), {}).shape == (8, 2, 3)


BAD_CASES = {**{f"padded {c}": (_good, *v) for c, v in BAD_INPUTS.items()},
             **{f"packed {c}": (_packed, *v) for c, v in BAD_PACKED.items()}}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_input(case):
    inputs, make, name = BAD_CASES[case]
    with pytest.raises(ValueError, match=f"'{name}'"):
        _call_with(inputs(), make(inputs()))
