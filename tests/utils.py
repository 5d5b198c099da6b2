"""Shared test helpers: input generation in both layouts, the error rules, poisoned outputs."""

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = [torch.bfloat16, torch.float16]


def seqlens_kwargs(inputs) -> dict:
    """The layout keywords every op takes, read from an object that carries them as attributes."""
    return dict(cu_seqlens_q=inputs.cu_seqlens_q, cu_seqlens_k=inputs.cu_seqlens_k,
                max_seqlen_q=inputs.max_seqlen_q, max_seqlen_k=inputs.max_seqlen_k)


@dataclass
class Batch:
    """Attention inputs in one layout, plus what the ops need to know about it."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None

    seqlens = property(seqlens_kwargs)

    def to(self, dtype=None, device=None, requires_grad=False) -> "Batch":
        def conv(t):
            return t.detach().to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
        cu = None if self.cu_seqlens_q is None else self.cu_seqlens_q.to(device)
        cu_k = None if self.cu_seqlens_k is None else self.cu_seqlens_k.to(device)
        return Batch(conv(self.q), conv(self.k), conv(self.v), cu, cu_k, self.max_seqlen_q, self.max_seqlen_k)


def cu_seqlens(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def random_batch(q_lens: List[int], k_lens: List[int], heads_q: int, heads_k: int, dim_qk: int, dim_v: int,
                 packed: bool, dtype=torch.float64, generator=None) -> Batch:
    """Fresh random inputs (never zeros). Padded layout needs equal lengths across the batch."""
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    if packed:
        return Batch(randn(sum(q_lens), heads_q, dim_qk), randn(sum(k_lens), heads_k, dim_qk),
                     randn(sum(k_lens), heads_k, dim_v), cu_seqlens(q_lens), cu_seqlens(k_lens),
                     max(q_lens, default=0), max(k_lens, default=0))
    assert len(set(q_lens)) <= 1 and len(set(k_lens)) <= 1
    b, tq, tk = len(q_lens), q_lens[0], k_lens[0]
    return Batch(randn(b, tq, heads_q, dim_qk), randn(b, tk, heads_k, dim_qk), randn(b, tk, heads_k, dim_v))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, with -inf == -inf counted as equal."""
    a, e = actual.detach().double(), expected.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(e) & (a.sign() == e.sign())
    diff = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = ""):
    """fp32 kernel vs fp64 reference: max error within `rel` of the reference's magnitude."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    finite = expected.detach()[torch.isfinite(expected.detach())]
    magnitude = float(finite.abs().max()) if finite.numel() else 1.0
    err = max_error(actual, expected)
    assert err <= rel * max(magnitude, 1.0), f"{name}: max error {err:.3e} > {rel:.0e} x {magnitude:.3e}"


def assert_within_torch_error(actual: torch.Tensor, low_precision_ref: torch.Tensor, exact: torch.Tensor,
                              name: str = ""):
    """FlashAttention's rule: error vs the fp64 result at most 2x the error of the same computation
    done by plain PyTorch in the low precision dtype (plus a hair for results torch gets exact)."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    ours = max_error(actual, exact)
    torch_err = max_error(low_precision_ref, exact)
    exact = exact.detach()
    slack = 1e-5 * max(float(exact[torch.isfinite(exact)].abs().max()), 1.0) if exact.numel() else 0.0
    assert ours <= 2 * torch_err + slack, f"{name}: error {ours:.3e} > 2 x torch's {torch_err:.3e}"


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor an op allocates without initialising starts as NaN, so an output element a
    kernel forgets to write fails the comparison instead of passing by luck."""
    import torch.utils.deterministic as det
    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode)
        det.fill_uninitialized_memory = old_fill


def grads(outputs, inputs, cotangents):
    """Gradients of sum(out * cotangent) over (out, cotangent) pairs w.r.t. inputs."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None]
    loss = sum((o.double() * c.double()).sum() for o, c in pairs)
    return torch.autograd.grad(loss, inputs)


def finite_cotangent(lse: torch.Tensor, generator=None) -> torch.Tensor:
    """Random cotangent for lse; zero on rows whose lse is -inf (they have no gradient)."""
    g = torch.randn(lse.shape, dtype=torch.float64, generator=generator).to(lse.device)
    return torch.where(torch.isinf(lse.double()), torch.zeros_like(g), g)
