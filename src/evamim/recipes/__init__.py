"""Recipes: YAML deltas over a command's defaults, shipped in the package, one folder per command
(``pretrain/``, ``finetune/``, ``segment/``, ``knn/``, ``linprobe/``).

``--config NAME`` finds ``<command>/NAME.yaml`` here from any directory; ``--config PATH`` reads a file as
before. A recipe's first comment line is its summary (``evamim list recipes``). Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SUFFIXES = (".yaml", ".yml")


def _folder(command: str) -> Traversable | None:
    folder = resources.files(__name__) / command
    return folder if folder.is_dir() else None


def commands() -> list[str]:
    """The commands that ship recipes, sorted."""
    return sorted(entry.name for entry in resources.files(__name__).iterdir()
                  if entry.is_dir() and names(entry.name))


def names(command: str) -> list[str]:
    """The recipes of ``command`` (file names without ``.yaml``), sorted; [] for a command without any."""
    folder = _folder(command)
    if folder is None:
        return []
    return sorted(entry.name.rsplit(".", 1)[0] for entry in folder.iterdir()
                  if entry.is_file() and entry.name.endswith(SUFFIXES))


def _entry(command: str, name: str) -> Traversable:
    folder = _folder(command)
    for suffix in SUFFIXES:
        entry = folder / f"{name}{suffix}" if folder is not None else None
        if entry is not None and entry.is_file():
            return entry
    raise KeyError(f"no recipe {name!r} for evamim {command}")


def path(command: str, name: str) -> Path:
    """The file of recipe ``name`` of ``command`` (KeyError when there is none)."""
    return Path(str(_entry(command, name)))


def summary(command: str, name: str) -> str:
    """The first comment line of a recipe, without the ``#``; '' when it starts with no comment."""
    for line in _entry(command, name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            return line.lstrip("#").strip() if line.startswith("#") else ""
    return ""


def looks_like_path(value: str) -> bool:
    """A ``--config`` value that names a file rather than a recipe: it has a directory part or a YAML suffix,
    or something of that name exists."""
    return "/" in value or "\\" in value or value.endswith(SUFFIXES) or Path(value).exists()


def resolve(command: str, value: str | None) -> str | Path | None:
    """What ``--config VALUE`` of ``evamim COMMAND`` names: a recipe of the command, else a path (returned
    as given: loading it reports a missing file or a directory). An unknown recipe name is a ConfigError
    that lists the command's recipes."""
    from evamim.config import ConfigError

    if value is None:
        return None
    value = str(value)
    available = names(command)
    if looks_like_path(value):
        stem = Path(value).name.rsplit(".", 1)[0]
        if not Path(value).exists() and Path(value).name == value and stem in available:
            raise ConfigError(f"config file not found: {value}; the recipe of that name is --config {stem}")
        return value
    if value in available:
        return path(command, value)
    if not available:
        raise ConfigError(f"--config {value}: evamim {command} ships no recipes and no file {value} exists; "
                          f"give the path to a YAML file")
    close = difflib.get_close_matches(value, available, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"--config {value}: no such recipe for evamim {command} and no such file{hint}; "
                      f"recipes: {', '.join(available)}; or give the path to a YAML file")
