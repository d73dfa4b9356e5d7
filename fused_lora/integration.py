"""Fused LoRA in real models: model-wide injection, PEFT interop, and PEFT's
adapter file format.

* :func:`inject` swaps matching linear layers of any ``nn.Module`` for
  :class:`~fused_lora.LoRALinear` and, on a model not fused yet, freezes
  everything else; :func:`inject_multi` for
  :class:`~fused_lora.MultiLoRALinear` (several adapters a layer, each row
  through its own), whose ids :func:`adapter_ids` hands to the layers.
* :func:`from_peft` converts the LoRA layers of a PEFT model in place into
  fused layers that *share* PEFT's parameter tensors (an optimizer built
  before the swap keeps working); :func:`to_peft` goes back.
* :func:`save_adapter` / :func:`load_adapter` write and read PEFT's format
  (``adapter_model.safetensors`` + ``adapter_config.json``), so
  ``peft.PeftModel.from_pretrained`` loads what this package saves and vice
  versa, modules trained whole beside the adapters (``modules_to_save``)
  and trained biases (PEFT's ``bias="lora_only"``/``"all"``) included; under
  FSDP1 and FSDP2 on every rank.
* :func:`merge_and_unload` folds the adapters into the base weights and puts
  plain linears back (the model to deploy; one adapter of inject_multi's,
  or a weighted sum of several, which :func:`save_adapter` also writes as
  one adapter); :func:`unload` drops them.
* :func:`guard_fast_paths` keeps torch's transformer fast paths from
  bypassing fused layers (the functions above that place them call it);
  :func:`uncalled_layers` finds, with one forward, fused layers a model
  never calls (it reads their weights instead).

Target selection follows PEFT: a string is a regular expression that must
match the whole module name; a list matches a name exactly or as a
``.``-separated suffix; ``"all-linear"`` is every linear layer except the
output layer and those no adapter can reach (below).

Two of torch's modules read their linear children's weights instead of
calling them, which would leave an adapter there without effect, silently
(PEFT's too):

* ``nn.MultiheadAttention`` never calls its ``out_proj``
  (``F.multi_head_attention_forward`` reads ``out_proj.weight`` and
  ``.bias``): no fused layer goes there (:func:`inject` refuses it when named
  and leaves it out of ``"all-linear"``, :func:`load_adapter` refuses it,
  :func:`from_peft` reports it).
* ``nn.TransformerEncoderLayer``'s inference fast path (eval mode, no
  gradient needed for its input or weights) runs one native op on the weights of
  ``linear1``, ``linear2`` and ``self_attn.out_proj``, and
  ``nn.TransformerEncoder``'s converts a padded batch to a nested tensor for
  it. :func:`guard_fast_paths` turns both off where fused layers sit inside
  them (the functions here that place fused layers call it).

Other models do the same on some code path (transformers' Mamba mixers,
WavLM's attention, BLOOM with ``pretraining_tp > 1``...): :func:`inject` and
:func:`load_adapter` warn of each layer whose parent's code uses
``self.<layer>.weight`` as a tensor (:func:`_weight_use`), quoting the line,
and :func:`uncalled_layers` tells, with one forward, which fused layers a
model never calls.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import numbers
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._validate import check_bool, check_combination, check_int, version_tuple
from .layer import (SUPPORTED_BASES, LoRALinear, MultiLoRALinear, _held_compute_dtype, _held_quantized,
                    base_parameters, bytes_let_go, check_adapter_dtype, check_quantize_base, folded, held_module,
                    let_go_of_bytes, lora_scaling, note_checked_adapter_ids, quantize_base_weight,
                    quantized_from_fan_in_fan_out, take_back_bytes, take_from_module, unfusable_base)
from .quant import base_format, dequantize_base

#: The fused layers: one adapter (:func:`inject`), or several (:func:`inject_multi`).
FUSED_KINDS = (LoRALinear, MultiLoRALinear)

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
#: DoRA's magnitude in PEFT's files (``<path>.lora_magnitude_vector``; ``.weight`` after it also read).
_MAGNITUDE_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(\.weight)?$")


# ----------------------------------------------------------------------------
# Finding layers
# ----------------------------------------------------------------------------

def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _is_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers (``nn.Linear``, transformers' ``Conv1D``,
    and layers already fused)."""
    return [n for n, m in model.named_modules() if n and (_is_linear_like(m) or isinstance(m, FUSED_KINDS))]


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(arg: str, targets):
    if targets is None:
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"{arg}={targets!r} is not a valid regular expression: {err}") from None
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in targets):
        return list(targets)
    raise TypeError(f"{arg} must be a string (regex or 'all-linear') or a list of module names, got {targets!r}")


def _output_layer(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _check_model(model, arg: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _never_called(model: nn.Module, name: str) -> str | None:
    """Why the layer ``name`` of ``model`` is never called by its parent, so that
    an adapter on it would have no effect (None when it is called)."""
    parent, child = _parent_and_child(model, name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention never calls its out_proj (it reads out_proj.weight and .bias), "
                "so an adapter there would have no effect")
    return None


#: ``self.<layer>.weight`` used as a tensor in a module's code: not where
#: only its dtype, device or shape is read, in an ``isinstance`` test, an
#: assignment (tying) or an initialisation through ``.data``.
_WEIGHT_USE = (r"(?<![\w.])self\.{child}\.weight\b"
               r"(?!\s*\.\s*(?:dtype|device|shape|size|ndim|dim|numel|is_\w+|requires_grad|data|data_ptr|"
               r"element_size|nbytes|itemsize|layout|_\w+)\b)(?!\s*=[^=])(?!\s*(?:is|in|==|!=)\b)")
#: Names of methods whose reads of a weight are not a forward's: construction,
#: initialisation (``_init_weights``, ``init_mamba_weights``...), tying.
_NOT_FORWARD = re.compile(r"(?:^|_)(?:init|initiali[sz]e|reset|tie)(?:_|$)")


@functools.lru_cache(maxsize=None)
def _weight_use(cls: type, child: str) -> str | None:
    """Where the code of ``cls`` (its own and its bases', torch's left out:
    see :func:`_never_called` and :func:`guard_fast_paths`) uses
    ``self.<child>.weight`` as a tensor outside construction, as
    ``"Class.method: `line`"``; None where it does not, or where the source
    cannot be read."""
    pattern = re.compile(_WEIGHT_USE.format(child=re.escape(child)))
    for klass in cls.__mro__:
        if klass.__module__.partition(".")[0] in ("torch", "builtins"):
            continue
        try:
            source = inspect.getsource(klass)
        except Exception:  # (built in, defined in a REPL or made at run time, its file changed: a best effort)
            continue
        for m in pattern.finditer(source):
            if re.search(r"\bisinstance\(\s*$", source[:m.start()]):
                continue
            defs = re.findall(r"^\s*(?:async\s+)?def\s+(\w+)", source[:m.start()], re.M)
            method = defs[-1] if defs else "<class body>"
            if _NOT_FORWARD.search(method):
                continue
            line = source[source.rfind("\n", 0, m.start()) + 1:source.find("\n", m.end())].strip()
            return f"{klass.__qualname__}.{method}: `{line if len(line) <= 80 else line[:77] + '...'}`"
    return None


def _warn_weight_readers(model: nn.Module, names, what: str, stacklevel: int = 3) -> None:
    """Warn where a layer's parent module reads the layer's weight instead of
    calling it, on some code path (found in its source by :func:`_weight_use`;
    transformers' Mamba mixers multiply by ``dt_proj.weight`` on every path
    and hand ``x_proj``'s and ``out_proj``'s to their fused CUDA kernel in
    training, WavLM's attention hands ``q_proj``'s ... to
    ``F.multi_head_attention_forward``, BLOOM's with ``pretraining_tp > 1``
    slices ``dense``'s): a fused layer there is bypassed on that path, its
    adapter without effect and without gradient, silently. Only a warning:
    the path may be one the model never takes."""
    found = {}
    for name in names:
        parent, child = _parent_and_child(model, name)
        where = _weight_use(type(parent), child)
        if where:
            found[name] = where
    if found:
        warnings.warn(f"{what}: the modules holding these layers read the layer's weight instead of calling it, on "
                      "some code path, where the adapter would have no effect and get no gradient: "
                      + "; ".join(f"{n} ({w})" for n, w in found.items())
                      + ". Check with fused_lora.integration.uncalled_layers(model, batch) on the device you train "
                      "on; leave them out (exclude_modules) where they are bypassed", stacklevel=stacklevel)


#: FSDP1's wrapper, as (defining module, class).
_FSDP1 = ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
#: Modules that wrap a whole model (or a block) under one attribute, as
#: (defining module, class, attribute). A layer's name in PEFT's format, and
#: the one targets match, leaves that attribute out: the layers of
#: ``torch.compile(model)`` are ``model``'s. (Looked up in ``sys.modules``: a
#: class whose module was never imported has no instances to find.)
_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),  # torch.compile
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper",
     "_checkpoint_wrapped_module"),  # checkpoint_wrapper, offload_wrapper
    (*_FSDP1, "_fsdp_wrapped_module"),
)
#: Of those, the ones that take their model's parameters when they are built:
#: a parameter added inside them later is not theirs (DDP would not average
#: its gradient over the ranks: each rank would train its own adapter).
_BUILT_ON_PARAMETERS = ("DistributedDataParallel", "FullyShardedDataParallel")


def _wrapper(module: nn.Module) -> tuple[str, str] | None:
    """``(class name, attribute)`` where ``module`` is one of :data:`_WRAPPERS`, else None."""
    for where, cls_name, attr in _WRAPPERS:
        cls = getattr(sys.modules.get(where), cls_name, None)
        if cls is not None and isinstance(module, cls):
            return cls_name, attr
    return None


def _public_names(model: nn.Module) -> dict[str, str]:
    """Each name of ``model.named_modules()`` -> the module's name without the
    wrappers' attributes (:data:`_WRAPPERS`): the name PEFT's format and the
    targets use. A wrapper and what it wraps share one public name."""
    modules, public = {}, {}
    for name, module in model.named_modules():
        modules[name] = module
        if not name:
            public[name] = ""
            continue
        parent_name, _, child = name.rpartition(".")
        parent_public = public[parent_name]
        wrapper = _wrapper(modules[parent_name])
        if wrapper is not None and child == wrapper[1]:
            public[name] = parent_public
        else:
            public[name] = f"{parent_public}.{child}" if parent_public else child
    return public


def _model_names(public: dict[str, str]) -> dict[str, str]:
    """Public name -> the name in the model, from :func:`_public_names`'s
    map (the innermost module where a wrapper and what it wraps share one)."""
    return {pub: name for name, pub in public.items()}


def _check_can_add_parameters(model: nn.Module, names, what: str) -> None:
    """A fused layer brings new parameters (the adapters) and takes over the
    linear's: refused where a wrapper built on the old ones would not see them
    (DDP, FSDP1) and where FSDP1 or FSDP2 sharded the linear."""
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            wrapper = _wrapper(model.get_submodule(".".join(parts[:i])))
            if wrapper is not None and wrapper[0] in _BUILT_ON_PARAMETERS:
                raise ValueError(f"{what}: {name} is inside a {wrapper[0]}, which took the model's parameters when "
                                 "it was built and would not see the adapters (their gradients would not be "
                                 f"averaged over the ranks): {what} on the model first, then wrap it")
    _check_not_sharded(model, names, what)
    _check_not_dispatched(model, names, what)
    why = _peft_owned(model)
    if why:
        raise ValueError(f"{what}: the model is {why}. PEFT's own methods (save_pretrained, disable_adapter, merging) "
                         f"would not see fused layers added to it, and {what} would freeze PEFT's adapters: add "
                         f"{names[0] if len(names) == 1 else 'these layers'} to PEFT's LoraConfig (then from_peft), or "
                         "fuse the model without PEFT")


def _is_peft_model(model: nn.Module) -> bool:
    peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    return peft_model is not None and isinstance(model, peft_model)


def _peft_owned(model: nn.Module) -> str | None:
    """What makes ``model`` PEFT's (None where nothing does): a
    ``peft.PeftModel``, a model :func:`from_peft` converted, PEFT's layers or
    layers :func:`from_peft` converted inside (the model inside a
    ``PeftModel``), or transformers' own PEFT integration
    (``model.add_adapter`` / ``model.load_adapter``)."""
    if _is_peft_model(model):
        return "a peft.PeftModel"
    if isinstance(getattr(model, _ORIGINALS, None), dict):
        return "converted from PEFT by from_peft"
    if getattr(model, "_hf_peft_config_loaded", False):
        return "holding transformers' PEFT adapters (model.add_adapter / model.load_adapter)"
    kinds = _peft_adapter_kinds() + (LoRALinear, MultiLoRALinear)
    owned = {"PEFT's layers": [], "layers from_peft converted": []}
    for n, m in model.named_modules():
        if isinstance(m, kinds):
            if not isinstance(m, (LoRALinear, MultiLoRALinear)):
                owned["PEFT's layers"].append(n)
            elif getattr(m, _FROM_PEFT, False):
                owned["layers from_peft converted"].append(n)
    for what, names in owned.items():
        if names:
            return f"holding {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    return None


def _calls_its_layers(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: from torch 2.5 on,
    nn.TransformerEncoderLayer takes its inference fast path, which reads its
    linears' weights instead of calling them, only where no module inside it
    has hooks."""
    return None


#: On a module :func:`guard_fast_paths` changed: its attributes' values from
#: before, which :func:`unload` puts back once no fused layer is inside.
_GUARDED = "_fused_lora_unguarded"


def guard_fast_paths(model: nn.Module) -> list[str]:
    """Turn off torch's inference fast paths that would bypass the fused layers
    of ``model``, and return the names of the modules changed.

    In eval mode, unless a gradient is needed for its input or its weights,
    an ``nn.TransformerEncoderLayer`` runs one native op on the weights of
    ``linear1``, ``linear2`` and ``self_attn.out_proj`` without calling them:
    fused layers there would be skipped, their adapters without effect. Each
    encoder layer holding a fused layer gets a forward pre-hook that does
    nothing (from torch 2.5 on, the fast path is off where hooks are
    attached) and its ``activation_relu_or_gelu`` flag cleared (read only by
    that path's checks, and by torch 2.4's too; ``activation`` is the
    function the layer calls); each ``nn.TransformerEncoder`` holding one
    stops converting padded batches to nested tensors for that path
    (``use_nested_tensor = False``, as ``enable_nested_tensor=False`` would
    have made it). Either of the layer's two guards turns its fast path off;
    both, so that one that a torch version drops leaves the other. Idempotent;
    :func:`inject`, :func:`from_peft` and :func:`load_adapter` call it, and
    :func:`unload` / :func:`merge_and_unload` undo it. Call it yourself after
    placing a :class:`~fused_lora.LoRALinear` in such a module by hand. (The
    guard stays after :func:`to_peft`: PEFT's layers there are bypassed the
    same way.)
    """
    _check_model(model)
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, FUSED_KINDS) for m in module.modules()):
            continue
        before = getattr(module, _GUARDED, None) or {}
        if isinstance(module, nn.TransformerEncoderLayer):
            hooked = _calls_its_layers in module._forward_pre_hooks.values()
            if not hooked:
                module.register_forward_pre_hook(_calls_its_layers)
            flag = getattr(module, "activation_relu_or_gelu", 0)
            if not hooked or flag:
                before.setdefault("activation_relu_or_gelu", flag)
                module.activation_relu_or_gelu = 0
                changed.append(name)
        elif getattr(module, "use_nested_tensor", False):
            before.setdefault("use_nested_tensor", True)
            module.use_nested_tensor = False
            changed.append(name)
        if before:
            setattr(module, _GUARDED, before)
    return changed


def _unguard_fast_paths(model: nn.Module) -> None:
    """Undo :func:`guard_fast_paths` where no fused layer is left inside."""
    for module in model.modules():
        before = getattr(module, _GUARDED, None)
        if before is None or any(isinstance(m, FUSED_KINDS) for m in module.modules()):
            continue
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _calls_its_layers]:
            del module._forward_pre_hooks[key]
        for attr, value in before.items():
            setattr(module, attr, value)
        delattr(module, _GUARDED)


#: On a transformers model loaded quantized that holds fused layers: its
#: ``is_quantized`` as loaded (True), which :func:`_tell_transformers` gives
#: back once no fused layer is left inside.
_QUANTIZED_AS_LOADED = "_fused_lora_quantized_as_loaded"


def _tell_transformers(model: nn.Module) -> None:
    """Tell each transformers model inside ``model`` (``model`` too) that was
    loaded quantized (``from_pretrained(..., quantization_config=...)``:
    ``is_quantized``) whether fused layers, adapters over its quantized
    bases, are in it. transformers' ``Trainer`` refuses to train "purely
    quantized models" (``validate_quantization_for_training``, which tells
    that adapters are on one by its being a ``peft.PeftModel`` alone): such
    a model reads ``is_quantized`` False while it holds fused layers, its
    value as loaded kept aside and given back once none is left (after
    :func:`unload`, :func:`to_peft`...). Nothing else changes: its
    ``hf_quantizer`` and ``config.quantization_config`` stay (its
    ``save_pretrained`` still writes the quantized base; the ``Trainer``'s
    checkpoints hold the fused layers' state, which resumes bit for bit).
    :func:`inject`, :func:`inject_multi`, :func:`from_peft`,
    :func:`load_adapter` and :func:`load_adapters` call it, as do
    :func:`unload`, :func:`merge_and_unload` and :func:`to_peft`."""
    for owner in model.modules():
        held = owner.__dict__.get(_QUANTIZED_AS_LOADED, False)
        if not held and not (getattr(owner, "hf_quantizer", None) is not None
                             and getattr(owner, "is_quantized", False) is True):
            continue
        fused = any(isinstance(m, FUSED_KINDS) for m in owner.modules())
        if fused and not held:
            owner.__dict__[_QUANTIZED_AS_LOADED] = True
            owner.is_quantized = False
        elif not fused and held:
            del owner.__dict__[_QUANTIZED_AS_LOADED]
            owner.is_quantized = True


def uncalled_layers(model: nn.Module, *args, **kwargs) -> list[str]:
    """The fused layers of ``model`` that one forward, ``model(*args,
    **kwargs)``, never calls: their adapters have no effect there. Some
    modules read their linears' weights instead of calling them (transformers'
    WavLM attention passes ``q_proj.weight`` ... to
    ``F.multi_head_attention_forward``; torch's own two cases are handled,
    see :func:`guard_fast_paths`), and nothing short of a forward shows it:
    run this once on a batch after :func:`inject` on an unfamiliar model. The
    forward runs under ``torch.no_grad()`` in the model's current mode."""
    layers = all_fused_layers(_check_model(model))
    called = set()
    handles = [layer.register_forward_pre_hook(lambda module, inputs: called.add(id(module)))
               for layer in {id(layer): layer for layer in layers.values()}.values()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name, layer in layers.items() if id(layer) not in called]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _parent_and_child(model, name)
    setattr(parent, child, module)


#: A module's forward and backward hooks, by attribute.
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _hand_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move the forward and backward hooks registered on ``old`` to ``new``:
    the same dicts where ``new`` has none (so the handles held for them still
    remove them), ``old`` left without."""
    if old is new:
        return
    if getattr(old, "_backward_hooks", None):
        new._is_full_backward_hook = old._is_full_backward_hook
    for attr in _HOOKS:
        hooks = getattr(old, attr, None)
        if not hooks:  # (none, or handed already: a module reachable under two names)
            continue
        if getattr(new, attr):
            getattr(new, attr).update(hooks)
        else:
            setattr(new, attr, hooks)
        setattr(old, attr, type(hooks)())


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in the place of the one named ``name``, which hands it
    its hooks: a hook registered on ``q_proj`` stays on ``q_proj`` (plain or
    fused), seeing its input and whole output."""
    _hand_hooks(model.get_submodule(name), module)
    _set_submodule(model, name, module)


def _dispatched(model: nn.Module, name: str) -> bool:
    """``name`` carries an accelerate hook (a ``device_map`` or offload
    dispatch, which replaces its forward), or has its weight offloaded (on the
    meta device under an accelerate hook higher up)."""
    module = model.get_submodule(name)
    if hasattr(module, "_hf_hook"):
        return True
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type != "meta":
        return False
    parts = name.split(".")
    return any(hasattr(model.get_submodule(".".join(parts[:i])), "_hf_hook") for i in range(len(parts)))


def _check_not_dispatched(model: nn.Module, names, what: str) -> None:
    dispatched = [n for n in names if _dispatched(model, n)]
    if dispatched:
        raise ValueError(f"{what}: {dispatched} are dispatched by accelerate (a device_map with offloading, or "
                         "hooks on the layers themselves), which moves their weights at each call and would not "
                         f"move the layers that replace them: {what} on the model before dispatching it "
                         "(accelerate's dispatch_model / cpu_offload), or load it without offloading")


def _is_sharded(t) -> bool:
    """``t`` is a DTensor (FSDP2's sharded parameters)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def _fsdp1_flattened(t) -> bool:
    """``t`` is held by FSDP1 (``FullyShardedDataParallel``): a
    ``FlatParameter``, or (``use_orig_params=True``) an original parameter
    whose data, outside forward, is this rank's flat piece of it (1-D,
    maybe empty), not the tensor."""
    return bool(getattr(t, "_fsdp_flattened", False))


def _fsdp1_class():
    return getattr(sys.modules.get(_FSDP1[0]), _FSDP1[1], None)


def _check_not_sharded(model: nn.Module, names, what: str) -> None:
    """Fused layers are made from unsharded linears: FSDP2 (``fully_shard``)
    swaps the Parameters a module owns, and FSDP1 flattens them into its
    own; a fused layer made afterwards would not own them. DTensor
    parameters outside FSDP2 are tensor parallelism's, whose styles
    (``ColwiseParallel``...) take ``nn.Linear`` alone: not fused layers."""
    fsdp2 = _fsdp2_class()
    dtensors = [n for n in names if any(_is_sharded(p) for p in model.get_submodule(n).parameters())]
    parallel = [n for n in dtensors if fsdp2 is None or not any(isinstance(m, fsdp2) for m in _owners(model, n))]
    if parallel:
        raise ValueError(f"{what}: {parallel} hold DTensor parameters that no FSDP2 module (fully_shard) of the "
                         "model holds: tensor parallelism (parallelize_module), whose styles take nn.Linear layers "
                         "only, is not supported by fused layers (and a model for FSDP2 is fused before sharding, "
                         "from its root)")
    flattened = [n for n in names if any(_fsdp1_flattened(p) for p in model.get_submodule(n).parameters())]
    for sharded, by in ((dtensors, "FSDP2 (fully_shard)"), (flattened, "FSDP1 (FullyShardedDataParallel)")):
        if sharded:
            raise ValueError(f"{what}: {sharded} are sharded by {by}: fuse the layers first (inject, from_peft or "
                             "load_adapter), then shard the model")


def _owners(model: nn.Module, name: str) -> list[nn.Module]:
    """``model``, then each module on the way down to the one named ``name``, that one last."""
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]


def _fsdp2_class():
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def _check_can_replace(model: nn.Module, names, what: str) -> None:
    """Putting other modules in place of fused layers (:func:`unload`,
    :func:`merge_and_unload`, :func:`to_peft`) is refused where FSDP holds the
    layers: FSDP1 and FSDP2 know each parameter by the module that owns it
    (FSDP1's flat parameters are views into those modules; FSDP2 sets
    each module's gathered weights before its forward), so a module put in
    place of a layer would run on the shards, or on stale copies. Nothing
    changes."""
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    public = _public_names(model)
    held = collections.defaultdict(list)
    for name in names:
        owners = _owners(model, name)
        params = list(owners[-1].parameters())
        if (fsdp1 is not None and any(isinstance(m, fsdp1) for m in owners)) or any(map(_fsdp1_flattened, params)):
            held["FSDP1 (FullyShardedDataParallel)"].append(public[name])
        elif (fsdp2 is not None and any(isinstance(m, fsdp2) for m in owners)) or any(map(_is_sharded, params)):
            held["FSDP2 (fully_shard)"].append(public[name])
    if held:
        raise ValueError(f"{what}: " + "; ".join(f"{sorted(n)} are sharded by {by}" for by, n in held.items())
                         + f", which knows each parameter by the module that holds it: after {what} the model would "
                         "run on the shards. Save the adapters (save_adapter, on every rank) and load them into the "
                         f"model unsharded (load_adapter), then {what} there")


def _fsdp1_units(model: nn.Module, tensors, what: str) -> dict[int, nn.Module]:
    """``id(tensor) -> the innermost FSDP1 unit of model that holds it``, for
    every tensor of ``model`` FSDP1 holds. Raises ValueError where FSDP1
    holds some of ``tensors`` (``(name, tensor)`` pairs) from outside
    ``model``, which cannot gather them."""
    fsdp1, units = _fsdp1_class(), {}
    for module in model.modules():  # (an outer unit before the inner ones, which then take their tensors)
        if isinstance(module, fsdp1):
            units.update((id(p), module) for p in module.parameters())
    outside = [n for n, t in tensors if _fsdp1_flattened(t) and id(t) not in units]
    if outside:
        raise ValueError(f"{what}: {outside[:4]}{'...' if len(outside) > 4 else ''} are sharded by a "
                         "FullyShardedDataParallel (FSDP1) that wraps the model from outside, so they cannot be "
                         f"gathered from it: call {what} with the FullyShardedDataParallel model, on every rank")
    return units


@contextlib.contextmanager
def _fsdp1_full_params(model: nn.Module, what: str):
    """Inside the block, the parameters FSDP1 (``FullyShardedDataParallel``)
    holds in ``model`` are whole, on every rank, and what changes in them
    goes back to each rank's shard on exit: ``summon_full_params`` on each
    outermost FSDP1 module of ``model`` (a collective: every rank calls
    ``what``; the whole model at once, as :func:`load_adapter` checks
    everything before it changes anything). Raises ValueError, before
    anything is gathered, where FSDP1 wraps ``model`` from outside
    (:func:`_fsdp1_units`)."""
    if not any(_fsdp1_flattened(p) for p in model.parameters()):
        yield
        return
    _fsdp1_units(model, list(model.named_parameters()), what)
    fsdp1 = _fsdp1_class()
    roots: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, fsdp1) and not any(not r or name.startswith(r + ".") for r in roots):
            roots[name] = module
    with contextlib.ExitStack() as stack:
        for root in roots.values():
            stack.enter_context(fsdp1.summon_full_params(root, writeback=True))
        yield


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a full ``value``, where ``target`` may be a
    DTensor shard (FSDP2): each rank keeps its own part."""
    value = value.to(target.dtype)
    if _is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value)


def _fused_layer_for(module: nn.Module, r, alpha, dropout, use_rslora, adapter_dtype, backend,
                     use_dora: bool = False, quantize_base: str = "") -> LoRALinear:
    """A fused layer sharing ``module``'s weight and bias, in its train/eval
    mode (``quantize_base``: ``"int8"``, ``"nf4"`` or ``"fp4"``, the weight
    quantized, the bias shared)."""
    if isinstance(module, nn.Linear):
        layer = LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                       backend=backend, adapter_dtype=adapter_dtype, use_dora=use_dora,
                                       quantize_base=quantize_base)
        return layer.train(module.training)
    # transformers' Conv1D: weight (in, out), y = x @ W + b
    w = module.weight
    in_f, out_f = w.shape
    dt = adapter_dtype or w.dtype
    a = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=dt))
    b = nn.Parameter(torch.empty(out_f, r, device=w.device, dtype=dt))
    m = nn.Parameter(torch.empty(out_f, device=w.device, dtype=dt)) if use_dora else None
    weight, scale, code = module.weight, None, None
    if quantize_base:  # ((out, in), as every quantized base: no fan_in_fan_out)
        q, scale, code = quantize_base_weight(module.weight.t(), quantize_base)
        weight = nn.Parameter(q, requires_grad=False)
    layer = LoRALinear.from_parameters(weight, module.bias, a, b, alpha=alpha, dropout=dropout,
                                       use_rslora=use_rslora, fan_in_fan_out=not quantize_base, backend=backend,
                                       lora_magnitude_vector=m, weight_scale=scale, weight_code=code)
    quantized_from_fan_in_fan_out(layer, bool(quantize_base))
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    layer.reset_lora_parameters()
    return layer.train(module.training)


def inject(model: nn.Module, target_modules, r: int = 8, alpha: float = 8, dropout: float = 0.0,
           use_rslora: bool = False, exclude_modules=None, *, adapter_dtype: torch.dtype | None = None,
           backend: str = "auto", use_dora: bool = False, quantize_base: bool | str = False) -> list[str]:
    """Replace the matching linear layers of ``model`` with :class:`LoRALinear`
    in place, sharing their weights. A model without fused layers is frozen
    first, but for the new adapters; on a model fused already (a second call,
    e.g. another rank for the MLP) the parameters there keep their
    ``requires_grad``, the earlier adapters training on.

    Args:
        target_modules: a regex (full match), a list of names or name
            suffixes (``["q_proj", "v_proj"]``), or ``"all-linear"``: every
            linear layer but the output layer and those their parent never
            calls (``nn.MultiheadAttention``'s ``out_proj``; a warning names
            them).
        exclude_modules: the same forms; matching layers are left alone.
        adapter_dtype: dtype of the new adapter parameters (default: the base's).
        use_dora: DoRA layers (PEFT's ``use_dora=True``; :class:`LoRALinear`).
        quantize_base: each matching layer's base weight quantized, ``True``
            or ``"int8"`` to int8 (:func:`fused_lora.quantize_int8`), half the
            memory of a 16-bit base, ``"nf4"`` to NF4 (QLoRA's 4 bits:
            :func:`fused_lora.quantize_nf4`), a quarter, ``"fp4"`` to
            bitsandbytes' FP4 (:func:`fused_lora.quantize_fp4`)
            (``LoRALinear.from_linear``'s ``quantize_base``), the float
            weight let go (with ``use_dora``, QDoRA). A model loaded in 4 bits
            by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``,
            ``bnb_4bit_quant_type`` "nf4" or "fp4", its default) or in 8
            (``load_in_8bit=True``: LLM.int8's rows), or by torchao's int8
            weight-only config, needs no ``quantize_base``: its
            ``Linear4bit`` / ``Linear8bitLt`` / ``Linear`` layers are fused
            as they are, over their bytes (transformers' ``Trainer`` then
            trains it: :func:`_tell_transformers`). Such layers do not merge
            (:func:`merge_and_unload` folds them in floating point with
            ``dequantize``); :func:`unload` and :func:`to_peft` give those
            modules back.

    Both forms match names without the attributes of torch.compile's, DDP's
    and torch's checkpoint wrappers (``_orig_mod``, ``module``,
    ``_checkpoint_wrapped_module``), as :func:`save_adapter` writes them.

    Returns:
        The names of the replaced layers in ``model`` (wrappers' attributes
        included), in model order.

    Raises:
        ValueError: when nothing matches (the message lists the linear layers),
            when a match already carries an adapter, when a named target
            is never called by its parent (an adapter there would have no
            effect), when it is inside DDP or FSDP1's wrapper (inject
            first, then wrap) or sharded by FSDP1 or FSDP2, or when the
            model is PEFT's (a
            ``peft.PeftModel``, converted by :func:`from_peft` or not, PEFT's
            layers or layers :func:`from_peft` converted inside,
            transformers' ``add_adapter``): PEFT's methods would not see the
            new layers.
        TypeError: when a match's weight is quantized (nothing is fused).

    Warns (``UserWarning``) of list entries that match no linear layer, and
    of fused layers whose parent module's code reads their weight instead of
    calling them on some path (the line is quoted; an adapter is bypassed
    there: :func:`uncalled_layers` tells whether a forward calls them).
    """
    _check_model(model)
    r = check_int("r", r, 1)
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    use_dora = check_bool("use_dora", use_dora)
    quantize_base = check_quantize_base(quantize_base)
    multi = multi_fused_layers(model)
    if multi:
        raise ValueError(f"inject: the model's fused layers hold several adapters each ({', '.join(list(multi)[:3])}"
                         f"{', ...' if len(multi) > 3 else ''}: inject_multi): add layers with inject_multi, so that "
                         "every fused layer takes the same adapter ids")
    chosen = _select_layers(model, target_modules, exclude_modules, "inject")
    fused_by_id = {}
    _freeze_a_plain_model(model)
    for name in chosen:
        module = model.get_submodule(name)
        if id(module) not in fused_by_id:  # a module reachable under two names gets one adapter
            fused_by_id[id(module)] = _fused_layer_for(module, r, alpha, dropout, use_rslora, adapter_dtype, backend,
                                                       use_dora, quantize_base)
        _replace_module(model, name, fused_by_id[id(module)])
    guard_fast_paths(model)
    _keep_aside(model)
    _tell_transformers(model)
    return chosen


def _select_layers(model: nn.Module, target_modules, exclude_modules, what: str) -> list[str]:
    """:func:`inject`'s and :func:`inject_multi`'s choice of layers, with their
    checks (before anything changes) and warnings."""
    all_linear = target_modules == "all-linear"
    targets = None if all_linear else _check_targets("target_modules", target_modules)
    excluded = _check_targets("exclude_modules", exclude_modules)
    names = linear_layer_names(model)
    public = _public_names(model)
    output_layer = _output_layer(model) if all_linear else None
    chosen, uncalled = [], {}
    unused = set(targets) if isinstance(targets, list) else set()  # (list entries that match no linear layer)
    for name in names:
        module = model.get_submodule(name)
        if all_linear:
            if module is output_layer:
                continue
        elif not _matches(public[name], targets):
            continue
        unused -= {t for t in unused if _matches(public[name], [t])}
        if excluded is not None and _matches(public[name], excluded):
            continue
        reason = _never_called(model, name)
        if reason:
            uncalled[name] = reason
            continue
        chosen.append(name)
    if uncalled and not all_linear:
        raise ValueError(f"target_modules={target_modules!r} matches layers no adapter can reach: "
                         + "; ".join(f"{n}: {why}" for n, why in uncalled.items())
                         + " (leave them out with exclude_modules)")
    if uncalled:
        warnings.warn(f"{what}: 'all-linear' leaves out {sorted(uncalled)}: "
                      + "; ".join(sorted(set(uncalled.values()))), stacklevel=3)
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched none "
                         f"of the model's linear layers: {[public[n] for n in names]}")
    already = [n for n in chosen if isinstance(model.get_submodule(n), FUSED_KINDS)]
    if already:
        raise ValueError(f"these layers already carry a fused adapter: {already}")
    _check_can_add_parameters(model, chosen, what)
    _check_fusable(model, chosen, what)
    if unused:  # (a typo would otherwise leave layers without adapters, silently)
        warnings.warn(f"{what}: target_modules entries {sorted(unused)} match none of the model's linear layers "
                      f"(layers fused: {len(chosen)})", stacklevel=3)
    _warn_weight_readers(model, chosen, what, stacklevel=4)
    return chosen


def inject_multi(model: nn.Module, target_modules, ranks, alphas=None, dropout=0.0,
                 use_rslora: bool = False, exclude_modules=None, *, adapter_dtype: torch.dtype | None = None,
                 backend: str = "auto", quantize_base: bool | str = False, use_dora=False) -> list[str]:
    """Replace the matching linear layers of ``model`` with
    :class:`~fused_lora.MultiLoRALinear`, several adapters on each shared
    base: adapter ``i`` of rank ``ranks[i]`` and alpha ``alphas[i]`` (default
    ``ranks[i]``, a scale of 1; ``dropout`` one probability for every
    adapter, or ``[p_0, p_1, ...]``, one an adapter), each row of a batch through the adapter its
    id names (-1: the base alone), all in one set of fused launches. For
    training several adapters at once on one base, or serving several from
    one. The ids reach the layers through :func:`adapter_ids`::

        fused_lora.inject_multi(model, ["q_proj", "v_proj"], ranks=[16, 16, 8])
        with fused_lora.adapter_ids(model, ids):  # (batch,): a sample each
            loss = model(input_ids, labels=labels).loss
            loss.backward()

    Target selection, the freezing of a model without fused layers, the
    checks and the warnings are :func:`inject`'s. A second call (other
    layers, other ranks) must give as many adapters as the first: every
    fused layer of a model takes the same ids. A model holds layers of one
    kind, :func:`inject`'s or these (``ValueError`` otherwise).
    :func:`save_adapter`, :func:`load_adapter` and :func:`merge_and_unload`
    take ``adapter=i``: one adapter of these layers is one of PEFT's;
    :func:`unload` and :func:`disable_adapters` work as for :func:`inject`'s
    layers; :func:`to_peft` gives each adapter to PEFT, by name.
    ``quantize_base``: the bases int8 or NF4, as :func:`inject`'s (many
    adapters served from one quantized base; ``merge_and_unload``,
    ``unload`` and ``to_peft`` refused). ``use_dora``: DoRA adapters (True:
    every one; or one bool an adapter), as :class:`MultiLoRALinear`'s.

    Returns the names of the replaced layers, in model order.
    """
    _check_model(model)
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    quantize_base = check_quantize_base(quantize_base)
    # (the layer's own checks, ahead of any change: ranks, alphas, dropout, backend)
    probe = MultiLoRALinear(1, 1, ranks, alphas, dropout, bias=False, use_rslora=use_rslora, device="meta",
                            backend=backend, use_dora=use_dora)
    single = fused_layers(model)
    if single:
        raise ValueError(f"inject_multi: the model's fused layers hold one adapter each ({', '.join(list(single)[:3])}"
                         f"{', ...' if len(single) > 3 else ''}: inject or load_adapter): unload them first, or keep "
                         "one kind of fused layer in a model")
    counts = {layer.num_adapters for layer in multi_fused_layers(model).values()}
    if counts and counts != {probe.num_adapters}:
        raise ValueError(f"inject_multi: the model's fused layers hold {sorted(counts)[0]} adapters each, ranks "
                         f"names {probe.num_adapters}: every fused layer of a model takes the same adapter ids")
    chosen = _select_layers(model, target_modules, exclude_modules, "inject_multi")
    fused_by_id = {}
    _freeze_a_plain_model(model)
    for name in chosen:
        module = model.get_submodule(name)
        if id(module) not in fused_by_id:  # a module reachable under two names gets one set of adapters
            fused_by_id[id(module)] = _multi_layer(module, probe.ranks, probe.alphas, probe.dropout, probe.use_rslora,
                                                   backend=backend, adapter_dtype=adapter_dtype,
                                                   quantize_base=quantize_base, use_dora=probe.use_dora)
        _replace_module(model, name, fused_by_id[id(module)])
    guard_fast_paths(model)
    _keep_aside(model)
    _tell_transformers(model)
    return chosen


def adapter_parameters(model: nn.Module, adapter: int) -> list[nn.Parameter]:
    """Adapter ``adapter``'s parameters in every :func:`inject_multi` layer of
    ``model``: each layer's ``lora_A[adapter]`` then ``lora_B[adapter]`` (then
    a DoRA adapter's magnitude, ``lora_magnitude_vector[str(adapter)]``), in
    model order (a layer reachable under two names once; none where the
    adapter has rank 0). For an optimizer
    of each adapter's own, or to freeze one (``requires_grad_(False)``)
    while the others train. (An adapter with no rows in a batch gets zero
    gradients, not None: one optimizer over every adapter, with momentum or
    weight decay, still moves it at that step, where training it alone would
    have taken no step; step each adapter's optimizer on the batches that
    hold its rows to train each as if alone.) Raises ValueError on a model
    without such layers, or an index out of their range."""
    multi = multi_fused_layers(_check_model(model))
    if not multi:
        raise ValueError("adapter_parameters: the model has no layers of several adapters (inject_multi places them)")
    adapter = _check_adapter_index("adapter_parameters", adapter, multi)
    layers = {id(layer): layer for layer in multi.values() if layer.ranks[adapter]}.values()
    return [p for layer in layers for p in (layer.lora_A[adapter], layer.lora_B[adapter], layer.magnitude(adapter))
            if p is not None]


#: On a fused layer inside :func:`adapter_ids`: ``[hook handle, [ids by device, ...]]``, the innermost block's last.
_ROUTED = "_fused_lora_routed_ids"


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: torch.Tensor):
    """Inside the block, every fused layer of ``model`` the model calls
    without ids gets ``ids`` as its ``adapter_ids``: a model's forward does
    not take them, its layers do. ``ids``: an integer tensor, a sample's
    adapter each, ``(batch,)``, or a token's, of the layers' inputs' leading
    shape (``(batch, seq)`` in a transformer); -1 runs the base alone.
    :func:`inject_multi`'s layers take ids in ``[0, num_adapters)``,
    :func:`inject`'s 0 (the adapter) and -1 (a sample each), as
    :meth:`~fused_lora.MultiLoRALinear.forward` and
    :meth:`~fused_lora.LoRALinear.forward` say; they check them (one host
    sync for the model, the first time a tensor of ids comes: keep the ids
    on the model's device), and raise ``ValueError`` for a shape that does
    not fit a layer's input (generation with ``num_beams`` repeats each
    sample: repeat the ids alike, ``ids.repeat_interleave(num_beams)``).

    Ids a call passes itself win; blocks nest, the innermost's ids in
    effect; the layers are as before on exit, exceptions included. Run the
    backward inside the block where the model recomputes activations in it
    (activation checkpointing calls the layers again): a layer recomputed
    after the block, without the ids its forward had, raises ValueError
    rather than compute other rows. Raises ValueError on
    a model without fused layers, TypeError for ids that are not an integer
    tensor of one or more dims."""
    _check_model(model)
    if not isinstance(ids, torch.Tensor) or ids.dtype == torch.bool or ids.dtype.is_floating_point \
            or ids.dtype.is_complex:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"adapter_ids: ids must be an integer tensor, an adapter id a sample or a token, got {got}")
    if ids.dim() == 0:
        raise TypeError("adapter_ids: ids must have one id a sample, (batch,), or a token, (batch, seq); got a 0-dim "
                        "tensor")
    layers = list({id(m): m for m in all_fused_layers(model).values()}.values())
    if not layers:
        raise ValueError("adapter_ids: the model has no fused layers (inject_multi or inject places them)")
    by_device = {ids.device: ids}  # (one copy a device, for every layer: their checks read each copy once)
    for layer in layers:
        routed = layer.__dict__.get(_ROUTED)
        if routed is None:
            routed = [layer.register_forward_pre_hook(_routed_ids_hook, with_kwargs=True), []]
            layer.__dict__[_ROUTED] = routed
        routed[1].append(by_device)
    try:
        yield model
    finally:
        for layer in layers:
            handle, stack = layer.__dict__[_ROUTED]
            del stack[max(i for i, entry in enumerate(stack) if entry is by_device)]  # (by identity)
            if not stack:
                handle.remove()
                del layer.__dict__[_ROUTED]


def _routed_ids_hook(module: nn.Module, args, kwargs):
    """A fused layer's forward pre-hook inside :func:`adapter_ids`."""
    if len(args) > 1 or kwargs.get("adapter_ids") is not None:
        return None  # (the caller's own ids)
    by_device = module.__dict__[_ROUTED][1][-1]
    x = args[0] if args else kwargs.get("x")
    device = x.device if isinstance(x, torch.Tensor) else next(iter(by_device))
    if device not in by_device:
        by_device[device] = next(iter(by_device.values())).to(device)
    kwargs["adapter_ids"] = by_device[device]
    return args, kwargs


def _multi_layer(module: nn.Module, *args, **kwargs) -> MultiLoRALinear:
    """A :class:`MultiLoRALinear` around ``module`` (an ``nn.Linear``, a
    quantized one included, or transformers' ``Conv1D``), in its mode."""
    if isinstance(module, nn.Linear):
        layer = MultiLoRALinear.from_linear(module, *args, **kwargs)
    else:
        layer = take_from_module(MultiLoRALinear.around(module.weight, module.bias, *args, fan_in_fan_out=True,
                                                        **kwargs), module)
    return layer.train(module.training)


def _check_fusable(model: nn.Module, names, what: str, error=TypeError) -> None:
    """Refuse, before anything changes, plain linears whose weights the kernels cannot read (quantized)."""
    modules = {n: model.get_submodule(n) for n in names}
    unfusable = {n: why for n, m in modules.items()
                 if (why := unfusable_base(m.weight, m.bias, fan_in_fan_out=not isinstance(m, nn.Linear), module=m))}
    if unfusable:
        raise error(f"{what}: these layers cannot be fused: "
                    + "; ".join(f"{n}: {why}" for n, why in unfusable.items()) + f". {SUPPORTED_BASES}")


def _freeze_a_plain_model(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` if it has no fused layer yet (the
    base model becoming a LoRA model). A model already fused keeps what
    trains: a second :func:`inject` (another rank for other layers) leaves the
    first one's adapters, and a head unfrozen by hand, training. (The new
    layers' base weights are frozen either way.)"""
    if not all_fused_layers(model):
        for p in model.parameters():
            p.requires_grad_(False)


def fused_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's fused layers of one adapter (:func:`inject`'s), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def multi_fused_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The model's fused layers of several adapters (:func:`inject_multi`'s), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def all_fused_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's fused layers of either kind, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FUSED_KINDS)}


# ----------------------------------------------------------------------------
# PEFT interop
# ----------------------------------------------------------------------------

@dataclass
class ConversionReport:
    """What :func:`from_peft` converted, and what it left alone and why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} PEFT LoRA layer(s) to fused layers"]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) as they were:")
            lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


_ORIGINALS = "_fused_lora_peft_layers"
#: Set on each fused layer :func:`from_peft` made: the model inside the
#: ``PeftModel`` (which PEFT changed in place, and users keep) is PEFT's too.
_FROM_PEFT = "_fused_lora_from_peft"
#: On a fused layer from_peft made from an adapter whose init took its start
#: out of the base weight (:func:`_residual_base_init`): that init, which
#: save_adapter writes, so that PEFT makes the residual base again on load.
_RESIDUAL_INIT = "_fused_lora_residual_init"
#: On a :class:`MultiLoRALinear` from_peft made of a model holding several
#: adapters: their names, adapter ``i`` the ``i``-th.
_PEFT_ADAPTERS = "_fused_lora_peft_adapters"


def _residual_base_init(init) -> bool:
    """PEFT's ``init_lora_weights`` values that take the adapter's start
    (``s·B₀A₀``) out of the base weight (PiSSA, OLoRA, CorDA, LoftQ,
    LoRA-GA): the trained adapter holds only on that residual base, which
    PEFT makes again from the base model when it loads such a file."""
    return isinstance(init, str) and (init.lower().startswith(("pissa", "corda"))
                                      or init.lower() in ("olora", "loftq", "lora_ga"))


#: The oldest PEFT that :func:`from_peft` and :func:`to_peft` take: the oldest
#: the test suite passes with (0.18.1 with transformers 4.57; 0.19.1, 0.20.0
#: and 0.21.2 with transformers 5.24). 0.17 keeps no rsLoRA flag on its layers
#: (an rsLoRA layer would be left unconverted, its scale taken for a
#: ``set_scale``); 0.14 and older have another modules_to_save class.
#: (pyproject.toml's ``peft>=`` says the same.)
MIN_PEFT = (0, 18)


def _peft_lora_linear():
    """PEFT's ``(LoraLayer, Linear)``; ImportError without PEFT or where it is
    older than :data:`MIN_PEFT`."""
    try:
        import peft
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError as err:
        raise ImportError("from_peft/to_peft need the `peft` package (pip install peft)") from err
    found = getattr(peft, "__version__", "0")
    if version_tuple(found) < MIN_PEFT:
        floor = ".".join(map(str, MIN_PEFT))
        raise ImportError(f"from_peft/to_peft need peft>={floor}, the oldest they are tested with; found peft {found} "
                          f"(pip install -U 'peft>={floor}')")
    return LoraLayer, PeftLinear


def _peft_quantized_linears() -> tuple[type, ...]:
    """PEFT's LoRA layers over a quantized base that compute as its plain
    LoRA ``Linear`` does, the base's own forward plus the adapter's term:
    bitsandbytes' 4-bit and 8-bit ones (``peft.tuners.lora.bnb.Linear4bit``,
    ``Linear8bitLt``) and torchao's (``TorchaoLoraLinear``), those PEFT defines (where their
    modules are not imported, no layer of theirs exists). Whether their base
    is one the fused layers read (NF4, FP4, int8 rows) is
    :func:`fused_lora.layer.unfusable_base`'s to say."""
    bnb = sys.modules.get("peft.tuners.lora.bnb")
    classes = (getattr(bnb, "Linear4bit", None), getattr(bnb, "Linear8bitLt", None),
               getattr(sys.modules.get("peft.tuners.lora.torchao"), "TorchaoLoraLinear", None))
    return tuple(c for c in classes if isinstance(c, type))


def _peft_model_adapters(peft_model: nn.Module, configs: dict, LoraLayer: type) -> tuple[str, ...]:
    """The names of the adapters the PEFT model holds, in PEFT's order (its
    ``peft_config``'s, then any other its LoRA layers hold): where there are
    several, adapter ``i`` of every layer :func:`from_peft` makes is the
    ``i``-th (rank 0 where the layer does not hold it), so that one id names
    one adapter in the whole model (:func:`adapter_ids`)."""
    names = dict.fromkeys(configs)
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            names.update(dict.fromkeys(m.lora_A.keys()))
            names.update(dict.fromkeys(getattr(m, "lora_embedding_A", {}).keys()))
    return tuple(names)


def _why_unsupported(module, PeftLinear, several: bool = False, configs: dict | None = None) -> str | None:
    """Why a PEFT LoRA layer cannot be reproduced exactly by a fused layer
    (None if it can): its plain ``Linear``, or its layers over a quantized
    base whose weight the fused layers read as it is (bitsandbytes' nf4, fp4
    and int8 rows, torchao's int8 weight-only:
    :func:`_peft_quantized_linears`). A :class:`LoRALinear` of its one
    adapter, or, in a model holding ``several`` adapters, a
    :class:`MultiLoRALinear` of them all, which runs one active adapter (or
    one a sample: PEFT's ``adapter_names``)."""
    if type(module) is not PeftLinear and type(module) not in _peft_quantized_linears():
        return (f"{type(module).__module__}.{type(module).__name__} is not a plain LoRA Linear layer (nor PEFT's "
                "bitsandbytes or torchao one)")
    base = module.get_base_layer()
    if not _is_linear_like(base):
        return f"base layer {type(base).__name__} is not nn.Linear/Conv1D (quantized or custom base)"
    why = unfusable_base(base.weight, base.bias, module=base)
    if why:
        return f"base layer: {why}"
    adapters = list(module.lora_A.keys())
    if not adapters:
        return "it holds no adapter (deleted)"
    active = list(module.active_adapters)
    dora = [a for a in active if a in module.lora_A and getattr(module, "use_dora", {}).get(a)]
    if several and len(active) > 1 and dora:
        return (f"several adapters active ({active}), which PEFT sums, {dora[0]!r} DoRA: its output (scaled by its "
                "magnitude) is not a term a fused layer sums (set_adapter(one) first)")
    if not several and active != adapters:
        return f"active adapters are {active}, not exactly {adapters}"
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return f"adapter merged into the base ({module.merged_adapters}): unmerge first"
    for name in adapters:
        why = _why_adapter_unsupported(module, name, several, configs or {})
        if why:
            return f"adapter {name!r}: {why}" if several else why
    if len({bool(getattr(module, "use_rslora", {}).get(name, False)) for name in adapters}) > 1:
        return "its adapters mix rsLoRA and plain LoRA scales (a layer of several adapters holds one use_rslora)"
    return None


def _why_adapter_unsupported(module, name: str, several: bool, configs: dict) -> str | None:
    """Why adapter ``name`` of PEFT's LoRA layer ``module`` cannot be fused as it is (None if it can)."""
    dora = bool(getattr(module, "use_dora", {}).get(name))
    variant = getattr(module, "lora_variant", {}).get(name)
    alora = type(variant).__name__ == "ALoraLinearVariant"
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant") and not alora:
        return f"the LoRA variant {type(variant).__name__} is not fused (DoRA and aLoRA are)"
    if alora and several:
        return "aLoRA in a model of several adapters is not fused (aLoRA's is in a model of one)"
    if alora and dora:
        return "aLoRA with DoRA is not fused"
    if dora and _peft_magnitude(module, name) is None:
        return "DoRA without its lora_magnitude_vector of one value an output feature"
    if getattr(module, "lora_bias", {}).get(name) or module.lora_B[name].bias is not None:
        return "lora_bias (a bias on lora_B) is not fused"
    drop = module.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(drop).__name__} is not nn.Dropout"
    r, alpha = module.r[name], module.lora_alpha[name]
    rslora = bool(getattr(module, "use_rslora", {}).get(name, False))
    if lora_scaling(r, alpha, rslora) != module.scaling[name]:
        return (f"scaling {module.scaling[name]} differs from lora_alpha/r{'**0.5' if rslora else ''} "
                f"(changed with set_scale?)")
    weight_dtype = module.get_base_layer().weight.dtype
    if weight_dtype != module.lora_A[name].weight.dtype and \
            module.lora_A[name].weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"adapter dtype {module.lora_A[name].weight.dtype} is not supported"
    init = getattr(configs.get(name), "init_lora_weights", True)
    if several and _residual_base_init(init):
        return (f"its init ({init!r}) took its start out of the base weight, a residual base the other adapters "
                "do not share: convert a model of that adapter alone")
    return None


def _peft_fused_layer(module, order: tuple[str, ...] | None, backend: str) -> nn.Module:
    """The fused layer of PEFT's LoRA layer ``module``, holding its tensors
    (shared): a :class:`LoRALinear` of its one adapter (``order`` None), or
    a :class:`MultiLoRALinear` of the model's adapters ``order`` (rank 0
    where ``module`` holds none; its :attr:`~MultiLoRALinear.active_adapter`
    PEFT's, -1 where none is)."""
    base = module.get_base_layer()
    weight, scale, code = base_parameters(base)

    def dropout_of(adapter: str) -> float:
        drop = module.lora_dropout[adapter]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    if order is None:
        (adapter,) = module.lora_A.keys()
        layer = LoRALinear.from_parameters(
            weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
            alpha=module.lora_alpha[adapter], dropout=dropout_of(adapter),
            use_rslora=bool(getattr(module, "use_rslora", {}).get(adapter, False)),
            fan_in_fan_out=bool(module.fan_in_fan_out), backend=backend,
            lora_magnitude_vector=_peft_magnitude(module, adapter) if getattr(module, "use_dora", {}).get(adapter)
            else None, weight_scale=scale, weight_code=code)
        if type(getattr(module, "lora_variant", {}).get(adapter)).__name__ == "ALoraLinearVariant":
            layer.alora = True  # (PEFT's offsets reach it through _peft_forward_hooks)
    else:
        held = [a for a in order if a in module.lora_A]
        lora = [(module.lora_A[a].weight, module.lora_B[a].weight) if a in module.lora_A else None for a in order]
        layer = MultiLoRALinear.around(
            weight, base.bias, [module.r[a] if a in module.lora_A else 0 for a in order],
            [module.lora_alpha[a] if a in module.lora_A else 0.0 for a in order],
            [dropout_of(a) if a in module.lora_A else 0.0 for a in order],
            use_rslora=bool(getattr(module, "use_rslora", {}).get(held[0], False)),
            fan_in_fan_out=bool(module.fan_in_fan_out), backend=backend, weight_scale=scale, weight_code=code,
            use_dora=[bool(getattr(module, "use_dora", {}).get(a)) and a in module.lora_A for a in order])
        layer.lora_magnitude_vector = nn.ParameterDict({
            key: _peft_magnitude(module, order[int(key)]) for key in layer.lora_magnitude_vector})
        # (rank 0 where the layer holds none: empty, frozen, PEFT's layer has no such tensor)
        layer.lora_A = nn.ParameterList(ab[0] if ab else layer.lora_A[i].requires_grad_(False)
                                        for i, ab in enumerate(lora))
        layer.lora_B = nn.ParameterList(ab[1] if ab else layer.lora_B[i].requires_grad_(False)
                                        for i, ab in enumerate(lora))
        layer.active_adapter = _active_indices(order, module.active_adapters)
        setattr(layer, _PEFT_ADAPTERS, order)
    layer.compute_dtype = _held_compute_dtype(base)  # (bitsandbytes' 4-bit base: the dtype it computes in)
    return layer


def _active_indices(order: tuple[str, ...], active) -> int | tuple[int, ...]:
    """:attr:`MultiLoRALinear.active_adapter` of PEFT's active adapter(s)
    ``active`` among the model's ``order``: an index, several (summed), or
    -1 where none is the model's."""
    held = [order.index(a) for a in active if a in order]
    return -1 if not held else held[0] if len(held) == 1 else tuple(held)


def _peft_magnitude(module, adapter: str) -> nn.Parameter | None:
    """DoRA's magnitude in PEFT's LoRA layer ``module`` (its
    ``lora_magnitude_vector[adapter].weight``, (out,)); None where it has none."""
    holder = getattr(module, "lora_magnitude_vector", {})
    m = getattr(holder[adapter], "weight", None) if adapter in holder else None
    # (the layer's out_features, which PEFT reads off its base: a 4-bit weight's shape is its bytes')
    return m if isinstance(m, nn.Parameter) and tuple(m.shape) == (module.out_features,) else None


def _why_not_movable(model: nn.Module, name: str, module) -> str | None:
    """Why the PEFT layer ``name`` cannot hand its place to a fused layer
    (None when it can): an accelerate dispatch, or hooks on its base layer,
    which see the base layer's output alone (a fused layer has no such call)."""
    base_name = name + "." + next(n for n, m in module.named_modules() if m is module.get_base_layer())
    if _dispatched(model, name) or _dispatched(model, base_name):
        return ("dispatched by accelerate (device_map with offloading, or hooks on the layer): convert before "
                "dispatching")
    hooks = [attr for attr in _HOOKS if getattr(module.get_base_layer(), attr, None)]
    if hooks:
        return (f"its base layer has hooks ({', '.join(hooks)}) that see the base layer's output alone, which a fused "
                "layer does not compute apart: remove them, or register them on the LoRA layer")
    return None


def from_peft(peft_model: nn.Module, *, backend: str = "auto") -> ConversionReport:
    """Convert the LoRA ``Linear`` layers of a PEFT model into fused layers, in
    place. The fused layers share PEFT's tensors (base weight and bias,
    ``lora_A``/``lora_B`` weights), so optimizers and state keep working.
    Base bias, dropout, rsLoRA, ``fan_in_fan_out``, per-layer rank/alpha
    (``rank_pattern``/``alpha_pattern``) and DoRA (``use_dora=True``: the
    fused layer shares the ``lora_magnitude_vector`` too) convert, and so do
    PEFT's layers over a quantized base the fused layers read (QLoRA's: a
    bitsandbytes nf4 or fp4 ``Linear4bit``, its bytes and absmax read as they are
    and its ``compute_dtype`` kept; bitsandbytes' int8 rows; torchao's int8
    weight-only); anything that cannot be reproduced exactly (other variants,
    several active adapters of which one is DoRA, lora_bias, merged or
    disabled adapters, other quantized or non-linear bases) is left as it
    was and listed in the report. A model holding several adapters (``add_adapter``,
    ``load_adapter``: serving several from one base) gets a
    :class:`MultiLoRALinear` a layer, of every adapter of the model in
    PEFT's order (``peft_config``'s; rank 0 where the layer holds none: one
    id names one adapter in every layer, :func:`adapter_ids`), sharing
    PEFT's tensors: it runs PEFT's active adapter
    (:attr:`MultiLoRALinear.active_adapter`, which ``set_adapter`` sets;
    several active, ``set_adapter([a, b])``: their terms summed on every
    sample, as PEFT's, in one set of fused launches), or
    each sample's (``adapter_names``) in one set of fused launches for the
    whole batch (PEFT's runs a pass an adapter), DoRA adapters among them
    (their rows scaled by their own magnitudes; PEFT refuses
    ``adapter_names`` with DoRA); layers whose adapters mix rsLoRA and
    plain scales stay PEFT's there.
    ``merge_adapter()`` refuses a quantized base (PEFT's requantizes it, a
    rounding error each time). An aLoRA adapter (``alora_invocation_tokens``,
    a model of one adapter) converts to an aLoRA :class:`LoRALinear`
    (:attr:`LoRALinear.alora`), which takes PEFT's offsets (one a sample:
    the adapter on the tokens from the invocation on) through
    :func:`_peft_forward_hooks`; :func:`to_peft`
    gives PEFT's layers back their own weight (which, kept aside, let go of
    the bytes or the Parameter the fused layer holds, so that FSDP2 can free
    them: :func:`_let_go`; refused where the fused layer's base was moved to
    another device, or its scales hold other values, since). On a ``peft.PeftModel``, the methods that
    visit PEFT's layers only (``save_pretrained``, ``disable_adapter``,
    ``merge_adapter``...: :func:`_patch_peft_model`) take the fused ones too,
    and the fused layers' ``load_state_dict`` takes PEFT's names for their
    tensors (:func:`_peft_names_in`).
    A model with no PEFT LoRA layer (and none converted before: a second
    call converts nothing) is refused (``ValueError``), as is one with
    transformers' own PEFT adapters (``model.add_adapter``): its adapter
    methods would break or skip the fused layers; so is a PEFT model holding
    fused layers that PEFT did not make (``peft.get_peft_model`` on a model
    after :func:`inject`), whose adapters its ``save_pretrained`` would not
    save as adapters (PEFT 0.21 also froze them). An adapter whose init took
    its start out of the base weights (PiSSA, OLoRA...:
    :func:`_residual_base_init`) converts as it is,
    on its residual base, and :func:`save_adapter` writes that init, which
    it reads from the ``PeftModel``'s config: convert the ``PeftModel``, not
    the model inside it, which holds no config.
    """
    _check_model(peft_model, "peft_model")
    LoraLayer, PeftLinear = _peft_lora_linear()
    if getattr(peft_model, "_hf_peft_config_loaded", False) and not _is_peft_model(peft_model):
        raise ValueError("from_peft: the model holds transformers' own PEFT adapters (model.add_adapter / "
                         "model.load_adapter), whose methods (save_pretrained, disable_adapters, active_adapters...) "
                         "look for PEFT's layers only: they would fail, or skip the fused layers silently. Load the "
                         "adapter into the plain model with fused_lora.load_adapter(model, path) (the same files), or "
                         "with peft.PeftModel.from_pretrained and convert that")
    foreign = {n: m for n, m in peft_model.named_modules()
               if isinstance(m, LoRALinear) and not getattr(m, _FROM_PEFT, False)}
    if foreign and (_is_peft_model(peft_model) or any(isinstance(m, LoraLayer) for m in peft_model.modules())):
        shown = ", ".join(list(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
        # (PEFT 0.21 froze their adapters; older ones leave them training: their names hold "lora_")
        frozen = not any(p.requires_grad for m in foreign.values() for p in (m.lora_A, m.lora_B))
        raise ValueError(f"from_peft: the model holds fused layers that PEFT did not make ({shown}: fused_lora.inject "
                         "or load_adapter did, before PEFT wrapped the model). PEFT does not know them: "
                         f"{'peft.get_peft_model froze their adapters, and ' if frozen else ''}its save_pretrained "
                         "does not save them as adapters (PEFT 0.18, 0.19 and 0.21 leave them out; 0.20 writes their "
                         "tensors under keys its from_pretrained does not load). Keep one "
                         "model PEFT's or fused_lora's: give PEFT those layers first (fused_lora.to_peft(model) on the "
                         "fused model returns a PeftModel holding its adapters), or fuse every layer with inject")
    report = ConversionReport()
    originals = getattr(peft_model, _ORIGINALS, None) or {}
    if not originals and not any(isinstance(m, LoraLayer) for m in peft_model.modules()):
        fused = [m for m in peft_model.modules() if isinstance(m, (LoRALinear, MultiLoRALinear))]
        if any(getattr(m, _FROM_PEFT, False) for m in fused):
            why = "its layers were converted already (from_peft on the PeftModel that holds this model)"
        elif fused:
            why = "its fused layers came from fused_lora.inject or load_adapter"
        elif _is_peft_model(peft_model):
            why = f"it is a PeftModel of another method ({type(peft_model.base_model).__name__}), not LoRA"
        else:
            why = ("make them with peft.get_peft_model(model, peft.LoraConfig(...)), or fuse the model's linears "
                   "with fused_lora.inject")
        raise ValueError(f"from_peft: the model holds no PEFT LoRA layers to convert: {why}")
    configs = getattr(peft_model, "peft_config", None)  # (a PeftModel's, a LoraModel's: adapter -> LoraConfig)
    configs = configs if isinstance(configs, dict) else {}
    _check_not_sharded(peft_model, [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)],
                       "from_peft")
    order = _peft_model_adapters(peft_model, configs, LoraLayer)
    several = len(order) > 1
    for name, module in list(peft_model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        reason = _never_called(peft_model, name) or _why_unsupported(module, PeftLinear, several, configs) or \
            _why_not_movable(peft_model, name, module)
        if reason:
            report.skipped[name] = reason
            continue
        layer = _peft_fused_layer(module, order, backend) if several else _peft_fused_layer(module, None, backend)
        layer.train(module.training)
        base_name = next(n for n, m in module.named_modules() if m is module.get_base_layer())
        adapters = order if several else tuple(module.lora_A.keys())
        layer.register_load_state_dict_pre_hook(functools.partial(_peft_names_in, adapters, base_name))
        _replace_module(peft_model, name, layer)
        setattr(layer, _FROM_PEFT, True)
        init = getattr(configs.get(adapters[0]), "init_lora_weights", True)
        if not several and _residual_base_init(init):
            setattr(layer, _RESIDUAL_INIT, init)
        originals[name] = module
        report.converted.append(name)
    object.__setattr__(peft_model, _ORIGINALS, originals)  # not a submodule: no duplicate parameters
    in_use = _parameters_in_use(peft_model)
    for name in report.converted:
        _let_go(peft_model.get_submodule(name), originals[name], in_use)
    if report.converted:
        _patch_peft_model(peft_model)
    guard_fast_paths(peft_model)
    _tell_transformers(peft_model)
    return report


#: The PeftModel methods that visit PEFT's LoRA layers only, and would skip
#: the fused ones silently: on a model from :func:`from_peft` they are
#: replaced (instance attributes, dropped by :func:`to_peft`) by versions
#: that take the fused layers too (:func:`_patch_peft_model`).
_PEFT_METHODS = ("disable_adapter", "save_pretrained", "load_adapter", "merge_adapter", "unmerge_adapter",
                 "merge_and_unload", "unload", "enable_adapter_layers", "disable_adapter_layers", "add_adapter",
                 "delete_adapter", "get_layer_status", "get_model_status", "set_adapter")
#: The methods of PEFT's tuner (``peft_model.base_model``, a ``LoraModel``)
#: patched likewise: those code also calls on it directly (a reference pass
#: as ``model.base_model.disable_adapter_layers()``), and those the
#: PeftModel hands on to it (its ``set_requires_grad`` calls the tuner's;
#: it has no ``add_weighted_adapter``: its attribute lookup finds the tuner's;
#: its ``forward`` and ``generate`` enter the tuner's ``_enable_peft_forward_hooks``).
_TUNER_METHODS = ("merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "enable_adapter_layers",
                  "disable_adapter_layers", "delete_adapter", "set_adapter", "set_requires_grad",
                  "add_weighted_adapter", "_enable_peft_forward_hooks")


def _patch_peft_model(peft_model: nn.Module) -> None:
    """Where :func:`from_peft` converted layers of a ``peft.PeftModel``, make
    its methods that visit PEFT's layers only (:data:`_PEFT_METHODS`, and
    :data:`_TUNER_METHODS` on its ``base_model``) take the fused ones too,
    as users and trainers call them (transformers' ``Trainer`` saves a
    checkpoint with ``save_pretrained``; TRL's DPO takes its reference
    outputs inside ``disable_adapter()``, its GRPO hands vLLM the weights
    ``merge_adapter()`` merged):

    * ``disable_adapter()``: :func:`disable_adapters`;
    * ``save_pretrained(...)``: PEFT's, with PEFT's layers put back for the
      call (a ``state_dict`` passed in is renamed to match);
    * ``load_adapter(path, name, ...)`` of an adapter the fused layers hold
      (the ``Trainer`` resuming from a checkpoint): PEFT's likewise, into the
      fused layers' own parameters;
    * ``merge_adapter()`` / ``unmerge_adapter()``: the fused layers' merge
      and unmerge, and PEFT's on the layers left PEFT's (refused, nothing
      merged, where a fused layer holds a quantized base, or several
      adapters: one base serves them all);
    * ``merge_and_unload(...)`` / ``unload(...)``: :func:`to_peft`, then PEFT's;
    * ``enable_adapter_layers()`` / ``disable_adapter_layers()`` (PEFT's
      LoraModel's, which the PeftModel hands on): the fused layers'
      ``adapter_enabled`` too, until the other is called, and their
      adapters' ``requires_grad`` as PEFT sets its own (off, then on);
    * ``set_requires_grad(names, requires_grad)`` (PEFT's tuner's, which the
      PeftModel's calls): the fused adapters' ``requires_grad`` too, where
      ``names`` holds theirs;
    * ``set_adapter(name, ...)``: the adapter the fused layers hold made
      active again as PEFT makes its own (trainable, or frozen with
      ``inference_mode=True``); another refused (the fused layers would go on
      running theirs); layers of several adapters: the named one made their
      :attr:`~MultiLoRALinear.active_adapter` (-1 where a layer has none of
      it), several names refused (PEFT would sum them);
    * ``add_adapter(...)`` / ``delete_adapter(...)`` /
      ``add_weighted_adapter(...)``, and ``load_adapter`` of a new name (PEFT's
      ``add_adapter`` froze the fused adapters, its ``delete_adapter`` left
      them on, its ``add_weighted_adapter`` failed at the first fused layer):
      PEFT's, on its own layers put back, then the model converted again
      (:func:`_peft_reconverted`: a customer's adapter loaded or unloaded
      while serving);
    * ``get_layer_status()`` / ``get_model_status()`` (which found no adapter
      layers): PEFT's, the fused layers counted (:func:`_peft_status`);
    * a batch that mixes adapters (``model(..., adapter_names=[...])``,
      ``generate`` too: the tuner's ``_enable_peft_forward_hooks``, which
      hands the names to PEFT's layers alone): the fused layers get the
      samples that name their adapter (:func:`_peft_forward_hooks`).
    """
    if not callable(getattr(type(peft_model), "disable_adapter", None)):  # (not a PeftModel)
        return
    model_patches = {"disable_adapter": (disable_adapters,), "save_pretrained": (_peft_save_pretrained,),
                     "load_adapter": (_peft_load_adapter,),
                     "merge_adapter": (_peft_merge, True), "unmerge_adapter": (_peft_merge, False),
                     "merge_and_unload": (_peft_after_to_peft, "merge_and_unload"),
                     "unload": (_peft_after_to_peft, "unload"),
                     "enable_adapter_layers": (_peft_adapter_layers_on, True),
                     "disable_adapter_layers": (_peft_adapter_layers_on, False),
                     "add_adapter": (_peft_reconverted, "add_adapter", False),
                     "delete_adapter": (_peft_reconverted, "delete_adapter", False),
                     "get_layer_status": (_peft_status, "get_layer_status"),
                     "get_model_status": (_peft_status, "get_model_status"),
                     "set_adapter": (_peft_set_adapter, False)}
    tuner_patches = {name: model_patches[name] for name in _TUNER_METHODS if name in model_patches}
    tuner_patches.update({"set_adapter": (_peft_set_adapter, True), "set_requires_grad": (_peft_set_requires_grad,),
                          "delete_adapter": (_peft_reconverted, "delete_adapter", True),
                          "add_weighted_adapter": (_peft_reconverted, "add_weighted_adapter", True),
                          "_enable_peft_forward_hooks": (_peft_forward_hooks,)})
    assert set(model_patches) == set(_PEFT_METHODS) and set(tuner_patches) == set(_TUNER_METHODS)
    tuner = peft_model.base_model
    for owner, patches in ((peft_model, model_patches), (tuner, tuner_patches)):
        for name, (function, *args) in patches.items():  # (partials: a deep copy or a pickle binds them to the copy)
            if owner is peft_model or callable(getattr(type(tuner), name, None)):
                owner.__dict__[name] = functools.partial(function, peft_model, *args)


def _converted(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's layers that :func:`from_peft` converted whose fused layers are in
    place now (not put back by :func:`_peft_layers_back`), by name."""
    return {n: original for n, (_, original) in _converted_layers(peft_model).items()}


def _converted_layers(peft_model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """:func:`_converted` with each fused layer: ``{name: (fused layer, PEFT's
    layer)}``. One walk of the model's modules (``get_submodule`` a name
    costs a PeftModel about 15 µs, its attribute look-ups falling through to
    the tuner: 3-7 ms for the 224 layers of a 32-block model)."""
    originals = getattr(peft_model, _ORIGINALS, None)
    if not originals:
        return {}
    modules = dict(peft_model.named_modules(remove_duplicate=False))
    return {n: (modules[n], original) for n, original in originals.items()
            if isinstance(modules.get(n), (LoRALinear, MultiLoRALinear))}


def _layer_adapters(layer: nn.Module, original: nn.Module) -> tuple[str, ...]:
    """The names of the adapters of a fused layer :func:`from_peft` made of
    PEFT's ``original``, adapter ``i`` the ``i``-th (a :class:`LoRALinear`:
    its one)."""
    return getattr(layer, _PEFT_ADAPTERS) if isinstance(layer, MultiLoRALinear) else tuple(original.lora_A.keys())


def _shared_pairs(layer: nn.Module, original: nn.Module) -> list[tuple[str, nn.Module, nn.Module, str]]:
    """The adapter tensors a fused layer :func:`from_peft` made shares with
    PEFT's ``original``: ``(adapter, PEFT's holder, fused owner, attribute)``,
    PEFT's tensor ``holder.weight``, the fused one ``getattr(owner, attribute)``."""
    if isinstance(layer, MultiLoRALinear):
        return [(adapter, getattr(original, which)[adapter], getattr(layer, which), str(i))
                for i, adapter in enumerate(getattr(layer, _PEFT_ADAPTERS)) if adapter in original.lora_A
                for which in ("lora_A", "lora_B", "lora_magnitude_vector")
                if which != "lora_magnitude_vector" or layer.use_dora[i]]
    (adapter,) = original.lora_A.keys()
    which = ("lora_A", "lora_B", "lora_magnitude_vector")[:3 if layer.use_dora else 2]
    return [(adapter, getattr(original, w)[adapter], layer, w) for w in which]


def _held(converted: dict[str, nn.Module]) -> set[str]:
    """The names of the adapters the fused layers of :func:`_converted` hold."""
    return {name for original in converted.values() for name in original.lora_A.keys()}


def _peft_tuner_call(peft_model: nn.Module, method: str, *args, **kwargs):
    """PEFT's own ``method`` of the PeftModel's tuner (its ``LoraModel``), past the patches."""
    tuner = peft_model.base_model
    return getattr(type(tuner), method)(tuner, *args, **kwargs)


def _peft_save_pretrained(peft_model: nn.Module, *args, **kwargs):
    if kwargs.get("state_dict") is not None:
        kwargs["state_dict"] = _peft_state_dict_names(peft_model, kwargs["state_dict"])
    with _peft_layers_back(peft_model):
        return type(peft_model).save_pretrained(peft_model, *args, **kwargs)


def _peft_load_adapter(peft_model: nn.Module, model_id, adapter_name: str = "default", *args, **kwargs):
    converted = _converted(peft_model)
    held = _held(converted)
    if held and adapter_name not in held:  # (a new adapter: PEFT loads it, the model is converted again)
        return _peft_reconverted(peft_model, "load_adapter", False, model_id, adapter_name, *args, **kwargs)
    with _peft_layers_back(peft_model) as swapped:
        result = type(peft_model).load_adapter(peft_model, model_id, adapter_name, *args, **kwargs)
        for name, layer in swapped:  # (where PEFT put new tensors in, the fused layers' own take their values)
            for adapter, holder, owner, attr in _shared_pairs(layer, converted[name]):
                own = getattr(owner, attr)
                if adapter == adapter_name and holder.weight is not own:
                    with torch.no_grad():
                        own.copy_(holder.weight)
                    own.requires_grad_(holder.weight.requires_grad)
                    holder.weight = own
    return result


def _peft_merge(peft_model: nn.Module, merging: bool, *args, **kwargs) -> None:
    multi = [n for n, (layer, _) in _converted_layers(peft_model).items() if isinstance(layer, MultiLoRALinear)]
    if merging and multi:
        raise ValueError(f"merge_adapter: {', '.join(multi[:3])}{', ...' if len(multi) > 3 else ''} hold several "
                         "adapters (from_peft of a model holding several), which run unmerged (one weight serves "
                         "every adapter, and a batch that mixes them): nothing was merged. Go back to PEFT first "
                         "(fused_lora.to_peft(model)) to merge as it does")
    quantized = [n for n, layer in fused_layers(peft_model).items() if layer.quantized and not layer.merged]
    if merging and quantized:
        first = peft_model.get_submodule(quantized[0])
        raise ValueError(f"merge_adapter: {', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''} hold "
                         f"a quantized base ({base_format(first.weight, first._buffers.get('weight_code'))}, "
                         "bitsandbytes' or torchao's weight as PEFT's layer held it), which merging would requantize "
                         "(PEFT's merge does, with a rounding error each merge and unmerge): keep the adapters "
                         "unmerged, or go back to PEFT first (fused_lora.to_peft(model)) to merge as it does")
    for layer in {id(m): m for m in fused_layers(peft_model).values()}.values():
        if merging and not layer.merged:
            layer.merge()
        elif not merging and layer.merged:
            layer.unmerge()
    if any(isinstance(m, _peft_lora_linear()[0]) for m in peft_model.modules()):
        _peft_tuner_call(peft_model, "merge_adapter" if merging else "unmerge_adapter", *args, **kwargs)


def _peft_adapter_layers_on(peft_model: nn.Module, enabled: bool) -> None:
    originals = getattr(peft_model, _ORIGINALS, None) or {}
    for name, layer in all_fused_layers(peft_model).items():
        if enabled:
            layer.__dict__.pop("adapter_enabled", None)  # (the class's True)
        else:
            layer.adapter_enabled = False
        if name in originals:
            # PEFT's switch on the layer it converted, as PEFT's tuner switches its own: the flag, which
            # to_peft brings back, and the adapters' requires_grad (off; on again with the layer), on the
            # tensors the fused layer shares
            originals[name].enable_adapters(enabled)
    _peft_tuner_call(peft_model, "enable_adapter_layers" if enabled else "disable_adapter_layers")


def _peft_reconverted(peft_model: nn.Module, method: str, on_tuner: bool, *args, **kwargs):
    """PEFT's ``method`` that changes which adapters the model holds
    (``add_adapter``, ``load_adapter`` of a new name, ``delete_adapter``,
    ``add_weighted_adapter``; the PeftModel's, or its tuner's with
    ``on_tuner``), which would not see the fused layers (PEFT's
    ``add_adapter`` froze their adapters, its ``delete_adapter`` left them
    on, its ``add_weighted_adapter`` failed at them): PEFT's layers are put
    back (:func:`to_peft`), PEFT's method runs on them, and :func:`from_peft`
    converts the model again, with the fused layers' backend: a customer's
    adapter loaded into a model serving several, or unloaded, without
    leaving the fused layers. The adapters' tensors stay PEFT's (an
    optimizer over them keeps working); the fused layers are new ones.
    Refused, nothing changed, where a fused layer is merged, has its
    adapters off (``disable_adapter_layers``, :func:`disable_adapters`) or
    rescaled (:func:`rescale_adapters`): a state the new layers would not
    have. A layer converted before that is left PEFT's now (an adapter of
    rsLoRA scales added beside plain ones: a layer of several holds one
    ``use_rslora``) is named in a warning; where no layer converts any more (the last adapter
    deleted), the model stays PEFT's. Where PEFT's method raises (an
    unknown name), the model is converted again as it was, and its error
    goes on."""
    layers = {n: layer for n, (layer, _) in _converted_layers(peft_model).items()}
    held = [n for n, layer in layers.items() if getattr(layer, "merged", False) or not layer.adapter_enabled
            or RESCALED in layer.__dict__]
    if held:
        layer = layers[held[0]]
        state = "merged" if getattr(layer, "merged", False) else \
            "rescaled (rescale_adapters)" if RESCALED in layer.__dict__ else "disabled"
        raise ValueError(f"{method}: {', '.join(held[:3])}{', ...' if len(held) > 3 else ''} hold their adapters "
                         f"{state}, which the layers from_peft makes again after PEFT's {method} would not be: undo "
                         "that first (unmerge_adapter, enable_adapter_layers, or leave the block)")
    backend = next((layer.backend for layer in layers.values()), "auto")
    to_peft(peft_model)  # (refuses, nothing changed, where a quantized base cannot go back: _check_given_back)
    owner = peft_model.base_model if on_tuner else peft_model
    try:
        result = getattr(owner, method)(*args, **kwargs)  # (PEFT's own: to_peft dropped the patches)
    finally:  # (converted again where PEFT's raised too: its error, the model as it was)
        try:
            report = from_peft(peft_model, backend=backend)
        except ValueError:  # (no PEFT LoRA layer left: the model is PEFT's)
            report = ConversionReport()
    lost = {n: why for n, why in report.skipped.items()  # (not a layer left without adapters: the base alone)
            if n in layers and len(peft_model.get_submodule(n).lora_A)}
    if lost:
        shown = "; ".join(f"{n}: {why}" for n, why in list(lost.items())[:3])
        warnings.warn(f"{method}: {len(lost)} layer(s) from_peft had converted are PEFT's now ({shown}"
                      f"{'; ...' if len(lost) > 3 else ''})", UserWarning, stacklevel=3)
    return result


def _peft_set_adapter(peft_model: nn.Module, on_tuner: bool, adapter_name, *args, **kwargs):
    """PEFT's ``set_adapter`` (the PeftModel's, or its tuner's with
    ``on_tuner``), which on a layer makes the named adapters active and
    trainable (frozen with ``inference_mode=True``) and freezes the others:
    on the PEFT layers :func:`from_peft` converted too (their tensors are the
    fused layers'), and, on layers of several adapters, the fused layer's
    :attr:`~MultiLoRALinear.active_adapter` (several names: their terms
    summed, as PEFT's layers sum them). Refused, nothing changed: naming
    other adapters than the one the fused layers hold (they would go on
    running theirs), or, on layers of several, more than one where one of
    them is DoRA in a layer (PEFT sums its whole output)."""
    layers = _converted_layers(peft_model)
    converted = {n: original for n, (_, original) in layers.items()}
    held = _held(converted)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    multi = [layer for layer, _ in layers.values() if isinstance(layer, MultiLoRALinear)]
    dora = sorted({a for layer in multi for i, a in enumerate(getattr(layer, _PEFT_ADAPTERS))
                   if a in names and layer.use_dora[i]})
    if len(names) > 1 and dora:
        raise ValueError(f"set_adapter: {adapter_name!r} names {len(names)} adapters, which PEFT's layers would run "
                         f"summed, and {dora[0]!r} is DoRA: its output (scaled by its magnitude) is not a term the "
                         "layers from_peft converted sum: name one, or go back to PEFT first "
                         "(fused_lora.to_peft(model))")
    if held and not multi and set(names) != held:
        raise ValueError(f"set_adapter: the layers from_peft converted hold adapter {sorted(held)} alone and would "
                         f"go on running it, not {adapter_name!r}: go back to PEFT first (fused_lora.to_peft(model)), "
                         "set_adapter there")
    owner = peft_model.base_model if on_tuner else peft_model
    result = getattr(type(owner), "set_adapter")(owner, adapter_name, *args, **kwargs)  # (unknown names: its error)
    for original in converted.values():  # (the PeftModel's called the tuner's, which did this already: the same)
        original.set_adapter(names, *args, **kwargs)
    for layer in multi:
        layer.active_adapter = _active_indices(getattr(layer, _PEFT_ADAPTERS), names)
    return result


def _peft_set_requires_grad(peft_model: nn.Module, *args, **kwargs):
    """PEFT's tuner's ``set_requires_grad(adapter_names, requires_grad)`` on
    the PEFT layers :func:`from_peft` converted too (their tensors are the
    fused layers')."""
    result = _peft_tuner_call(peft_model, "set_requires_grad", *args, **kwargs)
    for original in _converted(peft_model).values():
        original.set_requires_grad(*args, **kwargs)
    return result


#: PEFT's name, in ``adapter_names``, for a sample that runs the base model alone.
PEFT_BASE_NAME = "__base__"


def _peft_forward_hooks(peft_model: nn.Module, *args, **kwargs):
    """PEFT's tuner's ``_enable_peft_forward_hooks``, which the PeftModel's
    ``forward`` and ``generate`` enter: given ``adapter_names`` (a batch that
    mixes adapters: an adapter's name, or ``"__base__"``, a sample), it hands
    them to PEFT's layers alone, so that the fused layers ran their adapter on
    every sample, silently (or, where no PEFT layer was left, PEFT refused
    the names as "non-existing"). Where :func:`from_peft` converted layers,
    each fused layer gets ``adapter_ids`` instead (0 on the samples that name
    its adapter, -1 on the others: the base alone), and PEFT's layers and
    ``modules_to_save`` wrappers the names, as PEFT hands them (repeated for
    ``num_beams``, but not to an encoder's layers); merged fused layers take
    them too. A layer of several adapters gets each sample's adapter's index
    (-1 for ``"__base__"``). Names that no layer holds, or a model in training mode, are
    refused as PEFT refuses them (``ValueError``). Without either (every
    training step): PEFT's own context manager, nothing looked up or
    wrapped around it."""
    if kwargs.get("adapter_names") is None and kwargs.get("alora_offsets") is None:
        return _peft_tuner_call(peft_model, "_enable_peft_forward_hooks", *args, **kwargs)
    return _peft_forward_hooks_given(peft_model, *args, **kwargs)


@contextlib.contextmanager
def _peft_forward_hooks_given(peft_model: nn.Module, *args, **kwargs):
    """:func:`_peft_forward_hooks` given ``adapter_names`` or ``alora_offsets``."""
    names = kwargs.get("adapter_names")
    offsets = kwargs.get("alora_offsets")
    layers = _converted_layers(peft_model)
    converted = {n: original for n, (_, original) in layers.items()}
    if names is None and converted:
        # aLoRA (PEFT's offsets, a sample each): the fused aLoRA layers take them as PEFT's take them, through a
        # pre-hook while the block lasts (a recompute in the backward, after it: the layer's own forward's)
        handles = [m.register_forward_pre_hook(functools.partial(_alora_offsets_pre_forward_hook, offsets),
                                               with_kwargs=True)
                   for m in peft_model.modules() if isinstance(m, LoRALinear) and m.alora]
        try:
            with _peft_tuner_call(peft_model, "_enable_peft_forward_hooks", *args, **kwargs):
                yield
        finally:
            for handle in handles:
                handle.remove()
        return
    if names is None or not converted:
        with _peft_tuner_call(peft_model, "_enable_peft_forward_hooks", *args, **kwargs):
            yield
        return
    tuner = peft_model.base_model
    if offsets is not None:
        raise ValueError("adapter_names with alora_offsets (aLoRA) on a model from_peft converted: go back to PEFT "
                         "first (fused_lora.to_peft(model))")
    if tuner.training:
        raise ValueError("adapter_names (a batch that mixes adapters) is for inference: the model is in training "
                         "mode (model.eval() first)")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names (or {PEFT_BASE_NAME!r}), one a sample, "
                        f"got {names!r}")
    LoraLayer = _peft_lora_linear()[0]
    held = {name: _layer_adapters(layer, original) for name, (layer, original) in layers.items()}
    known = {adapter for adapters in held.values() for adapter in adapters}
    for m in tuner.modules():
        if isinstance(m, LoraLayer):
            known |= set(m.lora_A.keys()) | set(getattr(m, "lora_embedding_A", {}).keys())
    unknown = sorted({n for n in names if n != PEFT_BASE_NAME} - known)
    if unknown:
        raise ValueError(f"adapter_names: no layer holds adapter(s) {unknown} (the model's: {sorted(known)}, and "
                         f"{PEFT_BASE_NAME!r} for the base model)")
    beams = kwargs.get("num_beams")
    per_sample = [n for n in names for _ in range(beams)] if isinstance(beams, int) and beams > 1 else list(names)
    fused = {id(layers[name][0]): adapters for name, adapters in held.items()}
    kinds = (LoraLayer, *(k for k in _peft_adapter_kinds() if not issubclass(LoraLayer, k)))  # (+ wrappers)
    handles = []
    try:
        def hook_all(module: nn.Module, names: list) -> None:
            made = {}  # (the layers of one set of adapters share their ids: one check for them all)
            for m in module.modules():
                if id(m) in fused:
                    hook = functools.partial(_adapter_ids_pre_forward_hook, fused[id(m)], names,
                                             made.setdefault(fused[id(m)], {}))
                elif isinstance(m, kinds):
                    hook = functools.partial(_adapter_names_pre_forward_hook, names)
                else:
                    continue
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))

        hook_all(tuner, per_sample)
        encoder = tuner.model.get_encoder() if callable(getattr(tuner.model, "get_encoder", None)) else None
        if per_sample != list(names) and encoder is not None and encoder is not tuner.model:
            hook_all(encoder, list(names))  # (an encoder reads the samples before beam search repeats them)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapter_ids_pre_forward_hook(adapters: tuple[str, ...], names: list, on_device: dict, module, args, kwargs):
    """A fused layer's forward pre-hook under :func:`_peft_forward_hooks`:
    ``adapter_ids`` from the samples' adapter names (made once a device),
    the index of a sample's adapter among the layer's ``adapters``, -1 for
    the base alone (``"__base__"``, or an adapter the model holds in other
    layers only: PEFT's layer runs its base alone for it too)."""
    x = args[0] if args else kwargs["x"]
    if x.device not in on_device:
        ids = [adapters.index(n) if n in adapters else -1 for n in names]
        on_device[x.device] = torch.tensor(ids, device=x.device)
        if len(adapters) == 1:
            note_checked_adapter_ids(on_device[x.device], ids.count(0), ids.count(-1), own=True)  # (no sync)
    kwargs["adapter_ids"] = on_device[x.device]
    return args, kwargs


def _alora_offsets_pre_forward_hook(offsets: list, module, args, kwargs):
    """A fused aLoRA layer's forward pre-hook under :func:`_peft_forward_hooks`: PEFT's offsets, a sample each."""
    kwargs["alora_offsets"] = offsets
    return args, kwargs


def _adapter_names_pre_forward_hook(names: list, module, args, kwargs):
    """A PEFT layer's forward pre-hook under :func:`_peft_forward_hooks`: the names, as PEFT hands them."""
    kwargs["adapter_names"] = names
    return args, kwargs


def _peft_status(peft_model: nn.Module, method: str):
    """PEFT's ``get_layer_status()`` / ``get_model_status()``, which look for
    PEFT's layers only: PEFT's layers back in the fused ones' place for the
    call (the same tensors; merged weights left as they are), each given its
    fused layer's state (enabled, merged) meanwhile. A converted layer's
    status names the fused type (``fused_lora.LoRALinear``)."""
    originals = getattr(peft_model, _ORIGINALS, None) or {}
    with _peft_layers_back(peft_model, unmerge=False) as swapped:
        states = [(originals[name], originals[name]._disable_adapters, originals[name].merged_adapters)
                  for name, _ in swapped]
        try:
            for (name, layer), (original, _, _) in zip(swapped, states):
                original._disable_adapters = not layer.adapter_enabled
                original.merged_adapters = list(original.lora_A.keys()) if getattr(layer, "merged", False) else []
            result = getattr(type(peft_model), method)(peft_model)
        finally:
            for original, disabled, merged in states:
                original._disable_adapters, original.merged_adapters = disabled, merged
    if method == "get_layer_status":  # (names from the tuner, peft_model.base_model)
        fused = {name.removeprefix("base_model."): f"fused_lora.{type(layer).__name__}" for name, layer in swapped}
        result = [dataclasses.replace(status, module_type=fused[status.name]) if status.name in fused else status
                  for status in result]
    return result


def _peft_after_to_peft(peft_model: nn.Module, method: str, *args, **kwargs):
    to_peft(peft_model)
    return _peft_tuner_call(peft_model, method, *args, **kwargs)  # (PEFT's LoraModel's)


def _share_back(layer: LoRALinear | MultiLoRALinear, original: nn.Module) -> None:
    """PEFT's layer ``original`` given the tensors its fused ``layer`` holds
    now, before it goes back in the model: :func:`from_peft` made them shared,
    but ``load_state_dict(..., assign=True)``, ``to_empty()`` or a parameter
    set by hand since has put new ones in the fused layer alone (PEFT's
    layer would have come back with the old values, its ``save_pretrained``
    written them)."""
    base = original.get_base_layer()
    pairs = [(base, "bias", layer.bias)]
    pairs += [(holder, "weight", getattr(owner, attr)) for _, holder, owner, attr in _shared_pairs(layer, original)]
    if layer.quantized:  # (PEFT's weight itself, given the fused layer's bytes: _why_not_given_back)
        take_back_bytes(base, layer.weight)
    else:
        pairs.append((base, "weight", layer.weight))
    for owner, attr, tensor in pairs:
        if getattr(owner, attr) is not tensor:
            setattr(owner, attr, tensor)


def _parameters_in_use(model: nn.Module) -> set[int]:
    """The ids of the parameters ``model``'s modules hold (tied ones under each name)."""
    return {id(p) for _, p in model.named_parameters(remove_duplicate=False)}


def _let_go(layer: LoRALinear, original: nn.Module, in_use: set[int]) -> None:
    """PEFT's layer ``original``, kept aside while its fused ``layer`` is in
    place, lets go of the base weight the two share (:func:`_share_back`
    gives it the fused layer's again): kept, it would keep that weight whole
    where FSDP2 (``fully_shard``) puts shards in the fused layer's place, the
    base then taking its full memory on every process. A floating-point
    base: PEFT's base layer's ``weight`` (the fused layer's Parameter); a
    quantized one, which PEFT's own weight object holds: its bytes
    (:func:`fused_lora.layer.let_go_of_bytes`). (The adapters stay shared:
    PEFT's ``enable_adapters`` freezes and unfreezes them through it.) A
    quantized weight another module of the model holds too (``in_use``,
    :func:`_parameters_in_use`: tied) stays whole."""
    base = original.get_base_layer()
    if layer.quantized:
        if id(base.weight) not in in_use:
            let_go_of_bytes(base, layer.weight)
    elif base.weight is layer.weight:
        base.weight = None


def _keep_aside(model: nn.Module) -> None:
    """The modules that fused layers of ``model`` took their quantized weights
    from as they are, kept aside for :func:`unload` and :func:`to_peft`
    (:func:`fused_lora.layer.held_module`), let go of the bytes the fused
    layers read (:func:`fused_lora.layer.let_go_of_bytes`): called once the
    model's change stands (a load that fails puts those modules back whole).
    A weight another module of the model still holds (tied) stays whole."""
    layers = all_fused_layers(model)
    if not any(getattr(layer, "quantized", False) and held_module(layer) is not None for layer in layers.values()):
        return
    in_use = _parameters_in_use(model)
    for layer in layers.values():
        held = held_module(layer) if getattr(layer, "quantized", False) else None
        if held is not None and id(held.weight) not in in_use:
            let_go_of_bytes(held, layer.weight)


def _why_not_given_back(name: str, layer: nn.Module, base: nn.Module, since: str) -> str | None:
    """Why ``base``, the module whose quantized weight the fused ``layer``
    read as it is (PEFT's base layer for :func:`from_peft`, the module
    :func:`inject` fused: bitsandbytes' ``Linear4bit`` or ``Linear8bitLt``,
    torchao's int8 ``Linear``), kept aside, cannot take its place back (None
    where it can, or where the base is not quantized). It goes back with the
    fused layer's bytes (it let go of its own: :func:`fused_lora.layer.let_go_of_bytes`)
    and its own scales (absmax, code book): where the fused layer's scales
    are other values now (loaded since ``since``), that module cannot take
    them; where the model was moved to another device, which the module kept
    aside did not follow, it goes back once the model is moved back."""
    if not layer.quantized:
        return None
    code = layer._buffers.get("weight_code")
    fmt, kind = base_format(layer.weight, code), type(base).__name__
    if _is_sharded(layer.weight) or _fsdp1_flattened(layer.weight):
        return (f"{name}: its {fmt} base is sharded (FSDP), and the {kind} it came from takes its whole bytes "
                "back: save the adapters, and load them into the model unsharded")
    let_go = bytes_let_go(base)
    if let_go is not None:  # (its bytes the fused layer's: given them for the comparison, then let go again)
        device, size = let_go
        if layer.weight.device != device:
            return _moved_away(name, fmt, kind, layer.weight.device, device)
        if layer.weight.numel() * layer.weight.element_size() != size:
            return (f"{name}: its {fmt} base {tuple(layer.weight.shape)} is not the size of the {kind} it came "
                    f"from (loaded since {since})")
        take_back_bytes(base, layer.weight)
        try:
            return _why_not_given_back(name, layer, base, since)
        finally:
            let_go_of_bytes(base, layer.weight)
    held = _held_quantized(base.weight, base)
    if held is None:
        return f"{name}: the {kind} its {fmt} base came from holds no such weight any more"
    q, scale, held_code = held
    if q.device != layer.weight.device:
        return _moved_away(name, fmt, kind, layer.weight.device, q.device)
    same_code = (code is None) == (held_code is None) and (code is None or torch.equal(code, held_code))
    if not (torch.equal(layer.weight, q) and layer.weight_scale.dtype == scale.dtype
            and torch.equal(layer.weight_scale, scale) and same_code):
        return (f"{name}: its {fmt} base holds other values than the {kind} it came from (loaded since {since}), "
                f"which that {kind}'s weight cannot take")
    return None


def _moved_away(name: str, fmt: str, kind: str, now: torch.device, kept: torch.device) -> str:
    return (f"{name}: its {fmt} base is on {now}, and the {kind} it came from, kept aside, holds that weight on "
            f"{kept}: move the model back (model.to({str(kept)!r})) first, or do this before moving it")


def _check_given_back(peft_model: nn.Module, what: str) -> None:
    """Refuse, before anything changes, to put back PEFT's layers where one
    cannot take its quantized base back (:func:`_why_not_given_back`)."""
    originals = getattr(peft_model, _ORIGINALS, None) or {}
    for name, original in originals.items():
        layer = peft_model.get_submodule(name)
        why = _why_not_given_back(name, layer, original.get_base_layer(), "from_peft") \
            if isinstance(layer, (LoRALinear, MultiLoRALinear)) else None
        if why:
            raise ValueError(f"{what}: {why}")


def _peft_names_in(adapters: tuple[str, ...], base: str, module: nn.Module, state_dict: dict, prefix: str,
                   *_) -> None:
    """A ``load_state_dict`` pre-hook of each fused layer :func:`from_peft`
    made: the names PEFT's layer gave its tensors (``lora_A.<adapter>.weight``,
    ``<base>.weight``...: a state dict saved before the conversion), and in
    PEFT's files (``lora_A.weight``: ``set_peft_model_state_dict``, which
    PEFT 0.21 hands on so, for a layer of one adapter), read as the fused
    layer's own (a :class:`MultiLoRALinear`'s ``lora_A.<i>``, ``adapters[i]``'s).
    A quantized base keeps its names: bitsandbytes' and torchao's state is
    another layout than the fused layer's ``weight`` and ``weight_scale`` (a
    strict load names those keys missing, and PEFT's unexpected)."""
    if isinstance(module, MultiLoRALinear):
        pairs = [(f"{which}.{adapter}.weight", f"{which}.{i}") for i, adapter in enumerate(adapters)
                 for which in ("lora_A", "lora_B", "lora_magnitude_vector")]
    else:
        (adapter,) = adapters
        pairs = [(f"lora_A.{adapter}.weight", "lora_A"), ("lora_A.weight", "lora_A"),
                 (f"lora_B.{adapter}.weight", "lora_B"), ("lora_B.weight", "lora_B"),
                 (f"lora_magnitude_vector.{adapter}.weight", "lora_magnitude_vector"),
                 ("lora_magnitude_vector.weight", "lora_magnitude_vector")]
    found = False
    for peft_name, name in pairs + [(f"{base}.weight", "weight"), (f"{base}.bias", "bias")]:
        if name == "weight" and module.quantized:
            continue
        if prefix + peft_name in state_dict and prefix + name not in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + peft_name)
            found = True
    if found and isinstance(module, MultiLoRALinear):  # (PEFT's names: its layer has no adapter of rank 0)
        for i, r in enumerate(module.ranks):
            for which in ("lora_A", "lora_B"):
                if r == 0 and prefix + f"{which}.{i}" not in state_dict:
                    state_dict[prefix + f"{which}.{i}"] = getattr(module, which)[i].detach()


@contextlib.contextmanager
def _peft_layers_back(peft_model: nn.Module, unmerge: bool = True):
    """PEFT's original layers in the place of the fused ones inside the block
    (unmerged, unless not ``unmerge``; the fused layers back, as they were,
    on exit). Yields the ``(name, fused layer)`` pairs swapped out."""
    originals = getattr(peft_model, _ORIGINALS, None) or {}
    swapped = []
    try:
        for name, original in originals.items():
            layer = peft_model.get_submodule(name)
            if isinstance(layer, (LoRALinear, MultiLoRALinear)):
                merged = getattr(layer, "merged", False) and unmerge
                if merged:
                    layer.unmerge()
                _share_back(layer, original)
                _replace_module(peft_model, name, original)
                swapped.append((name, layer, merged))
        yield [(name, layer) for name, layer, _ in swapped]
    finally:
        for name, layer, merged in swapped:
            _replace_module(peft_model, name, layer)
        in_use = _parameters_in_use(peft_model) if swapped else set()  # (the fused layers back in place)
        for name, layer, merged in swapped:
            _let_go(layer, originals[name], in_use)
            if merged:
                layer.merge()


def _peft_state_dict_names(peft_model: nn.Module, state_dict: dict) -> dict:
    """A state dict of the model with fused layers, under the names it has
    with PEFT's layers (``q_proj.lora_A`` -> ``q_proj.lora_A.<adapter>.weight``,
    ``q_proj.weight`` -> ``q_proj.base_layer.weight``)."""
    renamed, rank_0 = {}, set()
    for name, original in (getattr(peft_model, _ORIGINALS, None) or {}).items():
        layer = peft_model.get_submodule(name)
        base = next(n for n, m in original.named_modules() if m is original.get_base_layer())
        renamed.update({f"{name}.weight": f"{name}.{base}.weight", f"{name}.bias": f"{name}.{base}.bias"})
        if isinstance(layer, MultiLoRALinear):  # (its adapters of rank 0, which PEFT's layer has not, dropped)
            for i, adapter in enumerate(getattr(layer, _PEFT_ADAPTERS)):
                for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
                    if adapter in original.lora_A:
                        renamed[f"{name}.{which}.{i}"] = f"{name}.{which}.{adapter}.weight"
                    else:
                        rank_0.add(f"{name}.{which}.{i}")
            continue
        (adapter,) = original.lora_A.keys()
        renamed.update({f"{name}.lora_A": f"{name}.lora_A.{adapter}.weight",
                        f"{name}.lora_B": f"{name}.lora_B.{adapter}.weight",
                        f"{name}.lora_magnitude_vector": f"{name}.lora_magnitude_vector.{adapter}.weight"})
    return {renamed.get(k, k): v for k, v in state_dict.items() if k not in rank_0}


def to_peft(model: nn.Module, *, adapter_name: str | None = None, adapter_names=None):
    """Go back to PEFT.

    * A model converted by :func:`from_peft`: its original PEFT layers are put
      back (merged fused layers are unmerged first), its methods are PEFT's
      again, and the model is returned (their adapters keep PEFT's names:
      ``adapter_name(s)`` given is refused).
    * A model with :func:`inject`-ed layers: the fused layers become plain
      linears again (those fused from a bitsandbytes 4-bit ``Linear4bit`` or a
      torchao int8 ``Linear``, that module: PEFT puts its own layers for
      them on it, QLoRA's) and ``peft.get_peft_model`` wraps the model with a
      ``LoraConfig`` that reproduces them, as adapter ``adapter_name``
      (default ``"default"``); PEFT's adapter parameters *are* the
      fused layers' (shared). Modules trained beside the adapters (a head
      unfrozen by hand) become PEFT's ``modules_to_save``: PEFT trains and
      saves a copy of each, made here with their current values; trained
      biases, PEFT's ``bias`` option (PEFT then trains every bias that option
      names). Returns the ``PeftModel``.
    * A model with :func:`inject_multi`'s (or :func:`load_adapters`')
      layers: the same, each adapter ``i`` one of PEFT's named adapters,
      ``adapter_names[i]`` (default ``"default"``, ``"adapter_1"``,
      ``"adapter_2"``...: adapter 0 is PEFT's first), of the layers where its
      rank is not 0, with its own rank and alpha (a ``rank_pattern`` where
      they differ by layer), the layers' dropout and rsLoRA. PEFT's first is
      active; ``set_adapter`` chooses another, and PEFT's mixed batch,
      ``peft_model(..., adapter_names=[name or "__base__", ...])`` (eval
      mode), runs each sample as :func:`adapter_ids` did. ``requires_grad``
      stays as it was on every adapter (PEFT's ``set_adapter`` sets it by
      its own rule). Modules trained beside them go to every adapter's
      ``modules_to_save`` (a copy each, all of the current values); trained
      biases, a part of the base every adapter would share, are refused.

    Raises ValueError, changing nothing, where FSDP1 or FSDP2 shards the
    fused layers (:func:`_check_can_replace`), or where an adapter has rank 0
    in every layer (PEFT has no adapter of no layer).
    """
    _check_model(model)
    originals = getattr(model, _ORIGINALS, None)
    if originals and (adapter_name is not None or adapter_names is not None):
        given = "adapter_name" if adapter_name is not None else "adapter_names"
        raise ValueError(f"to_peft: {given} names the adapters of layers inject made; this model came from PEFT "
                         "(from_peft), whose layers go back with the names PEFT gave their adapters: call "
                         "to_peft(model) alone")
    # (from_peft's layers over PEFT's quantized weights give them back: _check_given_back)
    _refuse_int8_bases({n: layer for n, layer in all_fused_layers(model).items() if n not in (originals or {})},
                       "to_peft", give_back=True)
    multi = {n: layer for n, layer in multi_fused_layers(model).items() if n not in (originals or {})}
    if multi:
        if adapter_name is not None:
            raise ValueError(f"to_peft: adapter_name={adapter_name!r} names the one adapter of inject's layers; this "
                             f"model's layers hold {len(next(iter(multi.values())).ranks)} adapters: name them with "
                             "adapter_names=[...]")
        if originals or _is_peft_model(model):
            raise ValueError("to_peft: the model is PEFT's and holds inject_multi's layers too, which PEFT did not "
                             "make: convert the plain model before PEFT wraps it")
        layers = multi
        names = _peft_adapter_names(adapter_names, len(next(iter(multi.values())).ranks))
    else:
        if adapter_names is not None:
            raise ValueError("to_peft: adapter_names names inject_multi's adapters, and the model has no layers of "
                             "several adapters: name the one adapter with adapter_name=...")
        layers = fused_layers(model)
        names = [_check_adapter_name("adapter_name", "default" if adapter_name is None else adapter_name)]
    _check_not_dispatched(model, list(layers), "to_peft")
    _check_can_replace(model, list(layers), "to_peft")
    _peft_lora_linear()  # (PEFT, and a version it works with)
    if originals and not multi:
        _check_given_back(model, "to_peft")
        for name, layer in all_fused_layers(model).items():
            if name in originals:
                if getattr(layer, "merged", False):
                    layer.unmerge()
                _share_back(layer, originals[name])
                originals[name].train(layer.training)  # (model.eval() since from_peft reached the fused layer alone)
                _replace_module(model, name, originals.pop(name))
        if not all_fused_layers(model):
            for method in _PEFT_METHODS:  # (PEFT's own again, on its tuner too)
                model.__dict__.pop(method, None)
            if _is_peft_model(model):
                for method in _TUNER_METHODS:
                    model.base_model.__dict__.pop(method, None)
        _tell_transformers(model)
        return model

    import peft

    if not layers:
        raise ValueError("the model has no fused LoRA layers to convert")
    wrapper = _wrapper(model)
    if wrapper is not None:  # (PEFT would wrap the wrapper: its names, and its files' keys, would hold the attribute)
        raise ValueError(f"to_peft: the model is a {wrapper[0]}: convert the model it wraps "
                         f"(model.{wrapper[1]}), then wrap PEFT's model again")
    if multi:  # adapter i of each layer where its rank is not 0, as save_adapter(..., adapter=i) writes it
        per_adapter = [{n: _OneAdapter.of(layer, i) for n, layer in multi.items() if layer.ranks[i]}
                       for i in range(len(names))]
        empty = [i for i, adapters in enumerate(per_adapter) if not adapters]
        if empty:
            raise ValueError(f"to_peft: adapter(s) {empty} have rank 0 in every layer: PEFT has no adapter of no "
                             "layer (give PEFT the others by their files: save_adapter(model, path, adapter=i))")
    else:
        per_adapter = [layers]
    saved, bias, _ = _beside_adapters(model, per_adapter[0])
    if multi and bias != "none":
        trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias"))
        raise ValueError(f"to_peft: trained biases ({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}) "
                         "are a part of the base that every adapter would share, which PEFT's several adapters "
                         "cannot (its bias option is one adapter's): freeze them, or save each adapter with "
                         "save_adapter(model, path, adapter=i)")
    configs = [peft.LoraConfig(**{k: v for k, v in _lora_config_dict(adapters, saved, bias).items()
                                  if k not in ("peft_type", "task_type", "base_model_name_or_path")})
               for adapters in per_adapter]
    modes = {name: module.training for name, module in model.named_modules()}
    for name, layer in layers.items():
        if getattr(layer, "merged", False):
            layer.unmerge()
        _replace_module(model, name, _plain_linear(layer))
    _tell_transformers(model)  # (a quantized model is that again for PEFT, which reads is_quantized)
    with warnings.catch_warnings():  # (PEFT sets fan_in_fan_out by each base's type, as the fused layers have it)
        warnings.filterwarnings("ignore", r"fan_in_fan_out is set to (True|False) but the target module is")
        for i, (adapter, lora_config) in enumerate(zip(names, configs)):
            if i == 0:
                peft_model = peft.get_peft_model(model, lora_config, adapter_name=adapter,
                                                 autocast_adapter_dtype=False)
            else:
                peft_model.add_adapter(adapter, lora_config)  # (its tensors, autocast or not, are replaced below)
    for name, layer in layers.items():  # (PEFT's own adapter tensors, set trainable or not by its rules, replaced)
        peft_layer = peft_model.base_model.model.get_submodule(name)
        _hand_hooks(peft_layer.get_base_layer(), peft_layer)  # (q_proj's hooks stay q_proj's: the PEFT layer's)
        for adapter, adapters in zip(names, per_adapter):
            if name in adapters:
                one = adapters[name]
                peft_layer.lora_A[adapter].weight = one.lora_A
                peft_layer.lora_B[adapter].weight = one.lora_B
                if getattr(one, "use_dora", False):
                    peft_layer.lora_magnitude_vector[adapter].weight = one.lora_magnitude_vector
                if one.dropout > 0:
                    peft_layer.lora_dropout[adapter] = nn.Dropout(one.dropout)
    _keep_modes(peft_model, modes)
    return peft_model


def _keep_modes(peft_model: nn.Module, modes: dict[str, bool]) -> None:
    """The train/eval modes of the model that PEFT wrapped (by module name,
    ``modes``) on the modules PEFT made: each of its layers, wrappers and
    their parts the mode of the module it took the place of (new modules are
    made in train mode: PEFT's dropout would run in an eval-mode model), the
    ``PeftModel`` and its tuner the model's."""
    for name, module in peft_model.base_model.model.named_modules():
        while name not in modes:  # (a part of a module PEFT made: the mode of what it replaced)
            name = name.rpartition(".")[0]
        module.training = modes[name]
    peft_model.training = peft_model.base_model.training = modes[""]


def _check_adapter_name(arg: str, name) -> str:
    """A PEFT adapter name: a non-empty ``str`` without a dot (a key of
    PEFT's ``ModuleDict`` s), other than its mixed batch's ``"__base__"``."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str (a PEFT adapter name), got {type(name).__name__}")
    if not name or "." in name or name == "__base__":
        raise ValueError(f"{arg} must be a non-empty name without a dot, and not PEFT's '__base__' (the base's rows "
                         f"in its mixed batch), got {name!r}")
    return name


def _peft_adapter_names(adapter_names, count: int) -> list[str]:
    """:func:`to_peft`'s names of inject_multi's ``count`` adapters, checked."""
    if adapter_names is None:
        return ["default"] + [f"adapter_{i}" for i in range(1, count)]
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of names, one an adapter, got {type(adapter_names).__name__}")
    if len(adapter_names) != count:
        raise ValueError(f"adapter_names must name each of the layers' {count} adapters, got {len(adapter_names)} "
                         f"names ({adapter_names!r})")
    names = [_check_adapter_name(f"adapter_names[{i}]", n) for i, n in enumerate(adapter_names)]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names must be distinct, got {adapter_names!r}")
    return names


def _peft_adapter_kinds() -> tuple[type, ...]:
    """PEFT's tuner-layer and auxiliary-wrapper (modules_to_save) classes,
    where PEFT is imported (without it, no model holds them). PEFT 0.14 and
    older have ``ModulesToSaveWrapper`` alone, with no base class for the
    wrappers (later ones derive from ``AuxiliaryTrainingWrapper``)."""
    utils = sys.modules.get("peft.tuners.tuners_utils")
    other = sys.modules.get("peft.utils.other")
    kinds = (getattr(utils, "BaseTunerLayer", None), getattr(other, "AuxiliaryTrainingWrapper", None),
             getattr(other, "ModulesToSaveWrapper", None))
    return tuple(k for k in kinds if k is not None)


def _peft_adapter_modules(model: nn.Module) -> list[nn.Module]:
    """PEFT's tuner layers and auxiliary wrappers (modules_to_save) in
    ``model``: those its ``disable_adapter`` turns off."""
    kinds = _peft_adapter_kinds()
    return [m for m in model.modules() if kinds and isinstance(m, kinds)]


#: On a fused layer inside :func:`rescale_adapters`: how many blocks hold it
#: (its ``merge()`` refuses meanwhile).
RESCALED = "_fused_lora_rescaled"


@contextlib.contextmanager
def rescale_adapters(model: nn.Module, multiplier: float):
    """Scale every adapter's term of ``model`` by ``multiplier`` inside the
    block: each fused layer's ``alpha`` (each of :func:`inject_multi`'s
    ``alphas``; with rsLoRA too: the scale is linear in alpha), and the
    ``scaling`` of PEFT's LoRA layers where :func:`from_peft` left some, as
    PEFT's ``peft.helpers.rescale_adapter_scale`` does (which finds PEFT's
    layers alone: on a converted model it would scale those and leave the
    fused ones as they are). With ``multiplier`` in [0, 1], WiSE-FT's
    interpolation between the base and the adapted model; DoRA's norm takes
    the scaled term too, as PEFT's. Blocks nest (the multipliers multiply);
    each layer is put back as it was on exit, exceptions included.

    Raises ValueError, changing nothing, on a model without adapters, or one
    with a merged adapter (its weight holds the adapter at its own scale:
    unmerge first); merging inside the block is refused likewise
    (``LoRALinear.merge``). Adapter files written inside the block
    (:func:`save_adapter`) hold the scaled alphas. TypeError for a
    multiplier that is not a real number; ValueError for one not finite."""
    _check_model(model)
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real):
        raise TypeError(f"rescale_adapters: multiplier must be a real number, got {type(multiplier).__name__}")
    multiplier = float(multiplier)
    if not math.isfinite(multiplier):
        raise ValueError(f"rescale_adapters: multiplier must be finite, got {multiplier}")
    fused = all_fused_layers(model)
    layers = list({id(layer): layer for layer in fused.values()}.values())
    lora_layer = getattr(sys.modules.get("peft.tuners.lora.layer"), "LoraLayer", None)
    named_peft = {n: m for n, m in model.named_modules() if isinstance(lora_layer, type) and isinstance(m, lora_layer)}
    peft_layers = list({id(m): m for m in named_peft.values()}.values())
    if not layers and not peft_layers:
        raise ValueError("rescale_adapters: the model has no adapters to rescale")
    merged = [n for n, m in (*fused.items(), *named_peft.items()) if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"rescale_adapters: {', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''} hold "
                         "their adapter merged into the base weight, at its own scale: unmerge first")
    saved = [(layer, layer.alphas if isinstance(layer, MultiLoRALinear) else layer.alpha) for layer in layers]
    peft_saved = [(m, dict(m.scaling)) for m in peft_layers]
    try:
        for layer, alpha in saved:
            layer.__dict__[RESCALED] = layer.__dict__.get(RESCALED, 0) + 1
            if isinstance(layer, MultiLoRALinear):
                layer.alphas = tuple(a * multiplier for a in alpha)
            else:
                layer.alpha = alpha * multiplier
        for m, scaling in peft_saved:
            m.scaling = {k: v * multiplier for k, v in scaling.items()}
        yield model
    finally:
        for layer, alpha in saved:
            if isinstance(layer, MultiLoRALinear):
                layer.alphas = alpha
            else:
                layer.alpha = alpha
            depth = layer.__dict__.pop(RESCALED, 1) - 1
            if depth:
                layer.__dict__[RESCALED] = depth
        for m, scaling in peft_saved:
            m.scaling = scaling


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run ``model`` as its base model inside the block: every fused layer
    computes ``x Wᵀ + b`` alone (merged ones too, and :func:`inject_multi`'s,
    which need no ids meanwhile), as do PEFT's LoRA layers
    and ``modules_to_save`` wrappers where :func:`from_peft` left some; each
    is put back as it was on exit, exceptions included. The reference
    model of DPO-style training without a copy (what PEFT's
    ``disable_adapter()`` is for: on a model converted by :func:`from_peft`,
    that method is this). Modules trained whole after :func:`inject` (a head
    unfrozen by hand) have no base version kept: they stay as trained.
    Raises ValueError when the model has no adapters."""
    _check_model(model)
    layers = list({id(layer): layer for layer in all_fused_layers(model).values()}.values())
    peft_modules = _peft_adapter_modules(model)
    if not layers and not peft_modules:
        raise ValueError("the model has no adapters to disable")
    enabled = [layer.adapter_enabled for layer in layers]
    peft_enabled = [not m.disable_adapters for m in peft_modules]
    try:
        for layer in layers:
            layer.adapter_enabled = False
        for m in peft_modules:
            m.enable_adapters(False)
        yield model
    finally:
        for layer, was in zip(layers, enabled):
            layer.adapter_enabled = was
        for m, was in zip(peft_modules, peft_enabled):
            if was:
                m.enable_adapters(True)


def _check_adapter_index(what: str, adapter, multi: dict) -> int | None:
    """``adapter`` (an index into :func:`inject_multi`'s layers' adapters)
    checked: required where ``multi`` holds layers, refused where not."""
    if not multi:
        if adapter is not None:
            raise ValueError(f"{what}: adapter={adapter!r} picks one of the adapters of inject_multi's layers; the "
                             "model has none")
        return None
    n = next(iter(multi.values())).num_adapters
    if adapter is None:
        raise ValueError(f"{what}: the model's fused layers hold {n} adapters each (inject_multi): name one, "
                         f"adapter=i with i in [0, {n})")
    adapter = check_int("adapter", adapter, 0)
    counts = {layer.num_adapters for layer in multi.values()}
    if adapter >= min(counts):
        raise ValueError(f"{what}: adapter must be in [0, {min(counts)}), the model's fused layers holding "
                         f"{sorted(counts)} adapters; got {adapter}")
    return adapter


def _check_adapters(what: str, adapter, weights, multi: dict):
    """``adapter`` and ``weights`` of :func:`merge_and_unload` and
    :func:`save_adapter`: as :func:`_check_adapter_index`, or, where
    ``adapter`` is a sequence or ``weights`` are given (inject_multi's layers
    only), several adapters combined, ``((i, w), ...)``
    (:func:`~fused_lora._validate.check_combination`)."""
    if weights is None and (adapter is None or isinstance(adapter, numbers.Integral)):
        return _check_adapter_index(what, adapter, multi)
    if not multi:
        if adapter is not None:
            raise ValueError(f"{what}: adapter={adapter!r} picks adapters of inject_multi's layers; the model has "
                             "none (its fused layers hold one adapter each: weights=w alone weighs it)")
        return None
    if adapter is None:
        raise ValueError(f"{what}: weights={weights!r} weigh the adapters adapter= names: name them, adapter=[i, ...]")
    counts = {layer.num_adapters for layer in multi.values()}
    combination = check_combination("adapter", adapter, weights, min(counts), f"{what}: ")
    if len(combination) > 1 or combination[0][1] != 1.0:
        dora = [(n, i) for n, layer in multi.items() for i, _ in combination if layer.use_dora[i]]
        if dora:
            raise ValueError(f"{what}: adapter {dora[0][1]} is DoRA ({dora[0][0]}...): its magnitude rescales the "
                             "whole weight, so it is not combined with others or weighted: merge or save it alone, "
                             "unweighted")
    return combination


def _single_weight(what: str, weights, layers: dict) -> float | None:
    """``weights`` of :func:`merge_and_unload` and :func:`save_adapter` on
    :func:`inject`'s layers (one adapter each): None, or one finite real
    number (alone, or the only one of a sequence), the adapter's term ``s·B
    A`` times it; refused where a layer is DoRA's (its magnitude rescales the
    whole weight, not the adapter's term alone)."""
    if weights is None:
        return None
    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            raise ValueError(f"{what}: the model's fused layers hold one adapter each: weights must be one number, "
                             f"got {len(weights)}")
        weights = weights[0]
    if isinstance(weights, bool) or not isinstance(weights, numbers.Real):
        raise TypeError(f"{what}: weights must be a real number (the adapter's weight), got {type(weights).__name__}")
    if not math.isfinite(weights):
        raise ValueError(f"{what}: weights must be finite, got {weights}")
    dora = [n for n, layer in layers.items() if getattr(layer, "use_dora", False)]
    if dora:
        raise ValueError(f"{what}: weights scale an adapter's term s·B·A, which DoRA's layers ({dora[0]}...) do not "
                         "add alone (their magnitude rescales the whole weight): merge or save them unweighted")
    return float(weights)


#: The dtypes ``dequantize`` may name.
_DEQUANTIZE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unload(model: nn.Module, merge: bool, adapter=None, dequantize=None, weights=None) -> list[str]:
    _check_model(model)
    what = "merge_and_unload" if merge else "unload"
    if dequantize is not None and dequantize not in _DEQUANTIZE_DTYPES:
        raise TypeError(f"{what}: dequantize must be None or a floating-point torch.dtype (one of "
                        f"{[str(d) for d in _DEQUANTIZE_DTYPES]}), got {dequantize!r}")
    if getattr(model, _ORIGINALS, None):  # (from_peft's layers not yet given back)
        raise ValueError("this model was converted from PEFT by from_peft: go back with fused_lora.to_peft(model), "
                         "then use PEFT's merge_and_unload() or unload()")
    layers = all_fused_layers(model)
    if not layers:
        raise ValueError("the model has no fused LoRA layers to unload")
    if dequantize is None:
        _refuse_int8_bases(layers, what, give_back=not merge)
    multi = {n: layer for n, layer in layers.items() if isinstance(layer, MultiLoRALinear)}
    adapter = _check_adapters(what, adapter, weights, multi) if merge else None
    scale = _single_weight(what, weights, layers) if merge and not multi else None  # (inject's layers, weighed)
    routed = [n for n, layer in layers.items() if _ROUTED in layer.__dict__]
    if routed:
        raise ValueError(f"{what}: inside a `with fused_lora.adapter_ids(model, ...)` block ({routed[0]}...): "
                         "leave it first")
    rescaled = [n for n, layer in layers.items() if RESCALED in layer.__dict__]
    if rescaled:
        raise ValueError(f"{what}: inside a `with fused_lora.rescale_adapters(model, ...)` block ({rescaled[0]}...), "
                         "whose scale the layers would keep after it: leave it first (to merge the adapters at a "
                         "strength: merge_and_unload(model, weights=...))")
    _check_not_dispatched(model, list(layers), what)
    _check_can_replace(model, list(layers), what)
    tied = _shared_weights(model, [(n, layer) for n, layer in layers.items()
                                   if not getattr(layer, "merged", False)]) if merge else {}
    if tied:
        raise ValueError("merging would change base weights that other modules share (tied weights, e.g. an "
                         "output layer tied to the input embedding), and so those modules too: "
                         + "; ".join(f"{n}.weight is also {', '.join(others)}" for n, others in tied.items())
                         + ". Untie them first (layer.weight = nn.Parameter(layer.weight.detach().clone()); a "
                         "transformers model: tie_word_embeddings=False), or drop the adapters with unload(model)")
    plain_by_id = {}
    for name, layer in layers.items():
        if id(layer) not in plain_by_id and dequantize is not None and layer.quantized:
            plain_by_id[id(layer)] = _dequantized_linear(layer, dequantize, merge, adapter, scale).train(
                layer.training)
        if id(layer) not in plain_by_id:  # (a layer reachable under two names becomes one plain layer)
            if isinstance(layer, MultiLoRALinear):
                if merge:
                    with torch.no_grad():  # (adapter: an index or a checked combination)
                        layer.weight.copy_(folded(layer, layer._delta_fp32(adapter)))
            elif merge and scale is not None:  # (the adapter's term times the weight, into a layer discarded)
                if layer.merged:
                    layer.unmerge()
                with torch.no_grad():
                    layer.weight.copy_(folded(layer, layer._delta_fp32(scale)))
            elif merge and not layer.merged:
                layer.merge()
            elif not merge and layer.merged:
                layer.unmerge()
            plain_by_id[id(layer)] = _plain_linear(layer).train(layer.training)
        _replace_module(model, name, plain_by_id[id(layer)])
    _unguard_fast_paths(model)
    _tell_transformers(model)
    if dequantize is not None:
        _forget_quantization(model, what, [n for n, layer in layers.items() if getattr(layer, "quantized", False)])
    return list(layers)


def _quantized_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters that hold a quantized weight: of
    an integer dtype (bitsandbytes' packed 4-bit and int8 values, a fused
    layer's int8 or 4-bit base) or a tensor subclass (torchao's)."""
    return [n for n, p in module.named_parameters()
            if not p.is_floating_point() or type(p.data) is not torch.Tensor]


def _forget_quantization(model: nn.Module, what: str, floated: list[str]) -> None:
    """After ``dequantize`` made the quantized layers of ``model`` floating
    point (``floated``: their names in ``model``): each transformers model in
    it (``model`` or a module inside it, loaded with a
    ``quantization_config``: it holds an ``hf_quantizer``) whose parameters
    are all floating point now forgets its quantization as its own
    ``dequantize()`` does (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``...; the ``is_loaded_in_4bit`` /
    ``is_loaded_in_8bit`` flags too), so that its ``save_pretrained`` writes
    the floating-point checkpoint it now is, which ``from_pretrained`` loads
    as such (with the quantization config kept, it would build the
    quantized layers again and fail to run on the float weights). One with
    quantized layers left (those not fused, QLoRA's model adapted on some
    layers) keeps its config, the floated layers added to the modules it
    does not convert (:func:`_skip_in_config`): its checkpoint then loads
    as the mix it is, each layer as it was saved; where the config has no
    such list, a warning says so."""
    for name, owner in model.named_modules():
        quantizer = getattr(owner, "hf_quantizer", None)
        if quantizer is None:
            continue
        left = _quantized_parameters(owner)
        if left:
            prefix = f"{name}." if name else ""
            mine = [n[len(prefix):] for n in floated if n.startswith(prefix)]
            if not _skip_in_config(owner, mine):
                shown = ", ".join(prefix + n for n in left[:3]) + (", ..." if len(left) > 3 else "")
                warnings.warn(f"{what}: the transformers model {name or '(the model)'} keeps its quantization_config: "
                              f"quantized weights are left in it ({shown}: layers that were not fused), and its "
                              "config has no list of modules not to quantize, so its save_pretrained would write "
                              "float layers under a quantized model's config, which from_pretrained does not load as "
                              "such. Fuse every quantized layer before, or dequantize the rest (transformers' "
                              "model.dequantize())", UserWarning, stacklevel=4)
            continue
        remove = getattr(quantizer, "remove_quantization_config", None)
        if callable(remove):
            remove(owner)
        else:  # (transformers before remove_quantization_config: what it does)
            for attr in ("hf_quantizer", "quantization_method"):
                owner.__dict__.pop(attr, None)
            if hasattr(owner.config, "quantization_config"):
                del owner.config.quantization_config
            owner.is_quantized = False
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            owner.__dict__.pop(flag, None)


#: The quantization configs' lists of modules left unquantized when loading (bitsandbytes', torchao's...).
_SKIP_LISTS = ("llm_int8_skip_modules", "modules_to_not_convert")


def _skip_in_config(owner: nn.Module, names: list[str]) -> bool:
    """Add ``names`` (modules of the transformers model ``owner``, now
    floating point) to the modules its quantization config leaves
    unquantized when loading (bitsandbytes' ``llm_int8_skip_modules``,
    torchao's and others' ``modules_to_not_convert``), so that
    ``from_pretrained`` builds them as the float layers they are; the list
    the quantizer used (its default, ``lm_head``...) is kept, as a config
    that names any replaces that default. False where the config has no
    such list."""
    if not names:  # (nothing made float in this model: its config describes it as it is)
        return True
    config = getattr(owner.config, "quantization_config", None)
    field = next((f for f in _SKIP_LISTS if (f in config if isinstance(config, dict) else hasattr(config, f))), None)
    if field is None:
        return False
    current = config[field] if isinstance(config, dict) else getattr(config, field)
    if current is None:  # (the quantizer's own choice, made at load)
        current = getattr(owner.hf_quantizer, "modules_to_not_convert", None)
    merged = list(dict.fromkeys([*(current or []), *names]))
    if isinstance(config, dict):
        config[field] = merged
    else:
        setattr(config, field, merged)
    return True


def _dequantized_linear(layer: LoRALinear | MultiLoRALinear, dtype: torch.dtype, merge: bool, adapter,
                        scale: float | None = None) -> nn.Module:
    """The plain layer of a fused one's quantized base, made floating point:
    Ŵ (the exact product of its values and scales, in fp32), with, for
    ``merge``, the adapter folded in (``s·B·A``, DoRA's ``γ ⊙ (Ŵ + s·B A) - Ŵ``;
    a layer of several adapters: ``adapter``'s, or the weighted sum of a
    combination's; one adapter's times ``scale``), rounded once to ``dtype``; an
    ``nn.Linear``, or a ``Conv1D`` where the base was quantized from one; the
    bias shared, or cast to ``dtype``. Frozen, as the fused layer's base."""
    with torch.no_grad():
        w = dequantize_base(layer.weight.detach(), layer.weight_scale, torch.float32,
                            layer._buffers.get("weight_code"))
        if merge:
            w = w + (layer._delta_fp32(adapter) if isinstance(layer, MultiLoRALinear)
                     else layer._delta_fp32(1.0 if scale is None else scale))
    conv1d = quantized_from_fan_in_fan_out(layer)
    if conv1d and _conv1d_class() is None:
        raise ImportError("a layer quantized from a Conv1D goes back to transformers' Conv1D: install transformers")
    with torch.device("meta"):
        plain = (_conv1d_class()(layer.out_features, layer.in_features) if conv1d
                 else nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None))
    plain.weight = nn.Parameter((w.t() if conv1d else w).contiguous().to(dtype), requires_grad=False)
    bias = layer.bias
    if bias is not None and bias.dtype != dtype:
        bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
    plain.bias = bias
    return plain


def _refuse_int8_bases(layers: dict[str, nn.Module], what: str, give_back: bool = False) -> None:
    """Refuse fused layers with a quantized base (``quantize_base``, or
    torchao's int8 and bitsandbytes' 4-bit weights taken as they are): a plain
    layer cannot hold it, and the floating-point base is gone. With
    ``give_back`` (unload, to_peft), a layer made from a module whose weight it
    took as it is (:func:`fused_lora.layer.held_module`) gives that module
    back, where it can (:func:`_why_not_given_back`)."""
    quantized = [n for n, layer in layers.items() if getattr(layer, "quantized", False)
                 and not (give_back and held_module(layer) is not None)]
    if quantized:
        raise ValueError(f"{what}: {', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''} hold a "
                         "quantized base, int8 or 4-bit (quantize_base, or torchao's int8 or bitsandbytes' 4-bit "
                         "weights), which a plain layer cannot hold, "
                         "and the floating-point base is gone: save the adapters (fused_lora.save_adapter) and "
                         "load them into the floating-point model (fused_lora.load_adapter, or PEFT's "
                         "PeftModel.from_pretrained)"
                         + (f", or {what}(model, dequantize=torch.bfloat16) for plain layers on the dequantised base"
                            f"{', the adapters merged into it' if what == 'merge_and_unload' else ''}"
                            if what in ("merge_and_unload", "unload") else "")
                         + ("" if give_back else "; a bitsandbytes or torchao module fused as it was comes back with "
                            "unload, not merged"))
    if give_back:
        for name, layer in layers.items():
            held = held_module(layer) if getattr(layer, "quantized", False) else None
            why = held is not None and _why_not_given_back(name, layer, held, "inject")
            if why:
                raise ValueError(f"{what}: {why}")


def _shared_weights(model: nn.Module, layers) -> dict[str, list[str]]:
    """For each ``(name, layer)`` whose base weight other modules of ``model``
    hold too (tied weights): the other parameters' names."""
    holders = collections.defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False):
            holders[id(p)].append((module, f"{module_name}.{param_name}" if module_name else param_name))
    shared = {}
    for name, layer in layers:
        others = sorted({n for m, n in holders[id(layer.weight)] if m is not layer})
        if others:
            shared[name] = others
    return shared


def merge_and_unload(model: nn.Module, *, adapter=None, dequantize: torch.dtype | None = None,
                     weights=None) -> list[str]:
    """Fold each fused layer's adapter into its base weight (``W + s·B·A``,
    computed in fp32 and rounded once to W's dtype, as
    :meth:`LoRALinear.merge`) and put a plain layer back in its place: an
    ``nn.Linear`` (transformers' ``Conv1D`` for a ``fan_in_fan_out`` layer)
    holding the same weight and bias Parameters, now merged. The model is the
    base architecture again, with no adapter and no fused_lora in it: its
    ``state_dict`` loads into a fresh copy of the base model (``strict=True``)
    and computes what the fused model computed in eval mode. Base parameters
    keep the ``requires_grad`` that :func:`inject` gave them (frozen); torch's
    transformer fast paths are given back (:func:`guard_fast_paths`).

    Returns the names of the replaced layers. Raises ValueError, changing
    nothing, on a model without fused layers, one converted by
    :func:`from_peft` (go back with :func:`to_peft` and use PEFT's
    ``merge_and_unload``), or one where a base weight to merge into is
    shared with another module (tied weights: an output layer tied to the
    input embedding, whose merge would change the embedding too; PEFT merges
    it, with a warning), or one whose fused layers FSDP1 or FSDP2 shards
    (:func:`_check_can_replace`: merge in the model unsharded, loading the
    adapters saved from the sharded one).

    :func:`inject_multi`'s layers (several adapters each) fold in the
    adapter ``adapter=i`` names (required there), the others dropped: the
    base model with that one adapter, to deploy alone. ``adapter=[i, j,
    ...]``, with ``weights=[w_i, w_j, ...]`` (one number each; None: 1
    each), folds in their weighted sum, ``W + Σ w_i · s_i · B_i A_i``, made
    in fp32 in the order given and rounded once: several adapters combined
    into one model (a blend, or task arithmetic with negative weights).
    Distinct indices in range, finite weights, or a ``ValueError``
    (``TypeError`` for the wrong types) before anything changes. On
    :func:`inject`'s layers (one adapter each) ``weights=w``, one number,
    folds in ``W + w · s · B A``: the adapter at that strength (not DoRA's,
    whose magnitude rescales the whole weight: refused).

    A quantized base (``quantize_base``, bitsandbytes' ``Linear4bit``,
    torchao's int8) is refused, as merging would requantize it, unless
    ``dequantize`` names a floating-point dtype: its layer then becomes a
    plain one holding ``Ŵ + s·B·A`` (Ŵ the exact product of the base's
    values and scales, the sum made in fp32 and rounded once to
    ``dequantize``), its bias cast to that dtype: QLoRA's merged model in
    16 bits, to deploy. (``dequantize`` leaves floating-point bases as they
    are.) A transformers model inside ``model`` loaded quantized (its
    ``hf_quantizer``) then forgets its quantization, as its own
    ``dequantize()`` does, where no quantized weight is left in it, so that
    its ``save_pretrained`` writes the float checkpoint it now is
    (:func:`_forget_quantization`; with quantized layers left unfused it
    keeps the config, the dequantized layers added to the modules it leaves
    unquantized, so that the mixed checkpoint loads as it was saved).
    """
    return _unload(model, merge=True, adapter=adapter, dequantize=dequantize, weights=weights)


def unload(model: nn.Module, *, dequantize: torch.dtype | None = None) -> list[str]:
    """Put plain layers back in place of the fused ones, their adapters
    dropped: the base model as it was before :func:`inject` (merged layers are
    unmerged first, restoring their weights bit for bit; a layer fused from
    a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` or a torchao int8
    ``Linear``, its weight taken as it was, gets that module back, given the
    bytes it let go of while fused (:func:`_keep_aside`); with
    ``dequantize``, a floating-point dtype, any quantized base becomes a
    plain layer holding Ŵ in that dtype instead). Otherwise as
    :func:`merge_and_unload` (which refuses a quantized base without
    ``dequantize``: merging would requantize it). A transformers model
    loaded quantized forgets its quantization as with
    :func:`merge_and_unload`."""
    return _unload(model, merge=False, dequantize=dequantize)


def _plain_linear(layer: LoRALinear | MultiLoRALinear) -> nn.Module:
    """The plain layer of a fused one's base: an ``nn.Linear`` (a Conv1D for
    ``fan_in_fan_out``) holding its weight and bias, or, a base taken as it
    was from a bitsandbytes or torchao module, that module (given the
    layer's bias, where it holds another now)."""
    held = held_module(layer) if layer.quantized else None
    if held is not None:
        take_back_bytes(held, layer.weight)  # (its bytes, which it let go of while the fused layer read them)
        if held.bias is not layer.bias:
            held.bias = layer.bias
        return held
    if layer.fan_in_fan_out:
        conv1d = _conv1d_class()
        if conv1d is None:
            raise ImportError("a fan_in_fan_out layer goes back to transformers' Conv1D: install transformers")
        with torch.device("meta"):
            plain = conv1d(layer.out_features, layer.in_features)
    else:
        with torch.device("meta"):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


# ----------------------------------------------------------------------------
# PEFT's adapter format
# ----------------------------------------------------------------------------

def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _active_copy(module: nn.Module, name: str) -> nn.Module | None:
    """The trained copy inside PEFT's ``ModulesToSaveWrapper`` (its active
    adapter's), or None when ``module`` is not one. Raises ValueError for
    PEFT's other auxiliary wrappers (trainable tokens), which PEFT's LoRA file
    format holds differently."""
    if not hasattr(module, "original_module"):
        return None
    copies = getattr(module, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict):
        raise ValueError(f"{name}: PEFT's {type(module).__name__} (e.g. trainable_token_indices) is not supported")
    active = module.active_adapter
    active = active if isinstance(active, str) else (active[0] if len(active) == 1 else None)
    if active not in copies:
        raise ValueError(f"{name}: PEFT's modules_to_save wrapper has no single active copy "
                         f"(active {module.active_adapter!r}, copies {list(copies)})")
    return copies[active]


def _beside_adapters(model: nn.Module, layers: dict[str, LoRALinear]) \
        -> tuple[dict[str, nn.Module], str, dict[str, nn.Parameter]]:
    """What PEFT's format keeps beside the adapters: ``(modules_to_save, bias,
    other biases)``.

    * ``modules_to_save``, by name in ``model``: the trained copy in each of
      PEFT's ``ModulesToSaveWrapper`` (a model converted by
      :func:`from_peft`, e.g. a classification head PEFT made trainable), and
      the module owning each other trainable parameter but a bias (e.g. a
      head unfrozen by hand after :func:`inject`; the outermost such module
      where they nest).
    * PEFT's ``bias`` option, for trainable biases outside those modules:
      ``"lora_only"`` where they are fused layers' (the file then holds every
      fused layer's bias), ``"all"`` where others train too (the file then
      holds every bias of the model, as PEFT writes it), else ``"none"``;
      with ``"all"`` the biases of the modules that are not fused layers, by
      owner name.

    Raises ValueError for trainable parameters the format cannot hold: a
    fused layer's base weight, or the root model's own; and where PEFT's own
    LoRA layers are left (:func:`from_peft`'s report), which this package
    does not write."""
    adapters = {id(p) for layer in layers.values()
                for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", None))}
    # (inject_multi's other adapters: not this file's, nor trained beside it)
    adapters |= {id(p) for m in model.modules() if isinstance(m, MultiLoRALinear)
                 for p in (*m.lora_A, *m.lora_B, *m.lora_magnitude_vector.values())}
    peft_layers = [n for n, m in model.named_modules()
                   if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    if peft_layers:
        raise ValueError(f"PEFT LoRA layers that from_peft left as they were ({peft_layers}) are not fused: save "
                         "with PEFT (fused_lora.to_peft(model), then save_pretrained)")
    saved, covered = {}, set()
    for name, module in model.named_modules():
        copy = _active_copy(module, name)
        if copy is not None:
            saved[name] = copy
            covered |= {id(p) for p in module.parameters()}
    unsupported, trained_biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in adapters or id(p) in covered:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if owner_name and attr == "bias":
            trained_biases.append((owner_name, owner))
        elif not owner_name or isinstance(owner, FUSED_KINDS):
            unsupported.append(name)
        elif not any(owner_name.startswith(s + ".") for s in saved):  # (parents come first)
            saved[owner_name] = owner
    if unsupported:
        raise ValueError(f"PEFT's format cannot hold these trainable parameters: {unsupported} (a fused layer's "
                         "base weight, or the model's own): freeze them, or save them yourself")

    def beside(owner_name):  # (in a module kept whole, or in one of PEFT's wrappers)
        return any(owner_name == s or owner_name.startswith(s + ".") for s in saved)

    trained_biases = [(n, m) for n, m in trained_biases if not beside(n)]
    if not trained_biases:
        return saved, "none", {}
    if all(isinstance(m, FUSED_KINDS) for _, m in trained_biases):
        return saved, "lora_only", {}
    others = {n: m.bias for n, m in model.named_modules() if n and not isinstance(m, FUSED_KINDS) and not beside(n)
              and isinstance(m._parameters.get("bias"), nn.Parameter) and id(m.bias) not in covered}
    return saved, "all", others


def _alpha_value(alpha):
    """An alpha as adapter_config.json holds it: an int where it is whole."""
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _lora_config_dict(layers: dict[str, LoRALinear], modules_to_save=None, bias: str = "none") -> dict:
    """adapter_config.json for these layers: the most common r/alpha, with
    rank_pattern/alpha_pattern for the layers that differ. ``fan_in_fan_out``
    is the most common too: PEFT sets it per layer by the base's type
    (``Conv1D`` True, ``nn.Linear`` False, whatever the config says), as
    :func:`load_adapter` does, so GPT-2's Conv1D blocks and a linear head
    share one file."""
    names = {_strip(n): layer for n, layer in layers.items()}

    def uniform(attr, what, default=None):
        values = {getattr(layer, attr, default) for layer in names.values()}
        if len(values) > 1:
            raise ValueError(f"PEFT's format has one {what} per adapter, but the layers differ: "
                             + ", ".join(f"{n}={getattr(layer, attr, default)!r}" for n, layer in names.items()))
        return values.pop()

    def most_common(attr):
        return collections.Counter(getattr(layer, attr) for layer in names.values()).most_common(1)[0][0]

    r, alpha = most_common("r"), most_common("alpha")
    alpha_out = _alpha_value(alpha)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha_out,
        "lora_dropout": uniform("dropout", "lora_dropout"),
        "use_rslora": uniform("use_rslora", "use_rslora"),
        "fan_in_fan_out": most_common("fan_in_fan_out"),
        "target_modules": sorted(names),
        "rank_pattern": {n: layer.r for n, layer in names.items() if layer.r != r},
        "alpha_pattern": {n: _alpha_value(layer.alpha) for n, layer in names.items() if layer.alpha != alpha},
        "bias": bias,
        # (from_peft's layers of a PiSSA/OLoRA... adapter: their base is the residual, which PEFT makes again)
        "init_lora_weights": uniform(_RESIDUAL_INIT, "init_lora_weights", True),
        "inference_mode": False,
        "modules_to_save": sorted(_strip(n) for n in modules_to_save) if modules_to_save else None,
        "use_dora": uniform("use_dora", "use_dora", False),
    }


@dataclass(frozen=True)
class _OneAdapter:
    """Adapter ``i`` of a :class:`MultiLoRALinear`, as PEFT's format sees a
    layer (what :func:`save_adapter` reads of a :class:`LoRALinear`): its
    parameters themselves, not copies."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    bias: nn.Parameter | None
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    fan_in_fan_out: bool
    use_dora: bool = False
    lora_magnitude_vector: nn.Parameter | None = None

    @classmethod
    def of(cls, layer: MultiLoRALinear, i: int) -> "_OneAdapter":
        return cls(layer.lora_A[i], layer.lora_B[i], layer.bias, layer.ranks[i], layer.alphas[i], layer.dropouts[i],
                   layer.use_rslora, layer.fan_in_fan_out, layer.use_dora[i], layer.magnitude(i))

    @classmethod
    def combined(cls, layer: MultiLoRALinear, combination) -> "_OneAdapter | None":
        """Several adapters of ``layer`` as one, exactly their weighted sum
        ``Σ w_i · s_i · B_i A_i`` (PEFT's ``add_weighted_adapter`` of
        ``combination_type="cat"``): the ranks side by side, A_i times
        ``w_i · s_i`` (made in fp32, rounded once to A's dtype), B_i as it
        is, of scale 1 (alpha = r, no rsLoRA); the first adapter's dropout.
        Copies, not the layer's parameters. None where every one of them has
        rank 0 in this layer."""
        kept = [(i, w) for i, w in combination if layer.ranks[i]]
        if not kept:
            return None
        a = torch.cat([(layer.lora_A[i].detach().float() * (w * layer.scalings[i])).to(layer.lora_A[i].dtype)
                       for i, w in kept])
        b = torch.cat([layer.lora_B[i].detach() for i, _ in kept], dim=1)
        r = a.shape[0]
        return cls(a, b, layer.bias, r, float(r), layer.dropouts[combination[0][0]], False, layer.fan_in_fan_out)


def _adapters_to_write(model: nn.Module, adapter, what: str, weights=None) -> dict:
    """The layers whose adapter :func:`save_adapter` writes: :func:`inject`'s,
    or adapter ``adapter`` of each of :func:`inject_multi`'s, or a
    combination of several (``adapter`` a sequence, or ``weights`` given:
    :meth:`_OneAdapter.combined`)."""
    single, multi = fused_layers(model), multi_fused_layers(model)
    if single and multi:
        raise ValueError(f"{what}: the model holds fused layers of both kinds, one adapter ({next(iter(single))}...) "
                         f"and several ({next(iter(multi))}...): PEFT's file holds one adapter a layer")
    adapter = _check_adapters(what, adapter, weights, multi)
    if multi and not isinstance(adapter, int) and len(adapter) == 1 and adapter[0][1] == 1.0:
        adapter = adapter[0][0]  # (one adapter, weighing 1: that adapter's own file)
    if multi and not isinstance(adapter, int):
        involved = [f"{n}.{kind}.{i}" for n, layer in multi.items() for i, _ in adapter
                    for kind in ("lora_A", "lora_B") if _is_sharded(getattr(layer, kind)[i])
                    or _fsdp1_flattened(getattr(layer, kind)[i])]
        if involved:
            raise ValueError(f"{what}: combining adapters reads their whole tensors, and {involved[0]}... is sharded "
                             "(FSDP): save each adapter (adapter=i), or combine in the unsharded model")
        layers = {n: one for n, layer in multi.items() if (one := _OneAdapter.combined(layer, adapter)) is not None}
        if not layers:
            raise ValueError(f"{what}: adapters {[i for i, _ in adapter]} have rank 0 in every layer: there is "
                             "nothing of them to save")
        return layers
    if multi:
        # (a layer where the adapter has rank 0 holds none of it: not one of its target modules)
        layers = {n: _OneAdapter.of(layer, adapter) for n, layer in multi.items() if layer.ranks[adapter]}
        if not layers:
            raise ValueError(f"{what}: adapter {adapter} has rank 0 in every layer: there is nothing of it to save")
        return layers
    return single


def save_adapter(model: nn.Module, directory, *, adapter=None, weights=None) -> Path:
    """Write the model's fused adapters in PEFT's format: ``adapter_model.safetensors``
    (keys ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, and
    DoRA's ``.lora_magnitude_vector``) and ``adapter_config.json``
    (``use_dora``, which the layers must agree on). Trained modules beside the adapters go in too, as
    PEFT's ``modules_to_save`` (keys ``base_model.model.<path>.<state key>``):
    those PEFT made trainable in a model converted by :func:`from_peft` (a
    classification head), and any module with a trainable parameter outside
    the adapters other than a bias (a head unfrozen by hand); trained biases
    go in as PEFT's ``bias`` option (``"lora_only"``, ``"all"``:
    :func:`_beside_adapters`). ``peft.PeftModel.from_pretrained(base,
    directory)`` then reproduces the model's outputs. Files are written
    atomically. A model sharded by FSDP2 (``fully_shard``) or FSDP1 (the
    ``FullyShardedDataParallel`` module, not the model inside: that one
    cannot gather parameters sharded by a wrapper outside it, ValueError):
    call it on every rank; the full tensors are gathered (a collective;
    under FSDP1 one unit at a time), rank 0 writes, and every rank returns
    once the files exist. The names in the files are
    those of the model inside any wrapper (without torch.compile's
    ``_orig_mod``, DDP's ``module``, torch's checkpoint wrapper's), as in
    PEFT's own files. Raises ValueError when the model has no fused layers,
    or trainable parameters the format cannot hold (a fused layer's base
    weight).

    :func:`inject_multi`'s layers: the file holds adapter ``adapter=i``
    (required there) of each, PEFT's adapter of that rank and alpha
    (``PeftModel.from_pretrained`` loads it alone, :func:`load_adapter`
    into adapter i); the other adapters are not in it. ``adapter=[i, j,
    ...]`` with ``weights=[w_i, w_j, ...]`` (None: 1 each) writes one
    adapter that is exactly their weighted sum, ``Σ w_i · s_i · B_i A_i``
    (PEFT's ``add_weighted_adapter`` of ``combination_type="cat"``): each
    layer's rank the sum of theirs there, its A_i times ``w_i · s_i`` (made in
    fp32, rounded once to the adapters' dtype), alpha = r, and the first
    one's dropout; checked as :func:`merge_and_unload`'s (refused on
    sharded adapters: combine in the unsharded model). On :func:`inject`'s
    layers ``weights=w``, one number, writes the adapter at that strength:
    its alphas times w (``lora_alpha``, ``alpha_pattern``), its tensors as
    they are (not DoRA's: refused)."""
    layers = _adapters_to_write(_check_model(model), adapter, "save_adapter", weights)
    alora = [n for n, layer in layers.items() if getattr(layer, "alora", False)]
    if alora:  # (the invocation tokens are PEFT's config's: a file without them would load as plain LoRA)
        raise ValueError(f"save_adapter: {alora[0]}... holds an aLoRA adapter, whose invocation tokens are the PEFT "
                         "model's config's: save with PEFT's save_pretrained (which the converted model takes)")
    if not layers:
        raise ValueError("the model has no fused LoRA layers to save")
    single = all(isinstance(layer, LoRALinear) for layer in layers.values())
    scale = _single_weight("save_adapter", weights, layers) if single else None
    tensors, config, gathered = _adapter_tensors(model, layers)
    if scale is not None:  # (the adapter at that strength: its alphas times the weight, its tensors as they are)
        config["lora_alpha"] = _alpha_value(config["lora_alpha"] * scale)
        config["alpha_pattern"] = {n: _alpha_value(a * scale) for n, a in config["alpha_pattern"].items()}
    directory = Path(directory)
    if gathered and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            _write_adapter(directory, tensors, config)
        torch.distributed.barrier()  # (the files exist on every rank's return)
    else:
        _write_adapter(directory, tensors, config)
    return directory


def _adapter_tensors(model: nn.Module, layers: dict[str, LoRALinear]) -> tuple[dict, dict, bool]:
    """For :func:`save_adapter`: ``(tensors, config, gathered)``: the file's
    tensors under PEFT's keys (whole copies, on the host: :func:`_on_host`),
    its config, and whether shards were gathered to make them."""
    public = _public_names(model)  # (torch.compile's, DDP's... wrappers left out of the names)
    saved, bias, other_biases = _beside_adapters(model, layers)
    extra = {public[n]: m for n, m in saved.items()}
    layers = {public[n]: layer for n, layer in layers.items()}
    config = _lora_config_dict(layers, extra, bias)
    biases = {}  # (PEFT's keys for its bias option: <LoRA layer>.base_layer.bias, <other module>.bias)
    if bias != "none":
        biases = {f"{_strip(n)}.base_layer.bias": layer.bias for n, layer in layers.items() if layer.bias is not None}
        biases.update({f"{_strip(public[n])}.bias": b for n, b in other_biases.items()})
    wanted = []  # (key, the tensor itself: a Parameter whose data FSDP1 swaps when it gathers)
    for name, layer in layers.items():
        path = _strip(name)
        wanted += [(f"{PEFT_PREFIX}{path}.lora_A.weight", layer.lora_A), (f"{PEFT_PREFIX}{path}.lora_B.weight",
                                                                          layer.lora_B)]
        if getattr(layer, "use_dora", False):  # (PEFT's key: no ".weight")
            wanted.append((f"{PEFT_PREFIX}{path}.lora_magnitude_vector", layer.lora_magnitude_vector))
    for name, module in extra.items():
        wanted += [(f"{PEFT_PREFIX}{_strip(name)}.{k}", v) for k, v in module.state_dict(keep_vars=True).items()]
    wanted += [(PEFT_PREFIX + key, value) for key, value in biases.items()]
    on_meta = [f"{n}.{w}" for n, layer in layers.items() for w in ("lora_A", "lora_B", "lora_magnitude_vector")
               if getattr(layer, w, None) is not None and getattr(layer, w).device.type == "meta"]
    on_meta += [f"{n}.{k}" for n, m in extra.items() for k, v in m.state_dict().items() if v.device.type == "meta"]
    on_meta += [k for k, b in biases.items() if b.device.type == "meta"]
    if on_meta:
        raise ValueError(f"save_adapter: {on_meta} are on the meta device, without values (offloaded by accelerate, "
                         "or never materialised): save before dispatching the model, or from a model loaded whole")
    tensors, gathered = _on_host(model, wanted, "save_adapter")
    return tensors, config, gathered


def _on_host(model: nn.Module, wanted: list, what: str) -> tuple[dict, bool]:
    """Whole host copies of the tensors of ``model`` in ``wanted`` (``(key,
    tensor)`` pairs), by key (copies: safetensors refuses shared memory).
    Sharded ones are gathered, a collective (every rank calls ``what``, in
    the same order): a DTensor (FSDP2) whole; FSDP1's flat pieces one FSDP1
    unit at a time, the innermost that holds them (``summon_full_params(unit,
    recurse=False)``), so that no more than one unit is ever whole at once.
    Returns the copies and whether any were gathered. Raises ValueError,
    before any gathering, where FSDP1 holds them from outside ``model``."""
    units = _fsdp1_units(model, wanted, what) if any(_fsdp1_flattened(t) for _, t in wanted) else {}
    copies, by_unit, gathered = {}, {}, False
    for key, t in wanted:
        if id(t) in units:
            by_unit.setdefault(id(units[id(t)]), (units[id(t)], []))[1].append((key, t))
            continue
        if _is_sharded(t):
            t, gathered = t.full_tensor(), True
        copies[key] = t.detach().to("cpu", copy=True).contiguous()
    for unit, items in by_unit.values():
        with _fsdp1_class().summon_full_params(unit, recurse=False, writeback=False):
            for key, t in items:
                copies[key] = t.detach().to("cpu", copy=True).contiguous()
        gathered = True
    return {key: copies[key] for key, _ in wanted}, gathered


def _write_adapter(directory: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for fname, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                         (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{fname}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, directory / fname)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _pattern_value(pattern: dict, path: str, default, what: str):
    """PEFT's rank/alpha pattern lookup (its ``get_pattern_key``): the value
    of the first key that, as a regular expression, matches the whole module
    name or its end after a ``.`` (``q_proj|v_proj`` is one key for both)."""
    if pattern is not None and not isinstance(pattern, dict):
        raise AdapterFileError(f"{what} must be a JSON object of module name patterns, got {pattern!r}")
    for key, value in (pattern or {}).items():
        try:
            found = re.match(rf"(.*\.)?({key})$", path)
        except re.error as err:
            raise AdapterFileError(f"{what}: {key!r} is not a valid regular expression: {err}") from None
        if found:
            return value
    return default


def _check_peft_original(model: nn.Module, name: str, r, alpha, config: dict, directory: Path) -> None:
    """A fused layer from :func:`from_peft` keeps its PEFT layer for
    :func:`to_peft` and ``save_pretrained``, which share the adapter weights
    but hold their own scale and dropout: refused where the file's differ."""
    original = (getattr(model, _ORIGINALS, None) or {}).get(name)
    if original is None:
        return
    if isinstance(model.get_submodule(name), MultiLoRALinear):
        raise AdapterFileError(f"{directory}: {name} was converted from PEFT (from_peft) with the several adapters "
                               "the model held, which PEFT's layer, given back by to_peft and save_pretrained, keeps "
                               "by name: load the file with PEFT's load_adapter (model.load_adapter(path, name)) "
                               "for one of those, or go back to PEFT first (fused_lora.to_peft(model))")
    (adapter,) = original.lora_A.keys()
    drop = original.lora_dropout[adapter]
    theirs = (original.scaling[adapter], drop.p if isinstance(drop, nn.Dropout) else 0.0,
              bool(getattr(original, "use_dora", {}).get(adapter)))
    ours = (lora_scaling(r, alpha, bool(config.get("use_rslora", False))),
            float(config.get("lora_dropout", 0.0) or 0.0), bool(config.get("use_dora", False)))
    if theirs != ours:
        raise AdapterFileError(f"{directory}: {name} was converted from PEFT (from_peft) with scaling, dropout and "
                               f"use_dora {theirs}, the file has {ours}: PEFT's layer, which to_peft and "
                               "save_pretrained give back, would keep the old ones. Load it with PEFT (to_peft, then "
                               "PEFT's load_adapter), or into the model before from_peft")


def _check_replacement(directory: Path, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    """A tensor of the file (a saved module's, a bias) can replace the model's ``target``."""
    if target.device.type == "meta":
        raise AdapterFileError(f"{directory}: {key}: {_META}")
    if value.shape != target.shape or not value.is_floating_point() or not torch.isfinite(value).all():
        raise AdapterFileError(f"{directory}: {key}: {value.dtype} {tuple(value.shape)} cannot replace the "
                               f"model's {target.dtype} {tuple(target.shape)} (or holds NaN/Inf)")


_META = ("the model's tensor there is on the meta device, where a load keeps nothing: materialise the model "
         "first (to_empty, then load its weights), then load the adapter")


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded: missing, corrupt, truncated,
    unsupported, or not matching the model."""


# PEFT's LoRA variants, as its adapter_config.json names them: a forward or a
# training rule of their own (aLoRA adapts only the tokens after its
# invocation tokens; MiCA freezes lora_B; DoRA, VeLoRA, BD-LoRA, KaSA,
# MonteCLoRA, Arrow, QALoRA, lora_bias), or layers the base model does not
# have (layer_replication). Where PEFT is installed its LoraConfig's field
# metadata adds those of newer versions. DoRA alone is fused
# (:func:`_read_adapter` lets ``use_dora`` through).
_VARIANT_FIELDS = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "velora_config",
                   "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "layer_replication")
_VARIANT_INITS = ("mica",)


def _lora_variants(config: dict) -> dict:
    """The LoRA variants ``config`` (an adapter_config.json) asks for, by field."""
    fields, inits = set(_VARIANT_FIELDS), set(_VARIANT_INITS)
    try:
        from peft import LoraConfig
    except Exception:  # (no PEFT, or one that does not import: the variants above)
        LoraConfig = None
    for f in dataclasses.fields(LoraConfig) if LoraConfig is not None else ():
        if f.metadata.get("is_lora_variant"):
            fields.add(f.name)
        if f.name == "init_lora_weights":
            inits.update(f.metadata.get("lora_variants", ()))
    found = {k: config[k] for k in sorted(fields) if config.get(k)}
    if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"] in inits:
        found["init_lora_weights"] = config["init_lora_weights"]
    return found


def _read_adapter(directory: Path) -> tuple[dict, dict]:
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path} does not exist")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{cfg_path} is not valid JSON (corrupt or truncated): {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    variants = _lora_variants(config)
    if variants.pop("use_dora", None) is not None and config["use_dora"] is not True:
        raise AdapterFileError(f"{cfg_path}: use_dora must be true or false, got {config['use_dora']!r}")
    if variants:
        raise AdapterFileError(f"{cfg_path}: " + ", ".join(f"{k}={v!r}" for k, v in variants.items())
                               + ": a LoRA variant, whose forward or training differs from plain LoRA's, is not "
                               "fused (load it with PEFT)")
    if _residual_base_init(config.get("init_lora_weights")):
        raise AdapterFileError(f"{cfg_path}: init_lora_weights={config['init_lora_weights']!r} took the adapter's "
                               "start out of the base weights: its lora_A/lora_B hold on that residual base only, "
                               "and on the model's own weights they compute something else. Load it with "
                               "peft.PeftModel.from_pretrained (which makes the residual base again), then "
                               "fused_lora.from_peft; or have PEFT convert it to a plain LoRA first "
                               "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.get("bias", "none") not in ("none", "lora_only", "all"):
        raise AdapterFileError(f"{cfg_path}: bias={config['bias']!r} is not one of PEFT's 'none', 'lora_only', 'all'")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(n, str) for n in saved)):
        raise AdapterFileError(f"{cfg_path}: modules_to_save must be a list of module names, got {saved!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise AdapterFileError(f"{cfg_path}: {key} must be a number, got {config.get(key)!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise AdapterFileError(f"{cfg_path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if config.get("use_rslora") not in (None, True, False):
        raise AdapterFileError(f"{cfg_path}: use_rslora must be true or false, got {config['use_rslora']!r}")

    st, legacy = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    try:
        if st.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(st))
        elif legacy.is_file():
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise AdapterFileError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    except AdapterFileError:
        raise
    except Exception as err:  # safetensors / pickle errors on corrupt or truncated files
        raise AdapterFileError(f"cannot read the adapter weights in {directory} (corrupt or truncated?): "
                               f"{type(err).__name__}: {err}") from None
    return config, tensors


def download_adapter(repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                     **hub_kwargs) -> Path:
    """Fetch a PEFT-format LoRA adapter from the Hugging Face Hub (or from its
    local cache) and return the local directory that holds it, for
    :func:`load_adapter` and :func:`load_adapters` (which take a Hub id
    themselves, at its newest revision) or anything else that reads the
    files. ``repo_id`` is ``"namespace/name"``; ``subfolder`` the folder
    inside the repository that holds the adapter (several adapters in one
    repository); ``revision`` a branch, tag or commit. The rest goes to
    ``huggingface_hub.hf_hub_download`` (``cache_dir``, ``token``,
    ``local_files_only``, ``force_download``...). As PEFT's
    ``from_pretrained``: ``adapter_config.json``, then
    ``adapter_model.safetensors``, or ``adapter_model.bin`` where the
    repository has no safetensors file; both of one commit (the weights are
    fetched at the commit the config came from).

    Raises :class:`AdapterFileError` (a ``ValueError``) where the Hub (or,
    offline, the cache) has no such adapter, saying why; ``ImportError``
    without ``huggingface_hub`` (installed with transformers and PEFT)."""
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a str (a Hugging Face Hub id, 'namespace/name'), got "
                        f"{type(repo_id).__name__}")
    for arg, value in (("revision", revision), ("subfolder", subfolder)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{arg} must be None or a str, got {type(value).__name__}")
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError as err:
        raise ImportError(f"download_adapter fetches from the Hugging Face Hub with huggingface_hub, which is not "
                          f"installed ({err}): pip install huggingface_hub") from None
    where = f"{repo_id}{f'/{subfolder}' if subfolder else ''}{f' at {revision}' if revision else ''}"

    trying = CONFIG_NAME

    def fetch(filename: str, at: str | None) -> Path:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=at,
                                                    **hub_kwargs))

    try:
        config = fetch(CONFIG_NAME, revision)
        # (the snapshot folder is named by the commit: the weights of that commit, whatever was pushed since)
        snapshot = config.parents[len(Path(subfolder).parts) if subfolder else 0]
        commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
        trying = f"{WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})"
        try:
            fetch(WEIGHTS_NAME, commit)
        except EntryNotFoundError as first:  # (not in the repository, or offline and not cached: the legacy file)
            try:
                fetch(LEGACY_WEIGHTS_NAME, commit)
            except EntryNotFoundError:
                raise first from None
    except TypeError:  # (a keyword hf_hub_download does not take: the caller's mistake, as it is)
        raise
    except Exception as err:  # (not found, offline and not cached, HTTP errors...: huggingface_hub's own types)
        raise AdapterFileError(f"no LoRA adapter could be fetched from the Hugging Face Hub as {where}: its {trying}: "
                               f"{type(err).__name__}: {err}") from err
    return config.parent


def push_adapter(model: nn.Module, repo_id: str, *, adapter=None, weights=None, subfolder: str | None = None,
                 revision: str | None = None, commit_message: str | None = None, private: bool | None = None,
                 create_pr: bool = False, token=None):
    """Upload the model's fused adapters to the Hugging Face Hub in PEFT's
    format: the files :func:`save_adapter` writes (``adapter``, ``weights``
    as there), made in a temporary directory and uploaded as one commit to
    the model repository ``repo_id`` (``"namespace/name"``; created where it
    does not exist yet, ``private`` then as given), into ``subfolder`` (None:
    its root; several adapters in one repository), on branch ``revision``
    (None: its default), with ``commit_message`` (None: one naming the
    adapter), as a pull request with ``create_pr``. ``token``: None, the one
    ``hf auth login`` stored; a str; False, none. What
    ``peft.PeftModel.from_pretrained(base, repo_id)``, :func:`load_adapter`
    and :func:`download_adapter` read back (``subfolder=`` likewise).

    Everything is checked, and the files written, before the Hub is
    reached: a bad argument is a ``TypeError`` naming it, a model with
    nothing to save :func:`save_adapter`'s ``ValueError``, and nothing is
    created or uploaded. Under ``torch.distributed`` call it on every rank
    (a sharded model's adapters are gathered as :func:`save_adapter` does);
    rank 0 uploads, the others return None without waiting for it.

    Returns huggingface_hub's ``CommitInfo`` (its ``commit_url``,
    ``oid``...). Raises ``ImportError`` without ``huggingface_hub``
    (installed with transformers and PEFT); the Hub's own errors (no such
    namespace, no write access, offline) as huggingface_hub raises them."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise TypeError(f"push_adapter: repo_id must be a str, a Hugging Face Hub model id ('namespace/name' or "
                        f"'name'), got {repo_id!r}")
    for arg, value in (("subfolder", subfolder), ("revision", revision), ("commit_message", commit_message)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"push_adapter: {arg} must be None or a str, got {type(value).__name__}")
    if private is not None:
        private = check_bool("private", private)
    create_pr = check_bool("create_pr", create_pr)
    if token is not None and token is not False and not isinstance(token, str):
        raise TypeError(f"push_adapter: token must be None, False or a str, got {type(token).__name__}")
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(f"push_adapter uploads to the Hugging Face Hub with huggingface_hub, which is not "
                          f"installed ({err}): pip install huggingface_hub") from None
    with tempfile.TemporaryDirectory(prefix="fused_lora_push_") as directory:
        save_adapter(model, directory, adapter=adapter, weights=weights)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0:
            return None
        where = f" {subfolder}" if subfolder else ""
        api = huggingface_hub.HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=directory, path_in_repo=subfolder or None,
                                 revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload LoRA adapter{where} (PEFT format)")


def _adapter_directory(directory, what: str) -> Path:
    """The local directory of :func:`load_adapter`'s ``directory``: a path,
    or, where no such path exists and it is a Hub id (``"namespace/name"``),
    the adapter :func:`download_adapter` fetches (a relative path that does
    not exist is a Hub id too, as PEFT's ``from_pretrained`` takes it: the
    error then says both)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{what}: an adapter must be given as a directory (str or os.PathLike) or a Hugging Face "
                        f"Hub id, got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() or not isinstance(directory, str) or not _is_hub_id(directory):
        return path
    try:
        return download_adapter(directory)
    except AdapterFileError as err:
        raise AdapterFileError(f"{directory} is not a local directory, and {err}") from err.__cause__


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub repository id
    (``huggingface_hub``'s own check where it is installed)."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return re.fullmatch(r"(?:[\w\-.]+/)?[\w\-.]+", name) is not None and ".." not in name and "--" not in name
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_adapter(model: nn.Module, directory, *, adapter: int | None = None, backend: str = "auto") -> list[str]:
    """Load a PEFT-format LoRA adapter (as written by PEFT or :func:`save_adapter`)
    into ``model``. ``directory``: its local directory, or its Hugging Face
    Hub id (``"namespace/name"``, as PEFT's ``from_pretrained`` takes it:
    :func:`download_adapter`, which takes a revision and a subfolder too). Layers that are still plain linears are fused first, with
    the adapter's r/alpha/dropout/rsLoRA and its weights' dtype (PEFT keeps
    fp32 adapters on a bf16 base: they stay fp32); a model without fused
    layers is frozen first but for the adapters, as :func:`inject` and PEFT's
    ``from_pretrained(..., is_trainable=True)`` leave a model (in a model
    fused already, the parameters keep their ``requires_grad``). Fused layers get the
    adapter's weights and scaling (into each rank's shard where FSDP2 or
    FSDP1 sharded them: call it on every rank, with FSDP1's wrapper as for
    :func:`save_adapter`; under FSDP1 the whole model is unsharded for the
    call, so load before wrapping a model that does not fit; plain linears
    are fused before sharding or wrapping in DDP, not after). Layer names
    are those of the model inside torch.compile's, DDP's or torch's
    checkpoint wrappers, as in :func:`save_adapter`'s files. The modules the
    file keeps whole (PEFT's ``modules_to_save``, e.g. a classification head) are loaded into the
    model's modules of those names (into PEFT's trained copy where the model
    has PEFT's wrapper) and made trainable, as PEFT does; so are the biases
    of PEFT's ``bias="lora_only"`` (the LoRA layers') and ``"all"`` (every
    bias of the model trains). Everything is
    checked before anything changes: a missing, corrupt, truncated or
    mismatched file, one of PEFT's LoRA variants but DoRA (aLoRA, MiCA...:
    ``_VARIANT_FIELDS``), or an adapter whose init took its start out of the
    base weights (PiSSA, OLoRA...: :func:`_residual_base_init`; PEFT makes
    that residual base again when it loads one, then :func:`from_peft`
    converts it), raises :class:`AdapterFileError` (a ``ValueError``)
    and leaves the model as it was; so does a quantized layer to fuse. A plain
    linear is not fused into a model that is PEFT's (``ValueError``, as from
    :func:`inject`).

    A DoRA adapter (``use_dora``, a ``lora_magnitude_vector`` for each
    layer) makes DoRA layers (:class:`LoRALinear`'s ``use_dora``); a fused
    layer of the other kind than the file's is refused (inject or load into
    a plain model instead), as are :func:`inject_multi`'s layers.

    Warns (``UserWarning``, as PEFT warns of missing keys) when fused layers
    of the model get no adapter from the file: they keep theirs; and, as
    :func:`inject` does, of layers it fuses whose parent reads their weight.

    :func:`inject_multi`'s layers: the file's adapter goes into their
    adapter ``adapter=i`` (required there), of the file's rank, its alpha
    and its dropout taken (and its ``use_rslora``, which must be the
    layers'). Every layer the file names must be one of them.

    Returns the names of the layers loaded, then those of the saved modules.
    """
    _check_model(model)
    adapter = _check_adapter_index("load_adapter", adapter, multi_fused_layers(model))
    directory = _adapter_directory(directory, "load_adapter")
    return _load_read(model, directory, *_read_adapter(directory), adapter, backend)


def _load_read(model: nn.Module, directory: Path, config: dict, tensors: dict, adapter, backend: str) -> list[str]:
    """:func:`load_adapter` of a file read already (``config``, ``tensors``),
    its warnings for the caller of a public function that calls this."""
    with _fsdp1_full_params(model, "load_adapter"):  # (FSDP1: into the whole tensors)
        plan, loaded, untouched = _load_into(model, directory, config, tensors, backend, adapter)
    guard_fast_paths(model)
    _keep_aside(model)
    _tell_transformers(model)
    _warn_weight_readers(model, [name for name, module, *_ in plan if not isinstance(module, FUSED_KINDS)],
                         "load_adapter", stacklevel=4)
    if untouched:  # (as PEFT warns of missing keys: the model is not the file's adapter alone)
        warnings.warn(f"load_adapter: {directory} holds no adapter for the fused layers {untouched}: they keep the "
                      "adapters they had (unload them first for the file's adapter alone)", stacklevel=3)
    return loaded


def load_adapters(model: nn.Module, directories, *, backend: str = "auto") -> list[str]:
    """Load several PEFT-format LoRA adapters into one plain model, to run
    each sample (or token) of a batch through its own in one set of fused
    launches (:func:`adapter_ids`): serving several adapters from one base,
    or training them on. Adapter ``i`` is ``directories[i]``'s (a local
    directory or a Hugging Face Hub id, as :func:`load_adapter` takes). Each linear
    layer that a file names becomes a :class:`~fused_lora.MultiLoRALinear`
    holding every file's adapter there, of that file's rank and alpha, and
    of rank 0 where a file does not name the layer (that adapter leaves it
    alone, as PEFT's does); the model is frozen but for the adapters, as
    :func:`inject_multi` leaves it. Each file is then loaded as
    :func:`load_adapter` with ``adapter=i`` loads it (its checks, its
    warnings; read from disk once), and :func:`save_adapter` with ``adapter=i`` writes it back,
    of the same layers.

    The adapters of a layer share its ``use_rslora``, which the files must
    agree on; each keeps its file's dropout (``lora_dropout``: each row's x
    dropped with its adapter's, :func:`fused_lora.multi_lora_linear`). Files that keep modules whole (``modules_to_save``)
    or trained biases, parts of the base that every adapter would share, are
    refused: load such an adapter alone (:func:`load_adapter`). The model
    must have no fused layers yet (to add an adapter's values to
    :func:`inject_multi`'s layers, :func:`load_adapter` with ``adapter=i``).
    Should anything fail, :class:`AdapterFileError` (a ``ValueError``) or
    another error, the model is left as it was.

    Returns the names of the layers made, in model order.
    """
    _check_model(model)
    if isinstance(directories, (str, os.PathLike)) or not isinstance(directories, (list, tuple)):
        raise TypeError(f"directories must be a list of adapter directories, one an adapter, got "
                        f"{type(directories).__name__}")
    if not directories:
        raise ValueError("directories must name at least one adapter directory, got an empty list")
    fused = all_fused_layers(model)
    if fused:
        raise ValueError(f"load_adapters makes the fused layers of a model without them; this one has "
                         f"{', '.join(list(fused)[:3])}{', ...' if len(fused) > 3 else ''} (into inject_multi's "
                         "layers, load_adapter(model, directory, adapter=i) loads one adapter)")
    dirs = [_adapter_directory(d, f"load_adapters: directories[{i}]") for i, d in enumerate(directories)]
    files = [_read_adapter(d) for d in dirs]
    for d, (config, _) in zip(dirs, files):
        if config.get("modules_to_save") or config.get("bias", "none") != "none":
            raise AdapterFileError(f"{d}: modules_to_save={config.get('modules_to_save')!r}, "
                                   f"bias={config.get('bias', 'none')!r}: modules kept whole and trained biases are "
                                   "the base's, which the adapters of one model share: load this adapter alone "
                                   "(fused_lora.load_adapter)")
    rslora = {bool(config.get("use_rslora", False)) for config, _ in files}
    if len(rslora) > 1:
        raise AdapterFileError(f"{', '.join(map(str, dirs))}: some use rsLoRA and some not; the adapters of a layer "
                               "share use_rslora")
    (use_rslora,) = rslora
    names = _model_names(_public_names(model))
    prefix = PEFT_PREFIX if PEFT_PREFIX[:-1] in names else ""
    ranks: dict[str, list[int]] = {}  # (the model's name of each layer a file names -> each file's rank there)
    dtypes: dict[str, torch.dtype] = {}
    for i, (d, (config, tensors)) in enumerate(zip(dirs, files)):
        for key, value in tensors.items():
            m = _KEY.match(key)
            if m is None and config.get("use_dora") and _MAGNITUDE_KEY.match(key):
                continue  # (a DoRA layer's magnitude: load_adapter checks it)
            if m is None:
                raise AdapterFileError(f"{d}: unexpected tensor {key!r} (load_adapters takes lora_A/lora_B weights, "
                                       "and a DoRA adapter's lora_magnitude_vector, alone)")
            name = names.get(prefix + _strip(m["path"]))
            if name is None:
                raise AdapterFileError(f"{d}: the model has no module {prefix + _strip(m['path'])!r}")
            if m["which"] == "A" and value.dim() == 2:  # (the rank; load_adapter checks the rest)
                ranks.setdefault(name, [0] * len(dirs))[i] = value.shape[0]
                dtypes.setdefault(name, value.dtype)
    chosen = [n for n in linear_layer_names(model) if n in ranks]  # (model order)
    unfit = sorted(ranks.keys() - set(chosen))
    if unfit:
        raise AdapterFileError(f"{unfit[0]} is a {type(model.get_submodule(unfit[0])).__name__}, not a linear layer")
    _check_can_add_parameters(model, chosen, "load_adapters")
    _check_fusable(model, chosen, "load_adapters", AdapterFileError)
    for name in chosen:
        reason = _never_called(model, name)
        if reason or model.get_submodule(name).weight.device.type == "meta":
            raise AdapterFileError(f"{name}: {reason or _META}")
    dropouts = [float(config.get("lora_dropout", 0.0) or 0.0) for config, _ in files]
    trained = {p: p.requires_grad for p in model.parameters()}
    originals = {}
    try:
        made = {}
        _freeze_a_plain_model(model)
        for name in chosen:
            module = model.get_submodule(name)
            if id(module) not in made:  # (a module reachable under two names gets one layer)
                made[id(module)] = _multi_layer(module, ranks[name], ranks[name], dropouts, use_rslora,
                                                backend=backend, adapter_dtype=dtypes[name],
                                                use_dora=[bool(config.get("use_dora")) and r > 0
                                                          for (config, _), r in zip(files, ranks[name])])
            originals[name] = module
            _replace_module(model, name, made[id(module)])
        for i, (d, (config, tensors)) in enumerate(zip(dirs, files)):  # (each file read once, above)
            _load_read(model, d, config, tensors, i, backend)
    except BaseException:  # (the model as it was: its own layers, with their hooks, and what trained)
        for name, module in originals.items():
            _replace_module(model, name, module)
        for p, flag in trained.items():
            p.requires_grad_(flag)
        _unguard_fast_paths(model)
        _tell_transformers(model)
        raise
    _keep_aside(model)
    _warn_weight_readers(model, chosen, "load_adapters")
    return chosen


def _load_into(model: nn.Module, directory: Path, config: dict, tensors: dict, backend: str, adapter=None):
    """:func:`load_adapter`'s checks, then its changes: ``(plan, loaded,
    untouched)``, what it loaded and the fused layers it left alone."""
    public = _public_names(model)  # (the model's name -> the public one: wrappers' attributes left out)
    names = _model_names(public)  # (public name -> the model's, for models in torch.compile's, DDP's... wrappers)
    prefix = PEFT_PREFIX if isinstance(getattr(model, _ORIGINALS, None), dict) or PEFT_PREFIX[:-1] in names else ""
    by_path: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    saved: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    bias_mode = config.get("bias", "none")  # (PEFT's trained biases: of its LoRA layers, or all the model's)
    lora_biases: dict[str, torch.Tensor] = {}  # LoRA layer path -> its bias
    other_biases: dict[str, torch.Tensor] = {}  # the model's name of another module -> its bias
    use_dora = bool(config.get("use_dora", False))
    for key, value in tensors.items():
        m = _KEY.match(key) or _MAGNITUDE_KEY.match(key)
        if m is not None:
            by_path[_strip(m["path"])][m.groupdict().get("which", "m")] = value
            continue
        if bias_mode != "none" and key.endswith(".base_layer.bias"):
            lora_biases[_strip(key)[:-len(".base_layer.bias")]] = value
            continue
        found = _saved_module_tensor(model, names, prefix, _strip(key), config.get("modules_to_save") or [])
        if found is None and bias_mode == "all" and key.endswith(".bias"):
            path = _strip(key)[:-len(".bias")]
            name = names.get(prefix + path)
            owner = model.get_submodule(name) if name is not None else None
            if owner is None or not isinstance(owner._parameters.get("bias"), nn.Parameter):
                raise AdapterFileError(f"{directory}: {key}: the model has no module {prefix + path!r} with a bias")
            _check_replacement(directory, key, value, owner.bias)
            other_biases[name] = value
            continue
        if found is None:
            raise AdapterFileError(f"{directory}: unexpected tensor {key!r} (only lora_A/lora_B weights and the "
                                   "modules named in modules_to_save are supported: no embedding adapters)")
        path, module, state_key = found
        _check_replacement(directory, key, value, module.state_dict()[state_key])
        saved.setdefault(path, (module, {}))[1][state_key] = value
    plan = []
    for path, pair in sorted(by_path.items()):
        if not {"A", "B"} <= set(pair):
            held = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}
            raise AdapterFileError(f"{directory}: {path} has {' and '.join(held[k] for k in sorted(pair))} but not "
                                   "both lora_A and lora_B (truncated?)")
        if ("m" in pair) != use_dora:
            raise AdapterFileError(f"{directory}: {path}: " + ("use_dora is true in the config but the layer has no "
                                   "lora_magnitude_vector (truncated?)" if use_dora else "a lora_magnitude_vector "
                                   "(DoRA's) where the config's use_dora is false"))
        a, b, magnitude = pair["A"], pair["B"], pair.get("m")
        name = names.get(prefix + path)
        if name is None:
            raise AdapterFileError(f"{directory}: the model has no module {prefix + path!r}")
        module = model.get_submodule(name)
        r_default, alpha_default = config["r"], config["lora_alpha"]
        r = _pattern_value(config.get("rank_pattern"), path, r_default, f"{directory}: rank_pattern")
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha_default, f"{directory}: alpha_pattern")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterFileError(f"{directory}: {path}: lora_alpha {alpha!r} (from the config) is not a finite "
                                   "number")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(f"{directory}: {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                   f"do not have rank r={r} from the config")
        if isinstance(module, MultiLoRALinear):
            in_f, out_f, cur_r = module.in_features, module.out_features, module.ranks[adapter]
            _check_peft_original(model, name, r, alpha, config, directory)
            if module.ranks[adapter] and module.use_dora[adapter] != use_dora:
                kind = "DoRA" if module.use_dora[adapter] else "not DoRA"
                raise AdapterFileError(f"{directory}: {path}: adapter {adapter} of the model's fused layer is {kind}, "
                                       f"the file's use_dora is {use_dora}: inject_multi layers of its kind first "
                                       "(use_dora=[...], one flag an adapter)")
            if bool(config.get("use_rslora", False)) != module.use_rslora:
                raise AdapterFileError(f"{directory}: {path}: use_rslora={bool(config.get('use_rslora', False))} in "
                                       f"the file, {module.use_rslora} in the model's layer, whose adapters share it")
        elif isinstance(module, LoRALinear):
            in_f, out_f, cur_r = module.in_features, module.out_features, module.r
            _check_peft_original(model, name, r, alpha, config, directory)
            if module.use_dora != use_dora:
                kind = "DoRA" if module.use_dora else "not DoRA"
                raise AdapterFileError(f"{directory}: {path}: the model's fused layer is {kind}, the adapter's "
                                       f"use_dora is {use_dora}: load it into the plain model, or inject layers of "
                                       "its kind first")
        elif _is_linear_like(module) and adapter is not None:
            raise AdapterFileError(f"{directory}: {path} is a plain linear layer: adapter={adapter} loads into "
                                   "inject_multi's layers (inject_multi it too first, with the others' ranks)")
        elif _is_linear_like(module):
            _check_can_add_parameters(model, [name], "load_adapter")
            _check_fusable(model, [name], f"load_adapter({str(directory)!r})", AdapterFileError)
            w = module.weight
            in_f, out_f = (w.shape if not isinstance(module, nn.Linear) else w.shape[::-1])
            cur_r = r
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            raise AdapterFileError(f"{directory}: {path} is a PEFT LoRA layer: load with PEFT "
                                   "(load_adapter/from_pretrained), or convert the model with from_peft first")
        else:
            raise AdapterFileError(f"{directory}: {path} is a {type(module).__name__}, not a linear layer")
        held = module.lora_A if isinstance(module, LoRALinear) else module.weight
        if isinstance(module, MultiLoRALinear):
            held = module.lora_A[adapter]
        if held.device.type == "meta":
            raise AdapterFileError(f"{directory}: {path}: {_META}")
        reason = _never_called(model, name)
        if reason:
            raise AdapterFileError(f"{directory}: {path}: {reason}")
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise AdapterFileError(f"{directory}: {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                                   f"fit the model's {in_f} -> {out_f} layer")
        if cur_r != r:
            raise AdapterFileError(f"{directory}: {path}: the model's fused layer has r={cur_r}, the adapter r={r}")
        if not (a.is_floating_point() and b.is_floating_point() and a.dtype == b.dtype):
            raise AdapterFileError(f"{directory}: {path}: lora_A is {a.dtype} and lora_B {b.dtype}: the adapter "
                                   "weights must be floating point, of one dtype")
        if not all(torch.isfinite(t).all() for t in (a, b)):
            raise AdapterFileError(f"{directory}: {path}: the adapter weights contain NaN or Inf")
        if magnitude is not None and (tuple(magnitude.shape) != (out_f,) or not magnitude.is_floating_point()
                                      or not torch.isfinite(magnitude).all()):
            raise AdapterFileError(f"{directory}: {path}: lora_magnitude_vector {magnitude.dtype} "
                                   f"{tuple(magnitude.shape)} is not a finite floating-point vector of the layer's "
                                   f"{out_f} output features")
        bias = lora_biases.pop(path, None)
        if bias is not None:
            if module.bias is None:
                raise AdapterFileError(f"{directory}: {path}: the file has a trained bias for the layer "
                                       f"(bias={bias_mode!r}), the model's layer has none")
            _check_replacement(directory, f"{path}.base_layer.bias", bias, module.bias)
        plan.append((name, module, a, b, r, alpha, bias, magnitude))
    if lora_biases:
        raise AdapterFileError(f"{directory}: biases for layers without lora_A/lora_B weights: {sorted(lora_biases)}")

    planned = {id(module) for _, module, *_ in plan}
    untouched = sorted({public[n] for n, layer in all_fused_layers(model).items() if id(layer) not in planned
                        and not (isinstance(layer, MultiLoRALinear) and not layer.ranks[adapter])})
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))
    loaded = []
    with torch.no_grad():
        _freeze_a_plain_model(model)  # (a plain model becomes a LoRA model, as inject leaves it)
        for name, module, a, b, r, alpha, bias, magnitude in plan:
            if isinstance(module, MultiLoRALinear):
                module.alphas = (*module.alphas[:adapter], float(alpha), *module.alphas[adapter + 1:])
                module.set_dropout(adapter, dropout)
                for target, value in ((module.lora_A[adapter], a), (module.lora_B[adapter], b),
                                      (module.magnitude(adapter), magnitude)):
                    if value is not None:
                        _copy_into(target, value)
                        target.requires_grad_(True)
                if bias is not None:
                    _copy_into(module.bias, bias)
                if bias_mode != "none" and module.bias is not None:
                    module.bias.requires_grad_(True)
                loaded.append(name)
                continue
            if not isinstance(module, LoRALinear):
                # (in the file's dtype: fp32 adapters on a bf16 base, PEFT's default, load as they were saved)
                module = _fused_layer_for(module, r, alpha, dropout, use_rslora, a.dtype, backend, use_dora)
                _replace_module(model, name, module)
            module.alpha, module.use_rslora, module.dropout = float(alpha), use_rslora, dropout
            merged = module.merged
            if merged:
                module.unmerge()
            _copy_into(module.lora_A, a)
            _copy_into(module.lora_B, b)
            if magnitude is not None:
                _copy_into(module.lora_magnitude_vector, magnitude)
                module.lora_magnitude_vector.requires_grad_(True)
            if merged:
                module.merge()
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if bias is not None:
                _copy_into(module.bias, bias)
            if bias_mode != "none" and module.bias is not None:
                module.bias.requires_grad_(True)  # (PEFT's bias="lora_only"/"all": the LoRA layers' biases train)
            loaded.append(name)
        for name, bias in other_biases.items():
            _copy_into(model.get_submodule(name).bias, bias)
        if bias_mode == "all":  # (every bias of the model trains, as PEFT's bias="all" leaves it)
            for name, p in model.named_parameters():
                if name.rpartition(".")[2] == "bias":
                    p.requires_grad_(True)
        for name, (module, values) in saved.items():
            state = module.state_dict()
            for key, value in values.items():
                _copy_into(state[key], value)
            for p in module.parameters():
                p.requires_grad_(True)
            loaded.append(name)
    return plan, loaded, untouched


def _saved_module_tensor(model: nn.Module, names: dict[str, str], prefix: str, key: str, modules: list[str]):
    """``(name, module, state key)`` for a tensor of a module kept whole
    (``key`` without PEFT's prefix: ``<path>.<state key>``, the path matching
    one of ``modules`` whole or as a suffix), the module being the model's (or
    PEFT's trained copy in its wrapper) and ``name`` its name in the model
    (``names``: :func:`_model_names`); None when there is no such module."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path, state_key = ".".join(parts[:i]), ".".join(parts[i:])
        if not _matches(path, modules) or prefix + path not in names:
            continue
        name = names[prefix + path]
        module = model.get_submodule(name)
        module = _active_copy(module, name) or module
        if state_key in module.state_dict():
            return name, module, state_key
    return None
