"""``build_loader`` and ``Loader``: batches of one epoch at a time, bad-sample accounting, resume.

    loader = build_loader(cfg, batch_size=64, mask_generator=BlockMasking(...))
    loader.load_state_dict(checkpoint["data"])        # optional: resume mid-epoch
    while loader.epoch < epochs:
        for batch in loader:                          # the rest of the current epoch
            ...                                       # batch["images"], batch["masks"], ...
            checkpoint["data"] = loader.state_dict()  # after the step that used the batch

Iterating a ``Loader`` runs the *current* epoch from the current position and, once it is
exhausted, moves to the next epoch; breaking out of the loop keeps the position, so the next
iteration continues where it stopped. ``state_dict()`` counts the batches handed out.

Resume guarantees: map-style sources resume exactly (the rest of the epoch, each sample once, the
same crops and masks); shards resume at shard granularity (see ``evamim.data.shards``).

Any dataset works that yields sample dicts: a map-style one indexed by ``(epoch, index)`` (the
images' ``MapDataset``, ``evamim.data.segmentation.SegmentationDataset``) or a ``ShardDataset``; the
``collate_fn`` stacks a list of samples into a batch (``Collator`` for images).

Bad samples: a dataset reports failures inside its items (``"bad"``: ``path: reason`` lines, see
``evamim.data.collate.BOOKKEEPING``). The loader takes them out in the workers, so a batch holds
samples only (every entry is per-sample), and counts and logs them in the training process, also
those of a partial last batch that ``drop_last`` discards. ``bad_sample_totals()`` gives this
process's totals since the run started (they are part of the state, so they survive a resume); too
many recent failures stop the run with ``TooManyBadSamples`` (``BadSampleMonitor``), and so does an
epoch in which every sample failed, naming the failures.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from evamim.data.collate import BatchInfo, Collator, LoaderCollate, MaskGenerator
from evamim.data.config import DataConfig
from evamim.data.failures import BadSampleMonitor, TooManyBadSamples
from evamim.data.sampler import ResumableDistributedSampler
from evamim.data.shards import ShardDataset
from evamim.data.sources import build_dataset
from evamim.data.transforms import PURPOSES, build_transform

logger = logging.getLogger("evamim.data")

STATE_FORMAT = 1
FAILURES_SHOWN = 5  # failure lines quoted when an epoch delivered nothing


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Loader:
    """Iterable over the batches ``collate_fn`` makes of ``dataset``'s samples; resumable, with failure checks.

    Args:
        dataset: map-style (``len`` and ``dataset[(epoch, index)]`` -> sample dict) or a ``ShardDataset``.
        collate_fn: ``list of sample dicts -> batch``; never called with an empty list.
        monitor: judges the failure fraction; default: ``DataConfig``'s limits.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        collate_fn: Any,
        monitor: BadSampleMonitor | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: Any = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(dataset, IterableDataset) and not isinstance(dataset, ShardDataset):
            raise TypeError(
                f"Loader cannot resume an iterable {type(dataset).__name__}: give it a map-style dataset "
                "(len() and dataset[(epoch, index)]) or a ShardDataset"
            )
        if monitor is None:
            monitor = BadSampleMonitor(DataConfig.max_bad_fraction, DataConfig.bad_window, DataConfig.bad_min_samples)
        self.dataset = dataset
        self.batch_size = batch_size
        self.monitor = monitor
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.is_map_style = not isinstance(dataset, ShardDataset)
        self._epoch = 0
        self._position = 0  # map-style: global samples consumed in this epoch (all ranks)
        self._consumed = 0  # shards: samples this rank consumed in this epoch
        self._shards_done: set[str] = set()
        # Cumulative over the run (restored on resume), unlike the monitor's window and totals.
        self._samples_tried = 0
        self._samples_bad = 0
        # DataLoader draws its workers' base seed from this generator instead of the global torch RNG, so
        # starting an epoch (or resuming mid-epoch) leaves the training RNG stream (dropout, drop path) intact.
        self._generator = torch.Generator().manual_seed(seed)
        self._seed = seed
        workers = dict(
            generator=self._generator,
            num_workers=num_workers,
            collate_fn=LoaderCollate(collate_fn),
            # Pinning needs an accelerator; without one torch would only warn and not pin.
            pin_memory=pin_memory and torch.cuda.is_available(),
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        if self.is_map_style:
            self.sampler = ResumableDistributedSampler(
                len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, pad=pad
            )
            batches = BatchSampler(self.sampler, batch_size, drop_last)
            self._dataloader = DataLoader(
                dataset, batch_sampler=batches, persistent_workers=persistent_workers and num_workers > 0, **workers
            )
        else:
            self.sampler = None
            # Shard workers restart every epoch: a fresh worker copies the dataset, and with it the
            # epoch, the shards to skip and the samples already consumed. Each worker's partial last
            # batch is dropped here, not by the DataLoader: it carries the failures (and finished
            # shards) met since the previous batch, which must still be counted.
            self._dataloader = DataLoader(
                dataset, batch_size=batch_size, drop_last=False, persistent_workers=False, **workers
            )

    # ------------------------------------------------------------------ iteration

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs (or continues)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` from its beginning."""
        self._epoch = epoch
        self._position = 0
        self._consumed = 0
        self._shards_done = set()

    def __iter__(self):
        self._prepare()
        loaded, failures, shown = 0, 0, []
        for batch, info in self._dataloader:
            self._count(info)
            loaded, failures = loaded + info.samples, failures + len(info.failures)
            shown.extend(info.failures[: FAILURES_SHOWN - len(shown)])
            if self.is_map_style:
                # Every item took one position of the epoch's order, whether it became a sample or not; a
                # batch short of failed items is still used (BatchSampler already applied drop_last).
                self._position = min(self._position + info.items * self.world_size, self.sampler.total_size)
            elif self.dataset.sampling == "split":
                self._shards_done.update(info.shards_done)
            if batch is None:  # every item failed or was a marker
                continue
            if not self.is_map_style:
                # Only a worker's last batch is short (also when a marker fills it up to batch_size items).
                if self.drop_last and info.samples < self.batch_size:
                    continue
                self._consumed += info.samples
            yield batch
        if failures and not loaded:
            raise TooManyBadSamples(_nothing_loaded_message(self._epoch, failures, shown))
        self.set_epoch(self._epoch + 1)

    def _count(self, info: BatchInfo) -> None:
        self._samples_tried += info.samples + len(info.failures)
        self._samples_bad += len(info.failures)
        self.monitor.update(info.samples, info.failures)

    def bad_sample_totals(self) -> dict[str, int]:
        """``{"samples_tried": int, "samples_bad": int}`` of this process since the run started.

        Tried = loaded plus failed (a bad sample replaced by the next index counts as two tries, a
        good sample dropped with a partial last batch as one); bad = failed to load or to transform.
        Totals before a resume are included (they travel in ``state_dict()``); each rank counts its
        own samples, so sum them over ranks for the run's totals.
        """
        return {"samples_tried": self._samples_tried, "samples_bad": self._samples_bad}

    def _prepare(self) -> None:
        self._generator.manual_seed(self._seed + self._epoch)
        if self.is_map_style:
            self.sampler.set_epoch(self._epoch, min(self._position, self.sampler.total_size))
        else:
            self.dataset.epoch = self._epoch
            self.dataset.skip_shards = frozenset(self._shards_done)
            self.dataset.consumed = self._consumed

    def __len__(self) -> int:
        """Batches in a whole epoch for this rank (shards: needs ``samples_per_epoch`` or a ``shard-info.json``)."""
        if self.is_map_style:
            return self._batches(self.sampler.samples_per_epoch())
        total = self.dataset.rank_length()
        if total is None:
            raise TypeError(
                "the length of a shard loader is unknown: set data.samples_per_epoch (all ranks together), "
                "or write the shards with `evamim data make-shards` (its shard-info.json counts them)"
            )
        workers = max(1, self.num_workers)
        quotas = [total // workers + (worker < total % workers) for worker in range(workers)]
        return sum(self._batches(quota) for quota in quotas)  # each worker makes its own batches

    def _batches(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Position in the data, to save in a checkpoint (after the step that used the last batch).

        Map-style: the global position is the same on every rank, so rank 0's state suffices for
        it. Shards: the consumed shards differ per rank; save each rank's state. The bad-sample totals
        (``samples_tried``, ``samples_bad``) are this rank's: save each rank's state to keep them.
        """
        state: dict[str, Any] = {"format": STATE_FORMAT, "epoch": self._epoch}
        if self.is_map_style:
            state.update(
                kind="map",
                position=self._position,
                dataset_size=len(self.dataset),
                seed=self.sampler.seed,
                shuffle=self.sampler.shuffle,
            )
        else:
            state.update(
                kind="shards",
                consumed=self._consumed,
                shards_done=sorted(self._shards_done),
                num_shards=len(self.dataset.urls),
                seed=self.dataset.seed,
                rank=self.rank,
                world_size=self.world_size,
            )
        state.update(self.bad_sample_totals())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``: the next iteration runs the rest of that epoch.

        Map-style states resume exactly, also on another number of ranks. A shard state saved under
        another rank layout cannot say which shards this rank has consumed: that epoch starts over
        on this rank, with a warning.

        Raises:
            ValueError: the state belongs to different data (another kind, dataset size, shard
                count, seed or shuffle setting), where resuming mid-epoch would silently repeat or
                skip samples.
        """
        kind = "map" if self.is_map_style else "shards"
        # Segmentation states written before it used this loader have no kind (and no shuffle): map-style.
        saved_kind = state.get("kind", "map" if "position" in state else None)
        if state.get("format") != STATE_FORMAT or saved_kind != kind:
            raise ValueError(f"data state {_brief(state)} is not a {kind} loader state (format {STATE_FORMAT})")
        if self.is_map_style:
            expected = {"dataset_size": len(self.dataset), "seed": self.sampler.seed}
            if "shuffle" in state or "kind" in state:
                expected["shuffle"] = self.sampler.shuffle
        else:
            expected = {"num_shards": len(self.dataset.urls), "seed": self.dataset.seed}
        changed = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        epoch = int(state["epoch"])
        if changed:
            details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume epoch {epoch} mid-way: the data changed since the checkpoint ({details}). "
                f"Start that epoch over with loader.set_epoch({epoch}) or the next one with loader.set_epoch({epoch + 1})"
            )
        self.set_epoch(epoch)
        # States saved before the totals existed read as zero: the run's counts restart, nothing fails.
        self._samples_tried = int(state.get("samples_tried", 0))
        self._samples_bad = int(state.get("samples_bad", 0))
        if self.is_map_style:
            self._position = int(state["position"])
            return
        layout = (state.get("rank"), state.get("world_size"))
        if layout != (self.rank, self.world_size):
            logger.warning(
                "data state of rank %s of %s loaded on rank %d of %d: shard positions do not carry over to "
                "another rank layout, so epoch %d starts over on this rank (its samples may repeat)",
                layout[0], layout[1], self.rank, self.world_size, epoch,
            )
            return
        self._consumed = int(state["consumed"])
        self._shards_done = set(state["shards_done"])


def _nothing_loaded_message(epoch: int, failures: int, shown: list[str]) -> str:
    lines = "\n  ".join(shown)
    more = f"\n  ... and {failures - len(shown)} more" if failures > len(shown) else ""
    return (
        f"no sample of epoch {epoch} could be used: all {failures} failed to load. The first failures:\n  "
        f"{lines}{more}\nCheck the data path and fix these files (`evamim data inspect PATH` checks images and shards)."
    )


def _brief(state: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{key}={state[key]!r}" for key in list(state)[:4]) + "}"


def build_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    purpose: str = "pretrain",
    transform: Any = None,
    mask_generator: MaskGenerator | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    multiprocessing_context: Any = None,
    output: str = "float",
) -> Loader:
    """A ``Loader`` for ``cfg`` and ``purpose`` (``pretrain``, ``finetune`` or ``eval``).

    Args:
        batch_size: samples per batch on this rank.
        transform: overrides the purpose's transform (any ``callable(PIL image) -> tensor``).
        output: what ``batch["images"]`` holds: ``float`` = ``(B, 3, H, W)`` float32 normalised with
            ``cfg.mean``/``cfg.std``; ``uint8`` (``pretrain`` and ``eval``) = the crops' pixels as
            ``(B, 3, H, W)`` uint8, a quarter of the bytes to pass from the workers and to copy to the
            accelerator (pinned when CUDA is present and ``cfg.pin_memory``): move the batch with
            ``.to(device, non_blocking=True)``, then ``normalize_on_device(images, cfg.mean, cfg.std)``
            gives the float output's numbers. Not with ``transform`` (which decides its own output).
        mask_generator: ``(batch_size, rng) -> (batch_size, N)`` bool, True = masked; adds
            ``batch["masks"]``. Called per sample in the collate step (see ``Collator``).
        rank, world_size: default to the initialised process group (else 0 and 1); pass both to
            choose explicitly.
        shuffle, drop_last: default True for training purposes, False for ``eval`` (which also
            leaves ranks unpadded, so no sample is counted twice).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
    if (rank is None) != (world_size is None):
        raise ValueError("pass rank and world_size together, or neither (then torch.distributed decides)")
    if rank is None:
        rank, world_size = distributed_rank_world()
    cfg.validate()
    training = purpose != "eval"
    shuffle = (cfg.shuffle if training else False) if shuffle is None else shuffle
    drop_last = training if drop_last is None else drop_last
    if transform is not None and output != "float":
        raise ValueError(
            f"output={output!r} applies to the built-in transforms, and a transform was given: it decides its own "
            "output (drop output=, and build the transform with output='uint8' for uint8 pixels)"
        )
    transform = build_transform(cfg, purpose, output=output) if transform is None else transform
    dataset = build_dataset(cfg, transform, rank=rank, world_size=world_size, shuffle=shuffle)
    return Loader(
        dataset,
        batch_size=batch_size,
        collate_fn=Collator(mask_generator),
        monitor=BadSampleMonitor(cfg.max_bad_fraction, cfg.bad_window, cfg.bad_min_samples),
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        drop_last=drop_last,
        pad=training,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=cfg.persistent_workers,
        prefetch_factor=cfg.prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
