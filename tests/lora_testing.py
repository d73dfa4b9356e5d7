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
    parse_shard,
    reference64,
)


def count_launches(monkeypatch, module, kernel: str) -> list:
    """The grids of ``module.kernel``'s launches from now on, in order."""
    grids = []
    real = getattr(module, kernel)

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(module, kernel, Counting())
    return grids
