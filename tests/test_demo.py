"""``fused-lora demo`` end to end, shortened: PEFT and fused LoRA on a real
transformers Llama give the same losses; the saved adapter reloads in PEFT."""

import json

import pytest
import torch

from fused_lora import demo
from fused_lora.integration import MIN_PEFT

pytest.importorskip("peft", minversion=".".join(map(str, MIN_PEFT)))
pytest.importorskip("transformers")


@pytest.mark.parametrize("use_dora", [False, True])
def test_demo_runs_and_curves_match(tmp_path, use_dora):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = demo.run(4, tmp_path, device, pretrain_steps=5, sample_chars=8, where="test", use_dora=use_dora)
    layers = 7 * (4 if device.type == "cuda" else 2)  # (seven linear layers a block: 4 blocks on a GPU, 2 on a CPU)
    assert result.converted == layers and not result.skipped and result.use_dora == use_dora
    assert len(result.naive_losses) == len(result.fused_losses) == 4
    assert result.max_loss_diff < 1e-4
    assert result.reload_max_logit_diff < 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_dora"] == use_dora
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo.json").read_text())["steps"] == 4
    assert result.sample.startswith("Four score and ")
    assert "max |loss difference|" in demo.report(result)
    assert f"{layers} PEFT {'DoRA' if use_dora else 'LoRA'} layers converted" in demo.report(result)


def test_the_shipped_text():
    sonnets, address = demo.load_text()
    assert sonnets.startswith("SONNET 18") and address.startswith("THE GETTYSBURG ADDRESS")
    assert len(sonnets) > 5000 and len(address) > 1000
