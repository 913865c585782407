"""The task runner's own promises: the batch arithmetic, --dry-run for every training task, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from evamim.cli import main
from evamim.config import load_config
from evamim.tasks.batching import BatchPlan, batch_plan, batch_problems
from test_finetune import tiny_overrides as finetune_overrides
from test_segmentation import tiny_overrides as segment_overrides
from test_segmentation import write_ade20k


def config(batch_size: int, accumulation: int = 1, global_batch: int | None = None):
    return SimpleNamespace(batch_size=batch_size, global_batch_size=global_batch,
                           loop=SimpleNamespace(grad_accum_steps=accumulation))


# ------------------------------------------------------------------------------------------ batch plans
def test_batch_size_alone_is_per_process_and_split_into_micro_batches():
    plan = batch_plan(config(256, accumulation=4), world_size=8)
    assert (plan.micro_batch, plan.grad_accum_steps, plan.per_process, plan.global_batch) == (64, 4, 256, 2048)


def test_global_batch_size_derives_the_accumulation_from_the_processes():
    """The paper recipe's 4096 = 32 per forward x processes x accumulation, on any number of GPUs."""
    for world, accumulation in ((128, 1), (64, 2), (8, 16), (1, 128)):
        plan = batch_plan(config(32, global_batch=4096), world)
        assert (plan.micro_batch, plan.grad_accum_steps, plan.global_batch) == (32, accumulation, 4096)
    assert "4096 images per optimizer step = 32 per forward x 64 process(es) x 2" in BatchPlan(32, 2, 64).describe()


@pytest.mark.parametrize("values, world, message", [
    (config(32, global_batch=1000), 8, "not a multiple of batch_size 32 x 8 process(es) = 256: choose global_batch_size=1024"),
    (config(32, accumulation=2, global_batch=4096), 8, "leave loop.grad_accum_steps at 1"),
    (config(6, accumulation=4), 1, "not divisible by loop.grad_accum_steps 4"),
    (config(0), 1, "batch_size must be >= 1"),
    (config(8, global_batch=0), 1, "global_batch_size must be >= 1"),
])
def test_batch_arithmetic_that_does_not_work_out_is_refused_with_a_fix(values, world, message):
    problems = batch_problems(values, world)
    assert len(problems) == 1 and message in problems[0]


def test_global_batch_size_trains_exactly_like_the_same_accumulation_by_hand(tmp_path):
    """batch_size=8 global_batch_size=16 on one process = batch_size=16 loop.grad_accum_steps=2."""
    from evamim.tasks.finetune import FinetuneConfig, run_finetune

    common = ("eval.enabled=false", "val_data.source=null", "model.drop_path_rate=0")
    by_hand = run_finetune(load_config(FinetuneConfig, None, finetune_overrides(
        tmp_path / "by_hand", 3, "batch_size=16", "loop.grad_accum_steps=2", *common)))
    derived = run_finetune(load_config(FinetuneConfig, None, finetune_overrides(
        tmp_path / "derived", 3, "batch_size=8", "global_batch_size=16", *common)))
    assert derived["batch"] == {"micro_batch": 8, "grad_accum_steps": 2, "processes": 1, "per_process": 16,
                                "global_batch": 16}
    assert derived["batch"] == by_hand["batch"]
    logged = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("by_hand", "derived")]
    assert logged[0] == logged[1] and len(logged[0]) == 3


# ---------------------------------------------------------------------------------------------- dry runs
def dry_run(argv: list[str], capsys) -> str:
    assert main([*argv, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out


def test_finetune_dry_run_plans_without_building_or_writing(tmp_path, capsys):
    output = tmp_path / "run"
    out = dry_run(["finetune", *finetune_overrides(output, 7), "loop.total_steps=null", "loop.epochs=3"], capsys)
    assert "model parameters:" in out and "4x4 patches" in out and "validation: synthetic images" in out
    assert "64 samples per epoch (data.synthetic_size) -> 4 steps per epoch" in out
    assert "12 steps (3 epochs); warmup 2 steps" in out and "16 images per optimizer step" in out
    assert not output.exists()  # nothing written


def test_segment_dry_run_counts_the_training_images(tmp_path, capsys):
    root = write_ade20k(tmp_path / "ade", train=8, val=2)
    output = tmp_path / "run"
    out = dry_run(["segment", *segment_overrides(root, output, "upernet", 5)], capsys)
    assert "segmenter: upernet head" in out and "segmenter parameters:" in out
    assert "8 samples per epoch" in out and "-> 2 steps per epoch" in out and "5 steps" in out
    assert not output.exists()


def test_segment_dry_run_without_the_dataset_says_why_the_length_is_unknown(tmp_path, capsys):
    out = dry_run(["segment", *segment_overrides(tmp_path / "nowhere", tmp_path / "run", "linear", 5)], capsys)
    assert "data: size unknown" in out and "nowhere" in out and "5 steps" in out


def test_segment_validation_split_has_one_name(tmp_path, capsys):
    assert main(["segment", *segment_overrides(tmp_path, tmp_path / "run", "linear", 5), "data.val_split=val"]) == 2
    assert "data.val_split" in capsys.readouterr().err


def test_pretrain_dry_run_without_a_teacher(tmp_path, capsys):
    out = dry_run(["pretrain", "objective=pixel_mim", "model.name=eva_tiny_p16", "data.source=synthetic",
                   "data.image_size=32", "model.options={patch_size: 8}", "masking.min_num_patches=2", "batch_size=8",
                   f"output_dir={tmp_path / 'r'}"],
                  capsys)
    assert "objective pixel_mim" in out and "lm_head 192" in out  # an 8 x 8 x 3 pixel patch
    assert "4x4 patches" in out and not (tmp_path / "r").exists()


@pytest.mark.slow  # builds the CLIP-L/14 teacher and the 1B student on the meta device: ~10 s
def test_the_eva_g_recipe_dry_run_prints_the_papers_student(capsys):
    out = dry_run(["pretrain", "--config", "eva_g14_merged30m", "data.path=/data/m30m/shard-{000000..002959}.tar"],
                  capsys)
    assert "student parameters: 1,012,229,632" in out
    assert "768-d targets" in out and "4096 images per optimizer step = 32 per forward x 1 process(es) x 128" in out
    assert "29,600,000 samples per epoch" in out and "7,226 steps per epoch" in out


def test_dry_run_refuses_a_bad_config_like_a_run(tmp_path, capsys):
    assert main(["finetune", *finetune_overrides(tmp_path / "run", 2), "head.global_pool=max", "--dry-run"]) == 2
    assert "head.global_pool must be one of" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- summary
def test_every_training_task_names_one_place_that_joins_processes():
    tasks = Path(__import__("evamim.tasks", fromlist=["x"]).__file__).parent
    joining = [path.name for path in tasks.glob("*.py") if "init_distributed" in path.read_text()]
    assert joining == ["runner.py"]
