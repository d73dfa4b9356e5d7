"""Strategy ``cublas``, and the rule that eager calls run it.

At dropout 0 an eager call on a CUDA device (no CUDA graph being captured)
runs every product on cuBLAS below ``dispatch.EAGER_CUBLAS_MAX_MNK``
(``dispatch.eager_cublas_reason``): the fifth GPU run found the Triton
passes' steps bound by the host's launches there. Its numbers against the
float64 reference are in ``test_parity.py`` (forced, every dtype, layout
and rank); here: the rule, its switch, its fallbacks, explain, and on a GPU
the eager and captured calls themselves. The suite runs with the rule off
(``conftest.py``); these tests turn it on.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import fused_lora
from fused_lora import dispatch, ops
from fused_lora.kernels import gemm, skinny
from lora_testing import DEVICE, assert_close, count_launches, make_params, make_x, reference64

BF16 = torch.bfloat16
CPU = torch.device("cpu")


@pytest.fixture
def rule_on():
    with dispatch.use_eager_cublas(True):
        yield


def _launches(monkeypatch):
    """Every Triton launch from now on (GEMM, skinny pass, reduction)."""
    return [count_launches(monkeypatch, gemm, "lora_gemm_kernel"),
            count_launches(monkeypatch, skinny, "lora_skinny_kernel"),
            count_launches(monkeypatch, skinny, "reduce_partials_kernel")]


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
    assert strategy() is eager  # (made once a plan)
    assert strategy(mnk=(1, 64, 64)).strategy == "cublas"
    assert strategy(mnk=big).strategy == "in_loop"
    assert strategy(mnk=big, dtype=torch.float32).strategy == "cublas"
    assert strategy(dtype=torch.float16).strategy == "cublas"
    assert strategy(p=0.1).strategy == "split"
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
    assert dispatch.eager_cublas_reason(*small, BF16, 0.1) == ""
    with pytest.raises(TypeError, match="enabled"):
        dispatch.set_eager_cublas("yes")


def test_forced_cublas_falls_back_where_it_cannot_run():
    """Forced, cublas runs at dropout 0 on a float base; with dropout, a
    quantized base, a row scale or adapters it is the plan of no force,
    saying why."""
    with dispatch.force_strategy("cublas"):
        assert dispatch.plan(64, 48, 32, 8, BF16, 0.0, interpreter=True).strategy == "cublas"
        for kw, why in (({"dropout_p": 0.1}, "dropout"), ({"quantized": "int8"}, "int8 base"),
                        ({"quantized": "nf4"}, "nf4 base"), ({"plain": False}, "row scale or adapters")):
            args = dict(m=64, n=48, k=32, r=8, dtype=BF16, dropout_p=0.0, interpreter=True)
            args.update(kw)
            plan = dispatch.plan(**args)
            assert plan.strategy != "cublas" and plan.reason.startswith("forced 'cublas', which cannot run here")
            assert why in plan.reason


def test_forced_cublas_falls_back_to_the_unforced_plan():
    """The fallback is what no force plans (strategy, tiles; an NF4 base
    above its decoding size made whole), its reason after the why."""
    args = dict(m=2000, n=512, k=256, r=8, dtype=BF16, interpreter=True)
    for kw in ({"dropout_p": 0.1}, {"dropout_p": 0.0, "quantized": "nf4"}, {"dropout_p": 0.0, "plain": False}):
        unforced = dispatch.plan(**args, **kw)
        with dispatch.force_strategy("cublas"):
            forced = dispatch.plan(**args, **kw)
        assert forced.reason.startswith("forced 'cublas', which cannot run here (")
        assert forced.reason.endswith(f"): {unforced.reason}")
        assert dataclasses.replace(forced, reason="") == dataclasses.replace(unforced, reason="")
    assert dispatch.plan(**args, dropout_p=0.0, quantized="nf4").dequantize_base


def test_explain_says_what_eager_calls_run(rule_on):
    e = fused_lora.explain((4096, 4096), (4096, 4096), 16)
    assert e.eager_strategy == "cublas" and e.plan.strategy == "in_loop"
    text = str(e)
    assert "eager calls: cublas" in text and "captured in a CUDA graph: in_loop" in text
    for other in (fused_lora.explain((8192, 4096), (4096, 4096), 16),
                  fused_lora.explain((16, 4096), (4096, 4096), 16, dropout_p=0.1),
                  fused_lora.explain((16, 4096), (4096, 4096), 16, target="interpreter"),
                  fused_lora.explain((16, 4096), (4096, 4096), 16, quantized="int8")):
        assert other.eager == "" and other.eager_strategy == other.plan.strategy
        assert "eager calls" not in str(other) and "\nstrategy: " in str(other)
    with dispatch.force_strategy("split"):
        assert fused_lora.explain((16, 4096), (4096, 4096), 16).eager == ""
    with dispatch.force_strategy("cublas"):
        forced = fused_lora.explain((16, 4096), (4096, 4096), 16)
    assert forced.plan.strategy == "cublas" and "no Triton launch" in str(forced)
    assert [name for name, _ in forced.passes()] == ["forward", "backward"]


@pytest.mark.parametrize("need", [("x", "lora_A", "lora_B"), ("lora_B",), ("x",), ("lora_A", "weight", "bias")])
def test_forced_cublas_launches_nothing_and_computes_what_is_asked(monkeypatch, need):
    """No Triton launch, forward or backward; each gradient asked for
    matches the float64 reference, and only those are computed."""
    dtype = torch.float32
    x = make_x((3, 11, 40), dtype, "permuted").requires_grad_("x" in need)
    w, b, a, bb = make_params(40, 24, 5, dtype, True)
    inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
    for name in need:
        inputs[name].requires_grad_()
    launches = _launches(monkeypatch)
    calls = []
    real = ops.backward_cublas
    monkeypatch.setattr(ops, "backward_cublas", lambda *args: calls.append(args[-5:]) or real(*args))
    with dispatch.force_strategy("cublas"):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [inputs[n] for n in need], dy)
    assert launches == [[], [], []]
    assert calls == [tuple(name in need for name in ("x", "weight", "bias", "lora_A", "lora_B"))]
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=0.75, dropout_p=0.0, seed=0, grads=need)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(need, grads):
        assert_close(g, g64[name], dtype, f"d{name}")


def test_backward_cublas_returns_none_where_not_asked():
    x2, dy2 = torch.randn(9, 12), torch.randn(9, 7)
    w, _, a, bb = make_params(12, 7, 3, torch.float32, False, device="cpu")
    xa = x2 @ a.t()
    assert ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, False, False, False, False, False) == (None,) * 5
    dx, dw, db, da, dB = ops.backward_cublas(dy2, x2, w, a, bb, xa, 2.0, True, True, True, True, True)
    torch.testing.assert_close(dx, dy2 @ w + 2.0 * (dy2 @ bb) @ a)
    torch.testing.assert_close(da, 2.0 * (dy2 @ bb).t() @ x2)
    torch.testing.assert_close(dB, 2.0 * dy2.t() @ xa)
    torch.testing.assert_close(db, dy2.sum(0))
    torch.testing.assert_close(dw, dy2.t() @ x2)


def test_forced_cublas_is_deterministic():
    x = make_x((37, 64), torch.float32).requires_grad_()
    w, b, a, bb = make_params(64, 48, 8, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(37, 48, device=x.device)
    runs = []
    with dispatch.force_strategy("cublas"):
        for _ in range(2):
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton")
            runs.append((y, *torch.autograd.grad(y, (x, a, bb), dy)))
    for first, second in zip(*runs):
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


@pytest.mark.skipif(DEVICE != "cuda", reason="eager and captured calls on a CUDA device")
def test_eager_calls_run_cublas_and_captured_ones_the_kernels(monkeypatch, rule_on):
    """On a GPU at dropout 0: an eager call launches no Triton kernel, a
    call captured in a CUDA graph runs the Triton plan; both match the
    reference."""
    x = make_x((64, 256), BF16).requires_grad_()
    w, b, a, bb = make_params(256, 128, 16, BF16, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(64, 128, device=DEVICE, dtype=BF16)
    launches = _launches(monkeypatch)

    def step():
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton")
        return (y, *torch.autograd.grad(y, (x, a, bb), dy))

    eager = step()
    assert launches == [[], [], []]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), dispatch.use_eager_cublas(False):
        step()  # (warm-up before the capture: the Triton kernels compiled and loaded)
    torch.cuda.current_stream().wait_stream(stream)
    for grids in launches:
        grids.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert launches[0]  # (the Triton GEMMs, captured)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=2.0, dropout_p=0.0, seed=0, grads=("x", "lora_A", "lora_B"))
    for got in (eager, captured):
        assert_close(got[0], y64, BF16, "y")
        for name, g in zip(("x", "lora_A", "lora_B"), got[1:]):
            assert_close(g, g64[name], BF16, f"d{name}")
