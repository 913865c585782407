"""clip_mae on two gloo processes (DDP and FSDP2) equals one process with the whole batch: the decoder is trained,
synchronised and sharded like the encoder, and the exported encoder is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distributed_fixtures import WORLD, OneThread, equivalence_overrides, exported_weights, gloo_group, losses, max_difference
from evamim.config import load_config
from evamim.tasks.pretrain import PretrainConfig, run_pretrain
from test_pretrain import teacher_dir  # noqa: F401  (pytest fixture)

STEPS = 3
MAE = ("objective=clip_mae", "decoder.depth=1", "decoder.width=32", "decoder.num_heads=2")


def _config(teacher_dir: Path, output_dir: Path, world: int, strategy: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, equivalence_overrides(teacher_dir, output_dir, STEPS, strategy=strategy,
                                                                   world=world, extra=MAE))


def _worker(rank: int, tmp: str, teacher: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        for strategy in ("ddp", "fsdp"):
            run_pretrain(_config(Path(teacher), Path(tmp) / f"two_{strategy}", WORLD, strategy))


@pytest.mark.slow  # one process twice, then two processes twice: about 20 s on 2 busy cores
def test_clip_mae_on_two_processes_equals_one(teacher_dir, tmp_path):  # noqa: F811
    with OneThread():
        for strategy in ("ddp", "fsdp"):
            run_pretrain(_config(teacher_dir, tmp_path / f"one_{strategy}", 1, strategy))
    mp.spawn(_worker, args=(str(tmp_path), str(teacher_dir)), nprocs=WORLD, join=True)
    for strategy in ("ddp", "fsdp"):
        reference = losses(tmp_path / f"one_{strategy}")
        assert len(reference) == STEPS
        assert losses(tmp_path / f"two_{strategy}") == pytest.approx(reference, abs=1e-6), strategy
        difference = max_difference(exported_weights(tmp_path / f"two_{strategy}"),
                                    exported_weights(tmp_path / f"one_{strategy}"))
        assert difference < 1e-6, strategy
