"""The distribution ships the kernels inside the package (fused_lora.kernels)
and never installs a top-level module named ``kernels``."""

import importlib.metadata
import importlib.util
import os
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
    # `kernels` (transformers imports a PyPI package of that name): it is then
    # that package, where installed, or an inert shell, never a second copy of
    # the kernels.
    shadow = sys.modules.get("kernels")
    if shadow is not None:
        assert not hasattr(shadow, "lora_gemm")
        if Path(shadow.__file__).resolve() == ROOT / "kernels" / "__init__.py":
            assert getattr(shadow, "__version__", None) is None


@pytest.mark.parametrize("installed", [False, True])
def test_a_top_level_kernels_import_from_a_checkout_is_the_installed_package_or_nothing(tmp_path, installed):
    """From a checkout's root (``python -m pytest``, ``PYTHONPATH=.``),
    ``import kernels`` (transformers 5.25 and bitsandbytes import Hugging
    Face's ``kernels``) gets the installed package of that name, not the
    checkout's ``kernels/``: here a stand-in for it, later on the path; with
    none anywhere, the checkout's empty shell."""
    site = tmp_path / "site"
    if installed:
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("__version__ = '9.9'\nfrom .hub import get_kernel\n")
        (site / "kernels" / "hub.py").write_text("def get_kernel(name):\n    return name\n")
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "import kernels\n"
            "print(kernels.__file__)\n"
            "print(getattr(kernels, '__version__', None), getattr(kernels, '__all__', None))\n"
            "print(sys.modules['kernels'] is kernels)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    file, attributes, same = run.stdout.split("\n")[:3]
    if installed:
        assert Path(file) == site / "kernels" / "__init__.py" and attributes == "9.9 None" and same == "True"
    else:
        assert Path(file) == ROOT / "kernels" / "__init__.py" and attributes == "None []" and same == "True"


def test_a_checkout_imports_its_own_kernels_beside_another_checkouts_editable_install(tmp_path):
    """Run from a checkout (``PYTHONPATH=.``), fused_lora takes the kernels
    from that checkout's ``kernels/`` even when an editable install of another
    checkout is on the path: setuptools then adds a finder that maps
    ``fused_lora.kernels`` to the other checkout's ``kernels/``, which would
    pair this checkout's Python with that one's kernels."""
    other = tmp_path / "other_checkout" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OTHER_CHECKOUT = True\n")
    script = f"""
import importlib.abc, importlib.util, sys

class OtherCheckoutsEditableFinder(importlib.abc.MetaPathFinder):  # as setuptools' editable finder
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "fused_lora.kernels":
            return importlib.util.spec_from_file_location(
                fullname, {str(other / "__init__.py")!r}, submodule_search_locations=[{str(other)!r}])

sys.meta_path.append(OtherCheckoutsEditableFinder())
import fused_lora, fused_lora.kernels
print(fused_lora.__file__)
print(fused_lora.kernels.__file__)
print(fused_lora.kernels.gemm.__file__)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    package, kernels, gemm = (Path(line) for line in run.stdout.split())
    assert package == ROOT / "fused_lora" / "__init__.py"
    assert kernels == ROOT / "kernels" / "__init__.py", kernels
    assert gemm == ROOT / "kernels" / "gemm.py", gemm


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
    for module in ("__init__", "common", "configs", "gemm", "skinny", "launch", "dora", "dequant"):
        assert f"fused_lora/kernels/{module}.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"fused_lora-{fused_lora.__version__}.dist-info/entry_points.txt")
    assert b"fused-lora = fused_lora.cli:main" in entry_points
