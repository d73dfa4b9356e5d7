"""DoRA (``fused_lora.dora_linear``): forward and every gradient against the
float64 reference (which makes the adapted weight and its norm as PEFT does),
against real PEFT's ``use_dora=True`` layer, and its properties: DoRA at its
initial magnitude is LoRA, one seed gives one mask, bad arguments give typed
errors."""

import math

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config as inductor_config
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_lora
from fused_lora import ops, reference
from fused_lora.kernels import gemm
from fused_lora.testing import parity_case
from lora_testing import DEVICE, DTYPES, TOLERANCE, assert_close, count_launches, make_params, make_x

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _magnitude(n, dtype, requires_grad=True):
    """A magnitude away from the norm (γ from 0.5 to 1.5 times a norm of about 1)."""
    return (torch.rand(n, dtype=dtype, device=DEVICE) + 0.5).requires_grad_(requires_grad)


#        lead      K    N    r    dtype  bias   p     layout        base
CASES = [
    ((1,),      17,  33,  1,   F32,  True,  0.0,  "contiguous", False),
    ((17,),     64,  48,  3,   F32,  False, 0.25, "strided",    False),
    ((123,),    45,  77,  8,   F32,  True,  0.1,  "transposed", True),
    ((7, 3),    33,  50,  20,  F32,  True,  0.3,  "permuted",   False),
    ((33,),     50,  70,  128, F32,  True,  0.0,  "contiguous", True),
    ((5, 13),   40,  29,  16,  F16,  True,  0.1,  "permuted",   False),
    ((123,),    45,  77,  64,  F16,  False, 0.0,  "strided",    True),
    # (16 bits: not r = 1 at M = 1. dz = γ ⊙ dy and drop(x) are rounded to x's dtype before the fused
    # passes, as PEFT rounds them, and there g = s·dz·B is one sum over N: where it cancels, its rounding
    # is the whole of dA: up to 20 tolerances over 15 draws, and 22 for PEFT's own formula in bf16. At
    # r = 4 the worst of 40 draws was half a tolerance.)
    ((1,),      17,  33,  4,   BF16, True,  0.2,  "contiguous", False),
    ((3, 11),   50,  70,  128, BF16, True,  0.0,  "permuted",   False),
    ((20,),     40,  30,  3,   BF16, True,  0.4,  "transposed", True),
]


@pytest.mark.parametrize("lead,k,n,r,dtype,bias,p,layout,train_base", CASES)
def test_dora_linear_matches_the_float64_reference(lead, k, n, r, dtype, bias, p, layout, train_base):
    errors = parity_case(lead, k, n, r, dtype, bias=bias, dropout_p=p, train_base=train_base, layout=layout,
                         seed=99, dora=True)
    expected = {"y", "dx", "dlora_A", "dlora_B", "dmagnitude"} | ({"dweight", "dbias"} if train_base and bias
                                                                    else {"dweight"} if train_base else set())
    assert set(errors) == expected
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("chunk", [ops.DORA_NORM_CHUNK, 123 * 7, 1])  # (one block; 7 rows a block; a row)
def test_the_norm_is_the_adapted_weights_in_fp32_block_by_block(chunk):
    for dtype in DTYPES:
        w, _, a, bb = make_params(123, 45, 17, dtype, False)
        a.requires_grad_()  # (the norm has no gradient all the same)
        # rows 0-4: W and s·B·A nearly cancel (W's rows in A's row space, B = -those rows' coordinates / s,
        # ν what is left: 1e-3 of ‖W‖ and the rounding to dtype), where ‖W‖² + 2s·B·(W Aᵀ) + s²·‖B A‖²
        # would lose it
        coords = torch.randn(5, 17, device=DEVICE, dtype=torch.float64)
        w[:5] = (coords @ a.double() + 1e-3 * torch.randn(5, 123, device=DEVICE, dtype=torch.float64) / 123 ** 0.5
                 ).to(dtype)
        bb[:5] = (-coords / 0.7).to(dtype)
        expected = torch.linalg.vector_norm(w.double() + 0.7 * (bb.double() @ a.double()), dim=1)
        norm = ops.dora_norm(w, a, bb, 0.7, chunk=chunk)
        assert norm.dtype == F32 and norm.shape == (45,) and not norm.requires_grad
        assert (expected[:5] < 0.05 * torch.linalg.vector_norm(w[:5].double(), dim=1)).all()
        # (fp32 arithmetic on the inputs as given, whatever their dtype: each row to fp32's precision)
        assert_close(norm, expected, F32, f"norm ({dtype})")
        # the nearly cancelling rows: within fp32's rounding of W + s·B A itself (the r + 2 roundings of each
        # element, on the scale of |W| + s·|B||A|, and the norm's), whatever the BLAS's order of the sums;
        # (‖W‖² + 2s·B·(W Aᵀ) + s²·‖B A‖² misses this bound 2 to 100 times over on most of these rows)
        scale = torch.linalg.vector_norm(w.double().abs() + 0.7 * bb.double().abs() @ a.double().abs(), dim=1)
        bound = (17 + 2) * 2.0**-24 * scale + 2.0**-24 * 123**0.5 * expected
        error = (norm.double() - expected).abs()
        assert (error[:5] <= bound[:5]).all(), (dtype, error[:5], bound[:5])
    empty = ops.dora_norm(torch.ones(0, 45, device=DEVICE), torch.ones(3, 45, device=DEVICE),
                          torch.ones(0, 3, device=DEVICE), 1.0)
    assert empty.shape == (0,)


#        N    K    r    W's layout
NORM_CASES = [
    (1,   1,   1,   "contiguous"),
    (17,  130, 16,  "contiguous"),   # (a K tail; one rank tile, B's rows loaded once)
    (45,  17,  65,  "transposed"),   # (W (in, out) seen transposed: fan_in_fan_out; 65: two 16-bit rank chunks)
    (33,  256, 33,  "strided"),      # (every other column of a wider buffer; 33: two fp32 chunks)
    (123, 64,  129, "contiguous"),   # (three rank chunks)
    (5,   300, 3,   "transposed"),
]


@pytest.mark.parametrize("n,k,r,layout", NORM_CASES)
def test_the_norm_kernel_reads_w_once_and_gives_the_float64_norm(n, k, r, layout):
    """The Triton pass (one read of W, ``s·B A`` made tile by tile in fp32):
    every row's norm of the inputs as given, to fp32's precision relative to
    the row's scale (‖W_n‖ + s‖(B A)_n‖: a row where they cancel keeps its
    absolute error), written into a poisoned output, bitwise the same twice,
    and the torch backend's to that precision."""
    kernels = fused_lora._triton.get()
    for dtype in DTYPES:
        if layout == "transposed":
            w = (torch.randn(k, n, dtype=dtype, device=DEVICE) / k ** 0.5).t()
        elif layout == "strided":
            w = (torch.randn(n, 2 * k, dtype=dtype, device=DEVICE) / k ** 0.5)[:, ::2]
        else:
            w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
        a = torch.randn(r, k, dtype=dtype, device=DEVICE) / k ** 0.5
        bb = torch.randn(n, r, dtype=dtype, device=DEVICE) / r ** 0.5
        with kernels.poison_outputs():
            norm = kernels.dora_norm(w, a, bb, 0.7)
        ba = 0.7 * (bb.double() @ a.double())
        expected = torch.linalg.vector_norm(w.double() + ba, dim=1)
        scale = torch.linalg.vector_norm(w.double(), dim=1) + torch.linalg.vector_norm(ba, dim=1)
        assert norm.dtype == F32 and norm.shape == (n,)
        assert ((norm.double() - expected).abs() <= 4e-6 * scale).all(), (dtype, (norm.double() - expected).abs().max())
        with kernels.poison_outputs():
            assert torch.equal(kernels.dora_norm(w, a, bb, 0.7), norm)
        assert ((ops.dora_norm(w, a, bb, 0.7).double() - norm.double()).abs() <= 4e-6 * scale).all()
    assert kernels.dora_norm(torch.ones(0, 45, device=DEVICE), torch.ones(3, 45, device=DEVICE),
                             torch.ones(0, 3, device=DEVICE), 1.0).shape == (0,)


def test_the_norm_op_passes_opcheck_and_dora_linear_launches_the_kernel_once(monkeypatch):
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    torch.library.opcheck(torch.ops.fused_lora.dora_norm.default, (w, a, bb, 2.0))
    from fused_lora.kernels import dora

    launches = count_launches(monkeypatch, dora, "dora_norm_kernel")
    x = make_x((3, 40), F32)
    fused_lora.dora_linear(x, w, a, bb, _magnitude(24, F32), b, scaling=2.0, backend="triton")
    assert len(launches) == 1
    fused_lora.dora_linear(x, w, a, bb, _magnitude(24, F32), b, scaling=2.0, backend="torch")
    assert len(launches) == 1  # (the torch backend: ops.dora_norm, in PyTorch)


def test_at_its_initial_magnitude_dora_is_lora():
    # (PEFT initialises m to the norm: γ = 1, and the DoRA layer starts as its LoRA layer, dropout included)
    x = make_x((4, 9, 40), F32)
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    m = ops.dora_norm(w, a, bb, 2.0)
    for p in (0.0, 0.3):
        dora = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=p, seed=5)
        lora = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=5)
        assert_close(dora, lora.double(), F32, f"p={p}")


def test_one_seed_gives_one_mask_bitwise_and_none_draws_it_as_the_reference_does():
    x = make_x((31, 40), F32).requires_grad_()
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    a.requires_grad_()
    m = _magnitude(24, F32)
    dy = torch.randn(31, 24, device=DEVICE)

    def run(seed):
        y = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.3, seed=seed)
        return (y, *torch.autograd.grad(y, (x, a, m), dy))

    first, second = run(17), run(17)
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    assert not torch.equal(first[0], run(18)[0])
    torch.manual_seed(4)
    drawn = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.3)
    torch.manual_seed(4)
    expected = reference.dora_linear(x.double(), w.double(), a.double(), bb.double(), m.double(), b.double(),
                                     scaling=2.0, dropout_p=0.3)
    assert_close(drawn, expected.detach(), F32, "seed=None")


def test_without_gradients_the_output_is_the_same_bit_for_bit():
    x = make_x((2, 5, 40), F32)
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    m = _magnitude(24, F32)
    with_grad = fused_lora.dora_linear(x, w, a.requires_grad_(), bb, m, b, scaling=2.0, dropout_p=0.2, seed=3)
    with torch.inference_mode():
        without = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.2, seed=3)
    assert torch.equal(with_grad.detach(), without)


def test_the_torch_backend_is_the_reference_and_launches_no_kernel(monkeypatch):
    x = make_x((9, 40), F32)
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    m = _magnitude(24, F32, requires_grad=False)
    launches = count_launches(monkeypatch, gemm, "lora_gemm_kernel")
    y = fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.2, seed=3, backend="torch")
    assert torch.equal(y, reference.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.2, seed=3))
    assert not launches
    fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.2, seed=3, backend="triton")
    assert launches  # (the counter counts)
    x64 = x.double()
    y64 = fused_lora.dora_linear(x64, *(t.double() for t in (w, a, bb, m, b)), scaling=2.0)  # (float64: torch)
    assert_close(y64, reference.dora_linear(x64, *(t.double() for t in (w, a, bb, m, b)), scaling=2.0), torch.float64)


def test_autocast_casts_every_tensor_as_for_f_linear():
    x = make_x((3, 9, 40), F32).requires_grad_()
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    m = _magnitude(24, F32)
    with torch.autocast(DEVICE.type, dtype=F16):
        y = fused_lora.dora_linear(x, w, a.requires_grad_(), bb, m, b, scaling=2.0)
    assert y.dtype == F16
    gx, gm = torch.autograd.grad(y, (x, m), torch.ones_like(y))
    assert gx.dtype == gm.dtype == F32
    cast = [t.detach().to(F16) for t in (x, w, a, bb, m, b)]
    assert torch.equal(y, fused_lora.dora_linear(*cast[:5], cast[5], scaling=2.0))


def test_no_rows():
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    m = _magnitude(24, F32)
    y = fused_lora.dora_linear(x, w, a, bb, m, b, dropout_p=0.1)
    assert y.shape == (0, 24)
    (gm,) = torch.autograd.grad(y.sum(), (m,))
    assert torch.equal(gm, torch.zeros_like(gm))


def test_bad_magnitudes_are_refused_by_name():
    x = make_x((5, 40), F32)
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    m = _magnitude(24, F32, requires_grad=False)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor, got list"):
        fused_lora.dora_linear(x, w, a, bb, [1.0] * 24, b)
    with pytest.raises(TypeError, match="magnitude must be a floating-point tensor, got dtype torch.int64"):
        fused_lora.dora_linear(x, w, a, bb, torch.ones(24, dtype=torch.int64, device=DEVICE), b)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features=24,\) to match weight "
                                         r"\(24, 40\), got \(40,\)"):
        fused_lora.dora_linear(x, w, a, bb, torch.ones(40, device=DEVICE), b)
    with pytest.raises(ValueError, match=r"got \(1, 24\)"):
        fused_lora.dora_linear(x, w, a, bb, m.view(1, 24), b)
    with pytest.raises(TypeError, match=r"magnitude has dtype torch.float16 but x has torch.float32"):
        fused_lora.dora_linear(x, w, a, bb, m.half(), b)
    with pytest.raises(ValueError, match="magnitude is on meta but x is on"):
        fused_lora.dora_linear(x, w, a, bb, m.to("meta"), b)
    # the other arguments as lora_linear's, checked before anything runs
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=40\)"):
        fused_lora.dora_linear(x[:, :30], w, a, bb, m, b)
    with pytest.raises(ValueError, match="dropout_p"):
        fused_lora.dora_linear(x, w, a, bb, m, b, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lora.dora_linear(x, w, a, bb, m, b, backend="cuda")
    for backend in ("torch", "triton"):  # (the torch backend checks as much)
        with pytest.raises(ValueError, match="magnitude must have shape"):
            fused_lora.dora_linear(x, w, a, bb, m[:3], b, backend=backend)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_peft_dora_layer_gives_the_same_output_and_gradients(p):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(45, 29)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=5, lora_alpha=10, target_modules=["proj"], use_dora=True,
                                                       lora_dropout=p)).to(DEVICE)
    layer = model.base_model.model.proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # (off PEFT's initial point, where B = 0 and m = the norm: every term exercised)
        nn.init.normal_(lora_A, std=0.2)
        nn.init.normal_(lora_B, std=0.2)
        magnitude.uniform_(0.5, 1.5)
    seed = 11

    class KernelsMask(nn.Module):  # (PEFT's dropout with the mask the kernels draw for `seed`)
        def forward(self, x):
            keep = fused_lora.dropout_mask(seed, (x.shape[:-1].numel(), x.shape[-1]), p, device=x.device)
            return x * keep.view(x.shape) / (1.0 - p)

    if p:
        layer.lora_dropout["default"] = KernelsMask()
    model.train()
    x = torch.randn(3, 7, 45, device=DEVICE, requires_grad=True)
    params = (x, lora_A, lora_B, magnitude)
    y_peft = layer(x)
    dy = torch.randn_like(y_peft)
    g_peft = torch.autograd.grad(y_peft, params, dy)
    y = fused_lora.dora_linear(x, layer.base_layer.weight, lora_A, lora_B, magnitude, layer.base_layer.bias,
                               scaling=layer.scaling["default"], dropout_p=p, seed=seed, backend="triton")
    grads = torch.autograd.grad(y, params, dy)
    scale = max(y_peft.abs().max().item(), 1.0)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5 * scale)
    for name, g, g_p in zip(("x", "lora_A", "lora_B", "magnitude"), grads, g_peft):
        torch.testing.assert_close(g, g_p, rtol=1e-5, atol=1e-5 * max(g_p.abs().max().item(), 1.0),
                                   msg=lambda msg: f"d{name}: {msg}")
    assert math.isclose(layer.scaling["default"], 2.0)


@pytest.mark.parametrize("seed", [None, 7])
def test_compile_fullgraph_is_one_frame_with_eagers_results(seed):
    """Inductor, dropout on, the mask drawn (eager's generator:
    ``fallback_random``) or the seed's (an op: inductor, fusing its Philox
    rounds, compiled for minutes): one graph, eager's output and gradients."""
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    a.requires_grad_()
    m = _magnitude(24, F32)
    x = make_x((2, 9, 40), F32).requires_grad_()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def step(x):
        return fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.2, seed=seed).square().sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    results = []
    for fn in (compiled, step):
        torch.manual_seed(6)
        with inductor_config.patch(fallback_random=True):
            loss = fn(x)
        results.append((loss, *torch.autograd.grad(loss, (x, a, m))))
    assert counter.frame_count == 1
    for name, got, expected in zip(("loss", "dx", "dlora_A", "dmagnitude"), *results):
        assert_close(got, expected.double(), F32, f"compiled vs eager: {name}")


def test_activation_checkpointing_draws_the_same_mask_again():
    # (seed=None: torch's generator, whose state checkpointing restores for the recomputation)
    w, b, a, bb = make_params(40, 24, 8, F32, True)
    a.requires_grad_()
    m = _magnitude(24, F32)
    x = make_x((2, 9, 40), F32).requires_grad_()

    def layer(x):
        return fused_lora.dora_linear(x, w, a, bb, m, b, scaling=2.0, dropout_p=0.3)

    results = []
    for run in (layer, lambda x: checkpoint(layer, x, use_reentrant=False)):
        torch.manual_seed(8)
        results.append(torch.autograd.grad(run(x).square().sum(), (x, a, m)))
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)
