"""Which strategy and which launch configurations run for a given problem.

Forward strategies (the math is in :mod:`fused_lora.ops`):

``in_loop``
    One kernel: the shrink ``xa = x·Aᵀ`` is a second ``tl.dot`` on the x tiles
    already loaded for the base GEMM; ``s·xa·Bᵀ`` is added to the accumulator
    after the K loop. Recomputes xa once per N tile (+r/BLOCK_N FLOPs). With
    dropout each N tile multiplies its x tiles by their keep-mask for that dot
    (``drop(x)``; the base dot reads them as loaded), so the mask is drawn
    once per N tile rather than once: chosen only without dropout until
    measured, and run with dropout where forced (:func:`force_strategy`; one
    launch fewer than ``split``; ``bench/gpu_check.sh`` times it as
    ``fused:in_loop`` at p = 0.1).
``split``
    The skinny pass (dropout + shrink, one read of x, the mask drawn once)
    writes the tiny fp32 ``xa`` (M, r); the GEMM then starts its accumulator
    from ``s·xa·Bᵀ`` (+ bias) and runs the base K loop.
``hybrid``
    The skinny pass, then the same GEMM kernel with an empty K loop writes
    ``C = s·xa·Bᵀ + b`` (a store-bound launch, on a tile of its own:
    ``configs.LOW_RANK_ONLY_GEMM``), and cuBLAS adds the base in place
    (``C.addmm_(x, Wᵀ)``). The safety net where Triton's GEMM loses to cuBLAS:
    the default for float32 on CUDA (exact fp32 dots run on FMA units, where
    cuBLAS is far ahead); forced elsewhere with :func:`force_strategy`.
``cublas``
    Every product on cuBLAS (``torch.mm``/``addmm``), the rank-r factors as
    well: no Triton launch without dropout; with dropout one, the keep-mask
    pass (:mod:`fused_lora.kernels.mask`), whose (M, K) mask of bytes
    PyTorch multiplies x by (``x ⊙ keep``; the ``1 / (1 - p)`` goes into
    the low-rank term's scale), the one mask every strategy draws. What an
    eager call on a CUDA device runs by default at dropout 0 below
    :data:`EAGER_CUBLAS_MAX_MNK` (16-bit; float32 at any size), with dropout
    or without (:func:`eager_cublas_reason`): there the host's time
    launching the Triton passes, not the GPU's, decided the step on the
    fifth GPU run. Under CUDA graph capture (``torch.cuda.graph``,
    ``torch.compile(mode="reduce-overhead")``), where the host's time is gone,
    the Triton plan runs, its kernels compiled and loaded by the eager
    warm-up calls before the capture (CUDA refuses to load a module
    mid-capture: without such a warm-up the graph holds cuBLAS's products).
    An eager call, by that rule or forced, records its three forward
    products for autograd, which differentiates them itself: no Python of
    fused_lora's in its backward (:func:`fused_lora.ops._eager_cublas`),
    without dropout, and with dropout up to :data:`EAGER_KEPT_MASK_MAX_M`
    tokens (autograd keeps the mask: :func:`eager_records`); a call through
    the autograd Function (with dropout above that M, captured, traced by
    torch.compile, profiled, a tensor subclass...) runs the same products in
    the Function's two passes, the mask drawn again in the backward.

Small M (at most :data:`SMALL_M` tokens: decode, small batches) is memory
bound: the extra FLOPs of the in-loop shrink are free there, so without
dropout it runs as one GEMM at any rank the in-loop shrink holds in one
tile (up to 128 in 16 bits, 16 in fp32:
:func:`fused_lora.kernels.configs.in_loop_max_block_r`), on the narrowest
tiles (more programs for the bandwidth). Every GEMM (forward, dx, dW) is
split along K when its output has fewer tiles than the GPU has SMs:
fp32 partials per split (of the in-loop shrink's xa too), summed in split
order by one more launch (deterministic; see
:func:`fused_lora.kernels.configs.split_k_for`).

The backward is: the dy pass (g, dB and db from one read of dy), the dx GEMM
(the forward kernel with roles swapped, the mask regenerated in its
epilogue), the dA pass over x (mask regenerated), and the dW GEMM when the
base is trainable. Under ``hybrid`` the dx GEMM writes only the masked
low-rank term and cuBLAS adds ``dy·W``; dW is a cuBLAS GEMM. At small M
where it spares a launch (or where ``in_loop`` is forced), with or without
dropout, the dx GEMM is the in-loop forward with roles swapped: ``g`` is a
second dot on the dy tiles of its K loop (the mask, drawn in the epilogue
either way, multiplies the low-rank term in a tile of its own), and the dy
pass keeps only dB and db. The split-K dx GEMM sums its ``g`` partials in the
launch that sums dx's, and the dy pass needs no reduction where one row
split covers every row (up to 64 tokens on CUDA's tiles): one launch fewer.
Where the dy pass needs its reductions anyway, it computes ``g`` for free
beside dB (it reads dy anyway, and pairs the sums two a launch), while the
K loop would pay ``r/BLOCK_N`` more tensor-core work.

TMA: the 16-bit Triton GEMMs read their A and B tiles through tensor
descriptors (the copy engine zero-fills outside the operands) where both
operands allow one. By default (``"auto"``) on a compiled sm_90 or newer
target, where the second H200 run measured it (:data:`TMA_AUTO_REASON`);
:func:`set_tma` (or ``FUSED_LORA_TMA=1`` / ``0``) forces it on or off
(pointer loads; the interpreter runs pointers unless it is forced on).
Persistent: with :func:`set_persistent` (or ``FUSED_LORA_PERSISTENT=1``)
they run on a grid of about one program per SM, each walking output tiles
(not with split-K, nor with an in-loop rank tile above 32, nor with the
in-loop dx under dropout: they spill there); off by default: on that
run, with TMA, it was ahead on two of six shapes, level on two, behind on two.

:func:`explain` says what would run for a shape, and why.

Configurations come from the heuristics of :mod:`fused_lora.kernels.configs`.
With autotuning on (``FUSED_LORA_AUTOTUNE=1``, or :func:`set_autotune`), the
first GEMM of each size bucket on a GPU times every shipped candidate that
fits and keeps the fastest for that bucket (in this process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from . import _triton
from ._validate import check_bool, check_int, check_shape
from .dropout import check_dropout_p

STRATEGIES = ("in_loop", "split", "hybrid", "cublas")
#: Eager calls (no CUDA graph being captured) at dropout 0 run ``cublas``
#: below this many M·N·K (16-bit; float32 at any size, whose Triton plan runs
#: its base products on cuBLAS already): there the host's time, not the
#: GPU's, decided a Triton step on the fifth GPU run (H100, Triton 3.6,
#: bench/results/2026-12-05-NVIDIA-H100-80GB-HBM3; forward+backward, bf16,
#: r=16, ms without CUDA graphs): at M=4096 4096->4096 the Triton passes took
#: 0.465 on the GPU but 1.185 a step (0.814 at r=64 through the launch cache),
#: where cuBLAS alone (the benchmark's ``unsloth_style``) took 0.522 and naive
#: LoRA 0.573; at M=16 and 256 in eager steps, 0.92-1.21 against 0.21-0.22
#: (naive 0.23-0.24). From M=8192 (this bound) the GPU's time decides, and the
#: Triton passes were level with cuBLAS alone (1.001 through the cache against
#: 1.018; M=16384 1.992 against 2.012, M=4096 4096->14336 1.656 against 1.638).
#: Through CUDA graphs the Triton passes were ahead at small M (M=16: 0.049
#: against 0.058; M=256: 0.065 against 0.072), so captured calls keep them.
EAGER_CUBLAS_MAX_MNK = 8192 * 4096 * 4096
#: Eager calls with dropout run ``cublas`` at any M below
#: :data:`EAGER_CUBLAS_MAX_MNK` (16-bit; float32 at any size), and up to this
#: many tokens (M) they record cuBLAS's products for autograd, which keeps
#: the mask for its backward (:func:`eager_records`): on the fifth GPU run
#: (the same run and timing as above, p = 0.1) the eager Triton steps took
#: 1.02-1.32 ms at M=16 and 256, where naive LoRA took 0.28-0.30 and the
#: kernels themselves 0.06-0.08 (through CUDA graphs), and 1.39 ms at
#: M=4096 against naive's 0.64: the host's time again. Recorded, the step
#: runs no Python of fused_lora's in its backward, but autograd keeps, as
#: PyTorch's dropout does, the (M, K) keep-mask (a byte an element) and
#: x ⊙ keep (for dA): 3 bytes an element of x in 16 bits, 3 MiB a 4096-wide
#: layer at M=256. Above this M the autograd Function runs the same
#: products in its two passes instead, the keep-mask pass drawing the mask
#: in each: nothing of x's size kept (the memory target). Not yet timed on
#: a GPU (on this project's CPU, its launches stubbed, bench/host_overhead.py
#: puts its host time a step between the recorded path's and the Triton
#: plan's). :func:`set_eager_cublas` ``(False)``: the Triton plan at every M.
EAGER_KEPT_MASK_MAX_M = 256
#: Ranks up to this use the in-loop shrink when there is no dropout
#: (KERNELS.md: its extra FLOPs are r/BLOCK_N, +6% at r=16, BN=256; the split
#: costs one more read of x, ~5% at N=4096: expected crossover near r=32).
IN_LOOP_MAX_R = 16
#: At or below this many tokens the problem is memory bound (KERNELS.md):
#: fewest launches first.
SMALL_M = 256
#: At or below this many tokens the forward runs in_loop with dropout too,
#: each N tile drawing the mask of its x tiles again (M·K numbers a tile, few
#: here) instead of a skinny pass and its launch drawing it once: on the
#: fourth H200 run (bench/results/2026-12-04-NVIDIA-H200-4) at M=16, p=0.1,
#: forward+backward 0.064 ms in_loop against 0.068 split through CUDA graphs,
#: and a launch fewer for the host without them (measured at M=16 only).
IN_LOOP_DROPOUT_MAX_M = 32

#: Process-wide dispatch state, not per thread, so that autograd's backward
#: threads see it too, and torch.compile reads it while tracing (guarding on
#: it: a change recompiles). Two switches for the 16-bit Triton GEMMs (Hopper
#: and the interpreter), each timed by bench/gpu_check.sh (``fused:pointers``,
#: ``fused:tma+persistent``): TMA tensor descriptors for the A and B tiles
#: (None: "auto", on for a compiled sm_90 or newer target; True or False:
#: forced, ``FUSED_LORA_TMA=1`` / ``0`` or :func:`set_tma`), and a persistent
#: grid, about one program per SM walking the output tiles
#: (``FUSED_LORA_PERSISTENT=1`` or :func:`set_persistent`). Where TMA loads
#: run, who makes their descriptors: the host, for each launch ("host", the
#: default), or the kernel, in global scratch ("device":
#: ``FUSED_LORA_TMA_DESCRIPTORS=device`` or :func:`set_tma_descriptors`;
#: timed by gpu_check.sh as ``fused:tma_device``). The strategy forced by
#: :func:`force_strategy` (None: chosen per shape). And whether eager calls
#: run ``cublas`` where :func:`eager_cublas_reason` says so
#: (``FUSED_LORA_EAGER_CUBLAS=0`` or :func:`set_eager_cublas` turns it off;
#: timed by gpu_check.sh as ``fused:no_eager_cublas``).
_switches = {"tma": {"1": True, "0": False}.get(os.environ.get("FUSED_LORA_TMA", "auto")),
             "tma_descriptors": os.environ.get("FUSED_LORA_TMA_DESCRIPTORS", "host"),
             "persistent": os.environ.get("FUSED_LORA_PERSISTENT", "0") == "1",
             "strategy": None,
             "eager_cublas": os.environ.get("FUSED_LORA_EAGER_CUBLAS", "1")}
if _switches["eager_cublas"] not in ("0", "1"):
    raise ValueError(f"FUSED_LORA_EAGER_CUBLAS must be '0' or '1', got {_switches['eager_cublas']!r}")
_switches["eager_cublas"] = _switches["eager_cublas"] == "1"
if _switches["tma_descriptors"] not in ("host", "device"):
    raise ValueError(f"FUSED_LORA_TMA_DESCRIPTORS must be 'host' or 'device', got {_switches['tma_descriptors']!r}")

#: Why TMA loads are the default on a compiled sm_90 or newer target.
TMA_AUTO_REASON = ("TMA loads by default on sm_90+: on the second H200 run "
                   "(bench/results/2026-12-04-NVIDIA-H200-2) forward+backward ran 2.1 to 6.2x faster with them than "
                   "with pointer loads on every shape timed both ways (dx's GEMM through pointers took 88-90% of a "
                   "step)")


#: Why an int8 base keeps pointer loads by default, TMA or not elsewhere.
INT8_POINTERS = ("an int8 base reads its tiles through pointers unless TMA is forced on: on the third H200 run "
                 "(bench/results/2026-12-04-NVIDIA-H200-3) its backward at M=16 with TMA loads gave NaN "
                 "(bench/test_bench_lora.py's quantized_base), where the second run's pointer path did not")


def _tma_setting(enabled) -> bool | None:
    if isinstance(enabled, str) and enabled == "auto":
        return None
    try:
        return check_bool("enabled", enabled)
    except TypeError:
        raise TypeError(f"enabled must be a bool or 'auto', got {enabled!r}") from None


def set_tma(enabled: bool | str) -> None:
    """Read the GEMM tiles through TMA tensor descriptors (True) or pointers
    (False); ``"auto"`` (the default): TMA on a compiled sm_90 or newer
    target (:data:`TMA_AUTO_REASON`), pointers elsewhere."""
    _switches["tma"] = _tma_setting(enabled)


def tma_setting() -> bool | str:
    """The TMA switch: True, False, or ``"auto"``."""
    return "auto" if _switches["tma"] is None else _switches["tma"]


#: Why TMA descriptors are made on the host by default.
TMA_DESCRIPTORS_HOST = ("descriptors made on the host for each launch (the default; set_tma_descriptors('device'): "
                        "by the kernel, which spares the launch their encoding: on run 5's H100 as much host time as "
                        "skipping Triton's argument binding saved, its kernels a little slower)")


def _tma_descriptors_setting(where) -> str:
    if not isinstance(where, str):
        raise TypeError(f"where must be 'host' or 'device', got {where!r}")
    if where not in ("host", "device"):
        raise ValueError(f"where must be 'host' or 'device', got {where!r}")
    return where


def set_tma_descriptors(where: str) -> None:
    """Where TMA loads run, who makes their tensor descriptors: ``"host"``
    (the default: Triton encodes them at each launch) or ``"device"`` (each
    program makes them in global scratch from the pointers and strides the
    kernel has anyway; the launch then allocates that scratch through
    Triton's allocator, torch's caching allocator unless one was set)."""
    _switches["tma_descriptors"] = _tma_descriptors_setting(where)


def tma_descriptors_setting() -> str:
    """The TMA descriptors switch: ``"host"`` or ``"device"``."""
    return _switches["tma_descriptors"]


def use_tma_descriptors(where: str):
    """:func:`set_tma_descriptors` inside a ``with`` block, restored after it."""
    return _switched("tma_descriptors", _tma_descriptors_setting(where))


def set_persistent(enabled: bool) -> None:
    """Run the GEMMs on a persistent grid (True) or one program per tile."""
    _switches["persistent"] = check_bool("enabled", enabled)


@contextlib.contextmanager
def _switched(name: str, value):
    previous = _switches[name]
    _switches[name] = value
    try:
        yield
    finally:
        _switches[name] = previous


def use_tma(enabled: bool | str = True):
    """:func:`set_tma` inside a ``with`` block, restored after it."""
    return _switched("tma", _tma_setting(enabled))


def use_persistent(enabled: bool = True):
    """:func:`set_persistent` inside a ``with`` block, restored after it."""
    return _switched("persistent", check_bool("enabled", enabled))


def set_launch_cache(enabled: bool) -> None:
    """Launch the kernels through the launch cache (True, the default) or
    Triton's ``kernel[grid](...)`` at every launch (False;
    ``FUSED_LORA_LAUNCH_CACHE=0`` turns it off at import): a launch whose
    specialisation an earlier one compiled calls that compiled kernel
    directly, sparing the host Triton's argument binding and key lookup
    (:mod:`fused_lora.kernels.launch`, where the fifth GPU run's timings
    are). Without the Triton kernels there is nothing to launch, and
    nothing changes."""
    enabled = check_bool("enabled", enabled)
    kernels = _triton.get()
    if kernels is not None:
        kernels.launch.set_enabled(enabled)


def launch_cache_setting() -> bool:
    """Whether the kernels launch through the launch cache (:func:`set_launch_cache`)."""
    kernels = _triton.get()
    return kernels is not None and kernels.launch.enabled()


@contextlib.contextmanager
def use_launch_cache(enabled: bool = True):
    """:func:`set_launch_cache` inside a ``with`` block, restored after it."""
    previous = launch_cache_setting()
    set_launch_cache(enabled)
    try:
        yield
    finally:
        set_launch_cache(previous)


def set_eager_cublas(enabled: bool) -> None:
    """Let eager calls run cuBLAS alone where :func:`eager_cublas_reason`
    says so (True, the default), or the Triton plan always (False;
    ``FUSED_LORA_EAGER_CUBLAS=0`` at import)."""
    _switches["eager_cublas"] = check_bool("enabled", enabled)


def switches_state() -> tuple:
    """Every switch's value (strategy forced, TMA, persistent grids, TMA
    descriptors, eager cuBLAS) as one tuple: what a cache of plans keys on."""
    return tuple(_switches.values())


def eager_cublas_setting() -> bool:
    """The eager-cuBLAS switch (:func:`set_eager_cublas`)."""
    return _switches["eager_cublas"]


def use_eager_cublas(enabled: bool = True):
    """:func:`set_eager_cublas` inside a ``with`` block, restored after it."""
    return _switched("eager_cublas", check_bool("enabled", enabled))


def eager_cublas_reason(m: int, n: int, k: int, dtype: torch.dtype, dropout_p: float,
                        quantized: bool | str = False) -> str:
    """Why an eager call (on a CUDA device, no CUDA graph being captured, no
    strategy forced, plain LoRA: no row scale, no adapters side by side; and
    cuBLAS not refused by torch's deterministic mode,
    :func:`fused_lora.ops.cublas_deterministic`) of
    this problem runs ``cublas`` instead of its Triton plan; ``""`` where it
    does not: a quantized base (the Triton GEMMs decode it), 16-bit at or
    above :data:`EAGER_CUBLAS_MAX_MNK`, or the switch off
    (:func:`set_eager_cublas`). (How an eager call runs it:
    :func:`eager_records`.)"""
    if not _switches["eager_cublas"] or quantized_kind(quantized):
        return ""
    if dropout_p > 0.0 and m <= EAGER_KEPT_MASK_MAX_M:
        return (f"dropout at M={m} <= {EAGER_KEPT_MASK_MAX_M}: there the host's time launching the Triton "
                "passes, not the GPU's, decided the step on the fifth GPU run (H100, p=0.1: 1.02-1.32 ms a step "
                "at M=16 and 256, naive LoRA 0.28-0.30); the keep-mask pass draws the mask, which is kept for "
                "the backward with x ⊙ keep (3 bytes an element of x in 16 bits, as PyTorch's dropout); a call "
                "captured in a CUDA graph runs the Triton plan, which the eager calls before it primed "
                "(set_eager_cublas(False): always)")
    if dropout_p > 0.0:
        if dtype != torch.float32 and m * n * k >= EAGER_CUBLAS_MAX_MNK:
            return ""
        where = "in float32" if dtype == torch.float32 else f"and M·N·K below {EAGER_CUBLAS_MAX_MNK:.3g}"
        return (f"dropout at M={m} > {EAGER_KEPT_MASK_MAX_M} {where}: there the host's time launching the "
                "Triton passes, not the GPU's, decided the step on the fifth GPU run (H100, p=0.1, M=4096 "
                "4096->4096 r=16: 1.39 ms a step, naive LoRA 0.64); the autograd Function runs cuBLAS's "
                "products, the keep-mask pass drawing the mask in its forward and again in its backward, "
                "nothing of x's size kept (not yet timed on a GPU); a call captured in a CUDA graph runs the "
                "Triton plan, which the eager calls before it primed (set_eager_cublas(False): always)")
    if dtype == torch.float32:
        return ("dropout 0 in float32: the Triton plan (hybrid) runs its base products on cuBLAS anyway, and "
                "cuBLAS's rank-r products spare its launches (set_eager_cublas(False): the Triton plan)")
    if m * n * k >= EAGER_CUBLAS_MAX_MNK:
        return ""
    return (f"dropout 0 and M·N·K below {EAGER_CUBLAS_MAX_MNK:.3g}: there the host's time launching "
            "the Triton passes, not the GPU's, decided the step on the fifth GPU run (H100: M=4096 4096->4096 "
            "r=16, 1.185 ms a step for 0.465 ms of kernels, cuBLAS alone 0.522, naive 0.573); a call captured "
            "in a CUDA graph runs the Triton plan, which the eager calls before it primed (set_eager_cublas(False): "
            "always)")


def eager_records(m: int, dropout_p: float) -> bool:
    """Whether an eager call of M tokens that runs ``cublas`` (by
    :func:`eager_cublas_reason`, or forced) records cuBLAS's products for
    autograd, which differentiates them itself (no Python of fused_lora's
    in the backward: :func:`fused_lora.ops._eager_cublas`): without dropout
    (autograd keeps x and xa, as the autograd Function does), and with
    dropout up to :data:`EAGER_KEPT_MASK_MAX_M` tokens (autograd keeps the
    keep-mask and x ⊙ keep too). Else the autograd Function runs the same
    products in its passes, drawing the mask again in the backward."""
    return dropout_p == 0.0 or m <= EAGER_KEPT_MASK_MAX_M


def force_strategy(strategy: str):
    """Run the forward with ``strategy`` inside the ``with`` block (tests and
    benchmarks use it to cover every path), and its backward too, wherever
    and whenever autograd runs it. ``in_loop`` still falls back to ``split``
    where it cannot run (r above its rank tile, which is narrower with
    dropout in fp32), and ``cublas`` to the plan of no force where it
    cannot (a quantized base, a row scale or adapters side by side).
    Process-wide."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _switched("strategy", strategy)


def forced_strategy() -> str | None:
    """The strategy forced by an enclosing :func:`force_strategy`, or None."""
    return _switches["strategy"]


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
    #: The GPU's SMs the grids were sized for (the persistent grid's too).
    num_sms: int
    #: The Triton GEMMs read their A and B tiles through TMA tensor
    #: descriptors (where the operands allow).
    tma: bool = False
    #: With ``tma``: the kernels make the descriptors (:func:`set_tma_descriptors`).
    tma_device: bool = False
    #: The Triton GEMMs without split-K run on a persistent grid.
    persistent: bool = False
    #: The dx GEMM computes g = dy·B in its K loop (the in-loop forward with
    #: roles swapped) instead of reading it from the dy pass.
    dx_in_loop: bool = False
    #: A quantized base is made whole (Ŵ in x's dtype, once a pass) and the
    #: float path runs on it, instead of the GEMMs decoding its tiles in
    #: their K loops (an NF4 base at large M).
    dequantize_base: bool = False
    #: An eager call's ``cublas`` plan (:func:`eager_cublas_reason`): the
    #: Triton plan of the same problem, which a call captured in a CUDA graph
    #: runs once an eager call primed its kernels (:mod:`fused_lora.ops`);
    #: None on every other plan.
    captured: Plan | None = None

    @property
    def cublas_base(self) -> bool:
        """The base GEMMs (forward, dx, dW) run on cuBLAS."""
        return self.strategy == "hybrid"


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting: exact ("ieee") unless the
    user allowed TF32 (``torch.set_float32_matmul_precision("high")``)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def device_target(device: torch.device) -> _triton.CudaTarget:
    """What the dispatch tunes for on ``device``: a CUDA device's own compute
    capability, shared memory per program (its opt-in limit per block) and
    SM count; Hopper's (the tuning target) for any other device."""
    if device.type != "cuda":
        cfg = _triton.configs()
        return _triton.CudaTarget(90, cfg.SMEM_LIMIT_SM90, cfg.NUM_SMS_SM90)
    return _triton.cuda_target(device)


def device_plan(device: torch.device, m: int, n: int, k: int, r: int, dtype: torch.dtype, dropout_p: float,
                strategy: str | None = None, quantized: bool | str = False, tma_readable=None,
                eager: bool = False, plain: bool = True) -> Plan:
    """:func:`plan` for a problem on ``device``, with that device's own
    compute capability, shared memory and SM count (:func:`device_target`).
    On a CUDA device a plan of the faulting path (:func:`in_loop_faults`)
    runs split instead; ``tma_readable``, a callable, says whether the
    in-loop GEMM's operands can go through TMA at all (the launcher falls
    back to pointer loads where they cannot: an unaligned base, no unit
    stride, a row stride not a multiple of 16 bytes), asked only where that
    decides it (None: they can). ``eager``: the eager-cuBLAS rule may
    apply (the caller says so for a CUDA device where torch lets cuBLAS
    run); with no strategy forced and ``plain`` (no row scale, no adapters
    side by side) the plan is then ``cublas`` where
    :func:`eager_cublas_reason` says so, its ``captured`` the Triton plan
    (which :mod:`fused_lora.ops` runs in a call captured in a CUDA graph once
    an eager call primed its kernels)."""
    target = device_target(device)
    chosen = plan(m, n, k, r, dtype, dropout_p, target.arch, strategy=strategy, smem_limit=target.smem_limit,
                  num_sms=target.num_sms, quantized=quantized, plain=plain)
    if device.type == "cuda":
        chosen = _without_faulting_in_loop(chosen, target.arch, dtype, lambda: plan(
            m, n, k, r, dtype, dropout_p, target.arch, strategy="split", smem_limit=target.smem_limit,
            num_sms=target.num_sms, quantized=quantized, plain=plain), tma_readable)
    if eager and plain and chosen.strategy != "cublas" and (strategy or _switches["strategy"]) is None:
        why = _eager_cublas_reason(m, n, k, dtype, dropout_p > 0.0, quantized_kind(quantized),
                                   _switches["eager_cublas"])
        if why:
            return _eager_cublas_plan(chosen, why)
    return chosen


@functools.lru_cache(maxsize=4096)
def _eager_cublas_reason(m, n, k, dtype, dropout, quantized, enabled) -> str:
    # (cached: eager calls ask at every step)
    return eager_cublas_reason(m, n, k, dtype, 0.5 if dropout else 0.0, quantized) if enabled else ""


#: (id(Triton plan), why) -> (that plan, its eager ``cublas`` plan), kept
#: (so that no id is reused); and (Triton plan, why) -> its ``cublas`` plan,
#: by value (a plan made anew at each call, as the faulting path's split is,
#: finds the same one: its ``captured`` keys the priming of its kernels).
#: The reason is part of both keys: equal Triton plans serve several M, whose
#: reasons differ. Bounded.
_eager_plans: dict = {}
_eager_plans_by_value: dict = {}


def _eager_cublas_plan(chosen: Plan, why: str) -> Plan:
    """``chosen`` with strategy ``cublas`` for an eager call, ``captured``
    ``chosen``, ``reason`` ``why`` (one for equal plans and reasons, made
    once)."""
    kept = _eager_plans.get((id(chosen), why))
    if kept is None or kept[0] is not chosen:
        if len(_eager_plans) >= 4096:
            _eager_plans.clear()
            _eager_plans_by_value.clear()
        cublas = _eager_plans_by_value.get((chosen, why))
        if cublas is None:
            cublas = _eager_plans_by_value[chosen, why] = dataclasses.replace(chosen, strategy="cublas", reason=why,
                                                                              captured=chosen)
        kept = _eager_plans[id(chosen), why] = (chosen, cublas)
    return kept[1]


def _without_faulting_in_loop(chosen: Plan, arch: int, dtype: torch.dtype, split, tma_readable=None) -> Plan:
    """``chosen``, or ``split()`` where :func:`in_loop_faults` says it is
    the faulting path (on compiled code: a CUDA device, or explain's
    ``sm_XY`` target), its TMA loads counted only where ``tma_readable()``
    (if given) says the operands allow them."""
    if in_loop_faults(chosen, arch, dtype):
        why = f"{IN_LOOP_FAULT}, but TMA is off here"
    elif (chosen.tma and tma_readable is not None and in_loop_faults(dataclasses.replace(chosen, tma=False), arch,
                                                                    dtype) and not tma_readable()):
        why = f"{IN_LOOP_FAULT}, but TMA cannot read these operands (pointer loads)"
    else:
        return chosen
    return dataclasses.replace(split(), reason=f"{why}; planned: {chosen.reason}")


#: Why a CUDA device of compute capability 9.0 or more runs no in-loop
#: shrink with pointer loads (16-bit): the first H200 run.
IN_LOOP_FAULT = ("split: the 16-bit in-loop shrink with pointer loads faulted or computed wrong results on an H200 "
                 "with Triton 3.6 (bench/results/2026-12-04-NVIDIA-H200/diagnose.log); TMA loads (the default there) "
                 "keep in_loop")


def in_loop_faults(p: Plan, arch: int, dtype: torch.dtype) -> bool:
    """Whether plan ``p`` (on a CUDA device of ``arch``) runs a 16-bit GEMM
    with the in-loop shrink (the forward's, or dx's g) through pointer
    loads on sm_90 or newer: the path the first H200 run found faulting
    (:data:`IN_LOOP_FAULT`), which :func:`device_plan` replaces by split."""
    return dtype.itemsize == 2 and arch >= 90 and not p.tma and (p.strategy == "in_loop" or p.dx_in_loop)


def _choose(m: int, r: int, dtype: torch.dtype, dropout_p: float, interp: bool, max_block_r: int,
            forced: str | None, quantized: str = ""):
    """(strategy, reason); ``max_block_r``: the in-loop shrink's largest rank
    tile (with this dropout: a masked shrink input holds a narrower one in fp32);
    ``quantized``: ``"int8"`` or ``"nf4"``, a base which only the Triton GEMMs
    read (no hybrid); NF4's decoding leaves no room for the in-loop shrink."""
    if forced == "cublas":  # (where it can: _plan)
        return "cublas", ("forced 'cublas': every product on cuBLAS, the keep-mask pass drawing the mask"
                          if dropout_p else "forced 'cublas': every product on cuBLAS, no Triton launch")
    if quantized and forced == "hybrid":
        strategy, reason = _choose(m, r, dtype, dropout_p, interp, max_block_r, None, quantized)
        return strategy, f"forced 'hybrid', whose cuBLAS GEMMs cannot read an {quantized} base: {reason}"
    if quantized == "nf4":
        why = ("an NF4 base, decoded in the GEMM's K loop (its byte tiles unpacked, each value's code looked up): "
               "the shrink runs in the skinny pass, the decoding leaving the in-loop shrink no registers")
        return "split", (f"forced {forced!r}, which cannot run here ({why}): split" if forced == "in_loop" else why)
    in_loop_ok = dropout_p == 0.0 and r <= max_block_r
    if forced is not None:
        if forced == "in_loop" and r > max_block_r:
            masked = " with dropout" if dropout_p else ""
            return "split", (f"forced 'in_loop', which cannot run here (r={r} exceeds the in-loop shrink's "
                             f"rank tile{masked} ({max_block_r})): split")
        if forced == "in_loop" and dropout_p:
            return forced, "forced 'in_loop': with dropout, each N tile draws the mask of its x tiles for the shrink"
        return forced, f"forced {forced!r}"
    if dtype == torch.float32 and not interp and not quantized:
        return "hybrid", ("float32 on CUDA: exact fp32 dots run on FMA units, where cuBLAS is far ahead; "
                          "the fused low-rank term is cuBLAS's C operand")
    if dropout_p > 0.0 and m <= IN_LOOP_DROPOUT_MAX_M and r <= max_block_r:
        return "in_loop", (f"dropout at M={m} <= {IN_LOOP_DROPOUT_MAX_M}: one GEMM, each N tile drawing its x "
                           "tiles' mask again (few numbers at this M), against a skinny pass and a launch more")
    if not in_loop_ok:
        if dropout_p > 0.0:
            return "split", "dropout > 0: the skinny pass draws the mask once instead of once per N tile"
        return "split", f"r={r} exceeds the in-loop shrink's rank tile ({max_block_r})"
    if m <= SMALL_M:
        return "in_loop", (f"small M ({m} <= {SMALL_M}) is memory bound: one GEMM; the in-loop shrink's "
                           "extra FLOPs are free")
    if r <= IN_LOOP_MAX_R:
        return "in_loop", f"no dropout and r={r} <= {IN_LOOP_MAX_R}: the in-loop shrink costs r/BLOCK_N extra FLOPs"
    return "split", f"r={r} > {IN_LOOP_MAX_R}: recomputing xa per N tile would cost more than one read of x"


def plan(m: int, n: int, k: int, r: int, dtype: torch.dtype, dropout_p: float, arch: int = 90,
         interpreter: bool | None = None, strategy: str | None = None, smem_limit: int | None = None,
         num_sms: int | None = None, quantized: bool | str = False, plain: bool = True) -> Plan:
    """The strategy and configurations for ``x (m, k) · Wᵀ (k, n)`` with rank ``r``
    on a GPU of compute capability ``arch`` (x10) with ``smem_limit`` bytes of
    shared memory per program (default: the arch's, from
    :data:`~fused_lora.kernels.configs.SMEM_LIMIT_BY_ARCH`; a ValueError for
    one below the kernels' minimum) and ``num_sms`` SMs (default: an H200's,
    :data:`~fused_lora.kernels.configs.NUM_SMS_SM90`), or on the interpreter
    (which ignores both). ``strategy``
    forces one (as :func:`force_strategy` does; default: the enclosing force,
    if any). (A row scale, ``lora_linear``'s ``row_scale``, and adapters side
    by side, ``multi_lora_linear``'s, run on every plan: the kernels apply
    them where they make ``xa`` and ``g``; ``r`` is then the sum of the
    adapters' ranks.) ``quantized``: the base is int8 (``True`` or
    ``"int8"``) or NF4 (``"nf4"``; ``"fp4"``, bitsandbytes' FP4, plans as
    NF4: the same kernels with another code book), ``lora_linear``'s ``weight_scale``,
    dequantised in the Triton GEMMs' K loops: never ``hybrid``; an NF4 base
    always ``split``, and from M above
    :data:`~fused_lora.kernels.configs.NF4_DECODE_MAX_M` on made whole once a
    pass instead (``Plan.dequantize_base``), the float base's plan then.
    ``plain``: no row scale and no adapters side by side (where they are, a
    forced ``cublas`` falls back). The plan of a call under CUDA graph
    capture; an eager one may run ``cublas`` instead (:func:`device_plan`).
    Cached per problem: at small M the host's time per call matters."""
    interp = _triton.interpreter() if interpreter is None else interpreter
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    forced = strategy if strategy is not None else _switches["strategy"]
    if smem_limit is None:
        cfg = _triton.configs()
        smem_limit = cfg.SMEM_LIMIT_SM90 if interp else cfg.smem_limit_for(arch)
    if num_sms is None:
        num_sms = _triton.configs().NUM_SMS_SM90
    elif num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    key = (m, n, k, r, dtype, dropout_p > 0.0, arch, interp)
    tma = _switches["tma"]
    if tma is None:  # auto (not for an int8 base: INT8_POINTERS)
        tma = not interp and arch >= 90 and quantized_kind(quantized) != "int8"
    switches = (input_precision(dtype), tma, _switches["persistent"], smem_limit, num_sms)
    return _plan(*key, forced, *switches, quantized_kind(quantized), _switches["tma_descriptors"] == "device",
                 bool(plain))


def quantized_kind(quantized) -> str:
    """``quantized`` of :func:`plan`: ``""`` (False), ``"int8"`` (True or
    ``"int8"``) or ``"nf4"`` (``"nf4"``, or ``"fp4"``: a 4-bit base of
    another code book runs NF4's kernels and plan)."""
    if isinstance(quantized, str) and quantized in ("", "int8", "nf4", "fp4"):
        return "nf4" if quantized == "fp4" else quantized
    if isinstance(quantized, str):
        raise ValueError(f"quantized must be False, True, 'int8', 'nf4' or 'fp4', got {quantized!r}")
    return "int8" if check_bool("quantized", quantized) else ""


@functools.lru_cache(maxsize=4096)
def _plan(m, n, k, r, dtype, dropout, arch, interp, forced, precision, tma, persistent, smem_limit,
          num_sms, quantized="", tma_device=False, plain=True) -> Plan:
    cfg = _triton.configs()
    if forced == "cublas":
        why = (f"an {quantized} base, which only the Triton GEMMs decode" if quantized
               else "a row scale or adapters side by side, which only the kernels apply" if not plain else "")
        if why:
            auto = _plan(m, n, k, r, dtype, dropout, arch, interp, None, precision, tma, persistent, smem_limit,
                         num_sms, quantized, tma_device, plain)
            return dataclasses.replace(auto, reason=f"forced 'cublas', which cannot run here ({why}): {auto.reason}")
    if quantized == "nf4" and m > cfg.NF4_DECODE_MAX_M:
        whole = _plan(m, n, k, r, dtype, dropout, arch, interp, forced, precision, tma, persistent, smem_limit,
                      num_sms, "", tma_device, plain)
        return dataclasses.replace(whole, dequantize_base=True, reason=(
            f"an NF4 base at M={m} > {cfg.NF4_DECODE_MAX_M}: made whole once a pass (decoding it in every M "
            f"tile's K loop would cost more than a write and a read of it), then as a float base: {whole.reason}"))
    elt = dtype.itemsize
    dropout_p = 0.5 if dropout else 0.0  # only "is there dropout" shapes the plan
    strategy, reason = _choose(m, r, dtype, dropout_p, interp, cfg.in_loop_max_block_r(elt), forced, quantized)
    # (under hybrid the Triton GEMMs have no K loop: neither switch applies)
    hopper_16bit = elt == 2 and (interp or arch >= 90) and strategy != "hybrid"
    skinny = cfg.skinny_config(elt, interp, m, smem_limit)
    skinny_programs = cfg.skinny_target_programs(interp, num_sms)
    # dx computes g in its K loop at small M where that spares the dy pass a launch (or where in_loop
    # is forced, even if the forward fell back to split): dropout or not, its mask is drawn in the
    # epilogue either way
    if forced is not None:
        dx_in_loop = forced == "in_loop"
    else:
        def dy_pass_launches(with_g):
            return _triton.get().skinny.skinny_grid(m, n, min(r, skinny.max_block_r), skinny, skinny_programs,
                                                    shrink=with_g, tn=True, colsum=False).launches()
        dx_in_loop = m <= SMALL_M and dy_pass_launches(False) < dy_pass_launches(True)
    dx_in_loop = dx_in_loop and strategy != "hybrid" and r <= cfg.in_loop_max_block_r(elt) and quantized != "nf4"
    # (the persistent grid holds a narrower in-loop rank tile, none with dx's mask: above it, every GEMM
    # runs one program a tile)
    block_r = cfg.block_r_for(r)
    persistent = persistent and hopper_16bit and cfg.persistent_grid_fits(smem_limit) and quantized != "nf4" and not (
        (strategy == "in_loop" and block_r > cfg.in_loop_max_block_r(elt, persistent=True))
        or (dx_in_loop and block_r > cfg.in_loop_max_block_r(elt, persistent=True, epilogue_mask=dropout)))
    if strategy == "hybrid":  # (the Triton launches only write the low-rank term: an empty K loop)
        fwd_gemm = dx_gemm = cfg.LOW_RANK_ONLY_GEMM[elt]
    else:
        fwd_gemm = cfg.gemm_config(m, n, k, r, elt, strategy == "in_loop", interp, arch=arch, persistent=persistent,
                                   shrink_mask=dropout and strategy == "in_loop", smem_limit=smem_limit,
                                   num_sms=num_sms, int8_b=quantized == "int8", nf4_b=quantized == "nf4")
        dx_gemm = cfg.gemm_config(m, k, n, r, elt, dx_in_loop, interp, epilogue_mask=dropout_p > 0.0, arch=arch,
                                  persistent=persistent, smem_limit=smem_limit, num_sms=num_sms,
                                  int8_b=quantized == "int8", nf4_b=quantized == "nf4")
    return Plan(
        strategy=strategy,
        reason=reason,
        fwd_gemm=fwd_gemm,
        dx_gemm=dx_gemm,
        dw_gemm=cfg.gemm_config(n, k, m, 1, elt, False, interp, arch=arch, persistent=persistent,
                                smem_limit=smem_limit, num_sms=num_sms),
        skinny=skinny,
        skinny_programs=skinny_programs,
        input_precision=precision,
        tma=tma and hopper_16bit and _triton.get().tma_available(),
        tma_device=tma_device and tma and hopper_16bit and _triton.get().tma_available(),
        persistent=persistent,
        dx_in_loop=dx_in_loop,
        num_sms=num_sms,
    )


def _cublas_passes(dropout_p: float) -> list[tuple[str, str]]:
    """:meth:`Explanation.passes` of a ``cublas`` plan."""
    if not dropout_p:
        return [("forward", "cuBLAS: xa = x·Aᵀ, y = b + x·Wᵀ, then y += s·xa·Bᵀ in place (no Triton launch)"),
                ("backward", "cuBLAS: g = dy·B, dx = dy·W + s·g·A, dA = s·gᵀ·x, dB = s·dyᵀ·xa, "
                             "db = Σ dy, dW = dyᵀ·x (each only where needed)")]
    return [("forward", "the keep-mask pass writes keep (M, K) bytes (one launch); cuBLAS: xa = (x ⊙ keep)·Aᵀ, "
                        "y = b + x·Wᵀ, then y += s/(1-p)·xa·Bᵀ in place"),
            ("backward", "cuBLAS: g = dy·B, dx = dy·W + s/(1-p)·(g·A) ⊙ keep, dA = s/(1-p)·gᵀ·(x ⊙ keep), "
                         "dB = s·dyᵀ·xa, db = Σ dy, dW = dyᵀ·x (each only where needed; keep kept by an eager "
                         "call's autograd, drawn again by the autograd Function's)")]


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns: the plan and a readable account of it."""

    m: int
    n: int
    k: int
    r: int
    dtype: torch.dtype
    dropout_p: float
    target: str
    plan: Plan
    #: The GPU's SM count the plan was made for (None on the interpreter).
    num_sms: int | None = None
    #: The base's kind: ``""`` (16-bit or fp32), ``"int8"`` or ``"nf4"``.
    quantized: str = ""
    #: Why an eager call (on a CUDA device of the target, no CUDA graph being
    #: captured; plain LoRA) runs ``cublas`` instead of :attr:`plan`, the plan
    #: of a captured call (:func:`eager_cublas_reason`); ``""`` where eager
    #: calls run :attr:`plan` too.
    eager: str = ""

    @property
    def eager_strategy(self) -> str:
        """The strategy an eager call runs: ``"cublas"`` or the plan's."""
        return "cublas" if self.eager else self.plan.strategy

    def passes(self) -> list[tuple[str, str]]:
        p = self.plan
        if p.strategy == "cublas":
            return _cublas_passes(self.dropout_p)

        def tiles(c):
            split = (f" split_k={c.split_k} (fp32 partials, summed in split order by one more launch)"
                     if c.split_k > 1 else "")
            return (f"BLOCK_M={c.block_m} BLOCK_N={c.block_n} BLOCK_K={c.block_k} GROUP_M={c.group_m} "
                    f"warps={c.num_warps} stages={c.num_stages}{split}")

        block_r = _triton.configs().block_r_for(self.r, p.skinny.max_block_r)
        skinny = (f"skinny pass BLOCK_M={p.skinny.block_m} BLOCK_C={p.skinny.block_c} warps={p.skinny.num_warps} "
                  f"stages={p.skinny.num_stages} over row tiles, {p.skinny.stages_for(self.dtype.itemsize, block_r)} "
                  f"over a row tile's columns, "
                  f"~{p.skinny_programs} programs")
        out = []
        if p.dequantize_base:
            out.append(("base", "Ŵ made whole in x's dtype by the dequantisation kernel, once for the forward "
                                "and once for dx (the GEMMs then read it as a float base)"))
        if p.strategy == "in_loop":
            masked = " (x's tiles masked for it: the dropout mask drawn once per N tile)" if self.dropout_p else ""
            out.append(("forward", f"one GEMM with the shrink in its K loop{masked}; {tiles(p.fwd_gemm)}"))
        else:
            out.append(("forward: shrink", f"{skinny} (dropout mask drawn once)" if self.dropout_p else skinny))
            if p.strategy == "split":
                out.append(("forward: GEMM", f"accumulator starts from s·xa·Bᵀ + b; {tiles(p.fwd_gemm)}"))
            else:
                out.append(("forward: GEMM", f"low-rank term + bias as C ({tiles(p.fwd_gemm)}, empty K loop: "
                                             "the store-bound tile), then cuBLAS C.addmm_(x, Wᵀ)"))
        if p.dx_in_loop:
            out.append(("backward: dy pass", f"dB = s·dyᵀ·xa (and db) from one read of dy; {skinny}"))
        else:
            out.append(("backward: dy pass", f"g = s·dy·B, dB = s·dyᵀ·xa (and db) from one read of dy; {skinny}"))
        dx = f"{tiles(p.dx_gemm)}" + (", mask regenerated in the epilogue" if self.dropout_p else "")
        if p.dx_in_loop:
            out.append(("backward: dx", f"the in-loop forward GEMM with roles swapped: g = dy·B in its K loop "
                                        f"(for dA too); {dx}"))
            out.append(("backward: dW", f"the same GEMM (dyᵀ, x), only when the base requires grad; "
                                        f"{tiles(p.dw_gemm)}"))
        elif p.cublas_base:
            out.append(("backward: dx", f"masked (g·A)/(1-p) written by the fused kernel ({dx}), "
                                        "then cuBLAS addmm_(dy, W)"))
            out.append(("backward: dW", "cuBLAS dyᵀ·x, only when the base requires grad"))
        else:
            out.append(("backward: dx", f"the forward GEMM with roles swapped; {dx}"))
            out.append(("backward: dW", f"the same GEMM (dyᵀ, x), only when the base requires grad; "
                                        f"{tiles(p.dw_gemm)}"))
        regenerated = ", mask regenerated" if self.dropout_p else ""
        out.append(("backward: dA", f"gᵀ·drop(x) from one read of x{regenerated}; {skinny}"))
        if p.tma:
            why = f" ({TMA_AUTO_REASON})" if _switches["tma"] is None else " (set_tma(True))"
            made = ("; descriptors made by the kernel, in global scratch (set_tma_descriptors('device'))"
                    if p.tma_device else f"; {TMA_DESCRIPTORS_HOST}")
            out.append(("loads", f"A and B tiles through TMA tensor descriptors where the operands allow{why}{made}"))
        elif _switches["tma"] is False and self.target != "interpreter" and not p.cublas_base:
            out.append(("loads", "A and B tiles through pointers (set_tma(False))"))
        elif self.quantized == "int8" and self.target != "interpreter" and not p.cublas_base:
            out.append(("loads", f"A and B tiles through pointers ({INT8_POINTERS})"))
        if p.persistent:
            out.append(("grid", "persistent: about one program per SM walks the output tiles (GEMMs without "
                                "split-K)"))
        if self.target != "interpreter" and launch_cache_setting():
            out.append(("launches", "through the launch cache: a specialisation compiled before is launched "
                                    "directly, without Triton's argument binding (the default; "
                                    "set_launch_cache(False) turns it off)"))
        return out

    def __str__(self) -> str:
        if not self.dropout_p:
            eager = "cuBLAS's products, autograd's backward, no Triton launch"
        elif eager_records(self.m, self.dropout_p):
            eager = "cuBLAS's products, the keep-mask pass, autograd's backward; the mask kept for it"
        else:
            eager = ("the autograd Function's cuBLAS passes, the keep-mask pass in each; nothing of x's size "
                     "kept")
        head = (f"x ({self.m}, {self.k}) -> ({self.m}, {self.n}), r={self.r}, {str(self.dtype).replace('torch.', '')},"
                f" dropout={self.dropout_p:g} on {self.target}" + (f" ({self.num_sms} SMs)" if self.num_sms else ""))
        lines = [head]
        if self.eager:
            lines.append(f"eager calls: cublas ({eager}) — {self.eager}")
        lines.append(f"{'captured in a CUDA graph' if self.eager else 'strategy'}: {self.plan.strategy} — "
                     f"{self.plan.reason}")
        lines += [f"  {name:<18} {what}" for name, what in self.passes()]
        return "\n".join(lines)


def explain(x_shape, weight_shape, r: int, dtype: torch.dtype = torch.bfloat16, dropout_p: float = 0.0,
            target: str = "sm_90", num_sms: int | None = None, quantized: bool | str = False) -> Explanation:
    """Which strategy and configuration would run for ``x`` of ``x_shape``
    (..., in) and a weight of ``weight_shape`` (out, in), rank ``r``, and why
    (``quantized``: a quantized base, ``lora_linear``'s ``weight_scale``:
    ``True`` or ``"int8"``, ``"nf4"``; ``weight_shape`` the unpacked
    (out, in) all the same).

    ``target``: ``"sm_90"`` (Hopper, the default, whatever this machine has),
    ``"sm_80"``, another ``"sm_XY"``, or ``"interpreter"``; ``num_sms``: the
    GPU's SM count (default: an H200's 132; the grids aim to cover every SM,
    so it moves the tiles at small M and split-K). ``print()`` it.

    On a CUDA target, ``.plan`` is what a call captured in a CUDA graph runs;
    ``.eager`` says why an eager call runs ``cublas`` instead, where it does
    (``.eager_strategy``: what an eager call runs).
    """
    x_shape = check_shape("x_shape", x_shape, "pass x.shape")
    weight_shape = check_shape("weight_shape", weight_shape, "pass weight.shape")
    if len(weight_shape) != 2 or not x_shape or x_shape[-1] != weight_shape[1]:
        raise ValueError(f"x_shape (..., in) and weight_shape (out, in) do not fit: {x_shape}, {weight_shape}")
    r = check_int("r", r, 1)
    if dtype not in _triton.KERNEL_DTYPES:
        raise TypeError(f"dtype must be one of the kernels' {_triton.KERNEL_DTYPES}, got {dtype!r}"
                        + (" (float64 runs on the torch backend, which has no plan)" if dtype == torch.float64 else ""))
    dropout_p = check_dropout_p(dropout_p)
    if not isinstance(target, str):
        raise TypeError(f"target must be a str ('sm_XY' or 'interpreter'), got {type(target).__name__}")
    if target == "interpreter":
        arch, interp = 90, True
    elif target.startswith("sm_") and target[3:].isdigit():
        arch, interp = int(target[3:]), False
    else:
        raise ValueError(f"target must be 'sm_XY' or 'interpreter', got {target!r}")
    if num_sms is not None:
        num_sms = check_int("num_sms", num_sms, 1)
    quantized = quantized_kind(quantized)
    m = 1
    for d in x_shape[:-1]:
        m *= d
    n, k = weight_shape
    if num_sms is None and not interp:
        num_sms = _triton.configs().NUM_SMS_SM90
    chosen = plan(m, n, k, r, dtype, dropout_p, arch=arch, interpreter=interp, num_sms=num_sms, quantized=quantized)
    if not interp:  # (what a CUDA device of that arch runs: device_plan)
        chosen = _without_faulting_in_loop(chosen, arch, dtype, lambda: plan(
            m, n, k, r, dtype, dropout_p, arch=arch, interpreter=False, strategy="split", num_sms=num_sms,
            quantized=quantized))
    eager = eager_cublas_reason(m, n, k, dtype, dropout_p, quantized) if not interp and _switches[
        "strategy"] is None else ""
    return Explanation(m, n, k, r, dtype, float(dropout_p), target, chosen, num_sms, quantized, eager)


# ----------------------------------------------------------------------------
# Opt-in autotuning of the GEMM configurations, per size bucket
# ----------------------------------------------------------------------------

_autotune = os.environ.get("FUSED_LORA_AUTOTUNE", "0") == "1"
_tuned: dict[tuple, object] = {}


def set_autotune(enabled: bool) -> None:
    """Turn autotuning on or off (forgets what was tuned)."""
    global _autotune
    _autotune = check_bool("enabled", enabled)
    _tuned.clear()


def tuned_configs() -> dict[tuple, object]:
    """What autotuning chose so far: key -> GemmConfig."""
    return dict(_tuned)


def _time_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def gemm_config_for(pass_name: str, default, launch, *, m: int, n: int, k: int, r: int, dtype: torch.dtype,
                    shrink_in_loop: bool, epilogue_mask: bool, device: torch.device, persistent: bool = False,
                    shrink_mask: bool = False, int8_b: bool = False, nf4_b: bool = False):
    """The configuration for one GEMM launch: ``default`` (the heuristic),
    unless autotuning is on, on a GPU, in which case the fastest candidate for
    this size bucket, timed once with ``launch(config)``."""
    if not _autotune or device.type != "cuda" or _triton.get().launch.priming_active():
        return default  # (priming launches nothing: nothing to time)
    cfg = _triton.configs()
    arch, smem_limit, num_sms = device_target(device)
    elt = dtype.itemsize
    block_r = cfg.block_r_for(r) if shrink_in_loop else cfg.block_r_for(r, cfg.GEMM_LR_MAX_BLOCK_R[elt])
    key = (pass_name, cfg.m_bucket(m), n, k, block_r, dtype, shrink_in_loop, epilogue_mask, arch, smem_limit,
           num_sms, persistent, shrink_mask, int8_b, nf4_b)
    if key not in _tuned:
        candidates = cfg.gemm_candidates(elt, block_r, shrink_in_loop, epilogue_mask, smem_limit=smem_limit,
                                         arch=arch, persistent=persistent, shrink_mask=shrink_mask,
                                         int8_b=int8_b, nf4_b=nf4_b)
        if dataclasses.replace(default, split_k=1) not in candidates:  # (the heuristic's tile is timed too)
            candidates = [default, *candidates]
        # each tile shape with its own split-K
        candidates = [dataclasses.replace(c, split_k=cfg.split_k_for(c, m, n, k, False, num_sms))
                      for c in candidates]
        timings = []
        for candidate in candidates:
            try:
                timings.append((_time_ms(lambda c=candidate: launch(c)), candidate))
            except Exception:  # a candidate that cannot run here (resources) is skipped
                continue
        _tuned[key] = min(timings, key=lambda t: t[0])[1] if timings else default
    return _tuned[key]

