"""A quantized frozen base: int8 weights with one scale per output feature,
or 4-bit weights (QLoRA's NF4, or bitsandbytes' FP4) with one absmax per
block of a row.

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
So are bitsandbytes' LLM.int8 weights (``Linear8bitLt``, transformers'
``load_in_8bit``): their rows ``CB`` and ``SCB · (1/127)`` (:func:`bnb_int8_of`).

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

Any other code book of 16 values is the same format with another table:
``Ŵ = round(code[index] · absmax[n, k // G])``, the code an fp32 (16,)
tensor passed beside the absmax (``weight_code``; None: NF4). bitsandbytes'
FP4 (``quant_type="fp4"``, transformers' default ``bnb_4bit_quant_type``)
is :data:`FP4_CODE`: :func:`quantize_fp4` makes one, :func:`bnb_4bit_of`
reads either of bitsandbytes' two. :func:`base_format` tells the formats
apart by the weight's dtype (int8, uint8) and the code.
"""

from __future__ import annotations

import torch

from ._validate import _is_tensor, check_code

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

#: The 16 values of bitsandbytes' FP4 (a sign bit, two of exponent, one of
#: mantissa, scaled to [-1, 1]; index 8, the sign's zero, is +0), as fp32, in
#: the order of their 4-bit index: bitsandbytes' ``get_4bit_type("fp4")``.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)

#: The code books of the 4-bit formats by name (bitsandbytes' ``quant_type``).
FOUR_BIT_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}

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
        # (divided by a tensor on the weight's device: by a Python number, a CUDA division multiplies by
        # the rounded reciprocal, one ulp off max|W| / 127 at times)
        scale = absmax / torch.full((), QMAX, dtype=absmax.dtype, device=absmax.device)
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


def bnb_int8_of(weight, module=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scale)`` of a bitsandbytes ``Int8Params`` weight quantized
    (LLM.int8's rows: ``Linear8bitLt`` with ``has_fp16_weights=False``,
    transformers' ``load_in_8bit``), or None: another kind of weight, one not
    quantized yet (bitsandbytes quantizes it when it is moved to a device),
    or one whose row statistics are nowhere to be found. ``q`` is its ``CB``,
    the int8 (N, K) data itself (a plain tensor over the same bytes);
    ``scale`` its ``SCB · (1/127)`` in fp32, a new (N,) tensor: Ŵ is then
    the base of bitsandbytes' own fine-tuning matmul on CPU and XPU
    (``MatMul8bitFp``: ``CB`` in x's dtype times that scale), bit for bit;
    its ``int8_vectorwise_dequant`` rounds the same product in another order
    (within an fp32 ulp). ``SCB`` is the weight's own until its
    ``Linear8bitLt`` first runs, which moves it to the layer's ``state``:
    ``module``, that layer, is where it is read then. Read by its attributes
    (bitsandbytes is not imported).

    (bitsandbytes' own matmul on a GPU quantizes x too, to int8 per row, its
    outlier columns above ``threshold`` in fp16; the fused layers compute
    ``x · Ŵᵀ`` in x's dtype, the weight-only product, as bitsandbytes' CPU
    path does.)"""
    cls = type(weight)
    if cls.__name__ != "Int8Params" or not cls.__module__.startswith("bitsandbytes"):
        return None
    data = weight.data if isinstance(weight.data, torch.Tensor) else None
    if data is None or data.dtype != torch.int8 or data.dim() != 2 or not data.is_contiguous():
        return None
    if module is not None and int8_tiled(module):
        return None
    scb = getattr(weight, "SCB", None)
    if scb is None and module is not None and getattr(module, "weight", None) is weight:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if not (isinstance(scb, torch.Tensor) and scb.is_floating_point() and scb.numel() == data.shape[0]
            and scb.device == data.device):
        return None
    return data, scb.detach().reshape(data.shape[0]).to(torch.float32) * (1.0 / QMAX)


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


def base_format(weight: torch.Tensor, code: torch.Tensor | None = None) -> str:
    """``"int8"`` (an int8 weight), ``"nf4"`` or ``"fp4"`` (a uint8 one:
    packed 4-bit, by its ``code``, None: NF4; another code book:
    ``"4-bit"``) or ``""`` (floating point): which quantized base a weight
    is."""
    if weight.dtype != torch.uint8:
        return {torch.int8: "int8"}.get(weight.dtype, "")
    return four_bit_format(code)


def four_bit_format(code: torch.Tensor | None) -> str:
    """The name of a 4-bit code book (:data:`FOUR_BIT_CODES`; None: NF4), or
    ``"4-bit"`` for another."""
    if code is None:
        return "nf4"
    values = tuple(code.detach().to("cpu", torch.float32).tolist()) if code.numel() == 16 else ()
    return next((name for name, book in FOUR_BIT_CODES.items() if values == book), "4-bit")


def base_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a 2-D base weight: its shape, but
    for a packed NF4 one (uint8, two values a byte) twice its columns."""
    n, k = weight.shape
    return n, (2 * k if weight.dtype == torch.uint8 else k)


def quantize_nf4(weight: torch.Tensor, group_size: int = NF4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)``: ``weight`` (N, K) quantized to NF4 (the module's
    docstring), ``absmax[n, g] = max |W[n, g·G : (g+1)·G]|`` (fp32), each
    value the NF4 code nearest to ``W · (1 / absmax)`` (in fp32; a tie
    between two codes to the larger), as bitsandbytes' ``quantize_4bit(quant_type="nf4",
    blocksize=group_size)`` of a weight whose rows are whole blocks. Made in
    fp32, on the weight's device, without gradient. ``group_size``: a power
    of two >= 2 dividing K."""
    return quantize_4bit(weight, group_size, NF4_CODE)


def quantize_fp4(weight: torch.Tensor, group_size: int = NF4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)``: ``weight`` (N, K) quantized to bitsandbytes' FP4
    (:data:`FP4_CODE`) as :func:`quantize_nf4` to NF4: each value the FP4
    code nearest to ``W · (1 / absmax)`` (a tie to the larger), the values of
    bitsandbytes' ``quantize_4bit(quant_type="fp4")`` (a value nearest 0 is
    index 0 here, where bitsandbytes' may take 8, also 0). Its base is
    :func:`dequantize_4bit` with :data:`FP4_CODE` (:func:`four_bit_code`)."""
    return quantize_4bit(weight, group_size, FP4_CODE)


def quantize_4bit(weight: torch.Tensor, group_size: int, code: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)`` of ``weight`` in the 4-bit format of the 16
    values ``code`` (:func:`quantize_nf4`, :func:`quantize_fp4`)."""
    _is_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    group = check_nf4_group("group_size", group_size, k)
    with torch.no_grad():
        w = weight.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weight {tuple(weight.shape)} holds NaN or Inf, which a 4-bit base cannot hold")
        blocks = w.reshape(n, k // group, group)
        absmax = blocks.abs().amax(dim=2)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        # (W times 1/absmax, as bitsandbytes' kernels: where W / absmax is a midpoint, the same side of it)
        normed = (blocks * (1.0 / safe)[:, :, None]).reshape(n, k).contiguous()
        values = torch.tensor(code, dtype=torch.float32, device=w.device)
        # (the distinct values in ascending order, each with the first index that holds it: FP4's 0, held at
        # 0 and 8, is index 0; a value on a midpoint: the larger)
        ordered, order = torch.sort(values, stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        ordered, order = ordered[first], order[first]
        index = order[torch.bucketize(normed, (ordered[1:] + ordered[:-1]) / 2)].to(torch.uint8)
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
    return dequantize_4bit(packed, absmax, dtype)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype,
                    code: torch.Tensor | None = None) -> torch.Tensor:
    """``Ŵ = round(code[index] · absmax[n, k // G])`` in ``dtype``, as
    :func:`dequantize_nf4`, with the 16 values of ``code`` (a floating-point
    (16,) tensor: ``weight_code``; None: NF4)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a 2-D uint8 tensor (out_features, in_features / 2), got {got}")
    _is_tensor("absmax", absmax)
    n, k = base_shape(packed)
    if absmax.dim() != 2 or absmax.shape[0] != n or absmax.shape[1] == 0 or k % absmax.shape[1]:
        raise ValueError(f"absmax must have shape (out_features={n}, in_features / group) to match packed "
                         f"{tuple(packed.shape)} (in_features={k}), got {tuple(absmax.shape)}")
    _check_dtype(dtype)
    check_code("code", code, packed.device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    index = torch.stack((packed >> 4, packed & 15), dim=2).reshape(n, k).long()
    table = (torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device) if code is None
             else code.detach().to(torch.float32)).to(compute)
    scale = absmax.detach().to(compute).repeat_interleave(k // absmax.shape[1], dim=1)
    return (table[index] * scale).to(dtype)


def dequantize_base(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype,
                    weight_code: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ of a quantized base, int8 (:func:`dequantize_int8`) or 4-bit
    (:func:`dequantize_4bit`, with ``weight_code``) by the weight's dtype."""
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8:
        return dequantize_4bit(weight, weight_scale, dtype, weight_code)
    return dequantize_int8(weight, weight_scale, dtype)


def _check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


_codes: dict = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """:data:`NF4_CODE` as an fp32 (16,) tensor on ``device``
    (:func:`four_bit_code`)."""
    return four_bit_code(device, NF4_CODE)


def four_bit_code(device: torch.device, values: tuple[float, ...] = NF4_CODE) -> torch.Tensor:
    """A code book (:data:`NF4_CODE`, :data:`FP4_CODE`) as an fp32 (16,)
    tensor on ``device``, for the kernels. Made by fills (no copy from the
    host, which a CUDA graph's capture cannot make) and kept, but not while
    a graph captures there (then it is the graph's own). Not to be written:
    shared by every caller (:func:`fp4_code` makes one of one's own)."""
    device = torch.device(device)
    key = (device, values)
    code = _codes.get(key)
    if code is None:
        code = torch.cat([torch.full((1,), v, dtype=torch.float32, device=device) for v in values])
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling():
            _codes[key] = code
    return code


def fp4_code(device: torch.device) -> torch.Tensor:
    """:data:`FP4_CODE` as a new fp32 (16,) tensor on ``device``: a
    ``weight_code`` of one's own (a layer's buffer, which may be written)."""
    return four_bit_code(device, FP4_CODE).clone()


def int8_tiled(module) -> bool:
    """Whether a bitsandbytes ``Linear8bitLt``'s weight is in the tiled
    layout bitsandbytes before 0.45 turned it into at its first forward on
    a GPU (``state.CxB``, "col_turing" or "col_ampere": its bytes are no
    longer rows), which no version since makes."""
    state = getattr(module, "state", None)
    return getattr(state, "__dict__", {}).get("CxB") is not None  # (not getattr: 0.45+ warns it is deprecated)


def nf4_of(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed, absmax)`` of a bitsandbytes ``Params4bit`` weight of
    ``quant_type="nf4"`` (:func:`bnb_4bit_of`), or None: another kind of
    weight, FP4, or a weight whose rows are not whole blocks."""
    held = bnb_4bit_of(weight)
    return held[:2] if held is not None and held[2] is None else None


def bnb_4bit_of(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(packed, absmax, code)`` of a bitsandbytes ``Params4bit`` weight of
    ``quant_type`` ``"nf4"`` (code None) or ``"fp4"`` (code
    :data:`FP4_CODE`, an fp32 (16,) tensor on its device, a new one), its
    bytes as (N, K/2) uint8 (a view), its absmax as (N, K / blocksize) fp32,
    double quantization undone (bitsandbytes' ``dequantize_blockwise`` of it
    plus its offset); or None: another kind of weight, or a weight whose
    rows are not whole blocks (bitsandbytes' blocks run over the flattened
    weight). Read by its attributes (bitsandbytes is not imported)."""
    cls = type(weight)
    state = getattr(weight, "quant_state", None)
    if cls.__name__ != "Params4bit" or not cls.__module__.startswith("bitsandbytes") or state is None:
        return None
    shape = tuple(getattr(state, "shape", ()) or ())
    group = getattr(state, "blocksize", None)
    quant_type = getattr(state, "quant_type", None)
    if (quant_type not in FOUR_BIT_CODES or len(shape) != 2 or not isinstance(group, int)
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
    values = FOUR_BIT_CODES[quant_type]
    code = getattr(state, "code", None)
    if isinstance(code, torch.Tensor) and not torch.equal(code.detach().float().cpu(),
                                                          torch.tensor(values, dtype=torch.float32)):
        return None
    return packed, absmax, (None if quant_type == "nf4" else fp4_code(packed.device))
