"""Strategy ``cublas``, and the rule that eager calls run it.

An eager call on a CUDA device runs every product on cuBLAS below
``dispatch.EAGER_CUBLAS_MAX_MNK`` (16-bit; float32 at any size), with
dropout its mask drawn by the keep-mask pass
(``dispatch.eager_cublas_reason``): the fifth GPU run found the Triton
passes' steps bound by the host's launches there. It records the products
for autograd's own backward, but with dropout above
``dispatch.EAGER_KEPT_MASK_MAX_M`` tokens, where an autograd Function of
its own (``ops._LoRALinearCublasFunction``) runs them and draws the mask
again rather than keep it. It primes the Triton plan it stands in for (kernels
compiled and loaded, none run), which a call captured into a CUDA graph
then runs (cuBLAS where not primed: CUDA loads no module mid-capture). Its
numbers against the float64 reference are in ``test_parity.py`` (forced,
every dtype, layout and rank: eager calls but a permuted x's record the
products for autograd's own backward or run the cublas Function, a permuted
x's the generic autograd Function's passes); here: the rule, its switch, its fallbacks, explain, the eager path
and where it steps aside, priming, and on a GPU the eager and captured
calls themselves. The
suite runs with the rule off (``conftest.py``); these tests turn it on.
"""

import dataclasses
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch._dynamo.testing
import triton.language as tl

import fused_lora
from fused_lora import dispatch, ops
from fused_lora.kernels import gemm, mask, skinny
from fused_lora.testing import LiveBytes
from lora_testing import DEVICE, assert_close, count_launches, make_params, make_x, reference64

BF16 = torch.bfloat16
CPU = torch.device("cpu")


@pytest.fixture
def rule_on():
    with dispatch.use_eager_cublas(True):
        yield


@pytest.fixture
def eager_here(monkeypatch, rule_on):
    """The rule applying on the CPU, standing in for a CUDA device, with
    nothing primed yet; the list it yields says whether a CUDA graph is
    being captured (``capturing[0] = True``)."""
    capturing = [False]
    monkeypatch.setattr(ops, "eager_rule_applies", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(ops, "_primed", {})
    monkeypatch.setattr(ops, "_eager_calls", {})
    yield capturing


@pytest.fixture
def forced_cublas(monkeypatch):
    """cublas forced, on the CPU as it is (the rule off: conftest.py), with
    nothing primed yet."""
    monkeypatch.setattr(ops, "_primed", {})
    monkeypatch.setattr(ops, "_eager_calls", {})
    with dispatch.force_strategy("cublas"):
        yield


def _passes(monkeypatch):
    """The passes that run, not priming: ``[(name, strategy forced)]`` of each
    forward_triton / backward_triton call (the Function's), and
    ``("backward_cublas", None)`` within them."""
    ran = []
    for name in ("forward_triton", "backward_triton"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: (
            kw.get("_plan") is None and ran.append((_name, dispatch.forced_strategy())), _real(*a, **kw))[1])
    real_bwd = ops.backward_cublas
    monkeypatch.setattr(ops, "backward_cublas",
                        lambda *a, **kw: ran.append(("backward_cublas", None)) or real_bwd(*a, **kw))
    return ran


def _launches(monkeypatch):
    """Every Triton launch from now on, not priming (GEMM, skinny pass,
    reduction): their grids, seen where the launchers call
    ``kernels.launch.launch`` (the kernels themselves untouched, so that
    priming compiles and loads them as ever)."""
    from fused_lora.kernels import launch as launch_mod

    grids = {gemm.lora_gemm_kernel: [], skinny.lora_skinny_kernel: [], skinny.reduce_partials_kernel: []}

    def seen(kernel, grid, args, kwargs):
        if not launch_mod.priming_active():
            grids[kernel].append(grid)
        return launch_mod.launch(kernel, grid, args, kwargs)

    monkeypatch.setattr(gemm, "launch", seen)
    monkeypatch.setattr(skinny, "launch", seen)
    return list(grids.values())


def _mask_launches(monkeypatch) -> list:
    """The grids of the keep-mask pass's launches from now on."""
    grids = []
    real = mask.launch
    monkeypatch.setattr(mask, "launch", lambda kernel, grid, *rest: grids.append(grid) or real(kernel, grid, *rest))
    return grids


def test_the_rule(rule_on):
    """cublas for an eager plain call at dropout 0 below the size (16-bit),
    at any size in float32; the Triton plan otherwise, and always where a
    strategy is forced or the switch is off."""
    small, big = (4096, 4096, 4096), (8192, 4096, 4096)
    assert small[0] * small[1] * small[2] < dispatch.EAGER_CUBLAS_MAX_MNK <= big[0] * big[1] * big[2]

    def strategy(mnk=small, dtype=BF16, p=0.0, **kw):
        return dispatch.device_plan(CPU, *mnk, 16, dtype, p, **{"eager": True, **kw})

    eager = strategy()
    assert eager.strategy == "cublas" and "host" in eager.reason
    triton = dispatch.device_plan(CPU, *small, 16, BF16, 0.0)  # (not eager: the plan of a captured call)
    assert triton.strategy == "in_loop" and eager.fwd_gemm == triton.fwd_gemm
    assert eager.captured is triton and triton.captured is None  # (what a primed capture runs)
    assert strategy() is eager  # (made once a plan)
    assert strategy(mnk=(1, 64, 64)).strategy == "cublas"
    assert strategy(mnk=big).strategy == "in_loop"
    assert strategy(mnk=big, dtype=torch.float32).strategy == "cublas"
    assert strategy(dtype=torch.float16).strategy == "cublas"
    most = dispatch.EAGER_KEPT_MASK_MAX_M
    for dtype in (BF16, torch.float16, torch.float32):
        # with dropout: cublas at any M below the size, the mask kept by autograd up to `most` tokens only
        # (dispatch.eager_records: above, the cublas Function draws it again)
        kept = strategy(mnk=(most, 4096, 4096), dtype=dtype, p=0.1)
        assert kept.strategy == "cublas" and "kept for the backward with x ⊙ keep" in kept.reason
        assert kept.captured == dispatch.device_plan(CPU, most, 4096, 4096, 16, dtype, 0.1)
        assert dispatch.eager_records(most, 0.1) and dispatch.eager_records(most + 1, 0.0)
        for mnk in ((most + 1, 4096, 4096), small):
            redrawn = strategy(mnk=mnk, dtype=dtype, p=0.1)
            assert redrawn.strategy == "cublas" and "nothing of x's size kept" in redrawn.reason
            assert f"M={mnk[0]} > {most}" in redrawn.reason and "not yet timed on a GPU" in redrawn.reason
            assert redrawn.captured == dispatch.device_plan(CPU, *mnk, 16, dtype, 0.1)
            assert not dispatch.eager_records(mnk[0], 0.1)
        assert strategy(mnk=big, dtype=dtype, p=0.1).strategy == ("cublas" if dtype == torch.float32 else "split")
    # (equal Triton plans of several M: each its own reason)
    assert dispatch.device_plan(CPU, 300, 4096, 4096, 16, BF16, 0.1) == dispatch.device_plan(
        CPU, 301, 4096, 4096, 16, BF16, 0.1)
    assert "M=300" in strategy(mnk=(300, 4096, 4096), p=0.1).reason
    assert "M=301" in strategy(mnk=(301, 4096, 4096), p=0.1).reason
    assert strategy(quantized="int8").strategy != "cublas"
    assert strategy(quantized="nf4").strategy != "cublas"
    assert strategy(plain=False).strategy == "in_loop"  # (a row scale or adapters: the kernels apply them)
    assert strategy(eager=False).strategy == "in_loop"
    assert strategy(strategy="split").strategy == "split"
    with dispatch.force_strategy("hybrid"):
        assert strategy().strategy == "hybrid"
    with dispatch.use_eager_cublas(False):
        assert not dispatch.eager_cublas_setting()
        assert strategy().strategy == "in_loop"
        assert dispatch.eager_cublas_reason(*small, BF16, 0.0) == ""
    assert dispatch.eager_cublas_setting()
    assert dispatch.eager_cublas_reason(*small, BF16, 0.0) == eager.reason
    assert dispatch.eager_cublas_reason(*big, BF16, 0.0) == ""
    assert dispatch.eager_cublas_reason(*big, BF16, 0.1) == ""
    assert "3 bytes an element of x" in dispatch.eager_cublas_reason(1, 64, 64, BF16, 0.5)
    with dispatch.use_eager_cublas(False):
        assert dispatch.eager_cublas_reason(1, 64, 64, BF16, 0.5) == ""
    with pytest.raises(TypeError, match="enabled"):
        dispatch.set_eager_cublas("yes")


def test_forced_cublas_falls_back_to_the_unforced_plan():
    """Forced, cublas runs on a float base, with dropout too (the keep-mask
    pass draws the mask), at any M; with a quantized base, a row scale or
    adapters it is exactly what no force plans (strategy, tiles; an NF4
    base above its decoding size made whole), its reason saying why first."""
    args = dict(m=2000, n=512, k=256, r=8, dtype=BF16, dropout_p=0.0, interpreter=True)
    with dispatch.force_strategy("cublas"):
        assert dispatch.plan(**args).strategy == "cublas"
        assert "no Triton launch" in dispatch.plan(**args).reason
        dropped = dispatch.plan(**{**args, "dropout_p": 0.1})
        assert dropped.strategy == "cublas" and "keep-mask pass" in dropped.reason
    for kw, why in (({"quantized": "int8"}, "int8 base"),
                    ({"quantized": "nf4"}, "nf4 base"), ({"plain": False}, "row scale or adapters")):
        unforced = dispatch.plan(**{**args, **kw})
        with dispatch.force_strategy("cublas"):
            forced = dispatch.plan(**{**args, **kw})
        assert forced.strategy != "cublas" and why in forced.reason
        assert forced.reason.startswith("forced 'cublas', which cannot run here (")
        assert forced.reason.endswith(f"): {unforced.reason}")
        assert dataclasses.replace(forced, reason="") == dataclasses.replace(unforced, reason="")
    assert dispatch.plan(**{**args, "quantized": "nf4"}).dequantize_base


def test_explain_says_what_eager_calls_run(rule_on):
    e = fused_lora.explain((4096, 4096), (4096, 4096), 16)
    assert e.eager_strategy == "cublas" and e.plan.strategy == "in_loop"
    text = str(e)
    assert "eager calls: cublas" in text and "captured in a CUDA graph: in_loop" in text
    dropped = fused_lora.explain((16, 4096), (4096, 4096), 16, dropout_p=0.1)
    assert dropped.eager_strategy == "cublas" and dropped.plan.strategy == "in_loop"
    assert "eager calls: cublas (cuBLAS's products, the keep-mask pass, autograd's backward; the mask kept" in str(
        dropped)
    redrawn = fused_lora.explain((257, 4096), (4096, 4096), 16, dropout_p=0.1)
    assert redrawn.eager_strategy == "cublas" and redrawn.plan.strategy == "split"
    assert ("eager calls: cublas (the autograd Function's cuBLAS passes, the keep-mask pass in each; nothing of "
            "x's size kept)") in str(redrawn)
    for other in (fused_lora.explain((8192, 4096), (4096, 4096), 16),
                  fused_lora.explain((8192, 4096), (4096, 4096), 16, dropout_p=0.1),
                  fused_lora.explain((16, 4096), (4096, 4096), 16, target="interpreter"),
                  fused_lora.explain((16, 4096), (4096, 4096), 16, quantized="int8")):
        assert other.eager == "" and other.eager_strategy == other.plan.strategy
        assert "eager calls" not in str(other) and "\nstrategy: " in str(other)
    with dispatch.force_strategy("split"):
        assert fused_lora.explain((16, 4096), (4096, 4096), 16).eager == ""
    with dispatch.force_strategy("cublas"):
        forced = fused_lora.explain((16, 4096), (4096, 4096), 16)
        forced_dropped = fused_lora.explain((16, 4096), (4096, 4096), 16, dropout_p=0.1)
    assert forced.plan.strategy == "cublas" and "no Triton launch" in str(forced)
    assert [name for name, _ in forced.passes()] == ["forward", "backward"]
    assert forced_dropped.plan.strategy == "cublas" and "no Triton launch" not in str(forced_dropped)
    assert "keep-mask pass writes keep" in str(forced_dropped) and "(g·A) ⊙ keep" in str(forced_dropped)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need", [("x", "lora_A", "lora_B"), ("lora_B",), ("x",), ("lora_A", "weight", "bias")])
def test_forced_cublas_launches_nothing_and_computes_what_is_asked(monkeypatch, need, p):
    """Through the autograd Function's cublas passes (x permuted: an eager
    call would keep its copy): no Triton launch, forward or backward, but
    the keep-mask pass's with dropout (once a pass that needs the mask: the
    backward only for dx or dA); each gradient asked for matches the
    float64 reference (the mask its, of the seed), and only those are
    computed."""
    dtype = torch.float32
    x = make_x((3, 11, 40), dtype, "permuted").requires_grad_("x" in need)
    w, b, a, bb = make_params(40, 24, 5, dtype, True)
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    for name in need:
        inputs[name].requires_grad_()
    launches, masks = _launches(monkeypatch), _mask_launches(monkeypatch)
    calls = []
    real = ops.backward_cublas
    monkeypatch.setattr(ops, "backward_cublas", lambda *args: calls.append(args[7:12]) or real(*args))
    with dispatch.force_strategy("cublas"):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=1234, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [inputs[n] for n in need], dy)
    assert launches == [[], [], []]
    assert len(masks) == (0 if p == 0.0 else 1 + ("x" in need or "lora_A" in need))
    assert calls == [tuple(name in need for name in ("x", "weight", "bias", "lora_A", "lora_B"))]
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=0.75, dropout_p=p, seed=1234, grads=need)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(need, grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_backward_cublas_computes_only_what_is_asked(p):
    """Each gradient alone where only it is asked (its values against the
    float64 reference: the test above and test_parity.py), bitwise what all
    of them together give, None elsewhere."""
    x2, dy2 = torch.randn(9, 12), torch.randn(9, 7)
    w, _, a, bb = make_params(12, 7, 3, torch.float32, False, device="cpu")
    xa = x2 @ a.t()
    assert ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, False, False, False, False, False, p, 5) == (None,) * 5
    every = ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, True, True, True, True, True, p, 5)
    for i in range(5):
        alone = ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, *(j == i for j in range(5)), p, 5)
        assert all((g is None) == (j != i) for j, g in enumerate(alone)), i
        assert torch.equal(alone[i], every[i]), i


@pytest.mark.parametrize("need_x, need_A", [(True, True), (True, False), (False, True)])
def test_the_cublas_backward_with_dropout_holds_two_buffers_of_xs_size_at_most(monkeypatch, need_x, need_A):
    """The Function's cublas backward with dropout (what eager calls above
    EAGER_KEPT_MASK_MAX_M tokens run): the mask drawn again (a byte an
    element of x) and one buffer of x's dtype at a time (x ⊙ keep for dA,
    then dx, dy·W added to the masked term in place), beside the small
    (M, r) and (r, K) ones; nothing else of x's size. (The keep-mask pass
    stands in as a copy of its mask: the interpreter's own copies of a
    kernel's arguments are no GPU's.)"""
    m, k, n, r = 96, 80, 48, 4
    x2, dy2 = torch.randn(m, k), torch.randn(m, n)
    w, _, a, bb = make_params(k, n, r, torch.float32, False, device="cpu")
    xa = x2 @ a.t()
    keep = ops._keep(x2, 0.25, 11)
    monkeypatch.setattr(ops, "_keep", lambda x2_, p, seed: keep.clone())
    tracked = LiveBytes(x2, dy2, w, a, bb, xa)
    with tracked:
        grads = ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, need_x, False, False, need_A, True, 0.25, 11)
    assert [g is not None for g in grads] == [need_x, False, False, need_A, True]
    small = 4 * (2 * m * r + 2 * r * k + n * r)  # (g, dA, dB: every (M, r), (r, K) and (N, r) buffer, twice)
    assert m * k * (1 + 4) <= tracked.peak <= m * k * (1 + 4) + small, tracked.peak


# (13 tokens: autograd's backward; 100 with dropout: the cublas Function's; permuted: the generic Function's passes)
@pytest.mark.parametrize("tokens, layout", [(13, "contiguous"), (100, "contiguous"), (13, "permuted")])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_forced_cublas_is_deterministic(p, tokens, layout):
    """Bitwise the same output and gradients run after run: of the same
    seed, or of the same torch.manual_seed (seed=None: drawn, and read by
    the keep-mask pass from its tensor: the int seed of its value gives the
    same bits)."""
    x = make_x((3, tokens, 64), torch.float32, layout).requires_grad_()
    w, b, a, bb = make_params(64, 48, 8, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(3, tokens, 48, device=x.device)
    runs = []
    with dispatch.force_strategy("cublas"):
        for i in range(5):
            if i >= 2:
                torch.manual_seed(77)
            seed = 5 if i < 2 else None if i < 4 else fused_lora.dropout.draw_seed(x.device)
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=seed, backend="triton")
            runs.append((y, *torch.autograd.grad(y, (x, a, bb), dy)))
    for one, other in ((runs[0], runs[1]), (runs[2], runs[3]), (runs[2], runs[4])):
        for first, second in zip(one, other):
            assert torch.equal(first, second)


def test_forced_cublas_with_a_row_scale_or_adapters_runs_the_kernels(monkeypatch):
    """A row scale (and adapters side by side) is the kernels' to apply:
    forced cublas runs them, with the reference's results."""
    dtype = torch.float32
    x = make_x((19, 32), dtype).requires_grad_()
    w, b, a, bb = make_params(32, 24, 6, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    row_scale = torch.rand(19, device=x.device) + 0.5
    launches = _launches(monkeypatch)
    with dispatch.force_strategy("cublas"):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, row_scale=row_scale, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
    assert launches[0] and launches[1]
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=0.0, seed=0, grads=("x", "lora_A", "lora_B"),
                           row_scale=row_scale)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


def test_cublas_steps_aside_where_torch_would_refuse_it(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) torch refuses cuBLAS
    products unless CUBLAS_WORKSPACE_CONFIG makes them deterministic: eager
    calls then run the (deterministic) Triton plan."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert ops.cublas_deterministic()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not ops.cublas_deterministic()
        for value, allowed in ((":4096:8", True), (":16:8", True), (":0:0", False)):
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
            assert ops.cublas_deterministic() == allowed
    finally:
        torch.use_deterministic_algorithms(previous)


def test_the_switch_from_the_environment():
    """``FUSED_LORA_EAGER_CUBLAS=0`` turns the rule off at import, ``1`` (or
    unset) leaves it on; anything else is refused, naming the variable."""
    code = "import fused_lora; print(fused_lora.dispatch.eager_cublas_setting())"
    unset = {k: v for k, v in os.environ.items() if k != "FUSED_LORA_EAGER_CUBLAS"}
    for value, expected in ((None, "True"), ("1", "True"), ("0", "False")):
        env = unset if value is None else dict(unset, FUSED_LORA_EAGER_CUBLAS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
    bad = subprocess.run([sys.executable, "-c", code], env=dict(unset, FUSED_LORA_EAGER_CUBLAS="yes"),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "FUSED_LORA_EAGER_CUBLAS must be '0' or '1'" in bad.stderr


@pytest.mark.parametrize("how", ["rule", "forced"])
@pytest.mark.parametrize("shape, layout, r, need, p", [
    ((1, 40), "contiguous", 1, ("x", "lora_A", "lora_B"), 0.0),
    ((3, 17, 40), "contiguous", 8, ("x", "lora_A", "lora_B"), 0.0),
    ((23, 40), "strided", 5, ("x", "weight", "bias", "lora_B"), 0.0),
    ((23, 40), "transposed", 16, ("lora_A",), 0.0),
    ((1, 40), "contiguous", 1, ("x", "lora_A", "lora_B"), 0.5),
    ((3, 17, 40), "contiguous", 8, ("x", "lora_A", "lora_B"), 0.1),
    ((23, 40), "strided", 5, ("x", "weight", "bias", "lora_B"), 0.25),
    ((23, 40), "transposed", 16, ("lora_A",), 0.9),
])
def test_eager_calls_are_torch_products_that_autograd_differentiates(monkeypatch, request, how, shape, layout, r,
                                                                      need, p):
    """Where the rule applies, or cublas is forced, an eager call records
    cuBLAS's three products for autograd (with dropout, after the keep-mask
    pass's one launch and ``x ⊙ keep``): no other Triton launch, no autograd
    Function (no pass of fused_lora's forward or backward runs: autograd's
    own backward of the products), the values and each gradient asked for
    the float64 reference's (the mask the seed's); x of any strides that
    flattens without a copy. (Forced: on the CPU as it is, the rule off,
    nothing primed.)"""
    request.getfixturevalue("eager_here" if how == "rule" else "forced_cublas")
    dtype = torch.float32
    x = make_x(shape, dtype, layout).requires_grad_("x" in need)
    w, b, a, bb = make_params(40, 24, r, dtype, True)
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    for name in need:
        inputs[name].requires_grad_()
    launches, ran, masks = _launches(monkeypatch), _passes(monkeypatch), _mask_launches(monkeypatch)
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=2024, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inputs[n] for n in need], dy)
    assert launches == [[], [], []] and ran == [] and len(masks) == (p > 0)  # (autograd keeps the mask)
    assert y.shape == (*shape[:-1], 24) and "LoRALinear" not in type(y.grad_fn).__name__
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=0.75, dropout_p=p, seed=2024, grads=need)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(need, grads):
        assert_close(g, g64[name], dtype, f"d{name}")
    with torch.no_grad():
        again = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=2024, backend="triton")
        assert torch.equal(again, y)
    assert launches == [[], [], []] and ran == []
    assert bool(ops._primed) == (how == "rule")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_what_an_eager_call_keeps_for_its_backward(eager_here, p):
    """What autograd saves for an eager call's backward, beyond the
    caller's own tensors: the (M, r) xa; with dropout also the (M, K) mask,
    a byte an element, and x ⊙ keep, in x's dtype (as PyTorch's dropout
    keeps: EAGER_KEPT_MASK_MAX_M bounds M). Nothing else of x's or
    y's size."""
    x = make_x((2, 9, 40), torch.float32).requires_grad_()
    w, b, a, bb = make_params(40, 24, 4, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lora.lora_linear(x, w, a, bb, b, scaling=0.5, dropout_p=p, seed=3, backend="triton")
    own = {t.data_ptr() for t in (x, w, b, a, bb)}
    kept = sorted((str(t.dtype), tuple(t.shape)) for t in saved if t.data_ptr() not in own)
    expected = [("torch.float32", (18, 4))]
    if p:
        expected = sorted(expected + [("torch.bool", (18, 40)), ("torch.float32", (18, 40))])
    assert kept == expected


@pytest.mark.parametrize("how", ["rule", "forced"])
@pytest.mark.parametrize("shape, need, p, dtype", [  # (bf16: cuBLAS's products and the keep-mask pass's bytes only)
    ((300, 40), ("x", "lora_A", "lora_B"), 0.1, torch.float32),
    ((2, 129, 40), ("x", "weight", "bias", "lora_B"), 0.5, torch.float32),
    ((257, 40), ("lora_A",), 0.25, torch.float32),
    ((263, 40), ("lora_B",), 0.3, torch.float32),
    ((270, 40), ("x", "lora_A", "lora_B"), 0.2, BF16),
])
def test_eager_calls_with_dropout_above_the_bound_run_the_cublas_function(monkeypatch, request, how, shape, need,
                                                                          p, dtype):
    """With dropout above EAGER_KEPT_MASK_MAX_M tokens an eager call that
    runs cublas (by the rule or forced) goes through the cublas autograd
    Function (no pass of the generic one), which draws the mask in the
    forward and again in the backward (only where dx or dA needs it): no
    other Triton launch, the values and each gradient asked for the float64
    reference's, and nothing of x's size kept for the backward: beyond the
    caller's tensors only the (M, r) xa, in x's dtype (an int seed stays on
    the Function)."""
    request.getfixturevalue("eager_here" if how == "rule" else "forced_cublas")
    m = 1
    for d in shape[:-1]:
        m *= d
    assert m > dispatch.EAGER_KEPT_MASK_MAX_M and not dispatch.eager_records(m, p)
    x = make_x(shape, dtype).requires_grad_("x" in need)
    w, b, a, bb = make_params(40, 24, 6, dtype, True)
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    for name in need:
        inputs[name].requires_grad_()
    launches, ran, masks = _launches(monkeypatch), _passes(monkeypatch), _mask_launches(monkeypatch)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=99, backend="triton")
    node = y.grad_fn if len(shape) == 2 else y.grad_fn.next_functions[0][0]  # (3-D: a view of its output)
    assert type(node).__name__ == "_LoRALinearCublasFunctionBackward" and len(masks) == 1
    own = {t.data_ptr() for t in (x, w, b, a, bb)}
    kept = sorted((str(t.dtype), tuple(t.shape)) for t in saved if t.data_ptr() not in own)
    assert kept == [(str(dtype), (m, 6))]  # (xa, as cuBLAS's product made it)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inputs[n] for n in need], dy)
    assert ran == [("backward_cublas", None)]
    assert launches == [[], [], []] and len(masks) == 1 + ("x" in need or "lora_A" in need)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=0.75, dropout_p=p, seed=99, grads=need)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(need, grads):
        assert_close(g, g64[name], dtype, f"d{name}")
    with torch.no_grad():
        assert torch.equal(fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=99,
                                                  backend="triton"), y)
    assert launches == [[], [], []]
    assert bool(ops._primed) == (how == "rule")  # (the Triton plan a captured call runs)


def test_eager_calls_whose_x_would_be_copied_run_the_function(monkeypatch, eager_here):
    """x whose leading dims cannot merge (a permuted 3-D x): the autograd
    Function's cublas passes, which keep x itself for the backward rather
    than its copy; the same values."""
    dtype = torch.float32
    x = make_x((3, 11, 40), dtype, "permuted").requires_grad_()
    w, b, a, bb = make_params(40, 24, 6, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    ran = _passes(monkeypatch)
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    assert ran == [("forward_triton", None), ("backward_triton", None), ("backward_cublas", None)]
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=0.0, seed=0, grads=("x", "lora_A", "lora_B"))
    assert_close(y, y64, dtype, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("tokens, p", [(9, 0.0), (9, 0.3), (150, 0.3)])  # (150 with dropout: the cublas Function)
def test_eager_calls_are_deterministic_and_differentiate_twice(eager_here, tokens, p):
    """Bitwise the same output and gradients run after run; and gradients
    that differentiate again (create_graph=True) to the float64 reference's
    second derivatives: autograd's own of the products, or, from the cublas
    Function, the reference's in PyTorch ops, the mask the seed's."""
    dtype = torch.float32
    x = make_x((2, tokens, 32), dtype).requires_grad_()
    w, b, a, bb = make_params(32, 16, 4, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(2, tokens, 16)
    runs = []
    for _ in range(2):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=11, backend="triton")
        runs.append((y, *torch.autograd.grad(y, (x, a, bb), dy)))
    node = type(y.grad_fn.next_functions[0][0]).__name__
    assert (node == "_LoRALinearCublasFunctionBackward") == (not dispatch.eager_records(2 * tokens, p)), node
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    v = torch.randn(2, tokens, 32)

    def second_derivatives(x, a, bb, dy):
        y = fused_lora.lora_linear(x, w.to(x.dtype), a, bb, b.to(x.dtype), scaling=2.0, dropout_p=p, seed=11,
                                   backend="triton" if x.dtype == dtype else "torch")
        dx, = torch.autograd.grad(y, x, dy, create_graph=True)
        return torch.autograd.grad((dx * v.to(x.dtype)).sum(), (a, bb))

    got = second_derivatives(x, a, bb, dy)
    want = second_derivatives(*(t.detach().double().requires_grad_() for t in (x, a, bb)), dy.double())
    for name, g, g64 in zip(("d²/dx dA", "d²/dx dB"), got, want):
        assert_close(g, g64, dtype, name)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("tokens", [9, 150])  # (2 × 150 with dropout: the cublas Function)
def test_eager_calls_under_activation_checkpointing_draw_the_same_mask_again(eager_here, tokens, reentrant):
    """torch.utils.checkpoint around eager calls that draw their seed
    (seed=None): the recomputed forward draws the same seed, so the same
    mask, and the gradients are bitwise those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x = make_x((2, tokens, 32), torch.float32).requires_grad_()
    w, b, a, bb = make_params(32, 16, 4, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()

    def block(x):
        return fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=0.3, backend="triton").square()

    def gradients(seed, run):
        torch.manual_seed(seed)
        for t in (x, a, bb):
            t.grad = None
        run(x).sum().backward()  # (the reentrant checkpoint takes no autograd.grad)
        return x.grad, a.grad, bb.grad

    plain = gradients(5, block)
    again = gradients(5, lambda x: checkpoint(block, x, use_reentrant=reentrant))
    for first, second in zip(plain, again):
        assert torch.equal(first, second)
    assert not torch.equal(gradients(6, block)[1], plain[1])  # (another seed: another mask)


def test_a_compiled_call_traces_the_op_in_one_graph(monkeypatch, eager_here):
    """While torch.compile traces, the eager path is not taken (nor asked
    about: no graph break, fullgraph=True), the op is; compiled and eager
    steps match."""
    dtype = torch.float32
    x = make_x((2, 7, 32), dtype).requires_grad_()
    w, b, a, bb = make_params(32, 16, 4, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(fn):
        y = fn(x)
        return (y, *torch.autograd.grad(y.square().sum(), (x, a, bb)))

    def call(x):
        return fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton")

    ran = _passes(monkeypatch)
    compiled = step(torch.compile(call, backend=counter, fullgraph=True))
    assert counter.frame_count == 1 and ran[:2] == [("forward_triton", None), ("backward_triton", None)]
    ran.clear()
    eager = step(call)
    assert ran == []
    for got, want in zip(compiled, eager):
        assert_close(got, want.double(), dtype, "compiled vs eager")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_calls_prime_the_triton_plan_that_captured_calls_run(monkeypatch, eager_here, p):
    """An eager call runs cuBLAS alone (with dropout, and the keep-mask
    pass) and primes its Triton plan (every kernel compiled and loaded,
    none run: once per pass and operand layout; the backward's in a hook on
    y, which calls register until a backward has primed it, for the
    gradients asked for); a call being captured into a CUDA graph runs that
    Triton plan where it was primed, cuBLAS where not (CUDA refuses to load
    a module mid-capture). On the CPU, standing in: the rule applying, and
    a capture in progress."""
    capturing = eager_here
    primed = []
    for name in ("forward_triton", "backward_triton"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: (
            kw.get("_plan") is not None and primed.append((_name, kw["_plan"].strategy)), _real(*a, **kw))[1])
    launches, ran = _launches(monkeypatch), _passes(monkeypatch)
    dtype = torch.float32
    x = make_x((23, 40), dtype).requires_grad_()
    w, b, a, bb = make_params(40, 24, 5, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()

    def step(x, hooked=False):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=99, backend="triton")
        assert bool(y._backward_hooks) == hooked  # (the backward's priming, until it ran)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
        y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=99,
                               grads=("x", "lora_A", "lora_B"))
        assert_close(y, y64, dtype, "y")
        for name, g in zip(("x", "lora_A", "lora_B"), grads):
            assert_close(g, g64[name], dtype, f"d{name}")
        launched = [len(grids) for grids in launches]
        passes = list(ran)
        for seen in (*launches, ran):
            seen.clear()
        return launched, passes

    function = [("forward_triton", None), ("backward_triton", None)]  # (the Function's passes, each on its plan)
    triton = ops.plan_for(x.detach(), w, 5, p, plain=True).captured
    assert triton is not None and triton.strategy != "cublas"  # (in_loop here; hybrid for fp32 on a GPU)
    assert step(x, hooked=True) == ([0, 0, 0], [])  # (eager: cuBLAS's products; the Triton plan primed)
    assert primed == [("forward_triton", triton.strategy), ("backward_triton", triton.strategy)]
    assert sorted(key[1][0] for key in ops._primed) == ["backward", "forward"]
    assert all(plan is triton for plan in ops._primed.values())
    assert step(x) == ([0, 0, 0], []) and len(primed) == 2  # (primed once)
    capturing[0] = True
    launched, passes = step(x)
    assert launched[0] > 0 and passes == function  # (captured: the Triton plan, primed, both passes)
    other = make_x((23, 40), dtype, "strided").requires_grad_()
    assert step(other) == ([0, 0, 0], function + [("backward_cublas", None)])  # (captured, not primed: cuBLAS)
    assert len(primed) == 2
    capturing[0] = False
    assert step(other, hooked=True) == ([0, 0, 0], []) and len(primed) == 4  # (eager: primed for it too)
    capturing[0] = True
    launched, passes = step(other)
    assert launched[0] > 0 and passes == function
    # the forward primed where nothing was to be differentiated, the backward at the first step that was
    capturing[0] = False
    fresh = make_x((7, 40), dtype)
    with torch.no_grad():
        fused_lora.lora_linear(fresh, w, a, bb, b, scaling=1.5, dropout_p=p, seed=99, backend="triton")
    assert len(primed) == 5 and primed[-1][0] == "forward_triton"
    assert step(fresh.requires_grad_(), hooked=True)[1] == [] and primed[-1][0] == "backward_triton"
    capturing[0] = True
    launched, passes = step(fresh)
    assert launched[0] > 0 and passes == function
    if p:  # (a seed of another kind, drawn for the call: read through a pointer, another kernel; not primed)
        y = fused_lora.lora_linear(fresh, w, a, bb, b, scaling=1.5, dropout_p=p, backend="triton")
        torch.autograd.grad(y, (fresh, a, bb), torch.randn_like(y))
        assert [len(grids) for grids in launches] == [0, 0, 0]
        assert ran == function + [("backward_cublas", None)]


def test_eager_calls_through_the_function_prime_what_captured_calls_run(monkeypatch, eager_here):
    """With dropout above EAGER_KEPT_MASK_MAX_M tokens, the eager calls'
    cublas Function (cuBLAS's products, the keep-mask pass in each pass)
    primes their Triton plan once, the forward's in the first call, the
    backward's in the first backward; a call captured after them runs that
    plan on the generic Function's passes. Both the float64 reference's
    values."""
    capturing = eager_here
    launches, ran, masks = _launches(monkeypatch), _passes(monkeypatch), _mask_launches(monkeypatch)
    dtype = torch.float32
    x = make_x((2, 150, 40), dtype).requires_grad_()
    w, b, a, bb = make_params(40, 24, 5, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()

    def step():
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=0.2, seed=7, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
        y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=0.2, seed=7,
                               grads=("x", "lora_A", "lora_B"))
        assert_close(y, y64, dtype, "y")
        for name, g in zip(("x", "lora_A", "lora_B"), grads):
            assert_close(g, g64[name], dtype, f"d{name}")
        out = [len(grids) for grids in launches], list(ran), len(masks)
        for seen in (*launches, ran, masks):
            seen.clear()
        return out

    function = [("forward_triton", None), ("backward_triton", None)]
    for _ in range(2):
        assert step() == ([0, 0, 0], [("backward_cublas", None)], 2)
        assert sorted(key[1][0] for key in ops._primed) == ["backward", "forward"]  # (once each)
        assert all(plan is not None and plan.strategy != "cublas" for plan in ops._primed.values())
    capturing[0] = True
    launched, passes, mask_launches = step()
    assert launched[0] > 0 and passes == function and mask_launches == 0  # (the primed Triton plan)


@pytest.mark.parametrize("p, seed", [(0.0, None), (0.2, None), (0.2, 7), (0.2, 2**40)])
def test_captured_calls_find_both_passes_primed_in_16_bits(monkeypatch, eager_here, p, seed):
    """bf16 (x, W, A, B bf16; the forward's xa fp32, as the backward's
    priming makes it): after an eager step, a captured step finds the Triton
    plan primed for its forward and its backward, every gradient asked or
    some, and launches it; with dropout, for each kind of seed the kernels
    take (drawn for the call, read through a pointer; an int of 32 or 64
    bits), which the priming key holds. (Its kernels are not run: the
    interpreter's bf16 is not trusted; the launches are counted where the
    launchers make them.)"""
    from fused_lora.kernels import launch as launch_mod

    capturing = eager_here
    launched = []

    def counted(kernel, grid, args, kwargs):
        if not launch_mod.priming_active():
            launched.append(kernel)

    monkeypatch.setattr(gemm, "launch", counted)
    monkeypatch.setattr(skinny, "launch", counted)
    ran = _passes(monkeypatch)
    x = make_x((4, 6, 64), BF16)
    w, b, a, bb = make_params(64, 32, 8, BF16, True)
    bb.requires_grad_()
    for asked in ((x, a, bb), (bb,)):
        for t in asked:
            t.requires_grad_()
        for capture in (False, True):
            capturing[0] = capture
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=seed, backend="triton")
            torch.autograd.grad(y, asked, torch.randn_like(y))
            expected = [("forward_triton", None), ("backward_triton", None)] if capture else []
            assert ran == expected and bool(launched) == capture, (len(asked), capture)
            ran.clear()
            launched.clear()
        for t in asked:
            t.requires_grad_(t is bb)


def test_a_failed_priming_warns_once_and_leaves_captured_calls_on_cublas(monkeypatch, eager_here):
    capturing = eager_here
    kernels = fused_lora._triton.get()

    def broken(*args, **kwargs):
        if kernels.launch.priming_active():
            raise RuntimeError("no such kernel")
        return real(*args, **kwargs)

    real = kernels.lora_gemm
    monkeypatch.setattr(kernels, "lora_gemm", broken)
    launches = _launches(monkeypatch)
    x = make_x((9, 32), torch.float32)
    w, b, a, bb = make_params(32, 16, 4, torch.float32, True)
    with pytest.warns(RuntimeWarning, match="priming the Triton kernels of the forward for CUDA graphs failed"):
        eager = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_lora.lora_linear(x, w, a, bb, b, backend="triton")  # (not tried again)
        capturing[0] = True
        captured = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
    assert launches == [[], [], []] and torch.equal(eager, captured)


def test_priming_launches_nothing_and_keeps_the_compiled_kernel(monkeypatch):
    """kernels.launch.priming: a JITFunction is warmed up (compiled, not
    run), its module loaded, and kept by the launch cache (a later launch of
    that specialisation goes to it); the interpreter's kernels are left
    alone; other threads launch as ever."""
    from fused_lora.kernels import launch as launch_mod
    from triton.runtime.jit import JITFunction

    calls = []

    class Compiled:
        def _init_handles(self):
            calls.append("loaded")

        def __getitem__(self, grid):
            return lambda *args: calls.append(("launched", grid, args))

    def _kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    kernel = JITFunction(_kernel)
    kernel.run = lambda *args, grid, warmup, **kwargs: calls.append(("run", grid, warmup)) or Compiled()
    monkeypatch.setattr(launch_mod, "_enabled", True)
    monkeypatch.setattr(launch_mod, "_compiled", {})
    monkeypatch.setattr(launch_mod, "current_device", lambda: 0)
    x = torch.randn(8)
    with launch_mod.priming():
        assert launch_mod.priming_active()
        launch_mod.launch(kernel, (2,), (x, 8), dict(BLOCK=16))
        other = threading.Thread(target=lambda: calls.append(("other thread", launch_mod.priming_active())))
        other.start()
        other.join()
    assert not launch_mod.priming_active()
    assert calls == [("run", (2,), True), "loaded", ("other thread", False)]
    launch_mod.launch(kernel, (3,), (torch.randn(8), 24), dict(BLOCK=16))  # (the same specialisation: kept)
    assert calls[-1][0] == "launched" and calls[-1][1] == (3, 1, 1)
    # (a kernel that is no plain JITFunction, the interpreter's or a stand-in: nothing to load)
    grids = count_launches(monkeypatch, gemm, "lora_gemm_kernel")
    with launch_mod.priming():
        launch_mod.launch(gemm.lora_gemm_kernel, (1,), (), {})
    assert grids == []


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_reduce_overhead_runs_the_primed_kernels_in_its_graphs(monkeypatch, rule_on):
    """torch.compile(mode="reduce-overhead") at dropout 0: its warm-up runs
    are eager (cuBLAS, the Triton plan primed), its recordings capture the
    Triton plan, and every step matches an eager step."""
    x = make_x((64, 256), BF16)
    w, b, a, bb = make_params(256, 128, 16, BF16, True)
    a.requires_grad_()
    bb.requires_grad_()

    def loss_fn(x):
        return fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton").float().square().mean()

    def step(fn):
        torch.compiler.cudagraph_mark_step_begin()
        loss = fn(x)
        loss.backward()
        out = [loss.detach().clone(), a.grad.clone(), bb.grad.clone()]
        a.grad = bb.grad = None
        return out

    want = step(loss_fn)
    launches = _launches(monkeypatch)
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for i in range(4):  # (warm-up, recording, replays)
        for got, expected in zip(step(compiled), want):
            assert_close(got, expected.double(), BF16, f"step {i}, compiled vs eager")
    assert launches[0]  # (the Triton GEMMs, recorded)


@pytest.mark.skipif(DEVICE != "cuda", reason="eager and captured calls on a CUDA device")
@pytest.mark.parametrize("m, p", [(64, 0.0), (64, 0.1), (320, 0.1)])
def test_eager_calls_run_cublas_and_captured_ones_the_kernels(monkeypatch, rule_on, m, p):
    """On a GPU, at dropout 0 and with dropout: an eager call launches no
    Triton kernel of the plan (with dropout, the keep-mask pass only: once
    at small M, where autograd keeps the mask; above
    EAGER_KEPT_MASK_MAX_M tokens through the cublas Function, once
    a pass) and primes the Triton plan; a call captured in a CUDA graph after
    such warm-up runs that plan; both match the reference (the mask the
    seed's)."""
    x = make_x((m, 256), BF16).requires_grad_()
    w, b, a, bb = make_params(256, 128, 16, BF16, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(m, 128, device=DEVICE, dtype=BF16)
    launches, ran, masks = _launches(monkeypatch), _passes(monkeypatch), _mask_launches(monkeypatch)
    records = dispatch.eager_records(m, p)
    function = [] if records else [("forward_triton", None), ("backward_triton", None), ("backward_cublas", None)]

    def step():
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=4321, backend="triton")
        return (y, *torch.autograd.grad(y, (x, a, bb), dy))

    eager = step()
    assert launches == [[], [], []] and ran == function  # (cuBLAS's products: autograd's backward, or the Function's)
    assert len(masks) == (0 if p == 0 else 1 if records else 2)
    ran.clear()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # (the usual warm-up on a side stream: eager, so cuBLAS, the Triton plan primed)
    torch.cuda.current_stream().wait_stream(stream)
    assert launches == [[], [], []] and ran == function
    ran.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert launches[0]  # (the Triton GEMMs, captured)
    assert ran == [("forward_triton", None), ("backward_triton", None)]  # (both passes on the primed plan)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=2.0, dropout_p=p, seed=4321, grads=("x", "lora_A", "lora_B"))
    for got in (eager, captured):
        assert_close(got[0], y64, BF16, "y")
        for name, g in zip(("x", "lora_A", "lora_B"), got[1:]):
            assert_close(g, g64[name], BF16, f"d{name}")
