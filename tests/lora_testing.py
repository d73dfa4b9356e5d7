"""The test modules' helpers: those of fused_lora.testing (one tolerance
table for the suite and for ``fused-lora check``)."""

from fused_lora.testing import (  # noqa: F401
    DEVICE,
    DTYPES,
    TOLERANCE,
    assert_close,
    make_params,
    make_x,
    normalized_error,
    reference64,
)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (``--shard``: shard i of n, counted from 0) as ``(i, n)``."""
    try:
        i, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be 'i/n' with integers 0 <= i < n, got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard must be 'i/n' with integers 0 <= i < n, got {spec!r}")
    return i, n
