"""NSA hyper-parameters (spec, Notation), validated once where they are made.

``validate_config`` checks the block configuration on its own (select_blocks calls it before the op,
which checks the same rules in C++, csrc/api/select_blocks.cpp); ``NSAConfig`` bundles it with the
window and validates at construction.
"""

import operator
from dataclasses import dataclass


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"nsa: argument '{name}' must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"nsa: argument '{name}' must be an int, got {value!r}") from None


def validate_config(compress_block: int, compress_stride: int, select_block: int, select_count: int,
                    init_blocks: int = 1, local_blocks: int = 2) -> None:
    """Raises ValueError naming the offending argument unless: l, d, l', n >= 1; d divides l and l';
    n_init, n_local >= 0 (0 is allowed: nothing forced); n >= n_init + n_local."""
    values = dict(compress_block=compress_block, compress_stride=compress_stride, select_block=select_block,
                  select_count=select_count, init_blocks=init_blocks, local_blocks=local_blocks)
    v = {name: _as_int(name, value) for name, value in values.items()}
    for name in ("compress_block", "compress_stride", "select_block", "select_count"):
        if v[name] < 1:
            raise ValueError(f"nsa: argument '{name}' must be >= 1, got {v[name]}")
    for name in ("init_blocks", "local_blocks"):
        if v[name] < 0:
            raise ValueError(f"nsa: argument '{name}' must be >= 0, got {v[name]}")
    for name in ("compress_block", "select_block"):
        if v[name] % v["compress_stride"]:
            raise ValueError(f"nsa: argument 'compress_stride' must divide {name} ({v[name]}), "
                             f"got {v['compress_stride']}")
    if v["select_count"] < v["init_blocks"] + v["local_blocks"]:
        raise ValueError(f"nsa: argument 'select_count' must be >= init_blocks + local_blocks = "
                         f"{v['init_blocks'] + v['local_blocks']}, got {v['select_count']}")


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
        if _as_int("window", self.window) < 1:
            raise ValueError(f"nsa: argument 'window' must be >= 1, got {self.window}")
        validate_config(self.compress_block, self.compress_stride, self.select_block, self.select_count,
                        self.init_blocks, self.local_blocks)
