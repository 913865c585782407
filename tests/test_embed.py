"""Feature choices and extraction (shared by knn, linprobe and embed), ``evamim embed`` to .npy and .safetensors,
and the two-process gather."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import evamim
from evamim.cli import main
from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.features.choices import FeatureRequest, compute_parts, feature_dim, parse_feature
from evamim.features.extract import extract_features
from distributed_fixtures import gloo_group
from test_knn import TINY, one_thread  # noqa: F401  (an autouse fixture)

TINY_MODEL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny(seed: int = 0, **overrides) -> evamim.EvaViT:
    torch.manual_seed(seed)
    return evamim.create_model("eva_tiny_p16", **{**TINY_MODEL, **overrides}).eval()


def synthetic(size: int = 13) -> DataConfig:
    return DataConfig(source="synthetic", labels=True, image_size=32, synthetic_size=size, synthetic_resolution=32,
                      num_workers=0)


def write_folder(root: Path) -> list[Path]:
    """12 photos of varied sizes in three class folders; returns the paths in the order a folder source lists them."""
    generator = np.random.default_rng(0)
    paths = []
    for label, name in enumerate(["cat", "dog", "fish"]):
        (root / name).mkdir(parents=True)
        for number in range(4):
            size = (int(generator.integers(24, 60)), int(generator.integers(24, 60)))
            pixels = generator.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            path = root / name / f"{number:02d}.{'png' if number % 2 else 'jpg'}"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- choices
def test_feature_choices_parse_and_errors_list_the_valid_ones():
    assert parse_feature("cls") == ("cls",)
    assert parse_feature("last4+avg") == ("last4", "avg")
    assert parse_feature("last1") == ("cls",)
    assert feature_dim("cls+avg", 32) == 64 and feature_dim("last4+avg", 32) == 160
    with pytest.raises(ValueError, match=r"unknown feature choice 'pooled'.*cls, avg.*lastN"):
        parse_feature("pooled")
    with pytest.raises(ValueError, match="twice"):
        parse_feature("cls+cls")
    assert FeatureRequest.for_features(["cls", "last3", "avg"]) == FeatureRequest(num_blocks=3, avg=True)
    assert FeatureRequest.for_features(["avg"]) == FeatureRequest(num_blocks=0, avg=True)
    with pytest.raises(ValueError, match="last3 needs 3 blocks; the backbone has 2"):
        FeatureRequest(num_blocks=3).check(tiny())


def test_parts_match_the_models_own_pooling():
    images = torch.randn(3, 3, 32, 32)
    request = FeatureRequest(num_blocks=2, avg=True)
    with torch.no_grad():
        # global_pool='avg' (fc_norm): avg is the model's pooled output; cls goes through fc_norm, its final LayerNorm.
        model = tiny()
        parts = compute_parts(model, images, request)
        tokens = model.forward_features(images)
        torch.testing.assert_close(parts["avg"], model.forward_head(tokens, pre_logits=True))
        torch.testing.assert_close(parts["block_cls"][:, -1], model.fc_norm(tokens[:, 0]))
        # global_pool='token' (final norm): cls is the model's pooled output; avg averages the normed patch tokens.
        model = tiny(global_pool="token")
        parts = compute_parts(model, images, request)
        tokens = model.forward_features(images)
        torch.testing.assert_close(parts["block_cls"][:, -1], model.forward_head(tokens, pre_logits=True))
        torch.testing.assert_close(parts["avg"], tokens[:, 1:].mean(dim=1))
        first_block = model.forward_intermediates(images, [0], norm=True, return_prefix_tokens=True, output_fmt="NLC",
                                                  intermediates_only=True)[0][1][:, 0]
        torch.testing.assert_close(parts["block_cls"][:, 0], first_block)


def test_extraction_orders_rows_by_index_and_builds_every_choice():
    model = tiny()
    loader = build_loader(synthetic(), batch_size=4, purpose="eval")
    features = extract_features(model, loader, FeatureRequest(num_blocks=2, avg=True), device=torch.device("cpu"),
                                progress=False)
    assert len(features) == 13 and features.indices.tolist() == list(range(13))
    assert features.paths[5] == loader.dataset.source.describe(5)
    assert features.get("last2+avg").shape == (13, 96)
    torch.testing.assert_close(features.get("cls+avg"), torch.cat([features.block_cls[:, 1], features.avg], dim=1))
    batch = next(iter(build_loader(synthetic(), batch_size=13, purpose="eval")))
    assert torch.equal(features.labels, batch["labels"])
    with torch.no_grad():
        torch.testing.assert_close(features.get("avg"), model.forward_head(model.forward_features(batch["images"]), pre_logits=True))


# ----------------------------------------------------------------------------------------- evamim embed
@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_embed_writes_one_row_per_image_in_path_order(tmp_path, fmt):
    paths = write_folder(tmp_path / "images")
    out = tmp_path / "out"
    args = [*TINY, "data.source=folder", f"data.path={tmp_path / 'images'}", "data.labels=true", "data.image_size=32",
            "data.num_workers=0", "features=cls+avg", f"format={fmt}", f"output_dir={out}", "progress=false"]
    assert main(["embed", *args]) == 0
    assert (out / "paths.txt").read_text().splitlines() == [str(p) for p in paths]
    if fmt == "npy":
        embeddings, labels = np.load(out / "embeddings.npy"), np.load(out / "labels.npy")
    else:
        from safetensors.numpy import load_file

        stored = load_file(str(out / "embeddings.safetensors"))
        embeddings, labels = stored["embeddings"], stored["labels"]
        assert stored["indices"].tolist() == list(range(12))
    assert embeddings.shape == (12, 64) and embeddings.dtype == np.float32
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 12 and results["dim"] == 64 and (out / "config.yaml").exists()


def test_embed_skips_unreadable_images_without_duplicating_rows(tmp_path):
    paths = write_folder(tmp_path / "images")
    (tmp_path / "images" / "dog" / "01b.jpg").write_text("not an image")  # sorts right after dog/01.png
    out = tmp_path / "out"
    args = [*TINY, "data.source=folder", f"data.path={tmp_path / 'images'}", "data.image_size=32", "data.num_workers=0",
            "normalize=true", "save_dtype=float16", f"output_dir={out}", "progress=false"]
    assert main(["embed", *args]) == 0
    assert (out / "paths.txt").read_text().splitlines() == [str(p) for p in paths]
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (12, 32) and embeddings.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert json.loads((out / "results.json").read_text())["missing"] == 1


def test_embed_rejects_an_unknown_format(tmp_path, capsys):
    assert main(["embed", *TINY, "data.image_size=32", "format=parquet", f"output_dir={tmp_path}"]) == 2
    assert "format must be one of npy, safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ two ranks
def _extract_on_rank(rank: int, tmp_dir: str) -> None:
    with gloo_group(rank, f"{tmp_dir}/rendezvous", world_size=2):
        loader = build_loader(synthetic(), batch_size=4, purpose="eval")  # rank and world size from the group
        features = extract_features(tiny(), loader, FeatureRequest(num_blocks=2, avg=True), device=torch.device("cpu"),
                                    progress=False)
        torch.save({"shard": len(loader.sampler), "features": None if features is None else vars(features)},
                   f"{tmp_dir}/rank{rank}.pt")


def test_two_processes_gather_the_single_process_features_in_order(tmp_path):
    mp.spawn(_extract_on_rank, args=(str(tmp_path),), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert (rank0["shard"], rank1["shard"]) == (7, 6)  # 13 samples, not padded
    assert rank1["features"] is None
    gathered = rank0["features"]
    single = extract_features(tiny(), build_loader(synthetic(), batch_size=4, purpose="eval"),
                              FeatureRequest(num_blocks=2, avg=True), device=torch.device("cpu"), progress=False)
    assert gathered["indices"].tolist() == list(range(13)) and gathered["paths"] == single.paths
    assert torch.equal(gathered["labels"], single.labels)
    torch.testing.assert_close(gathered["block_cls"], single.block_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered["avg"], single.avg, atol=1e-5, rtol=1e-5)
