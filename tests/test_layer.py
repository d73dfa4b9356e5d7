"""LoRALinear: init, from_linear, merge/unmerge, state_dict, dtype moves,
train/eval dropout, and parity of the layer with the reference."""

import math

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import LoRALinear
from lora_testing import DEVICE, DTYPES, assert_close, make_x, reference64


def _randomise_adapter(layer):
    with torch.no_grad():
        layer.lora_B.normal_(0, 1 / math.sqrt(layer.r))


def test_init_follows_peft_and_freezes_base():
    layer = LoRALinear(48, 40, r=8, alpha=16, device=DEVICE)
    assert layer.weight.shape == (40, 48) and layer.bias.shape == (40,)
    assert layer.lora_A.shape == (8, 48) and layer.lora_B.shape == (40, 8)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=√5) bound = sqrt(6 / (6 · fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.4 * bound
    assert layer.scaling == 2.0
    assert LoRALinear(48, 40, r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    assert LoRALinear(8, 4, bias=False).bias is None


def test_fresh_adapter_is_the_base_linear():
    layer = LoRALinear(33, 21, r=4, device=DEVICE)
    x = torch.randn(5, 7, 33, device=DEVICE)
    base = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert_close(layer(x), base, torch.float32, "fresh adapter")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_matches_reference_in_train_mode(dtype, dropout):
    layer = LoRALinear(45, 30, r=6, alpha=12, dropout=dropout, device=DEVICE, dtype=dtype).train()
    _randomise_adapter(layer)
    x = make_x((3, 17, 45), dtype).requires_grad_()
    torch.manual_seed(99)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    torch.manual_seed(99)  # the reference draws the same seed
    y64, g64 = reference64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, dy, scaling=layer.scaling,
                           dropout_p=dropout, seed=None, grads=("x", "lora_A", "lora_B"))
    assert_close(y, y64, dtype, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("lead", [(7,), (3, 5)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_can_be_changed_in_place(lead, backend):
    """As with nn.Linear, a caller may work on the output in place
    (``y.mul_(2).add_(residual)``) in training: the output is no view of the
    kernels' buffer (autograd refuses in-place changes to an autograd
    Function's output that is a view), and the gradients take the change in."""
    layer = LoRALinear(24, 16, r=4, alpha=8, dropout=0.3, device=DEVICE, backend=backend).train()
    _randomise_adapter(layer)
    x = torch.randn(*lead, 24, device=DEVICE, requires_grad=True)
    residual = torch.randn(*lead, 16, device=DEVICE)
    torch.manual_seed(5)
    y = layer(x)
    assert not y._is_view()
    y.mul_(2.0).add_(residual)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    torch.manual_seed(5)
    y64, g64 = reference64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 2.0 * dy,
                           scaling=layer.scaling, dropout_p=0.3, seed=None, grads=("x", "lora_A", "lora_B"))
    assert_close(y, 2.0 * y64 + residual.double(), torch.float32, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], torch.float32, f"d{name}")


def test_dropout_only_in_train_mode():
    layer = LoRALinear(32, 24, r=4, dropout=0.5, device=DEVICE)
    _randomise_adapter(layer)
    x = torch.randn(10, 32, device=DEVICE)
    layer.eval()
    ev1, ev2 = layer(x), layer(x)
    assert torch.equal(ev1, ev2)
    no_dropout = fused_lora.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
                                        scaling=layer.scaling)
    assert torch.equal(ev1, no_dropout)
    layer.train()
    tr1, tr2 = layer(x), layer(x)
    assert not torch.equal(tr1, ev1) and not torch.equal(tr1, tr2)


def test_from_linear_shares_weight_and_bias():
    linear = nn.Linear(40, 24, device=DEVICE)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8, dropout=0.1, use_rslora=True)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not linear.weight.requires_grad
    assert layer.lora_A.device == linear.weight.device and layer.lora_A.dtype == linear.weight.dtype
    assert (layer.r, layer.alpha, layer.dropout, layer.use_rslora) == (4, 8.0, 0.1, True)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(6, 40, device=DEVICE)
    assert_close(layer.eval()(x), linear(x).double(), torch.float32, "from_linear")
    half = LoRALinear.from_linear(nn.Linear(16, 8, bias=False, dtype=torch.float16, device=DEVICE), r=2)
    assert half.lora_A.dtype == torch.float16 and half.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="r must be an int, got float"):
        LoRALinear.from_linear(nn.Linear(3, 3), r=2.5)
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        LoRALinear.from_linear(nn.Linear(3, 3), r=0)
    with pytest.raises(TypeError, match="adapter_dtype must be a floating-point torch.dtype or None, got torch.int8"):
        LoRALinear.from_linear(nn.Linear(3, 3), adapter_dtype=torch.int8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_is_exact(dtype):
    layer = LoRALinear(40, 28, r=8, alpha=16, device=DEVICE, dtype=dtype).eval()
    _randomise_adapter(layer)
    original = layer.weight.detach().clone()
    weight_param = layer.weight
    x = torch.randn(9, 40, device=DEVICE, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.weight is weight_param
    assert not torch.equal(layer.weight, original)
    y_merged = layer(x)
    expected = nn.functional.linear(x.double(), original.double(), layer.bias.double()) \
        + layer.scaling * x.double() @ layer.lora_A.double().t() @ layer.lora_B.double().t()
    assert_close(y_merged, expected, dtype, "merged forward")
    delta64 = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert layer.delta_weight().dtype == dtype
    assert_close(layer.delta_weight(), delta64, dtype, "delta_weight")
    assert_close(y, expected, dtype, "unmerged forward")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, original)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_state_dict_round_trip_and_merged_state_dict_is_unmerged():
    src = LoRALinear(24, 16, r=4, alpha=4, device=DEVICE)
    _randomise_adapter(src)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B"}
    dst = LoRALinear(24, 16, r=4, alpha=4, device=DEVICE)
    dst.load_state_dict(sd)
    x = torch.randn(3, 24, device=DEVICE)
    assert torch.equal(src(x), dst(x))
    src.merge()
    assert torch.equal(src.state_dict()["weight"], sd["weight"])
    dst.merge()
    dst.load_state_dict(sd)  # loading into a merged layer keeps it merged, over the loaded weights
    assert dst.merged
    dst.unmerge()
    assert torch.equal(dst.weight, sd["weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_dtype(dtype):
    layer = LoRALinear(32, 16, r=4, device=DEVICE)
    _randomise_adapter(layer)
    layer.merge()
    layer.to(dtype)
    assert all(p.dtype == dtype for p in layer.parameters())
    layer.unmerge()
    x = torch.randn(4, 32, device=DEVICE, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    with pytest.raises(TypeError, match="dtype"):
        layer(x.float())


def test_extra_repr():
    text = repr(LoRALinear(8, 4, r=2, alpha=4, dropout=0.1, use_rslora=True))
    for part in ("in_features=8", "out_features=4", "r=2", "alpha=4", "dropout=0.1", "use_rslora=True",
                 "merged=False", "bias=True"):
        assert part in text


def test_meta_device_takes_the_reference_then_materialises():
    """A layer built under ``torch.device("meta")`` (empty init, shape
    inference) runs as nn.Linear does there: forward and backward give meta
    tensors of the right shapes, dropout and all, through the reference (no
    kernel runs on meta; asked for by name, the Triton backend says so). Then
    ``to_empty`` and ``reset_parameters`` give a working layer."""
    with torch.device("meta"):
        layer = LoRALinear(24, 20, r=4, alpha=8, dropout=0.25).train()
    x = torch.empty(3, 7, 24, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == (3, 7, 20) and y.dtype == torch.float32
    dx, d_a, d_b = torch.autograd.grad(y.sum(), (x, layer.lora_A, layer.lora_B))
    assert (dx.shape, d_a.shape, d_b.shape) == ((3, 7, 24), (4, 24), (20, 4))
    assert {t.device.type for t in (dx, d_a, d_b)} == {"meta"}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast has no meta: not a meta call's concern)
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="device type 'meta'"):
        fused_lora.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, backend="triton")

    layer.to_empty(device=DEVICE)
    layer.reset_parameters()
    _randomise_adapter(layer)
    layer.eval()
    x = make_x((5, 24), torch.float32)
    y64, _ = reference64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, torch.randn(5, 20, device=DEVICE),
                         scaling=layer.scaling, dropout_p=0.0, seed=None, grads=())
    assert_close(layer(x), y64, torch.float32, "materialised from meta")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(r=0), ValueError, "r must be >= 1"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(dtype=torch.int8), TypeError, "dtype must be a floating-point"),
    (dict(use_rslora="no"), TypeError, "use_rslora must be a bool, got 'no'"),  # (not a truthy True)
    (dict(fan_in_fan_out=None), TypeError, "fan_in_fan_out must be a bool"),
    (dict(bias=torch.zeros(4)), TypeError, "bias must be a bool"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        LoRALinear(8, 4, **kwargs)


def test_flags_take_numpy_bools_and_0_or_1_and_nothing_else_truthy():
    """A flag read from a numpy array (``np.True_``) is a bool; 2 or ``"no"`` is not."""
    import numpy as np

    for flag, want in [(np.True_, True), (np.False_, False), (1, True), (0, False), (np.int64(1), True)]:
        layer = LoRALinear(8, 4, r=4, alpha=8, use_rslora=flag, fan_in_fan_out=flag, bias=flag)
        assert (layer.use_rslora, layer.fan_in_fan_out, layer.bias is not None) == (want, want, want)
        assert type(layer.use_rslora) is bool and layer.scaling == (8 / math.sqrt(4) if want else 8 / 4)
    for bad in [2, np.int64(2), "no", np.array([True, False])]:
        with pytest.raises(TypeError, match="use_rslora must be a bool"):
            LoRALinear(8, 4, use_rslora=bad)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_disabled_adapter_leaves_the_base_alone_merged_or_not(fan_in_fan_out):
    layer = LoRALinear(24, 17, r=4, dropout=0.1, device=DEVICE, fan_in_fan_out=fan_in_fan_out)
    _randomise_adapter(layer)
    x = make_x((3, 5, 24), torch.float32)
    base = torch.nn.functional.linear(x, layer.base_weight(), layer.bias)
    with_adapter = layer(x)
    assert not torch.allclose(with_adapter, base)
    layer.adapter_enabled = False
    assert "adapter_enabled=False" in repr(layer)
    assert torch.equal(layer(x), base)
    layer.merge()
    assert torch.equal(layer(x), base)  # (the weight from before merge())
    layer.adapter_enabled = True
    layer.unmerge()
    layer.eval()  # (the adapter on again: the layer's output, against float64)
    w, b, lora_a, lora_b = (t.detach().double() for t in (layer.base_weight(), layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ w.t() + b + layer.scaling * (x.double() @ lora_a.t() @ lora_b.t())
    assert_close(layer(x), expected, torch.float32, "y")


@pytest.mark.parametrize("lead", [(7,), (4, 5)])
@pytest.mark.parametrize("merged", [False, True])
def test_adapter_ids_run_the_adapter_on_their_rows_and_the_base_on_the_others(monkeypatch, lead, merged):
    """A batch that mixes adapters (PEFT's adapter_names, which from_peft's
    layers take as adapter_ids): rows (samples) with id 0 run the adapter,
    those with -1 the base alone, forward and backward, against float64;
    ids all alike give the plain forward's output bit for bit; merged layers
    too, as one batch over the weight from before merge(), without a gradient
    for the adapter (by row group where the merged weight is trainable)."""
    layer = LoRALinear(24, 17, r=4, alpha=8, device=DEVICE).eval()
    _randomise_adapter(layer)
    w, b, lora_a, lora_b = layer.weight.detach().clone(), layer.bias, layer.lora_A, layer.lora_B
    x = make_x((*lead, 24), torch.float32).requires_grad_()
    ids = torch.tensor([0, -1, -1, 0, -1, 0, 0][:lead[0]], device=DEVICE)
    on = ids == 0
    plain, base = layer(x).detach(), torch.nn.functional.linear(x, w, b).detach()
    if merged:
        layer.merge()
        k_ = fused_lora._triton.get()
        gemms = []
        real = k_.lora_gemm
        monkeypatch.setattr(k_, "lora_gemm", lambda *a, **kw: gemms.append(1) or real(*a, **kw))
    y = layer(x, adapter_ids=ids)
    dy = torch.randn_like(y)
    y_on, g_on = reference64(x[on], w, b, lora_a, lora_b, dy[on], scaling=layer.scaling, dropout_p=0.0, seed=None,
                             grads=("x", "lora_A", "lora_B"))
    expected = (x.double() @ w.double().t() + b.double()).detach()
    expected[on] = y_on
    assert_close(y, expected, torch.float32, "y")
    if merged:
        assert len(gemms) == 1  # (one batch)
        assert torch.autograd.grad(y.sum(), (layer.lora_A, layer.lora_B), allow_unused=True) == (None, None)
        layer.weight.requires_grad_(True)  # (a trainable merged weight: by row group, its gradient that of y)
        y_groups = layer(x, adapter_ids=ids)
        assert len(gemms) == 1
        dw, = torch.autograd.grad(y_groups.sum(), layer.weight)
        assert_close(y_groups, expected, torch.float32, "y by row group")
        assert_close(dw, x.detach().double()[on].reshape(-1, 24).sum(0).expand(17, 24), torch.float32, "dW")
        layer.weight.requires_grad_(False)
    if not merged:  # (a merged layer's output has no gradient for the adapter, as PEFT's)
        dx, da, db = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
        dx64 = (dy.double() @ w.double()).detach()
        dx64[on] = g_on["x"]
        assert_close(dx, dx64, torch.float32, "dx")
        assert_close(da, g_on["lora_A"], torch.float32, "dA")
        assert_close(db, g_on["lora_B"], torch.float32, "dB")
    n = lead[0]
    all_on, all_off = torch.zeros(n, dtype=torch.int64, device=DEVICE), torch.full((n,), -1, device=DEVICE)
    assert torch.equal(layer(x, adapter_ids=all_off), base)
    if not merged:
        assert torch.equal(layer(x, adapter_ids=all_on), plain)
    layer.adapter_enabled = False  # (disabled: the base on every row)
    assert torch.equal(layer(x, adapter_ids=ids), base)


@pytest.mark.parametrize("training", [False, True])
def test_a_mixed_batch_runs_as_one_batch(monkeypatch, training):
    """Rows of the adapter and of the base run in the same launches (one
    GEMM, the in-loop forward's without dropout, else after the skinny pass;
    backward: the dy pass, the dx GEMM, the dA pass), not once per row group;
    in training, the dropout mask of the adapter's rows is the one the whole
    batch draws (``row_scale``: w = 1 on them)."""
    k_ = fused_lora._triton.get()
    calls = []
    for name in ("lora_gemm", "skinny_pass"):
        real = getattr(k_, name)
        monkeypatch.setattr(k_, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    layer = LoRALinear(24, 17, r=4, alpha=8, dropout=0.3, device=DEVICE).train(training)
    _randomise_adapter(layer)
    # (35 rows: above IN_LOOP_DROPOUT_MAX_M, so that in training the forward runs split)
    x = make_x((5, 7, 24), torch.float32).requires_grad_()
    ids = torch.tensor([0, -1, 0, 0, -1], device=DEVICE)
    torch.manual_seed(5)
    y = layer(x, adapter_ids=ids)
    strategy = fused_lora.dispatch.device_plan(x.device, 35, 17, 24, 4, x.dtype, layer.dropout * training).strategy
    assert strategy == ("split" if training else "in_loop") or x.is_cuda  # (fp32 on CUDA: hybrid)
    assert calls == (["lora_gemm"] if strategy == "in_loop" else ["skinny_pass", "lora_gemm"])
    calls[:] = ["forward"]
    y.backward(torch.randn_like(y))
    assert calls[1:] == ["skinny_pass", "lora_gemm", "skinny_pass"]
    torch.manual_seed(5)  # (the same seed: the same mask)
    y_all = layer(x.detach(), adapter_ids=torch.zeros(5, dtype=torch.int64, device=DEVICE))
    on = ids == 0
    assert_close(y[on], y_all[on].double(), torch.float32, "the adapter's rows")
    base = torch.nn.functional.linear(x.detach().double(), layer.weight.double(), layer.bias.double())
    assert_close(y[~on], base[~on], torch.float32, "the base's rows")


def test_a_tensor_of_adapter_ids_is_checked_once_for_all_the_layers(monkeypatch):
    """Layers given the same ``adapter_ids`` read them back (a host sync) once,
    the first layer; again once they change in place (bad values then still
    refused). Inference tensors keep no version: read by every layer."""
    import fused_lora.layer as layer_module

    syncs = []
    real = layer_module.note_checked_adapter_ids
    monkeypatch.setattr(layer_module, "note_checked_adapter_ids", lambda *a, **k: syncs.append(a) or real(*a, **k))
    layers = [LoRALinear(8, 8, r=2, device=DEVICE).eval() for _ in range(3)]
    for layer in layers:
        _randomise_adapter(layer)

    def run(x, ids):
        for layer in layers:
            x = layer(x, adapter_ids=ids)
        return x

    x = torch.randn(4, 8, device=DEVICE)
    ids = torch.tensor([0, -1, 0, -1], device=DEVICE)
    y = run(x, ids)
    assert len(syncs) == 1
    assert torch.equal(run(x, ids), y) and len(syncs) == 1
    ids[1] = 0
    assert not torch.equal(run(x, ids)[1], y[1]) and len(syncs) == 2
    ids[1] = 5
    with pytest.raises(ValueError, match="got ids from -1 to 5"):
        run(x, ids)
    syncs.clear()
    with torch.inference_mode():
        ids = torch.tensor([0, -1, 0, -1], device=DEVICE)
        assert torch.equal(run(x, ids), y) and len(syncs) == 3
        ids[1] = 5
        with pytest.raises(ValueError, match="got ids from -1 to 5"):
            run(x, ids)


def test_bad_adapter_ids_are_refused_by_name():
    layer = LoRALinear(8, 6, r=2, device=DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    ids = torch.tensor([0, -1, 0], device=DEVICE)
    for bad, err, words in [(ids.float(), TypeError, r"adapter_ids must be an integer tensor, got torch.float32"),
                            (ids == 0, TypeError, r"adapter_ids must be an integer tensor, got torch.bool"),
                            ([0, -1, 0], TypeError, r"adapter_ids must be an integer tensor, got list"),
                            (ids[:2], ValueError, r"adapter_ids must have shape \(x.shape\[0\],\).*got adapter_ids "
                                                  r"\(2,\) for x \(3, 8\)"),
                            (ids[None], ValueError, r"got adapter_ids \(1, 3\) for x \(3, 8\)"),
                            (ids + 1, ValueError, r"adapter_ids must be 0 \(the layer's adapter\) or -1 \(the base "
                                                  r"alone\), the layer holding one adapter; got ids from 0 to 1"),
                            (ids - 1, ValueError, r"got ids from -2 to -1")]:
        with pytest.raises(err, match=words):
            layer(x, adapter_ids=bad)
    with pytest.raises(ValueError, match=r"an x of 2 or more dims; got adapter_ids \(8,\) for x \(8,\)"):
        layer(x[0], adapter_ids=torch.zeros(8, dtype=torch.int64, device=DEVICE))
    assert layer(x[:0], adapter_ids=ids[:0]).shape == (0, 6)
