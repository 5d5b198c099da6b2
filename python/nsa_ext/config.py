"""Validation of the NSA block configuration (spec, Notation), independent of any layer config.

The C++ ops check the same rules (csrc/api/select_blocks.cpp); checking here first gives the same
ValueError before any tensor is touched, and lets layer code validate at construction time.
"""

import operator


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
