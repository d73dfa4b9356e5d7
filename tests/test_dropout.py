"""The dropout mask: one stream shared by the kernels and the PyTorch helper,
reproducible from the seed, with the right statistics."""

import contextlib
import math

import pytest
import torch
import triton
import triton.language as tl

import fused_lora
from fused_lora.dropout import halves16, keep_threshold, philox4x32, philox_randint4x
from fused_lora.kernels import gemm, skinny
from fused_lora.kernels.common import keep_mask, rows_dropout_p, seed_arg
from fused_lora.kernels.configs import GemmConfig
from lora_testing import DEVICE, assert_close, make_params, make_x


def _u32(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("counter, key, expected", [
    # Random123's known-answer vectors for philox4x32_10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(*(_u32(c) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _rand_kernel(words_ptr, keep_ptr, seed, row0, col0, n_cols, p,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_INT64: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    out = tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + cols[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, offsets)
    n = BLOCK_M * BLOCK_C
    tl.store(words_ptr + out, w0.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(words_ptr + n + out, w1.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(words_ptr + 2 * n + out, w2.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(words_ptr + 3 * n + out, w3.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(keep_ptr + out, keep_mask(seed, rows, col0, n_cols, p, BLOCK_C, OFFSET_INT64).to(tl.int8))


def _keep_by_definition(seed, rows, cols, n_cols, p):
    """keep(m, c) = (16-bit number c % 8 of philox(seed, m * cdiv(n_cols, 8) + c // 8)) >= ceil(p * 2**16),
    the numbers being the low then the high half of each word in turn; element by element."""
    counters = rows[:, None] * (-(-n_cols // 8)) + cols[None, :] // 8
    words = philox_randint4x(seed, counters)
    word = torch.stack(words, dim=-1).gather(-1, (cols // 2 % 4).expand_as(counters)[..., None]).squeeze(-1)
    half = torch.where((cols % 2 == 0).expand_as(counters), word & 0xFFFF, word >> 16)
    return half >= math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 2**16)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 7])
@pytest.mark.parametrize("row0, offset_int64", [(0, False), (0, True), (3_000_000_000 // 16, True)])
@pytest.mark.parametrize("n_cols, col0", [(64, 0), (61, 0), (130, 64), (130, 128)])
@pytest.mark.parametrize("p", [0.3, 0.25, 1 - 2**-17])
def test_torch_philox_is_the_kernels_stream(seed, row0, offset_int64, n_cols, col0, p):
    """tl.randint4x and keep_mask (as the kernels call them) against the
    PyTorch implementation, bit for bit, at a ragged row length (groups of
    eight columns straddling its end), a later column tile, counters past
    2**31, and a threshold past the last 16-bit number (nothing kept)."""
    bm, bc = 16, 64
    words = torch.full((4, bm, bc), -1, dtype=torch.int64, device=DEVICE)
    keep = torch.full((bm, bc), -1, dtype=torch.int8, device=DEVICE)
    _rand_kernel[(1,)](words, keep, seed, row0, col0, n_cols, p, BLOCK_M=bm, BLOCK_C=bc, OFFSET_INT64=offset_int64)
    rows = row0 + torch.arange(bm, device=DEVICE)
    offsets = rows[:, None] * n_cols + torch.arange(bc, device=DEVICE)[None, :]
    for got, want in zip(words, philox_randint4x(seed, offsets)):
        assert torch.equal(got, want)
    cols = col0 + torch.arange(bc, device=DEVICE)
    valid = cols < n_cols  # the kernels never use the columns past the row's end
    assert valid.any()
    expected = _keep_by_definition(seed, rows, cols, n_cols, p)[:, valid]
    assert torch.equal(keep.bool()[:, valid], expected)
    assert not expected.all() and (expected.any() or p > 0.5)
    if row0 == 0:
        mask = fused_lora.dropout_mask(seed, (bm, n_cols), p, device=DEVICE)
        assert torch.equal(keep.bool()[:, valid], mask[:, cols[valid]])


@pytest.mark.parametrize("offset, kept", [
    (0.0, True),  # h / 2**16 >= p with equality: kept
    (2**-40, True),  # p is float32 in the kernel: this rounds away, still kept
    (2**-20, False),  # past h / 2**16 in float32: dropped
])
def test_kernel_threshold_at_the_boundary(offset, kept):
    """keep_mask compares the 16-bit numbers with ceil(p * 2**16), p in
    float32, exactly where a number of the stream sits on the threshold."""
    seed, bm, bc = 5, 16, 64
    rows = torch.arange(bm, device=DEVICE)
    halves = halves16(philox_randint4x(seed, rows[:, None] * (bc // 8) + torch.arange(bc // 8, device=DEVICE)[None, :]))
    halves = halves.view(bm, bc)
    h0 = int(halves[3, 11])
    p = h0 / 2**16 + offset
    keep = torch.full((bm, bc), -1, dtype=torch.int8, device=DEVICE)
    words = torch.empty((4, bm, bc), dtype=torch.int64, device=DEVICE)
    _rand_kernel[(1,)](words, keep, seed, 0, 0, bc, p, BLOCK_M=bm, BLOCK_C=bc, OFFSET_INT64=False)
    assert bool(keep[3, 11]) == kept
    assert torch.equal(keep.bool(), halves >= keep_threshold(p))


def test_keep_threshold():
    assert keep_threshold(0.25) == 16384  # on a multiple of 2**-16: keep probability exactly 0.75
    assert keep_threshold(0.1) == 6554  # ceil(6553.6...)
    assert keep_threshold(0.25 + 1e-12) == 16384  # rounded to float32 first, as the kernels see it
    assert keep_threshold(0.25 + 2**-20) == 16385
    assert keep_threshold(1 - 2**-17) == 65536  # no 16-bit number reaches it: nothing kept
    assert not fused_lora.dropout_mask(3, (4, 40), 1 - 2**-17).any()
    assert keep_threshold(0.0) == 0


def test_eight_columns_share_a_philox_call_but_not_a_number():
    """The eight 16-bit numbers of one call are eight different numbers (the
    low then high half of each of the four words, not one word eight times),
    and neighbouring rows and calls differ."""
    seed, n_cols = 7, 21
    halves = halves16(philox_randint4x(seed, torch.arange(6))).view(2, 24)[:, :n_cols]
    assert torch.equal(halves[0, :8], torch.stack([h for w in philox_randint4x(seed, torch.tensor([0]))
                                                    for h in (w & 0xFFFF, w >> 16)]).flatten())
    assert len(set(halves.flatten().tolist())) == halves.numel()
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(fused_lora.dropout_mask(seed, (2, n_cols), p), halves >= keep_threshold(p))


def test_dropout_mask_statistics_and_reproducibility():
    m, k, p = 300, 257, 0.3
    mask = fused_lora.dropout_mask(42, (m, k), p, device=DEVICE)
    assert mask.shape == (m, k) and mask.dtype == torch.bool and mask.device.type == DEVICE.type
    n = m * k
    kept = mask.float().mean().item()
    sigma = ((1 - p) * p / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    # No structure along rows or columns: each row's kept fraction is plausible.
    assert mask.float().mean(1).std().item() < 4 * ((1 - p) * p / k) ** 0.5
    assert torch.equal(mask, fused_lora.dropout_mask(42, (m, k), p, device=DEVICE))
    other = fused_lora.dropout_mask(43, (m, k), p, device=DEVICE)
    assert (mask != other).float().mean().item() > 0.3  # ≈ 2p(1-p) = 0.42
    assert fused_lora.dropout_mask(42, (m, k), 0.0).all()
    assert fused_lora.dropout_mask(42, (0, k), 0.5).shape == (0, k)


def test_a_seed_held_in_a_tensor_gives_the_same_mask():
    """A 0-d int32/int64 tensor seed (the fused op's drawn seed, which lives
    on x's device) gives the int's mask, on the tensor's device by default,
    without reading the value back: on meta tensors, where nothing can be
    read, the mask is still made."""
    for seed in (0, 5, 2**31 - 2, 2**32 + 7, 2**63 - 1):
        expected = fused_lora.dropout_mask(seed, (7, 45), 0.3, device=DEVICE)
        dtypes = (torch.int32, torch.int64) if seed < 2**31 else (torch.int64,)
        for dtype in dtypes:
            held = torch.tensor(seed, dtype=dtype, device=DEVICE)
            got = fused_lora.dropout_mask(held, (7, 45), 0.3)
            assert got.device == held.device and torch.equal(got, expected), (seed, dtype)
            # (a CPU seed for a mask elsewhere: a scalar operand)
            assert torch.equal(fused_lora.dropout_mask(held.cpu(), (7, 45), 0.3, device=DEVICE), expected)
    meta = fused_lora.dropout_mask(torch.tensor(3, device="meta"), (7, 45), 0.3)
    assert meta.device.type == "meta" and meta.shape == (7, 45) and meta.dtype == torch.bool


def test_a_slice_of_rows_is_that_slice_of_the_mask():
    """``rows=(start, stop)`` draws only those rows of the (M, K) mask (the
    counters start at row ``start``): the same bits as the whole mask's slice,
    with a tensor seed, at p = 0 and for an empty slice too."""
    m, k, p = 41, 27, 0.3
    whole = fused_lora.dropout_mask(7, (m, k), p, device=DEVICE)
    for start, stop in ((0, m), (0, 1), (13, 29), (40, 41), (m, m), (5, 5)):
        part = fused_lora.dropout_mask(7, (m, k), p, device=DEVICE, rows=(start, stop))
        assert part.shape == (stop - start, k) and torch.equal(part, whole[start:stop]), (start, stop)
    held = torch.tensor(7, dtype=torch.int32, device=DEVICE)
    assert torch.equal(fused_lora.dropout_mask(held, (m, k), p, rows=[3, 11]), whole[3:11])
    assert fused_lora.dropout_mask(7, (m, k), 0.0, rows=(2, 9)).shape == (7, k)


@triton.jit
def _row_p_kernel(keep_ptr, ids_ptr, drp_ptr, seed, n_cols, M, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    p = rows_dropout_p(0.9, drp_ptr, ids_ptr, rows, rows < M, 1, True)  # (0.9: the scalar, not read)
    keep = keep_mask(seed, rows, 0, n_cols, p, BLOCK_C, False)
    tl.store(keep_ptr + rows[:, None] * BLOCK_C + cols[None, :], keep.to(tl.int8))


def test_a_probability_a_row_is_each_rows_own_mask():
    """Several adapters' dropout (``DropoutRows``): the kernels' mask with
    each row's probability its adapter's, looked up by its id (none on a row
    of id -1 or below), is each row of the one-probability mask of that
    probability; so is ``dropout_mask`` given a probability a row, and its
    slices."""
    m, k, seed = 13, 45, 99
    table = torch.tensor([0.1, 0.5, 0.0, 0.25], device=DEVICE)
    ids = torch.tensor([0, 1, -1, 2, 3, -2, 1, 0, 3, 3, -1, 2, 1], dtype=torch.int32, device=DEVICE)
    keep = torch.full((16, 64), -1, dtype=torch.int8, device=DEVICE)
    _row_p_kernel[(1,)](keep, ids, table, seed, k, m, BLOCK_M=16, BLOCK_C=64)
    p_rows = torch.where(ids >= 0, table[ids.clamp(min=0).long()], 0.0)
    expected = torch.stack([fused_lora.dropout_mask(seed, (m, k), float(p_rows[i]), device=DEVICE)[i]
                            for i in range(m)])
    assert torch.equal(keep[:m, :k].bool(), expected)
    assert expected[ids < 0].all() and not expected[ids == 1].all()
    assert torch.equal(fused_lora.dropout_mask(seed, (m, k), p_rows), expected)
    assert torch.equal(fused_lora.dropout_mask(seed, (m, k), p_rows, rows=(4, 9)), expected[4:9])
    with pytest.raises(ValueError, match=r"p must be a float or a floating-point tensor of one probability a row, "
                                         r"\(13,\), for shape \(13, 45\); got a torch.float32 tensor of shape \(12,\)"):
        fused_lora.dropout_mask(seed, (m, k), p_rows[:12])


@pytest.mark.parametrize("rows, err", [
    ((1, 2, 3), TypeError), (3, TypeError), ((1.0, 2), TypeError), ((True, 2), TypeError),
    ((-1, 2), ValueError), ((3, 2), ValueError), ((0, 42), ValueError),
])
def test_dropout_mask_bad_rows(rows, err):
    with pytest.raises(err, match=r"rows(\[[01]\])? must"):
        fused_lora.dropout_mask(1, (41, 27), 0.3, rows=rows)


@pytest.mark.parametrize("kwargs, err", [
    (dict(seed=torch.tensor([1, 2]), shape=(2, 3), p=0.1), TypeError),
    (dict(seed=torch.tensor(1.0), shape=(2, 3), p=0.1), TypeError),
    (dict(seed=-1, shape=(2, 3), p=0.1), ValueError),
    (dict(seed=1.5, shape=(2, 3), p=0.1), TypeError),
    (dict(seed=1, shape=(2, 3), p=1.0), ValueError),
    (dict(seed=1, shape=(2, 3), p=-0.1), ValueError),
    (dict(seed=1, shape=(2, 3, 4), p=0.1), ValueError),
    (dict(seed=1, shape=(2, -3), p=0.1), ValueError),
    (dict(seed=1, shape=6, p=0.1), TypeError),
    (dict(seed=1, shape=(2.0, 3), p=0.1), TypeError),
    (dict(seed=1, shape=(2, 3), p=0.1, device="nope"), ValueError),
    (dict(seed=torch.tensor(1), shape=(2, 3), p=0.1, device="nope"), ValueError),
    (dict(seed=1, shape=(2, 3), p=0.0, device=[0]), TypeError),
])
def test_dropout_mask_bad_arguments(kwargs, err):
    with pytest.raises(err, match=None if "device" not in kwargs else r"device must be a torch.device .* got"):
        fused_lora.dropout_mask(**kwargs)


def _run(seed, p=0.4, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(37, 50, dtype=dtype, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(50, 30, 8, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=seed, backend="triton")
    grads = torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))
    return (y, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_is_bitwise_identical(dtype):
    first, second = _run(7, dtype=dtype), _run(7, dtype=dtype)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_different_seeds_drop_different_elements():
    first, second = _run(7), _run(8)
    assert not torch.equal(first[0], second[0])
    assert not torch.equal(first[2], second[2])  # dA sees the mask through drop(x)


def test_seed_none_follows_torch_manual_seed():
    x = torch.randn(20, 24, device=DEVICE)
    w, b, a, bb = make_params(24, 16, 4, torch.float32, True)
    outs = []
    for backend in ("triton", "triton", "torch"):
        torch.manual_seed(2024)
        outs.append(fused_lora.lora_linear(x, w, a, bb, b, scaling=1.0, dropout_p=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], outs[2].double(), torch.float32, "fused vs reference")  # same mask
    torch.manual_seed(2025)
    assert not torch.equal(outs[0], fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.5, backend="triton"))


@pytest.mark.parametrize("strategy", [None, "in_loop", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_drawn_seed_stays_on_the_device_and_drops_what_its_value_drops(strategy, dtype, monkeypatch):
    """seed=None: the seed is drawn on x's device and every kernel that draws
    the mask reads it from there (forced ``in_loop``: the forward's K loop masks
    x's tiles for its shrink, and dx accumulates g in its K loop, with the mask
    in its epilogue); the results are bit for bit those of the same seed passed
    as a value."""
    passed = []  # what each launch hands its kernel as the seed
    for module in (gemm, skinny):
        def spy(seed, device, real=module.seed_arg):
            passed.append(real(seed, device))
            return passed[-1]
        monkeypatch.setattr(module, "seed_arg", spy)
    x = make_x((3, 11, 50), dtype).requires_grad_()
    w, b, a, bb = make_params(50, 30, 8, dtype, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(3, 11, 30, device=DEVICE, dtype=dtype)

    def run(seed):
        with fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext():
            y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=0.3, seed=seed, backend="triton")
            seed_t = y.grad_fn.saved_tensors[-1]
            return seed_t, (y, *torch.autograd.grad(y, (x, a, bb), dy))

    drawn, outs = run(None)
    assert drawn.dtype == torch.int32 and drawn.shape == () and drawn.device == x.device
    # the forward's shrink, dx and dA (the dy pass and dx's split-K sum draw no mask)
    assert sum(s is drawn for s in passed) == 3 and all(s is drawn or s == 0 for s in passed)
    passed.clear()
    given, again = run(int(drawn))
    assert given.dtype == torch.int64 and given.device.type == "cpu"  # (a value: passed as an argument)
    assert sum(s == int(drawn) for s in passed) == 3 and not any(isinstance(s, torch.Tensor) for s in passed)
    for name, o, e in zip(("y", "dx", "dA", "dB"), outs, again):
        assert torch.equal(o, e), name
    _, other = run(int(drawn) + 1)
    assert not torch.equal(outs[2], other[2])  # (dA sees the mask)


def test_a_seed_tensor_must_be_one_int32_or_int64_on_the_operands_device():
    for bad in (torch.tensor(5.0), torch.tensor(5, dtype=torch.int16), torch.tensor([5, 6], dtype=torch.int32),
                torch.tensor(5, dtype=torch.int32, device="meta")):
        with pytest.raises(ValueError, match="a seed tensor must be one int32 or int64 on"):
            seed_arg(bad, DEVICE)
    assert seed_arg(7, DEVICE) == 7
    for dtype in (torch.int32, torch.int64):
        good = torch.tensor(5, dtype=dtype, device=DEVICE)
        assert seed_arg(good, DEVICE) is good


@pytest.mark.parametrize("seed", [2**31 - 1, 2**31 + 5, 2**62 + 12345])
def test_the_kernels_read_a_seed_from_an_int64_tensor_as_the_value_itself(seed):
    """A seed passed as a one-element tensor (int64 for one of 2**31 or more:
    a traced call's int seed) draws the mask of the same value passed as an
    int, bit for bit, in the skinny pass and in the GEMM's masked epilogue
    and in-loop shrink."""
    cfg = fused_lora.dispatch.plan(13, 24, 40, 4, torch.float32, 0.3).skinny
    x = torch.randn(13, 40, device=DEVICE)
    shrink = torch.randn(40, 4, device=DEVICE)
    w = torch.randn(40, 24, device=DEVICE)
    u = torch.randn(13, 4, device=DEVICE)
    v = torch.randn(4, 24, device=DEVICE)
    gemm_cfg = GemmConfig(16, 16, 16, 1, 4, 2)
    as_tensor = torch.tensor(seed, dtype=torch.int32 if seed < 2**31 else torch.int64, device=DEVICE)
    outs = []
    for s in (seed, as_tensor):
        sh, _, _ = skinny.skinny_pass(x, shrink=shrink, dropout_p=0.3, seed=s, config=cfg, target_programs=4)
        c, _ = gemm.lora_gemm(x, w, u=u, v=v, dropout_p=0.3, seed=s, config=gemm_cfg, out_dtype=torch.float32)
        c2, xa = gemm.lora_gemm(x, w, shrink=shrink, v=v, dropout_p=0.3, seed=s, shrink_dropout=True,
                                config=gemm_cfg, out_dtype=torch.float32)
        outs.append((sh, c, c2, xa))
    for name, got, want in zip(("shrink", "masked epilogue", "in-loop forward", "in-loop xa"), outs[1], outs[0]):
        assert torch.equal(got, want), name
    mask = fused_lora.dropout_mask(seed, (13, 40), 0.3, device=DEVICE)
    assert_close(outs[0][0], (x.double() * mask) @ shrink.double(), torch.float32, "the value's mask (unscaled)")
    c_mask = fused_lora.dropout_mask(seed, (13, 24), 0.3, device=DEVICE)
    x64, w64 = x.double(), w.double()
    assert_close(outs[0][1], x64 @ w64 + (u.double() @ v.double()) * c_mask, torch.float32, "the output's mask")
    xa64 = (x64 * mask / 0.7) @ shrink.double()
    assert_close(outs[0][3], xa64, torch.float32, "the in-loop shrink's mask")
    assert_close(outs[0][2], x64 @ w64 + xa64 @ v.double(), torch.float32, "the in-loop forward")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_captured_cuda_graph_draws_a_new_mask_at_each_replay():
    """A training step captured in a CUDA graph with seed=None: each replay
    draws a new seed on the GPU, and its outputs and gradients are bit for bit
    those of an eager step with that seed."""
    x = torch.randn(64, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    w, b, a, bb = make_params(96, 80, 8, torch.float16, True, device="cuda")
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(64, 80, device="cuda", dtype=torch.float16)

    def step(seed=None):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=0.3, seed=seed, backend="triton")
        seed_t = y.grad_fn.saved_tensors[-1]
        return (seed_t, y, *torch.autograd.grad(y, (x, a, bb), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: every kernel compiled before the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([t.clone() for t in static])
    seeds = [int(r[0]) for r in replays]
    assert len(set(seeds)) == 3, seeds
    for seed, (_, *outs) in zip(seeds, replays):
        _, *eager = step(seed)
        for name, o, e in zip(("y", "dx", "dA", "dB"), outs, eager):
            assert torch.equal(o, e), (name, seed)


@pytest.mark.parametrize("m, k", [(1, 1), (1, 8), (17, 123), (33, 256), (40, 300), (3, 1000)])
@pytest.mark.parametrize("p", [0.1, 0.5, 1 - 2**-17])
def test_the_keep_mask_pass_writes_the_mask(m, k, p):
    """The keep-mask pass (strategy cublas's, with dropout): every byte
    written (the output poisoned first), 0 or 1, and the mask bit for bit
    fused_lora.dropout_mask's, at sizes off its tile (16 x 256) and for each
    kind of seed the kernels take: an int of 32 or 64 bits, or one held in
    an int32 / int64 tensor (read through a pointer)."""
    from fused_lora.kernels import mask

    for seed in (12345, 2**40 + 3, torch.tensor(777, dtype=torch.int32, device=DEVICE),
                 torch.tensor(2**33 + 1, dtype=torch.int64, device=DEVICE)):
        with fused_lora.kernels.poison_outputs():
            got = mask.keep_mask_tensor(m, k, p, seed, torch.device(DEVICE))
        assert got.dtype == torch.bool and got.shape == (m, k) and got.is_contiguous()
        assert got.view(torch.uint8).max().item() <= 1  # (poisoned with 255: every byte written)
        assert torch.equal(got, fused_lora.dropout_mask(seed, (m, k), p, device=DEVICE))


def test_the_keep_mask_pass_in_64_bit_counters_draws_the_same_mask(monkeypatch):
    """Its 64-bit counters (a mask of 2**31 elements or more: here forced
    on a small one) draw the same mask; and an empty mask launches nothing."""
    from fused_lora.kernels import mask

    grids = []
    real = mask.launch
    monkeypatch.setattr(mask, "launch", lambda kernel, grid, args, kwargs: (
        grids.append(kwargs["OFFSET_INT64"]), real(kernel, grid, args, kwargs)))
    monkeypatch.setattr(mask, "mask_counters_int64", lambda rows, cols: True)
    got = mask.keep_mask_tensor(19, 77, 0.3, 42, torch.device(DEVICE))
    assert grids == [True] and torch.equal(got, fused_lora.dropout_mask(42, (19, 77), 0.3, device=DEVICE))
    assert mask.keep_mask_tensor(0, 77, 0.3, 42, torch.device(DEVICE)).shape == (0, 77) and grids == [True]
