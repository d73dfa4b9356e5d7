"""Which strategy and which launch configurations run for a given problem.

Forward strategies (the math is in :mod:`fused_lora.ops`):

``in_loop``
    One kernel: the shrink ``xa = x·Aᵀ`` is a second ``tl.dot`` on the x tiles
    already loaded for the base GEMM; ``s·xa·Bᵀ`` is added to the accumulator
    after the K loop. Recomputes xa once per N tile (+r/BLOCK_N FLOPs) and, with
    dropout, would regenerate the mask once per N tile, so it only runs with
    ``dropout_p == 0``.
``split``
    The skinny pass (dropout + shrink, one read of x, the mask drawn once)
    writes the tiny fp32 ``xa`` (M, r); the GEMM then adds ``s·xa·Bᵀ`` to its
    accumulator.

The backward is always: the dy pass (g, dB and db from one read of dy), the dx
GEMM (the forward kernel with roles swapped, mask regenerated in its
epilogue), the dA pass over x (mask regenerated), and the dW GEMM when the
base is trainable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch

from . import _triton

STRATEGIES = ("in_loop", "split")
#: Ranks up to this use the in-loop shrink when there is no dropout
#: (KERNELS.md: its extra FLOPs are r/BLOCK_N, +6% at r=16, BN=256; the split
#: costs one more read of x, ~5% at N=4096: expected crossover near r=32).
IN_LOOP_MAX_R = 16

_forced_strategy: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_lora_strategy", default=None)


@contextlib.contextmanager
def force_strategy(strategy: str):
    """Run the forward with ``strategy`` inside the block (tests and
    benchmarks use it to cover every path). ``in_loop`` still falls back to
    ``split`` where it cannot run (dropout, or r above one rank tile)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    token = _forced_strategy.set(strategy)
    try:
        yield
    finally:
        _forced_strategy.reset(token)


@dataclass(frozen=True)
class Plan:
    """Everything the Triton backend decides for one (shape, dtype, dropout)."""

    strategy: str
    reason: str
    fwd_gemm: object
    dx_gemm: object
    dw_gemm: object
    skinny: object
    skinny_programs: int
    input_precision: str
    interpreter: bool


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting: exact ("ieee") unless the
    user allowed TF32 (``torch.set_float32_matmul_precision("high")``)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """Compute capability x10 of a CUDA device; 90 (the tuning target) otherwise."""
    if device.type != "cuda":
        return 90
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def plan(m: int, n: int, k: int, r: int, dtype: torch.dtype, dropout_p: float, arch: int = 90) -> Plan:
    """The strategy and configurations for ``x (m, k) · Wᵀ (k, n)`` with rank ``r``
    on a GPU of compute capability ``arch`` (x10)."""
    cfg = _triton.configs()
    interp = _triton.interpreter()
    elt = torch.empty((), dtype=dtype).element_size()
    in_loop_ok = dropout_p == 0.0 and r <= cfg.MAX_BLOCK_R
    forced = _forced_strategy.get()
    if forced is not None:
        strategy = forced if (forced != "in_loop" or in_loop_ok) else "split"
        reason = f"forced {forced!r}" + ("" if strategy == forced else " (cannot run here: split)")
    elif not in_loop_ok:
        strategy = "split"
        reason = ("dropout > 0: the skinny pass draws the mask once instead of once per N tile"
                  if dropout_p > 0.0 else f"r={r} exceeds one rank tile ({cfg.MAX_BLOCK_R})")
    elif r <= IN_LOOP_MAX_R:
        strategy = "in_loop"
        reason = f"no dropout and r={r} <= {IN_LOOP_MAX_R}: the in-loop shrink costs r/BLOCK_N extra FLOPs"
    else:
        strategy = "split"
        reason = f"r={r} > {IN_LOOP_MAX_R}: recomputing xa per N tile would cost more than one read of x"
    return Plan(
        strategy=strategy,
        reason=reason,
        fwd_gemm=cfg.gemm_config(m, n, k, r, elt, strategy == "in_loop", interp, arch=arch),
        dx_gemm=cfg.gemm_config(m, k, n, r, elt, False, interp, epilogue_mask=dropout_p > 0.0, arch=arch),
        dw_gemm=cfg.gemm_config(n, k, m, 1, elt, False, interp, arch=arch),
        skinny=cfg.skinny_config(elt, interp, m),
        skinny_programs=cfg.skinny_target_programs(interp),
        input_precision=input_precision(dtype),
        interpreter=interp,
    )
