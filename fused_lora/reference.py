"""The reference LoRA and DoRA linears: plain PyTorch, written to be read.

It is the test oracle (run in float64 it is the ground truth every kernel is
compared with) and the CPU fallback of :func:`fused_lora.lora_linear`
(``backend="torch"``). Its gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_lora_args, check_magnitude, check_row_scale, check_weight_code, check_weight_scale
from .dropout import draw_seed_tensor, dropout_mask
from .quant import dequantize_base


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
    row_scale: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_code: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scaling · (w ⊙ drop(x) Aᵀ) Bᵀ`` (``w``: ``row_scale``, one per row; 1 when None;
    a quantized ``weight`` with its ``weight_scale`` (and a 4-bit one's ``weight_code``): W is
    :func:`fused_lora.quant.dequantize_base` of them).

    Same arguments as :func:`fused_lora.lora_linear` (less ``backend``). With
    ``dropout_p > 0`` the mask is :func:`fused_lora.dropout_mask` for ``seed``
    (drawn by the default generator of x's device when None, exactly as the
    fused op draws it, and kept there: never read back to the host), so fused
    and reference drop the same elements.
    """
    scaling, dropout_p, seed = check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                                               weight_scale=weight_scale)
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    row_scale = check_row_scale(x, row_scale)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed_tensor(x.device)
    return lora_linear_checked(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, row_scale,
                               weight_scale=weight_scale, weight_code=weight_code)


def lora_linear_checked(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed,
                        row_scale=None, adapters=None, weight_scale=None, weight_code=None,
                        adapter_p=None) -> torch.Tensor:
    """:func:`lora_linear` on checked arguments, ``seed`` an int or a 0-d
    integer tensor (such as the fused op's, drawn on the device);
    ``adapters``: None, or ``(adapter_ids, rank_ids, rank_scaling)``, several
    adapters side by side in the rank (:func:`fused_lora.ops.multi_lora_linear`):
    the rank column j of ``xa`` kept, times ``rank_scaling[j]``, on the rows
    whose ``adapter_ids`` is ``rank_ids[j]``, 0 elsewhere (NaN on a row of an
    id below -1), with ``adapter_p`` (n,), their own dropout probabilities
    (row m masked with its adapter's, not at all on a row of no adapter's,
    ``dropout_p`` only saying whether; their ``1 / (1 - p_i)`` is in
    ``rank_scaling``, as :func:`fused_lora.multi_lora_linear` folds it);
    ``weight_scale`` (and ``weight_code``): a quantized weight's, dequantised to x's dtype."""
    if weight_scale is not None:
        weight = dequantize_base(weight, weight_scale, x.dtype, weight_code)
    dropped = x
    if dropout_p > 0.0:
        rows = x.shape[:-1].numel()  # x flattened to (M, K), row-major
        if adapter_p is not None:
            ids = adapters[0].reshape(rows).to(adapter_p.device)
            p = torch.where(ids >= 0, adapter_p[ids.clamp(min=0)], 0.0)
            dropped = x * dropout_mask(seed, (rows, x.shape[-1]), p, device=x.device).view(x.shape)
        else:
            keep = dropout_mask(seed, (rows, x.shape[-1]), dropout_p, device=x.device).view(x.shape)
            dropped = x * keep / (1.0 - dropout_p)
    xa = F.linear(dropped, lora_A)
    if row_scale is not None:
        xa = xa * row_scale.to(xa.dtype).unsqueeze(-1)
    if adapters is not None:  # (a select: a row's NaN or Inf stays out of the other adapters' columns)
        adapter_ids, rank_ids, rank_scaling = adapters
        adapter_ids = adapter_ids.unsqueeze(-1)
        other = torch.where(adapter_ids < -1, torch.nan, 0.0).to(xa)  # (an id below -1: NaN, as the kernels)
        xa = torch.where(adapter_ids == rank_ids.to(adapter_ids.device), xa, other) * rank_scaling.to(xa)
    return F.linear(x, weight, bias) + scaling * F.linear(xa, lora_B)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_code: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA, as PEFT's ``use_dora=True`` computes it (math in
    :mod:`fused_lora.ops`): the adapted weight ``W + s·B·A`` made, its norm
    per output feature taken and detached, ``γ = m / ‖·‖``. Same arguments
    as :func:`fused_lora.dora_linear` (less ``backend``), the same mask
    (:func:`dora_dropped`); a quantized ``weight`` with its ``weight_scale``
    (and ``weight_code``): W is :func:`fused_lora.quant.dequantize_base` of them."""
    scaling, dropout_p, seed = check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                                               weight_scale=weight_scale)
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    magnitude = check_magnitude(x, weight, magnitude)
    if weight_scale is not None:
        weight = dequantize_base(weight, weight_scale, x.dtype, weight_code)
    return dora_linear_checked(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed)


def multi_dora_linear_checked(x, weight, lora_A, lora_B, magnitudes, adapter_ids, bias, scalings,
                              dropout_p: float, seed, row_p=None) -> torch.Tensor:
    """Several adapters on one base, some DoRA, each row through its own
    (:func:`fused_lora.multi_lora_linear` with ``magnitude``, on checked
    arguments): row m of adapter ``i = adapter_ids[m]`` gets adapter i's
    DoRA output (:func:`dora_linear_checked`'s form) where ``magnitudes[i]``
    is a tensor, its LoRA output where it is None, the base where i is -1
    (NaN where i is below -1). ``lora_A``, ``lora_B``: the n adapters'
    own tensors; ``scalings`` their s_i; ``adapter_ids`` of x's leading
    shape. ``row_p`` (x's leading shape): each row's dropout probability
    (its adapter's; 0 on a row of none) where ``dropout_p > 0``, the mask
    :func:`dora_dropped`'s. The base GEMMs run once; each adapter's term on
    every row, kept on its own rows."""
    dropped = dora_dropped(x, dropout_p, seed, row_p) if dropout_p > 0.0 else x
    ids = adapter_ids.unsqueeze(-1)
    delta = torch.where(ids < -1, torch.nan, 0.0).to(x.dtype)
    base_dropped = None
    for i, (a, b, m, s) in enumerate(zip(lora_A, lora_B, magnitudes, scalings)):
        if a.shape[0] == 0:  # (an adapter of rank 0: its rows get the base)
            continue
        term = s * F.linear(F.linear(dropped, a), b)
        if m is not None:
            gamma = m / torch.linalg.vector_norm(weight + s * (b @ a), dim=1).detach()
            if base_dropped is None:
                base_dropped = F.linear(dropped, weight)
            term = (gamma - 1) * base_dropped + gamma * term
        delta = torch.where(ids == i, term, delta)
    return F.linear(x, weight, bias) + delta


def dora_linear_checked(x, weight, lora_A, lora_B, magnitude, bias, scaling: float, dropout_p: float,
                        seed) -> torch.Tensor:
    """:func:`dora_linear` on checked arguments."""
    dropped = dora_dropped(x, dropout_p, seed) if dropout_p > 0.0 else x
    adapted = weight + scaling * (lora_B @ lora_A)
    gamma = magnitude / torch.linalg.vector_norm(adapted, dim=1).detach()
    lora = scaling * F.linear(F.linear(dropped, lora_A), lora_B)
    # PEFT's: the base on x; the correction (γ - 1)·W and the adapter's term on drop(x)
    return F.linear(x, weight, bias) + (gamma - 1) * F.linear(dropped, weight) + gamma * lora


def dora_dropped(x: torch.Tensor, dropout_p: float, seed, row_p: torch.Tensor | None = None) -> torch.Tensor:
    """``drop(x) = x ⊙ keep / (1 - p)`` for DoRA (p > 0), its mask of x's shape:
    for ``seed=None`` drawn by torch's Bernoulli sampler (on a bool tensor,
    whatever x's dtype) from the default generator of x's device, as PEFT's
    ``nn.Dropout`` draws from it (fast on a GPU; ``torch.manual_seed``
    reproduces it, checkpointing restores it); for a seed,
    :func:`fused_lora.dropout_mask` of (seed, (M, K), p), which while
    torch.compile traces is an op (``fused_lora::dora_keep``: inductor,
    fusing the Philox rounds' integer arithmetic over (M, K), took minutes
    and gigabytes to compile them). ``row_p``: a floating-point tensor of
    x's leading shape, each row's own probability in place of ``dropout_p``
    (several adapters: each row its adapter's, 0 on a row of none; with a
    seed, the same random numbers, each row its own threshold)."""
    if seed is None:
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        keep = keep.bernoulli_(1.0 - dropout_p if row_p is None else (1.0 - row_p).unsqueeze(-1).expand(x.shape))
    else:
        compiling = torch.compiler.is_compiling()
        # (traced: the seed made on x's device, as the fused op's: CUDA graphs take no CPU tensor into their graph)
        seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor(
            seed, dtype=torch.int64, device=x.device if compiling else "cpu")
        keep = (torch.ops.fused_lora.dora_keep if compiling else dora_keep)(x.detach(), seed_t, dropout_p, row_p)
    if row_p is None:
        return x * keep / (1.0 - dropout_p)
    return (x * keep / (1.0 - row_p).unsqueeze(-1)).to(x.dtype)  # (in row_p's precision, rounded once)


@torch.library.custom_op("fused_lora::dora_keep", mutates_args=())
def dora_keep(x: torch.Tensor, seed: torch.Tensor, dropout_p: float,
              row_p: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fused_lora.dropout_mask` of (seed, (M, K), p) for x (..., K),
    of x's shape, on its device (``seed`` a 0-d integer tensor; ``row_p``, of
    x's leading shape, each row's own p in place of ``dropout_p``)."""
    rows = x.shape[:-1].numel()
    p = dropout_p if row_p is None else row_p.reshape(rows)
    return dropout_mask(seed, (rows, x.shape[-1]), p, device=x.device).view(x.shape)


@dora_keep.register_fake
def _(x, seed, dropout_p, row_p=None):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)
