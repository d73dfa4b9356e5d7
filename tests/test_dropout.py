"""The dropout mask: one stream shared by the kernels and the PyTorch helper,
reproducible from the seed, with the right statistics."""

import pytest
import torch
import triton
import triton.language as tl

import fused_lora
from fused_lora.dropout import philox4x32, philox_uniform
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
def _rand_kernel(u_ptr, keep_ptr, seed, row0, n_cols, p,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_INT64: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    out = tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + cols[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(u_ptr + out, tl.rand(seed, offsets))
    tl.store(keep_ptr + out, keep_mask(seed, rows, cols, n_cols, p, OFFSET_INT64).to(tl.int8))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 7])
@pytest.mark.parametrize("row0, offset_int64", [(0, False), (0, True), (3_000_000_000 // 64, True)])
def test_torch_philox_is_the_kernels_stream(seed, row0, offset_int64):
    """tl.rand and keep_mask (as the kernels call them) against the PyTorch
    implementation, bit for bit, including offsets past 2**31."""
    bm, bc, n_cols, p = 16, 64, 64, 0.3
    u = torch.empty((bm, bc), dtype=torch.float32, device=DEVICE)
    keep = torch.empty((bm, bc), dtype=torch.int8, device=DEVICE)
    _rand_kernel[(1,)](u, keep, seed, row0, n_cols, p, BLOCK_M=bm, BLOCK_C=bc, OFFSET_INT64=offset_int64)
    offsets = (row0 + torch.arange(bm, device=DEVICE))[:, None] * n_cols + torch.arange(bc, device=DEVICE)[None, :]
    expected = philox_uniform(seed, offsets)
    assert torch.equal(u, expected)
    assert torch.equal(keep.bool(), expected > p)
    if row0 == 0:
        assert torch.equal(keep.bool(), fused_lora.dropout_mask(seed, (bm, n_cols), p, device=DEVICE))


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
