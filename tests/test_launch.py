"""The launch cache (fused_lora.kernels.launch): a launch of a specialisation
compiled before calls that compiled kernel directly, with the arguments
Triton's JITFunction.run would pass it; anything Triton specialises on makes
a new key. On a CPU the kernel is a real JITFunction whose ``run`` (Triton's
binder, compiler and launcher) is replaced by a recorder; on a GPU the fused
op runs with the cache on and off."""

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

import fused_lora
from fused_lora import dispatch
from fused_lora.kernels import launch as launch_mod
from fused_lora.kernels.launch import int_key, launch, signature
from lora_testing import DEVICE, make_params


def _kernel(x_ptr, y_ptr, n, scale, seed, flag, opt_ptr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
            EXTRA: tl.constexpr = 7):
    pass


class _Compiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args)``."""

    def __init__(self, calls, tag):
        self.calls, self.tag = calls, tag

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", self.tag, grid, args))


@pytest.fixture
def recorded(monkeypatch):
    """(kernel, calls): a JITFunction whose JITFunction.run records its call
    and returns a new stand-in compiled kernel; the cache on, empty, on a
    stand-in current CUDA device 0."""
    kernel = JITFunction(_kernel)
    calls = []

    def run(*args, grid, warmup, **kwargs):
        calls.append(("run", grid, args, kwargs))
        return _Compiled(calls, len(calls))

    kernel.run = run
    monkeypatch.setattr(launch_mod, "_enabled", True)
    monkeypatch.setattr(launch_mod, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return kernel, calls


def _args(n=32, dtype=torch.float32, offset=0, scale=0.5, seed=16, flag=True, opt=None):
    x = torch.randn(64).to(dtype) if offset == 0 else torch.randn(64 + offset)[offset:]  # (4 bytes off: unaligned)
    return (x, torch.randn(64), n, scale, seed, flag, opt)


def test_a_seen_specialisation_goes_to_its_compiled_kernel(recorded):
    kernel, calls = recorded
    consts = dict(BLOCK=16, EVEN=True, num_warps=4)
    launch(kernel, (3,), _args(), consts)
    assert [c[0] for c in calls] == ["run"] and calls[0][1] == (3,)
    # new tensors of the same dtypes and alignment, other ints of the same kind, another float: a hit, with the
    # arguments JITFunction.run passes (every parameter in order, the constexprs and defaults with them)
    args = _args(n=48, scale=2.5, seed=32)
    launch(kernel, (5, 2), args, consts)
    assert calls[1] == ("compiled", 1, (5, 2, 1), (*args, 16, True, 7))
    launch(kernel, (7,), args, dict(consts, EXTRA=9))  # (a constexpr: a new key)
    assert calls[2][0] == "run"
    again = _args(n=64)
    launch(kernel, (7,), again, dict(consts, EXTRA=9))
    assert calls[3] == ("compiled", 3, (7, 1, 1), (*again, 16, True, 9))


@pytest.mark.parametrize("change", [
    dict(dtype=torch.float16), dict(offset=1), dict(n=1), dict(n=17), dict(n=2**31), dict(seed=2**63),
    dict(flag=False), dict(opt=torch.zeros(4)), dict(seed=torch.zeros((), dtype=torch.int32)),
])
def test_what_triton_specialises_on_makes_a_new_key(recorded, change):
    """A tensor's dtype and 16-byte alignment, an int's kind (1, i32, i64,
    u64; a multiple of 16 or not), a bool's value, None or a tensor: each
    compiles another kernel in Triton, so each misses here."""
    kernel, calls = recorded
    consts = dict(BLOCK=16, EVEN=True)
    launch(kernel, (1,), _args(), consts)
    launch(kernel, (1,), _args(**change), consts)
    assert [c[0] for c in calls] == ["run", "run"], change


def test_launch_options_the_device_and_the_switch(recorded, monkeypatch):
    kernel, calls = recorded
    consts = dict(BLOCK=16, EVEN=True, num_warps=4)
    launch(kernel, (1,), _args(), consts)
    launch(kernel, (1,), _args(), dict(consts, num_warps=8))  # (an option: a new key)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # (another GPU: its own kernel)
    launch(kernel, (1,), _args(), consts)
    assert [c[0] for c in calls] == ["run"] * 3
    launch(kernel, lambda meta: (1,), _args(), consts)  # (a callable grid: Triton's path)
    monkeypatch.setattr(launch_mod, "_enabled", False)  # (off: Triton's path every time)
    launch(kernel, (1,), _args(), consts)
    assert [c[0] for c in calls] == ["run"] * 5
    with pytest.raises(TypeError, match=r"_kernel's runtime arguments \['opt_ptr'\] must be passed in args"):
        monkeypatch.setattr(launch_mod, "_enabled", True)
        launch(kernel, (1,), _args()[:-1], dict(consts, opt_ptr=None))


def test_the_kept_kernels_are_bounded(recorded, monkeypatch):
    kernel, calls = recorded
    monkeypatch.setattr(launch_mod, "MAX_KEYS", 2)
    for block in (16, 32, 64):
        launch(kernel, (1,), _args(), dict(BLOCK=block, EVEN=True))
    assert len(launch_mod._compiled[id(kernel)][1]) <= 2
    launch(kernel, (1,), _args(), dict(BLOCK=64, EVEN=True))
    assert calls[-1][0] == "compiled"


def test_a_hit_calls_tritons_launcher_as_jit_function_run_does():
    """With Triton's own JITFunction.run and CompiledKernel (compiled for
    sm_90 here, on the CPU; the Triton installed, 3.6 through PYTHONPATH):
    the launch that compiles goes through JITFunction.run, the next through
    the compiled kernel kept, and Triton's launcher receives the same
    arguments both times (grid, stream, function, metadata, hooks, then
    every parameter in order, the constexprs and the default among them);
    a new int kind compiles anew. Only the driver (device, stream, target)
    and the launcher, which need a GPU, are stand-ins (tests/launch_check.py,
    in a process of its own, without the interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(here / "launch_check.py")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_what_is_not_a_jit_function_launches_as_itself(monkeypatch):
    """The interpreter's kernels (and a test's stand-ins) are launched as
    ``kernel[grid](...)`` whatever the switch."""
    monkeypatch.setattr(launch_mod, "_enabled", True)
    seen = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    launch(Stub(), (2,), (1, 2), {"BLOCK": 4})
    assert seen == [((2,), (1, 2), {"BLOCK": 4})]


def test_the_key_is_tritons_own_specialisation():
    """int_key and a tensor's key agree with Triton's own specialisation
    (the Triton installed: CI's newest; the H200's 3.6 through PYTHONPATH)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def triton_key(v):
        return native_specialize_impl(BaseBackend, v, False, True, True)

    values = [0, 1, 2, 15, 16, 17, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -2**31, -2**31 - 1,
              2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16]
    by_triton, by_us = {}, {}
    for v in values:
        kind, spec = triton_key(v)
        by_triton.setdefault((kind, spec), set()).add(v)
        by_us.setdefault(int_key(v), set()).add(v)
        assert (int_key(v) == "1") == (kind == "constexpr"), v
        if kind != "constexpr":
            assert int_key(v) == (kind, spec == "D"), v
    assert sorted(map(sorted, by_triton.values())) == sorted(map(sorted, by_us.values()))
    base = torch.randn(80)
    for t in (base, base[4:], base[3:], base.to(torch.float16)[8:], base.to(torch.float16)[1:]):
        kind, spec = triton_key(t)
        (dtype, aligned), = signature([t])
        assert (kind, spec == "D") == (f"*{ {torch.float32: 'fp32', torch.float16: 'fp16'}[dtype]}", aligned)
    assert signature([1.5])[0] == signature([1e300])[0] and triton_key(1.5) == triton_key(1e300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA GPU")
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_the_fused_op_with_the_launch_cache_is_the_fused_op(dropout_p, monkeypatch):
    """On a GPU, forward and backward with the cache on (the default) give
    the same bits as with it off, and once warm a step goes through Triton's
    JITFunction.run not once; the setting is restored after the blocks."""
    torch.manual_seed(0)
    w, b, a, bb = make_params(96, 80, 8, torch.bfloat16, True)
    a.requires_grad_()
    bb.requires_grad_()

    def step(x):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=dropout_p, seed=1234, backend="triton")
        return (y, *torch.autograd.grad(y, (x, a, bb), torch.ones_like(y)))

    xs = [torch.randn(m, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for m in (37, 256)]
    assert dispatch.launch_cache_setting()  # (the default)
    with dispatch.use_launch_cache(False):
        want = [step(x) for x in xs]
    runs = []
    real_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    with dispatch.use_launch_cache(True):
        assert dispatch.launch_cache_setting()
        for x, expected in zip(xs, want):
            for _ in range(2):
                for got, e in zip(step(x), expected):
                    assert torch.equal(got, e)
        runs.clear()
        for x in xs:
            step(x)
    assert runs == []
    assert dispatch.launch_cache_setting()


def test_the_switch(monkeypatch):
    """``dispatch.set_launch_cache`` / ``use_launch_cache`` turn the cache on
    and off (restored after the block); a non-bool is a TypeError naming
    the argument."""
    monkeypatch.setattr(launch_mod, "_enabled", False)
    assert not dispatch.launch_cache_setting()
    assert "launch cache" not in str(fused_lora.explain((64, 32), (48, 32), 8))
    with dispatch.use_launch_cache(True):
        assert dispatch.launch_cache_setting() and launch_mod.enabled()
        assert "launches           through the launch cache" in str(fused_lora.explain((64, 32), (48, 32), 8))
        assert "launch cache" not in str(fused_lora.explain((64, 32), (48, 32), 8, target="interpreter"))
        with dispatch.use_launch_cache(False):
            assert not launch_mod.enabled()
        assert launch_mod.enabled()
    assert not dispatch.launch_cache_setting()
    with pytest.raises(TypeError, match="enabled"):
        dispatch.set_launch_cache("yes")
    assert not dispatch.launch_cache_setting()


def test_the_environment_switch():
    """``FUSED_LORA_LAUNCH_CACHE=0`` turns the cache off at import, ``1`` (or
    unset: the default) leaves it on; anything else is a ValueError naming
    the variable."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import fused_lora; print(fused_lora.dispatch.launch_cache_setting())"
    unset = {k: v for k, v in os.environ.items() if k != "FUSED_LORA_LAUNCH_CACHE"}
    for value, out in (("1", "True"), ("0", "False"), (None, "True")):
        env = unset if value is None else dict(unset, FUSED_LORA_LAUNCH_CACHE=value)
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == out, (value, proc.stderr)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FUSED_LORA_LAUNCH_CACHE="yes"))
    assert proc.returncode != 0 and "FUSED_LORA_LAUNCH_CACHE must be '0' or '1', got 'yes'" in proc.stderr
