"""An NF4 frozen base (QLoRA's 4 bits), and bitsandbytes' FP4, the same
layout with another code book (``weight_code``): the format
(``quantize_nf4`` and ``dequantize_nf4``, bitsandbytes' NF4 bit for bit
where it is installed, and FP4's values),
the GEMMs' decoding of NF4 tiles (the bits of the GEMM on the dequantised
weight, in every form it runs), the dequantisation kernel of large M, the
dispatch by M, the ops against the float64 reference on the dequantised
base (forward, gradients, several adapters, DoRA), and the typed errors
(the double backward, torch.compile and opcheck: test_quantized.py's, for
both formats)."""

import contextlib
import dataclasses

import pytest
import torch
import torch._dynamo.testing

import fused_lora
from fused_lora import dispatch, ops, quant, reference
from fused_lora.kernels import configs, dequantize_weight, gemm
from fused_lora.kernels import dora as dora_kernels
from fused_lora.kernels.common import poison_outputs
from fused_lora.testing import parity_case
from lora_testing import DEVICE, DTYPES, TOLERANCE, assert_close, assert_same_sums, make_params, make_x

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CODE = torch.tensor(quant.NF4_CODE, dtype=torch.float64)
CODES = {"nf4": CODE, "fp4": torch.tensor(quant.FP4_CODE, dtype=torch.float64)}
QUANTIZE = {"nf4": fused_lora.quantize_nf4, "fp4": fused_lora.quantize_fp4}


def _nf4(n, k, group=16, scale=1.0):
    """A random NF4 weight (n, k): its bytes, absmax, and the float weight it came from."""
    w = torch.randn(n, k, device=DEVICE) * scale
    packed, absmax = fused_lora.quantize_nf4(w, group)
    return packed, absmax, w


def _code(device=DEVICE):
    return quant.nf4_code(device)


def _weight_code(fmt, device=DEVICE):
    """A 4-bit format's ``weight_code``: None for NF4, FP4's table."""
    return None if fmt == "nf4" else quant.fp4_code(device)


# ----------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, torch.float64], ids=str)
@pytest.mark.parametrize("n, k, group", [(1, 2, 2), (17, 64, 16), (5, 256, 64), (3, 384, 128)])
def test_quantize_4bit_is_the_nearest_code_of_each_groups_absmax(fmt, dtype, n, k, group):
    code = CODES[fmt]
    w = (torch.randn(n, k, device=DEVICE) * (torch.rand(n, 1, device=DEVICE) + 0.1) * 3).to(dtype)
    w[n // 2, :group] = 0  # a group of zeros: absmax 0, every value 0
    packed, absmax = QUANTIZE[fmt](w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2) and packed.is_contiguous()
    assert absmax.dtype == F32 and absmax.shape == (n, k // group)
    w32 = w.float()
    assert torch.equal(absmax, w32.reshape(n, k // group, group).abs().amax(2))
    index = torch.stack((packed >> 4, packed & 15), dim=2).reshape(n, k).long().cpu()  # (the even k high)
    expanded = absmax.repeat_interleave(group, dim=1).cpu().double()
    normed = torch.where(expanded > 0, w32.cpu().double() / expanded, torch.zeros_like(expanded))
    distance = (normed[..., None] - code).abs()
    chosen = distance.gather(2, index[..., None])[..., 0]
    assert bool((chosen <= distance.amin(2) + 1e-6).all())  # (the nearest code; fp32's rounding of W/absmax)
    assert bool((index[n // 2, :group] == (7 if fmt == "nf4" else 0)).all()) and absmax[n // 2, 0] == 0
    deq = fused_lora.dequantize_4bit(packed, absmax, dtype, _weight_code(fmt))
    if fmt == "nf4":
        assert torch.equal(deq, fused_lora.dequantize_nf4(packed, absmax, dtype))
    compute = torch.float64 if dtype == torch.float64 else F32
    want = (code.float().to(compute)[index].to(DEVICE) * absmax.to(compute).repeat_interleave(group, dim=1)).to(dtype)
    assert torch.equal(deq, want)
    # the error of each value: at most half the gap to the neighbouring code, times its group's absmax
    ordered = code.sort().values
    gap = (ordered[1:] - ordered[:-1]).max().item() / 2
    assert bool(((deq.double() - w.double()).abs() <= expanded.to(DEVICE) * gap * (1 + 1e-3) + 1e-3 * 2**-7).all())


def test_nf4_is_bitsandbytes_nf4_bit_for_bit():
    """quantize_nf4 and dequantize_nf4 against bitsandbytes' quantize_4bit
    and dequantize_4bit (nf4), and nf4_of reading its Params4bit, double
    quantization (compress_statistics) undone to the same absmax."""
    bnb = pytest.importorskip("bitsandbytes")
    functional = bnb.functional
    for dtype, group in ((F32, 64), (BF16, 64), (F16, 128), (BF16, 32)):
        w = (torch.randn(33, 256) * 2).to(dtype)
        packed, absmax = fused_lora.quantize_nf4(w, group)
        q, state = functional.quantize_4bit(w, blocksize=group, quant_type="nf4", compress_statistics=False)
        assert torch.equal(packed.reshape(-1), q.reshape(-1)) and torch.equal(absmax.reshape(-1), state.absmax)
        assert torch.equal(fused_lora.dequantize_nf4(packed, absmax, dtype), functional.dequantize_4bit(q, state))
        q2, state2 = functional.quantize_4bit(w, blocksize=group, quant_type="nf4", compress_statistics=True)
        param = bnb.nn.Params4bit(q2, requires_grad=False, quant_state=state2, quant_type="nf4", blocksize=group,
                                  bnb_quantized=True)
        got = quant.nf4_of(param)
        assert got is not None and got[0].data_ptr() == q2.data_ptr()  # (its bytes, not a copy)
        assert torch.equal(fused_lora.dequantize_nf4(*got, dtype), functional.dequantize_4bit(q2, state2))
    q4, state4 = functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert quant.nf4_of(bnb.nn.Params4bit(q4, requires_grad=False, quant_state=state4, quant_type="fp4",
                                          bnb_quantized=True)) is None  # (FP4: another code book)
    assert quant.nf4_of(torch.zeros(4, 4, dtype=torch.uint8)) is None


def test_fp4_is_bitsandbytes_fp4_value_for_value():
    """quantize_fp4 against bitsandbytes' quantize_4bit(quant_type="fp4"):
    the same absmax and the same values (a byte may differ only where both
    are a 0, FP4's index 0 or 8); bnb_4bit_of reading its Params4bit (its
    bytes shared, double quantization undone) with FP4's code book, which
    dequantize_4bit makes bitsandbytes' dequantize_4bit bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    functional = bnb.functional
    assert torch.equal(functional.get_4bit_type("fp4", device="cpu"), torch.tensor(quant.FP4_CODE))
    code = _weight_code("fp4", "cpu")
    for dtype, group in ((F32, 64), (BF16, 64), (F16, 128), (BF16, 32)):
        w = (torch.randn(33, 256) * 2).to(dtype)
        packed, absmax = fused_lora.quantize_fp4(w, group)
        q, state = functional.quantize_4bit(w, blocksize=group, quant_type="fp4", compress_statistics=False)
        assert torch.equal(absmax.reshape(-1), state.absmax)
        ours = fused_lora.dequantize_4bit(packed, absmax, dtype, code)
        assert torch.equal(ours, functional.dequantize_4bit(q, state))
        nibbles = torch.stack((packed >> 4, packed & 15), 2).reshape(-1)
        theirs = torch.stack((q.view(torch.uint8) >> 4, q.view(torch.uint8) & 15), 2).reshape(-1)
        differ = nibbles != theirs
        assert bool((nibbles[differ] % 8 == 0).all() and (theirs[differ] % 8 == 0).all())  # (0 and "-0" alone)
        for nested in (True, False):
            q2, state2 = functional.quantize_4bit(w, blocksize=group, quant_type="fp4", compress_statistics=nested)
            param = bnb.nn.Params4bit(q2, requires_grad=False, quant_state=state2, quant_type="fp4",
                                      blocksize=group, bnb_quantized=True)
            got = quant.bnb_4bit_of(param)
            assert got is not None and got[0].data_ptr() == q2.data_ptr() and torch.equal(got[2], code)
            assert torch.equal(fused_lora.dequantize_4bit(*got[:2], dtype, got[2]),
                               functional.dequantize_4bit(q2, state2))
            assert quant.base_format(got[0], got[2]) == "fp4"
    nf4 = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    got = quant.bnb_4bit_of(bnb.nn.Params4bit(nf4[0], requires_grad=False, quant_state=nf4[1], quant_type="nf4",
                                              bnb_quantized=True))
    assert got is not None and got[2] is None and quant.base_format(got[0]) == "nf4"
    assert quant.base_format(got[0], torch.ones(16)) == "4-bit"


def test_the_format_refuses_what_it_cannot_take():
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        fused_lora.quantize_nf4(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"2-D .*\(8,\)"):
        fused_lora.quantize_nf4(torch.ones(8))
    for group in (3, 0, 48, 128):  # (not a power of two >= 2 dividing 64... 128 does not divide it)
        with pytest.raises(ValueError, match=rf"group_size must be a power of two >= 2 that divides "
                                             rf"in_features=64, got {group}"):
            fused_lora.quantize_nf4(torch.randn(2, 64), group)
    with pytest.raises(TypeError, match="group_size must be an int, got bool"):
        fused_lora.quantize_nf4(torch.randn(2, 64), True)
    w = torch.randn(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fused_lora.quantize_nf4(w)
    packed, absmax, _ = _nf4(3, 32)
    with pytest.raises(TypeError, match=r"packed must be a 2-D uint8 tensor"):
        fused_lora.dequantize_nf4(packed.to(torch.int8), absmax, F32)
    with pytest.raises(ValueError, match=r"absmax must have shape \(out_features=3, in_features / group\) .* "
                                         r"\(in_features=32\), got \(3, 5\)"):
        fused_lora.dequantize_nf4(packed, torch.ones(3, 5), F32)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        fused_lora.dequantize_nf4(packed, absmax, torch.int8)


# ----------------------------------------------------------------------------
# The GEMM's decoding, and the dequantisation kernel
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("low_rank", ["none", "in_loop", "precomputed"])
@pytest.mark.parametrize("m, n, k, group, block_k, split_k", [
    (1, 33, 64, 32, 64, 1),     # one group a K step (forward), a wrapped N tile
    (17, 75, 96, 32, 64, 1),    # two groups a K step, a K tail (forward: 96 = 64 + 32; dx: 75 rows)
    (5, 41, 128, 64, 32, 3),    # half a group a K step, split-K
    (123, 19, 64, 2, 64, 2),    # groups of two, split-K
    (9, 130, 160, 16, 128, 1),  # eight groups a K step and a K tail of 32
])
def test_the_gemm_on_an_nf4_b_is_the_gemm_on_its_dequantised_values(dtype, low_rank, m, n, k, group, block_k,
                                                                    split_k):
    """Forward (b = W's bytes transposed, two of B's rows a byte) and dx (b =
    W's bytes, two of its columns a byte), each against the GEMM reading Ŵ:
    the same sums (``assert_same_sums``: the same bits on the CPU), with K
    tails, split-K, groups narrower and wider than a K step or an N tile,
    each low-rank form; every output written."""
    r = 5
    cfg = configs.gemm_config(m, n, k, r, torch.tensor([], dtype=dtype).element_size(), low_rank == "in_loop", True)
    packed, absmax, _ = _nf4(n, k, group)
    deq = fused_lora.dequantize_nf4(packed, absmax, dtype)
    for dim in (1, 0):  # the forward's Wᵀ (K = k); dx's W (K = n, N = k)
        b_q, b_f = (packed.t(), deq.t()) if dim == 1 else (packed, deq)
        kk, nn_ = b_f.shape
        for block_n in (16, 64):  # (dx: an N tile narrower and wider than a group)
            c = dataclasses.replace(cfg, block_k=block_k, block_n=block_n, split_k=split_k)
            a = torch.randn(m, kk, device=DEVICE).to(dtype)
            v = torch.randn(r, nn_, device=DEVICE).to(dtype)
            lr = {"none": {}, "in_loop": dict(shrink=torch.randn(kk, r, device=DEVICE).to(dtype), v=v),
                  "precomputed": dict(u=torch.randn(m, r, device=DEVICE), v=v)}[low_rank]
            with poison_outputs():
                c_q, xa_q = gemm.lora_gemm(a, b_q, b_scale=absmax, b_scale_dim=dim, b_code=_code(), lr_scale=0.5,
                                           config=c, out_dtype=dtype, **lr)
                c_f, xa_f = gemm.lora_gemm(a, b_f, lr_scale=0.5, config=c, out_dtype=dtype, **lr)
            assert_same_sums(c_q, c_f, kk + r, f"dim={dim}, block_n={block_n}")
            if low_rank == "in_loop":
                assert torch.equal(xa_q, xa_f)
            want = a.double() @ b_f.double()
            if lr:
                left = lr["u"].double() if "u" in lr else a.double() @ lr["shrink"].double()
                want = want + 0.5 * left @ v.double()
            assert_close(c_q, want, dtype, f"b_scale_dim={dim}")


def test_the_gemm_contract_for_an_nf4_b():
    cfg = configs.gemm_config(4, 8, 32, 1, 4, False, True)
    a = torch.randn(4, 32, device=DEVICE)
    packed, absmax, _ = _nf4(8, 32)
    with pytest.raises(ValueError, match=r"a uint8 \(NF4\) b needs its b_scale and b_code"):
        gemm.lora_gemm(a, packed.t(), config=cfg, out_dtype=F32)
    with pytest.raises(ValueError, match="an NF4 b is uint8 with its fp32 \\(16,\\) b_code"):
        gemm.lora_gemm(a, packed.t(), b_scale=absmax, b_code=_code().double(), config=cfg, out_dtype=F32)
    with pytest.raises(ValueError, match=r"must split W's 32 columns into groups of a power of two"):
        gemm.lora_gemm(a, packed.t(), b_scale=torch.ones(8, 3, device=DEVICE), b_code=_code(), config=cfg,
                       out_dtype=F32)
    with pytest.raises(ValueError, match=r"b_scale \(4, 2\) does not match an NF4 b"):
        gemm.lora_gemm(a, packed.t(), b_scale=absmax[:4], b_code=_code(), config=cfg, out_dtype=F32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, group", [(1, 2, 2), (33, 64, 16), (17, 256, 64), (5, 384, 128), (40, 200, 8),
                                         (3, 512, 256)])
def test_the_dequantisation_kernel_is_dequantize_bit_for_bit(dtype, n, k, group):
    """Ŵ made whole (large M's path), of NF4 and of int8, any strides: the
    bits of quant.dequantize_nf4 / dequantize_int8."""
    packed, absmax, w = _nf4(n, k, group, scale=3.0)
    with poison_outputs():
        got = dequantize_weight(packed, absmax, dtype, _code())
        strided = dequantize_weight(packed.t().contiguous().t(), absmax.t().contiguous().t(), dtype, _code())
    assert torch.equal(got, fused_lora.dequantize_nf4(packed, absmax, dtype)) and torch.equal(strided, got)
    q, scale = fused_lora.quantize_int8(w)
    with poison_outputs():
        got8 = dequantize_weight(q, scale, dtype)
    assert torch.equal(got8, fused_lora.dequantize_int8(q, scale, dtype))


def test_the_dispatch_decodes_nf4_at_small_m_and_makes_it_whole_above():
    small = dispatch.plan(16, 4096, 4096, 16, BF16, 0.0, 90, interpreter=False, quantized="nf4")
    assert small.strategy == "split" and not small.dx_in_loop and not small.dequantize_base
    assert not small.persistent and "NF4 base, decoded in the GEMM's K loop" in small.reason
    for c in (small.fwd_gemm, small.dx_gemm):
        assert configs.nf4_b_fits(c, 2, False)
    edge = configs.NF4_DECODE_MAX_M
    assert not dispatch.plan(edge, 4096, 4096, 16, BF16, 0.0, 90, interpreter=False, quantized="nf4").dequantize_base
    large = dispatch.plan(edge + 1, 4096, 4096, 16, BF16, 0.0, 90, interpreter=False, quantized="nf4")
    float_plan = dispatch.plan(edge + 1, 4096, 4096, 16, BF16, 0.0, 90, interpreter=False)
    assert large.dequantize_base and dataclasses.replace(large, dequantize_base=False, reason="") == \
        dataclasses.replace(float_plan, reason="")
    assert f"an NF4 base at M={edge + 1} > {edge}: made whole" in large.reason
    fp32 = dispatch.plan(8192, 4096, 4096, 16, F32, 0.0, 90, interpreter=False, quantized="nf4")
    assert fp32.dequantize_base and fp32.strategy == "hybrid"  # (Ŵ is a float base: cuBLAS may read it)
    forced = dispatch.plan(16, 64, 64, 16, F16, 0.0, 90, interpreter=False, strategy="in_loop", quantized="nf4")
    assert forced.strategy == "split" and forced.reason.startswith("forced 'in_loop', which cannot run here")
    hybrid = dispatch.plan(16, 64, 64, 16, F16, 0.0, 90, interpreter=False, strategy="hybrid", quantized="nf4")
    assert hybrid.strategy == "split" and "cannot read an nf4 base" in hybrid.reason
    text = str(fused_lora.explain((4096, 4096), (4096, 4096), 16, BF16, quantized="nf4"))
    assert "made whole in x's dtype by the dequantisation kernel" in text
    assert dispatch.plan(16, 64, 64, 16, F16, 0.0, 90, interpreter=False, quantized=True) == \
        dispatch.plan(16, 64, 64, 16, F16, 0.0, 90, interpreter=False, quantized="int8")
    for m in (16, edge + 1):  # (FP4: NF4's kernels, another code book)
        assert dispatch.plan(m, 64, 64, 16, F16, 0.0, 90, interpreter=False, quantized="fp4") == \
            dispatch.plan(m, 64, 64, 16, F16, 0.0, 90, interpreter=False, quantized="nf4")
    with pytest.raises(ValueError, match=r"quantized must be False, True, 'int8', 'nf4' or 'fp4', got 'nf5'"):
        fused_lora.explain((8, 16), (4, 16), 2, quantized="nf5")
    # the NF4 tiles: none decodes more than 32 values a thread, none holds 128 rows on 4 warps, never persistent
    for block_r in (16, 64):
        tiles = configs.gemm_candidates(2, block_r, False, nf4_b=True)
        assert tiles and all(configs.nf4_b_fits(c, 2, False) for c in tiles)
        assert configs.GemmConfig(128, 256, 64, 8, 8, 3) not in tiles
    assert configs.gemm_candidates(2, 16, False, persistent=True, nf4_b=True) == []


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------

#        lead      K    N    r    dtype  bias   p     layout        strategy
CASES = [
    ((1,),      16,  33,  1,   F32,  True,  0.0,  "contiguous", None),
    ((17,),     64,  48,  3,   F32,  False, 0.25, "strided",    None),
    ((123,),    48,  77,  8,   F32,  True,  0.1,  "transposed", None),
    ((7, 3),    32,  50,  20,  F32,  True,  0.3,  "permuted",   None),
    ((5, 13),   48,  29,  16,  F16,  True,  0.1,  "permuted",   None),
    ((123,),    96,  77,  64,  F16,  False, 0.0,  "strided",    None),
    ((1,),      16,  33,  4,   BF16, True,  0.2,  "contiguous", None),
    ((3, 11),   64,  70,  128, BF16, True,  0.0,  "permuted",   None),
    ((20,),     32,  30,  3,   BF16, True,  0.4,  "transposed", "in_loop"),  # (forced: runs split)
]


@pytest.mark.parametrize("lead,k,n,r,dtype,bias,p,layout,strategy", CASES)
def test_lora_linear_on_an_nf4_base_matches_the_float64_reference(lead, k, n, r, dtype, bias, p, layout, strategy):
    with dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext(), poison_outputs():
        errors = parity_case(lead, k, n, r, dtype, bias=bias, dropout_p=p, layout=layout, seed=5, quantized="nf4")
    assert set(errors) == {"y", "dx", "dlora_A", "dlora_B"}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("lead,k,n,r,dtype,bias,p,layout,strategy", CASES[1::2])
def test_lora_linear_on_an_fp4_base_matches_the_float64_reference(lead, k, n, r, dtype, bias, p, layout, strategy):
    """bitsandbytes' FP4 (weight_code): the NF4 kernels with FP4's code book,
    against the reference on FP4's dequantised values (NF4's table would
    miss them by far more than the tolerance)."""
    with dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext(), poison_outputs():
        errors = parity_case(lead, k, n, r, dtype, bias=bias, dropout_p=p, layout=layout, seed=5, quantized="fp4")
    assert set(errors) == {"y", "dx", "dlora_A", "dlora_B"}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, p, fmt", [(17, 0.0, "nf4"), (17, 0.2, "nf4"), (configs.NF4_DECODE_MAX_M + 1, 0.1, "nf4"),
                                       (17, 0.2, "fp4"), (configs.NF4_DECODE_MAX_M + 1, 0.0, "fp4")])
def test_a_4bit_base_gives_the_bits_of_its_dequantised_weight(monkeypatch, dtype, m, p, fmt):
    """The op on (bytes, absmax[, FP4's code book]) and on Ŵ: the same
    output and gradients, bit for bit, decoded in the GEMMs (small M) or
    made whole (large M), and the same again on a second run
    (deterministic); the bias still trains."""
    x = make_x((m, 64), dtype).requires_grad_()
    w, b, a, bb = make_params(64, 40, 6, dtype, True)
    packed, absmax = QUANTIZE[fmt](w, 16)
    code = _weight_code(fmt)
    deq = fused_lora.dequantize_4bit(packed, absmax, dtype, code)
    for t in (b, a, bb):
        t.requires_grad_()
    dy = torch.randn(m, 40, device=DEVICE, dtype=dtype)
    made_whole = []
    real = ops._triton.get().dequantize_weight
    monkeypatch.setattr(ops._triton.get(), "dequantize_weight", lambda *args: made_whole.append(1) or real(*args))

    # (small M: NF4 runs split, the float base then too; large M: Ŵ's own plan either way)
    def force():
        return dispatch.force_strategy("split") if m <= configs.NF4_DECODE_MAX_M else contextlib.nullcontext()

    def run(weight, weight_scale, weight_code=None):
        with force():
            y = fused_lora.lora_linear(x, weight, a, bb, b, scaling=1.5, dropout_p=p, seed=11,
                                       weight_scale=weight_scale, weight_code=weight_code, backend="triton")
            return (y, *torch.autograd.grad(y, (x, b, a, bb), dy))

    quantized, again, plain = run(packed, absmax, code), run(packed, absmax, code), run(deq, None)
    for name, t1, t2, t3 in zip(("y", "dx", "dbias", "dA", "dB"), quantized, again, plain):
        assert torch.equal(t1, t2), name
        assert torch.equal(t1, t3), name
    # (made whole once for the forward and once for dx, each run, above NF4_DECODE_MAX_M only)
    assert len(made_whole) == (4 if m > configs.NF4_DECODE_MAX_M else 0)


def test_the_torch_backend_is_the_reference_on_the_dequantised_base():
    x = torch.randn(9, 32, device=DEVICE, dtype=torch.float64)
    w, b, a, bb = make_params(32, 16, 4, torch.float64, True)
    packed, absmax = fused_lora.quantize_nf4(w, 16)
    y = fused_lora.lora_linear(x, packed, a, bb, b, scaling=2.0, weight_scale=absmax, backend="torch")
    index = torch.stack((packed >> 4, packed & 15), dim=2).reshape(16, 32).long()
    deq = CODE.to(DEVICE)[index] * absmax.double().repeat_interleave(16, dim=1)
    want = torch.nn.functional.linear(x, deq, b) + 2.0 * (x @ a.t() @ bb.t())
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, reference.lora_linear(x, packed, a, bb, b, scaling=2.0, weight_scale=absmax))


def test_several_adapters_on_one_nf4_base():
    with poison_outputs():
        for p, fmt in ((0.1, "nf4"), (0.0, "nf4"), (0.1, "fp4")):
            errors = parity_case((4, 9), 48, 33, 12, F16, dropout_p=p, adapters=True, quantized=fmt)
            assert max(errors.values()) <= TOLERANCE[F16], (p, fmt, errors)
    x = torch.randn(5, 32, device=DEVICE)
    packed, absmax, _ = _nf4(16, 32)
    zero_a, zero_b = torch.empty(0, 32, device=DEVICE), torch.empty(16, 0, device=DEVICE)
    y = fused_lora.multi_lora_linear(x, packed, [zero_a], [zero_b], torch.zeros(5, dtype=torch.long, device=DEVICE),
                                     weight_scale=absmax)
    assert torch.equal(y, torch.nn.functional.linear(x, fused_lora.dequantize_nf4(packed, absmax, F32)))


# ----------------------------------------------------------------------------
# DoRA on an NF4 base (QDoRA)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, r, group", [(1, 16, 1, 16), (33, 160, 8, 32), (70, 48, 129, 16), (9, 256, 4, 128)])
def test_the_dora_norm_of_an_nf4_base_is_the_norm_of_its_dequantised_weight(monkeypatch, dtype, n, k, r, group):
    """The norm kernel decoding W's rows (groups narrower and wider than its
    K step; a K tail; the rank in chunks): the sums of the same kernel on Ŵ
    (on NF4's tile: its K step sets the order of the sums; ``assert_same_sums``:
    the same bits on the CPU), and ‖Ŵ + s·B A‖
    in float64."""
    monkeypatch.setattr(dora_kernels, "DORA_NORM_16BIT", configs.DORA_NORM_QUANTIZED_16BIT)
    packed, absmax, _ = _nf4(n, k, group, scale=0.1)
    lora_A = (torch.randn(r, k, device=DEVICE) / k ** 0.5).to(dtype)
    lora_B = (torch.randn(n, r, device=DEVICE) / r ** 0.5).to(dtype)
    deq = fused_lora.dequantize_nf4(packed, absmax, dtype)
    norm = ops._triton.get().dora_norm
    with poison_outputs():
        got, plain = norm(packed, lora_A, lora_B, 1.5, absmax, _code()), norm(deq, lora_A, lora_B, 1.5)
    assert_same_sums(got, plain, k + r, "ν")
    want = torch.linalg.vector_norm(deq.double() + 1.5 * lora_B.double() @ lora_A.double(), dim=1)
    assert_close(got, want, F32, "ν")
    with pytest.raises(ValueError, match="an NF4 \\(uint8\\) one with its weight_scale and code"):
        norm(packed, lora_A, lora_B, 1.5, absmax)


@pytest.mark.parametrize("lead, k, n, r, dtype, p, fmt", [
    ((17,), 64, 48, 3, F32, 0.0, "nf4"), ((3, 5), 48, 77, 70, F16, 0.2, "nf4"), ((1,), 32, 20, 4, BF16, 0.0, "nf4"),
    ((20,), 48, 30, 16, BF16, 0.3, "nf4"), ((17,), 64, 48, 3, F32, 0.0, "fp4"), ((3, 5), 48, 77, 9, F16, 0.2, "fp4")])
def test_dora_linear_on_a_4bit_base_matches_the_float64_reference(lead, k, n, r, dtype, p, fmt):
    with poison_outputs():
        errors = parity_case(lead, k, n, r, dtype, dropout_p=p, seed=4, dora=True, quantized=fmt)
    assert set(errors) == {"y", "dx", "dlora_A", "dlora_B", "dmagnitude"}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


# ----------------------------------------------------------------------------
# Typed errors
# ----------------------------------------------------------------------------

def test_bad_nf4_arguments_are_typed_errors():
    x = torch.randn(5, 32, device=DEVICE)
    w, b, a, bb = make_params(32, 16, 4, F32, True)
    packed, absmax = fused_lora.quantize_nf4(w, 16)
    with pytest.raises(TypeError, match=r"weight is uint8 \(16, 16\), a packed NF4 base: pass its weight_scale"):
        fused_lora.lora_linear(x, packed, a, bb, b)
    with pytest.raises(ValueError, match=r"weight_scale of a packed NF4 weight \(16, 16\) \(in_features=32\) must "
                                         r"have shape \(out_features=16, in_features / group\), .* got \(16,\)"):
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax[:, 0])
    with pytest.raises(ValueError, match=r"the group a power of two >= 2, got \(16, 32\)"):  # (a group of 1)
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=torch.ones(16, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"got \(16, 3\)"):  # (32 / 3 is no group)
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=torch.ones(16, 3, device=DEVICE))
    with pytest.raises(TypeError, match="weight_scale must be a floating-point tensor"):
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax.int())
    with pytest.raises(ValueError, match="weight_scale is on meta but x is on"):
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax.to("meta"))
    with pytest.raises(ValueError, match=r"weight_scale requires grad"):
        fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"x must have shape \(..., in_features=32\) to match weight \(16, 16\)"):
        fused_lora.lora_linear(torch.randn(5, 16, device=DEVICE), packed, a, bb, b, weight_scale=absmax)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, in_features=32\)"):
        fused_lora.lora_linear(x, packed, a[:, :16], bb, b, weight_scale=absmax)
    with pytest.raises(TypeError, match=r"adapter 0 .* weight is uint8"):
        fused_lora.multi_lora_linear(x, packed, [a], [bb], torch.zeros(5, dtype=torch.long, device=DEVICE))
    m = torch.ones(16, device=DEVICE)
    with pytest.raises(TypeError, match=r"weight is uint8"):
        fused_lora.dora_linear(x, packed, a, bb, m, b)
    if ops._triton.why_not(x.device, x.dtype):
        return
    seed = torch.tensor(0)
    with pytest.raises(TypeError, match="weight is uint8"):
        fused_lora.LoRALinearFunction.apply(x, packed, b, a, bb, 1.0, 0.0, seed)
    y = fused_lora.LoRALinearFunction.apply(x, packed, b, a, bb, 1.0, 0.0, seed, None, None, None, None, absmax)
    assert_close(y, reference.lora_linear(x.double(), packed, a.double(), bb.double(), b.double(),
                                          weight_scale=absmax), F32, "LoRALinearFunction")
    code = _weight_code("fp4")
    y = fused_lora.LoRALinearFunction.apply(x, packed, b, a, bb, 1.0, 0.0, seed, None, None, None, None, absmax, code)
    assert_close(y, reference.lora_linear(x.double(), packed, a.double(), bb.double(), b.double(),
                                          weight_scale=absmax, weight_code=code), F32, "LoRALinearFunction, FP4")
    with pytest.raises(ValueError, match=r"weight_code must have shape \(16,\)"):
        fused_lora.LoRALinearFunction.apply(x, packed, b, a, bb, 1.0, 0.0, seed, None, None, None, None, absmax,
                                            code[:8])
    with pytest.raises(ValueError, match="weight_code requires grad, but no gradient flows to it"):
        fused_lora.LoRALinearFunction.apply(x, packed, b, a, bb, 1.0, 0.0, seed, None, None, None, None, absmax,
                                            code.clone().requires_grad_())


def test_bad_weight_codes_are_typed_errors():
    """weight_code: a floating-point (16,) tensor on x's device, not requiring
    grad, beside a packed 4-bit weight and its weight_scale only; every
    entry point (lora_linear, dora_linear, multi_lora_linear, the
    reference, dequantize_4bit) refuses the same way."""
    x = torch.randn(5, 32, device=DEVICE)
    w, b, a, bb = make_params(32, 16, 4, F32, True)
    packed, absmax = fused_lora.quantize_fp4(w, 16)
    code = _weight_code("fp4")
    ids = torch.zeros(5, dtype=torch.long, device=DEVICE)
    m = torch.ones(16, device=DEVICE)
    calls = {
        "lora_linear": lambda c: fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax, weight_code=c),
        "reference": lambda c: reference.lora_linear(x, packed, a, bb, b, weight_scale=absmax, weight_code=c),
        "dora_linear": lambda c: fused_lora.dora_linear(x, packed, a, bb, m, b, weight_scale=absmax, weight_code=c),
        "multi_lora_linear": lambda c: fused_lora.multi_lora_linear(x, packed, [a], [bb], ids, b,
                                                                    weight_scale=absmax, weight_code=c),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="weight_code must be a torch.Tensor, got list"):
            call(list(quant.FP4_CODE))
        with pytest.raises(TypeError, match="weight_code must be a floating-point tensor, got dtype torch.int64"):
            call(torch.arange(16, device=DEVICE))
        with pytest.raises(ValueError, match=r"weight_code must have shape \(16,\), .* got \(4, 4\)"):
            call(code.reshape(4, 4))
        with pytest.raises(ValueError, match="weight_code is on meta but x is on"):
            call(code.to("meta"))
        with pytest.raises(ValueError, match="weight_code requires grad"):
            call(code.clone().requires_grad_())
        want = (reference.dora_linear(x, packed, a, bb, m, b, weight_scale=absmax, weight_code=code)
                if name == "dora_linear" else calls["reference"](code))  # (multi: every row adapter 0's)
        assert_close(call(code), want.double(), F32, name)  # (and the good one runs)
    q, scale = fused_lora.quantize_int8(w)
    with pytest.raises(ValueError, match=r"weight_code is a packed 4-bit \(uint8\) weight's code book; weight is "
                                         r"torch.int8 \(16, 32\)"):
        fused_lora.lora_linear(x, q, a, bb, b, weight_scale=scale, weight_code=code)
    with pytest.raises(ValueError, match=r"weight_code is a packed 4-bit \(uint8\) weight's code book; weight is "
                                         r"torch.float32"):
        fused_lora.lora_linear(x, w, a, bb, b, weight_code=code)
    with pytest.raises(ValueError, match=r"code must have shape \(16,\), .* got \(15,\)"):
        fused_lora.dequantize_4bit(packed, absmax, F32, code[:15])
    with pytest.raises(TypeError, match="code must be a floating-point tensor, got dtype torch.int64"):
        fused_lora.dequantize_4bit(packed, absmax, F32, torch.arange(16, device=DEVICE))
    with pytest.raises(ValueError, match="code is on meta but the weight is on"):
        fused_lora.dequantize_4bit(packed, absmax, F32, code.to("meta"))
    # FP4's bytes read with NF4's table (no weight_code) are another base: the code book is what it says
    fp4 = fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax, weight_code=code)
    nf4 = fused_lora.lora_linear(x, packed, a, bb, b, weight_scale=absmax)
    assert (fp4 - nf4).abs().max() > 0.1
