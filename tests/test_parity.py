"""Forward and every gradient of the fused op against the float64 reference.

Each case is (lead shape, K, N, r, dtype, bias, dropout p, strategy, x layout,
trainable base). The list covers each axis on purpose: awkward sizes (1, 17,
45, 123: none a multiple of a block), every rank class (1, 3, 8, 16, 64, 128,
and 200 above one rank tile), 2-D, 3-D, strided, transposed and permuted x,
all three dtypes, every forward strategy (``cublas`` too: no Triton
launch), dropout on and off, frozen and trainable base.
"""

import contextlib

import pytest
import torch

import fused_lora
from lora_testing import assert_close, make_params, make_x, reference64

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

#        lead        K    N    r    dtype  bias   p     strategy   layout        base
CASES = [
    ((1,),        17,  33,  1,   F32,  True,  0.0,  "in_loop", "contiguous", False),
    ((17,),       64,  48,  3,   F32,  False, 0.0,  "split",   "contiguous", False),
    ((123,),      45,  77,  8,   F32,  True,  0.25, "split",   "contiguous", False),
    # in_loop forced with dropout: the forward masks x's tiles for its in-loop shrink, dx computes g in its
    # K loop; above the masked shrink's rank tile (fp32: 16) the forward falls back to split, dx still in loop
    ((123,),      45,  77,  8,   F32,  True,  0.25, "in_loop", "strided",    True),
    ((7, 3),      33,  50,  20,  F32,  True,  0.3,  "in_loop", "permuted",   False),
    ((5, 13),     40,  29,  16,  F32,  True,  0.0,  "in_loop", "contiguous", True),
    ((5, 13),     40,  29,  16,  F32,  True,  0.1,  "split",   "permuted",   True),
    ((33,),       96,  40,  64,  F32,  False, 0.0,  "in_loop", "strided",    False),
    ((33,),       50,  70,  128, F32,  True,  0.5,  "split",   "transposed", False),
    ((9,),        24,  20,  200, F32,  True,  0.2,  "split",   "contiguous", False),
    ((9,),        24,  20,  200, F32,  True,  0.0,  "in_loop", "contiguous", True),
    ((64,),       1,   19,  2,   F32,  True,  0.3,  "split",   "contiguous", False),
    ((40,),       37,  1,   4,   F32,  True,  0.0,  "in_loop", "contiguous", True),
    ((1,),        17,  33,  1,   F16,  True,  0.0,  "in_loop", "contiguous", False),
    ((123,),      45,  77,  8,   F16,  True,  0.25, "split",   "strided",    True),
    ((5, 10),     33,  66,  64,  F16,  True,  0.1,  "in_loop", "permuted",   False),
    ((3, 11),     64,  48,  16,  F16,  False, 0.0,  "in_loop", "permuted",   False),
    ((3, 11),     64,  48,  16,  F16,  False, 0.0,  "split",   "contiguous", False),
    ((50,),       33,  66,  64,  F16,  True,  0.1,  "split",   "transposed", False),
    ((17,),       70,  35,  128, F16,  True,  0.0,  "split",   "contiguous", False),
    ((1,),        17,  33,  1,   BF16, True,  0.0,  "in_loop", "contiguous", False),
    ((123,),      45,  77,  8,   BF16, True,  0.25, "split",   "contiguous", True),
    ((33,),       50,  70,  128, BF16, True,  0.4,  "in_loop", "transposed", False),
    ((4, 9),      64,  40,  16,  BF16, False, 0.0,  "in_loop", "strided",    False),
    ((3, 11),     50,  70,  64,  BF16, True,  0.4,  "split",   "permuted",   False),
    ((20,),       40,  30,  3,   BF16, True,  0.0,  "split",   "transposed", True),
    # hybrid: the fused low-rank term as C, the base GEMM from torch (cuBLAS on a GPU)
    ((17,),       45,  77,  8,   F32,  True,  0.25, "hybrid",  "strided",    True),
    ((3, 11),     64,  48,  64,  F16,  False, 0.0,  "hybrid",  "permuted",   True),
    ((123,),      33,  50,  3,   BF16, True,  0.1,  "hybrid",  "transposed", False),
    # cublas: no Triton launch (what eager calls on a GPU run at dropout 0 below a size); with dropout, the
    # keep-mask pass and x ⊙ keep (eager calls at small M; a permuted x through the Function's passes)
    ((1,),        17,  33,  1,   F32,  True,  0.0,  "cublas",  "contiguous", False),
    ((7, 3),      33,  50,  20,  F32,  False, 0.0,  "cublas",  "permuted",   True),
    ((123,),      45,  77,  8,   F16,  True,  0.0,  "cublas",  "strided",    True),
    ((33,),       50,  70,  128, BF16, True,  0.0,  "cublas",  "transposed", False),
    ((4, 9),      64,  40,  16,  BF16, False, 0.0,  "cublas",  "strided",    True),
    ((17,),       45,  77,  8,   F32,  True,  0.25, "cublas",  "strided",    False),
    ((3, 11),     64,  48,  16,  F16,  True,  0.1,  "cublas",  "permuted",   True),
    ((2, 9),      40,  30,  5,   BF16, False, 0.3,  "cublas",  "contiguous", True),
    # M >= 256: the interpreter's wide tiles (what training batches use)
    ((2, 150),    96,  80,  16,  F32,  True,  0.2,  "split",   "contiguous", True),
    ((300,),      70,  130, 8,   F16,  False, 0.0,  "in_loop", "strided",    False),
    ((2, 150),    96,  80,  16,  BF16, True,  0.2,  "in_loop", "strided",    True),
    # every dimension a whole number of the CUDA tiles (128 columns, BLOCK_K 64, rank tile 16/64):
    # the unmasked vector-load paths (EVEN_C, EVEN_K, EVEN_R) that real model shapes take on a GPU
    ((2, 136),    256, 384, 16,  BF16, True,  0.1,  "split",   "contiguous", True),
    ((256,),      128, 256, 64,  F16,  False, 0.15, "split",   "contiguous", False),
]


def _case_id(c):
    lead, k, n, r, dt, bias, p, strat, layout, base = c
    return (f"{'x'.join(map(str, lead))}x{k}->{n}-r{r}-{str(dt)[6:]}-{'b' if bias else 'nob'}-p{p}-{strat}-{layout}"
            + ("-trainbase" if base else ""))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_functional_matches_reference(case):
    lead, k, n, r, dtype, has_bias, p, strategy, layout, train_base = case
    x = make_x((*lead, k), dtype, layout).requires_grad_()
    w, b, a, bb = make_params(k, n, r, dtype, has_bias)
    for t in (a, bb):
        t.requires_grad_()
    if train_base:
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    scaling, seed = 1.75, 1234

    with fused_lora.dispatch.force_strategy(strategy):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=scaling, dropout_p=p, seed=seed, backend="triton")
        assert y.dtype == dtype and y.shape == (*lead, n)
        dy = torch.randn_like(y)
        wanted = ["x", "lora_A", "lora_B"] + (["weight"] + (["bias"] if b is not None else []) if train_base else [])
        inputs = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
        grads = torch.autograd.grad(y, [inputs[g] for g in wanted], dy)

    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=scaling, dropout_p=p, seed=seed, grads=wanted)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(wanted, grads):
        assert g.shape == inputs[name].shape and g.dtype == dtype, name
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("r", [1, 3, 8, 16, 64, 128])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("strategy, p", [("in_loop", 0.0), ("in_loop", 0.15), ("split", 0.0), ("split", 0.15),
                                         ("hybrid", 0.15), ("cublas", 0.0), ("cublas", 0.15)])
def test_rank_sweep(r, dtype, strategy, p):
    """Every rank class in every dtype and path, at an awkward shape (3-D x,
    no dimension a multiple of a block)."""
    x = make_x((3, 19, 53), dtype).requires_grad_()
    w, b, a, bb = make_params(53, 41, r, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    with fused_lora.dispatch.force_strategy(strategy):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=16 / r, dropout_p=p, seed=r, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=16 / r, dropout_p=p, seed=r, grads=("x", "lora_A", "lora_B"))
    assert_close(y, y64, dtype, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("strategy", [None, "in_loop", "split", "hybrid"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("lead, layout", [((3, 19), "contiguous"), ((2, 150), "permuted")])
def test_row_scale_matches_reference(monkeypatch, strategy, dtype, p, lead, layout):
    """``row_scale`` (w, one value per row: 0, 1 and others, on a strided
    tensor) scales each row's low-rank term, forward and every gradient,
    on every strategy: the kernels scale xa and g where they make them, the
    in-loop forward and dx after their K loops (no skinny pass for xa)."""
    k, n, r = 45, 37, 6
    x = make_x((*lead, k), dtype, layout).requires_grad_()
    w, b, a, bb = make_params(k, n, r, dtype, True)
    for t in (w, b, a, bb):
        t.requires_grad_()
    row_scale = torch.randn(lead[1], lead[0], device=x.device).t()  # (strided)
    row_scale[0] = 0.0
    row_scale[1, ::2] = 1.0
    forced = fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext()
    skinny_passes = []
    kernels = fused_lora._triton.get()
    real = kernels.skinny_pass
    monkeypatch.setattr(kernels, "skinny_pass", lambda *args, **kw: skinny_passes.append(1) or real(*args, **kw))
    with forced:
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.75, dropout_p=p, seed=99, row_scale=row_scale,
                                   backend="triton")
        ran = fused_lora.ops.plan_for(x.reshape(-1, k), w, r, p).strategy  # (on a GPU: maybe split, see there)
        assert (len(skinny_passes) == 0) == (ran == "in_loop")  # (the forward: xa from its K loop or not)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    wanted = ("x", "weight", "bias", "lora_A", "lora_B")
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.75, dropout_p=p, seed=99, grads=wanted,
                           row_scale=row_scale)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(wanted, grads):
        assert_close(g, g64[name], dtype, f"d{name}")
    # (the reference's w, checked on its own: 0 leaves the base, 1 the plain LoRA output)
    base = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert_close(y[0], base[0], dtype, "y where w = 0")
    plain, _ = reference64(x, w, b, a, bb, dy, scaling=1.75, dropout_p=p, seed=99, grads=())
    assert_close(y[1, ::2], plain[1, ::2], dtype, "y where w = 1")
