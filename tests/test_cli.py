"""The ``fused-lora`` command's check and bench subcommands (smoke mode
without a GPU), run in-process."""

import dataclasses
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

import fused_lora
from fused_lora import benchmark, cli
from lora_testing import DEVICE, count_launches, make_params


@pytest.mark.own_shard  # (every check row: more kernel variants to compile on a GPU than any other test)
def test_check_passes_and_reports_json(capsys):
    assert cli.main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert len(report["rows"]) >= 25
    paths = {row["path"] for row in report["rows"]}
    # (whether a row's forward splits K depends on the device's tiles; the small-M rows always do)
    assert {"in_loop +split-k", "split +dropout +train-base +split-k", "in_loop +dropout +split-k",
            "in_loop +dropout +row-scale +split-k", "in_loop +dropout +adapters +split-k",
            "in_loop +dropout +adapter-dropouts +split-k"} <= paths
    assert {"in_loop", "split +train-base", "split +dropout", "hybrid +dropout +train-base",
            "split +train-base +tma", "split +dropout +tma", "split +dropout +train-base +pointers",
            "split +dropout +train-base +tma +tma-device", "in_loop +train-base +tma +tma-device",
            "in_loop +train-base +persistent",
            "split +dropout +persistent", "split +train-base +tma +persistent",
            "in_loop +dropout +row-scale", "split +train-base +row-scale", "in_loop +dropout +adapters",
            "split +train-base +adapters", "split +dropout +adapter-dropouts", "in_loop +dora",
            "split +dropout +train-base +dora"} <= {
                path.removesuffix(" +split-k") for path in paths}
    # (no Triton GEMM to split: none labelled so; with dropout above EAGER_KEPT_MASK_MAX_M tokens, the Function's
    # cublas passes, the mask drawn again in the backward)
    assert {"cublas +train-base", "cublas +dropout", "cublas +dropout +train-base +mask-redrawn"} <= paths
    for row in report["rows"]:
        assert row["passed"] and 0 <= row["worst"] <= row["tolerance"]
        assert {"y", "dx", "dlora_A", "dlora_B"} <= set(row["errors"])
        assert ("dmagnitude" in row["errors"]) == ("+dora" in row["path"])


def test_check_fails_loudly_when_a_kernel_is_wrong(monkeypatch, capsys):
    from fused_lora import _triton

    real = _triton.get().lora_gemm

    def off_by_bias(*args, **kwargs):
        c, xa = real(*args, **kwargs)
        return c + 0.5, xa

    monkeypatch.setattr(_triton.get(), "lora_gemm", off_by_bias)
    real_cases = cli.check_cases
    monkeypatch.setattr(cli, "check_cases", lambda on_gpu: real_cases(on_gpu)[:3])  # (a few rows suffice)
    assert cli.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke preset is the no-GPU path")
def test_bench_smoke_writes_results(tmp_path, capsys):
    assert cli.main(["bench", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not a speed measurement" in out.lower() or "say nothing about GPU speed" in out
    assert "Roofline model (a model, not a measurement)" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["gpu"] is None
    measured = [m for m in data["measurements"] if m["median_ms"] is not None]
    providers = {m["provider"] for m in measured}
    assert providers == {"fused", "naive", "unsloth_style", "base", *benchmark.VARIANT_PROVIDERS}
    assert {m["mode"] for m in measured} == set(benchmark.MODES)
    # unsloth_style (no dropout): N/A, unmeasured, exactly where the case has dropout
    unsloth = [m for m in data["measurements"] if m["provider"] == "unsloth_style"]
    assert {m["case"]["dropout"] > 0 for m in unsloth} == {False, True}
    assert all((m["median_ms"] is None and m["note"].startswith("N/A")) == (m["case"]["dropout"] > 0)
               for m in unsloth)
    # the forced strategies: only on the strategy cases, only where they can run, each agreeing with naive
    forced = [m for m in data["measurements"] if m["provider"] in benchmark.VARIANT_PROVIDERS]
    assert {m["mode"] for m in forced} == set(benchmark.VARIANT_MODES)
    assert {benchmark.Case(**m["case"]) for m in forced} == set(benchmark.presets()["smoke"].variant_cases)
    # (every strategy runs with dropout too: in_loop masks its x tiles, cublas multiplies x by the keep-mask)
    assert not [m for m in forced if m["note"].startswith("N/A")]
    assert {m["case"]["dropout"] > 0 for m in forced if m["provider"] == "fused:cublas"} == {False, True}
    assert all(m["max_error"] < 1e-2 for m in forced if m["case"]["dropout"] == 0)
    md = (tmp_path / "results.md").read_text()
    assert "### Forward strategies, forced, TMA loads and the persistent grid" in md
    assert not [m for m in data["measurements"] if m["note"].startswith("failed")]
    # fused agrees with naive wherever the harness checks it
    errors = [m["max_error"] for m in measured if m["provider"] == "fused" and m["max_error"] is not None]
    assert errors and max(errors) < 1e-2
    assert (tmp_path / "results.md").read_text().startswith("# fused_lora benchmark")
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    # one timed call a step on the interpreter: a median, no quantiles made up from it
    assert all(m["p20_ms"] is None and m["p80_ms"] is None for m in measured)


def test_cpu_timer_gives_quantiles_from_five_calls(monkeypatch):
    times = [3.0, 1.0, 5.0, 2.0, 4.0]  # (ms a call, unsorted: a start and an end tick each)
    ticks = iter(v for t in times for v in (0.0, t / 1e3))
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    q, timer = benchmark.time_cpu(lambda: None, reps=5)
    assert q[0] == 3.0 and q[1] == pytest.approx(1.2) and q[2] == pytest.approx(4.8), q
    assert "not a speed measurement" in timer
    ticks = iter(v for t in times[:4] for v in (0.0, t / 1e3))
    q, _ = benchmark.time_cpu(lambda: None, reps=4)
    assert q[0] == 2.5 and q[1:] == [None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_small_m_backward_steps_are_timed_in_a_cuda_graph_and_dropout_still_draws_after():
    """A backward step (its forward recorded before timing) is captured on the
    stream its forward ran on, so that autograd launches into the capture (the
    second H200 run's backward captures failed on Triton's own stream, and the
    failed captures left the CUDA generator unusable for every later dropout);
    a forward+backward step with dropout is timed after it, in a graph too."""
    case = benchmark.Case(m=16, k=256, n=128, r=8, dtype="bfloat16", dropout=0.1)
    inp = benchmark.Inputs.make(case, torch.device("cuda"))
    dy = torch.randn(case.m, case.n, device="cuda", dtype=case.torch_dtype)
    for provider in ("fused", "naive"):
        for mode in ("backward", "forward+backward"):
            stream = benchmark.graph_stream()
            with torch.cuda.stream(stream):
                step = benchmark.make_step(mode, benchmark.make_forward(provider, inp), inp.leaves(provider), dy)
            q, timer = benchmark.time_cuda(step, case.m, rep_ms=5, stream=stream)
            assert timer == "cuda-graph" and 0 < q[1] <= q[0] <= q[2], (provider, mode, timer, q)
    torch.nn.functional.dropout(dy, 0.5)  # (the generator is not left in capture mode)


def test_bench_time_budget_skips_and_says_so(tmp_path):
    preset = benchmark.presets()["smoke"]
    results = benchmark.run_preset(preset, torch.device("cpu"), deadline=0.0)
    assert all(m.note == "skipped: time budget spent" and m.median_ms is None for m in results)
    md = benchmark.markdown(results, benchmark.environment(), preset)
    assert "skipped: time budget spent" in md


def test_gpu_presets_refused_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main(["bench", "--preset", "gpu-check"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["bench", "--time-budget", "-5"], ["--time-budget", "> 0", "-5"]),
    (["bench", "--time-budget", "nan"], ["--time-budget", "finite"]),
    (["bench", "--m", "0"], ["--m", ">= 1"]),
    (["bench", "--m", "16.5"], ["--m", "integer", "'16.5'"]),
    (["demo", "--steps", "0"], ["--steps", ">= 1"]),
    (["demo", "--r", "0"], ["--r", ">= 1"]),
    (["demo", "--dropout", "1"], ["--dropout", "< 1"]),
    (["demo", "--alpha", "inf"], ["--alpha", "finite"]),
])
def test_bad_numbers_are_usage_errors(argv, words, capsys):
    """Out-of-range numbers stop at the command line (exit 2, the argument
    named), not as a traceback from deep inside a run (``--steps -1`` was a
    StatisticsError) nor as a run that does nothing (``--m 0``)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"


def test_bench_refuses_what_would_run_nothing_or_lose_output(tmp_path, capsys):
    """An --m that matches no case, an output folder that cannot be written, a
    results folder or README that is not there: each is exit 2 with the
    reason, before anything runs; a mistyped results folder does not wipe the
    README's section (it would read as "no GPU run committed")."""
    assert cli.main(["bench", "--preset", "smoke", "--m", "3"]) == 2
    assert "--m 3 matches no case of preset 'smoke'" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["bench", "--preset", "smoke", "--out", str(blocker / "out")]) == 2
    assert "cannot write the output folder" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(blocker / "demo")]) == 2
    expected = "cannot write the output folder" if _has_peft() else "needs peft and transformers"
    assert expected in capsys.readouterr().err

    readme = tmp_path / "README.md"
    text = f"intro\n{benchmark.README_BEGIN}\nmeasured on a GPU\n{benchmark.README_END}\n"
    readme.write_text(text)
    typo = str(tmp_path / "typo")
    assert cli.main(["bench", "--update-readme", "--results-root", typo, "--readme", str(readme)]) == 2
    assert "is not a folder" in capsys.readouterr().err and readme.read_text() == text
    (tmp_path / "x" / "y" / "z").mkdir(parents=True)
    assert cli.main(["bench", "--update-readme", "--results-root", str(tmp_path / "x" / "y" / "z")]) == 2
    assert "no README at" in capsys.readouterr().err
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert cli.main(["bench", "--update-readme", "--results-root", str(tmp_path), "--readme", str(plain)]) == 2
    assert "no performance markers" in capsys.readouterr().err and plain.read_text() == "no markers\n"


def _has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None


def test_roofline_model_matches_the_design_notes(monkeypatch):
    """KERNELS.md: ideal fused/naive forward ≈ 1.39x at K=N=4096, M=4k-16k with
    dropout, from bytes and FLOPs; the model also charges the integer work of
    drawing the mask (naive draws it once, fused three times), which takes
    some of that back, and none of it without dropout."""
    case = benchmark.Case(8192, 4096, 4096, 16, "bfloat16", 0.1)
    mo = benchmark.model(case)
    assert 1.25 < mo["speedup_forward"] < 1.45
    assert mo["naive_forward_bytes"] > 3 * mo["fused_forward_bytes"]
    with monkeypatch.context() as patch:
        patch.setattr(benchmark, "NAIVE_MASK_INT_OPS_PER_ELEMENT", 0)
        patch.setattr(benchmark, "FUSED_MASK_INT_OPS_PER_ELEMENT", {"skinny": 0, "dx": 0})
        unpriced = benchmark.model(case)
    assert 1.3 < unpriced["speedup_forward"] < 1.5
    assert mo["speedup_forward+backward"] < unpriced["speedup_forward+backward"]
    assert mo["fused_backward_s"] > unpriced["fused_backward_s"]  # the dx epilogue's and dA pass's draws
    no_dropout = benchmark.Case(8192, 4096, 4096, 16, "bfloat16", 0.0)
    assert benchmark.model(no_dropout)["fused_forward_s"] < mo["fused_forward_s"]


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_roofline_model_counts_the_kernels_the_fused_step_launches(monkeypatch, p):
    """The model prices the kernels that the sm_90 plan launches (each split-K
    sum, each skinny reduction): counted here by running that plan's
    launches on the interpreter, at a decode-sized M where they all split."""
    from fused_lora import _triton, dispatch
    from fused_lora.kernels import gemm, skinny

    if not _triton.interpreter():
        pytest.skip("runs the sm_90 plan on the interpreter")
    m, k, n, r = 16, 1024, 1024, 16
    real_plan = dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda *a, **kw: real_plan(*a, **dict(kw, interpreter=False)))
    launches = [count_launches(monkeypatch, mod, name) for mod, name in (
        (gemm, "lora_gemm_kernel"), (skinny, "lora_skinny_kernel"), (skinny, "reduce_partials_kernel"))]
    x = torch.randn(m, k, dtype=torch.float16, requires_grad=True)
    a = (torch.randn(r, k, dtype=torch.float16) / k ** 0.5).requires_grad_()
    b = torch.randn(n, r, dtype=torch.float16, requires_grad=True)
    y = fused_lora.lora_linear(x, torch.randn(n, k, dtype=torch.float16) / k ** 0.5, a, b, dropout_p=p,
                               backend="triton")
    forward = sum(map(len, launches))
    y.backward(torch.randn_like(y))
    mo = benchmark.model(benchmark.Case(m, k, n, r, "float16", p))
    seed = int(p > 0)  # (with dropout the seed is drawn on the device first: one torch kernel)
    assert (mo["fused_forward_kernels"], mo["fused_backward_kernels"]) == (
        forward + seed, sum(map(len, launches)) - forward)
    assert len(launches[0][0]) == 2 and launches[0][0][1] > 1  # the forward GEMM split along K


@pytest.mark.parametrize("p, records", [(0.0, True), (0.1, True), (0.0, False), (0.1, False)])
def test_roofline_model_counts_the_kernels_the_cublas_path_launches(monkeypatch, p, records):
    """Where ``fused`` runs ``cublas`` (an eager call by the dispatch's rule),
    the model prices cuBLAS's products, recorded for autograd or run by
    their autograd Function: counted here by the operators a step
    dispatches that compute (each a kernel on a GPU: no view, no bare
    allocation) and the keep-mask pass's launches, x requiring its gradient,
    A and B trained, as the benchmark's step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_lora import _triton, dispatch, ops
    from fused_lora.kernels import common, mask
    from fused_lora.testing import eager_cublas_here

    if not _triton.interpreter():
        pytest.skip("counts the operators of CPU tensors, the keep-mask pass on the interpreter")
    kernels = []
    masks = count_launches(monkeypatch, mask, "keep_mask_kernel", outside_modes=True)

    class Computing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # (not a view, an allocation, or reading a number: the int seed's CPU tensor read by the host)
            if not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_strided",
                                                                          "_local_scalar_dense"):
                kernels.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(common, "_poison", False)  # (no fill of the mask's bytes: the GPU's alloc has none)
    monkeypatch.setattr(ops, "direct_call", lambda *tensors: True)  # (the passes, not one operator of the mode)
    m, k, n, r = 300, 64, 48, 8
    case = benchmark.Case(m, k, n, r, "float16", p)
    inp = benchmark.Inputs.make(case, "cpu")
    dy = torch.randn(m, n, dtype=torch.float16)
    counts = []
    with eager_cublas_here():
        monkeypatch.setattr(dispatch, "eager_records", lambda m, dropout_p: records)
        mo = benchmark.model(case, eager=True)
        for _ in range(2):  # (the first call primes the Triton plan, which the model does not price)
            kernels.clear()
            masks.clear()
            with Computing():
                y = benchmark.make_forward("fused", inp)()
                forward = len(kernels) + len(masks)
                torch.autograd.grad(y, inp.leaves("fused"), dy)
            counts.append((forward, len(kernels) + len(masks) - forward))
    assert mo["fused_path"] == (benchmark.CUBLAS_RECORDED if records else benchmark.CUBLAS_FUNCTION)
    assert len(masks) == (0 if not p else 1 if records else 2)
    assert "mm" in kernels and "addmm" in kernels  # (cuBLAS's products ran: the path is the model's)
    assert (mo["fused_forward_kernels"], mo["fused_backward_kernels"]) == counts[1], kernels


@pytest.mark.parametrize("shrink, tn, colsum, partial_bytes", [
    (True, True, False, None), (True, True, False, 3000), (False, True, False, 3000), (False, True, True, None),
    (False, False, True, 500), (True, False, False, None), (True, True, True, 2000)])
def test_skinny_small_bytes_are_what_the_pass_writes_and_sums(monkeypatch, shrink, tn, colsum, partial_bytes):
    """``SkinnyGrid.small_bytes`` (the model's bytes of a skinny pass's
    partials, beside its read of the wide operand) against the tensors that
    ``skinny_pass`` hands its launches: each chunk's partials (or outputs),
    and each reduction's partials, running sums and outputs; with the row
    splits in chunks where ``partial_bytes`` bounds them."""
    from fused_lora import _triton
    from fused_lora.kernels import configs, skinny

    if not _triton.interpreter():
        pytest.skip("runs the skinny pass on the interpreter")
    if partial_bytes is not None:
        monkeypatch.setattr(skinny, "SKINNY_PARTIAL_BYTES", partial_bytes)
    m, c, r, programs = 150, 70, 5, 12
    written, moved = [], []
    real_launch, real_chunk = skinny.launch, skinny._launch

    def chunk(t, s, l, sh, tn, cs, *args, **kwargs):
        m_start, m_end = args[2], args[3]
        written.append((4 * sh.shape[0] * (m_end - m_start) * sh.shape[2] if sh is not None else 0)
                       + sum(o.numel() * o.element_size() for o in (tn, cs) if o is not None))
        return real_chunk(t, s, l, sh, tn, cs, *args, **kwargs)

    def launch(kernel, grid, args, constexprs):
        if kernel is skinny.reduce_partials_kernel:
            parts, acc, out, parts2, acc2, out2 = args[0], args[1], args[2], args[6], args[7], args[8]
            moved.append(parts.nbytes + out.nbytes + (acc.nbytes if constexprs["HAS_ACC"] else 0)
                         + ((parts2.nbytes + out2.nbytes + (acc2.nbytes if constexprs["HAS_ACC2"] else 0))
                            if constexprs["SECOND"] else 0))
        return real_launch(kernel, grid, args, constexprs)

    monkeypatch.setattr(skinny, "_launch", chunk)
    monkeypatch.setattr(skinny, "launch", launch)
    t = torch.randn(m, c, device=DEVICE)
    skinny.skinny_pass(t, config=configs.SKINNY_FP32, target_programs=programs,
                       shrink=torch.randn(c, r, device=DEVICE) if shrink else None,
                       tn_left=torch.randn(m, r, device=DEVICE) if tn else None, colsum=colsum,
                       tn_dtype=torch.float16, colsum_dtype=torch.float64)
    grid = skinny.skinny_grid(m, c, r, configs.SKINNY_FP32, programs, shrink=shrink, tn=tn, colsum=colsum)
    assert grid.small_bytes(c, r, 2 if tn else None, 8 if colsum else None) == (written, moved)
    assert len(written) + len(moved) == grid.launches()
    assert moved and (len(written) > 1) == (partial_bytes is not None)  # (every case sums partials)


def test_readme_performance_section_is_generated_from_committed_results():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    begin, end = benchmark.README_BEGIN, benchmark.README_END
    assert begin in readme and end in readme
    section = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert section == benchmark.performance_section(root / "bench" / "results").strip(), \
        "README is stale: run `fused-lora bench --update-readme`"


def test_performance_section_renders_a_gpu_run(tmp_path):
    preset = benchmark.presets()["smoke"]
    results = benchmark.run_preset(benchmark.Preset("t", preset.cases[:1], providers=("fused", "naive", "base"),
                                                    modes=("forward",)), DEVICE)
    env = dict(benchmark.environment(), gpu="NVIDIA H200")
    benchmark.write_outputs(results, env, preset, tmp_path / "runs" / "2026-11-28-NVIDIA-H200")
    section = benchmark.performance_section(tmp_path / "runs")
    assert "Measured on **NVIDIA H200**" in section and "| M=16 64->48 r=8 float32 p=0 | forward |" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{benchmark.README_BEGIN}\nold\n{benchmark.README_END}\nrest\n")
    assert benchmark.update_readme(readme, tmp_path / "runs") is True
    assert "old" not in readme.read_text() and readme.read_text().endswith("rest\n")
    assert benchmark.update_readme(readme, tmp_path / "runs") is False


def test_gpu_check_runs_every_test_file_but_the_compile_checks():
    """bench/gpu_check.sh lists the test files in priority order (kernels
    first); a new test file must join the list, or it would never run on a GPU.
    The two compile checks (sm_90 code built on CPUs, with this Triton and the
    GPU machine's) are CI's: the GPU's time is for what only a GPU can test."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "bench" / "gpu_check.sh").read_text()
    listed = re.findall(r"tests/(test_\w+\.py)", script.split("== tests on CUDA", 1)[1].split("== benchmark", 1)[0])
    on_disk = {p.name for p in (root / "tests").glob("test_*.py")} - {"test_compile_report.py", "test_gpu_triton.py"}
    assert sorted(listed) == sorted(on_disk) and len(listed) == len(set(listed))
    assert listed[0] == "test_parity.py"


def test_gpu_check_runs_the_suite_as_interleaved_shards():
    """On a GPU most of the suite's time is Triton compiling kernels, one core
    per process: bench/gpu_check.sh runs ``--shard i/n`` for every i at once.
    Together the shards are the whole suite, each test exactly once,
    interleaved (each shard gets its share of every file), the j-th of k
    interleaved shards starting j/k of the way through its share (so that
    a time box stopping them all leaves unrun tests all over the suite, not
    only its last files); the heaviest tests (marked own_shard) have shard 0
    to themselves; a bad spec is a usage error, not a silently empty run.
    The split is :func:`fused_lora.testing.shard`'s, checked here on lists;
    pytest's ``--shard`` (conftest) is checked to be that split of what it
    collects."""
    import subprocess
    import sys

    from lora_testing import shard

    def rotated(share, j, k):
        start = j * len(share) // k
        return share[start:] + share[:start]

    assert shard(list(range(12)), 1, 2) == [7, 9, 11, 1, 3, 5]  # (the second half of its share first)
    assert shard(list(range(9)), 2, 3) == [8, 2, 5]
    for size in (0, 1, 2, 7, 31):
        items = list(range(size))
        for heavy in (set(), {0}, {3, 5}, set(items)):
            for n in (1, 2, 3, 5):
                shards = [shard(items, i, n, alone=heavy.__contains__) for i in range(n)]
                assert sorted(sum(shards, [])) == items  # (each exactly once)
                heavy_here = heavy & set(items)
                if n > 1 and heavy_here:
                    rest = [t for t in items if t not in heavy_here]
                    assert shards == [sorted(heavy_here)] + [rotated(rest[i::n - 1], i, n - 1) for i in range(n - 1)]
                else:
                    assert shards == [rotated(items[i::n], i, n) for i in range(n)]

    root = Path(__file__).resolve().parents[1]

    def collect(*extra):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                               "tests/test_reference.py", "tests/test_errors.py", heavy, *extra],
                              cwd=root, capture_output=True, text=True, timeout=300)
        return proc, [line for line in proc.stdout.splitlines() if "::" in line]

    heavy = "tests/test_cli.py::test_check_passes_and_reports_json"  # (marked own_shard: the heaviest compiler)
    proc, whole = collect()
    assert proc.returncode == 0 and heavy in whole and len(whole) > 10, proc.stdout + proc.stderr
    rest = [t for t in whole if t != heavy]
    second = rest[1::2]  # (shard 2/3: the second of the two interleaved shards, from half-way through its share)
    for spec, want in (("0/3", [heavy]), ("2/3", second[len(second) // 2:] + second[:len(second) // 2])):
        proc, got = collect("--shard", spec)
        assert proc.returncode == 0 and got == want, (spec, proc.stdout + proc.stderr)
    proc, _ = collect("--shard", "3/3")
    assert proc.returncode == 4 and "--shard must be 'i/n'" in proc.stdout + proc.stderr
    script = (root / "bench" / "gpu_check.sh").read_text()
    assert '--shard "$i/$SHARDS"' in script and "--compile-only" in script


def test_bench_compile_only_runs_every_step_once_untimed_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``bench --compile-only`` (run by gpu_check.sh beside the tests) runs the
    same steps as the timed run, each once, so that the kernels they need are
    compiled before the time budget starts; it times and writes nothing."""
    def no_timing(*args, **kwargs):
        raise AssertionError("--compile-only must not time anything")

    monkeypatch.setattr(benchmark, "time_cpu", no_timing)
    monkeypatch.setattr(benchmark, "time_cuda", no_timing)
    calls = []
    real = fused_lora.lora_linear

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_lora, "lora_linear", counted)
    assert cli.main(["bench", "--preset", "smoke", "--compile-only", "--m", "16", "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o").exists()
    preset = benchmark.filter_cases(benchmark.presets()["smoke"], [16])
    runs = [(case, p, mo) for case, rs in benchmark.work_list(preset) for p, mo in rs]
    fused_runs = [r for r in runs if r[1] == "fused" or r[1] in benchmark.VARIANT_PROVIDERS]
    assert len(calls) >= len(fused_runs) > 0 and {shape[0] for shape in calls} == {16}
    out = capsys.readouterr().out
    assert f"of {len(runs)} benchmark steps once, untimed" in out and "0 failed" in out
    # --shard i/n: parallel processes each run every n-th case; together, all of them
    parts = []
    for i in range(2):
        assert cli.main(["bench", "--preset", "smoke", "--compile-only", "--m", "16", "--shard", f"{i}/2"]) == 0
        parts.append(int(capsys.readouterr().out.split(" of ")[1].split()[0]))
    assert sum(parts) == len(runs) and min(parts) > 0
    assert cli.main(["bench", "--preset", "smoke", "--compile-only", "--shard", "2/2"]) == 2
    assert cli.main(["bench", "--preset", "smoke", "--shard", "0/2"]) == 2  # timings: one process at a time


def test_bench_measures_the_targets_before_the_tuning_variants():
    """A time budget spent early cuts the forced-strategy/TMA variants, not
    the provider comparisons the targets are read from."""
    preset = benchmark.presets()["gpu-check"]
    work = benchmark.work_list(preset)
    kinds = [all(p in benchmark.VARIANT_PROVIDERS for p, _ in runs) for _, runs in work]
    assert kinds == [False] * len(preset.cases) + [True] * len(preset.variant_cases)
    assert [case for case, _ in work] == list(preset.cases) + list(preset.variant_cases)
    assert set(preset.variant_cases) <= set(preset.cases)
    only = benchmark.filter_cases(preset, [16])
    assert {c.m for c in only.cases} == {c.m for c in only.variant_cases} == {16}


def test_kernel_breakdown_is_profiled_and_rendered(tmp_path):
    """The gpu-check preset profiles its headline steps kernel by kernel; the
    table lists each kernel in launch order with its share of the step's
    kernel time, and the raw [name, µs] pairs go to results.json."""
    preset = benchmark.presets()["gpu-check"]
    assert preset.profile_cases and set(preset.profile_cases) <= set(preset.cases)
    if torch.cuda.is_available():
        w, b, a, bb = make_params(64, 48, 8, torch.float16, True)
        x = torch.randn(40, 64, device=DEVICE, dtype=torch.float16)
        kernels = benchmark.kernel_timeline(
            lambda: fused_lora.lora_linear(x, w, a, bb, b, dropout_p=0.1, seed=1, backend="triton"))
        assert kernels and any(name.startswith("lora_") for name, _ in kernels)
    else:
        assert benchmark.kernel_timeline(lambda: None) is None
    case = benchmark.Case(8192, 4096, 4096, 16, "bfloat16", 0.1)
    meas = benchmark.Measurement(case, "fused", "forward+backward", median_ms=1.25,
                                 kernels=[["lora_skinny_kernel", 40.0], ["lora_gemm_kernel", 360.0],
                                          ["lora_skinny_kernel", 100.0]])
    env = dict(benchmark.environment(), gpu="NVIDIA H200")
    files = benchmark.write_outputs([meas], env, preset, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "### Where the time goes" in md and "kernel total 0.500 ms, step median 1.250 ms" in md
    assert "| 1 | `lora_skinny_kernel` | 40.0 | 8% |" in md and "| 2 | `lora_gemm_kernel` | 360.0 | 72% |" in md
    assert "strategy `split`" in md
    data = json.loads(Path(files["json"]).read_text())
    assert data["measurements"][0]["kernels"][1] == ["lora_gemm_kernel", 360.0]
    assert benchmark.kernel_table([dataclasses.replace(meas, kernels=None)], "sm_90") == []


def test_small_m_eager_times_get_a_table_of_their_own(tmp_path):
    """At small M the GPU timer uses CUDA graphs, which hide the host's time;
    the eager times (steps back to back) are set beside them in a table of
    their own, and go to results.json."""
    small = benchmark.Case(16, 4096, 4096, 16, "bfloat16", 0.0)
    large = benchmark.Case(8192, 4096, 4096, 16, "bfloat16", 0.0)
    results = [benchmark.Measurement(small, "fused", "forward+backward", median_ms=0.02, eager_ms=0.15),
               benchmark.Measurement(small, "naive", "forward+backward", median_ms=0.04, eager_ms=0.10),
               benchmark.Measurement(large, "fused", "forward+backward", median_ms=1.0)]
    env = dict(benchmark.environment(), gpu="NVIDIA H200")
    files = benchmark.write_outputs(results, env, benchmark.presets()["gpu-check"], tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "### Small M without CUDA graphs (eager: host time included)" in md
    assert ("| M=16 4096->4096 r=16 bfloat16 p=0 | forward+backward | 0.150 (0.020) | 0.100 (0.040) | — | — "
            "| 0.67 |") in md
    assert "M=8192 4096->4096 r=16 bfloat16 p=0 | forward+backward | 1.000 (" not in md
    data = json.loads(Path(files["json"]).read_text())
    assert [m["eager_ms"] for m in data["measurements"]] == [0.15, 0.10, None]
    assert benchmark.eager_table(results[2:]) == []
    # the eager times without the launch cache, where timed, in a column of their own beside fused's
    uncached = benchmark.Measurement(small, "fused:no_launch_cache", "forward+backward", median_ms=0.021,
                                     eager_ms=0.09)
    table = "\n".join(benchmark.eager_table(results + [uncached]))
    assert "| case | mode | fused | fused:no_launch_cache | naive | unsloth_style | base | ×naive |" in table
    assert ("| M=16 4096->4096 r=16 bfloat16 p=0 | forward+backward | 0.150 (0.020) | 0.090 (0.021) | 0.100 (0.040) "
            "| — | — | 0.67 |") in table
    if torch.cuda.is_available():
        t = torch.randn(1024, device="cuda")
        assert 0 < benchmark.time_eager(lambda: t.sum()) < 100


def test_the_host_overhead_script_times_every_row_and_restores_the_kernels():
    """bench/host_overhead.py stubs the kernels out while it times the host's
    share of a call, and puts them back."""
    from fused_lora.kernels import gemm, mask, skinny
    from fused_lora.kernels.launch import current_device
    from fused_lora.dispatch import eager_records
    from fused_lora.ops import eager_rule_applies

    script = _bench_script("host_overhead")
    kernels = gemm.lora_gemm_kernel, skinny.lora_skinny_kernel, skinny.reduce_partials_kernel, mask.keep_mask_kernel
    threads = torch.get_num_threads()
    res = script.measure(reps=3, profile=40, layers=True, blocks=1)
    profile, launches = res.pop("profile"), res.pop("launches")
    layers = ("fused layer (from_peft)", "PEFT layer") if importlib.util.find_spec("peft") else ()
    if layers and importlib.util.find_spec("transformers"):  # (a Llama of one block, under PEFT and converted)
        layers += ("fused model (from_peft, 1 blocks)", "PEFT model (1 blocks)")
    assert sorted(res) == sorted([(f"{who} {mode}", p) for who in ("fused", "fused eager cuBLAS", "naive", *layers)
                                  for mode in ("forward", "forward+backward") for p in (0.0, 0.1)]
                                 + [(f"fused Function cuBLAS {mode}", 0.1) for mode in ("forward", "forward+backward")])
    assert all(0 < us < 1e6 for us in res.values())
    # the fused op's launches a call: the forward's, and more for the backward (the counts of the plan here)
    assert sorted(launches) == sorted(k for k in res if k[0].startswith("fused"))
    if layers:  # (the converted layer runs the eager rule's path: cuBLAS, the keep-mask pass with dropout)
        assert [launches[(f"fused layer (from_peft) {mode}", p)] for p in (0.0, 0.1)
                for mode in ("forward", "forward+backward")] == [0, 0, 1, 1]
    if len(layers) > 2:  # (the model's seven layers, each as the layer above)
        assert [launches[(f"fused model (from_peft, 1 blocks) {mode}", p)] for p in (0.0, 0.1)
                for mode in ("forward", "forward+backward")] == [0, 0, 7, 7]
    for p in (0.0, 0.1):
        assert 1 <= launches[("fused forward", p)] < launches[("fused forward+backward", p)] <= 12, launches
    assert launches[("fused eager cuBLAS forward", 0.0)] == launches[("fused eager cuBLAS forward+backward", 0.0)] == 0
    # (with dropout the keep-mask pass, once: autograd keeps the mask for the backward)
    assert launches[("fused eager cuBLAS forward", 0.1)] == launches[("fused eager cuBLAS forward+backward", 0.1)] == 1
    # (the cublas Function, as above EAGER_KEPT_MASK_MAX_M tokens: the keep-mask pass in each pass)
    assert launches[("fused Function cuBLAS forward", 0.1)] == 1
    assert launches[("fused Function cuBLAS forward+backward", 0.1)] == 2
    assert script.gemm.launch is script.skinny.launch is script.mask.launch  # (restored)
    assert "lora_gemm" in profile and "backward_triton" in profile  # (fused_lora's own functions, by own time)
    assert "backward_triton" in script.measure(reps=1, profile=40, profile_dropout=0.1)["profile"]
    with pytest.raises(ValueError, match="profile_dropout must be 0 or 0.1"):
        script.measure(reps=1, profile=1, profile_dropout=0.2)
    assert (gemm.lora_gemm_kernel, skinny.lora_skinny_kernel, skinny.reduce_partials_kernel,
            mask.keep_mask_kernel) == kernels
    assert script.launch_cache.current_device is current_device  # (its stand-in on a machine without CUDA: restored)
    assert script.fused_lora.ops.eager_rule_applies is eager_rule_applies  # (likewise the eager rule's)
    assert script.fused_lora.dispatch.eager_records is eager_records
    assert not script.fused_lora.dispatch.eager_cublas_setting()  # (the suite's setting: conftest.py)
    assert torch.get_num_threads() == threads


def test_live_bytes_counts_the_engines_sum_of_two_gradients_in_its_first_buffer():
    """y = x·Wᵀ + x·Vᵀ, x used twice, every operand of x's size: without a
    dispatch mode autograd's engine adds x's second gradient into the
    first's buffer (this machine's RSS agreed: naive LoRA at dropout 0 peaked
    at 6.06 bytes an element of x, as LiveBytes counts it, not 8.12), so at
    most three buffers are live at once: the two products and y in the
    forward (an add the engine does not make: its own buffer), y and x's two
    gradients in the backward."""
    from fused_lora.testing import LiveBytes

    m, k = 24, 16
    x = torch.randn(m, k, requires_grad=True)
    w, v, dy = torch.randn(k, k), torch.randn(k, k), torch.randn(m, k)
    unit = 4 * m * k
    tracked = LiveBytes(x, w, v, dy)
    with tracked:
        y = x @ w.t() + x @ v.t()
        assert tracked.peak == 3 * unit  # (the products and y)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert tracked.peak == 3 * unit
    torch.testing.assert_close(dx, dy @ (w + v))


def test_the_live_bytes_script_sees_what_each_path_keeps(capsys):
    """bench/live_bytes.py: what each path keeps for its backward (x's size
    in fp32: 4 bytes an element, the mask 1): naive its dropped x and mask
    with dropout; the fused kernels and the cublas Function only
    the (M, r) xa; the recorded cuBLAS products the mask and x ⊙ keep with
    dropout, nothing of x's size without. The switches it stands in for
    come back."""
    from fused_lora import dispatch, ops

    script = _bench_script("live_bytes")
    saved = ops.direct_call, ops.eager_rule_applies, dispatch.eager_records
    m, k, r = 40, 24, 4
    res = script.measure(m=m, k=k, n=16, r=r, dtype=torch.float32)
    unit = m * k
    small = 4 * m * r + 64  # (xa, fp32, and the seed's few bytes)
    assert sorted(res) == sorted([(name, p) for name, _ in script.PATHS for p in (0.0, 0.1)
                                  if not (name == "fused Function cuBLAS" and p == 0.0)])
    assert res[("naive", 0.1)][0] >= 4 * unit + unit  # (F.dropout's output and mask)
    for name in ("fused Triton plan", "fused Function cuBLAS"):
        assert res[(name, 0.1)][0] <= small, name
    assert 5 * unit <= res[("fused eager cuBLAS, recorded", 0.1)][0] <= 5 * unit + small
    for name in ("naive", "fused Triton plan", "fused eager cuBLAS, recorded"):
        assert res[(name, 0.0)][0] <= small, name
    for (name, p), (kept, peak) in res.items():
        assert kept < peak, (name, p)  # (the peak holds y and the gradients besides)
    assert (ops.direct_call, ops.eager_rule_applies, dispatch.eager_records) == saved
    assert not dispatch.eager_cublas_setting()  # (the suite's setting: conftest.py)
    assert script.main(["--m", "8", "--k", "16", "--n", "8", "--r", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "kept p=0.1" in out and "fused Function cuBLAS" in out


def _bench_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run (on a GPU gpu_check.sh runs it in full)")
def test_the_gpu_probe_checks_every_launch_and_flags_a_wrong_one(tmp_path, monkeypatch, capsys):
    """bench/gpu_probe.py (gpu_check.sh's attribution of the GEMM's time):
    every row is one launch checked against float64, the TMA rows really
    through descriptors, the warp-specialised rows (last) launched so, and a
    wrong product is flagged WRONG with a failing exit; --compile-only times
    nothing."""
    from fused_lora.kernels import configs, gemm

    probe = _bench_script("gpu_probe")
    made, made_by_kernel = [], []
    real_descriptors, real_device = gemm.tma_descriptors, gemm._device_descriptors
    monkeypatch.setattr(gemm, "tma_descriptors", lambda *a: made.append(a[2]) or real_descriptors(*a))
    monkeypatch.setattr(gemm, "_device_descriptors", lambda *a: made_by_kernel.append(real_device(*a))
                        or made_by_kernel[-1])
    warp_specialized, real_launch = [], gemm.launch
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid, args, kwargs: warp_specialized.append(
        kwargs["WARP_SPECIALIZE"]) or real_launch(kernel, grid, args, kwargs))
    assert probe.main(["--json", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    rows = result["shapes"][0]["rows"]
    names = [row["name"] for row in rows]
    assert names[:2] == ["cublas_fwd", "cublas_dx"] and len(set(names)) == len(names) == 28
    # the default plan's in-loop forward, on its own tile; the first rows timed again at the end (the drift)
    assert result["shapes"][0]["configs"]["in_loop"] == str(
        fused_lora.dispatch.plan(37, 48, 64, 4, torch.float16, 0.0, interpreter=True, strategy="in_loop").fwd_gemm)
    assert "fwd_in_loop+tma" in names and names[-10:-8] == ["cublas_fwd (again)", "fwd_base+tma (again)"]
    # last, the base GEMMs and the fused passes with their precomputed term on the warp-specialised tile, each
    # without and with the flag
    ws = configs.WARP_SPECIALIZED_GEMM
    tile = f"@{ws.block_m}x{ws.block_n}x{ws.block_k}w{ws.num_warps}s{ws.num_stages}"
    assert names[-8:] == [f"{name}{variant}{tile}" for name in ("fwd_base", "fwd_lowrank", "dx_base", "dx_lowrank")
                          for variant in ("+tma_device", "+ws")]
    assert warp_specialized.count(True) == 2 * 4 and warp_specialized[-2:] == [True, True]
    assert all(row["ok"] and row["error"] < 4e-3 and row["ms"] > 0 for row in rows), rows
    # hybrid's low-rank-only launches on its own tile, and on the GEMM's beside it
    assert result["shapes"][0]["configs"]["hybrid"] == str(configs.LOW_RANK_ONLY_GEMM[2])  # (fp16 here)
    assert {"fwd_epilogue", "dx_epilogue", "fwd_epilogue@gemm_tile"} <= set(names)
    # (each row launched twice, checked then timed; the K=0 rows make no descriptor)
    assert len(made) == 2 * sum("+tma" in name and "+tma_device" not in name for name in names) == 12
    assert len(made_by_kernel) == 2 * sum(name.endswith("+tma_device") or tile in name for name in names) == 20
    assert all(d is not None for d in made_by_kernel)  # (TMA through the kernel's descriptors, not pointers)
    out = capsys.readouterr().out
    assert "| dx_base_b_colmajor |" in out and "| fwd_base_b_rowmajor |" in out
    # the partial result is handed on after every row (gpu_check.sh's time box stops the probe mid-shape)
    written = []
    probe.run(torch.float16, compile_only=True,
              on_row_done=lambda result: written.append(sum(len(shape["rows"]) for shape in result["shapes"])))
    assert written == list(range(1, len(names) + 1))
    # a launch that computes the wrong product fails the probe
    real_rows = probe.rows_for

    def one_wrong(*args):
        rows, configs = real_rows(*args)
        name, launch, want, *rest = rows[4]
        return rows[:4] + [(name, lambda: launch()[:, torch.arange(launch().shape[1]).roll(1)], want, *rest)] \
            + rows[5:], configs

    monkeypatch.setattr(probe, "rows_for", one_wrong)
    assert probe.main(["--compile-only"]) == 1
    out = capsys.readouterr().out
    assert "| dx_base |  |  |  | " in out and "WRONG" in out and "(compile only: no times)" in out


def test_profile_steps_profiles_only_the_timed_fused_steps_of_profile_cases(monkeypatch):
    """After all timing, one fused forward+backward step of each profile case
    is run under the profiler and its kernels attached to that measurement."""
    calls = []

    def fake_timeline(step):
        calls.append([t.shape for t in step()])  # the real step runs (gradients of x, A, B)
        return [["lora_gemm_kernel", 1.5]]

    monkeypatch.setattr(benchmark, "kernel_timeline", fake_timeline)
    small = benchmark.Case(16, 64, 48, 8, "float32", 0.1)
    other = benchmark.Case(48, 64, 48, 8, "float32", 0.0)
    preset = benchmark.Preset("p", [small, other], profile_cases=(small,))
    results = [benchmark.Measurement(small, "fused", "forward+backward", median_ms=1.0),
               benchmark.Measurement(small, "naive", "forward+backward", median_ms=1.0),
               benchmark.Measurement(small, "fused", "forward", median_ms=1.0),
               benchmark.Measurement(other, "fused", "forward+backward", median_ms=1.0),
               benchmark.Measurement(small, "fused", "forward+backward", note="failed: x")]
    benchmark.profile_steps(preset, results, DEVICE)
    assert results[0].kernels == [["lora_gemm_kernel", 1.5]]
    assert all(m.kernels is None for m in results[1:])
    assert calls == [[(16, 64), (8, 64), (48, 8)]]

    def broken(step):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(benchmark, "kernel_timeline", broken)
    again = [benchmark.Measurement(small, "fused", "forward+backward", median_ms=1.0)]
    benchmark.profile_steps(preset, again, DEVICE)
    assert again[0].median_ms == 1.0 and again[0].note == "profile failed: RuntimeError: no CUPTI"
