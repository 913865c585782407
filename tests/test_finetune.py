"""`evamim finetune`: layer-decay groups, the soft-target loss, the EMA hook, and tiny runs end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evamim
from evamim.cli import main
from evamim.config import ConfigError, load_config
from evamim.engine import OptimConfig, build_optimizer
from evamim.engine.ema import ModelEma
from evamim.models.resample import resample_pos_embed
from evamim.tasks.finetune import FinetuneConfig, build_model, run_finetune, soft_target_cross_entropy, validate
from test_pretrain import CrashAtStep

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny_overrides(output_dir: Path, steps: int, *extra: str) -> list[str]:
    """A 2-block, 32-wide ViT on 64 synthetic 32-px images (8 shape classes): 4 steps per epoch."""
    return [
        "model.name=eva_tiny_p16",
        "model.options={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "data.source=synthetic",
        "data.image_size=32",
        "data.synthetic_resolution=48",
        "data.synthetic_size=64",
        "data.finetune_crop_scale=[0.5, 1.0]",
        "data.auto_augment=null",
        "data.random_erasing=0",
        "data.mixup_alpha=0",
        "data.cutmix_alpha=0",
        "data.num_workers=0",
        "data.pin_memory=false",
        "val_data.source=synthetic",
        "eval.batch_size=32",
        "ema.decay=0.9",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0",
        "optim.warmup_steps=2",
        "optim.layer_decay=0.75",
        "loop.epochs=null",
        f"loop.total_steps={steps}",
        "loop.log_every=1",
        "loop.progress_bar=false",
        "loop.tensorboard=false",
        "checkpoint.every=1000",
        "batch_size=16",
        "device=cpu",
        f"output_dir={output_dir}",
        *extra,
    ]


def train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# ------------------------------------------------------------------------------------------ layer decay
def expected_layer_id(name: str, depth: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name.startswith(("fc_norm.", "head.")), name
    return depth + 1


def test_layer_decay_groups_of_the_real_vit_scale_each_parameter_and_exempt_1d_pos_and_cls():
    depth, decay = TINY["depth"], 0.9
    model = evamim.create_model("eva_tiny_p16", num_classes=5, **TINY)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=decay))
    params = dict(model.named_parameters())
    seen = set()
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            seen.add(name)
            layer = expected_layer_id(name, depth)
            assert group["layer_id"] == layer, name
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), name
            exempt = params[name].ndim == 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), name
    assert seen == set(params)
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(decay**4)
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(decay**3)
    assert by_name["blocks.2.mlp.fc2.weight"]["lr_scale"] == pytest.approx(decay**1)
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["fc_norm.weight"]["weight_decay"] == 0.0 and by_name["blocks.1.attn.q_bias"]["weight_decay"] == 0.0


def test_finetune_model_is_mean_pool_fc_norm_head_with_small_init():
    config = load_config(FinetuneConfig, None, tiny_overrides(Path("unused"), 1, "model.drop_path_rate=0.3"))
    torch.manual_seed(0)
    model = build_model(config, num_classes=8)
    assert model.config.global_pool == "avg" and isinstance(model.fc_norm, nn.LayerNorm)
    assert isinstance(model.norm, nn.Identity) and model.head.out_features == 8
    assert model.head.weight.std().item() == pytest.approx(0.015 * 0.001, rel=0.5)  # trunc-normal(0.015) x 0.001
    assert model.blocks[-1].drop_path_rate == pytest.approx(0.3)
    tokens = torch.randn(2, 17, 32)
    assert torch.allclose(model.forward_head(tokens), model.head(model.fc_norm(tokens[:, 1:].mean(1))))


# ------------------------------------------------------------------------------------------------ loss
def log_softmax_by_hand(row: list[float]) -> list[float]:
    top = max(row)
    log_sum = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_sum for v in row]


def test_mixup_soft_target_loss_equals_a_hand_computation(monkeypatch):
    from evamim.data.mixup import BatchMixup
    from evamim.tasks.finetune import ClassificationStep

    mixup = BatchMixup(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.3)
    monkeypatch.setattr(mixup.mixup, "_params_per_batch", lambda: (0.7, False))  # lambda = 0.7, mixup
    step = ClassificationStep(3, 0.3, mixup, torch.device("cpu"))
    images = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 3.0)])
    labels = torch.tensor([0, 2])
    mixed, targets = step.targets(images, labels)
    # Sample i is mixed with sample B-1-i: 0.7 * 1 + 0.3 * 3 = 1.6, and 0.7 * 3 + 0.3 * 1 = 2.4.
    assert torch.allclose(mixed[0], torch.full((3, 2, 2), 1.6)) and torch.allclose(mixed[1], torch.full((3, 2, 2), 2.4))
    off, on = 0.3 / 3, 1 - 0.3 + 0.3 / 3  # label smoothing 0.3 over 3 classes: 0.1 and 0.8
    hand_targets = [[0.7 * on + 0.3 * off, off, 0.7 * off + 0.3 * on], [0.3 * on + 0.7 * off, off, 0.3 * off + 0.7 * on]]
    assert torch.allclose(targets, torch.tensor(hand_targets))
    logits = [[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]]
    hand_loss = sum(
        -sum(t * lp for t, lp in zip(target_row, log_softmax_by_hand(logit_row)))
        for target_row, logit_row in zip(hand_targets, logits)
    ) / 2
    loss = soft_target_cross_entropy(torch.tensor(logits), targets)
    assert loss.item() == pytest.approx(hand_loss, rel=1e-6)


def test_cutmix_targets_weigh_each_label_by_its_pixel_area(monkeypatch):
    from evamim.data.mixup import BatchMixup

    mixup = BatchMixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    monkeypatch.setattr(mixup.mixup, "_params_per_batch", lambda: (0.6, True))
    images = torch.stack([torch.zeros(3, 10, 10), torch.ones(3, 10, 10)])
    out = mixup({"images": images, "labels": torch.tensor([1, 3])})
    pasted = out["images"][0, 0].mean().item()  # fraction of sample 0's pixels taken from sample 1
    assert 0 < pasted < 1
    expected = torch.tensor([[0.0, 1 - pasted, 0.0, pasted], [0.0, pasted, 0.0, 1 - pasted]])
    assert torch.allclose(out["targets"], expected, atol=1e-6)
    logits = torch.tensor([[0.3, 1.2, -0.7, 0.1], [2.0, 0.0, 0.5, -1.0]])
    by_hand = -(expected * torch.log(torch.softmax(logits.double(), -1))).sum(-1).mean()
    assert soft_target_cross_entropy(logits, out["targets"]).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_smoothed_one_hot_targets_give_torch_label_smoothing_cross_entropy():
    from evamim.tasks.finetune import ClassificationStep

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    _, targets = ClassificationStep(5, 0.3, None, torch.device("cpu")).targets(torch.zeros(6, 3, 2, 2), labels)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.3)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------- EMA
class FakeTrainer:
    def __init__(self, model):
        self.model, self.step, self.nonfinite_in_a_row = model, 0, 0


def test_ema_hook_averages_after_each_taken_step_once_and_round_trips_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.75)
    start = ema.module[0].weight.clone()
    trainer = FakeTrainer(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    trainer.step = 1
    ema.on_step_end(trainer, {}, skipped=False)
    ema.on_step_end(trainer, {}, skipped=False)  # the same step again: one update, not two
    assert ema.num_updates == 1
    assert torch.allclose(ema.module[0].weight, 0.75 * start + 0.25 * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers are copied
    trainer.step, trainer.nonfinite_in_a_row = 2, 1
    ema.on_step_end(trainer, {}, skipped=True)  # a skipped step moves nothing
    assert ema.num_updates == 1
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training

    restored = ModelEma(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and restored.step == 1
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no validation set"),
        (["val_data.pathh=x"], "valid keys under val_data"),
        (["model.options={num_classes: 3}"], "use head.num_classes"),
        (["model.options={img_size: 64}"], "use data.image_size"),
        (["backbone.name=eva_tiny_p16"], "backbone"),
        (["data.mixup_alpha=0.8", "batch_size=6", "loop.grad_accum_steps=2"], "must be even"),
        (["data.labels=false"], "data.labels=true"),
        (["data.image_size=36"], "not divisible by patch_size"),
    ],
)
def test_config_mistakes_are_caught_before_anything_is_built(tmp_path, extra, message):
    overrides = tiny_overrides(tmp_path, 2, *extra)
    if not extra:  # no validation set given
        overrides = [o for o in overrides if not o.startswith("val_data")]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(load_config(FinetuneConfig, None, overrides))


# ------------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_tiny_finetune_lowers_the_loss_and_evaluates_the_model_and_its_ema(tmp_path, capsys):
    output = tmp_path / "run"
    # A high lr: the 0.001-scaled head passes little gradient to the trunk in the first steps.
    overrides = tiny_overrides(output, 32, "optim.lr=1e-2", "optim.layer_decay=0.9", "data.finetune_crop_scale=[0.9, 1.0]")
    assert main(["finetune", *overrides]) == 0
    assert "best_ema" in capsys.readouterr().out.splitlines()[-1]  # the table closes the console output
    losses = train_losses(output)
    assert len(losses) == 32 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, (first, last)

    results = json.loads((output / "summary.json").read_text())
    for key in ("final", "final_ema", "best", "best_ema"):
        assert 0.0 <= results[key]["top1"] <= 100.0 and results[key]["top5"] >= results[key]["top1"], key
    assert results["steps"] == 32 and results["epochs"] == 8 and results["num_classes"] == 8
    evals = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if "eval/top1" in line]
    assert [e["step"] for e in evals] == [4, 8, 12, 16, 20, 24, 28, 32]  # every epoch
    assert all("eval/ema_top1" in e and "eval/ema_loss" in e for e in evals)
    assert results["best"]["top1"] == max(e["eval/top1"] for e in evals)
    assert results["best_ema"]["top1"] == max(e["eval/ema_top1"] for e in evals)
    assert results["validation"]["ema_top1"] == evals[-1]["eval/ema_top1"]  # the last evaluation, in the summary

    model = evamim.create_model(pretrained=output / "model")
    ema = evamim.create_model(pretrained=output / "model_ema")
    assert not torch.equal(model.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    best = evamim.create_model(pretrained=output / "best_ema")
    assert best.head.out_features == 8
    assert json.loads((output / "best_ema" / "metrics.json").read_text())["top1"] == results["best_ema"]["top1"]
    assert (output / "config.yaml").exists()

    # The EMA and the best records live in the checkpoint: re-running the finished run changes nothing.
    again = run_finetune(load_config(FinetuneConfig, None, overrides))
    assert again["best_ema"] == results["best_ema"] and again["final"] == results["final"]
    assert torch.equal(evamim.create_model(pretrained=output / "model_ema").head.weight, ema.head.weight)


def test_a_checkpoint_saved_at_32_px_fine_tunes_at_48_px_with_resampled_positions(tmp_path):
    torch.manual_seed(0)
    pretrained = evamim.create_model("eva_tiny_p16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                     global_pool="token", use_mask_token=True, mim_head_dim=16)  # a MIM student
    directory = evamim.save_pretrained(pretrained, tmp_path / "pretrained")
    overrides = [o for o in tiny_overrides(tmp_path / "run", 2) if not o.startswith(("model.", "data.image_size"))]
    overrides += [
        f"model.pretrained={directory}",
        "data.image_size=48",
        "data.synthetic_resolution=64",
        # the rest of the recipe's augmentation, exercised on the way
        "data.auto_augment=rand-m9-mstd0.5-inc1",
        "data.random_erasing=0.25",
        "data.mixup_alpha=0.8",
        "data.cutmix_alpha=1.0",
    ]
    config = load_config(FinetuneConfig, None, overrides)
    model = build_model(config, num_classes=8)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    expected = resample_pos_embed(pretrained.pos_embed.detach(), (6, 6), (4, 4))
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, pretrained.blocks[1].mlp.fc1.weight)
    assert torch.equal(model.fc_norm.weight, pretrained.norm.weight)  # EVA's final norm becomes fc_norm

    results = run_finetune(config)
    assert results["steps"] == 2 and results["image_size"] == 48 and math.isfinite(results["final_ema"]["loss"])
    assert evamim.create_model(pretrained=tmp_path / "run" / "best").config.img_size == (48, 48)


# ------------------------------------------------------------------------------------------------ recipes
RECIPES = sorted((Path(__file__).parents[1] / "src/evamim/recipes/finetune").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_validate_once_their_paths_are_given(recipe, tmp_path):
    pretrained = evamim.save_pretrained(evamim.create_model("eva_tiny_p16", depth=2, embed_dim=32, num_heads=2),
                                        tmp_path / "pretrained")
    val = tmp_path / "val"
    val.mkdir()
    paths = [f"model.pretrained={pretrained}", "data.path=/data/train", f"val_data.path={val}"]
    with pytest.raises(ConfigError, match="model.pretrained /path/to/.* does not exist"):
        validate(load_config(FinetuneConfig, recipe, paths[1:]))
    with pytest.raises(ConfigError, match="val_data.path"):
        validate(load_config(FinetuneConfig, recipe, paths[:2]))
    config = load_config(FinetuneConfig, recipe, paths)
    validate(config)
    assert config.ema.enabled and config.optim.layer_decay and config.val_data.path == str(val)


def test_the_paper_recipe_is_evas_in1k_336_setting():
    config = load_config(FinetuneConfig, Path(__file__).parents[1] / "src/evamim/recipes/finetune/eva_g14_in1k_336.yaml",
                         ["data.path=/t", "val_data.path=/v"])
    assert (config.data.image_size, config.loop.epochs, config.model.grad_checkpointing) == (336, 10, True)
    assert config.global_batch_size == 512 and config.optim.lr == 3e-5 and config.optim.layer_decay == 0.95
    assert config.model.drop_path_rate == 0.4 and config.data.label_smoothing == 0.3
    assert config.data.auto_augment == "rand-m9-mstd0.5-inc1"
    assert config.data.mixup_alpha == 0 and config.data.cutmix_alpha == 0 and config.ema.decay == 0.9999
    assert config.head.init_scale == 0.001 and config.head.global_pool == "avg"


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_its_ema_and_best_records(tmp_path):
    extra = ("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "checkpoint.every=4")
    straight = run_finetune(load_config(FinetuneConfig, None, tiny_overrides(tmp_path / "a", 10, *extra)))
    config = load_config(FinetuneConfig, None, tiny_overrides(tmp_path / "b", 10, *extra))
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, hooks=(CrashAtStep(6),))  # after the checkpoint at step 4 and the evaluation at 4
    resumed = run_finetune(config)
    for key in ("final", "final_ema", "best", "best_ema"):
        assert {k: v for k, v in resumed[key].items() if k != "dir"} == pytest.approx(
            {k: v for k, v in straight[key].items() if k != "dir"}), key
    for name in ("model", "model_ema"):
        a = evamim.create_model(pretrained=tmp_path / "a" / name).state_dict()
        b = evamim.create_model(pretrained=tmp_path / "b" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
