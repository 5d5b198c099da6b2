"""Key/value cache for NSA decoding (spec section 7).

A cache holds, per layer and per sequence of the batch, the keys and values each branch reads: the raw
keys/values of every key source (one shared source, or one per branch) and the compressed tokens of
the compression branch, appended as soon as their ``compress_block`` keys exist. Sequences may have
different lengths (ragged batch); each forward appends any number of new tokens per sequence
(prefill, chunked prefill, one-token decoding, a few tokens for speculative decoding).

Storage is padded per sequence (``[B, capacity, Hk, D]``, grown by doubling) with host-side lengths,
so appending never synchronises with the device; the attention ops read views of each sequence's
live rows, never a copy of the cache.
"""

from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor


class _Rows:
    """Per-sequence rows [B, capacity, Hk, D] of one tensor, with host-side lengths."""

    def __init__(self, batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.data = torch.empty(batch, 0, heads, dim, dtype=dtype, device=device)
        self.lengths = [0] * batch

    def append(self, b: int, rows: Tensor) -> None:
        start, end = self.lengths[b], self.lengths[b] + rows.shape[0]
        if end > self.data.shape[1]:
            grown = self.data.new_empty(self.data.shape[0], max(end, 2 * self.data.shape[1], 16),
                                        *self.data.shape[2:])
            grown[:, :self.data.shape[1]] = self.data
            self.data = grown
        self.data[b, start:end] = rows
        self.lengths[b] = end

    def rows(self, b: int, start: int = 0, end: Optional[int] = None) -> Tensor:
        return self.data[b, start:self.lengths[b] if end is None else end]


class LayerCache:
    """The cache of one NSA layer: raw keys/values per source and the compressed tokens."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.sources: Dict[str, Tuple[_Rows, _Rows]] = {}
        self.compressed: Optional[Tuple[_Rows, _Rows]] = None

    @property
    def lengths(self) -> List[int]:
        """Keys cached per sequence (0 for every sequence before the first forward)."""
        if not self.sources:
            return []
        return list(next(iter(self.sources.values()))[0].lengths)

    def append(self, source: str, b: int, k: Tensor, v: Tensor) -> None:
        if source not in self.sources:
            batch = self.batch_size
            self.sources[source] = (_Rows(batch, k.shape[-2], k.shape[-1], k.dtype, k.device),
                                    _Rows(batch, v.shape[-2], v.shape[-1], v.dtype, v.device))
        keys, values = self.sources[source]
        keys.append(b, k)
        values.append(b, v)

    def append_compressed(self, b: int, k_cmp: Tensor, v_cmp: Tensor) -> None:
        if self.compressed is None:
            batch = self.batch_size
            self.compressed = (_Rows(batch, k_cmp.shape[-2], k_cmp.shape[-1], k_cmp.dtype, k_cmp.device),
                               _Rows(batch, v_cmp.shape[-2], v_cmp.shape[-1], v_cmp.dtype, v_cmp.device))
        self.compressed[0].append(b, k_cmp)
        self.compressed[1].append(b, v_cmp)


class NSACache:
    """Decoding state of a model's NSA layers, keyed by layer. Create one per batch of sequences and
    pass it to every ``NativeSparseAttention.forward`` call of that batch; each layer keeps its own
    ``LayerCache``."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"NSACache: argument 'batch_size' must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._layers: Dict[int, LayerCache] = {}

    def layer(self, key: int) -> LayerCache:
        if key not in self._layers:
            self._layers[key] = LayerCache(self.batch_size)
        return self._layers[key]

    def seqlens(self, key: int) -> List[int]:
        """Tokens cached per sequence for the layer ``key``."""
        lengths = self.layer(key).lengths
        return lengths if lengths else [0] * self.batch_size
