"""DoRA in real models: PEFT's ``use_dora=True`` layers converted by
from_peft (Llama's linears, GPT-2's Conv1D) and back, inject(use_dora=True),
and PEFT's DoRA files both ways (save_adapter / load_adapter against
``PeftModel.from_pretrained`` / ``save_pretrained``), with real PEFT and
transformers models built from small configs."""

import copy
import json

import pytest
import torch

import fused_lora
from fused_lora import AdapterFileError, LoRALinear
from fused_lora.integration import fused_layers
from lora_testing import DEVICE, VOCAB, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
pytest.importorskip("transformers")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def _randomise(model):
    """B and the magnitudes off their initial point: every term of DoRA matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                scale = 0.5 if "lora_B" in name else 0.3 * p.abs().mean().item()
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_peft_converts_dora_layers_that_share_peft_tensors_and_give_its_results(arch, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, lora_dropout=0.0)
    ref = peft.get_peft_model(MAKERS[arch](), copy.deepcopy(config))
    _randomise(ref)
    model = copy.deepcopy(ref)
    report = fused_lora.from_peft(model)
    assert report.converted and not report.skipped
    layers = fused_layers(model)
    assert all(layer.use_dora for layer in layers.values())
    name = report.converted[0]
    original = fused_lora.integration._converted(model)[name]
    assert layers[name].lora_magnitude_vector is original.lora_magnitude_vector["default"].weight
    ids = _ids()
    a, b = ref(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    _close(b.logits, a.logits)
    a.loss.backward()
    b.loss.backward()
    ref_params, params = _trainable(ref), _trainable(model)
    assert len(params) == len(ref_params) and sum("magnitude" in n for n in params) == len(report.converted)
    for p_ref, p in zip(ref_params.values(), params.values()):
        _close(p.grad, p_ref.grad, rtol=1e-4)

    # PEFT's methods on the converted model: save_pretrained, merge, the state dict under PEFT's names
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(MAKERS[arch](), tmp_path)
    _close(loaded(input_ids=ids).logits, a.logits)
    model.merge_adapter()
    assert layers[name].merged
    _close(model(input_ids=ids).logits, a.logits, rtol=1e-4)
    model.unmerge_adapter()
    state = ref.state_dict()
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in state)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_magnitude_vector.mul_(2)
    model.load_state_dict(state)  # (PEFT's names, into the fused layers' own tensors)
    _close(model(input_ids=ids).logits, a.logits)
    from safetensors.torch import load_file

    with torch.no_grad():
        layers[name].lora_magnitude_vector.mul_(2)
    loaded = peft.set_peft_model_state_dict(model, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys  # (PEFT's file keys, the magnitudes' too, into the fused layers)
    _close(model(input_ids=ids).logits, a.logits)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)  # (new tensors in the fused layers)
    assert layers[name].lora_magnitude_vector is not original.lora_magnitude_vector["default"].weight
    back = fused_lora.to_peft(model)
    assert back.get_submodule(name) is original and original.lora_magnitude_vector["default"].weight is \
        layers[name].lora_magnitude_vector
    _close(back(input_ids=ids).logits, a.logits)


def test_a_mixed_batch_of_a_converted_dora_model_runs_each_sample_through_its_own():
    """PEFT refuses ``adapter_names`` with DoRA; the fused layers run it (by
    row group): each sample as the adapter's model or the base model."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True)
    model = peft.get_peft_model(tiny_llama(), config)
    _randomise(model)
    fused_lora.from_peft(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=["__base__", "default"]).logits
    _close(mixed[0], base[0])
    _close(mixed[1], adapted[1])


def test_inject_dora_saves_what_peft_loads_and_loads_what_peft_saves(tmp_path):
    model = tiny_llama()
    names = fused_lora.inject(model, TARGETS["llama"], r=4, alpha=8, use_dora=True)
    assert set(_trainable(model)) == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B",
                                                                        "lora_magnitude_vector")}
    _randomise(model)
    ids = _ids()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    peft_layers = [m for m in in_peft.modules() if isinstance(getattr(m, "use_dora", None), dict)]
    assert len(peft_layers) == len(names) and all(m.use_dora["default"] for m in peft_layers)
    _close(in_peft(input_ids=ids).logits, expected)
    in_peft.save_pretrained(tmp_path / "peft")
    for directory in ("ours", "peft"):
        plain = tiny_llama()
        assert sorted(fused_lora.load_adapter(plain, tmp_path / directory)) == sorted(names)
        assert all(layer.use_dora for layer in fused_layers(plain).values())
        _close(plain(input_ids=ids).logits, expected)
        assert set(_trainable(plain)) == set(_trainable(model))

    peft_model = fused_lora.to_peft(copy.deepcopy(model))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.use_dora["default"] and type(layer).__name__ == "Linear"
    _close(peft_model(input_ids=ids).logits, expected)
    merged = copy.deepcopy(model)
    fused_lora.merge_and_unload(merged)
    assert not fused_layers(merged)
    _close(merged(input_ids=ids).logits, expected, rtol=1e-4)


def test_dora_files_that_do_not_fit_are_refused_and_change_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    fused_lora.inject(model, ["q_proj"], r=4, use_dora=True)
    fused_lora.save_adapter(model, tmp_path / "dora")
    path = tmp_path / "dora" / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors = load_file(str(path))
    assert key in tensors

    def damaged(name, change_tensors=None, change_config=None):
        directory = tmp_path / name
        directory.mkdir()
        t = dict(tensors)
        if change_tensors:
            change_tensors(t)
        save_file(t, str(directory / "adapter_model.safetensors"))
        cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
        if change_config:
            change_config(cfg)
        (directory / "adapter_config.json").write_text(json.dumps(cfg))
        return directory

    cases = [
        (damaged("short", lambda t: t.__setitem__(key, t[key][:5])), r"lora_magnitude_vector .*\(5,\).* 32 output"),
        (damaged("nan", lambda t: t[key].__setitem__(0, float("nan"))), "not a finite floating-point vector"),
        (damaged("not_dora", change_config=lambda c: c.update(use_dora=False)), "where the config's use_dora is false"),
        (damaged("not_a_bool", change_config=lambda c: c.update(use_dora="yes")), "use_dora must be true or false"),
        (damaged("alone", lambda t: [t.pop(k) for k in list(t) if "lora_A" in k or "lora_B" in k]),
         "q_proj has lora_magnitude_vector but not both lora_A and lora_B"),
    ]
    fused_dora = tiny_llama(seed=6)
    fused_lora.inject(fused_dora, ["q_proj"], r=4, use_dora=True)
    for target in (tiny_llama(seed=5), fused_dora):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        for directory, message in cases:
            with pytest.raises(AdapterFileError, match=message):
                fused_lora.load_adapter(target, directory)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    plain_lora = tiny_llama()
    fused_lora.inject(plain_lora, ["q_proj"], r=4)
    with pytest.raises(AdapterFileError, match="the model's fused layer is not DoRA, the adapter's use_dora is True"):
        fused_lora.load_adapter(plain_lora, tmp_path / "dora")
    with pytest.raises(AdapterFileError, match="the model's fused layer is DoRA, the adapter's use_dora is False"):
        fused_lora.save_adapter(plain_lora, tmp_path / "lora")
        fused_lora.load_adapter(fused_dora, tmp_path / "lora")
    multi = tiny_llama()  # (DoRA among several adapters: tests/test_multi_dora.py)
    fused_lora.inject_multi(multi, ["q_proj"], ranks=[4, 2])
    with pytest.raises(AdapterFileError, match="adapter 0 of the model's fused layer is not DoRA, the file's "
                                               "use_dora is True"):
        fused_lora.load_adapter(multi, tmp_path / "dora", adapter=0)
    mixed = tiny_llama()
    fused_lora.inject(mixed, ["q_proj"], r=4, use_dora=True)
    fused_lora.inject(mixed, ["v_proj"], r=4)
    with pytest.raises(ValueError, match="one use_dora per adapter"):
        fused_lora.save_adapter(mixed, tmp_path / "mixed")
    with pytest.raises(TypeError, match="use_dora"):
        fused_lora.inject(tiny_llama(), ["q_proj"], use_dora="yes")
    assert isinstance(fused_layers(mixed)["model.layers.0.self_attn.q_proj"], LoRALinear)


def test_a_file_into_a_dora_model_from_peft_must_be_dora_too(tmp_path):
    """PEFT's layers kept beside the fused ones (to_peft, save_pretrained)
    keep their own use_dora: a LoRA file into a converted DoRA model is
    refused, nothing changed; a DoRA file of the same scale loads, and PEFT's
    layers see its magnitudes."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              use_dora=True))
    fused_lora.from_peft(model)
    for use_dora in (False, True):
        source = tiny_llama()  # (the converted model's base)
        fused_lora.inject(source, ["q_proj"], r=4, alpha=8, use_dora=use_dora)
        _randomise(source)
        fused_lora.save_adapter(source, tmp_path / str(use_dora))
    ids = _ids()
    before = model(input_ids=ids).logits.detach()
    with pytest.raises(AdapterFileError, match=r"use_dora \(2.0, 0.0, True\), the file has \(2.0, 0.0, False\)"):
        fused_lora.load_adapter(model, tmp_path / "False")
    assert torch.equal(model(input_ids=ids).logits, before)
    fused_lora.load_adapter(model, tmp_path / "True")
    expected = source(input_ids=ids).logits.detach()
    _close(model(input_ids=ids).logits, expected)
    _close(fused_lora.to_peft(model)(input_ids=ids).logits, expected)


def test_inject_dora_into_gpt2s_conv1d_layers_saves_what_peft_loads(tmp_path):
    """GPT-2's Conv1D (weight stored (in, out): fan_in_fan_out): the magnitude
    starts as the norms of the output features' rows of Wᵀ, the adapter
    saves as PEFT's DoRA and reloads in PEFT with the same logits."""
    model = tiny_gpt2()
    names = fused_lora.inject(model, TARGETS["gpt2"], r=4, alpha=8, use_dora=True)
    layer = fused_layers(model)[names[0]]
    assert layer.fan_in_fan_out and layer.use_dora
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.weight.detach().norm(dim=0))
    _randomise(model)
    ids = _ids()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path)
    _close(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)(input_ids=ids).logits, expected)
    plain = tiny_gpt2()
    fused_lora.load_adapter(plain, tmp_path)
    _close(plain(input_ids=ids).logits, expected)
