"""Pieces every downstream task shares: choosing the backbone, the device, and reporting results.

Each task writes ``output_dir/config.yaml`` and ``output_dir/results.json`` and ends its console output
with a short table, so that a run directory always says what was run and what came out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim import atomic


@dataclass
class ModelSection:
    """``model.*`` of a task that starts from a pre-trained network and keeps it frozen (knn, embed, linprobe)."""

    pretrained: str | None = None
    """An evamim model directory (architecture from its config.json), or any weights file ``load_weights``
    reads (official EVA .pt, timm, open_clip) together with ``name``."""
    name: str | None = None
    """A preset (``evamim.list_models()``); needed when ``pretrained`` is not an evamim directory."""
    options: dict[str, Any] = field(default_factory=dict)
    """Any other EvaViTConfig field, e.g. ``{use_rope: true}``."""


@dataclass
class TrainedModelSection(ModelSection):
    """``model.*`` of a task that trains the network (finetune, segment)."""

    drop_path_rate: float = 0.1
    """Stochastic depth, linearly spaced over the blocks up to this rate (EVA-g IN-1K: 0.4)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward: ~30% slower, much less memory (EVA-g at 336 px)."""


@dataclass
class ValidationData:
    """``val_data.*``: the validation images of a task; every other data setting is ``data``'s, so both sets
    are read and transformed alike."""

    path: str | None = None
    """A folder, list, caption table or shards like ``data.path``; None = no validation set (unless
    ``source=synthetic``)."""
    source: str | None = None
    """Their kind (``folder``, ``list``, ``csv``, ``shards``, ``synthetic``); None = inferred from ``path`` as
    ``data.source=auto`` infers it (the training data's kind says nothing about the validation set's: CLIP
    trains on shards or a caption table and validates on a class-folder tree). ``synthetic`` (no path) draws a
    validation set of ``data.synthetic_size`` images with another seed than the training set's; with a
    synthetic ``data.source`` and no path it is the default."""

    @property
    def given(self) -> bool:
        return self.path is not None or self.source == "synthetic"

    def _source(self, data: Any) -> str | None:
        """The validation source kind as set (None = to be inferred from the path)."""
        if self.source is not None:
            return self.source
        return "synthetic" if data.source == "synthetic" else None

    def problems(self, data: Any) -> list[str]:
        """A path that does not exist, or a path given to a source that ignores it."""
        if self.path is None:
            return []
        source = self._source(data)
        if source == "synthetic":
            return [f"val_data.path={self.path!r} is set but the validation source is 'synthetic', which ignores it: "
                    "set val_data.source (or data.source) to folder, list, csv or shards"]
        if source is None:
            from evamim.data.config import infer_source

            try:
                infer_source(str(self.path), name="val_data.path")
            except ValueError as error:
                return [str(error)]
        elif source in ("folder", "list", "csv") and not Path(self.path).exists():
            return [f"val_data.path {self.path} does not exist"]
        return []

    def data_config(self, data: Any) -> Any:
        """``data`` with the validation path and source (a synthetic set is drawn with ``data.seed + 1``)."""
        import dataclasses

        source = self._source(data)
        if source == "synthetic":
            return dataclasses.replace(data, source="synthetic", seed=data.seed + 1)
        return dataclasses.replace(data, path=self.path, source=source or "auto")


def source_classes(loader: Any) -> list[str] | None:
    """The class (folder) names of a loader's map-style source in label order (folder, synthetic), None when
    the source names none (shards, list files)."""
    classes = getattr(getattr(loader.dataset, "source", None), "classes", None)
    return [str(name) for name in classes] if classes else None


def owned_option_problems(options: Mapping[str, Any], owned: Mapping[str, str | None]) -> list[str]:
    """``model.options`` keys the task sets itself (``owned``: key -> the config key to use instead, or None)."""
    return [f"model.options.{key} is set by this task" + (f": use {owner} instead" if owner else "")
            for key, owner in owned.items() if key in options]


def model_problems(model: TrainedModelSection, owned: Mapping[str, str | None]) -> list[str]:
    """``model.*`` of a task that builds the network itself: weights or a preset, no option the task sets."""
    problems = []
    if model.pretrained is None and model.name is None:
        problems.append("set model.pretrained (an evamim model directory or weights file) and/or model.name (a preset)")
    elif model.pretrained is not None and not Path(model.pretrained).exists():
        problems.append(f"model.pretrained {model.pretrained} does not exist: give the pre-trained weights")
    problems += owned_option_problems(model.options, owned)
    if not 0.0 <= model.drop_path_rate < 1.0:
        problems.append(f"model.drop_path_rate must be in [0, 1), got {model.drop_path_rate}")
    return problems


def load_backbone(section: ModelSection, **overrides: Any):
    """Build the EvaViT a task starts from; ``overrides`` (task-specific, e.g. num_classes) win over options.

    The weights load strictly: every backbone tensor must match the file. The task heads (``TASK_HEADS``: the
    classifier ``head``, a MIM checkpoint's ``lm_head`` and ``mask_token``) may be new to the task or dropped
    from the file; the logged report names them."""
    from evamim.models.checkpoint import TASK_HEADS
    from evamim.models.presets import create_model

    if section.pretrained is None and section.name is None:
        raise ValueError("model: set model.pretrained (an evamim model directory or weights file) or model.name")
    return create_model(section.name, pretrained=section.pretrained, strict=True, task_heads=TASK_HEADS,
                        **{**section.options, **overrides})


def backbone_config(section: ModelSection, overrides: Mapping[str, Any] | None = None):
    """The EvaViTConfig that ``load_backbone(section, **overrides)`` builds, without reading any weights: the preset
    ``section.name``, or the config.json of the evamim directory ``section.pretrained``, with ``section.options``
    and then ``overrides`` on top.

    Raises:
        ValueError / FileNotFoundError: saying what is wrong (an unknown preset, a bad option, no config.json).
    """
    from evamim.models.checkpoint import read_config
    from evamim.models.presets import model_config
    from evamim.models.vit import EvaViTConfig

    values = {**section.options, **(overrides or {})}
    if section.name is not None:
        return model_config(section.name, **values)
    # The architecture comes from an evamim directory (or .safetensors with its config).
    return EvaViTConfig.from_dict({**read_config(section.pretrained).to_dict(), **values})


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return device


def write_results(output_dir: str | Path, config: Any, results: Mapping[str, Any]) -> Path:
    """``output_dir/config.yaml`` (the resolved config) and ``output_dir/results.json``; returns the JSON path."""
    from evamim.config import save_config

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    path = output_dir / "results.json"
    atomic.write_json(path, results, default=float)
    return path


def format_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table; floats with 4 significant decimals."""
    if not rows:
        return "(no results)"
    columns = columns or list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: logits (B, classes), labels (B,) long -> {'top1': ..., 'top5': ...}.
    k larger than the number of classes counts every sample as correct."""
    if labels.numel() == 0:
        return {f"top{k}": float("nan") for k in ks}
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=-1).float().mean().item() for k in ks}


# ------------------------------------------------------------------------------------------- run checks
def schedule_problems(optim: Any, loop: Any) -> list[str]:
    """Warmup longer than the run, where both lengths are known before the data is (both in steps or both in
    epochs); messages name the keys. ``optim``: an OptimConfig, ``loop``: a LoopConfig."""
    found = []
    warmup_steps, total_steps = optim.warmup_steps, loop.total_steps
    if warmup_steps is not None and total_steps is not None and warmup_steps > total_steps:
        found.append(f"optim.warmup_steps {warmup_steps} is longer than the run (loop.total_steps {total_steps}): "
                     "lower it")
    late = [m for m in getattr(optim, "milestones", ()) if total_steps is not None and m >= total_steps]
    if late:
        found.append(f"optim.milestones {late} are not before the end of the run (loop.total_steps {total_steps}): "
                     "lower them")
    warmup_epochs, epochs = optim.warmup_epochs, loop.epochs
    if warmup_epochs and epochs is not None and warmup_epochs > epochs:
        found.append(f"optim.warmup_epochs {warmup_epochs} is longer than the run (loop.epochs {epochs}): lower it")
    return found

def training_run_problems(config: Any) -> list[str]:
    """What is wrong with the sections every training task has (``batch_size`` / ``global_batch_size``,
    ``optim``, ``loop``, ``checkpoint``, ``distributed``, ``output_dir``), before anything is built: the batch
    arithmetic on the launched processes, the schedule, an explicit resume path, the strategy, the output directory."""
    from evamim.tasks.batching import batch_problems, launch_world_size

    found = batch_problems(config, launch_world_size()) + schedule_problems(config.optim, config.loop)
    found += config.distributed.problems()
    if config.distributed.strategy == "fsdp" and config.loop.precision == "fp16":
        found.append(
            "distributed.strategy=fsdp with loop.precision=fp16 is not supported: each process would check only its "
            "own gradient shards for overflows and the processes could disagree on the loss scale; use "
            "loop.precision=bf16, or strategy ddp/zero1 for fp16")
    resume = config.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).exists():
        found.append(f"checkpoint.resume {resume} does not exist: give a checkpoint file (or, for FSDP runs, a "
                     "checkpoint directory), or auto / never")
    return found + output_dirs_problems(config.output_dir)

def output_dirs_problems(output_dir: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """:func:`output_dir_problem` for a task's ``output_dir`` and, when it caches features there, ``cache_dir``."""
    problems = [output_dir_problem(output_dir)]
    if cache_dir is not None:
        problems.append(output_dir_problem(cache_dir, key="cache_dir"))
    return [problem for problem in problems if problem]

def output_dir_problem(path: str | Path, key: str = "output_dir") -> str | None:
    """Why the directory ``path`` could not be created or written, or None; checked before any work, so that a
    run that could never save its results is refused before it spends hours. (A full disk can only be found
    when writing: :func:`run_config_command` reports that.)"""
    import os

    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file"
        return f"{key} {path}: {where}, not a directory; choose another {key}"
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        reason = "read-only file system" if read_only else "permission denied"
        return f"{key} {path}: cannot write in {existing} ({reason}); choose a writable {key}"
    return None
