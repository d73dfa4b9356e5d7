"""The dropout keep-mask, in PyTorch, bit for bit the one the kernels draw.

The kernels (:func:`fused_lora.kernels.common.keep_mask`) draw Triton's
Philox4x32-10 once per eight consecutive columns of a row and read its 128
bits as eight 16-bit numbers: element ``(m, k)`` of an ``(M, K)`` matrix is
kept when 16-bit number ``k % 8`` of ``philox(seed, m * cdiv(K, 8) + k // 8)``
(the low, then the high half of each word in turn), over ``2**16``, is
``>= p``. This module implements the same generator on integer tensors so that
the reference (and anyone else) can reproduce a fused dropout forward and
backward exactly, on any device, without Triton. The stream is a pure function
of ``(seed, shape, p)``.
"""

from __future__ import annotations

import math
import numbers

import torch

_U32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
#: Seeds are drawn below 2**31 so that they are the same number in an int32
#: and an int64 kernel argument.
SEED_BOUND = 2**31 - 1


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 values held in int64 (exact:
    the product is split in 16-bit halves so nothing overflows 63 bits)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part, lo_part = a_hi * b, a_lo * b  # each < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _U32
    return hi, lo


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0, k1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 counters held in int64
    tensors, with Triton's round order; returns the four output words. The
    key words ``k0, k1``: uint32 ints, or 0-d int64 tensors holding them."""
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_randint4x(seed, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offsets)`` in PyTorch: the four uint32 words (in
    int64 tensors). ``offsets`` are non-negative int64 counters; ``seed`` a
    non-negative int (or a 0-d int64 tensor holding one). The counter is
    (offset low word, offset high word, 0, 0), the key (seed low word, seed
    high word)."""
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & _U32, (offsets >> 32) & _U32, zero, zero, seed & _U32, (seed >> 32) & _U32)


def keep_threshold(p: float) -> int:
    """The 16-bit threshold of the mask: ``ceil(p * 2**16)`` with ``p`` rounded
    to float32 first (the kernels receive it as float32); a 16-bit number
    ``h`` keeps its element when ``h >= keep_threshold(p)``."""
    return math.ceil(float(torch.tensor(p, dtype=torch.float32, device="cpu")) * 65536.0)


def halves16(words) -> torch.Tensor:
    """Philox's four uint32 words (int64 tensors of one shape S) as the eight
    16-bit numbers the mask reads, shape ``S + (8,)``: the low then the high
    half of word 0, then of word 1, 2, 3."""
    return torch.stack([h for w in words for h in (w & 0xFFFF, w >> 16)], dim=-1)


def check_seed(seed, name: str = "seed") -> int:
    if type(seed) is int and 0 <= seed < 2**63:  # (the usual case, without the ABC checks' host time)
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def check_dropout_p(p, name: str = "dropout_p") -> float:
    if type(p) is float and 0.0 <= p < 1.0:  # (the usual case, without the ABC checks' host time)
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def draw_seed_tensor(device) -> torch.Tensor:
    """A fresh seed drawn on ``device`` by its default generator, as a 0-d
    int32 tensor there: what the fused op passes its kernels for ``seed=None``
    (they read it from memory). ``torch.manual_seed`` makes the draws, and so
    the masks, reproducible; inside a captured CUDA graph each replay draws a
    new one."""
    return torch.randint(SEED_BOUND, (), dtype=torch.int32, device=device)


def draw_seed(device) -> int:
    """The same draw as an int (on a GPU, a device sync): for a caller that
    needs the value, such as a test predicting the mask of ``seed=None``."""
    return int(draw_seed_tensor(device).item())


def check_seed_tensor(seed: torch.Tensor, name: str = "seed") -> torch.Tensor:
    """A seed held in a 0-d int32 or int64 tensor (such as
    :func:`draw_seed_tensor`'s), as int64 on its device. Its value is not
    read: on a GPU that would sync the host (and fail inside a CUDA graph's
    capture)."""
    if seed.dim() != 0 or seed.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int or a 0-d int32/int64 tensor, got a {seed.dtype} tensor "
                        f"of shape {tuple(seed.shape)}")
    return seed.to(torch.int64)


def dropout_mask(seed, shape, p, device=None, *, rows=None) -> torch.Tensor:
    """The boolean keep-mask of shape ``(M, K)`` that the fused kernels use for
    ``seed`` and dropout probability ``p``: element ``(m, k)`` is kept when
    16-bit number ``k % 8`` of ``philox(seed, m * cdiv(K, 8) + k // 8)`` is at
    least ``ceil(p * 2**16)`` (one Philox call per eight columns, see
    :func:`halves16`), so an element is kept with probability ``1 - p`` to
    within ``2**-16``. With ``p == 0`` everything is kept (the kernels then
    draw nothing). For an x of shape ``(..., K)``, ``M`` is the product of the
    leading dimensions (x flattened row-major).

    ``seed``: an int in ``[0, 2**63)``, or a 0-d int32/int64 tensor holding
    one (its value never read back to the host: the seed the fused op draws
    on a GPU for ``seed=None`` gives its mask without a sync). ``device``:
    where the mask is made (default: a tensor seed's device, else the CPU).
    ``rows=(start, stop)``: only those rows of the ``(M, K)`` mask, shape
    ``(stop - start, K)``, equal to ``dropout_mask(seed, shape, p)[start:stop]``
    without making the rest (a mask too big to hold can be checked in slices).
    ``p`` may also be a floating-point tensor of one probability a row,
    ``(M,)``, on the mask's device (its values not read back, nor checked:
    the caller's to keep in [0, 1)): row m compares the same numbers with its
    own threshold, as the kernels draw several adapters' masks
    (:class:`fused_lora.kernels.common.DropoutRows`).
    """
    if device is not None and not isinstance(device, torch.device):  # (a device string or index)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:  # (torch's: an unknown type, an index without an accelerator)
            raise (TypeError if isinstance(error, TypeError) else ValueError)(
                f"device must be a torch.device or a device string such as 'cuda:0', got {device!r} ({error})"
            ) from None
    if isinstance(seed, torch.Tensor):
        seed = check_seed_tensor(seed)
        device = seed.device if device is None else device
        if seed.device != device and seed.device.type != "cpu":
            seed = seed.to(device)  # (a CPU seed is a scalar operand on any device: no copy)
    else:
        seed = check_seed(seed)
    per_row = isinstance(p, torch.Tensor)
    if not per_row:
        p = check_dropout_p(p, "p")
    from ._validate import check_int, check_shape  # (here: _validate imports this module)

    shape = check_shape("shape", shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {shape}")
    m, k = shape
    start, stop = 0, m
    if rows is not None:
        if not isinstance(rows, (tuple, list)) or len(rows) != 2:
            raise TypeError(f"rows must be a pair of ints (start, stop), got {rows!r}")
        start, stop = (check_int(f"rows[{i}]", row, 0) for i, row in enumerate(rows))
        if not start <= stop <= m:
            raise ValueError(f"rows must satisfy start <= stop <= M = {m} for shape {shape}, got {tuple(rows)}")
    if per_row:
        if p.shape != (m,) or not p.is_floating_point():
            raise ValueError(f"p must be a float or a floating-point tensor of one probability a row, ({m},), for "
                             f"shape {shape}; got a {p.dtype} tensor of shape {tuple(p.shape)}")
        device = p.device if device is None else device
        # (ceil(p · 2**16) of p in float32, as keep_threshold: the product is exact)
        threshold = torch.ceil(p[start:stop].to(device=device, dtype=torch.float32) * 65536.0).unsqueeze(1)
    elif p == 0.0:
        return torch.ones((stop - start, k), dtype=torch.bool, device=device)
    else:
        threshold = keep_threshold(p)
    groups = -(-k // 8)
    counters = torch.arange(start * groups, stop * groups, dtype=torch.int64, device=device).view(stop - start, groups)
    halves = halves16(philox_randint4x(seed, counters)).view(stop - start, 8 * groups)[:, :k]
    return halves >= threshold
