"""Argument checks for every entry point: typed errors that name the argument
and the shapes, raised before anything is launched."""

from __future__ import annotations

import math
import numbers
import re
import sys

import torch

from .dropout import check_dropout_p, check_seed

BACKENDS = ("auto", "triton", "torch")


def version_tuple(version: str, parts: int = 2) -> tuple[int, ...]:
    """The leading numbers of a package's version: ``"3.6.0+git9a1"`` -> ``(3, 6)``."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:parts])


def _is_tensor(name: str, t, optional: bool = False, quantized: bool = False) -> None:
    """``quantized``: an int8 or uint8 tensor (a quantized weight: int8, or
    packed NF4), else floating point."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if quantized and t.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an int8 tensor (or a uint8 one: packed NF4) with weight_scale (a quantized "
                        f"base), got dtype {t.dtype} (a floating-point weight takes no weight_scale)")
    if not quantized and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got "
                        + ("a nested tensor" if t.is_nested else f"layout {t.layout}"))


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """A flag: True or False (numpy's too, or 1 or 0), not any truthy
    object: ``"no"`` would read as True."""
    numpy = sys.modules.get("numpy")  # (not imported: ``value`` cannot be one of its bools)
    if (isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))
            or (isinstance(value, numbers.Integral) and value in (0, 1))):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_shape(name: str, shape, hint: str = "") -> tuple[int, ...]:
    """A shape given as a sequence of ints >= 0 (``torch.Size``, tuple, list),
    as a tuple; not a tensor (``hint`` says what to pass instead)."""
    if isinstance(shape, torch.Tensor) or isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a shape (a sequence of ints), got {type(shape).__name__}"
                        + (f"; {hint}" if hint else ""))
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
        raise TypeError(f"{name} must be a sequence of ints, got {shape}")
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} must not have negative sizes, got {shape}")
    return tuple(int(d) for d in shape)


def check_combination(name: str, adapters, weights, count: int, where: str = "") -> tuple[tuple[int, float], ...]:
    """Several adapters of ``count`` combined, ``Σ_j weights[j] · ΔW_{adapters[j]}``
    (``MultiLoRALinear.merged_weight``, ``merge_and_unload``,
    ``save_adapter``): ``adapters`` an index, or a sequence of distinct
    indices in ``[0, count)``; ``weights`` None (1 each), or one finite real
    number for each (a number alone for one index). As ``((i, w), ...)``
    in the order given (the order of the sum). ``where`` prefixes the
    errors (``"merge_and_unload: "``)."""
    one = not (hasattr(adapters, "__iter__") and not isinstance(adapters, (str, bytes, torch.Tensor)))
    indices = [check_int(where + name, adapters, 0)] if one else [check_int(f"{where}{name}[{j}]", a, 0)
                                                                 for j, a in enumerate(adapters)]
    if not indices:
        raise ValueError(f"{where}{name} must name at least one adapter, got an empty sequence")
    out_of_range = [i for i in indices if i >= count]
    if out_of_range:
        raise ValueError(f"{where}{name} must be an adapter's index in [0, {count}), got {out_of_range[0]}" if one else
                         f"{where}{name} must hold adapters' indices in [0, {count}), got {out_of_range[0]}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where}{name} names an adapter more than once: {indices}")
    if weights is None:
        weights = [1.0] * len(indices)
    elif isinstance(weights, numbers.Real) and not isinstance(weights, bool) and one:
        weights = [weights]
    elif isinstance(weights, (str, bytes, torch.Tensor)) or not hasattr(weights, "__iter__"):
        raise TypeError(f"{where}weights must be a sequence of numbers, one for each adapter of {name}="
                        f"{indices}, got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) != len(indices):
        raise ValueError(f"{where}weights must hold one number for each adapter of {name}={indices}, got "
                         f"{len(weights)}")
    for j, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{where}weights[{j}] must be a real number, got {type(w).__name__}")
        if not math.isfinite(w):
            raise ValueError(f"{where}weights[{j}] must be finite, got {w}")
    return tuple((i, float(w)) for i, w in zip(indices, weights))


def check_scaling(scaling) -> float:
    if type(scaling) is float and -math.inf < scaling < math.inf:  # (the usual case, without the ABC checks)
        return scaling
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not -math.inf < scaling < math.inf:  # (NaN fails both comparisons; traceable by torch.compile)
        raise ValueError(f"scaling must be finite, got {scaling}")
    return scaling


#: The exact types :func:`_plainly_valid` takes (a layer's weights are Parameters).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _plainly_valid(x, weight, lora_A, lora_B, bias, min_rank: int) -> bool:
    """The usual arguments of a float base, tested at the host's least cost
    (every layer's every call checks them): plain dense tensors of one float
    dtype and one device, of matching shapes. True only where
    :func:`check_lora_args`' own checks of them pass too; False sends a call
    through those checks, which raise the typed errors (or take what is
    unusual but valid)."""
    plain = _PLAIN_TENSORS
    if type(x) not in plain or type(weight) not in plain or type(lora_A) not in plain or type(lora_B) not in plain \
            or (bias is not None and type(bias) not in plain):
        return False
    dtype, device = x.dtype, x.device
    if dtype not in _FLOAT_DTYPES or weight.dtype is not dtype or lora_A.dtype is not dtype \
            or lora_B.dtype is not dtype or (bias is not None and bias.dtype is not dtype):
        return False
    for t in (x, weight, lora_A, lora_B) if bias is None else (x, weight, lora_A, lora_B, bias):
        if t.layout is not torch.strided or t.is_nested:
            return False
    if weight.device != device or lora_A.device != device or lora_B.device != device \
            or (bias is not None and bias.device != device):
        return False
    w_shape, x_shape, a_shape = weight.shape, x.shape, lora_A.shape
    if len(w_shape) != 2 or len(x_shape) < 1 or len(a_shape) != 2:
        return False
    n, k = w_shape
    r = a_shape[0]
    return (x_shape[-1] == k and r >= min_rank and a_shape[1] == k and lora_B.shape == (n, r)
            and (bias is None or bias.shape == (n,)))


def check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, min_rank: int = 1,
                    weight_scale=None):
    """Validate the arguments of ``lora_linear``; returns
    ``(scaling, dropout_p, seed)`` normalised to float, float, int-or-None.
    (``min_rank=0``: an adapter of rank 0 too, one of ``multi_lora_linear``'s
    that leaves the layer alone. ``weight_scale``: an int8 weight's, which
    :func:`check_weight_scale` checks then.)"""
    if weight_scale is None and _plainly_valid(x, weight, lora_A, lora_B, bias, min_rank):
        return check_scaling(scaling), check_dropout_p(dropout_p), None if seed is None else check_seed(seed)
    _is_tensor("x", x)
    if weight_scale is None and isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
        raise TypeError(f"weight is int8 {tuple(weight.shape)}, a quantized base: pass its weight_scale, one "
                        "floating-point value per output feature (fused_lora.quantize_int8 makes both)")
    if weight_scale is None and isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8:
        raise TypeError(f"weight is uint8 {tuple(weight.shape)}, a packed NF4 base: pass its weight_scale, the "
                        "absmax of each group of a row, (out_features, in_features / group) (fused_lora.quantize_nf4 "
                        "makes both)")
    _is_tensor("weight", weight, quantized=weight_scale is not None)
    _is_tensor("lora_A", lora_A)
    _is_tensor("lora_B", lora_B)
    _is_tensor("bias", bias, optional=True)

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if weight.dtype == torch.uint8:  # (packed NF4: two values a byte)
        k *= 2
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in_features={k}) to match weight {tuple(weight.shape)}, "
                         f"got x of shape {tuple(x.shape)}")
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A must be 2-D (r, in_features), got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < min_rank:
        raise ValueError(f"the rank r must be >= {min_rank}, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape (r, in_features={k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape (out_features={n}, r={r}) to match weight "
                         f"{tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape (out_features={n},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")

    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named[1:]:
        if t.dtype != x.dtype and not (t is weight and weight_scale is not None):  # (int8 and its scale)
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all tensors must share one dtype "
                            f"(cast x or the layer, e.g. layer.to({x.dtype}))")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")

    scaling = check_scaling(scaling)
    dropout_p = check_dropout_p(dropout_p)
    if seed is not None:
        seed = check_seed(seed)
    return scaling, dropout_p, seed


def check_weight_scale(x: torch.Tensor, weight: torch.Tensor, weight_scale):
    """``weight_scale`` of ``lora_linear``: None (a floating-point weight), or
    an int8 weight's dequantisation scale: a floating-point tensor
    (out_features,), or a packed NF4 (uint8) weight's absmax: a
    floating-point tensor (out_features, in_features / group), the group a
    power of two >= 2; on x's device, not requiring grad (the quantized base
    is frozen). The other arguments checked already."""
    if weight_scale is None:
        return None
    if weight.dtype == torch.uint8:
        _is_tensor("weight_scale", weight_scale)
        n, k = weight.shape[0], 2 * weight.shape[1]
        groups = weight_scale.shape[1] if weight_scale.dim() == 2 else 0
        group = k // groups if groups else 0
        if (weight_scale.dim() != 2 or weight_scale.shape[0] != n or not groups or group * groups != k
                or group < 2 or group & (group - 1)):
            raise ValueError(f"weight_scale of a packed NF4 weight {tuple(weight.shape)} (in_features={k}) must have "
                             f"shape (out_features={n}, in_features / group), the group a power of two >= 2, got "
                             f"{tuple(weight_scale.shape)}")
        if weight_scale.device != x.device:
            raise ValueError(f"weight_scale is on {weight_scale.device} but x is on {x.device}: all tensors must be "
                             "on one device")
    else:
        _check_per_output_feature("weight_scale", x, weight, weight_scale)
    if weight_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight_scale requires grad, but a quantized base is frozen and no gradient flows to it: "
                         "pass weight_scale.detach()")
    return weight_scale


def check_weight_code(x: torch.Tensor, weight: torch.Tensor, weight_code):
    """``weight_code`` of ``lora_linear``: None (an NF4 weight's code book,
    or no 4-bit weight), or a packed 4-bit (uint8) weight's: the 16 values
    of its indices, a floating-point tensor (16,) on x's device, not
    requiring grad (bitsandbytes' FP4: :data:`fused_lora.quant.FP4_CODE`).
    The other arguments checked already."""
    if weight_code is None:
        return None
    if weight.dtype != torch.uint8:
        raise ValueError(f"weight_code is a packed 4-bit (uint8) weight's code book; weight is {weight.dtype} "
                         f"{tuple(weight.shape)}: pass weight_code=None")
    check_code("weight_code", weight_code)
    _check_on_x_and_frozen("weight_code", weight_code, x, "a quantized base is frozen and ")
    return weight_code


def check_code(name: str, code, device: torch.device | None = None, where: str = "the weight"):
    """A 4-bit base's code book: None (NF4's), or a dense floating-point
    tensor of shape (16,) (on ``device``, ``where``'s, when given)."""
    if code is None:
        return None
    _is_tensor(name, code)
    if tuple(code.shape) != (16,):
        raise ValueError(f"{name} must have shape (16,), the values of a 4-bit weight's indices, got "
                         f"{tuple(code.shape)}")
    if device is not None and code.device != device:
        raise ValueError(f"{name} is on {code.device} but {where} is on {device}")
    return code


def _check_on_x_and_frozen(name: str, t: torch.Tensor, x: torch.Tensor, why: str = "") -> None:
    """``t`` on x's device, and not requiring grad where grad mode is on
    (``why``: what comes before "no gradient flows to it")."""
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but {why}no gradient flows to it: pass {name}.detach()")


def check_row_scale(x: torch.Tensor, row_scale):
    """``row_scale`` of ``lora_linear``: None, or a floating-point tensor of x's
    leading shape (one value per row of x flattened to (M, K)) on x's device,
    not requiring grad (the kernels do not differentiate it)."""
    if row_scale is None:
        return None
    _is_tensor("row_scale", row_scale)
    if tuple(row_scale.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"row_scale must have x's leading shape {tuple(x.shape[:-1])} (one value per row of x), "
                         f"got {tuple(row_scale.shape)} for x of shape {tuple(x.shape)}")
    _check_on_x_and_frozen("row_scale", row_scale, x)
    return row_scale


def check_adapter_ids(x: torch.Tensor, adapter_ids) -> torch.Tensor:
    """``adapter_ids`` of ``multi_lora_linear``: an integer tensor on x's
    device, of x's leading shape (a row each) or, for an x of 3 or more
    dims, ``(x.shape[0],)`` (a sample each); returned of x's leading shape
    (a sample's id expanded over its rows, a view). Its values are checked
    by the caller."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype == torch.bool or adapter_ids.is_floating_point() or adapter_ids.is_complex():
        raise TypeError(f"adapter_ids must be an integer tensor, got dtype {adapter_ids.dtype}")
    lead = tuple(x.shape[:-1])
    shape = tuple(adapter_ids.shape)
    per_sample = x.dim() > 2 and shape == lead[:1]
    if shape != lead and not per_sample:
        raise ValueError(f"adapter_ids must have x's leading shape {lead} (an id per row)"
                         + (f" or ({lead[0]},) (an id per sample)" if x.dim() > 2 else "")
                         + f", got {shape} for x of shape {tuple(x.shape)}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}: all tensors must be on "
                         "one device")
    if per_sample:
        adapter_ids = adapter_ids.view(-1, *(1,) * (len(lead) - 1)).expand(lead)
    return adapter_ids


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_magnitude(x: torch.Tensor, weight: torch.Tensor, magnitude) -> torch.Tensor:
    """``magnitude`` of ``dora_linear``: a floating-point tensor
    (out_features,) of x's dtype, on x's device (the other arguments checked
    already)."""
    _check_per_output_feature("magnitude", x, weight, magnitude)
    if magnitude.dtype != x.dtype:
        raise TypeError(f"magnitude has dtype {magnitude.dtype} but x has {x.dtype}: all tensors must share one "
                        f"dtype (cast magnitude, e.g. magnitude.to({x.dtype}))")
    return magnitude


def _check_per_output_feature(name: str, x: torch.Tensor, weight: torch.Tensor, t) -> None:
    """``t`` a floating-point tensor (out_features,) on x's device."""
    _is_tensor(name, t)
    n = weight.shape[0]
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape (out_features={n},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")
