"""Test configuration.

Without a CUDA GPU the kernels run on Triton's CPU interpreter: this sets
``TRITON_INTERPRET=1`` (unless the caller set it) before fused_lora is
imported, because Triton reads it when the kernels are decorated. With a GPU
the same tests run on CUDA.

The sm_90 compile reports (``test_compile_report``, ``test_gpu_triton``)
compile hundreds of kernels each (``lora_testing.BackgroundCompileReports``
says how many); they start in subprocesses when collection ends and run,
niced, on the cores the rest of the suite leaves; the tests that read them
run last.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing here reaches the network (the models are built from configs, the Hub's adapters read from a cache the
# tests write): a Hub id that is not cached fails at once, not after a timeout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fused_lora  # noqa: E402  (after the interpreter switch)
import triton  # noqa: E402
from fused_lora.testing import fewer_interpreter_patches  # noqa: E402
from lora_testing import BackgroundCompileReports, parse_shard, shard  # noqa: E402

#: The sm_90 compile reports, by the fixture that asks for each.
COMPILE_REPORT_FIXTURES = {"sm90_report": "newest", "gpu_machine_sm90_report": "gpu_machine"}
_reports = BackgroundCompileReports()


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="i/n", default=None,
                     help="run only every n-th collected test, starting at the i-th (counted from 0; "
                          "tests marked own_shard make up shard 0 alone, the rest interleave over the "
                          "others): bench/gpu_check.sh runs n shards at once, because on a GPU most of "
                          "the suite's time is Triton compiling kernels, one core per process")


def pytest_configure(config):
    spec = config.getoption("--shard")
    if spec is not None:
        try:
            parse_shard(spec)
        except ValueError as err:
            raise pytest.UsageError(str(err)) from None


def _wants_report(item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in COMPILE_REPORT_FIXTURES)


def pytest_collection_modifyitems(config, items):
    # The tests of the compile reports run last: the reports run beside the rest (pytest_collection_finish).
    items.sort(key=_wants_report)  # (stable: each part keeps its order)
    spec = config.getoption("--shard")
    if spec is None:
        return
    # Tests marked own_shard (the heaviest compilers) make up shard 0 alone;
    # the rest are interleaved over the other shards.
    mine = shard(items, *parse_shard(spec), alone=lambda item: item.get_closest_marker("own_shard") is not None)
    chosen = {id(item) for item in mine}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in chosen])
    items[:] = mine


def pytest_collection_finish(session):
    """Start the compile reports the selected tests need, in subprocesses:
    compiling hundreds of kernels for sm_90 takes every core for minutes,
    while the rest of the suite runs on one."""
    if session.config.option.collectonly:
        return
    wanted = {fixture for item in session.items for fixture in getattr(item, "fixturenames", ())}
    for fixture, name in COMPILE_REPORT_FIXTURES.items():  # (the newest Triton's first)
        if fixture in wanted:
            _reports.start(name)


def pytest_unconfigure(config):
    _reports.stop()


@pytest.fixture(scope="session")
def sm90_report():
    """The sm_90 compile report with this Triton: the finished subprocess."""
    return _reports.result("newest")


@pytest.fixture(scope="session")
def gpu_machine_sm90_report():
    """The sm_90 compile report with the GPU machine's Triton (``FUSED_LORA_GPU_TRITON``)."""
    return _reports.result("gpu_machine")


def pytest_report_header(config):
    if torch.cuda.is_available():
        where = f"CUDA ({torch.cuda.get_device_name()})"
    elif fused_lora._triton.interpreter():
        where = "Triton CPU interpreter (TRITON_INTERPRET=1)"
    else:
        where = "CPU, Triton kernels unavailable: " + (fused_lora._triton.UNAVAILABLE_REASON or "not interpreted")
    lines = [f"fused_lora kernels on: {where}; torch {torch.__version__}, triton {triton.__version__}"]
    if config.getoption("--shard"):
        lines.append(f"shard {config.getoption('--shard')}: every n-th test only")
    return lines


@pytest.fixture(scope="session", autouse=True)
def _fewer_interpreter_patches():
    """The interpreter patches triton.language once per launch, not again at
    every helper call (:func:`fused_lora.testing.fewer_interpreter_patches`)."""
    with fewer_interpreter_patches():
        yield


@pytest.fixture(autouse=True)
def _triton_plan_in_eager_calls():
    """The suite tests the kernels: an eager call on a GPU runs its Triton
    plan, not cuBLAS alone (the dispatch's default at dropout 0 below a size,
    ``fused_lora.dispatch.eager_cublas_reason``; ``tests/test_eager_cublas.py``
    tests that path, and the rule, with it on). Nothing changes on the
    interpreter, where the rule never applies."""
    with fused_lora.dispatch.use_eager_cublas(False):
        yield


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every buffer a kernel is meant to write starts as NaN."""
    if fused_lora._triton.available():
        with fused_lora._triton.get().poison_outputs():
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible torch seed per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
