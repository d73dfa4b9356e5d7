"""An int8 base in the layer and in models: ``LoRALinear.from_linear(...,
quantize_base=True)`` and ``inject(..., quantize_base=True)`` against the
same layers on the dequantised weight (float64 reference, and a float
model whose weights are those values), mixed batches, the adapters off,
the state dict, training, and what such layers refuse."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear, reference
from fused_lora.quant import dequantize_base
from lora_testing import DEVICE, assert_close, assert_same_sums, tiny_gpt2, tiny_llama

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _quantized_layer(k, n, r, dtype, bias=True, dropout=0.0, adapter_dtype=None, quantize_base=True):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias, device=DEVICE, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r=r, alpha=2 * r, dropout=dropout, quantize_base=quantize_base,
                                   adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # (a trained adapter: B away from 0)
    return linear, layer


def _reference(layer, x, dropout_p=0.0, seed=None):
    deq = dequantize_base(layer.weight, layer.weight_scale, x.dtype, layer.weight_code)
    return reference.lora_linear_checked(x.double(), deq.double(), layer.lora_A.double(), layer.lora_B.double(),
                                         None if layer.bias is None else layer.bias.double(), layer.scaling,
                                         dropout_p, seed)


@pytest.mark.parametrize("dtype, adapter_dtype", [(F32, None), (F16, None), (BF16, F32)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_quantizes_the_base_and_matches_the_reference(dtype, adapter_dtype, bias):
    linear, layer = _quantized_layer(45, 70, 6, dtype, bias, adapter_dtype=adapter_dtype)
    q, scale = fused_lora.quantize_int8(linear.weight)
    assert layer.quantized and layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    assert layer.bias is linear.bias  # (shared; the weight is not kept)
    assert layer.lora_A.dtype == (adapter_dtype or dtype)
    assert "base=int8" in repr(layer)
    x = torch.randn(3, 17, 45, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, _reference(layer, x), dtype, "y")
    dy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    assert ga.dtype == layer.lora_A.dtype
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
    deq = fused_lora.dequantize_int8(layer.weight, layer.weight_scale, dtype).double()
    y64 = reference.lora_linear(leaves[0], deq, leaves[1].to(dtype).double(), leaves[2].to(dtype).double(),
                                None if layer.bias is None else layer.bias.double(), scaling=layer.scaling)
    for g, g64, name in zip((gx, ga, gb), torch.autograd.grad(y64, leaves, dy.double()), ("dx", "dA", "dB")):
        assert_close(g, g64, dtype, name)


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
def test_dropout_in_training_and_none_in_eval(quantize_base):
    _, layer = _quantized_layer(40, 24, 4, F32, dropout=0.3, quantize_base=quantize_base)
    x = torch.randn(6, 5, 40, device=DEVICE)
    torch.manual_seed(5)
    y_train = layer(x)
    torch.manual_seed(5)
    seed = fused_lora.dropout.draw_seed_tensor(x.device)  # (the seed the layer drew)
    assert_close(y_train, _reference(layer, x, 0.3, seed), F32, "train")
    layer.eval()
    assert_close(layer(x), _reference(layer, x), F32, "eval")


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
def test_mixed_batches_and_the_adapter_off_run_the_dequantised_base(quantize_base):
    _, layer = _quantized_layer(40, 24, 4, F16, quantize_base=quantize_base)
    x = torch.randn(6, 5, 40, device=DEVICE, dtype=F16)
    ids = torch.tensor([0, -1, 0, -1, -1, 0], device=DEVICE)
    base = F.linear(x, dequantize_base(layer.weight, layer.weight_scale, F16, layer.weight_code), layer.bias)
    y = layer(x, adapter_ids=ids)
    on = ids == 0
    assert_close(y[on], _reference(layer, x[on]), F16, "adapter rows")
    assert_close(y[~on], base[~on].double(), F16, "base rows")
    with fused_lora.disable_adapters(layer):
        assert torch.equal(layer(x), base)
    assert torch.equal(layer(x, adapter_ids=torch.full((6,), -1, device=DEVICE)), base)


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
def test_the_state_dict_round_trips_and_refuses_the_other_kinds_of_weight(quantize_base):
    """A quantized layer's state dict (weight, weight_scale, and FP4's
    weight_code) loads into another such layer; a weight of another kind
    (floating point, another quantized format: int8, NF4, or 4-bit of
    another code book) is refused both ways, nothing loaded."""
    fmt = "int8" if quantize_base is True else quantize_base
    dtype = torch.int8 if fmt == "int8" else torch.uint8
    _, layer = _quantized_layer(40, 24, 4, F32, quantize_base=quantize_base)
    x = torch.randn(7, 40, device=DEVICE)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "weight_scale"} | (
        {"weight_code"} if fmt == "fp4" else set()) and state["weight"].dtype == dtype
    _, other = _quantized_layer(40, 24, 4, F32, quantize_base=quantize_base)
    with torch.no_grad():
        other.weight_scale.mul_(2)
        if fmt == "fp4":
            other.weight_code.mul_(-1)
    other.load_state_dict(state)
    assert torch.equal(other(x), layer(x))
    float_layer = LoRALinear.from_linear(nn.Linear(40, 24, device=DEVICE), r=4)
    with pytest.raises(RuntimeError, match=rf"weight: a torch.float32 weight for a layer whose base "
                                           rf"is {fmt} \(quantize_base\): quantize it \(fused_lora.quantize_{fmt}\)"):
        layer.load_state_dict(float_layer.state_dict(), strict=False)
    made_with = "True" if fmt == "int8" else repr(fmt)
    kind = {"int8": "torch.int8", "nf4": r"torch.uint8 \(nf4\)", "fp4": r"torch.uint8 \(fp4\)"}
    with pytest.raises(RuntimeError, match=rf"weight: a {kind[fmt]} weight for a layer whose base is torch.float32: "
                                           rf"an? {fmt} base loads into a layer made with quantize_base={made_with}"):
        float_layer.load_state_dict(state, strict=False)
    for other_format in sorted({"int8", "nf4", "fp4"} - {fmt}):
        other_layer = LoRALinear.from_linear(nn.Linear(40, 24, device=DEVICE), r=4,
                                             quantize_base=True if other_format == "int8" else other_format)
        with pytest.raises(RuntimeError, match=rf"weight: a {kind[other_format]} weight for a layer whose "
                                               rf"base is {fmt}"):
            layer.load_state_dict(other_layer.state_dict(), strict=False)
        with pytest.raises(RuntimeError, match=rf"weight: a {kind[fmt]} weight for a layer whose base is "
                                               rf"{other_format}"):
            other_layer.load_state_dict(state, strict=False)
    assert torch.equal(layer(x), other(x))  # (nothing loaded)


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
def test_a_training_step_trains_the_adapter_alone(quantize_base):
    _, layer = _quantized_layer(40, 24, 4, BF16, adapter_dtype=F32, quantize_base=quantize_base)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.01)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    before = layer.weight.clone()
    x = torch.randn(8, 40, device=DEVICE, dtype=BF16)
    loss = layer(x).float().square().mean()
    loss.backward()
    opt.step()
    assert torch.equal(layer.weight, before) and layer.weight.grad is None
    assert layer(x).float().square().mean() < loss


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
@pytest.mark.parametrize("cast", ["to", "half", "to_device_and_dtype"])
def test_to_a_dtype_keeps_the_quantized_base(quantize_base, cast):
    """``.to(float16)`` casts the adapters and the bias; the quantized weight
    and its fp32 scales stay as they are, and so the base's values (Ŵ in
    x's dtype, bit for bit as before the cast)."""
    _, layer = _quantized_layer(40, 24, 4, F32, quantize_base=quantize_base)
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    x = torch.randn(5, 40, device=DEVICE, dtype=F16)
    before = dequantize_base(layer.weight, layer.weight_scale, F16, layer.weight_code)
    {"to": lambda: layer.to(F16), "half": layer.half, "to_device_and_dtype": lambda: layer.to(DEVICE, F16)}[cast]()
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.bias.dtype == F16
    assert torch.equal(layer.weight, weight) and layer.weight.dtype == weight.dtype
    assert layer.weight_scale.dtype == F32 and torch.equal(layer.weight_scale, scale)
    assert (layer.weight_code is None) == (quantize_base != "fp4")  # (FP4's code book: fp32 too)
    assert layer.weight_code is None or layer.weight_code.dtype == F32
    assert torch.equal(dequantize_base(layer.weight, layer.weight_scale, F16, layer.weight_code), before)
    assert_close(layer(x), _reference(layer, x), F16, "after .to(float16)")
    multi = MultiLoRALinear.from_linear(nn.Linear(40, 24, device=DEVICE), [2, 3], quantize_base=quantize_base)
    multi.to(F16)
    assert multi.weight_scale.dtype == F32 and multi.lora_A[1].dtype == F16
    assert (multi.weight_code is None) == (quantize_base != "fp4")
    assert multi.weight_code is None or multi.weight_code.dtype == F32


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
def test_compute_dtype_casts_x_and_the_output(quantize_base):
    """``compute_dtype`` on a quantized base (no bitsandbytes needed: on a GPU
    too): fp32 x computes as bf16 x would, bit for bit, the output and x's
    gradient cast back to fp32, the adapters' gradients the same; a mixed
    batch too; None gives x's dtype back."""
    _, layer = _quantized_layer(64, 24, 4, F32, dropout=0.25, adapter_dtype=F32, quantize_base=quantize_base)
    layer.compute_dtype = BF16
    x = torch.randn(3, 5, 64, device=DEVICE)
    runs = []
    for inp in (x.clone().requires_grad_(), x.to(BF16).requires_grad_()):
        torch.manual_seed(9)  # (the same dropout mask)
        y = layer(inp)
        y.backward(torch.ones_like(y))
        runs.append((y, inp.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        layer.zero_grad()
    (y32, dx32, da32, db32), (y16, dx16, da16, db16) = runs
    assert y32.dtype == dx32.dtype == F32 and y16.dtype == BF16
    assert torch.equal(y32, y16.float()) and torch.equal(dx32, dx16.float())
    assert torch.equal(da32, da16) and torch.equal(db32, db16)
    layer.eval()
    ids = torch.tensor([0, -1, 0], device=DEVICE)
    with torch.no_grad():
        assert torch.equal(layer(x, ids), layer(x.to(BF16), ids).float())
        in_bf16 = layer(x)
        layer.compute_dtype = None
        in_fp32 = layer(x)  # (x's dtype: fp32 compute, other roundings)
        assert in_fp32.dtype == F32 and not torch.equal(in_fp32, in_bf16)
        assert_close(in_fp32, in_bf16.double(), BF16, "fp32 against bf16 compute")


def test_what_an_int8_base_refuses():
    linear, layer = _quantized_layer(40, 24, 4, F32)
    with pytest.raises(ValueError, match="the base is int8 .* would requantize it"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match=r"LoRALinear.reset_parameters\(\): the base is int8"):
        layer.reset_parameters()
    before = layer.lora_B.clone()
    layer.reset_lora_parameters()  # (the adapter alone)
    assert not layer.lora_B.any() and before.any()
    with pytest.raises(ValueError, match=r"quantize_base must be False, True, 'int8', 'nf4' or 'fp4', got 'yes'"):
        LoRALinear.from_linear(linear, r=4, quantize_base="yes")
    with pytest.raises(TypeError, match="quantize_base must be a bool"):
        LoRALinear.from_linear(linear, r=4, quantize_base=2)
    q = nn.Parameter(layer.weight.detach(), requires_grad=False)
    a, b = layer.lora_A, layer.lora_B
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(out_features=24,\)"):
        LoRALinear.from_parameters(q, None, a, b, alpha=4, weight_scale=torch.ones(40, device=DEVICE))
    with pytest.raises(TypeError, match=r"weight must be a plain int8 Parameter \(or a uint8 one: packed NF4\) "
                                        r"with weight_scale"):
        LoRALinear.from_parameters(linear.weight, None, a, b, alpha=4, weight_scale=torch.ones(24, device=DEVICE))
    with pytest.raises(ValueError, match="fan_in_fan_out=True takes no weight_scale"):
        LoRALinear.from_parameters(q, None, nn.Parameter(torch.zeros(4, 24, device=DEVICE)),
                                   nn.Parameter(torch.zeros(40, 4, device=DEVICE)), alpha=4, fan_in_fan_out=True,
                                   weight_scale=torch.ones(24, device=DEVICE))
    with pytest.raises(TypeError, match=r"weight is int8 \(24, 40\), a quantized base"):
        fused_lora.lora_linear(torch.randn(3, 40, device=DEVICE), layer.weight, a, b)


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_inject_quantize_base_is_the_model_on_its_dequantised_weights(make, quantize_base, tmp_path):
    """The model with int8 (or NF4, or FP4) bases, and the float model whose targeted weights
    are replaced by their dequantised values, each with the same adapters:
    the same logits and adapter gradients (fp32), a training step, and the
    adapters saved; unload, merge_and_unload and to_peft refused, but with
    ``dequantize``: the base model's classes on Ŵ (+ s·B·A merged)."""
    model = make(seed=3)
    float_model = copy.deepcopy(model)
    names = fused_lora.inject(model, "all-linear", r=4, alpha=8, quantize_base=quantize_base)
    layers = {n: model.get_submodule(n) for n in names}
    assert names and all(layer.quantized for layer in layers.values())
    with torch.no_grad():  # the float model: those weights dequantised, as the kernels see them
        for name, layer in layers.items():
            plain = float_model.get_submodule(name)
            deq = dequantize_base(layer.weight, layer.weight_scale, F32, layer.weight_code)
            plain.weight.copy_(deq if isinstance(plain, nn.Linear) else deq.t())  # (GPT-2's Conv1D: (in, out))
            nn.init.normal_(layer.lora_B, 0, 0.3)
    fused_lora.inject(float_model, "all-linear", r=4, alpha=8)
    float_layers = {n: float_model.get_submodule(n) for n in names}
    with torch.no_grad():
        for name, layer in layers.items():
            float_layers[name].lora_A.copy_(layer.lora_A)
            float_layers[name].lora_B.copy_(layer.lora_B)
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    out, float_out = model(input_ids=ids, labels=ids), float_model(input_ids=ids, labels=ids)
    assert_close(out.logits, float_out.logits.double(), F32, "logits")
    out.loss.backward()
    float_out.loss.backward()
    for name, layer in layers.items():
        assert_close(layer.lora_B.grad, float_layers[name].lora_B.grad.double(), F32, f"{name}.lora_B.grad")
        assert_close(layer.lora_A.grad, float_layers[name].lora_A.grad.double(), F32, f"{name}.lora_A.grad")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    per_weight = 1 if quantize_base is True else 0.5  # (bytes a weight: NF4's and FP4's two a byte)
    held = sum(layer.weight.element_size() * layer.weight.numel() for layer in layers.values())
    assert held == weights * per_weight
    for what in (fused_lora.unload, fused_lora.merge_and_unload, fused_lora.to_peft):
        with pytest.raises(ValueError, match=r"hold a quantized base, int8 or 4-bit \(quantize_base, or torchao"):
            what(model)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)  # (nothing changed)
    # with dequantize, a dtype: the base model's own layer classes on Ŵ, with the adapters folded in or dropped
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        with fused_lora.disable_adapters(model):
            base = model(input_ids=ids).logits
    merged, unloaded, merged16, weighted = (copy.deepcopy(model) for _ in range(4))
    assert sorted(fused_lora.merge_and_unload(merged, dequantize=F32)) == sorted(names)
    fused_lora.merge_and_unload(weighted, dequantize=F32, weights=0.25)  # (the adapters at a quarter strength)
    assert sorted(fused_lora.unload(unloaded, dequantize=F32)) == sorted(names)
    fused_lora.merge_and_unload(merged16, dequantize=BF16)
    fresh = make(seed=3)
    for name, layer in layers.items():
        conv1d = not isinstance(fresh.get_submodule(name), nn.Linear)  # (GPT-2's Conv1D: (in, out))
        deq = dequantize_base(layer.weight, layer.weight_scale, F32, layer.weight_code)
        for m, dtype in ((merged, F32), (unloaded, F32), (merged16, BF16)):
            plain = m.get_submodule(name)
            assert type(plain) is type(fresh.get_submodule(name)) and plain.weight.dtype == dtype
            assert not plain.weight.requires_grad and (plain.bias is None or plain.bias.dtype == dtype)
        assert torch.equal(unloaded.get_submodule(name).weight, deq.t() if conv1d else deq)
        delta = (layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling
        assert_close(merged.get_submodule(name).weight, (deq.double() + delta).mT if conv1d else deq.double() + delta,
                     F32, f"{name}: Ŵ + s·B·A")
        quarter = deq.double() + 0.25 * delta
        assert_close(weighted.get_submodule(name).weight, quarter.mT if conv1d else quarter, F32,
                     f"{name}: Ŵ + 0.25·s·B·A")
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, fused.double(), F32, "merged on Ŵ")
        assert_close(unloaded(input_ids=ids).logits, base.double(), F32, "Ŵ alone")
        fresh.load_state_dict(merged.state_dict())  # (strict: the base model's keys and shapes)
        assert torch.equal(fresh(input_ids=ids).logits, merged(input_ids=ids).logits)
    for bad in ("bf16", torch.int8):
        with pytest.raises(TypeError, match=r"unload: dequantize must be None or a floating-point torch.dtype"):
            fused_lora.unload(model, dequantize=bad)
    model.train()
    # the adapters saved from the int8 model load into the floating-point one (what the refusals advise)
    fused_lora.save_adapter(model, tmp_path)
    fresh = make(seed=3)
    fused_lora.load_adapter(fresh, tmp_path)
    for name, layer in layers.items():
        loaded = fresh.get_submodule(name)
        assert not loaded.quantized
        assert torch.equal(loaded.lora_A, layer.lora_A) and torch.equal(loaded.lora_B, layer.lora_B)
    # and into the int8 model itself, its bases untouched
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.zero_()
    bases = {n: (layer.weight.clone(), layer.weight_scale.clone()) for n, layer in layers.items()}
    fused_lora.load_adapter(model, tmp_path)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, fresh.get_submodule(name).lora_A)
        assert torch.equal(layer.weight, bases[name][0]) and torch.equal(layer.weight_scale, bases[name][1])


@pytest.mark.parametrize("quantize_base", [True, "nf4", "fp4"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_a_qdora_layer_starts_as_its_base_and_matches_the_reference(dtype, quantize_base):
    """DoRA on an int8 (or NF4, or FP4) base (QDoRA): the magnitude starts as the norms of
    Ŵ's rows (a fresh layer is the dequantised base), and, trained, the
    layer is dora_linear on Ŵ (float64 reference), forward and gradients;
    delta_weight is γ ⊙ (Ŵ + s·B A) - Ŵ."""
    torch.manual_seed(2)
    linear = nn.Linear(40, 24, device=DEVICE, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8, use_dora=True, quantize_base=quantize_base)
    fmt = "int8" if quantize_base is True else quantize_base
    assert layer.use_dora and layer.quantized and "use_dora=True" in repr(layer) and f"base={fmt}" in repr(layer)
    deq = dequantize_base(layer.weight, layer.weight_scale, dtype, layer.weight_code)
    assert torch.equal(layer.lora_magnitude_vector, torch.linalg.vector_norm(deq.float(), dim=1).to(dtype))
    x = torch.randn(3, 7, 40, device=DEVICE, dtype=dtype)
    base = F.linear(x, deq, linear.bias)
    assert_close(layer(x), base.double(), dtype, "a fresh QDoRA layer")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(24, device=DEVICE, dtype=dtype) + 0.5)
    x.requires_grad_()
    y = layer(x)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B,
                                                                layer.lora_magnitude_vector)]
    y64 = reference.dora_linear(leaves[0], deq.double(), *leaves[1:3], leaves[3], linear.bias.double(),
                                scaling=layer.scaling)
    assert_close(y, y64.detach(), dtype, "y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), dy)
    for g, g64, name in zip(grads, torch.autograd.grad(y64, leaves, dy.double()), ("dx", "dA", "dB", "dm")):
        assert_close(g, g64, dtype, name)
    w = deq.double()
    adapted = w + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    gamma = layer.lora_magnitude_vector.double() / torch.linalg.vector_norm(adapted, dim=1)
    assert_close(layer.delta_weight(), gamma[:, None] * adapted - w, F32, "delta")  # (made in fp32)
    with pytest.raises(ValueError, match=f"the base is {fmt}"):
        layer.merge()


def test_inject_qdora_is_the_float_model_on_the_dequantised_weights(tmp_path):
    model = tiny_llama(seed=5)
    float_model = copy.deepcopy(model)
    names = fused_lora.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, use_dora=True,
                              quantize_base=True)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            float_model.get_submodule(name).weight.copy_(
                fused_lora.dequantize_int8(layer.weight, layer.weight_scale, F32))
            nn.init.normal_(layer.lora_B, 0, 0.3)
            layer.lora_magnitude_vector.mul_(1.2)
    fused_lora.save_adapter(model, tmp_path)  # (PEFT's DoRA file: lora_A, lora_B, the magnitudes)
    fused_lora.load_adapter(float_model, tmp_path)
    assert all(float_model.get_submodule(n).use_dora and not float_model.get_submodule(n).quantized for n in names)
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    out, float_out = model(input_ids=ids, labels=ids), float_model(input_ids=ids, labels=ids)
    assert_close(out.logits, float_out.logits.double(), F32, "logits")
    out.loss.backward()
    float_out.loss.backward()
    for name in names:
        for p in ("lora_A", "lora_B", "lora_magnitude_vector"):
            assert_close(getattr(model.get_submodule(name), p).grad,
                         getattr(float_model.get_submodule(name), p).grad.double(), F32, f"{name}.{p}")
    fused_lora.merge_and_unload(model, dequantize=F32)  # (QDoRA folded into Ŵ: γ ⊙ (Ŵ + s·B A))
    fused_lora.merge_and_unload(float_model)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, float_model(input_ids=ids).logits.double(), F32, "merged")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_multi_lora_linear_on_an_int8_base_is_the_same_layer_on_its_dequantised_weight(dtype):
    """Several adapters (one of rank 0) served from one int8 base: the sums
    of the same layer on Ŵ, output and every adapter's gradients (the same
    bits on the CPU; on a GPU the float base in fp32 runs cuBLAS); the base
    alone with the adapters off; what it refuses."""
    torch.manual_seed(1)
    linear = nn.Linear(40, 24, device=DEVICE, dtype=dtype)
    layer = fused_lora.MultiLoRALinear.from_linear(linear, ranks=[4, 0, 8], alphas=[8, 1, 4], quantize_base=True,
                                                   adapter_dtype=F32)
    assert layer.quantized and layer.weight.dtype == torch.int8 and "base=int8" in repr(layer)
    deq = fused_lora.dequantize_int8(layer.weight, layer.weight_scale, dtype)
    plain = fused_lora.MultiLoRALinear.around(nn.Parameter(deq, requires_grad=False), linear.bias, [4, 0, 8],
                                              [8, 1, 4], adapter_dtype=F32)
    with torch.no_grad():
        for a, b, pa, pb in zip(layer.lora_A, layer.lora_B, plain.lora_A, plain.lora_B):
            b.normal_()
            pa.copy_(a)
            pb.copy_(b)
    x = torch.randn(3, 7, 40, device=DEVICE, dtype=dtype)
    ids = torch.tensor([0, 2, -1], device=DEVICE)
    y, y_plain = layer(x, ids), plain(x, ids)
    assert_same_sums(y, y_plain, 40 + 12, "y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [*layer.lora_A, *layer.lora_B], dy, allow_unused=True)
    plain_grads = torch.autograd.grad(y_plain, [*plain.lora_A, *plain.lora_B], dy, allow_unused=True)
    for g, pg in zip(grads, plain_grads):
        assert (g is None and pg is None) or (g is not None and pg is not None)
        if g is not None:  # (sums over the 21 tokens of dy·B's, each over N = 24)
            assert_same_sums(g, pg, 21 * 24, "an adapter's gradient")
    with fused_lora.disable_adapters(layer):
        assert torch.equal(layer(x, ids), F.linear(x, deq, linear.bias))
    with pytest.raises(ValueError, match="the base is int8"):
        layer.merged_weight(0)
    with pytest.raises(ValueError, match=r"MultiLoRALinear.reset_parameters\(\): the base is int8"):
        layer.reset_parameters()
    assert layer.delta_weight(2).dtype == F32
    with pytest.raises(RuntimeError, match=r"weight: a torch.int8 weight for a layer whose base is"):
        plain.load_state_dict(layer.state_dict(), strict=False)


@pytest.mark.parametrize("how", ["int8", "nf4", "fp4"])
def test_multi_around_takes_a_quantized_base_given_as_its_data_and_scales(how):
    """``MultiLoRALinear.around(q, bias, ..., weight_scale=, weight_code=)``,
    as ``LoRALinear.from_parameters`` takes a quantized base: the data and
    scales held as they are (not copied), the layer ``from_linear(...,
    quantize_base=)`` makes, bit for bit; a code book without scales, scales
    of the wrong shape and scales beside a floating-point weight refused."""
    torch.manual_seed(3)
    linear = nn.Linear(64, 24, device=DEVICE)
    made = MultiLoRALinear.from_linear(linear, [2, 3], quantize_base=how)
    q, scale, code = made.weight.detach().clone(), made.weight_scale.clone(), made._buffers.get("weight_code")
    weight = nn.Parameter(q, requires_grad=False)
    layer = MultiLoRALinear.around(weight, linear.bias, [2, 3], weight_scale=scale, weight_code=code)
    assert layer.quantized and layer.weight.data_ptr() == q.data_ptr() and layer.weight_scale is scale
    assert (layer.in_features, layer.out_features) == (64, 24) and f"base={how}" in repr(layer)
    with torch.no_grad():
        for a, b, ma, mb in zip(layer.lora_A, layer.lora_B, made.lora_A, made.lora_B):
            mb.normal_()
            a.copy_(ma)
            b.copy_(mb)
    x, ids = torch.randn(5, 64, device=DEVICE), torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    assert torch.equal(layer(x, ids), made(x, ids))
    with pytest.raises(ValueError, match="weight_code is a 4-bit base's code book: it comes with its weight_scale"):
        MultiLoRALinear.around(linear.weight, linear.bias, [2], weight_code=fused_lora.quant.fp4_code(DEVICE))
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(out_features=24"):
        MultiLoRALinear.around(weight, linear.bias, [2], weight_scale=scale[:5], weight_code=code)
    with pytest.raises(TypeError, match=r"weight must be a plain int8 Parameter .* with weight_scale"):
        MultiLoRALinear.around(linear.weight, linear.bias, [2], weight_scale=scale)


def test_inject_multi_quantize_base(tmp_path):
    model = tiny_llama(seed=4)
    float_model = copy.deepcopy(model)
    names = fused_lora.inject_multi(model, ["q_proj", "v_proj", "down_proj"], ranks=[4, 8], quantize_base=True)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            float_model.get_submodule(name).weight.copy_(
                fused_lora.dequantize_int8(layer.weight, layer.weight_scale, F32))
            for b in layer.lora_B:
                b.normal_(0, 0.3)
    fused_lora.inject_multi(float_model, ["q_proj", "v_proj", "down_proj"], ranks=[4, 8])
    float_model.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    input_ids = torch.randint(0, 61, (3, 9), device=DEVICE)
    ids = torch.tensor([1, -1, 0], device=DEVICE)
    with fused_lora.adapter_ids(model, ids), fused_lora.adapter_ids(float_model, ids):
        logits, float_logits = model(input_ids=input_ids).logits, float_model(input_ids=input_ids).logits
    assert_close(logits, float_logits.double(), F32, "logits")
    for what in (lambda m: fused_lora.merge_and_unload(m, adapter=0), fused_lora.unload, fused_lora.to_peft):
        with pytest.raises(ValueError, match=r"hold a quantized base"):
            what(model)
    merged = copy.deepcopy(model)  # (dequantize: adapter 1 folded into Ŵ, the model every row of adapter 1 runs)
    fused_lora.merge_and_unload(merged, adapter=1, dequantize=F32)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    ones = torch.ones(3, dtype=torch.long, device=DEVICE)
    with torch.no_grad(), fused_lora.adapter_ids(model, ones):
        assert_close(merged(input_ids=input_ids).logits, model(input_ids=input_ids).logits.double(), F32,
                     "adapter 1 merged into Ŵ")
    blend, float_blend = copy.deepcopy(model), copy.deepcopy(float_model)  # (a weighted sum of both, into Ŵ)
    fused_lora.merge_and_unload(blend, adapter=[1, 0], weights=[0.5, -2.0], dequantize=F32)
    fused_lora.merge_and_unload(float_blend, adapter=[1, 0], weights=[0.5, -2.0])
    with torch.no_grad():
        assert_close(blend(input_ids=input_ids).logits, float_blend(input_ids=input_ids).logits.double(), F32,
                     "a blend of adapters 1 and 0 merged into Ŵ")
        assert (blend(input_ids=input_ids).logits - merged(input_ids=input_ids).logits).abs().max() > 0.01
    fused_lora.save_adapter(model, tmp_path, adapter=1)  # (one adapter, PEFT's file, for the float model)
    fresh = tiny_llama(seed=4)
    fused_lora.load_adapter(fresh, tmp_path)
    for name in names:
        assert torch.equal(fresh.get_submodule(name).lora_B, model.get_submodule(name).lora_B[1])


def test_a_quantized_module_still_in_use_keeps_its_bytes():
    """inject on a module whose quantized weight another module of the model
    holds too (tied; or the module reachable under a name left unfused):
    the module kept aside for unload lets go of nothing there, and the other
    one computes as before; one no other module holds lets go of its bytes."""
    torchao = pytest.importorskip("torchao")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        pytest.skip(f"torchao {torchao.__version__}: {err}")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 8)).to(DEVICE)
    quantize_(model, Int8WeightOnlyConfig())
    if fused_lora.quant.int8_rows_of(model[0].weight) is None:
        pytest.skip(f"torchao {torchao.__version__} holds int8 weights in a layout fused_lora does not read")
    model[2].weight = model[0].weight  # (tied: the same quantized weight in two modules)
    model.add_module("again", model[3])  # (one module under two names)
    x = torch.randn(4, 16, device=DEVICE)
    with torch.no_grad():
        tied, again = model[2](x), model.again(x)
    fused_lora.inject(model, ["0", "3"], r=2)
    held = {n: fused_lora.layer.held_module(model.get_submodule(n)) for n in ("0", "3")}
    assert held["0"].weight.qdata.numel() == 16 * 16 and held["3"].weight.qdata.numel() == 16 * 8  # (in use)
    with torch.no_grad():
        assert torch.equal(model[2](x), tied) and torch.equal(model.again(x), again)
    other = nn.Sequential(nn.Linear(16, 16)).to(DEVICE)
    quantize_(other, Int8WeightOnlyConfig())
    fused_lora.inject(other, ["0"], r=2)
    assert fused_lora.layer.held_module(other[0]).weight.qdata.numel() == 0  # (nothing else holds it: let go)


def test_torchao_int8_weight_only_bases_are_taken_as_they_are(tmp_path):
    """A model quantized by torchao (Int8WeightOnlyConfig: per-row int8, its
    dequantize() the same Ŵ): inject fuses its layers over torchao's own
    int8 data (shared, not copied) and scales; a fresh adapter leaves the
    model's output as torchao computes it; with trained adapters, the float
    model holding Ŵ gives the same logits; PEFT's files load into it; torchao's
    other int8 (dynamic activation quantization) is refused."""
    torchao = pytest.importorskip("torchao")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        pytest.skip(f"torchao {torchao.__version__}: {err}")
    model = tiny_llama(seed=7)
    float_model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.endswith(("q_proj", "up_proj")))
    quantized = {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))}
    if not all(fused_lora.quant.int8_rows_of(w) is not None for w in quantized.values()):
        pytest.skip(f"torchao {torchao.__version__} holds Int8WeightOnlyConfig's weights as "
                    f"{type(next(iter(quantized.values()))).__name__}, a layout fused_lora does not read")
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    with torch.no_grad():
        torchao_logits = model(input_ids=ids).logits
    deqs = {n: w.dequantize() for n, w in quantized.items()}
    bytes_of = {n: w.qdata.data_ptr() for n, w in quantized.items()}
    names = fused_lora.inject(model, ["q_proj", "up_proj", "v_proj"], r=4, alpha=8)
    for name, weight in quantized.items():
        layer = model.get_submodule(name)
        assert layer.quantized and layer.weight.data_ptr() == bytes_of[name]
        assert weight.qdata.numel() == 0  # (torchao's module, kept aside, let go of the bytes the layer reads)
        assert torch.equal(fused_lora.dequantize_int8(layer.weight, layer.weight_scale, F32), deqs[name])
    assert not any(model.get_submodule(n).quantized for n in names if n.endswith("v_proj"))  # (float bases)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, torchao_logits.double(), F32, "fresh adapters")
        for name in names:
            nn.init.normal_(model.get_submodule(name).lora_B, 0, 0.3)
            if name in quantized:
                float_model.get_submodule(name).weight.copy_(deqs[name])
    fused_lora.save_adapter(model, tmp_path)
    fused_lora.load_adapter(float_model, tmp_path)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert_close(logits, float_model(input_ids=ids).logits.double(), F32, "trained adapters")
    # back: to_peft puts PEFT's layers on torchao's own modules, unload gives those back as they were
    with warnings.catch_warnings():  # (PEFT's: without get_apply_tensor_subclass its merge() cannot requantize)
        warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without")
        try:
            peft_model = fused_lora.to_peft(copy.deepcopy(model))
        except TypeError as err:  # (PEFT 0.19 and 0.20 with torchao 0.18: its torchao layer's constructor changed)
            if "TorchaoLoraLinear" not in str(err):
                raise
            peft_model = None
    if peft_model is not None:
        with torch.no_grad():
            assert_close(peft_model(input_ids=ids).logits, logits.double(), F32, "PEFT's model on torchao's")
    modules = {n: fused_lora.layer.held_module(model.get_submodule(n)) for n in quantized}
    assert sorted(fused_lora.unload(model)) == sorted(names)
    for name, weight in quantized.items():
        assert model.get_submodule(name) is modules[name] and model.get_submodule(name).weight is weight
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, torchao_logits.double(), F32, "torchao's model again")
    # torchao's int8 with dynamic activation quantization (another op), and its group-wise scales (not one a
    # row): refused as tensor subclasses
    others = [torchao.quantization.Int8DynamicActivationInt8WeightConfig()]
    granularity = getattr(torchao.quantization, "granularity", None)
    if granularity is not None and hasattr(granularity, "PerGroup"):
        others.append(Int8WeightOnlyConfig(granularity=granularity.PerGroup(16)))
    for config in others:
        other = tiny_llama(seed=7)
        quantize_(other, config, filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
        assert fused_lora.quant.int8_rows_of(other.get_submodule("model.layers.0.self_attn.q_proj").weight) is None
        with pytest.raises(TypeError, match="cannot be fused: .*q_proj: its weight is a torchao"):
            fused_lora.inject(other, ["q_proj"], r=4)
