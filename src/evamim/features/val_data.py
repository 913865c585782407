"""The validation set of an evaluation task (``val_data.*``): another path, or a held-out part of ``data``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ValDataSection:
    """The validation set: ``data``'s settings with another path, or a held-out part of ``data``."""

    path: str = ""
    """Validation images (same source kind and settings as ``data`` unless ``source`` is set), e.g.
    an ImageFolder ``val/`` tree with the same class sub-folders as the training one."""
    source: str | None = None
    """``folder``, ``list``, ``shards`` or ``synthetic``; None = ``data.source``."""
    holdout: float = 0.0
    """Instead of ``path``: hold out this fraction of every class of ``data`` (drawn with ``data.seed``)."""

    def check(self, data: Any) -> list[str]:
        """Problems with this section (``data``: the training DataConfig), as messages that say what to change."""
        if self.holdout and self.path:
            return ["set val_data.path or val_data.holdout, not both"]
        if not self.path and not self.holdout:
            return ["no validation set: set val_data.path=<folder or list of labelled images>, or val_data.holdout=0.1"]
        if self.holdout and not 0 < self.holdout < 1:
            return [f"val_data.holdout must be in (0, 1), got {self.holdout}"]
        if self.path and (self.source or data.source) == "synthetic":
            return [
                f"val_data.path={self.path!r} is set but the validation source is 'synthetic', which ignores it: "
                "set data.source (or val_data.source) to folder, list or shards"
            ]
        return []


def val_data_config(data: Any, val: ValDataSection) -> Any:
    """``data`` with the validation path and source (every other setting shared, so both sets see the same pixels)."""
    return dataclasses.replace(data, path=val.path, source=val.source or data.source)


def _class_folders(root: str) -> list[str]:
    # The folder source's rule: class = non-hidden sub-folder, index = position in sorted order.
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def check_same_classes(train_cfg: Any, val_cfg: Any) -> None:
    """Folder sources number classes by their sorted sub-folder names, so train and val must have the same ones.

    Raises:
        ValueError: the class folders differ (the message names the first differences).
    """
    if not (train_cfg.source == val_cfg.source == "folder" and train_cfg.labels):
        return
    if not (Path(train_cfg.path).is_dir() and Path(val_cfg.path).is_dir()):
        return  # the loader reports the missing folder with its path
    train, val = _class_folders(train_cfg.path), _class_folders(val_cfg.path)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(
            f"the class folders of {val_cfg.path} ({len(val)}) differ from those of {train_cfg.path} ({len(train)}): "
            f"only in train {only_train[:5]}, only in val {only_val[:5]}. Class indices come from the sorted folder "
            "names, so both trees need the same class folders (an empty one is not allowed: use a list file)"
        )


def class_problems(data: Any, val_data: ValDataSection) -> list[str]:
    """``check_same_classes`` for a task's validate(): a list with the message, or empty."""
    if not val_data.path:
        return []
    try:
        check_same_classes(data, val_data_config(data, val_data))
    except ValueError as error:
        return [str(error)]
    return []
