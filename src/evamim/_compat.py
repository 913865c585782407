"""Import-time fixes that must run before anything imports torchvision.

torchvision wheels are built against one torch build. On a machine where torch is the CPU build but
torchvision's compiled ops (``torchvision/_C.so``) were built for CUDA, loading ``_C`` fails, and
``import torchvision`` then dies in ``_meta_registrations`` with
``RuntimeError: operator torchvision::nms does not exist`` -- which breaks timm, open_clip and
transformers' image utilities too. Declaring the two op schemas that module registers fakes for lets
the import succeed; transforms work, while the C++ ops themselves (nms, roi_align, decode_jpeg)
stay unavailable. evamim decodes with PIL and never calls them.

On a machine whose torchvision loads its ops, this module does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# The schemas torchvision's _meta_registrations.py registers fakes for with torch.library.register_fake,
# copied from torchvision/csrc/ops/nms.cpp and qnms.cpp.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_state: dict[str, object] = {"patched": False, "library": None}


def _torchvision_ops_library() -> Path | None:
    """Path of torchvision's compiled ops library, or None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd"))
        if candidates:
            return candidates[0]
    return None


def _ops_library_loads(path: Path) -> bool:
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):
        return False
    return True


def _schema_declared(name: str) -> bool:
    try:
        torch._C._get_schema(name, "")
    except RuntimeError:
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work on CPU-only torch with a CUDA-built torchvision.

    Returns True when the op schemas had to be declared, False when nothing was needed
    (torchvision absent, already imported, or its compiled ops load).
    """
    if _state["patched"]:
        return True
    if "torchvision" in sys.modules:
        return False
    return declare_torchvision_schemas()


def declare_torchvision_schemas() -> bool:
    """The guard itself, for a caller that knows torchvision is about to execute (the import hook, which runs
    when torchvision is already in ``sys.modules`` but not yet executed). Same return value as above."""
    if _state["patched"]:
        return True
    library_path = _torchvision_ops_library()
    if library_path is None or _ops_library_loads(library_path):
        return False
    if _schema_declared("torchvision::nms"):
        return False  # declared already (by another copy of this module): declaring twice is an error
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    # The Library object must outlive this call: its destructor would remove the schemas again.
    _state["library"] = library
    _state["patched"] = True
    return True


GUARD_PTH_NAME = "evamim_torchvision_guard.pth"


def install_torchvision_hook(site_packages: str | Path | None = None) -> Path:
    """Write a ``.pth`` line into ``site_packages`` (default: this interpreter's) that installs
    ``_evamim_torchvision_guard`` at start-up, so that ``import torchvision`` / timm / open_clip / transformers
    work in this environment before, or without, ``import evamim``. Returns the file written.

    This is part of building the environment (``make install`` calls it): user code needs no import order.
    """
    import sysconfig

    directory = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = directory / GUARD_PTH_NAME
    path.write_text("import _evamim_torchvision_guard; _evamim_torchvision_guard.install()\n")
    return path
