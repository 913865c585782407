"""The benchmark commands run end to end and report what docs/benchmarks.md records (numbers are not asserted)."""

import json

import torch

import evamim
from evamim.cli import main


def test_bench_model_compares_with_timm(capsys):
    code = main(["bench", "model", "--model", "eva_tiny_p16", "--img-size", "32", "--batch-size", "2",
                 "--rounds", "1", "--steps", "1", "--warmup", "1", "--device", "cpu", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"evamim", "timm"}
    assert report["results"]["evamim"]["img_per_s"] > 0 and report["speedup_vs_timm"] > 0
    assert {"torch", "commit", "date", "device"} <= set(report)
    assert report["train_gflops_per_img"] > 0


def test_bench_pretrain_counts_teacher_and_student(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = evamim.create_model("eva_tiny_p16", img_size=64, depth=2, global_pool="token")
    evamim.save_pretrained(teacher, tmp_path / "teacher")
    code = main(["bench", "pretrain", "--model", "eva_tiny_p16", "--teacher", f"local:{tmp_path / 'teacher'}",
                 "--img-size", "64", "--batch-size", "2", "--min-block-patches", "2", "--rounds", "1", "--steps", "1", "--warmup", "0",
                 "--device", "cpu", "--dtype", "fp32", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["img_per_s"] > 0
    # teacher: 2 of the student's 12 blocks, so roughly 2 / (3 x 12 + 2) of the FLOPs
    assert 0.03 < report["teacher_flop_fraction"] < 0.08
    assert 0 < report["mean_masked_patches"] <= 7
