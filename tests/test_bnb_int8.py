"""bitsandbytes' LLM.int8 base taken as it is: a ``Linear8bitLt``'s rows
``CB`` and ``SCB / 127`` are fused_lora's int8 format. The layers over it
against the float64 reference on Ŵ, before and after bitsandbytes' layer
first runs (which moves its row scales from the weight to the layer's
state); a model transformers loaded in 8 bits through ``inject``,
``inject_multi``, ``unload``, ``merge_and_unload`` and ``to_peft``; what is
refused. (PEFT's 8-bit LoRA layers through ``from_peft``:
test_peft_quantized.py; the dequantized merge's checkpoint:
test_nf4_layer.py.)"""

import copy

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear, reference
from lora_testing import DEVICE, assert_close, trained_logits

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

bnb = pytest.importorskip("bitsandbytes")
if DEVICE.type != "cpu":
    pytest.skip("bitsandbytes' int8 layers are built on CPU here", allow_module_level=True)


def _linear8bit(linear: nn.Linear, has_fp16_weights=False, move=True):
    """A Linear8bitLt of ``linear``'s weights, quantized (by the move to the device, as bitsandbytes does)."""
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=has_fp16_weights)
    layer.load_state_dict(linear.state_dict())
    return layer.to(DEVICE) if move else layer


def _scb(l8) -> torch.Tensor:
    """The row statistics wherever bitsandbytes keeps them now (the weight's, then the layer's state)."""
    return l8.weight.SCB if l8.weight.SCB is not None else l8.state.SCB


def _deq(layer, dtype):
    return fused_lora.dequantize_int8(layer.weight, layer.weight_scale, dtype)


@pytest.mark.parametrize("ran", [False, True], ids=["fresh", "ran"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_a_linear8bitlt_is_fused_as_it_is(ran, dtype):
    """Its int8 data shared, its scale ``SCB / 127`` (Ŵ within an fp32 ulp
    of bitsandbytes' ``int8_vectorwise_dequant``), wherever bitsandbytes
    keeps ``SCB`` (the weight's; once the layer ran, its state's). The
    forward and every gradient against the float64 reference on Ŵ; the base
    alone against bitsandbytes' own (CPU) forward; ``MultiLoRALinear`` too."""
    torch.manual_seed(11)
    linear = nn.Linear(72, 40, device=DEVICE)
    l8 = _linear8bit(linear)
    if ran:
        with torch.no_grad():
            l8(torch.randn(2, 72, device=DEVICE))
        assert l8.weight.SCB is None and l8.state.SCB is not None  # (where bitsandbytes moved it)
    layer = LoRALinear.from_linear(l8, r=5, alpha=10)
    assert layer.quantized and layer.weight.dtype == torch.int8 and layer.weight.shape == (40, 72)
    assert layer.weight.data_ptr() == l8.weight.data_ptr() and "base=int8" in repr(layer)  # (its bytes, shared)
    assert layer.bias is l8.bias and layer.lora_A.dtype == F32 and layer.compute_dtype is None
    assert layer.weight_scale.dtype == F32 and torch.equal(layer.weight_scale, _scb(l8) * (1 / 127))
    assert fused_lora.layer.held_module(layer) is l8
    # Ŵ: bitsandbytes' fine-tuning matmul's on CPU (MatMul8bitFp), bit for bit; its int8_vectorwise_dequant
    # rounds the same product in another order
    assert torch.equal(_deq(layer, dtype), l8.weight.data.to(dtype).mul_(_scb(l8).unsqueeze(1).mul(1.0 / 127.0)))
    torch.testing.assert_close(_deq(layer, F32), bnb.functional.int8_vectorwise_dequant(l8.weight.data, _scb(l8)),
                               rtol=1.2e-7, atol=0)
    layer = layer.to(dtype)  # (the adapters and bias: the int8 base and its scale stay)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == F32 and layer.lora_A.dtype == dtype
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(3, 7, 72, device=DEVICE, dtype=dtype).transpose(0, 1)  # (3-D, strided)
    x.requires_grad_()
    y = layer(x)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    expected = reference.lora_linear_checked(x64, _deq(layer, dtype).double(), a64, b64, layer.bias.double(),
                                             layer.scaling, 0.0, None)
    assert y.dtype == dtype
    assert_close(y, expected, dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy.double())
    for got, want, what in ((x.grad, x64.grad, "dx"), (layer.lora_A.grad, a64.grad, "dA"),
                            (layer.lora_B.grad, b64.grad, "dB")):
        assert_close(got, want, dtype, what)
    with torch.no_grad(), fused_lora.disable_adapters(layer):  # (the base alone: bitsandbytes' forward on CPU,
        base = layer(x)                                           # in training mode: MatMul8bitFp)
        assert torch.equal(base, copy.deepcopy(l8).train()(x))
    multi = MultiLoRALinear.from_linear(l8, [2, 3])
    assert multi.quantized and multi.weight.data_ptr() == l8.weight.data_ptr() and "base=int8" in repr(multi)
    assert torch.equal(multi.weight_scale, layer.weight_scale) and fused_lora.layer.held_module(multi) is l8
    with torch.no_grad():
        assert_close(multi.to(dtype)(x, torch.full((7,), -1, device=DEVICE)), base.double(), dtype, "base rows")


def test_what_a_linear8bitlt_base_refuses_and_what_it_is_not():
    """A weight alone whose layer ran holds no scales: refused by name (the
    layer itself fuses); an ``Int8Params`` not quantized yet (bitsandbytes
    quantizes it when moved to a device, under the fused layer) is refused,
    saying so, by ``from_linear`` and ``inject``, nothing changed; one of
    ``has_fp16_weights=True`` (bitsandbytes' fp16-weight training mode) is a
    floating-point base."""
    torch.manual_seed(12)
    linear = nn.Linear(24, 8, device=DEVICE)
    l8 = _linear8bit(linear)
    a, b = nn.Parameter(torch.randn(2, 24)), nn.Parameter(torch.randn(8, 2))
    assert LoRALinear.from_parameters(l8.weight, l8.bias, a, b, alpha=2).quantized  # (SCB still the weight's)
    with torch.no_grad():
        l8(torch.randn(2, 24))
    with pytest.raises(TypeError, match=r"its weight is a bitsandbytes int8 weight \(8, 24\) whose row scales "
                                        r"\(SCB\) are neither its own nor its Linear8bitLt's .*fuse the layer, not "
                                        r"its weight"):
        LoRALinear.from_parameters(l8.weight, l8.bias, a, b, alpha=2)
    with pytest.raises(TypeError, match=r"bitsandbytes int8 weight .*\(SCB\)"):
        MultiLoRALinear.around(l8.weight, l8.bias, [2])
    assert LoRALinear.from_linear(l8, r=2).quantized and MultiLoRALinear.from_linear(l8, [2]).quantized
    # bitsandbytes before 0.45, at its first forward on a GPU, turned the weight into a tiled layout (state.CxB):
    # marked so, as it left it, the bytes are refused as rows
    l8.state.__dict__["CxB"] = l8.weight.data
    with pytest.raises(TypeError, match=r"int8 weight in the tiled layout older bitsandbytes .* \(state.CxB\)"):
        LoRALinear.from_linear(l8, r=2)
    del l8.state.__dict__["CxB"]
    unmoved = _linear8bit(linear, move=False)
    assert unmoved.weight.dtype == F32
    model = nn.Sequential(unmoved)
    with pytest.raises(TypeError, match=r"a bitsandbytes Int8Params not quantized yet .* move the model to its "
                                        r"device first"):
        LoRALinear.from_linear(unmoved, r=2)
    with pytest.raises(TypeError, match=r"inject: these layers cannot be fused: 0: .*not quantized yet"):
        fused_lora.inject(model, ["0"], r=2)
    assert model[0] is unmoved
    fp16_weights = _linear8bit(linear, has_fp16_weights=True)
    layer = LoRALinear.from_linear(fp16_weights, r=2)
    assert not layer.quantized and layer.weight is fp16_weights.weight and torch.equal(layer.weight, linear.weight)


def _saved_llama(path, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def test_inject_fuses_a_model_transformers_loaded_in_8_bits(tmp_path):
    """``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))``,
    run once (its layers' scales then in their state): inject fuses every
    Linear8bitLt over its bytes; with a fresh adapter it is the float model
    on Ŵ, and the adapters train; ``merge_and_unload(dequantize=)``,
    ``to_peft`` (PEFT's 8-bit layers), ``load_adapter`` into another such
    model and PEFT's model of the saved files compute what the fused model
    does; ``unload`` gives the Linear8bitLt modules back; ``inject_multi``
    too."""
    transformers = pytest.importorskip("transformers")
    _saved_llama(tmp_path, 8)
    quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization,
                                                          device_map="cpu", dtype=F32)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
    bytes_of = {n: m.weight.data_ptr() for n, m in model.named_modules() if type(m).__name__ == "Linear8bitLt"}
    assert len(bytes_of) == 14 and all(model.get_submodule(n).state.SCB is not None for n in bytes_of)
    names = fused_lora.inject(model, "all-linear", r=4, alpha=8)
    assert sorted(names) == sorted(bytes_of)
    assert all(model.get_submodule(n).quantized and model.get_submodule(n).weight.data_ptr() == bytes_of[n]
               for n in names)
    float_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        for name in names:
            float_model.get_submodule(name).weight.copy_(_deq(model.get_submodule(name), F32))
        assert_close(model(input_ids=ids).logits, float_model(input_ids=ids).logits.double(), F32,
                     "a fresh adapter: the model on Ŵ")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(model.get_submodule(n).lora_B.grad.abs().max() > 0 for n in names)
    # (in training mode: in eval mode bitsandbytes' CPU forward takes LLM.int8's own path, x quantized to int8
    # (through fp16) per row, its outliers apart: another product than x·Ŵᵀ)
    model.train()
    fused, base = trained_logits(model, names, ids)
    originals = {n: fused_lora.layer.held_module(model.get_submodule(n)) for n in names}
    # (kept aside for unload, having let go of the bytes the fused layer reads, the weight's and its state's CB)
    assert all(type(m).__name__ == "Linear8bitLt" and m.weight.numel() == 0 and m.state.CB.numel() == 0
               for m in originals.values())
    with pytest.raises(ValueError, match=r"merge_and_unload: .* hold a quantized base"):
        fused_lora.merge_and_unload(model)
    merged = copy.deepcopy(model)
    fused_lora.merge_and_unload(merged, dequantize=F32)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, fused.double(), F32, "merged into Ŵ")
    peft_model = fused_lora.to_peft(copy.deepcopy(model))
    layer = peft_model.base_model.model.get_submodule(names[0])
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer.base_layer).__name__ == "Linear8bitLt"
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids).logits, fused.double(), F32, "PEFT's 8-bit LoRA model")
    # the adapter's files: load_adapter fuses another model loaded in 8 bits, bit for bit this one; PEFT's
    # from_pretrained on one computes as it does
    fused_lora.save_adapter(model, tmp_path / "adapter")
    other = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization,
                                                          device_map="cpu", dtype=F32).train()
    assert sorted(fused_lora.load_adapter(other, tmp_path / "adapter")) == sorted(names)
    assert all(other.get_submodule(n).quantized for n in names)
    peft = pytest.importorskip("peft")
    from_files = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", dtype=F32), tmp_path / "adapter").train()
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, fused)
        assert_close(from_files(input_ids=ids).logits, fused.double(), F32, "PEFT's model of the files")
    assert sorted(fused_lora.unload(model)) == sorted(names)
    assert all(model.get_submodule(n) is originals[n] and originals[n].weight.data_ptr() == bytes_of[n]
               and originals[n].state.CB.data_ptr() == bytes_of[n] for n in names)  # (its bytes back)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, base.double(), F32, "bitsandbytes' own model again")
    fused_lora.inject_multi(model, "all-linear", ranks=[2, 3])
    assert all(model.get_submodule(n).quantized and fused_lora.layer.held_module(model.get_submodule(n))
               is originals[n] for n in names)
    with torch.no_grad(), fused_lora.adapter_ids(model, torch.tensor([1, 0])):  # (fresh adapters: the base)
        assert_close(model(input_ids=ids).logits, base.double(), F32, "inject_multi's fresh adapters")
        for name in names:
            for b in model.get_submodule(name).lora_B:
                nn.init.normal_(b, 0, 0.3)
        mixed = model(input_ids=ids).logits
    # PEFT's 8-bit layers with both adapters on the same Linear8bitLt: its mixed batch is adapter_ids'
    peft_model = fused_lora.to_peft(copy.deepcopy(model), adapter_names=["first", "second"]).eval()
    for module in peft_model.modules():  # (PEFT takes adapter_names in eval mode only; bitsandbytes' layers in
        if type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
            module.train()  # training mode, where its CPU forward is the weight-only product, as above)
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids, adapter_names=["second", "first"]).logits, mixed.double(), F32,
                     "PEFT's mixed batch")
    fused_lora.unload(model)
    assert all(model.get_submodule(n) is originals[n] for n in names)
