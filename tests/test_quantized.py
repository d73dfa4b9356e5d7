"""A quantized frozen base (int8, one scale per output feature; NF4's own
in test_nf4.py, the double backward and opcheck here for both): the format
(``quantize_int8``/``dequantize_int8``), the GEMM's dequantising loads
(bit for bit the GEMM on the dequantised weight, in every form it runs),
the op forward and backward against the float64 reference on the
dequantised base, several adapters on one int8 base, torch.compile and
opcheck, and the typed errors."""

import contextlib
import dataclasses

import pytest
import torch
import torch._dynamo.testing

import fused_lora
from fused_lora import dispatch, ops, quant, reference
from fused_lora.kernels import configs, gemm
from fused_lora.kernels import dora as dora_kernels
from fused_lora.kernels.common import poison_outputs
from fused_lora.testing import parity_case
from lora_testing import (DEVICE, DTYPES, TOLERANCE, assert_close, assert_same_sums, make_params, make_x,
                          opcheck_lora_ops)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# ----------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16, BF16, torch.float64], ids=str)
@pytest.mark.parametrize("n, k", [(1, 1), (17, 123), (64, 33)])
def test_quantize_int8_is_symmetric_per_output_feature(dtype, n, k):
    w = (torch.randn(n, k, device=DEVICE) * torch.rand(n, 1, device=DEVICE) * 3).to(dtype)
    w[n // 2] = 0  # a row of zeros: scale 0, q 0
    q, scale = fused_lora.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (n, k) and scale.dtype == F32 and scale.shape == (n,)
    assert int(q.abs().max()) <= 127
    w64 = w.double()
    assert torch.equal(scale.double(), (w64.abs().amax(1) / 127).float().double())
    nonzero = scale > 0
    assert torch.equal(q[nonzero].abs().amax(1), torch.full_like(q[nonzero].abs().amax(1), 127))
    assert scale[n // 2] == 0 and not q[n // 2].any()
    # |Ŵ - W| <= scale/2, elementwise, and the fp32 rounding of W/scale (up to 127 ulps of 1)
    deq = fused_lora.dequantize_int8(q, scale, torch.float64)
    bound = scale.double()[:, None] * (0.5 + 127 * 2.0**-23)
    assert bool(((deq - w64).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_dequantize_int8_rounds_the_fp32_product_once(dtype):
    q = torch.randint(-127, 128, (19, 40), dtype=torch.int8, device=DEVICE)
    for scale in (torch.rand(19, device=DEVICE), torch.rand(19, device=DEVICE, dtype=torch.float64),
                  torch.rand(19, device=DEVICE).to(BF16)):
        want = (q.float() * scale.float()[:, None]).to(dtype)
        assert torch.equal(fused_lora.dequantize_int8(q, scale, dtype), want)
    s64 = torch.rand(19, device=DEVICE, dtype=torch.float64)
    assert torch.equal(fused_lora.dequantize_int8(q, s64, torch.float64), q.double() * s64[:, None])


def test_quantize_and_dequantize_refuse_what_they_cannot_take():
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        fused_lora.quantize_int8(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"2-D .*\(5,\)"):
        fused_lora.quantize_int8(torch.ones(5))
    w = torch.randn(3, 4)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        fused_lora.quantize_int8(w)
    q = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="q must be a 2-D int8"):
        fused_lora.dequantize_int8(q.float(), torch.ones(3), F32)
    with pytest.raises(ValueError, match=r"scale must have shape \(out_features=3,\) .* got \(4,\)"):
        fused_lora.dequantize_int8(q, torch.ones(4), F32)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        fused_lora.dequantize_int8(q, torch.ones(3), torch.int8)


# ----------------------------------------------------------------------------
# The GEMM's dequantising loads
# ----------------------------------------------------------------------------

def _quantized(n, k, scale_dtype=F32):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scale = (torch.rand(n, device=DEVICE) + 0.5) / (127 * k ** 0.5)
    return q, scale.to(scale_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("low_rank", ["none", "in_loop", "precomputed"])
@pytest.mark.parametrize("m, n, k, split_k", [(1, 33, 70, 1), (17, 75, 123, 1), (5, 40, 96, 3), (123, 19, 45, 2)])
def test_the_gemm_on_an_int8_b_is_the_gemm_on_its_dequantised_values(dtype, low_rank, m, n, k, split_k):
    """Forward (b = qᵀ, scaled by column) and dx (b = q, by row): the same
    sums as the GEMM reading Ŵ itself (``assert_same_sums``: the same bits on
    the CPU), with a K tail, split-K and each
    low-rank form (the dequantisation sits in the K loop, before the dot);
    nothing left unwritten (NaN-poisoned outputs)."""
    r = 5
    cfg = dataclasses.replace(configs.gemm_config(m, n, k, r, torch.tensor([], dtype=dtype).element_size(),
                                                  low_rank == "in_loop", True), split_k=split_k)
    for dim in (1, 0):  # the forward's Wᵀ; dx's W
        out, inner = (n, k) if dim == 1 else (k, n)
        q, scale = _quantized(out, inner, F16 if dim == 0 else F32)  # (any floating scale dtype)
        deq = fused_lora.dequantize_int8(q, scale, dtype)
        b_q, b_f = (q.t(), deq.t()) if dim == 1 else (q, deq)
        a = torch.randn(m, b_q.shape[0], device=DEVICE).to(dtype)
        v = torch.randn(r, b_q.shape[1], device=DEVICE).to(dtype)
        lr = {"none": {}, "in_loop": dict(shrink=torch.randn(b_q.shape[0], r, device=DEVICE).to(dtype), v=v),
              "precomputed": dict(u=torch.randn(m, r, device=DEVICE), v=v)}[low_rank]
        with poison_outputs():
            c_q, xa_q = gemm.lora_gemm(a, b_q, b_scale=scale, b_scale_dim=dim, lr_scale=0.5, config=cfg,
                                       out_dtype=dtype, **lr)
            c_f, xa_f = gemm.lora_gemm(a, b_f, lr_scale=0.5, config=cfg, out_dtype=dtype, **lr)
        assert_same_sums(c_q, c_f, b_q.shape[0] + r, f"b_scale_dim={dim}")
        if low_rank == "in_loop":
            assert torch.equal(xa_q, xa_f)
        want = a.double() @ b_f.double()
        if lr:
            left = lr["u"].double() if "u" in lr else a.double() @ lr["shrink"].double()
            want = want + 0.5 * left @ v.double()
        assert_close(c_q, want, dtype, f"b_scale_dim={dim}")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("persistent", [False, True])
def test_the_int8_tiles_load_through_tma_and_on_the_persistent_grid(monkeypatch, dtype, persistent):
    if not gemm.tma_available():
        pytest.skip("this Triton has no host-side tensor descriptors")
    monkeypatch.setattr(gemm, "persistent_programs", lambda *a, **k: 3)
    k, n = 80, 48  # (int8 rows of 16 bytes, 16 elements: TMA under every interpreter)
    m = 70
    cfg = dataclasses.replace(configs.gemm_config(m, n, k, 8, 2, True, True), split_k=1)
    used = []
    real = gemm.tma_descriptors
    monkeypatch.setattr(gemm, "tma_descriptors", lambda *a: used.append(real(*a)) or used[-1])
    for dim in (1, 0):
        out, inner = (n, k) if dim == 1 else (k, n)
        q, scale = _quantized(out, inner)
        deq = fused_lora.dequantize_int8(q, scale, dtype)
        b_q, b_f = (q.t(), deq.t()) if dim == 1 else (q, deq)
        a = torch.randn(m, b_q.shape[0], device=DEVICE).to(dtype)
        lr = dict(shrink=torch.randn(b_q.shape[0], 8, device=DEVICE).to(dtype),
                  v=torch.randn(8, b_q.shape[1], device=DEVICE).to(dtype))
        with poison_outputs():
            c_q, _ = gemm.lora_gemm(a, b_q, b_scale=scale, b_scale_dim=dim, config=cfg, out_dtype=dtype, tma=True,
                                    persistent=persistent, **lr)
            c_f, _ = gemm.lora_gemm(a, b_f, config=cfg, out_dtype=dtype, tma=True, persistent=persistent, **lr)
        assert torch.equal(c_q, c_f)
    assert len(used) == 4 and all(d is not None for d in used)  # (int8's rows are 16-byte aligned here too)


def test_the_gemm_contract_for_an_int8_b():
    cfg = configs.gemm_config(4, 8, 16, 1, 4, False, True)
    a = torch.randn(4, 16, device=DEVICE)
    q, scale = _quantized(8, 16)
    with pytest.raises(ValueError, match="an int8 b needs its b_scale"):
        gemm.lora_gemm(a, q.t(), config=cfg, out_dtype=F32)
    with pytest.raises(ValueError, match=r"one floating-point value per column .* b_scale torch.float32 \(8,\)"):
        gemm.lora_gemm(a, q.t().float(), b_scale=scale, config=cfg, out_dtype=F32)  # (not int8)
    with pytest.raises(ValueError, match=r"per row of it .* b_scale_dim 0"):
        gemm.lora_gemm(a, q.t(), b_scale=scale, b_scale_dim=0, config=cfg, out_dtype=F32)  # (16 rows)


# ----------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------

#        lead      K    N    r    dtype  bias   p     layout        strategy
CASES = [
    ((1,),      17,  33,  1,   F32,  True,  0.0,  "contiguous", None),
    ((17,),     64,  48,  3,   F32,  False, 0.25, "strided",    "split"),
    ((123,),    45,  77,  8,   F32,  True,  0.1,  "transposed", "in_loop"),
    ((7, 3),    33,  50,  20,  F32,  True,  0.3,  "permuted",   None),
    ((33,),     50,  70,  128, F32,  True,  0.0,  "contiguous", "hybrid"),
    ((5, 13),   40,  29,  16,  F16,  True,  0.1,  "permuted",   "in_loop"),
    ((123,),    45,  77,  64,  F16,  False, 0.0,  "strided",    "split"),
    ((1,),      17,  33,  4,   BF16, True,  0.2,  "contiguous", None),
    ((3, 11),   50,  70,  128, BF16, True,  0.0,  "permuted",   None),
    ((20,),     40,  30,  3,   BF16, True,  0.4,  "transposed", "in_loop"),
]


@pytest.mark.parametrize("lead,k,n,r,dtype,bias,p,layout,strategy", CASES)
def test_lora_linear_on_an_int8_base_matches_the_float64_reference(lead, k, n, r, dtype, bias, p, layout,
                                                                   strategy):
    with dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext(), poison_outputs():
        errors = parity_case(lead, k, n, r, dtype, bias=bias, dropout_p=p, layout=layout, seed=5, quantized=True)
    assert set(errors) == {"y", "dx", "dlora_A", "dlora_B"}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy, p", [("in_loop", 0.0), ("in_loop", 0.2), ("split", 0.0), ("split", 0.2)])
def test_an_int8_base_gives_the_bits_of_its_dequantised_weight(dtype, strategy, p):
    """The op on (q, scale) and on Ŵ: the same output and gradients, bit for
    bit (the kernels multiply by the same values in the same order), and
    the same again on a second run (deterministic); the bias still trains."""
    x = make_x((3, 17, 45), dtype).requires_grad_()
    w, b, a, bb = make_params(45, 70, 6, dtype, True)
    q, scale = fused_lora.quantize_int8(w)
    deq = fused_lora.dequantize_int8(q, scale, dtype)
    for t in (b, a, bb):
        t.requires_grad_()
    dy = torch.randn(3, 17, 70, device=DEVICE, dtype=dtype)

    def run(weight, weight_scale):
        with dispatch.force_strategy(strategy):
            y = fused_lora.lora_linear(x, weight, a, bb, b, scaling=1.5, dropout_p=p, seed=11,
                                       weight_scale=weight_scale, backend="triton")
            return (y, *torch.autograd.grad(y, (x, b, a, bb), dy))

    quantized, again, plain = run(q, scale), run(q, scale), run(deq, None)
    for name, t1, t2, t3 in zip(("y", "dx", "dbias", "dA", "dB"), quantized, again, plain):
        assert torch.equal(t1, t2), name
        assert torch.equal(t1, t3), name


def test_the_torch_backend_is_the_reference_on_the_dequantised_base():
    x = torch.randn(9, 24, device=DEVICE, dtype=torch.float64)
    w, b, a, bb = make_params(24, 16, 4, torch.float64, True)
    q, scale = fused_lora.quantize_int8(w)
    y = fused_lora.lora_linear(x, q, a, bb, b, scaling=2.0, weight_scale=scale, backend="torch")
    want = torch.nn.functional.linear(x, q.double() * scale.double()[:, None], b) + 2.0 * (x @ a.t() @ bb.t())
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, reference.lora_linear(x, q, a, bb, b, scaling=2.0, weight_scale=scale))


def test_several_adapters_on_one_int8_base():
    with poison_outputs():
        for strategy, p in (("in_loop", 0.1), ("split", 0.0)):
            with dispatch.force_strategy(strategy):
                errors = parity_case((4, 9), 40, 33, 12, F16, dropout_p=p, adapters=True, quantized=True)
            assert max(errors.values()) <= TOLERANCE[F16], (strategy, errors)
    # every adapter of rank 0: the dequantised base for every row
    x = torch.randn(5, 24, device=DEVICE)
    q, scale = _quantized(16, 24)
    zero_a, zero_b = torch.empty(0, 24, device=DEVICE), torch.empty(16, 0, device=DEVICE)
    y = fused_lora.multi_lora_linear(x, q, [zero_a], [zero_b], torch.zeros(5, dtype=torch.long, device=DEVICE),
                                     weight_scale=scale)
    assert torch.equal(y, torch.nn.functional.linear(x, fused_lora.dequantize_int8(q, scale, F32)))


def test_an_int8_base_never_runs_hybrid_and_has_its_own_tiles():
    for strategy in (None, "hybrid"):
        plan = dispatch.plan(4096, 4096, 4096, 16, F32, 0.0, 90, interpreter=False, strategy=strategy,
                             quantized=True)
        assert plan.strategy != "hybrid" and not plan.cublas_base
    assert dispatch.plan(4096, 4096, 4096, 16, F32, 0.0, 90, interpreter=False).strategy == "hybrid"
    forced = dispatch.plan(64, 64, 64, 16, F16, 0.0, 90, interpreter=False, strategy="hybrid", quantized=True)
    assert forced.strategy == "in_loop" and "cannot read an int8 base" in forced.reason
    explained = fused_lora.explain((8192, 4096), (4096, 4096), 16, F32, quantized=True)
    assert explained.plan.strategy != "hybrid" and "hybrid" in str(fused_lora.explain((8192, 4096), (4096, 4096), 16,
                                                                                      F32))
    # (the int8 base's tiles: configs.int8_b_fits; the headline's 128x256 in-loop tile kept at r = 16)
    headline = fused_lora.explain((8192, 4096), (4096, 4096), 16, BF16, quantized=True).plan.fwd_gemm
    assert (headline.block_m, headline.block_n) == (128, 256)
    wide_tile = configs.GemmConfig(128, 256, 64, 8, 8, 3)
    for block_r, kept in ((16, True), (32, True), (64, False), (128, False)):  # (the in-loop shrink's rank tile)
        assert (wide_tile in configs.gemm_candidates(2, block_r, True, int8_b=True)) == kept, block_r
        # (without the shrink: kept, at every rank tile of the precomputed term)
        assert (wide_tile in configs.gemm_candidates(2, block_r, False, int8_b=True)) == (
            block_r <= configs.GEMM_LR_MAX_BLOCK_R[2])
    assert all(c.elems_per_thread() <= 32 for c in configs.gemm_candidates(4, 16, False, int8_b=True))
    with pytest.raises(ValueError, match=r"quantized must be False, True, 'int8', 'nf4' or 'fp4', got 'yes'"):
        fused_lora.explain((8, 16), (4, 16), 2, quantized="yes")
    with pytest.raises(TypeError, match="quantized must be a bool"):
        fused_lora.explain((8, 16), (4, 16), 2, quantized=2)


def _quantize(w, fmt):
    """``(q, weight_scale, weight_code)`` of ``w`` in a quantized format (NF4 and FP4 in groups of 16; the
    code book FP4's alone)."""
    if fmt == "fp4":
        return (*fused_lora.quantize_fp4(w, 16), torch.tensor(quant.FP4_CODE, device=w.device))
    return (*(fused_lora.quantize_nf4(w, 16) if fmt == "nf4" else fused_lora.quantize_int8(w)), None)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4"])
def test_double_backward_on_a_quantized_base(fmt):
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(32, 12, 3, F32, True)
    q, scale, code = _quantize(w, fmt)
    a.requires_grad_()
    y = fused_lora.lora_linear(x, q, a, bb, b, scaling=1.5, weight_scale=scale, weight_code=code, backend="triton")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gga,) = torch.autograd.grad(gx.square().sum(), a)
    x64, a64 = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    y64 = reference.lora_linear(x64, q, a64, bb.double(), b.double(), scaling=1.5, weight_scale=scale,
                                weight_code=code)
    (gx64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
    (gga64,) = torch.autograd.grad(gx64.square().sum(), a64)
    assert_close(gx, gx64.detach(), F32, "dx")
    assert_close(gga, gga64, F32, "d(dx)/dA")


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4"])
def test_the_ops_pass_opcheck_and_compile_with_a_quantized_base(fmt):
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(32, 16, 4, F32, True)
    q, scale, code = _quantize(w, fmt)
    a.requires_grad_()
    bb.requires_grad_()
    extra = ("", None, None, None, None, scale, code)
    seed = torch.tensor(7)
    y, _, dy = opcheck_lora_ops(x, q, b, a, bb, 1.5, 0.2, seed, extra)
    grads = torch.autograd.grad(y, (x, a, bb), dy)  # (the op's own autograd)
    eager = fused_lora.lora_linear(x, q, a, bb, b, scaling=1.5, dropout_p=0.2, seed=7, weight_scale=scale,
                                   weight_code=code)
    for g, e in zip(grads, torch.autograd.grad(eager, (x, a, bb), dy, retain_graph=True)):
        assert torch.equal(g, e)

    def f(x):
        return fused_lora.lora_linear(x, q, a, bb, b, scaling=1.5, dropout_p=0.2, seed=7, weight_scale=scale,
                                      weight_code=code)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1
    assert torch.equal(compiled, eager)
    assert torch.equal(torch.autograd.grad(compiled, x, dy)[0], torch.autograd.grad(eager, x, dy)[0])
    torch.library.opcheck(torch.ops.fused_lora.dora_norm.default, (q, a.detach(), bb.detach(), 1.5, scale, code))


# ----------------------------------------------------------------------------
# DoRA on an int8 base (QDoRA)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, r", [(1, 17, 1), (33, 130, 8), (70, 45, 129)])  # (r = 129: the rank in chunks)
def test_the_dora_norm_of_an_int8_base_is_the_norm_of_its_dequantised_weight(monkeypatch, dtype, n, k, r):
    """The norm kernel reading q and its row scales: the bits of the same
    kernel on Ŵ (rounded to A's dtype; on a quantized W's tile: its K step
    sets the order of the sums), and ‖Ŵ + s·B A‖ in float64."""
    monkeypatch.setattr(dora_kernels, "DORA_NORM_16BIT", configs.DORA_NORM_QUANTIZED_16BIT)
    q, scale = _quantized(n, k)
    lora_A = (torch.randn(r, k, device=DEVICE) / k ** 0.5).to(dtype)
    lora_B = (torch.randn(n, r, device=DEVICE) / r ** 0.5).to(dtype)
    deq = fused_lora.dequantize_int8(q, scale, dtype)
    norm = ops._triton.get().dora_norm
    with poison_outputs():
        got, plain = norm(q, lora_A, lora_B, 1.5, scale), norm(deq, lora_A, lora_B, 1.5)
    assert torch.equal(got, plain)
    want = torch.linalg.vector_norm(deq.double() + 1.5 * lora_B.double() @ lora_A.double(), dim=1)
    assert_close(got, want, F32, "ν")
    with pytest.raises(ValueError, match="an int8 weight comes with its weight_scale"):
        norm(q, lora_A, lora_B, 1.5)


@pytest.mark.parametrize("lead, k, n, r, dtype, p", [((17,), 64, 48, 3, F32, 0.0), ((3, 5), 45, 77, 70, F16, 0.2),
                                                     ((1,), 33, 20, 4, BF16, 0.0), ((20,), 40, 30, 16, BF16, 0.3)])
def test_dora_linear_on_an_int8_base_matches_the_float64_reference(lead, k, n, r, dtype, p):
    with poison_outputs():
        errors = parity_case(lead, k, n, r, dtype, dropout_p=p, seed=4, dora=True, quantized=True)
    assert set(errors) == {"y", "dx", "dlora_A", "dlora_B", "dmagnitude"}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("fmt, m", [("int8", 9), ("nf4", 9), ("nf4", 600)])  # (NF4 at 600 rows: Ŵ made whole)
def test_qdora_with_dropout_keeps_no_dequantised_weight_for_the_backward(fmt, m):
    """The correction GEMM, (x - drop(x)) Ŵᵀ, reads the quantized base as it
    is (the fused GEMMs): no floating-point (N, K) tensor is saved for the
    backward (F.linear on Ŵ would keep one a layer), and the gradients are
    the float64 reference's on Ŵ."""
    n, k = 40, 64
    w = torch.randn(n, k, device=DEVICE)
    q, scale = fused_lora.quantize_int8(w) if fmt == "int8" else fused_lora.quantize_nf4(w, group_size=32)
    deq = (fused_lora.dequantize_int8 if fmt == "int8" else fused_lora.dequantize_nf4)(q, scale, F32)
    x = make_x((m, k), F32).requires_grad_()
    a = (torch.randn(4, k, device=DEVICE) / 8).requires_grad_()
    bb = (torch.randn(n, 4, device=DEVICE) / 2).requires_grad_()
    mag = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
    bias = torch.randn(n, device=DEVICE)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_lora.dora_linear(x, q, a, bb, mag, bias, scaling=1.5, dropout_p=0.25, seed=11,
                                   weight_scale=scale)
    assert saved and not [s for s in saved if s[0] in ((n, k), (k, n)) and s[1].is_floating_point], saved
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb, mag), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb, mag)]
    want = reference.dora_linear(leaves[0], deq.double(), *leaves[1:3], leaves[3], bias.double(), scaling=1.5,
                                 dropout_p=0.25, seed=11)
    assert_close(y, want, F32, "y")
    for got, expected, name in zip(grads, torch.autograd.grad(want, leaves, dy.double()), ("x", "A", "B", "m")):
        assert_close(got, expected, F32, f"d{name}")


def test_dora_linear_on_an_int8_base_compiles_and_runs_the_torch_backend():
    x = torch.randn(6, 24, device=DEVICE)
    w, b, a, bb = make_params(24, 16, 4, F32, True)
    q, scale = fused_lora.quantize_int8(w)
    m = torch.rand(16, device=DEVICE) + 0.5
    eager = fused_lora.dora_linear(x, q, a, bb, m, b, scaling=1.5, weight_scale=scale)
    torch_backend = fused_lora.dora_linear(x, q, a, bb, m, b, scaling=1.5, weight_scale=scale, backend="torch")
    assert_close(eager, reference.dora_linear(x.double(), q, a.double(), bb.double(), m.double(), b.double(),
                                              scaling=1.5, weight_scale=scale), F32, "eager")
    assert_close(torch_backend, eager.double(), F32, "torch backend")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: fused_lora.dora_linear(x, q, a, bb, m, b, scaling=1.5, weight_scale=scale),
                             backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1 and torch.equal(compiled, eager)
    torch.library.opcheck(torch.ops.fused_lora.dora_norm.default, (q, a, bb, 1.5, scale))


# ----------------------------------------------------------------------------
# Typed errors
# ----------------------------------------------------------------------------

def test_bad_quantized_arguments_are_typed_errors():
    x = torch.randn(5, 24, device=DEVICE)
    w, b, a, bb = make_params(24, 16, 4, F32, True)
    q, scale = fused_lora.quantize_int8(w)
    with pytest.raises(TypeError, match=r"weight is int8 \(16, 24\), a quantized base: pass its weight_scale"):
        fused_lora.lora_linear(x, q, a, bb, b)
    with pytest.raises(TypeError, match=r"weight must be an int8 tensor \(or a uint8 one: packed NF4\) with "):
        fused_lora.lora_linear(x, w, a, bb, b, weight_scale=scale)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(out_features=16,\) to match weight "
                                         r"\(16, 24\), got \(24,\)"):
        fused_lora.lora_linear(x, q, a, bb, b, weight_scale=torch.ones(24, device=DEVICE))
    with pytest.raises(TypeError, match="weight_scale must be a floating-point tensor"):
        fused_lora.lora_linear(x, q, a, bb, b, weight_scale=torch.ones(16, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="weight_scale is on meta but x is on"):
        fused_lora.lora_linear(x, q, a, bb, b, weight_scale=torch.ones(16, device="meta"))
    with pytest.raises(ValueError, match=r"weight_scale requires grad, .* pass weight_scale.detach\(\)"):
        fused_lora.lora_linear(x, q, a, bb, b, weight_scale=scale.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"x must have shape \(..., in_features=24\)"):
        fused_lora.lora_linear(torch.randn(5, 23, device=DEVICE), q, a, bb, b, weight_scale=scale)
    with pytest.raises(TypeError, match="lora_A has dtype torch.float16 but x has torch.float32"):
        fused_lora.lora_linear(x, q, a.half(), bb, b, weight_scale=scale)
    with pytest.raises(TypeError, match=r"adapter 0 .* weight is int8"):
        fused_lora.multi_lora_linear(x, q, [a], [bb], torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="weight_scale requires grad"):
        fused_lora.multi_lora_linear(x, q, [a], [bb], torch.zeros(5, dtype=torch.long, device=DEVICE),
                                     weight_scale=scale.clone().requires_grad_())
    if ops._triton.why_not(x.device, x.dtype):
        return
    seed = torch.tensor(0)
    with pytest.raises(TypeError, match="weight is int8"):
        fused_lora.LoRALinearFunction.apply(x, q, b, a, bb, 1.0, 0.0, seed)
    with pytest.raises(ValueError, match=r"weight_scale must have shape"):
        fused_lora.LoRALinearFunction.apply(x, q, b, a, bb, 1.0, 0.0, seed, None, None, None, None, scale[:3])
    with pytest.raises(ValueError, match=r"weight_scale requires grad"):
        fused_lora.LoRALinearFunction.apply(x, q, b, a, bb, 1.0, 0.0, seed, None, None, None, None,
                                            scale.clone().requires_grad_())
    y = fused_lora.LoRALinearFunction.apply(x, q, b, a, bb, 1.0, 0.0, seed, None, None, None, None, scale)
    assert_close(y, reference.lora_linear(x.double(), q, a.double(), bb.double(), b.double(), weight_scale=scale),
                 F32, "LoRALinearFunction")
