"""Bad input raises a typed error naming the argument and the shapes, before
any kernel runs; NaN/Inf propagate as in the reference; backend selection."""

import math
import re
from pathlib import Path

import pytest
import torch

import fused_lora
from fused_lora import _triton
from lora_testing import DEVICE, assert_close, make_params, reference64


@pytest.fixture
def args():
    x = torch.randn(6, 16, device=DEVICE)
    w, b, a, bb = make_params(16, 12, 4, torch.float32, True)
    return dict(x=x, weight=w, lora_A=a, lora_B=bb, bias=b)


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a kernel was launched before the arguments were rejected")
    monkeypatch.setattr(_triton.get(), "lora_gemm", boom)
    monkeypatch.setattr(_triton.get(), "skinny_pass", boom)


def _with(args, **changes):
    out = dict(args)
    out.update(changes)
    return out


BAD = [
    # (change, error type, words the message must contain)
    (lambda a: dict(x=torch.randn(6, 15, device=DEVICE)), ValueError, ["x", "(6, 15)", "in_features=16"]),
    (lambda a: dict(x=torch.tensor(1.0, device=DEVICE)), ValueError, ["x", "0-d"]),
    (lambda a: dict(weight=torch.randn(12, device=DEVICE)), ValueError, ["weight", "2-D", "(12,)"]),
    (lambda a: dict(weight=torch.tensor(1.0, device=DEVICE)), ValueError, ["weight", "2-D", "()"]),
    (lambda a: dict(lora_A=torch.randn(0, 16, device=DEVICE), lora_B=torch.randn(12, 0, device=DEVICE)),
     ValueError, ["rank", "(0, 16)"]),
    (lambda a: dict(lora_A=torch.randn(4, 15, device=DEVICE)), ValueError, ["lora_A", "(4, 15)", "in_features=16"]),
    (lambda a: dict(lora_A=torch.randn(4, 16, 1, device=DEVICE)), ValueError, ["lora_A", "2-D"]),
    (lambda a: dict(lora_B=torch.randn(12, 5, device=DEVICE)), ValueError, ["lora_B", "(12, 5)", "r=4"]),
    (lambda a: dict(lora_B=torch.randn(11, 4, device=DEVICE)), ValueError, ["lora_B", "out_features=12"]),
    (lambda a: dict(bias=torch.randn(11, device=DEVICE)), ValueError, ["bias", "(11,)", "out_features=12"]),
    (lambda a: dict(x=a["x"].half()), TypeError, ["weight", "float32", "float16"]),
    (lambda a: dict(lora_B=a["lora_B"].double()), TypeError, ["lora_B", "float64"]),
    (lambda a: dict(x=torch.ones(6, 16, dtype=torch.int64, device=DEVICE)), TypeError, ["x", "int64"]),
    (lambda a: dict(lora_A=torch.ones(4, 16, dtype=torch.int32, device=DEVICE)), TypeError, ["lora_A", "int32"]),
    (lambda a: dict(weight=[[1.0]]), TypeError, ["weight", "Tensor", "list"]),
    (lambda a: dict(x=a["x"].to_sparse()), TypeError, ["x", "dense", "sparse_coo"]),
    (lambda a: dict(weight=a["weight"].to_sparse_csr()), TypeError, ["weight", "dense", "sparse_csr"]),
    (lambda a: dict(x=torch.nested.as_nested_tensor([a["x"][:2], a["x"][2:]])), TypeError, ["x", "nested"]),
    (lambda a: dict(scaling=float("nan")), ValueError, ["scaling", "finite"]),
    (lambda a: dict(scaling=float("inf")), ValueError, ["scaling", "finite"]),
    (lambda a: dict(scaling="2"), TypeError, ["scaling"]),
    (lambda a: dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
    (lambda a: dict(dropout_p=-0.1), ValueError, ["dropout_p"]),
    (lambda a: dict(seed=-3, dropout_p=0.1), ValueError, ["seed"]),
    (lambda a: dict(seed=2.0, dropout_p=0.1), TypeError, ["seed"]),
    (lambda a: dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
    (lambda a: dict(row_scale=torch.ones(5, device=DEVICE)), ValueError, ["row_scale", "(6,)", "got (5,)"]),
    (lambda a: dict(row_scale=torch.ones(6, 1, device=DEVICE)), ValueError, ["row_scale", "(6, 1)", "(6, 16)"]),
    (lambda a: dict(row_scale=torch.ones(6, dtype=torch.int64, device=DEVICE)), TypeError, ["row_scale", "int64"]),
    (lambda a: dict(row_scale=[1.0] * 6), TypeError, ["row_scale", "Tensor", "list"]),
    (lambda a: dict(row_scale=torch.ones(6, device=DEVICE, requires_grad=True)), ValueError,
     ["row_scale", "requires grad", "detach()"]),
]


@pytest.mark.parametrize("change, err, words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_rejected_before_any_launch(args, no_launch, change, err, words):
    kwargs = _with(args, **change(args))
    with pytest.raises(err) as info:
        fused_lora.lora_linear(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    if "backend" not in kwargs:
        with pytest.raises(err):  # the reference validates the same way
            fused_lora.reference.lora_linear(**kwargs)


EXPLAIN = dict(x_shape=(16, 64), weight_shape=(48, 64), r=8, dtype=torch.bfloat16, dropout_p=0.1)


@pytest.mark.parametrize("change, err, words", [
    (dict(x_shape=torch.empty(16, 64)), TypeError, ["x_shape", "Tensor", "x.shape"]),
    (dict(weight_shape=48), TypeError, ["weight_shape", "int"]),
    (dict(x_shape=(16, 64.0)), TypeError, ["x_shape", "ints", "64.0"]),
    (dict(x_shape=(-1, 64)), ValueError, ["x_shape", "negative", "(-1, 64)"]),
    (dict(x_shape=(16, 63)), ValueError, ["x_shape", "(16, 63)", "(48, 64)"]),
    (dict(r=0), ValueError, ["r", ">= 1"]),
    (dict(r=2.5), TypeError, ["r", "int", "float"]),
    (dict(dtype="bf16"), TypeError, ["dtype", "'bf16'"]),
    (dict(dtype=torch.int8), TypeError, ["dtype", "torch.int8"]),
    (dict(dtype=torch.float64), TypeError, ["dtype", "float64", "torch backend"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
    (dict(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
    (dict(target=90), TypeError, ["target", "int"]),
    (dict(target="hopper"), ValueError, ["target", "'hopper'"]),
    (dict(num_sms=0), ValueError, ["num_sms", ">= 1"]),
    (dict(num_sms=1.5), TypeError, ["num_sms", "float"]),
], ids=lambda v: None)
def test_explain_rejects_bad_input_by_name(change, err, words):
    """explain takes shapes, not tensors, and the kernels' dtypes: anything
    else is a typed error naming the argument, not a crash inside the plan."""
    with pytest.raises(err) as info:
        fused_lora.explain(**{**EXPLAIN, **change})
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    # the same call with the good value explains (torch.Size and lists are shapes too)
    good = fused_lora.explain(**{**EXPLAIN, "x_shape": torch.Size([2, 8, 64]), "weight_shape": [48, 64]})
    assert (good.m, good.n, good.k, good.r) == (16, 48, 64, 8)


@pytest.mark.parametrize("switch", ["set_tma", "set_persistent", "use_tma", "use_persistent", "set_autotune"])
def test_dispatch_switches_take_bools_only(switch):
    """A switch given "no" or None is an error, not a truthy True."""
    d = fused_lora.dispatch
    before = (dict(d._switches), d._autotune)
    # ("auto" is TMA's default, and no value of the others)
    for bad in ("no", None, 2, "Auto") + (() if "tma" in switch else ("auto",)):
        with pytest.raises(TypeError, match="enabled must be a bool" + (" or 'auto'" if "tma" in switch else ", got")):
            getattr(d, switch)(bad)
    assert (dict(d._switches), d._autotune) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch(args, no_launch):
    with pytest.raises(ValueError, match="lora_A is on cpu"):
        fused_lora.lora_linear(**_with(args, lora_A=args["lora_A"].cpu()))


def test_triton_backend_where_it_cannot_run(args, monkeypatch):
    with pytest.raises(ValueError, match='backend="triton" cannot run here.*float64'):
        fused_lora.lora_linear(**{k: v.double() for k, v in args.items()}, backend="triton")
    # float64 under "auto" runs on the torch backend
    y = fused_lora.lora_linear(**{k: v.double() for k, v in args.items()})
    assert y.dtype == torch.float64
    monkeypatch.setattr(_triton, "kernels", None)
    monkeypatch.setattr(_triton, "UNAVAILABLE_REASON", "the Triton kernels cannot be imported (test)")
    with pytest.raises(ValueError, match="cannot be imported"):
        fused_lora.lora_linear(**args, backend="triton")
    y_auto = fused_lora.lora_linear(**args)  # falls back to the reference
    torch.testing.assert_close(y_auto, fused_lora.reference.lora_linear(**args))


@pytest.mark.parametrize("version, runs", [("3.2.0", False), ("3.3.1", False), ("3.4.0", True), ("3.6.0", True),
                                           ("3.10.0+git5a1b2c", True), ("4.0.0", True)])
def test_a_triton_older_than_the_kernels_need_is_refused(args, monkeypatch, version, runs):
    """Triton 3.2 cannot compile the kernels (no ``tl.range(flatten=)``) and
    3.3 draws another dropout stream from 64-bit counters (its Philox runs in
    64-bit words): under either, the kernels are not loaded, "triton" says why
    and "auto" runs the torch backend, instead of a compile error inside the
    first launch or masks that are not ``dropout_mask``'s."""
    import triton

    monkeypatch.setattr(_triton, "kernels", _triton.kernels)  # (restored after the test, as is the reason)
    monkeypatch.setattr(_triton, "UNAVAILABLE_REASON", _triton.UNAVAILABLE_REASON)
    monkeypatch.setattr(triton, "__version__", version)
    _triton._load()
    if runs:
        assert _triton.kernels is not None and _triton.UNAVAILABLE_REASON == ""
        return
    assert _triton.kernels is None
    assert _triton.UNAVAILABLE_REASON == f"Triton {version} is older than 3.4, the oldest the kernels run with " \
                                         "(torch 2.8 and newer bring one)"
    with pytest.raises(ValueError, match=rf'backend="triton" cannot run here: Triton {re.escape(version)} is older'):
        fused_lora.lora_linear(**args, backend="triton")
    torch.testing.assert_close(fused_lora.lora_linear(**args), fused_lora.reference.lora_linear(**args))


def test_the_triton_floor_is_the_packages():
    """pyproject.toml's ``triton>=`` is the floor the loader enforces, and its
    ``torch>=`` the torch that brings that Triton."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = ".".join(map(str, _triton.MIN_TRITON))
    assert f'"triton>={floor}"' in text
    assert '"torch>=2.8"' in text


def test_cpu_without_interpreter_is_explained(monkeypatch):
    fake = type("K", (), {"INTERPRETER": False})()
    monkeypatch.setattr(_triton, "kernels", fake)
    reason = _triton.why_not(torch.device("cpu"), torch.float32)
    assert "TRITON_INTERPRET=1" in reason
    fake.INTERPRETER = True
    assert _triton.why_not(torch.device("cpu"), torch.float32) == ""
    assert "CPU tensors only" in _triton.why_not(torch.device("cuda"), torch.float32)


def test_gpus_below_sm80_run_the_torch_backend(monkeypatch):
    """Below sm_80 Triton has no tensor-core dots (its 16-bit dots become FMA
    loops that spill 10-20 KB, compile report): the Triton backend says so,
    and "auto" runs the torch backend there."""
    from fused_lora.kernels import configs

    fake = type("K", (), {"INTERPRETER": False, "configs": configs})()
    monkeypatch.setattr(_triton, "kernels", fake)
    monkeypatch.setattr(_triton, "_cuda_targets", {0: _triton.CudaTarget(75, 65_536, 40),
                                                    1: _triton.CudaTarget(86, 101_376, 82)})
    reason = _triton.why_not(torch.device("cuda", 0), torch.float16)
    assert "sm_75" in reason and "sm_80 or newer" in reason
    assert _triton.why_not(torch.device("cuda", 1), torch.float16) == ""


def test_the_device_target_is_read_once_per_device(monkeypatch):
    """The compute capability, the shared memory a program may use and the
    SM count come from the device (once per device); a torch that does not
    report the limit gets the table's for the capability. Off CUDA: an
    H200's."""
    from types import SimpleNamespace

    from fused_lora import dispatch
    from fused_lora.kernels import configs

    read = []

    def properties(index):
        read.append(index)
        return SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=99_000, multi_processor_count=82)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_triton, "_cuda_targets", {})
    assert dispatch.device_target(torch.device("cuda")) == (86, 99_000, 82)  # (the device's own figures)
    assert dispatch.device_target(torch.device("cuda", 0)).arch == 86 and read == [0]
    assert dispatch.device_target(torch.device("cuda", 1)).num_sms == 82 and read == [0, 1]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(major=12, minor=0, multi_processor_count=170))
    assert dispatch.device_target(torch.device("cuda", 2)) == (120, configs.SMEM_LIMIT_BY_ARCH[120], 170)
    hopper = (90, configs.SMEM_LIMIT_SM90, configs.NUM_SMS_SM90)
    assert dispatch.device_target(torch.device("cpu")) == hopper


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("where", ["x", "weight", "bias", "lora_A", "lora_B"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_nan_and_inf_propagate_like_the_reference(args, where, value, p):
    poisoned = dict(args)
    t = poisoned[where].clone()
    t.view(-1)[3] = value
    poisoned[where] = t
    y = fused_lora.lora_linear(**poisoned, scaling=1.5, dropout_p=p, seed=11, backend="triton")
    y64, _ = reference64(poisoned["x"], poisoned["weight"], poisoned["bias"], poisoned["lora_A"],
                         poisoned["lora_B"], torch.zeros(6, 12, device=DEVICE), scaling=1.5, dropout_p=p, seed=11,
                         grads=())
    assert torch.equal(torch.isnan(y), torch.isnan(y64))
    assert torch.equal(torch.isinf(y), torch.isinf(y64))
    finite = torch.isfinite(y64)
    assert_close(y[finite], y64[finite], torch.float32, f"y, {where} poisoned with {value}")


# ----------------------------------------------------------------------------
# The autograd Function, applied directly, checks what it takes too
# ----------------------------------------------------------------------------

def _apply(x, weight, lora_A, lora_B, bias, scaling=1.5, dropout_p=0.0, seed=None, row_scale=None, adapter_ids=None,
           rank_ids=None, rank_scaling=None):
    seed = torch.tensor(12345, dtype=torch.int64) if seed is None else seed
    return fused_lora.LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, row_scale,
                                               adapter_ids, rank_ids, rank_scaling)


def _adapter_tensors(rows=6, r=4):
    return dict(adapter_ids=torch.tensor([0, 1, -1, 1, 0, 0][:rows], dtype=torch.int32, device=DEVICE),
                rank_ids=torch.tensor([0, 0, 1, 1][:r], dtype=torch.int32, device=DEVICE),
                rank_scaling=torch.tensor([0.5, 0.5, 2.0, 2.0][:r], device=DEVICE))


FUNCTION_BAD = [entry for entry in BAD if not any(w in ("seed", "backend") for w in entry[2])] + [
    (lambda a: dict(seed=5), TypeError, ["seed", "0-d int64 CPU tensor", "int"]),
    (lambda a: dict(seed=torch.tensor([5])), TypeError, ["seed", "shape (1,)"]),
    (lambda a: dict(seed=torch.tensor(5.0)), TypeError, ["seed", "torch.float32"]),
    (lambda a: dict(seed=torch.tensor(-3), dropout_p=0.1), ValueError, ["seed", "[0, 2**63)"]),
    (lambda a: dict(adapter_ids=_adapter_tensors()["adapter_ids"]), ValueError,
     ["adapter_ids, rank_ids and rank_scaling come together", "rank_ids, rank_scaling missing"]),
    (lambda a: dict(_adapter_tensors(), row_scale=torch.ones(6, device=DEVICE)), ValueError, ["row_scale", "not both"]),
    (lambda a: dict(_adapter_tensors(), adapter_ids=_adapter_tensors()["adapter_ids"].long()), ValueError,
     ["adapter_ids", "torch.int32", "(6,)", "torch.int64"]),
    (lambda a: dict(_adapter_tensors(), adapter_ids=_adapter_tensors(rows=5)["adapter_ids"]), ValueError,
     ["adapter_ids", "(6,)", "(5,)"]),
    (lambda a: dict(_adapter_tensors(), rank_ids=_adapter_tensors(r=3)["rank_ids"]), ValueError,
     ["rank_ids", "(4,)", "(3,)", "lora_A (4, 16)"]),
    (lambda a: dict(_adapter_tensors(), rank_scaling=torch.ones(4, 2, device=DEVICE)[:, 0]), ValueError,
     ["rank_scaling", "contiguous"]),
    (lambda a: dict(_adapter_tensors(), rank_scaling=torch.ones(4, device=DEVICE, requires_grad=True)), ValueError,
     ["rank_scaling", "detach()"]),
    (lambda a: dict(_adapter_tensors(), rank_ids=[0, 0, 1, 1]), TypeError, ["rank_ids", "Tensor", "list"]),
]


@pytest.mark.parametrize("change, err, words", FUNCTION_BAD, ids=[f"bad{i}" for i in range(len(FUNCTION_BAD))])
def test_the_autograd_function_rejects_bad_input_before_any_launch(args, no_launch, change, err, words):
    with pytest.raises(err) as info:
        _apply(**_with(args, **change(args)))
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("adapters", [False, True])
def test_the_autograd_function_gives_lora_linear_s_results(args, adapters):
    """Checked, it runs the same kernels as lora_linear: the same outputs and gradients, bit for bit."""
    extra = _adapter_tensors() if adapters else dict(row_scale=torch.rand(6, device=DEVICE))
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
    y = _apply(**leaves, dropout_p=0.3, **extra)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    seed = torch.tensor(12345, dtype=torch.int64)
    again = {k: v.detach().requires_grad_() for k, v in args.items()}
    y_op = fused_lora.ops._LoRALinearFunction.apply(again["x"], again["weight"], again["bias"], again["lora_A"],
                                                     again["lora_B"], 1.5, 0.3, seed, *(
                                                         (None, *extra.values()) if adapters else extra.values()))
    assert torch.equal(y, y_op)
    for g, g_op in zip(grads, torch.autograd.grad(y_op, list(again.values()), dy)):
        assert torch.equal(g, g_op)
    if not adapters:  # (and lora_linear's own call, the seed given as an int)
        assert torch.equal(y, fused_lora.lora_linear(**args, scaling=1.5, dropout_p=0.3, seed=12345,
                                                     backend="triton", **extra))


def test_the_autograd_function_where_the_kernels_cannot_run(args, monkeypatch, no_launch):
    monkeypatch.setattr(_triton, "why_not", lambda device, dtype: "no GPU here (a stand-in reason)")
    with pytest.raises(ValueError, match=r"LoRALinearFunction runs the Triton kernels, which cannot run here: no GPU "
                                         r"here \(a stand-in reason\) \(lora_linear runs the torch backend there\)"):
        _apply(**args)


@pytest.mark.parametrize("state", ["base ids", "adapters off", "merged"])
@pytest.mark.parametrize("multi", [False, True], ids=["LoRALinear", "MultiLoRALinear"])
def test_a_layer_running_its_base_alone_refuses_bad_x_as_the_fused_path_does(multi, state):
    """Where a layer runs its base alone (every row's id -1, its adapters
    off, or merged), a bad x gets the fused path's typed errors, not torch's
    RuntimeError from F.linear: the same x is refused alike in every state."""
    if multi and state == "merged":
        pytest.skip("MultiLoRALinear merges through merge_and_unload only")
    linear = torch.nn.Linear(8, 4, device=DEVICE)
    layer = (fused_lora.MultiLoRALinear.from_linear(linear, [2, 3]) if multi
             else fused_lora.LoRALinear.from_linear(linear, r=2))
    ids = None
    if state == "base ids":
        ids = torch.full((5,), -1, device=DEVICE)
    elif state == "adapters off":
        layer.adapter_enabled = False
    else:
        layer.merge()
    for x, err, words in [(torch.randn(5, 9, device=DEVICE), ValueError,
                           ["x", "in_features=8", "weight (4, 8)", "(5, 9)"]),
                          (torch.randn(5, 8, device=DEVICE, dtype=torch.float16), TypeError, ["float16", "float32"]),
                          (torch.randn(5, 8, device="meta"), ValueError, ["meta", "one device"]),
                          ([[1.0] * 8], TypeError, ["x", "Tensor", "list"])]:
        with pytest.raises(err) as info:
            layer(x, adapter_ids=ids) if ids is not None else layer(x)
        for word in words:
            assert word in str(info.value), (state, str(info.value))
    # (and a good one runs: the base's output, B starting at zero as PEFT's)
    x = torch.randn(5, 8, device=DEVICE)
    y = layer(x, adapter_ids=ids) if ids is not None else layer(x)
    assert_close(y, linear(x).double(), torch.float32)
