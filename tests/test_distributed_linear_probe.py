"""The linear probe on the task runner with two gloo processes: the same losses, heads and validation scores as
one process with the whole batch (augmented and precomputed), and a killed run resumes exactly.

Data: 16 training images of real digits (three classes) in global batches of 8, and 7 validation images (not a
multiple of 2: each process scores its own unpadded share and the sums cover every image once).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from distributed_fixtures import WORLD, OneThread, gloo_group, losses, max_difference
from evamim.config import load_config
from evamim.tasks.linear_probe import LinearProbeConfig, run_linear_probe
from test_knn import TINY
from test_pretrain import CrashAtStep

GLOBAL_BATCH = 8
TOLERANCE = 1e-6


def write_images(root: Path) -> tuple[Path, Path]:
    """Digits 0-2 of scikit-learn as 32 px PNG folders: 16 for training (6, 5, 5), 7 for validation (3, 2, 2)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = {"train": {0: 6, 1: 5, 2: 5}, "val": {0: 3, 1: 2, 2: 2}}
    taken = {split: dict.fromkeys(range(3), 0) for split in wanted}
    for number, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        split = next((s for s in wanted if label in wanted[s] and taken[s][label] < wanted[s][label]), None)
        if split is None:
            continue
        taken[split][label] += 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{number}.png")
    return root / "train", root / "val"


def probe_config(data: Path, output_dir: Path, world: int, *extra: str) -> LinearProbeConfig:
    """Two epochs of 2 steps; checkpoints and evaluations every epoch. Random crops and flips are drawn per image
    from (seed, epoch, index), so the processes' shares together are the one-process batch. Moderate lrs: a step
    that overshoots (lr 1 on these normalised features) amplifies float rounding beyond the tolerance."""
    overrides = [
        *TINY, "data.source=folder", f"data.path={data / 'train'}", f"val_data.path={data / 'val'}",
        "data.image_size=32", "data.crop_pct=1.0", "data.num_workers=0", "device=cpu", "progress=false",
        "cache=false", f"output_dir={output_dir}", "features=[cls,avg]", "probe.optimizer=sgd", "probe.lrs=[0.02,0.1]",
        "probe.epochs=2", "probe.warmup_epochs=1", "probe.eval_every=1", f"probe.batch_size={GLOBAL_BATCH // world}",
        "checkpoint.every=2", *extra,
    ]
    return load_config(LinearProbeConfig, None, overrides)


def _worker(rank: int, tmp: str) -> None:
    data = Path(tmp) / "data"
    with gloo_group(rank, f"{tmp}/rendezvous"):
        run_linear_probe(probe_config(data, Path(tmp) / "augmented", WORLD, "probe.augment=true"))
        killed = probe_config(data, Path(tmp) / "killed", WORLD)
        try:
            run_linear_probe(killed, hooks=(CrashAtStep(3),))  # after the checkpoint at step 2
        except KeyboardInterrupt:
            pass
        run_linear_probe(killed)  # the same command again: resumes from step 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process: augmented and precomputed; two processes: augmented, and precomputed killed and resumed."""
    tmp = tmp_path_factory.mktemp("linprobe")
    write_images(tmp / "data")
    with OneThread():
        run_linear_probe(probe_config(tmp / "data", tmp / "one_augmented", 1, "probe.augment=true"))
        run_linear_probe(probe_config(tmp / "data", tmp / "one", 1))
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return tmp


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = summary(run), summary(reference)
    assert ours["processes"] == 2 and theirs["processes"] == 1 and ours["batch"]["global_batch"] == GLOBAL_BATCH
    expected = losses(reference)
    assert len(expected) == 2  # one line per epoch
    assert losses(run) == pytest.approx(expected, abs=TOLERANCE)
    heads = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("loss/avg/") for key in heads[0])
    assert ours["steps"] == theirs["steps"] == 4 and ours["num_val"] == theirs["num_val"] == 7
    # Validation sums over both processes' shares equal one process's over all 7 images.
    assert ours["validation"] == pytest.approx(theirs["validation"], abs=1e-9)
    assert [row["head"] for row in ours["heads"]] == [row["head"] for row in theirs["heads"]]
    assert ours["heads"] == theirs["heads"] and ours["best"] == theirs["best"]  # hit counts: exact
    best = load_file(str(run / "best_head.safetensors"))
    assert max_difference(best, load_file(str(reference / "best_head.safetensors"))) < TOLERANCE


@pytest.mark.slow  # two one-process runs, then three two-process runs: ~20 s on 2 cores
def test_augmented_probe_on_two_processes_matches_one_process(runs):
    assert summary(runs / "augmented")["protocol"]["mode"] == "augmented"
    assert_same_run(runs / "augmented", runs / "one_augmented")


@pytest.mark.slow
def test_precomputed_probe_killed_on_two_processes_resumes_like_one_uninterrupted_process(runs):
    killed = runs / "killed"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [2, 4]  # the first attempt logged epoch 1 and stopped at step 3; the second resumed at 2
    assert summary(killed)["num_train"] == 16
    assert_same_run(killed, runs / "one")
