#!/usr/bin/env bash
# The one command for a machine with a CUDA GPU (no network needed): the test
# suite on CUDA first (correctness before speed), then the benchmark.
#
#   bash bench/gpu_check.sh            # writes bench/results/<date>-<gpu>/
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Runs from a plain checkout (PYTHONPATH=., nothing installed). Writes into one
# folder: gpu_check.log (everything printed), results.json (every raw number,
# GPU name, torch/Triton versions), results.md (the table), speedup.png, and
# bench_more.json (pytest-benchmark's: several adapters and DoRA, as time allows),
# probe.json (bench/gpu_probe.py: the fused GEMM's launches timed one by one); the host's time per
# call (bench/host_overhead.py) is in the log.
# Time boxes keep it under 7 minutes on an H200: tests <= 170 s (in parallel
# shards, while the benchmark's and the probe's kernels compile; at the box a
# shard is interrupted, and reports the failures it has so far), the probe
# <= 60 s, the benchmark <= 180 s (cases not started after 125 s are listed as
# skipped), the host-time checks <= 80 s (none started after 435 s; each 25 s
# at most), then more benchmarks until 400 s, if any time is left. SHARDS=n overrides the number of test processes (default: the
# CPU cores less five, three of them for the compile processes; at most 12).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

if ! gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())' 2>/dev/null); then
    echo "bench/gpu_check.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
OUT=${OUT:-bench/results/$(date -u +%Y-%m-%d)-${gpu// /-}}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" - <<'PY'
import platform, torch, triton
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
print(f"GPU {torch.cuda.get_device_name()} | capability {torch.cuda.get_device_capability()} | "
      f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
PY

echo "== tests on CUDA"
# Most of the suite's time on a GPU is Triton compiling kernel variants
# (hundreds of them), one core per process. So the suite runs as SHARDS interleaved
# shards at once (tests/conftest.py --shard i/n), sharing the on-disk kernel
# cache, each starting its share at its own point of the suite (the fourth run's
# box stopped every shard at about 80%, leaving the suite's last files unrun on
# the GPU; now the unrun tests are spread over all of them), and beside them
# COMPILERS more processes compile every kernel of the benchmark (bench --compile-only --shard j/COMPILERS), so that the benchmark's
# time budget goes to timing. The compile checks (sm_90 code built on CPUs,
# test_compile_report/test_gpu_triton) are CI's: the GPU's time is for GPU tests.
tests=(tests/test_parity.py tests/test_kernels.py tests/test_multi_adapter.py tests/test_dropout.py tests/test_layer.py
       tests/test_torch_integration.py tests/test_errors.py tests/test_reference.py tests/test_integration.py
       tests/test_multi_integration.py tests/test_cli.py tests/test_demo.py tests/test_distributed.py
       tests/test_packaging.py tests/test_random_inputs.py tests/test_dora.py tests/test_dora_layer.py
       tests/test_dora_integration.py tests/test_quantized.py tests/test_quantized_layer.py
       tests/test_nf4.py tests/test_nf4_layer.py tests/test_peft_quantized.py tests/test_peft_multi.py
       tests/test_multi_dora.py tests/test_peft_alora.py tests/test_bnb_int8.py tests/test_architectures.py
       tests/test_launch.py tests/test_eager_cublas.py)
ncpu=$(nproc 2>/dev/null || echo 2)
COMPILERS=2  # processes compiling the benchmark's kernels, each every other case
# (about 1220 specialisations in all by an interpreter count, keyed on kernel,
# constexprs, pointer dtypes and alignment, ints ==1 / %16, warps and stages;
# with the full `fused-lora check` test alone in shard 0 (marker own_shard), at
# most ~210 in any of 12 shards: about half a second each to compile)
free=$(( ncpu - COMPILERS - 3 ))
SHARDS=${SHARDS:-$(( free > 12 ? 12 : (free < 1 ? 1 : free) ))}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
compile_pids=()
for j in $(seq 0 $((COMPILERS - 1))); do
    timeout 170 "$PY" -m fused_lora.cli bench --preset gpu-check --compile-only --shard "$j/$COMPILERS" \
        --time-budget 160 > "$logs/compile$j.log" 2>&1 &
    compile_pids+=($!)
done
timeout 170 "$PY" bench/gpu_probe.py --compile-only > "$logs/probe_compile.log" 2>&1 &
probe_compile_pid=$!
pids=()
for i in $(seq 0 $((SHARDS - 1))); do
    # (one inductor compile worker a shard: the shards are the parallelism, not 16 pools of 16; at the
    # time box SIGINT, on which pytest stops and prints the failures so far with their tracebacks. -v: a
    # line a test, named as it starts, so that a shard stopped in a test, or hung in one, says which: on
    # the fourth run two shards printed nothing)
    TORCHINDUCTOR_COMPILE_THREADS=1 timeout -s INT -k 15 170 "$PY" -m pytest -v -p no:cacheprovider -o addopts="" \
        -rfE --tb=short --shard "$i/$SHARDS" --basetemp "$logs/tmp$i" "${tests[@]}" > "$logs/shard$i.log" 2>&1 &
    pids+=($!)
done
rc_tests=0
summary=()
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    echo "-- shard $i/$SHARDS (exit $rc)"
    cat "$logs/shard$i.log"
    [ $rc -eq 124 ] && echo "shard $i/$SHARDS: TIMED OUT after 170 s (interrupted: the failures above are those so far)"
    [ $rc -ne 0 ] && [ $rc_tests -eq 0 ] && rc_tests=$rc
    summary+=("shard $i/$SHARDS: exit $rc | $(grep -E '[0-9]+ (passed|failed|errors?)' "$logs/shard$i.log" | tail -1)")
done
failed_tests=$(cat "$logs"/shard*.log | grep -cE '^(FAILED|ERROR) ')
rc_compile=0
for j in "${!compile_pids[@]}"; do
    wait "${compile_pids[$j]}"
    rc=$?
    echo "-- benchmark kernels compiled ahead, part $j/$COMPILERS (exit $rc)"
    tail -20 "$logs/compile$j.log"
    [ $rc -ne 0 ] && [ $rc_compile -eq 0 ] && rc_compile=$rc
    summary+=("benchmark kernels compiled ahead, part $j/$COMPILERS: exit $rc | $(grep -E 'benchmark steps once' "$logs/compile$j.log" | tail -1)")
done
wait $probe_compile_pid
echo "-- the probe's kernels compiled ahead and checked (exit $?)"
cat "$logs/probe_compile.log"

# The fused GEMM's launches one by one beside cuBLAS (forward and dx through pointers and TMA, B stored
# either way round, the low-rank epilogue alone; last, warp-specialised beside the same tile without):
# where the step's time goes. Informational, as the more benchmarks below are.
echo "== probe (bench/gpu_probe.py)"
timeout 60 "$PY" bench/gpu_probe.py --json "$OUT/probe.json"
rc_probe=$?
[ $rc_probe -eq 124 ] && echo "probe: stopped at its 60 s time box"

echo "== benchmark (preset gpu-check)"
timeout 180 "$PY" -m fused_lora.cli bench --preset gpu-check --time-budget 125 --out "$OUT"
rc_bench=$?
[ $rc_bench -eq 124 ] && echo "benchmark: TIMED OUT after 180 s (partial results are in $OUT)"

# Where an eager call's host time goes at small M (the benchmark's eager table, and any M where the GPU
# finishes first): fused_lora's Python alone (launches stubbed), then with the launches, and cProfile's
# most expensive functions of the latter (fused_lora's, Triton's launcher, PyTorch's). Informational.
# The Triton plan's (FUSED_LORA_EAGER_CUBLAS=0: eager calls at M=16 would run cuBLAS by default, with
# dropout too, after the keep-mask pass; profiled at dropout 0.1; what eager calls run from M·N·K =
# 8192·4096·4096 on): its
# launches through the launch cache (the default: a specialisation compiled before goes to its compiled
# kernel, without Triton's binding and key); then the same without it (FUSED_LORA_LAUNCH_CACHE=0), and with
# kernel-made TMA descriptors; and at M=4096 with and without the cache; then the default (cuBLAS; with
# dropout after the keep-mask pass, recorded for autograd at M=16, through their autograd Function at
# M=4096, which the row "fused Function cuBLAS" times at both M) at M=16 and M=4096; last, whole layers and
# models, PEFT's against the same after from_peft (--layers --blocks 4: a 4096-wide Llama of 4 blocks, M=16,
# its 28 linears' host costs added up). After the benchmark, whose table comes first: the runs share a 125 s
# deadline (each about 10 s, most of it imports; the last up to 45 s), and none ends after 460 s, so that the
# script ends within the device call's 480 s; a run not started says so.
echo "== host time per call (bench/host_overhead.py, M=16 4096->4096 r=16: launches stubbed, then launched)"
host=(bench/host_overhead.py --k 4096 --n 4096 --r 16 --reps 100)
host_deadline=$(( SECONDS + 125 < 435 ? SECONDS + 125 : 435 ))
host_run() {  # (HOST_TIMEOUT: a run's own limit, 25 s unless set; none ends after 460 s)
    local limit=${HOST_TIMEOUT:-25}
    if [ $SECONDS -ge $host_deadline ] || [ $(( SECONDS + limit )) -gt 460 ]; then
        echo "(not run: the host-time checks' time is spent)"
        return
    fi
    timeout "$limit" "$PY" "${host[@]}" "$@"
}
FUSED_LORA_EAGER_CUBLAS=0 host_run --m 16
FUSED_LORA_EAGER_CUBLAS=0 host_run --m 16 --real --profile 30 --profile-dropout 0.1
echo "-- the same, launched without the launch cache (FUSED_LORA_LAUNCH_CACHE=0: Triton's kernel[grid] each launch)"
FUSED_LORA_EAGER_CUBLAS=0 FUSED_LORA_LAUNCH_CACHE=0 host_run --m 16 --real --profile 30 --profile-dropout 0.1
echo "-- launch cache and TMA's descriptors made by the kernels (FUSED_LORA_TMA_DESCRIPTORS=device)"
FUSED_LORA_EAGER_CUBLAS=0 FUSED_LORA_TMA_DESCRIPTORS=device host_run --m 16 --real
echo "-- M=4096, launched, with and without the launch cache"
FUSED_LORA_EAGER_CUBLAS=0 host_run --m 4096 --real --reps 20
FUSED_LORA_EAGER_CUBLAS=0 FUSED_LORA_LAUNCH_CACHE=0 host_run --m 4096 --real --reps 20
echo "-- the default dispatch (eager calls: cuBLAS; with dropout too, after the keep-mask pass)"
host_run --m 16 --real --profile 15 --profile-dropout 0.1
host_run --m 4096 --real --reps 20
echo "-- PEFT's LoRA layer and a 4-block Llama (4096 wide, LoRA on its 28 linears) against the same after from_peft"
HOST_TIMEOUT=45 host_run --m 16 --real --layers --blocks 4

# pytest bench/'s PEFT-layer, several-adapter, DoRA and quantized-base (int8, NF4) benchmarks (fused against
# PEFT's LoRA layer as a user swaps it (from_peft), PEFT's mixed batch, PEFT's own model serving several
# adapters, PEFT's DoRA layer, the 16-bit base), last and only in the
# time the box leaves: about 400 s in all
# (their kernels are mostly the benchmark's, compiled already). Informational: their exit does not fail the check.
echo "== more benchmarks, as time allows (pytest bench/: PEFT's layer, several adapters, DoRA, int8 and NF4 bases)"
left=$(( 400 - SECONDS ))
if [ $left -ge 30 ]; then
    timeout $left "$PY" -m pytest -q -p no:cacheprovider -o addopts="" bench/test_bench_lora.py \
        -k "peft_lora_layer or multi_adapter or peft_serving or dora or quantized_base" \
        --benchmark-max-time=0.25 --benchmark-min-rounds=3 \
        --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/bench_more.json"
    rc_more=$?
    [ $rc_more -eq 124 ] && echo "more benchmarks: stopped at the time box ($left s)"
else
    rc_more="skipped ($left s left)"
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
echo "tests: exit $rc_tests ($failed_tests failed or errors, named in the shards' summaries above) | probe: exit $rc_probe | benchmark: exit $rc_bench | more benchmarks: exit $rc_more | results in $OUT"
if [ -f "$OUT/results.md" ]; then
    grep -E '^\| (case \| mode|M=(8192|16) 4096->4096 r=16)' "$OUT/results.md" | head -13 || true
fi
[ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ]
