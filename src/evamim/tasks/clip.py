"""``evamim clip``: contrastive image-text training of an EVA-CLIP (``evamim.clip.EvaClip``) on the task runner.

config -> an EvaClip: the vision tower (any evamim preset) initialised from ``model.pretrained`` (an EVA MIM
checkpoint, an evamim / timm / open_clip / EVA-CLIP file, loaded strictly) or at random, open_clip's text tower
initialised from ``model.text_pretrained`` (a CLIP's text tower, less its projection and logit scale, as EVA-CLIP
does) or at random, a learnable logit scale; or the whole CLIP from ``model.clip_pretrained`` (an EvaClip
directory, an official EVA-CLIP checkpoint, an open_clip EVA model) -> image-caption pairs (``data.captions``:
shards with ``txt``/``json``, a CSV / TSV caption table, or the synthetic captioned images) -> CLIP's contrastive
loss over the global batch, features gathered across processes with their gradients (``evamim.clip.loss``) ->
AdamW with layer decay on the vision tower and its own lr / weight decay / layer decay for the text tower (the
logit scale: its own lr, clamped to [0, ln 100] after every step, as open_clip does) ->
zero-shot top-1 / top-5 on ``val_data`` (labelled images; class names from the data, prompts from the templates).

Runs on the runner (``evamim.tasks.runner``): one process or many (ddp or zero1), checkpoints, exact resume,
``summary.json``. The trained model is exported to ``output_dir/model`` (``evamim.clip.load_clip``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine import CheckpointConfig, Hook, LoopConfig, OptimConfig, unwrap_model
from evamim.engine.distributed import DistributedConfig
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import (
    TrainedModelSection,
    ValidationData,
    owned_option_problems,
    source_classes,
    training_run_problems,
)
from evamim.tasks.runner import RunContext, TrainingParts, run_training

logger = logging.getLogger(__name__)

# EvaViTConfig fields the task sets (the tower's head is the CLIP projection; the image size is the data's).
TASK_OWNED_OPTIONS = {"img_size": "data.image_size", "drop_path_rate": "model.drop_path_rate",
                      "grad_checkpointing": "model.grad_checkpointing", "global_pool": "model.pool",
                      "num_classes": "model.embed_dim", "mim_head_dim": None, "use_mask_token": None}


@dataclass
class ClipModelSection(TrainedModelSection):
    """``model.*``: the CLIP to train. ``name``, ``pretrained``, ``options``, ``drop_path_rate`` and
    ``grad_checkpointing`` are the vision tower's (``pretrained``: EVA MIM, evamim, timm, open_clip / EVA-CLIP
    weights, loaded strictly; None = random init)."""

    text_pretrained: str | None = None
    """The text tower's initial weights: the text tower of any CLIP file (open_clip ``CustomTextCLIP`` or plain
    ``CLIP``, e.g. OpenAI's CLIP-L; an official EVA-CLIP file), loaded strictly -- all but ``text_projection``
    and ``logit_scale``, which keep their initialisation, as EVA-CLIP's ``--skip-list`` leaves them (another
    joint width needs a new projection anyway). None = random init."""
    clip_pretrained: str | None = None
    """A whole CLIP to start from instead (both towers, both projections, the logit scale, every tensor strictly):
    a saved EvaClip directory, an official EVA-CLIP checkpoint (``EVA02_CLIP_L_psz14_s4B.pt`` ...), or an
    open_clip EVA model; the architecture is still this section's. Not together with ``pretrained`` /
    ``text_pretrained``."""

    pool: str = "token"
    """``token`` (open_clip's EVA towers) or ``avg``."""
    embed_dim: int = 512
    """Width of the joint embedding."""
    text: dict[str, Any] = field(default_factory=lambda: {"context_length": 77, "width": 512, "heads": 8,
                                                          "layers": 12})
    """open_clip ``text_cfg`` fields of the text tower."""


@dataclass
class TextOptimSection:
    """The text tower's and the logit scale's own learning rate, weight decay and layer decay (the schedule,
    warmup then cosine, is shared: each group follows it scaled to its own peak)."""

    lr: float | None = None
    """None = ``optim.lr``."""
    weight_decay: float | None = None
    """None = ``optim.weight_decay`` (1-D parameters, embeddings and ``logit_scale`` are never decayed)."""
    layer_decay: float | None = None
    """Layer-wise lr decay of the text tower, as EVA-CLIP's ``--text-ld``: embeddings are layer 0, block i is
    layer i + 1, the final norm and projection layer L + 1, scaled by ``layer_decay ** (L + 1 - layer)``.
    None = off (``optim.layer_decay`` is the vision tower's)."""
    logit_scale_lr: float | None = None
    """The logit scale's peak lr (EVA-CLIP: ``--lr``, apart from the towers'); None = the text tower's."""


@dataclass
class ClipEvalSection:
    """Zero-shot classification on ``val_data`` every ``loop.eval_every`` steps and at the end."""

    templates: str | None = None
    """A file of prompt templates, one per line with ``{}`` for the class name; None = OpenAI's 80 ImageNet ones."""
    class_names: str | None = None
    """A file of class names (one per line in label order, or a JSON {folder: name} map); None = the folder names."""
    batch_size: int | None = None
    """Images per evaluation batch (per process); None = the training micro-batch."""
    max_batches: int | None = None


@dataclass
class ClipTrainConfig:
    """Defaults: a ViT-B/16 EVA-CLIP at small scale; the recipes (``evamim list recipes``) hold the deltas."""

    model: ClipModelSection = field(default_factory=lambda: ClipModelSection(name="eva_base_p16", drop_path_rate=0.0))
    data: DataConfig = field(default_factory=lambda: DataConfig(captions=True, crop_scale=(0.9, 1.0)))
    val_data: ValidationData = field(default_factory=ValidationData)
    """Labelled images for zero-shot evaluation (a class-folder tree, or ``source=synthetic``); none = no evaluation."""
    eval: ClipEvalSection = field(default_factory=ClipEvalSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-4, min_lr=0.0, warmup_steps=2000, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6, layer_decay=None))
    text_optim: TextOptimSection = field(default_factory=TextOptimSection)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=32))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    batch_size: int = 256
    """Pairs per process and optimizer step; with ``global_batch_size`` set: per forward (see tasks/batching.py).
    The contrastive loss compares each image with the captions of the whole global batch."""
    global_batch_size: int | None = None
    output_dir: str = "runs/clip"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def clip_config(config: ClipTrainConfig):
    """The ``evamim.clip.ClipConfig`` of the run (a ValueError says what is wrong)."""
    from evamim.clip.config import ClipConfig
    from evamim.models.presets import model_config

    model = config.model
    vision = model_config(model.name, **{**model.options, "img_size": config.data.image_size,
                                         "drop_path_rate": model.drop_path_rate,
                                         "grad_checkpointing": model.grad_checkpointing})
    return ClipConfig(vision=vision, pool=model.pool, embed_dim=model.embed_dim, text=dict(model.text))


def validate(config: ClipTrainConfig) -> None:
    from evamim.models.presets import list_models

    model = config.model
    problems = owned_option_problems(model.options, TASK_OWNED_OPTIONS)
    if model.name not in list_models():
        problems.append(f"model.name {model.name!r} is not a preset; choose one of {list_models()}")
    for key, what in (("pretrained", "the vision tower's weights"), ("text_pretrained", "a CLIP file with the text "
                      "tower"), ("clip_pretrained", "a saved EvaClip directory or a CLIP checkpoint")):
        path = getattr(model, key)
        if path is not None and not Path(path).exists():
            problems.append(f"model.{key} {path} does not exist: give {what}")
    if model.clip_pretrained is not None and (model.pretrained or model.text_pretrained):
        problems.append("model.clip_pretrained sets every tensor of both towers: leave model.pretrained and "
                        "model.text_pretrained unset (null), or drop model.clip_pretrained")
    if not config.data.captions:
        problems.append("CLIP training needs captions: set data.captions=true")
    if config.data.labels:
        problems.append("data.labels=true: the training pairs are images and captions; labels belong to val_data")
    problems += config.val_data.problems(config.data)
    for key in ("lr", "weight_decay", "logit_scale_lr"):
        value = getattr(config.text_optim, key)
        if value is not None and not value >= 0:
            problems.append(f"text_optim.{key} must be >= 0 or null, got {value}")
    decay = config.text_optim.layer_decay
    if decay is not None and not 0 < decay <= 1:
        problems.append(f"text_optim.layer_decay must be in (0, 1] or null, got {decay}")
    for key in ("templates", "class_names"):
        path = getattr(config.eval, key)
        if path is not None and not Path(path).is_file():
            problems.append(f"eval.{key} {path} is not a file")
    problems += training_run_problems(config)
    if not problems:
        try:
            clip_config(config)
        except ValueError as error:
            problems.append(f"model: {error}")
    if problems:
        raise ConfigError("invalid CLIP config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------ the step
class ClipStep:
    """``(model, batch) -> contrastive loss and metrics``: captions are tokenized here, on the fly."""

    def __init__(self, tokenizer, device: torch.device):
        self.tokenizer = tokenizer
        self.device = device

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from evamim.clip.loss import contrastive_loss

        images = batch["images"].to(self.device, non_blocking=True)
        tokens = self.tokenizer(list(batch["captions"])).to(self.device, non_blocking=True)
        output = model(images, tokens)
        return contrastive_loss(output["image_features"], output["text_features"], output["logit_scale"])


class ClampLogitScale(Hook):
    """open_clip's rule after every optimizer step: ``logit_scale`` (log of 1 / temperature) into [0, ln 100]."""

    def on_step_end(self, trainer, metrics, skipped: bool) -> None:
        unwrap_model(trainer.model).clamp_logit_scale_()


def text_layer_id(name: str, num_layers: int) -> int:
    """Layer of a text-tower parameter (its name inside ``model.text``) for layer-wise lr decay, EVA-CLIP's rule
    (``training/optim.py`` ``get_num_layer_for_transformer``): the embeddings 0, ``transformer.resblocks.{i}``
    i + 1, everything else (final norm, projection) ``num_layers + 1``."""
    if name.startswith(("token_embedding", "positional_embedding", "cls_emb")):
        return 0
    parts = name.split(".")
    if parts[:2] == ["transformer", "resblocks"]:
        return int(parts[2]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, config: ClipTrainConfig) -> list[dict]:
    """The vision tower's weight-decay and layer-decay groups, then the text tower's (its own lr as ``lr_scale``
    of the shared schedule, its weight decay, its layer decay) and the logit scale's (its own lr, no decay)."""
    from evamim.engine.optim import param_groups as decay_groups

    optim, text = config.optim, config.text_optim
    groups = decay_groups(model.visual.trunk, optim.weight_decay, layer_decay=optim.layer_decay)
    for group in groups:  # names as in the model's state dict
        group["param_names"] = [f"visual.trunk.{name}" for name in group["param_names"]]
    text_scale = 1.0 if text.lr is None else text.lr / optim.lr
    text_decay = optim.weight_decay if text.weight_decay is None else text.weight_decay
    num_layers = len(model.text.transformer.resblocks)
    skip = model.no_weight_decay()
    by_key: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.text.named_parameters():
        if not parameter.requires_grad:
            continue
        decayed = parameter.ndim > 1 and f"text.{name}" not in skip
        layer = text_layer_id(name, num_layers) if text.layer_decay is not None else num_layers + 1
        scale = text_scale * (text.layer_decay ** (num_layers + 1 - layer) if text.layer_decay is not None else 1.0)
        group = by_key.setdefault((layer, decayed), {
            "params": [], "param_names": [], "weight_decay": text_decay if decayed else 0.0, "lr_scale": scale,
            "wd_scale": 1.0 if decayed and text_decay else 0.0})
        group["params"].append(parameter)
        group["param_names"].append(f"text.{name}")
    groups += [by_key[key] for key in sorted(by_key)]
    logit_scale = text_scale if text.logit_scale_lr is None else text.logit_scale_lr / optim.lr
    groups.append({"params": [model.logit_scale], "param_names": ["logit_scale"], "weight_decay": 0.0,
                   "lr_scale": logit_scale, "wd_scale": 0.0})
    return [group for group in groups if group["params"]]


# ------------------------------------------------------------------------------------------------ the task
class ClipTask:
    name = "clip"

    def validate(self, config: ClipTrainConfig) -> None:
        validate(config)

    def build(self, config: ClipTrainConfig, context: RunContext) -> TrainingParts:
        from evamim.clip.checkpoint import save_clip
        from evamim.clip.model import EvaClip
        from evamim.data.loader import build_loader

        model = EvaClip(clip_config(config))
        try:
            for line in initialise(model, config.model):
                logger.info("%s", line)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"model: {error}") from None
        model = model.to(context.device)
        tokenizer = model.tokenizer()
        try:
            loader = build_loader(config.data, batch_size=context.batch_size, purpose="pretrain")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data: {error}") from None
        return TrainingParts(
            model=model,
            step=ClipStep(tokenizer, context.device),
            data=loader,
            param_groups=lambda weights: param_groups(weights, config),  # after wrapping: FSDP's parameters
                    evaluation=self._evaluation(config, context, tokenizer),
            hooks=[ClampLogitScale()],
            # FSDP shards block by block: the vision tower's blocks and the text tower's residual blocks.
            shard_units=[*model.visual.trunk.blocks, *model.text.transformer.resblocks],
            export=lambda full, out: {"model_dir": str(save_clip(full, out / "model"))},
        )

    @staticmethod
    def _evaluation(config: ClipTrainConfig, context: RunContext, tokenizer):
        from evamim.clip.templates import OPENAI_IMAGENET_TEMPLATES, load_templates
        from evamim.clip.zeroshot import ZeroShotEvaluation
        from evamim.data.loader import build_loader

        if not config.val_data.given:
            return None
        data = dataclasses.replace(config.val_data.data_config(config.data), labels=True, captions=False)
        micro = context.batch_size // context.grad_accum_steps
        try:
            loader = build_loader(data, batch_size=config.eval.batch_size or micro, purpose="eval")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"val_data: {error}") from None
        try:
            names = class_names(source_classes(loader), config.eval.class_names)
            templates = load_templates(config.eval.templates) if config.eval.templates else OPENAI_IMAGENET_TEMPLATES
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"eval: {error}") from None
        return ZeroShotEvaluation(loader, names, tokenizer, device=context.device, templates=templates,
                                  max_batches=config.eval.max_batches)

    def results(self, config: ClipTrainConfig, result: Any, parts: TrainingParts) -> dict[str, Any]:
        section = config.model
        if section.clip_pretrained:
            return {"vision": section.name, "clip_init": section.clip_pretrained}
        return {"vision": section.name, "vision_init": section.pretrained or "random",
                "text_init": section.text_pretrained or "random"}


def initialise(model: nn.Module, section: ClipModelSection) -> list[str]:
    """Load ``model.clip_pretrained`` (everything), or ``model.pretrained`` (the vision tower) and
    ``model.text_pretrained`` (the text tower less projection and logit scale), strictly; returns log lines."""
    from evamim.clip.checkpoint import load_clip_weights, load_vision
    from evamim.clip.interop import load_open_clip_text

    if section.clip_pretrained:
        return [f"whole CLIP from {section.clip_pretrained}: {line}"
                for line in load_clip_weights(model, section.clip_pretrained)]
    lines = []
    if section.pretrained:
        lines.append(f"vision tower: {load_vision(model, section.pretrained)}")
    if section.text_pretrained:
        loaded = load_open_clip_text(model, section.text_pretrained, projection=False, logit_scale=False)
        lines.append(f"text tower from {section.text_pretrained}: {loaded}")
    return lines


def class_names(folders: list[str] | None, names_file: str | None) -> list[str]:
    """The zero-shot class names in label order: the class folders' (renamed by ``names_file``), or, for data
    without class folders (shards, list files), ``names_file`` as a list in label order."""
    from evamim.clip.templates import folder_class_names, load_class_names

    if folders is not None:
        return folder_class_names(folders, names_file)
    if names_file is None:
        raise ConfigError("the validation data has no class folders (shards, list files): give eval.class_names, "
                          "a file with one class name per line in label order")
    names = load_class_names(names_file)
    if isinstance(names, dict):
        raise ConfigError(f"eval.class_names {names_file} maps class folders, but the validation data has none: "
                          "give the names as a list in label order")
    return list(names)


def run_clip(config: ClipTrainConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Train and write the output directory (see the module docstring); returns the summary."""
    return run_training(ClipTask(), config, hooks)


def dry_run(config: ClipTrainConfig) -> str:
    from evamim.clip.model import EvaClip
    from evamim.tasks.plan import describe_run

    validate(config)
    settings = clip_config(config)
    with torch.device("meta"):
        model = EvaClip(settings)
    section = config.model
    if section.clip_pretrained:
        init = f"vision and text from {section.clip_pretrained}"
    else:
        init = (f"vision from {section.pretrained or 'random init'}, "
                f"text from {section.text_pretrained or 'random init'}")
    lines = [f"EVA-CLIP: vision {section.name}, {section.pool} pooling, text {settings.text['width']}x"
             f"{settings.text['layers']}, joint embedding {settings.embed_dim}; {init}",
             f"zero-shot: {config.val_data.path or config.val_data.source if config.val_data.given else 'off'}"]
    return describe_run(config, {"clip": model}, lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None, "model.pretrained=runs/pretrain/model data.path='/data/cc/{000000..000099}.tar' "
                                       "val_data.path=/data/imagenet/val")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("clip", ClipTrainConfig, run_clip, args, dry_run_fn=dry_run)
    if code == 0 and rank == 0:
        scores = "".join(f", {name} {value:.2f}" for name, value in (summary.get("validation") or {}).items())
        print(f"done: {summary['steps']} steps{scores}; model saved to {Path(config.output_dir) / 'model'}")
    return code
