"""The sample count of a shard set, from the ``<prefix>-info.json`` that ``evamim data make-shards`` writes.

``make_shards`` writes, next to its shards, ``<prefix>-info.json`` (``shard-info.json`` by default)
holding ``{"shards": [{"name": "shard-000000.tar", "samples": 1000}, ...], "num_samples": ...}``. When
``data.samples_per_epoch`` is not set, the loader reads the count of the shards it was given from
there, so that the length of an epoch (and the schedules built on it) is known without counting.

Only local shards are looked up, and only a count covering *every* shard given is used: a shard set
without info files, remote shards (URLs, ``pipe:`` commands) or a shard missing from the info files
give None, and the loader behaves as without a count.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from evamim.data.shards import is_remote

logger = logging.getLogger("evamim.data")

INFO_SUFFIX = "-info.json"


def shard_set_size(urls: list[str]) -> int | None:
    """Samples in the shards ``urls`` according to the info files next to them, or None (see the module docstring)."""
    counts: dict[str, dict[str, int]] = {}  # folder -> shard file name -> samples
    total = 0
    for url in urls:
        if is_remote(url):
            return None
        path = Path(url.removeprefix("file:"))
        folder = str(path.parent)
        if folder not in counts:
            counts[folder] = _folder_counts(path.parent)
        count = counts[folder].get(path.name)
        if count is None:
            if counts[folder]:
                logger.info("%s is not listed in the shard info files of %s: the epoch length stays unknown", url, folder)
            return None
        total += count
    return total


def _folder_counts(folder: Path) -> dict[str, int]:
    """Shard name -> sample count over every ``*-info.json`` in ``folder``; an unusable file is skipped with a warning."""
    counts: dict[str, int] = {}
    try:
        names = sorted(name for name in os.listdir(folder) if name.endswith(INFO_SUFFIX))
    except OSError:
        return counts
    for name in names:
        path = folder / name
        try:
            shards = json.loads(path.read_text())["shards"]
            listed = {str(entry["name"]): int(entry["samples"]) for entry in shards}
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring shard info file %s: %s: %s", path, type(error).__name__, error)
            continue
        counts.update(listed)
    return counts
