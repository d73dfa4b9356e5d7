"""``LoRALinear``: a drop-in ``nn.Linear`` replacement with a fused LoRA adapter;
``MultiLoRALinear``: one base with several, each row through its own."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

from ._validate import check_backend, check_bool, check_code, check_combination, check_int
from .dropout import check_dropout_p
from .ops import (_autocast_enabled, _unreadable, dora_linear, dora_norm, lora_linear, multi_lora_linear,
                  summed_lora_linear)
from .quant import (NF4_GROUP, base_format, base_shape, bnb_4bit_of, bnb_int8_of, dequantize_base, fp4_code,
                    int8_rows_of, int8_tiled, quantize_fp4, quantize_int8, quantize_nf4)


def check_adapter_dtype(dtype, name: str = "adapter_dtype") -> torch.dtype | None:
    """``adapter_dtype`` (or ``name``): None (the default) or a floating-point torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point torch.dtype or None, got {dtype!r}")
    return dtype


_BASE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: ``adapter_ids`` tensors already checked: tensor -> (its version then, the
#: counts of ids 0 and -1). A model's fused layers take the same tensor in one
#: forward: its values are read (a host sync) by the first alone, and again
#: only once changed in place (inference tensors, which keep no version, every
#: time). :func:`fused_lora.from_peft`'s hooks, which make the ids from names
#: on the host and hand them to no one else, note theirs without a version.
_checked_ids = WeakIdKeyDictionary()


def note_checked_adapter_ids(ids: torch.Tensor, n_on: int, n_off: int, own: bool = False) -> None:
    """Record ``ids`` as checked, holding ``n_on`` zeros and ``n_off`` -1s
    (``own``: made by fused_lora and never changed, whatever its version)."""
    if own or not ids.is_inference():
        _checked_ids[ids] = (None if own else ids._version, n_on, n_off)


def _checked_counts(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(n_on, n_off)`` of ``ids`` if checked as it is now, else None."""
    entry = _checked_ids.get(ids)
    if entry is None or (entry[0] is not None and entry[0] != ids._version):
        return None
    return entry[1:]


#: Per fused layer (in its ``__dict__``): whether its last forward outside
#: a backward had ``adapter_ids``, in eval and in training mode
#: (:func:`_check_recompute`).
_HAD_IDS = "_fused_lora_had_ids"
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _check_recompute(layer: nn.Module, adapter_ids) -> None:
    """Refuse a forward that activation checkpointing recomputes in the
    backward without the ``adapter_ids`` the forward had: the backward run
    after :func:`fused_lora.adapter_ids`'s block, whose ids reach the layers
    only inside it. :class:`LoRALinear` would recompute every row with its
    adapter (gradients silently wrong for the base rows),
    :class:`MultiLoRALinear` could not run. Outside a backward, notes
    whether the forward has ids, for the layer's mode (training or eval): a
    recompute runs in the mode of the forward it repeats, so an evaluation
    (``model.eval()``) in the middle of a step, with or without ids, leaves
    the training step's note alone. (Two forwards of one mode between a
    forward and its backward: the note is the last one's.) Nothing while
    torch.compile traces (its graph holds the ids it traced with)."""
    if _graph_task_id is None or torch.compiler.is_compiling():
        return
    had = layer.__dict__.get(_HAD_IDS)  # [eval, training]
    if had is None:
        had = layer.__dict__[_HAD_IDS] = [False, False]
    if _graph_task_id() == -1:
        had[layer.training] = adapter_ids is not None
    elif adapter_ids is None and had[layer.training]:
        raise ValueError(f"{type(layer).__name__}: recomputed in the backward (activation checkpointing) without the "
                         "adapter_ids its forward had, which `with fused_lora.adapter_ids(model, ids):` hands the "
                         "layers inside the block only: run the backward (loss.backward()) inside the block too")


def _other_kind_of_base(layer: nn.Module, state_dict, prefix: str, error_msgs: list) -> bool:
    """In a fused layer's ``_load_from_state_dict``: whether ``state_dict``'s
    weight is of another kind than the layer's base: int8, NF4 (uint8),
    4-bit of a code book (uint8 with a ``weight_code``: FP4...) or floating
    point (``copy_`` would cast one into the other: floats truncated to
    integers, integers read as values, NF4's bytes as int8 values, FP4's
    indices read as NF4's), the error noted in ``error_msgs``. (Two code
    books load into each other: the layer's ``weight_code`` is loaded.)"""
    weight = state_dict.get(prefix + "weight")
    if not isinstance(weight, torch.Tensor):
        return False
    code = state_dict.get(prefix + "weight_code")
    theirs = base_format(weight, code if isinstance(code, torch.Tensor) else None)
    ours = base_format(layer.weight, layer._buffers.get("weight_code"))
    coded = ("fp4", "4-bit")
    if theirs == ours or (theirs in coded and ours in coded):
        return False
    how = {"int8": "quantize it (fused_lora.quantize_int8) and load it with its weight_scale",
           "nf4": "quantize it (fused_lora.quantize_nf4) and load it with its weight_scale",
           "fp4": "quantize it (fused_lora.quantize_fp4) and load it with its weight_scale and weight_code",
           "4-bit": "load a 4-bit weight with its weight_scale and weight_code",
           "": f"a{'n' if theirs == 'int8' else ''} {theirs} base loads into a layer made with "
               f"quantize_base={True if theirs == 'int8' else repr(theirs)}"}[ours]
    kind = f"{weight.dtype} ({theirs})" if weight.dtype == torch.uint8 else f"{weight.dtype}"
    error_msgs.append(f"{prefix}weight: a {kind} weight for a layer whose base "
                      f"is {ours + ' (quantize_base)' if ours else layer.weight.dtype}: {how}")
    return True


def check_quantize_base(value) -> str:
    """``quantize_base``: False or ``""`` (a floating-point base), True or
    ``"int8"`` (int8, one scale per output feature), ``"nf4"`` or ``"fp4"``
    (4 bits, NF4 or bitsandbytes' FP4, in groups of
    :data:`fused_lora.quant.NF4_GROUP`); returned as ``""``, ``"int8"``,
    ``"nf4"`` or ``"fp4"``."""
    if isinstance(value, str):
        if value not in ("", "int8", "nf4", "fp4"):
            raise ValueError(f"quantize_base must be False, True, 'int8', 'nf4' or 'fp4', got {value!r}")
        return value
    return "int8" if check_bool("quantize_base", value) else ""


def quantize_base_weight(weight: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q, weight_scale, weight_code)`` of a floating-point (out, in)
    weight, ``how`` one of :func:`check_quantize_base`'s ``"int8"``,
    ``"nf4"``, ``"fp4"`` (``weight_code``: FP4's, a new fp32 (16,) tensor;
    else None)."""
    if how in ("nf4", "fp4"):
        k = weight.shape[1]
        if k % 2:
            raise ValueError(f"quantize_base={how!r} packs two values of a row a byte: in_features must be even, got "
                             f"a weight {tuple(weight.shape)}")
        group = NF4_GROUP
        while k % group:  # (the largest power of two up to 64 that divides in_features)
            group //= 2
        if how == "nf4":
            return (*quantize_nf4(weight, group), None)
        return (*quantize_fp4(weight, group), fp4_code(weight.device))
    return (*quantize_int8(weight), None)


def _held_quantized(weight, module: nn.Module | None = None) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(q, weight_scale, weight_code)`` of a weight another library holds
    in a format of ours (torchao's int8 rows, bitsandbytes' int8 rows, NF4
    and FP4), taken as they are (``weight_code``: FP4's, a new tensor; else
    None). ``module``: the layer holding ``weight``, where bitsandbytes'
    ``Linear8bitLt`` keeps its row scales once it has run
    (:func:`fused_lora.quant.bnb_int8_of`)."""
    rows = int8_rows_of(weight)
    if rows is None:
        rows = bnb_int8_of(weight, module)
    return (*rows, None) if rows is not None else bnb_4bit_of(weight)


def base_parameters(module: nn.Module) -> tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]:
    """``module``'s base as :meth:`LoRALinear.from_parameters` and
    :meth:`MultiLoRALinear.around` take it: ``(weight, None, None)``, or,
    for a weight another library holds in a format of ours
    (:func:`_held_quantized`, read with its module), its data as a new
    frozen Parameter over the same bytes, its ``weight_scale`` and
    ``weight_code``."""
    held = _held_quantized(module.weight, module) if isinstance(module, nn.Linear) else None
    if held is None:
        return module.weight, None, None
    return nn.Parameter(held[0], requires_grad=False), held[1], held[2]


def _adapter_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """The floating-point dtype a base's adapters default to: its own, or,
    for bitsandbytes' NF4, the dtype it was quantized from."""
    if weight.is_floating_point():
        return weight.dtype
    state = getattr(weight, "quant_state", None)
    dtype = getattr(state, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _check_not_quantized(layer: nn.Module, what: str) -> None:
    if layer.quantized:
        raise ValueError(f"{type(layer).__name__}.{what}(): the base is "
                         f"{base_format(layer.weight, layer._buffers.get('weight_code'))} "
                         "(quantize_base): it is not initialised again (reset_lora_parameters() resets the adapters)")


def _compute_dtype(x, weight_scale: torch.Tensor) -> torch.dtype:
    """The dtype a quantized base computes in: x's (the scale's where x is not a
    floating-point tensor, which the checks downstream then refuse)."""
    return x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else weight_scale.dtype


def _quantized_base_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A quantized base's bias in the dtype the layer computes in (x's): a
    bias kept in another (bitsandbytes' ``Linear4bit`` keeps fp32 ones
    beside a bf16 compute dtype, and casts them in its forward) is cast."""
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def _base_linear(layer: nn.Module, x, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, layer.bias)``: a fused layer's base alone (its
    adapters off, merged, or no row's), with the fused path's typed errors
    for an x it cannot take, where torch's would be a RuntimeError: the same
    x is refused alike whatever the ids or the layer's state. A quantized
    base (``layer.weight_scale``) computes with Ŵ in x's dtype, as the kernels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != layer.in_features:
        raise ValueError(f"x must have shape (..., in_features={layer.in_features}) to match weight "
                         f"{tuple(weight.shape)}, got x of shape {tuple(x.shape)}")
    scale = layer._buffers.get("weight_scale")  # (nn.Module's __getattr__ costs host time on every call)
    bias = layer.bias
    if scale is not None:
        weight = dequantize_base(weight, scale, _compute_dtype(x, scale), layer._buffers.get("weight_code"))
        bias = _quantized_base_bias(bias, weight.dtype)
    if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}: all tensors must share one dtype "
                        f"(cast x or the layer, e.g. layer.to({x.dtype}))")
    if x.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}: all tensors must be on one device")
    return F.linear(x, weight, bias)


def unfusable_base(weight: torch.Tensor, bias: torch.Tensor | None = None,
                   fan_in_fan_out: bool = False, module: nn.Module | None = None) -> str | None:
    """Why a fused layer cannot take this weight and bias as its base (None
    when it can): the kernels read plain fp16/bf16/fp32 (or, on the torch
    backend, fp64) tensors, int8 bases of one scale per output feature:
    torchao's int8 weight-only weights (:func:`fused_lora.quant.int8_rows_of`)
    and bitsandbytes' LLM.int8 ones (``Int8Params``, their row scales the
    weight's or, once it has run, its ``module``'s:
    :func:`fused_lora.quant.bnb_int8_of`), and 4-bit ones: bitsandbytes'
    ``Params4bit`` of ``quant_type`` "nf4" or "fp4" whose rows are whole
    blocks (:func:`fused_lora.quant.bnb_4bit_of`; all stored (out, in): not
    ``fan_in_fan_out``). Other quantized weights are not: torchao's other
    tensor subclasses (which report a float dtype); nor is a sharded DTensor
    (fuse before sharding)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None or (name == "weight" and not fan_in_fan_out and _held_quantized(t, module) is not None):
            continue
        if is_traceable_wrapper_subclass(t):
            return (f"its {name} is a {type(t).__module__}.{type(t).__name__}, a tensor subclass (a quantized "
                    f"weight, or a sharded DTensor), not a plain tensor")
        state = getattr(t, "quant_state", None)
        if name == "weight" and type(t).__name__ == "Params4bit" and state is not None:
            shape = tuple(getattr(state, "shape", ()) or ())
            if getattr(state, "packing_format_for_cpu", False):
                return ("its weight is a bitsandbytes 4-bit weight repacked for bitsandbytes' CPU kernels "
                        "(packing_format_for_cpu, which its first forward on CPU does): fuse the model before "
                        "running it")
            return (f"its weight is a bitsandbytes 4-bit weight of quant_type {getattr(state, 'quant_type', None)!r}, "
                    f"blocksize {getattr(state, 'blocksize', None)}, shape {shape}: the fused layers read nf4 "
                    "and fp4 whose rows are whole blocks (in_features a multiple of the blocksize), stored (out, in)")
        if name == "weight" and type(t).__name__ == "Int8Params":
            if t.dtype == torch.int8 and fan_in_fan_out:
                return (f"its weight is a bitsandbytes int8 weight {tuple(t.shape)} held (in, out) "
                        "(fan_in_fan_out): the fused layers read int8 rows held (out, in)")
            if t.dtype == torch.int8 and module is not None and int8_tiled(module):
                return ("its weight is a bitsandbytes int8 weight in the tiled layout older bitsandbytes (before "
                        "0.45) turns it into at its first forward on a GPU (state.CxB): its bytes are not rows; "
                        "fuse the model before running it, or update bitsandbytes")
            if t.dtype == torch.int8:
                return (f"its weight is a bitsandbytes int8 weight {tuple(t.shape)} whose row scales (SCB) are "
                        "neither its own nor its Linear8bitLt's (state.SCB) (a weight alone, once its layer has "
                        "run, holds none: fuse the layer, not its weight)")
            if not getattr(t, "has_fp16_weights", True):
                return ("its weight is a bitsandbytes Int8Params not quantized yet (has_fp16_weights=False: "
                        "bitsandbytes quantizes it when it is moved to a device, which would change the fused "
                        "layer's base under it): move the model to its device first")
        if t.dtype not in _BASE_DTYPES:
            return f"its {name} has dtype {t.dtype} (a quantized weight?), not one of {[str(d) for d in _BASE_DTYPES]}"
    return None


#: What the fused layers read, for the messages of those that refuse a base.
SUPPORTED_BASES = ("Fused layers need a plain floating-point base, or an int8 one (quantize_base=True, torchao's "
                   "Int8WeightOnlyConfig, or bitsandbytes' Linear8bitLt), or a 4-bit one (quantize_base='nf4' or "
                   "'fp4', or bitsandbytes' Linear4bit): other quantized bases are not supported yet (PEFT's LoRA "
                   "layers handle torchao and bitsandbytes ones)")


def _check_base(weight, bias, module: nn.Module | None = None) -> None:
    why = unfusable_base(weight, bias, module=module)
    if why:
        raise TypeError(f"the base: {why}. {SUPPORTED_BASES}")


def _check_quantized_base(weight, bias, weight_scale, fan_in_fan_out, weight_code=None) -> None:
    """``from_parameters``' quantized base: an int8 (out, in) weight with its
    floating-point (out,) scale, or a 4-bit (out, in/2) uint8 one with its
    floating-point (out, in/group) absmax, the group a power of two >= 2,
    and its code book (``weight_code``, (16,) floating point; None: NF4);
    on its device, a plain bias; not ``fan_in_fan_out``."""
    if weight_code is not None and (not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint8):
        raise ValueError(f"weight_code is a packed 4-bit (uint8) weight's code book; weight is "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}: pass weight_code=None")
    if weight.dtype not in (torch.int8, torch.uint8) or is_traceable_wrapper_subclass(weight):
        raise TypeError(f"weight must be a plain int8 Parameter (or a uint8 one: packed NF4) with weight_scale (a "
                        f"quantized base), got a {type(weight).__name__} of dtype {weight.dtype}")
    if not isinstance(weight_scale, torch.Tensor) or not weight_scale.is_floating_point() \
            or is_traceable_wrapper_subclass(weight_scale):
        got = weight_scale.dtype if isinstance(weight_scale, torch.Tensor) else type(weight_scale).__name__
        raise TypeError(f"weight_scale must be a plain floating-point tensor or None, got {got}")
    if weight.dtype == torch.uint8:
        k = 2 * weight.shape[1]
        groups = weight_scale.shape[1] if weight_scale.dim() == 2 else 0
        group = k // groups if groups else 0
        if (weight_scale.dim() != 2 or weight_scale.shape[0] != weight.shape[0] or not groups
                or group * groups != k or group < 2 or group & (group - 1)):
            raise ValueError(f"weight_scale must have shape (out_features={weight.shape[0]}, in_features / group) "
                             f"to match the NF4 weight {tuple(weight.shape)} (in_features={k}), the group a power "
                             f"of two >= 2, got {tuple(weight_scale.shape)}")
    elif tuple(weight_scale.shape) != (weight.shape[0],):
        raise ValueError(f"weight_scale must have shape (out_features={weight.shape[0]},) to match the int8 weight "
                         f"{tuple(weight.shape)}, got {tuple(weight_scale.shape)}")
    if weight_scale.device != weight.device:
        raise ValueError(f"weight_scale is on {weight_scale.device} but weight is on {weight.device}")
    if is_traceable_wrapper_subclass(weight_code):
        raise TypeError(f"weight_code must be a plain floating-point tensor or None, got a "
                        f"{type(weight_code).__name__}")
    check_code("weight_code", weight_code, weight.device)
    if check_bool("fan_in_fan_out", fan_in_fan_out):
        raise ValueError("a quantized base is stored (out, in): fan_in_fan_out=True takes no weight_scale")
    why = unfusable_base(None, bias)
    if why:
        raise TypeError(f"the base: {why}")


#: The dtypes a quantized base may compute in (``compute_dtype``).
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _held_compute_dtype(linear: nn.Module) -> torch.dtype | None:
    """The dtype a bitsandbytes ``Linear4bit`` computes in, where it has one
    set (its ``compute_dtype``: transformers' ``bnb_4bit_compute_dtype``);
    None for any other layer (which computes in x's dtype)."""
    if type(getattr(linear, "weight", None)).__name__ != "Params4bit":
        return None
    dtype = getattr(linear, "compute_dtype", None)
    return dtype if dtype in _COMPUTE_DTYPES else None


#: Where a fused layer made from a module whose weight it took as it is
#: (bitsandbytes' 4-bit ``Linear4bit``, torchao's int8 weight-only ``Linear``)
#: keeps that module, out of its submodules (its weight is not the layer's
#: parameter twice): :func:`held_module`.
_HELD_MODULE = "_fused_lora_held_module"


def held_module(layer: nn.Module) -> nn.Module | None:
    """The module a fused layer took its quantized weight from as it is
    (bitsandbytes' ``Linear4bit`` or ``Linear8bitLt``, torchao's int8
    ``Linear``: what :func:`fused_lora.unload` and :func:`fused_lora.to_peft`
    put back; in a model, it has let go of the bytes the layer reads:
    :func:`let_go_of_bytes`), or None (a float base, or one quantized by
    ``quantize_base``)."""
    return layer.__dict__.get(_HELD_MODULE)


#: Where a fused layer whose base ``quantize_base`` quantized from an (in,
#: out) weight (transformers' ``Conv1D``: every quantized base is held (out,
#: in)) notes it, for the plain layer :func:`fused_lora.unload` makes of it
#: with ``dequantize``: :func:`quantized_from_fan_in_fan_out`.
_FROM_FAN_IN_FAN_OUT = "_fused_lora_quantized_from_fan_in_fan_out"


def quantized_from_fan_in_fan_out(layer: nn.Module, value: bool | None = None) -> bool:
    """Whether ``layer``'s quantized base was quantized from an (in, out)
    weight (a ``Conv1D``'s); ``value`` given: note it so."""
    if value is not None:
        layer.__dict__[_FROM_FAN_IN_FAN_OUT] = bool(value)
    return layer.__dict__.get(_FROM_FAN_IN_FAN_OUT, False)


#: Where a quantized module kept aside (:func:`held_module`, or PEFT's base
#: layer under :func:`fused_lora.from_peft`) notes the bytes it let go of
#: (:func:`let_go_of_bytes`): ``(device, [(owner, attribute, shape, dtype)])``.
_LET_GO = "_fused_lora_let_go"


def _byte_holders(module: nn.Module) -> list[tuple[object, str]]:
    """Where a quantized ``module`` (bitsandbytes' ``Linear4bit`` or
    ``Linear8bitLt``, torchao's int8 ``Linear``) keeps its weight's bytes:
    ``(owner, attribute)`` pairs (torchao's ``qdata``; bitsandbytes' data,
    and the 8-bit layer's ``CB``, the weight's before it runs, its state's
    after)."""
    weight = module.weight
    if type(weight).__name__ == "Int8Tensor":
        return [(weight, "qdata")]
    holders = [(weight, "data")]
    if type(weight).__name__ == "Int8Params":
        holders += [(owner, "CB") for owner in (weight, getattr(module, "state", None))
                    if isinstance(getattr(owner, "CB", None), torch.Tensor)]
    return holders


def let_go_of_bytes(module: nn.Module, q: torch.Tensor) -> None:
    """``module``, a quantized module kept aside while a fused layer reads
    its weight's bytes ``q`` (the same storage), lets go of them: each of its
    references to that storage becomes an empty tensor, noted, so that
    nothing keeps the bytes but the fused layer (FSDP2's ``fully_shard``,
    putting shards in the fused layer's place, then frees them).
    :func:`take_back_bytes` puts the fused layer's bytes back. Idempotent;
    nothing for a sharded ``q`` (FSDP's: let go of before it was sharded)."""
    if _LET_GO in module.__dict__ or is_traceable_wrapper_subclass(q):
        return
    storage = q.untyped_storage().data_ptr()
    kept = []
    for owner, attr in _byte_holders(module):
        t = getattr(owner, attr)
        if t.numel() and t.untyped_storage().data_ptr() == storage:
            kept.append((owner, attr, tuple(t.shape), t.dtype))
            if attr == "data":
                owner.data = t.new_empty(0)
            else:
                setattr(owner, attr, t.new_empty(0))
    module.__dict__[_LET_GO] = (q.device, kept)


def bytes_let_go(module: nn.Module) -> tuple[torch.device, int] | None:
    """``(device, size in bytes)`` of the bytes ``module`` let go of
    (:func:`let_go_of_bytes`), or None where it keeps its own."""
    noted = module.__dict__.get(_LET_GO)
    if noted is None:
        return None
    device, kept = noted
    return device, max((math.prod(shape) * dtype.itemsize for _, _, shape, dtype in kept), default=0)


def take_back_bytes(module: nn.Module, q: torch.Tensor) -> None:
    """``module`` given the bytes ``q`` (a fused layer's quantized base now,
    of its weight's size) where it let go of its own (:func:`let_go_of_bytes`),
    in each holder's shape and dtype; nothing where it did not let go, or
    for a sharded ``q`` (FSDP's: whole bytes only; giving the module back is
    refused there, and PEFT's layer, put back for ``save_pretrained``, reads
    its adapters alone)."""
    if is_traceable_wrapper_subclass(q):
        return
    noted = module.__dict__.pop(_LET_GO, None)
    for owner, attr, shape, dtype in (noted[1] if noted is not None else ()):
        value = q.detach().view(dtype).reshape(shape)
        if attr == "data":
            owner.data = value
        else:
            setattr(owner, attr, value)


def take_from_module(layer: nn.Module, linear: nn.Module) -> nn.Module:
    """What a fused layer made around ``linear``'s weight takes from that
    module where it took its weight as it is (bitsandbytes' 4-bit
    ``Linear4bit``, torchao's int8 ``Linear``): the dtype bitsandbytes
    computes in (``compute_dtype``), and the module itself, kept aside
    (:func:`held_module`). Returns ``layer``."""
    layer.compute_dtype = _held_compute_dtype(linear)
    if layer.quantized and _held_quantized(linear.weight, linear) is not None:
        layer.__dict__[_HELD_MODULE] = linear  # (not nn.Module's __setattr__: no submodule)
    return layer


class _QuantizedBase:
    """What the fused layers do alike with a quantized base.

    ``compute_dtype``: None (the default), the layer computes in its
    weight's dtype, or, a quantized base, in x's. Set (a quantized base's
    only: fp16, bf16 or fp32), the layer computes in it: x is cast to it,
    and the output back to x's dtype (the gradient of x too), as
    bitsandbytes' ``Linear4bit`` computes in its ``compute_dtype``, which a
    fused layer made from one takes (QLoRA's recipe,
    ``prepare_model_for_kbit_training``, keeps fp32 activations around bf16
    matmuls). Not saved in the state dict. (bitsandbytes rounds Ŵ to the
    dtype it quantized from, its ``quant_state.dtype``, then casts it to
    ``compute_dtype``; the fused layers round once, to the compute dtype:
    where the two differ, fp32 compute over a bf16 model, the base differs
    by up to 2⁻⁹ relative, far below NF4's own error.)

    ``.to(dtype)`` (``.half()``, ``.bfloat16()``...) casts the adapters and
    a floating-point bias, not a quantized base: its ``weight_scale`` keeps
    its dtype (fp32), so the base's values stay the same (as bitsandbytes'
    and torchao's weights keep their scales), nor its ``weight_code``; a
    device moves them all."""

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.get(name) for name in ("weight_scale", "weight_code")}
        result = super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = self._buffers.get(name)
            if t is not None and moved is not None and moved.dtype != t.dtype:
                self._buffers[name] = t.to(moved.device)  # (as it was, only moved)
        return result

    _compute_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype is not None:
            if dtype not in _COMPUTE_DTYPES:
                raise TypeError(f"compute_dtype must be None or one of {[str(d) for d in _COMPUTE_DTYPES]}, "
                                f"got {dtype!r}")
            if not self.quantized:
                raise ValueError(f"{type(self).__name__}.compute_dtype={dtype}: a floating-point base computes in "
                                 f"its weight's dtype ({self.weight.dtype}); compute_dtype is a quantized base's")
        self._compute_dtype = dtype


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def folded(layer, delta: torch.Tensor) -> torch.Tensor:
    """``layer``'s (floating-point) base weight with ``delta`` (out, in, fp32)
    added, in the weight's layout (``fan_in_fan_out``: (in, out)) and dtype:
    the sum made in fp32 and rounded once (a merge)."""
    return (layer.weight.detach().float() + (delta.t() if layer.fan_in_fan_out else delta)).to(layer.weight.dtype)


class LoRALinear(_QuantizedBase, nn.Module):
    """``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with W and b frozen.

    Parameters ``weight`` (out, in), ``bias`` (out) or None, ``lora_A`` (r, in)
    and ``lora_B`` (out, r), initialised as PEFT does: the base like
    ``nn.Linear``, A kaiming-uniform(a=√5), B zeros (a fresh adapter changes
    nothing). ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    Dropout applies to the LoRA path in ``train()`` mode only.

    ``merge()`` folds ``s·B·A`` into ``weight`` (the forward is then a plain
    linear); ``unmerge()`` restores the original weight bit for bit (the
    original is kept aside while merged, so merging costs one weight of memory).
    ``state_dict()`` always holds the unmerged weight.

    ``fan_in_fan_out=True`` stores ``weight`` as (in, out), as GPT-2's
    ``Conv1D`` does. The adapter may be kept in another dtype than the base
    (e.g. fp32 adapters on a bf16 model, PEFT's default): it is cast to the
    base's dtype for the fused kernel, and its gradients come back in its own.
    Under ``torch.autocast`` everything computes in the autocast dtype.

    ``use_dora=True`` makes it DoRA (PEFT's ``use_dora=True``): a trained
    magnitude per output feature, ``lora_magnitude_vector`` (out,), rescales
    the adapted weight's rows, ``y = x Wᵀ + b + (γ - 1) ⊙ drop(x) Wᵀ + γ ⊙
    s · drop(x) Aᵀ Bᵀ`` with ``γ = m / ‖W + s·B A‖`` (the norm detached;
    :func:`fused_lora.dora_linear`, math in :mod:`fused_lora.ops`). ``m``
    starts as PEFT starts it, the rows' norms ``‖W‖`` (B being 0, a fresh
    adapter changes nothing); ``merge()`` folds ``γ ⊙ (W + s·B A)`` into
    the weight, as PEFT's merge. Its state key, ``lora_magnitude_vector``, is
    PEFT's file key.

    ``from_linear(..., quantize_base=True)`` makes its base int8: ``weight``
    an int8 (out, in) Parameter and the buffer ``weight_scale`` (out,), fp32,
    one scale per output feature (:func:`fused_lora.quantize_int8`), half
    the bytes of a 16-bit base. The forward computes with ``Ŵ = round(weight
    · weight_scale)`` in x's dtype (:func:`fused_lora.dequantize_int8`),
    dequantised tile by tile inside the fused GEMMs (forward and dx); the
    adapter computes in x's dtype too. Such a layer does not merge (folding
    the adapter into int8 would requantize the base) and refuses a
    floating-point ``weight`` in ``load_state_dict``. With ``use_dora`` (QDoRA)
    the magnitude starts as the norms of Ŵ's rows, Ŵ in the magnitude's
    dtype. ``quantize_base="nf4"`` makes it NF4 likewise (QLoRA's base:
    ``weight`` (out, in/2) uint8, two 4-bit values a byte, ``weight_scale``
    (out, in/64) fp32, the absmax of each group of 64 of a row, or of the
    largest power of two that divides ``in``; :func:`fused_lora.quantize_nf4`),
    a quarter of a 16-bit base's bytes; ``quantize_base="fp4"`` makes it
    bitsandbytes' FP4, the same layout with another code book, held as the
    buffer ``weight_code`` (16,), fp32 (:func:`fused_lora.quantize_fp4`; an
    NF4 base has none). A bitsandbytes ``Linear4bit`` of ``quant_type``
    "nf4" or "fp4" is taken as it is (its bytes shared), with its
    ``compute_dtype`` (:class:`_QuantizedBase`: x cast to it and back).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, *, backend: str = "auto",
                 fan_in_fan_out: bool = False, use_dora: bool = False):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 0)
        self.out_features = check_int("out_features", out_features, 0)
        self.r = check_int("r", r, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
        self.alpha = float(alpha)
        self.dropout = check_dropout_p(dropout, "dropout")
        self.use_rslora = check_bool("use_rslora", use_rslora)
        self.backend = check_backend(backend)
        self.fan_in_fan_out = check_bool("fan_in_fan_out", fan_in_fan_out)
        check_adapter_dtype(dtype, "dtype")
        factory = dict(device=device, dtype=dtype)
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if check_bool("bias", bias):
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        if check_bool("use_dora", use_dora):
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_buffer("weight_scale", None)  # (an int8 base's: from_linear(..., quantize_base=True))
        self.register_buffer("weight_code", None)  # (a 4-bit base's code book, other than NF4's: quantize_base="fp4")
        self.reset_parameters()

    # -- construction ---------------------------------------------------------
    def reset_parameters(self) -> None:
        """Base as ``nn.Linear.reset_parameters``; adapter as PEFT (not an int8
        base's: a ValueError; reset_lora_parameters() resets the adapters)."""
        _check_not_quantized(self, "reset_parameters")
        nn.init.kaiming_uniform_(self.base_weight(), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as kaiming-uniform(a=√5), B zeros; DoRA's magnitude the norms of
        the rows of ``W + s·B A`` (of W: B is 0), made in fp32, fp64 for an
        fp64 weight (:func:`fused_lora.ops.dora_norm`; PEFT's, in the
        weight's dtype, may differ in the last bit)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(dora_norm(self._float_base(self.lora_magnitude_vector.dtype),
                                                           self.lora_A, self.lora_B, self.scaling))

    def _float_base(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in): as it is, or, a quantized base, Ŵ in ``dtype``."""
        if self.quantized:
            return dequantize_base(self.weight.detach(), self.weight_scale, dtype, self.weight_code)
        return self.base_weight()

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (it holds a ``lora_magnitude_vector``)."""
        # (every forward asks: nn.Module's __getattr__ for a parameter took 0.7 µs of host time here, this 0.15)
        return self._parameters.get("lora_magnitude_vector") is not None

    @property
    def quantized(self) -> bool:
        """Whether the base is quantized, int8 or NF4 (it holds a ``weight_scale``)."""
        return self._buffers.get("weight_scale") is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, *, backend: str = "auto",
                    adapter_dtype: torch.dtype | None = None, use_dora: bool = False,
                    quantize_base: bool | str = False) -> "LoRALinear":
        """Wrap ``linear``: the new layer's ``weight`` and ``bias`` *are*
        ``linear``'s parameters (no copy; frozen here), the adapter is fresh
        (DoRA's too, with ``use_dora``), on the same device and in the same
        dtype (or ``adapter_dtype``). ``quantize_base``: the weight quantized
        instead, ``True`` or ``"int8"`` to int8 (:func:`fused_lora.quantize_int8`),
        ``"nf4"`` to NF4 (:func:`fused_lora.quantize_nf4`), ``"fp4"`` to FP4
        (:func:`fused_lora.quantize_fp4`): a new Parameter and its
        ``weight_scale`` (and FP4's ``weight_code``); ``linear``'s weight is
        not kept, its bias is shared. A weight that is quantized already,
        torchao's ``Int8WeightOnlyConfig`` (:func:`fused_lora.quant.int8_rows_of`),
        bitsandbytes' ``Linear8bitLt`` (:func:`fused_lora.quant.bnb_int8_of`) or
        nf4 or fp4 ``Linear4bit`` (:func:`fused_lora.quant.bnb_4bit_of`;
        the adapter then in the dtype it was quantized from), is taken as
        it is: its data (shared) and scales, the same base values, and
        bitsandbytes' ``compute_dtype`` (:class:`_QuantizedBase`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        r = check_int("r", r, 1)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        _check_base(linear.weight, linear.bias, linear)
        use_dora, quantize_base = check_bool("use_dora", use_dora), check_quantize_base(quantize_base)
        held = _held_quantized(linear.weight, linear)
        w = linear.weight
        factory = dict(device=w.device, dtype=adapter_dtype or _adapter_dtype_of(w))
        a = nn.Parameter(torch.empty(r, linear.in_features, **factory))
        b = nn.Parameter(torch.empty(linear.out_features, r, **factory))
        m = nn.Parameter(torch.empty(linear.out_features, **factory)) if use_dora else None
        weight, scale, code = linear.weight, None, None
        if held is not None or quantize_base:
            q, scale, code = held if held is not None else quantize_base_weight(linear.weight, quantize_base)
            weight = nn.Parameter(q, requires_grad=False)
        layer = cls.from_parameters(weight, linear.bias, a, b, alpha=alpha, dropout=dropout,
                                    use_rslora=use_rslora, backend=backend, lora_magnitude_vector=m,
                                    weight_scale=scale, weight_code=code)
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.reset_lora_parameters()
        return take_from_module(layer, linear)

    @classmethod
    def from_parameters(cls, weight: nn.Parameter, bias: nn.Parameter | None, lora_A: nn.Parameter,
                        lora_B: nn.Parameter, *, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                        fan_in_fan_out: bool = False, backend: str = "auto",
                        lora_magnitude_vector: nn.Parameter | None = None,
                        weight_scale: torch.Tensor | None = None,
                        weight_code: torch.Tensor | None = None) -> "LoRALinear":
        """A layer whose parameters *are* the given ones (shared, not copied;
        ``requires_grad`` untouched). ``weight`` is (out, in), or (in, out)
        with ``fan_in_fan_out``; ``lora_A`` (r, in); ``lora_B`` (out, r);
        ``lora_magnitude_vector`` (out,), given: a DoRA layer;
        ``weight_scale`` (out,), floating point, given: ``weight`` is an int8
        (out, in) base; (out, in / group) given with a uint8 (out, in / 2)
        ``weight``: a 4-bit base (held as the ``weight_scale`` buffer, not
        copied), NF4, or of the code book ``weight_code`` given ((16,),
        floating point: FP4's :data:`fused_lora.quant.FP4_CODE`...; held as
        the buffer ``weight_code``, not copied)."""
        for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, nn.Parameter) or t.dim() != 2:
                raise TypeError(f"{name} must be a 2-D nn.Parameter, got {type(t).__name__} "
                                f"of shape {tuple(getattr(t, 'shape', ()))}")
        if weight_scale is None:
            if weight_code is not None:
                raise ValueError("weight_code is a 4-bit base's code book: it comes with its weight_scale")
            _check_base(weight, bias)
            held = None if fan_in_fan_out else _held_quantized(weight)
            if held is not None:  # (torchao's int8, bitsandbytes' nf4 and fp4: their data, shared)
                weight, weight_scale, weight_code = nn.Parameter(held[0], requires_grad=False), held[1], held[2]
        else:
            _check_quantized_base(weight, bias, weight_scale, fan_in_fan_out, weight_code)
        fan_in_fan_out = check_bool("fan_in_fan_out", fan_in_fan_out)
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        if weight.dtype == torch.uint8 and weight_scale is not None:  # (NF4: two values a byte)
            in_f *= 2
        r = lora_A.shape[0]
        if tuple(lora_A.shape) != (r, in_f) or tuple(lora_B.shape) != (out_f, r):
            raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a "
                             f"{in_f} -> {out_f} weight of shape {tuple(weight.shape)} "
                             f"(fan_in_fan_out={fan_in_fan_out})")
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        m = lora_magnitude_vector
        if m is not None:
            if not isinstance(m, nn.Parameter):
                raise TypeError(f"lora_magnitude_vector must be an nn.Parameter or None, got {type(m).__name__}")
            if tuple(m.shape) != (out_f,):
                raise ValueError(f"lora_magnitude_vector must have shape ({out_f},) to fit a {in_f} -> {out_f} "
                                 f"weight of shape {tuple(weight.shape)}, got {tuple(m.shape)}")
            if not m.dtype.is_floating_point:
                raise TypeError(f"lora_magnitude_vector must be floating point, got {m.dtype}")
        with torch.device("meta"):
            layer = cls(in_f, out_f, r=r, alpha=alpha, dropout=dropout, bias=bias is not None,
                        use_rslora=use_rslora, dtype=weight.dtype if weight_scale is None else lora_A.dtype,
                        backend=backend, fan_in_fan_out=fan_in_fan_out, use_dora=m is not None)
        layer.weight, layer.bias, layer.lora_A, layer.lora_B = weight, bias, lora_A, lora_B
        if m is not None:
            layer.lora_magnitude_vector = m
        layer.weight_scale = weight_scale
        layer.weight_code = weight_code
        return layer

    # -- the forward ----------------------------------------------------------
    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def base_weight(self) -> torch.Tensor:
        """The weight as (out, in): a transposed view when ``fan_in_fan_out``."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    #: False: the layer computes its base alone (``x Wᵀ + b``, the weight from
    #: before ``merge()`` where merged), as inside
    #: :func:`fused_lora.disable_adapters`. Not saved.
    adapter_enabled: bool = True

    #: True: an aLoRA adapter (PEFT's ``alora_invocation_tokens``; set by
    #: :func:`fused_lora.from_peft`), which runs on each sample's last
    #: ``alora_offsets[b]`` tokens alone (:meth:`forward`). Not saved.
    alora: bool = False

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None,
                alora_offsets=None) -> torch.Tensor:
        """``alora_offsets`` (an :attr:`alora` layer's, PEFT's aLoRA): one
        offset a sample (an int, or None: the invocation not found), the
        adapter's term on the sample's last ``offset`` tokens alone (a row
        scale of 1 there, 0 before: one batch, the fused passes), as PEFT's
        aLoRA layer; None (no offsets) runs the base alone, the adapter's
        gradients 0. A forward that activation checkpointing recomputes in
        the backward without them (PEFT hands them through hooks, gone by
        then) takes the offsets of the layer's last forward of its mode.

        ``adapter_ids`` (optional): an integer tensor of shape ``(x.shape[0],)``,
        an id for each row of a 2-D ``x`` (each sample of a batched one): 0
        runs the adapter on it, -1 the base alone (a batch that mixes adapters,
        as PEFT's ``adapter_names``, which :func:`fused_lora.from_peft`'s layers
        take so; ids 0, 1... will name a layer's several adapters). The whole
        batch runs in the fused passes, the adapter's term scaled by 0 on the
        base rows (``lora_linear``'s ``row_scale``); a merged layer's too, over
        the weight from before merge() (by row group where that weight is
        trainable and grad mode is on: the adapter's rows give the merged
        weight its gradient, as its own forward does). A DoRA layer, whose
        term is not one a row scale can switch off, runs its two row groups
        apart (under torch.compile or a CUDA graph capture: both on the
        whole batch, each row keeping its own; PEFT refuses DoRA with
        ``adapter_names``). Other ids raise a
        ValueError (one host sync to check them, the first time a tensor of
        ids comes: a model's layers take the same one), except while torch.compile
        traces or a CUDA graph captures, where nothing can be checked without
        a sync: there their rows' outputs are NaN (and so, in training, the
        adapter's gradients)."""
        cast = self._compute_dtype  # (a quantized base's compute_dtype, where set: x cast to it and back)
        if cast is not None and isinstance(x, torch.Tensor) and x.dtype != cast and x.is_floating_point():
            return self.forward(x.to(cast), adapter_ids).to(x.dtype)
        _check_recompute(self, adapter_ids)
        if self.alora or alora_offsets is not None:
            if adapter_ids is not None:
                raise ValueError("LoRALinear: adapter_ids with alora_offsets (aLoRA) are not fused together")
            return self._forward_alora(x, alora_offsets)
        if adapter_ids is not None:
            return self._forward_mixed(x, adapter_ids)
        return self._forward(x, self.adapter_enabled)

    def _forward_alora(self, x: torch.Tensor, offsets) -> torch.Tensor:
        """:meth:`forward` of an aLoRA layer (PEFT's ``ALoraLinearVariant``:
        a sample's last ``offsets[b]`` tokens, at most its T, through the
        adapter; T is x's second dim for a 3-D x, else 1)."""
        if not self.alora:
            raise ValueError("LoRALinear: alora_offsets given to a layer that is not aLoRA's (its alora is False)")
        if _graph_task_id is not None and not torch.compiler.is_compiling():
            kept = self.__dict__.setdefault("_fused_lora_alora_offsets", [None, None])  # [eval, training]
            if _graph_task_id() == -1:
                kept[self.training] = offsets
            elif offsets is None:  # (a recompute in the backward, PEFT's hooks gone: the forward's offsets)
                offsets = kept[self.training]
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ValueError(f"LoRALinear (aLoRA): x must be (batch, tokens, in) or (batch, in), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if not self.adapter_enabled:
            return self._forward(x, False)
        batch, tokens = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        if offsets is None:
            row_scale = x.new_zeros(x.shape[:-1], dtype=torch.float32)
        else:
            if len(offsets) != batch:
                raise ValueError(f"alora_offsets must hold one offset a sample ({batch}), got {len(offsets)}")
            last = torch.tensor([0 if o is None else min(int(o), tokens) for o in offsets], device=x.device)
            on = torch.arange(tokens, device=x.device)[None, :] >= (tokens - last)[:, None]
            row_scale = on.to(torch.float32).view(x.shape[:-1])
        return self._forward(x, True, row_scale)

    def _forward_mixed(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype == torch.bool \
                or adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex:
            got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
            raise TypeError(f"adapter_ids must be an integer tensor, got {got}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or tuple(adapter_ids.shape) != (x.shape[0],):
            shape = tuple(x.shape)
            raise ValueError(f"adapter_ids must have shape (x.shape[0],): an id for each row (sample) of an x of 2 "
                             f"or more dims; got adapter_ids {tuple(adapter_ids.shape)} for x {shape}")
        ids = adapter_ids.to(x.device)
        on = ids == 0
        checked = not _unreadable(x)
        if checked:
            counts = _checked_counts(adapter_ids)
            if counts is None:
                counts = tuple(torch.stack([on.sum(), (ids == -1).sum()]).tolist())  # (one sync, not three)
                if sum(counts) != ids.numel():
                    low, high = (v.item() for v in torch.aminmax(ids))
                    raise ValueError(f"adapter_ids must be 0 (the layer's adapter) or -1 (the base alone), the "
                                     f"layer holding one adapter; got ids from {low} to {high}")
                note_checked_adapter_ids(adapter_ids, *counts)
            n_on, n_off = counts
            if n_on == 0:
                return self._forward(x, False)
            if n_off == 0:
                return self._forward(x, self.adapter_enabled)
        if not self.adapter_enabled:
            return self._forward(x, False)
        if self.use_dora and not checked:  # (no boolean indexing: a sync; every row both ways, each keeps its own)
            keep = on.view(-1, *(1,) * (x.dim() - 1))
            y = torch.where(keep, self._forward(x, True), self._forward(x, False))
            return y.masked_fill(~keep & (ids != -1).view_as(keep), math.nan)
        if self.use_dora or (self.merged and torch.is_grad_enabled() and self.weight.requires_grad):
            # (a trainable merged weight takes the gradient of the adapter's rows, as the merged forward
            # gives it: the base rows need the weight from before merge(), so two GEMMs, by row group; DoRA's
            # term has no row scale)
            y_on, y_off = self._forward(x[on], True), self._forward(x[~on], False)
            y = y_on.new_empty((x.shape[0], *y_on.shape[1:]))
            y[on], y[~on] = y_on, y_off.to(y.dtype)
            return y
        row_scale = on.to(torch.float32)
        if not checked:
            row_scale = row_scale.masked_fill(~on & (ids != -1), math.nan)
        return self._forward(x, True, row_scale.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1]))

    def _forward(self, x: torch.Tensor, with_adapter: bool, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x Wᵀ + b`` with the adapter's term or without; ``row_scale``: the
        term scaled by row (a mixed batch). A merged layer computes its merged
        weight alone, or, with a row scale, runs as unmerged over the weight
        from before merge(), the term not differentiated (a merged layer's
        output has no gradient for the adapter, as PEFT's) and without dropout
        (which a merged forward does not draw): one batch, in any mode."""
        weight = self.base_weight()
        scale = self._buffers.get("weight_scale")  # (an int8 base's; as use_dora, without __getattr__'s cost)
        unmerged = self._buffers.get("_unmerged_weight")  # (merged: not None; read once, likewise)
        merged = unmerged is not None
        if merged and (not with_adapter or row_scale is not None):
            weight = unmerged.t() if self.fan_in_fan_out else unmerged
        if not with_adapter or (merged and row_scale is None):
            return _base_linear(self, x, weight)
        lora_A, lora_B = self.lora_A, self.lora_B
        if merged:
            lora_A, lora_B = lora_A.detach(), lora_B.detach()
        # (e.g. fp32 adapters on a bf16 base: compute in the base's dtype; an int8 base's: x's)
        dtype = weight.dtype if scale is None else _compute_dtype(x, scale)
        if lora_A.dtype != dtype:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        bias = self.bias if scale is None else _quantized_base_bias(self.bias, dtype)
        code = self._buffers.get("weight_code")
        if self.use_dora:  # (never with a row scale: _forward_mixed runs DoRA's row groups apart)
            return dora_linear(x, weight, lora_A, lora_B, self.lora_magnitude_vector.to(dtype), bias,
                               scaling=self.scaling, dropout_p=self.dropout if self.training else 0.0,
                               weight_scale=scale, weight_code=code, backend=self.backend)
        return lora_linear(x, weight, lora_A, lora_B, bias, scaling=self.scaling,
                           dropout_p=self.dropout if self.training and not merged else 0.0,
                           row_scale=row_scale, weight_scale=scale, weight_code=code, backend=self.backend)

    # -- merging ----------------------------------------------------------------
    def _delta_fp32(self, weight: float = 1.0) -> torch.Tensor:
        """What ``merge()`` adds to the weight, (out, in), in fp32: ``s·B A``
        (times ``weight``: a weighted merge, :func:`fused_lora.merge_and_unload`'s
        ``weights``); DoRA's ``γ ⊙ (W + s·B A) - W``, ``γ = m / ‖W + s·B A‖``
        (PEFT's merge; no weight)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * (self.scaling * weight)
        if not self.use_dora:
            return delta
        assert weight == 1.0, "a weighted DoRA merge (its magnitude rescales the whole weight) is refused before"
        base = self._float_base(self.lora_magnitude_vector.dtype)  # (an int8 base's Ŵ)
        w = base.detach().float()
        gamma = self.lora_magnitude_vector.detach().float() / dora_norm(base, self.lora_A, self.lora_B, self.scaling)
        return (w + delta).mul_(gamma[:, None]).sub_(w)

    def delta_weight(self) -> torch.Tensor:
        """What ``merge()`` adds to the weight, (out, in), computed in fp32 and
        cast to the weight's dtype: ``s · B · A``; with DoRA, ``γ ⊙ (W + s·B
        A) - W``. (An int8 base, which does not merge: ``s · B · A`` in fp32.)"""
        delta = self._delta_fp32()
        return delta if self.quantized else delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` in place (same Parameter object;
        where other modules share it, tied weights, they change too:
        :func:`fused_lora.merge_and_unload` refuses that)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        if self.alora:
            raise ValueError("LoRALinear.merge(): an aLoRA adapter runs on the tokens after its invocation alone: "
                             "folded into the weight it would run on every token (PEFT's aLoRA does not merge)")
        if self.__dict__.get("_fused_lora_rescaled"):  # (integration.RESCALED)
            raise ValueError("LoRALinear.merge(): inside fused_lora.rescale_adapters the adapter's scale is the "
                             "block's: merging would fold that in, and the weight would keep it after the block")
        if self.quantized:
            raise ValueError(f"LoRALinear.merge(): the base is {base_format(self.weight, self.weight_code)} "
                             "(quantize_base): folding "
                             "the adapter in would "
                             "requantize it, changing the base. Keep the adapter unmerged, or merge it into the "
                             "floating-point model (fused_lora.save_adapter, then load it there)")
        original = self.weight.detach().clone()
        self.weight.copy_(folded(self, self._delta_fp32()))
        self._unmerged_weight = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight from before ``merge()``, bit for bit."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    # -- state_dict: always the unmerged weight ----------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self._unmerged_weight if keep_vars else self._unmerged_weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if _other_kind_of_base(self, state_dict, prefix, error_msgs):
            return
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:.4g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", use_dora=True" if self.use_dora else "")
                + (", alora=True" if self.alora else "")
                + (f", base={base_format(self.weight, self.weight_code)}" if self.quantized else "")
                + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
                + ("" if self.adapter_enabled else ", adapter_enabled=False"))


def _dora_adapters(use_dora, ranks) -> list[int]:
    """The DoRA adapters of :class:`MultiLoRALinear`'s ``use_dora``: a bool
    (True: every adapter of rank above 0), or one bool an adapter (one of
    rank 0, which leaves the layer alone, cannot be: a ValueError)."""
    if isinstance(use_dora, (str, bytes)):
        raise TypeError(f"use_dora must be a bool or a sequence of bools, one per adapter, got {use_dora!r}")
    if not hasattr(use_dora, "__iter__"):
        return [i for i, r in enumerate(ranks) if r and check_bool("use_dora", use_dora)]
    flags = [check_bool(f"use_dora[{i}]", d) for i, d in enumerate(use_dora)]
    if len(flags) != len(ranks):
        raise ValueError(f"use_dora must be one bool for every adapter, or one an adapter ({len(ranks)}), got "
                         f"{len(flags)}")
    zero = [i for i, (d, r) in enumerate(zip(flags, ranks)) if d and not r]
    if zero:
        raise ValueError(f"use_dora[{zero[0]}] is True but adapter {zero[0]} has rank 0 (it leaves the layer alone): "
                         "it has no DoRA magnitude")
    return [i for i, d in enumerate(flags) if d]


class MultiLoRALinear(_QuantizedBase, nn.Module):
    """A frozen ``nn.Linear`` base with several adapters, each row of a batch
    through its own: ``y[m] = x[m] Wᵀ + b + s_i · (dropout(x)[m] A_iᵀ) B_iᵀ``
    with ``i = adapter_ids[m]`` (-1: the base alone), the whole batch in one
    set of fused launches (:func:`fused_lora.multi_lora_linear`). For
    training several adapters at once on one base (each gets the gradients
    of its own rows alone), or serving several from one base.

    Parameters ``weight`` (out, in) and ``bias`` (out) or None, frozen;
    ``lora_A`` and ``lora_B``, :class:`torch.nn.ParameterList` s of each
    adapter's ``A_i`` (r_i, in) and ``B_i`` (out, r_i), initialised as PEFT
    does (A kaiming-uniform(a=√5), B zeros); a rank may be 0, an adapter
    that leaves this layer alone (its rows get the base: several PEFT
    adapters of other target modules in one model,
    :func:`fused_lora.load_adapters`). ``s_i = alpha_i / r_i``
    (``alpha_i / sqrt(r_i)`` with ``use_rslora``). Dropout, in ``train()``
    mode only: ``dropout`` one probability for every adapter, or a sequence
    of one an adapter (each row's x dropped with its adapter's:
    :func:`fused_lora.multi_lora_linear`); ``dropouts`` holds each adapter's. The adapters may be
    kept in another dtype than the base (they are cast to the base's for the
    kernels, gradients coming back in their own), as in :class:`LoRALinear`;
    so may ``fan_in_fan_out=True`` store ``weight`` as (in, out), GPT-2's
    ``Conv1D``. In a model, :func:`fused_lora.inject_multi` places these
    layers and :func:`fused_lora.adapter_ids` hands them the ids; without
    ids every row runs through :attr:`active_adapter`, where set (PEFT's
    active adapter on the layers :func:`fused_lora.from_peft` makes of a
    model holding several).
    ``quantize_base=True`` (``from_linear``, ``around``) makes the base
    int8, as :class:`LoRALinear`'s: many adapters served from one int8 base.
    ``use_dora`` (True for every adapter, or one bool an adapter) makes
    adapters DoRA (PEFT's ``use_dora``): adapter i's magnitude is
    ``lora_magnitude_vector[str(i)]`` (out,), a
    :class:`torch.nn.ParameterDict` of the DoRA adapters alone, starting
    as the norms of the base's rows; its rows get :func:`fused_lora.dora_linear`'s
    output of it (:func:`fused_lora.multi_lora_linear`'s ``magnitude``), a
    batch mixing DoRA and LoRA adapters in one set of fused launches.
    """

    def __init__(self, in_features: int, out_features: int, ranks, alphas=None, dropout=0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, *, backend: str = "auto",
                 fan_in_fan_out: bool = False, use_dora=False):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 0)
        self.out_features = check_int("out_features", out_features, 0)
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
            raise TypeError(f"ranks must be a sequence of ints, one per adapter, got {type(ranks).__name__}")
        ranks = [check_int(f"ranks[{i}]", r, 0) for i, r in enumerate(ranks)]
        if not ranks:
            raise ValueError("ranks must name at least one adapter, got an empty sequence")
        if alphas is None:
            alphas = list(ranks)  # (s_i = 1, PEFT's default alpha = r)
        if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__iter__"):
            raise TypeError(f"alphas must be a sequence of numbers, one per adapter, got {type(alphas).__name__}")
        alphas = list(alphas)
        if len(alphas) != len(ranks):
            raise ValueError(f"alphas must hold one value per adapter ({len(ranks)}), got {len(alphas)}")
        for i, alpha in enumerate(alphas):
            if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
                raise ValueError(f"alphas[{i}] must be a finite real number, got {alpha!r}")
        self.ranks = tuple(ranks)
        self.alphas = tuple(float(a) for a in alphas)
        self.dropout = dropout
        self.use_rslora = check_bool("use_rslora", use_rslora)
        self.backend = check_backend(backend)
        self.fan_in_fan_out = check_bool("fan_in_fan_out", fan_in_fan_out)
        check_adapter_dtype(dtype, "dtype")
        factory = dict(device=device, dtype=dtype)
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if check_bool("bias", bias):
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, in_features, **factory)) for r in ranks)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.empty(out_features, r, **factory)) for r in ranks)
        self.lora_magnitude_vector = nn.ParameterDict({
            str(i): nn.Parameter(torch.empty(out_features, **factory)) for i in _dora_adapters(use_dora, ranks)})
        self.register_buffer("weight_scale", None)  # (an int8 base's: quantize_base=True)
        self.register_buffer("weight_code", None)  # (a 4-bit base's code book, other than NF4's: quantize_base="fp4")
        self.reset_parameters()

    @property
    def use_dora(self) -> tuple[bool, ...]:
        """Whether each adapter is DoRA (it has a ``lora_magnitude_vector[str(i)]``)."""
        held = self._modules["lora_magnitude_vector"]
        return tuple(str(i) in held for i in range(len(self.ranks)))

    def magnitude(self, i: int) -> nn.Parameter | None:
        """Adapter ``i``'s DoRA magnitude (out,), or None: not DoRA."""
        held = self._modules["lora_magnitude_vector"]  # (without nn.Module's __getattr__: every forward asks)
        return held[str(i)] if str(i) in held else None

    def _float_base(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in): as it is, or, a quantized base, Ŵ in ``dtype``."""
        if self.quantized:
            return dequantize_base(self.weight.detach(), self.weight_scale, dtype, self.weight_code)
        return self.base_weight()

    def reset_parameters(self) -> None:
        """Base as ``nn.Linear.reset_parameters``; each adapter as PEFT (not an int8
        base's: a ValueError; reset_lora_parameters() resets the adapters)."""
        _check_not_quantized(self, "reset_parameters")
        nn.init.kaiming_uniform_(self.base_weight(), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Each adapter as PEFT: A kaiming-uniform(a=√5), B zeros; a DoRA
        adapter's magnitude the norms of the base's rows (as
        :meth:`LoRALinear.reset_lora_parameters`)."""
        for a, b in zip(self.lora_A, self.lora_B):
            if a.numel():  # (an adapter of rank 0 has nothing to initialise)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
        with torch.no_grad():
            for key, m in self.lora_magnitude_vector.items():
                i = int(key)
                m.copy_(dora_norm(self._float_base(m.dtype), self.lora_A[i], self.lora_B[i], self.scalings[i]))

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks, alphas=None, dropout=0.0, use_rslora: bool = False, *,
                    backend: str = "auto", adapter_dtype: torch.dtype | None = None,
                    quantize_base: bool | str = False, use_dora=False) -> "MultiLoRALinear":
        """Wrap ``linear``: the new layer's ``weight`` and ``bias`` *are*
        ``linear``'s parameters (no copy; frozen here), the adapters fresh,
        on the same device and in the same dtype (or ``adapter_dtype``);
        ``quantize_base``: the weight quantized instead, int8 or NF4 (as
        :meth:`LoRALinear.from_linear`'s; a weight quantized already, taken
        as it is, likewise)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_base(linear.weight, linear.bias, linear)
        weight, scale, code = base_parameters(linear)
        adapter_dtype = check_adapter_dtype(adapter_dtype) or _adapter_dtype_of(linear.weight)
        layer = cls.around(weight, linear.bias, ranks, alphas, dropout, use_rslora, backend=backend,
                           adapter_dtype=adapter_dtype, quantize_base=quantize_base, weight_scale=scale,
                           weight_code=code, use_dora=use_dora)
        return take_from_module(layer, linear)

    @classmethod
    def around(cls, weight: nn.Parameter, bias: nn.Parameter | None, ranks, alphas=None, dropout=0.0,
               use_rslora: bool = False, *, fan_in_fan_out: bool = False, backend: str = "auto",
               adapter_dtype: torch.dtype | None = None, quantize_base: bool | str = False,
               weight_scale: torch.Tensor | None = None,
               weight_code: torch.Tensor | None = None, use_dora=False) -> "MultiLoRALinear":
        """A layer around this base: its ``weight`` and ``bias`` *are* the
        given parameters (no copy; frozen here), ``weight`` (out, in), or
        (in, out) with ``fan_in_fan_out`` (transformers' ``Conv1D``); the
        adapters fresh, on the weight's device, in its dtype (or
        ``adapter_dtype``). ``quantize_base``: the weight quantized, ``True``
        or ``"int8"`` to int8 (:func:`fused_lora.quantize_int8`), ``"nf4"`` to
        NF4 (:func:`fused_lora.quantize_nf4`), ``"fp4"`` to FP4
        (:func:`fused_lora.quantize_fp4`, with its ``weight_code``), held (out,
        in) whatever its layout, the bias shared. A weight quantized already
        (torchao's int8 weight-only, bitsandbytes' nf4 and fp4, its int8
        rows) is taken as it is. ``weight_scale`` (and ``weight_code``)
        given: ``weight`` is a quantized base already, int8 or packed 4-bit
        (as :meth:`LoRALinear.from_parameters` takes it; ``quantize_base``
        then does nothing)."""
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D nn.Parameter, got {type(weight).__name__} "
                            f"of shape {tuple(getattr(weight, 'shape', ()))}")
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        if weight_scale is None:
            if weight_code is not None:
                raise ValueError("weight_code is a 4-bit base's code book: it comes with its weight_scale")
            _check_base(weight, bias)
        else:
            _check_quantized_base(weight, bias, weight_scale, fan_in_fan_out, weight_code)
        fan_in_fan_out = check_bool("fan_in_fan_out", fan_in_fan_out)
        quantize_base = check_quantize_base(quantize_base)
        held = (weight, weight_scale, weight_code) if weight_scale is not None else \
            None if fan_in_fan_out else _held_quantized(weight)  # (torchao's int8, bitsandbytes': as is)
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        if held is not None:
            in_f, out_f = base_shape(held[0])[::-1]
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        with torch.device("meta"):
            layer = cls(in_f, out_f, ranks, alphas, dropout=dropout, bias=bias is not None, use_rslora=use_rslora,
                        backend=backend, fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)
        layer.weight = weight
        layer.bias = bias
        if quantize_base or held is not None:
            q, layer.weight_scale, layer.weight_code = held if held is not None else quantize_base_weight(
                weight.t() if fan_in_fan_out else weight, quantize_base)
            layer.weight, layer.fan_in_fan_out = nn.Parameter(q, requires_grad=False), False
            quantized_from_fan_in_fan_out(layer, fan_in_fan_out)
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        factory = dict(device=weight.device, dtype=adapter_dtype or _adapter_dtype_of(weight))
        layer.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, in_f, **factory)) for r in layer.ranks)
        layer.lora_B = nn.ParameterList(nn.Parameter(torch.empty(out_f, r, **factory)) for r in layer.ranks)
        layer.lora_magnitude_vector = nn.ParameterDict({
            key: nn.Parameter(torch.empty(out_f, **factory)) for key in layer.lora_magnitude_vector})
        layer.reset_lora_parameters()
        return layer

    @property
    def num_adapters(self) -> int:
        return len(self.ranks)

    @property
    def dropouts(self) -> tuple[float, ...]:
        """Each adapter's dropout probability (in ``train()`` mode)."""
        return self._dropouts

    @property
    def dropout(self):
        """The adapters' dropout probability, a float where they share one,
        else the tuple of each one's (:attr:`dropouts`). Set a float for
        every adapter, or a sequence of one an adapter."""
        return self._dropouts[0] if len(set(self._dropouts)) == 1 else self._dropouts

    @dropout.setter
    def dropout(self, value) -> None:
        n = len(self.ranks)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            self._dropouts = (check_dropout_p(value, "dropout"),) * n
            return
        value = list(value)
        if len(value) != n:
            raise ValueError(f"dropout must be one probability for every adapter, or one an adapter ({n}), got "
                             f"{len(value)}")
        self._dropouts = tuple(check_dropout_p(p, f"dropout[{i}]") for i, p in enumerate(value))

    def set_dropout(self, i: int, p: float) -> None:
        """Adapter ``i``'s dropout probability (the others' kept)."""
        i = self._check_index(i)
        dropouts = list(self._dropouts)
        dropouts[i] = check_dropout_p(p, "p")
        self._dropouts = tuple(dropouts)

    @property
    def quantized(self) -> bool:
        """Whether the base is quantized, int8 or NF4 (it holds a ``weight_scale``)."""
        return self._buffers.get("weight_scale") is not None

    @property
    def scalings(self) -> tuple[float, ...]:
        """Each adapter's ``s_i`` (0 for an adapter of rank 0, which has no term)."""
        return tuple(lora_scaling(r, a, self.use_rslora) if r else 0.0 for r, a in zip(self.ranks, self.alphas))

    def base_weight(self) -> torch.Tensor:
        """The weight as (out, in): a transposed view when ``fan_in_fan_out``."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    #: False: the layer computes its base alone (``x Wᵀ + b``), ids or none,
    #: as inside :func:`fused_lora.disable_adapters`. Not saved.
    adapter_enabled: bool = True

    @property
    def active_adapter(self) -> int | tuple[int, ...] | None:
        """The adapter that every row runs through when ``forward`` is given
        no ``adapter_ids``: an index in ``[0, num_adapters)``, -1 for the base
        alone, a tuple of several indices (their terms summed on every row,
        PEFT's several active adapters: :func:`fused_lora.ops.summed_lora_linear`),
        or None (the default: ids are needed). PEFT's active adapter(s), on
        the layers :func:`fused_lora.from_peft` makes of a model holding
        several (its ``set_adapter`` sets it). Not saved."""
        return self.__dict__.get("_active_adapter")

    @active_adapter.setter
    def active_adapter(self, value) -> None:
        if isinstance(value, (list, tuple)):
            value = tuple(self._check_index(i, f"active_adapter[{k}]") for k, i in enumerate(value))
            if not value or len(set(value)) != len(value):
                raise ValueError(f"active_adapter must name distinct adapters, at least one, got {list(value)}")
            value = value[0] if len(value) == 1 else value
        elif value is not None:
            value = check_int("active_adapter", value, -1)
            if value >= self.num_adapters:
                raise ValueError(f"active_adapter must be -1 (the base alone), None, an adapter's index in [0, "
                                 f"{self.num_adapters}) or a sequence of several, got {value}")
        self.__dict__["_active_adapter"] = value

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``adapter_ids``: an integer tensor, the adapter of each row, of x's
        leading shape (a token each) or ``(x.shape[0],)`` (a sample each, x of
        3 or more dims); i in ``[0, num_adapters)`` runs adapter i, -1 the
        base alone (:func:`fused_lora.multi_lora_linear`, which checks them).
        Ids on another device than x are moved to it. In a model, whose
        forward does not take them, :func:`fused_lora.adapter_ids` hands them
        to its layers. Without ids, every row runs through
        :attr:`active_adapter` (one adapter's fused passes,
        :func:`fused_lora.lora_linear`, as a :class:`LoRALinear` of it); where
        that is None, a ValueError says so."""
        cast = self._compute_dtype  # (a quantized base's compute_dtype, where set: x cast to it and back)
        if cast is not None and isinstance(x, torch.Tensor) and x.dtype != cast and x.is_floating_point():
            return self.forward(x.to(cast), adapter_ids).to(x.dtype)
        _check_recompute(self, adapter_ids)
        if not self.adapter_enabled:
            return _base_linear(self, x, self.base_weight())
        if adapter_ids is None:
            return self._forward_active(x)
        if isinstance(adapter_ids, torch.Tensor) and isinstance(x, torch.Tensor) and adapter_ids.device != x.device:
            adapter_ids = adapter_ids.to(x.device)
        weight, scale = self.base_weight(), self._buffers.get("weight_scale")
        lora_A, lora_B = list(self.lora_A), list(self.lora_B)
        dtype = weight.dtype if scale is None else _compute_dtype(x, scale)  # (an int8 base's: x's)
        if any(a.dtype != dtype for a in lora_A + lora_B):  # (e.g. fp32 adapters on a bf16 base)
            lora_A = [a.to(dtype) for a in lora_A]
            lora_B = [b.to(dtype) for b in lora_B]
        bias = self.bias if scale is None else _quantized_base_bias(self.bias, dtype)
        magnitude = None
        if self._modules["lora_magnitude_vector"]:
            magnitude = [None if m is None else m.to(dtype) for m in map(self.magnitude, range(len(self.ranks)))]
        return multi_lora_linear(x, weight, lora_A, lora_B, adapter_ids, bias, scaling=list(self.scalings),
                                 dropout_p=list(self._dropouts) if self.training else 0.0, weight_scale=scale,
                                 weight_code=self._buffers.get("weight_code"), magnitude=magnitude,
                                 backend=self.backend)

    def _forward_active(self, x: torch.Tensor) -> torch.Tensor:
        """Every row through :attr:`active_adapter` (-1, or a rank of 0: the base alone)."""
        i = self.active_adapter
        if i is None:
            raise ValueError(f"MultiLoRALinear ({self.num_adapters} adapters) needs adapter_ids, the adapter of each "
                             f"row (-1: the base alone): pass them, run the model inside "
                             f"`with fused_lora.adapter_ids(model, ids):`, or set the layer's active_adapter")
        weight, scale, code = self.base_weight(), self._buffers.get("weight_scale"), self._buffers.get("weight_code")
        summed = [j for j in (i if isinstance(i, tuple) else (i,)) if j != -1 and self.ranks[j]]
        if not summed:
            return _base_linear(self, x, weight)
        dtype = weight.dtype if scale is None else _compute_dtype(x, scale)  # (an int8 base's: x's)
        lora_A = [a if a.dtype == dtype else a.to(dtype) for a in (self.lora_A[j] for j in summed)]
        lora_B = [b if b.dtype == dtype else b.to(dtype) for b in (self.lora_B[j] for j in summed)]
        bias = self.bias if scale is None else _quantized_base_bias(self.bias, dtype)
        if len(summed) > 1:
            return self._forward_summed(x, summed, lora_A, lora_B, weight, bias)
        i, m, p = summed[0], self.magnitude(summed[0]), self._dropouts[summed[0]] if self.training else 0.0
        if m is not None:
            return dora_linear(x, weight, lora_A[0], lora_B[0], m.to(dtype), bias, scaling=self.scalings[i],
                               dropout_p=p, weight_scale=scale, weight_code=code, backend=self.backend)
        return lora_linear(x, weight, lora_A[0], lora_B[0], bias, scaling=self.scalings[i], dropout_p=p,
                           weight_scale=scale, weight_code=code, backend=self.backend)

    def _forward_summed(self, x, summed, lora_A, lora_B, weight, bias) -> torch.Tensor:
        """Every row through the adapters ``summed`` (of ranks above 0), their
        terms summed, as PEFT's layer runs several active adapters: one set of
        fused launches (:func:`fused_lora.ops.summed_lora_linear`); in train
        mode with dropout, PEFT's own computation (each adapter its own mask,
        ``nn.Dropout``'s, drawn in PEFT's order: a mask shared by the adapters
        would not be theirs). DoRA adapters, whose outputs PEFT sums whole,
        are refused."""
        dora = [j for j in summed if self.magnitude(j) is not None]
        if dora:
            raise ValueError(f"MultiLoRALinear: active adapters {list(summed)} include adapter {dora[0]}, which is "
                             "DoRA: its output (magnitude-scaled) is not a term the fused layer sums with others; make "
                             "one adapter active (or one a row: adapter_ids)")
        scalings = [self.scalings[j] for j in summed]
        if self.training and any(self._dropouts[j] for j in summed):
            y = _base_linear(self, x, weight)
            for j, a, b, s in zip(summed, lora_A, lora_B, scalings):
                y = y + F.linear(F.linear(F.dropout(x, self._dropouts[j], True), a), b) * s
            return y
        return summed_lora_linear(x, weight, lora_A, lora_B, bias, scaling=scalings,
                                  weight_scale=self._buffers.get("weight_scale"),
                                  weight_code=self._buffers.get("weight_code"), backend=self.backend)

    def _check_index(self, i: int, name: str = "i") -> int:
        i = check_int(name, i, 0)
        if i >= self.num_adapters:
            raise ValueError(f"{name} must be an adapter's index in [0, {self.num_adapters}), got {i}")
        return i

    def delta_weight(self, i, weights=None) -> torch.Tensor:
        """Adapter ``i``'s ``s_i · B_i · A_i`` (out, in), computed in fp32 and
        cast to the weight's dtype (to merge it into a copy of the base; an
        int8 base's: fp32); a DoRA adapter's ``γ_i ⊙ (W + s_i·B_i A_i) - W``
        (as :meth:`LoRALinear.delta_weight`). ``i`` a sequence of indices:
        their weighted sum, ``Σ_j weights[j] · s_{i_j} · B_{i_j} · A_{i_j}``
        (``weights``: one number each; None, 1 each), summed in fp32 in the
        order given and rounded once: several adapters combined into one
        (not DoRA adapters, whose magnitude rescales the whole weight: a
        ValueError)."""
        delta = self._delta_fp32(check_combination("i", i, weights, self.num_adapters))
        return delta if self.quantized else delta.to(self.weight.dtype)

    def _delta_fp32(self, combination) -> torch.Tensor:
        """``Σ w · s_i · B_i A_i`` in fp32 over ``combination``'s ``(i, w)``
        (:func:`~fused_lora._validate.check_combination`), or adapter
        ``combination``'s alone (an int); a DoRA adapter alone, unweighted:
        ``γ_i ⊙ (W + s_i·B_i A_i) - W``."""
        if isinstance(combination, int):
            combination = ((combination, 1.0),)
        dora = [i for i, _ in combination if self.magnitude(i) is not None]
        if dora and (len(combination) > 1 or combination[0][1] != 1.0):
            raise ValueError(f"adapter {dora[0]} is DoRA: its magnitude rescales the whole weight, so it is not "
                             "combined with others or weighted; fold it in alone, unweighted")
        if dora:
            i, m = dora[0], self.magnitude(dora[0]).detach()
            base = self._float_base(m.dtype)
            w = base.detach().float()
            delta = (self.lora_B[i].detach().float() @ self.lora_A[i].detach().float()) * self.scalings[i]
            gamma = m.float() / dora_norm(base, self.lora_A[i], self.lora_B[i], self.scalings[i])
            return (w + delta).mul_(gamma[:, None]).sub_(w)
        delta = None
        for i, w in combination:
            term = (self.lora_B[i].detach().float() @ self.lora_A[i].detach().float()) * (w * self.scalings[i])
            delta = term if delta is None else delta.add_(term)
        return delta

    def merged_weight(self, i, weights=None) -> torch.Tensor:
        """The base weight with adapter ``i`` folded in, ``W + s_i · B_i ·
        A_i``, in the weight's layout and dtype, computed in fp32 and rounded
        once (as :meth:`LoRALinear.merge`); the layer is left as it is (a
        batch of several adapters has no one merged weight):
        :func:`fused_lora.merge_and_unload` with ``adapter=i`` puts it in
        a plain layer. ``i`` a sequence: their weighted sum folded in
        (:meth:`delta_weight`). (Not on an int8 base, which would be
        requantized: a ValueError.)"""
        combination = check_combination("i", i, weights, self.num_adapters)
        if self.quantized:
            raise ValueError("MultiLoRALinear.merged_weight(): the base is "
                             f"{base_format(self.weight, self.weight_code)} "
                             "(quantize_base): folding an adapter "
                             "in would requantize it; merge into the floating-point model instead")
        return folded(self, self._delta_fp32(combination))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={list(self.ranks)}, "
                f"alphas=[{', '.join(f'{a:g}' for a in self.alphas)}], dropout="
                + (f"{self.dropout:g}" if len(set(self._dropouts)) == 1 else
                   f"[{', '.join(f'{p:g}' for p in self._dropouts)}]")
                + f", bias={self.bias is not None}, use_rslora={self.use_rslora}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (f", base={base_format(self.weight, self.weight_code)}" if self.quantized else "")
                + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
                + (f", use_dora={list(self.use_dora)}" if self.lora_magnitude_vector else "")
                + (f", active_adapter={self.active_adapter}" if self.active_adapter is not None else ""))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not _other_kind_of_base(self, state_dict, prefix, error_msgs):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
