"""Parity-testing helpers shared by the test suite and ``fused-lora check``:
the tolerance table, input factories and the float64 oracle;
:func:`fewer_interpreter_patches`, which both run Triton's CPU interpreter
under; :class:`LiveBytes`, which the tests and ``bench/live_bytes.py``
count the memory a computation holds with; and :func:`eager_cublas_here`,
the eager rule's paths for the bench scripts on any machine."""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import reference
from .quant import dequantize_base, fp4_code

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: Tolerance by dtype, relative to the largest magnitude of the float64
#: reference (atol = tol * max|ref|, rtol = tol). Inputs are scaled so that
#: every output and gradient is O(1); a wrong index, a missing term or a
#: wrong scale moves the result by O(max|ref|), hundreds of tolerances away.
#: fp32: fp32 accumulation over K <= a few hundred; fp16/bf16: the rounding of
#: the inputs to the dot and of the result (2**-11 and 2**-8 relative).
TOLERANCE = {
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2.5e-2,
    torch.float64: 1e-12,
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def interpreted_tma_k_n() -> tuple[int, int]:
    """(K, N) of the interpreter's TMA cases (``fused-lora check``, the kernel
    tests), ragged for its tiles: (72, 40), rows of 16 bytes but not of 16
    elements in fp16; (80, 48), rows of 16 elements, under the interpreters
    of Triton 3.4 and 3.5, which take descriptors only there
    (``kernels.gemm.INTERPRETER_STRIDES_IN_ELEMENTS``)."""
    from . import _triton

    kernels = _triton.get()
    strict = kernels is not None and kernels.INTERPRETER and kernels.gemm.INTERPRETER_STRIDES_IN_ELEMENTS
    return (80, 48) if strict else (72, 40)


@contextlib.contextmanager
def fewer_interpreter_patches():
    """Within it, Triton's CPU interpreter patches ``triton.language`` once per
    kernel launch rather than once more at every call of a ``@triton.jit``
    helper in every program of the grid as well: those repeats find the
    language patched already by the launch and patch it again to the same
    effect (``_patch_lang``, which rescans the modules): up to 30% of the
    time of the interpreted tests (the rank sweep and the sets of gradients:
    148 s against 106 s on two cores; ``fused-lora check``: 59 against 45).
    A helper whose module sees a part of the language the launch did not
    patch (``triton.language.core``: ``tl.zeros`` is such a helper) is
    patched as the interpreter would; outside a launch nothing changes.
    Used by the test suite and the CLI (``fused-lora check``, the smoke
    benchmark, the demo); nested uses stack (the suite calls the CLI's
    ``main``). A no-op (yielding False) without the interpreter or on an
    interpreter built otherwise (Triton 3.4's patches are never undone: no
    ``_LangPatchScope``). Process-wide while it lasts, as the interpreter's
    own patching is: not for threads launching kernels at once."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield False
        return
    from . import _triton

    real_patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if not (_triton.interpreter() and hasattr(interpreter, "_LangPatchScope") and callable(real_patch)
            and executor is not None and callable(getattr(executor, "__call__", None))):
        yield False
        return
    real_call = executor.__call__
    state = {"launches": 0, "patched": None}  # (the language modules the running launch patched)

    def langs(fn) -> frozenset:  # (the interpreter's choice: the modules of the language fn's module sees)
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    class LaunchScope:  # (the launch's own: undone when the launch ends, as before)
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            state["patched"] = None
            self.scope.restore()

    class Unchanged:
        def restore(self):
            pass

    def patch_lang(fn):
        if not state["launches"]:
            return real_patch(fn)
        mine = langs(fn)
        if state["patched"] is None:  # the launch's kernel
            scope = real_patch(fn)
            state["patched"] = mine
            return LaunchScope(scope)
        if mine <= state["patched"]:  # a helper's call, all patched already
            return Unchanged()
        state["patched"] |= mine
        return real_patch(fn)  # (a helper's patches are never undone, as the interpreter leaves them)

    def call(self, *args, **kwargs):
        state["launches"] += 1
        try:
            return real_call(self, *args, **kwargs)
        finally:
            state["launches"] -= 1

    patch_lang.__wrapped__, call.__wrapped__ = real_patch, real_call
    interpreter._patch_lang, executor.__call__ = patch_lang, call
    try:
        yield True
    finally:
        interpreter._patch_lang, executor.__call__ = real_patch, real_call


def normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the finite reference
    values; inf when the non-finite patterns differ."""
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return math.inf
    if not finite.any():
        return 0.0
    diff = (actual.double()[finite] - expected.double()[finite]).abs().max().item()
    return diff / max(expected.double()[finite].abs().max().item(), 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``actual`` (any dtype) against the float64 ``expected``, at ``TOLERANCE[dtype]``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOLERANCE[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * max(scale, 1e-30),
                               equal_nan=True, msg=lambda m: f"{what} ({dtype}): {m}")


def assert_same_sums(actual: torch.Tensor, expected: torch.Tensor, k: int, what: str = "") -> None:
    """``actual`` and ``expected``: the same sums of ``k`` products each,
    computed by two code paths (a quantized base decoded in the K loop and
    the same GEMM reading its dequantised copy; a layer on an int8 base and
    on its dequantised weight), in their common dtype. On the CPU (the
    interpreter: numpy adds a tile's products in one order, whatever their
    source) the bits must be equal. On a GPU they may differ in the last
    place only. The fifth GPU run found 16-bit results of the two paths
    unequal in bits though equal to the digits printed, fp32's (FMA dots)
    bitwise; both paths compile to ``mma.sync`` there (sm_90, Triton 3.6),
    so the likely cause is the operand layout a tile decoded in registers
    feeds it with, in which the tensor cores add a dot's products in
    another order. And a float base may take cuBLAS where a quantized one
    cannot. So there: within one unit in the last place of
    the dtype (``rtol``), plus the fp32 accumulator's reordering of ``k``
    terms, 4·√k·ε₃₂ of the largest value (``atol``); a wrong index, scale or
    group is off by far more."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    if actual.device.type == "cpu":
        assert torch.equal(actual, expected), f"{what}: not the same bits"
        return
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=torch.finfo(actual.dtype).eps,
                               atol=4 * max(k, 1) ** 0.5 * torch.finfo(torch.float32).eps * max(scale, 1e-30),
                               equal_nan=True, msg=lambda m: f"{what} ({actual.dtype}, k={k}): {m}")


def make_x(shape, dtype, layout: str = "contiguous", device=DEVICE) -> torch.Tensor:
    """x of logical ``shape`` (..., K) in a given memory layout:

    * ``contiguous``;
    * ``strided``: every other column of a wider buffer (stride 2 along K);
    * ``transposed``: 2-D, column-major (stride 1 along M);
    * ``permuted``: 3-D whose leading dims cannot merge (reshape must copy).
    """
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if layout == "strided":
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)
        return wide[..., ::2]
    if layout == "transposed":
        assert len(shape) == 2
        return torch.randn(shape[::-1], dtype=dtype, device=device).t()
    if layout == "permuted":
        assert len(shape) == 3
        return torch.randn((shape[1], shape[0], shape[2]), dtype=dtype, device=device).transpose(0, 1)
    raise ValueError(layout)


def make_params(k: int, n: int, r: int, dtype, bias: bool, device=DEVICE):
    """W, b, A, B scaled so that x·Wᵀ, s·xa·Bᵀ and all gradients are O(1).
    B is random (not PEFT's zeros) so that the low-rank term is exercised."""
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(k)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, k, dtype=dtype, device=device) / math.sqrt(k)
    bb = torch.randn(n, r, dtype=dtype, device=device) / math.sqrt(r)
    return w, b, a, bb


def reference64(x, w, b, a, bb, dy, *, scaling, dropout_p, seed, grads=("x", "weight", "bias", "lora_A", "lora_B"),
                row_scale=None, weight_scale=None, weight_code=None):
    """The float64 oracle: output and the requested gradients of the
    reference. ``weight_scale`` (and ``weight_code``): ``w`` is int8 or
    4-bit, the base its :func:`fused_lora.quant.dequantize_base` in x's
    dtype (the values the kernels multiply by), then taken in float64."""
    if weight_scale is not None:
        w = dequantize_base(w, weight_scale, x.dtype, weight_code)
    named = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    leaves = {k: (v.detach().double().requires_grad_(k in grads) if v is not None else None)
              for k, v in named.items()}
    y = reference.lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], leaves["bias"],
                              scaling=scaling, dropout_p=dropout_p, seed=seed,
                              row_scale=None if row_scale is None else row_scale.double())
    wanted = [k for k in grads if leaves[k] is not None]
    gs = torch.autograd.grad(y, [leaves[k] for k in wanted], dy.double()) if wanted else ()
    return y.detach(), dict(zip(wanted, gs))


def parity_case(lead, k, n, r, dtype, *, bias=True, dropout_p=0.0, train_base=False, layout="contiguous",
                scaling=1.5, seed=1234, row_scaled=False, adapters=False, dora=False, quantized=False,
                device=DEVICE) -> dict[str, float]:
    """Run the fused op once (forward and every gradient) and return each
    output's normalized error against the float64 reference. ``row_scaled``:
    with a random ``row_scale``, 0 on every third row. ``adapters``: the rank
    split between two adapters (``r // 4`` and the rest, r >= 2) of scales
    ``scaling`` and ``2·scaling``, through :func:`fused_lora.multi_lora_linear`
    with random ids in [-1, 2), each among them (dlora_A and dlora_B: the two adapters'
    gradients side by side); ``adapters="dropouts"`` likewise, the two
    adapters of dropout probabilities ``dropout_p`` and ``dropout_p / 2``;
    ``adapters="dora"``: the first adapter DoRA (a random magnitude, with
    ``dmagnitude``), the second not, against
    :func:`fused_lora.reference.multi_dora_linear_checked`. ``dora``: :func:`fused_lora.dora_linear` with a
    random magnitude (0.5 to 1.5), against the reference's DoRA (with
    ``dmagnitude``). ``quantized``: the base quantized, ``True`` or
    ``"int8"`` to int8 (:func:`fused_lora.quantize_int8`), ``"nf4"`` to NF4
    in groups of 16 (:func:`fused_lora.quantize_nf4`; ``k`` a multiple of
    16), ``"fp4"`` to FP4 likewise (:func:`fused_lora.quantize_fp4`, with
    its ``weight_code``), passed with its ``weight_scale``,
    against the reference on its dequantised values (not with
    ``train_base``: a quantized base is frozen)."""
    import fused_lora

    if quantized and train_base:
        raise ValueError("a quantized base is frozen: quantized takes no train_base")
    x = make_x((*lead, k), dtype, layout, device=device).requires_grad_()
    w, b, a, bb = make_params(k, n, r, dtype, bias, device=device)
    weight_scale = weight_code = None
    if quantized in ("nf4", "fp4"):
        w, weight_scale = (fused_lora.quantize_nf4 if quantized == "nf4" else fused_lora.quantize_fp4)(w, 16)
        weight_code = None if quantized == "nf4" else fp4_code(w.device)
    elif quantized:
        w, weight_scale = fused_lora.quantize_int8(w)
    a.requires_grad_()
    bb.requires_grad_()
    wanted = ["x", "lora_A", "lora_B"]
    if train_base:
        w.requires_grad_()
        wanted.append("weight")
        if b is not None:
            b.requires_grad_()
            wanted.append("bias")
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    row_scale = None
    if row_scaled:
        row_scale = torch.rand(lead, device=device) + 0.5
        row_scale.view(-1)[::3] = 0.0
    if adapters:
        return _adapters_parity_case(x, w, b, a, bb, wanted, scaling, dropout_p, seed, weight_scale, weight_code,
                                     dropouts=adapters == "dropouts", dora=adapters == "dora")
    if dora:
        return _dora_parity_case(x, w, b, a, bb, wanted, scaling, dropout_p, seed, weight_scale, weight_code)
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=scaling, dropout_p=dropout_p, seed=seed, row_scale=row_scale,
                               weight_scale=weight_scale, weight_code=weight_code, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inputs[g] for g in wanted], dy)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=scaling, dropout_p=dropout_p, seed=seed, grads=wanted,
                           row_scale=row_scale, weight_scale=weight_scale, weight_code=weight_code)
    errors = {"y": normalized_error(y, y64)}
    errors.update({f"d{name}": normalized_error(g, g64[name]) for name, g in zip(wanted, grads)})
    return errors


def _adapters_parity_case(x, w, b, a, bb, wanted, scaling, dropout_p, seed, weight_scale=None,
                          weight_code=None, dropouts=False, dora=False) -> dict[str, float]:
    """:func:`parity_case` with ``adapters`` (and ``quantized``: a quantized ``w`` with its ``weight_scale``;
    ``adapters="dropouts"``: each adapter its own dropout probability, ``dropout_p`` and ``dropout_p / 2``;
    ``adapters="dora"``: the first adapter DoRA)."""
    import fused_lora
    from fused_lora import reference

    r = a.shape[0]
    if r < 2:
        raise ValueError(f"two adapters need r >= 2, got {r}")
    cut = max(1, r // 4)
    lora_a = [a[:cut].detach().requires_grad_(), a[cut:].detach().requires_grad_()]
    lora_b = [bb[:, :cut].detach().requires_grad_(), bb[:, cut:].detach().requires_grad_()]
    ids = torch.randint(-1, 2, x.shape[:-1], device=x.device)
    ids.view(-1)[:3] = torch.arange(-1, 2, device=x.device)[:ids.numel()]  # (every id among the rows)
    scalings = [scaling, 2 * scaling]
    ps = [dropout_p, dropout_p / 2] if dropouts else [dropout_p] * 2
    inputs = {"x": x, "weight": w, "bias": b}
    leaves = [inputs[g] for g in wanted if g in inputs] + lora_a + lora_b
    if dora:
        return _multi_dora_parity_case(x, w, b, lora_a, lora_b, ids, [g for g in wanted if g in inputs], scalings,
                                       ps, seed, weight_scale, weight_code)
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=scalings, dropout_p=ps, seed=seed,
                                     weight_scale=weight_scale, weight_code=weight_code, backend="triton")
    if weight_scale is not None:
        w = dequantize_base(w, weight_scale, x.dtype, weight_code)
    dy = torch.randn_like(y)
    grads = dict(zip([g for g in wanted if g in inputs] + ["a0", "a1", "b0", "b1"],
                     torch.autograd.grad(y, leaves, dy)))
    grads["lora_A"] = torch.cat([grads.pop("a0"), grads.pop("a1")])
    grads["lora_B"] = torch.cat([grads.pop("b0"), grads.pop("b1")], 1)
    # float64: the reference's side-by-side form
    named = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    leaves64 = {k: (v.detach().double().requires_grad_(k in wanted) if v is not None else None)
                for k, v in named.items()}
    rank_ids = torch.tensor([0] * cut + [1] * (r - cut), device=x.device)
    adapter_p = None
    if dropouts and dropout_p > 0:  # (each adapter's 1/(1-p_i) in its columns' scale, in float64 here)
        scalings = [s / (1 - p) for s, p in zip(scalings, ps)]
        adapter_p = torch.tensor(ps, dtype=torch.float64, device=x.device)
    rank_scaling = torch.tensor([scalings[0]] * cut + [scalings[1]] * (r - cut), dtype=torch.float64,
                                device=x.device)
    y64 = reference.lora_linear_checked(leaves64["x"], leaves64["weight"], leaves64["lora_A"], leaves64["lora_B"],
                                        leaves64["bias"], 1.0, dropout_p, seed, None, (ids, rank_ids, rank_scaling),
                                        adapter_p=adapter_p)
    g64 = dict(zip(wanted, torch.autograd.grad(y64, [leaves64[k] for k in wanted], dy.double())))
    errors = {"y": normalized_error(y, y64.detach())}
    errors.update({f"d{name}": normalized_error(grads[name], g64[name]) for name in wanted})
    return errors


def _multi_dora_parity_case(x, w, b, lora_a, lora_b, ids, wanted, scalings, ps, seed, weight_scale,
                            weight_code) -> dict[str, float]:
    """:func:`_adapters_parity_case` with ``dora``: adapter 0 DoRA, adapter 1 not."""
    import fused_lora

    m = (torch.rand(w.shape[0], dtype=x.dtype, device=w.device) + 0.5).requires_grad_()
    inputs = {"x": x, "weight": w, "bias": b, "a0": lora_a[0], "a1": lora_a[1], "b0": lora_b[0], "b1": lora_b[1],
              "magnitude": m}
    names = [*wanted, "a0", "a1", "b0", "b1", "magnitude"]
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=scalings, dropout_p=ps, seed=seed,
                                     weight_scale=weight_scale, weight_code=weight_code, magnitude=[m, None],
                                     backend="triton")
    dy = torch.randn_like(y)
    grads = dict(zip(names, torch.autograd.grad(y, [inputs[k] for k in names], dy)))
    leaves = {k: (v.detach().double().requires_grad_(k in names) if v is not None else None)
              for k, v in inputs.items()}
    if weight_scale is not None:  # (Ŵ in x's dtype, taken in float64)
        leaves["weight"] = dequantize_base(w, weight_scale, x.dtype, weight_code).double()
    row_p = None
    if max(ps) > 0:
        p = torch.tensor(ps, dtype=torch.float64, device=x.device)
        row_p = torch.where(ids >= 0, p[ids.clamp(min=0)], 0.0)
    y64 = reference.multi_dora_linear_checked(
        leaves["x"], leaves["weight"], [leaves["a0"], leaves["a1"]], [leaves["b0"], leaves["b1"]],
        [leaves["magnitude"], None], ids, leaves["bias"], scalings, max(ps), seed, row_p)
    g64 = dict(zip(names, torch.autograd.grad(y64, [leaves[k] for k in names], dy.double())))
    for g in (grads, g64):
        g["lora_A"] = torch.cat([g.pop("a0"), g.pop("a1")])
        g["lora_B"] = torch.cat([g.pop("b0"), g.pop("b1")], 1)
    errors = {"y": normalized_error(y, y64.detach())}
    errors.update({f"d{name}": normalized_error(g, g64[name]) for name, g in grads.items()})
    return errors


def _dora_parity_case(x, w, b, a, bb, wanted, scaling, dropout_p, seed, weight_scale=None,
                      weight_code=None) -> dict[str, float]:
    """:func:`parity_case` with ``dora`` (and ``quantized``: a quantized ``w`` with its ``weight_scale``)."""
    import fused_lora

    m = (torch.rand(w.shape[0], dtype=x.dtype, device=w.device) + 0.5).requires_grad_()
    wanted = [*wanted, "magnitude"]
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb, "magnitude": m}
    y = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=scaling, dropout_p=dropout_p, seed=seed,
                               weight_scale=weight_scale, weight_code=weight_code, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inputs[g] for g in wanted], dy)
    leaves = {k: (v.detach().double().requires_grad_(k in wanted) if v is not None else None)
              for k, v in inputs.items()}
    if weight_scale is not None:  # (Ŵ in x's dtype, the values the kernels multiply by, taken in float64)
        leaves["weight"] = dequantize_base(w, weight_scale, x.dtype, weight_code).double()
    y64 = reference.dora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"],
                                leaves["magnitude"], leaves["bias"], scaling=scaling, dropout_p=dropout_p, seed=seed)
    g64 = torch.autograd.grad(y64, [leaves[k] for k in wanted], dy.double())
    errors = {"y": normalized_error(y, y64.detach())}
    errors.update({f"d{name}": normalized_error(g, e) for name, g, e in zip(wanted, grads, g64)})
    return errors


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (``--shard`` of pytest and of ``fused-lora bench --compile-only``:
    shard i of n, counted from 0) as ``(i, n)``."""
    try:
        i, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be 'i/n' with integers 0 <= i < n, got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard must be 'i/n' with integers 0 <= i < n, got {spec!r}")
    return i, n


def shard(items: list, i: int, n: int, alone=lambda item: False) -> list:
    """Shard ``i`` of ``n`` of ``items`` (pytest's ``--shard i/n``): with
    ``n > 1`` the items ``alone`` marks (the heaviest) make up shard 0 by
    themselves and the rest are interleaved over the other shards, not cut
    in blocks, so that each shard gets its share of every file; otherwise
    every n-th item, from the i-th. Each interleaved shard (the j-th of k)
    keeps the items' order but starts ``j/k`` of the way through its share
    and wraps around: where a time box stops all the shards at about the same
    point (bench/gpu_check.sh), the tests left unrun are spread over the
    whole suite, not all its last files, and at any one time the shards
    compile the kernels of different files, finding more of them in the
    on-disk cache that they share. The shards of ``0..n-1`` hold each item
    exactly once."""
    heavy = [item for item in items if alone(item)] if n > 1 else []
    if not heavy:
        group, j, k = items, i, n
    elif i == 0:
        return heavy
    else:
        group, j, k = [item for item in items if not alone(item)], i - 1, n - 1
    mine = group[j::k]
    start = j * len(mine) // k
    return mine[start:] + mine[:start]


class LiveBytes(TorchDispatchMode):
    """Inside the block, the bytes of the tensor storages that operators
    make, live at once at most (``peak``; ``live``: now): a storage counts
    from the operator that made it until the last tensor seen on it dies.
    The storages of ``given`` (the caller's tensors) and of their views do
    not count. What it sees are PyTorch's operators (a Triton kernel's
    output too: its launcher allocates it with one), not an allocator's
    caching or rounding. A fused_lora op called inside runs as one
    ``torch.library`` operator (what a mode sees of it: its outputs), not
    its passes: see ``bench/live_bytes.py``.

    Where a backward sums the gradients of a tensor used twice (naive
    LoRA's x: the base and the adapter; the recorded cuBLAS products' x),
    autograd's engine adds the second into the first's buffer in place
    when it holds the only reference to it, but never while a dispatch mode
    is on (it then treats every tensor as a subclass's): under this mode it
    makes a third buffer. Such a sum (:meth:`_engine_sum`) is counted as
    the engine makes it without the mode: in the first buffer (checked
    against this machine's resident memory: naive LoRA at dropout 0 peaks
    at 6.06 bytes an element of x in bf16, M=65536, 512²; a hook that keeps
    a gradient, which would make the engine sum out of place, is not seen)."""

    def __init__(self, *given: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {t.untyped_storage().data_ptr(): [1, 0] for t in given}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        into = self._engine_sum(func, args, kwargs, out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                ref = self._refs.get(key)
                if ref is None and into is not None:  # (the sum's buffer is the first's: its bytes move to it)
                    ref = self._refs[key] = [0, into[1]]
                    into[1] = 0
                elif ref is None:
                    ref = self._refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += ref[1]
                    self.peak = max(self.peak, self.live)
                ref[0] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _engine_sum(self, func, args, kwargs, out) -> list | None:
        """The count of the first operand's storage where ``func`` is the
        autograd engine summing two gradients of one tensor (an ``add`` in a
        backward, grad mode off, of two tensors alike, the first dense and
        seen on no other tensor: what the engine, without a mode, adds in
        place), else None."""
        if func is not torch.ops.aten.add.Tensor or kwargs or torch.is_grad_enabled():
            return None
        if torch._C._current_autograd_node() is None or len(args) != 2:
            return None
        first, second = args
        if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
                and isinstance(out, torch.Tensor)):
            return None
        if (first.shape != second.shape or first.dtype != second.dtype or out.shape != first.shape
                or out.dtype != first.dtype or first._base is not None or not first.is_contiguous()):
            return None
        ref = self._refs.get(first.untyped_storage().data_ptr())
        if ref is None or ref[0] != 1 or ref[1] != first.untyped_storage().nbytes():
            return None
        return ref

    def _drop(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if not ref[0]:
            self.live -= self._refs.pop(key)[1]


@contextlib.contextmanager
def eager_cublas_here(records: bool | None = None):
    """Inside the block, plain calls run as eager calls on a GPU do by the
    eager rule (:func:`fused_lora.dispatch.eager_cublas_reason`, switched
    on): on a machine without CUDA as if x were on one, no CUDA graph being
    captured. ``records``: with dropout, whatever M is, cuBLAS's products
    recorded for autograd (True: as up to
    :data:`fused_lora.dispatch.EAGER_KEPT_MASK_MAX_M` tokens) or run by
    their autograd Function (False: as above it); None: as M says
    (:func:`fused_lora.dispatch.eager_records`). Process-wide; everything
    is put back after the block."""
    from . import dispatch, ops

    saved = ops.eager_rule_applies, torch.cuda.is_current_stream_capturing, dispatch.eager_records
    if not torch.cuda.is_available():
        ops.eager_rule_applies, torch.cuda.is_current_stream_capturing = (lambda device: True), (lambda: False)
    if records is not None:
        dispatch.eager_records = lambda m, dropout_p: dropout_p == 0.0 or records
    ops._eager_calls.clear()  # (which remember how a layout runs)
    try:
        with dispatch.use_eager_cublas(True):
            yield
    finally:
        ops.eager_rule_applies, torch.cuda.is_current_stream_capturing, dispatch.eager_records = saved
        ops._eager_calls.clear()
