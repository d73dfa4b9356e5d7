"""Every shipped kernel configuration compiles for Hopper (sm_90) without a
GPU, fits its shared memory, does not spill, the 16-bit GEMMs use wgmma, and
the memory-bound skinny passes load 16-byte vectors."""

import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
import triton

from fused_lora import compile_report
from fused_lora.kernels import configs
from lora_testing import BackgroundCompileReports, compiled_as_planned, warp_specialized_report


@pytest.fixture(scope="module")
def sm90(sm90_report):
    """Every result of ``python -m fused_lora.compile_report --arch 90 --json
    --scope paths`` with this Triton (run in the background from the
    session's start: conftest): each kernel it plans, and the fp16 twins of
    the bf16 ones near the register limit, each once."""
    assert sm90_report.stdout.strip(), sm90_report.stderr[-2000:]  # (a crash prints no report)
    report = json.loads(sm90_report.stdout)
    assert report["triton"] == triton.__version__
    assert report["scope"] == BackgroundCompileReports.SCOPES["newest"] == "paths"
    results = compiled_as_planned(report)
    new, known = compile_report.split_known(compile_report.problems(results), triton.__version__)
    assert (report["problems"], report["known_problems"]) == (new, known)
    assert sm90_report.returncode == (1 if report["problems"] else 0), sm90_report.stderr[-2000:]
    return results


def test_every_config_compiles_for_sm90_cleanly(sm90):
    """No problem but those KNOWN_PROBLEMS lists for this Triton (each checked
    on its own kernel: the next test)."""
    new, known = compile_report.split_known(compile_report.problems(sm90), triton.__version__)
    assert new == []


def test_each_known_problem_is_still_found_and_is_ptxas_trading_a_spill_for_occupancy():
    """``compile_report --check-known`` with this Triton: each entry's kernels
    compiled as the report compiles them show its problem and no other (one
    that went away must leave the list), and compiled with a ceiling of 255
    registers a thread spill nothing."""
    proc = subprocess.run([sys.executable, "-m", "fused_lora.compile_report", "--check-known", "--json", "--jobs", "2"],
                          env=BackgroundCompileReports.environment("newest"), capture_output=True, text=True,
                          timeout=900)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["triton"] == triton.__version__
    assert report["failures"] == [] and proc.returncode == 0, report["failures"]
    entries = [k for k in compile_report.KNOWN_PROBLEMS if triton.__version__.startswith(k.triton + ".")]
    assert len(report["results"]) == 2 * sum(len(k.dtypes) for k in entries)


def test_check_known_fails_an_entry_not_found_naming_no_kernel_or_spilling_under_the_ceiling(monkeypatch):
    """An entry whose kernel compiles cleanly, that names no kernel of the
    report, or whose kernel spills under the ceiling too, is a failure."""
    skinny = dataclasses.asdict(configs.SKINNY_16BIT)
    version = ".".join(triton.__version__.split(".")[:2])
    clean = compile_report.KnownProblem(version, "skinny", "dy_pass-g-dB", ("bf16",), 90, skinny, 16,
                                        "spills 16 bytes", "made up: this kernel spills nothing")
    missing = dataclasses.replace(clean, pass_name="no_such_pass")
    monkeypatch.setattr(compile_report, "KNOWN_PROBLEMS", (clean, missing))
    failures, results = compile_report.check_known(triton.__version__)
    assert len(results) == 2 and results[0].error == "" and results[0].spill_bytes == 0
    assert failures == [f"{missing.lines()}: 0 job(s) in the report, expected one a dtype",
                        f"{clean.lines()}: compiled, found no problem"]
    # a ceiling the kernel does not fit under: it spills there too
    failures, results = compile_report.check_known(triton.__version__, ceiling=32)
    capped = results[1]
    assert capped.pass_name == "dy_pass-g-dB+maxnreg_32" and capped.registers <= 32 and capped.spill_bytes > 0
    assert failures[1:] == [f"{clean.lines()}: compiled, found no problem",
                            f"{clean.lines()}: with maxnreg=32 still spills {capped.spill_bytes} bytes at "
                            f"{capped.registers} registers"]


def test_the_compiled_kernels_are_what_was_asked_for(sm90):
    """wgmma in every 16-bit GEMM, TMA copies exactly where asked for, shared
    memory within Hopper's; fp16's GEMM compiled wherever its bf16 twin comes
    near the register limit (with pointers, TMA, the persistent grid)."""
    gemms = {(r.pass_name, r.dtype, r.block_r, tuple(sorted(r.config.items()))): r for r in sm90
             if r.kernel == "gemm"}
    limit = configs.MAX_REGISTERS_PER_THREAD - compile_report.FP16_TWIN_REGISTER_MARGIN
    near = [(p, b, c) for (p, d, b, c), r in gemms.items() if d == "bf16" and r.registers >= limit]
    assert near  # (the check is not empty: on Triton 3.9 with pointers and on the persistent grid)
    assert [k for k in near if (k[0], "fp16", *k[1:]) not in gemms] == []
    for r in sm90:
        assert r.shared is not None and r.shared <= configs.SMEM_LIMIT_SM90
        if r.kernel == "gemm" and r.dtype != "fp32":
            assert r.wgmma and not r.mma_sync
        assert r.tma == ("+tma" in r.pass_name), r.pass_name  # TMA copies exactly where asked for


def test_the_report_covers_every_shipped_config():
    """``compile_report`` (``--scope tiles``, the default) compiles every
    shipped tile for each pass, rank tile and variant it serves."""
    planned = [compile_report.result_of(job) for job in compile_report.jobs_for(90)]
    shipped = configs.shipped_configs()
    gemm_seen = {(r.dtype, tuple(sorted(r.config.items()))) for r in planned if r.kernel == "gemm"}
    # (fp16's GEMMs: the largest tile of each pass, the rest where bf16's need them, below)
    for dtype, pool in (("bf16", shipped["gemm_16bit"]), ("fp32", shipped["gemm_fp32"])):
        for cfg in pool:
            assert (dtype, tuple(sorted(vars(cfg).items()))) in gemm_seen, (dtype, cfg)
    passes = {(r.kernel, r.pass_name) for r in planned}
    gemm_passes = ("forward_in_loop", "forward_in_loop_dropout", "forward_split", "dx_in_loop", "dx_in_loop_dropout",
                   "dx", "dx_dropout", "dw")
    assert {("gemm", p) for p in gemm_passes} <= passes
    # the skinny passes: each set of outputs, at every rank tile
    skinny_seen = {(r.pass_name, r.dtype, r.block_r) for r in planned if r.kernel == "skinny"}
    for dtype, cfg in (("bf16", configs.SKINNY_16BIT), ("fp16", configs.SKINNY_16BIT), ("fp32", configs.SKINNY_FP32)):
        for p in compile_report.SKINNY_PASSES:
            for block_r in configs.rank_tiles(cfg.max_block_r):
                assert (p, dtype, block_r) in skinny_seen, (p, dtype, block_r)
    # masked tails: K (GEMM), columns (skinny), a rank below its tile (both)
    assert {("gemm", p + tail) for p in gemm_passes for tail in ("+k_tail", "+r_tail")} <= passes
    assert {("skinny", p + tail) for p in ("forward_shrink", "dy_pass", "dA_pass")
            for tail in ("+c_tail", "+r_tail")} <= passes
    # the dropout passes read a seed drawn on the device (seed=None); an explicit seed is a value;
    # a mask over 2**31 elements or more counts in 64 bits
    for variant in ("+seed_value", "+offset_int64"):
        assert ({("gemm", p + variant) for p in ("forward_in_loop_dropout", "dx_dropout", "dx_in_loop_dropout")}
                | {("skinny", p + variant) for p in ("forward_shrink", "dA_pass")}) <= passes
    # split-K partials and TMA loads (every 16-bit tile, each pass that uses it)
    assert {("gemm", p + "+split_k") for p in gemm_passes} <= passes
    # DoRA's norm: every rank tile of its one-tile form, a K tail, a rank of several chunks, each dtype
    norm_seen = {(r.pass_name, r.dtype, r.block_r) for r in planned if r.kernel == "norm"}
    for dtype, cfg in (("bf16", configs.DORA_NORM_16BIT), ("fp16", configs.DORA_NORM_16BIT),
                       ("fp32", configs.DORA_NORM_FP32)):
        assert {("norm", dtype, block_r) for block_r in configs.rank_tiles(cfg.max_block_r)} | {
            ("norm+k_tail", dtype, 16), ("norm_chunked", dtype, cfg.max_block_r),
            ("norm_adapters", dtype, cfg.max_block_r), ("norm_adapters+k_tail", dtype, cfg.max_block_r)} \
            <= norm_seen, dtype
        # (an int8 W, QDoRA: one rank tile, a K tail, the chunked rank, several adapters)
        assert {(p + "+int8_base", dtype, cfg.max_block_r)
                for p in ("norm", "norm+k_tail", "norm_chunked", "norm_adapters")} <= norm_seen, dtype
    # the keep-mask pass (strategy cublas with dropout), once whatever the dtype: its tile, a K tail, an
    # explicit seed, 64-bit counters
    masks = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in planned if r.kernel == "mask"}
    assert masks == {(p, "u8", tuple(sorted(vars(cfg).items()))) for cfg in shipped["mask"]
                     for p in ("keep_mask", "keep_mask+k_tail", "keep_mask+seed_value", "keep_mask+offset_int64")}
    # the dequantisation kernel into each dtype: an int8 base, NF4 in groups of 64 and 256, each with a K tail
    dequants = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in planned if r.kernel == "dequant"}
    assert dequants == {(p + tail + base, dtype, tuple(sorted(vars(cfg).items()))) for cfg in shipped["dequant"]
                        for dtype in ("bf16", "fp16", "fp32") for tail in ("", "+k_tail")
                        for p, base in (("dequantize", "+int8_base"), ("dequantize", "+nf4_base"),
                                        ("dequantize_wide_groups", "+nf4_base"))}
    # an int8 base: every GEMM pass that reads W (not dW), with a K tail, split-K's partials, TMA, and the
    # persistent grid where the pass runs on it
    int8 = {("gemm", p + v + "+int8_base") for p in gemm_passes[:-1] for v in ("", "+k_tail", "+split_k", "+tma")}
    assert int8 <= passes and ("gemm", "dw+int8_base") not in passes
    assert {("gemm", p + "+tma+persistent+int8_base") for p in ("forward_in_loop", "forward_split", "dx")} <= passes
    # (a rank below its tile, QLoRA's r = 8, where the rank mask is a variant: the precomputed term's passes)
    assert {("gemm", p + "+r_tail+int8_base") for p in ("forward_split", "dx", "dx_dropout")} <= passes
    # an NF4 base: the passes that decode it (the split forward, dx with and without its mask; never in loop,
    # TMA or persistent: the dispatch keeps it off them), a K tail and split-K; its norm (own tile)
    nf4 = {p for kernel, p in passes if p.endswith("+nf4_base") and kernel != "dequant"}
    assert {f"{p}{v}+nf4_base" for p in ("forward_split", "dx", "dx_dropout")
            for v in ("", "+k_tail", "+r_tail", "+split_k")} \
        | {f"{p}+nf4_base" for p in ("norm", "norm+k_tail", "norm_chunked", "norm_adapters")} == nf4
    # every pass with a low-rank term at every rank tile it runs with (the kernel's BLOCK_R), on every
    # tile that fits it (autotuning may pick any: the heuristics' picks are checked below)
    by_rank = {(r.pass_name, r.dtype, r.block_r, tuple(sorted(r.config.items()))) for r in planned}
    for dtype, elt in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        in_loop = configs.rank_tiles(configs.in_loop_max_block_r(elt))
        precomputed = configs.rank_tiles(configs.GEMM_LR_MAX_BLOCK_R[elt])
        assert in_loop[0] == precomputed[0] == configs.block_r_for(1)
        assert in_loop[-1] == configs.in_loop_max_block_r(elt) and len(precomputed) >= 2
        assert in_loop[-1] == (128 if elt == 2 else 16)
        for p, shrink_in_loop, mask in (("forward_in_loop", True, False), ("forward_in_loop_dropout", True, True),
                                        ("dx_in_loop", True, False), ("dx_in_loop_dropout", True, True),
                                        ("forward_split", False, False), ("dx", False, False),
                                        ("dx_dropout", False, True)):
            pruning = dict(epilogue_mask=mask and p.startswith("dx"), shrink_mask=mask and p.startswith("forward"))
            tiles = in_loop if shrink_in_loop else precomputed
            for block_r in tiles:
                fitting = configs.gemm_candidates(elt, block_r, shrink_in_loop, **pruning)
                assert fitting
                for cfg in fitting:
                    # (fp16's: the largest tile, the rest where bf16's need them, below)
                    twin = "bf16" if dtype == "fp16" and cfg is not fitting[0] else dtype
                    assert (p, twin, block_r, tuple(sorted(vars(cfg).items()))) in by_rank, (p, dtype, block_r, cfg)
                    if elt == 2:
                        assert (p + "+tma", twin, block_r, tuple(sorted(vars(cfg).items()))) in by_rank
                    else:
                        assert (p + "+tf32", dtype, block_r, tuple(sorted(vars(cfg).items()))) in by_rank
    tma = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in planned if r.pass_name.endswith("+tma")}
    for cfg in shipped["gemm_16bit"]:
        assert ("dw+tma", "bf16", tuple(sorted(vars(cfg).items()))) in tma
    assert ("dw+tma", "fp16", tuple(sorted(vars(configs.gemm_candidates(2, 16, False)[0]).items()))) in tma
    for dtype in ("bf16", "fp16"):
        assert {p for p, d, _ in tma if d == dtype} >= {f"{p}{split}+tma" for p in gemm_passes
                                                        for split in ("", "+split_k")}
    # the persistent grid: every 16-bit tile it may run, each GEMM pass, with pointers and with TMA loads
    persistent = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in planned
                  if r.pass_name.endswith("+persistent")}
    for dtype in ("bf16", "fp16"):
        tiles = configs.gemm_candidates(2, 16, False, persistent=True)
        for cfg in tiles if dtype == "bf16" else tiles[:1]:
            for loads in ("", "+tma"):
                assert (f"dw{loads}+persistent", dtype, tuple(sorted(vars(cfg).items()))) in persistent
        # (not dx in loop with its mask: it spills there, so the dispatch never runs it persistent)
        assert configs.gemm_candidates(2, 16, True, True, persistent=True) == []
        assert {p for p, d, _ in persistent if d == dtype} == {
            f"{p}{loads}+persistent" for p in gemm_passes if p != "dx_in_loop_dropout" for loads in ("", "+tma")}
    # (fp16's GEMMs: the largest tile of each; the others are fp16_twins, where bf16's come near the limit)
    gemms = {(r.pass_name, r.dtype, r.block_r, tuple(sorted(r.config.items()))) for r in planned if r.kernel == "gemm"}
    assert len({k for k in gemms if k[1] == "fp16"}) < len({k for k in gemms if k[1] == "bf16"})


def test_the_narrower_scopes_compile_each_kernel_and_each_code_path_once():
    """``--scope kernels``: every kernel specialisation of ``tiles`` (its
    jobs less their tile), each once, on the tile its pass runs with at large
    M (one token: at M = 1); ``--scope paths``: every one of those less its rank tile, each once,
    at the largest rank tile it runs with."""
    def less(job, *fields):
        return compile_report._job_id(dataclasses.replace(job, **{f: {} if f == "config" else 0 for f in fields}))

    for arch in (90, 80):
        tiles, kernels, paths = (compile_report.jobs_for(arch, scope=s) for s in ("tiles", "kernels", "paths"))
        assert compile_report.SCOPES == ("tiles", "kernels", "paths")
        ids = {s: {compile_report._job_id(j) for j in jobs} for s, jobs in zip(compile_report.SCOPES,
                                                                               (tiles, kernels, paths))}
        assert ids["paths"] < ids["kernels"] < ids["tiles"] and len(ids["kernels"]) == len(kernels)
        assert {less(j, "config") for j in tiles} == {less(j, "config") for j in kernels}
        assert len({less(j, "config") for j in kernels}) == len(kernels)
        # (paths on sm_90: fp16's GEMMs and skinny passes only as fp16_twins, where bf16's come near the limit)
        twins = {less(j, "config", "block_r") for j in kernels if j.kernel != "reduce" and j.dtype == "fp16"}
        assert twins and {less(j, "config", "block_r") for j in kernels} - (twins if arch == 90 else set()) == {
            less(j, "config", "block_r") for j in paths}
        assert len({less(j, "config", "block_r") for j in paths}) == len(paths)
        largest = {}  # (the largest rank tile of each kernel)
        for k in kernels:
            largest[less(k, "config", "block_r")] = max(largest.get(less(k, "config", "block_r"), 0), k.block_r)
        assert all(job.block_r == largest[less(job, "config", "block_r")] for job in paths)
        # the largest tile: the first candidate, which the dispatch picks at large M
        smem = configs.smem_limit_for(arch)
        for job in kernels:
            if job.kernel == "gemm" and not job.split_k and job.pass_name != "dw" and job.unit != "tokens":
                # (an int8 base: on its own tiles, configs.int8_b_fits)
                fitting = configs.gemm_candidates(2 if job.dtype != "fp32" else 4, job.block_r,
                                                  "_in_loop" in job.pass_name, arch=arch, smem_limit=smem,
                                                  persistent=job.persistent, int8_b=job.int8_base,
                                                  nf4_b=job.nf4_base, rank_loop=job.rank_loop,
                                                  **compile_report._gemm_pruning(job.pass_name))
                assert job.config == dataclasses.asdict(fitting[0]), job
                cfg = configs.GemmConfig(**job.config)
                r = job.block_r * (2 if job.rank_loop else 1)  # (a rank over the largest tile: a loop over R)
                assert configs.gemm_config(65536, 4096, 4096, r, 2 if job.dtype != "fp32" else 4,
                                           "_in_loop" in job.pass_name, False, arch=arch, smem_limit=smem,
                                           persistent=job.persistent, int8_b=job.int8_base, nf4_b=job.nf4_base,
                                           **compile_report._gemm_pruning(job.pass_name)) == cfg, job
    # (the persistent in-loop forward holds smaller rank tiles than the other: each at its own largest)
    paths = compile_report.jobs_for(90, scope="paths")
    top = {(j.pass_name, j.persistent): j.block_r for j in paths if j.kernel == "gemm" and j.dtype == "bf16"
           and not (j.tma or j.split_k or j.unit) and j.even_k and j.even_r}
    assert top[("forward_in_loop", False)] == configs.in_loop_max_block_r(2) == 128
    assert top[("forward_in_loop", True)] == configs.in_loop_max_block_r(2, persistent=True) < 128
    assert top[("dx", False)] == configs.GEMM_LR_MAX_BLOCK_R[2]
    assert ("dx_in_loop_dropout", True) not in top  # (never run persistent: gemm_candidates)
    with pytest.raises(ValueError, match="scope must be one of tiles, kernels, paths, got 'every'"):
        compile_report.jobs_for(90, scope="every")
    with pytest.raises(ValueError, match="every_fp16_tile .* needs scope='tiles', got 'kernels'"):
        compile_report.jobs_for(90, every_fp16_tile=True, scope="kernels")


def test_fp16_twins_follow_the_bf16_variants_near_the_limit():
    jobs = compile_report.jobs_for(90)
    tma = next(j for j in jobs if j.dtype == "bf16" and j.tma and not j.persistent
               and dataclasses.replace(j, dtype="fp16") not in jobs)
    persistent = next(j for j in jobs if j.dtype == "bf16" and j.persistent
                      and dataclasses.replace(j, dtype="fp16") not in jobs)
    pointers = next(j for j in jobs if j.dtype == "bf16" and j.kernel == "gemm" and not (j.tma or j.persistent)
                    and dataclasses.replace(j, dtype="fp16") not in jobs)
    largest = next(j for j in jobs if j.dtype == "bf16" and j.tma and dataclasses.replace(j, dtype="fp16") in jobs)
    limit = configs.MAX_REGISTERS_PER_THREAD - compile_report.FP16_TWIN_REGISTER_MARGIN

    def result(job, registers=100, spills=0, error=""):
        return compile_report.Result(job.kernel, job.pass_name, job.dtype, 90, job.config, job.block_r,
                                     registers=registers, spill_bytes=spills, error=error)

    five = [tma, persistent, pointers, largest, dataclasses.replace(largest, dtype="fp16")]
    assert compile_report.fp16_twins(five, [result(j) for j in five]) == []
    assert compile_report.fp16_twins(five, [result(j, limit - 1) for j in five]) == []
    twins = compile_report.fp16_twins(five, [result(j, limit) for j in five])
    # (not one already there: the largest tile's, compiled in fp16 in any case)
    assert twins == [dataclasses.replace(j, dtype="fp16") for j in (tma, persistent, pointers)]
    assert compile_report.fp16_twins([tma], [result(tma, spills=8)]) == twins[:1]
    assert compile_report.fp16_twins([tma], [result(tma, None, None, "boom")]) == twins[:1]
    assert compile_report.fp16_twins(twins, [result(j, 255) for j in twins]) == []  # (fp16's own: none)
    everything = compile_report.jobs_for(90, every_fp16_tile=True)
    assert dataclasses.replace(tma, dtype="fp16") in everything and len(everything) > len(jobs)


def test_every_variant_compiles_each_variant_on_every_gemm():
    """``--every-variant`` adds, to every GEMM the report compiles (every
    tile, with pointers, TMA, the persistent grid, TF32), its copy with each
    variant that applies, one at a time (by default they are compiled on one
    tile of each pass), and keeps every default job."""
    variants = ("even_k", "even_r", "bias", "seed_value", "offset_int64", "row_scale", "adapters", "row_p", "split_k")
    for arch in (90, 80):
        default, every = compile_report.jobs_for(arch), compile_report.jobs_for(arch, every_variant=True)
        ids = [compile_report._job_id(j) for j in every]
        compiled = set(ids)
        assert len(compiled) == len(ids) and {compile_report._job_id(j) for j in default} <= compiled
        assert [j for j in every if j.kernel != "gemm"] == [j for j in default if j.kernel != "gemm"]
        flags = {f: getattr(compile_report.Job("gemm", "", "", {}, arch), f) for f in variants}
        plain = [j for j in default if j.kernel == "gemm" and all(getattr(j, f) == v for f, v in flags.items())]
        assert plain
        for job in plain:
            expected = {"even_k": True, "even_r": True, "split_k": not job.persistent,
                        "bias": job.pass_name.startswith("forward"),
                        "seed_value": job.pass_name.endswith("_dropout"),
                        "offset_int64": job.pass_name.endswith("_dropout"),
                        "row_scale": "_in_loop" in job.pass_name, "adapters": "_in_loop" in job.pass_name,
                        # (the ids alone: dx's precomputed term; the in-loop passes with their columns, below)
                        "row_p": job.pass_name == "dx_dropout"}
            for f in variants:
                copy = dataclasses.replace(job, **{f: not flags[f]})
                assert (compile_report._job_id(copy) in compiled) == expected[f], (job, f)
            with_columns = dataclasses.replace(job, adapters=True, row_p=True)
            assert (compile_report._job_id(with_columns) in compiled) == (
                "_in_loop" in job.pass_name and job.pass_name.endswith("_dropout")), job
        for f in variants:  # (by default only some of them)
            with_f = [j for j in default if getattr(j, f) != flags[f]]
            assert 0 < len(with_f) < len([j for j in every if getattr(j, f) != flags[f]]), (arch, f)
        defaults = {compile_report._job_id(j) for j in default}
        assert all(sum(getattr(j, f) != flags[f] for f in variants) - (j.adapters and j.row_p) == 1
                   for j in every if compile_report._job_id(j) not in defaults)


def test_the_warp_specialised_gemms_compile_and_triton_takes_them():
    """``compile_report --warp-specialized`` with this Triton (the kernels
    bench/gpu_probe.py times warp-specialised; no plan runs them): see
    :func:`warp_specialized_report`. The same kernel without the flag is not
    warp-specialised (what the report's field reads is the flag's doing),
    and the report fails a kernel Triton's pass left as it was, or one that
    did not compile."""
    proc = subprocess.run([sys.executable, "-m", "fused_lora.compile_report", "--warp-specialized", "--json",
                           "--jobs", "2"], env=BackgroundCompileReports.environment("newest"), capture_output=True,
                          text=True, timeout=900)
    results = warp_specialized_report(proc)
    assert json.loads(proc.stdout)["triton"] == triton.__version__
    job = compile_report.warp_specialized_jobs()[0]
    with compile_report._compile_pool(1) as pool:
        plain = next(pool.map(compile_report.compile_job, [dataclasses.replace(job, warp_specialize=False)]))
    assert plain.ok and plain.warp_specialized is False and plain.pass_name + "+warp_specialized" == \
        results[0].pass_name
    left = dataclasses.replace(results[0], warp_specialized=False)
    broken = dataclasses.replace(results[1], error="RuntimeError: PassManager::run failed")
    assert compile_report.warp_specialization_problems([results[2], left, broken]) == [
        f"{left.pass_name} {left.dtype}: Triton's pass left the K loop as it was (no setmaxnreg in the PTX)",
        f"{broken.pass_name} {broken.dtype}: RuntimeError: PassManager::run failed"]
    with pytest.raises(ValueError, match="lora_gemm runs no such warp-specialised kernel"):
        compile_report.kernel_args(dataclasses.replace(job, pass_name="forward_in_loop"))


def test_problems_catches_what_it_should():
    wide = dataclasses.asdict(configs.GemmConfig(128, 256, 64, 8, 8, 3))
    bad = compile_report.Result("gemm", "dx", "bf16", 90, wide, 16, shared=300_000, registers=255, spill_bytes=64,
                                wgmma=False)
    found = compile_report.problems([bad])
    assert any("shared memory 300000 > 232448" in p for p in found)
    assert any("spills" in p for p in found)
    assert any("wgmma" in p for p in found)
    no_tma = compile_report.Result("gemm", "dw+tma", "bf16", 90, wide, 16, shared=1000, registers=100,
                                   spill_bytes=0, wgmma=True, tma=False)
    assert any("TMA" in p for p in compile_report.problems([no_tma]))
    assert compile_report.problems([compile_report.Result("gemm", "dx", "bf16", 90, {}, 16, error="boom")])
    # a known problem is set apart on its own Triton only, and only that problem of that kernel
    entry = compile_report.KNOWN_PROBLEMS[0]
    assert entry.config == dataclasses.asdict(configs.SKINNY_16BIT)  # (the shipped tile, as the report names it)
    spilling = compile_report.Result(entry.kernel, entry.pass_name, entry.dtypes[0], entry.arch, entry.config,
                                     entry.block_r, shared=1000, registers=80,
                                     spill_bytes=int(entry.problem.split()[1]), load_widths=[4, 16])
    assert compile_report.problems([spilling]) == [f"{entry.kernel}/{entry.pass_name}/{entry.dtypes[0]}/sm_90/"
                                                   f"{entry.config}/r{entry.block_r}: {entry.problem}"]
    found = compile_report.problems([spilling])
    assert compile_report.split_known(found, entry.triton + ".0") == ([], found)
    assert compile_report.split_known(found, "9.9.0") == (found, [])
    for other in (dict(spill_bytes=32), dict(pass_name="dA_pass"), dict(block_r=32),
                  dict(config={**entry.config, "num_stages": 3})):
        more = compile_report.problems([dataclasses.replace(spilling, **other)])
        assert compile_report.split_known(more, entry.triton + ".0") == (more, []), other
    skinny = dataclasses.asdict(configs.SKINNY_16BIT)
    narrow = compile_report.Result("skinny", "dA_pass", "bf16", 90, skinny, 16, shared=1000, registers=100,
                                   spill_bytes=0, load_widths=[4, 16])  # one operand's loads not vectors
    assert any("16-byte" in p for p in compile_report.problems([narrow]))
    # a skinny pass over the estimate that fits its stages to a GPU's shared memory (SkinnyConfig.stages_for)
    estimate = configs.SKINNY_16BIT.smem_bytes(2, 64)
    fits = dataclasses.replace(narrow, block_r=64, shared=estimate, load_widths=[16])
    assert compile_report.problems([fits]) == []
    assert compile_report.problems([dataclasses.replace(fits, shared=estimate + 1)]) == [
        f"skinny/dA_pass/bf16/sm_90/{skinny}/r64: shared memory {estimate + 1} > the estimate {estimate} that fits "
        "its stages"]
    rank_tail = dataclasses.replace(narrow, pass_name="dA_pass+r_tail")  # a rank tail keeps x in vectors
    assert any("16-byte" in p for p in compile_report.problems([rank_tail]))
    tail = dataclasses.replace(narrow, pass_name="dA_pass+c_tail", load_widths=[2])
    assert compile_report.problems([tail]) == []  # a masked column tail may load narrower
    reduce = compile_report.Result("reduce", "reduce", "fp32", 90, {}, 16, shared=0, registers=40, spill_bytes=0,
                                   load_widths=[4])
    assert any("16-byte" in p for p in compile_report.problems([reduce]))
    # two sums in one launch: the second (masked) is read narrower, the first must still be vectors
    paired = dataclasses.replace(reduce, pass_name="reduce+second", load_widths=[4, 16])
    assert compile_report.problems([paired]) == []
    assert any("16-byte" in p for p in compile_report.problems([dataclasses.replace(paired, load_widths=[4])]))
    fp32 = dataclasses.replace(narrow, dtype="fp32")  # fp32: the wide operand in vectors is enough...
    assert compile_report.problems([fp32]) == []
    assert compile_report.problems([dataclasses.replace(fp32, load_widths=[4])])  # ...but it must be
    # shared memory on any arch: over its limit (the kernel could not launch), or a GEMM's over the
    # estimate that prunes the tiles (the dispatch could pick one that does not fit)
    cfg = configs.GemmConfig(128, 128, 64, 8, 8, 4)
    estimate = cfg.smem_bytes(2, 16, False)
    sm86 = compile_report.Result("gemm", "dx", "bf16", 86, dataclasses.asdict(cfg), 16, shared=estimate,
                                 registers=255, spill_bytes=64, wgmma=False)
    assert estimate > configs.smem_limit_for(86)
    assert compile_report.problems([sm86]) == [f"gemm/dx/bf16/sm_86/{sm86.config}/r16: shared memory {estimate} > "
                                               f"{configs.smem_limit_for(86)}"]  # (spills: listed, off sm_90)
    assert compile_report.problems([dataclasses.replace(sm86, arch=80)]) == []  # (A100: 163 KiB)
    over = compile_report.problems([dataclasses.replace(sm86, arch=80, shared=estimate + 1)])
    assert len(over) == 1 and f"the estimate {estimate}" in over[0]
    in_loop = cfg.smem_bytes(2, 16, True)  # (the in-loop shrink's factor tile counts too)
    assert in_loop > estimate
    assert compile_report.problems([dataclasses.replace(sm86, arch=80, pass_name="dx_in_loop+k_tail",
                                                        shared=in_loop)]) == []
    # dx's masked epilogue converts its fp32 accumulator through a scratch of its size: counted where that is
    # the larger (hybrid's one-stage tile), in dx's masked passes only
    low = configs.LOW_RANK_ONLY_GEMM[2]
    assert low.smem_bytes(2, 16, False) < low.smem_bytes(2, 16, False, epilogue_mask=True) == 64 * 64 * 4
    assert cfg.smem_bytes(2, 16, False, epilogue_mask=True) == estimate  # (the stages are the larger)
    masked = dataclasses.replace(sm86, arch=80, config=dataclasses.asdict(low), shared=64 * 64 * 4)
    for name, flagged in (("dx_dropout+seed_value", False), ("dx_in_loop_dropout", False), ("dx", True),
                          ("forward_split", True), ("forward_in_loop_dropout", True)):
        found = compile_report.problems([dataclasses.replace(masked, pass_name=name)])
        assert bool(found) == flagged and all("the estimate" in p for p in found), name
    # (the persistent grid buffers more than the estimate: it runs only with Hopper's shared memory, whose
    # limit the report checks on the real figure)
    persistent = dataclasses.replace(sm86, arch=90, pass_name="dx+persistent", shared=estimate + 32_768, spill_bytes=0,
                                     wgmma=True)
    assert compile_report.problems([persistent]) == []


def test_the_report_refuses_a_gpu_the_kernels_do_not_run_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        compile_report.main(["--arch", "75"])
    assert exit_.value.code == 2 and "--arch 75: the kernels need sm_80 or newer" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--scope", "every"], "argument --scope: invalid choice: 'every'"),
    (["--scope", "paths", "--every-fp16-tile"], "--every-fp16-tile compiles fp16's GEMMs on every tile: it needs "
                                                "--scope tiles, not --scope paths"),
    (["--warp-specialized"], "--warp-specialized compiles its own kernels for sm_90: no --check-known, --arch"),
])
def test_the_report_refuses_a_scope_it_cannot_compile(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        compile_report.main(["--arch", "90", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_report_refuses_a_triton_that_prints_no_ptxas_log(capsys, monkeypatch):
    """Triton 3.4 runs ptxas without printing its log, where the registers and
    spills come from: the report says so once, instead of failing every kernel."""
    from triton import knobs

    monkeypatch.setattr(knobs, "nvidia", object())
    with pytest.raises(SystemExit) as exit_:
        compile_report.main(["--arch", "90"])
    assert exit_.value.code == 2
    assert f"Triton {triton.__version__} does not print the log of the ptxas it runs" in capsys.readouterr().err


def _jit_function(kernel):
    """``kernel`` as a JITFunction: under the interpreter one is made from the
    interpreted kernel's function and decorator arguments (nothing compiles)."""
    if isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return triton.runtime.JITFunction(kernel.fn, **kernel.kwargs)


@pytest.mark.parametrize("kind", ["gemm", "skinny", "reduce", "norm", "mask", "dequant"])
def test_the_report_specialises_the_arguments_as_the_runtime_does(kind):
    """Each kernel is compiled with the signature the runtime's launch gives
    it: its constexprs, unused (None) arguments and ints equal to 1 (unless
    not specialised) are constants; ``do_not_specialize`` ints plain i32;
    other ints i32 with ``tt.divisibility`` 16 exactly when they are
    multiples of 16; pointers 16-byte aligned. (An upper-case size taken
    for a constexpr once compiled loops of a known trip count, unlike the
    kernels that run.)"""
    from fused_lora.kernels import dequant, dora, gemm, mask, skinny

    kernel = {"gemm": gemm.lora_gemm_kernel, "skinny": skinny.lora_skinny_kernel,
              "reduce": skinny.reduce_partials_kernel, "norm": dora.dora_norm_kernel,
              "mask": mask.keep_mask_kernel, "dequant": dequant.dequantize_kernel}[kind]
    jit = _jit_function(kernel)
    plain = {jit.arg_names[i] if isinstance(i, int) else i for i in jit.do_not_specialize}
    meta = {p.name for p in jit.params if p.is_constexpr}
    jobs = [j for j in compile_report.jobs_for(90, scope="kernels", every_variant=True) if j.kernel == kind]
    assert jobs
    seen_plain = seen_divisible = seen_indivisible = 0
    for job in jobs:
        _, values = compile_report.kernel_args(job)
        src = compile_report._ast_source(jit, values)
        where = compile_report.result_of(job).pass_name
        expected = {name for name, value in values.items()
                    if name in meta or value is None
                    or (type(value) is int and value == 1 and name not in plain)}
        # (ASTSource keys the constants by their arguments' index paths)
        assert set(src.constants) == {(jit.arg_names.index(name),) for name in expected}, where
        for i, name in enumerate(jit.arg_names):
            value, kind_ = values[name], src.signature[name]
            if name in expected:
                assert kind_ == "constexpr" and src.constants[(i,)] == value, (where, name)
            elif type(value) is int:
                assert kind_ == "i32", (where, name)
                divisible = name not in plain and value % 16 == 0
                assert src.attrs.get((i,)) == ([["tt.divisibility", 16]] if divisible else None), (where, name)
                seen_plain += name in plain
                seen_divisible += divisible
                seen_indivisible += name not in plain and not divisible
            elif isinstance(value, str) and value.startswith("*"):
                aligned = [["tt.divisibility", 16]] if name not in plain else None
                assert kind_ == value and src.attrs.get((i,)) == aligned, (where, name)
    # (the reduction's one specialised int, its partials' stride, is a multiple of 16 in every job; the
    # dequantisation kernel specialises every int)
    assert (seen_plain or not plain) and seen_divisible and (seen_indivisible or kind == "reduce")
    assert plain or kind == "dequant"


def test_ptxas_stats_read_the_log_of_one_kernel():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'lora_gemm_kernel' for 'sm_90a'
ptxas info    : Function properties for lora_gemm_kernel
    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 464 bytes cmem[0]
"""
    assert compile_report.ptxas_stats(log) == (255, 40)
    assert compile_report.ptxas_stats(log.replace("24 bytes", "0 bytes").replace("16 bytes", "0 bytes")) == (255, 0)
    with pytest.raises(ValueError, match="found 0"):  # (a cached kernel: Triton ran no ptxas, printed no log)
        compile_report.ptxas_stats("")
    with pytest.raises(ValueError, match="found 2"):
        compile_report.ptxas_stats(log + log)


def test_the_report_reads_the_ptxas_log_of_a_fresh_compile_even_when_cached(tmp_path, monkeypatch):
    """The registers come from the ptxas run Triton makes itself; a kernel
    already in Triton's cache is compiled again, so there is a log to read."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the worker compiles the JIT kernels)
    job = next(j for j in compile_report.jobs_for(90) if j.kernel == "reduce")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        first, again = pool.map(compile_report.compile_job, [job, job])  # (the second finds it cached)
    assert os.listdir(tmp_path)
    assert first.ok and again.ok, (first.error, again.error)
    assert first.registers > 0 and first.spill_bytes == 0
    assert (again.registers, again.spill_bytes, again.shared) == (first.registers, first.spill_bytes, first.shared)


def test_load_widths_read_the_ptx():
    ptx = """
\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];
\t@%p1 ld.global.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];
\tcp.async.ca.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x4, %r4;
\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd5 + 0 ], 0x10, %r6;
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd6 + 0 ];
"""
    assert compile_report.load_widths(ptx) == [2, 4, 8, 16]
    assert compile_report.load_widths("") == []


def test_the_seed_load_is_left_out_of_the_load_widths():
    """A skinny pass reads its dropout seed, drawn on the device, in one
    4-byte load: not a load of the wide operand, whose widths are checked."""
    ptx = """
\tld.param.b64 \t%rd13, [lora_skinny_kernel_param_21];
\tld.param.b64 \t%rd2, [lora_skinny_kernel_param_0];
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
\tld.global.b32 { %r53 }, [ %rd13 + 0 ];
"""
    assert compile_report.load_widths(ptx) == [4, 16]
    assert compile_report.load_widths(compile_report.without_seed_load(ptx, 21)) == [16]
    with pytest.raises(ValueError, match="not loaded once"):
        compile_report.without_seed_load(ptx, 5)
    with pytest.raises(ValueError, match="expected one 4-byte load"):
        compile_report.without_seed_load(ptx, 0)  # (param 0's pointer feeds a vector load, not a seed)


# ----------------------------------------------------------------------------
# The report compiles every kernel the CUDA dispatch launches
# ----------------------------------------------------------------------------

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _dispatched_kernels(monkeypatch, cases) -> dict:
    """``{kernel key or variant: first case}`` (:func:`_launch_key`) of the
    kernels the Triton backend launches for each case ``(m, n, k, r, dtype,
    dropout_p, needs, tma, persistent, strategy, tf32, seed, bias[,
    row_scaled[, adapters]])`` (``seed`` None: drawn on the device; ``bias``:
    the layer has one; ``row_scaled``: with a row scale, ``adapters``: with
    adapters side by side, each False if left out) on the GPU
    ``dispatch.device_target`` reports (an H200 for meta tensors, unless a
    test patches it): the real forward and backward passes run on meta
    tensors (nothing computes, nothing is compiled), the plan made for CUDA
    rather than the interpreter, every kernel replaced by a recorder of its
    launches. ``needs``: the gradients asked for (x, W, b, A, B)."""
    from fused_lora import _triton, dispatch, ops
    from fused_lora.kernels import gemm, mask, skinny

    k_ = _triton.get()
    names = {kind: kernel.arg_names for kind, kernel in (
        ("gemm", gemm.lora_gemm_kernel), ("skinny", skinny.lora_skinny_kernel),
        ("reduce", skinny.reduce_partials_kernel), ("mask", mask.keep_mask_kernel))}
    state = {}
    found = {}

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def __getitem__(self, grid):
            def launch(*args, **meta):
                key, variants = _launch_key(self.kind, state["pass"], grid, dict(zip(names[self.kind], args)), meta)
                for what in (key, *variants):
                    found.setdefault(what, state["case"])
            return launch

    def marked(fn, which):
        def call(*args, **kwargs):
            state["pass"] = which(kwargs)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(_triton, "interpreter", lambda: False)
    for kind, module, attr in (("gemm", gemm, "lora_gemm_kernel"), ("skinny", skinny, "lora_skinny_kernel"),
                               ("reduce", skinny, "reduce_partials_kernel"), ("mask", mask, "keep_mask_kernel")):
        monkeypatch.setattr(module, attr, Recorder(kind))
    monkeypatch.setattr(k_, "lora_gemm", marked(k_.lora_gemm, lambda kw: state["phase"]))
    monkeypatch.setattr(k_, "skinny_pass", marked(k_.skinny_pass, lambda kw: (
        "forward_shrink" if state["phase"] == "forward" else "dy_pass" if kw.get("tn_transposed") else "dA_pass")))

    def addmm_(c, a, b, **kwargs):  # (hybrid's cuBLAS GEMM launches no Triton kernel; on meta tensors
        assert c.shape == (a.shape[0], b.shape[1]) and a.shape[1] == b.shape[0]  # torch's Python decomposition
        return c  # of it took half the test's time)

    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)
    meta = torch.device("meta")
    precision = torch.get_float32_matmul_precision()
    try:
        for case in cases:
            m, n, k, r, dtype, p, needs, tma, persistent, strategy, tf32, seed, bias, *factors = case
            row_scaled, with_adapters = (*factors, False, False)[:2]
            row_scale = torch.empty(m, device=meta) if row_scaled else None
            adapters = (torch.empty(m, device=meta, dtype=torch.int32), torch.empty(r, device=meta, dtype=torch.int32),
                        torch.empty(r, device=meta)) if with_adapters else (None, None, None)
            state["case"] = case
            x = torch.empty(m, k, device=meta, dtype=dtype)
            w = torch.empty(n, k, device=meta, dtype=dtype)
            b = torch.empty(n, device=meta, dtype=dtype) if bias else None
            a, bb = torch.empty(r, k, device=meta, dtype=dtype), torch.empty(n, r, device=meta, dtype=dtype)
            if seed is None:  # (drawn on the device)
                seed = torch.empty((), device=meta, dtype=torch.int32)
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            with dispatch.use_tma(tma), dispatch.use_persistent(persistent):
                state["phase"] = "forward"
                _, xa = ops.forward_triton(x, w, b, a, bb, 2.0, p, seed, strategy, row_scale, *adapters)
                state["phase"] = "backward"
                ops.backward_triton(torch.empty(m, n, device=meta, dtype=dtype), x, w, a, bb, xa, 2.0, p, seed,
                                    *needs, strategy, row_scale, *adapters)
    finally:
        torch.set_float32_matmul_precision(precision)
    return found


def _launch_key(kind: str, pass_family: str, grid, args: dict, meta: dict) -> tuple:
    """``(key, variants)`` of a launch: what makes it its own compiled kernel,
    less the specialisations of its loads and stores that the report compiles
    on one tile of each pass (masked tails, a forward without a bias, an
    explicit seed, a mask's 64-bit counters, a row scale, split-K's fp32
    partials, sums stored directly, a precomputed term over several rank
    tiles), and those of the last seven it has: ``{(kernel, pass, dtype)}`` with the
    report's names."""
    launch = (meta.get("num_warps", 4), meta.get("num_stages", 3))  # (Triton's defaults on CUDA)
    precision = meta.get("INPUT_PRECISION", "ieee")
    if kind == "gemm":
        low_rank, dropout = meta["LOW_RANK"], meta["LR_DROPOUT"] or meta["SHRINK_DROPOUT"]
        if pass_family == "forward":
            assert not meta["LR_DROPOUT"] and (low_rank == 2 or not meta["SHRINK_DROPOUT"])
            name = {2: "forward_in_loop", 1: "forward_split"}[low_rank] + ("_dropout" if dropout else "")
        else:
            assert not meta["SHRINK_DROPOUT"]
            name = {2: "dx_in_loop", 1: "dx", 0: "dw"}[low_rank] + ("_dropout" if dropout else "")
        tiles = (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["GROUP_M"]) + launch
        dtype = _DTYPE_NAMES[args["a_ptr"].dtype]
        variants = set()
        if len(grid) == 2 and grid[1] > 1:
            variants.add((kind, name + "+split_k" + ("+tma" if meta["TMA"] else "") + ("+tf32" if precision == "tf32"
                                                                                     else ""), dtype))
        if dropout and not isinstance(args["seed"], torch.Tensor):
            variants.add((kind, name + "+seed_value", dtype))
        if pass_family == "forward" and not meta["HAS_BIAS"]:
            variants.add((kind, name + "+no_bias", dtype))
        if dropout and meta["OFFSET_INT64"]:  # (the passes without a mask ignore the switch)
            variants.add((kind, name + "+offset_int64", dtype))
        if meta["ROW_SCALE"]:
            variants.add((kind, name + "+row_scale", dtype))
        if meta["ADAPTERS"]:
            variants.add((kind, name + "+adapters", dtype))
        if low_rank == 1 and not meta["ONE_R_TILE"]:
            variants.add((kind, name + "+rank_loop", dtype))
        # (sizes of 1, constants: one token, dW's K being the tokens; a rank of 1)
        if args["K" if low_rank == 0 else "M"] == 1:
            variants.add((kind, name + "+one_token", dtype))
        if low_rank and args["R"] == 1:
            variants.add((kind, name + "+rank_one", dtype))
        return (kind, name, dtype, tiles, meta["BLOCK_R"], meta["TMA"], meta["PERSISTENT"], precision), variants
    if kind == "skinny":
        if pass_family == "dy_pass":
            name = "dy_pass" + "".join(f"-{out}" for out, flag in (("g", "SHRINK"), ("dB", "TN"), ("db", "COLSUM"))
                                       if not meta[flag])
        else:
            name = pass_family + ("" if meta["DROPOUT"] else "+no_dropout")
        dtype = _DTYPE_NAMES[args["t_ptr"].dtype]
        variants = set()
        sums = [args[ptr] for ptr, flag in (("tn_ptr", "TN"), ("cs_ptr", "COLSUM")) if meta[flag]]
        if any(t.dtype != torch.float32 for t in sums):
            variants.add((kind, name + "+direct", dtype))  # (one row split: the sums stored as the outputs)
        if meta["DROPOUT"] and not isinstance(args["seed"], torch.Tensor):
            variants.add((kind, name + "+seed_value", dtype))
        if meta["DROPOUT"] and meta["OFFSET_INT64"]:
            variants.add((kind, name + "+offset_int64", dtype))
        if meta["ROW_SCALE"]:
            variants.add((kind, name + "+row_scale", dtype))
        if meta["ADAPTERS"]:
            variants.add((kind, name + "+adapters", dtype))
        if args["R"] == 1:  # (its token count is never specialised)
            variants.add((kind, name + "+rank_one", dtype))
        tiles = (meta["BLOCK_M"], meta["BLOCK_C"], meta["SHRINK_STAGES"]) + launch  # (as the arch fits them)
        return (kind, name, dtype, tiles, meta["BLOCK_R"], False, False, precision), variants
    if kind == "mask":  # (one kernel whatever x's dtype: a byte an element)
        variants = set()
        if not isinstance(args["seed"], torch.Tensor):
            variants.add((kind, "keep_mask+seed_value", "u8"))
        if meta["OFFSET_INT64"]:
            variants.add((kind, "keep_mask+offset_int64", "u8"))
        if args["K"] % meta["BLOCK_COLS"]:
            variants.add((kind, "keep_mask+k_tail", "u8"))
        tiles = (meta["BLOCK_ROWS"], meta["BLOCK_COLS"]) + launch
        return (kind, "keep_mask", "u8", tiles, 0, False, False, "ieee"), variants
    name = compile_report.reduce_name(meta["HAS_ACC"], meta["EVEN"], meta["SECOND"], meta["HAS_ACC2"],
                                      _DTYPE_NAMES[args["out2_ptr"].dtype] if meta["SECOND"] else "")
    return (kind, name, _DTYPE_NAMES[args["out_ptr"].dtype], launch, 0, False, False, "ieee"), set()


def _job_keys(job: compile_report.Job) -> tuple:
    """``(key, variant)``: the job's key as :func:`_launch_key` makes it
    (a variant's job compiles its pass's kernel on that tile too), and its
    variant's name."""
    c = job.config
    launch = (c["num_warps"], c["num_stages"])
    name = job.pass_name.removesuffix("+direct")
    variant = (job.kernel, job.pass_name + ("+split_k" if job.split_k else "") + ("+tma" if job.tma else "")
               + ("+tf32" if job.tf32 else "") + ("+seed_value" if job.seed_value else "")
               + ("" if job.bias else "+no_bias") + ("+offset_int64" if job.offset_int64 else "")
               + ("+row_scale" if job.row_scale else "") + ("+adapters" if job.adapters else "")
               + ("+rank_loop" if job.rank_loop else ""), job.dtype)
    if job.unit:  # (a size of 1 is a variant of its own: named alone)
        variant = (job.kernel, job.pass_name + compile_report.UNITS[job.unit], job.dtype)
    if job.kernel == "gemm":
        tiles = (c["block_m"], c["block_n"], c["block_k"], c["group_m"]) + launch
    elif job.kernel == "mask":
        variant = (job.kernel, compile_report.result_of(job).pass_name, job.dtype)
        return (job.kernel, name, job.dtype, (c["block_rows"], c["block_cols"]) + launch, 0, False, False, "ieee"), \
            variant
    elif job.kernel == "skinny":
        tiles = (c["block_m"], c["block_c"],
                 configs.SkinnyConfig(**c).stages_for(4 if job.dtype == "fp32" else 2, job.block_r)) + launch
    else:
        return (job.kernel, name, job.dtype, launch, 0, False, False, "ieee"), variant
    return (job.kernel, name, job.dtype, tiles, job.block_r, job.tma, job.persistent,
            "tf32" if job.tf32 else "ieee"), variant


def _assert_compiled(launched: dict, arch: int, scope: str = "tiles") -> None:
    """Every kernel of ``launched`` (:func:`_dispatched_kernels`) is one
    ``compile_report --arch arch --scope scope`` compiles (fp16's GEMMs on
    sm_90: their bf16 twin, and fp16's own where that comes near the register
    limit, as test_the_report_covers_every_shipped_config checks; with
    ``paths``, fp16's variants and skinny passes likewise); with
    ``--scope kernels`` on another tile, with ``paths`` at another rank tile
    too."""
    def less(key: tuple) -> tuple:  # (a variant's key names no tile or rank tile)
        if len(key) == 3 or scope == "tiles":
            return key
        return key[:3] + key[4 if scope == "kernels" else 5:]

    compiled = {less(what) for job in compile_report.jobs_for(arch, scope=scope) for what in _job_keys(job)}

    def twin_compiled(key: tuple) -> bool:  # (an fp16 GEMM's tile; with paths on sm_90 any fp16 GEMM or skinny)
        paths = scope == "paths" and arch == 90
        return (key[2] == "fp16" and (key[0] == "gemm" and len(key) > 3 or paths and key[0] != "reduce")
                and less(key[:2] + ("bf16",) + key[3:]) in compiled)

    missing = {key: case for key, case in launched.items() if less(key) not in compiled and not twin_compiled(key)}
    assert not missing, "\n".join(f"{key} (first launched by {case})" for key, case in list(missing.items())[:20])


def test_the_report_compiles_every_kernel_the_dispatch_launches(monkeypatch):
    """Every kernel the Triton backend launches on an sm_90 GPU, by the
    default heuristics, with TMA or the persistent grid switched on, with a
    forced strategy, with TF32 allowed, for every rank tile, M bucket and set
    of gradients asked for, is one the report compiles (so its checks on
    spills, shared memory, wgmma and load widths hold for what runs); with
    ``--scope kernels`` its specialisation, with ``paths`` its code path.
    Found by running the real passes with the kernels replaced by recorders."""
    every = (True,) * 5
    cases = []
    ranks = (1, 8, 16, 17, 32, 33, 64, 65, 128)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        switches = [(False, False, False)]
        if dtype == torch.float32:
            switches.append((False, False, True))
        else:
            switches += [(True, False, False), (False, True, False), (True, True, False)]
        for m in (1, 16, 64, 65, 256, 257, 1024, 4096, 16384, 65536):
            # (small layers too: few output tiles, so dW over many tokens splits its K)
            for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (256, 256), (64, 1024)):
                for r in ranks:
                    for p in (0.0, 0.1):
                        for tma, persistent, tf32 in switches:
                            for strategy in ("", "in_loop", "split", "hybrid"):
                                cases.append((m, n, k, r, dtype, p, every, tma, persistent, strategy, tf32,
                                              None if p else 0, True))
        # a mask over 2**31 elements or more (M·K: 524,288 tokens of a 4096-wide layer) counts in 64 bits
        for r in ranks:
            for tma, persistent, tf32 in switches:
                for strategy in ("", "in_loop", "split", "hybrid"):
                    cases.append((1 << 19, 4096, 4096, r, dtype, 0.1, every, tma, persistent, strategy, tf32, None,
                                  True))
        # a row scale (a batch mixing the adapter and the base), or adapters side by side, on every
        # strategy, from decoding's M up
        for m, (n, k), r, p, (tma, persistent, tf32), strategy, factors in itertools.product(
                (1, 16, 256, 4096, 65536), ((4096, 4096), (256, 256)), ranks, (0.0, 0.1), switches,
                ("", "in_loop", "split", "hybrid"), ((True, False), (False, True))):
            cases.append((m, n, k, r, dtype, p, every, tma, persistent, strategy, tf32, None if p else 0, True,
                          *factors))
        # an explicit seed (a value, not a pointer) in the forced in-loop forward with dropout
        for r in ranks:
            cases.append((16, 4096, 4096, r, dtype, 0.1, every, False, False, "in_loop", False, 1234, True))
        # cublas (what eager calls run at small M) with dropout: the keep-mask pass, its seed drawn or
        # given, a K tail (K not a multiple of its tile), a mask of 2**31 elements or more
        for m, k, seed in ((16, 4096, None), (256, 4000, 1234), (1 << 19, 4096, None)):
            cases.append((m, 4096, k, 16, dtype, 0.1, every, False, False, "cublas", False, seed, True))
        # the gradients asked for shape the skinny passes: every combination, at small and large M,
        # with the seed drawn on the device or given, and layers without a bias
        for needs in itertools.product((False, True), repeat=5):
            for m in (16, 4096):
                for r in ranks:
                    for p, seed in ((0.0, 0), (0.1, None), (0.1, 1234)):
                        for tf32 in (False, True) if dtype == torch.float32 else (False,):
                            for bias in (True,) if needs[2] else (True, False):
                                cases.append((m, 4096, 4096, r, dtype, p, needs, False, False, "", tf32, seed,
                                              bias))
    launched = _dispatched_kernels(monkeypatch, cases)
    for scope in compile_report.SCOPES:  # (CI's: BackgroundCompileReports.SCOPES)
        _assert_compiled(launched, 90, scope)
    assert len(launched) > 500  # (the recorders saw the launches, and every kind of variant)
    for variant in ("+split_k", "+seed_value", "+no_bias", "+offset_int64", "+direct", "+row_scale", "+adapters",
                    "+one_token", "+rank_one"):
        assert any(key[1].endswith(variant) for key in launched), variant
    # each row factor where the kernels make xa and g: each in-loop GEMM, each skinny pass with SHRINK
    assert {(kind, name + factor, dtype) for kind, names in (
        ("gemm", ("forward_in_loop", "forward_in_loop_dropout", "dx_in_loop", "dx_in_loop_dropout")),
        ("skinny", ("forward_shrink", "forward_shrink+no_dropout", "dy_pass", "dy_pass-db")))
        for name in names for dtype in ("bf16", "fp16", "fp32") for factor in ("+row_scale", "+adapters")
    } <= set(launched)
    assert {("mask", "keep_mask" + variant, "u8") for variant in ("+seed_value", "+offset_int64", "+k_tail")} \
        <= set(launched)
    # the forced in-loop forward with dropout, and its variants
    assert {("gemm", "forward_in_loop_dropout" + variant, dtype) for variant in ("+split_k", "+seed_value",
                                                                                "+offset_int64")
            for dtype in ("bf16", "fp16", "fp32")} <= set(launched)


@pytest.mark.parametrize("arch, num_sms", [(80, 108), (86, 82), (89, 58), (120, 170)])
def test_on_other_gpus_the_dispatch_launches_only_what_fits_and_the_report_compiles(monkeypatch, arch, num_sms):
    """On an A100 (sm_80, 163 KiB of shared memory a program, 108 SMs) and
    the 99 KiB parts (RTX 3090, L4, RTX 5090: sm_120 with TMA too, not the
    persistent grid), each with its own SM count (which moves the tile choice
    and split-K), every kernel the dispatch launches, by default, with a
    forced strategy or switch, is one ``compile_report --arch`` compiles for
    that GPU, and every GEMM fits its shared memory by the estimate (which the
    report checks bounds the real figure: ``problems``)."""
    from fused_lora import _triton, dispatch

    limit = configs.smem_limit_for(arch)
    monkeypatch.setattr(dispatch, "device_target", lambda device: _triton.CudaTarget(arch, limit, num_sms))
    every = (True,) * 5
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        switches = [(False, False, False)]
        switches += ([(False, False, True)] if dtype == torch.float32
                     else [(True, False, False), (False, True, False), (True, True, False)])
        for m, (n, k), r, p, (tma, persistent, tf32), strategy in itertools.product(
                (1, 16, 256, 4096, 65536), ((4096, 4096), (256, 256)), (1, 16, 17, 33, 64, 65, 128), (0.0, 0.1),
                switches, ("", "in_loop", "split", "hybrid")):
            cases.append((m, n, k, r, dtype, p, every, tma, persistent, strategy, tf32, None if p else 0, True))
    launched = _dispatched_kernels(monkeypatch, cases)
    _assert_compiled(launched, arch)
    gemms = [key for key in launched if key[0] == "gemm" and len(key) > 3]
    # (the persistent grid: with Hopper's shared memory only, configs.persistent_grid_fits)
    assert len(gemms) > 50 and not any(key[6] for key in gemms) and any(key[5] for key in gemms) == (arch >= 90)
    for key in gemms:
        _, name, dtype, (bm, bn, bk, group_m, warps, stages), block_r = key[:5]
        cfg = configs.GemmConfig(bm, bn, bk, group_m, warps, stages)
        assert cfg.smem_bytes(4 if dtype == "fp32" else 2, block_r, "_in_loop" in name) <= limit, (key, launched[key])
