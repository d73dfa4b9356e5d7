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
def keep_mask(seed, rows, col0, n_cols, p, BLOCK_COLS: tl.constexpr, OFFSET_INT64: tl.constexpr):
    """Dropout keep-mask of the elements ``(rows[:, None], col0 + arange(BLOCK_COLS)[None, :])``
    of an ``(M, n_cols)`` matrix (``col0`` a multiple of 4).

    One Philox4x32-10 call covers four consecutive columns of a row: element
    ``(m, c)`` is kept when word ``c % 4`` of ``philox(seed, m * G + c // 4)``,
    ``G = cdiv(n_cols, 4)``, as Triton's uniform float, is ``> p``. A call per
    element (``tl.rand``) would throw three of its four words away: Philox is
    about 50 integer instructions a call, and the dropout passes would be
    bound by it rather than by memory (sm_90 SASS of the forward shrink with
    dropout on: +54 instructions per element with ``tl.rand``, +28 with this).

    This is the one definition of the mask; :func:`fused_lora.dropout_mask`
    reproduces it bit for bit in PyTorch. ``OFFSET_INT64`` must be set when
    ``M * G`` can reach 2**31; for smaller matrices the int32 and int64
    counters give the same stream, because Philox only sees the high word when
    it is non-zero.
    """
    tl.static_assert(BLOCK_COLS % 4 == 0, "keep_mask draws four columns per Philox call")
    groups = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    row_groups = (n_cols + 3) // 4
    if OFFSET_INT64:
        counters = rows.to(tl.int64)[:, None] * row_groups + groups.to(tl.int64)[None, :]
    else:
        counters = rows[:, None] * row_groups + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # (rows, groups, 2, 2) in row-major order is (rows, groups, word): w0 w1 w2 w3.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_COLS))
    return tl.uint_to_uniform_float(words) > p


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
