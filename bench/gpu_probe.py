"""Where the fused GEMM's time goes: its launches timed one by one, beside cuBLAS.

The second H200 run (bench/results/2026-12-04-NVIDIA-H200-2) found the dx
GEMM through pointer loads taking 88-90% of a fused step (6.5 ms where cuBLAS
takes 0.4), the same kernel with TMA loads far faster, the forward GEMM
(pointer loads too) near cuBLAS, and hybrid's low-rank-only launch (an empty
K loop) apparently slow as well. Its PTX, compiled here for sm_90 with
Triton 3.6, shows the same 16-byte copies and wgmma in dx as in the forward
(and is the same, bit for bit, where N and K are specialised). The one
difference left is B's layout: the forward reads Wᵀ (K contiguous), dx W
(N contiguous), each through the same body.
This probe splits the question on the GPU, each row one launch of
``lora_gemm`` with the plan's own configuration, at a small and a large M:

``cublas_fwd``, ``cublas_dx``      the floors: ``x @ Wᵀ``, ``dy @ W``
``fwd_base``, ``dx_base``          the base GEMM alone (no low-rank term), pointers, then ``+tma``
                                   (descriptors made on the host), ``+tma_device`` (by the kernel)
``dx_base_b_colmajor``             dx with W's values stored transposed (B laid out as the forward's)
``fwd_base_b_rowmajor``            the forward with Wᵀ stored row-major (B laid out as dx's)
``fwd_lowrank``, ``dx_lowrank``    what the fused passes launch at large M (split: the precomputed
                                   low-rank factor, ``+tma`` too)
``fwd_in_loop+tma``                the forward of the default plan at p=0 (in_loop: the shrink x·Aᵀ in
                                   the K loop), on the in_loop plan's tile; through TMA only (the
                                   16-bit in-loop shrink through pointers faulted on Triton 3.6, sm_90)
``fwd_epilogue``, ``dx_epilogue``  hybrid's launches: the low-rank term alone, an empty K loop, on the
                                   hybrid plan's own tile (configs.LOW_RANK_ONLY_GEMM)
``fwd_epilogue@gemm_tile``         the same on the split plan's GEMM tile, as hybrid ran until then
``..+tma@<tile>``                  at large M, the base GEMMs, the in-loop forward and dx with its term
                                   through TMA on other tiles (:data:`SWEEP`)
``fwd_epilogue@<tile>``            at large M, hybrid's low-rank-only launch on other tiles (:data:`EPILOGUE_SWEEP`)
``cublas_fwd (again)``,            the first rows' launches timed again after the others (but ..+ws): how far
``fwd_base+tma (again)``           one launch's time drifts within the run (run 5's in-loop forward,
                                   more work, timed faster than the base product alone)
``..+ws@<tile>``                   last of all (a fault of the new kernel loses only these rows), at large M:
                                   the base GEMMs and the forward and dx with their precomputed term
                                   warp-specialised (``lora_gemm(warp_specialize=True)``: the term as rank-one
                                   updates after the K loop; no plan runs it yet) on
                                   ``configs.WARP_SPECIALIZED_GEMM``, each beside the same launch without
                                   (``..+tma_device@<tile>``): whether Triton's warp specialisation pays on sm_90

Each row: the median ms (``triton.testing.do_bench``, whose time includes
the host's launch where that is longer than the kernel: at M=16, where the
rows differ in host time per launch), TFLOP/s and GB/s of its ideal
traffic, and its error against the same product in float64 (a wrong row
says so). ``--compile-only`` runs each launch once (gpu_check.sh
compiles them beside the tests); on a machine without a GPU it runs under
the interpreter at a tiny size, its times labelled as no measurement.

    python bench/gpu_probe.py [--json FILE] [--compile-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

#: (M, in, out, r) of the probe: the headline shape at small and large M (small first: large M's rows end
#: with the warp-specialised launches, new kernels, so that a fault of theirs loses nothing else); the
#: interpreter's stand-in.
GPU_SHAPES = ((16, 4096, 4096, 16), (8192, 4096, 4096, 16))
INTERPRETER_SHAPES = ((37, 64, 48, 4),)
#: At large M, the base GEMM through TMA on other shipped tiles too (label, config kwargs), beside the plan's
#: 128x256x64, 3 stages: the fourth run measured it at 62% of cuBLAS forward and 73% in dx, 18% apart with the
#: same PTX but B's transpose bit. (A tile that does not fit fails its row, not the probe.)
SWEEP_MIN_M = 4096
SWEEP = (("128x256x64s4", dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4)),
         ("128x128x64s4", dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)),
         ("128x128x64s5", dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=5)),
         ("256x128x64s3", dict(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3)))
#: At large M, hybrid's low-rank-only launch (an empty K loop: it writes s·xa·Bᵀ + b, M×N) on smaller tiles
#: too: on the plan's 128x256 it moved ~410 GB/s on the fourth run, a tenth of the H200's bandwidth.
EPILOGUE_SWEEP = (("64x128w4", dict(block_m=64, block_n=128, num_warps=4, num_stages=1)),
                  ("128x128w8", dict(block_m=128, block_n=128, num_warps=8, num_stages=1)),
                  ("64x256w8", dict(block_m=64, block_n=256, num_warps=8, num_stages=1)))
#: normalized error allowed, by dtype (a row above it is marked WRONG)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def rows_for(m: int, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device):
    """[(name, launch, reference, flops, bytes)]: each launch a zero-argument
    callable returning the product, its reference the same product in float64."""
    from fused_lora import dispatch
    from fused_lora.kernels import configs, lora_gemm

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x, dy = rand(m, k), rand(m, n)
    w = rand(n, k, scale=k ** -0.5)
    a, b = rand(r, k, scale=k ** -0.5), rand(n, r, scale=r ** -0.5)
    bias = rand(n)
    xa = (x.float() @ a.float().t()).contiguous()  # (the skinny passes' fp32 factors)
    gg = (dy.float() @ b.float()).contiguous()
    w_colmajor = w.t().contiguous().t()  # (W's values, stored as Wᵀ: dx's B laid out as the forward's)
    wt_rowmajor = w.t().contiguous()  # (Wᵀ stored row-major: the forward's B laid out as dx's)
    # (split: the plans whose GEMMs read the precomputed low-rank factor, as the fused passes do at large M)
    plan = dispatch.device_plan(device, m, n, k, r, dtype, 0.0, "split")
    fwd_cfg, dx_cfg = plan.fwd_gemm, plan.dx_gemm
    hybrid = dispatch.device_plan(device, m, n, k, r, dtype, 0.0, "hybrid")  # (its launches' own tile)
    in_loop_cfg = dispatch.device_plan(device, m, n, k, r, dtype, 0.0, "in_loop").fwd_gemm
    e = dtype.itemsize
    f64 = torch.float64

    def gemm(a_, b_, cfg, tma=False, **kw):
        return lambda: lora_gemm(a_, b_, config=cfg, out_dtype=dtype, tma=tma, num_sms=plan.num_sms,
                                 input_precision=plan.input_precision, **kw)[0]

    fwd_ref = x.to(f64) @ w.to(f64).t()
    dx_ref = dy.to(f64) @ w.to(f64)
    fwd_lr = 2.0 * xa.to(f64) @ b.to(f64).t() + bias.to(f64)
    dx_lr = gg.to(f64) @ a.to(f64)
    base_fwd = (2 * m * n * k, e * (m * k + n * k + m * n))
    base_dx = (2 * m * n * k, e * (m * n + n * k + m * k))
    lr_fwd = (2 * m * n * r, 4 * m * r + e * (n * r + m * n + n))
    lr_dx = (2 * m * k * r, 4 * m * r + e * (k * r + m * k))
    fwd_lowrank = dict(u=xa, v=b.t(), lr_scale=2.0, bias=bias)
    fwd_in_loop = dict(shrink=a.t(), v=b.t(), lr_scale=2.0, bias=bias)
    dx_lowrank = dict(u=gg, v=a)
    rows = [
        ("cublas_fwd", lambda: x @ w.t(), fwd_ref, *base_fwd),
        ("cublas_dx", lambda: dy @ w, dx_ref, *base_dx),
        ("fwd_base", gemm(x, w.t(), fwd_cfg), fwd_ref, *base_fwd),
        ("fwd_base+tma", gemm(x, w.t(), fwd_cfg, True), fwd_ref, *base_fwd),
        ("dx_base", gemm(dy, w, dx_cfg), dx_ref, *base_dx),
        ("dx_base+tma", gemm(dy, w, dx_cfg, True), dx_ref, *base_dx),
        ("fwd_base+tma_device", gemm(x, w.t(), fwd_cfg, True, tma_device=True), fwd_ref, *base_fwd),
        ("dx_base+tma_device", gemm(dy, w, dx_cfg, True, tma_device=True), dx_ref, *base_dx),
        ("dx_base_b_colmajor", gemm(dy, w_colmajor, dx_cfg), dx_ref, *base_dx),
        ("fwd_base_b_rowmajor", gemm(x, wt_rowmajor, fwd_cfg), fwd_ref, *base_fwd),
        ("fwd_lowrank", gemm(x, w.t(), fwd_cfg, **fwd_lowrank), fwd_ref + fwd_lr, *base_fwd),
        ("fwd_lowrank+tma", gemm(x, w.t(), fwd_cfg, True, **fwd_lowrank), fwd_ref + fwd_lr, *base_fwd),
        ("dx_lowrank", gemm(dy, w, dx_cfg, **dx_lowrank), dx_ref + dx_lr, *base_dx),
        ("dx_lowrank+tma", gemm(dy, w, dx_cfg, True, **dx_lowrank), dx_ref + dx_lr, *base_dx),
        ("fwd_in_loop+tma", gemm(x, w.t(), in_loop_cfg, True, **fwd_in_loop), fwd_ref + fwd_lr, *base_fwd),
        ("fwd_epilogue", gemm(x[:, :0], w.t()[:0], hybrid.fwd_gemm, **fwd_lowrank), fwd_lr, *lr_fwd),
        ("dx_epilogue", gemm(dy[:, :0], w[:0], hybrid.dx_gemm, **dx_lowrank), dx_lr, *lr_dx),
        ("fwd_epilogue@gemm_tile", gemm(x[:, :0], w.t()[:0], fwd_cfg, **fwd_lowrank), fwd_lr, *lr_fwd),
    ]
    if m >= SWEEP_MIN_M:
        for label, tile in SWEEP:
            fwd_t, dx_t = (dataclasses.replace(c, **tile) for c in (fwd_cfg, dx_cfg))
            in_loop_t = dataclasses.replace(in_loop_cfg, **tile)
            rows += [(f"fwd_base+tma@{label}", gemm(x, w.t(), fwd_t, True), fwd_ref, *base_fwd),
                     (f"dx_base+tma@{label}", gemm(dy, w, dx_t, True), dx_ref, *base_dx),
                     (f"fwd_in_loop+tma@{label}", gemm(x, w.t(), in_loop_t, True, **fwd_in_loop), fwd_ref + fwd_lr,
                      *base_fwd),
                     (f"dx_lowrank+tma@{label}", gemm(dy, w, dx_t, True, **dx_lowrank), dx_ref + dx_lr, *base_dx)]
        for label, tile in EPILOGUE_SWEEP:
            rows.append((f"fwd_epilogue@{label}", gemm(x[:, :0], w.t()[:0], dataclasses.replace(fwd_cfg, **tile),
                                                       **fwd_lowrank), fwd_lr, *lr_fwd))
    rows += [(f"{name} (again)", *rest) for name, *rest in rows if name in ("cublas_fwd", "fwd_base+tma")]
    if m >= SWEEP_MIN_M or device.type == "cpu":  # (last of all, GPU_SHAPES: a fault of the new kernel
        # loses no other row; the interpreter's smoke run checks their results)
        ws = configs.WARP_SPECIALIZED_GEMM
        tile = f"@{ws.block_m}x{ws.block_n}x{ws.block_k}w{ws.num_warps}s{ws.num_stages}"
        for name, a_, b_, want, cost, term in (
                ("fwd_base", x, w.t(), fwd_ref, base_fwd, {}),
                ("fwd_lowrank", x, w.t(), fwd_ref + fwd_lr, base_fwd, fwd_lowrank),
                ("dx_base", dy, w, dx_ref, base_dx, {}),
                ("dx_lowrank", dy, w, dx_ref + dx_lr, base_dx, dx_lowrank)):
            rows += [(f"{name}+tma_device{tile}", gemm(a_, b_, ws, True, tma_device=True, **term), want, *cost),
                     (f"{name}+ws{tile}", gemm(a_, b_, ws, True, tma_device=True, warp_specialize=True, **term), want,
                      *cost)]
    return rows, {"fwd": str(fwd_cfg), "dx": str(dx_cfg), "hybrid": str(hybrid.fwd_gemm),
                  "in_loop": str(in_loop_cfg)}


def normalized_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max(1, max |want|)."""
    diff = (got.to(torch.float64) - want).abs().max().item()
    return diff / max(1.0, want.abs().max().item())


def run(dtype: torch.dtype = torch.bfloat16, compile_only: bool = False, shapes=None, on_row_done=None) -> dict:
    """Every row of every shape; ``on_row_done(result)`` after each row (the
    partial result: what a time box that stops the probe leaves)."""
    from fused_lora import _triton

    on_gpu = torch.cuda.is_available() and not _triton.interpreter()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu and not _triton.interpreter():
        raise SystemExit("gpu_probe: no CUDA GPU; set TRITON_INTERPRET=1 for the interpreter's smoke run")
    if not on_gpu and dtype == torch.bfloat16:
        dtype = torch.float16  # (the interpreter's bf16 is not what the GPU computes: KERNELS.md)
    shapes = shapes or (GPU_SHAPES if on_gpu else INTERPRETER_SHAPES)
    out = {"device": torch.cuda.get_device_name() if on_gpu else "interpreter (times are no measurement)",
           "dtype": str(dtype).replace("torch.", ""), "compile_only": compile_only, "shapes": []}
    for m, k, n, r in shapes:
        rows, configs = rows_for(m, k, n, r, dtype, device)
        shape = {"m": m, "k": k, "n": n, "r": r, "configs": configs, "rows": []}
        out["shapes"].append(shape)
        for name, launch, want, flops, nbytes in rows:
            row = {"name": name}
            try:
                got = launch()
                row["error"] = normalized_error(got, want)
                row["ok"] = row["error"] <= TOL[dtype]
                if not compile_only:
                    ms = time_ms(launch, on_gpu)
                    row.update(ms=ms, tflops=flops / ms / 1e9, gbps=nbytes / ms / 1e6)
            except Exception as err:  # reported per row: the next rows still run
                row.update(ok=False, failed=f"{type(err).__name__}: {str(err).strip()[:300]}")
                if on_gpu:
                    torch.cuda.synchronize()
            shape["rows"].append(row)
            if on_row_done is not None:
                on_row_done(out)
    return out


def time_ms(launch, on_gpu: bool) -> float:
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(launch, warmup=10, rep=40, return_mode="median"))
    t0 = time.perf_counter()
    launch()
    return (time.perf_counter() - t0) * 1e3


def table(result: dict) -> str:
    lines = [f"gpu_probe — {result['device']}, {result['dtype']}"
             + (" (compile only: no times)" if result["compile_only"] else "")]
    for shape in result["shapes"]:
        lines += ["", f"M={shape['m']} {shape['k']}->{shape['n']} r={shape['r']}; "
                      f"configs: fwd {shape['configs']['fwd']}, dx {shape['configs']['dx']}", "",
                  "| launch | ms | TFLOP/s | GB/s | error |", "|---|---|---|---|---|"]
        for row in shape["rows"]:
            if "failed" in row:
                lines.append(f"| {row['name']} | FAILED: {row['failed']} | | | |")
                continue
            timed = [f"{row[key]:.4g}" if key in row else "" for key in ("ms", "tflops", "gbps")]
            verdict = f"{row['error']:.2e}" + ("" if row["ok"] else " WRONG")
            lines.append(f"| {row['name']} | " + " | ".join(timed) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--compile-only", action="store_true", help="run each launch once: compile, check, no timing")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    def write(result):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    result = run(getattr(torch, args.dtype), args.compile_only, on_row_done=write)
    print(table(result), flush=True)
    return 0 if all(row["ok"] for shape in result["shapes"] for row in shape["rows"]) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
