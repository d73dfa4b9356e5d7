"""The dropout mask: one stream shared by the kernels and the PyTorch helper,
reproducible from the seed, with the right statistics."""

import pytest
import torch
import triton
import triton.language as tl

import fused_lora
from fused_lora.dropout import philox4x32, philox_randint4x, philox_uniform, uint_to_uniform
from fused_lora.kernels.common import keep_mask
from lora_testing import DEVICE, make_params


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
def _rand_kernel(u_ptr, keep_ptr, seed, row0, col0, n_cols, p,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_INT64: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    out = tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + cols[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(u_ptr + out, tl.rand(seed, offsets))
    tl.store(keep_ptr + out, keep_mask(seed, rows, col0, n_cols, p, BLOCK_C, OFFSET_INT64).to(tl.int8))


def _keep_by_definition(seed, rows, cols, n_cols, p):
    """keep(m, c) = uniform(word c % 4 of philox(seed, m * cdiv(n_cols, 4) + c // 4)) > p, element by element."""
    counters = rows[:, None] * (-(-n_cols // 4)) + cols[None, :] // 4
    words = torch.stack(philox_randint4x(seed, counters), dim=-1)
    word = words.gather(-1, (cols % 4).expand_as(counters)[..., None]).squeeze(-1)
    return uint_to_uniform(word) > p


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 7])
@pytest.mark.parametrize("row0, offset_int64", [(0, False), (0, True), (3_000_000_000 // 16, True)])
@pytest.mark.parametrize("n_cols, col0", [(64, 0), (61, 0), (130, 64), (130, 128)])
def test_torch_philox_is_the_kernels_stream(seed, row0, offset_int64, n_cols, col0):
    """tl.rand and keep_mask (as the kernels call them) against the PyTorch
    implementation, bit for bit, at a ragged row length (groups of four
    columns straddling its end), a later column tile, and counters past 2**31."""
    bm, bc, p = 16, 64, 0.3
    u = torch.empty((bm, bc), dtype=torch.float32, device=DEVICE).fill_(float("nan"))
    keep = torch.full((bm, bc), -1, dtype=torch.int8, device=DEVICE)
    _rand_kernel[(1,)](u, keep, seed, row0, col0, n_cols, p, BLOCK_M=bm, BLOCK_C=bc, OFFSET_INT64=offset_int64)
    rows = row0 + torch.arange(bm, device=DEVICE)
    offsets = rows[:, None] * n_cols + torch.arange(bc, device=DEVICE)[None, :]
    assert torch.equal(u, philox_uniform(seed, offsets))
    cols = col0 + torch.arange(bc, device=DEVICE)
    valid = cols < n_cols  # the kernels never use the columns past the row's end
    assert valid.any()
    assert torch.equal(keep.bool()[:, valid], _keep_by_definition(seed, rows, cols, n_cols, p)[:, valid])
    if row0 == 0:
        mask = fused_lora.dropout_mask(seed, (bm, n_cols), p, device=DEVICE)
        assert torch.equal(keep.bool()[:, valid], mask[:, cols[valid]])


def test_four_columns_share_a_philox_call_but_not_a_word():
    """The four words of one call are four different numbers (word k % 4 of
    the call, not the first word four times), and neighbouring rows and calls differ."""
    seed, n_cols = 7, 13
    mask_u = uint_to_uniform(torch.stack(philox_randint4x(seed, torch.arange(8)), dim=-1)).view(2, 16)[:, :n_cols]
    counters = torch.arange(2)[:, None] * 4 + torch.arange(n_cols)[None, :] // 4
    first_words = uint_to_uniform(philox_randint4x(seed, counters)[0])
    assert not torch.equal(mask_u, first_words)
    assert len(set(mask_u.flatten().tolist())) == mask_u.numel()
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(fused_lora.dropout_mask(seed, (2, n_cols), p), mask_u > p)


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


@pytest.mark.parametrize("kwargs, err", [
    (dict(seed=-1, shape=(2, 3), p=0.1), ValueError),
    (dict(seed=1.5, shape=(2, 3), p=0.1), TypeError),
    (dict(seed=1, shape=(2, 3), p=1.0), ValueError),
    (dict(seed=1, shape=(2, 3), p=-0.1), ValueError),
    (dict(seed=1, shape=(2, 3, 4), p=0.1), ValueError),
    (dict(seed=1, shape=(2, -3), p=0.1), ValueError),
])
def test_dropout_mask_bad_arguments(kwargs, err):
    with pytest.raises(err):
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
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)  # same mask: fused vs reference
    torch.manual_seed(2025)
    assert not torch.equal(outs[0], fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.5, backend="triton"))
