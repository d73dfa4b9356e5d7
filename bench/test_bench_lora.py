"""pytest-benchmark over the harness's providers and modes (``pytest bench/``).

On a GPU this times the ``headline`` cases (M=8192, 4096 -> 4096, r=16, bf16,
dropout 0 and 0.1); without one, the ``smoke`` cases run once each through the
interpreter (timing disabled, see conftest.py). ``fused-lora bench`` is the
full harness (tables, JSON, plot); this suite is for pytest-benchmark's
comparison tooling (``--benchmark-compare``).
"""

import pytest
import torch

from fused_lora import benchmark as harness

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CASES = harness.presets()["headline" if ON_GPU else "smoke"].cases
PROVIDERS = [p for p in harness.PROVIDERS if ON_GPU or p != "naive_compiled"]


# (case, provider) pairs where the provider has a step (unsloth_style has no dropout)
PAIRS = [pytest.param(case, provider, id=f"{case.label().replace(' ', '_')}-{provider}")
         for case in CASES for provider in PROVIDERS if not harness.not_applicable(provider, case.dropout)]


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize(("case", "provider"), PAIRS)
def test_lora(benchmark, case, provider, mode):
    inputs = harness.Inputs.make(case, DEVICE)
    forward = harness.make_forward(provider, inputs)
    assert forward is not None
    dy = torch.randn(case.m, case.n, device=DEVICE, dtype=case.torch_dtype)
    step = harness.make_step(mode, forward, inputs.leaves(provider), dy)
    step()  # warm-up: Triton compiles on the first call
    if ON_GPU:
        torch.cuda.synchronize()

    def run():
        out = step()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    first = out if isinstance(out, torch.Tensor) else out[0]
    assert torch.isfinite(first).all()
