"""A quantized frozen base: int8 weights with one scale per output feature,
or NF4 weights (QLoRA's 4 bits) with one absmax per block of a row.

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

NF4 (QLoRA's NormalFloat4, bitsandbytes' ``quant_type="nf4"`` layout)::

    packed  (N, K/2) uint8: W's row n, values k and k+1 (k even) in byte
            k/2, k's 4-bit index in the high nibble, k+1's in the low
    absmax  (N, K/G) fp32: the absmax of each block of G consecutive values
            of a row (G, the group, a power of two >= 2 dividing K;
            bitsandbytes' blocksize, 64 by default)
    Ŵ       = round(NF4_CODE[index] · absmax[n, k // G]) in x's dtype, the
             product made in fp32 (fp64 for an fp64 x) and rounded once

which is bitsandbytes' ``dequantize_4bit`` bit for bit. A weight of a
quarter of a 16-bit one's bytes (plus 4 bytes a group for the absmax):
:func:`quantize_nf4` makes one, :func:`nf4_of` reads bitsandbytes'
``Params4bit`` (its double-quantized absmax dequantised once, to fp32).
The GEMMs dequantise NF4 tiles as they load them, as they do int8's.
:func:`base_format` tells the two apart by the weight's dtype (int8, uint8).
"""

from __future__ import annotations

import torch

from ._validate import _is_tensor

#: The int8 values :func:`quantize_int8` uses: symmetric, -128 left out.
QMAX = 127

#: The 16 values of NF4 (NormalFloat4: the quantiles of a normal
#: distribution, scaled to [-1, 1], with an exact 0), as fp32, in the order of
#: their 4-bit index: bitsandbytes' ``get_4bit_type("nf4")``.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: The group :func:`quantize_nf4` uses by default (bitsandbytes' blocksize).
NF4_GROUP = 64


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
    _check_dtype(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(compute) * scale.detach().to(compute)[:, None]).to(dtype)


def base_format(weight: torch.Tensor) -> str:
    """``"int8"`` (an int8 weight), ``"nf4"`` (a uint8 one: packed NF4) or
    ``""`` (floating point): which quantized base a weight is, by its dtype."""
    return {torch.int8: "int8", torch.uint8: "nf4"}.get(weight.dtype, "")


def base_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a 2-D base weight: its shape, but
    for a packed NF4 one (uint8, two values a byte) twice its columns."""
    n, k = weight.shape
    return n, (2 * k if weight.dtype == torch.uint8 else k)


def quantize_nf4(weight: torch.Tensor, group_size: int = NF4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)``: ``weight`` (N, K) quantized to NF4 (the module's
    docstring), ``absmax[n, g] = max |W[n, g·G : (g+1)·G]|`` (fp32), each
    value the NF4 code nearest to ``W / absmax`` (a tie between two codes to
    the larger), as bitsandbytes' ``quantize_4bit(quant_type="nf4",
    blocksize=group_size)`` of a weight whose rows are whole blocks. Made in
    fp32, on the weight's device, without gradient. ``group_size``: a power
    of two >= 2 dividing K."""
    _is_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    group = check_nf4_group("group_size", group_size, k)
    with torch.no_grad():
        w = weight.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weight {tuple(weight.shape)} holds NaN or Inf, which NF4 cannot hold")
        blocks = w.reshape(n, k // group, group)
        absmax = blocks.abs().amax(dim=2)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        normed = (blocks / safe[:, :, None]).reshape(n, k).contiguous()
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
        index = torch.bucketize(normed, (code[1:] + code[:-1]) / 2)  # (a value on a midpoint: the larger code)
        index = index.to(torch.uint8)
        packed = (index[:, 0::2] << 4) | index[:, 1::2]
        return packed.contiguous(), absmax


def check_nf4_group(name: str, group, k: int) -> int:
    """An NF4 group for rows of ``k`` values: a power of two >= 2 dividing
    ``k`` (an int)."""
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"{name} must be an int, got {type(group).__name__}")
    if group < 2 or group & (group - 1) or k % group:
        raise ValueError(f"{name} must be a power of two >= 2 that divides in_features={k}, got {group}")
    return group


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Ŵ = round(NF4_CODE[index] · absmax[n, k // G])`` in ``dtype``
    (N, 2·packed's columns), the product made in fp32 (fp64 for fp64): the
    base of :func:`fused_lora.lora_linear`'s NF4 ``weight`` (see the
    module's docstring)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a 2-D uint8 tensor (out_features, in_features / 2), got {got}")
    _is_tensor("absmax", absmax)
    n, k = base_shape(packed)
    if absmax.dim() != 2 or absmax.shape[0] != n or absmax.shape[1] == 0 or k % absmax.shape[1]:
        raise ValueError(f"absmax must have shape (out_features={n}, in_features / group) to match packed "
                         f"{tuple(packed.shape)} (in_features={k}), got {tuple(absmax.shape)}")
    _check_dtype(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    index = torch.stack((packed >> 4, packed & 15), dim=2).reshape(n, k).long()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device).to(compute)
    scale = absmax.detach().to(compute).repeat_interleave(k // absmax.shape[1], dim=1)
    return (code[index] * scale).to(dtype)


def dequantize_base(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ of a quantized base, int8 (:func:`dequantize_int8`) or NF4
    (:func:`dequantize_nf4`) by the weight's dtype."""
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8:
        return dequantize_nf4(weight, weight_scale, dtype)
    return dequantize_int8(weight, weight_scale, dtype)


def _check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


_nf4_codes: dict = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """:data:`NF4_CODE` as an fp32 (16,) tensor on ``device``, for the
    kernels. Made by fills (no copy from the host, which a CUDA graph's
    capture cannot make) and kept, but not while a graph captures there
    (then it is the graph's own)."""
    code = _nf4_codes.get(device)
    if code is None:
        code = torch.cat([torch.full((1,), v, dtype=torch.float32, device=device) for v in NF4_CODE])
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling():
            _nf4_codes[device] = code
    return code


def nf4_of(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed, absmax)`` of a bitsandbytes ``Params4bit`` weight of
    ``quant_type="nf4"`` (its bytes as (N, K/2) uint8, a view; its absmax as
    (N, K / blocksize) fp32, double quantization undone: bitsandbytes'
    ``dequantize_blockwise`` of it plus its offset), or None: another kind
    of weight, FP4, or a weight whose rows are not whole blocks (bitsandbytes'
    blocks run over the flattened weight). Read by its attributes
    (bitsandbytes is not imported)."""
    cls = type(weight)
    state = getattr(weight, "quant_state", None)
    if cls.__name__ != "Params4bit" or not cls.__module__.startswith("bitsandbytes") or state is None:
        return None
    shape = tuple(getattr(state, "shape", ()) or ())
    group = getattr(state, "blocksize", None)
    if (getattr(state, "quant_type", None) != "nf4" or len(shape) != 2 or not isinstance(group, int)
            or group < 2 or group & (group - 1) or shape[1] % group
            or getattr(state, "packing_format_for_cpu", False)):  # (repacked for its CPU kernels: another layout)
        return None
    n, k = shape
    data = weight.data if isinstance(weight.data, torch.Tensor) else None
    if data is None or not data.is_contiguous() or data.numel() * data.element_size() != n * k // 2:
        return None
    packed = data.view(torch.uint8).reshape(n, k // 2)
    absmax = state.absmax
    if getattr(state, "nested", False):
        inner = state.state2
        codes = inner.code.to(torch.float32)
        blocks = torch.arange(absmax.numel(), device=absmax.device) // inner.blocksize
        absmax = codes[absmax.long()] * inner.absmax.to(torch.float32)[blocks] + state.offset.to(torch.float32)
    absmax = absmax.to(torch.float32).reshape(n, k // group)
    code = getattr(state, "code", None)
    if isinstance(code, torch.Tensor) and not torch.equal(code.detach().float().cpu(),
                                                          torch.tensor(NF4_CODE, dtype=torch.float32)):
        return None
    return packed, absmax
