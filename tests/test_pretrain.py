"""`evamim pretrain` end to end on CPU: learning, exact resume, early and explicit config errors."""

import json
from pathlib import Path

import pytest
import torch

import evamim
from evamim.cli import main
from evamim.config import ConfigError, load_config
from evamim.engine import Hook
from evamim.tasks.pretrain import PretrainConfig, run_pretrain, validate


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A frozen random ViT teacher (patch 8 at 32 px -> 4x4 grid, 48-d features) as an evamim directory."""
    torch.manual_seed(123)
    teacher = evamim.create_model("eva_tiny_p16", patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=2,
                                  global_pool="token")
    return evamim.save_pretrained(teacher, tmp_path_factory.mktemp("teacher") / "teacher")


def tiny_overrides(teacher_dir: Path, output_dir: Path, steps: int) -> list[str]:
    return [
        "model.name=eva_tiny_p16",
        "model.drop_path_rate=0.1",  # exercises the RNG state on resume
        "model.options={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
        f"teacher.spec=local:{teacher_dir}",
        "masking.min_num_patches=2",
        "data.source=synthetic",
        "data.image_size=32",
        "data.synthetic_resolution=48",
        "data.synthetic_size=256",
        "data.num_workers=0",
        "data.pin_memory=false",
        "optim.lr=2e-3",
        "optim.warmup_steps=5",
        f"loop.total_steps={steps}",
        "loop.epochs=null",
        "loop.log_every=1",
        "loop.progress_bar=false",
        "checkpoint.every=1000",
        "batch_size=16",
        "device=cpu",
        f"output_dir={output_dir}",
    ]


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_tiny_pretraining_lowers_the_loss_and_saves_a_loadable_model(teacher_dir, tmp_path):
    config = load_config(PretrainConfig, None, tiny_overrides(teacher_dir, tmp_path / "run", 50))
    summary = run_pretrain(config)
    assert summary["steps"] == 50 and summary["nonfinite_skipped"] == 0
    curve = losses(tmp_path / "run")
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.1, (first, last)  # negative cosine: lower is better
    model = evamim.create_model(pretrained=tmp_path / "run" / "model")
    assert model.lm_head.out_features == 48 and model.mask_token is not None
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "summary.json").exists()


class CrashAtStep(Hook):
    """Simulates a process killed mid-run: raises after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics, skipped):
        if trainer.step >= self.step:
            raise KeyboardInterrupt("simulated crash")


def test_resumed_run_repeats_the_uninterrupted_one_exactly(teacher_dir, tmp_path):
    """8 steps straight vs. a run that checkpoints at step 4, dies at step 6, and is re-run: same losses, same weights."""
    straight = load_config(PretrainConfig, None, tiny_overrides(teacher_dir, tmp_path / "straight", 8))
    run_pretrain(straight)
    crashed = load_config(PretrainConfig, None, tiny_overrides(teacher_dir, tmp_path / "resumed", 8) + ["checkpoint.every=4"])
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(crashed, hooks=(CrashAtStep(6),))
    run_pretrain(crashed)  # the same command again: resumes from step 4
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = evamim.create_model(pretrained=tmp_path / "straight" / "model").state_dict()
    b = evamim.create_model(pretrained=tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_on_a_folder_with_a_corrupt_file_skips_it(teacher_dir, tmp_path, caplog):
    """A bad file is skipped and counted by the loader; training (with accumulation) carries on."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 36), (20 * i, 100, 255 - 20 * i)).save(folder / f"{i:02d}.png")
    (folder / "05_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    overrides = tiny_overrides(teacher_dir, tmp_path / "run", 3) + [
        "data.source=folder", f"data.path={folder}", "batch_size=4", "loop.grad_accum_steps=2",
        "data.max_bad_fraction=0.5", "optim.warmup_steps=1",
    ]
    with caplog.at_level("WARNING"):
        result = run_pretrain(load_config(PretrainConfig, None, overrides))
    assert result["steps"] == 3 and result["nonfinite_skipped"] == 0
    assert "05_broken.jpg" in caplog.text  # reported with its path
    # ... and counted where the run's record is kept.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["samples_bad"] == 1 and summary["data"]["samples_tried"] >= 13
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["samples_bad"] == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "valid keys under optim"),
        ("batch_size=abc", "batch_size"),
        ("teacher.spec=clip:ViT-L-14", "invalid teacher spec"),
        ("loop.grad_accum_steps=3", "not divisible by loop.grad_accum_steps 3"),
        ("model.name=eva_huge_p16", "not a preset"),
        ("objective=mae", "unknown"),
        ("model.options.img_size=112", "model.options.img_size is set by this task: use data.image_size"),
        ("data.image_size=30", "not divisible by patch_size"),
        ("optim.warmup_steps=50 loop.total_steps=10 loop.epochs=null", "longer than the run"),
        ("data.source=folder data.path=/nonexistent/images", "data.path /nonexistent/images does not exist"),
    ],
)
def test_bad_configs_fail_before_any_work_with_a_fix(tmp_path, override, message, capsys):
    output = tmp_path / "never"
    code = main(["pretrain", "data.source=synthetic", f"output_dir={output}", *override.split()])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()  # nothing was created


def test_missing_teacher_weights_fail_fast_with_instructions(tmp_path, capsys):
    code = main(["pretrain", f"teacher.spec=local:{tmp_path / 'nope'}", f"output_dir={tmp_path / 'out'}",
                 "data.source=synthetic", "device=cpu"])
    assert code == 2
    out = capsys.readouterr().err
    assert "nope" in out and not (tmp_path / "out" / "checkpoints").exists()


def test_recipes_load_and_validate(tmp_path):
    for recipe in sorted(Path(__file__).resolve().parents[1].glob("src/evamim/recipes/pretrain/*.yaml")):
        config = load_config(PretrainConfig, recipe, [f"data.path={tmp_path}"])
        validate(config)
    paper = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "src/evamim/recipes/pretrain/eva_g14_merged30m.yaml",
                        ["data.path=/data"])
    assert (paper.model.name, paper.optim.lr, paper.optim.betas, paper.optim.clip_grad) == ("eva_giant_p14", 1e-3, (0.9, 0.98), 3.0)
    assert paper.teacher.spec == "open_clip:ViT-L-14-quickgelu/openai" and (paper.batch_size, paper.global_batch_size) == (32, 4096)
    with pytest.raises(ConfigError, match="masking.kind must be 'block', 'random' or null"):
        validate(load_config(PretrainConfig, None, ["masking.kind=grid"]))


def test_validation_loss_uses_a_fixed_mask_and_improves(teacher_dir, tmp_path):
    """EVA's validation: every other patch masked, the loss averaged over all masked tokens of the set."""
    from PIL import Image

    from evamim.pretrain.masking import AlternatingMasking

    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (25 * i, 255 - 25 * i, 128)).save(folder / f"{i}.png")
    assert AlternatingMasking((4, 4))(1)[0].tolist() == [True, False] * 8
    overrides = tiny_overrides(teacher_dir, tmp_path / "run", 30) + [
        f"val_data.path={folder}", "val_data.source=folder", "loop.eval_every=10",
    ]
    summary = run_pretrain(load_config(PretrainConfig, None, overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] < 0
    assert evals[-1]["eval/cos_masked"] == pytest.approx(-evals[-1]["eval/loss"])
    # The last validation reaches the run's summary.
    assert summary["validation"]["loss"] == pytest.approx(evals[-1]["eval/loss"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["validation"] == summary["validation"]
