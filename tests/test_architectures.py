"""Many transformers architectures, each built from a small config: PEFT's
LoRA model on every linear (``target_modules="all-linear"``, adapters away
from their zero init) against the same model after :func:`from_peft`, its
logits and every gradient; :func:`inject` fuses the same layers and each
forward calls them. What the architectures differ in that a fused layer
meets: grouped or multi-query attention, biases on q/k/v, fused q/k/v and
gate/up projections, parallel attention and MLP, ALiBi, soft-capping,
partial rotary embeddings, encoders, an encoder-decoder, a mixture of
experts (whose experts and router PEFT wraps as parameters: left PEFT's,
and said). Llama and GPT-2 (``Conv1D``) are test_integration.py's."""

import copy
import warnings

import pytest
import torch

import fused_lora
from lora_testing import DEVICE, assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

F32 = torch.float32
VOCAB = 67
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)

#: name -> (model class, config class, config, layers fused); the classes by name (an older transformers may
#: lack one: that case is skipped)
ARCHITECTURES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", _DECODER, 7),  # grouped-query attention
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER, 7),  # biases on q/k/v
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_DECODER, head_dim=8), 7),  # logit soft-capping
    "phi": ("PhiForCausalLM", "PhiConfig", _DECODER, 6),  # parallel attention and MLP, partial rotary, biases
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_DECODER, pad_token_id=0), 4),  # fused qkv and gate_up
    "falcon": ("FalconForCausalLM", "FalconConfig",
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4), 4),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                 dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4), 4),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4), 4),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig",  # multi-query attention
                    dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4), 4),
    "bert": ("BertForSequenceClassification", "BertConfig",
             dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4), 8),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_layers=1, num_heads=4, decoder_start_token_id=0),
           16),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
                4),
}


def _model(name):
    cls_name, cfg_name, config, _ = ARCHITECTURES[name]
    cls, cfg_cls = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(cfg_cls(**config)).to(DEVICE).eval()


def _inputs(name):
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return dict(input_ids=ids, decoder_input_ids=ids[:, :5]) if name == "t5" else dict(input_ids=ids)


def _logits_and_gradients(model, inputs):
    """The logits and the gradient of a loss on them, of every parameter
    that gets one, by the Parameter's identity (from_peft shares PEFT's)."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).square().mean().backward()
    grads = {id(p): (n, p.grad.detach().clone()) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_peft_models_of_many_architectures_convert_with_the_same_logits_and_gradients(name):
    torch.manual_seed(0)
    model = _model(name)
    inputs = _inputs(name)
    fused_count = ARCHITECTURES[name][3]
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))  # (B random, not zero)
    logits, grads = _logits_and_gradients(peft_model, inputs)
    report = fused_lora.from_peft(peft_model)
    assert len(report.converted) == fused_count, report
    if name == "mixtral":  # (the router and the experts' 3-D parameters: PEFT's ParamWrapper, left and said)
        assert report.skipped and all("ParamWrapper is not a plain LoRA Linear" in why
                                      for why in report.skipped.values()), report
    else:
        assert not report.skipped, report
    fused_logits, fused_grads = _logits_and_gradients(peft_model, inputs)
    assert_close(fused_logits, logits.double(), F32, f"{name} logits")
    assert fused_grads.keys() == grads.keys()
    adapters = 0
    for key, (param_name, grad) in grads.items():
        assert_close(fused_grads[key][1], grad.double(), F32, f"{name} {param_name}.grad")
        adapters += "lora_" in param_name
    assert adapters >= 2 * fused_count
    # inject fuses the same layers (PEFT's "all-linear" leaves the output layer out, as inject does), and every
    # forward calls them; it warns of Bloom's, whose weights its modules slice on a path of pretraining_tp > 1
    plain = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = fused_lora.inject(plain, "all-linear", r=4)
    ours = [str(w.message) for w in caught if str(w.message).startswith("inject:")]
    if name == "bloom":
        assert len(ours) == 1 and "(BloomAttention.forward: `self.dense.weight[:, int(i * slices)" in ours[0], ours
    else:
        assert ours == []
    assert len(names) == fused_count
    assert fused_lora.integration.uncalled_layers(plain, **inputs) == []
