"""pytest-benchmark over the harness's providers and modes (``pytest bench/``).

On a GPU this times the ``headline`` cases (M=8192, 4096 -> 4096, r=16, bf16,
dropout 0 and 0.1); without one, the ``smoke`` cases run once each through the
interpreter (timing disabled, see conftest.py). ``fused-lora bench`` is the
full harness (tables, JSON, plot); this suite is for pytest-benchmark's
comparison tooling (``--benchmark-compare``).
"""

import functools

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
    _time(benchmark, harness.make_step(mode, forward, inputs.leaves(provider), dy))


def _time(benchmark, step):
    """pytest-benchmark over ``step`` (after a warm-up call: Triton compiles
    on the first), synchronised on a GPU; its output checked finite."""
    step()
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


# Layer against layer, as a user swaps them: PEFT's LoRA Linear (get_peft_model, training mode) as it is,
# and the same model after fused_lora.from_peft (a LoRALinear sharing PEFT's tensors), each step run eagerly
# and synchronised (pytest-benchmark): at small M the host's time (PEFT's module Python against
# fused_lora's), at large M the GPU's. On a GPU: 16 and 4096 tokens of a 4096 -> 4096 bf16 layer, rank 16;
# without one, a tiny smoke shape, forward+backward alone. The fused model's output is checked against PEFT's
# (dropout off) first.
LAYER = dict(k=4096, n=4096, r=16, dtype=torch.bfloat16, tokens=(16, 4096), modes=harness.MODES) if ON_GPU else dict(
    k=48, n=40, r=8, dtype=torch.float32, tokens=(37,), modes=("forward+backward",))


@pytest.mark.parametrize("mode", LAYER["modes"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("m", LAYER["tokens"])
@pytest.mark.parametrize("provider", ["fused", "peft"])
def test_peft_lora_layer(benchmark, provider, m, dropout, mode):
    import fused_lora
    from fused_lora.testing import TOLERANCE

    peft = pytest.importorskip("peft")
    k, n, r, dtype = LAYER["k"], LAYER["n"], LAYER["r"], LAYER["dtype"]
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, n)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout,
                                                init_lora_weights=False),
                                autocast_adapter_dtype=False).to(DEVICE, dtype)
    layer = model.base_model.model[0]
    x = (torch.randn(m, k, device=DEVICE) / 2).to(dtype).requires_grad_()
    if provider == "fused":
        with torch.no_grad():
            expected = model.eval()(x).double()
        report = fused_lora.from_peft(model)
        assert report.converted == ["base_model.model.0"], report
        with torch.no_grad():
            got = model(x).double()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
        assert isinstance(model.base_model.model[0], fused_lora.LoRALinear)
    model.train()
    leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    _time(benchmark, harness.make_step(mode, lambda: model(x), leaves, dy))


# Several adapters on one base, each row through its own (fused_lora.multi_lora_linear), against PEFT's
# mixed batch (the base over every row, then each adapter over its own rows in turn). On a GPU: 4096
# tokens of a 4096 -> 4096 bf16 layer, 4 adapters of rank 16, a quarter of the rows each (one in eight of
# no adapter's); without one, a tiny smoke shape.
MULTI = dict(m=4096, k=4096, n=4096, ranks=(16, 16, 16, 16), dtype=torch.bfloat16) if ON_GPU else dict(
    m=37, k=48, n=40, ranks=(4, 8, 4), dtype=torch.float32)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("provider", ["fused", "per_adapter"])
def test_multi_adapter(benchmark, provider, dropout, mode):
    import fused_lora

    m, k, n, ranks, dtype = MULTI["m"], MULTI["k"], MULTI["n"], MULTI["ranks"], MULTI["dtype"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(m, k, device=DEVICE, generator=gen) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, device=DEVICE, generator=gen) / k ** 0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
    lora_As = [(torch.randn(r, k, device=DEVICE, generator=gen) / k ** 0.5).to(dtype).requires_grad_()
               for r in ranks]
    lora_Bs = [(torch.randn(n, r, device=DEVICE, generator=gen) / r ** 0.5).to(dtype).requires_grad_()
               for r in ranks]
    ids = torch.randint(0, len(ranks), (m,), device=DEVICE, generator=gen)
    ids[::8] = -1
    scalings = [2.0] * len(ranks)
    if provider == "fused":
        def forward():
            return fused_lora.multi_lora_linear(x, weight, lora_As, lora_Bs, ids, bias, scaling=scalings,
                                                dropout_p=dropout)
    else:
        def forward():
            return harness.per_adapter_lora(x, weight, bias, lora_As, lora_Bs, ids, scalings, dropout)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    _time(benchmark, harness.make_step(mode, forward, [x, *lora_As, *lora_Bs], dy))


# Serving several adapters from one base through PEFT's own model: a batch that mixes them
# (model(x, adapter_names=[...]), inference), PEFT's model as it is against the same model after
# fused_lora.from_peft (one MultiLoRALinear a layer: one fused set of launches for the whole mix, where
# PEFT runs the base, then each adapter on its samples in turn). On a GPU: 16 samples of 256 tokens through
# a 4096 -> 4096 bf16 layer, 4 adapters of rank 16 (one sample in eight the base's); without one, a tiny
# smoke shape. The fused model's output is checked against PEFT's before it is timed. ``dora``: every adapter
# DoRA (its magnitudes off the norms), which PEFT's mixed batch refuses: PEFT serves them a pass an adapter
# (set_adapter, then its samples; the base's under disable_adapter), the fused model one batch as before.
SERVING = dict(samples=16, tokens=256, k=4096, n=4096, ranks=(16, 16, 16, 16), dtype=torch.bfloat16) if ON_GPU \
    else dict(samples=5, tokens=3, k=48, n=40, ranks=(4, 8, 4), dtype=torch.float32)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("provider", ["fused", "peft"])
def test_peft_serving(benchmark, provider, dora):
    import fused_lora
    from fused_lora.testing import TOLERANCE

    peft = pytest.importorskip("peft")
    samples, tokens, k, n, ranks, dtype = (SERVING[key] for key in ("samples", "tokens", "k", "n", "ranks", "dtype"))
    torch.manual_seed(0)
    model = None
    for i, r in enumerate(ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False,
                                 use_dora=dora)
        if model is None:
            model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, n)), config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    model = model.to(DEVICE, dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    names = ["__base__" if s % 8 == 7 else f"a{s % len(ranks)}" for s in range(samples)]
    x = (torch.randn(samples, tokens, k, device=DEVICE) / 2).to(dtype)
    groups = {a: torch.tensor([s for s, b in enumerate(names) if b == a], device=DEVICE) for a in dict.fromkeys(names)}

    def mixed():
        with torch.no_grad():
            return model(x, adapter_names=names)

    def per_adapter():  # (PEFT's way with DoRA adapters)
        out = torch.empty(samples, tokens, n, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            for adapter, rows in groups.items():
                if adapter == "__base__":
                    with model.disable_adapter():
                        out[rows] = model(x[rows])
                else:
                    model.set_adapter(adapter)
                    out[rows] = model(x[rows])
        return out

    peft_forward = per_adapter if dora else mixed
    if provider == "fused":
        expected = peft_forward().double()
        model.set_adapter("a0")
        report = fused_lora.from_peft(model)
        assert report.converted == ["base_model.model.0"], report
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(mixed().double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    _time(benchmark, mixed if provider == "fused" else peft_forward)


# DoRA (fused_lora.dora_linear) against PEFT's own DoRA layer (use_dora=True, every tensor in the base's
# dtype). On a GPU: 4096 tokens of a 4096 -> 4096 bf16 layer, rank 16; without one, a tiny smoke shape.
DORA = dict(m=4096, k=4096, n=4096, r=16, dtype=torch.bfloat16) if ON_GPU else dict(
    m=37, k=48, n=40, r=8, dtype=torch.float32)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("provider", ["fused", "peft"])
def test_dora(benchmark, provider, dropout, mode):
    import fused_lora

    peft = pytest.importorskip("peft")
    m, k, n, r, dtype = DORA["m"], DORA["k"], DORA["n"], DORA["r"], DORA["dtype"]
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, n)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True,
                                                lora_dropout=dropout),
                                autocast_adapter_dtype=False).to(DEVICE, dtype).train()
    layer = model.base_model.model[0]
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # (B off PEFT's zeros: timed as in training)
        torch.nn.init.normal_(lora_B, std=r ** -0.5)
    x = (torch.randn(m, k, device=DEVICE) / 2).to(dtype).requires_grad_()
    if provider == "fused":
        weight, bias, scaling = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]

        def forward():
            return fused_lora.dora_linear(x, weight, lora_A, lora_B, magnitude, bias, scaling=scaling,
                                          dropout_p=dropout)
    else:
        def forward():
            return layer(x)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    _time(benchmark, harness.make_step(mode, forward, [x, lora_A, lora_B, magnitude], dy))


@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("provider", ["fused", "torch_fp32", "peft"])
def test_dora_norm(benchmark, provider, r):
    """DoRA's ν = ‖W + s·B A‖ alone, each step of a DoRA layer pays it: the
    Triton pass (one read of W), ``ops.dora_norm`` (W + s·B A made in fp32,
    a block of rows at a time) and PEFT's (``get_weight_norm`` of its
    ``B(A(I))`` product, in the weight's dtype). The norm's share of a step is
    largest at decode sizes, where the GEMM reads W once too."""
    import fused_lora
    from fused_lora import ops

    peft = pytest.importorskip("peft")
    k, n, dtype = DORA["k"], DORA["n"], DORA["dtype"]
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, n)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True),
                                autocast_adapter_dtype=False).to(DEVICE, dtype)
    layer = model.base_model.model[0]
    weight, scaling = layer.base_layer.weight, layer.scaling["default"]
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.nn.init.normal_(lora_B, std=r ** -0.5)
    dora = layer.lora_magnitude_vector["default"]
    if provider == "fused":
        step = functools.partial(fused_lora._triton.get().dora_norm, weight, lora_A.detach(), lora_B.detach(),
                                 scaling)
    elif provider == "torch_fp32":
        step = functools.partial(ops.dora_norm, weight, lora_A, lora_B, scaling)
    else:
        def step():
            with torch.no_grad():
                return dora.get_weight_norm(weight, dora.get_lora_weight(layer.lora_A["default"],
                                                                         layer.lora_B["default"]), scaling)
    expected = torch.linalg.vector_norm(weight.double() + scaling * (lora_B.double() @ lora_A.double()), dim=1)
    got = step().double()
    # (the same norm: fp32 arithmetic on the inputs as given for ours; PEFT's rounded to the weight's dtype)
    rtol = 1e-5 if provider != "peft" or dtype == torch.float32 else 1e-2
    assert ((got - expected).abs() <= rtol * expected).all(), (got - expected).abs().max()
    _time(benchmark, step)


# A quantized base (lora_linear's weight_scale): int8, dequantised tile by tile in the GEMMs' K loops,
# and NF4 (QLoRA's 4 bits, groups of 64), decoded in the K loops at small M and made whole once a pass
# at large M (dispatch.plan's dequantize_base), against the same op on the 16-bit weight they dequantise
# to (the K loop's extra work; at decode sizes, where the GEMM streams W, a half or a quarter of its
# bytes), and against dequantising the whole int8 weight each call in PyTorch first (what a base kept
# quantized costs without the fused dequantisation). On a GPU: a 4096 -> 4096 bf16 layer, rank 16, 16
# and 4096 tokens; without one, a tiny smoke shape.
QUANT = dict(k=4096, n=4096, r=16, dtype=torch.bfloat16, tokens=(16, 4096)) if ON_GPU else dict(
    k=64, n=40, r=8, dtype=torch.float32, tokens=(37,))


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("m", QUANT["tokens"])
@pytest.mark.parametrize("provider", ["fused_int8", "fused_nf4", "fused_16bit", "dequantize_then_fused"])
def test_quantized_base(benchmark, provider, m, mode):
    import fused_lora

    k, n, r, dtype = QUANT["k"], QUANT["n"], QUANT["r"], QUANT["dtype"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(m, k, device=DEVICE, generator=gen) / 2).to(dtype).requires_grad_()
    w = torch.randn(n, k, device=DEVICE, generator=gen) / k ** 0.5
    q, scale = fused_lora.quantize_int8(w)
    packed, absmax = fused_lora.quantize_nf4(w, 64)
    bias = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
    lora_A = (torch.randn(r, k, device=DEVICE, generator=gen) / k ** 0.5).to(dtype).requires_grad_()
    lora_B = (torch.randn(n, r, device=DEVICE, generator=gen) / r ** 0.5).to(dtype).requires_grad_()
    deq = fused_lora.dequantize_int8(q, scale, dtype)
    if provider == "fused_int8":
        def forward():
            return fused_lora.lora_linear(x, q, lora_A, lora_B, bias, scaling=2.0, weight_scale=scale)
    elif provider == "fused_nf4":
        deq = fused_lora.dequantize_nf4(packed, absmax, dtype)

        def forward():
            return fused_lora.lora_linear(x, packed, lora_A, lora_B, bias, scaling=2.0, weight_scale=absmax)
    elif provider == "fused_16bit":
        def forward():
            return fused_lora.lora_linear(x, deq, lora_A, lora_B, bias, scaling=2.0)
    else:
        def forward():
            return fused_lora.lora_linear(x, fused_lora.dequantize_int8(q, scale, dtype), lora_A, lora_B, bias,
                                          scaling=2.0)
    with torch.no_grad():  # (each against the 16-bit op on its own base: the same output, to rounding)
        want = fused_lora.lora_linear(x, deq, lora_A, lora_B, bias, scaling=2.0).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (forward().float() - want).abs().max() <= tol * want.abs().max()
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    _time(benchmark, harness.make_step(mode, forward, [x, lora_A, lora_B], dy))


def _saved_bytes(step) -> int:
    """Bytes of the distinct tensors autograd saves for the backward in one
    call of ``step`` (a forward): what a training step holds for it (the
    weights among them, resident anyway)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


# QDoRA (DoRA on an int8 or NF4 base) with dropout, forward+backward: dora_linear's correction GEMM,
# (x - drop(x)) Ŵᵀ, on the fused GEMMs reading the quantized base, against the same op on Ŵ made whole in
# the compute dtype each call (PEFT's way: F.linear on Ŵ, which autograd keeps for the backward). Besides
# the time, extra_info holds the bytes saved for the backward (any machine) and, on a GPU, the step's peak
# memory above what it started with. On a GPU: 4096 tokens of a 4096 -> 4096 bf16 layer, rank 16.
@pytest.mark.parametrize("base", ["int8", "nf4"])
@pytest.mark.parametrize("provider", ["fused", "dequantized"])
def test_qdora_dropout(benchmark, provider, base):
    import fused_lora

    k, n, r, dtype, m = QUANT["k"], QUANT["n"], QUANT["r"], QUANT["dtype"], QUANT["tokens"][-1]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(m, k, device=DEVICE, generator=gen) / 2).to(dtype).requires_grad_()
    w = torch.randn(n, k, device=DEVICE, generator=gen) / k ** 0.5
    weight, scale = fused_lora.quantize_int8(w) if base == "int8" else fused_lora.quantize_nf4(w, 64)
    dequantize = fused_lora.dequantize_int8 if base == "int8" else fused_lora.dequantize_nf4
    bias = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
    lora_A = (torch.randn(r, k, device=DEVICE, generator=gen) / k ** 0.5).to(dtype).requires_grad_()
    lora_B = (torch.randn(n, r, device=DEVICE, generator=gen) / r ** 0.5).to(dtype).requires_grad_()
    magnitude = (torch.rand(n, device=DEVICE, generator=gen) + 0.5).to(dtype).requires_grad_()

    def forward():
        if provider == "fused":
            return fused_lora.dora_linear(x, weight, lora_A, lora_B, magnitude, bias, scaling=2.0, dropout_p=0.1,
                                          seed=7, weight_scale=scale)
        return fused_lora.dora_linear(x, dequantize(weight, scale, dtype), lora_A, lora_B, magnitude, bias,
                                      scaling=2.0, dropout_p=0.1, seed=7)

    with torch.no_grad():  # (the same op on the same Ŵ: the same output, to rounding)
        want, got = fused_lora.reference.dora_linear(
            x.double(), dequantize(weight, scale, torch.float64), lora_A.double(), lora_B.double(),
            magnitude.double(), bias.double(), scaling=2.0, dropout_p=0.1, seed=7), forward().double()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert (got - want).abs().max() <= tol * want.abs().max()
    benchmark.extra_info["saved_bytes"] = _saved_bytes(forward)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    step = harness.make_step("forward+backward", forward, [x, lora_A, lora_B, magnitude], dy)
    if ON_GPU:
        step()  # (compiled first: Triton's workspace out of the peak)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_bytes_above_start"] = torch.cuda.max_memory_allocated() - start
    _time(benchmark, step)
