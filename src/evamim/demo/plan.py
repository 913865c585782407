"""What ``evamim demo`` runs: its stages, each an ordinary evamim run with a list of ``key=value`` overrides.

1. ``teacher``: a small CLIP trained on the scenes' captions (``evamim clip``), or ``--teacher SPEC`` instead.
2. ``clip_mim``, ``pixel_mim``, ``feature_distill``: the same student pre-trained with each objective for the
   same number of steps (``evamim pretrain``), the first two against the teacher.
3. ``probe/<model>``: kNN and a linear probe (``evamim knn``, ``evamim linprobe``) of random init, the teacher and
   each student, from few labels (32 per class): what pre-training buys is label efficiency.
4. ``clip_from_eva``, ``clip_from_scratch``: EVA-CLIP, the CLIP recipe again with its vision tower initialised
   from the clip_mim student or at random, zero-shot accuracy logged along the way.
5. ``detect/clip_mim``, ``detect/random_init`` (full budget): a ViTDet-style Mask R-CNN (``evamim detect``) on
   128-pixel synthetic instances (``evamim data make-instances``: shapes anywhere in the image, not on the
   scenes' grid), backbone from the clip_mim student or at random; COCO box and mask AP.

Every model is the same tower (EvaViT, 4 blocks, width 96, 16-pixel patches on 64-pixel scenes: 16 tokens), so
the teacher, the students and both CLIPs differ only by how they were trained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

TOWER = ["model.name=eva_tiny_p16", "model.options={patch_size: 16, depth: 4, embed_dim: 96, num_heads: 3}"]
RANDOM_TOWER = ["model.name=eva_tiny_p16",
                "model.options={patch_size: 16, depth: 4, embed_dim: 96, num_heads: 3, img_size: 64}"]
# The scenes are drawn at the model's resolution and neither cropped nor resized (crop scale and ratio 1, centre
# crop 1), so objects keep their size and place on the patch grid; horizontal flips stay.
WORLD = ["data.synthetic_world=scenes", "data.synthetic_resolution=64", "data.image_size=64",
         "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.0,1.0]", "data.crop_pct=1.0", "data.pin_memory=false"]
CLIP_MODEL = ["model.pool=avg", "model.embed_dim=64", "model.text={context_length: 32, width: 64, heads: 2, layers: 2}"]
STUDENT_OBJECTIVES = ("clip_mim", "pixel_mim", "feature_distill")
PROBE_FEATURES = "features=[cls,avg]"
LABELLED_PER_CLASS = 32
CLASSES = 8


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each stage trains; ``quick`` is the same pipeline in well under two minutes (tests)."""

    name: str
    teacher_steps: int
    student_steps: int
    clip_steps: int
    clip_eval_every: int
    images: int  # distinct training scenes
    probe_val_images: int
    probe_epochs: int
    comparisons: bool  # also pre-train the pixel_mim and feature_distill students (the paper's pilot comparison)
    detection_steps: int  # stage 5's training steps; 0 = no detection stages

    @property
    def objectives(self) -> tuple[str, ...]:
        return STUDENT_OBJECTIVES if self.comparisons else STUDENT_OBJECTIVES[:1]


# Measured on 2 CPU cores: the teacher and both CLIPs take ~0.3 s a step, a student ~0.23 s (batch 128 both;
# per second of CPU, batch 128 learned faster than 64 or 256). Against a 300-step teacher, a clip_mim student's
# linear probe was below random init's after 150 steps at batch 64 and 15 points above after 300 at batch 128.
# Detection, 2 cores, batch 8 of 128-pixel images: ~0.65 s a step (200 steps). At 64 pixels this tower sees a 4 x 4
# grid and neither backbone learns to detect in 200 steps (box AP 7.3 from random init, 12.2 from the student).
FULL = Budget("full", teacher_steps=450, student_steps=300, clip_steps=150, clip_eval_every=25, images=8192,
              probe_val_images=1024, probe_epochs=100, comparisons=True, detection_steps=200)
QUICK = Budget("quick", teacher_steps=300, student_steps=300, clip_steps=30, clip_eval_every=10, images=4096,
               probe_val_images=1024, probe_epochs=100, comparisons=False, detection_steps=0)

# Stage 5's data: `evamim data make-instances` with these options, into <output>/instances (seed: the demo's).
INSTANCES = {"train": 200, "val": 50, "resolution": 128, "max_objects": 4, "radius_range": (0.12, 0.22)}
# The recipe tiny_synthetic_instances with the demo's tower at 128 pixels (the student's 4 x 4 position embedding is
# resampled to 8 x 8; objects 2-3.5 patches wide, as the scenes' are ~1.6): 4 x 4 windows, blocks 1 and 3 global;
# no layer decay, so that both backbones train alike.
DETECTION = ["model.drop_path_rate=0.0", "model.window_size=4", "model.global_blocks=[1, 3]", "head.channels=64",
             "head.anchor_sizes=[16, 32, 64, 128, 256]", "head.box_convs=2", "head.box_fc_dim=256", "head.mask_convs=2",
             "head.rpn_pre_nms_top_n=[500, 300]", "head.rpn_post_nms_top_n=[200, 100]", "head.rois_per_image=64",
             "data.img_size=128", "data.scale_range=[0.8, 1.25]", "data.num_workers=0", "data.pin_memory=false",
             "optim.lr=1e-3", "optim.schedule=step", "optim.layer_decay=null", "loop.log_every=20",
             "batch_size=8", "global_batch_size=null", "checkpoint.every=100", "device=cpu"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One run: ``command`` (clip, pretrain, knn, linprobe) with ``overrides``, its output in ``directory``."""

    name: str
    title: str
    command: str
    overrides: tuple[str, ...]
    directory: Path


def demo_stages(output: Path, budget: Budget, *, seed: int = 0, teacher_spec: str | None = None,
                templates: Path | None = None) -> list[Stage]:
    """Every stage in order; ``teacher_spec`` (e.g. ``open_clip:ViT-B-16/openai``) replaces the teacher stage."""
    # No loader worker: on two cores it competes with the step for a core and slows it down (measured).
    # A checkpoint every 100 steps: an interrupted stage resumes from there when the demo is run again.
    common = [*WORLD, "device=cpu", "data.num_workers=0", f"data.seed={seed}", "loop.epochs=null",
              "checkpoint.every=100"]
    stages: list[Stage] = []
    trained_teacher = teacher_spec is None
    if trained_teacher:
        stages.append(_clip_stage("teacher", "teacher: a small CLIP learns the captions", output, budget, common,
                                  templates, budget.teacher_steps, init=None, seed=seed))
        teacher_spec = f"local:{output / 'teacher' / 'model'}"
    for objective in budget.objectives:
        teacher = [f"teacher.spec={teacher_spec}"] if objective != "pixel_mim" else []
        stages.append(Stage(
            objective, f"student: {objective} pre-training", "pretrain",
            (*TOWER, *common, f"objective={objective}", *teacher, "model.drop_path_rate=0.0",
             f"seed={seed}", "masking.min_num_patches=2",  # a 4 x 4 grid: EVA's 16-patch smallest block would not fit
             f"data.synthetic_size={budget.images}", "batch_size=128", f"loop.total_steps={budget.student_steps}",
             "loop.log_every=10", "loop.eval_every=0", "eval.max_batches=2", "optim.lr=1.5e-3", "optim.min_lr=1e-5",
             "optim.warmup_steps=20", f"output_dir={output / objective}"),
            output / objective))
    for name, model in probe_models(output, budget.objectives, teacher_trained=trained_teacher).items():
        probe_data = [*WORLD, "device=cpu", "data.num_workers=0", f"data.seed={seed + 7}",
                      f"data.synthetic_size={budget.probe_val_images + LABELLED_PER_CLASS * CLASSES}",
                      f"val_data.holdout={budget.probe_val_images / (budget.probe_val_images + LABELLED_PER_CLASS * CLASSES)}",
                      PROBE_FEATURES, f"seed={seed}"]
        directory = output / "probe" / name
        stages.append(Stage(f"knn/{name}", f"kNN: {name}", "knn",
                            (*model, *probe_data, "ks=[10,20]", f"output_dir={directory / 'knn'}",
                             f"cache_dir={directory / 'features'}"),
                            directory / "knn"))
        stages.append(Stage(f"linprobe/{name}", f"linear probe: {name}", "linprobe",
                            (*model, *probe_data, "probe.lrs=[1,3,10,30]", f"probe.epochs={budget.probe_epochs}",
                             f"probe.warmup_epochs={budget.probe_epochs // 10}", "probe.batch_size=64",
                             f"output_dir={directory / 'linprobe'}", f"cache_dir={directory / 'features'}"),
                            directory / "linprobe"))
    eva = output / "clip_mim" / "model"
    stages.append(_clip_stage("clip_from_eva", "EVA-CLIP: vision tower from the clip_mim student", output, budget,
                              common, templates, budget.clip_steps, init=eva, seed=seed))
    stages.append(_clip_stage("clip_from_scratch", "CLIP from scratch (the same recipe)", output, budget, common,
                              templates, budget.clip_steps, init=None, seed=seed))
    if budget.detection_steps:
        for name, model in {"clip_mim": [f"model.pretrained={eva}"], "random_init": TOWER}.items():
            stages.append(_detection_stage(name, model, output, budget.detection_steps, seed))
    return stages


def instances_dir(output: Path) -> Path:
    return output / "instances"


def _detection_stage(name: str, model: list[str], output: Path, steps: int, seed: int) -> Stage:
    data = instances_dir(output)
    directory = output / "detect" / name
    return Stage(f"detect/{name}", f"detection: backbone from {name.replace('_', ' ')}", "detect", (
        *model, *DETECTION, f"data.images={data / 'images' / 'train'}",
        f"data.annotations={data / 'annotations' / 'instances_train.json'}",
        f"val_data.images={data / 'images' / 'val'}", f"val_data.annotations={data / 'annotations' / 'instances_val.json'}",
        f"loop.total_steps={steps}", f"loop.eval_every={steps}", f"optim.milestones=[{steps * 9 // 10}]",
        f"optim.warmup_steps={steps // 10}", f"seed={seed}", f"data.seed={seed}", f"output_dir={directory}",
    ), directory)

def probe_models(output: Path, objectives: tuple[str, ...], *, teacher_trained: bool) -> dict[str, list[str]]:
    """The models the probes compare: name -> its ``model.*`` overrides."""
    models = {"random init": RANDOM_TOWER}
    if teacher_trained:
        models["teacher"] = [f"model.pretrained={output / 'teacher' / 'model'}"]
    for objective in objectives:
        models[objective] = [f"model.pretrained={output / objective / 'model'}"]
    return {name.replace(" ", "_"): overrides for name, overrides in models.items()}


def _clip_stage(name: str, title: str, output: Path, budget: Budget, common: list[str], templates: Path | None,
                steps: int, *, init: Path | None, seed: int) -> Stage:
    evaluation = [f"eval.templates={templates}"] if templates else []
    every = budget.clip_eval_every if name != "teacher" else max(steps // 4, 1)
    return Stage(name, title, "clip", (
        *TOWER, *CLIP_MODEL, *common, *([f"model.pretrained={init}"] if init else []), f"seed={seed}",
        f"data.synthetic_size={budget.images}", "val_data.source=synthetic", *evaluation, "eval.max_batches=4",
        "eval.batch_size=128", "batch_size=128", f"loop.total_steps={steps}", "loop.log_every=10",
        f"loop.eval_every={every}", "optim.lr=2e-3", f"optim.warmup_steps={min(30, steps // 3)}",
        f"output_dir={output / name}",
    ), output / name)
