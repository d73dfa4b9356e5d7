"""A quantized frozen base: int8 weights, one scale per output feature.

The format (weight-only, symmetric, per output channel, as bitsandbytes'
LLM.int8 rows (``CB``, ``SCB / 127``) and torchao's int8 weight-only)::

    q      (N, K) int8, in [-127, 127]
    scale  (N,)   floating point
    Ŵ      = round(q · scale[:, None])  in the compute dtype (x's), the
             product made in fp32 (fp64 for an fp64 x) and rounded once

``Ŵ`` is the base every backend computes with: the reference makes it whole
(:func:`dequantize_int8`), the Triton GEMMs make it tile by tile as they
load ``q`` (``kernels.gemm.dequantize``; the forward's ``Wᵀ`` tiles scaled
by column, dx's ``W`` tiles by row), so both multiply by the same values
and nothing of size (N, K) is made beyond ``q``. A base of half the bytes
of a 16-bit one (a quarter of fp32's): the memory of QLoRA-style training,
and of serving many adapters from one base.

torchao's int8 weight-only weights (``Int8WeightOnlyConfig``: an
``Int8Tensor`` of per-row ``qdata`` and ``scale``, no zero point, whose
``dequantize()`` is this Ŵ bit for bit) are this format already:
:func:`int8_rows_of` reads them, and the fused layers take them as they are.
"""

from __future__ import annotations

import torch

from ._validate import _is_tensor

#: The int8 values :func:`quantize_int8` uses: symmetric, -128 left out.
QMAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``weight`` (N, K) quantized to int8 per output feature,
    symmetric: ``scale[n] = max_k |W[n, k]| / 127`` (fp32), ``q = round(W /
    scale)`` (to nearest even), so ``|Ŵ - W| <= scale / 2`` elementwise
    (0 for a row of zeros, whose scale is 0). Made in fp32 (fp64 for an
    fp64 weight), on the weight's device, without gradient."""
    _is_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    with torch.no_grad():
        w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weight {tuple(weight.shape)} holds NaN or Inf, which int8 cannot hold")
        absmax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
        scale = absmax / QMAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        return q, scale.to(torch.float32)


def int8_rows_of(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scale)`` of a weight another library holds in this format, or
    None: torchao's ``Int8Tensor`` of weight-only, per-row quantization
    (``Int8WeightOnlyConfig``): ``qdata`` int8 (N, K), ``scale`` (N, 1),
    ``block_size`` [1, K], its zero point absent or 0, no activation
    quantization (``act_quant_kwargs``: ``Int8DynamicActivationInt8Weight``'s
    is another op). ``q`` and ``scale`` are its own tensors (a view of the
    scale as (N,)), not copies. Read by its attributes (torchao is not
    imported); another layout, or another torchao version's class, gives
    None (and the fused layers refuse it as a tensor subclass)."""
    cls = type(weight)
    if cls.__name__ != "Int8Tensor" or not cls.__module__.startswith("torchao"):
        return None
    q, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if not (isinstance(q, torch.Tensor) and type(q) is torch.Tensor and q.dtype == torch.int8 and q.dim() == 2
            and isinstance(scale, torch.Tensor) and type(scale) is torch.Tensor and scale.is_floating_point()
            and scale.numel() == q.shape[0] and scale.device == q.device):
        return None
    if list(getattr(weight, "block_size", ()) or ()) != [1, q.shape[1]]:
        return None
    if any(getattr(weight, name, None) is not None
           for name in ("act_quant_kwargs", "act_quant_scale", "act_quant_zero_point", "act_pre_scale")):
        return None
    zero_point = getattr(weight, "zero_point", None)
    if zero_point is not None and (not isinstance(zero_point, torch.Tensor) or bool(zero_point.any())):
        return None
    return q, scale.reshape(q.shape[0])


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Ŵ = round(q · scale[:, None])`` in ``dtype``, the product made in
    fp32 (fp64 for fp64): the base of :func:`fused_lora.lora_linear`'s
    ``weight_scale`` (see the module's docstring). Differentiable in
    nothing (q is int8; the scale of a frozen base)."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must be a 2-D int8 tensor (out_features, in_features), got {got}")
    _is_tensor("scale", scale)
    if tuple(scale.shape) != q.shape[:1]:
        raise ValueError(f"scale must have shape (out_features={q.shape[0]},) to match q {tuple(q.shape)}, got "
                         f"{tuple(scale.shape)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(compute) * scale.detach().to(compute)[:, None]).to(dtype)
