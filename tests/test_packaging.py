"""The distribution ships the kernels inside the package (fused_lora.kernels)
and never installs a top-level module named ``kernels``."""

import importlib.metadata
import importlib.util
import re
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


def _can_build_wheel_offline() -> bool:
    """``pip wheel --no-build-isolation`` builds with the setuptools installed
    here, whose ``bdist_wheel`` is its own from setuptools 70.1 on and the
    ``wheel`` package's before (a Python 3.11 venv starts with setuptools 65)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    release = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("setuptools"))
    return release is not None and (int(release[1]), int(release[2])) >= (70, 1)


@pytest.mark.skipif(not _can_build_wheel_offline(),
                    reason="building a wheel offline needs setuptools >= 70.1 or the wheel package")
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
