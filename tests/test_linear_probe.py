"""Linear probe: the head is BatchNorm(affine=False) + Linear, a grid of heads trains from one forward with
its own learning rates, separable vs random features, and the CLI on scikit-learn's real digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evamim.cli import main
from evamim.engine import LARS
from evamim.models.vit import EvaViT
from evamim.tasks.linear_probe import (
    FeatureTable,
    ProbeHead,
    ProbeSection,
    build_grid,
    fit_precomputed,
    make_heads,
    probe_optimizer,
    train_linear_probe,
)
from test_knn import TINY, digits, digits_args, gaussian_classes, one_thread  # noqa: F401  (fixtures)


QUICK = ProbeSection(optimizer="sgd", lrs=[0.01, 0.1, 1.0], epochs=20, warmup_epochs=2, batch_size=100)


def test_head_is_batchnorm_without_affine_then_linear():
    head = ProbeHead(48, 7)
    assert isinstance(head.norm, torch.nn.BatchNorm1d)
    assert head.norm.affine is False and head.norm.eps == 1e-6
    assert [name for name, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]
    assert head.linear.bias.abs().sum() == 0 and 0 < head.linear.weight.std() < 0.02
    assert head(torch.randn(5, 48)).shape == (5, 7)


def test_every_head_gets_its_own_lr_and_all_train_from_one_batch():
    grid = build_grid(["a", "b"], [0.1, 1.0], [0.0, 1e-4])
    assert len(grid) == 8 and len({spec.name for spec in grid}) == 8
    heads = make_heads(grid, {"a": 6, "b": 10}, num_classes=3, seed=0, device=torch.device("cpu"))
    optimizer = probe_optimizer(heads, ProbeSection())
    assert isinstance(optimizer, LARS)
    # Two groups per head (weight, bias), each carrying that head's lr; the bias is never decayed.
    assert [g["lr_scale"] for g in optimizer.param_groups] == [s.lr for s in grid for _ in range(2)]
    assert [g["weight_decay"] for g in optimizer.param_groups][::2] == [s.weight_decay for s in grid]
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups[1::2])

    calls = []
    features = {"a": torch.randn(40, 6), "b": torch.randn(40, 10)}
    table = FeatureTable.from_tensors(features)
    rows = table.rows

    def counted(index):
        calls.append(len(index))
        return rows(index)

    table.rows = counted
    before = [p.detach().clone() for p in heads.parameters()]
    probe = ProbeSection(optimizer="sgd", lrs=[0.1], epochs=2, warmup_epochs=0, batch_size=16)
    fit_precomputed(heads, table, torch.randint(0, 3, (40,)), probe)
    assert calls == [16, 16] * 2  # one feature lookup per step (2 steps x 2 epochs), shared by all 8 heads
    assert all(not torch.equal(b, a) for b, a in zip(before, heads.parameters()))


def test_separable_features_are_near_perfect_and_random_ones_at_chance():
    features, labels = gaussian_classes(per_class=100, spread=0.5)
    noise = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(5))
    random_labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(6))]
    result = train_linear_probe(
        {"clusters": features[::2], "noise": noise[::2]}, labels[::2],
        {"clusters": features[1::2], "noise": noise[1::2]}, labels[1::2], QUICK,
    )
    by_feature = {}
    for row in result["heads"]:
        by_feature.setdefault(row["features"], []).append(row["top1"])
    assert max(by_feature["clusters"]) > 98.0
    assert max(by_feature["noise"]) < 25.0  # noise carries no label information
    assert result["best"]["features"] == "clusters"
    assert result["best"]["top1"] == max(row["top1"] for row in result["heads"])

    shuffled = train_linear_probe({"x": features[::2]}, random_labels[::2], {"x": features[1::2]}, random_labels[1::2], QUICK)
    assert all(row["top1"] < 20.0 for row in shuffled["heads"])  # labels unrelated to the features: chance is 10%


def test_lars_learns_separable_features():
    features, labels = gaussian_classes(per_class=50, spread=0.5)
    probe = ProbeSection(lrs=[1.0, 10.0], epochs=40, warmup_epochs=4, batch_size=50)
    result = train_linear_probe({"x": features[::2]}, labels[::2], {"x": features[1::2]}, labels[1::2], probe)
    assert result["best"]["top1"] > 95.0


def test_a_head_with_non_finite_weights_is_reported_and_not_chosen():
    features, labels = gaussian_classes(per_class=20)
    broken = features.clone()
    broken[2, 0] = float("nan")  # e.g. an fp16 overflow in one image's features
    probe = ProbeSection(optimizer="sgd", lrs=[0.1], epochs=3, warmup_epochs=0, batch_size=50)
    result = train_linear_probe({"x": features[::2], "broken": broken[::2]}, labels[::2],
                                {"x": features[1::2], "broken": broken[1::2]}, labels[1::2], probe)
    diverged = [row["features"] for row in result["heads"] if row["diverged"]]
    assert diverged == ["broken"]
    assert result["best"]["features"] == "x"


def test_linprobe_cli_on_digits_is_sane_reproducible_and_cached(digits, tmp_path, monkeypatch, capsys):  # noqa: F811
    train, val = digits
    grid = ["features=[cls,cls+avg,last2]", "probe.optimizer=sgd", "probe.lrs=[0.1,1.0]", "probe.epochs=15",
            "probe.warmup_epochs=2", "probe.batch_size=256"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    assert main(["linprobe", *digits_args(train, val, first_dir, *grid)]) == 0
    first = json.loads((first_dir / "results.json").read_text())
    assert len(first["heads"]) == 6 and first["num_train"] == 1437 and first["num_val"] == 360
    for row in first["heads"]:
        assert 10.0 < row["top1"] <= 100.0 and not row["diverged"], row
    assert first["best"]["top1"] == max(row["top1"] for row in first["heads"])
    output = capsys.readouterr().out
    assert "best:" in output and first["best"]["head"] in output
    with safe_open(str(first_dir / "best_head.safetensors"), framework="pt") as handle:
        assert handle.metadata()["features"] == first["best"]["features"]
        assert set(handle.keys()) >= {"linear.weight", "linear.bias", "norm.running_mean", "norm.running_var"}
    assert (first_dir / "config.yaml").exists() and (first_dir / "metrics.jsonl").exists()

    assert main(["linprobe", *digits_args(train, val, second_dir, *grid)]) == 0
    assert json.loads((second_dir / "results.json").read_text())["heads"] == first["heads"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(EvaViT, "forward_intermediates", must_not_run)
    assert main(["linprobe", *digits_args(train, val, first_dir, *grid)]) == 0
    cached = json.loads((first_dir / "results.json").read_text())
    assert cached["cache"] == {"train": "hit", "val": "hit"} and cached["heads"] == first["heads"]


def test_augmented_mode_runs_the_backbone_once_per_batch_for_all_heads(digits, tmp_path, monkeypatch):  # noqa: F811
    train, val = digits
    calls = []
    original = EvaViT.forward_intermediates

    def counting(self, images, *args, **kwargs):
        calls.append(images.shape[0])
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(EvaViT, "forward_intermediates", counting)
    args = digits_args(train, val, tmp_path, "features=[cls,avg]", "probe.augment=true", "probe.lrs=[0.1,1.0]",
                       "probe.optimizer=sgd", "probe.epochs=2", "probe.warmup_epochs=0", "probe.batch_size=512",
                       "cache=false")
    assert main(["linprobe", *args]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["protocol"]["mode"] == "augmented" and len(results["heads"]) == 4
    validation = [size for size in calls if size != 512]
    assert sum(validation) == 360  # the validation features, once
    assert calls.count(512) == 2 * (1437 // 512)  # per epoch one forward per (full) batch, not one per head


def test_linprobe_config_errors(tmp_path, capsys):
    assert main(["linprobe", *TINY, "val_data.holdout=0.2", "probe.augment=true", "probe.optimizer=adam",
                 f"output_dir={tmp_path}"]) == 2
    message = capsys.readouterr().out
    assert "probe.optimizer must be one of lars, sgd, adamw" in message
    assert "set val_data.path instead of val_data.holdout" in message


RECIPES = Path(__file__).parents[1] / "src/evamim/recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in [*(RECIPES / "knn").glob("*.yaml"), *(RECIPES / "linprobe").glob("*.yaml")]))
def test_example_recipes_load_and_validate(recipe, tmp_path):
    from evamim.config import load_config
    from evamim.tasks import knn, linear_probe

    module = knn if recipe.startswith("knn") else linear_probe
    schema = knn.KnnConfig if module is knn else linear_probe.LinearProbeConfig
    path = RECIPES / ("knn" if module is knn else "linprobe") / recipe
    config = load_config(schema, path, ["backbone.name=eva_base_p16", f"data.path={tmp_path}", f"val_data.path={tmp_path}"])
    module.validate(config)
