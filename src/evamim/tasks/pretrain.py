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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig
from evamim.engine.distributed import DistributedConfig
from evamim.models.presets import list_models, model_config
from evamim.models.vit import EvaViTConfig
from evamim.pretrain.mae import DecoderConfig
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import TrainedModelSection, ValidationData, owned_option_problems, training_run_problems
from evamim.tasks.runner import RunContext, TrainingParts, run_training

logger = logging.getLogger(__name__)

EVA_MASK_RATIO = 105 / 256  # EVA / BEiT: 105 of 256 patches on a 16x16 grid
# EvaViTConfig fields the task sets from its own keys (or from the objective): model.options may not set them.
TASK_OWNED_OPTIONS = {
    "img_size": "data.image_size",
    "drop_path_rate": "model.drop_path_rate",
    "grad_checkpointing": "model.grad_checkpointing",
    "use_mask_token": None,
    "mim_head_dim": None,
    "global_pool": None,
    "num_classes": None,
}


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

    kind: str | None = None
    """``block`` (BEiT/EVA block-wise) or ``random`` (MAE-style, exact count per image); None = the objective's
    default (``block``; ``random`` for clip_mae). With clip_mae, block masks are filled to their budget with
    random patches so that every image has the same count."""
    mask_ratio: float | None = None
    """Fraction of patches to mask; None = 105/256 for ``block`` (EVA), 0.75 for ``random``."""
    min_num_patches: int = 16
    """``block``: smallest block, in patches (lower it for grids under ~8x8)."""
    min_aspect: float = 0.3
    """``block``: blocks have aspect ratios log-uniform in [min_aspect, 1 / min_aspect]."""


@dataclass
class PretrainEvalSection:
    """EVA's validation loss: held-out images (``val_data``) scored with a fixed mask that hides every other
    patch, every ``loop.eval_every`` steps and at the end; logged as ``eval/<metric>`` (the objective's
    ``eval_metrics``, e.g. ``loss`` and ``cos_masked`` for clip_mim)."""

    max_batches: int | None = None
    """Score at most this many batches per evaluation (per process); None = all of them."""


@dataclass
class PretrainConfig:
    """Defaults reproduce the EVA recipe at ViT-B scale; the recipes (evamim list recipes) hold the deltas."""

    model: TrainedModelSection = field(default_factory=lambda: TrainedModelSection(name="eva_base_p16"))
    teacher: TeacherSection = field(default_factory=TeacherSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=150))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val_data: ValidationData = field(default_factory=ValidationData)
    """Validation images (none by default: ``val_data.path`` turns validation on)."""
    eval: PretrainEvalSection = field(default_factory=PretrainEvalSection)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The decoder of the MAE-style objective ``clip_mae`` (EVA-L: 4 blocks, 512 wide); refused with any other."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the student (docs/multi-node.md); unused by a one-process run except
    for the checkpoint format (``fsdp``: sharded directories)."""
    objective: str = "clip_mim"
    """``clip_mim`` (EVA), ``clip_mae`` (EVA, MAE-style: encoder on visible patches + decoder), ``feature_distill``
    or ``pixel_mim`` (the paper's pilot comparison); ``evamim list objectives``."""
    batch_size: int = 256
    """Images per process and optimizer step; with ``global_batch_size`` set: per forward (see tasks/batching.py)."""
    global_batch_size: int | None = None
    """Images per optimizer step over all processes (the accumulation is derived); None = ``batch_size`` x processes."""
    output_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1``, ..."""


# ------------------------------------------------------------------------------------------- validation
def validate(config: PretrainConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any model, data or teacher is built."""
    from evamim.pretrain.objectives import list_objectives, objective_spec
    from evamim.teachers import check_teacher, parse_spec

    problems = owned_option_problems(config.model.options, TASK_OWNED_OPTIONS)
    if config.model.name not in list_models():
        problems.append(f"model.name {config.model.name!r} is not a preset; choose one of {list_models()}")
    if config.model.pretrained and not Path(config.model.pretrained).exists():
        problems.append(f"model.pretrained {config.model.pretrained} does not exist: give the initial weights")
    objective = objective_spec(config.objective) if config.objective in list_objectives() else None
    if objective is None:
        problems.append(f"objective {config.objective!r} is unknown; choose one of {list_objectives()}")
    if config.masking.kind not in (None, "block", "random"):
        problems.append(f"masking.kind must be 'block', 'random' or null (the objective's default), "
                        f"got {config.masking.kind!r}")
    if objective is not None and objective.encoder_decoder:
        problems.extend(config.decoder.problems())
    elif objective is not None and config.decoder != DecoderConfig():
        problems.append(f"decoder.* is set but objective {config.objective} has no decoder (only "
                        f"{[name for name in list_objectives() if objective_spec(name).encoder_decoder]} do): "
                        "remove the decoder settings or choose that objective")
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
    if config.data.source in ("folder", "list", "csv") and not Path(config.data.path).exists():
        problems.append(f"data.path {config.data.path} does not exist (data.source={config.data.source})")
    problems.extend(config.val_data.problems(config.data))
    problems.extend(training_run_problems(config))
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
    """The student's EvaViTConfig: the preset at the data resolution, with the objective's mask token and an
    lm_head of ``mim_head_dim``.

    ``global_pool='token'`` keeps the final ``norm`` in the MIM path (EVA's ``norm`` -> ``lm_head``) and leaves
    no parameter without a gradient (an ``fc_norm`` would get none, which DDP rejects).
    """
    from evamim.pretrain.objectives import objective_spec

    model = config.model
    return model_config(
        model.name,
        **{
            "img_size": config.data.image_size,
            "drop_path_rate": model.drop_path_rate,
            "grad_checkpointing": model.grad_checkpointing,
            "use_mask_token": objective_spec(config.objective).uses_mask_token,
            "mim_head_dim": mim_head_dim,
            "global_pool": "token",
            "num_classes": 0,
            **model.options,
        },
    )


def masking_kind(config: PretrainConfig) -> str:
    """``masking.kind``, or the objective's default when it is unset."""
    from evamim.pretrain.objectives import objective_spec

    return config.masking.kind or objective_spec(config.objective).default_masking


def build_mask_generator(config: PretrainConfig, grid: tuple[int, int]):
    from evamim.pretrain.masking import BlockMasking, RandomMasking
    from evamim.pretrain.objectives import objective_spec

    masking = config.masking
    if masking_kind(config) == "random":
        return RandomMasking(grid, mask_ratio=0.75 if masking.mask_ratio is None else masking.mask_ratio)
    return BlockMasking(
        grid,
        mask_ratio=EVA_MASK_RATIO if masking.mask_ratio is None else masking.mask_ratio,
        min_num_patches=masking.min_num_patches,
        min_aspect=masking.min_aspect,
        fill_to_budget=objective_spec(config.objective).encoder_decoder,
    )


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


def build_student(config: PretrainConfig, teacher, device: torch.device) -> torch.nn.Module:
    """The student on ``device``: an EvaViT whose lm_head is as wide as the objective says (the teacher's
    features, or a p x p x 3 pixel patch), or for an encoder-decoder objective a
    :class:`~evamim.pretrain.mae.MaeStudent` (EvaViT encoder without head + decoder to the teacher's width).
    The EvaViT (the encoder) starts from ``model.pretrained`` if set. Call after seeding: the init is random."""
    from evamim.models.checkpoint import TASK_HEADS, load_weights
    from evamim.pretrain.objectives import objective_spec

    patch_size = model_config(config.model.name, **config.model.options).patch_size
    head_dim = objective_spec(config.objective).head_dim(teacher.embed_dim if teacher is not None else None,
                                                         patch_size)
    student = new_student(config, head_dim)
    if config.model.pretrained:
        # Strict on the backbone; a released model brings no lm_head / mask_token (or another teacher's), and
        # those start fresh: the report names them.
        report = load_weights(exported_model(student), config.model.pretrained, strict=True, task_heads=TASK_HEADS)
        logger.info("initial weights: %s", report)
    return student.to(device)


def new_student(config: PretrainConfig, head_dim: int) -> torch.nn.Module:
    """The freshly initialised student of ``build_student`` (on the current default device; ``torch.device("meta")``
    for counting): an EvaViT with an lm_head of ``head_dim``, or an EvaViT encoder + a decoder to ``head_dim``."""
    from evamim.models.vit import EvaViT
    from evamim.pretrain.mae import MaeDecoder, MaeStudent
    from evamim.pretrain.objectives import objective_spec

    encoder_decoder = objective_spec(config.objective).encoder_decoder
    encoder = EvaViT(student_config(config, mim_head_dim=0 if encoder_decoder else head_dim))
    if not encoder_decoder:
        return encoder
    decoder = MaeDecoder(encoder.embed_dim, encoder.grid_size, head_dim, config.decoder, encoder.config.norm_eps)
    return MaeStudent(encoder, decoder)


def build_step(config: PretrainConfig, teacher, device: torch.device):
    """The step function: uint8 batches normalised on ``device`` with the data's mean/std, the teacher's targets,
    and for an encoder-decoder objective the ``visible``/``masked`` indices added while the batch is on the CPU."""
    from evamim.pretrain.mae import add_mask_indices
    from evamim.pretrain.objectives import objective_spec
    from evamim.pretrain.steps import PretrainStep

    prepare = add_mask_indices if objective_spec(config.objective).encoder_decoder else None
    return PretrainStep(teacher, device, mean=config.data.mean, std=config.data.std, prepare=prepare)


def exported_model(student: torch.nn.Module) -> torch.nn.Module:
    """What ``evamim pretrain`` saves as ``model/``: the EvaViT (an encoder-decoder student's encoder)."""
    return getattr(student, "encoder", student)


# ------------------------------------------------------------------------------------------------ the task
class PretrainTask:
    """EVA pre-training for the runner (``evamim.tasks.runner``): the student (with the objective) is trained
    and wrapped; the teacher lives inside the step, frozen and never wrapped."""

    name = "pretrain"

    def validate(self, config: PretrainConfig) -> None:
        validate(config)

    def build(self, config: PretrainConfig, context: RunContext) -> TrainingParts:
        from evamim.data.loader import build_loader
        from evamim.models.checkpoint import save_pretrained
        from evamim.pretrain.objectives import ObjectiveModule, get_objective
        from evamim.pretrain.steps import MaskedValidation

        grid = student_config(config, mim_head_dim=1).grid_size
        spec = get_objective(config.objective).spec
        objective = get_objective(config.objective, **{key: getattr(config.data, key) for key in spec.data_options})
        teacher = build_teacher(config, grid, context.device) if spec.needs_teacher else None
        student = build_student(config, teacher, context.device)
        logger.info("student %s%s: %dx%d patches; teacher %s", config.model.name,
                    " + decoder" if spec.encoder_decoder else "", grid[0], grid[1],
                    config.teacher.spec if teacher is not None else "none")
        masks = build_mask_generator(config, grid) if spec.uses_masks else None
        # The workers hand uint8 crops over (a quarter of float32's bytes); the step normalises them on the device.
        loader = build_loader(config.data, batch_size=context.batch_size, purpose="pretrain", mask_generator=masks,
                              output="uint8")
        step = build_step(config, teacher, context.device)
        evaluation = None
        if config.val_data.given:
            evaluation = MaskedValidation.build(config.val_data.data_config(config.data), spec, grid, step,
                                                batch_size=context.batch_size, max_batches=config.eval.max_batches)
        return TrainingParts(
            model=ObjectiveModule(student, objective),
            weights=student,
            step=step,
            data=loader,
            shard_units=student.blocks,
            evaluation=evaluation,
            export=lambda full, out: {"model_dir": str(save_pretrained(exported_model(full), out / "model"))},
            skeleton=getattr(student, "rebuilt", None),  # FSDP: what the gathered weights are loaded into
        )

    def results(self, config: PretrainConfig, result: Any, parts: TrainingParts) -> dict[str, Any]:
        return {"objective": config.objective}


def run_pretrain(config: PretrainConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Pre-train and write ``output_dir/{config.yaml, metrics.jsonl, tensorboard, checkpoints, model, summary.json}``;
    returns the summary.

    Re-running with the same output_dir resumes from the newest checkpoint that loads. ``hooks`` are
    ``evamim.engine.Hook`` instances passed to the loop (evaluation, EMA, early stops). Under torchrun or
    srun this joins the other processes first (and leaves the process group at the end); a process group
    that the caller initialised is used as it is.
    """
    return run_training(PretrainTask(), config, hooks)


def dry_run(config: PretrainConfig) -> str:
    """``evamim pretrain --dry-run``: the run's plan, with the student built on the meta device (no weights are
    read, no teacher is built, no data is read)."""
    from evamim.pretrain.objectives import objective_spec
    from evamim.tasks.plan import describe_run
    from evamim.teachers import check_teacher

    validate(config)
    spec = objective_spec(config.objective)
    grid = student_config(config, mim_head_dim=1).grid_size
    patch_size = model_config(config.model.name, **config.model.options).patch_size
    lines = [f"objective {config.objective}: {spec.description}"]
    teacher_dim = None
    if spec.needs_teacher:
        teacher_dim = check_teacher(config.teacher.spec, config.teacher.options)
        width = f"{teacher_dim}-d targets" if teacher_dim else "target width known once its config is read"
        lines.append(f"teacher {config.teacher.spec}: {width}, frozen, {config.teacher.dtype or config.loop.precision}")
    head_dim = spec.head_dim(teacher_dim, patch_size) if teacher_dim or spec.head == "pixels" else None
    with torch.device("meta"):
        student = new_student(config, head_dim or 1)
    backbone = sum(p.numel() for p in exported_model(student).parameters())
    if spec.encoder_decoder:
        extra = (f" + decoder {config.decoder.depth} blocks x {config.decoder.width} "
                 f"({sum(p.numel() for p in student.decoder.parameters()):,} parameters, not exported) to "
                 f"{head_dim if head_dim else '(width unknown)'}")
    else:
        backbone -= sum(p.numel() for name, p in student.named_parameters() if name.startswith(("lm_head.", "mask_token")))
        extra = (f" + lm_head {head_dim if head_dim else '(width unknown)'}"
                 + (" + mask token" if spec.uses_mask_token else ""))
    lines.append(f"student {config.model.name}: {grid[0]}x{grid[1]} patches of {patch_size} px at "
                 f"{config.data.image_size} px; {backbone:,} backbone parameters{extra}")
    if spec.uses_masks:
        lines.append(f"masking {masking_kind(config)}: {build_mask_generator(config, grid)}")
    models = {"student": student} if head_dim else {"student (lm_head width unknown)": student}
    return describe_run(config, models, lines)


# ------------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None, "data.path=/data/in1k optim.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("pretrain", PretrainConfig, run_pretrain, args,
                                                     dry_run_fn=dry_run)
    if code == 0 and rank == 0:
        validation = summary.get("validation")
        scores = "".join(f", validation {name} {value:.4f}" for name, value in (validation or {}).items())
        print(f"done: {summary['steps']} steps{scores}; model saved to {Path(config.output_dir) / 'model'}")
    return code
