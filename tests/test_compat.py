"""The torchvision import guard: makes torchvision importable on CPU-only torch, does nothing elsewhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import evamim._compat as compat

COMPAT_FILE = Path(compat.__file__)


def _run_isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter with _compat loaded standalone (evamim's __init__ not run)."""
    prelude = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('compat', {str(COMPAT_FILE)!r})\n"
        "compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)\n"
    )
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_torchvision_and_its_dependents_import_after_evamim():
    out = _run_isolated(
        "compat.ensure_torchvision_importable()\n"
        "import torchvision, timm, open_clip\n"
        "from torchvision.transforms import v2\n"
        "print('ok', v2.RandomResizedCrop(8)(__import__('torch').zeros(3, 16, 16)).shape)\n"
    )
    assert out.startswith("ok torch.Size([3, 8, 8])")


def test_healthy_torchvision_is_left_alone():
    """When torchvision's compiled ops load, no schema is declared and nothing is kept."""
    out = _run_isolated(
        "compat._ops_library_loads = lambda path: True\n"
        "print(compat.ensure_torchvision_importable(), compat._state['library'])\n"
    )
    assert out.split() == ["False", "None"]


def test_already_imported_torchvision_is_left_alone():
    out = _run_isolated(
        "compat.ensure_torchvision_importable()\n"
        "import torchvision\n"
        "compat._state['patched'] = False\n"
        "print(compat.ensure_torchvision_importable())\n"
    )
    assert out.split() == ["False"]


def test_core_import_stays_light():
    """``import evamim`` and building a model must not pull in timm, open_clip, transformers or torchvision."""
    code = (
        "import sys, evamim\n"
        "evamim.create_model('eva_tiny_p16', depth=1)\n"
        "heavy = [m for m in ('timm', 'open_clip', 'transformers', 'torchvision', 'webdataset') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # four fresh interpreters importing timm / open_clip / transformers: about 30 s
def test_documented_imports_work_in_any_order_in_the_built_environment():
    """``make install`` puts the guard into the environment itself, so that a user's ``import timm`` (or
    open_clip, transformers, torchvision) needs no ``import evamim`` first; a fresh interpreter proves it."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert (site / compat.GUARD_PTH_NAME).is_file(), "build the environment with `make install`"
    for first in ("timm", "open_clip", "transformers", "torchvision"):
        result = subprocess.run([sys.executable, "-c", f"import {first}; import evamim, timm; print('ok')"],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0 and result.stdout.strip() == "ok", (first, result.stderr[-2000:])


def _run_with_hook_only(site_dir: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter whose only start-up hook is the one installed into ``site_dir``."""
    compat.install_torchvision_hook(site_dir)
    code = f"import site\nsite.addsitedir({str(site_dir)!r})\n" + code
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=180,
                            env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_start_up_hook_imports_nothing_until_torchvision_is_imported(tmp_path):
    out = _run_with_hook_only(tmp_path, (
        "import sys\n"
        "print('torch' in sys.modules, 'evamim' in sys.modules)\n"
        "import torchvision\n"
        "print('evamim' in sys.modules, type(torchvision.__loader__).__name__)\n"
    ))
    # Nothing at start-up; evamim's guard at the import; then torchvision is an ordinary package.
    assert out.split() == ["False", "False", "True", "SourceFileLoader"]


def test_a_probe_for_torchvision_runs_nothing(tmp_path):
    """torch probes for torchvision with importlib.util.find_spec while it is itself being imported: the guard
    must act on the import only (running it then would import evamim half-way through torch's import)."""
    out = _run_with_hook_only(tmp_path, (
        "import importlib.util, sys\n"
        "importlib.util.find_spec('torchvision')\n"
        "print('torch' in sys.modules, 'evamim' in sys.modules)\n"
        "import torch, evamim, timm\n"
    ))
    assert out.split() == ["False", "False"]
