"""Several adapters a layer in real models: ``inject_multi`` places
``MultiLoRALinear`` layers, ``adapter_ids`` hands them the ids, and one
adapter of them is one of PEFT's (``save_adapter`` / ``load_adapter`` /
``merge_and_unload`` with ``adapter=i``). The oracle is real PEFT running
each adapter alone, on real transformers models built from small configs."""

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import AdapterFileError, LoRALinear, MultiLoRALinear
from lora_testing import DEVICE, VOCAB, skip_if_dynamo_cannot_trace_llama, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS, ALPHAS = [4, 2, 8], [8, 2, 4]


def tokens(seed=1, b=5, t=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g).to(DEVICE)


def injected_llama():
    """A tiny Llama through ``inject`` (one adapter on TARGETS), its B made non-zero."""
    model = tiny_llama()
    fused_lora.inject(model, TARGETS, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.2)
    return model


def multi_model(make=tiny_llama, targets=TARGETS, ranks=RANKS, alphas=ALPHAS, **kwargs):
    """A model with inject_multi's layers, every adapter's B random (the adapters matter, and differ)."""
    model = make()
    fused_lora.inject_multi(model, targets, ranks=ranks, alphas=alphas, **kwargs)
    torch.manual_seed(7)
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            for b in layer.lora_B:
                nn.init.normal_(b, std=0.2)
    return model


def peft_alone(model, i, tmp_path, make=tiny_llama, trainable=False):
    """PEFT's model of adapter ``i`` alone: save_adapter's file, loaded by PEFT into a fresh base."""
    fused_lora.save_adapter(model, tmp_path / f"adapter{i}", adapter=i)
    return peft.PeftModel.from_pretrained(make(), tmp_path / f"adapter{i}", is_trainable=trainable).eval()


def assert_close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


IDS = [2, -1, 0, 1, 0]  # (a sample each: every adapter, the base, one adapter twice)


@pytest.mark.parametrize("make, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"])],
                         ids=["llama", "gpt2-conv1d"])
def test_each_sample_runs_as_peft_with_its_adapter_alone(tmp_path, make, targets):
    model = multi_model(make, targets).eval()
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 6 and all(m.fan_in_fan_out == (make is tiny_gpt2) for m in layers)
    x = tokens()
    ids = torch.tensor(IDS, device=DEVICE)
    with fused_lora.adapter_ids(model, ids):
        logits = model(input_ids=x).logits
    base = make()(input_ids=x).logits
    for k, i in enumerate(IDS):
        expected = base[k] if i == -1 else peft_alone(model, i, tmp_path, make)(input_ids=x[k:k + 1]).logits[0]
        assert_close(logits[k], expected)
    assert not torch.allclose(logits[2], base[2], rtol=1e-3)  # (the adapters change the output)
    # a token's id each: the same ids spread over the tokens, the same result
    with fused_lora.adapter_ids(model, ids[:, None].expand(x.shape)):
        assert torch.equal(model(input_ids=x).logits, logits)


def test_training_gives_each_adapter_the_gradient_of_its_own_samples(tmp_path):
    model = multi_model().train()  # (dropout 0: the same forward as PEFT's in train mode)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{ab}.{i}" for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)
                       for ab in "AB" for i in range(3)}
    x = tokens(seed=2)
    ids = torch.tensor(IDS, device=DEVICE)
    weights = torch.randn(*x.shape, VOCAB, device=DEVICE)
    with fused_lora.adapter_ids(model, ids):
        ((model(input_ids=x).logits * weights).sum()).backward()
    for i in range(3):
        alone = peft_alone(model, i, tmp_path, trainable=True).train()
        rows = [k for k, j in enumerate(IDS) if j == i]
        (alone(input_ids=x[rows]).logits * weights[rows]).sum().backward()
        for name, layer in model.named_modules():
            if isinstance(layer, MultiLoRALinear):
                twin = alone.base_model.model.get_submodule(name)
                assert_close(layer.lora_A[i].grad, twin.lora_A["default"].weight.grad, rtol=1e-4)
                assert_close(layer.lora_B[i].grad, twin.lora_B["default"].weight.grad, rtol=1e-4)


def test_activation_checkpointing_inside_the_block_gives_the_same_gradients():
    def grads(checkpointed):
        model = multi_model(dropout=0.1)
        model.train()
        if checkpointed:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            key = "activation" if enable.__name__.startswith("activation") else "gradient"
            enable(**{f"{key}_checkpointing_kwargs": {"use_reentrant": False}})
        x = tokens(seed=3)
        torch.manual_seed(5)
        with fused_lora.adapter_ids(model, torch.tensor(IDS, device=DEVICE)):
            # (no cache, as checkpointing turns it off: transformers 4.57's attention rounds otherwise with one)
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 36
    for name, g in plain.items():
        assert torch.equal(g, checkpointed[name]), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["inject", "inject_multi"])
def test_a_backward_after_the_block_that_recomputes_the_layers_is_refused(kind, reentrant):
    """Activation checkpointing calls the layers again in the backward: run
    after adapter_ids' block, without its ids, inject's layers would give
    every row the adapter (the base rows' gradients silently wrong), and
    inject_multi's could not run. Both refuse, saying why; inside the block
    the gradients are those of the model without checkpointing."""
    def grads(checkpointed, inside=True):
        if kind == "inject":
            model = injected_llama()
        else:
            model = multi_model()
        model.train()
        model.enable_input_require_grads()  # (reentrant checkpointing needs an input that requires grad; both runs)
        if checkpointed:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            key = "activation" if enable.__name__.startswith("activation") else "gradient"
            enable(**{f"{key}_checkpointing_kwargs": {"use_reentrant": reentrant}})
        x = tokens(seed=6)
        ids = torch.tensor([0, -1, 0, 0, -1] if kind == "inject" else IDS, device=DEVICE)
        with fused_lora.adapter_ids(model, ids):
            loss = model(input_ids=x, labels=x, use_cache=False).loss  # (as checkpointing has it, in both runs)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    with pytest.raises(ValueError, match=r"(LoRALinear|MultiLoRALinear): recomputed in the backward \(activation "
                                         r"checkpointing\) without the adapter_ids its forward had.*inside the block"):
        grads(True, inside=False)
    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == (12 if kind == "inject" else 36)
    for name, g in plain.items():
        assert torch.equal(g, checkpointed[name]), name
    after = grads(False, inside=False)  # (no checkpointing: nothing is recomputed, nothing refused)
    assert after.keys() == plain.keys() and all(torch.equal(g, plain[name]) for name, g in after.items())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_an_evaluation_with_ids_between_a_forward_and_its_backward_changes_nothing(reentrant):
    """The recompute check goes by the forward the backward repeats: an
    evaluation in eval mode with ids, between a training forward without ids
    (every row through the adapter) and its checkpointed backward, is not
    mistaken for it (that backward was refused before); a training-mode
    forward with ids in its place still makes the backward refused."""
    def grads(between):
        model = injected_llama()
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        x = tokens(seed=7)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        if between is not None:
            model.train(between == "train")
            with torch.no_grad(), fused_lora.adapter_ids(model, torch.tensor([0, -1, 0, -1, -1], device=DEVICE)):
                model(input_ids=tokens(seed=8), use_cache=False)
            model.train()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, evaluated = grads(None), grads("eval")
    assert plain.keys() == evaluated.keys() and len(plain) == 12
    for name, g in plain.items():
        assert torch.equal(g, evaluated[name]), name
    with pytest.raises(ValueError, match="recomputed in the backward"):
        grads("train")


def test_adapter_ids_nest_yield_to_a_call_s_own_ids_and_leave_nothing_behind():
    model = multi_model().eval()
    x = tokens(b=2)
    layer = model.model.layers[0].self_attn.q_proj
    seen = []
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (args[1] if len(args) > 1 else kwargs["adapter_ids"]).tolist()), with_kwargs=True)
    hooks_before = dict(layer._forward_pre_hooks)
    outer, inner = torch.tensor([0, 1]), torch.tensor([2, -1])
    with fused_lora.adapter_ids(model, outer):
        model(input_ids=x)
        with fused_lora.adapter_ids(model, inner):
            model(input_ids=x)
            h = torch.randn(2, 32, device=DEVICE)
            layer(h, torch.tensor([1, 1], device=DEVICE))  # (a call's own ids)
        model(input_ids=x)
    assert seen == [[0, 1], [2, -1], [1, 1], [0, 1]]
    assert dict(layer._forward_pre_hooks) == hooks_before and not hasattr(layer, "_fused_lora_routed_ids")
    with pytest.raises(ValueError, match=r"MultiLoRALinear \(3 adapters\) needs adapter_ids.*fused_lora.adapter_ids"):
        model(input_ids=x)
    with pytest.raises(RuntimeError, match="inside"):
        with fused_lora.adapter_ids(model, outer):
            raise RuntimeError("inside")
    assert dict(layer._forward_pre_hooks) == hooks_before
    # ids that do not fit: the layers' checks, by name
    with fused_lora.adapter_ids(model, torch.tensor([0, 3])), pytest.raises(ValueError, match=r"adapter_ids"):
        model(input_ids=x)
    with fused_lora.adapter_ids(model, torch.tensor([0, 1, 2])), pytest.raises(ValueError, match=r"adapter_ids"):
        model(input_ids=x)


def test_adapter_ids_route_inject_s_layers_too():
    """inject's layers (one adapter) take ids 0 and -1 through the same block: PEFT's mixed batch without PEFT."""
    model = injected_llama()
    model.eval()
    x = tokens(b=3)
    with fused_lora.adapter_ids(model, torch.tensor([0, -1, 0])):
        mixed = model(input_ids=x).logits
    assert_close(mixed[[0, 2]], model(input_ids=x[[0, 2]]).logits)
    assert_close(mixed[1], tiny_llama()(input_ids=x[1:2]).logits[0])


def test_load_adapter_fills_one_adapter_from_peft_s_file(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama(seed=0), config).eval()
    torch.manual_seed(11)
    ref.save_pretrained(tmp_path / "peft")
    model = multi_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loaded = fused_lora.load_adapter(model, tmp_path / "peft", adapter=1)
    assert sorted(loaded) == sorted(n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.lora_{ab}.1" for n in loaded for ab in "AB"}
    assert all(model.get_submodule(n).alphas == (8.0, 6.0, 4.0) for n in loaded)
    x = tokens()
    with fused_lora.adapter_ids(model.eval(), torch.tensor(IDS)):
        logits = model(input_ids=x).logits
    assert_close(logits[3], ref(input_ids=x[3:4]).logits[0])
    # and back out: the file save_adapter writes for adapter 1 is PEFT's again
    fused_lora.save_adapter(model, tmp_path / "again", adapter=1)
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    assert_close(again(input_ids=x).logits, ref(input_ids=x).logits)
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"]) == (2, 6, {})


def test_load_adapter_refusals_change_nothing(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                                      init_lora_weights=False)).save_pretrained(tmp_path / "r4")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS + ["k_proj"],
                                                      init_lora_weights=False)).save_pretrained(tmp_path / "k")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, use_rslora=True,
                                                      init_lora_weights=False)).save_pretrained(tmp_path / "rs")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.2,
                                                      init_lora_weights=False)).save_pretrained(tmp_path / "dp")
    model = multi_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"hold 3 adapters each \(inject_multi\): name one, adapter=i"):
        fused_lora.load_adapter(model, tmp_path / "r4")
    with pytest.raises(ValueError, match=r"adapter must be in \[0, 3\)"):
        fused_lora.load_adapter(model, tmp_path / "r4", adapter=3)
    with pytest.raises(AdapterFileError, match=r"the model's fused layer has r=2, the adapter r=4"):
        fused_lora.load_adapter(model, tmp_path / "r4", adapter=1)
    with pytest.raises(AdapterFileError, match=r"k_proj is a plain linear layer: adapter=0 loads into inject_multi"):
        fused_lora.load_adapter(model, tmp_path / "k", adapter=0)
    with pytest.raises(AdapterFileError, match=r"use_rslora=True in the file, False in the model's layer"):
        fused_lora.load_adapter(model, tmp_path / "rs", adapter=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fused_lora.load_adapter(model, tmp_path / "dp", adapter=0)  # (its dropout taken, adapter 0's alone)
    assert all(m.dropouts == (0.2, 0.0, 0.0) for m in fused_lora.integration.multi_fused_layers(model).values())
    plain = tiny_llama()
    fused_lora.inject(plain, TARGETS, r=4)
    with pytest.raises(ValueError, match=r"adapter=0 picks one of the adapters of inject_multi's layers; the model "
                                         r"has none"):
        fused_lora.load_adapter(plain, tmp_path / "r4", adapter=0)


def test_merge_and_unload_deploys_one_adapter_and_unload_gives_the_base_back(tmp_path):
    x = tokens()
    model = multi_model()
    expected = peft_alone(model, 2, tmp_path)(input_ids=x).logits
    names = fused_lora.merge_and_unload(model, adapter=2)
    assert len(names) == 6 and not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    model.eval()
    assert_close(model(input_ids=x).logits, expected)
    tiny_llama().load_state_dict(model.state_dict(), strict=True)

    model = multi_model()
    fused_lora.unload(model)
    assert torch.equal(model.eval()(input_ids=x).logits, tiny_llama()(input_ids=x).logits)

    model = multi_model()
    with pytest.raises(ValueError, match=r"merge_and_unload: the model's fused layers hold 3 adapters each"):
        fused_lora.merge_and_unload(model)
    with fused_lora.adapter_ids(model, torch.tensor(IDS)):
        with pytest.raises(ValueError, match=r"unload: inside a `with fused_lora.adapter_ids"):
            fused_lora.unload(model)
    single = tiny_llama()
    fused_lora.inject(single, TARGETS)
    with pytest.raises(ValueError, match="adapter=1 picks one of the adapters of inject_multi's layers"):
        fused_lora.merge_and_unload(single, adapter=1)


@pytest.mark.parametrize("make, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"])],
                         ids=["llama", "gpt2-conv1d"])
def test_several_adapters_combine_into_one_as_peft_s_cat_weighted_adapter(tmp_path, make, targets):
    """The oracle: PEFT's own ``add_weighted_adapter(combination_type="cat")``
    (the exact weighted sum) over the adapters to_peft hands it."""
    model = multi_model(make, targets, dropout=[0.05, 0.0, 0.1]).eval()
    adapters, weights = [2, 0], [0.75, -1.25]
    x = tokens(seed=3)
    oracle = fused_lora.to_peft(copy.deepcopy(model), adapter_names=["a0", "a1", "a2"])
    oracle.add_weighted_adapter(["a2", "a0"], weights, "blend", combination_type="cat")
    oracle.set_adapter("blend")
    expected = oracle.eval()(input_ids=x).logits.detach()
    with fused_lora.adapter_ids(model, torch.tensor(IDS, device=DEVICE)):
        assert (model(input_ids=x).logits - expected).abs().max() > 0.1  # (the blend is none of the adapters)
    # one file holding the blend, which PEFT loads alone into a fresh base
    fused_lora.save_adapter(model, tmp_path / "blend", adapter=adapters, weights=weights)
    config = json.loads((tmp_path / "blend" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["lora_dropout"], config["rank_pattern"]) \
        == (RANKS[2] + RANKS[0], RANKS[2] + RANKS[0], False, 0.1, {})  # (the first adapter's dropout)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "blend").eval()
    assert_close(loaded(input_ids=x).logits, expected)
    back = make()  # (and fused_lora's own load)
    fused_lora.load_adapter(back, tmp_path / "blend")
    assert_close(back.eval()(input_ids=x).logits, expected)
    # the same sum folded into the base weights
    merged = copy.deepcopy(model)
    fused_lora.merge_and_unload(merged, adapter=adapters, weights=weights)
    assert not any(isinstance(m, MultiLoRALinear) for m in merged.modules())
    assert_close(merged(input_ids=x).logits, expected)
    make().load_state_dict(merged.state_dict(), strict=True)
    # one adapter named alone, weighing 1, is that adapter's own file
    fused_lora.save_adapter(model, tmp_path / "one", adapter=[2])
    fused_lora.save_adapter(model, tmp_path / "two", adapter=2)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    # weights default to 1 each: the plain sum
    plain = copy.deepcopy(model)
    fused_lora.merge_and_unload(plain, adapter=adapters)
    summed = copy.deepcopy(model)
    fused_lora.merge_and_unload(summed, adapter=adapters, weights=[1, 1])
    assert torch.equal(plain(input_ids=x).logits, summed(input_ids=x).logits)


def test_adapter_combinations_are_checked_before_anything_changes(tmp_path):
    model = multi_model(ranks=[4, 0, 8])  # (adapter 1 has rank 0 everywhere: nothing of it to save)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, err, words in [
        (dict(adapter=[0, 0]), ValueError, r"merge_and_unload: adapter names an adapter more than once"),
        (dict(adapter=[0, 3]), ValueError, r"adapter must hold adapters' indices in \[0, 3\), got 3"),
        (dict(adapter=[0, 2], weights=[1.0]), ValueError, "weights must hold one number for each adapter"),
        (dict(adapter=[0, 2], weights=[1.0, math.nan]), ValueError, r"weights\[1\] must be finite"),
        (dict(weights=[1.0, 2.0]), ValueError, r"weights=\[1.0, 2.0\] weigh the adapters adapter= names"),
        (dict(adapter=[0, 2], weights="12"), TypeError, "weights must be a sequence of numbers"),
    ]:
        with pytest.raises(err, match=words):
            fused_lora.merge_and_unload(model, **kwargs)
        with pytest.raises(err, match=words.replace("merge_and_unload", "save_adapter")):
            fused_lora.save_adapter(model, tmp_path / "never", **kwargs)
    with pytest.raises(ValueError, match=r"save_adapter: adapters \[1\] have rank 0 in every layer"):
        fused_lora.save_adapter(model, tmp_path / "never", adapter=[1], weights=[2.0])
    assert not (tmp_path / "never").exists()
    assert all(isinstance(model.get_submodule(n), MultiLoRALinear) for n, m in model.named_modules()
               if isinstance(m, MultiLoRALinear))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    single = injected_llama()  # (no adapters to name: weights=w alone weighs inject's, test_integration.py)
    with pytest.raises(ValueError, match=r"merge_and_unload: adapter=\[0\] picks adapters of inject_multi's layers; "
                                         r"the model has none"):
        fused_lora.merge_and_unload(single, adapter=[0], weights=[0.5])
    with pytest.raises(ValueError, match=r"save_adapter: adapter=\[0, 1\] picks adapters of inject_multi's"):
        fused_lora.save_adapter(single, tmp_path / "never", adapter=[0, 1])


def test_disable_adapters_runs_the_base_without_ids():
    model = multi_model().eval()
    x = tokens()
    with fused_lora.disable_adapters(model):
        assert torch.equal(model(input_ids=x).logits, tiny_llama()(input_ids=x).logits)
    with pytest.raises(ValueError, match="needs adapter_ids"):
        model(input_ids=x)


def test_save_adapter_writes_one_adapter_and_nothing_of_the_others(tmp_path):
    model = multi_model(use_rslora=True)
    head = model.lm_head.weight.requires_grad_()  # (a head unfrozen by hand: PEFT's modules_to_save)
    fused_lora.save_adapter(model, tmp_path, adapter=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["modules_to_save"]) == (4, 8, True,
                                                                                                     ["lm_head"])
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k for k in saved if "lora_" in k) == sorted(
        f"base_model.model.{n}.lora_{ab}.weight" for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)
        for ab in "AB")
    layer = model.model.layers[1].mlp.down_proj
    assert torch.equal(saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], layer.lora_B[0].cpu())
    assert torch.equal(saved["base_model.model.lm_head.weight"], head.cpu())
    with pytest.raises(ValueError, match=r"save_adapter: the model's fused layers hold 3 adapters each"):
        fused_lora.save_adapter(model, tmp_path / "none")
    with pytest.raises(TypeError, match="adapter"):
        fused_lora.save_adapter(model, tmp_path / "none", adapter="0")


def _peft_mixed_batch(peft_model, names, ids, x):
    """PEFT's mixed batch: each sample through the adapter ``names[id]`` (``"__base__"`` for -1)."""
    return peft_model(input_ids=x, adapter_names=[names[i] if i >= 0 else "__base__" for i in ids]).logits


@pytest.mark.parametrize("make, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"])],
                         ids=["llama", "gpt2-conv1d"])
def test_to_peft_gives_peft_each_adapter_by_name(tmp_path, make, targets):
    model = multi_model(make, targets, dropout=0.1, use_rslora=True).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    model.get_submodule(next(iter(layers))).lora_B[1].requires_grad_(False)  # (a frozen tensor stays frozen)
    flags = {id(p): p.requires_grad for m in layers.values() for p in (*m.lora_A, *m.lora_B)}
    x = tokens(seed=4)
    with fused_lora.adapter_ids(model, torch.tensor(IDS, device=DEVICE)):
        expected = model(input_ids=x).logits.detach()
    names = ["alice", "bob", "carol"]
    peft_model = fused_lora.to_peft(model, adapter_names=names)
    assert isinstance(peft_model, peft.PeftModel) and peft_model.active_adapter == "alice"
    assert not any(isinstance(m, MultiLoRALinear) for m in peft_model.modules())
    for name, layer in layers.items():
        twin = peft_model.base_model.model.get_submodule(name)
        assert twin.fan_in_fan_out == layer.fan_in_fan_out
        for i, adapter in enumerate(names):
            assert twin.lora_A[adapter].weight is layer.lora_A[i] and twin.lora_B[adapter].weight is layer.lora_B[i]
            assert twin.lora_dropout[adapter].p == 0.1
            assert twin.scaling[adapter] == ALPHAS[i] / RANKS[i] ** 0.5  # (rsLoRA)
        assert all(p.requires_grad == flags[id(p)] for p in (*layer.lora_A, *layer.lora_B))
    assert [(c.r, c.lora_alpha, c.use_rslora) for c in map(peft_model.peft_config.get, names)] == [
        (r, a, True) for r, a in zip(RANKS, ALPHAS)]
    assert_close(_peft_mixed_batch(peft_model, names, IDS, x), expected)
    # PEFT's own: one adapter for the whole batch, and its files, which load_adapters takes back
    peft_model.set_adapter("carol")
    assert_close(peft_model(input_ids=x).logits[0], expected[0])  # (sample 0's id is 2)
    peft_model.save_pretrained(tmp_path)
    back = make()
    fused_lora.load_adapters(back, [tmp_path / n for n in names])
    with fused_lora.adapter_ids(back.eval(), torch.tensor(IDS, device=DEVICE)):
        assert_close(back(input_ids=x).logits, expected)


def test_to_peft_leaves_an_adapter_out_of_the_layers_where_its_rank_is_0(tmp_path):
    """load_adapters' layers, rank 0 where a file does not name a layer: each
    adapter goes to PEFT with the layers its file named, rank_pattern too,
    and the head trained beside them as every adapter's modules_to_save."""
    (peft0, peft1), dirs = _peft_adapters(tmp_path)
    model = tiny_llama()
    fused_lora.load_adapters(model, dirs)
    head = model.lm_head.weight.requires_grad_()
    with torch.no_grad():
        head.add_(torch.randn_like(head), alpha=0.1)
    x = tokens(seed=9)
    ids = [1, -1, 0, 1, 0]
    with fused_lora.adapter_ids(model.eval(), torch.tensor(ids, device=DEVICE)):
        expected = model(input_ids=x).logits.detach()
    peft_model = fused_lora.to_peft(model)
    names = ["default", "adapter_1"]
    assert list(peft_model.peft_config) == names
    for i, original in enumerate((peft0, peft1)):
        config = peft_model.peft_config[names[i]]
        assert sorted(config.target_modules) == sorted(
            n.removeprefix("base_model.model.") for n, m in original.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer))
        assert config.modules_to_save == ["lm_head"]
        assert torch.equal(peft_model.base_model.model.lm_head.modules_to_save[names[i]].weight, head)
    k_proj = peft_model.base_model.model.model.layers[0].self_attn.k_proj
    assert list(k_proj.lora_A) == ["adapter_1"] and k_proj.r["adapter_1"] == 2
    assert peft_model.base_model.model.model.layers[0].mlp.down_proj.r["adapter_1"] == 8
    assert_close(_peft_mixed_batch(peft_model, names, ids, x), expected)


def test_to_peft_refusals_change_nothing():
    model = multi_model()
    layers = fused_lora.integration.multi_fused_layers(model)
    for kwargs, error, match in (
            (dict(adapter_names=["a0", "a1"]), ValueError, r"adapter_names must name each of the layers' 3 adapters, "
                                                            r"got 2 names"),
            (dict(adapter_names="a0"), TypeError, "adapter_names must be a list of names"),
            (dict(adapter_names=["a0", "a1", "a0"]), ValueError, "adapter_names must be distinct"),
            (dict(adapter_names=["a0", "__base__", "a2"]), ValueError, r"adapter_names\[1\] must be .* not PEFT's "
                                                                        "'__base__'"),
            (dict(adapter_names=["a0", "a.1", "a2"]), ValueError, r"adapter_names\[1\] must be a non-empty name "
                                                                   "without a dot"),
            (dict(adapter_names=["a0", 1, "a2"]), TypeError, r"adapter_names\[1\] must be a str"),
            (dict(adapter_name="mine"), ValueError, "adapter_name='mine' names the one adapter of inject's layers; "
                                                     "this model's layers hold 3 adapters")):
        with pytest.raises(error, match=match):
            fused_lora.to_peft(model, **kwargs)
    model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.zeros(32))  # (a trained bias: the base's)
    with pytest.raises(ValueError, match=r"to_peft: trained biases \(model.layers.0.self_attn.q_proj.bias\) are a "
                                         "part of the base"):
        fused_lora.to_peft(model)
    assert fused_lora.integration.multi_fused_layers(model) == layers
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())

    wrapped = peft.get_peft_model(multi_model(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="to_peft: the model is PEFT's and holds inject_multi's layers too"):
        fused_lora.to_peft(wrapped)
    unused = multi_model(ranks=[4, 0, 2], alphas=[4, 1, 2])
    with pytest.raises(ValueError, match=r"adapter\(s\) \[1\] have rank 0 in every layer"):
        fused_lora.to_peft(unused)
    single = tiny_llama()
    fused_lora.inject(single, ["q_proj"])
    with pytest.raises(ValueError, match="adapter_names names inject_multi's adapters"):
        fused_lora.to_peft(single, adapter_names=["a"])
    with pytest.raises(ValueError, match="adapter_name must be a non-empty name"):
        fused_lora.to_peft(single, adapter_name="")
    assert len(fused_lora.integration.fused_layers(single)) == 2
    assert fused_lora.to_peft(single, adapter_name="mine").active_adapter == "mine"


def test_inject_multi_checks_before_changing_anything():
    model = tiny_llama()
    with pytest.raises(TypeError, match="ranks must be a sequence of ints"):
        fused_lora.inject_multi(model, TARGETS, ranks=4)
    with pytest.raises(ValueError, match=r"alphas must hold one value per adapter \(2\), got 1"):
        fused_lora.inject_multi(model, TARGETS, ranks=[4, 4], alphas=[1])
    with pytest.raises(ValueError, match="matched none"):
        fused_lora.inject_multi(model, ["nothing"], ranks=[4])
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # (nothing frozen either)

    fused_lora.inject_multi(model, ["q_proj"], ranks=[4, 2])
    fused_lora.inject_multi(model, ["v_proj"], ranks=[8, 8])  # (other layers, other ranks, as many adapters)
    assert model.model.layers[0].self_attn.v_proj.ranks == (8, 8)
    assert model.model.layers[0].self_attn.q_proj.lora_A[0].requires_grad  # (the first adapters train on)
    with pytest.raises(ValueError, match=r"hold 2 adapters each, ranks names 3"):
        fused_lora.inject_multi(model, ["k_proj"], ranks=[8, 8, 8])
    with pytest.raises(ValueError, match=r"already carry a fused adapter"):
        fused_lora.inject_multi(model, ["q_proj"], ranks=[8, 8])
    with pytest.raises(ValueError, match=r"inject: the model's fused layers hold several adapters each"):
        fused_lora.inject(model, ["k_proj"])
    single = tiny_llama()
    fused_lora.inject(single, ["q_proj"])
    with pytest.raises(ValueError, match=r"inject_multi: the model's fused layers hold one adapter each"):
        fused_lora.inject_multi(single, ["v_proj"], ranks=[2])
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        with fused_lora.adapter_ids(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match="the model has no fused layers"):
        with fused_lora.adapter_ids(tiny_llama(), torch.tensor([0])):
            pass
    with fused_lora.adapter_ids(model, torch.tensor([0])):
        assert fused_lora.integration.uncalled_layers(model, input_ids=tokens(b=1)) == []


def test_a_model_of_several_adapters_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of a Llama training loss inside
    adapter_ids: dynamo traces the routing hooks and the fused ops in one
    frame, which the next batch's other ids reuse; loss and gradients equal
    eager's (aot_eager: eager kernels, autograd's decompositions' rounding
    aside)."""
    import torch._dynamo.testing

    model = multi_model(dropout=0.1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss_fn(x):
        return model(input_ids=x, labels=x).loss

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for seed, ids in ((7, [2, -1, 0, 1, 0]), (8, [1, 1, -1, 2, 0])):
        x = tokens(seed=seed)
        with fused_lora.adapter_ids(model, torch.tensor(ids, device=DEVICE)):
            torch.manual_seed(seed)
            try:
                loss = compiled(x)
            except torch._dynamo.exc.Unsupported:
                skip_if_dynamo_cannot_trace_llama(x)
                raise
            grads = torch.autograd.grad(loss, params)
            torch.manual_seed(seed)
            eager = loss_fn(x)
            eager_grads = torch.autograd.grad(eager, params)
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
        assert len(grads) == len(TARGETS) * 2 * 3 * 2  # (2 layers, 3 adapters, A and B)
        for g, e in zip(grads, eager_grads):
            assert_close(g, e)
    assert counter.frame_count == 1


def test_an_optimizer_of_each_adapter_s_own_trains_each_as_if_alone():
    """adapter_parameters: each adapter's parameters, for an optimizer of its
    own, stepped on the batches that hold its rows; one AdamW over all
    adapters moves an adapter without rows too (zero gradients, weight decay
    and momentum), which training it alone would not."""
    x = tokens(seed=4, b=4)
    batches = [torch.tensor([0, 1, 0, -1]), torch.tensor([1, 1, 0, 0])]  # (adapter 2 has no rows)

    def train(per_adapter):
        model = multi_model().train()
        params = [fused_lora.adapter_parameters(model, i) for i in range(3)]
        assert [len(p) for p in params] == [12, 12, 12]
        assert {id(p) for ps in params for p in ps} == {id(p) for p in model.parameters() if p.requires_grad}
        if per_adapter:
            optimizers = [torch.optim.AdamW(p, lr=0.1, weight_decay=0.1) for p in params]
        else:
            optimizers = [torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)]
        for ids in batches:
            with fused_lora.adapter_ids(model, ids):
                model(input_ids=x, labels=x).loss.backward()
            for i, optimizer in enumerate(optimizers):
                if not per_adapter or (ids == i).any():
                    optimizer.step()
                optimizer.zero_grad()
        return model

    start = multi_model()
    own, shared = train(True), train(False)
    for name, layer in own.named_modules():
        if isinstance(layer, MultiLoRALinear):
            first = start.get_submodule(name)
            assert torch.equal(layer.lora_A[2], first.lora_A[2]) and torch.equal(layer.lora_B[2], first.lora_B[2])
            assert not torch.equal(layer.lora_B[0], first.lora_B[0])
            assert not torch.equal(shared.get_submodule(name).lora_A[2], first.lora_A[2])
    with pytest.raises(ValueError, match=r"adapter_parameters: the model's fused layers hold 3 adapters each"):
        fused_lora.adapter_parameters(own, None)
    with pytest.raises(ValueError, match=r"adapter must be in \[0, 3\)"):
        fused_lora.adapter_parameters(own, 3)
    with pytest.raises(ValueError, match="no layers of several adapters"):
        fused_lora.adapter_parameters(tiny_llama(), 0)


def test_a_frozen_adapter_gets_no_gradient_and_the_others_theirs():
    x = tokens(seed=5)
    ids = torch.tensor(IDS)

    def grads(freeze):
        model = multi_model().train()
        if freeze:
            for p in fused_lora.adapter_parameters(model, 1):
                p.requires_grad_(False)
        with fused_lora.adapter_ids(model, ids):
            model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}

    all_, frozen = grads(False), grads(True)
    for name, g in frozen.items():
        if name.endswith(".1"):
            assert g is None and all_[name] is not None, name
        else:
            assert torch.equal(g, all_[name]), name


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_runs_each_sample_with_its_adapter(tmp_path, num_beams):
    """Serving: generate (greedy, or beam search with the ids repeated as
    the beams repeat the samples) inside adapter_ids gives each sample PEFT's
    generation with its adapter alone."""
    model = multi_model().eval()
    x = tokens(seed=6, b=4, t=7)
    ids = torch.tensor([1, -1, 2, 1], device=DEVICE)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with fused_lora.adapter_ids(model, ids.repeat_interleave(num_beams)):
        out = model.generate(input_ids=x, **settings)
    assert out.shape == (4, 12)
    alone = {i: peft_alone(model, i, tmp_path) for i in (1, 2)}
    for k, i in enumerate(ids.tolist()):
        one = tiny_llama() if i == -1 else alone[i]
        assert torch.equal(out[k], one.generate(input_ids=x[k:k + 1], **settings)[0]), k


def _peft_adapters(tmp_path):
    """Two PEFT adapters of other targets, ranks and alphas (a rank pattern in
    the second), saved by PEFT: the PeftModels and their directories."""
    configs = [peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "down_proj"],
                               rank_pattern={"down_proj": 8}, init_lora_weights=False)]
    models, dirs = [], []
    for i, config in enumerate(configs):
        torch.manual_seed(20 + i)
        models.append(peft.get_peft_model(tiny_llama(), config).eval())
        dirs.append(tmp_path / f"peft{i}")
        models[-1].save_pretrained(dirs[-1])
    return models, dirs


def test_a_combination_of_adapters_of_other_targets_holds_each_layer_s_own_rank(tmp_path):
    _, dirs = _peft_adapters(tmp_path)
    model = tiny_llama()
    fused_lora.load_adapters(model, dirs)
    x = tokens(seed=5)
    oracle = peft.PeftModel.from_pretrained(tiny_llama(), dirs[0], adapter_name="a0")
    oracle.load_adapter(dirs[1], adapter_name="a1")
    oracle.add_weighted_adapter(["a1", "a0"], [0.5, 2.0], "blend", combination_type="cat")
    oracle.set_adapter("blend")
    fused_lora.save_adapter(model, tmp_path / "blend", adapter=[1, 0], weights=[0.5, 2.0])
    config = json.loads((tmp_path / "blend" / "adapter_config.json").read_text())
    ranks = {re.sub(r"model\.layers\.\d\.", "", n): config["rank_pattern"].get(n, config["r"])
             for n in config["target_modules"]}
    assert ranks == {"self_attn.q_proj": 6, "self_attn.k_proj": 2, "self_attn.v_proj": 4, "mlp.down_proj": 8}
    assert all(config["alpha_pattern"].get(n, config["lora_alpha"]) == config["rank_pattern"].get(n, config["r"])
               for n in config["target_modules"])  # (scale 1 everywhere)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "blend").eval()
    assert_close(loaded(input_ids=x).logits, oracle.eval()(input_ids=x).logits)


def test_load_adapters_serves_several_peft_adapters_of_other_targets_from_one_model(tmp_path):
    (peft0, peft1), dirs = _peft_adapters(tmp_path)
    model = tiny_llama()
    names = fused_lora.load_adapters(model, dirs)
    assert names == [f"model.layers.{i}.{m}" for i in (0, 1)
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    ranks = {n: model.get_submodule(n).ranks for n in names}
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 2) and ranks["model.layers.1.self_attn.v_proj"] == (4, 0)
    assert ranks["model.layers.0.self_attn.k_proj"] == (0, 2) and ranks["model.layers.0.mlp.down_proj"] == (0, 8)
    assert model.get_submodule("model.layers.0.mlp.down_proj").alphas == (0.0, 6.0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.{i}" for n in names for ab in "AB" for i in range(2)}
    model.eval()
    x = tokens(seed=8)
    ids = [1, -1, 0, 1, 0]
    with fused_lora.adapter_ids(model, torch.tensor(ids, device=DEVICE)):
        logits = model(input_ids=x).logits
    base = tiny_llama()(input_ids=x).logits
    for k, i in enumerate(ids):
        expected = base[k] if i == -1 else (peft0, peft1)[i](input_ids=x[k:k + 1]).logits[0]
        assert_close(logits[k], expected)
    # each adapter saved back alone: the layers its own file names, PEFT's again
    for i, original in enumerate((peft0, peft1)):
        fused_lora.save_adapter(model, tmp_path / f"back{i}", adapter=i)
        written = json.loads((tmp_path / f"back{i}" / "adapter_config.json").read_text())
        assert sorted(written["target_modules"]) == sorted(
            n.removeprefix("base_model.model.") for n, m in original.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer))
        again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / f"back{i}").eval()
        assert_close(again(input_ids=x).logits, original(input_ids=x).logits)
    assert len(fused_lora.adapter_parameters(model, 0)) == 2 * 4  # (q_proj and v_proj of both layers: A and B)


def test_load_adapters_trains_each_adapter_on_its_own_rows(tmp_path):
    """Rank-0 adapters through the fused backward: each adapter's gradients,
    PEFT's with that adapter alone on its rows."""
    models, dirs = _peft_adapters(tmp_path)
    model = tiny_llama()
    fused_lora.load_adapters(model, dirs)
    model.train()
    x = tokens(seed=9)
    ids = [1, -1, 0, 1, 0]
    weights = torch.randn(*x.shape, VOCAB, device=DEVICE)
    with fused_lora.adapter_ids(model, torch.tensor(ids, device=DEVICE)):
        (model(input_ids=x).logits * weights).sum().backward()
    for i, d in enumerate(dirs):
        alone = peft.PeftModel.from_pretrained(tiny_llama(), d, is_trainable=True).train()
        rows = [k for k, j in enumerate(ids) if j == i]
        (alone(input_ids=x[rows]).logits * weights[rows]).sum().backward()
        for name, m in alone.base_model.model.named_modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                layer = model.get_submodule(name)
                assert_close(layer.lora_A[i].grad, m.lora_A["default"].weight.grad, rtol=1e-4)
                assert_close(layer.lora_B[i].grad, m.lora_B["default"].weight.grad, rtol=1e-4)


def test_each_adapter_keeps_its_own_dropout(tmp_path):
    """load_adapters takes each file's lora_dropout for its adapter (a
    layer's adapters of other probabilities: each row of a batch dropped
    with its adapter's); save_adapter and to_peft give each adapter's back;
    load_adapter(adapter=i) sets adapter i's alone."""
    dirs = []
    for i, (targets, r, p) in enumerate(((["q_proj", "v_proj"], 4, 0.3), (["q_proj", "k_proj"], 2, 0.1))):
        torch.manual_seed(30 + i)
        dirs.append(tmp_path / f"p{i}")
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                          lora_dropout=p, init_lora_weights=False)
                            ).save_pretrained(dirs[-1])
    model = tiny_llama()
    fused_lora.load_adapters(model, dirs)
    layers = fused_lora.integration.multi_fused_layers(model)
    assert layers and all(m.dropouts == (0.3, 0.1) for m in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.dropout == (0.3, 0.1) and "dropout=[0.3, 0.1]" in repr(q)
    for i, p in enumerate((0.3, 0.1)):
        fused_lora.save_adapter(model, tmp_path / f"back{i}", adapter=i)
        assert json.loads((tmp_path / f"back{i}" / "adapter_config.json").read_text())["lora_dropout"] == p
    peft_model = fused_lora.to_peft(copy.deepcopy(model), adapter_names=["first", "second"])
    twin = peft_model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert twin.lora_dropout["first"].p == 0.3 and twin.lora_dropout["second"].p == 0.1
    # training: each row's mask its adapter's (the kernels against the oracle: test_multi_adapter.py); the
    # rows of the base alone, and every row in eval mode, undropped
    x = tokens(seed=3)
    ids = torch.tensor([0, 1, -1, 0, 1], device=DEVICE)
    model.train()
    with fused_lora.adapter_ids(model, ids):
        trained = model(input_ids=x).logits
        trained.sum().backward()
    with torch.no_grad(), fused_lora.adapter_ids(model, ids):
        evaluated = model.eval()(input_ids=x).logits
    assert torch.isfinite(trained).all() and torch.equal(trained[2], evaluated[2])
    assert not torch.allclose(trained[0], evaluated[0]) and not torch.allclose(trained[1], evaluated[1])
    assert all(p.grad is not None for p in fused_lora.adapter_parameters(model, 1))
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], lora_dropout=0.25,
                                                      init_lora_weights=False)).save_pretrained(tmp_path / "again")
    fused_lora.load_adapter(model, tmp_path / "again", adapter=1)
    assert q.dropouts == (0.3, 0.25)
    with pytest.raises(ValueError, match=r"dropout must be one probability for every adapter, or one an adapter "
                                         r"\(2\), got 3"):
        q.dropout = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"dropout\[1\] must be in \[0, 1\), got 1.5"):
        q.dropout = [0.1, 1.5]
    q.dropout = 0.05
    assert q.dropouts == (0.05, 0.05) and q.dropout == 0.05
    other = tiny_llama()
    fused_lora.inject_multi(other, ["q_proj"], ranks=[2, 3], dropout=[0.1, 0.2])
    assert all(m.dropouts == (0.1, 0.2) for m in fused_lora.integration.multi_fused_layers(other).values())
    with pytest.raises(ValueError, match=r"dropout must be one probability for every adapter, or one an adapter "
                                         r"\(2\), got 1"):
        fused_lora.inject_multi(tiny_llama(), ["q_proj"], ranks=[2, 3], dropout=[0.1])


def test_load_adapters_refusals_leave_the_model_as_it_was(tmp_path):
    _, dirs = _peft_adapters(tmp_path)
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_rslora=True)) \
        .save_pretrained(tmp_path / "rslora")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])) \
        .save_pretrained(tmp_path / "head")
    # a file whose rank pattern its tensors do not follow: found by load_adapter, after the layers were made
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((dirs[1] / "adapter_model.safetensors").read_bytes())
    config = json.loads((dirs[1] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {}}))
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: None)
    for directories, err, words in [
            ([dirs[0], tmp_path / "rslora"], AdapterFileError, "some use rsLoRA and some not"),
            ([dirs[0], tmp_path / "head"], AdapterFileError, "modules_to_save=['lm_head']"),
            ([dirs[0], bad], AdapterFileError, "do not have rank r=2 from the config"),
            ([dirs[0], tmp_path / "missing"], AdapterFileError, "does not exist"),
            (str(dirs[0]), TypeError, "directories must be a list"),
            ([], ValueError, "at least one")]:
        with pytest.raises(err, match=re.escape(words)):
            fused_lora.load_adapters(model, directories)
        assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert len(model.model.layers[0].self_attn.q_proj._forward_hooks) == 1
    hook.remove()
    fused_lora.load_adapters(model, dirs)
    with pytest.raises(ValueError, match=r"load_adapters makes the fused layers of a model without them"):
        fused_lora.load_adapters(model, dirs)


class _TokensOfAdapters(torch.utils.data.Dataset):
    def __len__(self):
        return 6  # (a batch: two samples of each adapter; two steps, as lora_B starts at zero)

    def __getitem__(self, i):
        x = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x, "adapter_ids": torch.tensor(i % 3)}


def test_the_readme_s_trainer_recipe_trains_every_adapter(tmp_path):
    """transformers' Trainer over inject_multi's layers, as the README shows
    it: a training_step that hands the batch's adapter_ids to the layers
    (the backward inside the block: activation checkpointing recomputes
    there), the column kept (remove_unused_columns=False). Every adapter
    trains, and its rows alone move it: the same run with one adapter's
    samples relabelled to the base leaves that adapter as it started."""
    prefix = "activation" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(transformers.TrainingArguments)} else "gradient"

    class MultiAdapterTrainer(transformers.Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs.pop("adapter_ids")
            with fused_lora.adapter_ids(model, ids):
                return super().training_step(model, inputs, *args, **kwargs)

    def run(dataset):
        model = tiny_llama()
        fused_lora.inject_multi(model, TARGETS, ranks=RANKS, alphas=ALPHAS, dropout=0.1)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = transformers.TrainingArguments(
            str(tmp_path), max_steps=2, per_device_train_batch_size=6, learning_rate=1e-2, save_strategy="no",
            remove_unused_columns=False, use_cpu=DEVICE.type == "cpu", report_to=[], disable_tqdm=True,
            **{f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
        MultiAdapterTrainer(model=model, args=args, train_dataset=dataset).train()
        return {n: not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad}

    moved = run(_TokensOfAdapters())
    assert len(moved) == 36 and all(moved.values())

    class WithoutAdapter2(_TokensOfAdapters):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "adapter_ids": torch.where(item["adapter_ids"] == 2, -1, item["adapter_ids"])}

    moved = run(WithoutAdapter2())
    assert not any(v for n, v in moved.items() if n.endswith(".2")) and all(
        v for n, v in moved.items() if not n.endswith(".2"))
