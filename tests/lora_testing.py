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

