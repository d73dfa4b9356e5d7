"""The kernels on the GPU test machine's Triton as well as on this one's.

Our H200 machine runs Triton 3.6 (``../shared/design/GPU.md``); this machine
and CI get the newest Triton. The two compile the same kernel source to
different code (3.6's dropout epilogue once spilled 1.7 KB where 3.9's did
not), so `make test` installs the GPU machine's Triton beside the newest one
(``FUSED_LORA_GPU_TRITON``: a ``pip --target`` folder put first on the path)
and these tests run, in subprocesses with that Triton:

* the compile report for sm_90 (``--scope paths``): every code path (each
  kernel specialisation at its largest rank tile) compiles, fits shared
  memory, does not spill, and the 16-bit GEMMs use wgmma;
* ``fused-lora check`` under the interpreter: every kernel path (the three
  strategies, dropout, trainable base, TMA) against the float64 reference.
"""

import json
import os
import subprocess
import sys

import pytest
from fused_lora import compile_report
from lora_testing import BackgroundCompileReports, compiled_as_planned, warp_specialized_report

GPU_MACHINE_TRITON = "3.6"
TRITON_DIR = os.environ.get("FUSED_LORA_GPU_TRITON")

if not TRITON_DIR:
    reason = "FUSED_LORA_GPU_TRITON is not set (`make test` installs Triton 3.6 there and sets it)"
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run these tests: {reason}")
    pytest.skip(reason, allow_module_level=True)


def _python(args: list[str], interpret: bool, timeout: int) -> subprocess.CompletedProcess:
    env = BackgroundCompileReports.environment("gpu_machine", interpret)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_gpu_machines_triton_is_the_one_imported():
    proc = _python(["-c", "import triton, numpy; print(triton.__version__, triton.__file__)"], False, 120)
    assert proc.returncode == 0, proc.stderr
    version, path = proc.stdout.split()
    assert version.startswith(GPU_MACHINE_TRITON + "."), proc.stdout
    assert os.path.realpath(path).startswith(os.path.realpath(TRITON_DIR)), path


def test_every_config_compiles_for_sm90_cleanly_on_the_gpu_machines_triton(gpu_machine_sm90_report):
    # (`compile_report --arch 90 --json --scope paths`, run from the session's start: conftest)
    proc = gpu_machine_sm90_report
    assert proc.stdout.strip(), proc.stderr[-2000:]  # (a crash prints no report)
    report = json.loads(proc.stdout)
    assert report["triton"].startswith(GPU_MACHINE_TRITON + "."), report["triton"]
    # every code path once, on the tile it runs with at large M at its largest rank tile (and fp16's twins
    # near the limit)
    assert report["scope"] == BackgroundCompileReports.SCOPES["gpu_machine"] == "paths"
    assert len(compiled_as_planned(report)) > 350
    assert report["problems"] == [], "\n".join(report["problems"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(r["pass_name"] == "dx_dropout" and r["config"]["block_m"] == 128 and r["config"]["block_n"] == 128
               for r in report["results"])  # the tile that spilled before the mask moved


def test_each_known_problem_is_still_found_and_is_ptxas_trading_a_spill_for_occupancy_on_3_6():
    """``compile_report --check-known`` with the GPU machine's Triton (see
    test_compile_report's test of the same name)."""
    proc = _python(["-m", "fused_lora.compile_report", "--check-known", "--json", "--jobs", "2"], False, 900)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["triton"].startswith(GPU_MACHINE_TRITON + "."), report["triton"]
    assert report["failures"] == [] and proc.returncode == 0, report["failures"]
    entries = [k for k in compile_report.KNOWN_PROBLEMS if k.triton == GPU_MACHINE_TRITON]
    assert entries and len(report["results"]) == 2 * sum(len(k.dtypes) for k in entries)


def test_the_warp_specialised_gemms_compile_and_triton_takes_them_on_3_6():
    """``compile_report --warp-specialized`` with the GPU machine's Triton,
    which bench/gpu_probe.py's ``+ws`` rows run on (see test_compile_report's
    test of the same name)."""
    proc = _python(["-m", "fused_lora.compile_report", "--warp-specialized", "--json", "--jobs", "2"], False, 900)
    warp_specialized_report(proc)
    assert json.loads(proc.stdout)["triton"].startswith(GPU_MACHINE_TRITON + ".")


def test_every_kernel_path_passes_parity_on_the_gpu_machines_triton():
    proc = _python(["-m", "fused_lora.cli", "check", "--json"], True, 600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["versions"]["triton"].startswith(GPU_MACHINE_TRITON + ".")
    assert result["passed"] and len(result["rows"]) >= 20
    failed = [r for r in result["rows"] if not r["passed"]]
    assert failed == []
    assert {r["path"].split()[0] for r in result["rows"]} == {"in_loop", "split", "hybrid", "cublas"}
    assert any("+tma" in r["path"] for r in result["rows"]) and any("+dropout" in r["path"] for r in result["rows"])
