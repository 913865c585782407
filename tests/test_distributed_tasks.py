"""Every training task on the runner: two gloo processes against one process with the whole batch.

Same losses, same weights, same validation metrics (summed over processes on a validation set whose size is
not a multiple of the world size: no image counted twice or dropped), and a two-process run killed halfway
resumes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distributed_fixtures import WORLD, OneThread, exported_weights, gloo_group, losses, max_difference
from evamim.config import load_config
from evamim.engine import Hook
from evamim.tasks.finetune import FinetuneConfig, run_finetune
from test_finetune import tiny_overrides as finetune_overrides

GLOBAL_BATCH = 8
STEPS = 4
TOLERANCE = 1e-6


def finetune_config(output_dir: Path, world: int, *extra: str) -> FinetuneConfig:
    """The tiny fine-tune of test_finetune, deterministic across process counts: the ranks' batches together are
    the one-process batch (per-sample augmentation draws), no mixup (it pairs images within a process's batch),
    no drop path (its draws differ per process); 63 validation images: not a multiple of 2."""
    overrides = finetune_overrides(output_dir, STEPS, *extra) + [
        f"batch_size={GLOBAL_BATCH // world}",
        "model.drop_path_rate=0.0",
        "data.synthetic_size=63",
        "eval.batch_size=5",
        "loop.eval_every=2",
        "checkpoint.every=2",
    ]
    return load_config(FinetuneConfig, None, overrides)


class CrashAtStep(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics, skipped):
        if trainer.step >= self.step:
            raise KeyboardInterrupt("simulated crash")


def _finetune_worker(rank: int, tmp: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        run_finetune(finetune_config(Path(tmp) / "ddp", WORLD))
        run_finetune(finetune_config(Path(tmp) / "fsdp", WORLD, "distributed.strategy=fsdp"))
        killed = finetune_config(Path(tmp) / "killed", WORLD)
        try:
            run_finetune(killed, hooks=(CrashAtStep(3),))  # after the checkpoint at step 2
        except KeyboardInterrupt:
            pass
        run_finetune(killed)  # the same command again: resumes from step 2


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


@pytest.mark.slow  # one process, then three two-process runs: ~30 s on 2 cores
def test_finetune_on_two_processes_matches_one_process_and_resumes_exactly(tmp_path):
    with OneThread():
        run_finetune(finetune_config(tmp_path / "one", 1))
    mp.spawn(_finetune_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    reference = losses(tmp_path / "one")
    assert len(reference) == STEPS
    for run in ("ddp", "fsdp", "killed"):
        assert losses(tmp_path / run) == pytest.approx(reference, abs=TOLERANCE), run
        assert max_difference(exported_weights(tmp_path / run), exported_weights(tmp_path / "one")) < TOLERANCE, run
        # Validation: the sums of both processes, over all 63 images, equal one process's.
        ours, theirs = summary(tmp_path / run)["validation"], summary(tmp_path / "one")["validation"]
        assert ours.keys() == theirs.keys() and "ema_top1" in ours
        assert ours == pytest.approx(theirs, abs=1e-4), run
    assert summary(tmp_path / "ddp")["processes"] == 2 and summary(tmp_path / "fsdp")["strategy"] == "fsdp"
    # The killed run really stopped and resumed (its log restarts at the checkpoint's step).
    assert (tmp_path / "killed" / "checkpoints").is_dir()
