"""Kernel launches with less host time: the launch cache.

``kernel[grid](*args, **kwargs)`` runs Triton's ``JITFunction.run`` at every
call: it binds every argument (about 80 for the GEMM), specialises each (a
pointer's dtype and 16-byte alignment, an int equal to 1 or a multiple of
16), makes a cache key of them and looks the compiled kernel up, and only
then calls the launcher. Where the GPU finishes first (small M, and any M
without CUDA graphs once the kernels are fast) that host time is the step's
time: on our CI machine's CPU about 20 µs a GEMM launch, more on the H200
runs' host (``bench/host_overhead.py`` times both).

:func:`launch` keeps, for each kernel, the compiled kernels that earlier
launches returned, keyed on a signature at least as fine as Triton's own:

* a tensor: its dtype and whether its address is a multiple of 16 bytes;
* an int: what Triton specialises it on (:func:`int_key`: 1 or not, i32,
  i64 or u64, a multiple of 16 or not), not its value, so that a new batch
  size (or an explicit seed) finds the kernel;
* a float: only that it is one (Triton compiles no float value in);
* a host tensor descriptor: its base's dtype and its block shape;
* anything else (None, a bool): its type and value;
* the constexprs and launch options (``num_warps``...), and the current
  CUDA device.

(A grid given as a callable launches as ``kernel[grid](...)``.)

A launch whose key was seen calls that compiled kernel directly, with the
arguments ``JITFunction.run`` would pass it (the parameters in signature
order, the constexprs with them; the stream is the current one), so the
same code runs on the same arguments; a new key launches through
``JITFunction.run`` (which compiles, or finds the kernel in Triton's own
caches) and keeps what it returns. Triton's process-wide debug and
instrumentation knobs enter only that first launch of a key: set them
before launching.

On by default since the fifth GPU run timed it (H100, M=8192 4096² r=16 bf16,
forward+backward without CUDA graphs: 1.001 ms through the cache, 1.257 ms
without, where the kernels' own time is 0.91 ms; M=16 eager steps 0.92 ms
against 1.16): :func:`fused_lora.dispatch.set_launch_cache` ``(False)`` or
``FUSED_LORA_LAUNCH_CACHE=0`` turns it off. The interpreter's kernels,
and anything else that is not a plain ``JITFunction`` (a test's stand-in),
are always launched as ``kernel[grid](...)``.

Inside :func:`priming` (this thread only) a launch runs nothing: it
compiles the kernel (or finds it), loads its module and keeps it as a first
launch would. The eager calls that run cuBLAS alone prime their Triton plan
that way (``fused_lora.ops``), so that a CUDA graph captured after such
warm-up calls finds its kernels loaded: a module loaded mid-capture is
what CUDA refuses ("operation not permitted when stream is capturing").
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading

import torch
from triton.runtime.jit import JITFunction

try:  # (host-side TMA descriptors: Triton 3.3 on)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = ()

_enabled = os.environ.get("FUSED_LORA_LAUNCH_CACHE", "1")
if _enabled not in ("0", "1"):
    raise ValueError(f"FUSED_LORA_LAUNCH_CACHE must be '0' or '1', got {_enabled!r}")
_enabled = _enabled == "1"

#: Compiled kernels kept per kernel; past this many keys (shapes keep
#: changing) the kernel's entries are dropped and kept again as they come.
MAX_KEYS = 1024

#: id(kernel) -> (kernel, {key: (compiled kernel, the values of the parameters after the positional
#: arguments)}); by id: hashing a JITFunction hashes its source's key under a lock (the kernel is kept, so
#: its id is not reused)
_compiled: dict = {}

_FLOAT = ("fp32",)
_EMPTY = inspect.Parameter.empty
#: int_key of each int seen (sizes and strides come back every step), bounded.
_int_keys: dict = {}


#: Per thread: whether launches prime instead of running (:func:`priming`).
_state = threading.local()


@contextlib.contextmanager
def priming():
    """Inside the block, on this thread, :func:`launch` compiles and loads
    each kernel without running it (the interpreter's kernels: nothing)."""
    previous = getattr(_state, "priming", False)
    _state.priming = True
    try:
        yield
    finally:
        _state.priming = previous


def priming_active() -> bool:
    """Whether this thread's launches prime (:func:`priming`)."""
    return getattr(_state, "priming", False)


def current_device() -> int:
    """The CUDA device Triton launches on (a launch's key holds it;
    ``bench/host_overhead.py`` replaces this on a machine without one)."""
    return torch.cuda.current_device()


def set_enabled(enabled: bool) -> None:
    """Turn the launch cache on or off (:func:`fused_lora.dispatch.set_launch_cache`)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def clear() -> None:
    """Forget every compiled kernel kept (Triton's own caches keep them)."""
    _compiled.clear()


def int_key(v: int):
    """What Triton specialises an int argument on (3.6 to 3.9,
    ``native_specialize_impl``): 1 is compiled in as a constant; other
    values by their type (i32, i64, u64) and whether they are multiples of
    16 (``tt.divisibility``)."""
    if v == 1:
        return "1"
    kind = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
    return (kind, v % 16 == 0)


def _int_key(v: int):
    if len(_int_keys) >= 65536:
        _int_keys.clear()
    key = _int_keys[v] = int_key(v)
    return key


def _other_key(a):
    if isinstance(a, TensorDescriptor):
        return ("tensordesc", a.base.dtype, tuple(a.block_shape), getattr(a, "padding", None))
    return (type(a), a)


def signature(args) -> tuple:
    """The key of a launch's positional arguments (the module's docstring)."""
    known = _int_keys.get
    return tuple([(known(a) or _int_key(a)) if type(a) is int else (a.dtype, a.data_ptr() & 15 == 0)
                  if isinstance(a, torch.Tensor) else _FLOAT if type(a) is float else _other_key(a) for a in args])


def _rest(kernel: JITFunction, positional: int, kwargs) -> tuple | None:
    """The values of the parameters after the first ``positional`` ones
    (the keywords', else the defaults), as JITFunction.run passes them; None
    where one has neither (Triton's own error then); a TypeError where
    ``kwargs`` names a parameter that is not a constexpr (:func:`launch`
    keys the keywords on their values)."""
    runtime = [p.name for p in kernel.params if not p.is_constexpr and p.name in kwargs]
    if runtime:
        raise TypeError(f"launch: {kernel.fn.__name__}'s runtime arguments {runtime} must be passed in args, "
                        "not as keywords (the keywords are keyed on their values)")
    rest = tuple(kwargs.get(p.name, p.default) for p in kernel.params[positional:])
    return None if any(value is _EMPTY for value in rest) else rest


def launch(kernel, grid, args: tuple, kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; with the cache on, a launch of a
    specialisation compiled before goes to the compiled kernel directly.
    ``args``: the runtime arguments, in order (and any leading constexprs);
    ``kwargs``: constexprs and launch options only."""
    if getattr(_state, "priming", False):
        _prime(kernel, grid, args, kwargs)
        return
    if not _enabled or type(kernel) is not JITFunction or callable(grid):
        kernel[grid](*args, **kwargs)
        return
    entry = _compiled.get(id(kernel))
    if entry is None:
        entry = _compiled[id(kernel)] = (kernel, {})
    kept = entry[1]
    key = (current_device(), signature(args), tuple(kwargs.items()))
    try:
        hit = kept.get(key)
    except TypeError:  # (an unhashable argument: no key)
        kernel[grid](*args, **kwargs)
        return
    if hit is None:
        _keep(kernel, kept, key, kernel[grid](*args, **kwargs), len(args), kwargs)
        return
    compiled, rest = hit
    compiled[(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)](*args, *rest)


def _prime(kernel, grid, args: tuple, kwargs) -> None:
    """:func:`launch` inside :func:`priming`: Triton's warm-up (the kernel
    compiled or found, not run), then its module loaded; kept by the cache
    as a first launch's would be."""
    if type(kernel) is not JITFunction or callable(grid):
        return  # (the interpreter's kernels: nothing to load)
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    load = getattr(compiled, "_init_handles", None)
    if load is not None:
        load()
    if _enabled:
        key = (current_device(), signature(args), tuple(kwargs.items()))
        try:
            hash(key)
        except TypeError:  # (an unhashable argument: no key, as in launch)
            return
        _keep(kernel, _compiled.setdefault(id(kernel), (kernel, {}))[1], key, compiled, len(args), kwargs)


def _keep(kernel, kept: dict, key, compiled, positional: int, kwargs) -> None:
    """Keep what a first launch (or priming) of ``key`` returned, with the
    values of the parameters after the ``positional`` ones (the keywords fix
    them: they are in the key), within :data:`MAX_KEYS`."""
    rest = _rest(kernel, positional, kwargs)
    if compiled is not None and rest is not None:
        if len(kept) >= MAX_KEYS:
            kept.clear()
        kept[key] = (compiled, rest)
