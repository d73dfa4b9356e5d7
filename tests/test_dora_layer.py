"""``LoRALinear(use_dora=True)``: DoRA as a layer. Its init (PEFT's: the
magnitude the rows' norms, so a fresh layer is the base), the forward and
every gradient against the float64 reference (dropout, fan_in_fan_out, fp32
adapters on a 16-bit base), merge/unmerge against PEFT's merge, the
state dict, a batch that mixes the adapter with the base, and bad input."""

import math

import pytest
import torch
from torch import nn

from fused_lora import LoRALinear, layer as layer_module, reference
from lora_testing import DEVICE, assert_close, make_x

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _dora_layer(k, n, r, *, dtype=F32, adapter_dtype=None, dropout=0.0, fan_in_fan_out=False, bias=True,
                backend="auto"):
    """A DoRA layer off its initial point (B random, m away from the norms): every term exercised."""
    torch.manual_seed(k * 1000 + n * 10 + r)
    base = nn.Linear(k, n, bias=bias, device=DEVICE, dtype=dtype)
    if fan_in_fan_out:
        a = nn.Parameter(torch.empty(r, k, device=DEVICE, dtype=adapter_dtype or dtype))
        b = nn.Parameter(torch.empty(n, r, device=DEVICE, dtype=adapter_dtype or dtype))
        m = nn.Parameter(torch.empty(n, device=DEVICE, dtype=adapter_dtype or dtype))
        weight = nn.Parameter(base.weight.detach().t().contiguous(), requires_grad=False)
        layer = LoRALinear.from_parameters(weight, base.bias, a, b, alpha=2 * r, dropout=dropout,
                                           fan_in_fan_out=True, backend=backend, lora_magnitude_vector=m)
        layer.reset_lora_parameters()
    else:
        layer = LoRALinear.from_linear(base, r=r, alpha=2 * r, dropout=dropout, backend=backend,
                                       adapter_dtype=adapter_dtype, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1 / math.sqrt(r))
        layer.lora_magnitude_vector.mul_(torch.rand(n, device=DEVICE) + 0.5)
    return layer


def _reference(layer, x, dy, p=0.0, draw_seed=None):
    """The float64 reference's output and gradients (x, A, B, m) for ``layer``
    (the mask drawn after ``torch.manual_seed(draw_seed)``, as the layer's)."""
    x64 = x.detach().double().requires_grad_()
    params = [t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    bias = None if layer.bias is None else layer.bias.detach().double()
    if draw_seed is not None:
        torch.manual_seed(draw_seed)
    y = reference.dora_linear(x64, layer.base_weight().detach().double(), *params[:2], params[2], bias,
                              scaling=layer.scaling, dropout_p=p)
    return y.detach(), torch.autograd.grad(y, [x64, *params], dy.double())


def test_a_fresh_dora_layer_is_the_base_and_its_magnitude_the_norms_of_the_rows():
    base = nn.Linear(45, 29, device=DEVICE)
    layer = LoRALinear.from_linear(base, r=4, alpha=8, use_dora=True)
    assert layer.use_dora and layer.lora_magnitude_vector.requires_grad
    assert layer.lora_magnitude_vector.shape == (29,)
    assert_close(layer.lora_magnitude_vector, base.weight.detach().double().norm(dim=1), F32, "m")
    x = torch.randn(3, 5, 45, device=DEVICE)
    assert_close(layer(x), nn.functional.linear(x.double(), base.weight.double(), base.bias.double()), F32, "y")
    assert not LoRALinear(8, 4).use_dora and LoRALinear(8, 4).lora_magnitude_vector is None
    fresh = LoRALinear(12, 9, r=2, use_dora=True, device=DEVICE)  # (the constructor's init: the same rule)
    assert_close(fresh.lora_magnitude_vector, fresh.weight.detach().double().norm(dim=1), F32, "m")


#        lead     K   N   r    dtype adapter  p     fan_in_fan_out  bias
CASES = [
    ((1,),     17, 33, 1,   F32,  None,    0.0,  False,          True),
    ((17,),    64, 48, 3,   F32,  None,    0.25, True,           False),
    ((7, 3),   33, 50, 20,  F32,  None,    0.1,  False,          True),
    ((5, 13),  40, 29, 16,  F16,  F32,     0.0,  False,          True),
    ((3, 11),  50, 70, 128, F16,  None,    0.2,  True,           True),
]


@pytest.mark.parametrize("lead,k,n,r,dtype,adapter_dtype,p,fan_in_fan_out,bias", CASES)
def test_the_layer_matches_the_float64_reference(lead, k, n, r, dtype, adapter_dtype, p, fan_in_fan_out, bias):
    layer = _dora_layer(k, n, r, dtype=dtype, adapter_dtype=adapter_dtype, dropout=p, fan_in_fan_out=fan_in_fan_out,
                        bias=bias).train()
    x = make_x((*lead, k), dtype, "permuted" if len(lead) == 2 else "strided").requires_grad_()
    torch.manual_seed(5)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), dy)
    y64, g64 = _reference(layer, x, dy, p, draw_seed=5)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    for name, g, g_ref, param in zip(("x", "A", "B", "m"), grads, g64,
                                     (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)):
        assert g.dtype == param.dtype  # (an fp32 adapter's gradients in fp32)
        assert_close(g, g_ref, dtype, f"d{name}")
    layer.eval()  # (eval: no dropout, the same mask or none)
    y_eval = layer(x)
    assert_close(y_eval, _reference(layer, x, dy)[0], dtype, "y in eval mode")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_merge_folds_the_rescaled_adapted_weight_in_and_unmerge_restores_it_bit_for_bit(fan_in_fan_out, dtype):
    layer = _dora_layer(24, 17, 4, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    original = layer.weight.detach().clone()
    w64 = layer.base_weight().detach().double()
    adapted = w64 + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    merged64 = adapted * (layer.lora_magnitude_vector.detach().double() / adapted.norm(dim=1))[:, None]
    assert_close(layer.delta_weight(), merged64 - w64, dtype, "delta_weight")
    x = make_x((6, 24), dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer.base_weight(), merged64, dtype, "merged weight")
    assert_close(layer(x), y.double(), dtype, "merged output")
    assert torch.equal(layer.state_dict()["weight"], original)  # (the state dict: always unmerged)
    layer.unmerge()
    assert torch.equal(layer.weight, original)


def test_merge_is_peft_merge():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(30, 20)),
                                peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"], use_dora=True)).to(DEVICE)
    pl = model.base_model.model[0]
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
        pl.lora_magnitude_vector["default"].weight.uniform_(0.5, 1.5)
    layer = LoRALinear.from_parameters(
        nn.Parameter(pl.base_layer.weight.detach().clone(), requires_grad=False), pl.base_layer.bias,
        pl.lora_A["default"].weight, pl.lora_B["default"].weight, alpha=6,
        lora_magnitude_vector=pl.lora_magnitude_vector["default"].weight)
    x = torch.randn(7, 30, device=DEVICE)
    torch.testing.assert_close(layer(x), model(x), rtol=1e-5, atol=1e-5)
    layer.merge()
    model.merge_adapter()
    torch.testing.assert_close(layer.weight, pl.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_the_state_dict_holds_the_magnitude_and_loads_into_a_merged_layer():
    layer = _dora_layer(16, 12, 3)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"}
    other = _dora_layer(16, 12, 3)
    with torch.no_grad():
        other.lora_magnitude_vector.uniform_(2, 3)
    other.merge()
    other.load_state_dict(state)
    assert other.merged and torch.equal(other.lora_magnitude_vector, layer.lora_magnitude_vector)
    x = torch.randn(5, 16, device=DEVICE)
    torch.testing.assert_close(other(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="lora_magnitude_vector"):  # (a LoRA state dict lacks it)
        layer.load_state_dict({k: v for k, v in state.items() if k != "lora_magnitude_vector"})


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("unreadable", [False, True])
def test_adapter_ids_run_dora_on_their_rows_and_the_base_on_the_others(monkeypatch, merged, unreadable):
    """DoRA's term has no row scale: the layer runs its row groups apart (by
    indexing), or, where ids cannot be read (torch.compile, a CUDA graph's
    capture), both ways on the whole batch, each row keeping its own, an
    unknown id's row NaN. The magnitude and the adapter get the gradients
    of their rows alone."""
    layer = _dora_layer(24, 17, 4).train()
    x = make_x((5, 3, 24), F32).requires_grad_()
    ids = torch.tensor([0, -1, -1, 0, 0], device=DEVICE)
    on = ids == 0
    dy = torch.randn(5, 3, 17, device=DEVICE)
    y_on, g_on = _reference(layer, x[on], dy[on])
    w = layer.weight.detach().double()
    if merged:
        layer.merge()
    if unreadable:
        monkeypatch.setattr(layer_module, "_unreadable", lambda t: True)
    y = layer(x, adapter_ids=ids)
    expected = nn.functional.linear(x.detach().double(), w, layer.bias.detach().double())
    expected[on] = y_on
    assert_close(y, expected, F32, "y")
    if not merged:  # (a merged layer's output has no gradient for the adapter, as PEFT's)
        dx, da, db, dm = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), dy)
        dx64 = dy.double() @ w
        dx64[on] = g_on[0]
        for name, g, g_ref in zip(("x", "A", "B", "m"), (dx, da, db, dm), (dx64, *g_on[1:])):
            assert_close(g, g_ref, F32, f"d{name}")
    if unreadable:
        bad = layer(x, adapter_ids=torch.tensor([0, 3, -1, -2, 0], device=DEVICE)).detach()
        assert bad[[1, 3]].isnan().all() and not bad[[0, 2, 4]].isnan().any()
        assert_close(bad[[0, 2, 4]], expected[[0, 2, 4]], F32, "y beside unknown ids")
    else:
        with pytest.raises(ValueError, match="adapter_ids must be 0"):
            layer(x, adapter_ids=torch.tensor([0, 3, -1, -2, 0], device=DEVICE))
    layer.adapter_enabled = False
    assert_close(layer(x, adapter_ids=ids), nn.functional.linear(x.double(), w, layer.bias.double()), F32, "off")


def test_the_torch_backend_is_the_reference():
    layer = _dora_layer(20, 14, 3, backend="torch").eval()
    x = torch.randn(4, 20, device=DEVICE)
    expected = reference.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                     layer.bias, scaling=layer.scaling)
    assert torch.equal(layer(x), expected)


def test_extra_repr_and_bad_magnitudes():
    layer = _dora_layer(8, 6, 2)
    assert "use_dora=True" in repr(layer) and "use_dora" not in repr(LoRALinear(8, 6))
    w = nn.Parameter(torch.randn(6, 8), requires_grad=False)
    a, b = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector must have shape \(6,\).*got \(8,\)"):
        LoRALinear.from_parameters(w, None, a, b, alpha=2, lora_magnitude_vector=nn.Parameter(torch.ones(8)))
    with pytest.raises(TypeError, match="lora_magnitude_vector must be an nn.Parameter"):
        LoRALinear.from_parameters(w, None, a, b, alpha=2, lora_magnitude_vector=torch.ones(6))
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear(8, 6, use_dora="yes")
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear.from_linear(nn.Linear(8, 6), use_dora=None)
    with pytest.raises(TypeError, match="lora_magnitude_vector must be floating point, got torch.int64"):
        LoRALinear.from_parameters(w, None, a, b, alpha=2, lora_magnitude_vector=nn.Parameter(
            torch.ones(6, dtype=torch.int64), requires_grad=False))


@pytest.mark.parametrize("merged", [False, True])
def test_a_mixed_batch_compiles_in_one_graph(merged):
    """``adapter_ids`` on a DoRA layer under torch.compile: one graph (both
    row groups on the whole batch, nothing indexed by a host-read mask),
    eager's output and gradients; an id eager mode refuses gives NaN there."""
    import torch._dynamo.testing

    layer = _dora_layer(24, 17, 4).train()
    if merged:
        layer.merge()
    x = torch.randn(5, 3, 24, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, -1, 0, 0, -1], device=DEVICE)
    params = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)[:1 if merged else 4]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, ids: layer(x, adapter_ids=ids), backend=counter, fullgraph=True)
    dy = torch.randn(5, 3, 17, device=DEVICE)
    y = compiled(x, ids)
    grads = torch.autograd.grad(y, params, dy)
    eager = layer(x, adapter_ids=ids)
    assert counter.frame_count == 1
    assert_close(y, eager.double(), F32, "compiled vs eager")
    for name, g, e in zip("xABm", grads, torch.autograd.grad(eager, params, dy)):
        assert_close(g, e.double(), F32, f"compiled vs eager: d{name}")
    with torch.no_grad():
        y_bad = compiled(x, torch.tensor([0, 3, -1, 0, -1], device=DEVICE))
    assert y_bad[1].isnan().all() and not y_bad[[0, 2, 3, 4]].isnan().any()
