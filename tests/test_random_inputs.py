"""Random combinations of bad and odd arguments, from a fixed seed: every
call of the public entry points either returns, and then agrees with the
torch backend on the same arguments (forward, and a backward that runs),
or raises a TypeError/ValueError; never another exception from inside
torch or a kernel. ``test_errors.py`` checks each bad argument alone and
the words of its message; these mix them (two at a time too), with the
odd-but-valid ones (stride-0, transposed, empty, NaN-filled, a 1-D x)
that must run."""

import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear
from lora_testing import DEVICE, assert_close

CASES = 300  # each test; a few seconds


def _tensor_mutations(rng: random.Random, t: torch.Tensor):
    """``(label, value)``: one change of a tensor argument."""
    options = [
        ("None", lambda: None),
        ("dtype", lambda: t.to(rng.choice([torch.float64, torch.int32, torch.bool, torch.complex64, torch.float16,
                                             torch.bfloat16, torch.int64]))),
        ("unsqueezed", lambda: t.unsqueeze(0)),
        ("flattened", lambda: t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)),
        ("list", lambda: t.tolist()),
        ("numpy", lambda: t.detach().float().cpu().numpy()),
        ("empty", lambda: t[:0]),
        ("meta", lambda: t.to("meta")),
        ("transposed", lambda: t.t() if t.dim() == 2 else t.mT if t.dim() > 2 else t),
        ("resized", lambda: torch.randn([max(0, s + rng.choice([-1, 1, 5])) for s in t.shape], device=DEVICE)
         .to(t.dtype)),
        ("requires_grad", lambda: t.detach().clone().requires_grad_(t.is_floating_point())),
        ("expanded", lambda: t.expand(3, *t.shape)),  # (stride 0)
        ("nan", lambda: torch.full_like(t, math.nan) if t.is_floating_point() else t),
        ("float", lambda: 3.0),
        ("column-major", lambda: t.t().contiguous().t() if t.dim() == 2 else t),
    ]
    label, make = rng.choice(options)
    return label, make()


_SCALARS = {
    "scaling": [math.nan, math.inf, -1.0, 0.0, True, "2", None, np.float32(2.0), 1e308, [1.0], 3],
    "dropout_p": [-0.1, 1.0, 1.5, math.nan, True, "0.1", None, np.float64(0.2), 0.999, 0],
    "seed": [-1, 2**63, 2**64, 1.5, "3", True, np.int64(4), 2**31, 2**32 - 1, None, 0],
    "backend": ["cuda", "TRITON", None, 1, "torch", "auto", "triton"],
}


def _functional_case(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float32, torch.float16])
    lead = rng.choice([(5,), (2, 3), (1,), (4, 2, 3)])
    k, n, r = rng.choice([3, 8, 17]), rng.choice([4, 9]), rng.choice([1, 2, 5])
    args = {"x": torch.randn(*lead, k, device=DEVICE, dtype=dtype),
            "weight": torch.randn(n, k, device=DEVICE, dtype=dtype),
            "lora_A": torch.randn(r, k, device=DEVICE, dtype=dtype),
            "lora_B": torch.randn(n, r, device=DEVICE, dtype=dtype),
            "bias": torch.randn(n, device=DEVICE, dtype=dtype) if rng.random() < 0.5 else None}
    kwargs = {"scaling": 1.5, "dropout_p": rng.choice([0.0, 0.2]), "seed": rng.choice([None, 7]),
              "backend": rng.choice(["auto", "triton", "torch"])}
    changes = []
    for _ in range(rng.choice([1, 1, 2])):
        if rng.random() < 0.7:
            name = rng.choice([n for n, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"]
                              or ["x"])
            if isinstance(args[name], torch.Tensor) and args[name].device.type != "meta":
                label, args[name] = _tensor_mutations(rng, args[name])
                changes.append(f"{name}: {label}")
        else:
            name = rng.choice(list(kwargs))
            kwargs[name] = rng.choice(_SCALARS[name])
            changes.append(f"{name}={kwargs[name]!r}")
    return args, kwargs, changes, dtype


def _finite_floats(*values) -> bool:
    return all(v is None or (isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta")
               for v in values)


def _outcome(call, what: str, outcomes: dict):
    """``(result, None)`` or ``(None, typed error)``, counted in
    ``outcomes``; any other exception fails the test, naming the case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call()
        except (TypeError, ValueError) as error:
            assert str(error), f"{what}: {type(error).__name__} without a message"
            outcomes["refused"] += 1
            return None, error
        except Exception as exc:  # (the finding: report the case)
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    outcomes["ran"] += 1
    return result, None


def _check_against_torch(call_with_backend, y, kwargs, dtype, what):
    """A result of the Triton backend equals the torch backend's on the same
    arguments (the same mask where the seed is given)."""
    if kwargs.get("backend") == "torch" or (kwargs.get("dropout_p") and kwargs.get("seed") is None):
        return
    try:
        expected = call_with_backend("torch")
    except Exception as exc:
        raise AssertionError(f"{what}: the Triton backend ran, the torch backend raised {exc!r}") from exc
    if y.dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert_close(y.detach(), expected.detach().double(), y.dtype, what)


def _run_functional(call, kwargs, tensors, n: int, what: str, outcomes: dict) -> None:
    """``call(kwargs["backend"])`` (:func:`_outcome`): where it returns, an
    (..., n) tensor whose backward runs, and, on finite floating-point
    ``tensors`` with an int or no seed, the torch backend's result
    (:func:`_check_against_torch`)."""
    y, error = _outcome(lambda: call(kwargs["backend"]), what, outcomes)
    if error is not None:
        return
    assert isinstance(y, torch.Tensor) and y.shape[-1] == n, what
    if y.requires_grad:
        y.float().sum().backward()
    if _finite_floats(*tensors) and isinstance(kwargs["seed"], (int, type(None))):
        _check_against_torch(call, y, kwargs, y.dtype, what)


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_linear_returns_the_torch_backends_result_or_raises_a_typed_error(seed):
    rng = random.Random(seed)
    outcomes = {"ran": 0, "refused": 0}
    for i in range(CASES):
        args, kwargs, changes, _ = _functional_case(rng)
        what = f"case {i} (seed {seed}): {'; '.join(changes)}"
        w = args["weight"]
        _run_functional(lambda backend: fused_lora.lora_linear(**args, **{**kwargs, "backend": backend}), kwargs,
                        args.values(), w.shape[0] if isinstance(w, torch.Tensor) and w.dim() else -1, what,
                        outcomes)
    assert outcomes["ran"] >= CASES // 20 and outcomes["refused"] >= CASES // 2, outcomes  # (both exercised)


def _checked(check, call) -> tuple:
    """``("returned", value)`` or ``("raised", type, message)`` of ``check(*call)``."""
    try:
        return "returned", check(*call)
    except (TypeError, ValueError) as exc:
        return "raised", type(exc), str(exc)


def test_the_argument_checks_fast_path_takes_only_what_the_full_checks_take(monkeypatch):
    """``check_lora_args`` first asks ``_plainly_valid`` (the usual arguments
    at the host's least cost): wherever it says yes, the full checks pass
    too: over the random cases above, valid ones, and valid ones with one
    property off, check_lora_args gives the same values or raises the same
    error (type and message) with the fast path and without it."""
    from fused_lora import _validate

    rng = random.Random(7)
    fast_path = _validate._plainly_valid
    taken = refused = 0
    for i in range(2 * CASES):
        args, kwargs, changes, _ = _functional_case(rng)
        if i % 4 in (0, 1):  # (a valid case, its weights Parameters or not: the fast path's own; or one check off)
            k, n, r = rng.choice([3, 8, 17]), rng.choice([4, 9]), rng.choice([1, 2, 5])
            dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
            args = {"x": torch.randn(*rng.choice([(5,), (2, 3), ()]), k, device=DEVICE, dtype=dtype),
                    "weight": torch.randn(n, k, device=DEVICE, dtype=dtype),
                    "lora_A": torch.randn(r, k, device=DEVICE, dtype=dtype),
                    "lora_B": torch.randn(n, r, device=DEVICE, dtype=dtype),
                    "bias": torch.randn(n, device=DEVICE, dtype=dtype) if rng.random() < 0.5 else None}
            args.update({name: torch.nn.Parameter(t, requires_grad=name.startswith("lora"))
                         for name, t in args.items() if name != "x" and t is not None and rng.random() < 0.5})
            changes, kwargs = [], {"scaling": 1.5, "dropout_p": 0.2, "seed": rng.choice([None, 7])}
            if i % 4 == 1:  # (one property off, each of those the fast path tests)
                name, off = rng.choice([
                    ("lora_A", lambda t: torch.randn(t.shape[0], t.shape[1] + 1, dtype=t.dtype)),
                    ("x", lambda t: torch.randn(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)),
                    ("lora_B", lambda t: torch.randn(t.shape[0], t.shape[1] + 1, dtype=t.dtype)),
                    ("lora_B", lambda t: torch.randn(t.shape[0] + 1, t.shape[1], dtype=t.dtype)),
                    ("weight", lambda t: torch.randn(t.shape[0] + 1, t.shape[1], dtype=t.dtype)),
                    ("bias", lambda t: torch.randn(t.shape[0] + 1, dtype=t.dtype)),
                    ("lora_A", lambda t: t.detach()[:0]),  # (rank 0)
                    ("lora_A", lambda t: t.detach().to(torch.float64 if t.dtype != torch.float64 else torch.float32)),
                    ("weight", lambda t: t.detach().to("meta")),
                    ("bias", lambda t: t.detach().to_sparse()),
                    ("x", lambda t: t.detach().to(torch.int32)),
                    ("weight", lambda t: t.detach().unsqueeze(0)),
                    ("bias", lambda t: t.detach().to("meta")),
                    ("rank 0", None), ("all complex", None)])
                if name == "rank 0":  # (A and B agreeing, of rank 0: refused by lora_linear, min_rank 1)
                    args["lora_A"], args["lora_B"] = args["lora_A"].detach()[:0], args["lora_B"].detach()[:, :0]
                elif name == "all complex":  # (one dtype, not a floating-point one)
                    args = {key: t if t is None else t.detach().to(torch.complex64) for key, t in args.items()}
                elif args[name] is not None:
                    args[name] = off(args[name])
                changes.append(f"{name} off")
        call = (args["x"], args["weight"], args["lora_A"], args["lora_B"], args["bias"], kwargs["scaling"],
                kwargs["dropout_p"], kwargs["seed"])
        fast = fast_path(*call[:5], 1)
        with_fast_path = _checked(_validate.check_lora_args, call)
        monkeypatch.setattr(_validate, "_plainly_valid", lambda *a: False)
        try:
            full = _checked(_validate.check_lora_args, call)
        finally:
            monkeypatch.setattr(_validate, "_plainly_valid", fast_path)
        what = f"case {i}: {'; '.join(changes)}"
        assert with_fast_path == full, what  # (the same values, or the same error: type and message)
        taken += fast
        refused += full[0] == "raised"
    assert taken >= CASES // 4 and refused >= CASES // 2, (taken, refused)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_lora_linear_returns_the_torch_backends_result_or_raises_a_typed_error(seed):
    rng = random.Random(100 + seed)
    outcomes = {"ran": 0, "refused": 0}
    for i in range(CASES):
        args, kwargs, changes, dtype = _functional_case(rng)
        x = args["x"]
        lead = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) and x.dim() else (5,)
        ids = torch.randint(-1, 2, lead, device=DEVICE)
        kind = rng.choice(["ok", "ok", "float", "out of range", "int8", "per sample", "wrong shape"])
        ids = {"ok": ids, "float": ids.float(), "out of range": ids + 5, "int8": ids.to(torch.int8),
               "per sample": ids.reshape(-1)[:lead[0]] if len(lead) >= 2 else ids,
               "wrong shape": torch.zeros(7, dtype=torch.int64, device=DEVICE)}[kind]
        changes.append(f"ids: {kind}")
        k = args["weight"].shape[-1] if isinstance(args["weight"], torch.Tensor) and args["weight"].dim() else 3
        n = args["weight"].shape[0] if isinstance(args["weight"], torch.Tensor) and args["weight"].dim() else 4
        second = (torch.randn(rng.choice([0, 2]), k, device=DEVICE, dtype=dtype),)
        second += (torch.randn(n, second[0].shape[0], device=DEVICE, dtype=dtype),)
        lora_a = [args["lora_A"], second[0]] if rng.random() < 0.85 else args["lora_A"]
        lora_b = [args["lora_B"], second[1]]
        scaling = rng.choice([1.0, [1.0, 2.0], [1.0], (0.5, math.nan), [2.0, 0.25]])
        changes.append(f"scaling={scaling!r}")
        what = f"case {i} (seed {seed}): {'; '.join(changes)}"

        def call(backend, lora_a=lora_a, lora_b=lora_b, ids=ids, scaling=scaling):
            return fused_lora.multi_lora_linear(args["x"], args["weight"], lora_a, lora_b, ids, args["bias"],
                                                scaling=scaling, dropout_p=kwargs["dropout_p"], seed=kwargs["seed"],
                                                backend=backend)

        _run_functional(call, kwargs, (args["x"], args["weight"], args["bias"], *lora_a, *lora_b), n, what,
                        outcomes)
    assert outcomes["ran"] >= CASES // 20 and outcomes["refused"] >= CASES // 2, outcomes


@pytest.mark.parametrize("seed", [0, 1])
def test_dora_linear_returns_the_torch_backends_result_or_raises_a_typed_error(seed):
    rng = random.Random(300 + seed)
    outcomes = {"ran": 0, "refused": 0}
    for i in range(CASES):
        args, kwargs, changes, dtype = _functional_case(rng)
        w = args["weight"]
        n = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() else 4
        args["magnitude"] = torch.rand(n, device=DEVICE, dtype=dtype) + 0.5
        if rng.random() < 0.3:
            label, args["magnitude"] = _tensor_mutations(rng, args["magnitude"])
            changes.append(f"magnitude: {label}")
        what = f"case {i} (seed {seed}): {'; '.join(changes)}"

        def call(backend):
            return fused_lora.dora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"],
                                          args["magnitude"], args["bias"], scaling=kwargs["scaling"],
                                          dropout_p=kwargs["dropout_p"], seed=kwargs["seed"], backend=backend)

        _run_functional(call, kwargs, args.values(), n, what, outcomes)
    assert outcomes["ran"] >= CASES // 20 and outcomes["refused"] >= CASES // 2, outcomes


_LAYER_ARGS = {
    "r": [0, -1, 2.0, True, "4", None, np.int64(3), 1, 4],
    "alpha": [math.nan, math.inf, -1.0, 0.0, "1", None, True, np.float32(2.0), 1e-30, 8.0],
    "dropout": [-0.1, 1.0, math.nan, "0.1", None, 0.5, np.float64(0.3), True, 0.0],
    "use_rslora": ["no", 2, None, np.bool_(True), 0, 1.0, True],
    "backend": ["cuda", None, "torch", 3, "triton", "auto"],
    "adapter_dtype": [torch.int8, "float16", torch.float64, float, torch.float32, None],
}


@pytest.mark.parametrize("multi", [False, True], ids=["LoRALinear", "MultiLoRALinear"])
def test_layers_run_or_raise_typed_errors_whatever_they_are_given(multi):
    rng = random.Random(200 + multi)
    outcomes = {"ran": 0, "refused": 0}
    for i in range(CASES):
        k, n = rng.choice([3, 8]), rng.choice([4, 9])
        linear = nn.Linear(k, n, bias=rng.random() < 0.5, device=DEVICE)
        if rng.random() < 0.2:
            linear = linear.to(rng.choice([torch.float64, torch.float16, torch.bfloat16]))
        given = {name: (rng.choice(values) if rng.random() < 0.12 else values[-1])
                 for name, values in _LAYER_ARGS.items()}
        if multi:
            given["ranks"] = (rng.choice([[], "23", [2, -1], [2.0, 1], None]) if rng.random() < 0.15
                              else rng.choice([[2, 3], [0, 1], [2], [1, 0, 4]]))
            given["alphas"] = (rng.choice([[1.0], 3.0, ["a", 1], [math.nan, 1.0]]) if rng.random() < 0.15
                               else [2.0] * len(given["ranks"] or ()) if rng.random() < 0.5 else None)
            del given["r"], given["alpha"]
        dtype = linear.weight.dtype
        lead = rng.choice([(5,), (2, 3), (0,), (), "wider"])
        x = torch.randn(*(lead if lead != "wider" else (5,)), k + (lead == "wider"), device=DEVICE,
                        dtype=rng.choice([dtype, dtype, torch.float32]))
        train = rng.random() < 0.5
        what = f"case {i}: {given}, x {tuple(x.shape)} {x.dtype}, weight {dtype}, train={train}"

        def run():
            layer = (MultiLoRALinear if multi else LoRALinear).from_linear(linear, **given)
            layer.train(train)
            ids = None
            if multi or rng.random() < 0.3:
                ids = rng.choice([torch.randint(-1, 2 if multi else 1, x.shape[:-1], device=DEVICE),
                                  torch.tensor([0], device=DEVICE), None,
                                  torch.zeros(x.shape[:-1], device=DEVICE),
                                  torch.full(x.shape[:-1], 7, device=DEVICE)])
            y = layer(x, adapter_ids=ids) if ids is not None else layer(x)
            if y.requires_grad:
                y.float().sum().backward()
            if not multi and rng.random() < 0.3:
                layer.merge()
                layer.unmerge()
            return y

        _outcome(run, what, outcomes)
    assert outcomes["ran"] >= CASES // 20 and outcomes["refused"] >= CASES // 4, outcomes


_SHAPES = [(8,), (), (3, 2, 8), "58", None, (5, -1), (5, 8.0), (True, 8), torch.tensor([5, 8])]


def test_dropout_mask_and_explain_return_or_raise_typed_errors():
    rng = random.Random(300)

    def pick(bad, good):  # (each argument bad one time in six)
        return rng.choice(bad) if rng.random() < 1 / 6 else rng.choice(good)

    outcomes = {"ran": 0, "refused": 0}
    for i in range(CASES):
        shape = pick(_SHAPES, [(5, 8), [5, 8], torch.Size([4, 8]), (0, 8)])
        if i % 2:
            args = (pick([-1, 2**63, 1.5, "3", torch.tensor([1, 2]), torch.tensor(1.0), None, True],
                         [0, 2**63 - 1, torch.tensor(4), torch.tensor(4, dtype=torch.int32, device=DEVICE)]),
                    shape, pick([1.0, -0.1, math.nan, "x"], [0.0, 0.1, 0.999999]))
            kwargs = dict(device=pick(["nope", [0]], [None, "cpu", "meta"]),
                          rows=pick([(3, 1), (0, 100), (-1, 2), 5, (0, 2.5)], [None, (0, 2)]))
            call = lambda: fused_lora.dropout_mask(*args, **kwargs)  # noqa: E731
        else:
            args = (shape, pick([(8,), (4, 9), None], [(4, 8), (0, 8), [4, 8]]),
                    pick([0, -1, 2.0, None, True], [1, 16, 10**6]),
                    pick([torch.float64, torch.int8, "bf16", None], [torch.bfloat16, torch.float32]),
                    pick([1.0, -0.1, math.nan, "x"], [0.0, 0.1]))
            kwargs = dict(target=pick(["sm_70", "sm_x", None], ["sm_90", "sm_80", "interpreter", "sm_120"]),
                          num_sms=pick([0, -3, 1.5], [None, 132]))
            call = lambda: str(fused_lora.explain(*args, **kwargs))  # noqa: E731
        _outcome(call, f"case {i}: {args} {kwargs}", outcomes)
    assert outcomes["ran"] >= CASES // 10 and outcomes["refused"] >= CASES // 4, outcomes
