"""kNN (DINO protocol): the weighted vote by hand, chunking, separable vs random features, and the CLI on
scikit-learn's real digits with feature caching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evamim  # noqa: F401  (makes torchvision importable before anything pulls it in)
from evamim.cli import main
from evamim.features.extract import holdout_split
from evamim.models.vit import EvaViT
from evamim.tasks.knn import knn_classify, vote_hits, weighted_votes

TINY = ["model.name=eva_tiny_p16", "model.options={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"]


def write_digits(root: Path) -> tuple[Path, Path]:
    """scikit-learn's 1797 real 8x8 digits, upsampled to 32 px RGB PNGs, as ImageFolder trees
    ``root/train/<digit>/`` and ``root/val/<digit>/`` (every fifth image is validation)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for number, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if number % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{number:04d}.png")
    return root / "train", root / "val"


def digits_args(train: Path, val: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY, "data.source=folder", f"data.path={train}", f"val_data.path={val}", "data.image_size=32",
        "data.crop_pct=1.0", "data.num_workers=0", f"output_dir={output_dir}", "progress=false", *extra,
    ]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 busy cores, multi-threaded CPU kernels for these tiny tensors mostly wait on each
    other (BatchNorm's training kernel: ~7 ms per call on two threads, 0.02 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return write_digits(tmp_path_factory.mktemp("digits"))


def gaussian_classes(num_classes=10, per_class=60, dim=64, spread=0.3, seed=0):
    """Class means on a unit sphere plus isotropic noise: (N, dim) features, (N,) labels."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = means[labels] + spread * torch.randn(len(labels), dim, generator=generator) / math.sqrt(dim)
    return features, labels


# ------------------------------------------------------------------------------------------- the vote
def test_weighted_vote_matches_hand_computation():
    # Unit vectors: the query [1, 0] has cosine similarity 1.0 with a (class 0) and 0.6 with b and c (class 1).
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    similarities = torch.tensor([[1.0, 0.6, 0.6]])
    neighbours = torch.tensor([[0, 1, 1]])

    # T = 1: class 0 gets e^1 = 2.718, class 1 gets 2 e^0.6 = 3.644 -> class 1 wins with p = 3.644 / 6.362.
    votes = weighted_votes(similarities, neighbours, temperature=1.0, num_classes=2)
    p1 = 2 * math.exp(0.6) / (math.exp(1.0) + 2 * math.exp(0.6))
    assert votes[0].tolist() == pytest.approx([1 - p1, p1], abs=1e-6)
    assert knn_classify(train, labels, query, truth, ks=[3], temperature=1.0)[3]["top1"] == 100.0

    # T = 0.07: e^(1/0.07) beats 2 e^(0.6/0.07) by a factor e^(0.4/0.07)/2 ~ 152 -> class 0 wins.
    votes = weighted_votes(similarities, neighbours, temperature=0.07, num_classes=2)
    ratio = math.exp(0.4 / 0.07) / 2
    assert votes[0, 0].item() == pytest.approx(ratio / (1 + ratio), rel=1e-5)
    assert knn_classify(train, labels, query, truth, ks=[3], temperature=0.07)[3]["top1"] == 0.0

    # k = 2 keeps a and one of b/c: p1 = e^0.6 / (e^1 + e^0.6) at T = 1.
    result = knn_classify(train, labels, query, torch.tensor([0]), ks=[2, 3], temperature=1.0)
    assert result[2]["top1"] == 100.0 and result[3]["top1"] == 0.0


def test_vote_hits_ignore_classes_nobody_voted_for():
    votes = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    # Row 0's label 4 got no vote: not a top-5 hit although only two classes are ranked above it.
    assert vote_hits(votes, torch.tensor([4, 1])) == {1: 0, 5: 1}
    # A tie ranks the lower class index first, so label 0 is the top-1 of row 1.
    assert vote_hits(votes, torch.tensor([0, 0])) == {1: 2, 5: 2}


def test_k1_top5_equals_top1():
    features, labels = gaussian_classes(spread=3.0)
    result = knn_classify(features[::2], labels[::2], features[1::2], labels[1::2], ks=[1])
    assert result[1]["top5"] == result[1]["top1"]


def test_chunked_equals_unchunked():
    features, labels = gaussian_classes(spread=1.5, seed=1)
    train, val = (features[::2], labels[::2]), (features[1::2], labels[1::2])
    whole = knn_classify(*train, *val, ks=[1, 5, 20], chunk_size=100_000)
    for chunk in (1, 7, 64):
        assert knn_classify(*train, *val, ks=[1, 5, 20], chunk_size=chunk) == whole


def test_separable_features_are_near_perfect_and_random_ones_at_chance():
    features, labels = gaussian_classes(per_class=100, spread=0.5)
    result = knn_classify(features[::2], labels[::2], features[1::2], labels[1::2], ks=[10, 20])
    assert result[20]["top1"] > 98.0
    noise = torch.randn(4000, 64, generator=torch.Generator().manual_seed(3))
    random_labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(4))
    chance = knn_classify(noise[:2000], random_labels[:2000], noise[2000:], random_labels[2000:], ks=[20])
    assert 6.0 < chance[20]["top1"] < 14.0


def test_k_larger_than_the_training_set_is_an_error():
    features, labels = gaussian_classes(per_class=2)
    with pytest.raises(ValueError, match="k=50 exceeds the 20 training samples"):
        knn_classify(features, labels, features, labels, ks=[50])


def test_holdout_split_is_stratified_and_seeded():
    labels = torch.arange(5).repeat_interleave(20)
    train, val = holdout_split(labels, 0.2, seed=0)
    assert torch.bincount(labels[val]).tolist() == [4] * 5
    assert len(set(train.tolist()) | set(val.tolist())) == 100 and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, holdout_split(labels, 0.2, seed=0)[1])
    assert not torch.equal(val, holdout_split(labels, 0.2, seed=1)[1])


# ------------------------------------------------------------------------------------------- the CLI
def test_knn_cli_on_digits_is_sane_reproducible_and_cached(digits, tmp_path, monkeypatch, capsys):
    train, val = digits
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    assert main(["knn", *digits_args(train, val, first_dir, "features=[cls,avg]")]) == 0
    first = json.loads((first_dir / "results.json").read_text())
    assert first["num_train"] == 1437 and first["num_val"] == 360 and first["num_classes"] == 10
    assert first["cache"] == {"train": "miss", "val": "miss"}
    assert (first_dir / "config.yaml").exists()
    for row in first["results"]:
        assert 10.0 < row["top1"] <= 100.0 and row["top1"] <= row["top5"] <= 100.0, row
    assert "top1" in capsys.readouterr().out

    # An independent run (own output and cache) gives exactly the same numbers.
    assert main(["knn", *digits_args(train, val, second_dir, "features=[cls,avg]")]) == 0
    assert json.loads((second_dir / "results.json").read_text())["results"] == first["results"]

    # Same config, same output dir: the cached features are used and the backbone never runs.
    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    with monkeypatch.context() as patch:
        patch.setattr(EvaViT, "forward_intermediates", must_not_run)
        assert main(["knn", *digits_args(train, val, first_dir, "features=[cls,avg]")]) == 0
    cached = json.loads((first_dir / "results.json").read_text())
    assert cached["cache"] == {"train": "hit", "val": "hit"}
    assert cached["results"] == first["results"]

    # A change that alters the pixels invalidates the cache.
    calls = []
    original = EvaViT.forward_intermediates

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EvaViT, "forward_intermediates", counting)
    assert main(["knn", *digits_args(train, val, first_dir, "features=[cls,avg]", "data.crop_pct=0.875")]) == 0
    assert json.loads((first_dir / "results.json").read_text())["cache"] == {"train": "miss", "val": "miss"}
    assert calls


def test_knn_cli_errors_say_what_to_change(tmp_path, capsys):
    assert main(["knn", *TINY, "data.source=folder", f"data.path={tmp_path / 'nowhere'}", "val_data.holdout=0.2",
                 "data.image_size=32", f"output_dir={tmp_path}", "features=[cls,mean]"]) == 2
    message = capsys.readouterr().err
    assert "unknown feature choice 'mean'" in message and "cls, avg" in message and "lastN" in message

    assert main(["knn", *TINY, "data.source=folder", f"data.path={tmp_path / 'nowhere'}", "val_data.holdout=0.2",
                 "data.image_size=32", "data.num_workers=0", f"output_dir={tmp_path}"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err

    # The path is read (its source inferred), not ignored: what is missing is the validation set.
    assert main(["knn", *TINY, f"data.path={tmp_path}", f"output_dir={tmp_path}"]) == 2
    message = capsys.readouterr().err
    assert "no validation set" in message and "val_data.path" in message

    assert main(["knn", *TINY, "val_data.holdout=0.2", f"output_dir={tmp_path}"]) == 2
    assert "data.image_size=32" in capsys.readouterr().err  # the 32 px backbone vs the default 224 px data


def test_precision_names_the_autocast_dtype_and_the_backbone_is_model(tmp_path):
    from evamim.config import ConfigError, load_config
    from evamim.tasks.knn import KnnConfig, validate

    base = TINY + ["val_data.holdout=0.2", "data.image_size=32", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        validate(load_config(KnnConfig, None, base + ["precision=fp8"]))
    for old_key in ("dtype=bf16", "backbone.name=eva_tiny_p16"):
        with pytest.raises(ConfigError):
            load_config(KnnConfig, None, base + [old_key])
    with pytest.raises(ConfigError, match="model.name 'eva_tiny' is not a preset"):
        validate(load_config(KnnConfig, None, base + ["model.name=eva_tiny"]))


def test_train_and_val_folders_must_have_the_same_classes(tmp_path, capsys):
    for folder in ("train/cat", "train/dog", "val/cat", "val/cow"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / folder / "0.png")
    args = digits_args(tmp_path / "train", tmp_path / "val", tmp_path / "out")
    assert main(["knn", *args]) == 2
    message = capsys.readouterr().err
    assert "only in train ['dog'], only in val ['cow']" in message and "sorted folder names" in message
