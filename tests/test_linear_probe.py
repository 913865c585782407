"""Linear probe: the head is BatchNorm(affine=False) + Linear, a grid of heads trains from one forward with
its own learning rates, separable vs random features, and the CLI on scikit-learn's real digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evamim.cli import main
from evamim.engine import LARS, Hook, NonFiniteLossError, lr_at
from evamim.engine.checkpoint import CheckpointError
from evamim.models.vit import EvaViT
from evamim.tasks.linear_probe import (
    FeatureTable,
    ProbeHead,
    ProbeSection,
    RowBatches,
    build_grid,
    fit_heads,
    make_heads,
    probe_optimizer,
    train_linear_probe,
)
import test_knn
from test_knn import TINY, digits_args, gaussian_classes

# test_knn's fixtures: the digits folders, one torch thread per test
digits, one_thread = test_knn.digits, test_knn.one_thread


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
    table = FeatureTable.from_tensors({"a": torch.randn(40, 6), "b": torch.randn(40, 10)})
    rows = table.rows

    def counted(index):
        calls.append(len(index))
        return rows(index)

    table.rows = counted
    before = [p.detach().clone() for p in heads.parameters()]
    probe = ProbeSection(optimizer="sgd", lrs=[0.1], epochs=2, warmup_epochs=0, batch_size=16)
    recorder = Recorder()
    fit_heads(heads, RowBatches(table, torch.randint(0, 3, (40,)), 16), probe, hooks=[recorder])
    assert calls == [16, 16] * 2  # one feature lookup per step (2 steps x 2 epochs), shared by all 8 heads
    assert all(not torch.equal(b, a) for b, a in zip(before, heads.parameters()))
    # The loop schedules the lr but leaves each head's weight decay as its group set it.
    assert recorder.weight_decays[-1] == [wd for s in grid for wd in (s.weight_decay, 0.0)]


class Recorder(Hook):
    """Every group's lr at each step and weight decay at the end."""

    def __init__(self):
        self.lrs, self.weight_decays = [], []

    def on_step_end(self, trainer, metrics, skipped):
        self.lrs.append([group["lr"] for group in trainer.optimizer.param_groups])
        self.weight_decays.append([group["weight_decay"] for group in trainer.optimizer.param_groups])


def test_the_schedule_is_linear_warmup_then_a_per_step_cosine_times_each_heads_lr():
    features, labels = gaussian_classes(per_class=8)  # 80 rows, batches of 20: 4 steps per epoch
    grid = build_grid(["x"], [0.5, 2.0])
    heads = make_heads(grid, {"x": 64}, 10, seed=0, device=torch.device("cpu"))
    probe = ProbeSection(lrs=[0.5, 2.0], epochs=5, warmup_epochs=2, min_lr_scale=0.1, batch_size=20)
    recorder = Recorder()
    fit_heads(heads, RowBatches(FeatureTable.from_tensors({"x": features}), labels, 20), probe, hooks=[recorder])
    assert len(recorder.lrs) == 20  # 5 epochs x 4 steps
    for step, lrs in enumerate(recorder.lrs):
        if step < 8:  # warmup: 2 epochs = 8 steps, linear from 0
            factor = step / 8
        else:  # half a cosine from 1 to 0.1 over the remaining 12 steps
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 8) / 12))
        assert lrs == pytest.approx([0.5 * factor] * 2 + [2.0 * factor] * 2), step
    assert lr_at(19, 20, 1.0, 0.1, 8, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 11 / 12)))


def test_a_batch_larger_than_the_rows_is_refused():
    with pytest.raises(ValueError, match="lower probe.batch_size"):
        RowBatches(FeatureTable.from_tensors({"x": torch.randn(10, 4)}), torch.zeros(10), 8, world_size=2)


def test_row_batches_share_every_global_batch_and_resume_mid_epoch():
    table = FeatureTable.from_tensors({"x": torch.arange(30.0).unsqueeze(1)})
    labels = torch.arange(30)
    whole = RowBatches(table, labels, 6, seed=3)
    halves = [RowBatches(table, labels, 3, seed=3, rank=rank, world_size=2) for rank in range(2)]
    assert len(whole) == len(halves[0]) == 5
    for epoch in range(2):
        for one, first, second in zip(list(whole), list(halves[0]), list(halves[1]), strict=True):
            assert sorted(one["labels"].tolist()) == sorted(first["labels"].tolist() + second["labels"].tolist())
    assert whole.epoch == 2  # each pass moved on to the next epoch by itself

    data = RowBatches(table, labels, 6, seed=3)
    iterator = iter(data)
    next(iterator), next(iterator)
    state = data.state_dict()
    rest = [batch["labels"].tolist() for batch in iterator]
    resumed = RowBatches(table, labels, 6, seed=3)
    resumed.load_state_dict(state)
    assert [batch["labels"].tolist() for batch in resumed] == rest and len(rest) == 3
    with pytest.raises(CheckpointError, match="same data and batch size"):
        RowBatches(table, labels, 5, seed=3).load_state_dict(state)


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


def test_a_far_too_large_lr_diverges_alone_and_the_checkpoints_stay_finite(tmp_path):
    features, labels = gaussian_classes(per_class=20)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]  # never separable
    # LARS grows the weights of the lr-1e4 head geometrically until they overflow.
    probe = ProbeSection(lrs=[0.1, 1e4], epochs=40, warmup_epochs=0, batch_size=50)
    result = train_linear_probe({"x": features[::2]}, labels[::2], {"x": features[1::2]}, labels[1::2], probe,
                                output_dir=tmp_path)
    assert [row["diverged"] for row in result["heads"]] == [False, True] and math.isnan(result["heads"][1]["top1"])
    assert result["best"]["lr"] == 0.1
    # The diverged head's weights were reset, so the loop could still write its final checkpoint.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000080.pt"]


def test_a_grid_where_every_head_diverges_stops_with_one_message():
    features, labels = gaussian_classes(per_class=10)
    probe = ProbeSection(optimizer="sgd", lrs=[0.1], epochs=2, warmup_epochs=0, batch_size=50)
    with pytest.raises(NonFiniteLossError, match="every head of the grid diverged"):
        train_linear_probe({"x": torch.full_like(features, float("nan"))}, labels, {"x": features}, labels, probe)


def test_linprobe_cli_on_digits_is_sane_reproducible_and_cached(digits, tmp_path, monkeypatch, capsys):
    train, val = digits
    grid = ["features=[cls,cls+avg,last2]", "probe.optimizer=sgd", "probe.lrs=[0.1,1.0]", "probe.epochs=15",
            "probe.warmup_epochs=2", "probe.batch_size=256"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    assert main(["linprobe", *digits_args(train, val, first_dir, *grid)]) == 0
    first = json.loads((first_dir / "summary.json").read_text())
    assert len(first["heads"]) == 6 and first["num_train"] == 1437 and first["num_val"] == 360
    for row in first["heads"]:
        assert 10.0 < row["top1"] <= 100.0 and not row["diverged"], row
    assert first["best"]["top1"] == max(row["top1"] for row in first["heads"])
    output = capsys.readouterr().out
    assert "best:" in output and first["best"]["head"] in output
    with safe_open(str(first_dir / "best_head.safetensors"), framework="pt") as handle:
        assert handle.metadata()["features"] == first["best"]["features"]
        assert set(handle.keys()) >= {"linear.weight", "linear.bias", "norm.running_mean", "norm.running_var"}
    assert (first_dir / "config.yaml").exists() and (first_dir / "checkpoints").is_dir()
    logged = [json.loads(line) for line in (first_dir / "metrics.jsonl").read_text().splitlines()]
    training = [record for record in logged if "loss" in record]
    assert len(training) == 15  # one line per epoch: the summed loss and every head's
    assert all(f"loss/{row['head']}" in training[-1] for row in first["heads"])
    assert training[-1]["loss"] == pytest.approx(sum(training[-1][f"loss/{row['head']}"] for row in first["heads"]))

    assert main(["linprobe", *digits_args(train, val, second_dir, *grid)]) == 0
    assert json.loads((second_dir / "summary.json").read_text())["heads"] == first["heads"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(EvaViT, "forward_intermediates", must_not_run)
    # The same command again: the features come from the cache, the finished run resumes at its last step
    # and reports the same scores.
    assert main(["linprobe", *digits_args(train, val, first_dir, *grid)]) == 0
    cached = json.loads((first_dir / "summary.json").read_text())
    assert cached["cache"] == {"train": "hit", "val": "hit"} and cached["heads"] == first["heads"]
    assert cached["steps"] == first["steps"] == 15 * (1437 // 256)


def test_augmented_mode_runs_the_backbone_once_per_batch_for_all_heads(digits, tmp_path, monkeypatch):
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
    results = json.loads((tmp_path / "summary.json").read_text())
    assert results["protocol"]["mode"] == "augmented" and len(results["heads"]) == 4
    validation = [size for size in calls if size != 512]
    assert sum(validation) == 360  # the validation features, once
    assert calls.count(512) == 2 * (1437 // 512)  # per epoch one forward per (full) batch, not one per head


def test_linprobe_config_errors(tmp_path, capsys):
    assert main(["linprobe", *TINY, "val_data.holdout=0.2", "probe.augment=true", "probe.optimizer=adam",
                 "probe.batch_size=6", "probe.global_batch_size=16", "distributed.strategy=fsdp",
                 f"output_dir={tmp_path}"]) == 2
    message = capsys.readouterr().err
    assert "probe.optimizer must be one of lars, sgd, adamw" in message
    assert "set val_data.path instead of val_data.holdout" in message
    assert "probe.global_batch_size 16 is not a multiple of probe.batch_size 6" in message
    assert "distributed.strategy=fsdp is not available for linprobe" in message
    # The extraction batch has its own key: the training batch is probe.batch_size.
    assert main(["linprobe", *TINY, "batch_size=64", f"output_dir={tmp_path}"]) == 2
    assert "extract_batch_size" in capsys.readouterr().err


def test_print_config_shows_the_probe_keys_and_dry_run_the_plan(digits, tmp_path, capsys):
    import yaml

    train, val = digits
    args = digits_args(train, val, tmp_path / "run", "features=[cls,last2]", "probe.lrs=[0.1,1.0]",
                       "probe.batch_size=256", "probe.epochs=10", "probe.warmup_epochs=2")
    assert main(["linprobe", *args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["probe"]["lrs"] == [0.1, 1.0] and printed["extract_batch_size"] == 256
    assert {"checkpoint", "distributed"} <= printed.keys() and not {"optim", "loop", "batch_size"} & printed.keys()

    assert main(["linprobe", *args, "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "4 heads" in report and "'last2': 64" in report and "classes: 10" in report
    assert "1,437 samples per epoch" in report and "-> 5 steps per epoch" in report
    assert "50 steps (10 epochs); warmup 10 steps (2 epochs)" in report
    assert not (tmp_path / "run").exists()


RECIPES = Path(__file__).parents[1] / "src/evamim/recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in [*(RECIPES / "knn").glob("*.yaml"), *(RECIPES / "linprobe").glob("*.yaml")]))
def test_example_recipes_load_and_validate(recipe, tmp_path):
    from evamim.config import load_config
    from evamim.tasks import knn, linear_probe

    module = knn if recipe.startswith("knn") else linear_probe
    schema = knn.KnnConfig if module is knn else linear_probe.LinearProbeConfig
    path = RECIPES / ("knn" if module is knn else "linprobe") / recipe
    config = load_config(schema, path, ["model.name=eva_base_p16", f"data.path={tmp_path}", f"val_data.path={tmp_path}"])
    module.validate(config)
