"""The dropout keep-mask, in PyTorch, bit for bit the one the kernels draw.

The kernels (:func:`fused_lora.kernels.common.keep_mask`) draw Triton's
Philox4x32-10 once per four consecutive columns of a row, and keep element
``(m, k)`` of an ``(M, K)`` matrix when word ``k % 4`` of
``philox(seed, m * cdiv(K, 4) + k // 4)``, as Triton's uniform float, is
``> p``. This module implements the same generator on integer tensors so that
the reference (and anyone else) can reproduce a fused dropout forward and
backward exactly, on any device, without Triton. The stream is a pure function
of ``(seed, shape, p)``.
"""

from __future__ import annotations

import numbers

import torch

_U32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
#: Triton's uint32 -> [0, 1) scale: the largest float with MAX_INT32 * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
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
               k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 counters held in int64
    tensors, with Triton's round order; returns the four output words."""
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offsets)`` in PyTorch: the four uint32 words (in
    int64 tensors). ``offsets`` are non-negative int64 counters; ``seed`` a
    non-negative int. The counter is (offset low word, offset high word, 0, 0),
    the key (seed low word, seed high word)."""
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & _U32, (offsets >> 32) & _U32, zero, zero, seed & _U32, (seed >> 32) & _U32)


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """``tl.uint_to_uniform_float`` in PyTorch: uint32 words (held in int64) to
    float32 uniforms in [0, 1) (an int32 bitcast, negatives folded with ~x,
    then scaled in float32)."""
    folded = torch.where(word >= 2**31, _U32 - word, word)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=folded.device)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` in PyTorch: the first word of each counter's
    Philox output as a float32 uniform in [0, 1)."""
    return uint_to_uniform(philox_randint4x(seed, offsets)[0])


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def check_dropout_p(p, name: str = "dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def draw_seed() -> int:
    """A fresh seed from torch's default (CPU) generator: ``torch.manual_seed``
    makes the draws, and so the dropout masks, reproducible. No device sync."""
    return int(torch.randint(SEED_BOUND, (), dtype=torch.int64).item())


def dropout_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The boolean keep-mask of shape ``(M, K)`` that the fused kernels use for
    ``seed`` and dropout probability ``p``: element ``(m, k)`` is kept when
    word ``k % 4`` of ``philox(seed, m * cdiv(K, 4) + k // 4)``, as a uniform
    float, is ``> p`` (one Philox call per four columns). With ``p == 0``
    everything is kept (the kernels then draw nothing). For an x of shape
    ``(..., K)``, ``M`` is the product of the leading dimensions (x flattened
    row-major).
    """
    seed = check_seed(seed)
    p = check_dropout_p(p, "p")
    shape = tuple(shape)
    if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in shape):
        raise ValueError(f"shape must be (M, K) with non-negative ints, got {shape}")
    m, k = (int(d) for d in shape)
    if p == 0.0:
        return torch.ones((m, k), dtype=torch.bool, device=device)
    groups = -(-k // 4)
    counters = torch.arange(m * groups, dtype=torch.int64, device=device).view(m, groups)
    words = torch.stack(philox_randint4x(seed, counters), dim=-1).view(m, 4 * groups)[:, :k]
    return uint_to_uniform(words) > torch.tensor(p, dtype=torch.float32, device=device)
