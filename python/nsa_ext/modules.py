"""``NativeSparseAttention``: the NSA attention layer as an ``nn.Module`` (spec sections 1, 6, 7)."""

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .cache import NSACache
from .compression import make_compression
from .config import NSAConfig
from .functional import native_sparse_attention, native_sparse_attention_with_kvcache
from .seqlens import check_cu_seqlens, num_compressed_tokens

Tensor = torch.Tensor
Rotary = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]


# New tokens per sequence up to which a cached forward takes the fused decoding op (decoding and
# speculative decoding); longer chunks are prefill, where the tiled per-branch kernels do better.
FUSED_DECODE_MAX_QUERIES = 16


def _fused_decode(new_tokens, device: torch.device) -> bool:
    """Whether a cached forward with these new-token counts runs the fused decoding op: inference
    only (the op has no backward), the same count for every sequence, and a kernel for the device."""
    return (not torch.is_grad_enabled() and len(set(new_tokens)) == 1 and 1 <= new_tokens[0] <= FUSED_DECODE_MAX_QUERIES
            and torch._C._dispatch_has_kernel_for_dispatch_key("nsa::decode_attention",
                                                               "CUDA" if device.type == "cuda" else "CPU"))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as in Llama): ``rotary(q, k, positions)``
    rotates the first ``dim`` features of q and k by their positions. ``positions`` has q's leading
    shape without batch and heads: ``[T]`` (padded) or ``[total]`` (packed)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding: argument 'dim' must be even, got {dim}")
        self.dim = dim
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim),
                             persistent=False)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        first, second = rot.float().chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return torch.cat([rotated.to(x.dtype), rest], dim=-1)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # [.., dim/2]
        cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class NativeSparseAttention(nn.Module):
    """NSA attention layer: hidden states in, hidden states out.

    ``x [B, T, hidden]`` (padded) or ``[total, hidden]`` with int32 ``cu_seqlens [N+1]`` (packed).
    q/k/v projections with GQA (``num_heads % num_kv_heads == 0``, ``head_dim_v`` may differ from
    ``head_dim``); keys/values either shared by the three branches (``shared_kv=True``, the cheaper
    variant) or projected separately per branch (the paper); compression phi (``"mean"``,
    ``"linear"``, ``"mlp"``) of the compression branch's keys and values; sigmoid gates per query
    head and branch; an optional ``rotary`` hook ``(q, k, positions) -> (q, k)`` applied to q and every
    key source before compression, as in common LLM code (``True`` makes a ``RotaryEmbedding``);
    output projection.

    With ``cache`` (an ``NSACache``) the call appends its tokens to the cached sequences and attends
    over everything cached: prefill, chunked prefill and decoding give the same outputs as one pass
    over the whole sequence.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, head_dim_v: Optional[int] = None,
                 config: Optional[NSAConfig] = None, compression: str = "mlp", shared_kv: bool = False,
                 rotary=None, bias: bool = False, scale: Optional[float] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"NativeSparseAttention: argument 'num_kv_heads' ({num_kv_heads}) must divide "
                             f"num_heads ({num_heads})")
        if compression not in ("mean", "linear", "mlp"):  # else make_compression would name its 'kind'
            raise ValueError(f"NativeSparseAttention: argument 'compression' must be 'mean', 'linear' or 'mlp', "
                             f"got {compression!r}")
        self.config = NSAConfig() if config is None else config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.head_dim_v = self.head_dim if head_dim_v is None else head_dim_v
        self.scale = scale
        self.sources = ("shared",) if shared_kv else ("cmp", "slc", "swa")
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.ModuleDict({s: nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
                                     for s in self.sources})
        self.v_proj = nn.ModuleDict({s: nn.Linear(hidden_size, num_kv_heads * self.head_dim_v, bias=bias)
                                     for s in self.sources})
        cfg = self.config
        self.compress_k = make_compression(compression, compress_block=cfg.compress_block,
                                           compress_stride=cfg.compress_stride, num_heads=num_kv_heads,
                                           head_dim=self.head_dim)
        self.compress_v = make_compression(compression, compress_block=cfg.compress_block,
                                           compress_stride=cfg.compress_stride, num_heads=num_kv_heads,
                                           head_dim=self.head_dim_v)
        self.gate_proj = nn.Linear(hidden_size, num_heads * 3, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim_v, hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary is True else (rotary or None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections N(0, 1/hidden) (unit-variance outputs for unit-variance inputs), the output
        projection N(0, 1/(Hq*Dv)); gates start at sigmoid(0) = 1/2 for every branch."""
        for linear in [self.q_proj, *self.k_proj.values(), *self.v_proj.values(), self.o_proj, self.gate_proj]:
            nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.gate_proj.weight, std=0.02 * self.gate_proj.in_features ** -0.5)

    def _source(self, branch: str) -> str:
        return "shared" if self.sources == ("shared",) else branch

    def _project(self, x: Tensor, positions: Tensor):
        """q [.., Hq, Dk], keys/values per source [.., Hk, D] (rotary applied), gates [.., Hq, 3]
        (g_cmp, g_slc, g_swa)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        keys, values = {}, {}
        for s in self.sources:
            keys[s] = self.k_proj[s](x).view(*lead, self.num_kv_heads, self.head_dim)
            values[s] = self.v_proj[s](x).view(*lead, self.num_kv_heads, self.head_dim_v)
        if self.rotary is not None:
            rotated_q = None
            for s in self.sources:
                rotated_q, keys[s] = self.rotary(q, keys[s], positions)
            q = rotated_q
        gates = torch.sigmoid(self.gate_proj(x)).view(*lead, self.num_heads, 3)
        return q, keys, values, gates

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                cache: Optional[NSACache] = None) -> Tensor:
        self._check_input(x, cu_seqlens)
        if cache is not None:
            return self._forward_cached(x, cu_seqlens, cache)
        if cu_seqlens is None:
            positions = torch.arange(x.shape[1], device=x.device)
        else:
            starts = cu_seqlens[:-1].long()
            lengths = cu_seqlens[1:].long() - starts
            positions = torch.arange(x.shape[0], device=x.device) - torch.repeat_interleave(
                starts, lengths, output_size=x.shape[0])
        q, keys, values, gates = self._project(x, positions)
        g_cmp, g_slc, g_swa = gates.unbind(-1)
        k_cmp = self.compress_k(keys[self._source("cmp")], cu_seqlens)
        v_cmp = self.compress_v(values[self._source("cmp")], cu_seqlens)
        seqlens = dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                       max_seqlen_k=max_seqlen)
        out = native_sparse_attention(
            q, keys[self._source("slc")], values[self._source("slc")], k_cmp, v_cmp, g_cmp, g_slc, g_swa,
            config=self.config, scale=self.scale, k_swa=keys[self._source("swa")],
            v_swa=values[self._source("swa")], **seqlens)
        return self.o_proj(out.flatten(-2))

    def _check_input(self, x: Tensor, cu_seqlens: Optional[Tensor]) -> None:
        """x [B, T, hidden] or, with cu_seqlens, [total, hidden]; the projections would otherwise fail
        on a wrong hidden size without naming x, and a wrong rank would be blamed on the keys."""
        rank, shape = (3, "[B, T, hidden]") if cu_seqlens is None else (2, "[total, hidden]")
        if x.dim() != rank or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"NativeSparseAttention: argument 'x' must have shape {shape} with hidden = "
                             f"{self.q_proj.in_features}, got {tuple(x.shape)}")
        if cu_seqlens is not None:
            # Values only where reading them is free: on the CPU, outside torch.compile.
            check_cu_seqlens(cu_seqlens, "cu_seqlens", rows=x.shape[0], exact=True,
                             values=cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling())

    def _forward_cached(self, x: Tensor, cu_seqlens: Optional[Tensor], cache: NSACache) -> Tensor:
        layer = cache.layer(id(self))
        batch = cache.batch_size
        old = cache.seqlens(id(self))
        if cu_seqlens is None:
            if x.dim() != 3 or x.shape[0] != batch:
                raise ValueError(f"NativeSparseAttention: argument 'x' must be [B={batch}, T, hidden] with the "
                                 f"cache's batch size, got {tuple(x.shape)}")
            new = [x.shape[1]] * batch
            rows = x.reshape(-1, x.shape[-1])
        else:
            new = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            if len(new) != batch:
                raise ValueError(f"NativeSparseAttention: argument 'cu_seqlens' must describe {batch} sequences "
                                 f"(the cache's batch size), got {len(new)}")
            rows = x
        total = [o + n for o, n in zip(old, new)]
        positions = torch.cat([torch.arange(o, t, device=x.device) for o, t in zip(old, total)])
        q, keys, values, gates = self._project(rows, positions)

        cfg = self.config
        starts = [0]
        for n in new:
            starts.append(starts[-1] + n)
        for b in range(batch):
            for s in self.sources:
                layer.append(s, b, keys[s][starts[b]:starts[b + 1]], values[s][starts[b]:starts[b + 1]])
        cmp_keys, cmp_values = layer.sources[self._source("cmp")]
        for b in range(batch):
            # New tokens i in [TC(old), TC(total)) summarise keys [i*d, i*d + l): compress that span.
            first = num_compressed_tokens(old[b], cfg.compress_block, cfg.compress_stride)
            last = num_compressed_tokens(total[b], cfg.compress_block, cfg.compress_stride)
            span = slice(first * cfg.compress_stride, (last - 1) * cfg.compress_stride + cfg.compress_block)
            k_new = self.compress_k(cmp_keys.rows(b, span.start, span.stop)[None])[0]
            v_new = self.compress_v(cmp_values.rows(b, span.start, span.stop)[None])[0]
            layer.append_compressed(b, k_new, v_new)

        if _fused_decode(new, x.device):
            # Decoding: one fused op over the padded cache for the whole batch (the same new-token
            # count per sequence), reading only the compressed tokens, selected blocks and window.
            tq = new[0]
            swa = self._source("swa") != self._source("slc")
            out = native_sparse_attention_with_kvcache(
                q.view(batch, tq, *q.shape[1:]), layer.sources[self._source("slc")][0].data,
                layer.sources[self._source("slc")][1].data, layer.compressed[0].data, layer.compressed[1].data,
                gates.view(batch, tq, *gates.shape[1:]), torch.tensor(total, dtype=torch.int32, device=x.device),
                config=cfg, scale=self.scale,
                k_swa_cache=layer.sources[self._source("swa")][0].data if swa else None,
                v_swa_cache=layer.sources[self._source("swa")][1].data if swa else None)
            out = self.o_proj(out.flatten(-2))
            return out if cu_seqlens is None else out.flatten(0, 1)

        # Prefill chunks, different counts per sequence, or gradients wanted: one differentiable call
        # per sequence on views of its cached rows (padded layout, B = 1, queries bottom-right aligned),
        # never a packed copy of the cache.
        def rows(source: str, which: int, b: int) -> Tensor:
            return layer.sources[source][which].rows(b)[None]

        outputs = []
        for b in range(batch):
            new_rows = slice(starts[b], starts[b + 1])
            outputs.append(native_sparse_attention(
                q[new_rows][None], rows(self._source("slc"), 0, b), rows(self._source("slc"), 1, b),
                layer.compressed[0].rows(b)[None], layer.compressed[1].rows(b)[None],
                *gates[new_rows][None].unbind(-1), config=cfg, scale=self.scale,
                k_swa=rows(self._source("swa"), 0, b), v_swa=rows(self._source("swa"), 1, b),
                max_seqlen_k=total[b])[0])
        out = self.o_proj(torch.cat(outputs).flatten(-2))
        return out.view(batch, -1, out.shape[-1]) if cu_seqlens is None else out
