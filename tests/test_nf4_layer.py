"""An NF4 base in the layers and in models: ``LoRALinear.from_linear(...,
quantize_base="nf4")``, ``MultiLoRALinear``, ``inject(...,
quantize_base="nf4")`` and bitsandbytes' nf4 ``Linear4bit`` taken as it is,
each against the same layers on the dequantised weight, and what such
layers refuse. (Dropout and mixed batches, the state dict, a training
step, QDoRA, ``compute_dtype``, ``.to(dtype)`` and ``inject(...,
quantize_base="nf4")`` on Llama and GPT-2: test_quantized_layer.py's, for
both formats.)"""

import copy

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear, reference
from lora_testing import DEVICE, assert_close, trained_logits

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _nf4_layer(k, n, r, dtype, bias=True, dropout=0.0, adapter_dtype=None, use_dora=False):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias, device=DEVICE, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r=r, alpha=2 * r, dropout=dropout, quantize_base="nf4",
                                   adapter_dtype=adapter_dtype, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # (a trained adapter: B away from 0)
    return linear, layer


def _deq(layer, dtype):
    return fused_lora.dequantize_4bit(layer.weight, layer.weight_scale, dtype, layer.weight_code)


def _reference(layer, x, dropout_p=0.0, seed=None):
    return reference.lora_linear_checked(x.double(), _deq(layer, x.dtype).double(), layer.lora_A.double(),
                                         layer.lora_B.double(), None if layer.bias is None else layer.bias.double(),
                                         layer.scaling, dropout_p, seed)


@pytest.mark.parametrize("dtype, adapter_dtype", [(F32, None), (F16, None), (BF16, F32)], ids=str)
@pytest.mark.parametrize("k, group", [(128, 64), (40, 8)])  # (in_features not a multiple of 64: a smaller group)
def test_from_linear_quantizes_the_base_to_nf4_and_matches_the_reference(dtype, adapter_dtype, k, group):
    linear, layer = _nf4_layer(k, 70, 6, dtype, adapter_dtype=adapter_dtype)
    packed, absmax = fused_lora.quantize_nf4(linear.weight, group)
    assert layer.quantized and layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight.shape == (70, k // 2) and layer.in_features == k and layer.out_features == 70
    assert torch.equal(layer.weight, packed) and torch.equal(layer.weight_scale, absmax)
    assert layer.bias is linear.bias and layer.lora_A.dtype == (adapter_dtype or dtype)
    assert "base=nf4" in repr(layer)
    x = torch.randn(3, 17, k, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, _reference(layer, x), dtype, "y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
    y64 = reference.lora_linear(leaves[0], _deq(layer, dtype).double(), leaves[1].to(dtype).double(),
                                leaves[2].to(dtype).double(), layer.bias.double(), scaling=layer.scaling)
    for g, g64, name in zip(grads, torch.autograd.grad(y64, leaves, dy.double()), ("dx", "dA", "dB")):
        assert_close(g, g64, dtype, name)


def test_what_an_nf4_base_refuses():
    linear, layer = _nf4_layer(64, 24, 4, F32)
    with pytest.raises(ValueError, match=r"the base is nf4 \(quantize_base\): folding the adapter in would"):
        layer.merge()
    with pytest.raises(ValueError, match=r"LoRALinear.reset_parameters\(\): the base is nf4"):
        layer.reset_parameters()
    with pytest.raises(ValueError, match="in_features must be even, got a weight \\(24, 63\\)"):
        LoRALinear.from_linear(nn.Linear(63, 24, device=DEVICE), r=4, quantize_base="nf4")
    with pytest.raises(ValueError, match=r"quantize_base must be False, True, 'int8', 'nf4' or 'fp4', got 'int4'"):
        LoRALinear.from_linear(linear, r=4, quantize_base="int4")
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(out_features=24, in_features / group\)"):
        LoRALinear.from_parameters(layer.weight, None, layer.lora_A, layer.lora_B, alpha=8,
                                   weight_scale=torch.ones(24, device=DEVICE))
    code = fused_lora.quant.fp4_code(DEVICE)
    params = (layer.weight, None, layer.lora_A, layer.lora_B)
    with pytest.raises(ValueError, match=r"weight_code must have shape \(16,\), .* got \(8,\)"):
        LoRALinear.from_parameters(*params, alpha=8, weight_scale=layer.weight_scale, weight_code=code[:8])
    with pytest.raises(ValueError, match="weight_code is on meta but the weight is on"):
        LoRALinear.from_parameters(*params, alpha=8, weight_scale=layer.weight_scale, weight_code=code.to("meta"))
    with pytest.raises(ValueError, match="weight_code is a 4-bit base's code book: it comes with its weight_scale"):
        LoRALinear.from_parameters(*params, alpha=8, weight_code=code)
    q, scale = fused_lora.quantize_int8(torch.randn(24, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight_code is a packed 4-bit \(uint8\) weight's code book; weight is "
                                         r"torch.int8"):
        LoRALinear.from_parameters(nn.Parameter(q, requires_grad=False), None, layer.lora_A, layer.lora_B, alpha=8,
                                   weight_scale=scale, weight_code=code)
    fp4 = LoRALinear.from_parameters(*params, alpha=8, weight_scale=layer.weight_scale, weight_code=code)
    assert fp4.weight_code is code and "base=fp4" in repr(fp4)  # (held, not copied)
    with pytest.raises(ValueError, match="a quantized base is stored \\(out, in\\)"):
        LoRALinear.from_parameters(layer.weight, None, layer.lora_A, layer.lora_B, alpha=8,
                                   weight_scale=layer.weight_scale, fan_in_fan_out=True)
    # from_parameters of the same bytes and absmax: the same layer
    same = LoRALinear.from_parameters(layer.weight, layer.bias, layer.lora_A, layer.lora_B, alpha=layer.alpha,
                                      weight_scale=layer.weight_scale)
    x = torch.randn(5, 64, device=DEVICE)
    assert same.in_features == 64 and torch.equal(same(x), layer(x))


def test_multi_lora_linear_on_an_nf4_base_is_the_same_layer_on_its_dequantised_weight():
    torch.manual_seed(1)
    linear = nn.Linear(48, 40, device=DEVICE, dtype=F16)
    layer = MultiLoRALinear.from_linear(linear, [4, 8], quantize_base="nf4")
    assert layer.quantized and layer.weight.dtype == torch.uint8 and "base=nf4" in repr(layer)
    plain = MultiLoRALinear.around(nn.Parameter(_deq(layer, F16), requires_grad=False), linear.bias, [4, 8])
    with torch.no_grad():
        for i in range(2):
            layer.lora_B[i].normal_(0, 0.5)
            plain.lora_A[i].copy_(layer.lora_A[i])
            plain.lora_B[i].copy_(layer.lora_B[i])
    x = torch.randn(6, 48, device=DEVICE, dtype=F16)
    ids = torch.tensor([0, 1, -1, 1, 0, 0], device=DEVICE)
    with fused_lora.dispatch.force_strategy("split"):  # (the NF4 base runs split: the same plan)
        assert torch.equal(layer(x, adapter_ids=ids), plain(x, adapter_ids=ids))
    with pytest.raises(ValueError, match=r"merged_weight\(\): the base is nf4"):
        layer.merged_weight(0)


# ----------------------------------------------------------------------------
# bitsandbytes' nf4 Linear4bit, taken as it is
# ----------------------------------------------------------------------------

def _linear4bit(linear: nn.Linear, quant_type="nf4", compress_statistics=True):
    bnb = pytest.importorskip("bitsandbytes")
    if DEVICE.type != "cpu":
        pytest.skip("bitsandbytes' Linear4bit is built on CPU here")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type=quant_type,
                              compress_statistics=compress_statistics)
    layer.load_state_dict(linear.state_dict())
    return layer.to(DEVICE)  # (quantizes the weight)


@pytest.mark.parametrize("quant_type, compress_statistics", [("nf4", True), ("nf4", False), ("fp4", True),
                                                             ("fp4", False)])
def test_a_bitsandbytes_4bit_linear4bit_is_fused_as_it_is(quant_type, compress_statistics):
    """nf4, and fp4 (transformers' default bnb_4bit_quant_type) with its code
    book (the layer's weight_code)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)
    linear = nn.Linear(128, 40, device=DEVICE, dtype=BF16)
    b4 = _linear4bit(linear, quant_type=quant_type, compress_statistics=compress_statistics)
    layer = LoRALinear.from_linear(b4, r=4, alpha=8)
    assert layer.quantized and layer.weight.dtype == torch.uint8 and layer.weight.shape == (40, 64)
    assert f"base={quant_type}" in repr(layer) and (layer.weight_code is None) == (quant_type == "nf4")
    if quant_type == "fp4":
        assert torch.equal(layer.weight_code, torch.tensor(fused_lora.quant.FP4_CODE, device=DEVICE))
    assert layer.weight.data_ptr() == b4.weight.data_ptr()  # (its bytes, shared)
    assert layer.in_features == 128 and layer.lora_A.dtype == b4.weight.quant_state.dtype
    assert layer.bias is b4.bias and layer.bias.dtype == F32  # (bitsandbytes keeps it fp32: cast in the forward)
    deq = bnb.functional.dequantize_4bit(b4.weight.data, b4.weight.quant_state).to(BF16)
    assert torch.equal(_deq(layer, BF16), deq)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(3, 5, 128, device=DEVICE, dtype=BF16)
    assert_close(layer(x), _reference(layer, x), BF16, "y")
    with torch.no_grad(), fused_lora.disable_adapters(layer):  # (the base alone: bitsandbytes' own forward)
        base = layer(x)
        assert torch.equal(base, F.linear(x, deq, b4.bias.to(BF16)))
        assert_close(base, copy.deepcopy(b4)(x).double(), BF16, "bitsandbytes' forward")  # (a copy: it repacks)
    multi = MultiLoRALinear.from_linear(b4, [2, 3])
    assert multi.quantized and multi.in_features == 128 and multi.weight.data_ptr() == b4.weight.data_ptr()
    assert (multi.weight_code is None) == (quant_type == "nf4") and f"base={quant_type}" in repr(multi)
    with torch.no_grad():
        assert_close(multi(x, torch.full((3,), -1, device=DEVICE)), base.double(), BF16, "multi, the base rows")


@pytest.mark.parametrize("x_dtype", [F32, F16])
def test_a_linear4bit_computes_in_its_compute_dtype(x_dtype):
    """A Linear4bit of ``compute_dtype=bfloat16`` fed fp32 (QLoRA's prepared
    model) or fp16 x: bitsandbytes casts x to bf16 and its output back; the
    fused layers take its compute dtype and do the same, the whole layer
    (adapters too) and its gradients, bit for bit the layer run on bf16 x;
    the base alone is bitsandbytes' forward. ``compute_dtype`` is a
    quantized base's alone, a dtype of three."""
    torch.manual_seed(7)
    linear = nn.Linear(128, 40, device=DEVICE, dtype=BF16)
    b4 = _linear4bit(linear)
    b4.train()  # (in eval mode its CPU forward repacks the weights for its own kernels)
    for layer, ids in ((LoRALinear.from_linear(b4, r=4, alpha=8, dropout=0.25), None),
                       (MultiLoRALinear.from_linear(b4, [2, 3], dropout=0.25), torch.tensor([1, -1, 0]))):
        assert layer.compute_dtype == BF16 and f"compute_dtype={BF16}" in repr(layer)
        with torch.no_grad():
            for b in [layer.lora_B] if ids is None else layer.lora_B:
                b.normal_(0, 0.5)
        x = torch.randn(3, 5, 128, device=DEVICE, dtype=x_dtype)
        x16 = x.detach().to(BF16).requires_grad_()
        x.requires_grad_()
        grads = []
        for inp in (x, x16):
            torch.manual_seed(3)  # (the same dropout mask)
            y = layer(inp) if ids is None else layer(inp, ids)
            assert y.dtype == inp.dtype
            y.backward(torch.ones_like(y))
            grads.append([inp.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad])
            layer.zero_grad()
            if inp is x:
                y32 = y
        assert torch.equal(y32, y.to(x_dtype)) and grads[0][0].dtype == x_dtype
        assert torch.equal(grads[0][0], grads[1][0].to(x_dtype))
        assert all(torch.equal(a, b) for a, b in zip(grads[0][1:], grads[1][1:]))
        with torch.no_grad(), fused_lora.disable_adapters(layer):
            assert torch.equal(layer(x), copy.deepcopy(b4)(x))
    with pytest.raises(TypeError, match=r"compute_dtype must be None or one of .*got 'bf16'"):
        layer.compute_dtype = "bf16"
    with pytest.raises(TypeError, match=r"compute_dtype must be None or one of .*got torch.float64"):
        layer.compute_dtype = torch.float64
    with pytest.raises(ValueError, match=r"LoRALinear.compute_dtype=torch.bfloat16: a floating-point base computes"):
        LoRALinear(8, 4, r=2).compute_dtype = BF16
    layer.compute_dtype = None  # (x's dtype again)
    assert layer(x16, torch.tensor([1, -1, 0])).dtype == BF16 and layer(x.detach(), torch.tensor([0, 0, 1])).dtype \
        == x_dtype


def test_inject_takes_a_model_of_nf4_and_fp4_linear4bit():
    torch.manual_seed(5)
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE)  # (tiny_llama's, wider: rows of whole 64-value blocks)
    float_model = copy.deepcopy(model)
    for name, quant_type in (("model.layers.0.self_attn.q_proj", "nf4"), ("model.layers.1.mlp.down_proj", "fp4")):
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, _linear4bit(model.get_submodule(name), quant_type=quant_type))
    straddling = _linear4bit(nn.Linear(32, 16, device=DEVICE))  # (a block over two rows)
    with pytest.raises(TypeError, match=r"quant_type 'nf4', blocksize 64, shape \(16, 32\): the fused layers read "
                                        r"nf4 and fp4 whose rows are whole blocks"):
        LoRALinear.from_linear(straddling, r=4)
    names = fused_lora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8)
    assert len(names) == 4 and all(model.get_submodule(n).quantized == ("layers.0.self_attn.q_proj" in n
                                                                         or "layers.1.mlp.down_proj" in n)
                                   for n in names)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            if layer.quantized:
                float_model.get_submodule(name).weight.copy_(_deq(layer, F32))
    fused_lora.inject(float_model, ["q_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for name in names:
            nn.init.normal_(model.get_submodule(name).lora_B, 0, 0.3)
            float_model.get_submodule(name).lora_A.copy_(model.get_submodule(name).lora_A)
            float_model.get_submodule(name).lora_B.copy_(model.get_submodule(name).lora_B)
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    assert_close(model(input_ids=ids).logits, float_model(input_ids=ids).logits.double(), F32, "logits")


def _saved_llama(path, seed: int, layers: int):
    """A tiny Llama (vocabulary 61) saved to ``path`` by transformers."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _in_4_bits(quant_type: str = "nf4"):
    """transformers' 4-bit loading (QLoRA's, computing in fp32), on CPU here."""
    pytest.importorskip("bitsandbytes")
    if DEVICE.type != "cpu":
        pytest.skip("bitsandbytes' 4-bit loading is checked on CPU here")
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_compute_dtype=F32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_inject_fuses_a_model_transformers_loaded_in_4_bits(tmp_path, quant_type):
    """``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4"))`` (QLoRA's loading, on CPU; and "fp4",
    transformers' default): inject fuses every Linear4bit as it is; with a
    fresh adapter it is the float model on Ŵ, and the adapters train."""
    quantization = _in_4_bits(quant_type)
    import transformers

    _saved_llama(tmp_path, 6, 2)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization,
                                                          device_map="cpu")
    ids = torch.randint(0, 61, (2, 9))
    bytes_of = {n: m.weight.data_ptr() for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    names = fused_lora.inject(model, "all-linear", r=4, alpha=8)
    assert sorted(names) == sorted(bytes_of) and len(names) == 14
    assert all(model.get_submodule(n).quantized and model.get_submodule(n).weight.data_ptr() == bytes_of[n]
               and f"base={quant_type}" in repr(model.get_submodule(n)) for n in names)
    # the float model holding Ŵ (bitsandbytes' dequantize_4bit, bit for bit: test_nf4.py); its own CPU
    # forward would not do (it repacks the weights for its CPU kernels, their absmax in bf16)
    float_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            float_model.get_submodule(name).weight.copy_(_deq(layer, F32))
        assert_close(model(input_ids=ids).logits, float_model(input_ids=ids).logits.double(), F32,
                     "a fresh adapter: the model on Ŵ")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(model.get_submodule(n).lora_B.grad is not None for n in names)
    # back: unload gives the Linear4bit modules back, their weights as they were; to_peft puts PEFT's 4-bit
    # layers (QLoRA's) on them, over the fused layers' adapters; merging would requantize: refused
    model.train()  # (in eval mode bitsandbytes' CPU forward repacks its weights for its own kernels)
    fused, base = trained_logits(model, names, ids)
    modules = {n: m for n, m in transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu").named_modules() if n in bytes_of}
    originals = {n: fused_lora.layer.held_module(model.get_submodule(n)) for n in names}
    # (kept aside for unload, having let go of the bytes the fused layer reads: nothing else keeps them whole,
    # which FSDP2's fully_shard needs to free them)
    assert all(type(m).__name__ == "Linear4bit" and m.weight.numel() == 0 for m in originals.values())
    with pytest.raises(ValueError, match=r"merge_and_unload: .* hold a quantized base.* comes back with unload"):
        fused_lora.merge_and_unload(model)
    merged = copy.deepcopy(model)  # (QLoRA's merged model in floating point: Ŵ + s·B·A)
    fused_lora.merge_and_unload(merged, dequantize=F32)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, fused.double(), F32, "merged into Ŵ")
    peft_model = fused_lora.to_peft(copy.deepcopy(model))
    assert model.is_quantized is False and peft_model.base_model.model.is_quantized is True  # (transformers' flag)
    layer = peft_model.base_model.model.get_submodule(names[0])
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer.base_layer).__name__ == "Linear4bit"
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids).logits, fused.double(), F32, "PEFT's QLoRA model")
    changed = model.get_submodule(names[1])
    scale = changed.weight_scale
    changed.weight_scale = scale * 2  # (other scales than the Linear4bit's absmax: it cannot take them)
    with pytest.raises(ValueError, match=rf"unload: {names[1]}: its {quant_type} base holds other values than the "
                                         r"Linear4bit"):
        fused_lora.unload(model)
    assert fused_lora.integration.fused_layers(model).keys() == set(names) and originals[names[1]].weight.numel() == 0
    changed.weight_scale = scale
    kept = changed.weight
    changed.weight = nn.Parameter(kept.detach()[:, :16].clone(), requires_grad=False)  # (bytes of another size)
    with pytest.raises(ValueError, match=rf"unload: {names[1]}: its {quant_type} base \({kept.shape[0]}, 16\) is not the size of "
                                         r"the Linear4bit it came from"):
        fused_lora.unload(model)
    changed.weight = nn.Parameter(kept.detach().to("meta"), requires_grad=False)  # (as if moved to another device)
    with pytest.raises(ValueError, match=rf"unload: {names[1]}: its {quant_type} base is on meta, and the "
                                         r"Linear4bit it came from, kept aside, holds that weight on cpu: move the "
                                         r"model back "
                                         r"\(model.to\('cpu'\)\)"):
        fused_lora.unload(model)
    changed.weight = kept
    assert sorted(fused_lora.unload(model)) == sorted(names)
    assert all(model.get_submodule(n) is originals[n] and originals[n].weight.data_ptr() == bytes_of[n]
               for n in names)  # (its bytes back)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, base.double(), F32, "bitsandbytes' own model again")
        for name, module in modules.items():  # (as loaded: the same bytes)
            assert torch.equal(model.get_submodule(name).weight, module.weight)
    # inject_multi likewise: the Linear4bit's compute dtype, and the module back with unload
    fused_lora.inject_multi(model, "all-linear", ranks=[2, 3])
    assert all(model.get_submodule(n).compute_dtype == F32 and fused_lora.layer.held_module(
        model.get_submodule(n)) is originals[n] for n in names)
    fused_lora.unload(model)
    assert all(model.get_submodule(n) is originals[n] for n in names)
    # a model that ran on CPU first holds weights repacked for bitsandbytes' CPU kernels: refused, with why
    ran = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    with torch.no_grad():
        ran(input_ids=ids)
    states = [m.weight.quant_state for m in ran.modules() if type(m).__name__ == "Linear4bit"]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        # (bitsandbytes repacks only on a CPU with AVX512-BF16 (its has_avx512bf16): elsewhere, mark one
        # weight as its repacking does, which is what the refusal reads)
        states[0].packing_format_for_cpu = True
    with pytest.raises(TypeError, match=r"repacked for bitsandbytes' CPU kernels .* fuse the model before running"):
        fused_lora.inject(ran, "all-linear", r=4)


@pytest.mark.parametrize("quantizer", ["bitsandbytes-nf4", "bitsandbytes-int8", "torchao-int8"])
def test_a_dequantized_merge_of_a_transformers_quantized_model_saves_a_float_checkpoint(tmp_path, quantizer):
    """``merge_and_unload(model, dequantize=...)`` on a model transformers
    loaded quantized (bitsandbytes' 4 and 8 bits, torchao's int8), every quantized
    layer fused: the model forgets its quantization as transformers' own
    ``dequantize()`` does, so ``save_pretrained`` writes the float model it
    now is and ``from_pretrained`` loads it back as one, the same logits.
    (With the quantization config kept, transformers built bitsandbytes'
    layers again over the float weights, which failed to run; torchao's
    model came back float, still claiming to be quantized.) With quantized
    layers left unfused (QLoRA adapted on some layers), the config stays,
    the merged layers added to the modules it leaves unquantized: the
    mixed checkpoint loads as it was saved (before, only a warning)."""
    if DEVICE.type != "cpu":
        pytest.skip("transformers' quantized loading is checked on CPU here")
    transformers = pytest.importorskip("transformers")
    if quantizer == "bitsandbytes-nf4":
        quantization = _in_4_bits()
    elif quantizer == "bitsandbytes-int8":
        pytest.importorskip("bitsandbytes")
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        torchao = pytest.importorskip("torchao")
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            quantization = transformers.TorchAoConfig(Int8WeightOnlyConfig())
        except (ImportError, ValueError) as err:
            pytest.skip(f"torchao {torchao.__version__} with transformers {transformers.__version__}: {err}")
    _saved_llama(tmp_path / "base", 9, 1)

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                             device_map="cpu")

    model = load()
    assert model.is_quantized and model.config.quantization_config is not None
    names = fused_lora.inject(model, "all-linear", r=4, alpha=8)
    assert len(names) == 7 and all(model.get_submodule(n).quantized for n in names)
    with torch.no_grad():
        for name in names:
            nn.init.normal_(model.get_submodule(name).lora_B, 0, 0.3)
    fused_lora.merge_and_unload(model, dequantize=F32)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False)
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not getattr(loaded, "is_quantized", False) and all(type(loaded.get_submodule(n)) is nn.Linear for n in names)
    for name in names:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # quantized layers left unfused (QLoRA adapted on some layers): the config stays (it describes them), the
    # merged layers added to the modules it does not quantize, so that the mixed checkpoint loads as it is
    for merge in (fused_lora.merge_and_unload, fused_lora.unload):
        partial = load()
        fused_lora.inject(partial, ["q_proj", "down_proj"], r=4)
        with torch.no_grad():
            for layer in partial.modules():
                if isinstance(layer, fused_lora.LoRALinear):
                    nn.init.normal_(layer.lora_B, 0, 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no warning: the checkpoint is a loadable mix)
            merge(partial, dequantize=F32)
        assert partial.is_quantized and partial.config.quantization_config is not None
        floated = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
        assert all(type(partial.get_submodule(n)) is nn.Linear for n in floated)
        partial.save_pretrained(tmp_path / "mixed")
        mixed = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "mixed", device_map="cpu")
        for n in floated:
            weight = mixed.get_submodule(n).weight
            assert type(mixed.get_submodule(n)) is nn.Linear and type(weight) is nn.Parameter, n
            assert torch.equal(weight, partial.get_submodule(n).weight), n
        for n in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"):  # (the rest as quantized)
            was, now = partial.get_submodule(n), mixed.get_submodule(n)
            assert type(now) is type(was) and type(now.weight) is type(was.weight), n
            assert type(was.weight) is not nn.Parameter, n  # (Params4bit, Int8Params, torchao's Int8Tensor)
        assert type(mixed.lm_head) is nn.Linear  # (the quantizer's own choice kept beside the merged layers)
        with torch.no_grad():
            assert torch.equal(mixed(input_ids=ids).logits, partial(input_ids=ids).logits)


def test_the_merged_layers_join_any_quantization_config_s_list_of_modules_not_to_quantize():
    """``_skip_in_config`` on configs as objects and as dicts: the list the
    quantizer used where the config names none (its default, kept), the
    config's own where it names some; False, nothing changed, where the
    config has no such list (the merge then warns)."""
    import types
    from fused_lora.integration import _skip_in_config

    def owner(config, default):
        return types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=config),
                                     hf_quantizer=types.SimpleNamespace(modules_to_not_convert=default))

    bnb = types.SimpleNamespace(llm_int8_skip_modules=None)
    assert _skip_in_config(owner(bnb, ["lm_head"]), ["a.q", "a.v"])
    assert bnb.llm_int8_skip_modules == ["lm_head", "a.q", "a.v"]
    named = {"modules_to_not_convert": ["head", "a.q"]}
    assert _skip_in_config(owner(named, ["other"]), ["a.q", "a.k"])
    assert named["modules_to_not_convert"] == ["head", "a.q", "a.k"]
    neither = types.SimpleNamespace(bits=4)
    assert not _skip_in_config(owner(neither, ["lm_head"]), ["a.q"]) and vars(neither) == {"bits": 4}


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(0, 61, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_trainer_trains_an_injected_model_loaded_in_4_or_8_bits(tmp_path, bits):
    """QLoRA through inject under transformers' ``Trainer`` (4 bits; and
    bitsandbytes' LLM.int8, 8): the Trainer
    refuses a model loaded quantized with no adapters on it ("purely
    quantized"), which it tells by a ``PeftModel`` alone; once inject fused
    its layers the model reads ``is_quantized`` False, so the Trainer trains
    it, checkpoints it, and a run resumed from the first step's checkpoint
    ends with the uninterrupted run's adapters, bit for bit. unload gives
    back the Linear4bit (Linear8bitLt) layers and ``is_quantized`` (True)."""
    quantization = _in_4_bits()
    if bits == 8:
        import transformers

        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    import transformers

    _saved_llama(tmp_path / "base", 3, 1)
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True)

    def model(seed=0):
        torch.manual_seed(seed)  # (the adapters' init: a resumed run loads them from its checkpoint)
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                             device_map="cpu")

    plain = model()
    with pytest.raises(ValueError, match="purely quantized"):  # (transformers' own refusal, without adapters)
        transformers.Trainer(model=plain, args=args, train_dataset=_Tokens())

    def run(seed, resume_from=None):
        m = model(seed)
        names = fused_lora.inject(m, "all-linear", r=4, alpha=8, dropout=0.1)
        assert len(names) == 7 and all(m.get_submodule(n).quantized for n in names)
        assert m.is_quantized is False and m.hf_quantizer is not None and m.config.quantization_config is not None
        transformers.Trainer(model=m, args=args, train_dataset=_Tokens()).train(resume_from_checkpoint=resume_from)
        return m, names

    trained, names = run(0)
    adapters = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    assert len(adapters) == 2 * 7 and all(p.abs().max() > 0 for n, p in adapters.items() if n.endswith("lora_B"))
    resumed, _ = run(1, resume_from=str(tmp_path / "run" / "checkpoint-1"))
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, adapters[n]), n
    fused_lora.unload(trained)
    assert trained.is_quantized is True and all(
        type(trained.get_submodule(n)).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt") for n in names)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=trained, args=args, train_dataset=_Tokens())
