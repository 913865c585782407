"""``evamim clip`` on the task runner: a tiny run end to end, exact resume, the export, the config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evamim.cli import main
from evamim.config import ConfigError, load_config
from evamim.tasks.clip import ClipTrainConfig, param_groups, run_clip, validate
from test_pretrain import CrashAtStep


def tiny_overrides(output_dir: Path, steps: int, *extra: str) -> list[str]:
    """A 2-block, 64-wide vision tower and a 2-layer text tower on 128 synthetic captioned 32-px images."""
    return [
        "model.name=eva_tiny_p16",
        "model.options={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "model.embed_dim=32",
        "model.text={context_length: 32, width: 64, heads: 2, layers: 2}",
        "data.source=synthetic",
        "data.image_size=32",
        "data.synthetic_size=128",
        "data.num_workers=0",
        "data.pin_memory=false",
        "val_data.source=synthetic",
        "eval.max_batches=2",
        "batch_size=16",
        "loop.epochs=null",
        f"loop.total_steps={steps}",
        "loop.log_every=1",
        "loop.progress_bar=false",
        "loop.tensorboard=false",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "checkpoint.every=1000",
        "device=cpu",
        f"output_dir={output_dir}",
        *extra,
    ]


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_a_tiny_clip_trains_evaluates_zero_shot_and_exports(tmp_path, capsys):
    from evamim.clip.checkpoint import load_clip

    output = tmp_path / "run"
    assert main(["clip", *tiny_overrides(output, 12, "loop.eval_every=6")]) == 0
    assert "zeroshot_top1" in capsys.readouterr().out.splitlines()[-1]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["task"] == "clip" and summary["steps"] == 12
    assert 0 <= summary["validation"]["zeroshot_top1"] <= summary["validation"]["zeroshot_top5"] <= 100
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/zeroshot_top1" in r] == [6, 12]
    assert all(0 < r["logit_scale"] <= 100 for r in records if "logit_scale" in r)  # clamped, exp'd
    model = load_clip(output / "model")
    assert model.config.embed_dim == 32 and model.visual.trunk.config.depth == 2


def test_an_interrupted_run_resumes_exactly(tmp_path):
    straight = run_clip(load_config(ClipTrainConfig, None, tiny_overrides(tmp_path / "a", 6)))
    crashed = load_config(ClipTrainConfig, None, tiny_overrides(tmp_path / "b", 6, "checkpoint.every=3"))
    with pytest.raises(KeyboardInterrupt):
        run_clip(crashed, hooks=(CrashAtStep(4),))
    resumed = run_clip(crashed)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert resumed["validation"] == straight["validation"]


def test_the_text_tower_and_logit_scale_get_their_own_lr_and_no_decay_where_clip_has_none(tmp_path):
    from evamim.clip.model import EvaClip
    from evamim.tasks.clip import clip_config

    config = load_config(ClipTrainConfig, None, tiny_overrides(tmp_path, 2, "text_optim.lr=2e-4",
                                                               "text_optim.weight_decay=0.1"))
    model = EvaClip(clip_config(config))
    groups = param_groups(model, config)
    covered = [p for group in groups for p in group["params"]]
    assert len(covered) == len({id(p) for p in covered}) == len(list(model.parameters()))
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["logit_scale"]["weight_decay"] == 0.0 and by_name["logit_scale"]["lr_scale"] == pytest.approx(0.2)
    text_weight = next(name for name in by_name if name.startswith("text.") and name.endswith("attn.in_proj_weight"))
    assert by_name[text_weight]["weight_decay"] == 0.1
    assert by_name["text.positional_embedding"]["weight_decay"] == 0.0
    assert by_name["visual.trunk.pos_embed"]["weight_decay"] == 0.0
    assert by_name["visual.trunk.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


@pytest.mark.parametrize("extra, message", [
    (["data.captions=false"], "needs captions"),
    (["model.options={img_size: 64}"], "use data.image_size"),
    (["model.name=eva_tiny_p17"], "not a preset"),
    (["text_optim.lr=-1"], "text_optim.lr must be >= 0"),
    (["eval.templates=/no/such/file"], "eval.templates /no/such/file is not a file"),
    (["model.text={width: 30, heads: 4}"], "not divisible by heads"),
    (["distributed.strategy=fsdp"], "use ddp or zero1"),
])
def test_config_mistakes_are_refused_before_anything_is_built(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(ClipTrainConfig, None, tiny_overrides(tmp_path / "run", 2, *extra)))
    assert not (tmp_path / "run").exists()


def test_dry_run_counts_both_towers(tmp_path, capsys):
    assert main(["clip", *tiny_overrides(tmp_path / "run", 2), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "EVA-CLIP: vision eva_tiny_p16" in out and "clip parameters:" in out and "16 images per optimizer step" in out
    assert not (tmp_path / "run").exists()


def test_zero_shot_class_names_for_data_without_class_folders(tmp_path):
    """Shards and list files name no classes: the names file, in label order, gives them; a folder map cannot."""
    from evamim.tasks.clip import class_names

    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "map.json").write_text('{"n01": "cat"}')
    assert class_names(None, str(tmp_path / "names.txt")) == ["cat", "dog"]
    assert class_names(["n01"], str(tmp_path / "map.json")) == ["cat"]
    assert class_names(["a", "b"], None) == ["a", "b"]
    with pytest.raises(ConfigError, match="give eval.class_names"):
        class_names(None, None)
    with pytest.raises(ConfigError, match="maps class folders"):
        class_names(None, str(tmp_path / "map.json"))
