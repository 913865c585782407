"""Errors raised while building or running a teacher, with messages that say how to fix them."""

from __future__ import annotations

import os
from typing import Sequence


class TeacherWeightsNotFoundError(FileNotFoundError):
    """The teacher's weights are neither a local file nor in a cache, and could not be downloaded."""


class GridMismatchError(ValueError):
    """The teacher cannot produce targets on the student's patch grid."""


def hub_cache_dir() -> str:
    """The Hugging Face hub cache in effect (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")
    return str(constants.HF_HUB_CACHE)


def weights_not_found(
    spec: str, looked_for: Sequence[str], cause: BaseException | None = None
) -> TeacherWeightsNotFoundError:
    """A TeacherWeightsNotFoundError that names what was looked for and every way to provide the weights."""
    lines = [f"cannot load the weights of teacher {spec!r}.", "Looked for:"]
    lines += [f"  - {item}" for item in looked_for]
    lines += [
        "Ways to provide them without network access:",
        "  - put a weights file in the spec: 'open_clip:MODEL/path/to/weights.bin' (an open_clip, OpenAI or "
        "timm-hub checkpoint), 'timm:MODEL/path/to/model.safetensors', or 'hf:/path/to/dir' (a "
        "save_pretrained / snapshot directory of a CLIP model);",
        f"  - copy a Hugging Face cache that holds them to HF_HOME or HF_HUB_CACHE (now {hub_cache_dir()}), or "
        "pass cache_dir=...; the open_clip OpenAI files are also found in ~/.cache/clip (open_clip's URL cache);",
        "  - set HF_HUB_OFFLINE=1 to use caches only, with no network attempts and retries;",
        "  - or use an evamim model directory as the teacher: 'local:/path/to/dir'.",
    ]
    if cause is not None:
        lines.append(f"Underlying error: {type(cause).__name__}: {cause}")
    return TeacherWeightsNotFoundError("\n".join(lines))


def grid_text(grid: Sequence[int]) -> str:
    return f"{grid[0]}x{grid[1]}"
