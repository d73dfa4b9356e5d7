"""Pieces shared by every fused_lora kernel: the dropout keep-mask and the
interpreter switches.

The math the kernels implement is written once, in the docstring of
:mod:`fused_lora.ops`.
"""

import contextlib
from typing import NamedTuple

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


def alloc(shape, dtype: torch.dtype, device, strides=None) -> torch.Tensor:
    """``torch.empty`` (``torch.empty_strided`` with ``strides``) for kernel
    outputs (under :func:`poison_outputs` NaN-filled, or an integer output
    filled with its dtype's largest value)."""
    if strides is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if _poison:  # (an integer output: its largest value, which no kernel writes)
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out


def seed_arg(seed, device: torch.device):
    """A launcher's ``seed`` as the kernel takes it: an int, or a one-element
    int32 (or, for a seed of 2**31 or more, int64) tensor on the operands'
    device, passed as a pointer (see :func:`load_seed`)."""
    if isinstance(seed, torch.Tensor):
        if (seed.dtype not in (torch.int32, torch.int64) or seed.numel() != 1 or seed.device.type != device.type
                or (device.index is not None and seed.device.index not in (device.index, None))):
            raise ValueError(f"a seed tensor must be one int32 or int64 on {device}, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
        return seed
    return int(seed)


@triton.jit
def load_seed(seed):
    """The Philox seed of the dropout mask from a kernel's ``seed`` argument:
    the value itself, or, where the launcher passed a one-element int32 tensor
    (a pointer here), the value read from it. A seed drawn on the GPU that way
    is part of a captured CUDA graph, so that each replay draws a new mask; a
    scalar argument would be frozen into the graph."""
    if seed.dtype.is_ptr():
        seed = tl.load(seed)
    return seed


#: The size (rows x columns) of a masked matrix from which :func:`keep_mask`
#: computes its Philox counters in 64 bits (``OFFSET_INT64``). The counters
#: reach about ``rows * columns / 8`` (plus a tile's overhang), so 2**31
#: elements leave a margin of eight; the 64-bit counters cost a few integer
#: instructions per eight elements and draw the same mask.
MASK_INT64_NUMEL = 2**31


def check_row_scale(launcher: str, row_scale, product, rows: int) -> None:
    """A launcher's contract for its ``row_scale``: fp32 of one value a row
    (``rows``), and a ``product`` (the rank product it scales) to scale."""
    if row_scale is not None and (product is None or row_scale.shape != (rows,)
                                  or row_scale.dtype != torch.float32):
        raise ValueError(f"{launcher}: row_scale scales the rows of the rank product it makes: pass that product's "
                         f"factor, and a float32 ({rows},) row_scale; got {tuple(row_scale.shape)} {row_scale.dtype}"
                         f"{'' if product is not None else ' and no factor'}")


class AdapterColumns(NamedTuple):
    """Several adapters side by side in one rank product (the adapters of
    :mod:`fused_lora.ops`): row m belongs to adapter ``row_ids[m]``, rank
    column j to adapter ``col_ids[j]``, and the product's element (m, j) is
    kept, times ``col_scale[j]``, where the two match, 0 elsewhere: a row of
    no adapter's (id -1) gets 0 everywhere, the base alone; a row of an id
    below -1 gets NaN everywhere (an id the caller could not check)."""

    row_ids: torch.Tensor  # (M,) int32, any stride
    col_ids: torch.Tensor  # (r,) int32, contiguous
    col_scale: torch.Tensor  # (r,) fp32, contiguous

    def columns(self, r0: int, r1: int) -> "AdapterColumns":
        """The same, for rank columns ``r0:r1`` (a launch over a rank chunk)."""
        return AdapterColumns(self.row_ids, self.col_ids[r0:r1], self.col_scale[r0:r1])


def check_adapter_columns(launcher: str, adapters, product, rows: int, row_scale=None) -> None:
    """A launcher's contract for its ``adapters``: an :class:`AdapterColumns`
    for ``rows`` rows and the rank of ``product`` (the (·, r) factor whose
    product it masks), int32 ids, contiguous fp32 column scales; and no
    ``row_scale`` with it (the two together made a kernel spill, compile
    report, and no caller needs both)."""
    if adapters is None:
        return
    if row_scale is not None:
        raise ValueError(f"{launcher}: pass row_scale or adapters, not both (a row of the adapters' runs the base "
                         "alone with id -1)")
    r = product.shape[1] if product is not None else None
    row_ids, col_ids, col_scale = adapters
    if (product is None or row_ids.shape != (rows,) or row_ids.dtype != torch.int32
            or col_ids.shape != (r,) or col_ids.dtype != torch.int32 or col_ids.stride() != (1,)
            or col_scale.shape != (r,) or col_scale.dtype != torch.float32 or col_scale.stride() != (1,)):
        raise ValueError(f"{launcher}: adapters masks the rank product it makes: pass that product's factor, "
                         f"int32 ({rows},) row ids, and contiguous int32 and float32 ({r},) column ids and "
                         f"scales; got {tuple(row_ids.shape)} {row_ids.dtype}, {tuple(col_ids.shape)} "
                         f"{col_ids.dtype}, {tuple(col_scale.shape)} {col_scale.dtype}"
                         f"{'' if product is not None else ' and no factor'}")


class DropoutRows(NamedTuple):
    """Dropout of several probabilities, one an adapter (the adapters of
    :mod:`fused_lora.ops`): row m of the masked matrix is masked with
    probability ``p[row_ids[m]]``, its adapter's, and not at all where
    ``row_ids[m] < 0`` (no adapter's: the base alone, or an id the caller
    could not check). The keep-mask's random numbers are the one mask's
    (:func:`keep_mask`): only each row's threshold differs. The launchers
    take the masks' 1/(1 - p) out of their scales: the caller folds each
    adapter's into its rank columns' scales."""

    row_ids: torch.Tensor  # (M,) int32, any stride
    p: torch.Tensor  # (n,) fp32, contiguous: adapter i's probability, in [0, 1)


def check_dropout_rows(launcher: str, dropout_rows, rows: int, adapters=None) -> None:
    """A launcher's contract for its ``dropout_rows``: a :class:`DropoutRows`
    of int32 ids for ``rows`` rows and a contiguous fp32 table, the ids the
    ``adapters``' own where both are given (the kernels read one)."""
    if dropout_rows is None:
        return
    row_ids, p = dropout_rows
    if (row_ids.shape != (rows,) or row_ids.dtype != torch.int32 or p.dim() != 1 or p.dtype != torch.float32
            or p.stride() != (1,)):
        raise ValueError(f"{launcher}: dropout_rows holds int32 ({rows},) row ids and a contiguous float32 (n,) "
                         f"table of probabilities; got {tuple(row_ids.shape)} {row_ids.dtype}, {tuple(p.shape)} "
                         f"{p.dtype}")
    if adapters is not None and adapters.row_ids is not row_ids:
        raise ValueError(f"{launcher}: dropout_rows and adapters read the same row ids: pass one tensor to both")


@triton.jit
def rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, m_in, stride_ids, ROW_P: tl.constexpr):
    """The dropout probability of the rows ``offs_m`` for :func:`keep_mask`:
    the scalar ``p``, or, with ``ROW_P`` (:class:`DropoutRows`), each row's
    adapter's ``drp[ids[m]]`` as a (BLOCK_M, 1) column, 0 on a row of no
    adapter's (id below 0) and outside ``m_in``."""
    if ROW_P:
        row_id = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=m_in, other=-1)
        return tl.load(drp_ptr + tl.maximum(row_id, 0), mask=row_id >= 0, other=0.0)[:, None]
    else:
        return p


@triton.jit
def adapter_columns(acc, ids_ptr, cid_ptr, csc_ptr, offs_m, m_in, offs_r, r_in, stride_ids):
    """``acc`` (BLOCK_M, BLOCK_R), a rank product's tile, with element (m, j)
    times ``csc[j]`` where ``ids[m] == cid[j]``, and elsewhere 0, or NaN on
    a row whose id is below -1 (:class:`AdapterColumns`). A select, not a
    product: a row's NaN or Inf does not reach the other adapters' columns,
    as when each adapter runs on its own rows. (The select first, then the
    product with the column scales, which are finite: in that order the
    compile report finds no spill; the other spilled 8 bytes on Triton
    3.6's fp32 16x64 split-K in-loop forward with dropout.)"""
    col_id = tl.load(cid_ptr + offs_r, mask=r_in, other=-1)
    col_scale = tl.load(csc_ptr + offs_r, mask=r_in, other=0.0)
    row_id = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=m_in, other=-1)
    other = tl.where(row_id < -1, float("nan"), 0.0)
    return tl.where(row_id[:, None] == col_id[None, :], acc, other[:, None]) * col_scale[None, :]


def mask_counters_int64(rows: int, cols: int) -> bool:
    """``keep_mask``'s ``OFFSET_INT64`` for a mask over a ``(rows, cols)`` matrix."""
    return rows * cols >= MASK_INT64_NUMEL


@triton.jit
def keep_mask(seed, rows, col0, n_cols, p, BLOCK_COLS: tl.constexpr, OFFSET_INT64: tl.constexpr):
    """Dropout keep-mask of the elements ``(rows[:, None], col0 + arange(BLOCK_COLS)[None, :])``
    of an ``(M, n_cols)`` matrix (``col0`` a multiple of 8).

    One Philox4x32-10 call covers eight consecutive columns of a row: its 128
    output bits, read as eight little-endian 16-bit numbers ``h`` (the low then
    the high half of each of the four words, in order), give columns ``c`` with
    ``c % 8`` = 0..7, and element ``(m, c)`` is kept when ``h / 2**16 >= p``,
    i.e. ``h >= ceil(p * 2**16)`` (p as float32, as the kernels receive it;
    or a (rows, 1) column of each row's p: :func:`rows_dropout_p`).
    The counter is ``m * G + c // 8``, ``G = cdiv(n_cols, 8)``. So the keep
    probability is ``1 - p`` to within ``2**-16`` (exactly, when ``p * 2**16``
    is an integer).

    Philox is about 60 integer instructions a call, and the dropout passes are
    bound by it rather than by memory: a call per element (``tl.rand``) throws
    7/8 of its bits away. Measured in sm_90 SASS (Triton 3.9, compile report
    shapes) over the same kernel without dropout, per element: the forward
    shrink +22 instructions with a 32-bit uniform per word (four columns a
    call), +13.5 with this; the dx GEMM's epilogue +21.4 with four columns a
    call, +17.4 with this. (``tl.rand`` cost +54 in an earlier build of the
    forward shrink.)

    This is the one definition of the mask; :func:`fused_lora.dropout_mask`
    reproduces it bit for bit in PyTorch. ``OFFSET_INT64`` must be set when
    ``M * G`` can reach 2**31 (the launchers ask :func:`mask_counters_int64`,
    with a margin); for smaller matrices the int32 and int64
    counters give the same stream, because Philox only sees the high word when
    it is non-zero.
    """
    tl.static_assert(BLOCK_COLS % 8 == 0, "keep_mask draws eight columns per Philox call")
    groups = col0 // 8 + tl.arange(0, BLOCK_COLS // 8)
    row_groups = (n_cols + 7) // 8
    if OFFSET_INT64:
        counters = rows.to(tl.int64)[:, None] * row_groups + groups.to(tl.int64)[None, :]
    else:
        counters = rows[:, None] * row_groups + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    threshold = tl.ceil(tl.cast(p, tl.float32) * 65536.0).to(tl.uint32)  # exact: only the exponent changes
    # (rows, groups, 2, 2) in row-major order is (rows, groups, word): w0 w1 w2 w3; joining the low
    # halves with the high halves last makes (rows, groups, word, half): eight 16-bit numbers a call.
    low = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    high = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    return tl.reshape(tl.join(low, high), (rows.shape[0], BLOCK_COLS)) >= threshold


@triton.jit
def in_bounds(offs, limit, EVEN: tl.constexpr):
    """``offs < limit``, or all True when ``EVEN`` (the launcher knows the
    bound is a whole number of blocks). A mask of unknown granularity along a
    contiguous dimension makes the compiler load element by element; a
    constant one keeps the loads 16-byte vectors."""
    if EVEN:
        return tl.full(offs.shape, True, tl.int1)
    return offs < limit


@triton.jit
def dequantize(q, scale, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """An int8 tile times its scales (broadcast over it), made in fp32 and
    rounded once to ``dtype``, the other operand's: the dequantised weight
    ``Ŵ = round(q · scale)`` of :mod:`fused_lora.ops`, exactly as PyTorch
    makes it. ``UPCAST`` (interpreter + bf16): the tile stays fp32, rounded
    to bf16's values here, to nearest even, because the interpreter's cast
    to bf16 truncates."""
    tile = q.to(tl.float32) * scale
    if UPCAST:
        bits = tile.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(tile == tile, bits.to(tl.float32, bitcast=True), tile)  # (NaN stays NaN)
    return tile.to(dtype)


@triton.jit
def nf4_codes(packed, code_ptr, PAIRS_ALONG_ROWS: tl.constexpr):
    """The NF4 values of a tile of bytes, two 4-bit indices each, the first
    value of a pair in the high nibble (bitsandbytes' order): fp32, (2R, C)
    from (R, C) bytes (``PAIRS_ALONG_ROWS``: byte row i gives rows 2i and
    2i+1), else (R, 2C) (byte column j gives columns 2j and 2j+1); each value
    ``code[index]``, ``code`` the 16 values at ``code_ptr``. (A byte 0x77 is
    two zeros: what a masked load should fill with.)"""
    rows: tl.constexpr = packed.shape[0]
    cols: tl.constexpr = packed.shape[1]
    pairs = tl.join((packed >> 4).to(tl.int32), (packed & 0xF).to(tl.int32))  # (R, C, 2)
    if PAIRS_ALONG_ROWS:
        index = tl.reshape(tl.permute(pairs, (0, 2, 1)), (2 * rows, cols))
    else:
        index = tl.reshape(pairs, (rows, 2 * cols))
    return tl.load(code_ptr + index)


@triton.jit
def repeat_groups(scales, GROUP: tl.constexpr, ALONG_ROWS: tl.constexpr):
    """Each of ``scales``' rows (``ALONG_ROWS``), or columns, ``GROUP``
    times in a row: (G, C) -> (G·GROUP, C), or (R, G) -> (R, G·GROUP)."""
    a: tl.constexpr = scales.shape[0]
    b: tl.constexpr = scales.shape[1]
    if ALONG_ROWS:
        out = tl.reshape(tl.broadcast_to(scales[:, None, :], (a, GROUP, b)), (a * GROUP, b))
    else:
        out = tl.reshape(tl.broadcast_to(scales[:, :, None], (a, b, GROUP)), (a, b * GROUP))
    return out


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
