"""Host time per call of the fused op: what fused_lora's Python costs, and its launches.

    python bench/host_overhead.py [--m 16] [--k 64] [--n 64] [--r 8] [--reps 2000]
    python bench/host_overhead.py --real [--profile 25] [--profile-dropout 0.1]   # on a GPU: with the launches
    python bench/host_overhead.py --layers [--blocks 8]   # also PEFT's layer (and a Llama) against from_peft's

At small M a GPU finishes a LoRA layer's kernels in a few microseconds each,
so without CUDA graphs a training step is bound by the host: Python,
PyTorch's dispatch and autograd, and the kernel launches. By default this
script times what fused_lora's own Python adds, on any machine: the kernels
are replaced by stand-ins whose compiled kernels do nothing (the launchers
still plan, allocate and bind every argument, and the launch cache keys and
looks up each launch), so Triton's own launcher is left out. ``--real`` launches them
(on a GPU: the rounds end with a synchronisation, so a round is bound by the
host or the GPU, whichever is slower); ``--real`` less the default is
Triton's launcher. ``--profile N`` adds cProfile's N most expensive
functions (own time) of the fused forward+backward at dropout 0 (or
``--profile-dropout 0.1``: with dropout, where eager calls of up to 256
tokens run the keep-mask pass and cuBLAS by the eager rule, and Triton's
plan with ``FUSED_LORA_EAGER_CUBLAS=0``): which of fused_lora's functions,
Triton's launcher or PyTorch's take the host's time.
The kernels launch through the launch cache (the default,
:mod:`fused_lora.kernels.launch`); ``FUSED_LORA_LAUNCH_CACHE=0`` through
Triton's ``kernel[grid](...)``, ``FUSED_LORA_TMA_DESCRIPTORS=device``
with kernel-made TMA descriptors. On a GPU, eager calls at small M run
cuBLAS by default (:func:`fused_lora.dispatch.eager_cublas_reason`):
``FUSED_LORA_EAGER_CUBLAS=0`` times the Triton plan there. The rows
``fused eager cuBLAS`` time that rule's path, at both dropouts (on a machine
without CUDA standing in, as if x were on a GPU: cuBLAS's three products,
with dropout on x ⊙ keep after the keep-mask pass's one launch, which
autograd differentiates itself; the Triton plan primed once, before the
timing); the row ``fused Function cuBLAS`` the rule's path with dropout
above ``dispatch.EAGER_KEPT_MASK_MAX_M`` tokens, whatever M is timed: its
autograd Function (``ops._LoRALinearCublasFunction``), the keep-mask pass
in each pass, nothing of x's size kept. With ``--layers`` the rows
``fused layer (from_peft)`` and ``PEFT layer`` time whole layers as a user
swaps them (where PEFT is installed): a PEFT model of one ``Linear``
(training mode, its module call and PEFT's forward hooks included) as it
is, and the same converted by ``fused_lora.from_peft`` (a ``LoRALinear``
sharing PEFT's tensors, by the eager rule as above); with ``--blocks N``
the rows ``fused model (from_peft, N blocks)`` and ``PEFT model (N
blocks)`` time a training step of a transformers Llama of N blocks (hidden
k, MLP n, LoRA on its seven linears a block; where transformers is
installed too), M tokens: a converted model's per-layer costs added up,
its forward hooks' too. Naive LoRA is timed beside it (on a CPU
in float32, at tiny sizes, where its math is a small part of its time: read
it as the floor of PyTorch's own dispatch and autograd for the same
composition). Host times of this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

# Without a GPU, the interpreter (CPU tensors reach the launchers); on one, CUDA tensors and the compiled kernels
# (stubbed out unless --real). Set before fused_lora is imported, which reads it: set on a GPU as well, it made
# the fifth GPU run's checks all stop at fused_lora's refusal of CUDA tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from triton.runtime.jit import JITFunction  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora.kernels import gemm, mask, skinny  # noqa: E402
from fused_lora.kernels import launch as launch_cache  # noqa: E402
from fused_lora.testing import eager_cublas_here  # noqa: E402


#: On a GPU, CUDA tensors in bf16 (real allocations; naive's kernels run); else
#: CPU tensors in float32 through the interpreter's launchers.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


class _NoKernel:
    """Stands in for a compiled kernel: ``compiled[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return _no_op


def _no_op(*args, **kwargs):
    return None


def _stub(kernel) -> JITFunction:
    """A stand-in for ``kernel``: a JITFunction of the same Python function
    (the launch cache keys and launches it as the kernel itself: its
    signature, its lookup, the call of the compiled kernel) whose launches
    compile nothing and run nothing."""
    stub = JITFunction(getattr(kernel, "fn", kernel))
    stub.run = lambda *args, **kwargs: _NoKernel()
    return stub


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _time_us(fn, reps: int) -> float:
    for _ in range(max(10, reps // 20)):
        fn()
    _sync()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(rounds)


def measure(m: int = 16, k: int = 64, n: int = 64, r: int = 8, reps: int = 2000, real: bool = False,
            profile: int = 0, profile_dropout: float = 0.0, layers: bool = False, blocks: int = 0) -> dict:
    """``{(what, p): µs}`` for the fused op (its launches stubbed, or
    ``real``) and naive LoRA, forward (no grad) and forward+backward, at
    dropout 0 and 0.1, and ``{"launches": {(what, p): n}}``, the fused op's
    kernel launches a call; ``profile``: also ``{"profile": text}``,
    cProfile's ``profile`` most expensive functions of the fused
    forward+backward at dropout ``profile_dropout`` (0 or 0.1); ``layers``:
    also the rows of whole layers (:func:`_layers`); ``blocks``: also the
    rows of whole models (:func:`_models`), that many blocks."""
    if profile_dropout not in (0.0, 0.1):
        raise ValueError(f"profile_dropout must be 0 or 0.1 (the dropouts timed), got {profile_dropout}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = (gemm.lora_gemm_kernel, skinny.lora_skinny_kernel, skinny.reduce_partials_kernel, mask.keep_mask_kernel,
             launch_cache.current_device)
    if not real:
        (gemm.lora_gemm_kernel, skinny.lora_skinny_kernel, skinny.reduce_partials_kernel,
         mask.keep_mask_kernel) = map(_stub, saved[:4])
        if DEVICE.type != "cuda":
            launch_cache.current_device = lambda: -1  # (no CUDA device: the launch cache's key has none)
    try:
        dev, dt = DEVICE, DTYPE
        # (the weights as a layer holds them: nn.Parameters, the base frozen)
        x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
        w = nn.Parameter(torch.randn(n, k, device=dev, dtype=dt), requires_grad=False)
        b = nn.Parameter(torch.randn(n, device=dev, dtype=dt), requires_grad=False)
        a = nn.Parameter(torch.randn(r, k, device=dev, dtype=dt))
        bb = nn.Parameter(torch.randn(n, r, device=dev, dtype=dt))
        dy = torch.randn(m, n, device=dev, dtype=dt)
        out = {"launches": {}}
        for p in (0.0, 0.1):
            def fused():
                return fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, backend="triton")

            def naive():
                return F.linear(x, w, b) + F.linear(F.linear(F.dropout(x, p), a), bb) * 2.0

            for name, fwd in (("fused", fused), ("fused eager cuBLAS", fused), (_FUNCTION_ROW, fused),
                              ("naive", naive)):
                if name == _FUNCTION_ROW and p == 0.0:
                    continue  # (without dropout eager calls record the products at every M)

                def forward_only(fwd=fwd):
                    with torch.no_grad():
                        fwd()

                by_rule = name in ("fused eager cuBLAS", _FUNCTION_ROW)
                with (eager_cublas_here(records=False if name == _FUNCTION_ROW else None) if by_rule
                      else contextlib.nullcontext()):
                    out[(f"{name} forward", p)] = _time_us(forward_only, reps)
                    out[(f"{name} forward+backward", p)] = _time_us(
                        lambda fwd=fwd: torch.autograd.grad(fwd(), (x, a, bb), dy), reps)
                    if name != "naive":
                        out["launches"][(f"{name} forward", p)] = _launches(forward_only)
                        out["launches"][(f"{name} forward+backward", p)] = _launches(
                            lambda fwd=fwd: torch.autograd.grad(fwd(), (x, a, bb), dy))
                if profile and name == "fused" and p == profile_dropout:
                    out["profile"] = _profile(lambda fwd=fwd: torch.autograd.grad(fwd(), (x, a, bb), dy),
                                              reps, profile)
            for name, (model, leaves) in (_layers(m, k, n, r, p) if layers else {}).items():
                def forward_only(model=model):
                    with torch.no_grad():
                        model(x)

                def step(model=model, leaves=leaves):
                    torch.autograd.grad(model(x), (x, *leaves), dy)

                with eager_cublas_here() if name == _FUSED_LAYER_ROW else contextlib.nullcontext():
                    out[(f"{name} forward", p)] = _time_us(forward_only, reps)
                    out[(f"{name} forward+backward", p)] = _time_us(step, reps)
                    if name == _FUSED_LAYER_ROW:
                        out["launches"][(f"{name} forward", p)] = _launches(forward_only)
                        out["launches"][(f"{name} forward+backward", p)] = _launches(step)
            for name, model in _models(blocks, m, k, n, r, p).items():
                ids = torch.randint(0, _VOCAB, (1, m), device=dev)

                def forward_only(model=model):
                    with torch.no_grad():
                        model(input_ids=ids)

                def step(model=model):
                    model(input_ids=ids, labels=ids).loss.backward()

                with eager_cublas_here() if name.startswith("fused") else contextlib.nullcontext():
                    out[(f"{name} forward", p)] = _time_us(forward_only, max(3, reps // 20))
                    out[(f"{name} forward+backward", p)] = _time_us(step, max(3, reps // 20))
                    if name.startswith("fused"):
                        out["launches"][(f"{name} forward", p)] = _launches(forward_only)
                        out["launches"][(f"{name} forward+backward", p)] = _launches(step)
        return out
    finally:
        (gemm.lora_gemm_kernel, skinny.lora_skinny_kernel, skinny.reduce_partials_kernel, mask.keep_mask_kernel,
         launch_cache.current_device) = saved
        launch_cache.clear()  # (the stand-ins kept)
        torch.set_num_threads(threads)


#: The row of eager calls with dropout above ``dispatch.EAGER_KEPT_MASK_MAX_M`` tokens.
_FUNCTION_ROW = "fused Function cuBLAS"
#: The rows of whole layers, as a user swaps them: PEFT's LoRA Linear, and the same after ``from_peft``.
_FUSED_LAYER_ROW, _PEFT_LAYER_ROW = "fused layer (from_peft)", "PEFT layer"


def _layers(m: int, k: int, n: int, r: int, p: float) -> dict:
    """``{row: (model, trained leaves)}``: a PEFT model of one ``Linear(k, n)``
    (LoRA of rank r, alpha 2r, dropout p, training mode) as it is, and
    another made the same way then converted by ``fused_lora.from_peft`` (a
    ``LoRALinear`` sharing PEFT's tensors); each model's module call is
    what a training loop pays a layer. ``{}`` without PEFT."""
    try:
        import peft
    except ImportError:
        return {}
    models = {}
    for name in (_FUSED_LAYER_ROW, _PEFT_LAYER_ROW):
        torch.manual_seed(0)
        model = peft.get_peft_model(nn.Sequential(nn.Linear(k, n)),
                                    peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p,
                                                    init_lora_weights=False),
                                    autocast_adapter_dtype=False).to(DEVICE, DTYPE)
        layer = model.base_model.model[0]
        leaves = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        if name == _FUSED_LAYER_ROW:
            report = fused_lora.from_peft(model)
            if report.converted != ["base_model.model.0"]:
                raise RuntimeError(f"from_peft left the layer as PEFT's: {report}")
        models[name] = (model.train(), leaves)
    return models


#: The vocabulary of :func:`_models`' Llamas (their embedding and head: small beside the blocks).
_VOCAB = 256


def _models(blocks: int, m: int, k: int, n: int, r: int, p: float) -> dict:
    """``{row: model}``: where ``blocks`` > 0 and transformers and PEFT are
    installed, a transformers Llama of ``blocks`` blocks built from a
    config (hidden size k, MLP width n, heads of 128 where k allows, else
    4), for steps of m tokens, LoRA of rank r, alpha 2r,
    dropout p on its seven linears a block (PEFT's ``all-linear``), in
    training mode: ``PEFT model``, and the same converted by ``from_peft``,
    ``fused model (from_peft)``. A step's host time grows with the layers:
    what a per-call cost of a converted model's (its forward hooks' too)
    adds up to. ``{}`` otherwise."""
    if blocks <= 0:
        return {}
    try:
        import peft
        import transformers
    except ImportError:
        return {}
    heads = k // 128 if k % 128 == 0 else 4  # (heads of 128, as Llama's, where k allows)
    config = transformers.LlamaConfig(vocab_size=_VOCAB, hidden_size=k, intermediate_size=n, num_hidden_layers=blocks,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      max_position_embeddings=max(4096, m))
    models = {}
    for name in (f"fused model (from_peft, {blocks} blocks)", f"PEFT model ({blocks} blocks)"):
        torch.manual_seed(0)
        with torch.device(DEVICE):  # (made there: a 4096-wide model's CPU initialisation takes seconds)
            base = transformers.LlamaForCausalLM(config).to(DTYPE)
        model = peft.get_peft_model(base,
                                    peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=p,
                                                    init_lora_weights=False),
                                    autocast_adapter_dtype=False)
        if name.startswith("fused"):
            report = fused_lora.from_peft(model)
            if len(report.converted) != 7 * blocks:
                raise RuntimeError(f"from_peft left layers as PEFT's: {report}")
        models[name] = model.train()
    return models


def _launches(fn) -> int:
    """The kernel launches of one call of ``fn`` (through the launchers' ``launch``)."""
    saved = gemm.launch, skinny.launch, mask.launch
    seen = []

    def counted(kernel, grid, args, kwargs):
        seen.append(kernel)
        return saved[0](kernel, grid, args, kwargs)

    gemm.launch = skinny.launch = mask.launch = counted
    try:
        fn()
        _sync()
    finally:
        gemm.launch, skinny.launch, mask.launch = saved
    return len(seen)


def _profile(fn, reps: int, top: int) -> str:
    """cProfile's ``top`` functions by own time over ``reps`` calls of ``fn``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    _sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16, help="tokens (default 16)")
    ap.add_argument("--k", type=int, default=64, help="in features (default 64)")
    ap.add_argument("--n", type=int, default=64, help="out features (default 64)")
    ap.add_argument("--r", type=int, default=8, help="rank (default 8)")
    ap.add_argument("--reps", type=int, default=2000, help="calls per timed round (default 2000)")
    ap.add_argument("--real", action="store_true", help="launch the kernels (default: stubbed out)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print cProfile's N most expensive functions of the fused forward+backward")
    ap.add_argument("--profile-dropout", type=float, default=0.0, choices=(0.0, 0.1), metavar="P",
                    help="the dropout of the profiled calls: 0 (default) or 0.1")
    ap.add_argument("--layers", action="store_true",
                    help="also time PEFT's LoRA layer and the same after from_peft")
    ap.add_argument("--blocks", type=int, default=0, metavar="N",
                    help="also time a Llama of N blocks (hidden k, MLP n) under PEFT and after from_peft "
                         "(a step of M tokens; reps/20 calls a round)")
    args = ap.parse_args(argv)
    res = measure(m=args.m, k=args.k, n=args.n, r=args.r, reps=args.reps, real=args.real, profile=args.profile,
                  profile_dropout=args.profile_dropout, layers=args.layers, blocks=args.blocks)
    how = "its kernels launched" if args.real else "its kernel launches stubbed out"
    if args.real:
        switches = fused_lora.dispatch
        how += (f" (launch cache {'on' if switches.launch_cache_setting() else 'off'}, TMA descriptors made "
                f"on the {switches.tma_descriptors_setting()}, eager cuBLAS "
                f"{'on' if switches.eager_cublas_setting() else 'off'})")
    print(f"host µs per call, M={args.m}, {args.k} -> {args.n}, r={args.r}, {DTYPE} on {DEVICE.type}; fused: "
          f"{how}" + ("" if DEVICE.type == "cuda" and args.real else " (not a GPU measurement)"))
    print(f"{'':52} {'p=0':>8} {'p=0.1':>8}   launches a call (p=0, p=0.1)")
    launches = res.pop("launches")
    rows = list(dict.fromkeys(key[0] for key in res if key != "profile"))
    baselines = [row for row in rows if row.startswith(("naive", _PEFT_LAYER_ROW, "PEFT model"))]
    for what in [row for row in rows if row not in baselines] + baselines:
        counts = ("   " + ", ".join(str(launches.get((what, p), "—")) for p in (0.0, 0.1))
                  if any((what, p) in launches for p in (0.0, 0.1)) else "")
        cells = " ".join(f"{res[(what, p)]:8.1f}" if (what, p) in res else f"{'—':>8}" for p in (0.0, 0.1))
        print(f"{what:52} {cells}{counts}")
    if "profile" in res:
        print(f"\ncProfile of {args.reps} fused forward+backward calls at dropout {args.profile_dropout:g} (own time):")
        print(res["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
