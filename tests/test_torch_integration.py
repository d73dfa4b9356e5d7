"""The op as a PyTorch citizen: torch.library opcheck, torch.compile with
fullgraph (one frame) and dynamic shapes, torch.export, autocast, activation checkpointing, gradient
accumulation, mixed adapter/base dtypes, double backward, torch.func transforms, a
default device."""

import contextlib
import sys

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import fused_lora  # noqa: F401  (registers the torch.ops.fused_lora ops)
from fused_lora import LoRALinear, ops, reference
from fused_lora.dropout import draw_seed, draw_seed_tensor
from lora_testing import DEVICE, assert_close, make_params, reference64


@pytest.mark.parametrize("p, seed_on_device, row_scaled", [(0.0, False, False), (0.25, False, False),
                                                            (0.25, True, False), (0.25, False, True),
                                                            (0.25, False, "adapters")])
def test_opcheck_forward_and_backward_ops(p, seed_on_device, row_scaled):
    """(seed: a CPU int64 holding the value, or an int32 on x's device that the kernels read;
    row_scale: the ops' argument after the strategy; the adapters' ids, rank ids and rank scales
    the three after it)"""
    x = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(24, 16, 4, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    seed = torch.tensor(7, dtype=torch.int32, device=DEVICE) if seed_on_device else torch.tensor(7)
    extra = ("", torch.rand(3, 5, device=DEVICE)) if row_scaled is True else ()
    if row_scaled == "adapters":  # (ids of x's leading shape, int64: the op takes any integer dtype)
        extra = ("", None, torch.randint(-1, 2, (3, 5), device=DEVICE),
                 torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=DEVICE),
                 torch.tensor([1.0, 1.0, 0.5, 0.5], device=DEVICE))
    torch.library.opcheck(torch.ops.fused_lora.lora_linear_fwd.default, (x, w, b, a, bb, 1.5, p, seed, *extra))
    y, xa = torch.ops.fused_lora.lora_linear_fwd(x, w, b, a, bb, 1.5, p, seed, *extra)
    dy = torch.randn_like(y)
    for needs in ((True, False, True, True, True), (False, True, False, True, False)):
        torch.library.opcheck(torch.ops.fused_lora.lora_linear_bwd.default,
                              (dy, x.detach(), w, a.detach(), bb.detach(), xa.detach(), 1.5, p, seed, *needs, *extra))
    if row_scaled is True:  # (the op's own autograd takes the row scale as the Function does)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
        _, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=7, grads=("x", "lora_A", "lora_B"),
                             row_scale=extra[1])
        for g, name in zip(grads, ("x", "lora_A", "lora_B")):
            assert_close(g, g64[name], torch.float32, name)
    if row_scaled == "adapters":  # (and the adapters' tensors)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
        leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
        y64 = reference.lora_linear_checked(leaves[0], w.double(), leaves[1], leaves[2], b.double(), 1.5, p, 7,
                                            None, extra[2:])
        for g, g64, name in zip(grads, torch.autograd.grad(y64, leaves, dy.double()), ("x", "lora_A", "lora_B")):
            assert_close(g, g64, torch.float32, name)


def test_the_forward_op_is_differentiable_on_its_own():
    """The op's registered autograd (used by torch.compile) gives the reference's gradients."""
    x = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(24, 16, 4, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    y, _ = torch.ops.fused_lora.lora_linear_fwd(x, w, b, a, bb, 1.5, 0.3, torch.tensor(11))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=0.3, seed=11, grads=("x", "lora_A", "lora_B"))
    for g, name in zip(grads, ("x", "lora_A", "lora_B")):
        assert_close(g, g64[name], torch.float32, name)


class TwoLayer(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.l1 = LoRALinear(24, 32, r=4, dropout=dropout, device=DEVICE)
        self.l2 = LoRALinear(32, 8, r=4, device=DEVICE)
        for layer in (self.l1, self.l2):
            nn.init.normal_(layer.lora_B)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_training_step_is_one_frame(backend):
    model = TwoLayer()
    x = torch.randn(4, 6, 24, device=DEVICE)
    target = torch.randint(0, 8, (4, 6), device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)

    def loss_fn(x, target):
        return F.cross_entropy(model(x).flatten(0, 1), target.flatten())

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(1)
    # Inductor draws random numbers its own way unless told to use eager's
    # generator; with it, the dropout seed (and so the mask) equals eager's.
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        loss = compiled(x, target)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert counter.frame_count == 1
    opt.zero_grad()
    torch.manual_seed(1)  # same dropout seed
    eager = loss_fn(x, target)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-6, atol=1e-6)
    for g, p in zip(compiled_grads, [p for p in model.parameters() if p.requires_grad]):
        assert_close(g, p.grad.double(), torch.float32, "compiled vs eager")
    opt.step()
    with inductor_config.patch(fallback_random=True):
        compiled(x, target).backward()  # a second step reuses the graph
    assert counter.frame_count == 1


@pytest.mark.parametrize("training", [False, True])
def test_a_batch_mixing_adapters_compiles_in_one_graph(training):
    """``adapter_ids`` under torch.compile: one graph (no host sync to check
    the ids, nothing split by row group), the eager outputs and gradients;
    an id that eager mode refuses gives NaN on its row there."""
    layer = LoRALinear(24, 17, r=4, dropout=0.2, device=DEVICE).train(training)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 3, 24, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, -1, 0, 0, -1], device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, ids: layer(x, adapter_ids=ids), backend=counter, fullgraph=True)
    dy = torch.randn(5, 3, 17, device=DEVICE)
    torch.manual_seed(3)
    y = compiled(x, ids)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    torch.manual_seed(3)
    eager = layer(x, adapter_ids=ids)
    eager_grads = torch.autograd.grad(eager, (x, layer.lora_A, layer.lora_B), dy)
    assert counter.frame_count == 1
    assert_close(y, eager.double(), torch.float32, "compiled vs eager")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e.double(), torch.float32, "compiled vs eager gradients")
    bad = torch.tensor([0, 3, -1, 0, -1], device=DEVICE)
    with pytest.raises(ValueError, match="got ids from -1 to 3"):
        layer(x, adapter_ids=bad)
    with torch.no_grad():
        y_bad = compiled(x, bad)
    assert y_bad[1].isnan().all() and not y_bad[[0, 2, 3, 4]].isnan().any()


def test_a_merged_layer_takes_a_mixed_batch_in_one_graph():
    """A merged layer runs a batch mixing its adapter and the base as an
    unmerged one does (the weight from before merge(), the adapter in the
    fused passes): eager, the unmerged layer's output bit for bit; under
    torch.compile, one graph (no split by row group, which a full graph
    cannot trace)."""
    layer = LoRALinear(24, 17, r=4, device=DEVICE).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 3, 24, device=DEVICE)
    ids = torch.tensor([0, -1, 0, 0, -1], device=DEVICE)
    unmerged = layer(x, adapter_ids=ids)
    layer.merge()
    assert torch.equal(layer(x, adapter_ids=ids), unmerged)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, ids: layer(x, adapter_ids=ids), backend=counter, fullgraph=True)
    assert_close(compiled(x, ids), unmerged.double(), torch.float32, "compiled vs eager")
    assert counter.frame_count == 1


def test_compile_dynamic_shapes_one_graph_for_every_sequence_length():
    """Training on batches of varying length under ``torch.compile(dynamic=True)``:
    the ops' fake implementations take symbolic shapes, so one graph serves
    every token count (no recompilation per length), and each step gives
    eager's loss and gradients from the same generator state (same mask)."""
    import torch._inductor.config as inductor_config

    model = TwoLayer()
    params = [p for p in model.parameters() if p.requires_grad]
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def loss_fn(x):
        return model(x).square().mean()

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for tokens in (5, 17, 33):
        x = torch.randn(2, tokens, 24, device=DEVICE, requires_grad=True)
        torch.manual_seed(tokens)
        with inductor_config.patch(fallback_random=True):
            loss = compiled(x)
        grads = torch.autograd.grad(loss, [x, *params])
        frames.append(counter.frame_count)
        torch.manual_seed(tokens)
        eager = loss_fn(x)
        eager_grads = torch.autograd.grad(eager, [x, *params])
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
        for g, e in zip(grads, eager_grads):
            assert_close(g, e.double(), torch.float32, f"{tokens} tokens, compiled vs eager")
    assert frames[0] >= 1 and frames == [frames[0]] * 3, frames


def test_torch_export_with_dynamic_shapes_saves_and_loads(tmp_path):
    """An inference model exported with ``torch.export`` (batch and token
    dims dynamic) keeps the fused op in its graph, and the program, saved and
    loaded again, gives eager's output at other shapes."""
    model = TwoLayer().eval()
    x = torch.randn(3, 7, 24, device=DEVICE)
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}}
    program = torch.export.export(model, (x,), dynamic_shapes=dims)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fused_lora.lora_linear_fwd.default) == 2, targets
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for shape in ((3, 7, 24), (5, 11, 24), (2, 1, 24)):
        x = torch.randn(shape, device=DEVICE)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_compile_reduce_overhead_draws_a_new_mask_each_step():
    """``torch.compile(mode="reduce-overhead")``: on a GPU the steps run as
    CUDA graphs (warm-up, capture, then replays), on a CPU as inductor alone.
    Each step's loss and gradients equal an eager step's from the same
    generator state (the seed is drawn on the device, so a replay draws a new
    one rather than a value frozen at capture), and without reseeding,
    successive steps use different masks."""
    import torch._inductor.config as inductor_config

    model = TwoLayer(dropout=0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(4, 6, 24, device=DEVICE)
    target = torch.randint(0, 8, (4, 6), device=DEVICE)

    def loss_fn(x, target):
        return F.cross_entropy(model(x).flatten(0, 1), target.flatten())

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)

    def step(fn):
        # (clones at once: a CUDA graph's next replay overwrites its outputs)
        torch.compiler.cudagraph_mark_step_begin()
        loss = fn(x, target)
        loss.backward()
        out = [loss.detach().clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    with inductor_config.patch(fallback_random=True):  # eager's generator: its masks
        for i in range(4):
            torch.manual_seed(100 + i)
            got = step(compiled)
            torch.manual_seed(100 + i)
            want = step(loss_fn)
            for g, w in zip(got, want):
                assert_close(g, w.double(), torch.float32, f"step {i}, compiled vs eager")
        free_running = [step(compiled)[0] for _ in range(3)]
    assert len({float(loss) for loss in free_running}) == 3, free_running


@pytest.mark.parametrize("seed", [12345, 2**40 + 7])
def test_compile_reduce_overhead_with_an_int_seed(seed):
    """``torch.compile(mode="reduce-overhead")`` of a step whose dropout has
    an int seed, one that fits int32 and one that does not: the seed is made
    on x's device in the forward graph (on a GPU, in the CUDA graphs' pool,
    which the backward's graph expects), and every step's gradients are
    eager's with that seed."""
    w, b, a, bb = make_params(24, 8, 3, torch.float32, True)
    for t in (a, bb):
        t.requires_grad_()
    x = torch.randn(4, 6, 24, device=DEVICE, requires_grad=True)

    def step(x):
        return fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.3, seed=seed).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    want = torch.autograd.grad(step(x), (x, a, bb))
    for i in range(3):  # (on a GPU: warm-up, capture, replay)
        torch.compiler.cudagraph_mark_step_begin()
        got = [g.clone() for g in torch.autograd.grad(compiled(x), (x, a, bb))]
        for g, e in zip(got, want):
            assert_close(g, e.double(), torch.float32, f"step {i}, compiled vs eager")


def test_a_compiled_forward_hands_its_backward_only_the_seeds_of_its_masks():
    """What a compiled forward graph hands its backward (its outputs beyond
    the loss) holds one seed per layer with dropout and none for a layer
    without: CUDA graphs (``mode="reduce-overhead"``) expect every such
    output in their memory pool, and a layer without dropout handed on the
    CPU constant it launches with (the H200 runs: "These storage data ptrs
    are not allocated in pool"). Nor does the graph take a seed as an input:
    the layer without dropout handed its op a CPU constant, which became an
    input of the forward graph's CUDA-graph partition, refused alike (the
    fifth GPU run); the seeds are made in the graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    handed, taken = [], []

    def forward_compiler(gm, example_inputs):
        handed.extend(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        taken.extend(t for t in example_inputs
                     if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point())
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    model = TwoLayer(dropout=0.3)  # (l1 with dropout, its seed drawn on the device; l2 without)
    x = torch.randn(4, 6, 24, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x).square().sum(), backend=backend, fullgraph=True)
    compiled(x).backward()
    assert _handed_seeds(handed) == [torch.int32] and x.grad is not None and torch.isfinite(x.grad).all()
    assert taken == [], [(t.dtype, t.device) for t in taken]
    # a seed given as an int: made on x's device, int32 where it fits (as a drawn one is), else int64, for the
    # same mask
    w, b, a, bb = make_params(24, 8, 3, torch.float32, True)
    for t in (a, bb):
        t.requires_grad_()
    for seed, dtype in ((12345, torch.int32), (2**40 + 7, torch.int64)):
        handed.clear()
        torch._dynamo.reset()
        fn = torch.compile(lambda x: fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.3, seed=seed).square().sum(),
                           backend=backend, fullgraph=True)
        got = torch.autograd.grad(fn(x), (x, a, bb))
        assert _handed_seeds(handed) == [dtype] and taken == []
        want = torch.autograd.grad(fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.3, seed=seed).square().sum(),
                                   (x, a, bb))
        for g, e in zip(got, want):
            assert_close(g, e.double(), torch.float32, f"compiled with the int seed {seed}")


def _handed_seeds(handed: list) -> list:
    """The dtypes of the 0-d integer tensors among a forward graph's outputs."""
    vals = [n.meta.get("val") for n in handed if isinstance(n, torch.fx.Node)]
    return [v.dtype for v in vals if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()]


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else []))
def test_autocast(dtype):
    layer = LoRALinear(40, 24, r=4, alpha=8, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 9, 40, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    cast = [t.to(dtype) for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    y64, g64 = reference64(*cast, dy, scaling=layer.scaling, dropout_p=0.0, seed=None,
                           grads=("x", "lora_A", "lora_B"))
    assert_close(y, y64, dtype, "y")
    for g, name in zip(grads, ("x", "lora_A", "lora_B")):
        assert_close(g, g64[name], dtype, name)


def test_activation_checkpointing_regenerates_the_same_dropout():
    model = TwoLayer(dropout=0.4)
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(3)
    plain = torch.autograd.grad(model(x).square().sum(), params)
    torch.manual_seed(3)
    ckpt = torch.autograd.grad(checkpoint(model, x, use_reentrant=False).square().sum(), params)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_gradient_accumulation_equals_one_big_batch():
    model = TwoLayer(dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(10, 24, device=DEVICE)
    for half in (x[:4], x[4:]):
        model(half).square().sum().backward()
    accumulated = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    model(x).square().sum().backward()
    # The same sums in another order: equal to fp32 rounding, relative to each
    # gradient's largest element (here up to about 1.7e3: a fixed atol of 1e-5
    # held or failed with the host's BLAS, whose kernels the interpreter's dots use).
    for a, p in zip(accumulated, params):
        assert_close(a, p.grad.double(), torch.float32, f"accumulated {tuple(p.shape)}")


def test_fp32_adapter_on_a_low_precision_base():
    base = nn.Linear(32, 16, device=DEVICE, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=4, alpha=8, adapter_dtype=torch.float32)
    nn.init.normal_(layer.lora_B)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(6, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    gx, ga, gb = torch.autograd.grad(y.float().sum(), (x, layer.lora_A, layer.lora_B))
    assert gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    lo = [t.to(torch.bfloat16) for t in (layer.lora_A, layer.lora_B)]
    y64, g64 = reference64(x, layer.weight, layer.bias, *lo, torch.ones_like(y), scaling=layer.scaling,
                           dropout_p=0.0, seed=None, grads=("lora_A", "lora_B"))
    assert_close(y, y64, torch.bfloat16, "y")
    assert_close(ga, g64["lora_A"], torch.bfloat16, "dA")


def test_compiled_backward_follows_the_forced_strategy(monkeypatch):
    """Under torch.compile too, a strategy forced around the forward holds for
    its backward, run after the block on another thread; another force
    recompiles (the force is a guard), and the raw op takes one explicitly."""
    import threading

    from fused_lora import dispatch

    seen = []
    real_plan = dispatch.plan

    def spy(*args, **kwargs):
        chosen = real_plan(*args, **kwargs)
        seen.append(chosen.strategy)
        return chosen

    monkeypatch.setattr(dispatch, "plan", spy)
    layer = LoRALinear(32, 24, r=4, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda x: layer(x).square().sum(), backend=counter, fullgraph=True)

    def backward_elsewhere(loss, inputs):
        worker = threading.Thread(target=lambda: out.update(g=torch.autograd.grad(loss, inputs)))
        worker.start()
        worker.join()
        return out.pop("g")

    out = {}
    expected = torch.autograd.grad(layer(x).square().sum(), (x, layer.lora_A))
    default = seen[0]  # (the dispatch's own: in_loop here, hybrid for fp32 on a GPU)
    assert seen == [default] * 2
    for strategy, frames in [("split", 1), ("hybrid", 2), ("split", 2), (None, 3)]:  # "split" again: cached
        seen.clear()
        with dispatch.force_strategy(strategy) if strategy else contextlib.nullcontext():
            loss = step(x)
        grads = backward_elsewhere(loss, (x, layer.lora_A))
        assert seen == [strategy or default] * 2, (strategy, seen)
        assert counter.frame_count == frames
        for g, e in zip(grads, expected):
            assert_close(g, e.double(), torch.float32, f"{strategy} vs the dispatch's own")

    # the raw op, compiled, with the strategy as an argument
    w, b, a, bb = make_params(32, 24, 4, torch.float32, True)
    a.requires_grad_()
    op = torch.compile(lambda x: torch.ops.fused_lora.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, torch.tensor(0),
                                                                      "hybrid")[0].sum(), backend="aot_eager")
    seen.clear()
    backward_elsewhere(op(x), (x, a))
    assert seen == ["hybrid", "hybrid"]


class _RecordOps(TorchDispatchMode):
    """A pass-through dispatch mode that records the ops it sees."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_calls_skip_the_op_dispatcher_and_dispatch_modes_see_the_ops(p):
    """Plain eager calls run the Triton passes without the ops' dispatcher
    (host time at small M); under a dispatch mode the ops run, and see the
    same results bit for bit."""
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    w, b, a, bb = make_params(40, 24, 8, torch.float32, True)
    a.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(2, 9, 24, device=DEVICE)

    def step():
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=123, backend="triton")
        return (y, *torch.autograd.grad(y, (x, a, bb), dy))

    assert ops.direct_call(x, w, b, a, bb, None)
    eager = step()
    with _RecordOps() as mode:
        assert not ops.direct_call(x, w, b, a, bb)
        through_ops = step()
    assert "fused_lora.lora_linear_fwd.default" in mode.ops
    assert "fused_lora.lora_linear_bwd.default" in mode.ops
    for name, e, o in zip(("y", "dx", "dA", "dB"), eager, through_ops):
        assert torch.equal(e, o), name
    _, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=123, grads=("x",))
    assert_close(eager[1], g64["x"], torch.float32, "dx")


def test_a_layer_in_eager_mode_skips_the_op_dispatcher(monkeypatch):
    """A LoRALinear's weights are nn.Parameters, which count as plain tensors:
    its eager calls run the Triton passes directly too (training: forward and
    backward; inference: the forward alone), not through the ops."""
    callers = []
    for name in ("forward_triton", "backward_triton"):
        def record(*args, _real=getattr(ops, name), **kwargs):
            callers.append(sys._getframe(1).f_code.co_name)  # (the ops' functions, or the direct callers)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, record)
    layer = LoRALinear(24, 16, r=4, dropout=0.1, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert callers == ["forward", "_gradients", "_lora_linear"]  # (the last: lora_linear's body, past its checks)
    # a Parameter of a tensor subclass has the subclass's type, and goes through the ops
    class Tagged(torch.Tensor):
        pass

    assert ops.direct_call(layer.weight, layer.lora_A)
    assert not ops.direct_call(nn.Parameter(torch.randn(3, device=DEVICE).as_subclass(Tagged)))


@pytest.mark.parametrize("p, seed", [(0.0, None), (0.3, 123), (0.3, None)])
def test_without_gradients_the_forward_runs_without_the_autograd_function(monkeypatch, p, seed):
    """Where nothing is differentiated (torch.no_grad, inference_mode, or no
    input requiring grad) the forward runs without the autograd Function
    (host time at small M), and gives the same output bit for bit; where a
    gradient is wanted the Function runs."""
    functions = []
    real_apply = ops._LoRALinearFunction.apply
    monkeypatch.setattr(ops._LoRALinearFunction, "apply", lambda *args: functions.append(1) or real_apply(*args))
    x = torch.randn(2, 9, 40, device=DEVICE)
    w, b, a, bb = make_params(40, 24, 8, torch.float32, True)

    def run():
        torch.manual_seed(7)  # (seed=None draws the same seed each time)
        return fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=seed, backend="triton")

    a.requires_grad_()
    with_grad = run()
    assert functions == [1] and with_grad.requires_grad
    functions.clear()
    outputs = []
    with torch.no_grad():
        outputs.append(run())
    with torch.inference_mode():
        outputs.append(run())
    a.requires_grad_(False)
    outputs.append(run())
    assert functions == []
    for y in outputs:
        assert not y.requires_grad and y.grad_fn is None
        assert torch.equal(y, with_grad.detach())
    if seed is None:  # the seed run() draws: the same draw from the same state
        torch.manual_seed(7)
        seed = draw_seed(DEVICE)
    y64, _ = reference64(x, w, b, a, bb, with_grad, scaling=1.5, dropout_p=p, seed=seed, grads=())
    assert_close(outputs[0], y64, torch.float32, "y")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_func_transforms_run_the_torch_backend(monkeypatch, p):
    """Under torch.func transforms (vmap, grad, jacrev...) the kernels cannot
    run (no batching rule): ``backend="auto"`` runs the torch backend there,
    so vmap of the op and per-sample gradients (vmap of grad) match the
    float64 reference sample by sample; ``backend="triton"`` says why it
    cannot run. Outside a transform, "auto" runs the kernels as before.
    (Every transform once failed inside the autograd Function.)"""
    calls = []
    real = ops.forward_triton
    monkeypatch.setattr(ops, "forward_triton", lambda *args: calls.append(1) or real(*args))
    x = torch.randn(4, 5, 24, device=DEVICE)
    w, b, a, bb = make_params(24, 16, 3, torch.float32, True)

    def layer(xi, a, bb, backend="auto"):
        return fused_lora.lora_linear(xi, w, a, bb, b, scaling=1.5, dropout_p=p, seed=7, backend=backend)

    ys = torch.vmap(layer, in_dims=(0, None, None))(x, a, bb)
    per_sample = torch.vmap(torch.func.grad(lambda a, bb, xi: layer(xi, a, bb).square().sum(), argnums=(0, 1)),
                            in_dims=(None, None, 0))(a, bb, x)
    assert calls == []
    for i in range(x.shape[0]):
        leaves = [t.double().requires_grad_() for t in (a, bb)]
        y64 = fused_lora.reference.lora_linear(x[i].double(), w.double(), *leaves, b.double(), scaling=1.5,
                                               dropout_p=p, seed=7)
        assert_close(ys[i], y64, torch.float32, f"y[{i}]")
        for name, g, g64 in zip(("dA", "dB"), per_sample, torch.autograd.grad(y64.square().sum(), leaves)):
            assert_close(g[i], g64, torch.float32, f"{name}[{i}]")
    with pytest.raises(ValueError, match=r'backend="triton" cannot run here: a torch.func transform'):
        torch.vmap(lambda xi: layer(xi, a, bb, "triton"))(x)
    layer(x, a, bb)
    assert calls == [1]  # (outside a transform: the kernels)


@pytest.mark.parametrize("entry", ["function", "op"])
@pytest.mark.parametrize("p, seed", [(0.0, None), (0.3, 123), (0.3, None)])
def test_double_backward_matches_the_reference(entry, p, seed):
    """With ``create_graph=True`` the gradients are differentiable again
    (a gradient penalty, meta-learning): a penalty on all five gradients,
    differentiated with respect to all five inputs, matches the float64
    reference, as do the gradients themselves, through the autograd Function
    and through the forward op's registered autograd. (They were once the
    kernels' gradients, constants to autograd: the penalty's gradient was
    silently zero, or an error.)"""
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    x = torch.randn(2, 7, 24, device=DEVICE)
    w, b, a, bb = make_params(24, 16, 3, torch.float32, True)
    dy = torch.randn(2, 7, 16, device=DEVICE)

    def penalised(inputs, run):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(4)  # (seed=None draws the same seed each time)
        grads = torch.autograd.grad(run(*leaves), leaves, dy.to(leaves[0].dtype), create_graph=True)
        penalty = sum((i + 1) * g.double().square().sum() for i, g in enumerate(grads))
        again = torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)
        return [g.detach() for g in grads], again

    def fused(x, w, b, a, bb):
        if entry == "function":
            return fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=seed, backend="triton")
        drawn = draw_seed_tensor(DEVICE) if seed is None else torch.tensor(seed)  # (as lora_linear draws it)
        return torch.ops.fused_lora.lora_linear_fwd(x, w, b, a, bb, 1.5, p, drawn, "")[0]

    if seed is None:
        torch.manual_seed(4)
        seed64 = draw_seed(DEVICE)
    else:
        seed64 = seed
    grads, again = penalised((x, w, b, a, bb), fused)
    grads64, again64 = penalised([t.double() for t in (x, w, b, a, bb)], lambda x, w, b, a, bb: (
        fused_lora.reference.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=p, seed=seed64)))
    for name, g, g64 in zip(names, grads, grads64):
        assert_close(g, g64, torch.float32, f"d{name}")
    for name, h, h64 in zip(names, again, again64):
        assert_close(h, h64, torch.float32, f"d(penalty)/d{name}")
    assert again64[0].abs().max() > 0 and again64[3].abs().max() > 0  # (the check has something to compare)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("p, seed", [(0.0, None), (0.3, 123), (0.3, None)])
def test_a_default_device_changes_nothing(backend, p, seed):
    """Under a default device (``with torch.device(...)``,
    ``torch.set_default_device``) the op makes no tensor of its own there:
    the same output and gradients, bit for bit, and the same dropout mask.
    (It once made its int64 seed on the default device: a crash on meta;
    under cuda, a read back to the host each call, which also breaks CUDA
    graph capture. Meta as the default catches any such tensor: nothing can
    be read from it.)"""
    x = torch.randn(2, 9, 40, device=DEVICE)
    w, b, a, bb = make_params(40, 24, 8, torch.float32, True)
    dy = torch.randn(2, 9, 24, device=DEVICE)
    runs = []
    for default in (None, "meta"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, bb)]
        torch.manual_seed(11)  # (seed=None draws the same seed each time)
        with torch.device(default) if default else contextlib.nullcontext():
            y = fused_lora.lora_linear(leaves[0], w, leaves[1], leaves[2], b, scaling=1.5, dropout_p=p, seed=seed,
                                       backend=backend)
            grads = torch.autograd.grad(y, leaves, dy)
            mask = fused_lora.dropout_mask(5, (9, 40), 0.3, device=DEVICE)
        runs.append((y, *grads, mask))
    assert runs[1][0].device == x.device
    for name, first, second in zip(("y", "dx", "dA", "dB", "mask"), *runs):
        assert torch.equal(first, second), name
    if seed is None:
        torch.manual_seed(11)
        seed = draw_seed(DEVICE)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=p, seed=seed, grads=("x", "lora_A", "lora_B"))
    assert_close(runs[1][0], y64, torch.float32, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), runs[1][1:4]):
        assert_close(g, g64[name], torch.float32, f"d{name}")


def test_the_passes_make_their_operands_gpu_current(monkeypatch):
    """Triton launches on the current CUDA device, whatever the operands'. Both
    Triton passes run with their first operand's GPU current: switched to it
    when another is (a layer on cuda:1 under a device_map, cuda:0 current) and
    back afterwards, left alone when it is current already or on the CPU.
    (Torch's device switch is stood in for: this runs without two GPUs; the
    next test runs the real thing where there are.)"""
    current = [0]

    class Switch:  # torch.cuda.device(d)
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1])
    monkeypatch.setattr(torch.cuda, "device", Switch)

    class Operand:
        def __init__(self, device):
            self.device = torch.device(device)

    ran_on = []
    probe = ops._on_the_operands_device(lambda t, *args, **kwargs: ran_on.append((current[-1], args, kwargs)) or t)
    for device, expected in (("cuda:1", 1), ("cuda:0", 0), ("cpu", 0)):
        operand = Operand(device)
        assert probe(operand, 2, three=3) is operand
        assert ran_on.pop() == (expected, (2,), {"three": 3}) and current == [0], device
    # (both passes are wrapped so, kernels and all, and the cublas passes' keep-mask launch: the wrapper's code)
    for pass_fn in (ops.forward_triton, ops.backward_triton, ops._keep):
        assert pass_fn.__code__ is probe.__code__ and pass_fn.__wrapped__.__name__ == pass_fn.__name__


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", ["in_loop", "split", "hybrid", "cublas"])  # (cublas: the keep-mask pass)
def test_a_layer_on_another_gpu_than_the_current_one(strategy):
    """x and the weights on cuda:1 while cuda:0 is current: every kernel runs
    on cuda:1 (else Triton refuses the pointers, or reads them across GPUs),
    with the right output and gradients, and cuda:0 is current afterwards."""
    torch.cuda.set_device(0)
    device, dtype = torch.device("cuda", 1), torch.bfloat16
    x = torch.randn(3, 11, 96, device=device, dtype=dtype, requires_grad=True)
    w, b, a, bb = make_params(96, 80, 8, dtype, True, device=device)
    a.requires_grad_()
    bb.requires_grad_()
    with fused_lora.dispatch.force_strategy(strategy):
        y = fused_lora.lora_linear(x, w, a, bb, b, scaling=1.5, dropout_p=0.2, seed=5, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    assert torch.cuda.current_device() == 0 and y.device == device
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=1.5, dropout_p=0.2, seed=5, grads=("x", "lora_A", "lora_B"))
    assert_close(y, y64, dtype, "y")
    for name, g in zip(("x", "lora_A", "lora_B"), grads):
        assert_close(g, g64[name], dtype, f"d{name}")


def test_fake_tensors_subclasses_and_the_profiler_take_the_ops():
    """Where the ops' dispatcher matters, calls go through it: fake tensors
    get the ops' fake implementations (no kernel runs), a tensor subclass keeps
    its type, and the profiler's trace names the ops."""
    with FakeTensorMode():
        x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
        w, a, bb = (torch.randn(*shape, device=DEVICE) for shape in ((16, 24), (4, 24), (16, 4)))
        a.requires_grad_()
        assert not ops.direct_call(x, w, a, bb)
        y = fused_lora.lora_linear(x, w, a, bb, scaling=2.0, dropout_p=0.1, seed=3, backend="triton")
        dx, da = torch.autograd.grad(y.sum(), (x, a))
    assert isinstance(y, FakeTensor) and y.shape == (5, 16)
    assert dx.shape == (5, 24) and da.shape == (4, 24)

    class Tagged(torch.Tensor):
        pass

    w, b, a, bb = make_params(24, 16, 4, torch.float32, True)
    x = torch.randn(5, 24, device=DEVICE)
    tagged = x.as_subclass(Tagged)
    assert not ops.direct_call(tagged)
    y = fused_lora.lora_linear(tagged, w, a, bb, b, scaling=2.0, backend="triton")
    assert type(y) is Tagged
    plain = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton")
    assert torch.equal(y.as_subclass(torch.Tensor), plain)

    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, backend="triton").sum().backward()
    names = {e.name for e in prof.events()}
    assert {"fused_lora::lora_linear_fwd", "fused_lora::lora_linear_bwd"} <= names
