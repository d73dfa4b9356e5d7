"""``from_peft`` over PEFT's LoRA layers on a quantized base: QLoRA's model
(transformers' 4-bit load, ``prepare_model_for_kbit_training``,
``get_peft_model``: PEFT's bitsandbytes ``Linear4bit`` layers), its 8-bit
one (``Linear8bitLt``) and torchao's int8 weight-only one (PEFT's
``TorchaoLoraLinear``). The fused
layers read PEFT's weights as they are; each is compared with PEFT's own
layer and with the float64 reference; PEFT's methods, ``to_peft`` and what
is refused."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import LoRALinear, reference
from lora_testing import DEVICE, assert_close, tiny_llama

peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
transformers = pytest.importorskip("transformers")

F32, BF16 = torch.float32, torch.bfloat16


def _lora_layers(model) -> dict:
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _trained(peft_model, seed=2):
    """Every lora_B away from 0 (a trained adapter), the same values for the same model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return peft_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved in bf16, its linears of whole 64-value blocks (nothing downloaded)."""
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(cfg).to(BF16).save_pretrained(path)
    return path


def _qlora(path, compute_dtype, use_dora=False, quant_type="nf4", checkpointing=False):
    """QLoRA's recipe on CPU: the model loaded in 4 bits (double quantization)
    from ``compute_dtype`` weights, prepared for k-bit training (what is not
    quantized cast to fp32: fp32 activations), LoRA on every linear, lora_B
    trained. (Loaded from another dtype than it computes in, bitsandbytes
    rounds Ŵ to that dtype first: fused_lora.layer._QuantizedBase.)"""
    pytest.importorskip("bitsandbytes")
    if DEVICE.type != "cpu":
        pytest.skip("bitsandbytes' 4-bit loading is checked on CPU here")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                   bnb_4bit_compute_dtype=compute_dtype,
                                                   bnb_4bit_use_double_quant=True)
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu",
                                                          dtype=compute_dtype)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                 gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    # (training mode, as a Trainer sets it: in eval mode bitsandbytes' CPU forward repacks its weights for its own
    # kernels, which compute otherwise; dropout is 0)
    return _trained(peft.get_peft_model(model, config)).train()


@pytest.mark.parametrize("compute_dtype, use_dora, checkpointing, quant_type",
                         [(F32, False, False, "nf4"), (F32, False, True, "nf4"), (F32, True, False, "nf4"),
                          (BF16, False, True, "nf4"), (BF16, True, True, "nf4"), (F32, False, False, "fp4"),
                          (F32, True, True, "fp4")], ids=str)
def test_from_peft_fuses_qlora_layers_over_their_own_weights(llama_dir, compute_dtype, use_dora, checkpointing,
                                                             quant_type):
    """Every PEFT bitsandbytes 4-bit layer converts (nf4, and fp4 with its
    code book), over PEFT's bytes (shared) with its compute dtype; each fused layer computes what PEFT's does, and
    (LoRA) the float64 reference on Ŵ; the model's logits and adapter
    gradients are PEFT's (fp32 compute), with activation checkpointing too
    (``prepare_model_for_kbit_training``'s default); ``save_pretrained``
    writes PEFT's files; ``to_peft`` puts PEFT's layers back, computing as
    before."""
    bnb = pytest.importorskip("bitsandbytes")  # (not on our GPU machine, which cannot install it)
    ref, model = (_qlora(llama_dir, compute_dtype, use_dora, quant_type, checkpointing) for _ in range(2))
    originals = _lora_layers(model)
    assert len(originals) == 14 and all(type(m).__module__ == "peft.tuners.lora.bnb" for m in originals.values())
    bases = {n: m.get_base_layer().weight for n, m in originals.items()}
    bytes_of = {n: w.data_ptr() for n, w in bases.items()}
    deqs = {n: bnb.functional.dequantize_4bit(w.data, w.quant_state).to(compute_dtype) for n, w in bases.items()}
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, original in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and layer.quantized and layer.use_dora == use_dora
        assert layer.weight.data_ptr() == bytes_of[name] and layer.weight.dtype == torch.uint8
        assert bases[name].numel() == 0  # (PEFT's weight let go of the bytes the fused layer reads)
        assert layer.compute_dtype == compute_dtype and layer.weight_scale.dtype == F32
        assert f"base={quant_type}" in repr(layer)
        assert layer.lora_A is original.lora_A["default"].weight and layer.lora_B is original.lora_B["default"].weight
        # (the absmax double quantization left in 8 bits, dequantised: bitsandbytes' own Ŵ)
        assert torch.equal(fused_lora.dequantize_4bit(layer.weight, layer.weight_scale, compute_dtype,
                                                      layer.weight_code), deqs[name])

    # one layer, fp32 x (the prepared model's activations) against PEFT's layer and the reference
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    layer, peft_layer = model.get_submodule(name), ref.get_submodule(name)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == F32
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == F32 and layer.lora_A.grad is not None and layer.lora_B.grad is not None
    with torch.no_grad():
        assert_close(y, peft_layer(x).double(), compute_dtype, "PEFT's layer")
        if not use_dora:
            deq = fused_lora.dequantize_4bit(layer.weight, layer.weight_scale, compute_dtype, layer.weight_code)
            bias = None if layer.bias is None else layer.bias.double()
            expected = reference.lora_linear_checked(x.to(compute_dtype).double(), deq.double(),
                                                     layer.lora_A.to(compute_dtype).double(),
                                                     layer.lora_B.to(compute_dtype).double(), bias, layer.scaling, 0.0,
                                                     None)
            assert_close(y, expected, compute_dtype, "the float64 reference")
    layer.zero_grad()

    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = ref(input_ids=ids).logits
    out, ref_out = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    out.loss.backward()
    ref_out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == (42 if use_dora else 28)
    if compute_dtype == F32:  # (in bf16 PEFT's fp32 adapter term and the fused bf16 output part by a rounding a layer)
        assert_close(out.logits, ref_out.logits.double(), F32, "logits")
        with torch.no_grad(), model.disable_adapter(), ref.disable_adapter():  # (TRL's DPO reference pass)
            assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits.double(), F32, "the base model")
        ref_grads = dict(ref.named_parameters())
        for n, g in grads.items():
            peft_name = n.replace(".lora_A", ".lora_A.default.weight").replace(".lora_B", ".lora_B.default.weight")
            peft_name = peft_name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
            assert_close(g, ref_grads[peft_name].grad.double(), F32, n)

    files, ref_files = (llama_dir.parent / f"{who}-{compute_dtype}-{use_dora}-{checkpointing}-{quant_type}"
                        for who in "ab")
    model.save_pretrained(files)
    ref.save_pretrained(ref_files)
    from safetensors.torch import load_file

    saved, ref_saved = (load_file(p / "adapter_model.safetensors") for p in (files, ref_files))
    assert saved.keys() == ref_saved.keys() and all(torch.equal(saved[k], ref_saved[k]) for k in saved)

    back = fused_lora.to_peft(model)
    assert back is model and _lora_layers(model) == originals
    assert all(originals[n].get_base_layer().weight is bases[n] for n in originals)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_qlora_merging_is_refused_and_to_peft_wants_peft_weights_back(llama_dir):
    """``merge_adapter()`` would requantize the 4-bit base: refused, nothing
    merged (``merge_and_unload()`` goes back to PEFT, which merges as it
    does); a fused layer whose base holds other values than PEFT's weight
    cannot give it back: ``to_peft`` refuses, changing nothing (the same
    values in other tensors go back as PEFT's weight); PEFT's base keys in a
    state dict stay PEFT's (another layout than the fused layer's)."""
    model = _qlora(llama_dir, BF16)
    ref = _qlora(llama_dir, BF16)
    originals = _lora_layers(model)
    fused_lora.from_peft(model)
    layers = fused_lora.integration.fused_layers(model)
    with pytest.raises(ValueError, match=r"merge_adapter: .*q_proj.* hold a quantized base \(nf4.*requantize"):
        model.merge_adapter()
    assert not any(layer.merged for layer in layers.values())
    # a state dict from before the conversion: the adapters load, PEFT's 4-bit state is not the fused layers'
    state = ref.state_dict()
    result = model.load_state_dict(state, strict=False)
    name = "base_model.model.model.layers.1.mlp.down_proj"
    assert f"{name}.base_layer.weight" in result.unexpected_keys and f"{name}.weight_scale" in result.missing_keys
    assert torch.equal(model.get_submodule(name).lora_B, ref.get_submodule(name).lora_B["default"].weight)
    # PEFT's weight, kept aside, let go of its bytes (the fused layer's: nothing else keeps them whole, which
    # FSDP2's fully_shard needs to free them); other scales than its absmax are refused, nothing changed; a base
    # replaced since from_peft (other tensors, as a model moved away and back; other bytes) goes back as PEFT's
    # weight, with those bytes
    layer = model.get_submodule(name)
    base = originals[name].get_base_layer().weight
    assert base.numel() == 0
    scale = layer.weight_scale
    layer.weight_scale = scale * 2
    with pytest.raises(ValueError, match=rf"to_peft: {name}: its nf4 base holds other values than the Linear4bit"):
        fused_lora.to_peft(model)
    assert fused_lora.integration.fused_layers(model).keys() == layers.keys() and base.numel() == 0
    with pytest.raises(ValueError, match=r"its nf4 base holds other values"):
        model.merge_and_unload()
    assert fused_lora.integration.fused_layers(model).keys() == layers.keys()
    layer.weight_scale = scale
    replaced = layer.weight.detach().clone()
    replaced[0, 0] ^= 0x11
    layer.weight = nn.Parameter(replaced, requires_grad=False)
    fused_lora.to_peft(model)
    assert _lora_layers(model) == originals and originals[name].get_base_layer().weight is base
    assert torch.equal(base.data.view(torch.uint8).reshape(replaced.shape), replaced)
    other = _qlora(llama_dir, BF16)
    fused_lora.from_peft(other)
    with pytest.warns(UserWarning, match="rounding errors"):  # (to_peft, then PEFT's own: 4-bit layers requantized)
        merged = other.merge_and_unload()
    assert not fused_lora.integration.fused_layers(merged) and not _lora_layers(merged)
    assert type(merged.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear4bit"


@pytest.mark.parametrize("use_dora, ran", [(False, True), (True, False)], ids=["lora-ran", "dora"])
def test_from_peft_fuses_peft_s_8bit_layers_over_their_own_weights(llama_dir, use_dora, ran):
    """PEFT's bitsandbytes 8-bit layers (``get_peft_model`` on a model
    transformers loaded with ``load_in_8bit``, prepared for k-bit training;
    ``ran``: run once first, its row scales then in the layers' state; not
    with DoRA, where PEFT's own model then fails in bitsandbytes' CPU
    forward): converted over
    bitsandbytes' int8 rows (shared) and ``SCB / 127``; each fused layer is
    the float64 reference on Ŵ; the model's logits and adapter gradients are
    PEFT's (in training mode, where bitsandbytes' CPU forward is the
    weight-only product); ``merge_adapter()`` refused; ``save_pretrained``
    writes PEFT's files; ``to_peft`` puts PEFT's layers back, bit for bit."""
    pytest.importorskip("bitsandbytes")
    if DEVICE.type != "cpu":
        pytest.skip("bitsandbytes' 8-bit loading is checked on CPU here")
    ids = torch.randint(0, 61, (2, 9))

    def load():
        model = transformers.LlamaForCausalLM.from_pretrained(
            llama_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
            dtype=F32)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if ran:
            with torch.no_grad():
                model(input_ids=ids)
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
        return _trained(peft.get_peft_model(model, config)).train()

    ref, model = load(), load()
    originals = _lora_layers(model)
    assert len(originals) == 14 and all(type(m).__name__ == "Linear8bitLt" and type(m).__module__ ==
                                        "peft.tuners.lora.bnb" for m in originals.values())
    bases = {n: m.get_base_layer() for n, m in originals.items()}
    assert all((b.weight.SCB is None) == ran for b in bases.values())
    bytes_of = {n: b.weight.data_ptr() for n, b in bases.items()}
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, base in bases.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and layer.quantized and layer.use_dora == use_dora
        assert layer.weight.data_ptr() == bytes_of[name] and layer.weight.dtype == torch.int8
        assert base.weight.numel() == 0 and (not ran or base.state.CB.numel() == 0)  # (let go of: the layer's now)
        scb = base.state.SCB if ran else base.weight.SCB
        assert torch.equal(layer.weight_scale, scb * (1 / 127)) and layer.compute_dtype is None
    out, ref_out = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    before = ref_out.logits.detach()
    out.loss.backward()
    ref_out.loss.backward()
    assert_close(out.logits, before.double(), F32, "logits")
    ref_grads = dict(ref.named_parameters())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == (42 if use_dora else 28)
    for n, g in grads.items():
        peft_name = n.replace(".lora_A", ".lora_A.default.weight").replace(".lora_B", ".lora_B.default.weight")
        peft_name = peft_name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        assert_close(g, ref_grads[peft_name].grad.double(), F32, n)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out.logits)  # (again, the same)
        if not use_dora:  # (PEFT's DoRA over a Linear8bitLt fails at its second forward on CPU: bitsandbytes'
            # state loses SCB; a fused layer against PEFT's and the float64 reference)
            name = "base_model.model.model.layers.1.mlp.down_proj"
            layer = model.get_submodule(name)
            x = torch.randn(3, 5, 128)
            assert_close(layer(x), ref.get_submodule(name)(x).double(), F32, "PEFT's layer")
            expected = reference.lora_linear_checked(
                x.double(), fused_lora.dequantize_int8(layer.weight, layer.weight_scale, torch.float64),
                layer.lora_A.double(), layer.lora_B.double(), None, layer.scaling, 0.0, None)
            assert_close(layer(x), expected, F32, "the float64 reference")
    with pytest.raises(ValueError, match=r"merge_adapter: .* hold a quantized base \(int8"):
        model.merge_adapter()
    files, ref_files = (llama_dir.parent / f"{who}-8bit-{use_dora}" for who in "ab")
    model.save_pretrained(files)
    ref.save_pretrained(ref_files)
    from safetensors.torch import load_file

    saved, ref_saved = (load_file(p / "adapter_model.safetensors") for p in (files, ref_files))
    assert saved.keys() == ref_saved.keys() and all(torch.equal(saved[k], ref_saved[k]) for k in saved)
    assert fused_lora.to_peft(model) is model and _lora_layers(model) == originals
    assert all(originals[n].get_base_layer() is bases[n] and bases[n].weight.data_ptr() == bytes_of[n]
               for n in originals)  # (its bytes back)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_from_peft_fuses_torchao_int8_weight_only_layers():
    """PEFT's ``TorchaoLoraLinear`` over torchao's int8 weight-only weights:
    converted over torchao's own int8 data and scales; the model computes
    what PEFT's does; ``to_peft`` gives the layers back bit for bit;
    ``merge_adapter()`` is refused."""
    torchao = pytest.importorskip("torchao")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        pytest.skip(f"torchao {torchao.__version__}: {err}")
    model = tiny_llama(seed=7)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.endswith(("q_proj", "up_proj")))
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))}
    if not all(fused_lora.quant.int8_rows_of(w) is not None for w in weights.values()):
        pytest.skip(f"torchao {torchao.__version__} holds Int8WeightOnlyConfig's weights in a layout fused_lora "
                    "does not read")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "v_proj"])
    try:
        with warnings.catch_warnings():  # (PEFT's: without get_apply_tensor_subclass, its merge() cannot requantize)
            warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without")
            peft_model = _trained(peft.get_peft_model(model, config))
    except TypeError as err:  # (PEFT 0.19 and 0.20 with torchao 0.18: its torchao layer's constructor changed)
        pytest.skip(f"PEFT {peft.__version__} cannot put LoRA on this torchao's weights ({err})")
    ref = copy.deepcopy(peft_model)
    originals = _lora_layers(peft_model)
    bytes_of = {n: w.qdata.data_ptr() for n, w in weights.items()}
    report = fused_lora.from_peft(peft_model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, weight in weights.items():
        layer = peft_model.get_submodule("base_model.model." + name)
        assert layer.quantized and layer.weight.data_ptr() == bytes_of[name] and weight.qdata.numel() == 0
        assert layer.compute_dtype is None  # (torchao's int8 computes in x's dtype)
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        assert_close(peft_model(input_ids=ids).logits, expected.double(), F32, "logits")
    with pytest.raises(ValueError, match=r"merge_adapter: .* hold a quantized base \(int8"):
        peft_model.merge_adapter()
    fused_lora.to_peft(peft_model)
    assert _lora_layers(peft_model) == originals
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "qdora-second"])
def test_from_peft_serves_several_qlora_adapters_from_one_4bit_base(llama_dir, tmp_path, dora):
    """QLoRA's model holding two adapters (``add_adapter``; ``dora``: the
    second DoRA, its norms read off the NF4 bytes): each layer one
    :class:`fused_lora.MultiLoRALinear` over PEFT's 4-bit bytes (shared, its
    compute dtype kept); each adapter made active gives PEFT's logits and
    gradients (train mode: in eval mode bitsandbytes' CPU forward repacks its
    weights for kernels that compute otherwise; dropout is 0); in eval mode a
    batch that mixes them (``adapter_names``) gives each sample what its
    adapter gave alone; ``save_pretrained`` writes PEFT's files; ``to_peft``
    gives PEFT's weights their bytes back."""
    ref, model = (_qlora(llama_dir, F32) for _ in range(2))
    for m in (ref, model):
        torch.manual_seed(7)  # (the same lora_A for both)
        m.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"],
                                                use_dora=dora))
        _trained(m, seed=4)
    originals = _lora_layers(model)
    bytes_of = {n: m.get_base_layer().weight.data_ptr() for n, m in originals.items()}
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, original in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, fused_lora.MultiLoRALinear) and layer.quantized and "base=nf4" in repr(layer)
        assert layer.weight.data_ptr() == bytes_of[name] and layer.compute_dtype == F32
        assert original.get_base_layer().weight.numel() == 0  # (kept aside, PEFT's weight let go of the bytes)
        assert layer.ranks == (4, 2 if "second" in original.lora_A else 0)
        assert layer.use_dora == (False, dora and "second" in original.lora_A)
    ids = torch.randint(0, 61, (3, 9))
    alone = {}
    for adapter in ("second", "default"):
        model.set_adapter(adapter)
        ref.set_adapter(adapter)
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
        out, ref_out = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
        out.loss.backward()
        ref_out.loss.backward()
        assert_close(out.logits, ref_out.logits.double(), F32, f"logits of {adapter}")
        alone[adapter] = ref_out.logits.detach()
        layer, peft_layer = (m.get_submodule("base_model.model.model.layers.1.self_attn.v_proj") for m in (model, ref))
        i = 1 if adapter == "second" else 0
        assert_close(layer.lora_B[i].grad, peft_layer.lora_B[adapter].weight.grad.double(), F32, f"dB of {adapter}")
        assert layer.lora_B[1 - i].grad is None
    with torch.no_grad(), ref.disable_adapter():
        alone["__base__"] = ref(input_ids=ids).logits
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        mixed = model.eval()(input_ids=ids, adapter_names=names).logits
    for row, adapter in enumerate(names):
        assert_close(mixed[row], alone[adapter][row].double(), F32, f"sample {row} ({adapter})")

    model.save_pretrained(tmp_path / "fused")
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    for sub in ("", "second"):
        saved, expected = (load_file(tmp_path / who / sub / "adapter_model.safetensors") for who in ("fused", "peft"))
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    back = fused_lora.to_peft(model)
    assert _lora_layers(back) == originals
    assert all(m.get_base_layer().weight.data_ptr() == bytes_of[n] for n, m in originals.items())
    # a customer's adapter unloaded while serving: PEFT's delete_adapter, the model converted again, over the
    # same bytes (layers of one adapter now)
    fused_lora.from_peft(back)
    back.delete_adapter("second")
    layers = fused_lora.integration.fused_layers(back)
    assert sorted(layers) == sorted(originals) and not _lora_layers(back)
    assert all(layer.weight.data_ptr() == bytes_of[n] for n, layer in layers.items())
    with torch.no_grad():
        assert_close(back.train()(input_ids=ids).logits, alone["default"].double(), F32, "default, after")
