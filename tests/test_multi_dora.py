"""DoRA among several adapters on one base (``multi_lora_linear``'s
``magnitude``, ``MultiLoRALinear``'s ``use_dora``): each row through its own
adapter, DoRA or LoRA, in one set of fused launches, against an oracle that
runs each adapter alone (the reference's ``dora_linear`` or ``lora_linear``)
on every row in float64 and keeps its own rows."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fused_lora
from fused_lora import ops, reference
from lora_testing import DEVICE, VOCAB, assert_close, make_params, make_x, tiny_llama

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _adapters(k, n, ranks, dora, dtype):
    """Each adapter's (A, B) random, and a DoRA one's magnitude (near the
    adapted rows' norms, not equal: γ is exercised), requiring grad."""
    lora_a, lora_b, mags = [], [], []
    for r, d in zip(ranks, dora):
        _, _, a, b = make_params(k, n, r, dtype, False)
        lora_a.append(a.requires_grad_())
        lora_b.append(b.requires_grad_())
        mags.append((1.0 + torch.rand(n, dtype=dtype, device=DEVICE)).requires_grad_() if d else None)
    return lora_a, lora_b, mags


def _ids(shape, n):
    """Random ids in [-1, n), every one present where there is room."""
    flat = torch.randint(-1, n, (int(torch.Size(shape).numel()),), device=DEVICE)
    flat[:min(n + 1, flat.numel())] = torch.arange(-1, n, device=DEVICE)[:flat.numel()]
    return flat.view(shape)


def _oracle(x, w, b, lora_a, lora_b, mags, ids, scalings, p, seed, dy, names):
    """float64: each adapter alone on every row (its own dropout
    probability, the same seed), kept on its rows; -1 rows the base. The
    output and the gradients of the inputs ``names``."""
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, w64, b64 = leaf(x), leaf(w), leaf(b)
    a64, bb64, m64 = [leaf(a) for a in lora_a], [leaf(t) for t in lora_b], [leaf(m) for m in mags]
    ids = ids.reshape(*ids.shape, *(1,) * (x.dim() - 1 - ids.dim())).expand(x.shape[:-1]).unsqueeze(-1)
    y = F.linear(x64, w64, b64)
    for i in range(len(lora_a)):
        if not lora_a[i].shape[0]:  # (rank 0: its rows get the base)
            continue
        p_i = p[i] if isinstance(p, (list, tuple)) else p
        kw = dict(scaling=scalings[i], dropout_p=p_i, seed=seed)
        y_i = (reference.lora_linear(x64, w64, a64[i], bb64[i], b64, **kw) if m64[i] is None else
               reference.dora_linear(x64, w64, a64[i], bb64[i], m64[i], b64, **kw))
        y = torch.where(ids == i, y_i, y)
    named = {"x": x64, "weight": w64, "bias": b64}
    for i in range(len(lora_a)):
        named.update({f"lora_A[{i}]": a64[i], f"lora_B[{i}]": bb64[i], f"magnitude[{i}]": m64[i]})
    grads = torch.autograd.grad(y, [named[k] for k in names], dy.double()) if names else ()
    return y.detach(), dict(zip(names, grads))


def _inputs(x, w, b, lora_a, lora_b, mags):
    named = {"x": x, "weight": w, "bias": b}
    for i in range(len(lora_a)):
        named.update({f"lora_A[{i}]": lora_a[i], f"lora_B[{i}]": lora_b[i], f"magnitude[{i}]": mags[i]})
    return {k: t for k, t in named.items() if t is not None and t.requires_grad}


def _run_and_check(x, w, b, lora_a, lora_b, mags, ids, scalings, p, dtype, backend="triton", seed=11, **kw):
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=scalings, dropout_p=p, seed=seed,
                                     magnitude=mags, backend=backend, **kw)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn_like(y)
    inputs = _inputs(x, w, b, lora_a, lora_b, mags)
    grads = torch.autograd.grad(y, list(inputs.values()), dy)
    if kw.get("weight_scale") is not None:  # (the oracle on Ŵ)
        w = fused_lora.quant.dequantize_base(w, kw["weight_scale"], dtype)
    y64, g64 = _oracle(x, w, b, lora_a, lora_b, mags, ids, scalings, p, seed, dy, list(inputs))
    assert_close(y, y64, dtype, "y")
    for (name, t), g in zip(inputs.items(), grads):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert_close(g, g64[name], dtype, f"d{name}")
    return y, dict(zip(inputs, grads))


@pytest.mark.parametrize("strategy", [None, "in_loop", "split", "hybrid"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("p", [0.0, [0.1, 0.0, 0.3]], ids=["p0", "p_each"])
def test_each_row_runs_its_own_adapter_dora_or_not(strategy, dtype, p):
    """Two DoRA adapters and a LoRA one, rows of each and of none (-1), a
    2-D strided x: forward and every gradient (magnitudes, base and bias
    included), on every strategy, with and without each adapter's own
    dropout, as each adapter alone on its own rows in float64."""
    k, n = 45, 37
    x = make_x((57, k), dtype, "strided").requires_grad_()
    w, b, _, _ = make_params(k, n, 1, dtype, True)
    w.requires_grad_()
    b.requires_grad_()
    lora_a, lora_b, mags = _adapters(k, n, (4, 1, 8), (True, False, True), dtype)
    forced = fused_lora.dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext()
    with forced:
        _run_and_check(x, w, b, lora_a, lora_b, mags, _ids((57,), 3), [0.5, 2.0, 1.5], p, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_3d_x_an_id_per_sample_and_per_token(backend):
    """A 3-D permuted x (leading dims that cannot merge), ranks 16 and 64
    (a chunked rank), ids per sample and per token, no bias: as the oracle."""
    k, n = 40, 24
    x = make_x((3, 21, k), F32, "permuted").requires_grad_()
    w, _, _, _ = make_params(k, n, 1, F32, False)
    lora_a, lora_b, mags = _adapters(k, n, (16, 64), (True, True), F32)
    for ids in (torch.tensor([1, -1, 0], device=DEVICE), _ids((3, 21), 2)):
        _run_and_check(x, w, None, lora_a, lora_b, mags, ids, [1.0, 0.25], [0.2, 0.05], F32, backend)


def test_an_int8_base():
    """Many DoRA adapters over one int8 base: Ŵ throughout, the norms from
    its dequantised tiles; with dropout, the correction on it too."""
    k, n = 33, 20
    x = make_x((19, k), F32).requires_grad_()
    w, b, _, _ = make_params(k, n, 1, F32, True)
    q, scale = fused_lora.quantize_int8(w)
    lora_a, lora_b, mags = _adapters(k, n, (3, 5), (True, False), F32)
    for p in (0.0, [0.25, 0.1]):
        _run_and_check(x, q, b, lora_a, lora_b, mags, _ids((19,), 2), [1.0, 2.0], p, F32, weight_scale=scale)


def test_the_torch_backend_in_float64_is_the_oracle():
    """The CPU fallback (the reference's side-by-side form, its base GEMMs
    once) agrees with each adapter alone in float64, to float64's noise."""
    k, n = 30, 17
    x = make_x((23, k), torch.float64, device="cpu").requires_grad_()
    w, b, _, _ = make_params(k, n, 1, torch.float64, True, device="cpu")
    torch.manual_seed(5)
    lora_a, lora_b, mags = [], [], []
    for r, d in ((2, True), (6, False), (3, True)):
        lora_a.append(torch.randn(r, k, dtype=torch.float64, requires_grad=True))
        lora_b.append(torch.randn(n, r, dtype=torch.float64, requires_grad=True))
        mags.append((1 + torch.rand(n, dtype=torch.float64)).requires_grad_() if d else None)
    ids = torch.randint(-1, 3, (23,))
    ids[:4] = torch.arange(-1, 3)
    for p in (0.0, [0.3, 0.2, 0.0]):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 0.5, 2.0], dropout_p=p,
                                         seed=2, magnitude=mags, backend="torch")
        dy = torch.randn_like(y)
        inputs = _inputs(x, w, b, lora_a, lora_b, mags)
        grads = torch.autograd.grad(y, list(inputs.values()), dy)
        y64, g64 = _oracle(x, w, b, lora_a, lora_b, mags, ids, [1.0, 0.5, 2.0], p, 2, dy, list(inputs))
        torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
        for name, g in zip(inputs, grads):
            torch.testing.assert_close(g, g64[name], rtol=1e-12, atol=1e-12, msg=name)


def test_dora_rows_alone_give_dora_linear_and_a_dora_adapter_its_own_gradients():
    """Every row of one DoRA adapter: :func:`fused_lora.dora_linear` of it;
    the other adapters (DoRA and not) get zero gradients, their magnitude
    included, and a row of none leaves every adapter's alone."""
    k, n = 32, 16
    x = make_x((9, k), F32)
    w, b, _, _ = make_params(k, n, 1, F32, True)
    lora_a, lora_b, mags = _adapters(k, n, (4, 2, 3), (True, False, True), F32)
    ids = torch.full((9,), 2, device=DEVICE)
    y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 1.0, 0.5], magnitude=mags,
                                     backend="triton")
    want = fused_lora.dora_linear(x, w, lora_a[2], lora_b[2], mags[2], b, scaling=0.5, backend="triton")
    assert_close(y, want.double(), F32, "y")
    grads = torch.autograd.grad(y.square().sum(), [mags[0], lora_a[1], lora_b[0], mags[2]])
    assert not grads[0].any() and not grads[1].any() and not grads[2].any()
    assert grads[3].abs().sum() > 0
    ids[0] = -1
    y = fused_lora.multi_lora_linear(x[:1], w, lora_a, lora_b, ids[:1], b, scaling=[1.0, 1.0, 0.5], magnitude=mags,
                                     backend="triton")
    assert_close(y, F.linear(x[:1], w, b).double(), F32, "base row")
    for g in torch.autograd.grad(y.sum(), [mags[0], mags[2], lora_a[0]]):
        assert not g.any()


def test_bitwise_reproducible():
    """The same inputs and seed: bitwise the same output and gradients
    (the magnitudes' summed over their rows without atomics)."""
    k, n = 40, 33
    x = make_x((70, k), F32).requires_grad_()
    w, b, _, _ = make_params(k, n, 1, F32, True)
    lora_a, lora_b, mags = _adapters(k, n, (4, 8), (True, True), F32)
    ids = _ids((70,), 2)
    runs = []
    for _ in range(2):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[1.0, 2.0], dropout_p=[0.1, 0.2],
                                         seed=9, magnitude=mags, backend="triton")
        runs.append((y, *torch.autograd.grad(y.square().sum(), [x, *lora_a, *mags])))
    for one, two in zip(*runs):
        assert torch.equal(one, two)


def test_unreadable_ids_give_nan_rows(monkeypatch):
    """Where ids cannot be read back (torch.compile, a CUDA graph's
    capture), an id outside [-1, n) gives its row NaN, the others as usual."""
    x = make_x((8, 16), F32)
    w, b, _, _ = make_params(16, 8, 1, F32, True)
    lora_a, lora_b, mags = _adapters(16, 8, (2, 2), (True, False), F32)
    ids = torch.tensor([0, 1, -1, 2, 0, -3, 1, 0], device=DEVICE)
    good = torch.where((ids >= -1) & (ids < 2), ids, 0)
    want = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, good, b, magnitude=mags, backend="triton")
    monkeypatch.setattr(ops, "_unreadable", lambda t: True)
    got = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, magnitude=mags, backend="triton")
    bad = (ids < -1) | (ids >= 2)
    assert torch.isnan(got[bad]).all()
    assert torch.equal(got[~bad], want[~bad])


def test_compile_fullgraph():
    """torch.compile traces a call with DoRA adapters and their own dropout
    (the mask's op of one probability a row) into one frame: eager's
    output and gradients."""
    import torch._dynamo.testing

    x = make_x((2, 7, 24), F32).requires_grad_()
    w, b, _, _ = make_params(24, 16, 1, F32, True)
    lora_a, lora_b, mags = _adapters(24, 16, (3, 5), (True, False), F32)
    ids = torch.tensor([1, 0], device=DEVICE)

    def step(x, lora_a, lora_b, mags, ids):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, scaling=[0.5, 2.0], dropout_p=[0.2, 0.1],
                                         seed=3, magnitude=mags, backend="triton")
        return y.square().sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    params = [x, *lora_a, *lora_b, mags[0]]
    want = torch.autograd.grad(step(x, lora_a, lora_b, mags, ids), params)
    got = torch.autograd.grad(compiled(x, lora_a, lora_b, mags, ids), params)
    assert counter.frame_count == 1
    for g, h in zip(got, want):
        assert torch.equal(g, h)


def test_the_row_mask_op_passes_opcheck():
    """``fused_lora::dora_keep`` with one probability a row: its fake
    implementation and schema agree with it (torch.library.opcheck)."""
    x = torch.randn(5, 3, 19)
    row_p = torch.rand(5, 3) * 0.5
    torch.library.opcheck(torch.ops.fused_lora.dora_keep, (x, torch.tensor(4), 0.5, row_p))
    keep = torch.ops.fused_lora.dora_keep(x, torch.tensor(4), 0.5, row_p)
    want = fused_lora.dropout_mask(4, (15, 19), row_p.reshape(15))
    assert torch.equal(keep, want.view(5, 3, 19))


@pytest.mark.parametrize("base", ["float", "int8", "nf4"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("n, k, ranks, dora", [
    (37, 45, (4, 1, 70, 8), (True, False, True, True)),  # (a rank of two chunks, a K tail, a LoRA one skipped)
    (20, 64, (16, 3), (True, True)),
    (9, 128, (2,), (True,)),
])
def test_every_dora_adapter_s_norm_in_one_read_of_w(base, dtype, n, k, ranks, dora):
    """``kernels.dora_norms``: the norms of the DoRA adapters among several
    side by side, one launch, W's tiles (dequantised once, an int8 or NF4
    base) shared: each the one-adapter kernel's, bitwise, into a poisoned
    output; and the float64 norm of its adapted rows."""
    if base == "nf4":  # (NF4 in groups of 64: K a multiple)
        k = 64 * -(-k // 64)
    kernels = fused_lora._triton.get()
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    scale = code = None
    if base == "int8":
        w, scale = fused_lora.quantize_int8(w)
    elif base == "nf4":
        w, scale = fused_lora.quantize_nf4(w)
        code = fused_lora.quant.nf4_code(w.device)
    a = torch.randn(sum(ranks), k, dtype=dtype, device=DEVICE) / k ** 0.5
    bb = torch.randn(n, sum(ranks), dtype=dtype, device=DEVICE) / 4
    scalings = tuple(0.5 + i for i in range(len(ranks)))
    bounds, scales = ops._make_dora_columns(torch.device(DEVICE), ranks, scalings, dora)
    with kernels.poison_outputs():
        norms = kernels.dora_norms(w, a, bb, bounds, scales, max(r for r, d in zip(ranks, dora) if d), scale, code)
    assert norms.shape == (sum(dora), n) and norms.dtype == F32
    w_hat = w.double() if base == "float" else fused_lora.quant.dequantize_base(w, scale, dtype, code).double()
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    for j, i in enumerate(i for i in range(len(ranks)) if dora[i]):
        cols = slice(starts[i], starts[i] + ranks[i])
        one = kernels.dora_norm(w, a[cols], bb[:, cols], scalings[i], scale, code)
        if ranks[i] > 64 or base == "float":  # (the same rank tile: the same sums)
            assert torch.equal(norms[j], one), i
        ba = scalings[i] * (bb[:, cols].double() @ a[cols].double())
        expected = torch.linalg.vector_norm(w_hat + ba, dim=1)
        size = torch.linalg.vector_norm(w_hat, dim=1) + torch.linalg.vector_norm(ba, dim=1)
        assert ((norms[j].double() - expected).abs() <= 4e-6 * size).all(), i


def test_one_norm_launch_for_every_dora_adapter_and_the_op_passes_opcheck(monkeypatch):
    """multi_lora_linear with three DoRA adapters launches the norm kernel
    once (every norm in one read of W); ``fused_lora::dora_norms`` passes
    opcheck."""
    from fused_lora.kernels import dora as dora_kernels
    from lora_testing import count_launches

    w, b, _, _ = make_params(40, 24, 1, F32, True)
    lora_a, lora_b, mags = _adapters(40, 24, (4, 2, 8, 3), (True, True, False, True), F32)
    launches = count_launches(monkeypatch, dora_kernels, "dora_norm_kernel")
    fused_lora.multi_lora_linear(make_x((6, 40), F32), w, lora_a, lora_b, _ids((6,), 4), b, magnitude=mags,
                                 backend="triton")
    assert len(launches) == 1
    bounds, scales = ops._make_dora_columns(torch.device(DEVICE), (4, 2, 8, 3), (1.0, 2.0, 1.0, 0.5),
                                            (True, True, False, True))
    a, bb = torch.cat([t.detach() for t in lora_a]), torch.cat([t.detach() for t in lora_b], 1)
    torch.library.opcheck(torch.ops.fused_lora.dora_norms.default, (w, a, bb, bounds, scales, 8))


@pytest.mark.parametrize("change, err, words", [
    (dict(magnitude=torch.ones(8)), TypeError, "list or tuple"),
    (dict(magnitude=[torch.ones(8)]), ValueError, "one entry per adapter (2)"),
    (dict(magnitude=[torch.ones(7), None]), ValueError, "magnitude[0]"),
    (dict(magnitude=[None, torch.ones(8, dtype=torch.float64)]), TypeError, "magnitude[1]"),
    (dict(magnitude=[torch.ones(8), torch.ones(8)], ranks=(2, 0)), ValueError, "adapter 1 has rank 0"),
])
def test_bad_magnitudes_are_rejected(change, err, words):
    change = dict(change)  # (the parameter's own dict is shared by reruns: not changed here)
    if isinstance(change.get("magnitude"), (list, tuple)):  # (on x's device: the check named is the one met)
        change["magnitude"] = [m if m is None else m.to(DEVICE) for m in change["magnitude"]]
    elif isinstance(change.get("magnitude"), torch.Tensor):
        change["magnitude"] = change["magnitude"].to(DEVICE)
    x = make_x((6, 8), F32)
    w, b, _, _ = make_params(8, 8, 1, F32, True)
    ranks = change.pop("ranks", (2, 3))
    lora_a, lora_b, _ = _adapters(8, 8, ranks, (False, False), F32)
    with pytest.raises(err, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        fused_lora.multi_lora_linear(x, w, lora_a, lora_b, torch.zeros(6, dtype=torch.long, device=DEVICE), b,
                                     backend="triton", **change)


# -- the layer ---------------------------------------------------------------

def _trained(layer):
    """The layer's adapters made random (B not 0) and its magnitudes moved off the norms."""
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
        for m in layer.lora_magnitude_vector.values():
            m.mul_(1 + 0.3 * torch.rand_like(m))
    return layer


@pytest.mark.parametrize("training", [False, True])
def test_layer_of_dora_and_lora_adapters(training):
    """``use_dora`` one flag an adapter: the magnitudes start as the rows'
    norms (a fresh layer is its base), are saved under
    ``lora_magnitude_vector.<i>``, and, trained, each row gets its adapter's
    DoRA or LoRA output (the layer's dropout in train mode) and each
    adapter alone (``active_adapter``) gives ``dora_linear``'s."""
    torch.manual_seed(0)
    layer = fused_lora.MultiLoRALinear(24, 20, ranks=[4, 0, 2, 3], alphas=[8, 1, 2, 6], dropout=[0.1, 0, 0.2, 0.0],
                                       use_dora=[True, False, False, True], backend="triton").to(DEVICE)
    assert layer.use_dora == (True, False, False, True)
    assert sorted(layer.state_dict()) == ["bias", "lora_A.0", "lora_A.1", "lora_A.2", "lora_A.3", "lora_B.0",
                                          "lora_B.1", "lora_B.2", "lora_B.3", "lora_magnitude_vector.0",
                                          "lora_magnitude_vector.3", "weight"]
    torch.testing.assert_close(layer.lora_magnitude_vector["3"], layer.weight.norm(dim=1))
    x = make_x((2, 9, 24), F32)
    ids = torch.tensor([3, 0], device=DEVICE)
    torch.testing.assert_close(layer(x, ids), F.linear(x, layer.weight, layer.bias))
    _trained(layer).train(training)
    mags = [layer.magnitude(i) for i in range(4)]
    assert mags[1] is None and mags[2] is None
    ids = _ids((2, 9), 4)
    torch.manual_seed(1)
    got = layer(x, ids)
    torch.manual_seed(1)
    want = fused_lora.multi_lora_linear(x, layer.weight, list(layer.lora_A), list(layer.lora_B), ids, layer.bias,
                                        scaling=list(layer.scalings), dropout_p=list(layer.dropouts) if training
                                        else 0.0, magnitude=mags, backend="triton")
    assert torch.equal(got, want)
    if not training:
        y64, _ = _oracle(x, layer.weight, layer.bias, list(layer.lora_A), list(layer.lora_B), mags, ids,
                         layer.scalings, 0.0, 0, torch.zeros_like(got), [])
        assert_close(got, y64, F32, "y")
    for i in (0, 2):
        layer.active_adapter = i
        torch.manual_seed(2)
        got = layer(x)
        torch.manual_seed(2)
        p = layer.dropouts[i] if training else 0.0
        kw = dict(scaling=layer.scalings[i], dropout_p=p, backend="triton")
        want = (fused_lora.dora_linear(x, layer.weight, layer.lora_A[i], layer.lora_B[i], mags[i], layer.bias, **kw)
                if mags[i] is not None else
                fused_lora.lora_linear(x, layer.weight, layer.lora_A[i], layer.lora_B[i], layer.bias, **kw))
        assert torch.equal(got, want)


def test_layer_delta_weight_of_a_dora_adapter_is_loralinears():
    """A DoRA adapter's ``delta_weight`` (and ``merged_weight``) is
    :class:`LoRALinear`'s of the same tensors; combining or weighting it is
    refused."""
    torch.manual_seed(0)
    layer = _trained(fused_lora.MultiLoRALinear(12, 10, ranks=[3, 2], alphas=[6, 2], use_dora=[True, False]))
    one = fused_lora.LoRALinear.from_parameters(layer.weight, layer.bias, layer.lora_A[0], layer.lora_B[0],
                                                alpha=6, lora_magnitude_vector=layer.lora_magnitude_vector["0"])
    assert torch.equal(layer.delta_weight(0), one.delta_weight())
    assert torch.equal(layer.merged_weight(0), layer.weight + one.delta_weight())
    for i, weights in ((0, 0.5), ([0, 1], None)):
        with pytest.raises(ValueError, match="adapter 0 is DoRA"):
            layer.delta_weight(i, weights)
    layer.delta_weight([1], [0.5])  # (the LoRA adapter alone, weighted: as before)


@pytest.mark.parametrize("use_dora, err, words", [
    ([True], ValueError, "one bool for every adapter"),
    ("yes", TypeError, "use_dora must be a bool"),
    ([True, "no"], TypeError, "use_dora\\[1\\]"),
    ([False, True], ValueError, "adapter 1 has rank 0"),
])
def test_layer_bad_use_dora(use_dora, err, words):
    with pytest.raises(err, match=words):
        fused_lora.MultiLoRALinear(8, 8, ranks=[2, 0], use_dora=use_dora)


def test_layer_use_dora_true_skips_rank_0_and_quantized_base():
    """``use_dora=True``: every adapter of rank above 0; on an int8 base the
    magnitudes start as Ŵ's rows' norms, and the layer is its base."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12).to(DEVICE)
    layer = fused_lora.MultiLoRALinear.from_linear(linear, ranks=[2, 0, 3], use_dora=True, quantize_base=True,
                                                   backend="triton")
    assert layer.use_dora == (True, False, True) and layer.quantized
    w_hat = fused_lora.dequantize_int8(layer.weight, layer.weight_scale, F32)
    torch.testing.assert_close(layer.lora_magnitude_vector["2"], w_hat.norm(dim=1))
    x = make_x((5, 16), F32)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, 2, -1, 2], device=DEVICE)), F.linear(x, w_hat, linear.bias))


# -- in models ---------------------------------------------------------------

def _peft_files(tmp_path):
    """A DoRA adapter (its magnitudes off the norms) and a LoRA one of other
    targets, saved by PEFT: the PeftModels and their directories."""

    peft = pytest.importorskip("peft")
    configs = [peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                               use_dora=True),
               peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False)]
    models, dirs = [], []
    for i, config in enumerate(configs):
        torch.manual_seed(30 + i)
        model = peft.get_peft_model(tiny_llama(), config).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.3 * torch.rand_like(p))
        models.append(model)
        dirs.append(tmp_path / f"peft{i}")
        model.save_pretrained(dirs[-1])
    return models, dirs


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_load_adapters_serves_a_dora_adapter_beside_a_lora_one(tmp_path):
    """load_adapters of PEFT's DoRA file and a LoRA one: the DoRA adapter's
    layers hold its magnitudes; each sample of a mixed batch gets its PEFT
    model's logits; save_adapter(adapter=0) writes a DoRA file PEFT loads
    as the original; merge_and_unload(adapter=0) folds DoRA's weight in
    (PEFT's merge), and a combination with it is refused, nothing changed."""
    peft = pytest.importorskip("peft")
    (peft0, peft1), dirs = _peft_files(tmp_path)
    model = tiny_llama()
    names = fused_lora.load_adapters(model, dirs)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.use_dora == (True, False) and q.ranks == (4, 2)
    assert model.get_submodule("model.layers.0.mlp.down_proj").use_dora == (False, False)
    peft_q = peft0.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert torch.equal(q.lora_magnitude_vector["0"], peft_q.lora_magnitude_vector["default"].weight)
    assert q.lora_magnitude_vector["0"].requires_grad
    model.eval()
    x = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids = [0, -1, 1, 0]
    with fused_lora.adapter_ids(model, torch.tensor(ids, device=DEVICE)):
        logits = model(input_ids=x).logits
    base = tiny_llama()(input_ids=x).logits
    for k, i in enumerate(ids):
        _close(logits[k], base[k] if i == -1 else (peft0, peft1)[i](input_ids=x[k:k + 1]).logits[0])
    fused_lora.save_adapter(model, tmp_path / "back0", adapter=0)
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "back0").eval()
    assert again.peft_config["default"].use_dora
    _close(again(input_ids=x).logits, peft0(input_ids=x).logits)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for adapter, weights in (([0, 1], None), (0, 0.5)):
        with pytest.raises(ValueError, match=r"adapter 0 is DoRA .*: its magnitude rescales the whole weight"):
            fused_lora.merge_and_unload(model, adapter=adapter, weights=weights)
        with pytest.raises(ValueError, match=r"adapter 0 is DoRA"):
            fused_lora.save_adapter(model, tmp_path / "blend", adapter=adapter, weights=weights)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(fused_lora.integration.multi_fused_layers(model)) == len(names)
    assert fused_lora.merge_and_unload(model, adapter=0) == names
    assert not fused_lora.integration.multi_fused_layers(model)
    _close(model(input_ids=x).logits, peft0.merge_and_unload()(input_ids=x).logits)


def test_inject_multi_dora_adapters_train_and_go_to_peft(tmp_path):
    """inject_multi(use_dora=[...]): a training step through mixed ids gives
    each DoRA adapter's magnitude the gradient of its own samples alone;
    to_peft hands PEFT each adapter by name, DoRA's with its magnitudes:
    each active gives the fused model's logits for it; a file of the other
    kind into an adapter is refused."""
    pytest.importorskip("peft")
    model = tiny_llama()
    fused_lora.inject_multi(model, ["q_proj", "v_proj"], ranks=[4, 2, 3], alphas=[8, 2, 3],
                            use_dora=[True, False, True])
    layers = fused_lora.integration.multi_fused_layers(model)
    assert all(layer.use_dora == (True, False, True) for layer in layers.values())
    torch.manual_seed(4)
    for layer in layers.values():
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.2)
    x = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with fused_lora.adapter_ids(model, torch.tensor([0, 1, 0], device=DEVICE)):
        model(input_ids=x, labels=x).loss.backward()
    assert len(fused_lora.adapter_parameters(model, 0)) == 3 * len(layers)  # (A, B and the magnitude)
    assert len(fused_lora.adapter_parameters(model, 1)) == 2 * len(layers)
    for layer in layers.values():
        assert layer.lora_magnitude_vector["0"].grad.abs().sum() > 0
        assert not layer.lora_magnitude_vector["2"].grad.any()  # (no sample of adapter 2)
    model.eval()
    want = {}
    for i in range(3):
        with torch.no_grad(), fused_lora.adapter_ids(model, torch.full((3,), i, device=DEVICE)):
            want[i] = model(input_ids=x).logits
    fused_lora.save_adapter(model, tmp_path / "lora1", adapter=1)
    with pytest.raises(fused_lora.AdapterFileError, match="adapter 0 of the model's fused layer is DoRA"):
        fused_lora.load_adapter(model, tmp_path / "lora1", adapter=0)
    back = fused_lora.to_peft(model, adapter_names=["a", "b", "c"])
    for i, name in enumerate("abc"):
        assert back.peft_config[name].use_dora == (i != 1)
        back.set_adapter(name)
        with torch.no_grad():
            _close(back(input_ids=x).logits, want[i])


def test_autocast_computes_in_its_dtype():
    """Under torch.autocast the adapters and magnitudes are cast with x:
    the output in the autocast dtype, as the call on cast tensors."""
    device_type = torch.device(DEVICE).type
    x = make_x((7, 32), F32)
    w, b, _, _ = make_params(32, 24, 1, F32, True)
    lora_a, lora_b, mags = _adapters(32, 24, (4, 2), (True, False), F32)
    ids = torch.tensor([0, 1, -1, 0, 1, 1, 0], device=DEVICE)
    with torch.autocast(device_type, dtype=BF16):
        y = fused_lora.multi_lora_linear(x, w, lora_a, lora_b, ids, b, magnitude=mags, backend="triton")
    cast = lambda ts: [t if t is None else t.to(BF16) for t in ts]  # noqa: E731
    want = fused_lora.multi_lora_linear(x.to(BF16), w.to(BF16), cast(lora_a), cast(lora_b), ids, b.to(BF16),
                                        magnitude=cast(mags), backend="triton")
    assert y.dtype == BF16 and torch.equal(y, want)
