"""pytest-benchmark suite configuration: on a machine without a CUDA GPU the
kernels run on Triton's interpreter, so the benchmarks run once each as smoke
tests (timing disabled) instead of producing meaningless numbers."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if not torch.cuda.is_available() and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
