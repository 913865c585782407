"""Weights in and out of an EvaViT: the native evamim format, and loading any supported checkpoint.

Native format: a directory with ``model.safetensors`` and ``config.json`` (the EvaViTConfig), enough to
rebuild the model with ``create_model(pretrained=directory)``.

``load_weights`` accepts, as a path or an in-memory state dict, any format ``evamim.models.sources`` reads
(official EVA-01 / EVA-02 ``.pt`` files, timm ``Eva`` and open_clip / EVA-CLIP state dicts, evamim
directories, ``.safetensors`` files and training checkpoints; EMA weights only with ``prefer_ema=True``),
mapped onto evamim names by ``evamim.models.layouts``; official RoPE tables are not loaded (evamim computes
them) but checked against the model's.

Strict loading (the default) means every backbone tensor of the model is matched exactly and every tensor of
the file is used. Only the *task heads* (``TASK_HEADS``: the classifier ``head.*``, the MIM ``lm_head.*`` and
``mask_token``) may be new in the model (initialised fresh) or absent from it (dropped); the report names them.

Elsewhere, re-exported here: reading files in ``sources``, ``infer_architecture`` in ``infer``,
``to_timm_state_dict`` / ``to_open_clip_state_dict`` + ``timm_model_kwargs`` in ``export``; see
docs/models.md, "Conversion guide".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from evamim import atomic

# The public names that moved to export / infer / sources are re-exported here for a stable import path.
from evamim.models.export import (
    TIMM_KWARGS_NAME,
    timm_model_kwargs,
    timm_qkv_fused,
    to_open_clip_state_dict,
    to_timm_state_dict,
)
from evamim.models.infer import (
    Inference,
    flat_tables,
    infer_architecture,
    infer_config,
    read_rope_tables,
    square_grid,
    table_tolerance,
)
from evamim.models.layouts import normalise_layout
from evamim.models.resample import resample_patch_kernel, resample_pos_embed
from evamim.models.sources import (
    CONFIG_NAME,
    EMA_CONTAINERS,
    WEIGHTS_NAME,
    CorruptCheckpointError,
    SourceWeights,
    UnsafeCheckpointError,
    read_source,
    read_state_dict,
    safetensors_config,
    unwrap_container,
)
from evamim.models.vit import EvaViT, EvaViTConfig

logger = logging.getLogger(__name__)

# Key prefixes of task-specific tensors: a strict load may leave them fresh or drop them (and reports it).
TASK_HEADS = ("head.", "lm_head.", "mask_token")
# Facts that change what a model computes but are not tensor shapes: a loaded file's config is checked on them.
BEHAVIOUR_FIELDS = ("num_heads", "use_rope", "rope_ref_grid", "rope_temperature", "post_norm", "norm_eps")


class WeightsMismatchError(ValueError):
    """A strict load found backbone tensors that do not match; ``report`` says which."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


def summarise(names: Sequence[str], limit: int = 4) -> str:
    """'a, b, c, d and 196 more': a long key list in one short phrase."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class LoadReport:
    """What ``load_weights`` did: where the weights came from and which keys did not line up.

    ``missing`` / ``unexpected`` / ``mismatched`` / ``conflicts`` are failures of a strict load; ``fresh``
    (task-head tensors of the model left at init), ``dropped`` (task-head tensors of the file the model does
    not have) and ``reshaped_heads`` (task heads of another shape: fresh in the model) are allowed.
    """

    source_format: str
    container_key: str | None = None
    other_containers: list[str] = field(default_factory=list)
    config_origin: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reshaped_heads: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    num_model_tensors: int = 0

    @property
    def ok(self) -> bool:
        """Every backbone tensor matched exactly and nothing in the file was left unused (task heads aside)."""
        return not (self.missing or self.unexpected or self.mismatched or self.conflicts)

    @property
    def left_at_init(self) -> list[str]:
        """Backbone tensors of the model that did not get a value from the file."""
        return self.missing + [key for key, _, _ in self.mismatched]

    def origin(self) -> str:
        if self.container_key is None:
            where = "a plain state dict"
        else:
            where = f"'{self.container_key}'"
            if self.container_key in EMA_CONTAINERS:
                where += " (EMA weights, as asked)"
        if self.other_containers:
            others = ", ".join(f"'{k}'" for k in self.other_containers)
            hint = "" if self.container_key in EMA_CONTAINERS else " (prefer_ema=True / --ema takes the EMA)"
            where += f"; the file also holds {others}{hint}"
        return where

    def problems(self) -> str:
        """All failures in one line (empty when ``ok``)."""
        parts = []
        left = self.left_at_init
        if left:
            total = f" of {self.num_model_tensors}" if self.num_model_tensors else ""
            kinds = []
            if self.mismatched:
                key, source_shape, model_shape = self.mismatched[0]
                kinds.append(f"{len(self.mismatched)} of another shape (e.g. {key} {source_shape} in the file vs "
                             f"{model_shape} in the model)")
            if self.missing:
                kinds.append(f"{len(self.missing)} not in the file")
            parts.append(f"{len(left)}{total} model tensors left at initialisation ({'; '.join(kinds)}): "
                         f"{summarise(left)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} file tensors unused: {summarise(self.unexpected)}")
        parts += self.conflicts
        return "; ".join(parts)

    def __str__(self) -> str:
        first = f"loaded {self.source_format} weights from {self.origin()}"
        if self.config_origin:
            first += f"; config from {self.config_origin}"
        lines = [first]
        if self.resampled:
            lines.append(f"  resampled: {', '.join(self.resampled)}")
        if self.renamed:
            lines.append("  renamed: " + ", ".join(f"{a} -> {b}" for a, b in self.renamed.items()))
        if self.fresh:
            line = f"  initialised fresh (task heads): {', '.join(self.fresh)}"
            if self.reshaped_heads:
                line += " (the file's " + ", ".join(f"{k} is {s}, not {m}" for k, s, m in self.reshaped_heads) + ")"
            lines.append(line)
        if self.dropped:
            lines.append(f"  dropped (task heads not in this model): {', '.join(self.dropped)}")
        lines += [f"  note: {note}" for note in self.notes]
        if not self.ok:
            lines.append(f"  NOT MATCHED: {self.problems()}")
        return "\n".join(lines)

    def log(self) -> None:
        (logger.info if self.ok else logger.warning)("%s", self)


# --------------------------------------------------------------------------------------------- native format
class NonFiniteWeightsError(ValueError):
    """A model with NaN or infinite weights was to be saved as a finished model."""


def save_pretrained(model: EvaViT, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (created if needed); returns it.

    Raises NonFiniteWeightsError, writing nothing, when a weight is NaN or infinite: such a model is never
    the result of a run (a diverged or corrupted one), and would otherwise be fine-tuned from as if it were.
    """
    config_json = json.dumps(model.config.to_dict(), indent=2)
    return write_model_directory(model, directory, config_json, {"config": config_json})


def write_model_directory(model: torch.nn.Module, directory: str | os.PathLike, config_json: str,
                          metadata: dict[str, str]) -> Path:
    """``directory/model.safetensors`` (``metadata`` added to the evamim version) + ``directory/config.json``
    (``config_json``), weights first and both atomic, so a directory with a config always has its weights and
    a crash leaves the old files intact. Refuses (NonFiniteWeightsError, nothing written) NaN or infinite
    weights. Returns ``directory``."""
    from safetensors.torch import save_file

    from evamim import __version__

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise NonFiniteWeightsError(
            f"refused to save {directory}: {len(nonfinite)} of {len(state)} tensors hold NaN or infinite values "
            f"({summarise(nonfinite)}); the run diverged or its weights were corrupted: export from its last "
            f"healthy checkpoint instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "evamim_version": __version__, **metadata}
    atomic.write_with(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    atomic.write_text(directory / CONFIG_NAME, config_json + "\n")
    return directory


def read_config(source: str | os.PathLike) -> EvaViTConfig:
    """The EvaViTConfig stored with evamim weights: ``DIR/config.json`` or a .safetensors file's metadata."""
    path = Path(source)
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}: it is not an evamim model directory. Pass a model name too, "
                f"e.g. create_model('eva_base_p16', pretrained='{path}')"
            )
        return EvaViTConfig.from_dict(_vision_values(json.loads(config_path.read_text())))
    if path.suffix == ".safetensors":
        values = safetensors_config(path)
        if values is not None:
            return EvaViTConfig.from_dict(values)
    raise ValueError(
        f"cannot tell the architecture of {path}: only evamim directories / .safetensors files carry a config. "
        f"Pass a model name, e.g. create_model('eva_giant_p14', pretrained='{path}')"
    )


def _vision_values(values: dict) -> dict:
    """An EvaViT config dict; for a saved EvaClip (``evamim.clip``) that of its vision trunk."""
    return values["vision"] if values.get("kind") == "clip" else values


def load_pretrained(source: str | os.PathLike, **overrides: Any) -> EvaViT:
    """Rebuild an EvaViT from an evamim directory (or .safetensors with config metadata) and load its weights."""
    from evamim.models.presets import create_model

    return create_model(pretrained=source, strict=True, **overrides)


# ------------------------------------------------------------------------------------------------ conversion
def _is_task_head(key: str, task_heads: Sequence[str]) -> bool:
    return any(key == head or key.startswith(head) for head in task_heads)

def convert_state_dict(
    state: Mapping[str, Any],
    model: EvaViT,
    antialias: bool | None = None,
    *,
    source_grid: tuple[int, int] | None = None,
    task_heads: Sequence[str] = TASK_HEADS,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a checkpoint's tensors onto ``model``'s parameter names and shapes (without loading them).

    ``source_grid``: the patch grid the file's pos_embed was made for (default: square). Task-head tensors
    (``task_heads`` prefixes) that do not fit are reported as fresh / dropped instead of as failures.
    """
    state, description, rope_tables = normalise_layout(state)
    report = LoadReport(source_format=description)
    target = model.state_dict()
    report.num_model_tensors = len(target)
    _rename_final_norm(state, target, report)
    antialias = model.config.pos_embed_antialias if antialias is None else antialias
    _resample_patch_kernel(state, target, report, antialias)
    source_grid = _resample_pos_embed(state, model, report, antialias, source_grid)
    if rope_tables:
        _check_rope_tables(rope_tables, model, source_grid, report)

    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head = _is_task_head(key, task_heads)
        if key not in target:
            (report.dropped if head else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            shapes = (key, tuple(value.shape), tuple(target[key].shape))
            (report.reshaped_heads if head else report.mismatched).append(shapes)
        else:
            converted[key] = value.to(dtype=target[key].dtype)
    mismatched = {key for key, _, _ in report.mismatched}
    for key in target:
        if key not in converted and key not in mismatched:
            (report.fresh if _is_task_head(key, task_heads) else report.missing).append(key)
    return converted, report


def _rename_final_norm(state: dict[str, Any], target: Mapping[str, Any], report: LoadReport) -> None:
    # MIM checkpoints end in `norm`; fine-tuned avg-pool models normalise in `fc_norm` instead (and the
    # reverse). timm makes the same move: the trained final norm is a better start than a fresh one.
    for source_name, model_name in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if f"{source_name}.weight" in state and f"{source_name}.weight" not in target and f"{model_name}.weight" in target:
            if f"{model_name}.weight" not in state:
                for kind in ("weight", "bias"):
                    state[f"{model_name}.{kind}"] = state.pop(f"{source_name}.{kind}")
                report.renamed[source_name] = model_name


def _resample_patch_kernel(state: dict[str, Any], target: Mapping[str, Any], report: LoadReport, antialias: bool):
    patch_weight = state.get("patch_embed.proj.weight")
    if patch_weight is not None and "patch_embed.proj.weight" in target:
        new_size = tuple(target["patch_embed.proj.weight"].shape[-2:])
        same_channels = patch_weight.shape[:2] == target["patch_embed.proj.weight"].shape[:2]
        if tuple(patch_weight.shape[-2:]) != new_size and same_channels:
            state["patch_embed.proj.weight"] = resample_patch_kernel(patch_weight, new_size, antialias=antialias)
            report.resampled.append(f"patch_embed.proj.weight {tuple(patch_weight.shape[-2:])} -> {new_size}")


def _resample_pos_embed(
    state: dict[str, Any], model: EvaViT, report: LoadReport, antialias: bool, source_grid: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Resample pos_embed to the model's grid when the file's grid differs; returns the file's grid."""
    pos_embed = state.get("pos_embed")
    if pos_embed is None:
        return source_grid
    num_grid_tokens = pos_embed.shape[1] - model.num_prefix_tokens
    if source_grid is None or source_grid[0] * source_grid[1] != num_grid_tokens:
        # The file does not state its grid: the model's when the counts agree (nothing to resample), else square.
        if num_grid_tokens == model.grid_size[0] * model.grid_size[1]:
            source_grid = model.grid_size
        else:
            source_grid = square_grid(num_grid_tokens, "the file's pos_embed")
    same_width = model.pos_embed is not None and pos_embed.shape[-1] == model.pos_embed.shape[-1]
    if same_width and source_grid != model.grid_size:
        state["pos_embed"] = resample_pos_embed(pos_embed, model.grid_size, source_grid, antialias=antialias)
        report.resampled.append(
            f"pos_embed {source_grid[0]}x{source_grid[1]} -> {model.grid_size[0]}x{model.grid_size[1]} patches"
        )
    return source_grid

def _check_rope_tables(pairs, model: EvaViT, source_grid, report: LoadReport) -> None:
    """The file's RoPE tables (not loaded: evamim computes them) must equal the model's at the file's grid."""
    if model.rope is None:
        report.conflicts.append(
            "the file holds RoPE tables (its attention uses 2-D RoPE) but the model has none: build it with "
            "use_rope=True and the file's rope_ref_grid (evamim convert reads them off the tables)"
        )
        return
    for cos, sin in pairs:
        tolerance = table_tolerance(cos.dtype)
        cos, sin, grid = flat_tables(cos, sin, source_grid)
        if cos.shape[-1] != model.rope.head_dim:
            report.conflicts.append(
                f"the file's RoPE tables are for heads of {cos.shape[-1]} channels, the model's heads have "
                f"{model.rope.head_dim}: num_heads should be {model.config.embed_dim // cos.shape[-1]}"
            )
            return
        expected_sin, expected_cos = model.rope.tables(grid)
        error = max((cos - expected_cos).abs().max().item(), (sin - expected_sin).abs().max().item())
        if error > tolerance:
            report.conflicts.append(
                f"the file's RoPE tables differ from the model's by up to {error:.2g} (rope_ref_grid "
                f"{model.rope.ref_grid}, rope_temperature {model.rope.temperature:g} in the model); "
                f"read the file's settings with evamim.models.checkpoint.read_rope_tables"
            )
            return
    report.notes.append("the file's RoPE tables match the model's (they are recomputed, not loaded)")


def _config_conflicts(values: Mapping[str, Any], config: EvaViTConfig, origin: str) -> list[str]:
    """Behaviour facts the file's config states that the model contradicts (weights cannot show them)."""
    conflicts = []
    for name in BEHAVIOUR_FIELDS:
        if name not in values:
            continue
        if name in ("rope_ref_grid", "rope_temperature") and not (config.use_rope and values.get("use_rope", True)):
            continue
        stated = values[name]
        if name == "rope_ref_grid" and stated is not None:
            stated = tuple(stated) if not isinstance(stated, int) else (stated, stated)
        if stated != getattr(config, name):
            conflicts.append(f"{name} is {stated!r} in {origin} but {getattr(config, name)!r} in the model")
    return conflicts


def load_weights(
    model: EvaViT,
    source: str | os.PathLike | Mapping[str, Any] | SourceWeights,
    *,
    strict: bool = True,
    task_heads: Sequence[str] = TASK_HEADS,
    prefer_ema: bool = False,
    antialias: bool | None = None,
) -> LoadReport:
    """Load weights of any supported format into ``model`` (see the module docstring).

    strict (default): every tensor of the model outside ``task_heads`` must get a value of the same shape from
    the file, every tensor of the file outside ``task_heads`` must be used, and what the file's config or RoPE
    tables say must agree with the model; otherwise WeightsMismatchError is raised and the model is untouched.
    ``task_heads``: key prefixes of task-specific tensors (default: classifier ``head.``, MIM ``lm_head.``,
    ``mask_token``) that may be initialised fresh or dropped; pass ``()`` to require them too.
    strict=False loads what matches and leaves the rest at init; the report says what (one summary line).
    prefer_ema: take ``model_ema`` / ``state_dict_ema`` (refused if the file has none); default ``model``.
    """
    weights = read_source(source, prefer_ema=prefer_ema)
    converted, report = convert_state_dict(weights.state, model, antialias=antialias,
                                           source_grid=weights.source_grid, task_heads=task_heads)
    report.container_key, report.other_containers = weights.container_key, list(weights.other_containers)
    if weights.kind is not None:
        report.source_format = weights.kind
    if weights.config is not None:
        report.config_origin = weights.config_origin
        report.conflicts += _config_conflicts(weights.config, model.config, weights.config_origin or "the file")
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"weights do not match the model (strict): {report.problems()}. Pass strict=False (evamim convert: "
            f"--non-strict) to load what matches and leave the rest at initialisation",
            report,
        )
    model.load_state_dict(converted, strict=False)
    return report


__all__ = [
    "CorruptCheckpointError",
    "Inference",
    "LoadReport",
    "NonFiniteWeightsError",
    "SourceWeights",
    "TASK_HEADS",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "convert_state_dict",
    "infer_architecture",
    "infer_config",
    "load_pretrained",
    "load_weights",
    "read_config",
    "read_rope_tables",
    "read_source",
    "read_state_dict",
    "save_pretrained",
    "timm_model_kwargs",
    "timm_qkv_fused",
    "to_open_clip_state_dict",
    "to_timm_state_dict",
    "unwrap_container",
]
