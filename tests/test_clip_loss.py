"""The CLIP contrastive loss: a hand computation, and two processes with gathered features equal one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from distributed_fixtures import WORLD, gloo_group
from evamim.clip.loss import contrastive_loss


def features(seed: int, rows: int = 6, width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(rows, width, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(rows, width, generator=generator), dim=-1)
    return images, texts


def test_the_loss_is_the_symmetric_cross_entropy_computed_by_hand():
    images, texts = features(0)
    scale = torch.tensor(1 / 0.07)
    by_hand = 0.0
    for i in range(len(images)):
        row = [float(scale * images[i] @ texts[j]) for j in range(len(texts))]
        column = [float(scale * texts[i] @ images[j]) for j in range(len(images))]
        by_hand += -row[i] + math.log(sum(math.exp(v) for v in row))
        by_hand += -column[i] + math.log(sum(math.exp(v) for v in column))
    by_hand /= 2 * len(images)
    output = contrastive_loss(images, texts, scale)
    assert output["loss"].item() == pytest.approx(by_hand, rel=1e-5)
    # Matching pairs score highest: 100% both ways; shuffled captions do not.
    matched = contrastive_loss(images, images.clone(), scale)
    assert matched["i2t_acc"].item() == matched["t2i_acc"].item() == 100.0
    assert matched["loss"] < output["loss"]


def test_mismatched_shapes_are_refused():
    images, texts = features(0)
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(images, texts[:3], torch.tensor(10.0))


def _worker(rank: int, tmp: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        images, texts = features(1, rows=8)
        half = slice(rank * 4, (rank + 1) * 4)
        mine_images = images[half].clone().requires_grad_(True)
        mine_texts = texts[half].clone().requires_grad_(True)
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        output = contrastive_loss(mine_images, mine_texts, scale)
        output["loss"].backward()
        torch.save({"loss": output["loss"].detach(), "images": mine_images.grad, "texts": mine_texts.grad,
                    "scale": scale.grad}, f"{tmp}/rank{rank}.pt")


def test_two_processes_with_gathered_features_give_the_whole_batch_loss_and_gradients(tmp_path):
    images, texts = features(1, rows=8)
    images.requires_grad_(True), texts.requires_grad_(True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    whole = contrastive_loss(images, texts, scale)
    whole["loss"].backward()
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # What data-parallel training optimises: the mean of the processes' losses and of their gradients.
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(whole["loss"].item(), rel=1e-6)
    gathered_images = torch.cat([r["images"] for r in ranks]) / WORLD
    gathered_texts = torch.cat([r["texts"] for r in ranks]) / WORLD
    assert torch.allclose(gathered_images, images.grad, atol=1e-7)
    assert torch.allclose(gathered_texts, texts.grad, atol=1e-7)
    assert (sum(r["scale"] for r in ranks) / WORLD).item() == pytest.approx(scale.grad.item(), rel=1e-5)
