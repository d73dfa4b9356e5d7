"""PEFT's aLoRA (activated LoRA, ``alora_invocation_tokens``) through
``from_peft``: the adapter runs on each sample's tokens from its invocation
sequence on, PEFT handing the layers one offset a sample. The fused layer
makes them a row scale (1 on those tokens, 0 before): one batch in the fused
passes. Compared with the PEFT model it came from: logits, gradients (with
activation checkpointing too, whose recompute runs after PEFT's hooks are
gone), generation."""

import copy

import pytest
import torch

import fused_lora
from fused_lora import LoRALinear
from lora_testing import DEVICE, VOCAB, assert_same_adapter_files, tiny_llama

peft = pytest.importorskip("peft", minversion=".".join(map(str, fused_lora.integration.MIN_PEFT)))
transformers = pytest.importorskip("transformers")

INVOCATION = [3, 5]


def _alora(dropout=0.0, **config):
    """A PEFT aLoRA model of a tiny Llama (its lora_B drawn: a trained
    adapter) and a copy of it, the reference."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM", init_lora_weights=False,
                             lora_dropout=dropout, **config)
    model = peft.get_peft_model(tiny_llama(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model, copy.deepcopy(model)


def _batch():
    """Three samples of 12 tokens: the invocation at 4 and at 8, and nowhere (the base alone)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(6, VOCAB, (3, 12), generator=g)
    ids[0, 4:6] = torch.tensor(INVOCATION)
    ids[1, 8:10] = torch.tensor(INVOCATION)
    return ids.to(DEVICE)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_an_alora_model_converts_and_runs_as_peft(tmp_path):
    """Every layer converts (an aLoRA LoRALinear); the logits are PEFT's:
    the base model's before each sample's invocation and on a sample
    without one, the adapted model's from it on; merging, and
    fused_lora.save_adapter (whose file would lose the invocation), are
    refused, nothing changed; save_pretrained writes PEFT's files; to_peft
    gives PEFT's layers back."""
    model, reference = _alora()
    model.eval()
    reference.eval()
    originals = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    report = fused_lora.from_peft(model)
    assert sorted(report.converted) == sorted(originals) and not report.skipped
    assert all(model.get_submodule(n).alora and "alora=True" in repr(model.get_submodule(n)) for n in originals)
    ids = _batch()
    logits = model(input_ids=ids).logits
    _close(logits, reference(input_ids=ids).logits)
    with reference.disable_adapter():
        base = reference(input_ids=ids).logits
    _close(logits[0, :4], base[0, :4])
    _close(logits[2], base[2])
    assert not torch.allclose(logits[0, 4:], base[0, 4:], rtol=1e-3)
    with pytest.raises(ValueError, match="aLoRA adapter runs on the tokens after its invocation alone"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="save_adapter: .* aLoRA adapter, whose invocation tokens"):
        fused_lora.save_adapter(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    model.save_pretrained(tmp_path / "fused")
    reference.save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "fused", tmp_path / "peft")
    _close(model(input_ids=ids).logits, logits)
    # a layer called without PEFT's offsets (no invocation looked for): its base alone
    layer = model.get_submodule(originals[0])
    x = torch.randn(2, 5, layer.in_features, device=DEVICE)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="one offset a sample"):
        layer(x, alora_offsets=[1])
    fused_lora.to_peft(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    _close(model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
def test_training_an_alora_adapter_matches_peft(checkpointing):
    """Train mode: the loss and every adapter gradient are PEFT's, with
    transformers' activation checkpointing too (the backward's recompute
    takes the offsets of the layer's forward, PEFT's hooks being gone by
    then); an SGD step keeps the two models equal."""
    model, reference = _alora()
    if checkpointing is not None:
        for m in (model, reference):
            m.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
            m.enable_input_require_grads()
    fused_lora.from_peft(model)
    ids = _batch()
    for m in (model, reference):
        m.train()
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n.replace(".default.weight", ""): p.grad for n, p in reference.named_parameters()
                if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) == 12
    for n, g in grads.items():
        _close(g, expected[n])
    for m in (model, reference):
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
        m.eval()
    _close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_generate_matches_peft():
    """Greedy generation after the invocation: PEFT's tokens (the offsets
    computed once from the prompt, every new token through the adapter)."""
    model, reference = _alora()
    model.eval()
    reference.eval()
    report = fused_lora.from_peft(model)
    assert len(report.converted) == 6 and not report.skipped
    ids = _batch()[:2]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))


def test_alora_in_a_model_of_several_adapters_is_left_to_peft():
    model, _ = _alora()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    report = fused_lora.from_peft(model)
    assert not report.converted and len(report.skipped) == 6, report
    assert all("aLoRA in a model of several adapters is not fused" in why for why in report.skipped.values())
