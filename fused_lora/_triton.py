"""Access to the Triton kernels.

Installed, the kernels are the subpackage ``fused_lora.kernels`` (built from the
repository's top-level ``kernels/``). In a source checkout run with
``PYTHONPATH=.`` that subpackage does not exist on disk, so it is loaded from
``kernels/`` under its installed name; no top-level ``kernels`` module is ever
imported. Without Triton the package still works with ``backend="torch"``.

The kernels are imported with the package. Triton decides when
``triton.language`` is first imported whether kernels are compiled or run on
its CPU interpreter (``TRITON_INTERPRET=1``): set it before importing torch's
compiler, Triton or fused_lora.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from ._validate import version_tuple

_NAME = "fused_lora.kernels"
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_KERNELS = _PACKAGE_DIR.parent / "kernels"


class _SourceCheckoutKernels(importlib.abc.MetaPathFinder):
    """Resolves ``fused_lora.kernels`` to the checkout's ``kernels/`` (only that
    name: nothing else of the checkout becomes part of the package)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            _NAME, _SOURCE_KERNELS / "__init__.py", submodule_search_locations=[str(_SOURCE_KERNELS)])


def _in_source_checkout() -> bool:
    """This package is a checkout's ``fused_lora/``: no ``kernels/`` inside,
    the checkout's ``kernels/`` and ``pyproject.toml`` beside it (an install
    in site-packages has no ``pyproject.toml`` there, so never takes another
    distribution's top-level ``kernels``)."""
    root = _PACKAGE_DIR.parent
    return (not (_PACKAGE_DIR / "kernels").is_dir() and (_SOURCE_KERNELS / "__init__.py").is_file()
            and (root / "pyproject.toml").is_file())


if _in_source_checkout():
    # First on the meta path: an editable install of fused_lora from another
    # checkout adds a finder that maps this name to *its* kernels/, and this
    # checkout's Python must not run with another checkout's kernels.
    sys.meta_path.insert(0, _SourceCheckoutKernels())


def _import_kernels():
    return importlib.import_module(_NAME)


#: The oldest Triton the kernels run with. 3.3 compiles them, but where a
#: mask needs 64-bit Philox counters (2**31 elements or more) its
#: ``randint4x`` runs Philox in 64-bit words instead of splitting the counter
#: into two 32-bit ones: another stream, not :func:`fused_lora.dropout_mask`'s.
#: 3.2 lacks ``tl.range(..., flatten=)``. torch 2.8 brings 3.4.
#: (pyproject.toml's ``triton>=`` says the same.)
MIN_TRITON = (3, 4)


def triton_too_old(version: str) -> str:
    """Why Triton ``version`` cannot run the kernels ('' if it can)."""
    if version_tuple(version) >= MIN_TRITON:
        return ""
    return (f"Triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest the kernels run with "
            "(torch 2.8 and newer bring one)")


_UNLOADED = object()
kernels = _UNLOADED  # the fused_lora.kernels module once loaded, None if it cannot be
UNAVAILABLE_REASON = ""


def _load() -> None:
    global kernels, UNAVAILABLE_REASON
    try:
        import triton
    except ImportError as err:  # no triton (or a broken install): the torch backend still works
        kernels, UNAVAILABLE_REASON = None, f"the Triton kernels cannot be imported ({err})"
        return
    too_old = triton_too_old(getattr(triton, "__version__", "0"))
    if too_old:
        kernels, UNAVAILABLE_REASON = None, too_old
        return
    try:
        module = _import_kernels()
    except ImportError as err:
        kernels, UNAVAILABLE_REASON = None, f"the Triton kernels cannot be imported ({err})"
        return
    # Triton's own jit helpers (tl.cdiv, ...) were decorated when triton.language
    # was first imported: if that was before TRITON_INTERPRET=1, interpreted
    # kernels cannot call them. Say so instead of failing inside a kernel.
    from triton.language import standard

    if module.INTERPRETER and not module.is_interpreted(standard.cdiv):
        kernels, UNAVAILABLE_REASON = None, (
            "TRITON_INTERPRET=1 was set after Triton was imported (by torch.compile/torch._dynamo or "
            "another package): set it before importing them, e.g. in the shell")
        return
    kernels, UNAVAILABLE_REASON = module, ""


def get():
    """The kernels module, or None when they cannot run (see UNAVAILABLE_REASON)."""
    if kernels is _UNLOADED:
        _load()
    return kernels


def available() -> bool:
    return get() is not None


def interpreter() -> bool:
    """True when the kernels run on Triton's CPU interpreter."""
    k = get()
    return k is not None and k.INTERPRETER


def configs():
    k = get()
    if k is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return k.configs


class CudaTarget(NamedTuple):
    """What the dispatch tunes for on one CUDA device."""

    #: Compute capability x10 (90: H100/H200).
    arch: int
    #: Bytes of shared memory one program may use (the opt-in limit per block).
    smem_limit: int
    #: Streaming multiprocessors: the grids aim to cover every one.
    num_sms: int


#: The dtypes the kernels take (float64 runs on the torch backend).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: The :class:`CudaTarget` of each CUDA device used so far, by index: read
#: from the device once, then a dict read (which torch.compile traces).
_cuda_targets: dict[int, CudaTarget] = {}


def cuda_target(device: torch.device) -> CudaTarget:
    """The :class:`CudaTarget` of the CUDA device ``device`` (an index-less
    one: the current device). The shared-memory limit is the device's own
    where torch reports it, else
    :func:`fused_lora.kernels.configs.smem_limit_for`'s."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = _cuda_targets.get(index)
    if target is None:
        props = torch.cuda.get_device_properties(index)
        arch = 10 * props.major + props.minor
        smem = getattr(props, "shared_memory_per_block_optin", 0)
        if not smem:
            try:
                smem = configs().smem_limit_for(arch)
            except ValueError:  # (below the kernels' minimum, which why_not reports; or unknown: the least)
                smem = min(configs().SMEM_LIMIT_BY_ARCH.values())
        target = _cuda_targets[index] = CudaTarget(arch, int(smem), int(props.multi_processor_count))
    return target


def why_not(device: torch.device, dtype: torch.dtype) -> str:
    """Why the Triton backend cannot run on ``device``/``dtype`` ('' if it can).
    Plain reads of module state, so torch.compile traces it to a constant."""
    kernels = get()
    if kernels is None:
        return UNAVAILABLE_REASON
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 tensors, not {dtype}"
    if device.type == "cuda":
        if kernels.INTERPRETER:
            return "TRITON_INTERPRET=1 was set when fused_lora was imported: the kernels run on CPU tensors only"
        arch = cuda_target(device).arch
        if arch < kernels.configs.MIN_ARCH:
            return (f"the GPU is sm_{arch}, and the kernels need sm_{kernels.configs.MIN_ARCH} or newer (below it "
                    "Triton has no tensor-core dots)")
        return ""
    if device.type == "cpu":
        if kernels.INTERPRETER:
            return ""
        return ("the tensors are on the CPU and the kernels were not built for Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing fused_lora to run them on the CPU)")
    return f"there are no Triton kernels for device type {device.type!r}"


_load()
