"""The ``fused-lora`` command.

    fused-lora check [--json]                 parity of every kernel path against the float64 reference
    fused-lora bench [--preset P] [--out D]   the benchmark harness (smoke preset on a machine without a GPU)
    fused-lora demo  [--steps N] [--out D]    fine-tune a small character-level model, fused vs naive LoRA (--dora)

Without a CUDA GPU every subcommand still runs: the Triton kernels run on
Triton's CPU interpreter, and the output says so. (Triton fixes the
interpreter switch when it is first imported, so the command re-executes
itself once with ``TRITON_INTERPRET=1`` set.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _reexec_with_interpreter(argv: list[str]) -> None:
    """No GPU and no interpreter requested: run again with TRITON_INTERPRET=1,
    which must be set before Triton is imported (importing fused_lora did)."""
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fused_lora.cli", *argv], env)


def _number(kind, low: float = -math.inf, *, above: bool = False, below: float = math.inf):
    """An argparse type: a finite ``kind`` (int or float) >= ``low`` (> with
    ``above``) and < ``below``; anything else is a usage error naming it."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        bounds = ([f"> {low:g}" if above else f">= {low:g}"] if low > -math.inf else []) + (
            [f"< {below:g}"] if below < math.inf else [])
        if not math.isfinite(value) or value < low or (above and value == low) or value >= below:
            must = ", ".join((["finite"] if kind is float else []) + ([" and ".join(bounds)] if bounds else []))
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value
    return parse


def _writable_dir(path) -> str:
    """'' when the output folder ``path`` exists or was made, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot write the output folder {str(path)!r}: {err.strerror or err}"
    return ""


def _where() -> str:
    """Describe where the kernels run on this machine."""
    import torch

    from . import _triton

    if torch.cuda.is_available() and not _triton.interpreter() and _triton.available():
        return f"CUDA GPU: {torch.cuda.get_device_name()} (Triton kernels compiled)"
    if _triton.interpreter():
        return "no CUDA GPU: Triton kernels on the CPU interpreter (correctness only, not speed)"
    return f"Triton kernels unavailable ({_triton.UNAVAILABLE_REASON}): torch reference only"


def progress(**kwargs):
    """tqdm when installed and the terminal is interactive; otherwise a quiet stub."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        return tqdm(file=sys.stderr, disable=None, **kwargs)

    class _Quiet:
        total = 0

        def update(self, n=1):
            pass

        def close(self):
            pass

        def set_postfix_str(self, s):
            pass

    return _Quiet()


# ----------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------

def check_cases(on_gpu: bool) -> list[dict]:
    """Every path (each strategy, TMA loads and the persistent grid for
    16-bit, split-K at small M, a row scale), each dtype, dropout on and off, frozen and
    trainable base, awkward sizes. GPU shapes are larger (several tiles of the
    real configs)."""
    import torch

    if on_gpu:
        shapes = [((4, 257), 1000, 777), ((3000,), 4096, 1024)]
        aligned = ((4, 257), 1024, 776)  # TMA: rows 16-byte aligned (M, N ragged)
        many_tiles = ((4, 1000), 2048, 2048)  # persistent: more tiles than the GPU runs at once (forward, dx)
        small_m = ((16,), 4096, 4096)  # decode-sized: fewer output tiles than SMs, so the GEMMs split K
        aligned_int8 = ((4, 257), 1024, 784)  # TMA of an int8 W: its rows (in_features) 16 bytes
        many_tiles_int8 = many_tiles  # (in_features 2048: 16-byte int8 rows too)
        nf4_decoded, nf4_whole = small_m, shapes[1]  # (NF4 in groups of 16: in_features a multiple of 16)
        wide_m = shapes[0]  # cublas with dropout above dispatch.EAGER_KEPT_MASK_MAX_M tokens: the cublas Function
    else:
        shapes = [((3, 19), 53, 41), ((123,), 70, 45)]
        from .testing import interpreted_tma_k_n

        k, n = interpreted_tma_k_n()
        aligned = ((2, 13), k, n)
        many_tiles = ((128,), k, n)  # more tiles than the interpreter's 3 persistent programs (and aligned)
        small_m = ((5,), 70, 45)  # fewer output tiles than the interpreter's 4 programs: split-K
        aligned_int8 = ((2, 40), 80, 48)  # TMA of an int8 W: rows of 16 bytes and 16 elements (every interpreter)
        many_tiles_int8 = aligned_int8  # (more tiles than the interpreter's 3 persistent programs too)
        nf4_decoded, nf4_whole = ((5,), 64, 45), ((600,), 48, 40)  # (M on either side of NF4_DECODE_MAX_M)
        wide_m = ((2, 150), 53, 41)  # (above EAGER_KEPT_MASK_MAX_M tokens)
    cases = []

    def case(shape, r, dtype, strategy, p, train_base, tma="auto", persistent=False, row_scaled=False,
             adapters=False, dora=False, quantized=False, tma_descriptors="host"):
        lead, k, n = shape
        cases.append(dict(lead=lead, k=k, n=n, r=r, dtype=dtype, strategy=strategy, dropout_p=p,
                          train_base=train_base, tma=tma, persistent=persistent, row_scaled=row_scaled,
                          adapters=adapters, dora=dora, quantized=quantized, tma_descriptors=tma_descriptors))

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            for strategy, p, r in (("in_loop", 0.0, 8), ("split", 0.0, 64), ("split", 0.1, 16)):
                case(shape, r, dtype, strategy, p, train_base=strategy == "split" and p == 0.0)
        case(shapes[0], 16, dtype, "hybrid", 0.1, train_base=True)
        # cuBLAS alone (eager calls on a GPU below a size, with dropout its mask drawn by the keep-mask pass:
        # dispatch.eager_cublas_reason), with dropout the mask kept by autograd at small M, drawn again by the
        # autograd Function's backward above EAGER_KEPT_MASK_MAX_M tokens (dispatch.eager_records)
        case(shapes[1], 16, dtype, "cublas", 0.0, train_base=True)
        case(small_m, 16, dtype, "cublas", 0.1, train_base=False)
        case(wide_m, 16, dtype, "cublas", 0.1, train_base=True)
        # small M: the in-loop shrink split along K (xa's and g's partials summed too); the split
        # forward and dx; with dropout, forced in_loop: x's tiles masked in the forward's K loop
        case(small_m, 16, dtype, "in_loop", 0.0, train_base=False)
        case(small_m, 16, dtype, "split", 0.1, train_base=True)
        case(small_m, 16, dtype, "in_loop", 0.1, train_base=False)
        # a row scale (the mixed adapter/base batches): xa and g scaled where the kernels make them: after
        # the K loops of the in-loop forward and dx (with their masks, split along K), in the skinny passes' store
        case(small_m, 16, dtype, "in_loop", 0.1, train_base=False, row_scaled=True)
        case(shapes[1], 64, dtype, "split", 0.0, train_base=True, row_scaled=True)
        # two adapters side by side (multi_lora_linear), each row through its own: where the row scale is
        case(small_m, 16, dtype, "in_loop", 0.1, train_base=False, adapters=True)
        case(shapes[1], 64, dtype, "split", 0.0, train_base=True, adapters=True)
        # each adapter its own dropout probability: each row's mask threshold its adapter's (the in-loop
        # forward's and dx's masks, split along K; the skinny forward's and dA's)
        case(small_m, 16, dtype, "in_loop", 0.1, train_base=False, adapters="dropouts")
        case(shapes[1], 64, dtype, "split", 0.1, train_base=False, adapters="dropouts")
        # a DoRA adapter beside a LoRA one: the side-by-side op on x, or on drop(x), each row's γ its adapter's
        case(small_m, 16, dtype, "in_loop", 0.0, train_base=False, adapters="dora")
        case(shapes[1], 64, dtype, "split", 0.1, train_base=True, adapters="dora")
        # DoRA (dora_linear): the fused op on x, or on drop(x) (its own dropout off), scaled by column
        case(small_m, 16, dtype, "in_loop", 0.0, train_base=False, dora=True)
        case(shapes[0], 16, dtype, "split", 0.1, train_base=True, dora=True)
        # an int8 base (weight_scale): dequantised in the forward's K loop by column, in dx's by row; in
        # loop at small M (split along K), split with dropout, forced hybrid (which falls back), two adapters
        case(small_m, 16, dtype, "in_loop", 0.0, train_base=False, quantized=True)
        case(shapes[1], 64, dtype, "split", 0.1, train_base=False, quantized=True)
        case(shapes[0], 16, dtype, "hybrid", 0.0, train_base=False, quantized=True)
        case(small_m, 16, dtype, "in_loop", 0.1, train_base=False, adapters=True, quantized=True)
        case(shapes[0], 16, dtype, "split", 0.1, train_base=False, dora=True, quantized=True)  # (QDoRA)
        # an NF4 base: decoded in the split forward's and dx's K loops (split along K at small M; forced in_loop
        # runs split), made whole at large M (then any strategy), two adapters, QDoRA
        case(nf4_decoded, 16, dtype, "split", 0.0, train_base=False, quantized="nf4")
        case(nf4_decoded, 16, dtype, "in_loop", 0.1, train_base=False, adapters=True, quantized="nf4")
        case(nf4_whole, 64, dtype, "split", 0.1, train_base=False, quantized="nf4")
        case(nf4_whole, 16, dtype, "in_loop", 0.0, train_base=False, quantized="nf4")
        case(nf4_decoded, 16, dtype, "split", 0.1, train_base=False, dora=True, quantized="nf4")
        # bitsandbytes' FP4: NF4's paths with another code book (weight_code), decoded and made whole
        case(nf4_decoded, 16, dtype, "split", 0.1, train_base=False, quantized="fp4")
        case(nf4_whole, 16, dtype, "in_loop", 0.0, train_base=False, quantized="fp4")
        if dtype != torch.float32:
            # TMA loads (16-bit; the default on sm_90, forced on here): forward, dx (masked or not) and dW
            # through descriptors; and pointer loads (the default elsewhere, forced on sm_90, where the
            # in-loop shrink through them runs split)
            for p, train_base in ((0.0, True), (0.1, False)):
                case(aligned, 16, dtype, "split", p, train_base, tma=True)
            # TMA's descriptors made by the kernels (set_tma_descriptors("device")): the split forward, dx
            # (masked) and dW; the in-loop forward and dx
            case(aligned, 16, dtype, "split", 0.1, train_base=True, tma=True, tma_descriptors="device")
            case(aligned, 8, dtype, "in_loop", 0.0, train_base=True, tma=True, tma_descriptors="device")
            case(shapes[1], 16, dtype, "split", 0.1, train_base=True, tma=False)
            # the persistent grid (16-bit): each GEMM pass, with the default loads and with TMA loads
            case(many_tiles, 8, dtype, "in_loop", 0.0, train_base=True, persistent=True)
            case(many_tiles, 16, dtype, "split", 0.1, train_base=False, persistent=True)
            case(many_tiles, 16, dtype, "split", 0.0, train_base=True, tma=True, persistent=True)
            # the int8 base's tiles through TMA, and on the persistent grid
            case(aligned_int8, 16, dtype, "in_loop", 0.1, train_base=False, tma=True, quantized=True)
            case(many_tiles_int8, 16, dtype, "split", 0.0, train_base=False, tma=True, persistent=True,
                 quantized=True)
    return cases


def _check_operands(case: dict, device):
    """``(x2, weight, weight_scale)`` of a check case's shapes, dtypes and base format, uninitialised on
    ``device`` (the scale None for a float base; the plan reads only its presence): what
    :func:`fused_lora.ops.plan_for` plans from."""
    import torch

    m, n, k, dtype, quantized = math.prod(case["lead"]), case["n"], case["k"], case["dtype"], case["quantized"]
    x2 = torch.empty(m, k, dtype=dtype, device=device)
    if not quantized:
        return x2, torch.empty(n, k, dtype=dtype, device=device), None
    four_bit = quantized in ("nf4", "fp4")  # (packed: two values a byte)
    weight = torch.empty(n, k // 2 if four_bit else k, dtype=torch.uint8 if four_bit else torch.int8, device=device)
    return x2, weight, torch.empty(n, dtype=torch.float32, device=device)


def cmd_check(args) -> int:
    where = _where()
    import torch

    from . import _triton, dispatch, ops
    from .testing import TOLERANCE, parity_case

    if not _triton.available() or not (torch.cuda.is_available() or _triton.interpreter()):
        print(f"fused-lora check: {where}; nothing to check.", file=sys.stderr)
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() and not _triton.interpreter() else "cpu")
    rows = []
    bar = progress(total=len(check_cases(device.type == "cuda")), desc="check", unit="case")
    for case in check_cases(device.type == "cuda"):
        torch.manual_seed(len(rows))
        with (dispatch.force_strategy(case["strategy"]), dispatch.use_tma(case["tma"]),
              dispatch.use_persistent(case["persistent"]), dispatch.use_tma_descriptors(case["tma_descriptors"])):
            # (the plan the forward runs on parity_case's operands: contiguous, its base in the case's format)
            x2, weight, weight_scale = _check_operands(case, device)
            redrawn = not dispatch.eager_records(x2.shape[0], case["dropout_p"])  # (cublas: its Function, mask redrawn)
            plan = ops.plan_for(x2, weight, case["r"], case["dropout_p"], weight_scale=weight_scale,
                                plain=not (case["row_scaled"] or case["adapters"]))
            try:
                errors = parity_case(case["lead"], case["k"], case["n"], case["r"], case["dtype"],
                                     dropout_p=case["dropout_p"], train_base=case["train_base"],
                                     row_scaled=case["row_scaled"], adapters=case["adapters"], dora=case["dora"],
                                     quantized=case["quantized"], device=device)
                failure = ""
            except Exception as exc:  # a crash is a failed row, not a traceback
                errors, failure = {}, f"{type(exc).__name__}: {exc}"
        tol = TOLERANCE[case["dtype"]]
        quantized_label = (f" +{'fp4' if case['quantized'] == 'fp4' else dispatch.quantized_kind(case['quantized'])}"
                           "-base" if case["quantized"] else "")
        worst = max(errors.values()) if errors else float("inf")
        # (the strategy that ran: a forced in_loop falls back to split above its rank tile, its dx maybe still
        # in loop)
        rows.append(dict(path=f"{plan.strategy}{' +dropout' if case['dropout_p'] else ''}"
                              f"{' +train-base' if case['train_base'] else ''}"
                              f"{' +tma' if case['tma'] is True else ' +pointers' if case['tma'] is False else ''}"
                              f"{' +tma-device' if case['tma_descriptors'] == 'device' else ''}"
                              f"{' +persistent' if case['persistent'] else ''}"
                              f"{' +row-scale' if case['row_scaled'] else ''}"
                              f"{' +adapter-dropouts' if case['adapters'] == 'dropouts' else ''}"
                              f"{' +adapters' if case['adapters'] is True else ''}"
                              f"{' +adapters +dora' if case['adapters'] == 'dora' else ''}"
                              f"{' +dora' if case['dora'] else ''}"
                              f"{quantized_label}"
                              f"{' +whole' if plan.dequantize_base else ''}"
                              f"{' +dx-in-loop' if plan.dx_in_loop and plan.strategy != 'in_loop' else ''}"
                              f"{' +mask-redrawn' if plan.strategy == 'cublas' and redrawn else ''}"
                              f"{' +split-k' if plan.fwd_gemm.split_k > 1 and plan.strategy != 'cublas' else ''}",
                         shape=f"{'x'.join(map(str, case['lead']))}x{case['k']}->{case['n']}", r=case["r"],
                         dtype=str(case["dtype"]).replace("torch.", ""), tolerance=tol, errors=errors,
                         worst=worst, passed=bool(errors) and worst <= tol, failure=failure))
        bar.update(1)
    bar.close()
    ok = all(r["passed"] for r in rows)
    import triton

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    if args.json:
        print(json.dumps({"where": where, "versions": versions, "passed": ok, "rows": rows}, indent=1, default=str))
    else:
        print(f"fused-lora check — {where}; torch {versions['torch']}, Triton {versions['triton']}")
        print("max |fused - reference| / max |reference| per output; reference = float64 PyTorch\n")
        width = max([48] + [len(r["path"]) + 2 for r in rows])
        head = f"{'path':<{width}}{'shape':<20}{'r':>4}  {'dtype':<9}{'y':>9}{'dx':>9}{'dA':>9}{'dB':>9}{'dW':>9}" \
               f"{'db':>9}{'dm':>9}{'tol':>9}  result"
        print(head)
        print("-" * len(head))
        for r in rows:
            e = r["errors"]
            keys = ("y", "dx", "dlora_A", "dlora_B", "dweight", "dbias", "dmagnitude")
            cells = "".join(f"{e[k]:9.1e}" if k in e else f"{'—':>9}" for k in keys)
            print(f"{r['path']:<{width}}{r['shape']:<20}{r['r']:>4}  {r['dtype']:<9}{cells}{r['tolerance']:9.1e}  "
                  f"{'PASS' if r['passed'] else 'FAIL ' + r['failure']}")
        print(f"\n{sum(r['passed'] for r in rows)}/{len(rows)} passed")
    return 0 if ok else 1


# ----------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------

def cmd_bench(args) -> int:
    from pathlib import Path

    from . import benchmark

    if args.update_readme:
        root = Path(args.results_root)
        readme = root.resolve().parent.parent / "README.md" if args.readme is None else Path(args.readme)
        # (a mistyped folder would read as "no GPU run committed" and wipe the section)
        problem = (f"--results-root {str(root)!r} is not a folder" if not root.is_dir()
                   else f"no README at {str(readme)!r} (pass --readme)" if not readme.is_file() else "")
        try:
            changed = not problem and benchmark.update_readme(readme, root)
        except ValueError as err:  # (the README has no performance markers)
            problem = str(err)
        if problem:
            print(f"fused-lora bench --update-readme: {problem}", file=sys.stderr)
            return 2
        print("README performance section " + ("updated" if changed else "already up to date")
              + f" from {root}", file=sys.stderr)
        return 0
    where = _where()
    import torch

    on_gpu = torch.cuda.is_available() and "interpreter" not in where
    name = args.preset or ("gpu-check" if on_gpu else "smoke")
    presets = benchmark.presets()
    if name not in presets:
        print(f"unknown preset {name!r}; choose from {sorted(presets)}", file=sys.stderr)
        return 2
    if not on_gpu and name != "smoke":
        print(f"preset {name!r} needs a CUDA GPU ({where}); use --preset smoke", file=sys.stderr)
        return 2
    preset = benchmark.filter_cases(presets[name], args.m)
    if not preset.cases:
        print(f"--m {' '.join(map(str, args.m))} matches no case of preset {name!r} (its M: "
              f"{sorted({c.m for c in presets[name].cases})})", file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    if args.shard is not None:
        from .testing import parse_shard

        if not args.compile_only:
            print("--shard splits --compile-only's work over processes; timings run one process at a time",
                  file=sys.stderr)
            return 2
        try:
            preset = benchmark.shard_cases(preset, *parse_shard(args.shard))
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
    if args.compile_only:
        return _compile_only(benchmark, preset, device, deadline, where)
    env = benchmark.environment()
    out_dir = Path(args.out) if args.out else benchmark.default_out_dir(env)
    problem = _writable_dir(out_dir)
    if problem:
        print(f"fused-lora bench: {problem}", file=sys.stderr)
        return 2
    print(f"fused-lora bench — preset {name}, {len(preset.cases)} cases — {where}", file=sys.stderr)
    results = benchmark.run_preset(preset, device, progress=progress, deadline=deadline,
                                   on_case_done=lambda partial: benchmark.write_outputs(partial, env, preset, out_dir))
    files = benchmark.write_outputs(results, env, preset, out_dir)
    failures = [m for m in results if m.note.startswith("failed")]
    if args.json:
        print(Path(files["json"]).read_text())
    else:
        print(Path(files["markdown"]).read_text())
        print("written: " + ", ".join(files.values()))
    return 1 if failures else 0


def _compile_only(benchmark, preset, device, deadline, where) -> int:
    """``bench --compile-only``: every step of the preset once, untimed,
    nothing written; what failed is printed (and the exit status is 1)."""
    print(f"fused-lora bench --compile-only — preset {preset.name} — {where}", file=sys.stderr)
    t0 = time.monotonic()
    results = benchmark.run_preset(preset, device, progress=progress, deadline=deadline, compile_only=True)
    done = sum(m.note == "compiled" for m in results)
    failures = [m for m in results if m.note.startswith("failed")]
    for m in failures:
        print(f"{m.case.label()} {m.provider} {m.mode}: {m.note}")
    skipped = len(results) - done - len(failures)
    cached = ("kernels compiled into the on-disk caches" if device.type == "cuda"
              else "interpreter: nothing is compiled or cached")
    print(f"ran {done} of {len(results)} benchmark steps once, untimed, in {time.monotonic() - t0:.0f} s "
          f"({cached}); {len(failures)} failed, {skipped} skipped")
    return 1 if failures else 0


# ----------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------

def cmd_demo(args) -> int:
    where = _where()
    from pathlib import Path

    import torch

    from . import _triton, demo

    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"fused-lora demo needs peft and transformers ({err}); pip install 'fused-lora[demo]'", file=sys.stderr)
        return 2
    problem = _writable_dir(Path(args.out))
    if problem:
        print(f"fused-lora demo: {problem}", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available() and not _triton.interpreter()
    steps = args.steps or (200 if on_gpu else 30)
    print(f"fused-lora demo — {steps} steps — {where}", file=sys.stderr)
    result = demo.run(steps, Path(args.out), torch.device("cuda" if on_gpu else "cpu"), r=args.r,
                      alpha=args.alpha, dropout=args.dropout, progress=progress, where=where, use_dora=args.dora)
    if args.json:
        print(json.dumps(demo.asdict(result), indent=1))
    else:
        print(demo.report(result))
    # With dropout the two runs draw different masks; without, the curves must agree.
    tolerance = 1e-3 if args.dropout == 0 else float("inf")
    return 0 if result.max_loss_diff <= tolerance and result.reload_max_logit_diff <= 1e-3 else 1


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-lora", description="Fused LoRA kernels: check, benchmark, demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="parity of every kernel path against the float64 reference")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("bench", help="benchmark fused vs naive LoRA vs the bare base layer")
    p.add_argument("--preset", help="smoke (CPU), headline, gpu-check (default on GPU), full")
    p.add_argument("--m", type=_number(int, 1), action="append",
                   help="only the cases with this many tokens (repeatable)")
    p.add_argument("--out", help="output folder (default: bench/results/<date>-<gpu> on a GPU, out/ without)")
    p.add_argument("--time-budget", type=_number(float, 0, above=True),
                   help="seconds; cases not started by then are skipped (and said so)")
    p.add_argument("--compile-only", action="store_true",
                   help="run every step of the preset once, untimed, writing nothing: fills the kernel caches "
                        "(bench/gpu_check.sh runs it beside the tests)")
    p.add_argument("--shard", metavar="i/n", help="with --compile-only: every n-th case from the i-th")
    p.add_argument("--update-readme", action="store_true",
                   help="run nothing: regenerate README.md's performance section from the committed GPU results")
    p.add_argument("--results-root", default="bench/results", help="with --update-readme: the results folder")
    p.add_argument("--readme", help="with --update-readme: the README (default: two levels above the results)")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("demo", help="fine-tune a small character-level LM: fused vs PEFT LoRA side by side")
    p.add_argument("--steps", type=_number(int, 1), help="training steps (default 30 on CPU, 200 on a GPU)")
    p.add_argument("--r", type=_number(int, 1), default=8, help="LoRA rank")
    p.add_argument("--alpha", type=_number(float), default=16, help="LoRA alpha")
    p.add_argument("--dropout", type=_number(float, 0, below=1), default=0.0,
                   help="LoRA dropout (> 0: the two runs draw different masks, so the curves differ)")
    p.add_argument("--dora", action="store_true", help="DoRA (PEFT's use_dora=True) in both runs instead of LoRA")
    p.add_argument("--out", default="out/demo", help="output folder (adapter, loss plot, demo.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # (--help and usage errors need no re-execution)
    _reexec_with_interpreter(argv)
    from .testing import fewer_interpreter_patches

    with fewer_interpreter_patches():  # (on the interpreter: a quarter less time; nothing on a GPU)
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
