"""NSA hyper-parameters (spec, Notation), validated once where they are made."""

from dataclasses import dataclass


@dataclass(frozen=True)
class NSAConfig:
    """Block sizes of the three NSA branches; defaults are the paper's.

    compress_block (l) and compress_stride (d): compressed token i summarises keys
    ``[i*d, i*d + l)``. select_block (l'): selection block j is keys ``[j*l', (j+1)*l')``.
    select_count (n): blocks each query and kv-head group attends to, including init_blocks forced
    initial blocks and local_blocks forced blocks ending at the query's own block. window (w):
    sliding-window length, the query itself included.
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_count: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512

    def __post_init__(self):
        for name in ("compress_block", "compress_stride", "select_block", "select_count", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NSAConfig: argument '{name}' must be a positive integer, got {value!r}")
        for name in ("init_blocks", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"NSAConfig: argument '{name}' must be a non-negative integer, got {value!r}")
        if self.compress_block % self.compress_stride:
            raise ValueError(f"NSAConfig: argument 'compress_stride' ({self.compress_stride}) must divide "
                             f"compress_block ({self.compress_block})")
        if self.select_block % self.compress_stride:
            raise ValueError(f"NSAConfig: argument 'compress_stride' ({self.compress_stride}) must divide "
                             f"select_block ({self.select_block})")
        if self.select_count < self.init_blocks + self.local_blocks:
            raise ValueError(f"NSAConfig: argument 'select_count' ({self.select_count}) must be >= init_blocks + "
                             f"local_blocks ({self.init_blocks} + {self.local_blocks})")
