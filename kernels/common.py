"""Pieces shared by every fused_lora kernel: the dropout keep-mask and the
interpreter switches.

The math the kernels implement is written once, in the docstring of
:mod:`fused_lora.ops`.
"""

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_poison = False


@contextlib.contextmanager
def poison_outputs():
    """Inside the block, every buffer a launcher allocates for a kernel to write
    starts as NaN instead of uninitialised memory, so that an element a kernel
    fails to write shows up in the result (tests turn this on)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled under :func:`poison_outputs`)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p, OFFSET_INT64: tl.constexpr):
    """Dropout keep-mask of the elements ``(rows[:, None], cols[None, :])`` of
    an ``(M, n_cols)`` matrix: ``rand(seed, row * n_cols + col) > p``.

    This is the one definition of the mask; :func:`fused_lora.dropout_mask`
    reproduces it bit for bit in PyTorch. ``OFFSET_INT64`` must be set when
    ``M * n_cols`` can reach 2**31; for smaller matrices the int32 and int64
    offsets give the same stream, because Philox only sees the high word when
    it is non-zero.
    """
    if OFFSET_INT64:
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    else:
        offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) > p


@triton.jit
def load_operand(ptrs, mask, UPCAST: tl.constexpr):
    """Tile load, with zeros outside ``mask`` (``None``: unmasked). ``UPCAST``
    widens the tile to float32 at once: the interpreter computes bf16 dots and
    sums wrongly (triton issues 11584/11585), so bf16 is upcast there and only there."""
    if mask is None:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` was set:
    it then runs on CPU tensors through numpy instead of compiling."""
    return isinstance(kernel, InterpretedFunction)
