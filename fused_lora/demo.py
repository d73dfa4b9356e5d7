"""``fused-lora demo``: fine-tune a small character-level language model with
fused LoRA and with PEFT's (naive) LoRA side by side.

The model is a real ``transformers`` Llama built from a small config (nothing
is downloaded); the text ships with the package (``data/public_domain.txt``:
ten of Shakespeare's sonnets, 1609, and Lincoln's Gettysburg Address, 1863,
both in the public domain). The base is first trained in full on the sonnets
(plain PyTorch, a few seconds), then frozen; LoRA adapts it to the address.
Both LoRA runs start from the same base and the same adapter initialisation
and see the same batches; the fused run is PEFT's model converted by
:func:`fused_lora.from_peft`. With dropout 0 the two loss
curves must agree to floating-point noise. With ``use_dora`` both runs are
DoRA (PEFT's ``use_dora=True``; the fused layers hold its magnitudes too).
The demo reports the curves, the
time per step, saves the fused adapter in PEFT's format, reloads it with
``peft.PeftModel.from_pretrained`` to check it reproduces the fused model,
writes a loss plot, and samples some text.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch


@dataclass
class DemoResult:
    where: str
    steps: int
    use_dora: bool = False
    naive_losses: list = field(default_factory=list)
    fused_losses: list = field(default_factory=list)
    naive_step_s: float = 0.0
    fused_step_s: float = 0.0
    max_loss_diff: float = 0.0
    reload_max_logit_diff: float = 0.0
    adapter_dir: str = ""
    plot: str = ""
    sample: str = ""
    converted: int = 0
    skipped: dict = field(default_factory=dict)


def load_text() -> tuple[str, str]:
    """(the sonnets, the Gettysburg Address)."""
    text = resources.files("fused_lora").joinpath("data/public_domain.txt").read_text(encoding="utf-8")
    head, sep, address = text.partition("THE GETTYSBURG ADDRESS")
    return head, sep + address


class CharData:
    def __init__(self, vocab_text: str, device):
        self.chars = sorted(set(vocab_text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.device = device

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long, device=self.device)

    @staticmethod
    def batch(ids: torch.Tensor, generator: torch.Generator, batch: int, seq: int) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        return torch.stack([ids[s:s + seq] for s in starts.tolist()])

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def pretrain_base(vocab: int, ids: torch.Tensor, device, hidden: int, layers: int, steps: int, batch: int,
                  seq: int, progress=None):
    """A small Llama trained in full (plain PyTorch) on ``ids``: the frozen base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    bar = progress(total=steps, desc="pretrain base", unit="step") if progress else None
    for _ in range(steps):
        x = CharData.batch(ids, gen, batch, seq)
        opt.zero_grad(set_to_none=True)
        loss = base(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss.item():.3f}")
    if bar:
        bar.close()
    return base.eval(), loss.item()


def lora_pair(base, r: int, alpha: float, dropout: float, use_dora: bool = False):
    """PEFT's LoRA (DoRA with ``use_dora``) on every linear layer, twice from
    one initialisation; the second converted to fused layers."""
    import peft

    from .integration import from_peft

    lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                           use_dora=use_dora)
    torch.manual_seed(1)
    naive = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    fused = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    fused.load_state_dict(naive.state_dict())
    return naive.train(), fused.train(), from_peft(fused)


def run(steps: int, out_dir: Path, device: torch.device, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
        lr: float = 3e-3, pretrain_steps: int | None = None, sample_chars: int | None = None, progress=None,
        where: str = "", use_dora: bool = False) -> DemoResult:
    import peft

    from .integration import save_adapter

    on_gpu = device.type == "cuda"
    sonnets, address = load_text()
    data = CharData(sonnets + address, device)
    pre_ids, ft_ids = data.encode(sonnets), data.encode(address)
    size = dict(hidden=256, layers=4) if on_gpu else dict(hidden=64, layers=2)
    batch, seq = (32, 128) if on_gpu else (4, 64)
    if pretrain_steps is None:
        pretrain_steps = 600 if on_gpu else 150
    base, _ = pretrain_base(len(data.chars), pre_ids, device, steps=pretrain_steps, batch=16, seq=seq,
                            progress=progress, **size)
    naive, fused, report = lora_pair(base, r, alpha, dropout, use_dora)
    result = DemoResult(where=where, steps=steps, use_dora=use_dora, converted=len(report.converted),
                        skipped=report.skipped)
    optims = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
              for name, m in (("naive", naive), ("fused", fused))}
    times = {"naive": [], "fused": []}
    gen = torch.Generator().manual_seed(1234)
    kind = "DoRA" if use_dora else "LoRA"
    bar = progress(total=steps, desc=f"{kind}: PEFT and fused", unit="step") if progress else None
    for step in range(steps):
        ids = data.batch(ft_ids, gen, batch, seq)
        for name, model in (("naive", naive), ("fused", fused)):
            torch.manual_seed(step)
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optims[name].zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optims[name].step()
            if on_gpu:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            getattr(result, f"{name}_losses").append(loss.item())
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"loss {result.fused_losses[-1]:.3f}")
    if bar:
        bar.close()
    # The first steps compile (Triton) and warm caches: time the rest.
    warm = min(3, max(steps - 1, 0))
    result.naive_step_s = statistics.median(times["naive"][warm:] or times["naive"])
    result.fused_step_s = statistics.median(times["fused"][warm:] or times["fused"])
    result.max_loss_diff = max(abs(a - b) for a, b in zip(result.naive_losses, result.fused_losses))

    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = save_adapter(fused, out_dir / "adapter")
    result.adapter_dir = str(adapter_dir)
    fused.eval()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).to(device).eval()
    probe = data.batch(ft_ids, gen, 2, seq)
    with torch.no_grad():
        result.reload_max_logit_diff = (reloaded(input_ids=probe).logits
                                        - fused(input_ids=probe).logits).abs().max().item()
        prompt = data.encode("Four score and ").unsqueeze(0)
        new = sample_chars if sample_chars is not None else (200 if on_gpu else 60)
        out = fused.generate(input_ids=prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    result.sample = data.decode(out[0].tolist())
    result.plot = _plot(result, out_dir / "loss.png")
    (out_dir / "demo.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _plot(result: DemoResult, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(result.naive_losses) + 1)
    kind = "DoRA" if result.use_dora else "LoRA"
    ax.plot(steps, result.naive_losses, label=f"PEFT {kind} (naive)", lw=3, alpha=0.5)
    ax.plot(steps, result.fused_losses, label="fused_lora", lw=1.2, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(f"{kind} fine-tuning of a char-level Llama — {result.where.split(':')[0]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def report(result: DemoResult) -> str:
    on_gpu = result.where.startswith("CUDA GPU")
    lines = [f"fused-lora demo — {result.where}",
             f"{result.converted} PEFT {'DoRA' if result.use_dora else 'LoRA'} layers converted to fused layers"
             + (f"; left as PEFT: {result.skipped}" if result.skipped else ""), "",
             f"{'step':>5} {'PEFT (naive)':>14} {'fused':>10}"]
    n = len(result.naive_losses)
    for i in sorted({0, 1, 2, n // 4, n // 2, 3 * n // 4, n - 1}):
        if 0 <= i < n:
            lines.append(f"{i + 1:>5} {result.naive_losses[i]:>14.4f} {result.fused_losses[i]:>10.4f}")
    lines += ["", f"max |loss difference| over {n} steps: {result.max_loss_diff:.2e}",
              f"time per step (median after warm-up): PEFT {result.naive_step_s * 1e3:.1f} ms, "
              f"fused {result.fused_step_s * 1e3:.1f} ms"
              + ("" if on_gpu else "  [fused on the Triton CPU interpreter: not a speed measurement]"),
              f"adapter saved in PEFT format: {result.adapter_dir}",
              "reloaded with peft.PeftModel.from_pretrained: max |logit difference| "
              f"{result.reload_max_logit_diff:.2e}",
              f"loss plot: {result.plot or '(matplotlib not installed)'}", "",
              "sample (greedy, from the fused model):", result.sample]
    return "\n".join(lines)
