"""Benchmark of nsa_ext against dense attention, every baseline measured in the same run.

    python -m nsa_ext.bench                          # all ops with a kernel on this device, T = 1k, 4k, 16k
    python -m nsa_ext.bench --quick                  # smoke run, well under a minute on CPU
    python -m nsa_ext.bench --ops layer,decode --seqlens 16384,32768 --modes fwd+bwd
    python -m nsa_ext.bench --groups 1,4,16 --head-dims 64,192/128 --dtypes bfloat16 --csv out.csv --plot out.png

Rows ("ops"):
  window, compressed, selection   one NSA branch (``selection`` with NSA-like block ids)
  select                          block selection (``select_blocks``; not differentiable: every mode
                                  times its forward, what a training step pays for it)
  nsa                             ``native_sparse_attention``: the three branches, selection and gates
  layer                           the ``NativeSparseAttention`` module (projections, MLP compression,
                                  separate keys/values per branch) vs the same dense layer with SDPA
  decode                          one decoding step, ``native_sparse_attention_with_kvcache`` (one new
                                  query per sequence, ``--decode-batch`` sequences of context T) vs SDPA
                                  over the whole cache

Baselines: ``sdpa`` is ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` at the same
shape and dtype (flash/cuDNN on GPU), or for ``layer`` the dense layer, or for ``decode`` one query
over the full cache. ``copy`` (decode only) is a device copy that moves as many bytes as the step
must read, so its "x copy" is the step's bandwidth as a fraction of a plain copy's. ``flex`` is
FlexAttention (compiled) with the branch's mask as a block mask (window, compressed, selection);
``fla`` is fla's Triton ``parallel_nsa`` given the same block ids (selection, CUDA only). Both are
used when importable (``flex`` by default only on CUDA: on CPU it has no backward and its compile
takes a minute per shape; ask for it with ``--baselines sdpa,flex``). Speedup = baseline time / our
time.

Timing: median of ``--repeats`` runs after ``--warmup`` runs, CUDA events on GPU; the inputs rotate
over ``--input-sets`` copies so that caches don't flatter repeated runs. TFLOP/s counts only the
FLOPs NSA needs (visible keys of each branch; backward = 2.5x forward). GB/s (decode) counts the
bytes the step must read: the compressed tokens, the selected blocks and the window per sequence and
kv head. "mem MB": on CUDA the peak memory allocated during one run beyond its inputs; on CPU the
bytes autograd saves for the backward (activations held between forward and backward).

Under the CUDA emulator (``scripts/emulate.sh``; ``--device cpu`` then runs the CUDA kernels on the
CPU) times mean nothing, but the kernels' work does: "mma use" is NSA's FLOPs over the FLOPs of the
``mma.m16n8k16`` instructions one run issued (4096 each): the fraction of the tensor-core work that
is not padding, masked or recomputed, an upper bound on the fraction of peak a GPU run can reach.

``--profile N`` runs each NSA row once more under ``torch.profiler`` and prints, after the table, its
N largest entries by self time: CUDA kernels on a GPU (which of a step's launches dominates, e.g.
decoding's attend / select / combine kernels), operators on the CPU.
"""

import argparse
import csv
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import nsa_ext
from nsa_ext.seqlens import num_compressed_tokens

Tensor = torch.Tensor
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One shape: sequence length, heads, head dims, dtype, device."""
    seqlen: int
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: str
    config: nsa_ext.NSAConfig
    decode_batch: int = 1

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_k

    @property
    def compressed_tokens(self) -> int:
        return num_compressed_tokens(self.seqlen, self.config.compress_block, self.config.compress_stride)

    def randn(self, *shape: int, gen: torch.Generator, requires_grad: bool = False, scale: float = 1.0) -> Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
        return t.to(self.device, self.dtype).requires_grad_(requires_grad)

    def qkv(self, gen: torch.Generator, requires_grad: bool, batch: int = 1, queries: Optional[int] = None):
        """q [B, TQ, Hq, Dk], k [B, T, Hk, Dk], v [B, T, Hk, Dv]."""
        tq = self.seqlen if queries is None else queries
        return (self.randn(batch, tq, self.heads_q, self.head_dim, gen=gen, requires_grad=requires_grad),
                self.randn(batch, self.seqlen, self.heads_k, self.head_dim, gen=gen, requires_grad=requires_grad),
                self.randn(batch, self.seqlen, self.heads_k, self.head_dim_v, gen=gen, requires_grad=requires_grad))

    def compressed_kv(self, gen: torch.Generator, requires_grad: bool, batch: int = 1):
        tc = self.compressed_tokens
        return (self.randn(batch, tc, self.heads_k, self.head_dim, gen=gen, requires_grad=requires_grad),
                self.randn(batch, tc, self.heads_k, self.head_dim_v, gen=gen, requires_grad=requires_grad))


@dataclass
class Step:
    """A measurable unit: ``run`` is timed, ``prepare`` (untimed) runs before each ``run``."""
    run: Callable[[], None]
    prepare: Optional[Callable[[], None]] = None
    flops: float = 0.0        # FLOPs NSA needs for one run (0: not counted)
    read_bytes: float = 0.0   # bytes one run must read (decode rows; 0: not counted)
    forward: Optional[Callable[[], None]] = None  # one forward, for the CPU memory count


# --- timing -----------------------------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(step: Step, device: str) -> float:
    if step.prepare is not None:
        step.prepare()
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step.run()
    return time.perf_counter() - begin


def measure(step: Step, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of step.run over repeats, after warm-up runs."""
    for _ in range(warmup):
        _time_once(step, device)
    return statistics.median(_time_once(step, device) for _ in range(repeats))


def memory_mb(step: Step, device: str) -> Optional[float]:
    """CUDA: peak bytes allocated by one run beyond what was live before it. CPU: bytes of the distinct
    storages autograd saves in one forward (None for rows without backward)."""
    if device.startswith("cuda"):
        if step.prepare is not None:
            step.prepare()
        _synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if step.forward is None:
        return None
    storages: Dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.forward()
    return sum(storages.values()) / 2**20


# --- steps from a forward ------------------------------------------------------------------------------

def autograd_step(make_inputs: Callable[[torch.Generator], Sequence[Tensor]],
                  forward: Callable[..., Tensor], mode: str, sets: int, gen: torch.Generator,
                  params: Sequence[Tensor] = (), flops: float = 0.0) -> Step:
    """Times ``forward(*inputs)`` (fwd), its backward alone (bwd; the forward runs untimed in
    ``prepare``) or both (fwd+bwd), rotating over ``sets`` input sets. The backward takes a fixed
    random output gradient and differentiates w.r.t. the inputs that require grad and ``params``."""
    input_sets = [list(make_inputs(gen)) for _ in range(sets)]
    turn = itertools.cycle(range(sets))
    dout: Dict[Tuple[int, ...], Tensor] = {}
    state = {}

    def grad_of(out: Tensor):
        shape = tuple(out.shape)
        if shape not in dout:
            dout[shape] = torch.randn(shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        wrt = [t for t in state["inputs"] if t.requires_grad] + list(params)
        torch.autograd.grad(out, wrt, dout[shape])

    def run_forward():
        state["inputs"] = input_sets[next(turn)]
        state["out"] = forward(*state["inputs"])

    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                run_forward()
        return Step(run, flops=factor * flops, forward=None)
    if mode == "bwd":
        return Step(lambda: grad_of(state["out"]), prepare=run_forward, flops=factor * flops, forward=run_forward)

    def run_both():
        run_forward()
        grad_of(state["out"])
    return Step(run_both, flops=factor * flops, forward=run_forward)


# --- FLOPs NSA needs -----------------------------------------------------------------------------------

def _attention_flops(case: Case, keys_per_query: Tensor) -> float:
    """Forward FLOPs of attention where query t of each query head sees keys_per_query[t] keys (summed
    over kv heads when keys_per_query has a kv-head dimension)."""
    per_head = case.heads_q if keys_per_query.dim() == 1 else case.group
    return 2.0 * (case.head_dim + case.head_dim_v) * per_head * float(keys_per_query.double().sum())


def window_keys(case: Case, positions: Tensor) -> Tensor:
    return torch.clamp(positions + 1, max=case.config.window)


def compressed_keys(case: Case, positions: Tensor) -> Tensor:
    cfg = case.config
    return torch.clamp(torch.div(positions + 1 - cfg.compress_block, cfg.compress_stride, rounding_mode="floor") + 1,
                       min=0)


def selected_keys(case: Case, indices: Tensor, positions: Tensor) -> Tensor:
    """Keys query t of kv head h sees through its blocks: [T, Hk]; indices [T, Hk, n], positions [T]."""
    block = case.config.select_block
    ids = indices.long()
    num_blocks = -(-case.seqlen // block)
    start = ids * block
    t = positions[:, None, None]
    valid = (ids >= 0) & (ids < num_blocks) & (start <= t)
    seen = torch.clamp(torch.minimum(t + 1 - start, torch.full_like(start, block)), min=0)
    return torch.where(valid, seen, 0).sum(-1)


def nsa_like_indices(seqlen: int, heads_k: int, count: int, select_block: int, generator: torch.Generator,
                     init_blocks: int = 1, local_blocks: int = 2) -> Tensor:
    """Block ids shaped like NSA's selection (spec section 3) for one sequence, int32 [1, T, Hk, count]:
    the forced initial and local blocks, the remaining slots random other past blocks (drawn
    independently per query and kv head, the hardest case for reuse), ascending, -1 padded."""
    num_blocks = -(-seqlen // select_block)
    j = torch.arange(num_blocks)
    parts = []
    for start in range(0, seqlen, 4096):  # bounded memory for long sequences
        own = (torch.arange(start, min(seqlen, start + 4096)) // select_block)[:, None]
        candidate = j[None, :] <= own
        forced = candidate & ((j[None, :] < init_blocks) | (j[None, :] > own - local_blocks))
        rank = torch.where(forced, 2.0, torch.where(candidate, 0.0, -1.0))[:, None, :]
        rank = rank + 0.999 * torch.rand(own.shape[0], heads_k, num_blocks, generator=generator)
        top = rank.topk(min(count, num_blocks), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, num_blocks).sort(dim=-1).values
        parts.append(torch.where(ids == num_blocks, -1, ids))
    ids = torch.cat(parts)
    if ids.shape[-1] < count:
        ids = torch.nn.functional.pad(ids, (0, count - ids.shape[-1]), value=-1)
    return ids.to(torch.int32)[None]


def _case_indices(case: Case, gen: torch.Generator) -> Tensor:
    cfg = case.config
    return nsa_like_indices(case.seqlen, case.heads_k, cfg.select_count, cfg.select_block, gen, cfg.init_blocks,
                            cfg.local_blocks).to(case.device)


# --- our workloads ---------------------------------------------------------------------------------------

def window_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    flops = _attention_flops(case, window_keys(case, torch.arange(case.seqlen)))
    return autograd_step(lambda g: case.qkv(g, mode != "fwd"),
                         lambda q, k, v: nsa_ext.sliding_window_attention(q, k, v, window=case.config.window)[0],
                         mode, sets, gen, flops=flops)


def compressed_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    cfg = case.config
    flops = _attention_flops(case, compressed_keys(case, torch.arange(case.seqlen)))

    def make(g):
        q = case.qkv(g, mode != "fwd")[0]
        return (q, *case.compressed_kv(g, mode != "fwd"))
    return autograd_step(make, lambda q, k, v: nsa_ext.compressed_attention(
        q, k, v, compress_block=cfg.compress_block, compress_stride=cfg.compress_stride,
        max_seqlen_k=case.seqlen)[0], mode, sets, gen, flops=flops)


def select_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    """select_blocks from the compressed branch's lse; every mode times the forward."""
    cfg = case.config
    input_sets = []
    for _ in range(sets):
        q = case.qkv(gen, False)[0]
        k_cmp, v_cmp = case.compressed_kv(gen, False)
        lse = nsa_ext.compressed_attention(q, k_cmp, v_cmp, compress_block=cfg.compress_block,
                                           compress_stride=cfg.compress_stride, max_seqlen_k=case.seqlen)[1]
        input_sets.append((q, k_cmp, lse))
    turn = itertools.cycle(input_sets)

    def run():
        q, k_cmp, lse = next(turn)
        nsa_ext.select_blocks(q, k_cmp, lse, compress_block=cfg.compress_block, compress_stride=cfg.compress_stride,
                              select_block=cfg.select_block, select_count=cfg.select_count,
                              init_blocks=cfg.init_blocks, local_blocks=cfg.local_blocks, max_seqlen_k=case.seqlen)
    score_flops = 2.0 * case.head_dim * case.heads_q * float(compressed_keys(case, torch.arange(case.seqlen)).sum())
    return Step(run, flops=score_flops)


def selection_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    indices = _case_indices(case, gen)
    flops = _attention_flops(case, selected_keys(case, indices[0].cpu(), torch.arange(case.seqlen)))
    return autograd_step(lambda g: case.qkv(g, mode != "fwd"),
                         lambda q, k, v: nsa_ext.selection_attention(
                             q, k, v, indices, select_block=case.config.select_block)[0],
                         mode, sets, gen, flops=flops)


def nsa_flops(case: Case, indices: Tensor, positions: Tensor, select_scores: bool = True) -> float:
    """Forward FLOPs of the three branches and, with select_scores, of select_blocks' recomputed
    scores q k_cmp^T, for queries at positions."""
    cmp = compressed_keys(case, positions)
    flops = (_attention_flops(case, window_keys(case, positions)) + _attention_flops(case, cmp)
             + _attention_flops(case, selected_keys(case, indices, positions)))
    return flops + (2.0 * case.head_dim * case.heads_q * float(cmp.double().sum()) if select_scores else 0.0)


def nsa_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    """native_sparse_attention: compressed branch, selection, selected and window branches, gates."""
    requires_grad = mode != "fwd"

    def make(g):
        q, k, v = case.qkv(g, requires_grad)
        gates = [torch.rand(1, case.seqlen, case.heads_q, generator=g).to(case.device, case.dtype)
                 .requires_grad_(requires_grad) for _ in range(3)]
        return (q, k, v, *case.compressed_kv(g, requires_grad), *gates)

    flops = nsa_flops(case, _case_indices(case, gen)[0].cpu(), torch.arange(case.seqlen))
    return autograd_step(make, lambda *args: nsa_ext.native_sparse_attention(*args, config=case.config),
                         mode, sets, gen, flops=flops)


class DenseAttention(nn.Module):
    """The dense counterpart of ``NativeSparseAttention``: the same q/k/v/o projections (GQA,
    ``head_dim_v`` may differ) around causal SDPA; ``rotary`` as in the NSA layer."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None,
                 head_dim_v: Optional[int] = None, rotary: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.head_dim_v = self.head_dim if head_dim_v is None else head_dim_v
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim_v, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim_v, hidden_size, bias=False)
        self.rotary = nsa_ext.RotaryEmbedding(self.head_dim) if rotary else None

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim_v)
        if self.rotary is not None:
            q, k = self.rotary(q, k, torch.arange(t, device=x.device))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _layer_step(case: Case, module: nn.Module, mode: str, sets: int, gen: torch.Generator) -> Step:
    module = module.to(case.device, case.dtype)
    hidden = case.heads_q * case.head_dim
    params = [p for p in module.parameters()] if mode != "fwd" else []
    return autograd_step(lambda g: [case.randn(1, case.seqlen, hidden, gen=g, requires_grad=mode != "fwd")],
                         module, mode, sets, gen, params=params)


def layer_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    module = nsa_ext.NativeSparseAttention(case.heads_q * case.head_dim, case.heads_q, case.heads_k,
                                           head_dim=case.head_dim, head_dim_v=case.head_dim_v, config=case.config)
    return _layer_step(case, module, mode, sets, gen)


def _decode_inputs(case: Case, gen: torch.Generator):
    """One new query per sequence over caches of T keys [B, T, ..] (all live), gates [B, 1, Hq, 3]."""
    b = case.decode_batch
    q, k, v = case.qkv(gen, False, batch=b, queries=1)
    k_cmp, v_cmp = case.compressed_kv(gen, False, batch=b)
    gates = torch.rand(b, 1, case.heads_q, 3, generator=gen).to(case.device, case.dtype)
    lengths = torch.full((b,), case.seqlen, dtype=torch.int32, device=case.device)
    return q, k, v, k_cmp, v_cmp, gates, lengths


def decode_read_bytes(case: Case, indices: Tensor) -> float:
    """Bytes one decoding step must read: per sequence and kv head, its compressed tokens and the union
    of its selected blocks and window (indices [B, 1, Hk, n]), keys and values."""
    cfg, t = case.config, case.seqlen - 1
    rows = 0
    for ids in indices.reshape(-1, indices.shape[-1]).cpu().tolist():
        keys = set(range(max(0, t + 1 - cfg.window), t + 1))
        for j in ids:
            if 0 <= j * cfg.select_block <= t:
                keys.update(range(j * cfg.select_block, min(t + 1, (j + 1) * cfg.select_block)))
        rows += len(keys) + case.compressed_tokens
    return rows * (case.head_dim + case.head_dim_v) * torch.finfo(case.dtype).bits / 8


def decode_workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    """native_sparse_attention_with_kvcache: the fused decoding step (selection included)."""
    input_sets = [_decode_inputs(case, gen) for _ in range(sets)]
    turn = itertools.cycle(input_sets)

    def step(inputs, return_indices=False):
        return nsa_ext.native_sparse_attention_with_kvcache(*inputs, config=case.config, return_indices=return_indices)

    _, indices = step(input_sets[0], return_indices=True)
    position = torch.tensor([case.seqlen - 1])
    # The fused op scores the blocks from the compressed branch's own probabilities: no second q k_cmp^T.
    flops = sum(nsa_flops(case, indices[b].cpu(), position, select_scores=False) for b in range(case.decode_batch))
    return Step(lambda: step(next(turn)), flops=flops, read_bytes=decode_read_bytes(case, indices))


# --- baselines -----------------------------------------------------------------------------------------

def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True)


def sdpa_baseline(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    return autograd_step(lambda g: case.qkv(g, mode != "fwd"), _sdpa, mode, sets, gen)


def dense_layer_baseline(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    module = DenseAttention(case.heads_q * case.head_dim, case.heads_q, case.heads_k, head_dim=case.head_dim,
                            head_dim_v=case.head_dim_v)
    return _layer_step(case, module, mode, sets, gen)


def sdpa_decode_baseline(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    input_sets = [case.qkv(gen, False, batch=case.decode_batch, queries=1) for _ in range(sets)]
    turn = itertools.cycle(input_sets)
    return Step(lambda: _sdpa(*next(turn), causal=False))


def copy_decode_baseline(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    """A device copy moving as many bytes as the decoding step must read (half read, half written), so
    that "x copy" is the step's bandwidth as a fraction of a plain copy's, measured in the same run."""
    moved = decode_workload(case, mode, 1, gen).read_bytes
    elements = max(1, int(moved // 8))  # float32: elements * 4 bytes read + the same written
    pairs = [(torch.rand(elements, generator=gen).to(case.device), torch.empty(elements, device=case.device))
             for _ in range(sets)]
    turn = itertools.cycle(pairs)

    def run():
        src, dst = next(turn)
        dst.copy_(src)

    return Step(run)


def flex_available(device: str) -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_flex_compiled = {}


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _flex_compiled:
        _flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False)
    out = _flex_compiled["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                               enable_gqa=True)
    return out.transpose(1, 2)


def _block_mask(case: Case, mask_mod, kv_len: int, heads: Optional[int] = None):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, None, heads, case.seqlen, kv_len, device=case.device)


def flex_baseline(op: str):
    """FlexAttention with the mask of branch ``op`` (window, compressed or selection)."""

    def workload(case: Case, mode: str, sets: int, gen: torch.Generator) -> Optional[Step]:
        if mode != "fwd" and not case.device.startswith("cuda"):
            return None  # FlexAttention has no backward on CPU
        cfg = case.config
        make = lambda g: case.qkv(g, mode != "fwd")  # noqa: E731
        if op == "window":
            mask = _block_mask(case, lambda b, h, qi, ki: (ki <= qi) & (qi - ki < cfg.window), case.seqlen)
        elif op == "compressed":
            mask = _block_mask(case, lambda b, h, qi, ki: ki * cfg.compress_stride + cfg.compress_block - 1 <= qi,
                               case.compressed_tokens)

            def make(g):  # noqa: F811
                return (case.qkv(g, mode != "fwd")[0], *case.compressed_kv(g, mode != "fwd"))
        else:  # selection: a [Hk, T, blocks] table of chosen blocks
            indices = _case_indices(case, gen)[0].long()
            blocks = -(-case.seqlen // cfg.select_block)
            chosen = torch.zeros(case.heads_k, case.seqlen, blocks + 1, dtype=torch.bool, device=case.device)
            chosen.scatter_(2, torch.where(indices < 0, blocks, indices).permute(1, 0, 2), True)
            group = case.group
            mask = _block_mask(case, lambda b, h, qi, ki: chosen[h // group, qi, ki // cfg.select_block] & (ki <= qi),
                               case.seqlen, heads=case.heads_q)
        step = autograd_step(make, lambda q, k, v: _flex(q, k, v, mask), mode, sets, gen)
        _time_once(step, case.device)  # compiles, whatever --warmup says
        return step
    return workload


def fla_available(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        from fla.ops.nsa import parallel_nsa  # noqa: F401
    except Exception:  # fla missing or its import failing (triton, flash-attn versions) alike
        return False
    return True


def fla_selection_baseline(case: Case, mode: str, sets: int, gen: torch.Generator) -> Step:
    """fla's parallel_nsa, selected branch only (gate 1, no window), given the same block ids; its
    padding id is any block after the query (fla skips blocks starting after the query)."""
    from fla.ops.nsa import parallel_nsa
    indices = _case_indices(case, gen).long()
    indices = torch.where(indices < 0, case.seqlen, indices)
    ones = torch.ones(1, case.seqlen, case.heads_q, device=case.device, dtype=case.dtype)
    cfg = case.config
    return autograd_step(lambda g: case.qkv(g, mode != "fwd"),
                         lambda q, k, v: parallel_nsa(q, k, v, g_slc=ones, g_swa=ones, block_indices=indices,
                                                      block_counts=cfg.select_count, block_size=cfg.select_block,
                                                      window_size=0),
                         mode, sets, gen)


# --- the registry ----------------------------------------------------------------------------------------

@dataclass
class Workload:
    run: Callable[[Case, str, int, torch.Generator], Step]
    ops: Tuple[str, ...]  # the torch.ops.nsa forward ops it needs
    baselines: Dict[str, Callable] = field(default_factory=dict)
    modes: Tuple[str, ...] = MODES  # modes it has; others are left out


ALL_NSA_OPS = ("compressed_attention_fwd", "select_blocks", "selection_attention_fwd", "sliding_window_attention_fwd")
WORKLOADS: Dict[str, Workload] = {
    "window": Workload(window_workload, ("sliding_window_attention_fwd",),
                       {"sdpa": sdpa_baseline, "flex": flex_baseline("window")}),
    "compressed": Workload(compressed_workload, ("compressed_attention_fwd",),
                           {"sdpa": sdpa_baseline, "flex": flex_baseline("compressed")}),
    "select": Workload(select_workload, ("compressed_attention_fwd", "select_blocks"), {"sdpa": sdpa_baseline}),
    "selection": Workload(selection_workload, ("selection_attention_fwd",),
                          {"sdpa": sdpa_baseline, "flex": flex_baseline("selection"), "fla": fla_selection_baseline}),
    "nsa": Workload(nsa_workload, ALL_NSA_OPS, {"sdpa": sdpa_baseline}),
    "layer": Workload(layer_workload, ALL_NSA_OPS, {"sdpa": dense_layer_baseline}),
    "decode": Workload(decode_workload, ("decode_attention",), {"sdpa": sdpa_decode_baseline,
                                                                 "copy": copy_decode_baseline}, modes=("fwd",)),
}
BASELINE_AVAILABLE = {"sdpa": lambda device: True, "copy": lambda device: True, "flex": flex_available,
                      "fla": fla_available}


def has_kernels(op: str, device: str) -> bool:
    key = "CUDA" if device.startswith("cuda") else "CPU"
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nsa::{name}", key) for name in WORKLOADS[op].ops)


# --- the run -----------------------------------------------------------------------------------------

@dataclass
class Row:
    op: str
    case: Case
    mode: str
    seconds: float
    baselines: Dict[str, float]  # baseline name -> seconds
    flops: float = 0.0
    read_bytes: float = 0.0
    memory_mb: Optional[float] = None
    mma_use: Optional[float] = None  # emulation build only: NSA FLOPs / mma FLOPs
    profile: List["ProfileEntry"] = field(default_factory=list)  # --profile: one run's largest entries

    def speedup(self, baseline: str) -> Optional[float]:
        other = self.baselines.get(baseline)
        return None if other is None else other / self.seconds

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.seconds / 1e12 if self.flops else None

    @property
    def gbps(self) -> Optional[float]:
        return self.read_bytes / self.seconds / 1e9 if self.read_bytes else None


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<48}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def run_benchmarks(cases: List[Case], ops: List[str], modes: List[str], baselines: List[str], warmup: int,
                   repeats: int, sets: int, profile_top: int = 0) -> List[Row]:
    """Each (case, op, mode) against each baseline; a baseline shared by several ops (SDPA at the same
    shape) is measured once per case and mode. With profile_top, each NSA row also keeps that many
    entries of one profiled run."""
    plan = [(case, op, mode) for case in cases for op in ops for mode in modes if mode in WORKLOADS[op].modes]
    shared: Dict[Tuple, Optional[float]] = {}
    total = len(plan) * (1 + len(baselines))
    done, rows = 0, []
    gen = torch.Generator().manual_seed(0)
    for case, op, mode in plan:
        label = f"T={case.seqlen} G={case.group} D={case.head_dim}/{case.head_dim_v} {mode}"
        times = {}
        for name in baselines:
            factory = WORKLOADS[op].baselines.get(name)
            _progress(done, total, f"{name} for {op} {label}")
            done += 1
            if factory is None:
                continue
            key = (name, factory, case, mode)
            if key not in shared:
                try:
                    step = factory(case, mode, sets, gen)  # None: the baseline can't run this row
                    shared[key] = None if step is None else measure(step, case.device, warmup, repeats)
                except Exception as error:  # an optional baseline's version or limits: report, go on
                    if name == "sdpa":
                        raise
                    print(f"\nbaseline {name} failed for {op} {label}: {type(error).__name__}: {error}",
                          file=sys.stderr)
                    shared[key] = None
            if shared[key] is not None:
                times[name] = shared[key]
        _progress(done, total, f"{op} {label}")
        step = WORKLOADS[op].run(case, mode, sets, gen)
        seconds = measure(step, case.device, warmup, repeats)
        rows.append(Row(op, case, mode, seconds, times, step.flops, step.read_bytes, memory_mb(step, case.device),
                        tensor_core_use(step), profile_step(step, case.device, profile_top) if profile_top else []))
        done += 1
    _progress(done, total, "done")
    return rows


MMA_FLOPS = 2 * 16 * 8 * 16  # one mma.m16n8k16


@dataclass
class ProfileEntry:
    name: str
    calls: int
    seconds: float  # self time, summed over the calls
    share: float    # of the self time of every entry on that device in the run


def profile_step(step: Step, device: str, top: int) -> List[ProfileEntry]:
    """The `top` largest entries by self time of one run: CUDA kernels on a GPU, operators on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    if step.prepare is not None:
        step.prepare()
    _synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step.run()
        _synchronize(device)
    if cuda:
        # Kernels only: a CPU operator's self time on a GPU is mostly launch overhead.
        timed = [(e, getattr(e, "self_device_time_total", None) or e.self_cuda_time_total)
                 for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(us for _, us in timed) or 1.0
    timed.sort(key=lambda item: -item[1])
    return [ProfileEntry(e.key, e.count, us / 1e6, us / total) for e, us in timed[:top]]


def _kernel_name(name: str, width: int = 96) -> str:
    """A kernel's name without its return type and parameter list, cut to `width` characters."""
    name = name[5:] if name.startswith("void ") else name
    depth = 0
    for i, ch in enumerate(name):  # the parameter list is the first "(" outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return name if len(name) <= width else name[:width - 3] + "..."


def format_profiles(rows: List[Row]) -> str:
    blocks = []
    for r in rows:
        if not r.profile:
            continue
        c = r.case
        kind = "CUDA kernels" if c.device.startswith("cuda") else "CPU operators"
        lines = [f"profile of one run: {r.op} {r.mode} T={c.seqlen} G={c.group} D={c.head_dim}/{c.head_dim_v} "
                 f"{_dtype_name(c.dtype)} ({kind} by self time)",
                 f"  {'share':>6}  {'ms':>9}  {'calls':>5}  name"]
        for e in r.profile:
            lines.append(f"  {e.share:6.1%}  {e.seconds * 1e3:9.3f}  {e.calls:5d}  {_kernel_name(e.name)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def tensor_core_use(step: Step) -> Optional[float]:
    """Emulation build: NSA's FLOPs over the mma FLOPs of one run (None elsewhere, or without mma)."""
    if not nsa_ext.build_info()["emulated_cuda"] or not step.flops:
        return None
    if step.prepare is not None:
        step.prepare()
    nsa_ext._C._emulation_counters()  # resets them
    step.run()
    counters = nsa_ext._C._emulation_counters()
    mma = counters["mma"] + counters["wgmma"]  # wgmma counts in m16n8k16 units
    return step.flops / (mma * MMA_FLOPS) if mma else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: List[Row], baselines: List[str]) -> str:
    measured = [b for b in baselines if any(b in r.baselines for r in rows)]
    columns = [("op", 11, "<"), ("T", 7, ">"), ("G", 4, ">"), ("Dk/Dv", 8, ">"), ("dtype", 9, ">"),
               ("mode", 8, ">"), ("ms", 10, ">")]
    for b in measured:
        columns += [(f"{b} ms", 10, ">"), (f"x {b}", 8, ">")]
    columns += [("TFLOP/s", 8, ">"), ("GB/s", 7, ">"), ("mem MB", 8, ">")]
    emulated = any(r.mma_use is not None for r in rows)
    if emulated:
        columns += [("mma use", 8, ">")]
    header = "  ".join(f"{name:{align}{width}}" for name, width, align in columns)
    lines = [header, "-" * len(header)]
    for r in rows:
        c = r.case
        cells = [r.op, str(c.seqlen), str(c.group), f"{c.head_dim}/{c.head_dim_v}", _dtype_name(c.dtype), r.mode,
                 f"{r.seconds * 1e3:.2f}"]
        for b in measured:
            ms = r.baselines.get(b)
            cells += [_fmt(None if ms is None else ms * 1e3, ".2f"), _fmt(r.speedup(b), ".2f", "x")]
        cells += [_fmt(r.tflops, ".3f"), _fmt(r.gbps, ".1f"), _fmt(r.memory_mb, ".0f")]
        if emulated:
            cells += [_fmt(r.mma_use, ".3f")]
        lines.append("  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, columns)))
    return "\n".join(lines)


def write_csv(rows: List[Row], baselines: List[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "seqlen", "heads_q", "heads_k", "head_dim", "head_dim_v", "dtype", "device", "mode",
                         "seconds", *(f"{b}_seconds" for b in baselines), *(f"speedup_{b}" for b in baselines),
                         "tflops", "gbps", "memory_mb", "mma_use"])
        for r in rows:
            c = r.case
            writer.writerow([r.op, c.seqlen, c.heads_q, c.heads_k, c.head_dim, c.head_dim_v, _dtype_name(c.dtype),
                             c.device, r.mode, f"{r.seconds:.6g}",
                             *(_fmt(r.baselines.get(b), ".6g") for b in baselines),
                             *(_fmt(r.speedup(b), ".4g") for b in baselines),
                             _fmt(r.tflops, ".4g"), _fmt(r.gbps, ".4g"), _fmt(r.memory_mb, ".4g"),
                             _fmt(r.mma_use, ".4g")])


def plot(rows: List[Row], baselines: List[str], path: str) -> bool:
    """Speedup vs T, one panel per baseline, one line per (op, mode, G, head dims, dtype)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [b for b in baselines if any(b in r.baselines for r in rows)]
    fig, axes = plt.subplots(1, len(measured), figsize=(6 * len(measured), 4.5), squeeze=False)
    for ax, baseline in zip(axes[0], measured):
        lines: Dict[str, List[Tuple[int, float]]] = {}
        for r in rows:
            if r.speedup(baseline) is not None:
                c = r.case
                label = f"{r.op} {r.mode} G={c.group} D={c.head_dim}/{c.head_dim_v} {_dtype_name(c.dtype)}"
                lines.setdefault(label, []).append((c.seqlen, r.speedup(baseline)))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(xscale="log", xlabel="sequence length T", ylabel=f"speedup vs {baseline}", title=f"vs {baseline}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _head_dims(text: str) -> List[Tuple[int, int]]:
    """'64,192/128' -> [(64, 64), (192, 128)]."""
    dims = []
    for item in text.split(","):
        dk, _, dv = item.partition("/")
        dims.append((int(dk), int(dv or dk)))
    return dims


def _ints(text: str) -> List[int]:
    return [int(s) for s in text.split(",") if s]


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m nsa_ext.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seqlens", default=None,
                        help="comma-separated T values (default 1024,4096,16384; CUDA adds 65536)")
    parser.add_argument("--ops", default=None,
                        help=f"subset of {','.join(WORKLOADS)} (default: those with kernels on the device)")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help=f"subset of {','.join(MODES)}")
    parser.add_argument("--baselines", default=None,
                        help="subset of sdpa,copy,flex,fla (default: sdpa and copy, plus flex and fla on CUDA "
                             "when importable)")
    parser.add_argument("--heads", type=int, default=16, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=4, help="kv heads Hk (ignored with --groups)")
    parser.add_argument("--groups", default=None, help="comma-separated G = Hq / Hk to sweep")
    parser.add_argument("--head-dims", default="64", help="comma-separated Dk or Dk/Dv, e.g. 64,192/128")
    parser.add_argument("--decode-batch", type=int, default=None, help="sequences of a decode step (default 4 CPU, "
                                                                       "32 CUDA)")
    parser.add_argument("--window", type=int, default=nsa_ext.NSAConfig.window)
    parser.add_argument("--compress-block", type=int, default=nsa_ext.NSAConfig.compress_block)
    parser.add_argument("--compress-stride", type=int, default=nsa_ext.NSAConfig.compress_stride)
    parser.add_argument("--select-block", type=int, default=nsa_ext.NSAConfig.select_block)
    parser.add_argument("--select-count", type=int, default=nsa_ext.NSAConfig.select_count)
    parser.add_argument("--tile-positions", type=int, default=None,
                        help="CUDA selection: cap the query positions per forward/dq tile (sets "
                             "NSA_SELECTION_TILE_POSITIONS), to measure how small groups should be packed")
    parser.add_argument("--selection-schedule", choices=("tiles", "blocks"), default=None,
                        help="CUDA selection forward and dq: query tiles over the union of their blocks (default) "
                             "or by blocks over the queries that chose each (sets NSA_SELECTION_SCHEDULE)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N largest kernels (CUDA) or operators (CPU) of one run of each NSA row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-sets", type=int, default=2, help="input copies the runs rotate over")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: T = 512, 1024, fwd and fwd+bwd, one repeat")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--plot", default=None, help="speedup vs T to this PNG (needs matplotlib)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_positions:
        os.environ["NSA_SELECTION_TILE_POSITIONS"] = str(args.tile_positions)
    if args.selection_schedule:
        os.environ["NSA_SELECTION_SCHEDULE"] = args.selection_schedule
    cuda = args.device.startswith("cuda")
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16" if cuda else "float32")).split(",")]
    seqlens = _ints(args.seqlens or ("512,1024" if args.quick else "1024,4096,16384,65536" if cuda
                                     else "1024,4096,16384"))
    ops = ([o for o in args.ops.split(",") if o] if args.ops is not None
           else [o for o in WORKLOADS if has_kernels(o, args.device)])
    unknown = [o for o in ops if o not in WORKLOADS]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(WORKLOADS)}")
    if args.profile < 0:
        parser.error("--profile must be >= 0")
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {list(MODES)}")
    if args.baselines is not None:
        baselines = [b for b in args.baselines.split(",") if b]
        if any(b not in BASELINE_AVAILABLE for b in baselines):
            parser.error(f"--baselines: choose from {list(BASELINE_AVAILABLE)}")
        missing = [b for b in baselines if not BASELINE_AVAILABLE[b](args.device)]
        if missing:
            print(f"baselines not importable here, left out: {missing}")
        baselines = [b for b in baselines if b not in missing]
    else:
        baselines = ["sdpa", "copy"] + [b for b in ("flex", "fla") if cuda and BASELINE_AVAILABLE[b](args.device)]
    warmup, repeats = (0, 1) if args.quick else (args.warmup, args.repeats)
    config = nsa_ext.NSAConfig(compress_block=args.compress_block, compress_stride=args.compress_stride,
                               select_block=args.select_block, select_count=args.select_count, window=args.window)
    heads_k = ([args.heads // g for g in _ints(args.groups)] if args.groups else [args.kv_heads])
    if any(h < 1 or args.heads % h for h in heads_k):
        parser.error(f"--groups / --kv-heads must divide --heads {args.heads}")
    decode_batch = args.decode_batch or (32 if cuda else 4)
    cases = [Case(t, args.heads, hk, dk, dv, dtype, args.device, config, decode_batch)
             for dtype in dtypes for dk, dv in _head_dims(args.head_dims) for hk in heads_k for t in seqlens]

    info = nsa_ext.build_info()
    print(f"nsa_ext {info['version']} | torch {torch.__version__} | device {args.device} | "
          f"threads {torch.get_num_threads()} | Hq={args.heads} | window={config.window} l={config.compress_block} "
          f"d={config.compress_stride} l'={config.select_block} n={config.select_count} | decode batch "
          f"{decode_batch} | {repeats} repeats after {warmup} warm-up, {args.input_sets} input sets")
    rows = run_benchmarks(cases, ops, modes, baselines, warmup, repeats, args.input_sets, args.profile)
    print(format_table(rows, baselines))
    if args.profile:
        print()
        print(format_profiles(rows))
    if args.csv:
        write_csv(rows, baselines, args.csv)
    if args.plot:
        print(f"wrote {args.plot}" if plot(rows, baselines, args.plot) else "matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
