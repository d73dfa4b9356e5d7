"""Access to the Triton kernels.

Installed, the kernels are the subpackage ``fused_lora.kernels`` (built from the
repository's top-level ``kernels/``). In a source checkout run with
``PYTHONPATH=.`` that subpackage does not exist on disk, so it is loaded from
``kernels/`` under its installed name; no top-level ``kernels`` module is ever
imported. Without Triton the package still works with ``backend="torch"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_NAME = "fused_lora.kernels"


def _import_kernels():
    try:
        return importlib.import_module(_NAME)
    except ModuleNotFoundError as err:
        if err.name != _NAME:
            raise
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{_NAME} is neither installed nor next to the source checkout", name=_NAME)
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module


try:
    kernels = _import_kernels()
    UNAVAILABLE_REASON = ""
except ImportError as err:  # no triton (or a broken install): the torch backend still works
    kernels = None
    UNAVAILABLE_REASON = f"the Triton kernels cannot be imported ({err})"


def available() -> bool:
    return kernels is not None


def interpreter() -> bool:
    """True when the kernels run on Triton's CPU interpreter."""
    return kernels is not None and kernels.INTERPRETER


def configs():
    if kernels is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return kernels.configs


def why_not(device: "torch.device", dtype: "torch.dtype") -> str:  # noqa: F821
    """Why the Triton backend cannot run on ``device``/``dtype`` ('' if it can)."""
    import torch

    if kernels is None:
        return UNAVAILABLE_REASON
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32 tensors, not {dtype}"
    if device.type == "cuda":
        if kernels.INTERPRETER:
            return "TRITON_INTERPRET=1 was set when fused_lora was imported: the kernels run on CPU tensors only"
        return ""
    if device.type == "cpu":
        if kernels.INTERPRETER:
            return ""
        return ("the tensors are on the CPU and the kernels were not built for Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing fused_lora to run them on the CPU)")
    return f"there are no Triton kernels for device type {device.type!r}"
