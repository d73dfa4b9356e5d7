"""Fused LoRA in real models: inject, PEFT conversion both ways, PEFT's file
format both ways, with real PEFT and transformers models built from small
configs (no download)."""

import copy
import dataclasses
import importlib
import inspect
import json
import math
import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import AdapterFileError, LoRALinear
from fused_lora._validate import version_tuple
from lora_testing import DEVICE, VOCAB, skip_if_dynamo_cannot_trace_llama, tiny_gpt2, tiny_llama

# (a PEFT older than from_peft/to_peft take: their ImportError, not what these tests check)
peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
transformers = pytest.importorskip("transformers")


def batch(seed=1, b=2, t=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g).to(DEVICE)


def peft_pair(make_base, config, seed=0):
    """Two identical PEFT models (non-zero B so the adapters matter)."""
    first = peft.get_peft_model(make_base(seed), copy.deepcopy(config))
    second = peft.get_peft_model(make_base(seed), copy.deepcopy(config))
    second.load_state_dict(first.state_dict())
    return first, second


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_outputs_close(a, b, rtol=1e-5):
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------

def test_inject_by_suffix_freezes_and_shares():
    model = tiny_llama()
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    names = fused_lora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is q_weight
    assert set(trainable(model)) == {f"{n}.lora_{w}" for n in names for w in "AB"}
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    logits = model(input_ids=batch()).logits
    assert logits.shape == (2, 13, VOCAB)


def test_a_second_inject_or_load_adapter_keeps_the_first_adapters_training(tmp_path):
    """inject takes one rank, so different ranks for attention and the MLP
    take two calls. The second froze the first one's adapters (and a head
    unfrozen by hand), which then never trained; load_adapter fusing more
    layers did the same. On a model fused already, what trains now keeps
    training, and one training step moves every lora_B."""
    model = tiny_llama()
    first = fused_lora.inject(model, ["q_proj"], r=4)
    model.lm_head.weight.requires_grad_(True)  # (a head unfrozen by hand)
    second = fused_lora.inject(model, ["up_proj"], r=8)
    adapters = lambda names: sorted(f"{n}.lora_{w}" for n in names for w in "AB")  # noqa: E731
    assert sorted(trainable(model)) == sorted(adapters(first + second) + ["lm_head.weight"])
    src = tiny_llama()
    fused_lora.inject(src, ["v_proj"], r=2)
    fused_lora.save_adapter(src, tmp_path)
    third = fused_lora.load_adapter(model, tmp_path)  # (fuses the plain v_proj layers)
    assert sorted(trainable(model)) == sorted(adapters(first + second + third) + ["lm_head.weight"])
    optimizer = torch.optim.SGD(trainable(model).values(), lr=0.1)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name in first + second + third:
        assert model.get_submodule(name).lora_B.abs().sum() > 0, name


def test_inject_keeps_train_and_eval_modes():
    model = tiny_llama().eval()
    fused_lora.inject(model, ["q_proj"], dropout=0.5)
    assert not model.model.layers[0].self_attn.q_proj.training  # no dropout in an eval model
    model.train()
    assert model.model.layers[0].self_attn.q_proj.training


def test_inject_regex_all_linear_and_exclude():
    model = tiny_llama()
    names = fused_lora.inject(model, r"model\.layers\.1\.mlp\.(gate|up)_proj")
    assert names == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    model = tiny_llama()
    names = fused_lora.inject(model, "all-linear", exclude_modules=["down_proj"])
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert len(names) == 2 * 6


def _why_a_plain_model_cannot_run_on_meta(config) -> str | None:
    """Why transformers' own model (no adapter) cannot run a forward on the
    meta device with this transformers and torch, or None when it can."""
    with torch.device("meta"):
        plain = transformers.LlamaForCausalLM(config)
    try:
        plain(input_ids=batch().to("meta"))
    except RuntimeError as err:  # transformers 4.57's rotary embedding under torch 2.13: torch.autocast("meta")
        return (f"transformers {transformers.__version__}'s own Llama cannot run on meta with torch "
                f"{torch.__version__}, with or without adapters ({err})")
    return None


def _materialise_as(model, base, names):
    """The README's recipe after building on meta and injecting:
    ``to_empty``, the base weights loaded, the adapters initialised."""
    model.to_empty(device=DEVICE)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {f"{n}.lora_{w}" for n in names for w in "AB"}
    for name, buffer in base.named_buffers():  # (transformers' non-persistent buffers: rotary frequencies)
        model.get_buffer(name).copy_(buffer)
    for layer in fused_lora.integration.fused_layers(model).values():
        layer.reset_lora_parameters()
        assert torch.isfinite(layer.lora_A).all() and layer.lora_A.abs().max() > 0 and not layer.lora_B.any()


def test_inject_on_a_model_built_on_meta():
    """The large-model recipe: build on the meta device, inject, materialise
    with ``to_empty``, load the base weights, initialise the adapters (as the
    README says). The result is the model injected after loading: a fresh
    adapter changes nothing, and with the same adapter the outputs and the
    adapters' gradients are the same."""
    base = tiny_llama()
    expected = copy.deepcopy(base)
    names = fused_lora.inject(expected, LLAMA_TARGETS, r=4, alpha=8)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(base.config)
    assert fused_lora.inject(model, LLAMA_TARGETS, r=4, alpha=8) == names
    assert {p.device.type for p in model.parameters()} == {"meta"}
    _materialise_as(model, base, names)
    ids = batch()
    assert_outputs_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    for layer in fused_lora.integration.fused_layers(expected).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    model.load_state_dict(expected.state_dict())
    grads = []
    for m in (model, expected):
        m(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in trainable(m).items()})
        assert len(grads[-1]) == 2 * len(names)
    assert_outputs_close(model(input_ids=ids).logits, expected(input_ids=ids).logits)
    for n, g in grads[1].items():
        assert_outputs_close(grads[0][n], g)


def test_a_model_injected_on_meta_runs_on_meta_then_materialises():
    """Before materialising, a forward and backward on meta give meta
    tensors of the right shapes (as on the plain model: a shape check of a
    large model without its memory), and the model then materialises as in
    the recipe, its outputs the base model's."""
    base = tiny_llama()
    if reason := _why_a_plain_model_cannot_run_on_meta(base.config):
        pytest.skip(reason)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(base.config)
    names = fused_lora.inject(model, LLAMA_TARGETS, r=4, alpha=8)
    logits = model(input_ids=batch().to("meta")).logits
    assert logits.device.type == "meta" and logits.shape == (2, 13, VOCAB)
    logits.sum().backward()
    adapters = trainable(model)
    assert len(adapters) == 2 * len(names) and {p.grad.device.type for p in adapters.values()} == {"meta"}
    model.zero_grad(set_to_none=True)
    _materialise_as(model, base, names)
    ids = batch()
    assert_outputs_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_inject_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched none.*model.layers.0.self_attn.q_proj"):
        fused_lora.inject(model, ["qkv"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fused_lora.inject(model, "q_proj(")
    with pytest.raises(TypeError, match="target_modules"):
        fused_lora.inject(model, 3)
    with pytest.warns(UserWarning, match=r"entries \['v_prj'\] match none of the model's linear layers"):
        fused_lora.inject(model, ["q_proj", "v_prj"])  # (a typo: the q_proj layers are fused, and it is named)
    assert len(fused_lora.integration.fused_layers(model)) == 2
    with pytest.raises(ValueError, match="already carry"):
        fused_lora.inject(model, ["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every entry matches a layer, or one excluded: no warning)
        fused_lora.inject(model, ["v_proj", "k_proj"], exclude_modules=["k_proj"])
    gpt2 = tiny_gpt2()  # (its Conv1D layers take another path to their adapters)
    for kwargs, err, words in [(dict(r=2.5), TypeError, "r must be an int, got float"),
                               (dict(r=0), ValueError, "r must be >= 1"),
                               (dict(adapter_dtype="float32"), TypeError, "adapter_dtype must be a floating-point")]:
        for m in (tiny_llama(), gpt2):
            with pytest.raises(err, match=words):
                fused_lora.inject(m, "all-linear", **kwargs)
            assert not fused_lora.integration.fused_layers(m)
    for call in (lambda: fused_lora.inject("model", ["q_proj"]), lambda: fused_lora.from_peft(None),
                 lambda: fused_lora.to_peft([]), lambda: fused_lora.save_adapter({}, "x"),
                 lambda: fused_lora.load_adapter(3, "x"), lambda: fused_lora.merge_and_unload("m"),
                 lambda: fused_lora.unload(None), lambda: fused_lora.integration.guard_fast_paths(1)):
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got"):
            call()


def test_inject_gpt2_conv1d():
    model = tiny_gpt2()
    ids = batch()
    base_logits = model(input_ids=ids).logits
    names = fused_lora.inject(model, ["c_attn", "c_fc"], r=4, alpha=4)
    assert len(names) == 4
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.in_features == 32 and layer.out_features == 96
    assert_outputs_close(model(input_ids=ids).logits, base_logits)  # B = 0: a fresh adapter changes nothing


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_activation_checkpointing_gives_the_same_gradients(reentrant):
    """A transformers model's own activation checkpointing over fused layers
    with dropout: the recomputed forward draws the same masks (the seed comes
    from the generator whose state checkpointing restores), so the loss and
    every adapter gradient equal those of the run without it, bit for bit."""

    def step(checkpointed):
        # (eager attention: on CUDA, SDPA's fused backward need not be bitwise reproducible)
        model = tiny_llama(seed=3, attn_implementation="eager")
        fused_lora.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                nn.init.normal_(layer.lora_B)
        model.train()
        if checkpointed:
            # (transformers 5.x's name, and the older one)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:  # (reentrant checkpointing passes gradients only through inputs that require them)
                model.enable_input_require_grads()
        ids = batch(seed=4)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad for n, p in trainable(model).items()}

    loss, grads = step(False)
    loss_ckpt, grads_ckpt = step(True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 12
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
        assert torch.equal(g, grads_ckpt[name]), name


def test_a_transformers_model_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of a Llama training loss with every linear
    fused (dropout on): dynamo traces the model and the fused ops in one
    frame, reused by the next batch, and each step's loss and 28 adapter
    gradients equal eager's from the same generator state (same masks).
    aot_eager runs the traced graph on eager kernels, so the remaining
    differences are the rounding of autograd's decompositions (none on torch
    2.13; up to 1.3e-7 on 2.11), far inside the tolerance, while a different
    mask or a missing low-rank term would be far outside it."""
    import torch._dynamo.testing

    model = tiny_llama(seed=6)
    fused_lora.inject(model, "all-linear", r=4, alpha=8, dropout=0.1)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B)
    model.train()
    params = list(trainable(model).values())
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for seed in (7, 8):
        ids = batch(seed=seed)
        torch.manual_seed(seed)
        try:
            loss = compiled(ids)
        except torch._dynamo.exc.Unsupported:
            skip_if_dynamo_cannot_trace_llama(ids)
            raise
        grads = torch.autograd.grad(loss, params)
        torch.manual_seed(seed)
        eager = loss_fn(ids)
        eager_grads = torch.autograd.grad(eager, params)
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
        assert len(grads) == 28
        for g, e in zip(grads, eager_grads):
            assert_outputs_close(g, e)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------
# from_peft / to_peft
# ----------------------------------------------------------------------------

class _TokenDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_transformers_trainer_checkpoints_and_resumes_bitwise(tmp_path):
    """transformers' Trainer over an injected model (every linear fused,
    dropout, gradient checkpointing): it trains, its checkpoint holds the
    adapters and their optimizer state, and a run resumed from the first
    step's checkpoint ends with the adapters of the uninterrupted run, bit for
    bit (the dropout masks follow the generator state the checkpoint restores)."""
    # transformers 5's checkpointing (non-reentrant, its default), named as this transformers names it: 4.x's
    # default, reentrant, passes gradients only through inputs that require them (the loss of PEFT's models,
    # like that of fused ones, then has none, unless model.enable_input_require_grads() is called first)
    prefix = "activation" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(transformers.TrainingArguments)} else "gradient"
    checkpointing = {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}

    def run(resume_from=None):
        model = tiny_llama(seed=0 if resume_from is None else 7)  # (resuming loads every weight)
        fused_lora.inject(model, "all-linear", r=4, alpha=8, dropout=0.1)
        args = transformers.TrainingArguments(
            str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=DEVICE.type == "cpu", report_to=[], disable_tqdm=True, logging_steps=1, **checkpointing)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())
        trainer.train(resume_from_checkpoint=resume_from)
        return model, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    model, losses = run()
    adapters = {n: p.detach().clone() for n, p in trainable(model).items()}
    assert len(adapters) == 2 * 14 and all(torch.isfinite(p).all() for p in adapters.values())
    # every adapter trained (B starts at zero; checkpointed layers reach their gradients too)
    assert all(p.abs().max() > 0 for n, p in adapters.items() if n.endswith("lora_B")), adapters.keys()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    assert {n for n in adapters} <= set(saved)
    assert len(torch.load(tmp_path / "checkpoint-1" / "optimizer.pt", weights_only=False)["state"]) == len(adapters)
    resumed, resumed_losses = run(resume_from=str(tmp_path / "checkpoint-1"))
    assert len(losses) == 2 and resumed_losses == losses  # (the first from the checkpoint's log, the second rerun)
    for n, p in trainable(resumed).items():
        assert torch.equal(p, adapters[n]), n


def test_transformers_trainer_resumes_a_model_from_peft_bitwise(tmp_path):
    """A PeftModel converted by from_peft under transformers' Trainer: its
    checkpoint is PEFT's adapter file with every converted layer (the
    Trainer calls save_pretrained), and a run resumed from it (the Trainer
    calls load_adapter) ends with the uninterrupted run's adapters, bit for
    bit, though it starts from other ones."""
    def run(resume_from=None):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                  target_modules=LLAMA_TARGETS))
        assert len(fused_lora.from_peft(model).converted) == 14
        if resume_from is not None:
            _perturb([p for n, p in model.named_parameters() if "lora_" in n])
        args = transformers.TrainingArguments(
            str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=DEVICE.type == "cpu", report_to=[], disable_tqdm=True, logging_steps=1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())
        trainer.train(resume_from_checkpoint=resume_from)
        return model, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    model, losses = run()
    adapters = {n: p.detach().clone() for n, p in trainable(model).items()}
    assert len(adapters) == 2 * 14
    assert len(_saved_keys(tmp_path / "checkpoint-1")) == 2 * 14
    resumed, resumed_losses = run(resume_from=str(tmp_path / "checkpoint-1"))
    assert len(losses) == 2 and resumed_losses == losses
    for n, p in trainable(resumed).items():
        assert torch.equal(p, adapters[n]), n


@pytest.mark.parametrize("variant", ["plain", "rslora-patterns-bias", "dropout"])
def test_from_peft_matches_peft(variant):
    kwargs = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    overrides = {}
    if variant == "rslora-patterns-bias":
        kwargs.update(use_rslora=True, rank_pattern={"down_proj": 6, "layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"v_proj": 3})
        overrides = dict(attention_bias=True, mlp_bias=True)
    if variant == "dropout":
        kwargs.update(lora_dropout=0.2)
    ref, fused = peft_pair(lambda s: tiny_llama(s, **overrides), peft.LoraConfig(**kwargs))
    report = fused_lora.from_peft(fused)
    assert len(report.converted) == 14 and not report.skipped
    layer = fused.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    if variant == "rslora-patterns-bias":
        assert layer.r == 2 and layer.use_rslora and layer.bias is not None
        assert fused.base_model.model.model.layers[0].mlp.down_proj.r == 6
        assert fused.base_model.model.model.layers[0].self_attn.v_proj.alpha == 3
    if variant == "dropout":
        assert layer.dropout == 0.2
        ref.eval()
        fused.eval()  # dropout masks differ between PEFT and the kernels: compare without them
    ids = batch()
    out_ref, out_fused = ref(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert_outputs_close(out_fused.logits, out_ref.logits)
    out_ref.loss.backward()
    out_fused.loss.backward()
    g_ref, g_fused = trainable(ref), trainable(fused)
    assert len(g_ref) == len(g_fused) == 28
    for (n_ref, p_ref), (n_fused, p_fused) in zip(g_ref.items(), g_fused.items()):
        assert n_ref.startswith(n_fused)  # ...lora_A.default.weight vs ...lora_A: the same tensor
        assert_outputs_close(p_fused.grad, p_ref.grad, rtol=1e-4)
    if variant == "dropout":
        fused.train()
        torch.manual_seed(0)
        a = fused(input_ids=ids).logits
        assert not torch.allclose(a, out_fused.logits)  # dropout is active in train mode


def test_training_steps_match_and_old_optimizer_keeps_working():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    ref, fused = peft_pair(tiny_llama, config)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_fused = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-2)  # built before
    fused_lora.from_peft(fused)
    losses = []
    for _ in range(3):
        ids = batch(seed=10)  # the same batch: the loss must go down
        for model, opt in ((ref, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    ref_losses, fused_losses = losses[0::2], losses[1::2]
    assert ref_losses[-1] < ref_losses[0]
    for a, b in zip(ref_losses, fused_losses):
        assert abs(a - b) < 1e-4 * abs(a)


def test_from_peft_gpt2_fan_in_fan_out():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False)
    ref, fused = peft_pair(tiny_gpt2, config)
    report = fused_lora.from_peft(fused)
    assert len(report.converted) == 6 and not report.skipped  # attn.c_attn, attn.c_proj, mlp.c_proj per block
    assert all(fused.get_submodule(n).fan_in_fan_out for n in report.converted)
    ids = batch()
    a, b = ref(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert_outputs_close(b.logits, a.logits)
    a.loss.backward()
    b.loss.backward()
    for p_ref, p_fused in zip(trainable(ref).values(), trainable(fused).values()):
        assert_outputs_close(p_fused.grad, p_ref.grad, rtol=1e-4)


@pytest.mark.parametrize("feature, reason", [
    ("mica", "variant"),
    ("lora_bias", "lora_bias"),
    ("two_active", "several adapters active"),  # (PEFT sums them, DoRA's whole; LoRA's: tests/test_peft_multi.py)
    ("merged", "merged"),
])
def test_unsupported_features_are_left_and_reported(feature, reason):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if feature == "mica":  # (MiCA: a variant that freezes lora_B; DoRA and aLoRA convert: test_from_peft_dora,
        kwargs.update(init_lora_weights="mica")  # tests/test_peft_alora.py)
    if feature == "lora_bias":
        kwargs["lora_bias"] = True
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    if feature == "two_active":
        model.add_adapter("other", peft.LoraConfig(**kwargs, use_dora=True))
        model.base_model.set_adapter(["default", "other"])
    if feature == "merged":
        model.merge_adapter()
    ids = batch()
    before = model(input_ids=ids).logits.detach()
    report = fused_lora.from_peft(model)
    assert report.converted == [] and len(report.skipped) == 4
    assert all(reason in why for why in report.skipped.values()), report.skipped
    assert reason in str(report)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_to_peft_restores_the_original_layers():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    originals = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.from_peft(model)
    model.get_submodule(next(iter(originals))).merge()  # merged fused layers are unmerged on the way back
    for kwargs in (dict(adapter_name="other"), dict(adapter_names=["default"])):  # (PEFT's names stay)
        with pytest.raises(ValueError, match=r"to_peft: adapter_names? names the adapters of layers inject made"):
            fused_lora.to_peft(model, **kwargs)
    back = fused_lora.to_peft(model)
    assert back is model
    for name, module in originals.items():
        assert model.get_submodule(name) is module
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("how", ["from_peft", "inject"])
def test_to_peft_keeps_an_eval_model_in_eval_mode(how):
    """A model put in eval mode after the conversion: PEFT's layers come back
    (or are made, in train mode) in eval mode too, their dropout off."""
    if how == "from_peft":
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)
        model = peft.get_peft_model(tiny_llama(), config).train()
        fused_lora.from_peft(model)
    else:
        model = tiny_llama().train()
        fused_lora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.5)
        with torch.no_grad():
            for layer in fused_lora.integration.fused_layers(model).values():
                layer.lora_B.normal_()
    model.eval()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    back = fused_lora.to_peft(model)
    assert [n for n, m in back.named_modules() if m.training] == []
    assert_outputs_close(back(input_ids=ids).logits, expected)
    back.train()
    assert not torch.allclose(back(input_ids=ids).logits, expected, rtol=1e-3)  # (dropout 0.5 on in train mode)


def _add_adapter_as_transformers_does(model, config):
    """transformers' own PEFT integration (``model.add_adapter``): where this
    transformers refuses the installed PEFT, what add_adapter does: PEFT's
    ``inject_adapter_in_model`` on the model itself, and the flag its
    adapter methods (save_pretrained, disable_adapters...) go by."""
    try:
        model.add_adapter(config)
    except ValueError as err:
        if "version of PEFT" not in str(err):
            raise
        peft.inject_adapter_in_model(config, model, "default")
        model.peft_config = {"default": config}
        model._hf_peft_config_loaded = True
    assert model._hf_peft_config_loaded


@pytest.mark.parametrize("kind", ["PeftModel", "from_peft", "the model inside, after from_peft", "peft layers",
                                  "transformers' add_adapter"])
def test_fusing_more_layers_into_a_peft_model_is_refused(tmp_path, kind):
    """Fused layers added beside PEFT's are unseen by PEFT's machinery: its
    save_pretrained wrote a file without them, silently, its disable_adapter
    left them on, and inject froze PEFT's adapters. inject, and load_adapter
    where it would fuse plain linears, refuse a PEFT model, and leave it as
    it was; from_peft refuses transformers' own PEFT integration, whose
    methods would break or skip the fused layers."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    fused_lora.save_adapter(_randomised_fused_llama(target_modules=["k_proj"], r=2), tmp_path)
    model = tiny_llama()
    if kind == "transformers' add_adapter":
        _add_adapter_as_transformers_does(model, config)
        with pytest.raises(ValueError, match=r"from_peft: the model holds transformers' own PEFT adapters"):
            fused_lora.from_peft(model)
        why = r"holding transformers' PEFT adapters"
    elif kind == "peft layers":
        peft.inject_adapter_in_model(config, model)
        why = r"holding PEFT's layers \(model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj\)"
    elif kind == "the model inside, after from_peft":  # (PEFT changed it in place: users keep it)
        fused_lora.from_peft(peft.get_peft_model(model, config))
        why = r"holding layers from_peft converted \(model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj\)"
    else:
        model = peft.get_peft_model(model, config)
        why = "a peft.PeftModel"
        if kind == "from_peft":
            fused_lora.from_peft(model)
    before_state, before_types = _state(model)
    before_trainable = sorted(trainable(model))
    assert before_trainable and all("q_proj.lora_" in n for n in before_trainable)
    with pytest.raises(ValueError, match=rf"^inject: the model is {why}.*\. PEFT's own methods .* would not see fused "
                                         r"layers .* add these layers to PEFT's LoraConfig"):
        fused_lora.inject(model, ["k_proj"], r=2)
    with pytest.raises(ValueError, match=rf"^load_adapter: the model is {why}.*\. .* add "
                                         r"(base_model\.model\.)?model.layers.0.self_attn.k_proj to PEFT's LoraConfig"):
        fused_lora.load_adapter(model, tmp_path)
    after_state, after_types = _state(model)
    assert after_types == before_types and sorted(trainable(model)) == before_trainable
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())


def test_peft_older_than_the_floor_is_refused_by_name(monkeypatch):
    """from_peft and to_peft refuse a PEFT older than the oldest they are
    tested with (ImportError naming both versions), before changing
    anything; pyproject.toml's extras ask for that PEFT."""
    from pathlib import Path

    floor = ".".join(map(str, fused_lora.integration.MIN_PEFT))
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert text.count(f'"peft>={floor}"') == 3 and text.count('"peft>=') == 3  # (the peft, demo and test extras)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    fused = tiny_llama()
    fused_lora.inject(fused, ["q_proj"], r=4)
    states = [_state(peft_model), _state(fused)]
    major, minor = fused_lora.integration.MIN_PEFT
    monkeypatch.setattr(peft, "__version__", f"{major}.{minor - 1}.1")
    for call in (lambda: fused_lora.from_peft(peft_model), lambda: fused_lora.to_peft(fused)):
        with pytest.raises(ImportError, match=rf"need peft>={re.escape(floor)}, .*found peft {major}\.{minor - 1}\.1"):
            call()
    for (state, types), model in zip(states, (peft_model, fused)):
        after_state, after_types = _state(model)
        assert after_types == types and all(torch.equal(after_state[k], v) for k, v in state.items())
    monkeypatch.setattr(peft, "__version__", f"{major}.{minor}.0")
    assert len(fused_lora.from_peft(peft_model).converted) == 2


def test_from_peft_refuses_fused_layers_that_peft_wrapped_without_knowing(tmp_path):
    """peft.get_peft_model on a model after inject does not save the fused
    layers' adapters as adapters (PEFT does not know them; PEFT 0.21 also
    freezes them): from_peft, that flow's next step, refuses the PeftModel
    and the model inside it, naming the layers, and changes nothing. The way
    its message gives works: to_peft on the fused model, then from_peft."""
    model = _randomised_fused_llama(target_modules=["k_proj"], r=2)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    # what PEFT did, silently (the reason for the refusal): its file holds no adapter of theirs; PEFT 0.21 froze
    # them (older ones leave them training: their names hold "lora_"), and the message says so where it did
    fused_adapters = [p for n, p in peft_model.named_parameters() if "k_proj.lora_" in n]
    assert len(fused_adapters) == 4
    frozen = not any(p.requires_grad for p in fused_adapters)
    assert frozen or all(p.requires_grad for p in fused_adapters)
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # (none of theirs as an adapter's weight; PEFT 0.20 writes their tensors bare, the others nothing of them)
    assert saved and not any(re.search(r"k_proj\.lora_[AB]\.(default\.)?weight$", k) for k in saved)
    assert any("q_proj.lora_A.weight" in k for k in saved)
    for target, prefix in ((peft_model, r"base_model\.model\."), (peft_model.base_model.model, "")):
        for froze in (frozen, not frozen):
            for p in fused_adapters:
                p.requires_grad_(not froze)
            before_state, before_types = _state(target)
            said = "peft\\.get_peft_model froze their adapters, and its" if froze else "PEFT does not know them: its"
            layers = rf"{prefix}model\.layers\.0\.self_attn\.k_proj, {prefix}model\.layers\.1\.self_attn\.k_proj"
            with pytest.raises(ValueError, match=rf"^from_peft: the model holds fused layers that PEFT did not make "
                                                 rf"\({layers}: .*{said} save_pretrained does not save them as"):
                fused_lora.from_peft(target)
            after_state, after_types = _state(target)
            assert after_types == before_types and all(torch.equal(after_state[k], v) for k, v in before_state.items())
            assert getattr(target, fused_lora.integration._ORIGINALS, None) is None  # (nothing converted)
    # the way out the message gives: PEFT takes the fused layers first (to_peft), then from_peft again
    fused = _randomised_fused_llama(target_modules=["k_proj"], r=2)
    ids = torch.randint(0, VOCAB, (2, 7), device=DEVICE)
    expected = fused(input_ids=ids).logits
    back = fused_lora.to_peft(fused)
    report = fused_lora.from_peft(back)
    assert sorted(report.converted) == ["base_model.model.model.layers.0.self_attn.k_proj",
                                        "base_model.model.model.layers.1.self_attn.k_proj"]
    assert_outputs_close(back(input_ids=ids).logits, expected)


def test_inject_to_peft_builds_an_equivalent_peft_model():
    model = tiny_llama()
    fused_lora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.normal_()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    shared = model.model.layers[0].self_attn.q_proj.lora_A
    peft_model = fused_lora.to_peft(model)
    assert isinstance(peft_model, peft.PeftModel)
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight is shared
    assert_outputs_close(peft_model(input_ids=ids).logits, expected)


def test_inject_gpt2_to_peft_goes_back_to_conv1d():
    model = tiny_gpt2()
    fused_lora.inject(model, ["c_attn"], r=4, alpha=8)
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.normal_()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    peft_model = fused_lora.to_peft(model)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert type(layer.get_base_layer()).__name__ == "Conv1D" and layer.fan_in_fan_out
    assert_outputs_close(peft_model(input_ids=ids).logits, expected)


def test_gpt2_conv1d_blocks_and_a_linear_head_save_and_go_back_to_peft(tmp_path):
    """GPT-2's blocks are Conv1D (fan_in_fan_out), its classification head an
    nn.Linear: "all-linear" takes both, in PEFT as here. PEFT sets
    fan_in_fan_out per layer by the base's type, so one file holds both;
    save_adapter and to_peft refused the mix."""
    def classifier():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=3, pad_token_id=0)
        return transformers.GPT2ForSequenceClassification(cfg).to(DEVICE)

    model = classifier()
    names = fused_lora.inject(model, "all-linear", r=2)
    peft_names = [n.removeprefix("base_model.model.") for n in _peft_adapter_layers(
        peft.get_peft_model(classifier(), peft.LoraConfig(r=2, target_modules="all-linear")))]
    assert names == peft_names and names[-1] == "score"
    _randomise_adapters(model)
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # (8 of 9)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        loaded = peft.PeftModel.from_pretrained(classifier(), tmp_path)
    assert_outputs_close(loaded(input_ids=ids).logits, expected)
    plain = classifier()
    fused_lora.load_adapter(plain, tmp_path)
    assert plain.score.fan_in_fan_out is False and plain.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    assert_outputs_close(plain(input_ids=ids).logits, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (PEFT's per-layer fan_in_fan_out notices: kept quiet)
        peft_model = fused_lora.to_peft(model)
    assert type(peft_model.base_model.model.score.get_base_layer()) is nn.Linear
    assert not peft_model.base_model.model.score.fan_in_fan_out
    assert_outputs_close(peft_model(input_ids=ids).logits, expected)


# ----------------------------------------------------------------------------
# PEFT's file format
# ----------------------------------------------------------------------------

def _randomise_adapters(model):
    """Non-zero B in every fused layer, so that the adapters matter."""
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.normal_(0, 0.5)


def _randomised_fused_llama(**inject_kwargs):
    model = tiny_llama()
    fused_lora.inject(model, **inject_kwargs)
    _randomise_adapters(model)
    return model


def test_save_adapter_loads_in_peft(tmp_path):
    model = _randomised_fused_llama(target_modules=LLAMA_TARGETS, r=4, alpha=8, use_rslora=True)
    model.model.layers[1].mlp.up_proj.alpha = 5.0  # a per-layer alpha -> alpha_pattern
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    assert config["alpha_pattern"] == {"model.layers.1.mlp.up_proj": 5}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_outputs_close(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("make, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_weights_merge_and_save_an_adapter_at_a_strength(tmp_path, make, targets):
    """``weights=w`` on inject's layers: ``W + w·s·B A``, as the model whose
    adapters are the same at w times their alpha (the oracle: PEFT's model
    of the file saved unweighted, its scales times w)."""
    model = make()
    fused_lora.inject(model, targets, r=4, alpha=8, use_rslora=True)
    _randomise_adapters(model)
    model.eval()
    first = next(iter(fused_lora.integration.fused_layers(model).values()))
    first.alpha = 5.0  # (a per-layer alpha: alpha_pattern)
    ids = batch()
    fused_lora.save_adapter(model, tmp_path / "full")
    oracle = peft.PeftModel.from_pretrained(make(), tmp_path / "full").eval()
    for layer in oracle.modules():
        if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling:
            layer.scaling["default"] *= -0.75
    expected = oracle(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path / "weighted", weights=-0.75)
    config = json.loads((tmp_path / "weighted" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == -6 and list(config["alpha_pattern"].values()) == [-3.75]
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "weighted").eval()
    assert_outputs_close(loaded(input_ids=ids).logits, expected)
    merged = copy.deepcopy(model)
    fused_lora.merge_and_unload(merged, weights=[-0.75])
    assert not fused_lora.integration.fused_layers(merged)
    assert_outputs_close(merged(input_ids=ids).logits, expected)
    merged_once = copy.deepcopy(model)  # (a layer merged already is unmerged first: the weight applies once)
    first_copy = next(iter(fused_lora.integration.fused_layers(merged_once).values()))
    first_copy.merge()
    fused_lora.merge_and_unload(merged_once, weights=-0.75)
    assert_outputs_close(merged_once(input_ids=ids).logits, expected)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, err, words in [(dict(weights=[1.0, 2.0]), ValueError, "the model.s fused layers hold one adapter each: "
                                                                         "weights must be one"),
                               (dict(weights="1"), TypeError, "weights must be a real number"),
                               (dict(weights=math.inf), ValueError, "weights must be finite"),
                               (dict(adapter=[0], weights=1.0), ValueError, r"adapter=\[0\] picks adapters of "
                                                                           "inject_multi's layers")]:
        for what in ("merge_and_unload", "save_adapter"):
            with pytest.raises(err, match=f"{what}: {words}"):
                if what == "merge_and_unload":
                    fused_lora.merge_and_unload(model, **kwargs)
                else:
                    fused_lora.save_adapter(model, tmp_path / "never", **kwargs)
    assert fused_lora.integration.fused_layers(model) and not (tmp_path / "never").exists()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_weights_refuse_dora_s_layers(tmp_path):
    model = _randomised_fused_llama(target_modules=LLAMA_TARGETS, r=4, use_dora=True)
    for call in (lambda: fused_lora.merge_and_unload(model, weights=0.5),
                 lambda: fused_lora.save_adapter(model, tmp_path / "never", weights=0.5)):
        with pytest.raises(ValueError, match=r"weights scale an adapter's term s·B·A, which DoRA's layers"):
            call()
    assert fused_lora.integration.fused_layers(model) and not (tmp_path / "never").exists()


def test_load_adapter_written_by_peft(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={"up_proj": 8}, init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama(), config)
    ref.save_pretrained(tmp_path)
    ids = batch()
    expected = ref(input_ids=ids).logits.detach()
    # into a plain model: the layers are fused on the way in
    plain = tiny_llama()
    names = fused_lora.load_adapter(plain, tmp_path)
    assert len(names) == 6 and plain.model.layers[0].mlp.up_proj.r == 8
    # frozen but for the adapters, as inject and PEFT's from_pretrained(is_trainable=True) leave it
    assert sorted(trainable(plain)) == sorted(f"{n}.lora_{w}" for n in names for w in "AB")
    assert_outputs_close(plain(input_ids=ids).logits, expected)
    # into a model already fused (same ranks): weights and scaling replaced
    fused = tiny_llama()
    fused_lora.inject(fused, ["q_proj", "v_proj"], r=4, alpha=1)
    fused_lora.inject(fused, ["up_proj"], r=8, alpha=1)
    fused_lora.load_adapter(fused, tmp_path)
    assert fused.model.layers[0].self_attn.q_proj.alpha == 16
    assert_outputs_close(fused(input_ids=ids).logits, expected)
    # round trip back through our writer
    fused_lora.save_adapter(fused, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    assert_outputs_close(again(input_ids=ids).logits, expected)
    # into a model with more fused layers than the file has: they keep theirs, and a warning names them
    fused_lora.inject(fused, ["down_proj"], r=2)
    _randomise_adapters(fused)
    kept = {n: (m.lora_A.clone(), m.lora_B.clone()) for n, m in fused.named_modules() if n.endswith("down_proj")}
    with pytest.warns(UserWarning, match=r"no adapter for the fused layers \['model.layers.0.mlp.down_proj', "
                                         r"'model.layers.1.mlp.down_proj'\]: they keep"):
        fused_lora.load_adapter(fused, tmp_path)
    assert all(torch.equal(fused.get_submodule(n).lora_A, a) and torch.equal(fused.get_submodule(n).lora_B, b)
               for n, (a, b) in kept.items())


def test_rank_and_alpha_patterns_match_as_in_peft(tmp_path):
    """PEFT reads each rank_pattern/alpha_pattern key as a regular expression
    for the end of a module name (its first match wins): an alternation such
    as ``q_proj|up_proj`` is one key for both. Each fused layer gets the r
    and alpha PEFT's layer of that name has, and the same outputs."""
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={r"layers\.1\.self_attn\.(q|v)_proj": 6, "up_proj": 8},
                             alpha_pattern={"q_proj|up_proj": 24, "v_proj": 5}, init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama(), config)
    ref.save_pretrained(tmp_path)
    expected = {n: (m.r["default"], m.lora_alpha["default"]) for n, m in ref.base_model.model.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(set(expected.values())) == 5  # (every pattern matters)
    plain = tiny_llama()
    fused_lora.load_adapter(plain, tmp_path)
    got = {n: (m.r, m.alpha) for n, m in fused_lora.integration.fused_layers(plain).items()}
    assert got == expected
    ids = batch()
    assert_outputs_close(plain(input_ids=ids).logits, ref(input_ids=ids).logits.detach())

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj(": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="alpha_pattern: 'q_proj\\(' is not a valid regular expression"):
        fused_lora.load_adapter(tiny_llama(), tmp_path)


def test_load_adapter_keeps_the_dtype_the_adapter_was_saved_in(tmp_path):
    """PEFT keeps fp32 adapters on a bf16 base (``autocast_adapter_dtype``):
    fusing a bf16 model's linears, load_adapter keeps them fp32, bit for bit as
    saved, instead of rounding them to the base's bf16."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(tiny_llama().to(torch.bfloat16), config)
    ref.save_pretrained(tmp_path)
    model = tiny_llama().to(torch.bfloat16)
    fused_lora.load_adapter(model, tmp_path)
    for i in range(2):
        layer, want = model.model.layers[i].self_attn.q_proj, ref.base_model.model.model.layers[i].self_attn.q_proj
        assert layer.weight.dtype == torch.bfloat16
        for got, saved in ((layer.lora_A, want.lora_A["default"].weight),
                           (layer.lora_B, want.lora_B["default"].weight)):
            assert got.dtype == saved.dtype == torch.float32
            assert torch.equal(got, saved)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {n: type(m).__name__ for n, m in model.named_modules()}


@pytest.mark.parametrize("damage, message", [
    ("config_json", "not valid JSON"),
    ("config_missing", "does not exist"),
    ("weights_truncated", "corrupt or truncated"),
    ("weights_missing", "neither"),
    ("drop_lora_B", "but not both"),
    ("wrong_rank", "rank r="),
    ("wrong_shape", "do not fit"),
    ("unknown_module", "no module"),
    ("unknown_key", "unexpected tensor"),
    ("dora", "use_dora is true in the config but the layer has no lora_magnitude_vector"),
    ("nan", "NaN"),
    ("integer_weights", "must be floating point"),
    ("bias_option", "bias='some' is not one of PEFT's"),
    ("dropout_out_of_range", r"lora_dropout must be a number in \[0, 1\), got 2.0"),
    ("rslora_not_a_bool", "use_rslora must be true or false, got 'yes'"),
    ("bias_of_no_bias", "q_proj: the file has a trained bias for the layer .bias='lora_only'., the model's layer "
                        "has none"),
    ("bias_alone", r"biases for layers without lora_A/lora_B weights: \['model.layers.0.self_attn.k_proj'\]"),
])
def test_bad_adapter_files_raise_and_leave_the_model_unchanged(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    src = _randomised_fused_llama(target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    fused_lora.save_adapter(src, tmp_path)
    cfg_path, w_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(w_path))
    cfg = json.loads(cfg_path.read_text())
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")
    if damage == "config_json":
        cfg_path.write_text(cfg_path.read_text()[:40])
    elif damage == "config_missing":
        cfg_path.unlink()
    elif damage == "weights_truncated":
        w_path.write_bytes(w_path.read_bytes()[:-100])
    elif damage == "weights_missing":
        w_path.unlink()
    elif damage == "drop_lora_B":
        del tensors[key_b]
    elif damage == "wrong_rank":
        cfg["r"] = 8
    elif damage == "wrong_shape":
        tensors[key_a] = torch.randn(4, 31)
    elif damage == "unknown_module":
        tensors[key_a.replace("q_proj", "qq_proj")] = tensors.pop(key_a)
        tensors[key_b.replace("q_proj", "qq_proj")] = tensors.pop(key_b)
    elif damage == "unknown_key":
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, VOCAB)
    elif damage == "dora":
        cfg["use_dora"] = True
    elif damage == "nan":
        tensors[key_b][0, 0] = float("nan")
    elif damage == "integer_weights":
        tensors[key_a] = (tensors[key_a] * 100).to(torch.int32)
    elif damage == "bias_option":
        cfg["bias"] = "some"
    elif damage == "dropout_out_of_range":
        cfg["lora_dropout"] = 2.0
    elif damage == "rslora_not_a_bool":
        cfg["use_rslora"] = "yes"
    elif damage in ("bias_of_no_bias", "bias_alone"):  # (the tiny Llama's linears have no bias)
        cfg["bias"] = "lora_only"
        layer = "q_proj" if damage == "bias_of_no_bias" else "k_proj"
        tensors[key_a.replace("q_proj.lora_A.weight", f"{layer}.base_layer.bias")] = torch.randn(32)
    if damage in ("drop_lora_B", "wrong_shape", "unknown_module", "unknown_key", "nan", "integer_weights",
                  "bias_of_no_bias", "bias_alone"):
        save_file(tensors, str(w_path))
    if damage in ("wrong_rank", "dora", "bias_option", "bias_of_no_bias", "bias_alone", "dropout_out_of_range",
                  "rslora_not_a_bool"):
        cfg_path.write_text(json.dumps(cfg))

    def hyper(model):  # (the fused layers' settings, which no state_dict holds)
        return {n: (m.alpha, m.dropout, m.use_rslora) for n, m in fused_lora.integration.fused_layers(model).items()}

    for target in (tiny_llama(seed=5), _randomised_fused_llama(target_modules=["q_proj", "v_proj"], r=4, alpha=8)):
        before_state, before_types = _state(target)
        before_hyper = hyper(target)
        with pytest.raises(AdapterFileError, match=message):
            fused_lora.load_adapter(target, tmp_path)
        after_state, after_types = _state(target)
        assert after_types == before_types and hyper(target) == before_hyper
        assert after_state.keys() == before_state.keys()
        assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)


def _hub_cache(cache, repo_id: str, commits: dict, refs: dict) -> None:
    """huggingface_hub's cache of the repository ``repo_id``: ``commits``, a
    commit hash -> {path in the repository: the file's bytes}; ``refs``, a
    branch or tag -> its commit (what hf_hub_download reads offline)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, files in commits.items():
        for name, data in files.items():
            (root / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "snapshots" / commit / name).write_bytes(data)
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


def test_adapters_load_by_their_hugging_face_hub_id(tmp_path, monkeypatch):
    """load_adapter, load_adapters and download_adapter take a Hub id as
    PEFT's from_pretrained does, through huggingface_hub (here from its
    cache, offline: the tests reach no network): the newest revision or a
    tag's, a subfolder, PEFT's legacy adapter_model.bin; the weights of the
    config's commit. A local directory comes first; what the Hub cannot
    give is an AdapterFileError saying what was tried, the model unchanged."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    first = _randomised_fused_llama(target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    second = _randomised_fused_llama(target_modules=["k_proj"], r=2, alpha=4)
    files = {}
    for name, model in (("first", first), ("second", second)):
        fused_lora.save_adapter(model, tmp_path / name)
        files[name] = {f.name: f.read_bytes() for f in (tmp_path / name).iterdir()}
    legacy = dict(files["second"])  # (PEFT's adapter_model.bin, as older PEFT saved it)
    from safetensors.torch import load as load_safetensors
    buffer = tmp_path / "legacy.bin"
    torch.save(load_safetensors(legacy.pop("adapter_model.safetensors")), buffer)
    legacy["adapter_model.bin"] = buffer.read_bytes()
    old, new = "a" * 40, "b" * 40
    cache = tmp_path / "cache"
    _hub_cache(cache, "org/lora", {old: files["second"], new: files["first"]}, {"main": new, "v1": old})
    _hub_cache(cache, "org/several", {new: {f"two/{n}": data for n, data in legacy.items()}}, {"main": new})
    _hub_cache(cache, "org/no-weights", {new: {"adapter_config.json": files["first"]["adapter_config.json"]}},
               {"main": new})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ids = batch()
    with torch.no_grad():
        expected = {"first": first(input_ids=ids).logits, "second": second(input_ids=ids).logits}

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    model = tiny_llama()
    assert sorted(fused_lora.load_adapter(model, "org/lora")) == sorted(fused_lora.integration.fused_layers(first))
    assert torch.equal(logits(model), expected["first"])
    at_v1 = fused_lora.download_adapter("org/lora", revision="v1")
    assert at_v1.name == old and {f.name: f.read_bytes() for f in at_v1.iterdir()} == files["second"]
    assert fused_lora.download_adapter("org/lora").name == new
    two = fused_lora.download_adapter("org/several", subfolder="two", cache_dir=cache)
    assert two == cache / "models--org--several" / "snapshots" / new / "two"
    model = tiny_llama()
    fused_lora.load_adapter(model, two)  # (the legacy .bin)
    assert torch.equal(logits(model), expected["second"])
    # several: one batch, each sample through its own (a Hub id and a local directory alike)
    model = tiny_llama()
    fused_lora.load_adapters(model, ["org/lora", tmp_path / "second"])
    with fused_lora.adapter_ids(model, torch.tensor([0, 1], device=ids.device)):  # (batch(): two samples)
        mixed = logits(model)
    torch.testing.assert_close(mixed[0], expected["first"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], expected["second"][1], rtol=1e-5, atol=1e-5)
    # a local directory of that name comes first
    local = tmp_path / "org" / "lora"
    local.mkdir(parents=True)
    for name, data in files["second"].items():
        (local / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    fused_lora.load_adapter(model, "org/lora")
    assert torch.equal(logits(model), expected["second"])
    # what the Hub cannot give, said; the model as it was
    model = tiny_llama()
    before_state, before_types = _state(model)
    with pytest.raises(AdapterFileError, match=r"org/missing is not a local directory, and no LoRA adapter could be "
                                               r"fetched from the Hugging Face Hub as org/missing: its "
                                               r"adapter_config.json: \w*EntryNotFoundError"):
        fused_lora.load_adapter(model, "org/missing")
    with pytest.raises(AdapterFileError, match=r"as org/no-weights: its adapter_model.safetensors \(or "
                                               r"adapter_model.bin\): \w*EntryNotFoundError"):
        fused_lora.load_adapters(model, ["org/no-weights"])
    with pytest.raises(AdapterFileError, match=r"as org/lora/three at v1: its adapter_config.json: "):
        fused_lora.download_adapter("org/lora", subfolder="three", revision="v1")
    with pytest.raises(AdapterFileError, match="does not exist"):  # (not a Hub id: a path, read as one)
        fused_lora.load_adapter(model, str(tmp_path / "nowhere"))
    after_state, after_types = _state(model)
    assert after_types == before_types and all(torch.equal(after_state[k], v) for k, v in before_state.items())
    with pytest.raises(TypeError, match="load_adapter: an adapter must be given as a directory .* got int"):
        fused_lora.load_adapter(model, 3)
    with pytest.raises(TypeError, match="repo_id must be a str"):
        fused_lora.download_adapter(tmp_path)
    with pytest.raises(TypeError, match="revision must be None or a str, got int"):
        fused_lora.download_adapter("org/lora", revision=1)


def test_push_adapter_uploads_what_save_adapter_writes_as_one_commit(tmp_path, monkeypatch):
    """push_adapter: save_adapter's files, uploaded as one commit (here to a
    stand-in for huggingface_hub's HfApi that records the calls and files
    the commit in a Hub cache: the tests reach no network), read back by
    load_adapter from the Hub id, the same logits; a subfolder, a branch, a
    message, a pull request, privacy and the token handed on; one adapter
    of several; bad arguments and a model with nothing to save refused
    before the Hub is reached."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "cache"
    calls, commits = [], {}

    class Api:  # (HfApi's create_repo and upload_folder, as push_adapter calls them)
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, *, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, "token": self.token}))
            full = repo_id if "/" in repo_id else f"me/{repo_id}"  # (a bare name: the token's user's namespace)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, revision=None, create_pr=False,
                          commit_message=None):
            files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                     for p in sorted(Path(folder_path).rglob("*")) if p.is_file()}
            calls.append(("upload_folder", repo_id, {"path_in_repo": path_in_repo, "revision": revision,
                                                     "create_pr": create_pr, "commit_message": commit_message,
                                                     "files": sorted(files)}))
            commit = f"{len(calls):040d}"
            prefix = f"{path_in_repo}/" if path_in_repo else ""
            commits.setdefault(repo_id, {})[commit] = {prefix + n: data for n, data in files.items()}
            return SimpleNamespace(oid=commit, commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    model = _randomised_fused_llama(target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    info = fused_lora.push_adapter(model, "org/pushed")
    assert calls[0] == ("create_repo", "org/pushed", {"private": None, "exist_ok": True, "token": None})
    assert calls[1][:2] == ("upload_folder", "org/pushed") and calls[1][2] == {
        "path_in_repo": None, "revision": None, "create_pr": False,
        "commit_message": "Upload LoRA adapter (PEFT format)",
        "files": ["adapter_config.json", "adapter_model.safetensors"]}
    fused_lora.save_adapter(model, tmp_path / "saved")
    assert commits["org/pushed"][info.oid] == {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()}
    # one adapter of several, into a subfolder, on a branch, as a pull request, private, with a token
    multi = tiny_llama()
    fused_lora.load_adapters(multi, [tmp_path / "saved", tmp_path / "saved"])
    fused_lora.push_adapter(multi, "pushed-too", adapter=1, subfolder="v2", revision="dev", commit_message="v2",
                            private=True, create_pr=True, token="hf_x")
    assert calls[2] == ("create_repo", "pushed-too", {"private": True, "exist_ok": True, "token": "hf_x"})
    assert calls[3][1] == "me/pushed-too" and calls[3][2] == {
        "path_in_repo": "v2", "revision": "dev", "create_pr": True, "commit_message": "v2",
        "files": ["adapter_config.json", "adapter_model.safetensors"]}
    # read back from the Hub (its cache, offline): the same model
    _hub_cache(cache, "org/pushed", commits["org/pushed"], {"main": info.oid})
    _hub_cache(cache, "me/pushed-too", commits["me/pushed-too"], {"main": next(iter(commits["me/pushed-too"]))})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for repo, subfolder in (("org/pushed", None), ("me/pushed-too", "v2")):
            loaded = tiny_llama()
            fused_lora.load_adapter(loaded, fused_lora.download_adapter(repo, subfolder=subfolder))
            assert torch.equal(loaded(input_ids=ids).logits, expected), repo
    # refused before the Hub is reached
    made = len(calls)
    for kwargs, words in (({"repo_id": 3}, "repo_id must be a str"), ({"repo_id": "a/b/c"}, "repo_id must be a str"),
                          ({"subfolder": 1}, "subfolder must be None or a str"),
                          ({"revision": b"main"}, "revision must be None or a str"),
                          ({"private": "yes"}, "private must be a bool"),
                          ({"create_pr": None}, "create_pr must be a bool"),
                          ({"token": 1}, "token must be None, False or a str")):
        with pytest.raises(TypeError, match=words):
            fused_lora.push_adapter(model, **{"repo_id": "org/pushed", **kwargs})
    with pytest.raises(ValueError, match="no fused LoRA layers to save"):
        fused_lora.push_adapter(tiny_llama(), "org/pushed")
    with pytest.raises(ValueError, match="adapter"):  # (several adapters: which one, as save_adapter asks)
        fused_lora.push_adapter(multi, "org/pushed")
    assert len(calls) == made


def test_save_adapter_refuses_what_peft_cannot_hold(tmp_path):
    model = tiny_llama()
    fused_lora.inject(model, ["q_proj"], dropout=0.1)
    model.model.layers[1].self_attn.q_proj.dropout = 0.2
    with pytest.raises(ValueError, match="one lora_dropout per adapter"):
        fused_lora.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no fused LoRA layers"):
        fused_lora.save_adapter(tiny_llama(), tmp_path)


def _saved_keys(directory):
    from safetensors.torch import load_file

    return sorted(load_file(str(directory / "adapter_model.safetensors")))


def test_wrapped_models_match_save_and_load_under_the_names_of_the_model_inside(tmp_path):
    """torch.compile(model) and torch's checkpoint_wrapper put an attribute
    (``_orig_mod``, ``_checkpoint_wrapped_module``) into their layers' names.
    Targets match, and PEFT's files hold, the names without it (as PEFT's own
    files do), so that an adapter saved from a compiled model loads in PEFT and
    in the plain model, and one saved from the plain model into a compiled one."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ids = batch()
    model = tiny_llama()
    model.model.layers[1] = checkpoint_wrapper(model.model.layers[1])
    compiled = torch.compile(model, backend="eager")  # (never called: the names are the point)
    names = fused_lora.inject(compiled, r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r=4)
    assert names == ["_orig_mod.model.layers.0.self_attn.q_proj", "_orig_mod.model.layers.0.self_attn.v_proj",
                     "_orig_mod.model.layers.1._checkpoint_wrapped_module.self_attn.q_proj",
                     "_orig_mod.model.layers.1._checkpoint_wrapped_module.self_attn.v_proj"]
    _randomise_adapters(compiled)
    model.model.layers[1].self_attn.v_proj.alpha = 5.0  # (a per-layer alpha: alpha_pattern's key)
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(compiled, tmp_path / "compiled")
    assert _saved_keys(tmp_path / "compiled") == [f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{w}.weight"
                                                  for i in range(2) for p in ("q_proj", "v_proj") for w in "AB"]
    config = json.loads((tmp_path / "compiled" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 5}
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "compiled")
    assert_outputs_close(in_peft(input_ids=ids).logits, expected)
    plain = tiny_llama()
    fused_lora.load_adapter(plain, tmp_path / "compiled")
    assert_outputs_close(plain(input_ids=ids).logits, expected)
    # the other way: saved from the plain model, loaded into a compiled one
    fused_lora.save_adapter(plain, tmp_path / "plain")
    again = torch.compile(tiny_llama(), backend="eager")
    loaded = fused_lora.load_adapter(again, tmp_path / "plain")
    assert loaded == [f"_orig_mod.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert_outputs_close(again._orig_mod(input_ids=ids).logits, expected)
    # PEFT would wrap the wrapper (its names and files holding _orig_mod): refused, the model it wraps converts
    with pytest.raises(ValueError, match=r"OptimizedModule: convert the model it wraps \(model._orig_mod\)"):
        fused_lora.to_peft(compiled)
    assert_outputs_close(fused_lora.to_peft(compiled._orig_mod)(input_ids=ids).logits, expected)


def test_layers_inside_distributed_data_parallel_are_not_fused(tmp_path):
    """DistributedDataParallel takes its model's parameters when it is built:
    an adapter fused inside it afterwards would train on each rank alone (its
    gradients never averaged), so inject and load_adapter refuse it. A model
    fused first, then wrapped, saves under the names of the model inside and
    loads into its fused layers."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = batch().cpu()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped_plain = DDP(tiny_llama().cpu())
        with pytest.raises(ValueError, match="inside a DistributedDataParallel.*inject on the model first"):
            fused_lora.inject(wrapped_plain, ["q_proj"])
        assert not fused_lora.integration.fused_layers(wrapped_plain)

        model = tiny_llama().cpu()
        fused_lora.inject(model, ["q_proj"], r=4)
        _randomise_adapters(model)
        expected = model(input_ids=ids).logits.detach()
        fused_lora.save_adapter(DDP(model), tmp_path / "a")
        assert _saved_keys(tmp_path / "a") == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{w}.weight"
                                               for i in range(2) for w in "AB"]
        with pytest.raises(ValueError, match="inside a DistributedDataParallel.*load_adapter on the model first"):
            fused_lora.load_adapter(wrapped_plain, tmp_path / "a")
        assert not fused_lora.integration.fused_layers(wrapped_plain)
        fresh = tiny_llama().cpu()
        fused_lora.inject(fresh, ["q_proj"], r=4)
        assert fused_lora.load_adapter(DDP(fresh), tmp_path / "a") == [
            f"module.model.layers.{i}.self_attn.q_proj" for i in range(2)]
        assert_outputs_close(fresh(input_ids=ids).logits, expected)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# torch's transformer modules, which read some linears' weights instead of calling them
# ----------------------------------------------------------------------------

class _Encoder(nn.Module):
    """A model built from torch's own transformer modules (batch_first, an
    even head count, no dropout: eligible for their inference fast paths)."""

    def __init__(self, seed=0, layers=2):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True),
                                             layers)
        self.to(DEVICE)

    def forward(self, x, src_key_padding_mask=None):
        return self.encoder(x, src_key_padding_mask=src_key_padding_mask)


def _encoder_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 32, generator=g).to(DEVICE)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:], pad[2, 2:] = True, True  # (left-aligned, as the nested-tensor path requires)
    return x, pad.to(DEVICE)


def _without_fast_paths(model, *args, **kwargs):
    """torch's own switch for its transformer fast paths: off, every layer is called."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # (the unguarded base's fast path)
@pytest.mark.parametrize("grad", [False, True])
def test_fused_layers_inside_torch_transformer_encoder_run_in_eval(grad):
    """In eval mode nn.TransformerEncoderLayer runs one native op on its
    linears' weights (and nn.TransformerEncoder first packs a padded batch
    into a nested tensor for it), which would skip the fused layers and their
    adapters, silently. inject guards both: eval outputs, with and without a
    padding mask, with grad mode on or off, are those of torch's slow path
    (every layer called), and the adapters change them."""
    model = _Encoder()
    base = copy.deepcopy(model).eval()
    with pytest.warns(UserWarning, match=r"leaves out \['encoder.layers.0.self_attn.out_proj', "
                                         r"'encoder.layers.1.self_attn.out_proj'\]"):
        names = fused_lora.inject(model, "all-linear", r=4, alpha=8)
    assert names == [f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    _randomise_adapters(model)
    model.eval()
    x, pad = _encoder_inputs()
    with torch.set_grad_enabled(grad):
        for mask in (None, pad):
            got = model(x, src_key_padding_mask=mask)
            expected = _without_fast_paths(model, x, src_key_padding_mask=mask)
            keep = ~pad[..., None] if mask is not None else torch.ones_like(x, dtype=torch.bool)
            # (the fast path writes zeros at padded positions, the slow path computes them)
            assert not torch.isnan(got).any()
            assert_outputs_close(got * keep, expected * keep)
            assert ((got - base(x, src_key_padding_mask=mask)) * keep).abs().max() > 0.1  # the adapters count
    # the guard travels with the model: a deep copy and a pickled round trip keep it
    for copied in (copy.deepcopy(model), _pickled(model)):
        assert_outputs_close(copied(x), _without_fast_paths(model, x))


def _pickled(model):
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_guard_fast_paths_is_idempotent_and_for_hand_placed_layers():
    model = _Encoder(layers=1).eval()
    layer = model.encoder.layers[0]
    layer.linear2 = LoRALinear.from_linear(layer.linear2, r=2)  # placed by hand: unguarded until asked
    _randomise_adapters(model)
    x, _ = _encoder_inputs()
    with torch.no_grad():
        assert (model(x) - _without_fast_paths(model, x)).abs().max() > 0.1  # (what the guard is for)
        assert fused_lora.integration.guard_fast_paths(model) == ["encoder", "encoder.layers.0"]
        assert fused_lora.integration.guard_fast_paths(model) == []
        assert len(layer._forward_pre_hooks) == 1 and model.encoder.use_nested_tensor is False
        assert_outputs_close(model(x), _without_fast_paths(model, x))
        # each of the layer's two guards is enough on its own (this torch's checks read both)
        layer._forward_pre_hooks.clear()
        assert_outputs_close(model(x), _without_fast_paths(model, x))
        layer.register_forward_pre_hook(fused_lora.integration._calls_its_layers)
        layer.activation_relu_or_gelu = 1
        assert_outputs_close(model(x), _without_fast_paths(model, x))
        assert fused_lora.integration.guard_fast_paths(model) == ["encoder.layers.0"]  # (restored)
        assert layer.activation_relu_or_gelu == 0 and len(layer._forward_pre_hooks) == 1


def test_multihead_attention_out_proj_is_refused():
    """nn.MultiheadAttention reads out_proj's weight and never calls it: an
    adapter there would have no effect, so naming it is an error."""
    model = _Encoder(layers=1)
    for targets in (["out_proj"], r".*proj", ["out_proj", "linear1"]):
        with pytest.raises(ValueError, match=r"encoder.layers.0.self_attn.out_proj: nn.MultiheadAttention never "
                                             r"calls its out_proj.*exclude_modules"):
            fused_lora.inject(model, targets)
        assert not fused_lora.integration.fused_layers(model)
    assert fused_lora.inject(model, ["out_proj", "linear1"], exclude_modules=["out_proj"]) == [
        "encoder.layers.0.linear1"]


def test_from_peft_reports_out_proj_and_guards_the_encoder():
    """PEFT adapts MultiheadAttention's out_proj without effect, and its
    layers in an encoder are skipped by the eval fast path: from_peft reports
    the first and guards against the second, so the converted model computes
    what PEFT's layers mean (torch's slow path), in train and eval mode."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(_Encoder(), config)
    x, pad = _encoder_inputs()
    with torch.no_grad():
        expected_train = model(x)
        model.eval()
        expected_eval = _without_fast_paths(model, x, src_key_padding_mask=pad)
        model.train()
    report = fused_lora.from_peft(model)
    prefix = "base_model.model.encoder.layers"
    assert report.converted == [f"{prefix}.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    assert set(report.skipped) == {f"{prefix}.{i}.self_attn.out_proj" for i in range(2)}
    assert all("never calls its out_proj" in why for why in report.skipped.values())
    with torch.no_grad():
        assert_outputs_close(model(x), expected_train)
        model.eval()
        keep = ~pad[..., None]
        assert_outputs_close(model(x, src_key_padding_mask=pad) * keep, expected_eval * keep)


def test_load_adapter_into_an_encoder(tmp_path):
    """A PEFT adapter of linear1/linear2 loads into a plain encoder (fused and
    guarded: eval runs the adapters); one that targets out_proj is refused,
    and the model is left as it was."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2"], init_lora_weights=False)
    ref = peft.get_peft_model(_Encoder(), config)
    ref.save_pretrained(tmp_path / "ffn")
    x, _ = _encoder_inputs()
    with torch.no_grad():
        expected = ref(x)  # (train mode: every layer called)
        model = _Encoder().eval()
        assert len(fused_lora.load_adapter(model, tmp_path / "ffn")) == 4
        assert_outputs_close(model(x), expected)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["out_proj"], init_lora_weights=False)
    peft.get_peft_model(_Encoder(), config).save_pretrained(tmp_path / "out_proj")
    model = _Encoder()
    before = _state(model)
    with pytest.raises(AdapterFileError, match="never calls its out_proj"):
        fused_lora.load_adapter(model, tmp_path / "out_proj")
    after = _state(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


# ----------------------------------------------------------------------------
# merge_and_unload / unload
# ----------------------------------------------------------------------------

def test_merge_and_unload_gives_the_base_architecture_with_the_adapters_folded_in():
    """The model to deploy: plain nn.Linear layers whose weights hold
    W + s·B·A, no fused_lora left, a state_dict that a fresh base model loads
    strictly, and the fused model's eval logits."""
    model = _randomised_fused_llama(target_modules="all-linear", r=4, alpha=8, dropout=0.1)
    model.model.layers[0].mlp.up_proj.merge()  # (a merged layer is kept as merged)
    model.eval()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    q_weight = model.model.layers[1].self_attn.q_proj.weight
    names = fused_lora.merge_and_unload(model)
    assert len(names) == 2 * 7 and not fused_lora.integration.fused_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert model.model.layers[1].self_attn.q_proj.weight is q_weight  # (the same Parameter, merged in place)
    assert not model.training and not model.model.layers[1].self_attn.q_proj.training
    assert_outputs_close(model(input_ids=ids).logits, expected)
    fresh = tiny_llama(seed=9)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert_outputs_close(fresh.eval()(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="no fused LoRA layers"):
        fused_lora.merge_and_unload(model)


def test_unload_gives_back_the_base_model_bit_for_bit():
    base = tiny_llama()
    model = copy.deepcopy(base)
    fused_lora.inject(model, LLAMA_TARGETS, r=4, alpha=8)
    _randomise_adapters(model)
    model.model.layers[1].self_attn.v_proj.merge()  # unmerged on the way out, bit for bit
    ids = batch()
    assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    assert len(fused_lora.unload(model)) == 14
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_merge_and_unload_gpt2_goes_back_to_conv1d():
    model = tiny_gpt2()
    fused_lora.inject(model, ["c_attn", "c_fc"], r=4, alpha=4)
    _randomise_adapters(model)
    model.eval()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.merge_and_unload(model)
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "Conv1D" and tuple(layer.weight.shape) == (32, 96)
    assert_outputs_close(model(input_ids=ids).logits, expected)


def test_unload_gives_torch_its_fast_paths_back():
    """The guard goes with the last fused layer inside: the encoder takes its
    fast paths again, and (merged) computes what the fused model did."""
    model = _Encoder()
    pristine = _Encoder()
    with pytest.warns(UserWarning, match="out_proj"):
        fused_lora.inject(model, "all-linear", r=4)
    _randomise_adapters(model)
    model.eval()
    x, pad = _encoder_inputs()
    with torch.no_grad():
        expected = model(x)
        fused_lora.merge_and_unload(model)
        for guarded, fresh in zip(model.modules(), pristine.modules()):
            assert not hasattr(guarded, "_fused_lora_unguarded") and not guarded._forward_pre_hooks
            for attr in ("activation_relu_or_gelu", "use_nested_tensor"):
                assert getattr(guarded, attr, None) == getattr(fresh, attr, None)
        assert_outputs_close(model(x), expected)
        # (the fast path: padded positions come out as zeros from the nested tensor, the slow path computes them)
        padded = model(x, src_key_padding_mask=pad)
        assert torch.all(padded[pad] == 0)
        assert not torch.all(_without_fast_paths(model, x, src_key_padding_mask=pad)[pad] == 0)


def test_merge_and_unload_refuses_tied_weights_and_merges_once_untied():
    """An adapter on an output layer tied to the input embedding: merging it
    would change the embedding too (the logits of the merged model were off by
    3x their scale). Refused, changing nothing; unload still gives the base
    model back; untied by hand, the merge computes what the fused model did."""
    ids = batch()
    model = tiny_llama(tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fused_lora.inject(model, ["lm_head", "q_proj"], r=4)
    _randomise_adapters(model)
    expected = model(input_ids=ids).logits.detach()
    before_state, before_types = _state(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is also model.embed_tokens.weight\. Untie them first"):
        fused_lora.merge_and_unload(model)
    after_state, after_types = _state(model)
    assert after_types == before_types
    assert not any(layer.merged for layer in fused_lora.integration.fused_layers(model).values())
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    # untied: the merged model computes what the fused one did
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone(), requires_grad=False)
    fused_lora.merge_and_unload(untied)
    assert type(untied.lm_head) is nn.Linear
    assert_outputs_close(untied(input_ids=ids).logits, expected)
    # unload drops the adapters and leaves the tie alone
    fused_lora.unload(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_outputs_close(model(input_ids=ids).logits, tiny_llama(tie_word_embeddings=True).eval()(input_ids=ids).logits)


def test_unload_refuses_a_model_converted_from_peft():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    fused_lora.from_peft(model)
    for unload in (fused_lora.unload, fused_lora.merge_and_unload):
        with pytest.raises(ValueError, match="to_peft"):
            unload(model)
    fused_lora.to_peft(model)
    merged = model.merge_and_unload()  # PEFT's own, after going back
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear


# ----------------------------------------------------------------------------
# modules kept whole beside the adapters (PEFT's modules_to_save)
# ----------------------------------------------------------------------------

def tiny_llama_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).to(DEVICE)


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))


def test_a_trained_head_from_peft_is_saved_and_loaded(tmp_path):
    """PEFT's sequence classification trains the head whole (modules_to_save):
    after from_peft, save_adapter writes it beside the adapters, PEFT reloads
    the model's outputs from the file, and load_adapter puts the head back
    into a plain model (trainable, as PEFT makes it)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                             init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama_classifier(), config)
    _perturb(p for n, p in model.named_parameters() if "modules_to_save" in n)  # (the head "trained")
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.from_peft(model)
    fused_lora.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["score"]
    reloaded = peft.PeftModel.from_pretrained(tiny_llama_classifier(), tmp_path)  # (the head as initialised)
    assert_outputs_close(reloaded(input_ids=ids).logits, expected)
    plain = tiny_llama_classifier()
    names = fused_lora.load_adapter(plain, tmp_path)
    assert names[-1] == "score" and plain.score.weight.requires_grad
    assert_outputs_close(plain(input_ids=ids).logits, expected)
    # into another converted PEFT model: the head goes into PEFT's trained copy
    other = peft.get_peft_model(tiny_llama_classifier(), config)
    fused_lora.from_peft(other)
    assert fused_lora.load_adapter(other, tmp_path)[-1] == "base_model.model.score"
    assert_outputs_close(other(input_ids=ids).logits, expected)


def test_a_head_unfrozen_after_inject_goes_with_the_adapter(tmp_path):
    """inject freezes everything but the adapters; a head the user unfreezes
    and trains is written as PEFT's modules_to_save (not dropped), and
    to_peft keeps it trainable; a trainable base weight of a fused layer,
    which PEFT's format cannot hold, is an error rather than a loss."""
    model = tiny_llama_classifier()
    fused_lora.inject(model, LLAMA_TARGETS, r=4, alpha=8)
    _randomise_adapters(model)
    model.score.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    _perturb([model.score.weight, model.model.norm.weight])
    ids = batch()
    expected = model(input_ids=ids).logits.detach()
    fused_lora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm", "score"]
    assert_outputs_close(peft.PeftModel.from_pretrained(tiny_llama_classifier(), tmp_path)(input_ids=ids).logits,
                         expected)
    fresh = tiny_llama_classifier()
    assert fused_lora.load_adapter(fresh, tmp_path)[-2:] == ["model.norm", "score"]
    assert_outputs_close(fresh(input_ids=ids).logits, expected)

    peft_model = fused_lora.to_peft(model)
    assert_outputs_close(peft_model(input_ids=ids).logits, expected)
    assert any("score.modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    model = tiny_llama_classifier()
    fused_lora.inject(model, ["q_proj"])
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"cannot hold.*model.layers.0.self_attn.q_proj.weight"):
        fused_lora.save_adapter(model, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_save_adapter_refuses_a_model_with_peft_layers_left(tmp_path):
    """A layer from_peft left as PEFT's would be missing from the file."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    left = "base_model.model.model.layers.0.self_attn.q_proj"
    model.get_submodule(left).merge()
    assert list(fused_lora.from_peft(model).skipped) == [left]
    with pytest.raises(ValueError, match=rf"\(\['{left}'\]\) are not fused.*to_peft"):
        fused_lora.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_damaged_saved_module_is_refused_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama_classifier()
    fused_lora.inject(model, ["q_proj"], r=4)
    model.score.requires_grad_(True)
    fused_lora.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for damage, message in [("shape", "cannot replace"), ("nan", "NaN"), ("unnamed", "unexpected tensor")]:
        bad = dict(tensors)
        if damage == "shape":
            bad["base_model.model.score.weight"] = torch.randn(4, 32)
        elif damage == "nan":
            bad["base_model.model.score.weight"] = torch.full((3, 32), float("nan"))
        else:
            bad["base_model.model.model.norm.weight"] = torch.randn(32)  # (not in modules_to_save)
        save_file(bad, str(tmp_path / "adapter_model.safetensors"))
        target = tiny_llama_classifier(seed=5)
        before_state, before_types = _state(target)
        with pytest.raises(AdapterFileError, match=message):
            fused_lora.load_adapter(target, tmp_path)
        after_state, after_types = _state(target)
        assert after_types == before_types and all(torch.equal(after_state[k], v) for k, v in before_state.items())


def test_uncalled_layers_finds_adapters_a_model_never_runs():
    """transformers' WavLM attention hands q/k/v/out_proj's weights to
    F.multi_head_attention_forward instead of calling them: adapters there
    have no effect (no gradient, PEFT's neither). uncalled_layers finds them
    with one forward, and leaves no hook behind."""
    torch.manual_seed(0)
    cfg = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                   conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                   num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=20,
                                   layerdrop=0.0, apply_spec_augment=False)
    model = transformers.WavLMModel(cfg).to(DEVICE)
    with pytest.warns(UserWarning, match=r"encoder.layers.0.attention.q_proj \(WavLMAttention."
                                         r"torch_multi_head_self_attention: `q_proj_weight=self.q_proj.weight,`\)"):
        fused_lora.inject(model, "all-linear", r=2)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    uncalled = fused_lora.integration.uncalled_layers(model, audio)
    assert uncalled == [f"encoder.layers.0.attention.{p}_proj" for p in ("k", "v", "q", "out")]
    layers = fused_lora.integration.fused_layers(model)
    assert len(layers) == 8 and not any(layer._forward_pre_hooks for layer in layers.values())
    model(audio).last_hidden_state.square().mean().backward()
    for name, layer in layers.items():
        assert (layer.lora_B.grad is None) == (name in uncalled), name


def tiny_mamba(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                   intermediate_size=48, time_step_rank=4)
    return transformers.MambaForCausalLM(cfg).to(DEVICE)


def test_inject_warns_of_layers_whose_weight_the_model_reads():
    """transformers' Mamba mixer multiplies by ``dt_proj.weight`` on every
    path and hands ``x_proj``'s and ``out_proj``'s weights to its fused CUDA
    kernel when training: adapters there do nothing, silently (PEFT refuses
    out_proj alone). inject names each such layer and the line that reads
    it; dt_proj's adapter indeed gets no gradient (x_proj's does on this
    CPU path)."""
    model = tiny_mamba()
    with pytest.warns(UserWarning) as record:
        fused_lora.inject(model, "all-linear", r=2)
    (message,) = [str(w.message) for w in record if "read the layer's weight" in str(w.message)]
    # (the method reading them: forward in transformers 5, its slow_forward or cuda_kernels_forward in 4.x)
    named = re.findall(r"(backbone\.layers\.\d\.mixer\.\w+) \(MambaMixer\.\w*forward: `", message)
    assert sorted(named) == sorted(f"backbone.layers.{i}.mixer.{p}" for i in range(2)
                                   for p in ("x_proj", "dt_proj", "out_proj"))
    assert "in_proj" not in message and "uncalled_layers" in message
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    layers = fused_lora.integration.fused_layers(model)
    assert len(layers) == 8
    # (on this CPU path transformers 5 multiplies by dt_proj.weight; 4.x's slow path calls dt_proj)
    uncalled = fused_lora.integration.uncalled_layers(model, ids)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert uncalled == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)]
    for name, layer in layers.items():
        assert (layer.lora_B.grad is None) == (name in uncalled), name
    # a list naming such a layer warns too; one that leaves them out does not
    with pytest.warns(UserWarning, match=r"backbone.layers.0.mixer.dt_proj \(MambaMixer"):
        fused_lora.inject(tiny_mamba(), ["dt_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_lora.inject(tiny_mamba(), ["in_proj"])


def test_load_adapter_warns_of_layers_whose_weight_the_model_reads(tmp_path):
    """PEFT adapts Mamba's dt_proj (an adapter there does nothing): loading
    that file fuses the layer and warns, as inject does."""
    config = peft.LoraConfig(r=2, target_modules=["in_proj", "dt_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_mamba(), config).save_pretrained(tmp_path)
    model = tiny_mamba()
    with pytest.warns(UserWarning, match=r"^load_adapter: .*backbone.layers.1.mixer.dt_proj \(MambaMixer") as record:
        fused_lora.load_adapter(model, tmp_path)
    assert "in_proj" not in str(record[0].message)
    assert len(fused_lora.integration.fused_layers(model)) == 4


class _ReadsItsWeight(nn.Module):
    """A user's module that checks its linear's weight (dtype, isinstance),
    calls it, and on one path multiplies by its weight directly."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.exact = False

    def forward(self, x):
        assert isinstance(
            self.head.weight, torch.Tensor) and self.head.weight.dtype == x.dtype and self.head.weight is not None
        if self.exact:
            return self.head(x @ self.proj.weight.t())
        return self.head(self.proj(x))


def test_weight_read_warning_spares_checks_of_a_weights_dtype_or_type():
    with pytest.warns(UserWarning, match=r"proj \(_ReadsItsWeight.forward: `return self.head\(x @ self.proj.weight"
                                         r".t\(\)\)`\)") as record:
        fused_lora.inject(_ReadsItsWeight(), "all-linear")
    assert re.findall(r"(\w+) \(_ReadsItsWeight", str(record[0].message)) == ["proj"]  # (not head)
    for make in (tiny_llama, tiny_gpt2, _ReadsItsWeight):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused_lora.inject(make(), ["head"] if make is _ReadsItsWeight else "all-linear")


def _quantize(model, kind):
    """Quantize the model's q_proj layers as a quantization library leaves them: a
    plain int8 parameter without scales, a tensor subclass reporting
    a float dtype (torch's TwoTensor), or torchao's int8 with dynamic activation
    quantization (another op than a weight-only int8 base, which the fused
    layers take: tests/test_quantized_layer.py)."""
    names = [n for n, m in model.named_modules() if n.endswith("q_proj")]
    if kind == "torchao":
        torchao = pytest.importorskip("torchao")
        torchao.quantization.quantize_(model, torchao.quantization.Int8DynamicActivationInt8WeightConfig(),
                                       filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
    for name in names:
        linear = model.get_submodule(name)
        if kind == "int8":
            linear.weight = nn.Parameter(torch.randint(-100, 100, linear.weight.shape, dtype=torch.int8,
                                                       device=DEVICE), requires_grad=False)
        elif kind == "subclass":
            from torch.testing._internal.two_tensor import TwoTensor

            w = linear.weight.detach()
            linear.weight = nn.Parameter(TwoTensor(w, w.clone()), requires_grad=False)
    return names


@pytest.mark.parametrize("kind, words", [("int8", "dtype torch.int8"), ("subclass", "TwoTensor, a tensor subclass"),
                                         ("torchao", None)])
def test_quantized_bases_are_refused_before_anything_changes(tmp_path, kind, words):
    """A quantized weight, which the kernels cannot read, is refused by name
    where a fused layer would take it: inject, load_adapter, the layer's
    constructors; from_peft leaves it to PEFT. Nothing changes first."""
    source = tiny_llama()
    fused_lora.inject(source, ["q_proj", "v_proj"], r=4)
    fused_lora.save_adapter(source, tmp_path)
    model = tiny_llama()
    quantized = _quantize(model, kind)
    if kind == "torchao":  # (its class: Int8Tensor in torchao 0.18, AffineQuantizedTensor in 0.17)
        weight_type = type(model.get_submodule(quantized[0]).weight)
        assert weight_type.__module__.startswith("torchao.")
        words = f"{weight_type.__name__}, a tensor subclass"

    def snapshot():
        return ({n: (type(m).__name__, id(m)) for n, m in model.named_modules()},
                {n: (id(p), p.requires_grad) for n, p in model.named_parameters()})

    before = snapshot()
    with pytest.raises(TypeError, match=f"inject: these layers cannot be fused: {quantized[0]}: its weight.*{words}"):
        fused_lora.inject(model, ["q_proj", "v_proj"], r=4)
    with pytest.raises(TypeError, match="cannot be fused"):
        fused_lora.inject(model, "all-linear", r=4)
    with pytest.raises(AdapterFileError, match=f"{quantized[0]}: its weight.*{words}"):
        fused_lora.load_adapter(model, tmp_path)
    assert snapshot() == before
    with pytest.raises(TypeError, match=f"weight.*{words}"):
        LoRALinear.from_linear(model.get_submodule(quantized[0]), r=4)
    if kind != "int8":  # (PEFT cannot wrap an int8 nn.Linear either)
        try:
            peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        except TypeError as err:  # (PEFT 0.19 and 0.20 with torchao 0.18: its torchao layer's constructor changed)
            if kind != "torchao" or "TorchaoLoraLinear" not in str(err):
                raise
            pytest.skip(f"the refusals checked; PEFT {peft.__version__} cannot put LoRA on this torchao's weights "
                        f"({err}), so from_peft has nothing to leave to it")
        report = fused_lora.from_peft(peft_model)
        assert sorted(report.skipped) == sorted("base_model.model." + n for n in quantized)
        # (torchao: PEFT 0.21 wraps the base in a class of its own; older ones put a plain LoRA Linear on it)
        reason = (r"TorchaoLoraLinear is not a plain LoRA Linear|base layer: its weight is a torchao\..*tensor subclass"
                  if kind == "torchao" else f"base layer: its weight.*{words}")
        assert all(re.search(reason, why) for why in report.skipped.values()), report.skipped
        assert len(report.converted) == len(quantized)  # (the v_proj layers)


def _variant_config(variant):
    cfg = importlib.import_module("peft.tuners.lora.config")
    if variant == "alora":
        return dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    if variant == "mica":
        return dict(init_lora_weights="mica")
    if variant == "bdlora":
        return dict(use_bdlora=cfg.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"],
                                                nblocks=2))
    return {f"{variant}_config": getattr(cfg, variant.capitalize() + "Config")()}


@pytest.mark.parametrize("variant, field", [("alora", "alora_invocation_tokens"), ("mica", "init_lora_weights='mica'"),
                                            ("bdlora", "use_bdlora"), ("velora", "velora_config"),
                                            ("kasa", "kasa_config"), ("layer_replication", "layer_replication"),
                                            ("use_qalora", "use_qalora")])
def test_adapters_of_lora_variants_are_refused(tmp_path, variant, field):
    """PEFT's LoRA variants save lora_A/lora_B weights too, but compute
    otherwise: an aLoRA adapter (only the tokens after its invocation tokens)
    or a MiCA one (lora_B frozen) loaded as plain LoRA would be silently
    wrong. load_adapter names the variant and changes nothing."""
    if variant in ("layer_replication", "use_qalora"):  # (written by hand: PEFT builds these on other bases)
        fused_lora.save_adapter(_randomised_fused_llama(target_modules=["q_proj", "v_proj"], r=4, alpha=8), tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg[variant] = [[0, 2], [1, 2]] if variant == "layer_replication" else True
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        try:
            config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **_variant_config(variant))
        except (AttributeError, TypeError, ValueError) as err:
            pytest.skip(f"this PEFT has no {variant}: {err}")
        try:
            model = peft.get_peft_model(tiny_llama(), config)
        except ValueError as err:  # (an init its config takes and its layers do not: MiCA before PEFT 0.21)
            if "Unknown initialization" not in str(err):
                raise
            pytest.skip(f"this PEFT has no {variant}: {err}")
        model.save_pretrained(tmp_path)
    target = tiny_llama(seed=5)
    before_state, before_types = _state(target)
    with pytest.raises(AdapterFileError, match=re.escape(field) + ".*a LoRA variant"):
        fused_lora.load_adapter(target, tmp_path)
    after_state, after_types = _state(target)
    assert after_types == before_types and all(torch.equal(after_state[k], v) for k, v in before_state.items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_init_took_their_start_out_of_the_base(tmp_path, init):
    """PiSSA and OLoRA (and CorDA, LoftQ, LoRA-GA) subtract the adapter's
    start from the base weights: a trained adapter holds on that residual
    base only, which PEFT makes again from the base model when it loads the
    file. load_adapter cannot (it would put the adapter on the model's own
    weights, silently wrong): it refuses the file, changing nothing, and
    names the two routes that work, checked here; and save_adapter, on a
    model converted by from_peft, writes the init, so that PEFT loads it."""
    targets = ["q_proj", "v_proj", "down_proj"]
    trained = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=init))
    initial = tmp_path / "initial"  # (PEFT's conversion to plain LoRA needs the adapter as it started)
    trained.peft_config["default"].init_lora_weights = True
    trained.save_pretrained(initial)
    trained.peft_config["default"].init_lora_weights = init
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)  # (training)
        expected = trained(input_ids=batch()).logits
    trained.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == init

    target = tiny_llama()
    before_state, before_types = _state(target)
    with pytest.raises(AdapterFileError, match=f"init_lora_weights='{init}' took the adapter's start out of the base"):
        fused_lora.load_adapter(target, tmp_path / "peft")
    after_state, after_types = _state(target)
    assert after_types == before_types and all(torch.equal(after_state[k], v) for k, v in before_state.items())

    # route 1: PEFT loads it (the residual base made again), from_peft converts it
    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    report = fused_lora.from_peft(model)
    assert len(report.converted) == 6 and not report.skipped
    with torch.no_grad():
        assert_outputs_close(model(input_ids=batch()).logits, expected)
    # ... and save_adapter writes the init with the adapters, so that PEFT makes that base again
    fused_lora.save_adapter(model, tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with torch.no_grad():
        assert_outputs_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fused")(input_ids=batch()).logits,
                             expected)

    # route 2: PEFT converts it to a plain LoRA (rank 2r, on the model's own weights), which load_adapter takes
    with warnings.catch_warnings():  # (PEFT's advice to do this conversion, given while it does it)
        warnings.filterwarnings("ignore", r"(PiSSA|OLoRA) changes the base weights")
        trained.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(initial))
    fused_lora.load_adapter(target, tmp_path / "plain")
    with torch.no_grad():
        assert_outputs_close(target(input_ids=batch()).logits, expected)


def test_hooks_on_a_layer_stay_on_it_fused_or_plain(tmp_path):
    """Forward and backward hooks registered on a linear stay at that place
    in the model when a fused layer replaces it (inject, load_adapter,
    from_peft) and when a plain or PEFT layer comes back (unload, to_peft):
    they see the fused layer's input and whole output, and the handles
    still remove them. Hooks on a PEFT layer's base layer (the base output
    alone) keep from_peft off that layer."""
    name = "model.layers.0.self_attn.q_proj"
    seen = []

    def hooked(model):
        def forward_hook(module, args, output):
            seen.append(("forward", module, args[0], output))

        def backward_hook(module, grad_input, grad_output):
            seen.append(("backward", module))

        layer = model.get_submodule(name)
        return [layer.register_forward_hook(forward_hook), layer.register_full_backward_hook(backward_hook)]

    def run(model):
        seen.clear()
        model(input_ids=batch()).logits.square().mean().backward()
        inner = model.base_model.model if isinstance(model, peft.PeftModel) else model
        layer = inner.get_submodule(name)
        assert [(s[0], s[1]) for s in seen] == [("forward", layer), ("backward", layer)]
        return layer

    model = tiny_llama()
    handles = hooked(model)
    fused_lora.inject(model, ["q_proj"], r=4)
    _randomise_adapters(model)
    layer = run(model)
    assert isinstance(layer, LoRALinear) and torch.equal(seen[0][3], layer(seen[0][2]))  # (adapter included)
    fused_lora.save_adapter(model, tmp_path)
    fused_lora.unload(model)
    model.get_submodule(name).weight.requires_grad_(True)  # (all frozen after unload: for a backward)
    assert type(run(model)) is nn.Linear
    for handle in handles:
        handle.remove()
    seen.clear()
    model(input_ids=batch())
    assert seen == []

    model = tiny_llama()
    hooked(model)
    fused_lora.load_adapter(model, tmp_path)
    assert isinstance(run(model), LoRALinear)
    peft_model = fused_lora.to_peft(model)  # (on PEFT's layer for q_proj, not on its base layer)
    assert isinstance(run(peft_model), peft.tuners.lora.Linear)
    fused_lora.from_peft(peft_model)
    assert isinstance(run(peft_model), LoRALinear)
    fused_lora.to_peft(peft_model)
    assert isinstance(run(peft_model), peft.tuners.lora.Linear)

    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.base_model.model.get_submodule(name).base_layer.register_forward_hook(lambda *args: None)
    report = fused_lora.from_peft(peft_model)
    assert "its base layer has hooks (_forward_hooks)" in report.skipped["base_model.model." + name]
    assert len(report.converted) == 1


def test_models_dispatched_by_accelerate_or_on_meta_are_refused(tmp_path):
    """accelerate's offloading moves a layer's weights in at each call, by
    hooks that would not move a fused layer's; loading into meta tensors
    keeps nothing. Both are refused, naming the layers, before anything
    changes; fusing first, then offloading, gives the model's outputs."""
    accelerate = pytest.importorskip("accelerate")
    source = tiny_llama()
    fused_lora.inject(source, ["q_proj", "v_proj"], r=4)
    _randomise_adapters(source)
    fused_lora.save_adapter(source, tmp_path)
    ids = batch()
    expected = source(input_ids=ids).logits.detach()

    offloaded = accelerate.cpu_offload(tiny_llama(), execution_device=DEVICE)
    before = {n: type(m) for n, m in offloaded.named_modules()}
    for call in (lambda: fused_lora.inject(offloaded, ["q_proj"]),
                 lambda: fused_lora.load_adapter(offloaded, tmp_path)):
        with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj'.*dispatched by accelerate"):
            call()
    assert {n: type(m) for n, m in offloaded.named_modules()} == before

    with torch.device("meta"):
        on_meta = transformers.LlamaForCausalLM(source.config)
    with pytest.raises(AdapterFileError,
                       match="model.layers.0.self_attn.q_proj: the model's tensor there is on the meta"):
        fused_lora.load_adapter(on_meta, tmp_path)
    fused_lora.inject(on_meta, ["q_proj", "v_proj"], r=4)  # (inject is fine there: nothing to keep yet)
    with pytest.raises(AdapterFileError, match="on the meta device"):
        fused_lora.load_adapter(on_meta, tmp_path)

    model = tiny_llama()
    fused_lora.load_adapter(model, tmp_path)
    accelerate.cpu_offload(model, execution_device=DEVICE)
    assert_outputs_close(model(input_ids=ids).logits, expected)
    for call in (fused_lora.unload, fused_lora.merge_and_unload, fused_lora.to_peft):
        with pytest.raises(ValueError, match="dispatched by accelerate"):
            call(model)
    with pytest.raises(ValueError, match=r"save_adapter: \['model.layers.0.self_attn.q_proj.lora_A'.* meta device"):
        fused_lora.save_adapter(model, tmp_path / "offloaded")
    assert not (tmp_path / "offloaded").exists()


def _peft_name(name):
    """A PEFT model's parameter name as the fused model's."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_option_loads_saves_and_converts(tmp_path, bias):
    """PEFT's ``bias="lora_only"`` trains the LoRA layers' biases and
    ``"all"`` every bias of the model; its files hold them. load_adapter sets
    those biases and trains what PEFT trains; save_adapter and to_peft write
    the same option and keys (once from_peft, once by hand)."""
    from safetensors.torch import load_file

    def make():
        return tiny_llama(attention_bias=True, mlp_bias=True)

    ref = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias,
                                                      init_lora_weights=False))
    _perturb([p for n, p in ref.named_parameters() if p.requires_grad and n.endswith("bias")])
    ref.save_pretrained(tmp_path / "peft")
    keys = sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    if not any(k.endswith(".bias") for k in keys):  # (its own from_pretrained then differs from the model saved)
        pytest.skip(f"PEFT {peft.__version__}'s save_pretrained leaves the biases of bias={bias!r} out of its file "
                    "(fixed in PEFT 0.21): there is nothing to match")
    ids = batch()
    expected = ref(input_ids=ids).logits.detach()

    model = make()
    fused_lora.load_adapter(model, tmp_path / "peft")
    assert_outputs_close(model(input_ids=ids).logits, expected)
    assert sorted(trainable(model)) == sorted(_peft_name(n) for n in trainable(ref))
    fused_lora.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
    assert _saved_keys(tmp_path / "ours") == keys
    again = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert_outputs_close(again(input_ids=ids).logits, expected)
    peft_model = fused_lora.to_peft(model)
    assert peft_model.peft_config["default"].bias == bias
    assert_outputs_close(peft_model(input_ids=ids).logits, expected)

    fused_lora.from_peft(ref)  # (its biases train: save_adapter writes them)
    fused_lora.save_adapter(ref, tmp_path / "converted")
    assert _saved_keys(tmp_path / "converted") == keys

    model = make()  # (by hand: a fused layer's bias, then another module's, unfrozen after inject)
    fused_lora.inject(model, ["q_proj", "v_proj"], r=4)
    model.model.layers[0].self_attn.q_proj.bias.requires_grad_(True)
    if bias == "all":
        model.model.layers[1].mlp.down_proj.bias.requires_grad_(True)
    fused_lora.save_adapter(model, tmp_path / "by_hand")
    config = json.loads((tmp_path / "by_hand" / "adapter_config.json").read_text())
    assert config["bias"] == bias and config["modules_to_save"] is None
    assert _saved_keys(tmp_path / "by_hand") == keys


def test_rescale_adapters_scales_every_adapter_peft_s_left_layers_too():
    """Inside fused_lora.rescale_adapters(model, m) every adapter's term is m
    times its own: on a model from_peft converted but for one layer (its
    scale changed with set_scale: left PEFT's), as PEFT's
    rescale_adapter_scale on the unconverted model (which would scale that
    layer alone on the converted one); blocks nest; the model as it was
    after, an exception included; m = 0 is the base model. inject_multi's
    alphas and DoRA's scale likewise. Merged adapters, merging inside the
    block, and bad multipliers are refused."""
    from peft.helpers import rescale_adapter_scale

    ids = batch()
    twins = []
    for _ in range(2):
        twin = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                 init_lora_weights=False))
        twin.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)  # (left as PEFT's)
        twins.append(twin)
    twins[1].load_state_dict(twins[0].state_dict())
    converted, reference = twins
    report = fused_lora.from_peft(converted)
    assert len(report.skipped) == 1 and len(report.converted) == 13
    tuned = converted(input_ids=ids).logits
    for multiplier in (0.5, 2.5, 0.0):
        with rescale_adapter_scale(reference, multiplier):
            expected = reference(input_ids=ids).logits
        with fused_lora.rescale_adapters(converted, multiplier) as inside:
            assert inside is converted
            assert_outputs_close(converted(input_ids=ids).logits, expected)
    assert torch.equal(converted(input_ids=ids).logits, tuned)
    with fused_lora.rescale_adapters(converted, 4.0), fused_lora.rescale_adapters(converted, 0.25):
        assert_outputs_close(converted(input_ids=ids).logits, tuned)
    with fused_lora.disable_adapters(converted):
        base = converted(input_ids=ids).logits
    with fused_lora.rescale_adapters(converted, 0):
        assert_outputs_close(converted(input_ids=ids).logits, base)
    with pytest.raises(KeyError):
        with fused_lora.rescale_adapters(converted, 3.0):
            raise KeyError("inside")
    assert torch.equal(converted(input_ids=ids).logits, tuned)

    # inject_multi's alphas; DoRA, as the same layers of half the alpha
    multi = tiny_llama()
    fused_lora.inject_multi(multi, ["q_proj"], ranks=[2, 3], alphas=[4, 9], use_rslora=True)
    layer = multi.model.layers[0].self_attn.q_proj
    scalings = layer.scalings
    with fused_lora.rescale_adapters(multi, 0.5):
        assert layer.alphas == (2.0, 4.5) and layer.scalings == tuple(s / 2 for s in scalings)
    assert layer.alphas == (4.0, 9.0)
    dora = tiny_llama()
    fused_lora.inject(dora, ["v_proj"], r=4, alpha=8, use_dora=True)
    _randomise_adapters(dora)
    halved = copy.deepcopy(dora)
    for m in fused_lora.integration.fused_layers(halved).values():
        m.alpha = 4.0
    with fused_lora.rescale_adapters(dora, 0.5):
        assert torch.equal(dora(input_ids=ids).logits, halved(input_ids=ids).logits)

    # refusals, nothing changed
    model = tiny_llama()
    fused_lora.inject(model, ["q_proj"], r=4, alpha=8)
    q = model.model.layers[0].self_attn.q_proj
    q.merge()
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj hold their adapter merged into the base "
                                         r"weight, at its own scale: unmerge first"):
        with fused_lora.rescale_adapters(model, 0.5):
            pass
    assert q.alpha == 8.0
    q.unmerge()
    with fused_lora.rescale_adapters(model, 0.5):
        with pytest.raises(ValueError, match=r"inside fused_lora.rescale_adapters the adapter's scale is the block's"):
            q.merge()
        with pytest.raises(ValueError, match=r"merge_and_unload: inside a `with fused_lora.rescale_adapters"):
            fused_lora.merge_and_unload(model)
    assert not q.merged and q.alpha == 8.0 and "_fused_lora_rescaled" not in q.__dict__
    with pytest.raises(ValueError, match="no adapters to rescale"):
        with fused_lora.rescale_adapters(tiny_llama(), 0.5):
            pass
    for bad, err in (("0.5", TypeError), (True, TypeError), (None, TypeError), (math.inf, ValueError),
                     (math.nan, ValueError)):
        with pytest.raises(err, match="rescale_adapters: multiplier must be"):
            with fused_lora.rescale_adapters(model, bad):
                pass
    assert q.alpha == 8.0


def test_disable_adapters_runs_the_base_model():
    """Inside fused_lora.disable_adapters(model) the model is its base model,
    bit for bit (merged layers too), and as it was after the block, an
    exception included; on a model from from_peft, PEFT's disable_adapter()
    is that context (PEFT's own left the fused layers on), turning off
    PEFT's layers left and its modules_to_save wrappers too."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    fused_lora.inject(model, LLAMA_TARGETS, r=4)
    _randomise_adapters(model)
    model.model.layers[1].mlp.up_proj.merge()
    ids = batch()
    expected, tuned = base(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(expected, tuned)
    with fused_lora.disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert torch.equal(model(input_ids=ids).logits, tuned)
    with pytest.raises(KeyError):
        with fused_lora.disable_adapters(model):
            raise KeyError("inside")
    assert torch.equal(model(input_ids=ids).logits, tuned)
    with pytest.raises(ValueError, match="no adapters to disable"):
        with fused_lora.disable_adapters(tiny_llama()):
            pass

    twins = []
    for _ in range(2):
        twin = peft.get_peft_model(tiny_llama_classifier(), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], init_lora_weights=False))
        twin.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)  # (left as PEFT's)
        twins.append(twin)
    twins[1].load_state_dict(twins[0].state_dict())
    _perturb([twins[0].base_model.model.score.modules_to_save["default"].weight])
    twins[1].load_state_dict(twins[0].state_dict())
    peft_model, reference = twins
    with reference.disable_adapter():
        expected = reference(input_ids=ids).logits
    assert torch.equal(expected, tiny_llama_classifier()(input_ids=ids).logits)
    report = fused_lora.from_peft(peft_model)
    assert len(report.converted) == 3 and len(report.skipped) == 1
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)
    assert_outputs_close(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits)
    fused_lora.to_peft(peft_model)
    assert "disable_adapter" not in vars(peft_model)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)


def test_peft_model_methods_take_the_fused_layers_after_from_peft(tmp_path):
    """PeftModel methods that visit PEFT's layers only would skip the fused
    ones, silently (a checkpoint without their adapters, a merge that merges
    nothing, a base model with fused layers left): after from_peft,
    save_pretrained (as transformers' Trainer calls it, a state_dict passed
    in or not), load_adapter (as it resumes), merge_adapter/unmerge_adapter,
    merge_and_unload and unload do what they do on the PEFT model."""
    from safetensors.torch import load_file

    def twin():
        model = peft.get_peft_model(tiny_llama_classifier(), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], init_lora_weights=False))
        model.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)  # (left as PEFT's)
        return model

    reference, model = twin(), twin()
    _perturb([reference.base_model.model.score.modules_to_save["default"].weight])
    model.load_state_dict(reference.state_dict())
    ids = batch()
    expected = reference(input_ids=ids).logits.detach()
    assert len(fused_lora.from_peft(model).converted) == 3

    reference.save_pretrained(tmp_path / "reference")
    model.save_pretrained(tmp_path / "fused")
    model.save_pretrained(tmp_path / "passed", state_dict=model.state_dict())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # (the methods are the clone's)
        clone.save_pretrained(tmp_path / "clone")
        assert clone.save_pretrained.args[0] is clone
        assert clone.base_model.disable_adapter_layers.args[0] is clone  # (PEFT's tuner's too)
    want = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    for name in ("fused", "passed", "clone"):
        got = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), name
    assert len(fused_lora.integration.fused_layers(model)) == 3  # (the fused layers back after the call)
    saved = model(input_ids=ids).logits.detach()
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    _perturb(adapters.values())  # (training went on, then resumes from the checkpoint, as Trainer does:)
    model.load_adapter(tmp_path / "fused", model.active_adapter, is_trainable=True)
    assert torch.equal(model(input_ids=ids).logits, saved)
    assert all(p is dict(model.named_parameters())[n] for n, p in adapters.items())  # (the optimizer's, still)
    other = copy.deepcopy(model)  # (a new name: PEFT's load_adapter on its layers put back, then converted again)
    other.load_adapter(tmp_path / "fused", "other")
    assert list(other.peft_config) == ["default", "other"]
    assert len(fused_lora.integration.multi_fused_layers(other)) == 3
    other_reference = copy.deepcopy(reference)
    other_reference.load_adapter(tmp_path / "fused", "other")
    for m in (other, other_reference):
        m.set_adapter("other")
    assert_outputs_close(other(input_ids=ids).logits, other_reference(input_ids=ids).logits)
    assert torch.equal(*(peft.PeftModel.from_pretrained(tiny_llama_classifier(), tmp_path / name)(input_ids=ids).logits
                         for name in ("fused", "reference")))  # (set_scale is not in PEFT's file: not `expected`)

    model.merge_adapter()
    layers = fused_lora.integration.fused_layers(model).values()
    assert all(layer.merged for layer in layers)
    assert reference.base_model.model.model.layers[0].self_attn.q_proj.merged is False
    assert model.base_model.model.model.layers[0].self_attn.q_proj.merged  # (PEFT's layer left, merged by PEFT)
    assert_outputs_close(model(input_ids=ids).logits, expected)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    assert_outputs_close(model(input_ids=ids).logits, expected)

    merged = model.merge_and_unload()
    assert not fused_lora.integration.fused_layers(merged) and not _peft_adapter_layers(merged)
    assert_outputs_close(merged(input_ids=ids).logits, expected)
    again = twin()
    again.load_state_dict(reference.state_dict())
    fused_lora.from_peft(again)
    base = again.unload()
    assert not fused_lora.integration.fused_layers(base) and not _peft_adapter_layers(base)
    assert torch.equal(base(input_ids=ids).logits, reference.unload()(input_ids=ids).logits)


def _peft_twins_converted():
    """``(reference, model, converted)``: two equal PeftModels (q_proj and
    v_proj), the second converted by from_peft but for one layer left PEFT's
    (a scale PEFT's ``set_scale`` changed), and the names it converted."""
    def twin():
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
        model.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)  # (left as PEFT's)
        return model

    reference, model = twin(), twin()
    model.load_state_dict(reference.state_dict())
    converted = fused_lora.from_peft(model).converted
    assert len(converted) == 3
    return reference, model, converted


def test_peft_status_methods_count_the_fused_layers_after_from_peft():
    """After from_peft, PEFT's get_layer_status() and get_model_status()
    raised "No adapter layers found". They report the fused layers as PEFT
    reports its own in the same state (enabled or not, merged or not, frozen
    or not; a layer left PEFT's beside them), a converted layer's type named
    (fused_lora.LoRALinear), and leave the model as it was: fused layers in
    place, merged weights bit for bit. disable_adapter_layers() also froze
    PEFT's adapters (and enable_adapter_layers() unfroze them) but not the
    fused ones, and to_peft brought PEFT's layers back enabled: both now as
    PEFT does."""
    reference, model, converted = _peft_twins_converted()
    fused_names = {name.removeprefix("base_model.") for name in converted}

    def check(step):
        layers = model.get_layer_status()
        expected = [dataclasses.replace(s, module_type="fused_lora.LoRALinear") if s.name in fused_names else s
                    for s in reference.get_layer_status()]
        assert layers == expected, step
        assert {s.module_type for s in layers} == {"fused_lora.LoRALinear", "lora.Linear"}
        assert model.get_model_status() == reference.get_model_status(), step
        assert sorted(fused_lora.integration.fused_layers(model)) == sorted(converted)  # (back in place)

    check("as converted")
    for m in (model, reference):
        m.disable_adapter_layers()
    assert not any(s.enabled for s in model.get_layer_status())
    check("disabled")
    for m in (model, reference):
        m.enable_adapter_layers()
        m.merge_adapter()
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(s.merged_adapters == ["default"] for s in model.get_layer_status())
    check("merged")
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())
    for m in (model, reference):
        m.unmerge_adapter()
    model.base_model.model.model.layers[1].self_attn.v_proj.lora_A.requires_grad_(False)  # (the fused layer's)
    reference.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.requires_grad_(False)
    assert model.get_model_status().requires_grad == {"default": "irregular"}
    check("one frozen lora_A")
    for m in (model, reference):
        m.enable_adapter_layers()  # (PEFT makes every active adapter train again)
    assert model.get_model_status().requires_grad == {"default": True}
    check("enabled again")
    for m in (model, reference):
        m.disable_adapter_layers()
    fused_lora.to_peft(model)  # (PEFT's own methods again, its layers disabled as the fused ones were)
    assert "get_layer_status" not in vars(model) and model.get_layer_status() == reference.get_layer_status()
    # (the base's outputs; not bit for bit: PEFT's unmerge above rounded its own layers' weights)
    assert_outputs_close(model(input_ids=batch()).logits, reference(input_ids=batch()).logits)


def _peft_adapter_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_peft_adapter_layer_switches_and_adapter_changes_after_from_peft():
    """After from_peft, PEFT's disable_adapter_layers() left the fused layers
    on (the model was not the base model), its add_adapter froze the fused
    adapters (training stopped, silently) and its delete_adapter left them
    applied. The switches take the fused layers too (and PEFT's layer left);
    add_adapter and delete_adapter run on PEFT's layers put back, then the
    model is converted again (refused, nothing changed, while merged). So on
    PEFT's tuner (``model.base_model``), where disable_adapter_layers left
    the fused layers on, merge_adapter left them unmerged and
    merge_and_unload left them in."""
    reference, model, _ = _peft_twins_converted()
    ids = batch()
    expected = reference(input_ids=ids).logits.detach()
    base = tiny_llama()(input_ids=ids).logits.detach()
    model.disable_adapter_layers()
    assert torch.equal(model(input_ids=ids).logits, base)
    model.disable_adapter_layers()  # (twice: still off)
    assert torch.equal(model(input_ids=ids).logits, base)
    with fused_lora.disable_adapters(model):
        pass
    assert torch.equal(model(input_ids=ids).logits, base)  # (the block puts back what was: off)
    model.enable_adapter_layers()
    assert_outputs_close(model(input_ids=ids).logits, expected)
    # the same methods called on PEFT's tuner (model.base_model, a LoraModel), as reference passes do
    model.base_model.disable_adapter_layers()
    assert torch.equal(model(input_ids=ids).logits, base)
    copied = copy.deepcopy(model)  # (the copy's methods are bound to the copy)
    copied.base_model.enable_adapter_layers()
    assert_outputs_close(copied(input_ids=ids).logits, expected)
    assert torch.equal(model(input_ids=ids).logits, base)
    model.base_model.enable_adapter_layers()
    assert_outputs_close(model(input_ids=ids).logits, expected)
    model.base_model.merge_adapter()
    assert all(layer.merged for layer in fused_lora.integration.fused_layers(model).values())
    assert_outputs_close(model(input_ids=ids).logits, expected)
    model.base_model.unmerge_adapter()
    assert not any(layer.merged for layer in fused_lora.integration.fused_layers(model).values())
    merged = copied.base_model.merge_and_unload()
    assert not any(isinstance(m, (LoRALinear, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    assert_outputs_close(merged(input_ids=ids).logits, expected)

    # add_adapter and delete_adapter: PEFT's, on its layers put back, then the model converted again (layers of
    # several adapters while it holds two: tests/test_peft_multi.py), the same tensors training
    before = {id(p) for p in model.parameters() if p.requires_grad}
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"^add_adapter: .* hold their adapters merged"):
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    model.unmerge_adapter()
    assert list(model.peft_config) == ["default"] and len(_peft_adapter_layers(model)) == 1
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    assert list(model.peft_config) == ["default", "other"]
    multi = fused_lora.integration.multi_fused_layers(model)
    assert len(multi) == 5 and len(_peft_adapter_layers(model)) == 1  # (q, v and k fused; the set_scale one PEFT's)
    assert {id(p) for p in model.parameters() if p.requires_grad} == before and len(before) == 8
    assert_outputs_close(model(input_ids=ids).logits, expected)
    model.set_adapter("other")
    assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3
    model.set_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the k_proj layers left without adapters are PEFT's, and no loss)
        model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and not fused_lora.integration.multi_fused_layers(model)
    assert len(fused_lora.integration.fused_layers(model)) == 3
    assert {id(p) for p in model.parameters() if p.requires_grad} == before
    assert_outputs_close(model(input_ids=ids).logits, expected)


def test_peft_set_adapter_and_set_requires_grad_take_the_fused_layers_after_from_peft():
    """After from_peft, PEFT's set_requires_grad(...) and set_adapter(...,
    inference_mode=True) left the fused adapters training, silently (PEFT's
    own layers froze), and its add_weighted_adapter failed at the first fused
    layer with PEFT's "Target module ... is not supported". The first two take
    the fused layers as PEFT takes its own (a layer left PEFT's beside them);
    set_adapter naming another adapter is refused by name, nothing changed;
    add_weighted_adapter runs on PEFT's layers put back, then the model is
    converted again (now of two adapters)."""
    _, model, converted = _peft_twins_converted()
    ids = batch()
    expected = model(input_ids=ids).logits.detach()

    def training():
        flags = {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}
        assert len(flags) == 8 and sum(n.endswith((".lora_A", ".lora_B")) for n in flags) == 6  # (3 fused, 1 PEFT's)
        assert len(set(flags.values())) == 1, flags  # (all alike)
        return next(iter(flags.values()))

    assert training()
    model.set_requires_grad("default", False)
    assert not training()
    model.set_requires_grad("another", True)  # (no adapter of that name anywhere: nothing changes, as in PEFT)
    assert not training()
    model.base_model.set_requires_grad(["default"], True)
    assert training()
    model.base_model.set_adapter("default", inference_mode=True)
    assert not training()
    model.set_adapter("default")  # (PEFT's: the active adapter trains)
    assert training()
    if "inference_mode" in inspect.signature(type(model).set_adapter).parameters:  # (PEFT 0.19 and later)
        model.set_adapter("default", inference_mode=True)
        assert not training()
        model.base_model.set_adapter(["default"])
        assert training()

    with pytest.raises(ValueError, match=r"^set_adapter: the layers from_peft converted hold adapter \['default'\] "
                                         r"alone and would go on running it, not 'other'.*fused_lora.to_peft"):
        model.set_adapter("other")
    with pytest.raises(ValueError, match=r"^set_adapter: .* not \['default', 'other'\]"):
        model.base_model.set_adapter(["default", "other"])
    assert training() and model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in converted)
    # add_weighted_adapter: PEFT's on its layers put back, the model converted again (two adapters now)
    model.add_weighted_adapter(["default"], [1.0], "weighted", combination_type="linear")
    assert sorted(model.peft_config) == ["default", "weighted"]
    assert all(isinstance(model.get_submodule(n), fused_lora.MultiLoRALinear) for n in converted)
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}
    assert len(flags) == 16 and all(flags[n] == n.endswith((".0", ".default.weight")) for n in flags), flags
    assert torch.equal(model(input_ids=ids).logits, expected)
    model.set_adapter("weighted")
    assert_outputs_close(model(input_ids=ids).logits, expected)  # (the same adapter, weighted 1)

    fused_lora.to_peft(model)  # (PEFT's own methods again, on its tuner too)
    assert not set(vars(model)) & set(fused_lora.integration._PEFT_METHODS)
    assert not set(vars(model.base_model)) & set(fused_lora.integration._TUNER_METHODS)


def test_load_adapter_into_a_model_from_peft_keeps_peft_layers_in_step(tmp_path):
    """After from_peft, PEFT's layers kept for to_peft and save_pretrained
    share the adapter weights but hold their own scale and dropout: a file
    with the same loads (and PEFT's layers see its weights), one with others
    is refused before anything changes."""
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    fused_lora.from_peft(model)
    for alpha in (16, 8):
        source = tiny_llama(seed=alpha)
        fused_lora.inject(source, ["q_proj", "v_proj"], r=4, alpha=alpha)
        _randomise_adapters(source)
        fused_lora.save_adapter(source, tmp_path / str(alpha))
    ids = batch()
    fused_lora.load_adapter(model, tmp_path / "16")
    expected = model(input_ids=ids).logits.detach()
    with pytest.raises(AdapterFileError, match=r"converted from PEFT \(from_peft\) with scaling, dropout and "
                                               r"use_dora \(4.0, 0.0, False\), the file has \(2.0, 0.0, False\)"):
        fused_lora.load_adapter(model, tmp_path / "8")
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert_outputs_close(fused_lora.to_peft(model)(input_ids=ids).logits, expected)


def test_a_model_from_peft_loads_peft_state_dicts_and_assigned_tensors_reach_peft_layers(tmp_path):
    """After from_peft, a state dict of the PeftModel from before the
    conversion (PEFT's names: ``q_proj.lora_A.default.weight``,
    ``q_proj.base_layer.weight``) failed to load strictly, and PEFT's
    set_peft_model_state_dict loaded nothing into the fused layers, silently
    (their keys came back as unexpected). And load_state_dict(...,
    assign=True) put new tensors in the fused layers alone: PEFT's layers,
    which save_pretrained writes and to_peft brings back, kept the old
    values. Both names load now, and PEFT's layers get what the fused ones
    hold."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    def peft_model(adapters_seed):
        model = tiny_llama()
        torch.manual_seed(adapters_seed)  # (init_lora_weights=False: A and B random)
        return peft.get_peft_model(model, config)

    source = peft_model(1)
    ids = batch()
    expected = source(input_ids=ids).logits.detach()
    names = {n for n, m in source.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for how in ("load_state_dict", "set_peft_model_state_dict", "load_state_dict(assign=True)"):
        model = peft_model(2)
        assert set(fused_lora.from_peft(model).converted) == names and len(names) == 4
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-2  # (other adapters)
        if how == "set_peft_model_state_dict":  # (PEFT's file names, without the adapter's)
            result = peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(source))
            assert not result.unexpected_keys
        else:
            state = {k: v.clone() for k, v in source.state_dict().items()}
            model.load_state_dict(state, assign=how.endswith("(assign=True)"))  # (strict)
        assert_outputs_close(model(input_ids=ids).logits, expected)
        model.save_pretrained(tmp_path / how)
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / how)
        assert_outputs_close(reloaded(input_ids=ids).logits, expected)
        fused_lora.to_peft(model)
        assert not fused_lora.integration.fused_layers(model)
        assert_outputs_close(model(input_ids=ids).logits, expected)


def test_from_peft_refuses_a_model_without_peft_lora_layers():
    """from_peft on a model with no PEFT LoRA layer (a plain model, one fused
    by inject, a PeftModel of another method, the model inside a converted
    PeftModel) returned an empty report, as if the model now ran fused
    kernels: it is refused, saying why; a second call on a converted model
    converts nothing, as before."""
    plain = tiny_llama()
    injected = tiny_llama()
    fused_lora.inject(injected, ["q_proj"], r=2)
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    converted = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(fused_lora.from_peft(converted).converted) == 2
    for model, why in [(plain, r"make them with peft.get_peft_model\(model, peft.LoraConfig\(...\)\), or fuse the "
                               r"model's linears with fused_lora.inject"),
                       (injected, r"its fused layers came from fused_lora.inject or load_adapter"),
                       (ia3, r"it is a PeftModel of another method \(IA3Model\), not LoRA"),
                       (converted.base_model.model, r"its layers were converted already \(from_peft on the "
                                                    r"PeftModel that holds this model\)")]:
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match=r"^from_peft: the model holds no PEFT LoRA layers to convert: " + why):
            fused_lora.from_peft(model)
        assert {n: type(m) for n, m in model.named_modules()} == before
    again = fused_lora.from_peft(converted)
    assert again.converted == [] and again.skipped == {}


def _assert_same_beams(model, reference, prompt, generate):
    """``model.generate`` gives what PEFT's ``reference.generate`` gives, where
    PEFT can: PEFT 0.18's own beam search with ``adapter_names`` under
    transformers 5 refuses the names it does not repeat for the beams (the
    floor's limit, not a fused one: PEFT 0.21, which CI installs, runs it)."""
    try:
        expected = reference.generate(input_ids=prompt, **generate)
    except ValueError as err:
        if "Length of `adapter_names` should be the same as the number of inputs" not in str(err) \
                or version_tuple(peft.__version__) >= (0, 21):
            raise
        return
    assert torch.equal(model.generate(input_ids=prompt, **generate), expected)


def test_a_batch_that_mixes_adapters_runs_as_peft_runs_it_after_from_peft():
    """PEFT's batches that mix adapters (``model(..., adapter_names=[...])``,
    ``generate`` too) after from_peft: PEFT's hooks handed the names to its
    own layers alone, so the fused layers ran the adapter on every sample,
    silently ("__base__" samples got it where a PEFT layer was left; with none
    left PEFT refused the names as non-existing). Each sample now gets what
    PEFT gives it, through fused layers, a layer left PEFT's and a trained
    head (modules_to_save), in the forward and in a beam search, of a
    decoder and of an encoder-decoder (whose encoder sees the samples before
    the beams repeat them); unknown names and training mode are refused."""
    def twins(make, targets, head):
        config = dict(r=4, target_modules=targets, modules_to_save=[head], init_lora_weights=False)
        reference, model = (peft.get_peft_model(make(), peft.LoraConfig(**config)) for _ in range(2))
        _perturb(p for n, p in reference.named_parameters() if f"{head}.modules_to_save" in n)
        first = next(m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        first.set_scale("default", 0.5)  # (the layer stays PEFT's)
        model.load_state_dict(reference.state_dict())
        next(m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)).set_scale("default", 0.5)
        report = fused_lora.from_peft(model)
        assert len(report.converted) >= 3 and len(report.skipped) == 1
        return reference.eval(), model.eval()

    reference, model = twins(tiny_llama, ["q_proj", "v_proj"], "lm_head")
    ids, names = batch(b=3), ["default", "__base__", "default"]
    expected = reference(input_ids=ids, adapter_names=names).logits
    with reference.disable_adapter():
        base = reference(input_ids=ids).logits
    # (PEFT's own: its "__base__" sample is the base model's; on a GPU equal to rounding only, its head then
    # running on that sample alone, a product of another shape)
    assert_outputs_close(expected[1], base[1])
    assert (expected[0] - base[0]).abs().max() > 1e-2
    checks = []  # (the ids the hooks make are noted as checked: no layer reads them back)
    with pytest.MonkeyPatch.context() as patch:
        real = fused_lora.layer.note_checked_adapter_ids
        patch.setattr(fused_lora.layer, "note_checked_adapter_ids", lambda *a, **k: checks.append(a) or real(*a, **k))
        assert_outputs_close(model(input_ids=ids, adapter_names=names).logits, expected)
    assert checks == []
    generate = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0, adapter_names=names)
    prompt = ids[:, :6]
    _assert_same_beams(model, reference, prompt, generate)

    with pytest.raises(ValueError, match=r"^adapter_names: no layer holds adapter\(s\) \['other'\] \(the model's: "
                                         r"\['default'\], and '__base__' for the base model\)"):
        model(input_ids=ids, adapter_names=["other", "default", "__base__"])
    with pytest.raises(TypeError, match=r"^adapter_names must be a list of adapter names"):
        model(input_ids=ids, adapter_names="default")
    model.train()
    with pytest.raises(ValueError, match=r"^adapter_names \(a batch that mixes adapters\) is for inference"):
        model(input_ids=ids, adapter_names=names)
    model.eval()
    assert not any(m._forward_pre_hooks for m in model.modules())  # (none left behind, refusals included)

    def tiny_bart():
        torch.manual_seed(0)
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                      decoder_ffn_dim=48, max_position_embeddings=64)
        return transformers.BartForConditionalGeneration(cfg).to(DEVICE)

    reference, model = twins(tiny_bart, ["q_proj", "v_proj"], "lm_head")
    _assert_same_beams(model, reference, prompt, generate)
    expected = reference(input_ids=ids, decoder_input_ids=prompt, adapter_names=names).logits
    assert_outputs_close(model(input_ids=ids, decoder_input_ids=prompt, adapter_names=names).logits, expected)
