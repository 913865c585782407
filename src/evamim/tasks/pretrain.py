"""``evamim pretrain``: EVA masked image modeling against a frozen CLIP teacher.

config -> teacher (frozen, outside any wrapper) + student (EvaViT with mask token and lm_head sized to the
teacher's features) + block masks drawn in the collate step + the objective -> the shared training loop.
Everything that can be checked is checked before the first batch: config keys and types, batch size vs
accumulation, model and objective names, the teacher spec and its weights.

Several processes (``torchrun -m evamim pretrain``, or one ``srun`` task per GPU): every process builds the
teacher and the student from the same seed, the loader gives each its share of every global batch
(``batch_size`` per process), and ``distributed.strategy`` decides how the student is shared (DDP, ZeRO-1,
FSDP2; see docs/multi-node.md). Only the main process writes the config, logs, summary and exported model.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evamim.config import ConfigError, save_config, to_dict
from evamim.data.config import DataConfig
from evamim.engine import (
    CheckpointConfig,
    LoopConfig,
    OptimConfig,
    Trainer,
    TrainResult,
    build_optimizer,
)
from evamim.engine.checkpoint import FileCheckpointer, ShardedCheckpointer
from evamim.engine.distributed import (
    DistributedConfig,
    DistributedState,
    build_optimizer_for_strategy,
    destroy_distributed,
    init_distributed,
    wrap_model,
)
from evamim.engine.optim import param_groups
from evamim.models.presets import list_models, model_config
from evamim.models.vit import EvaViTConfig
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import training_run_problems

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
class ValidationSection:
    """Held-out images scored with a fixed mask that hides every other patch (EVA's validation loss), every
    ``loop.eval_every`` steps and at the end; logged as ``eval/loss`` and ``eval/cos_masked``."""

    path: str | None = None
    """Validation images (folder, list or shards, like ``data.path``); None = no validation."""
    source: str | None = None
    """Their kind; None = the same as ``data.source``."""
    max_batches: int | None = None
    """Score at most this many batches per evaluation (per process); None = all of them."""


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
    validation: ValidationSection = field(default_factory=ValidationSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the student (docs/multi-node.md); unused by a one-process run except
    for the checkpoint format (``fsdp``: sharded directories)."""
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
    from evamim.pretrain.objectives import get_objective, list_objectives
    from evamim.teachers import check_teacher, parse_spec

    problems = []
    if config.model.name not in list_models():
        problems.append(f"model.name {config.model.name!r} is not a preset; choose one of {list_models()}")
    if config.model.pretrained and not Path(config.model.pretrained).exists():
        problems.append(f"model.pretrained {config.model.pretrained} does not exist: give the initial weights")
    objective = get_objective(config.objective) if config.objective in list_objectives() else None
    if objective is None:
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
    ratio = config.masking.mask_ratio
    if ratio is not None and not 0 < ratio < 1:
        problems.append(f"masking.mask_ratio must be in (0, 1) or null (the default of masking.kind), got {ratio}")
    try:
        parse_spec(config.teacher.spec)
    except ValueError as error:
        problems.append(f"teacher.spec: {error}")
    else:
        if objective is not None and objective.needs_teacher:
            try:  # an unknown model, option or tag, a non-ViT teacher: without building it
                check_teacher(config.teacher.spec, config.teacher.options)
            except TypeError as error:
                problems.append(f"teacher.options: {error}")
            except (ValueError, FileNotFoundError) as error:
                problems.append(f"teacher.spec: {error}")
    if config.teacher.dtype not in (None, "fp32", "bf16", "fp16"):
        problems.append(f"teacher.dtype must be null, fp32, bf16 or fp16, got {config.teacher.dtype!r}")
    if config.data.source in ("folder", "list") and not Path(config.data.path).exists():
        problems.append(f"data.path {config.data.path} does not exist (data.source={config.data.source})")
    val_source = config.validation.source or config.data.source
    if config.validation.path is not None and val_source in ("folder", "list") and not Path(config.validation.path).exists():
        problems.append(f"validation.path {config.validation.path} does not exist")
    problems.extend(training_run_problems(config))
    problems.extend(config.distributed.problems())
    if config.distributed.strategy == "fsdp" and config.loop.precision == "fp16":
        problems.append(
            "distributed.strategy=fsdp with loop.precision=fp16 is not supported: each process would check only its "
            "own gradient shards for overflows and the processes could disagree on the loss scale; use "
            "loop.precision=bf16, or strategy ddp/zero1 for fp16")
    if not problems:
        try:
            grid = student_config(config, mim_head_dim=1).grid_size
        except ValueError as error:
            problems.append(f"model: {error}")
        else:
            try:  # the masks' own checks (e.g. a budget below min_num_patches on a small grid)
                if objective.uses_masks:
                    build_mask_generator(config, grid)
            except ValueError as error:
                problems.append(f"masking: {error}")
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
    """The objective as the loop sees it: ``(model, batch) -> dict``, teacher targets computed inside.

    ``model`` is the ``ObjectiveModule`` (student + objective), possibly wrapped by DDP or sharded by FSDP:
    calling it runs the objective through the wrapper, so gradients are synchronised. The teacher is
    called under the loop's autocast but outside autograd; it is never wrapped.
    """

    def __init__(self, teacher, device: torch.device):
        self.teacher = teacher
        self.device = device

    def __call__(self, model: torch.nn.Module, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        targets = self.teacher(batch["images"]) if self.teacher is not None else None
        return model(batch, targets)


class MaskedValidation:
    """``eval_fn`` of the loop: the objective over a validation loader, averaged over every masked token of
    the whole set (all processes), so the number does not depend on batch size or process count."""

    def __init__(self, loader, step: PretrainStep, max_batches: int | None):
        self.loader = loader
        self.step = step
        self.max_batches = max_batches

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        self.loader.set_epoch(0)  # the same images every time, from the first
        totals = torch.zeros(3, dtype=torch.float64, device=self.step.device)  # loss sum, cos sum, tokens
        for index, batch in enumerate(self.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            output = self.step(model, batch)
            weight = output["num_masked"] if "num_masked" in output else torch.tensor(float(len(batch["images"])))
            cosine = output.get("cos_masked", -output["loss"])
            totals += torch.stack([output["loss"] * weight, cosine * weight, weight]).double().to(totals.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        if totals[2] == 0:
            raise ValueError("validation: no batch was scored; check validation.path and validation.max_batches")
        return {"loss": float(totals[0] / totals[2]), "cos_masked": float(totals[1] / totals[2])}


def build_validation(config: PretrainConfig, grid: tuple[int, int], step: PretrainStep) -> MaskedValidation | None:
    """The validation evaluator, or None when ``validation.path`` is not set."""
    import dataclasses

    from evamim.data.loader import build_loader
    from evamim.pretrain.masking import AlternatingMasking

    section = config.validation
    if section.path is None:
        return None
    data = dataclasses.replace(config.data, path=section.path, source=section.source or config.data.source)
    masks = AlternatingMasking(grid) if config.objective != "feature_distill" else None
    loader = build_loader(data, batch_size=config.batch_size, purpose="eval", mask_generator=masks)
    return MaskedValidation(loader, step, section.max_batches)


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
    ``evamim.engine.Hook`` instances passed to the loop (evaluation, EMA, early stops). Under torchrun or
    srun this joins the other processes first (and leaves the process group at the end); a process group
    that the caller initialised is used as it is.
    """
    validate(config)
    try:
        state = init_distributed(config.distributed, config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    result = _pretrain(config, state, hooks)
    # Only after a clean finish: destroying the group is itself a collective handshake, and after an error
    # the other processes may be stuck in a collective, so the process exits with the error instead (the
    # collective timeout ends the others, and torchrun stops them when one process fails).
    destroy_distributed(state)
    return result


def _pretrain(config: PretrainConfig, state: DistributedState, hooks: tuple) -> TrainResult:
    from evamim.data.loader import build_loader
    from evamim.pretrain.objectives import ObjectiveModule, get_objective

    device, main = state.device, state.is_main_process
    torch.manual_seed(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(config, output_dir / "config.yaml")

    grid = student_config(config, mim_head_dim=1).grid_size
    objective_options = {"mean": config.data.mean, "std": config.data.std} if config.objective == "pixel_mim" else {}
    objective = get_objective(config.objective, **objective_options)
    teacher = build_teacher(config, grid, device) if objective.needs_teacher else None
    student = build_student(config, teacher, device)
    # The initial weights are the same on every process; the random draws of training (drop path) are not.
    torch.manual_seed(config.seed + state.rank)
    logger.info(
        "student %s: %.1fM parameters, %dx%d patches; teacher %s -> %s targets; %d process(es), strategy %s",
        config.model.name, sum(p.numel() for p in student.parameters()) / 1e6, grid[0], grid[1],
        config.teacher.spec if teacher is not None else "none", student.lm_head.out_features, state.world_size,
        config.distributed.strategy,
    )

    mask_generator = build_mask_generator(config, grid) if objective.uses_masks else None
    loader = build_loader(config.data, batch_size=config.batch_size, purpose="pretrain", mask_generator=mask_generator)
    # The student has no running statistics: its buffers (RoPE tables) are identical everywhere.
    model = wrap_model(ObjectiveModule(student, objective), config.distributed, device=device,
                       world_size=state.world_size, shard_units=student.blocks, sync_buffers=False)
    optimizer = build_training_optimizer(student, config, state.world_size)
    checkpointer_class = ShardedCheckpointer if config.distributed.strategy == "fsdp" else FileCheckpointer
    step = PretrainStep(teacher, device)
    trainer = Trainer(
        model,
        step,
        loader,
        optimizer,
        optim=config.optim,
        loop=config.loop,
        checkpoint=config.checkpoint,
        out_dir=output_dir,
        config=to_dict(config),
        hooks=hooks,
        eval_fn=build_validation(config, grid, step),
        is_main_process=main,
        rank=state.rank,
        world_size=state.world_size,
        checkpointer=checkpointer_class(student, optimizer, is_main_process=main),
    )
    result = trainer.train()
    model_dir = export_model(student, output_dir / "model", is_main_process=main)
    if main:
        _write_summary(output_dir, result, model_dir, state.world_size, config.distributed.strategy)
    return result


def build_student(config: PretrainConfig, teacher, device: torch.device) -> torch.nn.Module:
    """The student EvaViT on ``device``, its lm_head as wide as the teacher's features (or a p x p x 3 pixel
    patch without a teacher), from ``model.pretrained`` if set. Call after seeding: the init is random."""
    from evamim.models.checkpoint import TASK_HEADS, load_weights
    from evamim.models.vit import EvaViT

    patch_size = model_config(config.model.name, **config.model.options).patch_size
    head_dim = teacher.embed_dim if teacher is not None else patch_size * patch_size * 3
    student = EvaViT(student_config(config, mim_head_dim=head_dim))
    if config.model.pretrained:
        # Strict on the backbone; a released model brings no lm_head / mask_token (or another teacher's), and
        # those start fresh: the report names them.
        report = load_weights(student, config.model.pretrained, strict=True, task_heads=TASK_HEADS)
        logger.info("initial weights: %s", report)
    return student.to(device)


def _write_summary(output_dir: Path, result: TrainResult, model_dir: Path, processes: int, strategy: str) -> None:
    summary = {
        "steps": result.step,
        "nonfinite_skipped": result.nonfinite_skipped,
        "data": result.data_totals,
        "stopped_early": result.stopped_early,
        "final_metrics": {k: float(v) for k, v in (result.metrics or {}).items()},
        "model_dir": str(model_dir),
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "processes": processes,
        "strategy": strategy,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def build_training_optimizer(student: torch.nn.Module, config: PretrainConfig, world_size: int) -> torch.optim.Optimizer:
    """``optim`` over the student's parameter groups (weight-decay exemptions, layer decay); under ``zero1``
    with several processes each process keeps the optimizer state of its share of the parameters."""
    optim = config.optim
    groups = param_groups(student, optim.weight_decay, layer_decay=optim.layer_decay)
    return build_optimizer_for_strategy(
        config.distributed.strategy, groups, lambda share: build_optimizer(student, optim, groups=share),
        world_size=world_size, defaults={"lr": optim.lr, "weight_decay": optim.weight_decay},
    )


def export_model(student: torch.nn.Module, directory: Path, *, is_main_process: bool) -> Path:
    """``save_pretrained`` of the student's full weights into ``directory`` by the main process.

    An FSDP-sharded student is gathered first (a collective: every process calls this), onto the main
    process's CPU, shard by shard, then loaded into a weightless copy of the model, so no process needs
    room for a second model on its device.
    """
    from evamim.models.checkpoint import save_pretrained
    from evamim.models.vit import EvaViT

    if not _is_sharded(student):
        return save_pretrained(student, directory) if is_main_process else directory
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process:
        return directory
    with torch.device("meta"):
        plain = EvaViT(student.config)
    plain.load_state_dict(full, assign=True)
    return save_pretrained(plain, directory)


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(callable(getattr(p, "full_tensor", None)) for p in module.parameters())


# ------------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/pretrain/eva_b16_in1k.yaml", "data.path=/data/in1k optim.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    code, config, result, rank = run_config_command("pretrain", PretrainConfig, run_pretrain, args)
    if code == 0 and rank == 0:
        print(f"done: {result.step} steps, model saved to {Path(config.output_dir) / 'model'}")
    return code

