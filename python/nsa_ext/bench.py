"""Benchmark of the nsa_ext operators against dense causal SDPA, measured in the same run.

    python -m nsa_ext.bench                      # CPU (or CUDA when present), T = 1k, 4k, 16k
    python -m nsa_ext.bench --quick              # smoke run, well under a minute on CPU
    python -m nsa_ext.bench --seqlens 2048,8192 --ops window --csv out.csv

Each row times one operator at one sequence length, forward or forward+backward, and reports the
ratio to ``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` at
the same shape and dtype (speedup > 1: we are faster). Times are medians over repeats after a
warm-up; on CUDA they are taken with CUDA events.
"""

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import nsa_ext


@dataclass
class Shape:
    seqlen: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    device: str

    def randn(self, heads: int, requires_grad: bool, generator: torch.Generator) -> torch.Tensor:
        t = torch.randn(1, self.seqlen, heads, self.head_dim, generator=generator, dtype=torch.float32)
        return t.to(self.device, self.dtype).requires_grad_(requires_grad)


@dataclass
class Config:
    window: int = 512
    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_count: int = 16


def _timer(device: str) -> Callable[[Callable[[], None]], float]:
    if device.startswith("cuda"):
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def cpu_time(fn):
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin
    return cpu_time


def measure(fn: Callable[[], None], device: str, warmup: int, repeats: int) -> float:
    """Median seconds of fn over repeats, after warm-up runs."""
    timer = _timer(device)
    for _ in range(warmup):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(repeats))


# --- workloads: each returns a callable running the forward (and backward) once --------------------

def _with_backward(forward: Callable[[], torch.Tensor], inputs: List[torch.Tensor], backward: bool):
    def run():
        out = forward()
        if backward:
            torch.autograd.grad(out.sum(), inputs)
    return run


def sdpa_workload(shape: Shape, cfg: Config, backward: bool, gen: torch.Generator):
    q, k, v = (shape.randn(h, backward, gen) for h in (shape.heads_q, shape.heads_k, shape.heads_k))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(backward) for t in (q, k, v))
    return _with_backward(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                          [qt, kt, vt], backward)


def window_workload(shape: Shape, cfg: Config, backward: bool, gen: torch.Generator):
    q, k, v = (shape.randn(h, backward, gen) for h in (shape.heads_q, shape.heads_k, shape.heads_k))
    return _with_backward(lambda: nsa_ext.sliding_window_attention(q, k, v, window=cfg.window)[0], [q, k, v],
                          backward)


def compressed_workload(shape: Shape, cfg: Config, backward: bool, gen: torch.Generator):
    tokens = max(0, (shape.seqlen - cfg.compress_block) // cfg.compress_stride + 1)
    q = shape.randn(shape.heads_q, backward, gen)
    k, v = (Shape(tokens, 0, 0, shape.head_dim, shape.dtype, shape.device).randn(shape.heads_k, backward, gen)
            for _ in range(2))
    return _with_backward(
        lambda: nsa_ext.compressed_attention(q, k, v, compress_block=cfg.compress_block,
                                             compress_stride=cfg.compress_stride)[0], [q, k, v], backward)


def select_workload(shape: Shape, cfg: Config, backward: bool, gen: torch.Generator):
    """Top-n block selection from the compressed branch's lse; not differentiable, so fwd+bwd times
    the same forward (what a training step pays for it)."""
    tokens = max(0, (shape.seqlen - cfg.compress_block) // cfg.compress_stride + 1)
    q = shape.randn(shape.heads_q, False, gen)
    k = Shape(tokens, 0, 0, shape.head_dim, shape.dtype, shape.device).randn(shape.heads_k, False, gen)
    _, lse = nsa_ext.compressed_attention(q, k, k, compress_block=cfg.compress_block,
                                          compress_stride=cfg.compress_stride)
    return lambda: nsa_ext.select_blocks(q, k, lse, compress_block=cfg.compress_block,
                                         compress_stride=cfg.compress_stride, select_block=cfg.select_block,
                                         select_count=cfg.select_count)


def nsa_like_indices(seqlen: int, heads_k: int, count: int, select_block: int, generator: torch.Generator,
                     init_blocks: int = 1, local_blocks: int = 2) -> torch.Tensor:
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


def selection_workload(shape: Shape, cfg: Config, backward: bool, gen: torch.Generator):
    q, k, v = (shape.randn(h, backward, gen) for h in (shape.heads_q, shape.heads_k, shape.heads_k))
    indices = nsa_like_indices(shape.seqlen, shape.heads_k, cfg.select_count, cfg.select_block, gen).to(shape.device)
    return _with_backward(
        lambda: nsa_ext.selection_attention(q, k, v, indices, select_block=cfg.select_block)[0], [q, k, v], backward)


WORKLOADS: Dict[str, Callable] = {
    "window": window_workload,
    "compressed": compressed_workload,
    "select": select_workload,
    "selection": selection_workload,
}

# The torch.ops.nsa forward op behind each workload, to leave out those with no kernel for a device.
OPS = {"window": "sliding_window_attention_fwd", "compressed": "compressed_attention_fwd", "select": "select_blocks",
       "selection": "selection_attention_fwd"}


def has_kernel(op: str, device: str) -> bool:
    key = "CUDA" if device.startswith("cuda") else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nsa::{OPS[op]}", key)


# --- the run -----------------------------------------------------------------------------------

@dataclass
class Row:
    op: str
    seqlen: int
    mode: str
    seconds: float
    sdpa_seconds: float

    @property
    def speedup(self) -> float:
        return self.sdpa_seconds / self.seconds if self.seconds > 0 else float("inf")


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def run_benchmarks(seqlens: List[int], ops: List[str], modes: List[str], heads_q: int, heads_k: int, head_dim: int,
                   dtype: torch.dtype, device: str, cfg: Config, warmup: int, repeats: int) -> List[Row]:
    rows: List[Row] = []
    total = len(seqlens) * len(modes) * (1 + len(ops))
    done = 0
    gen = torch.Generator().manual_seed(0)
    for seqlen in seqlens:
        shape = Shape(seqlen, heads_q, heads_k, head_dim, dtype, device)
        for mode in modes:
            backward = mode == "fwd+bwd"
            _progress(done, total, f"sdpa T={seqlen} {mode}")
            sdpa = measure(sdpa_workload(shape, cfg, backward, gen), device, warmup, repeats)
            done += 1
            for op in ops:
                _progress(done, total, f"{op} T={seqlen} {mode}")
                seconds = measure(WORKLOADS[op](shape, cfg, backward, gen), device, warmup, repeats)
                rows.append(Row(op, seqlen, mode, seconds, sdpa))
                done += 1
    _progress(done, total, "done")
    return rows


def format_table(rows: List[Row]) -> str:
    header = f"{'op':<12}{'T':>8}  {'mode':<9}{'time ms':>12}{'sdpa ms':>12}{'speedup':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.op:<12}{r.seqlen:>8}  {r.mode:<9}{r.seconds * 1e3:>12.2f}{r.sdpa_seconds * 1e3:>12.2f}"
                     f"{r.speedup:>9.2f}x")
    return "\n".join(lines)


def write_csv(rows: List[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "seqlen", "mode", "seconds", "sdpa_seconds", "speedup"])
        for r in rows:
            writer.writerow([r.op, r.seqlen, r.mode, f"{r.seconds:.6g}", f"{r.sdpa_seconds:.6g}", f"{r.speedup:.4g}"])


def main(argv: Optional[List[str]] = None) -> int:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m nsa_ext.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--seqlens", default=None, help="comma-separated T values (default 1024,4096,16384)")
    parser.add_argument("--ops", default=None,
                        help=f"subset of {','.join(WORKLOADS)} (default: those with a kernel for the device)")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=Config.window)
    parser.add_argument("--compress-block", type=int, default=Config.compress_block)
    parser.add_argument("--compress-stride", type=int, default=Config.compress_stride)
    parser.add_argument("--select-block", type=int, default=Config.select_block)
    parser.add_argument("--select-count", type=int, default=Config.select_count)
    parser.add_argument("--tile-positions", type=int, default=None,
                        help="CUDA selection: cap the query positions per forward/dq tile (sets "
                             "NSA_SELECTION_TILE_POSITIONS), to measure how small groups should be packed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small smoke run: T = 512, 1024, one repeat")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_positions:
        os.environ["NSA_SELECTION_TILE_POSITIONS"] = str(args.tile_positions)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    seqlens = [int(s) for s in (args.seqlens or ("512,1024" if args.quick else "1024,4096,16384")).split(",")]
    ops = ([o for o in args.ops.split(",") if o] if args.ops is not None
           else [o for o in WORKLOADS if has_kernel(o, args.device)])
    unknown = [o for o in ops if o not in WORKLOADS]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(WORKLOADS)}")
    warmup, repeats = (0, 1) if args.quick else (args.warmup, args.repeats)
    cfg = Config(args.window, args.compress_block, args.compress_stride, args.select_block, args.select_count)

    info = nsa_ext.build_info()
    print(f"nsa_ext {info['version']} | torch {torch.__version__} | device {args.device} | {dtype} | "
          f"threads {torch.get_num_threads()} | Hq={args.heads} Hk={args.kv_heads} D={args.head_dim} | "
          f"window={cfg.window} l={cfg.compress_block} d={cfg.compress_stride} l'={cfg.select_block} "
          f"n={cfg.select_count}")
    rows = run_benchmarks(seqlens, ops, args.modes.split(","), args.heads, args.kv_heads, args.head_dim, dtype,
                          args.device, cfg, warmup, repeats)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
