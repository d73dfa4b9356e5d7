"""``from_peft`` over a PEFT model holding several adapters (``add_adapter``,
``load_adapter``): each LoRA layer becomes one :class:`MultiLoRALinear` of
every adapter of the model (adapter ``i`` the model's ``i``-th, rank 0 where
the layer holds none), sharing PEFT's tensors; it runs PEFT's active adapter
(``set_adapter``), or each sample's (``adapter_names``, one fused set of
launches for the whole mix). Each is compared with the PEFT model it came
from: logits, gradients, files, status; then what is refused, and the way
back (``to_peft``, ``merge_and_unload``)."""

import copy
import dataclasses

import pytest
import torch

import fused_lora
from fused_lora import AdapterFileError, MultiLoRALinear
from lora_testing import (DEVICE, VOCAB, assert_same_adapter_files, skip_if_dynamo_cannot_trace_llama, tiny_gpt2,
                          tiny_llama)

peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
transformers = pytest.importorskip("transformers")

NAMES = ("first", "second", "third")


def _batch(b=3, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g).to(DEVICE)


def _several(make=tiny_llama, targets=(("q_proj", "v_proj"), ("q_proj", "k_proj"), ("o_proj",)), head=None,
             dora=(), dropout=0.0):
    """A PEFT model of three adapters of their own ranks, alphas and target
    modules (``third`` rsLoRA), every lora_B drawn (trained adapters); and a
    copy of it, the reference. ``head``: ``second`` and ``third`` train
    their own copy of it (``modules_to_save``; PEFT's mixed batch fails on
    a sample whose adapter has none, in PEFT 0.21 as in this test's
    reference). ``dora``: the adapters that are DoRA (their magnitudes
    drawn off the norms too); ``dropout``: every adapter's."""
    configs = [dict(r=4, lora_alpha=8), dict(r=3, lora_alpha=5), dict(r=2, lora_alpha=3, use_rslora=True)]
    model = None
    for name, config, target in zip(NAMES, configs, targets):
        config = peft.LoraConfig(target_modules=list(target), init_lora_weights=False, use_dora=name in dora,
                                 lora_dropout=dropout, modules_to_save=[head] if head and name != "first" else None,
                                 **config)
        if model is None:
            model = peft.get_peft_model(make(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return model, copy.deepcopy(model)


def _serving(backend="auto"):
    """``(model, reference, ids)``: :func:`_several`'s pair in eval mode, the
    model converted by from_peft (with ``backend``), and a batch of ids."""
    model, reference = _several()
    model.eval()
    reference.eval()
    fused_lora.from_peft(model, backend=backend)
    return model, reference, _batch()


def _lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _peft_grads(model) -> dict:
    """The adapters' gradients by PEFT's names (``...q_proj.lora_A.second.weight``), of PEFT's layers or of the
    fused ones (adapter ``i``: the i-th of NAMES)."""
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        for which in ("lora_A", "lora_B", "lora_magnitude_vector"):
            for i, adapter in enumerate(NAMES):
                n = n.replace(f".{which}.{i}", f".{which}.{adapter}.weight") if n.endswith(f".{which}.{i}") else n
        grads[n] = p.grad
    return grads


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_a_model_of_several_adapters_converts_and_runs_as_peft(make, tmp_path):
    """Every LoRA layer converts, sharing PEFT's tensors; each adapter made
    active (set_adapter) gives PEFT's logits, adapter_names mixes them (a
    head of its own for one: modules_to_save) in the forward and in a beam
    search, disable_adapter gives the base; get_layer_status is PEFT's but
    for the type; save_pretrained writes PEFT's files, bit for bit; to_peft
    puts PEFT's layers back."""
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj"), ("o_proj",)) if make is tiny_llama else \
        (("c_attn",), ("c_attn", "c_fc"), ("c_proj",))
    head = "lm_head"
    model, reference = _several(make, targets, head)
    model.eval()
    reference.eval()
    originals = _lora_layers(model)
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, original in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, MultiLoRALinear) and layer.active_adapter == 0
        held = [a for a in NAMES if a in original.lora_A]
        assert layer.ranks == tuple(original.r[a] if a in held else 0 for a in NAMES)
        assert layer.scalings == tuple(original.scaling[a] if a in held else 0.0 for a in NAMES)
        for i, adapter in enumerate(NAMES):
            if adapter in held:
                assert layer.lora_A[i] is original.lora_A[adapter].weight
                assert layer.lora_B[i] is original.lora_B[adapter].weight
        base = original.get_base_layer()
        assert layer.weight is base.weight or base.weight is None  # (shared; PEFT's let go while kept aside)
        assert layer.fan_in_fan_out == (make is tiny_gpt2)

    ids = _batch()
    for adapter in ("second", "third", "first"):
        model.set_adapter(adapter)
        reference.set_adapter(adapter)
        _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert all(model.get_submodule(n).active_adapter == 0 for n in originals)
    names = ["second", "__base__", "third"]
    expected = reference(input_ids=ids, adapter_names=names).logits
    _close(model(input_ids=ids, adapter_names=names).logits, expected)
    with reference.disable_adapter():
        base = reference(input_ids=ids).logits
    # (PEFT's own: its "__base__" sample is the base model's, equal to rounding: PEFT 0.21 runs that
    # sample's layers apart, products of another shape)
    assert (expected[0] - base[0]).abs().max() > 1e-2
    _close(expected[1], base[1])
    with model.disable_adapter():
        _close(model(input_ids=ids).logits, base)
    model.base_model.disable_adapter_layers()  # (PEFT's tuner's switch: the fused layers' too, until enabled)
    _close(model(input_ids=ids).logits, base)
    model.base_model.enable_adapter_layers()
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    generate = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0, adapter_names=names)
    assert torch.equal(model.generate(input_ids=ids[:, :5], **generate),
                       reference.generate(input_ids=ids[:, :5], **generate))

    statuses = {s.name: s for s in model.get_layer_status()}
    expected_statuses = {s.name: s for s in reference.get_layer_status()}
    assert statuses.keys() == expected_statuses.keys()
    converted = {n.removeprefix("base_model.") for n in originals}
    assert converted < statuses.keys()  # (and the head's modules_to_save wrapper)
    for name, status in statuses.items():
        assert (status.module_type == "fused_lora.MultiLoRALinear") == (name in converted)
        assert dataclasses.replace(status, module_type="") == dataclasses.replace(expected_statuses[name],
                                                                                  module_type="")
    assert model.get_model_status() == reference.get_model_status()

    model.save_pretrained(tmp_path / "fused")
    model.save_pretrained(tmp_path / "passed", state_dict=model.state_dict())  # (renamed: rank-0 slots dropped)
    reference.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    for adapter in NAMES:
        expected_files = load_file(tmp_path / "peft" / adapter / "adapter_model.safetensors")
        for who in ("fused", "passed"):
            saved = load_file(tmp_path / who / adapter / "adapter_model.safetensors")
            assert saved.keys() == expected_files.keys(), who
            assert all(torch.equal(saved[k], expected_files[k]) for k in saved), who

    back = fused_lora.to_peft(model)
    assert back is model and _lora_layers(model) == originals
    assert all(originals[n].get_base_layer().weight is not None for n in originals)
    back.set_adapter("second")
    reference.set_adapter("second")
    assert torch.equal(back(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("checkpointing, dora", [(False, ()), (True, ()), (False, ("first",))],
                         ids=["plain", "activation-checkpointing", "dora-first"])
def test_training_the_active_adapter_matches_peft(checkpointing, dora):
    """In train mode the active adapter alone runs, trains and gets PEFT's
    gradients (PEFT's set_adapter freezes the others, on the tensors the
    fused layers share), with transformers' activation checkpointing too,
    and as a DoRA adapter (its magnitude's gradient too; dropout draws its
    masks otherwise than PEFT's: against the float64 oracle in
    test_multi_dora); another made active trains in its turn; an optimizer
    step on the shared tensors keeps the two models equal."""
    model, reference = _several(dora=dora)
    model.train()
    reference.train()
    if checkpointing:
        for m in (model, reference):
            m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
    fused_lora.from_peft(model)
    ids = _batch()
    for adapter in ("first", "second"):
        model.set_adapter(adapter)
        reference.set_adapter(adapter)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        grads, expected = _peft_grads(model), _peft_grads(reference)
        assert grads.keys() == expected.keys() and all(f".{adapter}." in n for n in grads)
        assert any("lora_magnitude_vector" in n for n in grads) == (adapter in dora)
        for n, g in grads.items():
            _close(g, expected[n])
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, reference)]
    for optimizer in optimizers:
        optimizer.step()
    model.eval()
    reference.eval()
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_dora_adapters_among_several_convert_and_run_as_peft(make, tmp_path):
    """DoRA adapters (``first``, and ``third`` with rsLoRA) beside a LoRA one:
    every layer converts, sharing PEFT's magnitudes too; each adapter
    active and disable_adapter give PEFT's logits, and a mixed batch (which
    PEFT refuses with DoRA) each sample's adapter's, in one set of fused
    launches a layer;
    save_pretrained writes PEFT's files bit for bit; state dicts of PEFT's
    names load strictly into the fused layers; to_peft gives PEFT's layers
    back."""
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj"), ("o_proj",)) if make is tiny_llama else \
        (("c_attn",), ("c_attn", "c_fc"), ("c_proj",))
    model, reference = _several(make, targets, dora=("first", "third"))
    model.eval()
    reference.eval()
    peft_state = copy.deepcopy(reference.state_dict())
    originals = _lora_layers(model)
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    for name, original in originals.items():
        layer = model.get_submodule(name)
        held = [a for a in NAMES if a in original.lora_A]
        assert layer.use_dora == tuple(a in held and a in ("first", "third") for a in NAMES)
        for i, adapter in enumerate(NAMES):
            if layer.use_dora[i]:
                assert layer.magnitude(i) is original.lora_magnitude_vector[adapter].weight
    ids = _batch()
    for adapter in ("third", "second", "first"):
        model.set_adapter(adapter)
        reference.set_adapter(adapter)
        _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    alone = {}  # (PEFT refuses adapter_names with DoRA: each sample as its adapter alone gives it)
    for adapter in NAMES:
        reference.set_adapter(adapter)
        alone[adapter] = reference(input_ids=ids).logits
    with model.disable_adapter(), reference.disable_adapter():
        alone["__base__"] = reference(input_ids=ids).logits
        _close(model(input_ids=ids).logits, alone["__base__"])
    for names in (["third", "__base__", "first"], ["second", "first", "first"]):
        want = torch.stack([alone[name][j] for j, name in enumerate(names)])
        _close(model(input_ids=ids, adapter_names=names).logits, want)
    model.set_adapter("first")
    reference.set_adapter("first")
    model.save_pretrained(tmp_path / "fused")
    reference.save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "fused", tmp_path / "peft")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.zero_()
    model.load_state_dict(peft_state, strict=True)
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    fused_lora.to_peft(model)
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_state_dicts_and_peft_s_load_adapter_reach_the_shared_tensors(tmp_path):
    """A state dict of PEFT's names (saved before the conversion) loads,
    strictly, into the fused layers (their adapters of rank 0 taken as they
    are); one of the fused model loads back; PEFT's load_adapter of a held
    adapter (a Trainer resuming) puts the file's values in the fused layers'
    tensors (a new name: test_a_customer_s_adapter_loads_and_unloads_while_serving)."""
    model, reference = _several()
    model.eval()
    reference.eval()
    reference.save_pretrained(tmp_path)
    peft_state = copy.deepcopy(reference.state_dict())
    fused_lora.from_peft(model)
    ids = _batch()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.load_state_dict(peft_state)
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    fused_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.zero_()
    model.load_state_dict(fused_state)
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B.1" in n:
                p.zero_()
    model.set_adapter("second")
    reference.set_adapter("second")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(layer, MultiLoRALinear)  # (still fused: PEFT's tensors are its own)


def test_what_a_model_of_several_adapters_refuses():
    """Refused, nothing changed: merge_adapter (one base serves them all),
    an unknown name in adapter_names. Left PEFT's and reported: layers of
    several active adapters where one is DoRA, layers mixing rsLoRA and
    LoRA scales, a PiSSA adapter's (its residual base is not the others');
    the others convert."""
    model, reference, ids = _serving()
    model.set_adapter("second")
    with pytest.raises(ValueError, match=r"merge_adapter: .* hold several adapters"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"no layer holds adapter\(s\) \['fourth'\]"):
        model(input_ids=ids, adapter_names=["fourth", "first", "first"])
    reference.set_adapter("second")
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    # what is left PEFT's: several active adapters, one DoRA; mixed rsLoRA; PiSSA
    for case in ("two_active", "rslora_mix", "pissa"):
        peft_model, _ = _several(dora=("first",) if case == "two_active" else ())
        if case == "two_active":
            peft_model.base_model.set_adapter(["first", "second"])
        else:
            extra = {"rslora_mix": dict(use_rslora=True), "pissa": dict(init_lora_weights="pissa")}[case]
            peft_model.add_adapter("fourth", peft.LoraConfig(r=2, target_modules=["v_proj"], **extra))
        before = peft_model.eval()(input_ids=ids).logits
        report = fused_lora.from_peft(peft_model)
        why = {"two_active": "several adapters active (['first', 'second']), which PEFT sums, 'first' DoRA",
               "rslora_mix": "mix rsLoRA and plain LoRA scales",
               "pissa": "adapter 'fourth': its init ('pissa') took its start out of the base weight"}[case]
        skipped = [n for n in report.skipped if why in report.skipped[n]]
        assert skipped and len(skipped) == len(report.skipped) and report.converted, report.skipped
        assert all(("v_proj" in n) or (case == "two_active" and "q_proj" in n) for n in skipped), skipped
        _close(peft_model(input_ids=ids).logits, before)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_several_active_adapters_run_summed_as_peft(dropout):
    """PEFT's set_adapter([a, b]) (several active, their terms summed on
    every sample), before the conversion or after, in either order: each
    layer's active_adapter holds them (one, where a layer holds one); eval
    logits are PEFT's; train-mode gradients of both are PEFT's (without
    dropout one set of fused launches; with dropout PEFT's own computation,
    each adapter its own mask, drawn in PEFT's order from the default
    generator: the same masks); a DoRA adapter among them is refused,
    nothing changed."""
    model, reference = _several(targets=(("q_proj", "v_proj"), ("q_proj", "v_proj"), ("o_proj",)),
                                dropout=dropout)
    for m in (model, reference):
        m.base_model.set_adapter(["first", "second"])
    report = fused_lora.from_peft(model)
    assert not report.skipped
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    assert {layer.active_adapter for layer in layers.values()} == {(0, 1)}  # (o_proj's of rank 0: its base)
    ids = _batch()
    for names in (["first", "second"], ["second", "first"]):
        for m in (model, reference):
            m.base_model.set_adapter(names)
            m.eval()
        _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        for m in (model, reference):
            m.train()
            m.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            m(input_ids=ids, labels=ids).loss.backward()
        grads, expected = _peft_grads(model), _peft_grads(reference)
        assert grads.keys() == expected.keys() and {n.split(".")[-2] for n in grads} == {"first", "second"}
        for n, g in grads.items():
            _close(g, expected[n])
    dora, _ = _several(dora=("first",))
    fused_lora.from_peft(dora)
    with pytest.raises(ValueError, match=r"set_adapter: \['first', 'second'\] names 2 adapters, .* 'first' is DoRA"):
        dora.base_model.set_adapter(["first", "second"])
    assert all(m.active_adapter in (0, -1) for m in dora.modules() if isinstance(m, MultiLoRALinear))


def test_fused_lora_s_own_functions_on_the_converted_model(tmp_path):
    """adapter_ids (the fused layers' ids: the model's order of adapters)
    gives PEFT's mixed batch; save_adapter(adapter=i) writes a file PEFT
    loads as that adapter; fused_lora.load_adapter is refused (PEFT's layers,
    which to_peft gives back, keep the adapters by name); merge_and_unload
    (PEFT's, after to_peft) folds the active one in."""
    model, reference, ids = _serving()
    names = ["third", "__base__", "first"]
    with fused_lora.adapter_ids(model, torch.tensor([2, -1, 0], device=DEVICE)):
        _close(model(input_ids=ids).logits, reference(input_ids=ids, adapter_names=names).logits)
    fused_lora.save_adapter(model, tmp_path / "second", adapter=1)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second").eval()
    reference.set_adapter("second")
    _close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(AdapterFileError, match="converted from PEFT .* several adapters"):
        fused_lora.load_adapter(model, tmp_path / "second", adapter=1)
    model.set_adapter("second")
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MultiLoRALinear) for m in merged.modules())
    _close(merged(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("mixed", [False, True], ids=["training", "adapter_names"])
def test_a_forward_of_the_converted_model_looks_up_no_layer_by_name(mixed, monkeypatch):
    """The PeftModel's forward enters its tuner's forward hooks, which
    from_peft patches (:func:`fused_lora.integration._peft_forward_hooks`):
    a training step (no adapter_names) goes straight to PEFT's, and a mixed
    batch finds the fused layers in one walk of the modules, not by
    ``get_submodule`` a layer (about 15 µs each on a PeftModel: 3-7 ms of
    host time a forward at 224 layers, before). The forward's output as
    PEFT's, counted the same way (PEFT's own forward looks up none)."""
    model, reference, ids = _serving()
    names = ["third", "__base__", "first"] if mixed else None
    if not mixed:
        model.train()
        reference.train()
    looked_up = []
    get_submodule = torch.nn.Module.get_submodule

    def counted(self, target):
        looked_up.append(target)
        return get_submodule(self, target)

    monkeypatch.setattr(torch.nn.Module, "get_submodule", counted)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
        assert looked_up == []
        expected = reference(input_ids=ids, adapter_names=names).logits
        assert looked_up == []
    _close(got, expected)


def test_a_customer_s_adapter_loads_and_unloads_while_serving(tmp_path):
    """load_adapter of a new name, and delete_adapter, on the converted
    model: PEFT's, on its layers put back, then the model converted again
    (the fused backend kept): the new adapter is adapter 3 of every layer,
    served alone and in a mixed batch as PEFT's model serves it; deleted,
    the others keep their ids' order and outputs; PEFT's error (an unknown
    name) leaves the model converted as it was. Refused, nothing changed,
    inside disable_adapter() (the new layers would not be off)."""
    model, reference, ids = _serving(backend="torch")
    new, _ = _several(tiny_llama, (("v_proj", "up_proj"),) * 3)
    new.save_pretrained(tmp_path, selected_adapters=["second"])
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"load_adapter: .* hold their adapters disabled"):
            model.load_adapter(tmp_path / "second", adapter_name="fourth")
    assert list(model.peft_config) == list(NAMES)
    for m in (model, reference):
        m.load_adapter(tmp_path / "second", adapter_name="fourth")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    assert len(layers) == 10 and not _lora_layers(model)  # (q, k, v, o and up, in both blocks)
    assert all(layer.num_adapters == 4 and layer.backend == "torch" for layer in layers.values())
    assert all(layer.ranks[3] == (3 if n.endswith(("v_proj", "up_proj")) else 0) for n, layer in layers.items())
    names = ["fourth", "__base__", "first"]
    _close(model(input_ids=ids, adapter_names=names).logits, reference(input_ids=ids, adapter_names=names).logits)
    for m in (model, reference):
        m.set_adapter("fourth")
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(ValueError, match="fifth"):  # (PEFT's error; the model converted again, as it was)
        model.delete_adapter("fifth")
    assert list(model.peft_config) == [*NAMES, "fourth"] and not _lora_layers(model)
    assert all(m.active_adapter == 3 for m in model.modules() if isinstance(m, MultiLoRALinear))
    for m in (model, reference):
        m.set_adapter("third")
        m.delete_adapter("second")
    assert list(model.peft_config) == ["first", "third", "fourth"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    assert all(layer.num_adapters == 3 and layer.active_adapter == 1 for layer in layers.values())
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    names = ["third", "fourth", "first"]
    _close(model(input_ids=ids, adapter_names=names).logits, reference(input_ids=ids, adapter_names=names).logits)


def test_the_converted_model_compiles_in_one_graph_for_serving():
    """torch.compile(fullgraph=True) of the model inside the PeftModel: a
    mixed batch (PEFT's hooks, which hand each fused layer its ids) and each
    active adapter (set_adapter: a guard, compiled again) give PEFT's
    logits."""
    model, reference, ids = _serving()
    torch._dynamo.reset()
    compiled = torch.compile(model.base_model.model, backend="aot_eager", fullgraph=True)
    names = ["second", "__base__", "third"]
    try:
        with model.base_model._enable_peft_forward_hooks(adapter_names=names):
            mixed = compiled(input_ids=ids).logits
    except torch._dynamo.exc.Unsupported:
        skip_if_dynamo_cannot_trace_llama(ids)
        raise
    _close(mixed, reference(input_ids=ids, adapter_names=names).logits)
    for adapter in ("second", "first"):
        model.set_adapter(adapter)
        reference.set_adapter(adapter)
        _close(compiled(input_ids=ids).logits, reference(input_ids=ids).logits)
