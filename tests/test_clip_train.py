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


def test_text_layer_decay_and_the_logit_scale_lr_follow_eva_clip(tmp_path):
    """EVA-CLIP (training/optim.py): text embeddings are layer 0, resblock i layer i + 1, the rest L + 1, scaled by
    text_ld ** (L + 1 - layer) on top of the text lr; the logit scale has its own lr (--lr)."""
    from evamim.clip.model import EvaClip
    from evamim.tasks.clip import clip_config

    config = load_config(ClipTrainConfig, None, tiny_overrides(tmp_path, 2, "text_optim.lr=2e-4", "optim.lr=1e-3",
                                                               "text_optim.layer_decay=0.5",
                                                               "text_optim.logit_scale_lr=5e-4"))
    model = EvaClip(clip_config(config))
    groups = param_groups(model, config)
    covered = [p for group in groups for p in group["params"]]
    assert len(covered) == len({id(p) for p in covered}) == len(list(model.parameters()))
    by_name = {name: group for group in groups for name in group["param_names"]}
    text = 0.2  # 2e-4 / 1e-3; two text blocks, so L + 1 = 3
    assert by_name["text.token_embedding.weight"]["lr_scale"] == pytest.approx(text * 0.5 ** 3)
    assert by_name["text.positional_embedding"]["lr_scale"] == pytest.approx(text * 0.5 ** 3)
    assert by_name["text.transformer.resblocks.0.attn.in_proj_weight"]["lr_scale"] == pytest.approx(text * 0.5 ** 2)
    assert by_name["text.transformer.resblocks.1.mlp.c_fc.bias"]["lr_scale"] == pytest.approx(text * 0.5)
    assert by_name["text.transformer.resblocks.1.mlp.c_fc.bias"]["weight_decay"] == 0.0
    assert by_name["text.ln_final.weight"]["lr_scale"] == by_name["text.text_projection"]["lr_scale"] == text
    assert by_name["text.text_projection"]["weight_decay"] == 0.05
    assert by_name["logit_scale"]["lr_scale"] == pytest.approx(0.5) and by_name["logit_scale"]["weight_decay"] == 0
    with pytest.raises(ConfigError, match=r"text_optim.layer_decay must be in \(0, 1\]"):
        validate(load_config(ClipTrainConfig, None, tiny_overrides(tmp_path, 2, "text_optim.layer_decay=1.5")))


# ------------------------------------------------------------------------------------------------ recipes
RECIPE = Path(__file__).parents[1] / "src/evamim/recipes/clip/eva_clip_g14_laion400m.yaml"


def test_every_value_of_the_eva_clip_g_recipe_names_its_source():
    """Each `key: value` line carries a comment: the file it came from, or `unsourced:` and why."""
    for number, line in enumerate(RECIPE.read_text().splitlines(), start=1):
        body = line.split("#", 1)[0]
        if ":" in body and body.split(":", 1)[1].strip() and not line.lstrip().startswith("#"):
            assert "#" in line or line.startswith(" " * 4), f"{RECIPE.name}:{number} has no source: {line!r}"


def test_the_eva_clip_g_recipe_loads_validates_and_dry_runs_once_its_paths_are_given(tmp_path, capsys):
    vision, text, val = tmp_path / "EVA01_g_psz14.pt", tmp_path / "clip_l.bin", tmp_path / "val"
    vision.touch(), text.touch(), val.mkdir()
    paths = [f"model.pretrained={vision}", f"model.text_pretrained={text}",
             "data.path=/data/laion400m/{00000..41407}.tar", f"val_data.path={val}"]
    with pytest.raises(ConfigError, match="model.pretrained /path/to/EVA01_g_psz14.pt does not exist"):
        validate(load_config(ClipTrainConfig, RECIPE, paths[1:]))
    config = load_config(ClipTrainConfig, RECIPE, paths)
    validate(config)
    assert (config.model.name, config.model.embed_dim, config.model.drop_path_rate) == ("eva_giant_p14", 1024, 0.4)
    assert config.model.text == dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)
    assert (config.optim.lr, config.text_optim.lr, config.text_optim.logit_scale_lr) == (4e-4, 4e-5, 5e-4)
    assert (config.optim.layer_decay, config.text_optim.layer_decay, config.optim.clip_grad) == (0.85, 0.75, 5.0)
    assert config.global_batch_size == 40960 and config.loop.precision == "fp16"
    assert config.data.crop_scale == (0.9, 1.0) and config.data.hflip == 0 and config.data.source == "shards"
    assert main(["clip", "--config", "eva_clip_g14_laion400m", *paths, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "clip parameters: 1,136,435,841" in out  # the model card's "1.1B"
    assert "268,400 steps (275 epochs)" in out  # 11B samples seen
