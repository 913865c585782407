"""``DataConfig``: every setting of the data layer, as a plain dataclass with defaults.

The top-level config composes it (``data.*`` keys) and loads it from YAML; nothing here depends on
a config library. Sequences may arrive as lists from YAML: the builders convert them with ``tuple()``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from evamim.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)

SOURCE_KINDS = ("auto", "folder", "list", "csv", "shards", "synthetic")
SYNTHETIC_WORLDS = ("shapes", "scenes")
# Marks that make a data.path a shard specification whatever exists on disk: brace patterns, several
# patterns joined by ::, commands and URLs, and tar archives (webdataset reads .tar, .tar.gz and .tgz).
SHARD_MARKERS = ("{", "::", "pipe:", "://")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Image files a folder source reads (also used to tell a single image from a list file).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
# Image-caption tables (``csv`` source), by extension, and the delimiter each extension implies.
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
SHARD_SAMPLING = ("split", "resample")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")

logger = logging.getLogger("evamim.data")


@dataclass
class DataConfig:
    """Where images come from, how they are augmented and how they are loaded."""

    source: str = "auto"
    """One of ``folder`` (ImageFolder tree or flat folder), ``list`` (text file of image paths,
    optionally ``path label`` per line), ``csv`` (a CSV/TSV table of image paths and captions, see
    ``csv_path_column``), ``shards`` (WebDataset tar shards), ``synthetic``
    (procedurally drawn shapes with captions; needs no files) or ``auto``: inferred from ``path``
    when the config is built (see ``infer_source``; logged once at INFO), synthetic without a path."""

    path: str = ""
    """Folder root, list file, caption table (``.csv`` / ``.tsv``), or shards: a local path, a brace pattern
    (``/data/cc12m-{000000..001242}.tar``), several patterns joined by ``::``, a folder holding
    ``*.tar``, an ``http(s)://`` URL or a ``pipe:`` command. Unused for ``synthetic``."""

    image_size: int = 224
    """Side of the square output crop, in pixels."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area fraction range (pre-training: EVA's (0.2, 1.0))."""

    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio (width / height) range."""

    interpolation: str = "bicubic"
    """Resampling filter for crops and resizes: bicubic, bilinear, nearest or lanczos."""

    hflip: float = 0.5
    """Probability of a horizontal flip."""

    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean (RGB, in [0, 1]) subtracted from the student's input."""

    std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation (RGB, in [0, 1]) dividing the student's input."""

    jpeg_draft: bool = True
    """Let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale when even the smallest possible crop still
    gets at least ``image_size`` source pixels per side (see docs/data.md). Off = always full size."""

    crop_pct: float = 0.875
    """Evaluation: resize the shorter side to ``image_size / crop_pct``, then centre-crop."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """Fine-tuning only: timm RandAugment policy string; None disables it."""

    finetune_crop_scale: tuple[float, float] = (0.08, 1.0)
    """Fine-tuning only: RandomResizedCrop area fraction range."""

    random_erasing: float = 0.25
    """Fine-tuning only: probability of timm RandomErasing (pixel mode); 0 disables it."""

    mixup_alpha: float = 0.0
    """Fine-tuning only: mixup Beta(alpha, alpha); 0 disables mixup."""

    cutmix_alpha: float = 0.0
    """Fine-tuning only: cutmix Beta(alpha, alpha); 0 disables cutmix."""

    mixup_prob: float = 1.0
    """Fine-tuning only: probability of applying mixup or cutmix to a batch."""

    mixup_switch_prob: float = 0.5
    """Fine-tuning only: probability of cutmix instead of mixup when both are on."""

    label_smoothing: float = 0.1
    """Fine-tuning only: label smoothing folded into the soft targets mixup/cutmix produce."""

    labels: bool = False
    """Deliver class labels (``batch["labels"]``). Every sample must then have one: class
    sub-folders, ``path label`` lines, a ``cls`` entry in shards, or the synthetic shape class."""

    captions: bool = False
    """Deliver captions (``batch["captions"]``). Every sample must then have one: ``txt`` or
    ``json`` (``caption``/``text`` field) in shards, the caption column of a ``csv`` table, or the
    synthetic description."""

    csv_path_column: str = "filepath"
    """``csv`` source: the header's name of the column of image paths (relative ones are resolved
    against the table's folder). Default: open_clip's and EVA-CLIP's ``--csv-img-key``."""

    csv_caption_column: str = "title"
    """``csv`` source: the header's name of the caption column (open_clip's ``--csv-caption-key``)."""

    csv_delimiter: str | None = None
    """``csv`` source: the column delimiter, one character or ``tab`` / ``comma`` / ``semicolon`` /
    ``pipe``; None = from the extension (``.csv`` comma, ``.tsv`` tab)."""

    num_workers: int = 8
    """DataLoader worker processes per rank (0 = load in the main process)."""

    pin_memory: bool = True
    """Pin batches in page-locked memory for faster, asynchronous host-to-GPU copies (only when
    CUDA is available: without an accelerator there is nothing to pin for)."""

    persistent_workers: bool = True
    """Keep map-style workers alive across epochs. Shard workers always restart each epoch so that
    they see the new epoch's shard order and any resume position."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""

    shuffle: bool = True
    """Shuffle training samples (map-style: a seeded permutation per epoch; shards: seeded shard
    order per epoch plus a sample buffer)."""

    shuffle_buffer: int = 1000
    """Shards: samples each worker keeps in its shuffle buffer (memory = buffer x encoded size)."""

    shard_sampling: str = "split"
    """Shards: ``split`` reads every shard once per epoch, shards divided across ranks and workers;
    ``resample`` draws shards with replacement forever and needs ``samples_per_epoch``."""

    samples_per_epoch: int | None = None
    """Shards: the samples of one epoch over all ranks together (the dataset's size, not a rank's).
    Each rank takes ``samples_per_epoch // world_size`` (rounded down, the same on every rank, so all
    ranks take the same number of steps). ``resample``: the epoch's length. ``split``: a cap on each
    rank's epoch, which also sets ``len(loader)``. Unset: the count in the ``shard-info.json`` that
    ``evamim data make-shards`` writes next to the shards, when it lists every shard, sets
    ``len(loader)`` (and the ``resample`` epoch) without capping anything."""

    max_bad_fraction: float = 0.01
    """Stop with an error when more than this fraction of the recent samples failed to load."""

    bad_window: int = 10_000
    """The failure fraction is measured over roughly this many most recent samples."""

    bad_min_samples: int = 1_000
    """Do not judge the failure fraction before this many samples were tried in the window, so
    that one early bad file cannot stop a run."""

    max_consecutive_bad: int = 64
    """Map-style: a bad sample is replaced by the next index; give up after this many in a row."""

    max_image_pixels: int = 89_478_485
    """Refuse images with more pixels than this (decompression-bomb guard, PIL's default)."""

    seed: int = 0
    """Seed of the epoch permutation, shard order, augmentations and masks. The same seed, epoch
    and sample give the same crop and mask, whatever the number of workers or ranks."""

    synthetic_size: int = 10_000
    """Synthetic: number of distinct images in one epoch."""

    synthetic_resolution: int = 96
    """Synthetic: side of the drawn image before cropping, in pixels."""

    synthetic_world: str = "shapes"
    """Synthetic: ``shapes`` (one rotated, textured shape anywhere over a textured background:
    ``SyntheticShapes``) or ``scenes`` (1-4 upright objects of one shape in a 2 x 2 grid, each its own colour,
    on a plain background: ``SyntheticScenes``, the demo's world). Both label the shape, one of 8."""

    def __post_init__(self) -> None:
        _one_of("source", self.source, SOURCE_KINDS)
        self.resolve_source()
        self.validate()

    def resolve_source(self) -> str:
        """The source kind actually read: ``source``, or the kind inferred from ``path`` for ``auto``.

        With ``source=auto`` and a path, the inferred kind replaces ``auto`` (logged once), so that
        the saved config and every later reader see it. ``auto`` without a path stays ``auto`` and
        reads as ``synthetic``: a config whose path is filled in later still gets it inferred.

        Raises:
            ValueError: ``auto`` with a path that does not exist (the path is named).
        """
        if self.source != "auto":
            return self.source
        if not str(self.path):
            return "synthetic"
        self.source = infer_source(str(self.path))
        logger.info("data.source inferred: %s (from data.path=%s)", self.source, self.path)
        return self.source

    def validate(self) -> None:
        """Raise ValueError naming the field when a setting is out of range."""
        _one_of("source", self.source, SOURCE_KINDS)
        _one_of("shard_sampling", self.shard_sampling, SHARD_SAMPLING)
        _one_of("interpolation", self.interpolation, INTERPOLATIONS)
        if self.source in ("folder", "list", "csv", "shards") and not str(self.path):
            raise ValueError(f"data.path is empty: source {self.source!r} needs a folder, list file, caption "
                             "table or shards")
        if self.source == "csv":
            from evamim.data.tables import resolve_delimiter

            resolve_delimiter(self.path, self.csv_delimiter)
            for name in ("csv_path_column", "csv_caption_column"):
                if not str(getattr(self, name)).strip():
                    raise ValueError(f"data.{name} is empty: give the header's name of that column")
        if self.source == "synthetic" and str(self.path):
            # A path next to the synthetic source used to be ignored silently: a run then trained on
            # drawn shapes while its owner believed it read their images.
            raise ValueError(
                f"data.source=synthetic draws its own images and would ignore data.path={self.path}: "
                "remove data.path, or set data.source to folder, list, csv or shards (or auto to infer it from the "
                "path)"
            )
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {self.image_size}")
        for name in ("crop_scale", "finetune_crop_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"data.{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"data.crop_ratio must satisfy 0 < low <= high, got {(low, high)}")
        if len(tuple(self.mean)) != 3 or len(tuple(self.std)) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean and data.std need 3 values, std > 0; got {self.mean}, {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be >= 1 (all ranks together) or null, got {self.samples_per_epoch}")
        for name in ("num_workers", "shuffle_buffer", "bad_window", "bad_min_samples", "max_consecutive_bad"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.prefetch_factor < 1 or self.max_image_pixels < 1 or self.synthetic_size < 1:
            raise ValueError("data.prefetch_factor, data.max_image_pixels and data.synthetic_size must be >= 1")
        if self.synthetic_resolution < 8:
            raise ValueError(f"data.synthetic_resolution must be >= 8, got {self.synthetic_resolution}")
        _one_of("synthetic_world", self.synthetic_world, SYNTHETIC_WORLDS)
        if self.synthetic_world == "scenes" and self.synthetic_resolution < 16:
            raise ValueError(f"data.synthetic_world=scenes draws a 2 x 2 grid: data.synthetic_resolution must be "
                             f">= 16, got {self.synthetic_resolution}")


def infer_source(path: str, name: str = "data.path") -> str:
    """``folder``, ``list``, ``csv`` or ``shards``: the source kind a ``data.path`` names.

    - a brace pattern, ``::``-joined patterns, a ``pipe:`` command, a URL, or a ``.tar`` (``.tar.gz``,
      ``.tgz``) file name: ``shards``;
    - a folder holding ``*.tar`` files directly: ``shards``; any other folder: ``folder``;
    - a ``.csv`` or ``.tsv`` file: ``csv`` (a table of image paths and captions);
    - any other file: ``list`` (a text file of image paths).

    ``name`` is how error messages call the path (``data.path``, ``val_data.path`` ...).

    Raises:
        ValueError: the path does not exist, or is a single image file; the path is named.
    """
    if any(marker in path for marker in SHARD_MARKERS) or path.endswith(SHARD_SUFFIXES):
        return "shards"
    if os.path.isdir(path):
        return "shards" if _holds_tar_files(path) else "folder"
    if os.path.isfile(path):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(
                f"{name} {path} is a single image, not a dataset: give the folder holding the images, "
                "or a list file naming them"
            )
        return "csv" if os.path.splitext(path)[1].lower() in TABLE_SUFFIXES else "list"
    if os.path.islink(path):
        raise ValueError(f"{name} {path} is a broken or looping symlink: fix the link, or give another path")
    raise ValueError(f"{name} {path} does not exist (expected an image folder, a list file, a caption table or "
                     "shards)")


def _holds_tar_files(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.name.endswith(SHARD_SUFFIXES) for entry in entries)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name} must be one of {', '.join(allowed)}; got {value!r}")
