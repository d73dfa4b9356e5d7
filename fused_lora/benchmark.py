"""Benchmark harness: fused LoRA against naive LoRA and the bare base layer.

Providers (all compute ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with W frozen):

``fused``           this package (Triton kernels, forward and backward)
``naive``           PEFT's eager composition: linear, dropout, A, B, scale, add
``unsloth_style``   cuBLAS ``addmm`` + ``addmm_(alpha=s)`` (no dropout: N/A when p > 0)
``naive_compiled``  ``torch.compile`` of ``naive``
``base``            bare ``F.linear``: the floor, no adapter at all

and, on a preset's ``variant_cases``, ``fused:in_loop``, ``fused:split``,
``fused:hybrid`` and ``fused:cublas`` (``fused`` with that forward strategy
forced; ``cublas`` is cuBLAS's products, with dropout on x ⊙ keep, the mask
drawn by the keep-mask pass, which autograd differentiates in eager calls
but with dropout above ``dispatch.EAGER_KEPT_MASK_MAX_M`` tokens, where
an autograd Function of its own runs them, the mask drawn again in the backward:
what the eager rule runs below its size), ``fused:pointers``
(``fused`` with pointer tile loads: TMA off, as it is by default off Hopper) and
``fused:tma+persistent`` (TMA loads, its GEMMs on a persistent grid) and
``fused:tma_device`` (TMA loads through descriptors its kernels make) and
``fused:no_launch_cache`` (the defaults, launched without the launch cache:
``fused_lora.dispatch.set_launch_cache(False)``) and ``fused:no_eager_cublas``
(the Triton plan where an eager call would run ``cublas``:
``fused_lora.dispatch.set_eager_cublas(False)``), forward and forward+backward: the
data behind the dispatch rules and the switches.

Modes: ``forward``, ``backward`` (the backward of one recorded forward, timed
alone), ``forward+backward``. On a GPU each number is the median of
``triton.testing.do_bench`` after warm-up (Triton compiles on the first call);
small M is timed through a CUDA graph, and, for the main providers, also in
eager mode, steps back to back (host time included: what a training loop
without graphs sees). Inputs are rotated: each timed round
runs the step on several independent copies of x and the weights, together
more than twice the L2 cache, and reports the time per step, so small problems
are not served from cache (do_bench also flushes L2 between rounds). Peak
memory is the extra ``torch.cuda.max_memory_allocated`` of one forward+backward.
On a preset's ``profile_cases`` the ``fused`` forward+backward step is also
profiled once, kernel by kernel (torch.profiler's device times, launch order):
where the time goes, pass by pass, beside the roofline model's guess.

Without a GPU the harness runs its *smoke* preset: tiny shapes through
Triton's CPU interpreter, checking that every provider runs and agrees; its
times are wall-clock seconds of an interpreter, **not speed measurements**.
The roofline model (bytes and FLOPs of naive vs fused per shape) is printed
beside, labelled as a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PROVIDERS = ("fused", "naive", "unsloth_style", "naive_compiled", "base")
#: ``fused`` with its forward strategy forced (see :mod:`fused_lora.dispatch`),
#: and ``fused`` with the switches of :mod:`fused_lora.dispatch` set
#: (:data:`SWITCH_SETTINGS`): the data that tunes the dispatch rules and the
#: switches' defaults. Run on a preset's ``variant_cases``.
STRATEGY_PROVIDERS = ("fused:in_loop", "fused:split", "fused:hybrid", "fused:cublas")
#: Each switch provider's settings, every switch named (whatever the
#: defaults): pointer loads (TMA off: the default off Hopper, the other side
#: of Hopper's default), TMA loads on the persistent grid, TMA loads
#: through descriptors the kernels make (no host-side descriptor a launch:
#: host time, which the steps timed without CUDA graphs include), the
#: default loads launched without the launch cache, which the others go
#: through as the default does (host time too; timed in eager mode at small M
#: as well), and the default Triton plan where an eager call would run
#: cuBLAS alone (``no_eager_cublas``: the dispatch's eager rule off, as it is
#: for the other switch providers, which time the Triton plan's switches).
SWITCH_SETTINGS = {
    "fused:pointers": {"tma": False, "tma_descriptors": "host", "persistent": False, "launch_cache": True,
                       "eager_cublas": False},
    "fused:tma+persistent": {"tma": True, "tma_descriptors": "host", "persistent": True, "launch_cache": True,
                             "eager_cublas": False},
    "fused:tma_device": {"tma": True, "tma_descriptors": "device", "persistent": False, "launch_cache": True,
                         "eager_cublas": False},
    "fused:no_launch_cache": {"tma": "auto", "tma_descriptors": "host", "persistent": False, "launch_cache": False,
                              "eager_cublas": False},
    "fused:no_eager_cublas": {"tma": "auto", "tma_descriptors": "host", "persistent": False, "launch_cache": True,
                              "eager_cublas": False}}
#: The providers also timed in eager mode at small M (the eager table).
EAGER_PROVIDERS = PROVIDERS + ("fused:no_launch_cache", "fused:no_eager_cublas")
SWITCH_PROVIDERS = tuple(SWITCH_SETTINGS)
VARIANT_PROVIDERS = STRATEGY_PROVIDERS + SWITCH_PROVIDERS
VARIANT_MODES = ("forward", "forward+backward")
MODES = ("forward", "backward", "forward+backward")
#: H200 roofline used by the model (measured on our machine: bf16 matmul
#: ~790 TFLOP/s; device copy ~4.3 TB/s; KERNELS.md plans with 4.0).
PEAK_FLOPS = 790e12
PEAK_BYTES_PER_S = 4.0e12
#: Per-kernel launch cost in the model (eager PyTorch dispatch + launch, a few µs).
LAUNCH_S = 3e-6
#: Integer throughput for drawing dropout masks: Hopper retires 64 32-bit
#: integer multiply/logic results per clock per SM (132 SMs at 1.98 GHz).
PEAK_INT_OPS_PER_S = 132 * 64 * 1.98e9
#: Integer instructions per element of a drawn mask, naive: PyTorch's dropout
#: kernel shares a Philox4x32-10 call among four elements (a 32-bit uniform
#: each), then converts, compares and multiplies. Our kernels drew their mask
#: that way before, and their sm_90 SASS grew by about this much per element
#: with dropout on; the model charges PyTorch the same.
NAIVE_MASK_INT_OPS_PER_ELEMENT = 28
#: The same for the fused kernels (one Philox call per eight elements, 16-bit
#: thresholds: :func:`fused_lora.kernels.common.keep_mask`), measured in the
#: sm_90 SASS of each kernel with and without dropout (Triton 3.9): the
#: skinny passes (forward shrink, dA) and the dx GEMM's epilogue, where the
#: mask is drawn in one layout and multiplied in the accumulator's.
FUSED_MASK_INT_OPS_PER_ELEMENT = {"skinny": 13.5, "dx": 17.4}
#: Below this many tokens the GPU timer uses CUDA graphs (launch-bound regime).
CUDA_GRAPH_MAX_M = 256


@dataclass(frozen=True)
class Case:
    """One problem: x (m, k) -> (m, n), rank r, dtype, dropout p."""

    m: int
    k: int
    n: int
    r: int
    dtype: str = "bfloat16"
    dropout: float = 0.0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"M={self.m} {self.k}->{self.n} r={self.r} {self.dtype} p={self.dropout:g}"


@dataclass
class Measurement:
    case: Case
    provider: str
    mode: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    timer: str = ""
    peak_mem_bytes: int | None = None
    max_error: float | None = None  # |provider - naive| / max|naive| at p = 0, forward
    note: str = ""
    #: GPU kernels of one step in launch order, [name, µs] (``fused``, forward+backward, profile cases)
    kernels: list | None = None
    #: Small M on a GPU: ms per step run back to back in eager mode, no CUDA
    #: graph (what a training loop without graphs sees: host time included)
    eager_ms: float | None = None


@dataclass
class Preset:
    name: str
    cases: list
    providers: tuple = PROVIDERS
    modes: tuple = MODES
    #: providers timed only on these cases (compilation is slow)
    compiled_cases: tuple | None = None
    #: cases on which every forced strategy (VARIANT_PROVIDERS) is timed too
    variant_cases: tuple = ()
    #: cases whose ``fused`` forward+backward step is also profiled kernel by kernel (GPU only)
    profile_cases: tuple = ()


def _grid(ms, shapes, ranks, dropouts, dtypes):
    return [Case(m, k, n, r, dt, p) for dt in dtypes for (k, n) in shapes for m in ms for r in ranks for p in dropouts]


def presets() -> dict[str, Preset]:
    headline = Case(8192, 4096, 4096, 16, "bfloat16", 0.0)
    return {
        # CPU interpreter: every provider and mode on tiny shapes.
        "smoke": Preset("smoke", _grid([16, 48], [(64, 48)], [8], [0.0, 0.1], ["float32", "float16"]),
                        providers=("fused", "naive", "unsloth_style", "base"), compiled_cases=(),
                        variant_cases=(Case(48, 64, 48, 8, "float16"), Case(48, 64, 48, 8, "float16", 0.1))),
        # The issue-2 check: the headline shape, both dropout settings.
        "headline": Preset("headline", [headline, dataclasses.replace(headline, dropout=0.1)],
                           compiled_cases=(headline,)),
        # What bench/gpu_check.sh runs: the headline first, then a representative
        # subset (small to large M, a wide output, a large rank), ~2-3 minutes.
        # Every forced strategy runs on a few of them: small and large M, a wide
        # output, a large rank (the data for the dispatch rules).
        "gpu-check": Preset(
            "gpu-check",
            [headline, dataclasses.replace(headline, dropout=0.1)]
            + _grid([16, 256, 4096, 16384], [(4096, 4096)], [16], [0.0, 0.1], ["bfloat16"])
            + _grid([4096], [(4096, 14336)], [16], [0.0, 0.1], ["bfloat16"])
            + _grid([4096], [(4096, 4096)], [64], [0.0, 0.1], ["bfloat16"]),
            compiled_cases=(headline,),
            # (M=4096: its steps without graphs took as long as the M=16 eager ones on the fourth run, host-bound;
            # the kernel table says how long its kernels take)
            profile_cases=(headline, dataclasses.replace(headline, dropout=0.1), Case(16, 4096, 4096, 16),
                           Case(4096, 4096, 4096, 16)),
            variant_cases=(headline, dataclasses.replace(headline, dropout=0.1), Case(16, 4096, 4096, 16),
                            Case(16, 4096, 4096, 16, dropout=0.1), Case(4096, 4096, 14336, 16),
                            Case(4096, 4096, 4096, 64))),
        # Issue 3's full grid (longer than one device call: run it in parts with --m).
        "full": Preset("full", _grid([16, 256, 4096, 16384], [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)],
                                     [8, 16, 64], [0.0, 0.1], ["bfloat16", "float16"])),
    }


# ----------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------

@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: float

    @classmethod
    def make(cls, case: Case, device, seed: int = 0) -> "Inputs":
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = case.torch_dtype

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

        return cls(
            x=rand(case.m, case.k).requires_grad_(),
            weight=rand(case.n, case.k, scale=case.k ** -0.5),
            bias=rand(case.n),
            lora_A=rand(case.r, case.k, scale=case.k ** -0.5).requires_grad_(),
            lora_B=rand(case.n, case.r, scale=case.r ** -0.5).requires_grad_(),
            scaling=2.0,
            dropout=case.dropout,
        )

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x] if provider == "base" else [self.x, self.lora_A, self.lora_B]


def naive_lora(x, weight, bias, lora_A, lora_B, scaling, dropout):
    """PEFT's ``Linear.forward``: base, then lora_B(lora_A(dropout(x))) * scaling."""
    result = F.linear(x, weight, bias)
    dropped = F.dropout(x, dropout, training=True) if dropout > 0 else x
    return result + F.linear(F.linear(dropped, lora_A), lora_B) * scaling


def unsloth_style_lora(x, weight, bias, lora_A, lora_B, scaling, dropout):
    """cuBLAS composition without dropout: addmm(b, x, Wᵀ).addmm_(x·Aᵀ, Bᵀ, alpha=s)."""
    if dropout > 0:
        raise NotImplementedError("unsloth_style has no dropout")
    return torch.addmm(bias, x, weight.t()).addmm_(x @ lora_A.t(), lora_B.t(), alpha=scaling)


def per_adapter_lora(x, weight, bias, lora_As, lora_Bs, adapter_ids, scalings, dropout):
    """PEFT's mixed batch (``adapter_names``, its ``_mixed_batch_forward``): the
    base over every row, then each adapter over its own rows (gathered,
    through dropout, A, B and its scale, added back), one adapter after the
    other: what :func:`fused_lora.multi_lora_linear` runs in one set of
    launches. x (M, K), ``adapter_ids`` (M,)."""
    result = F.linear(x, weight, bias)
    for i, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        rows = (adapter_ids == i).nonzero().squeeze(1)  # (a host sync, as PEFT's list of row indices)
        sub = x.index_select(0, rows)
        dropped = F.dropout(sub, dropout, training=True) if dropout > 0 else sub
        result = result.index_add(0, rows, F.linear(F.linear(dropped, lora_A), lora_B) * scalings[i])
    return result


def not_applicable(provider: str, dropout: float) -> str:
    """Why ``provider`` has no step at this dropout probability (``""`` where
    it has one): the one rule behind the harness's N/A cells, ``make_forward``'s
    None and the cases the pytest-benchmark suite collects."""
    if provider == "unsloth_style" and dropout > 0:
        return "N/A: no dropout in this composition"
    return ""


def make_forward(provider: str, inp: Inputs):
    """A zero-argument forward of ``provider`` on ``inp``; None where the
    provider does not apply (:func:`not_applicable`)."""
    import fused_lora

    if not_applicable(provider, inp.dropout):
        return None

    args = (inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, inp.dropout)
    if provider == "fused":
        return lambda: fused_lora.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.bias,
                                              scaling=inp.scaling, dropout_p=inp.dropout, backend="triton")
    if provider in SWITCH_PROVIDERS:  # (the switches are on around the step: see variant_context)
        return make_forward("fused", inp)
    if provider in STRATEGY_PROVIDERS:
        strategy = provider.split(":")[1]

        def forced():
            # The strategy is read when the forward runs; its backward follows the
            # strategy that forward saved, whenever autograd runs it.
            with fused_lora.dispatch.force_strategy(strategy):
                return fused_lora.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.bias,
                                              scaling=inp.scaling, dropout_p=inp.dropout, backend="triton")
        return forced
    if provider == "naive":
        return lambda: naive_lora(*args)
    if provider == "unsloth_style":
        return lambda: unsloth_style_lora(*args)
    if provider == "naive_compiled":
        compiled = torch.compile(naive_lora, dynamic=False)
        return lambda: compiled(*args)
    if provider == "base":
        return lambda: F.linear(inp.x, inp.weight, inp.bias)
    raise ValueError(f"unknown provider {provider!r}")


def variant_context(provider: str):
    """What must hold while ``provider`` builds and runs its steps (forward and
    backward alike, whatever thread autograd uses): for a switch provider,
    its :data:`SWITCH_SETTINGS`."""
    import contextlib

    import fused_lora

    stack = contextlib.ExitStack()
    if provider in SWITCH_PROVIDERS:
        switches = {"tma": fused_lora.dispatch.use_tma, "persistent": fused_lora.dispatch.use_persistent,
                    "tma_descriptors": fused_lora.dispatch.use_tma_descriptors,
                    "launch_cache": fused_lora.dispatch.use_launch_cache,
                    "eager_cublas": fused_lora.dispatch.use_eager_cublas}
        for name, value in SWITCH_SETTINGS[provider].items():
            stack.enter_context(switches[name](value))
    return stack


def make_step(mode: str, forward, leaves, dy):
    """A zero-argument callable that runs one ``mode`` step."""
    if mode == "forward":
        return forward
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(forward(), leaves, dy)
    y = forward()
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


# ----------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------

def input_copies(case: Case, max_copies: int = 8) -> int:
    """How many independent input sets make one timed round exceed twice the
    GPU's L2 cache (so that small problems are not timed from cache)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 60 * 2**20
    e = case.torch_dtype.itemsize
    per_copy = e * (case.m * case.k + case.n * case.k + case.n + case.r * (case.k + case.n))
    return max(1, min(max_copies, math.ceil(2 * l2 / per_copy)))


def time_cuda(step, m: int, warmup_ms: int = 25, rep_ms: int = 100, stream=None) -> tuple[list[float], str]:
    """(p50, p20, p80) in ms and the timer used. Small M is timed through a
    CUDA graph captured on ``stream`` (:func:`graph_stream`: where a
    backward step's forward was recorded, so that autograd launches the
    backward there, into the capture)."""
    import triton.testing

    step()  # compile, autotune, allocate
    torch.cuda.synchronize()
    if m <= CUDA_GRAPH_MAX_M:
        try:
            return time_cuda_graph(step, stream or graph_stream(), rep_ms), "cuda-graph"
        except Exception as err:  # fall back, and say so
            torch.cuda.synchronize()
            note = f"do_bench (graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:120]})"
    else:
        note = "do_bench"
    q = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return list(q), note


def graph_stream():
    """A side stream that has waited for the current one: the stream on
    which a small-M case's steps are built (a backward step records its
    forward there) and captured (:func:`time_cuda_graph`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return stream


def time_cuda_graph(step, stream, rep_ms: float = 100.0, target_replay_ms: float = 2.0) -> list[float]:
    """(p50, p20, p80) ms per call of ``step``, captured into CUDA graphs on
    ``stream`` and replayed: one capture of a single call estimates its time,
    then one of as many calls as make about ``target_replay_ms`` is replayed
    for about ``rep_ms`` (each replay timed by CUDA events on ``stream``).
    Triton's ``do_bench_cudagraph`` captures on a stream of its own: a
    backward step whose forward ran elsewhere then launches its kernels
    outside the capture, which fails (and a failed capture leaves the CUDA
    generator in capture mode, so that every later dropout fails with
    "Offset increment outside graph capture")."""
    def capture(calls: int):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                step()
        return graph

    def replay_ms(graph, replays: int) -> list[float]:
        out = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            out.append(start.elapsed_time(end))
        return out

    with torch.cuda.stream(stream):
        step()  # (warm on this stream: the allocator's pools, autograd's)
        stream.synchronize()
        one = capture(1)
        estimate = statistics.median(replay_ms(one, 5))
        del one
        calls = max(1, min(1000, round(target_replay_ms / max(estimate, 1e-3))))
        graph = capture(calls)
        replay_ms(graph, 2)  # (warm)
        times = [t / calls for t in replay_ms(graph, max(5, round(rep_ms / max(estimate * calls, 1e-3))))]
    torch.cuda.current_stream().wait_stream(stream)
    times.sort()

    def at(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return [statistics.median(times), at(0.2), at(0.8)]


def time_eager(step, target_ms: float = 10.0, rounds: int = 5) -> float:
    """Median ms per call of ``step`` called back to back in eager mode, with
    one synchronisation a round: the throughput of a training loop without
    CUDA graphs, bound by whichever of the host (Python, dispatch, launches)
    and the GPU is slower. (do_bench's per-call events would hide part of the
    host's time behind its L2 flush.)"""
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    calls = max(1, min(1000, int(target_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def time_cpu(step, reps: int = 1) -> tuple[list[float | None], str]:
    """Wall-clock ms of ``step`` after one warm-up call: ``[median, p20,
    p80]`` over ``reps`` calls, the quantiles None below 5 calls (no spread
    to speak of). Without a GPU the kernels run on Triton's interpreter,
    whose times say nothing about a GPU's, so one timed call by default: the
    smoke run checks the harness, not the speed."""
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    cuts = statistics.quantiles(times, n=5) if reps >= 5 else [None] * 4
    return [statistics.median(times), cuts[0], cuts[3]], "cpu wall clock (interpreter: not a speed measurement)"


def kernel_timeline(step) -> list | None:
    """The GPU kernels (and device memsets/copies) one call of ``step``
    launches, in launch order, as ``[name, µs]`` pairs from torch.profiler's
    CUDA activity: where a step's time goes, pass by pass. None without CUDA
    or when the profiler reports no device events."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()  # compiled and warm before the profiled call
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    return [[e.name[:80], round(e.time_range.elapsed_us(), 2)] for e in events] or None


def peak_memory(step) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------
# The roofline model (not a measurement)
# ----------------------------------------------------------------------------

def model(case: Case, eager: bool | None = None) -> dict:
    """Ideal bytes, FLOPs and time of naive vs fused, forward and backward, at
    the H200 roofline (each kernel costs max(FLOPs/peak, bytes/bandwidth) + a launch).

    Naive forward kernels: base GEMM; [dropout: read x, write x' and mask];
    shrink; expand; scale; add. Naive backward: dB, g, dA, d(dropout), dx
    (base), dx (lora) and their adds. Fused: the kernels that ``fused`` runs
    for the shape on sm_90 (``fused_lora.explain``) in an eager call
    (``eager``; None: as the GPU timer times the case, eager above
    :data:`CUDA_GRAPH_MAX_M` tokens) or a captured one: :func:`model_path`.
    Where that is ``cublas`` (the eager rule's, or forced), cuBLAS's
    products (:func:`_cublas_kernels`). Else the Triton plan: the forward GEMM
    (after the skinny pass over x, for ``split``, and with dropout the draw of
    the seed on the GPU before it); backward, the dy pass (g
    and dB, or dB alone where the dx GEMM computes g in its K loop), the dx
    GEMM and the dA pass; each GEMM split along K with its fp32 partials
    and the launch that sums them, each skinny pass with its reductions
    and the fp32 partials they sum (:meth:`~fused_lora.kernels.skinny.SkinnyGrid.small_bytes`:
    the dy pass with g makes one dB partial a 64-row tile, 35 MB at M = 8192,
    N = 4096, r = 16, written and read again; all of it DRAM traffic here,
    though some may stay in L2).

    Drawing a dropout mask costs integer instructions (a third roofline, at
    :data:`PEAK_INT_OPS_PER_S`; :data:`NAIVE_MASK_INT_OPS_PER_ELEMENT` and
    :data:`FUSED_MASK_INT_OPS_PER_ELEMENT`): naive draws it once and stores
    it; fused draws it three times (the forward shrink, the dx epilogue, the
    dA pass; a forced ``in_loop`` forward draws it once per N tile, in its K
    loop). The dx GEMM draws its mask before its K loop, so there it adds
    to the GEMM's time rather than hiding under it. The ``cublas`` path
    draws it in the keep-mask pass (at the skinny passes' count: the same
    draw), once, or, where its autograd Function runs the products, twice.
    """
    m, k, n, r = case.m, case.k, case.n, case.r
    e = case.torch_dtype.itemsize
    drop = case.dropout > 0
    # (FLOPs, bytes) per kernel
    naive_fwd = [(2 * m * n * k, e * (m * k + n * k + m * n)),  # base GEMM
                 (2 * m * k * r, e * (m * k + r * k + m * r)),  # shrink
                 (2 * m * n * r, e * (m * r + n * r + m * n)),  # expand
                 (m * n, 2 * e * m * n),  # scale
                 (m * n, 3 * e * m * n)]  # add
    # integer ops of one drawn (m, k) mask: by PyTorch, by a skinny pass, in the dx epilogue
    naive_mask, skinny_mask, dx_mask = (ops * m * k if drop else 0 for ops in (
        NAIVE_MASK_INT_OPS_PER_ELEMENT, FUSED_MASK_INT_OPS_PER_ELEMENT["skinny"],
        FUSED_MASK_INT_OPS_PER_ELEMENT["dx"]))
    if drop:
        naive_fwd.append((m * k, 2 * e * m * k + m * k, naive_mask))  # dropout: read x, write x' and the mask
    naive_bwd = [(2 * m * n * k, e * (m * n + n * k + m * k)),  # dx of the base
                 (m * n, 2 * e * m * n),  # grad of the scale
                 (2 * m * n * r, e * (m * n + n * r + m * r)),  # g = dy B
                 (2 * m * n * r, e * (m * n + m * r + n * r)),  # dB
                 (2 * m * k * r, e * (m * r + r * k + m * k)),  # dx of the adapter
                 (2 * m * k * r, e * (m * r + m * k + r * k)),  # dA
                 (m * k, 3 * e * m * k)]  # dx add
    if drop:
        naive_bwd.append((m * k, 2 * e * m * k + m * k))  # grad of the dropout
    path = model_path(case, eager)
    if path.startswith("cublas"):
        fused_fwd, fused_bwd = _cublas_kernels(m, n, k, r, e, drop, path == CUBLAS_RECORDED, skinny_mask)
    else:
        fused_fwd, fused_bwd = _triton_plan_kernels(case, skinny_mask, dx_mask)
    out = {"fused_path": path}
    for name, kernels in (("naive_forward", naive_fwd), ("naive_backward", naive_bwd),
                          ("fused_forward", fused_fwd), ("fused_backward", fused_bwd)):
        out[f"{name}_s"] = _seconds(kernels)
        out[f"{name}_flops"] = sum(kern[0] for kern in kernels)
        out[f"{name}_bytes"] = sum(kern[1] for kern in kernels)
        out[f"{name}_kernels"] = len(kernels)
    out["speedup_forward"] = out["naive_forward_s"] / out["fused_forward_s"]
    out["speedup_backward"] = out["naive_backward_s"] / out["fused_backward_s"]
    out["speedup_forward+backward"] = ((out["naive_forward_s"] + out["naive_backward_s"])
                                       / (out["fused_forward_s"] + out["fused_backward_s"]))
    return out


#: :func:`model_path`'s names of the ``cublas`` paths: cuBLAS's products
#: recorded for autograd, or run by its autograd Function
#: (``ops._LoRALinearCublasFunction``; :func:`fused_lora.dispatch.eager_records`).
CUBLAS_RECORDED, CUBLAS_FUNCTION = "cublas, recorded", "cublas, Function"


def model_path(case: Case, eager: bool | None = None) -> str:
    """The path of ``fused`` that :func:`model` prices for ``case`` on sm_90:
    the Triton plan's strategy, or, where an eager call (``eager``; None: as
    the GPU timer times the case) runs ``cublas`` by the eager rule or a
    forced ``cublas`` runs, :data:`CUBLAS_RECORDED` or :data:`CUBLAS_FUNCTION`."""
    from . import dispatch

    eager = case.m > CUDA_GRAPH_MAX_M if eager is None else eager
    strategy = default_strategy(case, "sm_90", eager)
    if strategy != "cublas":
        return strategy
    # (eager: autograd records cuBLAS's products, or, with dropout above EAGER_KEPT_MASK_MAX_M tokens, the
    # cublas Function runs them; a captured call runs a forced cublas on the generic Function's passes, which
    # also cast xa to fp32 and back: three small kernels more than priced)
    return CUBLAS_RECORDED if eager and dispatch.eager_records(case.m, case.dropout) else CUBLAS_FUNCTION


def _cublas_kernels(m, n, k, r, e, drop, records, mask_ops) -> tuple[list, list]:
    """The forward's and the backward's kernels of the ``cublas`` path
    (:func:`fused_lora.ops.forward_cublas`; ``records``: autograd's backward
    of its products, else :func:`fused_lora.ops.backward_cublas`), as
    :func:`model` prices them; ``mask_ops``: the integer ops of drawing the
    (m, k) mask once (0 without dropout). x requires its gradient, A and B
    train, W and the bias are frozen (the benchmark's step)."""
    keep = [(0, m * k, mask_ops)]  # the keep-mask pass: a byte an element
    masked_x = [(m * k, 2 * e * m * k + m * k)]  # x ⊙ keep (or a gradient ⊙ keep)
    fwd = ([(0, 4)] + keep + masked_x if drop else []) + [  # (the seed drawn on the GPU first)
        (2 * m * k * r, e * (m * k + r * k + m * r)),  # xa = x·Aᵀ
        (2 * m * n * k, e * (m * k + n * k + m * n)),  # y = b + x·Wᵀ
        (2 * m * n * r, e * (m * r + n * r + 2 * m * n))]  # y += s·xa·Bᵀ, in place
    if records:  # autograd's backward of the products
        bwd = [(2 * m * n * r, e * (m * n + n * r + m * r)), (m * r, 2 * e * m * r),  # d(xa) = dy·B, times s
               (2 * m * n * r, e * (m * n + m * r + n * r)), (n * r, 2 * e * n * r),  # dB, times s
               (2 * m * n * k, e * (m * n + n * k + m * k)),  # dy·W
               (2 * m * k * r, e * (m * r + r * k + m * k)),  # d(xa)·A
               (2 * m * k * r, e * (m * r + m * k + r * k))]  # dA
        return fwd, bwd + (masked_x if drop else []) + [(m * k, 3 * e * m * k)]  # [⊙ keep], the sum of dx's two
    # the eager call's cublas Function (ops._LoRALinearCublasFunction) keeps xa as the forward made it
    bwd = [(2 * m * n * r, e * (m * n + n * r + m * r))]  # g = dy·B
    bwd += (keep + masked_x) if drop else []  # the mask drawn again, x ⊙ keep
    bwd += [(2 * m * k * r, e * (m * r + m * k + r * k)), (r * k, 2 * e * r * k)]  # dA, times s[/(1-p)]
    if drop:  # dx = (g·A) ⊙ keep, then dy·W added in place (cuBLAS's C)
        bwd += [(2 * m * k * r, e * (m * r + r * k + m * k))] + masked_x
        bwd += [(2 * m * n * k, e * (m * n + n * k + 2 * m * k))]
    else:  # dx = dy·W, then s·g·A added in place
        bwd += [(2 * m * n * k, e * (m * n + n * k + m * k)), (2 * m * k * r, e * (m * r + r * k + 2 * m * k))]
    bwd += [(2 * m * n * r, e * (m * n + m * r + n * r)), (n * r, 2 * e * n * r)]  # dB, times s[/(1-p)]
    return fwd, bwd


def _triton_plan_kernels(case: Case, skinny_mask: float, dx_mask: float) -> tuple[list, list]:
    """The forward's and the backward's kernels of the Triton plan for
    ``case`` on sm_90, as :func:`model` prices them."""
    from . import dispatch
    from .kernels import skinny
    from .kernels.configs import cdiv

    m, k, n, r = case.m, case.k, case.n, case.r
    e = case.torch_dtype.itemsize
    drop = case.dropout > 0

    plan = dispatch.plan(m, n, k, r, case.torch_dtype, case.dropout, arch=90, interpreter=False)

    def gemm(flops, nbytes, out_elems, split, *ints):
        if split <= 1:
            return [(flops, nbytes, *ints)]
        partials = 4 * split * out_elems  # fp32, written by the GEMM, read by the sum
        return [(flops, nbytes - e * out_elems + partials, *ints), (0, partials + e * out_elems)]

    def skinny_pass(flops, rows, cols, shrink, tn, *ints):
        # a launch a chunk of rows, each a share of the work, with the partials it writes; then the reductions
        grid = skinny.skinny_grid(rows, cols, r, plan.skinny, plan.skinny_programs, shrink=shrink, tn=tn,
                                  colsum=False)
        launches, reductions = grid.small_bytes(cols, r, e if tn else None)
        share = [v / len(launches) for v in (flops, e * rows * cols, *ints)]
        return ([(share[0], share[1] + small, *share[2:]) for small in launches]
                + [(0, moved) for moved in reductions])

    # with dropout, the forward's first kernel draws the seed on the GPU (seed=None: a kernel of its own)
    draw_seed = [(0, 4)] if drop else []
    shrink_x = draw_seed + skinny_pass(2 * m * k * r, m, k, True, False, skinny_mask)  # the forward's pass over x
    if plan.strategy == "in_loop":  # (with dropout, forced only: each N tile draws the mask of its x tiles)
        tiles_n = cdiv(n, plan.fwd_gemm.block_n)
        fused_fwd = draw_seed + gemm(
            2 * m * n * k + 2 * m * n * r + 2 * m * k * r, e * (m * k + n * k + m * n), m * n,
            plan.fwd_gemm.split_k, skinny_mask * tiles_n)
    elif plan.strategy == "split":
        fused_fwd = shrink_x + gemm(2 * m * n * k + 2 * m * n * r, e * (m * k + n * k + m * n), m * n,
                                    plan.fwd_gemm.split_k)
    else:  # hybrid: the low-rank term written as C, then cuBLAS's addmm reads it
        fused_fwd = shrink_x + [(2 * m * n * r, e * m * n), (2 * m * n * k, e * (m * k + n * k + 2 * m * n))]
    if plan.dx_in_loop:  # the dy pass: dB; dx: g = dy·B in its K loop, the mask in its epilogue
        fused_bwd = skinny_pass(2 * m * n * r, m, n, False, True)
        fused_bwd += gemm(2 * m * n * k + 2 * m * k * r + 2 * m * n * r, e * (m * n + n * k + m * k), m * k,
                          plan.dx_gemm.split_k, 0, dx_mask)
    else:
        fused_bwd = skinny_pass(4 * m * n * r, m, n, True, True)  # the dy pass: g and dB
        if plan.cublas_base:  # the masked low-rank term by the fused kernel, then cuBLAS adds dy·W
            fused_bwd += [(2 * m * k * r, e * m * k, 0, dx_mask), (2 * m * n * k, e * (m * n + n * k + 2 * m * k))]
        else:  # dx: the mask, then the K loop
            fused_bwd += gemm(2 * m * n * k + 2 * m * k * r, e * (m * n + n * k + m * k), m * k,
                              plan.dx_gemm.split_k, 0, dx_mask)
    fused_bwd += skinny_pass(2 * m * k * r, m, k, False, True, skinny_mask)  # the dA pass
    return fused_fwd, fused_bwd


def _seconds(kernels) -> float:
    """:func:`model`'s time of ``kernels``: each (FLOPs, bytes[, integer ops
    overlapping them[, integer ops before them]])."""
    total = 0.0
    for flops, nbytes, *ints in kernels:
        overlapped, serial = (list(ints) + [0, 0])[:2]
        total += max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES_PER_S, overlapped / PEAK_INT_OPS_PER_S)
        total += serial / PEAK_INT_OPS_PER_S + LAUNCH_S
    return total


def model_table(cases) -> str:
    lines = ["## Roofline model (a model, not a measurement)", "",
             f"H200 at {PEAK_FLOPS / 1e12:.0f} TFLOP/s and {PEAK_BYTES_PER_S / 1e12:.1f} TB/s; each kernel costs "
             f"max(FLOPs/peak, bytes/bandwidth, mask integer ops/{PEAK_INT_OPS_PER_S / 1e12:.1f} T/s) "
             f"+ {LAUNCH_S * 1e6:.0f} µs launch (integer ops per element of a drawn dropout mask: "
             f"{NAIVE_MASK_INT_OPS_PER_ELEMENT} in PyTorch's dropout, which naive runs once; fused's Triton plan "
             f"draws it three times, {FUSED_MASK_INT_OPS_PER_ELEMENT['skinny']} in each skinny pass and "
             f"{FUSED_MASK_INT_OPS_PER_ELEMENT['dx']} in the dx GEMM, which draws it before its K loop, so there it "
             "adds to the GEMM's time; its `cublas` path in the keep-mask pass, at the skinny passes' count, once "
             f"where autograd records cuBLAS's products (`{CUBLAS_RECORDED}`), twice where its autograd Function "
             f"runs them (`{CUBLAS_FUNCTION}`)). `fused path`: what `fused` runs as the GPU timer times the case "
             f"(eager above {CUDA_GRAPH_MAX_M} tokens, where the dispatch's eager rule may run `cublas`; in a CUDA "
             "graph at or below, the Triton plan).", "",
             "| case | fused path | naive fwd GB | fused fwd GB | naive fwd µs | fused fwd µs | naive bwd GB "
             "| fused bwd GB | model ×fwd | model ×bwd | model ×fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        mo = model(case)
        lines.append(f"| {case.label()} | {mo['fused_path']} | {mo['naive_forward_bytes'] / 1e9:.3f} "
                     f"| {mo['fused_forward_bytes'] / 1e9:.3f} "
                     f"| {mo['naive_forward_s'] * 1e6:.1f} | {mo['fused_forward_s'] * 1e6:.1f} "
                     f"| {mo['naive_backward_bytes'] / 1e9:.3f} | {mo['fused_backward_bytes'] / 1e9:.3f} "
                     f"| {mo['speedup_forward']:.2f} | {mo['speedup_backward']:.2f} "
                     f"| {mo['speedup_forward+backward']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------

def environment() -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    import fused_lora

    # (the dispatch's switches as this run left them: the default strategy of each case follows them)
    env["eager_cublas"] = fused_lora.dispatch.eager_cublas_setting()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_sms=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, gpu_arch=f"sm_{p.major}{p.minor}")
    else:
        env.update(gpu=None, kernels="triton-interpreter" if fused_lora._triton.interpreter() else "unavailable")
    return env


def _max_error(case: Case, inp: Inputs, provider: str) -> float | None:
    """Forward agreement with naive at dropout 0 (a sanity check, not the parity suite)."""
    if case.dropout > 0 or provider in ("naive", "base"):
        return None
    fwd = make_forward(provider, inp)
    if fwd is None:
        return None
    with torch.no_grad():
        ref = naive_lora(inp.x.double(), inp.weight.double(), inp.bias.double(), inp.lora_A.double(),
                         inp.lora_B.double(), inp.scaling, 0.0)
        y = fwd().double()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def work_list(preset: Preset) -> list[tuple[Case, list[tuple[str, str]]]]:
    """What :func:`run_preset` measures, in order: every case with every
    provider in every mode first (the targets), then the variant providers on
    the variant cases (the tuning data), so that a time budget spent early
    cuts the tuning data, not the targets."""
    work = [(case, [(p, mo) for p in preset.providers for mo in preset.modes]) for case in preset.cases]
    work += [(case, [(p, mo) for p in VARIANT_PROVIDERS for mo in preset.modes if mo in VARIANT_MODES])
             for case in preset.variant_cases]
    return work


def run_preset(preset: Preset, device, progress=None, deadline: float | None = None,
               on_case_done=None, compile_only: bool = False) -> list[Measurement]:
    """Measure every (case, provider, mode) of :func:`work_list`. Cases not
    started before ``deadline`` (a ``time.monotonic()`` value) are recorded as
    skipped; ``on_case_done(results)`` runs after each case (to write partial
    results).

    ``compile_only``: run each step once, untimed (note ``"compiled"``), with
    the same kernels, shapes and strides as a timed run: Triton's and
    inductor's on-disk caches then hold every kernel the timed run needs
    (``bench/gpu_check.sh`` does this beside the tests, so that the time budget
    goes to timing, not to compiling)."""
    on_gpu = device.type == "cuda"
    results = []
    work = work_list(preset)
    bar = progress(total=sum(len(runs) for _, runs in work), desc=f"bench {preset.name}", unit="run") \
        if progress else None
    for case, runs in work:
        if deadline is not None and time.monotonic() > deadline:
            results += [Measurement(case, p, mo, note="skipped: time budget spent") for p, mo in runs]
            continue
        copies = input_copies(case) if on_gpu and not compile_only else 1
        inputs = [Inputs.make(case, device, seed=i) for i in range(copies)]
        inp = inputs[0]
        dy = torch.randn(case.m, case.n, device=device, dtype=case.torch_dtype)
        for provider in dict.fromkeys(p for p, _ in runs):
            skip = ""
            if provider == "naive_compiled" and preset.compiled_cases is not None and case not in preset.compiled_cases:
                skip = "not in this preset's compiled cases (compilation time)"
            skip = not_applicable(provider, case.dropout) or skip
            err = None
            if not skip:
                try:
                    with variant_context(provider):
                        err = _max_error(case, inp, provider)
                except Exception as exc:
                    skip = f"failed: {type(exc).__name__}: {exc}"
            for mode in (mo for p, mo in runs if p == provider):
                meas = Measurement(case, provider, mode, max_error=err, note=skip)
                if not skip:
                    try:
                        # One step per input copy, run back to back and timed together: the copies
                        # together exceed L2, so no step reads its weights from cache. Small M: built
                        # on the stream its CUDA graph captures on (a backward step's forward too).
                        stream = graph_stream() if on_gpu and not compile_only and case.m <= CUDA_GRAPH_MAX_M \
                            else None
                        with variant_context(provider), \
                                (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                            steps = [make_step(mode, make_forward(provider, i), i.leaves(provider), dy)
                                     for i in inputs]

                        def run_all(steps=steps, provider=provider):
                            with variant_context(provider):
                                for step in steps:
                                    step()

                        if compile_only:
                            run_all()
                            if on_gpu:
                                torch.cuda.synchronize()
                            meas.note = "compiled"
                        else:
                            q, timer = time_cuda(run_all, case.m, stream=stream) if on_gpu else time_cpu(run_all)
                            meas.median_ms, meas.p20_ms, meas.p80_ms = (None if t is None else t / copies
                                                                        for t in q)
                            meas.timer = timer + (f", {copies} rotated input copies" if copies > 1 else "")
                            if on_gpu and case.m <= CUDA_GRAPH_MAX_M and provider in EAGER_PROVIDERS:
                                try:  # (the graph time stands if this fails)
                                    meas.eager_ms = time_eager(run_all) / copies
                                except Exception as exc:
                                    torch.cuda.synchronize()
                                    meas.note = f"eager timing failed: {type(exc).__name__}: {exc}"
                            if mode == "forward+backward":
                                with variant_context(provider):
                                    meas.peak_mem_bytes = peak_memory(steps[0])
                    except Exception as exc:
                        meas.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                results.append(meas)
                if bar:
                    bar.update(1)
        del inp, inputs, dy
        if on_gpu:
            torch.cuda.empty_cache()
        if on_case_done is not None:
            on_case_done(results)
    if bar:
        bar.close()
    if on_gpu and not compile_only:
        profile_steps(preset, results, device)
        if on_case_done is not None:
            on_case_done(results)
    return results


def profile_steps(preset: Preset, results: list[Measurement], device) -> None:
    """Attach :func:`kernel_timeline` of one ``fused`` forward+backward step to
    that measurement, on each of the preset's ``profile_cases`` that was timed.
    Run after every timing, so that the profiler never runs beside a timer or
    a CUDA graph capture (a second or so per case, time budget or not)."""
    for meas in results:
        if not (meas.provider == "fused" and meas.mode == "forward+backward" and meas.median_ms is not None
                and meas.case in preset.profile_cases):
            continue
        inp = Inputs.make(meas.case, device)
        dy = torch.randn(meas.case.m, meas.case.n, device=device, dtype=meas.case.torch_dtype)
        try:
            meas.kernels = kernel_timeline(make_step("forward+backward", make_forward("fused", inp),
                                                     inp.leaves("fused"), dy))
        except Exception as exc:  # the timing stands; say why the breakdown is missing
            meas.note = f"profile failed: {type(exc).__name__}: {exc}"
        del inp, dy


def _ratio(a, b):
    return a / b if a and b else None


def summarize(results: list[Measurement]) -> list[dict]:
    """One row per (case, mode): every provider's median and the ratios."""
    rows = {}
    for m in results:
        key = (m.case, m.mode)
        row = rows.setdefault(key, {"case": m.case, "mode": m.mode})
        row[m.provider] = m.median_ms
        if m.peak_mem_bytes is not None:
            row[f"{m.provider}_mem"] = m.peak_mem_bytes
    out = []
    for row in rows.values():
        row["speedup_vs_naive"] = _ratio(row.get("naive"), row.get("fused"))
        row["fused_over_base"] = _ratio(row.get("fused"), row.get("base"))
        row["speedup_vs_unsloth_style"] = _ratio(row.get("unsloth_style"), row.get("fused"))
        out.append(row)
    return out


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def markdown(results: list[Measurement], env: dict, preset: Preset) -> str:
    on_gpu = env.get("gpu") is not None
    lines = [f"# fused_lora benchmark — preset `{preset.name}`", ""]
    lines.append(f"{env.get('gpu') or 'no GPU (Triton interpreter)'}; torch {env['torch']}, triton {env['triton']}, "
                 f"{env['date'][:19]}Z")
    lines.append("")
    if not on_gpu:
        lines += ["**Interpreter run: the times below are wall-clock seconds of Triton's CPU interpreter "
                  "and say nothing about GPU speed.**", ""]
    lines.append("Median ms per call; ratios from the same run. `fused/base` is the cost of the adapter over the "
                 "bare frozen layer (1.00 = free); `×naive` is the speed-up over PEFT-style eager LoRA.")
    lines.append("")
    lines.append("| case | mode | fused | naive | unsloth_style | naive_compiled | base | ×naive | fused/base "
                 "| ×unsloth | peak MB fused / naive |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in summarize(results):
        mem = ""
        if row.get("fused_mem") is not None and row.get("naive_mem") is not None:
            mem = f"{row['fused_mem'] / 2**20:.0f} / {row['naive_mem'] / 2**20:.0f}"
        lines.append(
            f"| {row['case'].label()} | {row['mode']} | {_fmt(row.get('fused'))} | {_fmt(row.get('naive'))} | "
            f"{_fmt(row.get('unsloth_style'))} | {_fmt(row.get('naive_compiled'))} | {_fmt(row.get('base'))} | "
            f"{_fmt(row['speedup_vs_naive'], '.2f')} | {_fmt(row['fused_over_base'], '.2f')} | "
            f"{_fmt(row['speedup_vs_unsloth_style'], '.2f')} | {mem} |")
    lines += eager_table(results)
    lines += strategy_table(results, env.get("gpu_arch", "sm_90") if on_gpu else "interpreter")
    lines += kernel_table(results, env.get("gpu_arch", "sm_90") if on_gpu else "interpreter")
    notes = sorted({f"{m.provider} @ {m.case.label()}: {m.note}" for m in results
                    if m.note and not m.note.startswith(("N/A", "not in"))})
    if notes:
        lines += ["", "Failed or skipped:", ""] + [f"- {n}" for n in notes]
    # The model is for GPU-sized problems: without a GPU it is printed for the
    # gpu-check preset's shapes, not for the interpreter's tiny ones.
    model_cases = (list(dict.fromkeys(m.case for m in results)) if on_gpu
                   else presets()["gpu-check"].cases)
    return "\n".join(lines) + "\n\n" + model_table(model_cases)


def eager_table(results: list[Measurement]) -> list[str]:
    """Markdown lines: the small-M cases timed without CUDA graphs, beside the
    graph times of the main table (empty if none were)."""
    rows = {}
    for m in results:
        if m.eager_ms is not None:
            rows.setdefault((m.case, m.mode), {})[m.provider] = (m.eager_ms, m.median_ms)
    if not rows:
        return []
    # (the launch cache's column where it was timed)
    shown = ["fused"] + [p for p in EAGER_PROVIDERS[len(PROVIDERS):] if any(p in by for by in rows.values())] \
        + ["naive", "unsloth_style", "base"]
    lines = ["", "### Small M without CUDA graphs (eager: host time included)", "",
             "ms per step run back to back in eager mode, one synchronisation per round: what a training "
             "loop without CUDA graphs sees, bound by the host (Python, dispatch, launches) or the GPU, "
             "whichever is slower. In brackets: the CUDA-graph time of the main table."
             + (" `fused:no_launch_cache`: `fused` launched without the launch cache (Triton's "
                "`kernel[grid](...)` at every launch)." if len(shown) > 4 else ""), "",
             "| case | mode | " + " | ".join(shown) + " | ×naive |", "|---|---|" + "---|" * len(shown) + "---|"]
    for (case, mode), by in rows.items():
        cells = [f"{_fmt(by[p][0])} ({_fmt(by[p][1])})" if p in by else "—" for p in shown]
        speedup = _ratio(by.get("naive", (None,))[0], by.get("fused", (None,))[0])
        lines.append(f"| {case.label()} | {mode} | " + " | ".join(cells) + f" | {_fmt(speedup, '.2f')} |")
    return lines


def default_strategy(case: Case, target: str, eager: bool | None = None) -> str:
    """The strategy ``fused`` runs for ``case`` on ``target`` (what explain
    says): in an eager call (``eager``; None: as the GPU timer times the
    case, eager above :data:`CUDA_GRAPH_MAX_M` tokens) or a captured one."""
    import fused_lora

    e = fused_lora.explain((case.m, case.k), (case.n, case.k), case.r, case.torch_dtype, case.dropout, target=target)
    return e.eager_strategy if (case.m > CUDA_GRAPH_MAX_M if eager is None else eager) else e.plan.strategy


def strategy_table(results: list[Measurement], target: str) -> list[str]:
    """Markdown lines: each forced strategy beside the default choice, on the
    cases where they were measured (empty if none were)."""
    rows = [r for r in summarize(results) if any(r.get(p) is not None for p in VARIANT_PROVIDERS)]
    if not rows:
        return []
    # (the variants timed: a result file from before a variant existed has no column of it)
    variants = [p for p in VARIANT_PROVIDERS if any(r.get(p) is not None for r in rows)]
    names = [p.split(":")[1] for p in variants]
    lines = ["", "### Forward strategies, forced, TMA loads and the persistent grid (the data behind the "
                 "dispatch rules)", "",
             "Median ms per call of `fused` with each strategy forced (forward and its backward), and of `fused` "
             "(default strategy) with pointer tile loads (`pointers`: TMA off), with TMA loads on a persistent "
             "grid (`tma+persistent`), with TMA loads through descriptors the kernels make (`tma_device`: no "
             "descriptor made on the host for each launch; host time counts where the timing has no CUDA graph, "
             "M > 256)" + (" and launched without the launch cache (`no_launch_cache`: host time too)"
                           if "fused:no_launch_cache" in variants else "")
             + "; `default` is what the dispatch chose (TMA loads on sm_90 and newer, descriptors made on "
             "the host). `best` names the fastest measured.", "",
             "| case | mode | default | " + " | ".join(names) + " | best | default/best |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for row in rows:
        timed = {n: row.get(p) for n, p in zip(names, variants) if row.get(p) is not None}
        best = min(timed, key=timed.get) if timed else None
        default = default_strategy(row["case"], target)
        lines.append(f"| {row['case'].label()} | {row['mode']} | {default} ({_fmt(row.get('fused'))}) | "
                     + " | ".join(_fmt(row.get(p)) for p in variants)
                     + f" | {best or '—'} | {_fmt(_ratio(row.get('fused'), timed.get(best)), '.2f')} |")
    return lines


def kernel_table(results: list[Measurement], target: str) -> list[str]:
    """Markdown lines: each profiled step's kernels in launch order, with their
    share of the kernel time (empty if nothing was profiled)."""
    profiled = [m for m in results if m.kernels]
    if not profiled:
        return []
    lines = ["", "### Where the time goes: `fused` forward+backward, kernel by kernel", "",
             "One step after warm-up, device times from torch.profiler (launch order; the passes are in "
             "`fused_lora.explain`). `kernel total` below the step's median time is host and launch time "
             "the GPU spends idle."]
    for m in profiled:
        total = sum(us for _, us in m.kernels)
        strategy = default_strategy(m.case, target, eager=True)  # (the profiled step: eager)
        lines += ["", f"**{m.case.label()}** — strategy `{strategy}`; kernel total "
                      f"{total / 1e3:.3f} ms, step median {_fmt(m.median_ms)} ms", "",
                  "| # | kernel | µs | share |", "|---|---|---|---|"]
        lines += [f"| {i} | `{name}` | {us:.1f} | {_fmt(_ratio(us, total), '.0%')} |"
                  for i, (name, us) in enumerate(m.kernels, 1)]
    return lines


def plot(results: list[Measurement], path: Path, env: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summarize(results) if r["speedup_vs_naive"]]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(MODES), figsize=(6 * len(MODES), 0.35 * len(rows) / len(MODES) + 2.5),
                             squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        sel = [r for r in rows if r["mode"] == mode]
        ax.barh([r["case"].label() for r in sel], [r["speedup_vs_naive"] for r in sel], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.bar_label(ax.containers[0], fmt="%.2f", fontsize=7)
        ax.set_title(f"{mode}: speed-up of fused over naive")
        ax.tick_params(axis="y", labelsize=7)
    title = env.get("gpu") or "Triton interpreter on CPU (not a speed measurement)"
    fig.suptitle(f"fused_lora — {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(results: list[Measurement], env: dict, preset: Preset, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "preset": preset.name,
        "measurements": [dict(dataclasses.asdict(m), case=dataclasses.asdict(m.case)) for m in results],
        "model": [dict(case=dataclasses.asdict(c), **model(c)) for c in dict.fromkeys(m.case for m in results)],
    }
    files = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "speedup.png"}
    files["json"].write_text(json.dumps(payload, indent=1))
    files["markdown"].write_text(markdown(results, env, preset))
    if not plot(results, files["plot"], env):
        del files["plot"]
    return {k: str(v) for k, v in files.items()}


def default_out_dir(env: dict) -> Path:
    """GPU runs go to bench/results/<date>-<gpu> (committed: the only speed
    numbers the project states); interpreter runs to out/ (ignored by git)."""
    today = datetime.date.today().isoformat()
    if env.get("gpu"):
        return Path("bench") / "results" / f"{today}-{env['gpu'].replace(' ', '-').replace('/', '-')}"
    return Path("out") / f"bench-{today}-cpu-interpreter"


def shard_cases(preset: Preset, index: int, count: int) -> Preset:
    """Every ``count``-th case and variant case from the ``index``-th
    (``bench --compile-only --shard i/n``: compiling in parallel processes)."""
    return dataclasses.replace(preset, cases=preset.cases[index::count],
                               variant_cases=tuple(preset.variant_cases[index::count]))


def filter_cases(preset: Preset, ms=None) -> Preset:
    if not ms:
        return preset
    return dataclasses.replace(preset, cases=[c for c in preset.cases if c.m in set(ms)],
                               variant_cases=tuple(c for c in preset.variant_cases if c.m in set(ms)))


# ----------------------------------------------------------------------------
# The README's performance section: generated from committed GPU results only
# ----------------------------------------------------------------------------

README_BEGIN = "<!-- performance:begin — generated by `fused-lora bench --update-readme` from bench/results/ -->"
README_END = "<!-- performance:end -->"


def gpu_runs(results_root: Path) -> list[tuple[Path, dict]]:
    """Every committed GPU run (a results.json with a GPU name), oldest first."""
    runs = []
    for path in sorted(Path(results_root).glob("*/results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("environment", {}).get("gpu"):
            runs.append((path, data))
    runs.sort(key=lambda item: item[1]["environment"].get("date", ""))
    return runs


def performance_section(results_root: Path) -> str:
    runs = gpu_runs(results_root)
    if not runs:
        return ("No GPU measurement has been committed yet, so this README claims no speed-up. Numbers appear "
                "here only from files under [`bench/results/`](bench/results), written by `bench/gpu_check.sh` "
                "on a GPU. What the roofline model *predicts* (a model, not a measurement) is printed by "
                "`fused-lora bench`.")
    path, data = runs[-1]
    env = data["environment"]
    results = []
    for m in data["measurements"]:
        case = Case(**m.pop("case"))
        results.append(Measurement(case=case, **{k: v for k, v in m.items() if k in Measurement.__dataclass_fields__}))
    # (linked from the README at the repository's root, wherever results_root was given from)
    folder = f"bench/results/{Path(path).parent.relative_to(results_root).as_posix()}"
    lines = [f"Measured on **{env['gpu']}** ({env['date'][:10]}; torch {env['torch']}, Triton {env['triton']}), "
             f"from [`{folder}/`]({folder}) — median ms per call, ratios from the same run:", "",
             "| case | mode | fused | naive | base | ×naive | fused/base |", "|---|---|---|---|---|---|---|"]
    for row in summarize(results):
        if row.get("fused") is None:
            continue
        lines.append(f"| {row['case'].label()} | {row['mode']} | {_fmt(row.get('fused'))} | {_fmt(row.get('naive'))} "
                     f"| {_fmt(row.get('base'))} | {_fmt(row['speedup_vs_naive'], '.2f')} "
                     f"| {_fmt(row['fused_over_base'], '.2f')} |")
    lines += ["", f"All providers, peak memory and the roofline model: [`{folder}/results.md`]({folder}/results.md)."]
    return "\n".join(lines)


def update_readme(readme: Path, results_root: Path) -> bool:
    """Rewrite the text between the README's performance markers; True if it changed."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no performance markers ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{performance_section(results_root)}\n{README_END}{tail}"
    if new != text:
        Path(readme).write_text(new)
    return new != text

