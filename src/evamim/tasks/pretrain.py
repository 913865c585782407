"""``evamim pretrain``: EVA masked image modeling against a frozen CLIP teacher.

config -> teacher (frozen, outside any wrapper) + student (EvaViT with mask token and lm_head sized to the
teacher's features) + block masks drawn in the collate step + the objective -> the shared training loop.
Everything that can be checked is checked before the first batch: config keys and types, batch size vs
accumulation, model and objective names, the teacher spec and its weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evamim.config import ConfigError, load_config, save_config, to_dict
from evamim.data.config import DataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig, Trainer, TrainResult, build_optimizer
from evamim.models.presets import list_models, model_config
from evamim.models.vit import EvaViTConfig
from evamim.tasks.common import resolve_device

logger = logging.getLogger(__name__)

EVA_MASK_RATIO = 105 / 256  # EVA / BEiT: 105 of 256 patches on a 16x16 grid


@dataclass
class ModelSection:
    """The student."""

    name: str = "eva_base_p16"
    """Preset (``evamim.list_models()``)."""
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    """Recompute block activations in backward: ~30% slower, much less memory (EVA-g on 40 GB cards)."""
    pretrained: str | None = None
    """Initial weights (any format ``evamim.load_weights`` reads), e.g. to continue from a released model."""
    options: dict[str, Any] = field(default_factory=dict)
    """Any other EvaViTConfig field, e.g. ``{use_rope: true}``."""


@dataclass
class TeacherSection:
    """The frozen target network (see docs/teachers.md)."""

    spec: str = "open_clip:ViT-L-14-quickgelu/openai"
    """``open_clip:MODEL/PRETRAINED``, ``hf:ID_OR_DIR``, ``timm:NAME`` or ``local:DIR``."""
    dtype: str | None = None
    """None follows the training precision; ``fp32`` / ``bf16`` / ``fp16`` force one."""
    options: dict[str, Any] = field(default_factory=dict)
    """Backend options: ``layer``, ``project``, ``cache_dir``, ..."""


@dataclass
class MaskingSection:
    """Which patches the student must predict."""

    kind: str = "block"
    """``block`` (BEiT/EVA block-wise) or ``random`` (MAE-style, exact count per image)."""
    mask_ratio: float | None = None
    """Fraction of patches to mask; None = 105/256 for ``block`` (EVA), 0.75 for ``random``."""
    min_num_patches: int = 16
    """``block``: smallest block, in patches (lower it for grids under ~8x8)."""
    min_aspect: float = 0.3
    """``block``: blocks have aspect ratios log-uniform in [min_aspect, 1 / min_aspect]."""


@dataclass
class PretrainConfig:
    """Defaults reproduce the EVA recipe at ViT-B scale; configs/pretrain/*.yaml hold the deltas."""

    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=150))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    objective: str = "clip_mim"
    """``clip_mim`` (EVA), ``feature_distill`` or ``pixel_mim`` (the paper's pilot comparison)."""
    batch_size: int = 256
    """Images per process and step (the global batch is this x the number of processes)."""
    output_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1``, ..."""


# ------------------------------------------------------------------------------------------- validation
def validate(config: PretrainConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any model, data or teacher is built."""
    from evamim.pretrain.objectives import list_objectives
    from evamim.teachers import parse_spec

    problems = []
    if config.model.name not in list_models():
        problems.append(f"model.name {config.model.name!r} is not a preset; choose one of {list_models()}")
    if config.objective not in list_objectives():
        problems.append(f"objective {config.objective!r} is unknown; choose one of {list_objectives()}")
    if config.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {config.batch_size}")
    accumulation = config.loop.grad_accum_steps
    if accumulation < 1 or config.batch_size % accumulation:
        problems.append(
            f"batch_size {config.batch_size} is not divisible by loop.grad_accum_steps {accumulation}: "
            f"change one of them (e.g. batch_size={max(1, config.batch_size // max(accumulation, 1)) * max(accumulation, 1)})"
        )
    if config.masking.kind not in ("block", "random"):
        problems.append(f"masking.kind must be 'block' or 'random', got {config.masking.kind!r}")
    try:
        parse_spec(config.teacher.spec)
    except ValueError as error:
        problems.append(f"teacher.spec: {error}")
    if config.teacher.dtype not in (None, "fp32", "bf16", "fp16"):
        problems.append(f"teacher.dtype must be null, fp32, bf16 or fp16, got {config.teacher.dtype!r}")
    if not problems:
        try:
            student_config(config, mim_head_dim=1)
        except ValueError as error:
            problems.append(f"model: {error}")
    if problems:
        raise ConfigError("invalid pre-training config:\n  " + "\n  ".join(problems))


def student_config(config: PretrainConfig, mim_head_dim: int) -> EvaViTConfig:
    """The student's EvaViTConfig: the preset at the data resolution, with a mask token and an lm_head.

    ``global_pool='token'`` keeps the final ``norm`` in the MIM path (EVA's ``norm`` -> ``lm_head``) and leaves
    no parameter without a gradient (an ``fc_norm`` would get none, which DDP rejects).
    """
    model = config.model
    return model_config(
        model.name,
        **{
            "img_size": config.data.image_size,
            "drop_path_rate": model.drop_path_rate,
            "grad_checkpointing": model.grad_checkpointing,
            "use_mask_token": config.objective != "feature_distill",
            "mim_head_dim": mim_head_dim,
            "global_pool": "token",
            "num_classes": 0,
            **model.options,
        },
    )


def build_mask_generator(config: PretrainConfig, grid: tuple[int, int]):
    from evamim.pretrain.masking import BlockMasking, RandomMasking

    masking = config.masking
    if masking.kind == "random":
        return RandomMasking(grid, mask_ratio=0.75 if masking.mask_ratio is None else masking.mask_ratio)
    return BlockMasking(
        grid,
        mask_ratio=EVA_MASK_RATIO if masking.mask_ratio is None else masking.mask_ratio,
        min_num_patches=masking.min_num_patches,
        min_aspect=masking.min_aspect,
    )


# ------------------------------------------------------------------------------------------------ the run
class PretrainStep:
    """The objective as the loop sees it: ``(student, batch) -> dict``, teacher targets computed inside.

    The teacher is called under the loop's autocast but outside autograd; it is never wrapped by DDP/FSDP.
    """

    def __init__(self, objective, teacher, device: torch.device):
        self.objective = objective
        self.teacher = teacher
        self.device = device

    def __call__(self, student: torch.nn.Module, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        targets = self.teacher(batch["images"]) if self.teacher is not None else None
        return self.objective(student, batch, targets)


def build_teacher(config: PretrainConfig, grid: tuple[int, int], device: torch.device):
    from evamim.teachers import create_teacher

    return create_teacher(
        config.teacher.spec,
        student_mean=config.data.mean,
        student_std=config.data.std,
        student_grid=grid,
        dtype=config.teacher.dtype,
        device=device,
        **config.teacher.options,
    )


def run_pretrain(config: PretrainConfig, hooks: tuple = ()) -> TrainResult:
    """Pre-train and write ``output_dir/{config.yaml, metrics.jsonl, tensorboard, checkpoints, model, summary.json}``.

    Re-running with the same output_dir resumes from the newest checkpoint that loads. ``hooks`` are
    ``evamim.engine.Hook`` instances passed to the loop (evaluation, EMA, early stops).
    """
    from evamim.data.loader import build_loader
    from evamim.models.checkpoint import load_weights, save_pretrained
    from evamim.models.vit import EvaViT
    from evamim.pretrain.objectives import get_objective

    validate(config)
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    torch.manual_seed(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    grid = student_config(config, mim_head_dim=1).grid_size
    objective_options = {"mean": config.data.mean, "std": config.data.std} if config.objective == "pixel_mim" else {}
    objective = get_objective(config.objective, **objective_options)
    teacher = build_teacher(config, grid, device) if objective.needs_teacher else None
    patch_size = model_config(config.model.name, **config.model.options).patch_size
    head_dim = teacher.embed_dim if teacher is not None else patch_size * patch_size * 3
    student = EvaViT(student_config(config, mim_head_dim=head_dim))
    if config.model.pretrained:
        report = load_weights(student, config.model.pretrained)
        logger.info("initial weights: %s", report)
    student.to(device)
    logger.info(
        "student %s: %.1fM parameters, %dx%d patches; teacher %s -> %s targets",
        config.model.name, sum(p.numel() for p in student.parameters()) / 1e6, grid[0], grid[1],
        config.teacher.spec if teacher is not None else "none", head_dim,
    )

    mask_generator = build_mask_generator(config, grid) if objective.uses_masks else None
    loader = build_loader(config.data, batch_size=config.batch_size, purpose="pretrain", mask_generator=mask_generator)
    optimizer = build_optimizer(student, config.optim)
    trainer = Trainer(
        student,
        PretrainStep(objective, teacher, device),
        loader,
        optimizer,
        optim=config.optim,
        loop=config.loop,
        checkpoint=config.checkpoint,
        out_dir=output_dir,
        config=to_dict(config),
        hooks=hooks,
    )
    result = trainer.train()
    model_dir = save_pretrained(student, output_dir / "model")
    summary = {
        "steps": result.step,
        "nonfinite_skipped": result.nonfinite_skipped,
        "stopped_early": result.stopped_early,
        "final_metrics": {k: float(v) for k, v in (result.metrics or {}).items()},
        "model_dir": str(model_dir),
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (deltas over the defaults), e.g. configs/pretrain/eva_b16_in1k.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.path=/data/in1k optim.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("EVAMIM_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    from evamim.teachers import TeacherWeightsNotFoundError

    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
        validate(config)
        result = run_pretrain(config)
    except (ConfigError, TeacherWeightsNotFoundError) as error:
        print(f"evamim pretrain: {error}")
        return 2
    print(f"done: {result.step} steps, model saved to {Path(config.output_dir) / 'model'}")
    return 0
