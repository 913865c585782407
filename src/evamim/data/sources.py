"""``build_dataset``: the dataset ``DataConfig.source`` names, with its transform.

- ``folder``: ``FileSource.from_folder`` (ImageFolder tree; flat folders work without labels)
- ``list``: ``FileSource.from_list`` (``path`` or ``path label`` per line)
- ``csv``: ``FileSource.from_table`` (a CSV / TSV of image paths and captions, ``evamim.data.tables``)
- ``shards``: ``ShardDataset`` over WebDataset tar shards
- ``synthetic``: ``SyntheticShapes`` or ``SyntheticScenes`` (``data.synthetic_world``: drawn shapes with captions
  and shape labels)

``auto`` reads the kind inferred from ``path`` (``DataConfig.resolve_source``), synthetic without a
path. Map-style sources become a ``MapDataset``; shards an iterable ``ShardDataset``, whose epoch
length comes from ``data.samples_per_epoch`` or else from the shards' ``shard-info.json``
(``evamim.data.shard_info``). A missing or empty path fails here, at construction, with the path in
the message.
"""

from __future__ import annotations

import logging
from typing import Any

from evamim.data.config import DataConfig
from evamim.data.files import FileSource
from evamim.data.mapstyle import MapDataset
from evamim.data.shard_info import shard_set_size
from evamim.data.shards import ShardDataset, expand_shards
from evamim.data.scenes import SyntheticScenes
from evamim.data.synthetic import SyntheticShapes
from evamim.data.transforms import as_image_transform

logger = logging.getLogger("evamim.data")


def build_source(cfg: DataConfig) -> Any:
    """The map-style source of ``cfg`` (folder, list, csv or synthetic); not for shards."""
    kind = cfg.resolve_source()
    if kind == "folder":
        return FileSource.from_folder(cfg.path, labels=cfg.labels)
    if kind == "list":
        return FileSource.from_list(cfg.path, labels=cfg.labels)
    if kind == "csv":
        return FileSource.from_table(cfg.path, path_column=cfg.csv_path_column,
                                     caption_column=cfg.csv_caption_column, delimiter=cfg.csv_delimiter)
    if kind == "synthetic":
        world = SyntheticScenes if cfg.synthetic_world == "scenes" else SyntheticShapes
        return world(cfg.synthetic_size, cfg.synthetic_resolution, seed=cfg.seed)
    raise ValueError(f"data.source {kind!r} is not a map-style source")


def build_dataset(
    cfg: DataConfig,
    transform: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool | None = None,
) -> MapDataset | ShardDataset:
    """The dataset of ``cfg`` yielding sample dicts, each image made by ``transform``.

    ``rank``/``world_size`` only matter for shards (map-style datasets are split by the sampler).
    ``shuffle`` overrides ``cfg.shuffle`` (evaluation reads shards in order).
    """
    kind = cfg.resolve_source()  # a path set after the config was built is inferred now
    cfg.validate()
    transform = as_image_transform(transform)
    common = dict(seed=cfg.seed, labels=cfg.labels, captions=cfg.captions, max_image_pixels=cfg.max_image_pixels)
    if kind == "shards":
        urls = expand_shards(cfg.path)
        shards_per_rank = len(urls) // world_size
        if cfg.shard_sampling == "split" and shards_per_rank < max(1, cfg.num_workers):
            logger.warning(
                "%d shards per rank for %d workers: some workers will sit idle; write more, smaller shards",
                shards_per_rank,
                cfg.num_workers,
            )
        samples_per_epoch, listed = cfg.samples_per_epoch, None
        if not samples_per_epoch:
            listed = shard_set_size(urls)
            if listed:
                logger.info("data.samples_per_epoch not set: the shard info files list %d samples in %d shards", listed, len(urls))
        if cfg.shard_sampling == "resample":
            samples_per_epoch = samples_per_epoch or listed
            if not samples_per_epoch:
                raise ValueError(
                    "data.shard_sampling=resample needs the length of an epoch: set data.samples_per_epoch (samples "
                    "over all ranks), or read shards written by `evamim data make-shards` (their shard-info.json has it)"
                )
        return ShardDataset(
            urls,
            transform,
            rank=rank,
            world_size=world_size,
            shuffle=cfg.shuffle if shuffle is None else shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            sampling=cfg.shard_sampling,
            samples_per_epoch=samples_per_epoch,
            listed_samples=listed,
            **common,
        )
    return MapDataset(build_source(cfg), transform, max_consecutive_bad=cfg.max_consecutive_bad, **common)
