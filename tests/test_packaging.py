"""The distribution ships the kernels inside the package (fused_lora.kernels)
and never installs a top-level module named ``kernels``."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fused_lora

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_are_a_subpackage():
    import fused_lora.kernels as k

    assert k.__name__ == "fused_lora.kernels"
    assert Path(k.__file__).name == "__init__.py"
    # A checkout's root on sys.path makes kernels/ importable as a top-level
    # `kernels` (transformers probes for a PyPI package of that name): it must
    # then be an inert shell, never a second copy of the kernels.
    shadow = sys.modules.get("kernels")
    if shadow is not None:
        assert not hasattr(shadow, "lora_gemm") and getattr(shadow, "__version__", None) is None


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fused_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"fused_lora", f"fused_lora-{fused_lora.__version__}.dist-info"}, top_level
    for module in ("__init__", "common", "configs", "gemm", "skinny"):
        assert f"fused_lora/kernels/{module}.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"fused_lora-{fused_lora.__version__}.dist-info/entry_points.txt")
    assert b"fused-lora = fused_lora.cli:main" in entry_points
