"""The launchers' own contracts: the skinny pass in every split shape
(including row chunks with dropout), the deterministic reduction, the GEMM's
guard rails, and degenerate sizes through the public op."""

import dataclasses
import itertools

import pytest
import torch
import triton

import fused_lora
from fused_lora import _triton
from fused_lora.kernels import configs, gemm, poison_outputs, skinny
from fused_lora.kernels.common import AdapterColumns
from lora_testing import DEVICE, assert_close, count_launches, interpreted_tma_k_n, make_params, reference64

K_ = _triton.get()


def _skinny_reference(t, keep, inv_keep, s, l, sh_scale, tn_scale):
    td = t.double() * keep.double() * 1.0
    sh = sh_scale * inv_keep * td @ s.double() if s is not None else None
    tn = tn_scale * inv_keep * l.double().t() @ td if l is not None else None
    return sh, tn, td.sum(0)


@pytest.mark.parametrize("target_programs", [1, 3, 64])
@pytest.mark.parametrize("p", [0.0, 0.35])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# a masked column tail; whole column tiles (unmasked vector loads) on the interpreter's tiles and CUDA's
@pytest.mark.parametrize("c", [70, 256])
def test_skinny_pass_every_split(monkeypatch, target_programs, p, chunk_bytes, dtype, c):
    if chunk_bytes is not None:  # one row split per chunk: many chunks, each reduced into a running sum
        monkeypatch.setattr(skinny, "SKINNY_PARTIAL_BYTES", chunk_bytes)
    m, r = 150, 5
    cfg = configs.skinny_config(2, _triton.interpreter())
    assert (c % cfg.block_c == 0) == (c == 256)
    t = torch.randn(m, c, device=DEVICE, dtype=dtype)
    s = torch.randn(c, r, device=DEVICE, dtype=dtype) / c ** 0.5
    l = torch.randn(m, r, device=DEVICE, dtype=torch.float32) / m ** 0.5
    keep = fused_lora.dropout_mask(9, (m, c), p, device=DEVICE)
    inv = 1 / (1 - p)
    cfg = configs.skinny_config(t.element_size(), _triton.interpreter())
    # TN + COLSUM (row splits, chunked)
    _, tn, cs = skinny.skinny_pass(t, config=cfg, target_programs=target_programs, tn_left=l, colsum=True,
                                   tn_scale=0.5 * inv, dropout_p=p, seed=9, tn_dtype=dtype, colsum_dtype=torch.float32)
    _, tn64, cs64 = _skinny_reference(t, keep, inv, None, l, 1.0, 0.5)
    assert_close(tn, tn64, dtype, "tn")
    assert_close(cs, cs64, dtype, "colsum")
    # SHRINK + TN transposed (column splits)
    sh, tn_t, _ = skinny.skinny_pass(t, config=cfg, target_programs=target_programs, shrink=s, tn_left=l,
                                     sh_scale=2.0 * inv, tn_scale=inv, tn_transposed=True, dropout_p=p, seed=9,
                                     tn_dtype=torch.float32)
    sh64, tn64, _ = _skinny_reference(t, keep, inv, s, l, 2.0, 1.0)
    assert sh.dtype == torch.float32 and tn_t.shape == (c, r)
    assert_close(sh, sh64, dtype, "shrink")
    assert_close(tn_t, tn64.t(), dtype, "tn transposed")


@pytest.mark.parametrize("m", [1, 17])
def test_skinny_pass_with_one_row_split_stores_its_sums(m, reduce_launches):
    """Small M: one row split covers every row, so its TN and COLSUM partials
    are the sums, stored as the outputs in their dtype: the dA pass launches no
    reduction, the dy pass one (SHRINK's column splits) instead of three."""
    cfg = configs.skinny_config(2, _triton.interpreter())
    c, r = 2 * cfg.block_c + 6, 6  # (three column tiles, the last ragged: 70 columns on the interpreter)
    assert m <= cfg.block_m
    t = torch.randn(m, c, device=DEVICE, dtype=torch.float16)
    s = torch.randn(c, r, device=DEVICE, dtype=torch.float16) / c ** 0.5
    l = torch.randn(m, r, device=DEVICE) / m ** 0.5
    keep = fused_lora.dropout_mask(4, (m, c), 0.3, device=DEVICE)
    _, tn, _ = skinny.skinny_pass(t, config=cfg, target_programs=4, tn_left=l, tn_scale=1 / 0.7, dropout_p=0.3,
                                  seed=4, tn_dtype=torch.float16)
    assert reduce_launches == []
    _, tn64, _ = _skinny_reference(t, keep, 1 / 0.7, None, l, 1.0, 1.0)
    assert tn.dtype == torch.float16
    assert_close(tn, tn64, torch.float16, "tn")
    sh, tn_t, cs = skinny.skinny_pass(t, config=cfg, target_programs=4, shrink=s, tn_left=l, colsum=True,
                                      tn_transposed=True, tn_dtype=torch.float16, colsum_dtype=torch.float16)
    assert len(reduce_launches) == 1  # the column splits of SHRINK (4 programs over 3 column tiles)
    sh64, tn64, cs64 = _skinny_reference(t, torch.ones_like(t), 1.0, s, l, 1.0, 1.0)
    for got, want, name in ((sh, sh64, "shrink"), (tn_t, tn64.t(), "tn transposed"), (cs, cs64, "colsum")):
        assert_close(got, want, torch.float16, name)


@pytest.mark.parametrize("m", [1, 17, 150])
@pytest.mark.parametrize("target_programs", [1, 4, 64])
@pytest.mark.parametrize("form", ["forward", "dy", "dy+colsum", "dA"])
@pytest.mark.parametrize("chunked", [False, True])
def test_skinny_grid_counts_the_launches_the_pass_makes(monkeypatch, m, target_programs, form, chunked,
                                                        reduce_launches):
    """What the benchmark's model counts is what the pass launches."""
    if chunked:  # one row split a chunk
        monkeypatch.setattr(skinny, "SKINNY_PARTIAL_BYTES", 1)
    c, r = 70, 5
    cfg = configs.skinny_config(4, _triton.interpreter())
    shrink, tn, colsum = form in ("forward", "dy", "dy+colsum"), form != "forward", form == "dy+colsum"
    passes = count_launches(monkeypatch, skinny, "lora_skinny_kernel")
    t = torch.randn(m, c, device=DEVICE)
    skinny.skinny_pass(t, config=cfg, target_programs=target_programs,
                       shrink=torch.randn(c, r, device=DEVICE) if shrink else None,
                       tn_left=torch.randn(m, r, device=DEVICE) if tn else None, colsum=colsum)
    grid = skinny.skinny_grid(m, c, r, cfg, target_programs, shrink=shrink, tn=tn, colsum=colsum)
    assert grid.launches() == len(passes) + len(reduce_launches)


def test_skinny_pass_ranks_above_one_tile():
    m, c, r = 40, 33, configs.MAX_BLOCK_R + 37
    t = torch.randn(m, c, device=DEVICE)
    s = torch.randn(c, r, device=DEVICE)
    l = torch.randn(m, r, device=DEVICE)
    cfg = configs.skinny_config(4, _triton.interpreter())
    sh, tn, cs = skinny.skinny_pass(t, config=cfg, target_programs=4, shrink=s, tn_left=l, colsum=True)
    assert_close(sh, t.double() @ s.double(), torch.float32, "shrink")
    assert_close(tn, l.double().t() @ t.double(), torch.float32, "tn")
    assert_close(cs, t.double().sum(0), torch.float32, "colsum")


def _row_scale(m: int) -> torch.Tensor:
    """A row scale for the kernels: fp32 (m,), strided (every other element of
    a buffer), 0 and 1 on some rows, random on the others."""
    w = torch.randn(2 * m, device=DEVICE)[::2]
    w[::3] = 0.0
    w[1::3] = 1.0
    return w


@pytest.mark.parametrize("target_programs", [1, 64])  # one column split; several, summed by a reduction
@pytest.mark.parametrize("r", [5, configs.MAX_BLOCK_R + 3])  # one rank tile; a launch a rank chunk
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_skinny_pass_scales_the_shrink_rows(target_programs, r, p):
    """SHRINK's row m times ``row_scale[m]`` (the forward's xa, the dy pass's
    g), in every column split and rank chunk; TN and COLSUM, from the same
    read, unscaled."""
    m, c = 37, 70
    cfg = configs.skinny_config(2, _triton.interpreter())
    t = torch.randn(m, c, device=DEVICE, dtype=torch.float16)
    s = torch.randn(c, r, device=DEVICE, dtype=torch.float16) / c ** 0.5
    l = torch.randn(m, r, device=DEVICE)
    w = _row_scale(m)
    keep = fused_lora.dropout_mask(4, (m, c), p, device=DEVICE)
    sh, tn, cs = skinny.skinny_pass(t, config=cfg, target_programs=target_programs, shrink=s, sh_scale=1.5,
                                    row_scale=w, tn_left=l, colsum=True, dropout_p=p, seed=4)
    sh64, tn64, cs64 = _skinny_reference(t, keep, 1.0, s, l, 1.5, 1.0)
    assert_close(sh, w.double()[:, None] * sh64, torch.float16, "row-scaled shrink")
    assert torch.equal(sh[::3], torch.zeros_like(sh[::3]))
    assert_close(tn, tn64, torch.float16, "tn")
    assert_close(cs, cs64, torch.float16, "colsum")


def _launchers_refuse(factor: dict, words: str, product: str = "shrink") -> None:
    """Both launchers, given the row factor ``factor`` and their rank product's
    factor (``product``: "shrink", or "none": a precomputed U, a TN pass),
    raise a ValueError that names them and matches ``words``."""
    m, k, n, r = 8, 16, 12, 3
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
    s, v, u = torch.randn(k, r, device=DEVICE), torch.randn(r, n, device=DEVICE), torch.randn(m, r, device=DEVICE)
    gemm_args = dict(shrink=s, v=v) if product == "shrink" else dict(u=u, v=v)
    skinny_args = dict(shrink=s) if product == "shrink" else dict(tn_left=u)
    with pytest.raises(ValueError, match=f"lora_gemm: {words}"):
        gemm.lora_gemm(a, b, **gemm_args, **factor, config=configs.gemm_config(m, n, k, r, 4, True,
                                                                              _triton.interpreter()),
                       out_dtype=torch.float32)
    with pytest.raises(ValueError, match=f"skinny_pass: {words}"):
        skinny.skinny_pass(a, **skinny_args, **factor, config=configs.skinny_config(4, _triton.interpreter()),
                           target_programs=4)


def test_row_scale_contract():
    """The launchers take a row scale only where they make a product it
    scales (SHRINK, the in-loop shrink), as fp32 of one value per row."""
    m = 8
    for w, what in ((torch.ones(m, device=DEVICE, dtype=torch.float16), "float16"),
                    (torch.ones(m + 1, device=DEVICE), r"\(9,\)"), (torch.ones(m, 1, device=DEVICE), r"\(8, 1\)")):
        _launchers_refuse(dict(row_scale=w), f"row_scale .*got .*{what}")
    _launchers_refuse(dict(row_scale=torch.ones(m, device=DEVICE)), "row_scale scales the rows .* and no factor",
                      product="none")


def _adapter_columns(m: int, ranks) -> tuple:
    """``(AdapterColumns, w64)``: adapters of ``ranks`` side by side, a row's
    adapter drawn at random among them and -1 (no adapter), one row of id
    -2 (NaN), the row ids strided int32 (every other element of a buffer),
    random column scales; ``w64`` (m, r) the float64 factor they stand for."""
    n = len(ranks)
    row_ids = torch.randint(-1, n, (2 * m,), device=DEVICE, dtype=torch.int32)[::2]
    row_ids[:n + 2] = torch.arange(-2, n, device=DEVICE, dtype=torch.int32)  # (every id among the rows)
    col_ids = torch.repeat_interleave(torch.arange(n, device=DEVICE, dtype=torch.int32),
                                      torch.tensor(ranks, device=DEVICE))
    col_scale = torch.rand(sum(ranks), device=DEVICE) + 0.5
    w64 = (row_ids[:, None] == col_ids[None, :]).double() * col_scale.double()
    w64[0] = torch.nan
    return AdapterColumns(row_ids, col_ids, col_scale), w64


# a rank within one tile, several chunks (a chunk's columns its own adapters'), adapters of rank 1
@pytest.mark.parametrize("ranks", [(2, 3), (1, configs.MAX_BLOCK_R, 36), (1, 1, 1, 1)])
@pytest.mark.parametrize("target_programs", [1, 64])
def test_skinny_pass_keeps_each_adapters_columns_on_its_rows(ranks, target_programs):
    """SHRINK's element (m, j) kept, times column j's scale, where row m runs
    column j's adapter, 0 elsewhere (a row of id -1 everywhere; NaN on a row
    of id -2); a row's Inf reaches its own adapter's columns alone. TN and
    COLSUM, from the same read, untouched."""
    m, c, r, p = 37, 70, sum(ranks), 0.3
    cfg = configs.skinny_config(2, _triton.interpreter())
    t = torch.randn(m, c, device=DEVICE, dtype=torch.float16)
    t[5, 3] = float("inf")
    s = torch.randn(c, r, device=DEVICE, dtype=torch.float16) / c ** 0.5
    l = torch.randn(m, r, device=DEVICE)
    adapters, w64 = _adapter_columns(m, ranks)
    adapters.row_ids[5] = 0  # (the row with an Inf runs adapter 0)
    w64[5] = (adapters.col_ids == 0).double() * adapters.col_scale.double()
    keep = fused_lora.dropout_mask(4, (m, c), p, device=DEVICE)
    with poison_outputs():
        sh, tn, cs = skinny.skinny_pass(t, config=cfg, target_programs=target_programs, shrink=s, sh_scale=1.5,
                                        adapters=adapters, tn_left=l, colsum=True, dropout_p=p, seed=4)
    sh64, tn64, cs64 = _skinny_reference(t, keep, 1.0, s, l, 1.5, 1.0)
    want = torch.where(w64 != 0, w64 * sh64, 0.0)
    finite = torch.isfinite(want)
    assert not finite[5][w64[5] != 0].any() and finite[5][w64[5] == 0].all() and not finite[0].any()
    assert torch.equal(torch.isfinite(sh), finite)
    assert_close(sh[finite], want[finite], torch.float16, "the adapters' shrink")
    assert torch.equal(sh[w64 == 0], torch.zeros_like(sh[w64 == 0]))
    assert_close(tn, tn64, torch.float16, "tn")
    assert_close(cs, cs64, torch.float16, "colsum")


@pytest.mark.parametrize("factor", ["row_scale", "adapters"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("masked", [None, "term", "input"])  # dropout's mask: none; dx's; the forward's
def test_gemm_applies_the_row_factor_to_the_in_loop_shrink(factor, split_k, masked, reduce_launches):
    """The in-loop shrink's row factor, applied before it is stored (xa, g
    for dA) and expanded (the low-rank term), in every K split; the base
    product untouched. ``row_scale``: row m times ``w[m]``; ``adapters``:
    element (m, j) kept, times column j's scale, on the rows of column j's
    adapter, 0 elsewhere."""
    m, n, k, ranks, p, seed, scale = 37, 45, 75, (2, 1, 3), 0.3, 8, 0.7
    r = sum(ranks)
    a = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    b = torch.randn(n, k, device=DEVICE, dtype=torch.float16).t()
    shrink = torch.randn(r, k, device=DEVICE, dtype=torch.float16).t() / k ** 0.5
    v = torch.randn(n, r, device=DEVICE, dtype=torch.float16).t()
    if factor == "row_scale":
        w = _row_scale(m)
        w64, given = w.double()[:, None].expand(m, r), dict(row_scale=w)
    else:
        adapters, w64 = _adapter_columns(m, ranks)
        adapters.row_ids[0] = -1  # (not the NaN row, which the skinny pass's test checks: it would fill c's row)
        w64[0] = 0.0
        given = dict(adapters=adapters)
    base = configs.gemm_config(m, n, k, r, 2, True, _triton.interpreter(), epilogue_mask=masked == "term",
                               shrink_mask=masked == "input")
    # (K tiles of at most 32: three K blocks to split, whatever the configuration; a GPU's spans K whole)
    cfg = dataclasses.replace(base, split_k=split_k, block_k=min(base.block_k, 32))
    p = 0.0 if masked is None else p
    a64 = a.double()
    if masked == "input":
        a64 = a64 * fused_lora.dropout_mask(seed, (m, k), p, device=DEVICE).double() / (1 - p)
    keep = fused_lora.dropout_mask(seed, (m, n), p, device=DEVICE).double() if masked == "term" else 1.0
    xa64 = w64 * (a64 @ shrink.double())
    with poison_outputs():
        c, xa = gemm.lora_gemm(a, b, shrink=shrink, v=v, lr_scale=scale, dropout_p=p, seed=seed,
                               shrink_dropout=masked == "input", config=cfg, out_dtype=torch.float16, **given)
    assert len(reduce_launches) == (split_k > 1)
    assert_close(xa, xa64, torch.float16, "xa")
    assert (w64 == 0).any() and torch.equal(xa[w64 == 0], torch.zeros_like(xa[w64 == 0]))
    assert_close(c, a.double() @ b.double() + scale * (xa64 @ v.double()) * keep, torch.float16, "c")


def test_adapter_columns_contract():
    """The launchers take adapters' columns only where they make the product
    they mask, as int32 row and column ids and fp32 column scales of its
    rows and rank."""
    m, r = 8, 3
    good, _ = _adapter_columns(m, (1, 2))
    bad = [
        (good._replace(row_ids=good.row_ids.long()), "int64"),
        (good._replace(row_ids=good.row_ids[:-1]), r"\(7,\) torch.int32"),
        (good._replace(col_ids=good.col_ids.float()), "float32, "),
        (good._replace(col_ids=good.col_ids[:2]), r"\(2,\) torch.int32, "),
        (good._replace(col_scale=good.col_scale.double()), "float64$"),
        (good._replace(col_scale=torch.rand(2 * r, device=DEVICE)[::2]), r"\(3,\) torch.float32$"),
    ]
    for adapters, what in bad:
        _launchers_refuse(dict(adapters=adapters), f"adapters .*got .*{what}")
    _launchers_refuse(dict(adapters=good), "adapters masks .* and no factor", product="none")
    _launchers_refuse(dict(adapters=good, row_scale=torch.ones(m, device=DEVICE)),
                      "pass row_scale or adapters, not both")


@pytest.fixture
def reduce_launches(monkeypatch):
    """The grids of the reduction kernel's launches, in order."""
    return count_launches(monkeypatch, skinny, "reduce_partials_kernel")


@pytest.mark.parametrize("n, gap", [(1500, 0), (1024, 0), (1024, 16)])  # a tail; whole blocks; spaced partials
def test_reduce_partials_is_ordered_and_accumulates(n, gap):
    """Whole blocks take the unmasked (vector) path: 3 x 1024 is three of them."""
    assert ((3 * n) % configs.REDUCE_BLOCK == 0) == (n == 1024)
    slab = torch.randn(7, 3 * n + gap, device=DEVICE)
    parts = slab[:, :3 * n].view(7, 3, n)  # partials gap elements further apart than their size
    out = torch.full((3, n), float("nan"), device=DEVICE, dtype=torch.float16)
    skinny.reduce_partials(parts, out)
    expected = parts[0].clone()
    for i in range(1, 7):  # the kernel's order: p = 0, 1, 2, ...
        expected += parts[i]
    assert torch.equal(out, expected.half())
    acc = torch.randn(3, n, device=DEVICE)
    out32 = torch.full((3, n), float("nan"), device=DEVICE)
    skinny.reduce_partials(parts, out32, acc)
    expected = acc.clone()
    for i in range(7):
        expected += parts[i]
    assert torch.equal(out32, expected)
    with pytest.raises(ValueError, match="do not match"):
        skinny.reduce_partials(parts, torch.empty(2, n, device=DEVICE))


def test_reduce_all_sums_two_jobs_a_launch(reduce_launches):
    """Independent reductions share launches, two at a time, each summed in
    split order as if alone: any sizes, partial counts, dtypes, running sums."""
    jobs, expected = [], []
    for p, shape, dtype, with_acc in ((3, (5, 7), torch.float16, False), (6, (2048,), torch.float32, True),
                                      (1, (4, 300), torch.float16, True), (2, (0, 3), torch.float32, False),
                                      (4, (1030,), torch.float32, False)):
        parts = torch.randn(p, *shape, device=DEVICE)
        acc = torch.randn(shape, device=DEVICE) if with_acc else None
        total = acc.clone() if with_acc else torch.zeros(shape, device=DEVICE)
        for i in range(p):
            total += parts[i]
        jobs.append((parts, torch.full(shape, float("nan"), device=DEVICE, dtype=dtype), acc))
        expected.append(total.to(dtype))
    skinny.reduce_all(jobs)
    assert len(reduce_launches) == 2  # the empty job launches nothing: 4 jobs, 2 launches
    for (_, out, _), want in zip(jobs, expected):
        assert torch.equal(out, want)


def test_gemm_contract():
    a = torch.randn(8, 16, device=DEVICE)
    b = torch.randn(16, 12, device=DEVICE)
    cfg = configs.gemm_config(8, 12, 16, 4, 4, False, _triton.interpreter())
    with pytest.raises(ValueError, match="a is"):
        gemm.lora_gemm(a, b[:15], config=cfg, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="not both"):
        gemm.lora_gemm(a, b, config=cfg, out_dtype=torch.float32, u=torch.zeros(8, 2, device=DEVICE),
                       shrink=torch.zeros(16, 2, device=DEVICE), v=torch.zeros(2, 12, device=DEVICE))
    big = configs.MAX_BLOCK_R + 1
    with pytest.raises(ValueError, match="whole rank"):
        gemm.lora_gemm(a, b, config=cfg, out_dtype=torch.float32, shrink=torch.zeros(16, big, device=DEVICE),
                       v=torch.zeros(big, 12, device=DEVICE))
    c, xa = gemm.lora_gemm(a, b, config=cfg, out_dtype=torch.float32)
    assert xa is None
    assert_close(c, a.double() @ b.double(), torch.float32, "plain gemm")


def _warp_specialized_operands(pass_name, m, k, n, r, dtype):
    """``(a, b, bias, u, v)`` of the forward (x, Wᵀ, a bias, xa, Bᵀ) or dx
    (dy, W, no bias, g, A) of a layer k -> n at rank r (0: no term)."""
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5
    fwd = pass_name == "forward"
    a = torch.randn(m, k if fwd else n, device=DEVICE, dtype=dtype)
    b = w.t() if fwd else w
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if fwd else None
    u = torch.randn(m, r, device=DEVICE) if r else None
    v = (torch.randn(n, r, device=DEVICE, dtype=dtype).t() if fwd else torch.randn(r, k, device=DEVICE, dtype=dtype)
         ) if r else None
    return a, b, bias, u, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("pass_name", ["forward", "dx"])
@pytest.mark.parametrize("r", [0, 1, 5, 16, 32])  # (0: the base GEMM alone; 5: below its rank tile)
def test_the_warp_specialised_gemm_matches_the_reference(monkeypatch, dtype, pass_name, r):
    """``lora_gemm(warp_specialize=True)`` (bench/gpu_probe.py's ``+ws``
    rows: the K loop marked for Triton's warp specialisation, the
    precomputed term added as rank-one updates after it): the forward (Wᵀ
    through W's descriptor, a bias) and dx match their products in float64
    at ragged M, N and K over several tiles, every element written (the
    output starts as NaN), the kernel launched with the flag; the same
    launch without it agrees to rounding (its term goes through a dot, u·s
    rounded to v's dtype first)."""
    k, n = interpreted_tma_k_n()
    m, scale = 123, 1.5
    a, b, bias, u, v = _warp_specialized_operands(pass_name, m, k, n, r, dtype)
    # (the probe's tile, narrowed to several tiles and K steps at these sizes: the interpreter runs any)
    cfg = dataclasses.replace(configs.WARP_SPECIALIZED_GEMM, block_m=32, block_n=32, block_k=32)
    flags = []
    real_launch = gemm.launch
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid, args, kwargs: flags.append(kwargs["WARP_SPECIALIZE"])
                        or real_launch(kernel, grid, args, kwargs))

    def run(ws):
        with poison_outputs():
            return gemm.lora_gemm(a, b, config=cfg, out_dtype=dtype, bias=bias, u=u, v=v, lr_scale=scale, tma=True,
                                  tma_device=True, warp_specialize=ws)

    c, xa = run(True)
    assert flags == [True] and xa is None
    want = a.double() @ b.double()
    if bias is not None:
        want = want + bias.double()
    if r:
        want = want + scale * (u.double() @ v.double())
    assert_close(c, want, dtype, f"{pass_name} warp-specialised")
    plain, _ = run(False)
    assert flags == [True, False]
    assert_close(c, plain.double(), dtype, "against the same launch without warp_specialize")
    if not r:  # (no term: the same K loop in the same order, bit for bit)
        assert torch.equal(c, plain)


def test_the_warp_specialised_gemm_runs_only_what_it_was_compiled_for():
    """What ``warp_specialize`` cannot run is a ValueError naming why (the
    kernel Triton's pass takes: one dot, the K loop's, through descriptors
    the kernel makes, on four warps, the term in one rank tile), never a
    silent fallback: the probe's rows time what they say."""
    k, n = interpreted_tma_k_n()
    a, b, bias, u, v = _warp_specialized_operands("forward", 40, k, n, 4, torch.float32)
    cfg = configs.WARP_SPECIALIZED_GEMM
    ok = dict(config=cfg, out_dtype=torch.float32, u=u, v=v, tma=True, tma_device=True, warp_specialize=True)
    gemm.lora_gemm(a, b, **ok)  # (the launch the cases below each change one thing of)
    wide = torch.randn(40, configs.GEMM_LR_MAX_BLOCK_R[4] + 1, device=DEVICE)
    cases = {
        "with the in-loop shrink": dict(u=None, shrink=torch.randn(k, 4, device=DEVICE)),
        "with the low-rank term's dropout mask": dict(dropout_p=0.1),
        "on 8 warps": dict(config=dataclasses.replace(cfg, num_warps=8)),
        "under split-K": dict(config=dataclasses.replace(cfg, block_k=16, split_k=2)),
        "on the persistent grid": dict(persistent=True),
        "with a rank of 33 in tiles of 32": dict(u=wide, v=torch.randn(wide.shape[1], n, device=DEVICE)),
        "without TMA loads through descriptors the kernel makes": dict(tma_device=False),
    }
    for why, change in cases.items():
        with pytest.raises(ValueError, match=f"lora_gemm: warp_specialize does not run {why}"):
            gemm.lora_gemm(a, b, **{**ok, **change})
    with pytest.raises(ValueError, match="warp_specialize does not run without TMA loads"):
        gemm.lora_gemm(a, b, **{**ok, "tma": False})
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="warp_specialize does not run with a quantized b"):
        gemm.lora_gemm(a, q.t(), b_scale=torch.rand(n, device=DEVICE), b_scale_dim=1, **ok)


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("k", [96, 75])  # whole K blocks, and a ragged K tail in the last split
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_split_k(split_k, k, dtype):
    """Split-K: the low-rank term (and its mask) and the bias are added once,
    every K block is counted once, the fp32 partials are summed in split order
    (bitwise reproducible), and a config asking for more splits than K has
    blocks runs with fewer, never an empty one."""
    m, n, r, p, seed, scale = 37, 45, 5, 0.3, 77, 1.5
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, k, device=DEVICE, dtype=dtype).t()  # strided, as Wᵀ is in the forward
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    u = torch.randn(m, r, device=DEVICE)
    v = torch.randn(r, n, device=DEVICE, dtype=dtype)
    base = configs.gemm_config(m, n, k, r, a.element_size(), False, _triton.interpreter())
    cfg = dataclasses.replace(base, split_k=split_k)
    keep = fused_lora.dropout_mask(seed, (m, n), p, device=DEVICE).double()
    want = a.double() @ b.double() + bias.double() + scale * (u.double() @ v.double()) * keep
    run = lambda: gemm.lora_gemm(a, b, bias=bias, u=u, v=v, lr_scale=scale, dropout_p=p, seed=seed, config=cfg,
                                 out_dtype=dtype)[0]
    c = run()
    assert_close(c, want, dtype, f"split_k={split_k}")
    assert torch.equal(run(), c)
    # the plain product (dW's form), and an empty K (hybrid's form: only the low-rank term and bias)
    c0, _ = gemm.lora_gemm(a, b, config=cfg, out_dtype=dtype)
    assert_close(c0, a.double() @ b.double(), dtype, "no low-rank term")
    ce, _ = gemm.lora_gemm(a[:, :0], b[:0], bias=bias, u=u, v=v, lr_scale=scale, config=cfg, out_dtype=dtype)
    assert_close(ce, bias.double() + scale * (u.double() @ v.double()), dtype, "empty K")


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("k, r", [(96, 16), (75, 5)])  # whole K blocks and rank tile; a K tail and a rank tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# dropout's mask on the low-rank term (dx) or on the shrink's input (the forward)
@pytest.mark.parametrize("p, masked", [(0.0, None), (0.3, "term"), (0.3, "input")])
def test_gemm_split_k_with_the_in_loop_shrink(split_k, k, r, dtype, p, masked, reduce_launches):
    """The in-loop shrink split along K (small M): each split adds its own
    part of s·(a·S)·V (masked, as dx's is with dropout; or with a·S replaced
    by drop(a)·S, as the forward's is) and stores its xa partial; one launch
    sums both sets of partials in split order (bitwise reproducible); xa is
    a·S (drop(a)·S) whole."""
    m, n, scale, seed = 37, 45, 0.7, 91
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, k, device=DEVICE, dtype=dtype).t()
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    shrink = torch.randn(r, k, device=DEVICE, dtype=dtype).t() / k ** 0.5  # strided, as Aᵀ is
    v = torch.randn(n, r, device=DEVICE, dtype=dtype).t()
    base = configs.gemm_config(m, n, k, r, a.element_size(), True, _triton.interpreter(),
                               epilogue_mask=masked == "term", shrink_mask=masked == "input")
    # (K tiles of at most 32: three K blocks to split, whatever the configuration; a GPU's spans K whole)
    base = dataclasses.replace(base, block_k=min(base.block_k, 32))
    cfg = dataclasses.replace(base, split_k=split_k)
    if masked == "input":  # (the mask of a (m, k), as the skinny pass draws it)
        dropped = a.double() * fused_lora.dropout_mask(seed, (m, k), p, device=DEVICE).double() / (1 - p)
        xa64, keep = dropped @ shrink.double(), 1.0
    else:
        xa64 = a.double() @ shrink.double()
        keep = fused_lora.dropout_mask(seed, (m, n), p, device=DEVICE).double()
    want = a.double() @ b.double() + bias.double() + scale * (xa64 @ v.double()) * keep
    run = lambda: gemm.lora_gemm(a, b, bias=bias, shrink=shrink, v=v, lr_scale=scale, dropout_p=p, seed=seed,
                                 shrink_dropout=masked == "input", config=cfg, out_dtype=dtype)
    c, xa = run()
    assert len(reduce_launches) == 1  # C's partials and xa's, in one launch
    assert_close(c, want, dtype, f"split_k={split_k}")
    assert_close(xa, xa64, dtype, "xa")
    again = run()
    assert torch.equal(again[0], c) and torch.equal(again[1], xa)
    unsplit = gemm.lora_gemm(a, b, bias=bias, shrink=shrink, v=v, lr_scale=scale, dropout_p=p, seed=seed,
                             shrink_dropout=masked == "input", config=dataclasses.replace(base, split_k=1),
                             out_dtype=dtype)
    assert_close(unsplit[0], want, dtype, "split_k=1")
    # (the same sum in another order: equal to rounding, not bitwise)
    assert_close(unsplit[1], xa.double(), torch.float32, "xa, split_k=1 vs split")  # (fp32 sums)


@pytest.fixture
def tma_on():
    with fused_lora.dispatch.use_tma(True):
        yield


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# (in_loop with dropout: the forward masks x's tiles for its shrink; dx, g in its K loop, its term in its epilogue)
@pytest.mark.parametrize("strategy, p", [("in_loop", 0.0), ("in_loop", 0.2), ("split", 0.0), ("split", 0.2)])
@pytest.mark.parametrize("where", ["host", "device"])
def test_tma_loads_match_the_reference(tma_on, monkeypatch, dtype, strategy, p, where):
    """With TMA on, every GEMM pass whose operands allow it reads its tiles
    through tensor descriptors (forward: Wᵀ through W's, transposed; dx: W;
    dW: dyᵀ through dy's, transposed), the copy engine's zero fill replacing
    the masks at ragged M, N and K edges, and split-K too; the descriptors
    made on the host for each launch, or (``set_tma_descriptors("device")``)
    by the kernel, from the same views."""
    used, other = [], []
    made, not_made = ("tma_descriptors", "_device_descriptors")[::1 if where == "host" else -1]
    real, real_other = getattr(gemm, made), getattr(gemm, not_made)
    monkeypatch.setattr(gemm, made, lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(gemm, not_made, lambda *a: other.append(a) or real_other(*a))
    k, n = interpreted_tma_k_n()
    x = torch.randn(2, 13, k, device=DEVICE, dtype=dtype).requires_grad_()  # M = 26, K ragged
    w, b, a, bb = make_params(k, n, 5, dtype, True)
    for t in (w, b, a, bb):
        t.requires_grad_()
    with fused_lora.dispatch.force_strategy(strategy), fused_lora.dispatch.use_tma_descriptors(where):
        plan = fused_lora.dispatch.plan(26, n, k, 5, dtype, p, fused_lora.dispatch.device_target(x.device).arch)
        if not plan.tma:
            pytest.skip("TMA needs Hopper (sm_90) or the interpreter")
        if _triton.interpreter():
            # (the interpreter splits K at this size: TMA under split-K, the in-loop shrink's too)
            assert plan.dx_gemm.split_k > 1 and plan.fwd_gemm.split_k > 1
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.25, dropout_p=p, seed=3, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    # forward, dx (under the dropout mask too) and dW, each through descriptors
    assert len(used) == 3 and all(d is not None for d in used) and other == []
    assert plan.tma_device == (where == "device")
    if where == "device":  # (none passed: the kernel makes them)
        assert all(d[0] is None and d[2] is None for d in used)
    assert [d[1] for d in used] == [False, False, True]  # A transposed: dW only
    assert [d[3] for d in used] == [True, False, False]  # B transposed: forward
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.25, dropout_p=p, seed=3, grads=names)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(names, grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.fixture
def three_programs(monkeypatch):
    """A persistent grid of three programs, on the GPU as under the
    interpreter, so that the test shapes give every program several tiles
    and some one more than others. Returns the counts the launcher asked for."""
    asked = []

    def three(*args, **kwargs):
        asked.append(configs.persistent_programs(*args, **kwargs))
        return 3

    monkeypatch.setattr(gemm, "persistent_programs", three)
    return asked


@pytest.mark.parametrize("dtype, tma", [(torch.float32, False), (torch.float16, False), (torch.float16, True)],
                         ids=["fp32", "fp16", "fp16-tma"])
# (in_loop with dropout: the forward's, the mask on the shrink's input)
@pytest.mark.parametrize("low_rank, p", [("none", 0.0), ("in_loop", 0.0), ("in_loop", 0.3), ("precomputed", 0.0),
                                         ("precomputed", 0.3)])
def test_persistent_grid_computes_every_tile_as_one_program_per_tile(three_programs, dtype, tma, low_rank, p):
    """Three programs walking all the output tiles (ragged M, N and K) write
    the same bits as one program per tile: the same tile code in the same
    order; nothing skipped (the output starts as NaN), nothing written twice."""
    m, n, k, r, scale, seed = 123, 75, interpreted_tma_k_n()[0], 5, 1.5, 9
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, k, device=DEVICE, dtype=dtype).t()
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    v = torch.randn(r, n, device=DEVICE, dtype=dtype)
    lr = {"none": {}, "in_loop": dict(shrink=torch.randn(k, r, device=DEVICE, dtype=dtype) / k ** 0.5, v=v,
                                      shrink_dropout=True),
          "precomputed": dict(u=torch.randn(m, r, device=DEVICE), v=v)}[low_rank]
    cfg = configs.gemm_config(m, n, k, r, a.element_size(), low_rank == "in_loop", _triton.interpreter(),
                              shrink_mask=low_rank == "in_loop" and p > 0)
    # (output tiles of at most 32x32: a GPU's 64x64 would cover 123x75 in four)
    cfg = dataclasses.replace(cfg, split_k=1, block_m=min(cfg.block_m, 32), block_n=min(cfg.block_n, 32))
    assert triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) > 3 * 2  # two tiles a program, or more

    def run(persistent):
        return gemm.lora_gemm(a, b, bias=bias, lr_scale=scale, dropout_p=p, seed=seed, config=cfg, out_dtype=dtype,
                              tma=tma, persistent=persistent, **lr)

    c1, xa1 = run(True)
    assert len(three_programs) == 1 and three_programs[0] >= 1
    c0, xa0 = run(False)
    assert len(three_programs) == 1  # (one program per tile: not asked)
    assert torch.equal(c1, c0)
    if low_rank == "in_loop":
        assert torch.equal(xa1, xa0)
    want = a.double() @ b.double() + bias.double()
    if low_rank == "in_loop":
        dropped = a.double() * fused_lora.dropout_mask(seed, (m, k), p, device=DEVICE).double() / (1 - p)
        want = want + scale * (dropped @ lr["shrink"].double() @ v.double())
    elif low_rank == "precomputed":
        keep = fused_lora.dropout_mask(seed, (m, n), p, device=DEVICE).double() if p else 1.0
        want = want + scale * (lr["u"].double() @ v.double()) * keep
    assert_close(c1, want, dtype, "persistent")
    # split-K keeps one program per (tile, split): the switch does not apply (a K step of at most 32, so that
    # K = 72 has the two K blocks a split needs on a GPU's tile too: a single block would run as one split)
    split = dataclasses.replace(cfg, split_k=2, block_k=min(cfg.block_k, 32))
    assert triton.cdiv(k, split.block_k) >= 2
    c2, xa2 = gemm.lora_gemm(a, b, bias=bias, lr_scale=scale, dropout_p=p, seed=seed, config=split,
                             out_dtype=dtype, tma=tma, persistent=True, **lr)
    assert len(three_programs) == 1
    assert_close(c2, want, dtype, "persistent switch under split-K")
    if low_rank == "in_loop":
        assert_close(xa1, dropped @ lr["shrink"].double(), dtype, "xa")
        assert_close(xa2, dropped @ lr["shrink"].double(), dtype, "xa under split-K")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy, p", [("in_loop", 0.0), ("split", 0.0), ("split", 0.2)])
def test_persistent_switch_runs_every_gemm_pass_persistent(three_programs, dtype, strategy, p):
    """With the persistent switch on, the forward, dx and dW GEMMs (those
    without split-K) run on the persistent grid, and the whole step gives the
    same bits as without it."""
    x = torch.randn(3, 47, 72, device=DEVICE, dtype=dtype).requires_grad_()  # M = 141
    w, b, a, bb = make_params(72, 90, 6, dtype, True)
    leaves = (x, w, b, a, bb)
    for t in leaves[1:]:
        t.requires_grad_()
    dy = torch.randn(3, 47, 90, device=DEVICE, dtype=dtype)

    def step():
        with fused_lora.dispatch.force_strategy(strategy):
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.25, dropout_p=p, seed=3, backend="triton")
            return (y, *torch.autograd.grad(y, leaves, dy))

    with fused_lora.dispatch.use_persistent(True):
        plan = fused_lora.dispatch.plan(141, 90, 72, 6, dtype, p, fused_lora.dispatch.device_target(x.device).arch,
                                        strategy=strategy)
        if not plan.persistent:
            pytest.skip("the persistent grid is for Hopper (sm_90) or the interpreter")
        got = step()
    unsplit = sum(c.split_k == 1 for c in (plan.fwd_gemm, plan.dx_gemm, plan.dw_gemm))
    assert len(three_programs) == unsplit > 0
    for g, want in zip(got, step()):
        assert torch.equal(g, want)


def test_tma_descriptors_only_where_the_copy_engine_can_read():
    cfg = configs.GemmConfig(32, 32, 32)
    a = torch.randn(40, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(48, 64, device=DEVICE, dtype=torch.float16)
    a_desc, a_t, b_desc, b_t = gemm.tma_descriptors(a, w.t(), cfg)
    assert not a_t and b_t and b_desc.block_shape == [32, 32]
    assert list(b_desc.shape) == [48, 64] and list(b_desc.strides) == [64, 1]  # (W's rows: Wᵀ read transposed)
    assert b_desc.base.data_ptr() == w.data_ptr() and list(a_desc.shape) == [40, 64]
    assert gemm.tma_descriptors(a[:, 1:], w.t()[1:], cfg) is None  # base not 16-byte aligned
    odd = torch.randn(40, 63, device=DEVICE, dtype=torch.float16)
    assert gemm.tma_descriptors(odd, torch.randn(63, 48, device=DEVICE, dtype=torch.float16), cfg) is None  # stride
    strided = torch.randn(40, 128, device=DEVICE, dtype=torch.float16)[:, ::2]
    assert gemm.tma_descriptors(strided, w.t(), cfg) is None  # no unit stride
    # rows of 144 bytes (72 fp16): TMA reads them; Triton 3.4/3.5's interpreters only rows of 16 elements
    rows72 = torch.randn(40, 72, device=DEVICE, dtype=torch.float16)
    assert gemm._tma_view(rows72, 1) == (40, 72, 72, False) and gemm._tma_view(rows72, 16) is None
    assert gemm._tma_view(torch.randn(40, 80, device=DEVICE, dtype=torch.float16), 16) is not None
    # where it cannot, the pointer path runs
    w_odd = torch.randn(40, 63, device=DEVICE, dtype=torch.float16)
    c, _ = gemm.lora_gemm(odd, w_odd.t(), config=cfg, out_dtype=torch.float32, tma=True)
    assert_close(c, odd.double() @ w_odd.double().t(), torch.float16, "pointer fallback")


def test_split_k_heuristic():
    """Split-K only where the output tiles leave SMs idle, bounded by the
    pipeline depth per split, the split cap and the workspace cap."""
    big = configs.gemm_config(8192, 4096, 4096, 16, 2, False, False)
    assert big.split_k == 1
    small = configs.gemm_config(16, 4096, 4096, 16, 2, False, False)
    tiles = -(-16 // small.block_m) * -(-4096 // small.block_n)
    assert small.split_k > 1 and tiles * small.split_k >= configs.NUM_SMS_SM90
    assert 4096 // small.block_k // small.split_k >= configs.SPLIT_K_MIN_BLOCKS
    assert configs.gemm_config(16, 4096, 256, 16, 2, False, False).split_k == 1  # K too short to split
    in_loop = configs.gemm_config(16, 4096, 4096, 16, 2, True, False)  # the in-loop shrink splits too
    assert in_loop.split_k > 1 and -(-4096 // in_loop.block_n) * in_loop.split_k >= configs.NUM_SMS_SM90
    # dW of a small layer over many tokens: the token axis is split
    assert configs.gemm_config(256, 256, 65536, 1, 2, False, False).split_k > 1


@pytest.mark.parametrize("arch, num_sms", [(90, 132), (90, 114), (80, 108), (89, 58), (120, 170), (86, 28)])
def test_the_grids_aim_at_the_gpus_own_sm_count(arch, num_sms):
    """The tile choice, split-K and the skinny passes' grids follow the SM
    count of the GPU at hand (an H100 PCIe has 114, an L4 58, an RTX 5090
    170): below a full wave of output tiles, split-K brings the grid to at
    least one program per SM where K allows and not far past it (one split
    fewer would leave SMs idle); with enough tiles there is no split; the
    rows of a tile never exceed the shortest tile's or M's bucket; the
    skinny passes aim at two programs per SM."""
    from fused_lora import dispatch

    smem = configs.smem_limit_for(arch)
    for m, n, k, r, elt, in_loop in itertools.product((1, 16, 64, 256, 1024, 4096), (256, 4096, 14336),
                                                      (4096, 65536), (8, 64), (2, 4), (False, True)):
        if in_loop and r > configs.in_loop_max_block_r(elt):
            continue
        cfg = configs.gemm_config(m, n, k, r, elt, in_loop, False, arch=arch, smem_limit=smem, num_sms=num_sms)
        cands = configs.gemm_candidates(elt, configs.block_r_for(r) if in_loop else
                                        configs.block_r_for(r, configs.GEMM_LR_MAX_BLOCK_R[elt]), in_loop,
                                        smem_limit=smem, arch=arch)
        mb = configs.m_bucket(m)
        assert cfg.block_m <= max(min(c.block_m for c in cands), mb), (m, n, cfg)
        tiles = -(-mb // cfg.block_m) * -(-n // cfg.block_n)
        # (split-K's caps: a pipeline of SPLIT_K_MIN_BLOCKS K blocks a split, SPLIT_K_MAX, the workspace)
        cap = min(-(-k // cfg.block_k) // configs.SPLIT_K_MIN_BLOCKS, configs.SPLIT_K_MAX,
                  configs.SPLIT_K_MAX_WORKSPACE_BYTES // (4 * mb * n))
        if tiles >= num_sms:
            assert cfg.split_k == 1, (m, n, k, cfg)
        else:
            assert 1 <= cfg.split_k <= max(cap, 1), (m, n, k, cfg)
            # every SM gets a program, unless a cap stopped the splitting first
            assert tiles * cfg.split_k >= num_sms or cfg.split_k == max(cap, 1), (m, n, k, cfg)
            # and one split fewer would leave SMs idle
            assert cfg.split_k == 1 or tiles * (cfg.split_k - 1) < num_sms, (m, n, k, cfg)
    p = dispatch.plan(16, 4096, 4096, 16, torch.bfloat16, 0.0, arch, interpreter=False, smem_limit=smem,
                      num_sms=num_sms)
    assert p.skinny_programs == 2 * num_sms
    assert p.fwd_gemm == configs.gemm_config(16, 4096, 4096, 16, 2, True, False, arch=arch, smem_limit=smem,
                                             num_sms=num_sms)
    with pytest.raises(ValueError, match="num_sms"):
        dispatch.plan(16, 4096, 4096, 16, torch.bfloat16, 0.0, arch, interpreter=False, num_sms=0)


def test_fewer_sms_never_split_more():
    """The same problem on a GPU with fewer SMs is split no further (and
    with as many output tiles as SMs, not at all)."""
    for m, n, k in itertools.product((1, 16, 64, 256), (256, 4096, 14336), (4096, 65536)):
        splits = [configs.gemm_config(m, n, k, 16, 2, False, False, num_sms=sms).split_k for sms in (28, 58, 132, 170)]
        assert splits == sorted(splits), (m, n, k, splits)
        cfg = configs.gemm_config(m, n, k, 16, 2, False, False, num_sms=1)
        assert cfg.split_k == 1, (m, n, k, cfg)


def test_the_in_loop_dx_with_dropout_runs_only_on_tiles_that_hold_its_mask():
    """dx's in-loop shrink with its masked epilogue (small M, or in_loop
    forced) runs on tiles of at most 64 rows a warpgroup, with accumulator
    plus xa at most 96 fp32 elements a thread: 128x64 on 4 warps, and 128
    rank tiles on 64x128 and 128x128, spilled (compile report
    --every-variant); from a 64 rank tile, on at most 32 accumulator elements
    a thread (64x128 and 128x128 spilled there with several adapters'
    dropout probabilities, as the runtime specialises). The forward and the
    unmasked dx keep those tiles."""
    narrow_rows = configs.GemmConfig(128, 64, 64, 8, 4, 4)
    wide = configs.GemmConfig(128, 128, 64, 8, 8, 3)
    for block_r in configs.rank_tiles(128):
        masked = configs.gemm_candidates(2, block_r, True, epilogue_mask=True)
        assert masked and narrow_rows not in masked and configs.GemmConfig(64, 64, 64, 8, 4, 4) in masked
        for c in masked:
            assert c.block_m * 4 <= 64 * c.num_warps
            assert c.block_m * (c.block_n + block_r) // (32 * c.num_warps) <= 96
        assert (wide in masked) == (block_r < 64), block_r
        assert block_r < 64 or all(c.elems_per_thread() <= 32 for c in masked), block_r
        if block_r <= 64:
            assert narrow_rows in configs.gemm_candidates(2, block_r, True)
            assert narrow_rows in configs.gemm_candidates(2, block_r, False, epilogue_mask=True)
    with fused_lora.dispatch.force_strategy("in_loop"):
        big = fused_lora.explain((4096, 4096), (4096, 4096), 32, torch.bfloat16, 0.1).plan
        wide_rank = fused_lora.explain((4096, 4096), (4096, 4096), 64, torch.bfloat16, 0.1).plan
    assert big.dx_in_loop and big.dx_gemm.block_m * big.dx_gemm.block_n == 128 * 128
    assert wide_rank.dx_in_loop and wide_rank.dx_gemm.block_m * wide_rank.dx_gemm.block_n == 64 * 64


def test_the_in_loop_shrink_runs_only_with_rank_tiles_that_fit():
    """The in-loop shrink holds its whole rank tile beside the accumulator:
    the configurations and the dispatch keep it where it does not spill
    (compile report): fp32 up to a 16 tile, 16-bit up to 128 on tiles whose
    accumulator and xa fit, the persistent grid up to 32. Beyond, the dispatch
    runs split (and a persistent request runs one program a tile)."""
    d = fused_lora.dispatch
    assert configs.gemm_candidates(4, 16, True) and configs.gemm_candidates(4, 32, True) == []
    assert configs.gemm_candidates(2, 256, True) == []
    assert configs.gemm_candidates(2, 32, True, persistent=True)
    assert configs.gemm_candidates(2, 64, True, persistent=True) == []
    wide = configs.gemm_candidates(2, 128, True)
    assert wide and configs.GemmConfig(128, 64, 64, 8, 4, 4) not in wide  # the tile that spilled 450-630 B
    assert configs.GemmConfig(128, 64, 64, 8, 4, 4) in configs.gemm_candidates(2, 64, True)
    for c in wide:
        assert c.block_m * (c.block_n + 128) // (32 * c.num_warps) <= configs.IN_LOOP_MAX_ELEMS_PER_THREAD[2]
    fp32 = configs.gemm_candidates(4, 16, True)  # (FMA dots: only the narrow tiles)
    assert fp32 and configs.GemmConfig(64, 128, 32, 8, 4, 3) not in fp32
    with pytest.raises(ValueError, match="rank tile 32"):
        configs.gemm_config(16, 4096, 4096, 32, 4, True, False)
    for dtype, fits, too_big in ((torch.float32, 16, 17), (torch.bfloat16, 128, 129)):
        for target in ("sm_90", "interpreter"):
            assert fused_lora.explain((16, 256), (256, 256), fits, dtype, target=target).plan.strategy in (
                "in_loop", "hybrid")  # (fp32 on CUDA: hybrid)
            with d.force_strategy("in_loop"):
                assert fused_lora.explain((16, 256), (256, 256), fits, dtype, target=target).plan.strategy == "in_loop"
                big = fused_lora.explain((16, 256), (256, 256), too_big, dtype, target=target).plan
            assert big.strategy == "split" and f"rank tile ({fits})" in big.reason
    with d.use_persistent(True):
        assert fused_lora.explain((256, 4096), (4096, 4096), 32).plan.persistent
        narrow = fused_lora.explain((256, 4096), (4096, 4096), 64).plan
        assert narrow.strategy == "in_loop" and not narrow.persistent
        assert fused_lora.explain((8192, 4096), (4096, 4096), 64).plan.persistent  # split: no in-loop shrink
        # dx in loop with dropout (small M): not on the persistent grid at any rank tile
        assert configs.gemm_candidates(2, 16, True, True, persistent=True) == []
        # dx's masked epilogue on the persistent grid: a 64-wide rank chunk only on the 64x64 tiles
        chunk64 = configs.gemm_candidates(2, 64, False, True, persistent=True)
        assert chunk64 and {(c.block_m, c.block_n) for c in chunk64} == {(64, 64)}
        assert configs.GemmConfig(128, 128, 64, 8, 8, 4) in configs.gemm_candidates(2, 32, False, True,
                                                                                     persistent=True)
        assert configs.GemmConfig(128, 128, 64, 8, 8, 4) in configs.gemm_candidates(2, 64, False, persistent=True)
        masked = fused_lora.explain((64, 4096), (4096, 4096), 16, dropout_p=0.1).plan
        assert masked.strategy == "split" and masked.dx_in_loop and not masked.persistent
        assert fused_lora.explain((8192, 4096), (4096, 4096), 16, dropout_p=0.1).plan.persistent


def test_the_masked_in_loop_shrink_runs_only_on_tiles_that_hold_its_mask():
    """The in-loop forward with dropout (forced) also holds its masked x
    tile: the configurations drop the two 4-warp tiles with 64 masked
    elements a thread (they spill, compile report), and fp32 runs it up to a
    16-wide rank tile; beyond, a forced ``in_loop`` runs split. Without the
    force, dropout runs split above ``IN_LOOP_DROPOUT_MAX_M`` tokens, in_loop
    at or below (fp32 on CUDA: hybrid)."""
    d = fused_lora.dispatch
    spilled = (configs.GemmConfig(128, 64, 64, 8, 4, 4), configs.GemmConfig(64, 64, 128, 8, 4, 3))
    for block_r in (16, 32, 64):
        plain = configs.gemm_candidates(2, block_r, True)
        masked = configs.gemm_candidates(2, block_r, True, shrink_mask=True)
        assert set(spilled) <= set(plain) and set(masked) == set(plain) - set(spilled), block_r
        for c in masked:
            assert c.block_m * c.block_k // (32 * c.num_warps) <= configs.SHRINK_MASK_MAX_ELEMS_PER_THREAD
    assert configs.gemm_candidates(2, 128, True, shrink_mask=True)
    assert configs.gemm_candidates(4, 16, True, shrink_mask=True)
    assert configs.gemm_candidates(4, 32, True, shrink_mask=True) == []  # (nor without the mask, at fp32)
    # on the persistent grid: up to its in-loop rank tile, 32, as without the mask
    assert configs.gemm_candidates(2, 32, True, persistent=True, shrink_mask=True)
    assert configs.gemm_candidates(2, 64, True, persistent=True, shrink_mask=True) == []
    for m in (16, 4096):  # the CUDA heuristic's pick, at small and large M
        cfg = configs.gemm_config(m, 4096, 4096, 64, 2, True, False, shrink_mask=True)
        assert dataclasses.replace(cfg, split_k=1) in configs.gemm_candidates(2, 64, True, shrink_mask=True)
    for dtype, fits, too_big in ((torch.float32, 16, 17), (torch.bfloat16, 128, 129)):
        for target in ("sm_90", "interpreter"):
            above = d.IN_LOOP_DROPOUT_MAX_M + 1
            auto = fused_lora.explain((above, 256), (256, 256), fits, dtype, dropout_p=0.1, target=target).plan
            assert auto.strategy in ("split", "hybrid")
            small = fused_lora.explain((16, 256), (256, 256), fits, dtype, dropout_p=0.1, target=target).plan
            hybrid = dtype == torch.float32 and target == "sm_90"
            assert small.strategy == ("hybrid" if hybrid else "in_loop"), small
            assert hybrid or f"dropout at M=16 <= {d.IN_LOOP_DROPOUT_MAX_M}" in small.reason
            too_big_auto = fused_lora.explain((16, 256), (256, 256), too_big, dtype, dropout_p=0.1, target=target)
            assert too_big_auto.plan.strategy in ("split", "hybrid")
            with d.force_strategy("in_loop"):
                forced = fused_lora.explain((16, 256), (256, 256), fits, dtype, dropout_p=0.1, target=target)
                big = fused_lora.explain((16, 256), (256, 256), too_big, dtype, dropout_p=0.1, target=target).plan
            assert forced.plan.strategy == "in_loop" and "each N tile draws the mask" in forced.plan.reason
            assert "mask drawn once per N tile" in str(forced)
            assert big.strategy == "split" and f"rank tile with dropout ({fits})" in big.reason


def test_every_gpu_gets_tiles_that_fit_its_shared_memory():
    """The stage counts are Hopper's (227 KiB a program): on a GPU with less
    (A100 163 KiB; the GeForce, RTX and L4/L40 parts 99) a tile whose stages
    do not fit runs with as many as do, at least two, and the dispatch plans
    every GEMM of every strategy, rank and M bucket within the limit."""
    d = fused_lora.dispatch
    shipped = configs.shipped_configs()
    for elt, pool in ((2, shipped["gemm_16bit"]), (4, shipped["gemm_fp32"])):  # (Hopper: as shipped)
        for block_r in (16, 64):
            assert set(configs.gemm_candidates(elt, block_r, False)) <= set(pool)
    small = configs.gemm_candidates(2, 16, False, smem_limit=101_376, arch=86)
    assert configs.GemmConfig(128, 128, 64, 8, 8, 2) in small  # (shipped with 3 and 4 stages: once)
    assert len(small) == len(set(small)) and all(c.num_stages >= 2 for c in small)
    # the in-loop shrink's widest rank tile still has a tile, on the narrowest one
    assert configs.gemm_candidates(2, 128, True, smem_limit=101_376, arch=86) == [
        configs.GemmConfig(64, 64, 64, 8, 4, 2)]
    assert configs.smem_limit_for(89) == configs.smem_limit_for(86) == 101_376
    assert configs.smem_limit_for(121) == configs.smem_limit_for(122) == 101_376  # (a newer minor: its major's)
    assert configs.smem_limit_for(80) == 166_912 and configs.smem_limit_for(90) == configs.SMEM_LIMIT_SM90
    with pytest.raises(ValueError, match="sm_80 or newer, got sm_75"):
        configs.smem_limit_for(75)
    with pytest.raises(ValueError, match="no shared-memory limit is known for sm_130"):
        configs.smem_limit_for(130)
    targets = [(arch, None) for arch in configs.SMEM_LIMIT_BY_ARCH] + [(90, 101_376)]  # (a limit read from a device)
    for (arch, device_limit), dtype, p, strategy, persistent in itertools.product(
            targets, (torch.bfloat16, torch.float32), (0.0, 0.1), (None, "in_loop", "split", "hybrid"),
            (False, True)):
        elt = dtype.itemsize
        limit = device_limit or configs.smem_limit_for(arch)
        for m, r in itertools.product((1, 16, 256, 4096, 16384), (1, 16, 17, 33, 64, 128)):
            with d.use_persistent(persistent):
                plan = d.plan(m, 4096, 4096, r, dtype, p, arch=arch, interpreter=False, strategy=strategy,
                              smem_limit=device_limit)
            for cfg, in_loop in ((plan.fwd_gemm, plan.strategy == "in_loop"), (plan.dx_gemm, plan.dx_in_loop),
                                 (plan.dw_gemm, False)):
                block_r = configs.block_r_for(1 if cfg is plan.dw_gemm else r,
                                              configs.MAX_BLOCK_R if in_loop else configs.GEMM_LR_MAX_BLOCK_R[elt])
                rank_loop = cfg is not plan.dw_gemm and not in_loop and r > block_r
                assert cfg.smem_bytes(elt, block_r, in_loop, rank_loop) <= limit, (arch, limit, dtype, p, strategy, m,
                                                                                   r, cfg)
            # the skinny passes likewise, at every rank tile (SHRINK's column loop: as many stages as fit,
            # at most the shipped count, at least 1)
            skinny = plan.skinny
            shipped_skinny = configs.SKINNY_FP32 if elt == 4 else configs.SKINNY_16BIT
            assert skinny == dataclasses.replace(shipped_skinny, smem_limit=limit)
            for block_r in configs.rank_tiles(skinny.max_block_r):
                stages = skinny.stages_for(elt, block_r)
                assert 1 <= stages <= shipped_skinny.shrink_stages
                assert skinny.smem_bytes(elt, block_r) == skinny.smem_bytes(elt, block_r, stages) <= limit
                assert stages == shipped_skinny.shrink_stages or skinny.smem_bytes(elt, block_r, stages + 1) > limit
    # Hopper runs three stages at every rank tile; the 99 KB parts fewer at the 64-column one
    sk = configs.SKINNY_16BIT
    assert configs.skinny_config(2, False, 4096, configs.SMEM_LIMIT_SM90) is sk
    assert [sk.stages_for(2, block_r) for block_r in (16, 32, 64)] == [3, 3, 3]
    small = configs.skinny_config(2, False, 4096, 101_376)
    assert [small.stages_for(2, block_r) for block_r in (16, 32, 64)] == [3, 3, 1]
    assert sk.smem_bytes(2, 64) == 139_264  # (the compiled dy pass's with dB: the report checks the bound)
    with pytest.raises(ValueError, match="sm_80 or newer"):
        fused_lora.explain((16, 64), (64, 64), 8, target="sm_75")
    # the persistent grid buffers more than the estimate counts: with Hopper's shared memory only
    with d.use_persistent(True), d.use_tma(True):
        for arch, device_limit, runs in ((90, None, True), (100, None, True), (120, None, False), (90, 101_376, False)):
            plan = d.plan(8192, 4096, 4096, 16, torch.bfloat16, 0.0, arch=arch, interpreter=False,
                          smem_limit=device_limit)
            assert plan.persistent == runs and plan.tma == (arch >= 90), (arch, device_limit)


def test_with_mma_sync_the_in_loop_wide_ranks_run_on_the_narrow_tiles():
    """mma.sync (sm_8x, sm_12x) keeps its operands in registers: above a
    32-wide rank tile (16 with dx's masked epilogue) the in-loop shrink runs
    on the tiles with 32 accumulator elements a thread (the others spill,
    compile report, sm_80 and sm_120); Hopper's and sm_10x's tiles are
    unchanged, and so is the dispatch's choice at small M (already the
    narrow tiles)."""
    assert [configs.uses_mma_sync(a) for a in (80, 86, 89, 90, 100, 103, 120, 121)] == [True] * 3 + [False] * 3 + [
        True] * 2
    cap = configs.MMA_SYNC_IN_LOOP_WIDE_RANK_MAX_ELEMS_PER_THREAD
    # (the widest 8-warp tile, with the stages that fit: A100 163 KiB, sm_120 99)
    for arch, stages in ((80, 4), (120, 2)):
        wide = configs.GemmConfig(128, 128, 64, 8, 8, stages)
        target = dict(arch=arch, smem_limit=configs.smem_limit_for(arch))
        for epilogue_mask, narrow in configs.MMA_SYNC_IN_LOOP_NARROW_BLOCK_R.items():
            for block_r in configs.rank_tiles(128):
                cands = configs.gemm_candidates(2, block_r, True, epilogue_mask, **target)
                assert cands, (arch, epilogue_mask, block_r)
                if block_r > narrow:
                    assert all(c.elems_per_thread() <= cap for c in cands), (arch, epilogue_mask, block_r)
                else:
                    assert wide in cands, (arch, epilogue_mask, block_r)
        assert wide in configs.gemm_candidates(2, 64, False, True, **target)  # (the split dx: its own rule)
        for r in (64, 128):
            assert fused_lora.explain((16, 4096), (4096, 4096), r, target=f"sm_{arch}").plan.strategy == "in_loop"
    for arch in (90, 100):
        assert configs.GemmConfig(128, 128, 64, 8, 8, 4) in configs.gemm_candidates(2, 64, True, arch=arch)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_zero_tokens(lead, p):
    w, b, a, bb = make_params(16, 12, 4, torch.float32, True)
    for t in (w, b, a, bb):
        t.requires_grad_()
    x = torch.randn(*lead, 16, device=DEVICE, requires_grad=True)
    y = fused_lora.lora_linear(x, w, a, bb, b, dropout_p=p, backend="triton")
    assert y.shape == (*lead, 12)
    grads = torch.autograd.grad(y.sum(), (x, w, b, a, bb))
    assert grads[0].shape == x.shape
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_zero_in_features():
    w, b, a, bb = make_params(0, 6, 3, torch.float32, True)
    bb.requires_grad_()
    x = torch.randn(5, 0, device=DEVICE)
    y = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
    assert torch.equal(y, b.expand(5, 6))
    (g,) = torch.autograd.grad(y.sum(), (bb,))
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("strategy", ["in_loop", "split", "hybrid"])
def test_64_bit_mask_counters_draw_the_same_mask(monkeypatch, strategy):
    """A mask over 2**31 elements or more (524,288 tokens of a 4096-wide
    layer: too big for this test) draws with 64-bit Philox counters. Switched
    on here at a small size, every pass that draws it (the forward shrink,
    dx's epilogue or, in_loop forced, the forward's in-loop shrink and dx's
    in-loop g, and the dA pass) gives bitwise the output and gradients of
    the 32-bit counters, as ``keep_mask`` promises below 2**31; they match
    float64 too. Every mask is x's (M, K): the switch follows M·K, whatever
    the GEMM's own output (the forward's is (M, N), N > K here)."""
    from fused_lora.kernels import common

    drawn = []  # (kernel, OFFSET_INT64) of each launch that draws the mask
    for module, name, flags in ((gemm, "lora_gemm_kernel", ("LR_DROPOUT", "SHRINK_DROPOUT")),
                                (skinny, "lora_skinny_kernel", ("DROPOUT",))):
        real = getattr(module, name)

        class Recording:
            def __getitem__(self, grid, real=real, name=name, flags=flags):
                def launch(*args, **meta):
                    if any(meta[flag] for flag in flags):
                        drawn.append((name, meta["OFFSET_INT64"]))
                    return real[grid](*args, **meta)
                return launch

        monkeypatch.setattr(module, name, Recording())
    m, k, n, r, p = 37, 40, 72, 5, 0.3
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(k, n, r, torch.float32, True)
    for t in (b, a, bb):
        t.requires_grad_()
    dy = torch.randn(m, n, device=DEVICE)
    runs = []
    for numel in (m * k + 1, m * k):  # (the threshold just above x's size, then at it: 32, then 64 bits)
        monkeypatch.setattr(common, "MASK_INT64_NUMEL", numel)
        drawn.clear()
        with fused_lora.dispatch.force_strategy(strategy):
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=91, backend="triton")
            runs.append((y, *torch.autograd.grad(y, (x, b, a, bb), dy)))
        # the forward shrink (in the forward GEMM under in_loop), dx and the dA pass, each with the switch as set
        forward = "lora_gemm_kernel" if strategy == "in_loop" else "lora_skinny_kernel"
        assert [kernel for kernel, _ in drawn] == [forward, "lora_gemm_kernel", "lora_skinny_kernel"]
        assert {wide for _, wide in drawn} == {numel == m * k}
    for int32, int64 in zip(*runs):
        assert torch.equal(int32, int64)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=91, grads=("x", "bias", "lora_A",
                                                                                         "lora_B"))
    assert_close(runs[1][0], y64, torch.float32, "y")
    for name, g in zip(("x", "bias", "lora_A", "lora_B"), runs[1][1:]):
        assert_close(g, g64[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("strategy", ["in_loop", "split", "hybrid"])
def test_offsets_past_2_31_elements(monkeypatch, strategy):
    """On a GPU, x, y, dy and dx of more than 2**31 elements (2**23 + 37 rows
    of 256 features in bf16, 4.3 GB each): every pass (forward, dy pass, dx,
    dA, dW) must index them with 64-bit offsets, and the dropout mask switches
    to 64-bit counters, so the rows past 2**31 elements come out as right as
    the first. Checked against float64 in row slices (the mask's too, with
    ``dropout_mask(rows=...)``), so that no full-size float64 copy is made.
    Without a GPU the same test runs at a size the interpreter can, the 64-bit
    counters switched on by lowering their threshold: that checks the test
    itself (its slicing and its reference); only a GPU reaches the offsets."""
    from fused_lora.kernels import common

    p, scaling, seed = 0.1, 1.5, 2024
    if DEVICE.type == "cuda":
        dtype, k, n, r, chunk = torch.bfloat16, 256, 256, 16, 2**16
        m = 2**31 // k + 37
    else:
        dtype, k, n, r, chunk = torch.float32, 24, 40, 5, 64
        m = 203
        monkeypatch.setattr(common, "MASK_INT64_NUMEL", m * k)
    assert common.mask_counters_int64(m, k) and m * n >= common.MASK_INT64_NUMEL
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(k, n, r, dtype, True)
    for t in (w, b, a, bb):
        t.requires_grad_()
    with fused_lora.dispatch.force_strategy(strategy):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=scaling, dropout_p=p, seed=seed, backend="triton")
    dy = torch.randn_like(y)
    dx, dw, db, da, dbb = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    w64, b64, a64, bb64 = (t.detach().double() for t in (w, b, a, bb))
    sums = dict(weight=0.0, bias=0.0, lora_A=0.0, lora_B=0.0)
    for i in range(0, m, chunk):
        j = min(i + chunk, m)
        xs, dys = x[i:j].detach().double(), dy[i:j].double()
        keep = fused_lora.dropout_mask(seed, (m, k), p, device=DEVICE, rows=(i, j)).double() / (1 - p)
        xa = (xs * keep) @ a64.t()
        g = scaling * dys @ bb64
        assert_close(y[i:j], xs @ w64.t() + b64 + scaling * xa @ bb64.t(), dtype, f"y[{i}:{j}]")
        assert_close(dx[i:j], dys @ w64 + (g @ a64) * keep, dtype, f"dx[{i}:{j}]")
        sums["weight"] = sums["weight"] + dys.t() @ xs
        sums["bias"] = sums["bias"] + dys.sum(0)
        sums["lora_A"] = sums["lora_A"] + g.t() @ (xs * keep)
        sums["lora_B"] = sums["lora_B"] + scaling * dys.t() @ xa
    for name, got in zip(sums, (dw, db, da, dbb)):
        assert_close(got, sums[name], dtype, f"d{name}")
    del x, y, dy, dx
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()  # (the other shards of bench/gpu_check.sh share the GPU)


@pytest.mark.parametrize("strategy", ["in_loop", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_reproducible_without_dropout(strategy, dtype):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        x = torch.randn(70, 48, device=DEVICE, dtype=dtype, requires_grad=True)
        w, b, a, bb = make_params(48, 40, 8, dtype, True)
        for t in (w, b, a, bb):
            t.requires_grad_()
        with fused_lora.dispatch.force_strategy(strategy):
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.5, backend="triton")
            runs.append((y, *torch.autograd.grad(y, (x, w, b, a, bb), torch.ones_like(y))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_only_the_needed_gradients_run(monkeypatch):
    """needs_input_grad decides the passes: no dx GEMM when x needs none,
    no dW GEMM for a frozen base, no dy pass when neither dB nor db is
    needed and the dx GEMM computes g."""
    calls = []
    real_gemm, real_skinny = K_.lora_gemm, K_.skinny_pass

    def gemm_spy(*a, **k):
        calls.append("gemm+g" if k.get("shrink") is not None else "gemm")
        return real_gemm(*a, **k)

    def skinny_spy(*a, **k):
        calls.append("skinny+g" if k.get("shrink") is not None else "skinny")
        return real_skinny(*a, **k)

    monkeypatch.setattr(K_, "lora_gemm", gemm_spy)
    monkeypatch.setattr(K_, "skinny_pass", skinny_spy)
    w, b, a, bb = make_params(20, 10, 2, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    x = torch.randn(9, 20, device=DEVICE)
    with fused_lora.dispatch.force_strategy("in_loop"):
        y = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
        assert calls == ["gemm+g"]
        calls.clear()
        y.sum().backward()
        assert calls == ["skinny+g", "skinny"]  # the dy pass (g, dB) and the dA pass; no dx, no dW
        calls.clear()
        x.requires_grad_()
        y = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
        calls.clear()
        y.sum().backward()
        assert calls == ["skinny", "gemm+g", "skinny"]  # dB; dx with g in its K loop; dA from that g
        calls.clear()
        bb.requires_grad_(False)
        y = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
        calls.clear()
        y.sum().backward()
        assert calls == ["gemm+g", "skinny"]  # nothing left for a dy pass to do
        calls.clear()
        y = fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.2, backend="triton")  # (x's tiles masked for xa)
        assert calls == ["gemm+g"]
        calls.clear()
        y.sum().backward()
        assert calls == ["gemm+g", "skinny"]
    calls.clear()
    with fused_lora.dispatch.force_strategy("split"):
        y = fused_lora.lora_linear(x, w, a, bb, b, backend="triton")
        calls.clear()
        y.sum().backward()
    assert calls == ["skinny+g", "gemm", "skinny"]


@pytest.mark.parametrize("m", [9, 300])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_set_of_gradients_matches_the_reference(m, p):
    """Whichever of (x, W, b, A, B) require grad, the output and exactly those
    gradients match the float64 reference: at 9 rows the dx GEMM computes g
    in its K loop (the dy pass keeps what is left of dB and db), at 300 the
    dy pass computes it, its rows split. (Training the bias alone once crashed: the dy
    pass then had nothing to compute but a column sum.)"""
    k, n, r = 40, 150, 3  # (150 columns: more than one column tile of the dy pass, so g costs it a sum)
    plan = fused_lora.dispatch.device_plan(torch.device(DEVICE), m, n, k, r, torch.float32, p)
    assert plan.dx_in_loop == (m == 9 and plan.strategy != "hybrid")  # (fp32 on CUDA: hybrid, cuBLAS's dx)
    for needs in itertools.product((False, True), repeat=5):
        if not any(needs):
            continue
        x = torch.randn(m, k, device=DEVICE)
        w, b, a, bb = make_params(k, n, r, torch.float32, True)
        leaves = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb}
        wanted = [name for name, need in zip(leaves, needs) if need]
        for name in wanted:
            leaves[name].requires_grad_()
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=77, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [leaves[name] for name in wanted], dy)
        y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=77, grads=wanted)
        assert_close(y, y64, torch.float32, f"y with {wanted}")
        for name, g in zip(wanted, grads):
            assert_close(g, g64[name], torch.float32, f"d{name} with {wanted}")


@pytest.mark.parametrize("m, in_loop", [(1, True), (17, True), (fused_lora.dispatch.SMALL_M, False),
                                        (fused_lora.dispatch.SMALL_M + 1, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # (fp32 on CUDA runs hybrid)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_small_m_dx_gemm_accumulates_g_in_its_k_loop(monkeypatch, m, in_loop, dtype, p):
    """At small M the dx GEMM runs as the in-loop forward with roles swapped
    (with dropout too, whatever the forward runs): g = dy·B comes from its
    K loop, the dy pass computes only dB and db, and dA is computed from that
    g. Where the dy pass needs its reductions anyway (256 rows: several row
    splits, on the interpreter's tiles as on CUDA's), and above SMALL_M, the
    dy pass computes g. Every gradient against float64 either way."""
    shrinks = []
    real_gemm, real_skinny = K_.lora_gemm, K_.skinny_pass

    def gemm_spy(*a, **k):
        shrinks.append(("gemm", k.get("shrink") is not None))
        return real_gemm(*a, **k)

    def skinny_spy(*a, **k):
        shrinks.append(("skinny", k.get("shrink") is not None))
        return real_skinny(*a, **k)

    monkeypatch.setattr(K_, "lora_gemm", gemm_spy)
    monkeypatch.setattr(K_, "skinny_pass", skinny_spy)
    # (152 columns: more than one column tile of the skinny pass on CUDA's tiles as on the
    # interpreter's, so that g's column splits need a sum on both; rows of 16-byte multiples, which
    # TMA reads: on sm_90 the in-loop dx through pointer loads runs split, dispatch.in_loop_faults)
    k, n, r = 48, 152, 5
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    w, b, a, bb = make_params(k, n, r, dtype, True)
    for t in (w, b, a, bb):
        t.requires_grad_()
    plan = fused_lora.dispatch.plan(m, n, k, r, dtype, p)
    forward_in_loop = not p or m <= fused_lora.dispatch.IN_LOOP_DROPOUT_MAX_M
    assert plan.strategy == ("in_loop" if forward_in_loop else "split") and plan.dx_in_loop == in_loop
    for interpreter in (True, False):  # (the same choice on both: this test runs on a GPU too)
        assert fused_lora.dispatch.plan(m, n, k, r, dtype, p, interpreter=interpreter).dx_in_loop == in_loop
    # the rule, on CUDA's tiles: in loop exactly where the dy pass then stores its sums directly (one
    # row split: up to 64 rows), sparing the launch that sums g's column splits
    for rows, spared in ((1, True), (64, True), (65, False), (256, False)):
        cuda = fused_lora.dispatch.plan(rows, 4096, 4096, 16, dtype, p, interpreter=False)
        assert cuda.dx_in_loop == spared, rows
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=0.75, dropout_p=p, seed=8, backend="triton")
    dy = torch.randn_like(y)
    shrinks.clear()
    grads = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    # the dy pass, dx, dA, dW, in that order
    assert shrinks == [("skinny", not in_loop), ("gemm", in_loop), ("skinny", False), ("gemm", False)]
    _, g64 = reference64(x, w, b, a, bb, dy, scaling=0.75, dropout_p=p, seed=8)
    for name, g in zip(("x", "weight", "bias", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_small_m_backward_on_the_cuda_plan_has_one_reduction(monkeypatch, reduce_launches, p):
    """The CUDA (sm_90) plan of a decode-sized step, run on the interpreter:
    the dx GEMM splits its K (dy's 1104 columns: rows TMA reads, as the CUDA
    plan's in-loop dx needs on sm_90) and sums dx and g in one
    reduction launch; one row split covers the 17 rows, so the dy pass (dB,
    db) and the dA pass store their sums directly. One reduction launch in
    the whole backward, with dropout too; every gradient against float64."""
    real_plan = fused_lora.dispatch.plan
    monkeypatch.setattr(fused_lora.dispatch, "plan", lambda *a, **kw: real_plan(*a, **dict(kw, interpreter=False)))
    m, k, n, r, dtype = 17, 80, 1104, 5, torch.float16
    plan = fused_lora.dispatch.plan(m, n, k, r, dtype, p)
    assert plan.dx_in_loop and plan.dx_gemm.split_k > 1
    gemm_grids = count_launches(monkeypatch, gemm, "lora_gemm_kernel")
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    w, b, a, bb = make_params(k, n, r, dtype, True)
    for t in (b, a, bb):
        t.requires_grad_()
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=12, backend="triton")
    dy = torch.randn_like(y)
    gemm_grids.clear()
    reduce_launches.clear()
    grads = torch.autograd.grad(y, (x, b, a, bb), dy)
    assert len(gemm_grids) == 1 and gemm_grids[0][1] > 1  # dx, split along K
    assert len(reduce_launches) == 1
    _, g64 = reference64(x, w, b, a, bb, dy, scaling=2.0, dropout_p=p, seed=12,
                         grads=("x", "bias", "lora_A", "lora_B"))
    for name, g in zip(("x", "bias", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


def test_backward_follows_the_forced_forward_strategy(monkeypatch):
    """A strategy forced around the forward holds for its backward, even when
    the backward runs after the block, on another thread (as autograd's device
    threads do), where the force itself is not visible."""
    import threading

    seen = []
    real_plan = fused_lora.dispatch.plan

    def spy(*args, **kwargs):
        chosen = real_plan(*args, **kwargs)
        seen.append(chosen.strategy)
        return chosen

    monkeypatch.setattr(fused_lora.dispatch, "plan", spy)
    w, b, a, bb = make_params(24, 18, 3, torch.float32, True)
    a.requires_grad_()
    x = torch.randn(11, 24, device=DEVICE, requires_grad=True)
    with fused_lora.dispatch.force_strategy("hybrid"):
        y = fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.2, seed=5, backend="triton")
    dy = torch.randn_like(y)
    out = {}
    worker = threading.Thread(target=lambda: out.update(g=torch.autograd.grad(y, (x, a), dy)))
    worker.start()
    worker.join()
    assert seen == ["hybrid", "hybrid"]
    _, g64 = reference64(x, w, b, a, bb, dy, scaling=1.0, dropout_p=0.2, seed=5, grads=("x", "lora_A"))
    assert_close(out["g"][0], g64["x"], torch.float32, "dx")
    assert_close(out["g"][1], g64["lora_A"], torch.float32, "dA")
    with pytest.raises(ValueError, match="strategy"):
        real_plan(4, 4, 4, 1, torch.float32, 0.0, strategy="fastest")


def test_scaling_and_dropout_are_runtime_arguments():
    """Changing scaling, p or the seed never compiles a new kernel: they are
    plain runtime arguments (floats and a non-specialised int), not constexprs."""
    import inspect

    import triton.language as tl

    for kernel, names in ((gemm.lora_gemm_kernel, ("lr_scale", "p", "seed")),
                          (skinny.lora_skinny_kernel, ("sh_scale", "tn_scale", "p", "seed"))):
        fn = getattr(kernel, "fn", kernel)
        params = inspect.signature(fn).parameters
        for name in names:
            assert params[name].annotation is inspect.Parameter.empty or params[name].annotation != tl.constexpr
    if torch.cuda.is_available():
        w, b, a, bb = make_params(64, 48, 8, torch.float16, True)
        x = torch.randn(40, 64, device=DEVICE, dtype=torch.float16)
        fused_lora.lora_linear(x, w, a, bb, b, scaling=1.0, dropout_p=0.1, seed=1, backend="triton")
        before = sum(len(c[0]) for c in gemm.lora_gemm_kernel.device_caches.values()) \
            if hasattr(gemm.lora_gemm_kernel, "device_caches") else None
        for s, p, seed in ((2.5, 0.2, 17), (-3.0, 0.3, 2**31 - 5), (1e-3, 0.05, 48)):
            fused_lora.lora_linear(x, w, a, bb, b, scaling=s, dropout_p=p, seed=seed, backend="triton")
        if before is not None:
            after = sum(len(c[0]) for c in gemm.lora_gemm_kernel.device_caches.values())
            assert after == before


def test_switches_apply_where_they_can_and_are_restored():
    """TMA loads are on by default ("auto") for the 16-bit Triton GEMMs of a
    compiled sm_90+ target only, the persistent grid off; each applies to
    16-bit Triton GEMMs on Hopper (or the interpreter) only, and each
    ``use_*`` block restores the previous setting; explain says what is on
    and why."""
    d = fused_lora.dispatch
    x_shape, w_shape = (8192, 4096), (4096, 4096)
    assert d.tma_setting() == "auto"
    default = fused_lora.explain(x_shape, w_shape, 16)
    assert not default.plan.persistent and default.plan.tma == _triton.get().tma_available()
    if default.plan.tma:
        assert d.TMA_AUTO_REASON in str(default)
    assert not fused_lora.explain(x_shape, w_shape, 16, target="sm_80").plan.tma
    assert not fused_lora.explain(x_shape, w_shape, 16, target="interpreter").plan.tma
    assert not fused_lora.explain(x_shape, w_shape, 16, dtype=torch.float32).plan.tma  # hybrid: no K loop
    int8 = fused_lora.explain(x_shape, w_shape, 16, quantized="int8")  # (pointers unless forced: INT8_POINTERS)
    assert not int8.plan.tma and d.INT8_POINTERS in str(int8) and int8.plan.strategy == "split"
    with d.use_tma(True):
        assert fused_lora.explain(x_shape, w_shape, 16, quantized="int8").plan.tma == _triton.get().tma_available()
    with d.use_tma(False):
        assert d.tma_setting() is False
        pointers = fused_lora.explain(x_shape, w_shape, 16)
        assert not pointers.plan.tma and "through pointers (set_tma(False))" in str(pointers)
        with d.use_tma("auto"):
            assert fused_lora.explain(x_shape, w_shape, 16).plan == default.plan
        off = pointers.plan
    with d.use_tma(True):
        assert fused_lora.explain(x_shape, w_shape, 16, target="interpreter").plan.tma == \
            _triton.get().tma_available()
    assert d.tma_setting() == "auto"
    d.set_tma(False)
    try:
        assert fused_lora.explain(x_shape, w_shape, 16).plan == off
    finally:
        d.set_tma("auto")
    assert fused_lora.explain(x_shape, w_shape, 16).plan == default.plan
    with d.use_tma(False):
        with d.use_persistent(True):
            e = fused_lora.explain(x_shape, w_shape, 16)
            assert e.plan.persistent and "persistent" in str(e)
            assert not fused_lora.explain(x_shape, w_shape, 16, dtype=torch.float32).plan.persistent  # hybrid
            assert not fused_lora.explain(x_shape, w_shape, 16, target="sm_80").plan.persistent
            assert fused_lora.explain(x_shape, w_shape, 16, target="interpreter").plan.persistent
            with d.use_persistent(False):
                assert not fused_lora.explain(x_shape, w_shape, 16).plan.persistent
            assert fused_lora.explain(x_shape, w_shape, 16).plan.persistent
            with d.use_tma(True):
                both = fused_lora.explain(x_shape, w_shape, 16).plan
                assert both.persistent and both.tma == _triton.get().tma_available()
        assert fused_lora.explain(x_shape, w_shape, 16).plan == off


def test_the_descriptors_switch_applies_with_tma_loads_and_is_restored():
    """Who makes TMA's descriptors: the host by default; with
    ``set_tma_descriptors("device")`` the kernels, wherever TMA loads run
    (never without them), explain saying which; a bad value is refused,
    naming the argument; each ``use_`` block restores the setting."""
    d = fused_lora.dispatch
    x_shape, w_shape = (8192, 4096), (4096, 4096)
    assert d.tma_descriptors_setting() == "host"
    host = fused_lora.explain(x_shape, w_shape, 16)
    assert not host.plan.tma_device
    if host.plan.tma:
        assert d.TMA_DESCRIPTORS_HOST in str(host)
    with d.use_tma_descriptors("device"):
        assert d.tma_descriptors_setting() == "device"
        device = fused_lora.explain(x_shape, w_shape, 16)
        assert device.plan.tma_device == device.plan.tma == host.plan.tma
        assert dataclasses.replace(device.plan, tma_device=False) == host.plan
        if device.plan.tma:
            assert "descriptors made by the kernel" in str(device)
        assert not fused_lora.explain(x_shape, w_shape, 16, target="sm_80").plan.tma_device
        with d.use_tma(False):
            assert not fused_lora.explain(x_shape, w_shape, 16).plan.tma_device
        with d.use_tma_descriptors("host"):
            assert fused_lora.explain(x_shape, w_shape, 16).plan == host.plan
    assert d.tma_descriptors_setting() == "host" and fused_lora.explain(x_shape, w_shape, 16).plan == host.plan
    d.set_tma_descriptors("device")
    try:
        assert d.tma_descriptors_setting() == "device"
    finally:
        d.set_tma_descriptors("host")
    with pytest.raises(ValueError, match=r"where must be 'host' or 'device', got 'gpu'"):
        d.set_tma_descriptors("gpu")
    with pytest.raises(TypeError, match=r"where must be 'host' or 'device', got True"):
        d.use_tma_descriptors(True)
    assert d.tma_descriptors_setting() == "host"


def test_ensure_allocator_sets_torchs_where_none_is_and_keeps_the_users():
    """Kernels that make their descriptors need Triton's allocator for their
    global scratch; Triton keeps it in a ContextVar, which a new thread
    (autograd's backward threads) starts without: ensure_allocator sets
    torch's there, and leaves one the user set."""
    import threading

    from triton.runtime import _allocation

    def fresh_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    def unset_then_ensured():
        before = _allocation._allocator.get()
        gemm.ensure_allocator()
        return before, _allocation._allocator.get()

    before, after = fresh_thread(unset_then_ensured)
    assert isinstance(before, _allocation.NullAllocator) and after is gemm._torch_scratch

    def users():
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator(mine)
        gemm.ensure_allocator()
        return _allocation._allocator.get() is mine

    assert fresh_thread(users)


def test_the_in_loop_shrink_through_pointers_runs_split_on_compiled_hopper():
    """The first H200 run found the 16-bit in-loop shrink through pointer
    loads faulting (Triton 3.6, sm_90): a CUDA device of sm_90+ (and
    explain's sm_XY targets) runs such a plan split, its reason saying why;
    TMA loads (the default there) keep in_loop, unless the operands cannot
    be read through TMA (the launcher would fall back to pointers), which
    is asked only where it decides the plan. fp32, sm_80 and the interpreter
    keep their plans."""
    d = fused_lora.dispatch
    bf16 = torch.bfloat16

    def planned(m=8192, dtype=bf16, arch=90, tma=False, strategy=None, p=0.0):
        with d.use_tma(tma):
            return d.plan(m, 4096, 4096, 16, dtype, p, arch=arch, interpreter=False, strategy=strategy)

    # (48 rows with dropout: a split forward, above IN_LOOP_DROPOUT_MAX_M; dx in-loop, up to 64 rows)
    in_loop, small = planned(), planned(m=48, p=0.1)
    assert in_loop.strategy == "in_loop" and small.strategy == "split" and small.dx_in_loop
    assert d.in_loop_faults(in_loop, 90, bf16) and d.in_loop_faults(small, 90, bf16)
    assert d.in_loop_faults(planned(dtype=torch.float16, strategy="in_loop"), 100, torch.float16)
    assert d.in_loop_faults(planned(tma=True), 90, bf16) == (not _triton.get().tma_available())
    assert not d.in_loop_faults(planned(strategy="split"), 90, bf16)  # (dx reads g: no in-loop shrink)
    assert not d.in_loop_faults(planned(arch=80), 80, bf16)
    assert not d.in_loop_faults(planned(dtype=torch.float32, strategy="in_loop"), 90, torch.float32)

    asked = []

    def readable(answer):
        return lambda: asked.append(answer) or answer

    def split():
        return planned(strategy="split")

    guarded = d._without_faulting_in_loop(in_loop, 90, bf16, split, readable(True))
    assert guarded.strategy == "split" and guarded.reason.startswith(d.IN_LOOP_FAULT) and asked == []
    assert "planned: " + in_loop.reason in guarded.reason
    if _triton.get().tma_available():
        with_tma = planned(tma=True)
        assert d._without_faulting_in_loop(with_tma, 90, bf16, split, readable(True)) is with_tma
        fallen = d._without_faulting_in_loop(with_tma, 90, bf16, split, readable(False))
        assert fallen.strategy == "split" and "TMA cannot read these operands" in fallen.reason
        assert asked == [True, False]
        # not asked where the operands do not decide it
        for plan_, arch, dtype in ((planned(tma=True, strategy="split"), 90, bf16), (with_tma, 80, bf16),
                                   (planned(tma=True, dtype=torch.float32), 90, torch.float32)):
            assert d._without_faulting_in_loop(plan_, arch, dtype, split, readable(False)) is plan_
        assert asked == [True, False]
    # explain says what a device runs
    with d.use_tma(False):
        e = fused_lora.explain((8192, 4096), (4096, 4096), 16)
        assert e.plan.strategy == "split" and e.plan.reason.startswith(d.IN_LOOP_FAULT)
        assert fused_lora.explain((8192, 4096), (4096, 4096), 16, target="interpreter").plan.strategy == "in_loop"
        assert fused_lora.explain((8192, 4096), (4096, 4096), 16, target="sm_80").plan.strategy == "in_loop"


@pytest.mark.skipif(not gemm.tma_available(), reason="host-side tensor descriptors need Triton 3.4+")
def test_tma_readable_says_what_the_descriptors_take():
    """tma_readable: a 16-byte aligned base, one unit stride, the other a
    multiple of 16 bytes (column-major too, through its transpose); the
    launcher then reads both operands through descriptors."""
    t = torch.randn(40, 64, dtype=torch.float16)
    cfg = configs.GemmConfig(16, 16, 16, 1, 4, 1)
    assert gemm.tma_readable(t) and gemm.tma_readable(t.t()) and gemm.tma_readable(t, t.t())
    assert gemm.tma_descriptors(t, t.t(), cfg) is not None
    odd = torch.randn(40, 17, dtype=torch.float16)  # (a row of 34 bytes)
    for bad in (odd, t[:, 1:], t[::2, ::2]):
        assert not gemm.tma_readable(bad) and not gemm.tma_readable(t, bad)
        assert gemm.tma_descriptors(t, bad, cfg) is None and gemm.tma_descriptors(bad, t, cfg) is None
    assert gemm.tma_readable(torch.randn(40, 8, dtype=torch.float32))  # (32-byte rows)


def test_persistent_programs_fill_every_sm_once():
    """One program per SM for the 8-warp tiles (registers), more where the
    shared memory and registers of several fit (narrow 4-warp tiles)."""
    wide = configs.GemmConfig(128, 256, 64, 8, 8, 3)
    assert configs.persistent_programs(wide, 2, 16, True, False, num_sms=132) == 132
    narrow = configs.GemmConfig(64, 64, 64, 8, 4, 4)
    assert configs.persistent_programs(narrow, 2, 16, False, False, num_sms=132) == 2 * 132
    assert configs.persistent_programs(wide, 2, 16, True, True) == configs.INTERPRETER_PERSISTENT_PROGRAMS


def test_explain_says_what_runs_and_why():
    text = str(fused_lora.explain((8192, 4096), (4096, 4096), 16))
    assert "strategy: in_loop" in text and "sm_90 (132 SMs)" in text and "BLOCK_M=128" in text
    l4 = fused_lora.explain((16, 4096), (4096, 4096), 16, target="sm_89", num_sms=58)
    assert l4.plan.num_sms == 58 and l4.plan.skinny_programs == 2 * 58 and "sm_89 (58 SMs)" in str(l4)
    assert "SMs" not in str(fused_lora.explain((16, 64), (64, 64), 8, target="interpreter"))
    with pytest.raises(ValueError, match="num_sms must be >= 1, got 0"):
        fused_lora.explain((16, 4096), (4096, 4096), 16, num_sms=0)
    with pytest.raises(TypeError, match="num_sms must be an int"):
        fused_lora.explain((16, 4096), (4096, 4096), 16, num_sms=1.5)
    e = fused_lora.explain((4, 2048, 4096), (14336, 4096), 64, dropout_p=0.1)
    assert e.plan.strategy == "split" and "dropout" in e.plan.reason and e.m == 8192 and e.n == 14336
    assert "mask regenerated" in str(e)
    small = fused_lora.explain((16, 4096), (4096, 4096), 64)
    assert small.plan.strategy == "in_loop" and "small M" in small.plan.reason
    assert small.plan.fwd_gemm.split_k > 1 and small.plan.dx_gemm.split_k > 1  # 64 tiles of 64x64: SMs idle
    assert "split_k=" in str(small)
    assert "split_k=" in str(fused_lora.explain((16, 4096), (4096, 4096), 16, dropout_p=0.1))
    fp32 = fused_lora.explain((4096, 1024), (1024, 1024), 16, dtype=torch.float32)
    assert fp32.plan.strategy == "hybrid" and "cuBLAS" in str(fp32)
    # hybrid's launches write the low-rank term alone (an empty K loop): the store-bound tile, at every M
    # and element size, never split along K (at M=16 the GEMM's tile splits three ways)
    with fused_lora.dispatch.force_strategy("hybrid"):
        for m, dtype in itertools.product((1, 16, 8192), (torch.bfloat16, torch.float16, torch.float32)):
            plan = fused_lora.explain((m, 4096), (4096, 4096), 16, dtype=dtype).plan
            assert plan.fwd_gemm == plan.dx_gemm == configs.LOW_RANK_ONLY_GEMM[dtype.itemsize], (m, dtype)
            assert plan.fwd_gemm.split_k == 1 and plan.fwd_gemm.num_stages == 1
        assert "empty K loop: the store-bound tile" in str(fused_lora.explain((16, 4096), (4096, 4096), 16))
    assert fused_lora.explain((4096, 1024), (1024, 1024), 16, dtype=torch.float32,
                              target="interpreter").plan.strategy == "in_loop"
    with fused_lora.dispatch.force_strategy("in_loop"):
        forced = fused_lora.explain((64, 32), (32, 32), 4, dropout_p=0.2)
        too_wide = fused_lora.explain((64, 32), (32, 32), 20, dtype=torch.float32, dropout_p=0.2)
    assert forced.plan.strategy == "in_loop" and "forced" in forced.plan.reason
    assert too_wide.plan.strategy == "split" and "cannot run" in too_wide.plan.reason
    for bad in (dict(x_shape=(4, 3), weight_shape=(5, 4), r=2), dict(x_shape=(4, 4), weight_shape=(5, 4), r=0),
                dict(x_shape=(4, 4), weight_shape=(5, 4), r=2, target="gpu")):
        with pytest.raises(ValueError):
            fused_lora.explain(**bad)
    with pytest.raises(ValueError, match="strategy"):
        with fused_lora.dispatch.force_strategy("fastest"):
            pass


def test_autotune_picks_the_fastest_candidate_per_bucket_and_remembers(monkeypatch):
    from fused_lora import dispatch

    cands = configs.gemm_candidates(2, 16, True, False)
    assert len(cands) >= 3
    fastest = cands[2]
    timed = []
    monkeypatch.setattr(dispatch, "device_target",
                        lambda device: _triton.CudaTarget(90, configs.SMEM_LIMIT_SM90, configs.NUM_SMS_SM90))
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: fn())
    dispatch.set_autotune(True)
    try:
        def launch(config):
            timed.append(config)
            if config == cands[0]:
                raise RuntimeError("out of resources")  # skipped, not fatal
            return 1.0 if config == fastest else 2.0

        kw = dict(m=5000, n=4096, k=4096, r=16, dtype=torch.bfloat16, shrink_in_loop=True, epilogue_mask=False,
                  device=torch.device("cuda"))
        default = configs.gemm_config(5000, 4096, 4096, 16, 2, True, False)
        assert dispatch.gemm_config_for("forward", default, launch, **kw) == fastest  # (split_k=1 at this M)
        assert len(timed) == len(cands)
        # same bucket (M 5000 and 7000 both round up to 8192): no new timing
        assert dispatch.gemm_config_for("forward", default, launch, **dict(kw, m=7000)) == fastest
        assert len(timed) == len(cands)
        assert list(dispatch.tuned_configs().values()) == [fastest]
        # the interpreter / CPU never tunes
        assert dispatch.gemm_config_for("forward", default, launch, **dict(kw, device=torch.device("cpu"))) is default
    finally:
        dispatch.set_autotune(False)
    assert dispatch.tuned_configs() == {}
    assert dispatch.gemm_config_for("forward", default, launch, **kw) is default


@pytest.mark.skipif(not _triton.interpreter(), reason="Triton's CPU interpreter only")
def test_the_interpreter_patches_the_language_once_per_launch(monkeypatch):
    """fused_lora.testing.fewer_interpreter_patches (on for the whole suite):
    a forward and backward with dropout, with it and with the interpreter as
    Triton ships it, give the same bits, while it patches the language once
    per launch (and for Triton's helpers, tl.zeros, whose module sees
    triton.language.core) instead of again at each helper call in each
    program; on leaving it, the
    interpreter is as it was."""
    from triton.runtime import interpreter

    from fused_lora.testing import fewer_interpreter_patches

    if not hasattr(interpreter, "_LangPatchScope"):
        pytest.skip(f"Triton {triton.__version__}'s interpreter never undoes its patches: the context does nothing")
    shipped_patch = interpreter._patch_lang.__wrapped__  # (the suite runs with it on)
    shipped_call = interpreter.GridExecutor.__call__.__wrapped__
    patched = []

    def counting(fn):
        patched.append(fn.__name__)
        return shipped_patch(fn)

    monkeypatch.setattr(interpreter, "_patch_lang", counting)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", shipped_call)
    x = torch.randn(2, 37, 45, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(45, 70, 6, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()

    def step():
        patched.clear()
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=0.3, seed=5, backend="triton")
        return (y, *torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))), list(patched)

    shipped, every_call = step()
    with fewer_interpreter_patches() as on:
        assert on
        fewer, once = step()
    assert interpreter._patch_lang is counting and interpreter.GridExecutor.__call__ is shipped_call
    for s, f in zip(shipped, fewer):
        assert torch.equal(s, f)
    kernels = {"lora_gemm_kernel", "lora_skinny_kernel", "reduce_partials_kernel"}
    launches = [name for name in every_call if name in kernels]
    assert launches and [name for name in once if name in kernels] == launches  # (each launch patches)
    # (the others: Triton's own helpers, tl.zeros, tl.cdiv, whose module sees triton.language.core)
    assert len(every_call) > 4 * len(once) and all(hasattr(triton.language, n) for n in set(once) - kernels), once
