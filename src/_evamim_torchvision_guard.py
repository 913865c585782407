"""An import hook that lets ``import torchvision`` (and so timm, open_clip, transformers) work in any import order
where torch is a CPU build and torchvision a CUDA build (see ``evamim._compat``).

``make install`` writes a ``.pth`` line that calls :func:`install` at interpreter start-up. That only puts a
finder on ``sys.meta_path``, which imports nothing. The finder wraps torchvision's loader, so that when
torchvision is actually imported (not when a library merely probes for it with ``importlib.util.find_spec``,
which torch itself does while it is being imported) evamim's guard runs first and declares the op schemas
torchvision's import needs, then gives ``torchvision.ops.nms`` and ``roi_align`` evamim's CPU paths. A top-level module, not
part of the evamim package, so start-up imports no torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _GuardedLoader(importlib.abc.Loader):
    """torchvision's own loader, with evamim's guard run just before the package executes."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # From here on the module is torchvision's as usual (resource lookups go to its real loader).
        module.__loader__ = module.__spec__.loader = self._loader
        try:
            from evamim._compat import declare_torchvision_schemas, enable_cpu_detection_ops
        except ImportError:  # evamim was uninstalled but the .pth line stayed: import as if it were not here
            self._loader.exec_module(module)
            return
        declare_torchvision_schemas()
        self._loader.exec_module(module)
        enable_cpu_detection_ops()  # torchvision.ops.nms on the CPU kernel the schemas came with, a faster roi_align

    def __getattr__(self, name):
        return getattr(self._loader, name)


class TorchvisionGuard(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder for torchvision alone: the regular spec, with the loader guarded."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _GuardedLoader):
            spec.loader = _GuardedLoader(spec.loader)
        return spec


def install() -> None:
    """Put the guard first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, TorchvisionGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionGuard())
