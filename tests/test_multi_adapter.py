"""Several adapters on one base (``fused_lora.multi_lora_linear``): each row
through its own adapter, in one set of fused launches, against an oracle
that runs each adapter on its own rows in float64 (not the reference's
side-by-side form, which the kernels share)."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fused_lora
from fused_lora import ops
from fused_lora.dropout import draw_seed_tensor
from lora_testing import DEVICE, assert_close, make_params, make_x, opcheck_lora_ops

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _adapters(k, n, ranks, dtype):
    """Each adapter's (A, B), random (B too: the term is exercised), requiring grad."""
    out = []
    for r in ranks:
        _, _, a, b = make_params(k, n, r, dtype, False)
        out.append((a.requires_grad_(), b.requires_grad_()))
    return [a for a, _ in out], [b for _, b in out]


def _ids(lead, n, per_sample=False):
    """Random ids in [-1, n), every one of them present, strided (every other
    element of an int64 buffer)."""
    shape = lead[:1] if per_sample else lead
    numel = math.prod(shape)
    flat = torch.randint(-1, n, (2 * numel,), device=DEVICE)[::2]
    flat[:min(n + 1, numel)] = torch.arange(-1, n, device=DEVICE)[:numel]
    return flat.view(shape)


def _oracle(x, w, b, lora_a, lora_b, ids, scalings, dy, p, seed, wanted):
    """float64: the base, plus adapter i's own term on the rows of id i,
    adapter by adapter, its x dropped with its probability (``p``: one for
    all, or one an adapter); output and the gradients ``wanted`` of (x,
    weight, bias, lora_A[i], lora_B[i])."""
    leaf = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, w64 = leaf(x), leaf(w)
    b64 = leaf(b) if b is not None else None
    a64, bb64 = [leaf(a) for a in lora_a], [leaf(bb) for bb in lora_b]
    ids = ids.reshape(*ids.shape, *(1,) * (x.dim() - 1 - ids.dim())).expand(x.shape[:-1])
    y = F.linear(x64, w64, b64)
    for i, (a, bb) in enumerate(zip(a64, bb64)):
        p_i = p[i] if isinstance(p, (list, tuple)) else p
        dropped = x64
        if p_i > 0:
            keep = fused_lora.dropout_mask(seed, (x.shape[:-1].numel(), x.shape[-1]), p_i, device=x.device)
            dropped = x64 * keep.view(x.shape).double() / (1 - p_i)
        on = (ids == i).double().unsqueeze(-1)
        y = y + on * (scalings[i] * F.linear(F.linear(dropped, a), bb))
    named = {"x": x64, "weight": w64, "bias": b64}
    named.update({f"lora_A[{i}]": a for i, a in enumerate(a64)})
    named.update({f"lora_B[{i}]": bb for i, bb in enumerate(bb64)})
    grads = torch.autograd.grad(y, [named[k] for k in wanted], dy.double())
    return y.detach(), dict(zip(wanted, grads))


def _run_and_check(x, w, b, lora_a, lora_b, ids, scalings, p, seed, dtype, backend="triton"):
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=scalings, dropout_p=p, seed=seed,
                                     backend=backend)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn_like(y)
    inputs = {"x": x, "weight": w, "bias": b}
    inputs.update({f"lora_A[{i}]": a for i, a in enumerate(lora_a)})
    inputs.update({f"lora_B[{i}]": bb for i, bb in enumerate(lora_b)})
    wanted = [k for k, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [inputs[k] for k in wanted], dy)
    y64, g64 = _oracle(x, w, b, lora_a, lora_b, ids, scalings, dy, p, seed, wanted)
    assert_close(y, y64, dtype, "y")
    for name, g in zip(wanted, grads):
        assert g.shape == inputs[name].shape and g.dtype == dtype, name
        assert_close(g, g64[name], dtype, f"d{name}")
    return y, dict(zip(wanted, grads))


@pytest.mark.parametrize("strategy", [None, "in_loop", "split", "hybrid"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
# 2-D x, adapters of ranks 4, 1, 8 (13: one rank tile); 3-D permuted x, ranks 16 and 64 (80: above the in-loop
# shrink's tile, so in_loop falls back to split for the forward)
@pytest.mark.parametrize("lead, layout, ranks", [((57,), "strided", (4, 1, 8)), ((2, 150), "permuted", (16, 64))])
def test_each_row_runs_its_own_adapter(strategy, dtype, p, lead, layout, ranks):
    """Forward and every gradient (base included), on every strategy, with
    every adapter among the rows and rows of none (-1): as each adapter on
    its own rows, in float64."""
    k, n = 45, 37
    x = make_x((*lead, k), dtype, layout).requires_grad_()
    w, b, _, _ = make_params(k, n, 1, dtype, True)
    w.requires_grad_()
    b.requires_grad_()
    lora_a, lora_b = _adapters(k, n, ranks, dtype)
    scalings = [2.0 / (i + 1) for i in range(len(ranks))]
    ids = _ids(lead, len(ranks))
    forced = fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext()
    with forced:
        _run_and_check(x, w, b, lora_a, lora_b, ids, scalings, p, 7, dtype)


@pytest.mark.parametrize("strategy", [None, "in_loop", "split", "hybrid"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_each_adapter_its_own_dropout_probability(strategy, dtype):
    """``dropout_p`` of one probability an adapter: each row's x dropped with
    its adapter's (0 included), on every strategy, forward and every
    gradient, as each adapter on its own rows with its own mask; the same
    random numbers as one probability's mask (where all are equal, the one
    mask itself)."""
    k, n = 45, 37
    x = make_x((57, k), dtype, "strided").requires_grad_()
    w, b, _, _ = make_params(k, n, 1, dtype, True)
    w.requires_grad_()
    lora_a, lora_b = _adapters(k, n, (4, 1, 8, 2), dtype)
    scalings = [2.0, 0.5, 1.0, 3.0]
    ids = _ids((57,), 4)
    forced = fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext()
    with forced:
        _run_and_check(x, w, b, lora_a, lora_b, ids, scalings, [0.1, 0.5, 0.0, 0.25], 11, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adapter_dropout_probabilities_through_a_chunked_rank_and_3d_x(backend):
    """Ranks 16 and 64 (above the in-loop shrink's tile: the rank runs in
    chunks), a permuted 3-D x, two probabilities; and the one probability
    given as a list of equal ones is the float's call, bit for bit."""
    dtype = F16 if backend == "triton" else F32
    x = make_x((2, 150, 45), dtype, "permuted").requires_grad_()
    w, b, _, _ = make_params(45, 37, 1, dtype, True)
    lora_a, lora_b = _adapters(45, 37, (16, 64), dtype)
    ids = _ids((2, 150), 2)
    _run_and_check(x, w, b, lora_a, lora_b, ids, [0.5, 1.0], [0.3, 0.05], 4, dtype, backend)
    same = [fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[0.5, 1.0], dropout_p=p, seed=4,
                                         backend=backend) for p in (0.2, [0.2, 0.2])]
    assert torch.equal(*same)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_id_per_sample(backend):
    """``adapter_ids`` of shape (batch,) for a 3-D x: a sample's id for its
    every token, as the same ids expanded over the tokens."""
    dtype = F32
    x = make_x((4, 9, 24), dtype).requires_grad_()
    w, b, _, _ = make_params(24, 20, 1, dtype, True)
    lora_a, lora_b = _adapters(24, 20, (3, 5), dtype)
    ids = torch.tensor([1, -1, 0, 1], device=DEVICE)
    y, grads = _run_and_check(x, w, b, lora_a, lora_b, ids, [0.5, 1.5], 0.1, 3, dtype, backend)
    y2 = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids[:, None].expand(4, 9), b, scaling=[0.5, 1.5],
                                      dropout_p=0.1, seed=3, backend=backend)
    assert torch.equal(y, y2)


def test_the_torch_backend_matches_too():
    """The reference's side-by-side form (the CPU fallback, and what
    create_graph differentiates) against the adapter-by-adapter oracle."""
    x = make_x((33, 40), F32).requires_grad_()
    w, b, _, _ = make_params(40, 30, 1, F32, True)
    lora_a, lora_b = _adapters(40, 30, (2, 7, 3), F32)
    _run_and_check(x, w, b, lora_a, lora_b, _ids((33,), 3), [1.0, 0.25, 3.0], 0.3, 11, F32, backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_adapter_of_rank_0_leaves_its_rows_the_base(backend, monkeypatch):
    """Rank 0 (an adapter that does not target this layer, beside others
    that do): its rows get the base, the others their adapters, with every
    gradient; with every adapter of rank 0, the base alone."""
    k, n = 29, 19
    x = make_x((23, k), F32).requires_grad_()
    w, b, _, _ = make_params(k, n, 1, F32, True)
    (a0, a2), (b0, b2) = _adapters(k, n, (3, 5), F32)
    a1 = torch.empty(0, k, device=DEVICE, requires_grad=True)
    b1 = torch.empty(n, 0, device=DEVICE, requires_grad=True)
    ids = _ids((23,), 3)
    _, grads = _run_and_check(x, w, b, [a0, a1, a2], [b0, b1, b2], ids, [1.5, 2.0, 0.5], 0.2, 5, F32, backend)
    assert grads["lora_A[1]"].shape == (0, k) and grads["lora_B[1]"].shape == (n, 0)
    with torch.no_grad():
        y = fused_lora.multi_lora_linear(x, w, [a1], [b1], ids.clamp(max=0), b, scaling=2.0, backend=backend)
        assert torch.equal(y, F.linear(x, w, b))
    with pytest.raises(ValueError, match=r"an adapter's index in \[0, 1\), got ids from -1 to 2"):
        fused_lora.multi_lora_linear(x, w, [a1], [b1], ids, b, backend=backend)
    monkeypatch.setattr(ops, "_unreadable", lambda t: True)  # (under torch.compile: ids not checked, NaN rows)
    y = fused_lora.multi_lora_linear(x, w, [a1], [b1], ids, b, backend=backend)
    assert torch.isnan(y[ids > 0]).all() and torch.equal(y[ids <= 0], F.linear(x, w, b)[ids <= 0])


def test_an_adapter_gets_gradients_from_its_rows_alone():
    """An adapter that no row runs gets exactly zero gradients; its weights,
    even NaN, leave the output as it is (the other adapters' columns are
    selected away, not multiplied by 0), and a row's Inf stays in its row."""
    k, n = 33, 21
    x = make_x((40, k), F32).requires_grad_()
    w, b, _, _ = make_params(k, n, 1, F32, True)
    lora_a, lora_b = _adapters(k, n, (4, 6, 2), F32)
    ids = torch.randint(0, 2, (40,), device=DEVICE) * 3 - 1  # -1 or 2: adapter 1 unused ...
    ids[0] = 0  # ... and adapter 0 on one row
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 1.0, 1.0], backend="triton")
    grads = torch.autograd.grad(y, [*lora_a, *lora_b], torch.randn_like(y))
    for i in (0, 2):
        assert grads[i].abs().sum() > 0 and grads[3 + i].abs().sum() > 0
    assert torch.equal(grads[1], torch.zeros_like(grads[1])) and torch.equal(grads[4], torch.zeros_like(grads[4]))
    with torch.no_grad():
        lora_a[1].fill_(math.nan)
        x[5, 3] = math.inf
        ids[5] = 2
        poisoned = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 1.0, 1.0],
                                                backend="triton")
    rows = torch.arange(40, device=DEVICE) != 5
    assert torch.equal(poisoned[rows], y[rows])
    assert not torch.isfinite(poisoned[5]).all()


def test_bitwise_reproducible():
    x = make_x((70, 48), F16).requires_grad_()
    w, b, _, _ = make_params(48, 40, 1, F16, True)
    lora_a, lora_b = _adapters(48, 40, (8, 8), F16)
    ids = _ids((70,), 2)
    runs = []
    for _ in range(2):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 2.0], dropout_p=0.1, seed=5,
                                         backend="triton")
        runs.append((y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], torch.ones_like(y))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_second_derivatives():
    """``create_graph=True``: the gradients come from the reference's
    side-by-side form, differentiable again; as the oracle's."""
    x = make_x((13, 16), F32).requires_grad_()
    w, b, _, _ = make_params(16, 12, 1, F32, True)
    lora_a, lora_b = _adapters(16, 12, (2, 3), F32)
    ids = _ids((13,), 2)
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 0.5], backend="triton")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gb = torch.autograd.grad(gx.square().sum(), lora_b[1])[0]
    x64 = x.detach().double().requires_grad_()
    a64 = [a.detach().double() for a in lora_a]
    b64 = [bb.detach().double().requires_grad_() for bb in lora_b]
    y64 = F.linear(x64, w.double(), b.double())
    for i, (a, bb) in enumerate(zip(a64, b64)):
        y64 = y64 + (ids == i).double()[:, None] * ([1.0, 0.5][i] * F.linear(F.linear(x64, a), bb))
    (gx64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
    gb64 = torch.autograd.grad(gx64.square().sum(), b64[1])[0]
    assert_close(gx, gx64, F32, "dx")
    assert_close(gb, gb64, F32, "d(dx²)/dB₁")


def test_one_set_of_launches_for_any_mix(monkeypatch):
    """The batch runs in the passes of one adapter of the summed rank: the
    same kernel launches whatever the mix of adapters."""
    from lora_testing import count_launches

    kernels = fused_lora._triton.get()
    gemms = count_launches(monkeypatch, kernels.gemm, "lora_gemm_kernel")
    skinnies = count_launches(monkeypatch, kernels.skinny, "lora_skinny_kernel")
    x = make_x((30, 40), F32).requires_grad_()
    w, b, _, _ = make_params(40, 24, 1, F32, True)
    lora_a, lora_b = _adapters(40, 24, (3, 5), F32)
    counts = []
    for ids in (_ids((30,), 2), torch.zeros(30, dtype=torch.long, device=DEVICE)):
        gemms.clear()
        skinnies.clear()
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=1.0, dropout_p=0.1, seed=1,
                                         backend="triton")
        y.sum().backward()
        counts.append((len(gemms), len(skinnies)))
    gemms.clear()
    skinnies.clear()
    single = fused_lora.lora_linear(x, w, torch.cat(lora_a), torch.cat(lora_b, 1), b, dropout_p=0.1, seed=1,
                                    backend="triton")
    single.sum().backward()
    assert counts[0] == counts[1] == (len(gemms), len(skinnies))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unreadable_ids_give_nan_rows(monkeypatch, backend):
    """Where nothing can be read back (torch.compile tracing, a CUDA graph
    capturing), an id outside [-1, n) is not checked: its rows come out NaN,
    the others as usual."""
    x = make_x((12, 16), F32)
    w, b, _, _ = make_params(16, 8, 1, F32, True)
    lora_a, lora_b = _adapters(16, 8, (2, 2), F32)
    ids = torch.tensor([0, 1, -1, 2, 0, -3, 1, 1, 0, -1, 5, 0], device=DEVICE)
    ids[3] = 2 ** 32 + 1  # (as int32 it would be 1)
    good = ids.clamp(-1, 1) * ((ids >= -1) & (ids < 2))
    want = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, good, b, scaling=1.0, backend=backend)
    monkeypatch.setattr(ops, "_unreadable", lambda t: True)  # (as under torch.compile, or a CUDA graph's capture)
    got = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=1.0, backend=backend)
    bad = (ids < -1) | (ids >= 2)
    assert torch.isnan(got[bad]).all()
    assert torch.equal(got[~bad], want[~bad])


def _bad_call(change):
    x = make_x((6, 8), F32)
    w, b, _, _ = make_params(8, 5, 1, F32, True)
    lora_a, lora_b = _adapters(8, 5, (2, 3), F32)
    kw = dict(x=x, weight=w, lora_A=lora_a, lora_B=lora_b, adapter_ids=torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE),
              bias=b, scaling=[1.0, 2.0])
    change(kw)
    return lambda: fused_lora.multi_lora_linear(**kw, backend="triton")


@pytest.mark.parametrize("change, err, words", [
    (lambda kw: kw.update(lora_A=kw["lora_A"][0]), TypeError, "lora_A must be a list or tuple"),
    (lambda kw: kw.update(lora_B=[]), ValueError, "lora_B must hold at least one"),
    (lambda kw: kw.update(lora_B=kw["lora_B"][:1]), ValueError, "got 2 A and 1 B"),
    (lambda kw: kw.update(lora_B=kw["lora_B"][::-1]), ValueError,
     r"adapter 0 \(lora_A\[0\], lora_B\[0\]\): lora_B must have shape \(out_features=5, r=2\)"),
    (lambda kw: kw["lora_A"].__setitem__(1, kw["lora_A"][1].half()), TypeError,
     r"adapter 1 .*lora_A has dtype torch.float16"),
    (lambda kw: kw["lora_A"].__setitem__(1, torch.empty(0, 7, device=DEVICE)), ValueError,
     r"adapter 1 .*lora_A must have shape \(r, in_features=8\)"),
    (lambda kw: kw["lora_A"].__setitem__(1, torch.empty(0, 8, device=DEVICE)), ValueError,
     r"adapter 1 .*lora_B must have shape \(out_features=5, r=0\)"),
    (lambda kw: kw.update(scaling=[1.0]), ValueError, r"one scale per adapter \(2\), got 1"),
    (lambda kw: kw.update(scaling=[1.0, math.inf]), ValueError, "scaling must be finite"),
    (lambda kw: kw.update(dropout_p=[0.1]), ValueError, r"dropout_p must hold one probability per adapter \(2\), got 1"),
    (lambda kw: kw.update(dropout_p=[0.1, 1.0]), ValueError, r"dropout_p\[1\] must be in \[0, 1\), got 1.0"),
    (lambda kw: kw.update(dropout_p=[0.1, "0.2"]), TypeError, r"dropout_p\[1\] must be a float"),
    (lambda kw: kw.update(adapter_ids=kw["adapter_ids"].float()), TypeError, "adapter_ids must be an integer"),
    (lambda kw: kw.update(adapter_ids=kw["adapter_ids"] > 0), TypeError, "adapter_ids must be an integer"),
    (lambda kw: kw.update(adapter_ids=[0, 1]), TypeError, "adapter_ids must be a torch.Tensor"),
    (lambda kw: kw.update(adapter_ids=kw["adapter_ids"][:5]), ValueError,
     r"adapter_ids must have x's leading shape \(6,\) .*got \(5,\)"),
    (lambda kw: kw.update(adapter_ids=torch.tensor([0, 1, -1, 2, 1, 1], device=DEVICE)), ValueError,
     r"adapter_ids must be -1 .* \[0, 2\), got ids from -1 to 2"),
    (lambda kw: kw.update(adapter_ids=torch.tensor([0, 1, -2, 0, 1, 1], device=DEVICE)), ValueError,
     "got ids from -2 to 1"),
])
def test_bad_input_is_rejected(change, err, words):
    with pytest.raises(err, match=words):
        _bad_call(change)()


def test_rank_columns_are_made_once(monkeypatch):
    """The column ids and scales are kept per (device, ranks, scales): a
    model's layers do not make them at every call. Made while a CUDA graph
    captures, they are that graph's (written by its replays), not kept."""
    monkeypatch.setattr(ops, "_rank_columns_kept", type(ops._rank_columns_kept)())  # (the suite's own left alone)
    first = ops._rank_columns(torch.device(DEVICE), (2, 0, 3), (1.0, 7.0, 0.5))
    assert first[0].dtype == torch.int32 and first[1].dtype == torch.float32
    assert first[0].tolist() == [0, 0, 2, 2, 2] and first[1].tolist() == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert ops._rank_columns(torch.device(DEVICE), (2, 0, 3), (1.0, 7.0, 0.5))[0] is first[0]
    made = []
    monkeypatch.setattr(ops, "_make_rank_columns", lambda *key: made.append(key) or ("ids", "scales"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    key = (torch.device("cuda", 0), (4,), (2.0,))
    assert ops._rank_columns(*key) == ("ids", "scales") and ops._rank_columns(*key) == ("ids", "scales")
    assert made == [key, key] and key not in ops._rank_columns_kept  # (made for each capture, never kept)
    # the most recently used kept, up to the bound
    monkeypatch.setattr(ops, "_RANK_COLUMNS_KEPT", 2)
    cpu = torch.device("cpu")
    for scale in (1.0, 2.0, 1.0, 3.0):  # (1.0 used again: 2.0 the least recently used)
        ops._rank_columns(cpu, (1,), (scale,))
    assert list(ops._rank_columns_kept) == [(cpu, (1,), (1.0,)), (cpu, (1,), (3.0,))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_cuda_graph_captures_adapters_of_scales_no_call_had_before():
    """A capture makes its column ids and scales on the device (no copy from
    the host, which a capture cannot make): adapters of other scales than the
    warm-up's, and the replays give eager's outputs bit for bit."""
    x = torch.randn(64, 96, device="cuda", dtype=torch.float16)
    w, b, _, _ = make_params(96, 80, 1, torch.float16, True, device="cuda")
    lora_a, lora_b = zip(*[make_params(96, 80, r, torch.float16, False, device="cuda")[2:] for r in (8, 4)])
    ids = torch.randint(-1, 2, (64,), device="cuda")

    def step(scaling):
        return fused_lora.multi_lora_linear(x, w, list(lora_a), list(lora_b), ids, b, scaling=scaling,
                                            backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the kernels compiled, and these ids checked, before the capture
        step([0.5, 2.0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step([0.25, 3.0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, step([0.25, 3.0]))


@pytest.mark.parametrize("dropout", [0.2, [0.3, 0.1]], ids=["one_p", "p_an_adapter"])
def test_compile_fullgraph_one_frame(dropout):
    """torch.compile traces the whole call, ids unchecked (their NaN rows the
    kernels' own doing), into one frame: the same outputs and gradients as
    eager (one dropout probability, or one an adapter)."""
    import torch._dynamo.testing

    x = make_x((2, 7, 24), F32).requires_grad_()
    w, b, _, _ = make_params(24, 16, 1, F32, True)
    lora_a, lora_b = _adapters(24, 16, (3, 5), F32)
    ids = torch.tensor([1, 0], device=DEVICE)

    def step(x, lora_a, lora_b, ids):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[0.5, 2.0], dropout_p=dropout,
                                         seed=3, backend="triton")
        return y.square().sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    params = [x, *lora_a, *lora_b]
    want = torch.autograd.grad(step(x, lora_a, lora_b, ids), params)
    loss = compiled(x, lora_a, lora_b, ids)
    got = torch.autograd.grad(loss, params)
    assert counter.frame_count == 1
    assert torch.equal(loss, step(x, lora_a, lora_b, ids).detach())
    for g, h in zip(got, want):
        assert torch.equal(g, h)
    bad = compiled(x, lora_a, lora_b, torch.tensor([2, 0], device=DEVICE))  # (unchecked: NaN, not an error)
    assert torch.isnan(bad)


def test_the_ops_pass_opcheck_with_each_adapters_dropout_probability():
    """The registered ops with the adapters' columns and ``adapter_p`` (their
    schema, fakes and autograd: torch.library.opcheck), and
    ``LoRALinearFunction`` taking them, as multi_lora_linear computes."""
    x = make_x((3, 5, 32), F32).requires_grad_()
    w, b, _, _ = make_params(32, 16, 1, F32, True)
    lora_a, lora_b = _adapters(32, 16, (3, 5), F32)
    ids = torch.tensor([[0, 1, -1, 1, 0]] * 3, dtype=torch.int32, device=DEVICE)
    a, bb = torch.cat(lora_a).detach().requires_grad_(), torch.cat(lora_b, 1).detach().requires_grad_()
    rank_ids = torch.tensor([0] * 3 + [1] * 5, dtype=torch.int32, device=DEVICE)
    rank_scaling = torch.tensor([0.5 / 0.7] * 3 + [2.0 / 0.9] * 5, device=DEVICE)
    adapter_p = torch.tensor([0.3, 0.1], device=DEVICE)
    seed = torch.tensor(7)
    extra = ("", None, ids, rank_ids, rank_scaling, None, None, adapter_p)
    y, _, dy = opcheck_lora_ops(x, w, b, a, bb, 1.0, 0.3, seed, extra)
    eager = fused_lora.multi_lora_linear(x, w, [a[:3], a[3:]], [bb[:, :3], bb[:, 3:]], ids, b, scaling=[0.5, 2.0],
                                         dropout_p=[0.3, 0.1], seed=7, backend="triton")
    assert torch.equal(y, eager)
    function = fused_lora.LoRALinearFunction.apply(x, w, b, a, bb, 1.0, 0.3, seed, None, ids, rank_ids, rank_scaling,
                                                    None, None, adapter_p)
    assert torch.equal(function, eager)
    for got, want in zip(torch.autograd.grad(function, (x, a, bb), dy),
                         torch.autograd.grad(eager, (x, a, bb), dy)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="adapter_p holds the adapters' dropout probabilities: it comes with "
                                         "adapter_ids, rank_ids and rank_scaling"):
        fused_lora.LoRALinearFunction.apply(x, w, b, a, bb, 1.0, 0.3, seed, None, None, None, None, None, None,
                                            adapter_p)
    with pytest.raises(ValueError, match=r"adapter_p must be a contiguous float32 tensor .* got a torch.float64"):
        fused_lora.LoRALinearFunction.apply(x, w, b, a, bb, 1.0, 0.3, seed, None, ids, rank_ids, rank_scaling,
                                            None, None, adapter_p.double())


def test_the_benchmarks_baseline_computes_the_same():
    """The benchmark's baseline (PEFT's mixed batch, adapter after adapter
    over its own rows) computes what the fused op does."""
    from fused_lora.benchmark import per_adapter_lora

    x = make_x((50, 40), F32).requires_grad_()
    w, b, _, _ = make_params(40, 30, 1, F32, True)
    lora_a, lora_b = _adapters(40, 30, (2, 6, 3), F32)
    ids = _ids((50,), 3)
    dy = torch.randn(50, 30, device=DEVICE)
    y = per_adapter_lora(x, w, b, lora_a, lora_b, ids, [1.0, 0.5, 2.0], 0.0)
    grads = torch.autograd.grad(y, [x, *lora_a, *lora_b], dy)
    y64, g64 = _oracle(x, w, b, lora_a, lora_b, ids, [1.0, 0.5, 2.0], dy, 0.0, 0,
                       ["x"] + [f"lora_A[{i}]" for i in range(3)] + [f"lora_B[{i}]" for i in range(3)])
    assert_close(y, y64, F32, "y")
    for g, want in zip(grads, g64.values()):
        assert_close(g, want, F32, "grad")


# ----------------------------------------------------------------------------
# The layer: MultiLoRALinear
# ----------------------------------------------------------------------------

def test_layer_init_shapes_and_scales():
    layer = fused_lora.MultiLoRALinear(24, 16, ranks=[2, 8], alphas=[4, 4], device=DEVICE)
    assert [tuple(a.shape) for a in layer.lora_A] == [(2, 24), (8, 24)]
    assert [tuple(b.shape) for b in layer.lora_B] == [(16, 2), (16, 8)]
    assert layer.scalings == (2.0, 0.5) and layer.num_adapters == 2
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert all(torch.equal(b, torch.zeros_like(b)) for b in layer.lora_B)  # (a fresh adapter changes nothing)
    assert fused_lora.MultiLoRALinear(16, 8, ranks=[4, 16], alphas=[8, 8], use_rslora=True).scalings == (4.0, 2.0)
    assert fused_lora.MultiLoRALinear(16, 8, ranks=[4]).scalings == (1.0,)  # (alpha = r by default)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.0", "lora_A.1", "lora_B.0", "lora_B.1"}
    assert "ranks=[2, 8], alphas=[4, 4], dropout=0" in repr(layer)


@pytest.mark.parametrize("training", [False, True])
def test_layer_runs_each_row_through_its_adapter(training):
    """As each adapter on its own rows, in float64, gradients to the adapters
    alone (the base frozen); in train() with dropout, the mask of the seed the
    layer draws from the default generator (none in eval())."""
    layer = fused_lora.MultiLoRALinear(40, 24, ranks=[3, 5, 2], alphas=[6, 5, 8], dropout=0.2, device=DEVICE,
                                       backend="triton").train(training)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = make_x((2, 9, 40), F32).requires_grad_()
    ids = torch.tensor([2, -1], device=DEVICE)  # (a sample each)
    torch.manual_seed(5)
    seed = draw_seed_tensor(DEVICE)  # (the seed the layer draws next)
    torch.manual_seed(5)
    y = layer(x, ids)
    dy = torch.randn_like(y)
    names = ["x"] + [f"lora_A[{i}]" for i in range(3)] + [f"lora_B[{i}]" for i in range(3)]
    grads = torch.autograd.grad(y, [x, *layer.lora_A, *layer.lora_B], dy, retain_graph=True)
    y64, g64 = _oracle(x, layer.weight, layer.bias, list(layer.lora_A), list(layer.lora_B), ids, layer.scalings,
                       dy, 0.2 if training else 0.0, seed, names)
    assert_close(y, y64, F32, "y")
    for name, g in zip(names, grads):
        assert_close(g, g64[name], F32, f"d{name}")
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))  # (adapter 0: no row)
    y.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("training", [False, True])
def test_layer_active_adapter_runs_every_row_through_it(training):
    """Without ids, every row through ``active_adapter`` (as ids all of it:
    the float64 oracle, its own dropout probability in train(), the other
    adapters no gradient); -1 and an adapter of rank 0 give the base alone;
    ids given win; None (the default) asks for ids; bad values are typed
    errors."""
    layer = fused_lora.MultiLoRALinear(40, 24, ranks=[3, 0, 5], alphas=[6, 1, 5], dropout=[0.1, 0.0, 0.3],
                                       device=DEVICE, backend="triton").train(training)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = make_x((2, 9, 40), F32).requires_grad_()
    with pytest.raises(ValueError, match=r"needs adapter_ids.*or set the layer's active_adapter"):
        layer(x)
    layer.active_adapter = 2
    assert "active_adapter=2" in repr(layer)
    torch.manual_seed(5)
    seed = draw_seed_tensor(DEVICE)
    torch.manual_seed(5)
    y = layer(x)
    dy = torch.randn_like(y)
    params = [x, *layer.lora_A, *layer.lora_B]
    grads = torch.autograd.grad(y, params, dy, allow_unused=True)
    names = ["x", "lora_A[2]", "lora_B[2]"]
    y64, g64 = _oracle(x, layer.weight, layer.bias, list(layer.lora_A), list(layer.lora_B),
                       torch.full((2,), 2, device=DEVICE), layer.scalings, dy, 0.3 if training else 0.0, seed, names)
    assert_close(y, y64, F32, "y")
    for name, g in zip(names, (grads[0], grads[3], grads[6])):
        assert_close(g, g64[name], F32, f"d{name}")
    assert all(g is None for g in (grads[1], grads[2], grads[4], grads[5]))  # (the other adapters: not run)
    layer.eval()
    base = F.linear(x, layer.weight, layer.bias)
    for i in (-1, 1):  # (the base alone; adapter 1 has rank 0 here)
        layer.active_adapter = i
        assert torch.equal(layer(x), base)
    ids = torch.tensor([0, -1], device=DEVICE)
    y_ids = layer(x, ids)
    y64, _ = _oracle(x, layer.weight, layer.bias, list(layer.lora_A), list(layer.lora_B), ids, layer.scalings,
                     dy, 0.0, 0, ["x"])
    assert_close(y_ids, y64, F32, "ids over the active adapter")
    layer.active_adapter = 0
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base)
    for bad, err in ((3, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="active_adapter"):
            layer.active_adapter = bad
    assert layer.active_adapter == 0
    layer.active_adapter = None
    layer.adapter_enabled = True
    assert "active_adapter" not in repr(layer)
    with pytest.raises(ValueError, match="needs adapter_ids"):
        layer(x)


@pytest.mark.parametrize("strategy", [None, "in_loop", "split", "hybrid"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_summed_adapters_run_every_row_through_each(strategy, dtype):
    """``summed_lora_linear`` (PEFT's several active adapters): every row
    gets every adapter's term, forward and every gradient on every
    strategy, as the float64 sum of each adapter on every row."""
    k, n = 45, 37
    x = make_x((3, 19, k), dtype, "permuted").requires_grad_()
    w, b, _, _ = make_params(k, n, 1, dtype, True)
    lora_a, lora_b = _adapters(k, n, (4, 1, 8), dtype)
    scalings = [2.0, 0.5, 1.0]
    forced = fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext()
    with forced:
        y = ops.summed_lora_linear(x, w, lora_a, lora_b, b, scaling=scalings, backend="triton")
    dy = torch.randn_like(y)
    names = ["x", *(f"lora_{ab}[{i}]" for ab in "AB" for i in range(3))]
    grads = torch.autograd.grad(y, [x, *lora_a, *lora_b], dy)
    y64, g64 = 0.0, {}
    for i in range(3):  # (each adapter on every row, its terms summed: the oracle's rows of adapter i, all)
        y_i, g_i = _oracle(x, w, b, lora_a, lora_b, torch.full((3,), i, device=DEVICE), scalings, dy, 0.0, 0, names)
        y64 = y64 + y_i - (F.linear(x.double(), w.double(), b.double()) if i else 0.0)
        for name, g in g_i.items():
            g64[name] = g64.get(name, 0.0) + (g if name != "x" or i == 0 else
                                              g - F.linear(dy.double(), w.double().t()))
    assert_close(y, y64, dtype, "y")
    for name, g in zip(names, grads):
        assert_close(g, g64[name], dtype, f"d{name}")


def test_layer_several_active_adapters_are_summed():
    """``active_adapter`` of several: their terms summed on every row (one
    of rank 0 skipped), ``summed_lora_linear``'s; in train mode with dropout
    each adapter's own mask, ``nn.Dropout``'s drawn in the tuple's order
    (PEFT's); a DoRA adapter among them, duplicates or bad indices refused."""
    layer = fused_lora.MultiLoRALinear(40, 24, ranks=[3, 0, 5], alphas=[6, 1, 5], dropout=[0.1, 0.0, 0.3],
                                       device=DEVICE, backend="triton").eval()
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = make_x((2, 9, 40), F32)
    layer.active_adapter = [2, 1, 0]
    assert layer.active_adapter == (2, 1, 0) and "active_adapter=(2, 1, 0)" in repr(layer)
    want = ops.summed_lora_linear(x, layer.weight, [layer.lora_A[2], layer.lora_A[0]],
                                  [layer.lora_B[2], layer.lora_B[0]], layer.bias,
                                  scaling=[layer.scalings[2], layer.scalings[0]], backend="triton")
    assert torch.equal(layer(x), want)
    layer.train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    want = F.linear(x, layer.weight, layer.bias)
    for i in (2, 0):
        want = want + F.linear(F.linear(F.dropout(x, layer.dropouts[i]), layer.lora_A[i]), layer.lora_B[i]) \
            * layer.scalings[i]
    assert torch.equal(got, want)
    layer.active_adapter = [1]
    assert layer.active_adapter == 1
    for bad, err, words in (([0, 0], ValueError, "distinct"), ([], ValueError, "at least one"),
                            ([0, 3], ValueError, r"active_adapter\[1\]"), ([0, -1], ValueError, r"active_adapter\[1\]")):
        with pytest.raises(err, match=words):
            layer.active_adapter = bad
    dora = fused_lora.MultiLoRALinear(40, 24, ranks=[3, 5], use_dora=[False, True], device=DEVICE)
    dora.active_adapter = (0, 1)
    with pytest.raises(ValueError, match="include adapter 1, which is DoRA"):
        dora(x)


def test_layer_from_linear_shares_the_base_and_keeps_adapters_in_their_dtype():
    """from_linear: the base *is* the linear's (frozen, no copy); fp32
    adapters on an fp16 base compute in fp16 and get fp32 gradients."""
    linear = torch.nn.Linear(32, 20, device=DEVICE, dtype=torch.float16)
    layer = fused_lora.MultiLoRALinear.from_linear(linear, ranks=[4, 4], alphas=[8, 2], adapter_dtype=torch.float32)
    assert layer.weight is linear.weight and layer.bias is linear.bias and not linear.weight.requires_grad
    assert all(p.dtype == torch.float32 and p.device == linear.weight.device for p in layer.parameters()
               if p is not linear.weight and p is not linear.bias)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(12, 32, device=DEVICE, dtype=torch.float16)
    ids = torch.tensor([0, 1, -1] * 4, device=DEVICE)
    y = layer.eval()(x, ids)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (*layer.lora_A, *layer.lora_B))
    y64, _ = _oracle(x, linear.weight, linear.bias, [a.half() for a in layer.lora_A],
                     [b.half() for b in layer.lora_B], ids, layer.scalings, torch.ones_like(y), 0.0, 0, ["x"])
    assert_close(y, y64, torch.float16, "y")


def test_layer_state_dict_round_trip_and_delta_weight():
    src = fused_lora.MultiLoRALinear(16, 12, ranks=[2, 3], alphas=[4, 3], device=DEVICE)
    with torch.no_grad():
        for b in src.lora_B:
            b.normal_()
    dst = fused_lora.MultiLoRALinear(16, 12, ranks=[2, 3], alphas=[4, 3], device=DEVICE)
    dst.load_state_dict(src.state_dict())
    x, ids = make_x((7, 16), F32), torch.tensor([0, 1, 1, -1, 0, 1, 0], device=DEVICE)
    assert torch.equal(dst.eval()(x, ids), src.eval()(x, ids))
    # merging adapter 1 into a copy of the base gives its rows' output
    merged = F.linear(x, src.weight + src.delta_weight(1), src.bias)
    assert_close(src(x, torch.ones(7, dtype=torch.long, device=DEVICE)), merged.double(), F32, "merged adapter 1")
    with pytest.raises(ValueError, match=r"i must be an adapter's index in \[0, 2\), got 2"):
        src.delta_weight(2)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("fan_in_fan_out, use_rslora", [(False, False), (True, True)], ids=["linear", "conv1d-rslora"])
def test_layer_combines_several_adapters_into_one_weighted_delta(dtype, fan_in_fan_out, use_rslora):
    layer = fused_lora.MultiLoRALinear(23, 17, ranks=[3, 0, 5, 1], alphas=[6, 1, 2, 3], use_rslora=use_rslora,
                                       fan_in_fan_out=fan_in_fan_out, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    adapters, weights = [2, 0, 1, 3], [0.75, -1.5, 4.0, 0.25]
    s = [alpha / (r ** 0.5 if use_rslora else r) if r else 0.0 for r, alpha in zip(layer.ranks, layer.alphas)]
    delta64 = sum(w * s[i] * (layer.lora_B[i].double() @ layer.lora_A[i].double()) for i, w in zip(adapters, weights))
    base64 = (layer.weight.t() if fan_in_fan_out else layer.weight).double()
    delta = layer.delta_weight(adapters, weights)
    assert delta.dtype == dtype and delta.shape == (17, 23)
    assert_close(delta, delta64, dtype, "combined delta")
    merged = layer.merged_weight(adapters, weights)
    assert merged.shape == layer.weight.shape
    assert_close(merged.t() if fan_in_fan_out else merged, base64 + delta64, dtype, "combined merged weight")
    # one adapter named in a list is that adapter, bit for bit; weights default to 1
    assert torch.equal(layer.merged_weight([2]), layer.merged_weight(2))
    assert torch.equal(layer.delta_weight([0, 2]), layer.delta_weight([0, 2], [1, 1.0]))
    assert_close(layer.delta_weight(0, -2.0), -2 * s[0] * (layer.lora_B[0].double() @ layer.lora_A[0].double()),
                 dtype, "one adapter weighted")


@pytest.mark.parametrize("i, weights, err, words", [
    ([0, 0], None, ValueError, r"i names an adapter more than once: \[0, 0\]"),
    ([0, 3], None, ValueError, r"i must hold adapters' indices in \[0, 3\), got 3"),
    ([], None, ValueError, "i must name at least one adapter"),
    ([0, 1], [1.0], ValueError, r"weights must hold one number for each adapter of i=\[0, 1\], got 1"),
    ([0, 1], [1.0, math.inf], ValueError, r"weights\[1\] must be finite, got inf"),
    ([0, 1], [1.0, "2"], TypeError, r"weights\[1\] must be a real number"),
    ([0, 1], 2.0, TypeError, "weights must be a sequence of numbers"),
    ([0, True], None, TypeError, r"i\[1\] must be an int, got bool"),
    ("01", None, TypeError, "i must be an int, got str"),
])
def test_layer_combination_refusals(i, weights, err, words):
    layer = fused_lora.MultiLoRALinear(8, 4, ranks=[2, 1, 3], device=DEVICE)
    with pytest.raises(err, match=words):
        layer.delta_weight(i, weights)
    with pytest.raises(err, match=words):
        layer.merged_weight(i, weights)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(ranks=[]), ValueError, "at least one adapter"),
    (dict(ranks=4), TypeError, "ranks must be a sequence"),
    (dict(ranks=[2, -1]), ValueError, r"ranks\[1\] must be >= 0"),
    (dict(ranks=[2, 2.5]), TypeError, r"ranks\[1\] must be an int"),
    (dict(ranks=[2, 2], alphas=[1]), ValueError, r"one value per adapter \(2\), got 1"),
    (dict(ranks=[2], alphas=[math.nan]), ValueError, r"alphas\[0\] must be a finite"),
    (dict(ranks=[2], dropout=1.0), ValueError, "dropout must be in"),
    (dict(ranks=[2], backend="cuda"), ValueError, "backend must be one of"),
])
def test_layer_bad_arguments(kwargs, err, words):
    with pytest.raises(err, match=words):
        fused_lora.MultiLoRALinear(8, 4, **kwargs)


def test_layer_bad_ids():
    layer = fused_lora.MultiLoRALinear(8, 4, ranks=[2, 2], device=DEVICE)
    x = make_x((3, 8), F32)
    with pytest.raises(ValueError, match=r"\[0, 2\), got ids from 0 to 2"):
        layer(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer"):
        layer(x, torch.zeros(3))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        fused_lora.MultiLoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1), ranks=[2])


def test_autocast_and_odd_shapes():
    """Under autocast, as F.linear: the tensors cast to the autocast dtype
    (the adapters' gradients back in their own); a 1-D x (one row, a 0-d id)
    and an empty batch."""
    x = make_x((21, 32), F32).requires_grad_()
    w, b, _, _ = make_params(32, 16, 1, F32, True)
    lora_a, lora_b = _adapters(32, 16, (2, 4), F32)
    ids = _ids((21,), 2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 2.0], backend="triton")
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().sum(), [x, *lora_a])
    assert all(g.dtype == F32 for g in grads)
    y64, _ = _oracle(x.bfloat16(), w.bfloat16(), b.bfloat16(), [a.bfloat16() for a in lora_a],
                     [bb.bfloat16() for bb in lora_b], ids, [1.0, 2.0], torch.ones_like(y), 0.0, 0, ["x"])
    assert_close(y, y64, BF16, "y under autocast")
    one = fused_lora.multi_lora_linear(x[3], w, lora_a, lora_b, ids[3], b, scaling=1.0, backend="triton")
    assert one.shape == (16,)
    assert torch.equal(one, fused_lora.multi_lora_linear(x[3:4], w, lora_a, lora_b, ids[3:4], b, scaling=1.0,
                                                         backend="triton")[0])
    empty = fused_lora.multi_lora_linear(x[:0], w, lora_a, lora_b, ids[:0], b, scaling=1.0, backend="triton")
    assert empty.shape == (0, 16)


def test_eager_calls_skip_the_op_dispatcher(monkeypatch):
    """As lora_linear's: in eager mode the autograd Function (training) or the
    entry point (inference) runs the Triton passes itself, not through the ops."""
    import sys

    callers = []
    for name in ("forward_triton", "backward_triton"):
        def record(*args, _real=getattr(ops, name), **kwargs):
            callers.append(sys._getframe(1).f_code.co_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, record)
    layer = fused_lora.MultiLoRALinear(24, 16, ranks=[2, 4], dropout=0.1, device=DEVICE)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, 0], device=DEVICE)
    layer(x, ids).sum().backward()
    with torch.no_grad():
        layer.eval()(x, ids)
    assert callers == ["forward", "_gradients", "_lora_linear"]


def test_ids_are_read_once_per_version(monkeypatch):
    """A model's layers take the same ids: the first call reads them (one
    host sync), the others reuse that, until the tensor changes in place;
    inference tensors (no version) are read every time."""
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    layers = [fused_lora.MultiLoRALinear(16, 16, ranks=[2, 2], device=DEVICE, backend="triton") for _ in range(3)]
    x = make_x((6, 16), F32)
    ids = torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE)
    for layer in layers:
        x = layer(x, ids)
    assert len(reads) == 1
    ids[2] = 5  # (in place: read again, and refused)
    with pytest.raises(ValueError, match="got ids from 0 to 5"):
        layers[0](x, ids)
    assert len(reads) == 2
    with torch.inference_mode():
        frozen = torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE)
        for layer in layers:
            layer(x, frozen)
    assert len(reads) == 5
