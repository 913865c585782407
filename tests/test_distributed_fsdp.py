"""FSDP2 on two gloo processes: the losses and weights of one process with the whole batch, and sharded
checkpoints that resume on one process and on two, skipping a truncated one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distributed_fixtures import (
    WORLD,
    OneThread,
    equivalence_overrides,
    exported_weights,
    gloo_group,
    losses,
    max_difference,
)
from evamim.config import load_config
from evamim.tasks.pretrain import PretrainConfig, run_pretrain
from test_pretrain import teacher_dir  # noqa: F401  (pytest fixture)

STEPS = 4
HALF = STEPS // 2
# The sharded reduce-scatter sums in another order than one process: float32 rounding only.
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6


def _config(teacher_dir: Path, output_dir: Path, world: int, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, equivalence_overrides(
        teacher_dir, output_dir, STEPS, strategy="fsdp", world=world, extra=("checkpoint.every=2", *extra)))


def _worker(rank: int, tmp: str, teacher: str, resume_from: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        # With 2 micro-batches per step: the first skips the reduce-scatter (set_requires_gradient_sync).
        run_pretrain(_config(Path(teacher), Path(tmp) / "two", WORLD, "loop.grad_accum_steps=2"))
        run_pretrain(_config(Path(teacher), Path(tmp) / "one_to_two", WORLD, f"checkpoint.resume={resume_from}"))


def _halfway(run: Path) -> Path:
    return run / "checkpoints" / f"step-{HALF:09d}"


@pytest.mark.slow  # one process, then two, then one again: about 15 s on 2 busy cores
def test_fsdp_matches_one_process_and_its_checkpoints_move_between_one_and_two_processes(teacher_dir, tmp_path):  # noqa: F811
    with OneThread():  # the reference: one process, plain model, sharded checkpoint format
        run_pretrain(_config(teacher_dir, tmp_path / "one", 1))
    mp.spawn(_worker, args=(str(tmp_path), str(teacher_dir), str(_halfway(tmp_path / "one"))), nprocs=WORLD, join=True)
    with OneThread():
        run_pretrain(_config(teacher_dir, tmp_path / "two_to_one", 1, f"checkpoint.resume={_halfway(tmp_path / 'two')}"))

    reference, reference_weights = losses(tmp_path / "one"), exported_weights(tmp_path / "one")
    assert len(reference) == STEPS and reference[-1] < reference[0]
    assert losses(tmp_path / "two") == pytest.approx(reference, abs=LOSS_TOLERANCE)
    for resumed in ("one_to_two", "two_to_one"):
        assert losses(tmp_path / resumed) == pytest.approx(reference[HALF:], abs=LOSS_TOLERANCE), resumed
    for run in ("two", "one_to_two", "two_to_one"):  # the exported model is gathered from the shards
        assert max_difference(exported_weights(tmp_path / run), reference_weights) < WEIGHT_TOLERANCE, run

    checkpoint = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in checkpoint.iterdir()) == [f"step-{HALF:09d}", f"step-{STEPS:09d}"]  # nothing partial
    assert sorted(p.name for p in (checkpoint / f"step-{STEPS:09d}").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]

    # A truncated shard in the newest checkpoint: reported, skipped, and the run resumes from the one before.
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "two", damaged)
    shard = damaged / "checkpoints" / f"step-{STEPS:09d}" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (damaged / "model").rename(damaged / "model-before")
    with OneThread():
        result = run_pretrain(_config(teacher_dir, damaged, 1))
    assert Path(result["last_checkpoint"]).name == f"step-{STEPS:09d}"  # retrained from step 2 and saved again
    assert losses(damaged) == pytest.approx(reference, abs=LOSS_TOLERANCE)
    assert max_difference(exported_weights(damaged), reference_weights) < WEIGHT_TOLERANCE
