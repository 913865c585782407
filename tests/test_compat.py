"""The torchvision import guard: makes torchvision importable on CPU-only torch, does nothing elsewhere."""

import subprocess
import sys
from pathlib import Path

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
