"""``evamim bench pretrain --compare naive``: evamim's pre-training step against the loop a user writes with timm's
Eva and open_clip, on a tiny student and a tiny open_clip tower (numbers are not asserted, only that the two
loops do the same work: same parameters, same loss and gradient norm at step 0)."""

import json

import pytest
import torch

from evamim.cli import main

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

# A 2-block CLIP ViT, patch 8 at 32 px: a 4x4 grid, like the eva_tiny_p16 student at 64 px (so the images are
# resized for the teacher, in both loops).
TINY_CLIP = "evamim-test-bench-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return f"open_clip:{TINY_CLIP}/random"


def _bench(teacher, *extra):
    return main(["bench", "pretrain", "--model", "eva_tiny_p16", "--teacher", teacher, "--image-size", "64",
                 "--batch-size", "2", "--min-block-patches", "2", "--rounds", "2", "--steps", "1", "--warmup", "1",
                 "--device", "cpu", *extra])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compare_naive_reports_both_loops_on_the_same_work(tiny_clip, capsys, precision):
    assert _bench(tiny_clip, "--compare", "naive", "--precision", precision, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"evamim", "naive"}
    for result in report["results"].values():
        assert result["img_per_s"] > 0 and len(result["s_per_step_rounds"]) == 2
        assert {"s_per_step", "mfu", "peak_mem_gib", "input_dtype"} <= set(result)
    assert report["results"]["naive"]["input_dtype"] == "float32"
    assert report["speedup_vs_naive"] > 0 and report["speedup_vs_naive_paired"] > 0 and report["tflop_per_img"] > 0
    assert 0 < report["teacher_flop_fraction"] < 1 and 0 < report["mean_masked_patches"] <= 7
    assert report["parameters"]["evamim"] == report["parameters"]["naive"] > 0
    check = report["check"]
    assert check["passed"] and check["loss_abs_diff"] <= check["tolerance"]["loss_abs"]
    if precision == "fp32":  # the same kernels on the same numbers
        assert check["loss_abs_diff"] < 1e-6 and check["grad_norm_rel_diff"] < 1e-5
    assert {"torch", "commit", "date", "device", "timm"} <= set(report)


def test_compare_naive_table_and_no_check(tiny_clip, capsys):
    assert _bench(tiny_clip, "--compare", "naive", "--no-check", "--masking", "random", "--mask-ratio", "0.5") == 0
    out = capsys.readouterr().out
    assert "evamim / naive:" in out and "step-0 check: skipped" in out
    assert "8.0 masked patches/img" in out  # random masking: exactly half of the 16 patches


def test_the_check_refuses_loops_that_compute_different_things(tiny_clip, capsys, monkeypatch):
    from evamim.bench import pretrain

    build = pretrain.build_naive

    def build_wrong(*args, **kwargs):
        loop = build(*args, **kwargs)
        with torch.no_grad():
            loop.student.lm_head.weight.mul_(-1)  # e.g. a head that is not the same
        return loop

    monkeypatch.setattr(pretrain, "build_naive", build_wrong)
    assert _bench(tiny_clip, "--compare", "naive") == 1
    assert "do not compute the same thing" in capsys.readouterr().err


def test_compare_naive_refuses_what_it_has_no_naive_loop_for(tiny_clip, tmp_path, capsys):
    assert _bench(tiny_clip, "--compare", "naive", "--objective", "pixel_mim") == 2
    assert "clip_mim" in capsys.readouterr().err
    import evamim

    evamim.save_pretrained(evamim.create_model("eva_tiny_p16", img_size=64, depth=1, global_pool="token"),
                           tmp_path / "teacher")
    assert _bench(f"local:{tmp_path / 'teacher'}", "--compare", "naive") == 2
    assert "open_clip" in capsys.readouterr().err


def test_other_objectives_without_compare(tiny_clip, capsys):
    from evamim.pretrain.objectives import list_objectives

    for objective in [name for name in list_objectives() if name != "clip_mim"]:
        assert _bench(tiny_clip, "--objective", objective, "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["objective"] == objective and report["img_per_s"] > 0 and report["tflop_per_img"] > 0
        assert (report["teacher"] is None) == (objective == "pixel_mim")


def test_compare_objectives_times_clip_mae_against_clip_mim_with_their_own_masks(tiny_clip, capsys):
    assert _bench(tiny_clip, "--objective", "clip_mae", "--compare", "objectives", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    mae, mim = report["results"]["clip_mae"], report["results"]["clip_mim"]
    assert (mae["masking"], mae["masked_fraction"]) == ("random", 0.75)
    assert mim["masking"] == "block" and 0 < mim["masked_fraction"] <= 7 / 16  # 105/256 of a 4x4 grid, rounded
    # The encoder sees a quarter of the tokens, but the 512-wide decoder costs more than this tiny encoder saves.
    from evamim.models.flops import forward_flops, mae_forward_flops
    from evamim.models.presets import model_config

    config = model_config("eva_tiny_p16", img_size=64)
    teacher = mae["tflop_per_img"] - 3 * mae_forward_flops(config, 4, 512, 4.0, 12, 32) / 1e12
    assert teacher == pytest.approx(mim["tflop_per_img"] * mim["teacher_flop_fraction"], rel=1e-6)
    assert mim["tflop_per_img"] == pytest.approx(teacher + 3 * forward_flops(config) / 1e12, rel=0.01)
    assert report["speedup_vs_clip_mim"] > 0 and report["parameters"]["clip_mae"] > report["parameters"]["clip_mim"]
    assert _bench(tiny_clip, "--compare", "objectives") == 2
    assert "choose another objective" in capsys.readouterr().err
