"""Which fused pass fails on this GPU, and how: each case in a process of its
own (a CUDA error poisons its process, not the next case), with
CUDA_LAUNCH_BLOCKING=1 so that the error is raised by the launch that made
it. A case is lora_linear's forward, then its backward, on one plan
(strategy forced or the dispatch's, TMA and the persistent grid on or off), against the
float64 reference. Prints one line a case: the plan's kernels' configs, and
``ok`` with the worst normalized error, ``WRONG``, or the CUDA error and the
stage it came at. (For the GPU machine: the first gpu_check.sh run on an
H200 hit illegal memory accesses; this narrows them down.)

    python bench/gpu_diagnose.py [--jobs N] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time

CASE = r"""
import json, sys, torch
import fused_lora
from fused_lora import dispatch
from fused_lora.testing import make_params, make_x, normalized_error, reference64
spec = json.loads(sys.argv[1])
dtype = getattr(torch, spec["dtype"])
m, k, n, r, p = spec["m"], spec["k"], spec["n"], spec["r"], spec["p"]
dev = torch.device("cuda")
torch.manual_seed(0)
import contextlib
forced = dispatch.force_strategy(spec["strategy"]) if spec["strategy"] else contextlib.nullcontext()
with forced, dispatch.use_tma(spec["tma"]), \
        dispatch.use_persistent(spec["persistent"]):
    plan = dispatch.device_plan(dev, m, n, k, r, dtype, p)
    print("PLAN", plan.strategy, "fwd", plan.fwd_gemm, "dx_in_loop", plan.dx_in_loop, flush=True)
    x = make_x((m, k), dtype, device=dev).requires_grad_()
    w, b, a, bb = make_params(k, n, r, dtype, True, device=dev)
    a.requires_grad_(); bb.requires_grad_()
    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=5, backend="triton")
    torch.cuda.synchronize()
    print("STAGE forward done", flush=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, a, bb], dy)
    torch.cuda.synchronize()
    print("STAGE backward done", flush=True)
    y64, g64 = reference64(x, w, b, a, bb, dy, scaling=2.0, dropout_p=p, seed=5, grads=("x", "lora_A", "lora_B"))
    errs = [normalized_error(y, y64)]
    errs += [normalized_error(g, g64[nm]) for g, nm in zip(grads, ("x", "lora_A", "lora_B"))]
    print("ERR", max(errs), flush=True)
"""

TOL = {"bfloat16": 2.5e-2, "float16": 4e-3, "float32": 2e-5}


def cases(quick: bool):
    shapes = [(36, 64, 40, 16), (8192, 4096, 4096, 16)] if not quick else [(36, 64, 40, 16)]
    for (m, k, n, r), dtype, strategy, tma, persistent, p in itertools.product(
            shapes, ("bfloat16", "float32"), ("in_loop", "split", "hybrid", None), (False, True), (False, True),
            (0.0, 0.1)):
        if dtype == "float32" and tma:
            continue
        yield dict(m=m, k=k, n=n, r=r, dtype=dtype, strategy=strategy, tma=tma, persistent=persistent, p=p)


def run(spec: dict, timeout: float) -> str:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    env.pop("TRITON_INTERPRET", None)
    strategy = spec["strategy"] or "default"
    name = (f"{spec['dtype']:8s} M={spec['m']:<5d} {spec['k']}->{spec['n']} r={spec['r']} {strategy:7s} "
            f"tma={int(spec['tma'])} persistent={int(spec['persistent'])} p={spec['p']}")
    try:
        out = subprocess.run([sys.executable, "-c", CASE, json.dumps(spec)], env=env, capture_output=True, text=True,
                             timeout=timeout)
        text = out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return f"{name} | TIMEOUT after {timeout:.0f} s | {' / '.join(text.strip().splitlines()[-2:])}"
    lines = text.strip().splitlines()
    plan = next((ln for ln in lines if ln.startswith("PLAN")), "PLAN ?")
    stages = [ln.removeprefix("STAGE ") for ln in lines if ln.startswith("STAGE")]
    err = next((ln for ln in lines if ln.startswith("ERR")), None)
    if err is not None:
        worst = float(err.split()[1])
        verdict = f"ok {worst:.2e}" if worst <= TOL[spec["dtype"]] else f"WRONG {worst:.2e}"
    else:
        cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
        verdict = f"FAILED after [{', '.join(stages) or 'nothing'}]: {cause.strip()[:300]}"
    return f"{name} | {verdict} | {plan}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--quick", action="store_true", help="the small shape alone")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a case")
    args = parser.parse_args()
    todo = list(cases(args.quick))
    start = time.monotonic()
    print(f"gpu_diagnose: {len(todo)} cases, {args.jobs} at once", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda s: run(s, args.timeout), todo):
            print(line, flush=True)
    print(f"gpu_diagnose: done in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
