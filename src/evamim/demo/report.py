"""The demo's report: numbers from every stage's outputs -> ``results.json``, ``report.md`` and PNG figures.

Everything is read back from what the runs wrote (``metrics.jsonl``, ``results.json`` / ``summary.json``, the
exported models), so a report can be rebuilt from a finished demo directory alone. The paper's three
qualitative findings are compared and reported either way, never asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from evamim import atomic
from evamim.demo import figures
from evamim.demo.plan import CLASSES, LABELLED_PER_CLASS, STUDENT_OBJECTIVES, Budget, Stage

CHANCE = 100.0 / CLASSES
# Seed-to-seed spread of one probe's accuracy in this world (measured: random init ~2 points, a student ~4): a
# smaller difference between two models is reported as a tie, whichever is ahead.
NOISE_POINTS = 3.0
DETECTION_METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")
FIGURE_SCENES = 6
COSINE_SCENES = 256


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record that has ``key`` with a finite value, the last one per step."""
    points = {int(r["step"]): float(r[key]) for r in records if key in r and r[key] is not None
              and math.isfinite(float(r[key]))}
    return sorted(points.items())


def collect(output: Path, stages: list[Stage], records: Mapping[str, Mapping[str, Any]], budget: Budget, *,
            seed: int, teacher_spec: str | None) -> dict[str, Any]:
    """The demo's numbers as one JSON-able dict."""
    results: dict[str, Any] = {
        "budget": budget.name, "seed": seed,
        "teacher": teacher_spec or f"local:{output / 'teacher' / 'model'} (stage 1)",
        "labelled_images_per_class": LABELLED_PER_CLASS,
        "seconds": {name: record.get("seconds") for name, record in records.items()},
    }
    results["total_seconds"] = round(sum(v or 0.0 for v in results["seconds"].values()), 1)
    # Each training stage's metrics.jsonl is read once: its loss curve (the figures draw these) and zero-shot curve.
    logged = {stage.name: read_metrics(stage.directory) for stage in stages if stage.command in ("clip", "pretrain")}
    results["loss_curves"] = {name: curve(records_, "loss") for name, records_ in logged.items()}
    if "teacher" in logged:
        results["teacher_zeroshot"] = _zero_shot(logged["teacher"])
    results["students"] = {}
    for objective in (name for name in STUDENT_OBJECTIVES if name in logged):
        losses = results["loss_curves"][objective]
        results["students"][objective] = {"first_loss": losses[0][1] if losses else None,
                                          "final_loss": losses[-1][1] if losses else None}
    results["probes"] = {}
    for stage in stages:
        if stage.command not in ("knn", "linprobe"):
            continue
        best = (records.get(stage.name, {}).get("result") or {}).get("best") or {}
        model = stage.name.split("/", 1)[1]
        entry = results["probes"].setdefault(model, {})
        entry[f"{stage.command}_top1"] = best.get("top1")
        entry[f"{stage.command}_features"] = best.get("features")
    results["eva_clip"] = {name: _zero_shot(logged[name]) for name in ("clip_from_eva", "clip_from_scratch")}
    results["detection"] = {
        stage.name.split("/", 1)[1]: {key: (records.get(stage.name, {}).get("result") or {}).get(key)
                                      for key in DETECTION_METRICS}
        for stage in stages if stage.command == "detect"}
    results["findings"] = findings(results)
    return results


def _zero_shot(records: list[dict[str, Any]]) -> dict[str, Any]:
    points = curve(records, "eval/zeroshot_top1")
    return {"curve": points, "final": points[-1][1] if points else None}


def findings(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The paper's qualitative claims this run has both numbers for, each with the two numbers compared and
    whether this run agrees."""
    probes = results["probes"]

    def probe(model: str) -> float | None:
        return (probes.get(model) or {}).get("linprobe_top1")

    def compare(claim: str, a: str, value_a: float | None, b: str, value_b: float | None) -> dict[str, Any]:
        known = value_a is not None and value_b is not None
        return {"claim": claim, a: value_a, b: value_b,
                "reproduced": value_a > value_b if known else None,
                "within_noise": abs(value_a - value_b) < NOISE_POINTS if known else None}

    eva = results["eva_clip"]
    detection = results.get("detection") or {}

    def box_ap(model: str) -> float | None:
        return (detection.get(model) or {}).get("bbox_AP")

    claims = {
        "pretraining_helps": compare("an EVA student's features beat random init (linear probe)",
                                     "clip_mim", probe("clip_mim"), "random_init", probe("random_init")),
        "clip_targets_beat_pixels": compare("CLIP features are better MIM targets than pixels (linear probe)",
                                            "clip_mim", probe("clip_mim"), "pixel_mim", probe("pixel_mim")),
        "mim_beats_distillation": compare("masked prediction beats plain feature distillation (linear probe)",
                                          "clip_mim", probe("clip_mim"), "feature_distill", probe("feature_distill")),
        "eva_init_helps_clip": compare("a CLIP initialised from EVA beats one from scratch (final zero-shot)",
                                       "from_eva", eva["clip_from_eva"]["final"], "from_scratch",
                                       eva["clip_from_scratch"]["final"]),
        "eva_init_helps_detection": compare("a detector with an EVA backbone beats one from random init (box AP)",
                                            "from_eva", box_ap("clip_mim"), "random_init", box_ap("random_init")),
    }
    return {name: claim for name, claim in claims.items() if claim["reproduced"] is not None}


# ------------------------------------------------------------------------------------------ masked predictions
def masked_prediction_maps(student_dir: Path, teacher_spec: str, seed: int, count: int) -> dict[str, Any]:
    """The clip_mim student's predictions against the teacher's targets on ``count`` held-out scenes, block-masked
    as in training: images (uint8), masks and per-patch cosines (patch grids), and the mean cosine over the
    masked and the visible patches."""
    from evamim.data.scenes import SyntheticScenes
    from evamim.models.presets import create_model
    from evamim.pretrain.masking import BlockMasking
    from evamim.teachers import CLIP_MEAN, CLIP_STD, create_teacher

    student = create_model(pretrained=student_dir).eval()
    grid = tuple(student.grid_size)
    teacher = create_teacher(teacher_spec, student_grid=grid).eval()
    scenes = SyntheticScenes(count, student.config.img_size[0], seed=seed + 99)
    pixels = np.stack([np.asarray(scenes.draw(i)[0]) for i in range(count)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    masking = BlockMasking(grid, num_masking_patches=round(0.4 * grid[0] * grid[1]), min_num_patches=2)
    masks = masking(count, np.random.default_rng(seed)).reshape(count, -1)
    with torch.no_grad():
        targets = teacher(images)
        tokens = student.forward_features(images, mask=masks)[:, student.num_prefix_tokens:]
        cosine = torch.nn.functional.cosine_similarity(student.lm_head(tokens), targets, dim=-1)
    return {
        "images": pixels, "masks": masks.reshape(count, *grid).numpy(),
        "cosines": cosine.reshape(count, *grid).numpy(),
        "cos_masked": float(cosine[masks].mean()), "cos_visible": float(cosine[~masks].mean()),
    }


# ------------------------------------------------------------------------------------------------- writing
def write_report(output: Path, stages: list[Stage], records: Mapping[str, Mapping[str, Any]], budget: Budget, *,
                 seed: int, teacher_spec: str | None) -> dict[str, Any]:
    """``results.json``, ``report.md`` and ``figures/*.png`` under ``output``; returns the results."""
    results = collect(output, stages, records, budget, seed=seed, teacher_spec=teacher_spec)
    spec = teacher_spec or f"local:{output / 'teacher' / 'model'}"
    maps = masked_prediction_maps(output / "clip_mim" / "model", spec, seed, COSINE_SCENES)
    results["masked_prediction"] = {"scenes": COSINE_SCENES, "cos_masked": maps["cos_masked"],
                                    "cos_visible": maps["cos_visible"]}
    paths = _figures(output, results, maps)
    results["figures"] = {name: str(path.relative_to(output)) for name, path in paths.items()}
    atomic.write_json(output / "results.json", results)
    atomic.write_text(output / "report.md", markdown(results, stages))
    return results


def _figures(output: Path, results: Mapping[str, Any], maps: Mapping[str, Any]) -> dict[str, Path]:
    losses = results["loss_curves"]
    folder = output / "figures"
    panels: dict[str, tuple[str, dict]] = {}
    if "teacher" in losses:
        panels["stage 1: teacher CLIP"] = ("contrastive loss", {"teacher": losses["teacher"]})
    panels["stage 2: students with CLIP targets"] = ("negative cosine to the teacher", {
        objective: losses[objective] for objective in ("clip_mim", "feature_distill") if objective in losses})
    if "pixel_mim" in losses:
        panels["stage 2: pixel_mim student"] = ("MSE to normalised pixels", {"pixel_mim": losses["pixel_mim"]})
    panels["stage 4: EVA-CLIP"] = ("contrastive loss", {
        "vision tower from EVA (clip_mim)": losses["clip_from_eva"], "from scratch": losses["clip_from_scratch"]})
    probes = results["probes"]
    models = list(probes)
    shown = slice(0, FIGURE_SCENES)
    return {
        "losses": figures.loss_curves(panels, folder / "losses.png"),
        "masked_predictions": figures.masked_predictions(
            list(maps["images"][shown]), list(maps["masks"][shown]), list(maps["cosines"][shown]),
            folder / "masked_predictions.png",
            title=f"clip_mim student vs teacher: mean cosine {maps['cos_masked']:.2f} on masked patches, "
                  f"{maps['cos_visible']:.2f} on visible ones ({COSINE_SCENES} held-out scenes)"),
        "probes": figures.accuracy_bars(
            [m.replace("_", " ") for m in models],
            {"kNN": [probes[m].get("knn_top1") or 0.0 for m in models],
             "linear probe": [probes[m].get("linprobe_top1") or 0.0 for m in models]},
            folder / "probes.png", chance=CHANCE,
            title=f"shape classification from frozen features\n({LABELLED_PER_CLASS} labelled scenes per class)"),
        "eva_clip": figures.accuracy_curves(
            {"vision tower from EVA (clip_mim)": results["eva_clip"]["clip_from_eva"]["curve"],
             "from scratch": results["eva_clip"]["clip_from_scratch"]["curve"]},
            folder / "eva_clip.png", chance=CHANCE, title="EVA-CLIP: zero-shot shape accuracy while training"),
    }


def one_decimal(value: float | None) -> str:
    """A metric in the report and on the console: one decimal, or - when there is none."""
    return "-" if value is None else f"{value:.1f}"


def markdown(results: Mapping[str, Any], stages: list[Stage]) -> str:
    """report.md: what ran, what each stage reached, the paper's findings at this scale, the figures."""
    lines = ["# evamim demo report", "",
             f"Budget `{results['budget']}`, seed {results['seed']}, {results['total_seconds']:.0f} s of training and "
             f"evaluation on this machine. Teacher: `{results['teacher']}`.", "",
             "Every model is the same ViT (EvaViT, 4 blocks, width 96, 16-pixel patches) on 64-pixel synthetic scenes "
             "(`data.synthetic_world=scenes`: 1-4 objects of one shape, each its own colour); the label is the "
             "shape, one of 8 (chance 12.5%).", ""]
    if "teacher_zeroshot" in results:
        lines += ["## Stage 1: the teacher", "",
                  f"A small CLIP trained on the scenes' captions reaches **{one_decimal(results['teacher_zeroshot']['final'])}%** "
                  "zero-shot shape accuracy on held-out scenes (prompts in the captions' words).", ""]
    lines += ["## Stages 2-3: EVA students and what their features are worth", "",
              f"Frozen features, {results['labelled_images_per_class']} labelled scenes per class, top-1 % on held-out "
              "scenes (the best of the cls / mean-pooled features and of the probe's learning rates):", "",
              "| model | kNN | linear probe | first -> last pre-training loss |", "|---|---|---|---|"]
    for model, entry in results["probes"].items():
        student = results["students"].get(model)
        loss = "-" if not student or student["final_loss"] is None else f"{student['first_loss']:.3f} -> {student['final_loss']:.3f}"
        lines.append(f"| {model.replace('_', ' ')} | {one_decimal(entry.get('knn_top1'))} | {one_decimal(entry.get('linprobe_top1'))} | {loss} |")
    masked = results.get("masked_prediction")
    if masked:
        lines += ["", f"The clip_mim student's predictions have a mean cosine of {masked['cos_masked']:.3f} with the "
                  f"teacher's features at masked patches ({masked['cos_visible']:.3f} at visible ones) on "
                  f"{masked['scenes']} held-out scenes.", "", "![masked predictions](figures/masked_predictions.png)", ""]
    eva = results["eva_clip"]
    lines += ["## Stage 4: EVA-CLIP", "",
              f"The same CLIP recipe, vision tower from the clip_mim student: **{one_decimal(eva['clip_from_eva']['final'])}%** "
              f"final zero-shot; from scratch: **{one_decimal(eva['clip_from_scratch']['final'])}%**.", "",
              "![EVA-CLIP](figures/eva_clip.png)", ""]
    detection = results.get("detection") or {}
    if detection:
        lines += ["## Stage 5: detection and instance segmentation", "",
                  "A ViTDet-style Mask R-CNN (`evamim detect`) on synthetic instances (`evamim data make-instances`: "
                  "1-4 shapes of 8 kinds anywhere in a 128-pixel image, not on the scenes' grid), the same recipe with "
                  "the backbone from the clip_mim student or at random; COCO AP on 50 held-out images:", "",
                  "| backbone | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 |",
                  "|---|---|---|---|---|---|---|"]
        for name, entry in detection.items():
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(one_decimal(entry.get(key)) for key in DETECTION_METRICS)
                         + " |")
        lines.append("")
    lines += ["## The paper's findings at this scale", "",
              "| claim | this run | reproduced |", "|---|---|---|"]
    for finding in results["findings"].values():
        numbers = ", ".join(f"{k} {one_decimal(v)}" for k, v in finding.items()
                            if k not in ("claim", "reproduced", "within_noise"))
        verdict = {True: "yes", False: "**no**"}[finding["reproduced"]]
        if finding["within_noise"]:
            verdict = f"a tie (under {NOISE_POINTS:.0f} points apart)"
        lines.append(f"| {finding['claim']} | {numbers} | {verdict} |")
    if "clip_targets_beat_pixels" not in results["findings"]:
        lines.append("| pixel_mim and feature_distill students | not run with `--quick` | - |")
    if "eva_init_helps_detection" not in results["findings"]:
        lines.append("| detection from the EVA student vs random init | not run with `--quick` | - |")
    lines += ["", "Reported, not tuned for: at this scale a finding can go either way (docs/demo.md says what "
              "the full demo found and why).", "",
              "![probes](figures/probes.png)", "", "![losses](figures/losses.png)", "", "## Stages", "",
              "| stage | command | seconds |", "|---|---|---|"]
    for stage in stages:
        seconds = results["seconds"].get(stage.name)
        lines.append(f"| {stage.title} | `evamim {stage.command}` | {'-' if seconds is None else f'{seconds:.0f}'} |")
    lines += ["", "`evamim demo --print-commands` prints every stage as the command that runs it (each is also the "
              "first line of its section in `demo.log`); its outputs are in the stage's folder (config.yaml, "
              "metrics.jsonl, results).", ""]
    return "\n".join(lines)
