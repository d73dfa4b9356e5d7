"""The oracle itself: float64 gradcheck of the reference, and its agreement
with an independent, by-hand formula."""

import pytest
import torch

from fused_lora import dropout_mask, reference
from fused_lora.dropout import draw_seed


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_gradcheck(p, bias):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w, a, bb, *rest):
        return reference.lora_linear(x, w, a, bb, rest[0] if rest else None, scaling=0.7, dropout_p=p, seed=5)

    inputs = (x, w, a, bb) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_reference_matches_the_formula():
    x = torch.randn(4, 6, 9, dtype=torch.float64)
    w, b = torch.randn(8, 9, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    a, bb = torch.randn(2, 9, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    p, s = 0.25, 1.5
    keep = dropout_mask(77, (24, 9), p).view(4, 6, 9)
    expected = torch.einsum("btk,nk->btn", x, w) + b \
        + s * torch.einsum("btr,nr->btn", torch.einsum("btk,rk->btr", torch.where(keep, x / (1 - p), 0), a), bb)
    got = reference.lora_linear(x, w, a, bb, b, scaling=s, dropout_p=p, seed=77)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_drawn_seed_stays_on_the_device():
    """With dropout and ``seed=None`` the reference (the torch backend, which
    ``"auto"`` runs below sm_80 and under torch.func) draws its seed where x
    is, as the fused op does, and never reads it back to the host (on a GPU a
    sync per call, and an error inside a CUDA graph's capture): it runs on
    meta tensors, where nothing can be read; and it drops what the drawn
    seed's mask drops."""
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w, a, bb = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64), \
        torch.randn(8, 4, dtype=torch.float64)
    torch.manual_seed(21)
    got = reference.lora_linear(x, w, a, bb, scaling=0.5, dropout_p=0.4)
    torch.manual_seed(21)
    seed = draw_seed("cpu")
    torch.testing.assert_close(got, reference.lora_linear(x, w, a, bb, scaling=0.5, dropout_p=0.4, seed=seed),
                               rtol=0, atol=0)
    meta = [t.to("meta") for t in (x, w, a, bb)]
    y = reference.lora_linear(*meta, scaling=0.5, dropout_p=0.4)
    assert y.device.type == "meta" and y.shape == (3, 5, 8)
