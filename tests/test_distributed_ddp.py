"""DDP and ZeRO-1 on two gloo processes against one process with the whole batch: same losses, same weights,
same optimizer state; accumulation micro-steps really skip the gradient all-reduce."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

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
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig, Trainer
from evamim.engine.checkpoint import load_checkpoint
from evamim.engine.distributed import DistributedConfig, wrap_model
from evamim.tasks.pretrain import PretrainConfig, run_pretrain
from test_engine_toys import ToyData, ToyNet
from test_pretrain import teacher_dir  # noqa: F401  (pytest fixture)

STEPS = 4
# Two processes reduce gradients in another order than one: float32 rounding, amplified a little by Adam.
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6


def _count_allreduces(out_dir: str) -> int:
    """Two steps of 2 micro-batches each on a DDP toy: how many gradient buckets were all-reduced."""
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(None, bucket)

    torch.manual_seed(0)
    model = wrap_model(ToyNet(), DistributedConfig(), device=torch.device("cpu"), world_size=WORLD)
    model.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Trainer(model, lambda m, batch: {"loss": torch.nn.functional.mse_loss(m(batch[0]), batch[1])}, ToyData(),
            optimizer, optim=OptimConfig(clip_grad=None), out_dir=out_dir, is_main_process=dist.get_rank() == 0,
            loop=LoopConfig(total_steps=2, grad_accum_steps=2, progress_bar=False, tensorboard=False),
            checkpoint=CheckpointConfig(every=0), rank=dist.get_rank(), world_size=WORLD).train()
    return len(calls)


def _worker(rank: int, tmp: str, runs: list[list[str]]) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        for overrides in runs:
            run_pretrain(load_config(PretrainConfig, None, overrides))
        count = _count_allreduces(f"{tmp}/accumulation")
        torch.save(count, f"{tmp}/allreduces-{rank}.pt")


@pytest.mark.slow  # one process then two: about 15 s on 2 busy cores
def test_ddp_and_zero1_on_two_processes_match_one_process_with_the_whole_batch(teacher_dir, tmp_path):  # noqa: F811
    with OneThread():
        run_pretrain(load_config(PretrainConfig, None, equivalence_overrides(
            teacher_dir, tmp_path / "one", STEPS, strategy="ddp", world=1, extra=("checkpoint.every=2",))))
    halfway = tmp_path / "one" / "checkpoints" / f"step-{STEPS // 2:09d}.pt"
    runs = [equivalence_overrides(teacher_dir, tmp_path / "ddp", STEPS, strategy="ddp", world=WORLD),
            # ZeRO-1 with 2 micro-batches per step: accumulation does not change the result either.
            equivalence_overrides(teacher_dir, tmp_path / "zero1", STEPS, strategy="zero1", world=WORLD,
                                  extra=("loop.grad_accum_steps=2",))]
    # A one-process checkpoint resumed by two ZeRO-1 processes (each takes its share of the optimizer state).
    runs.append(equivalence_overrides(teacher_dir, tmp_path / "one_to_zero1", STEPS, strategy="zero1", world=WORLD,
                                      extra=(f"checkpoint.resume={halfway}",)))
    mp.spawn(_worker, args=(str(tmp_path), runs), nprocs=WORLD, join=True)

    reference = losses(tmp_path / "one")
    reference_weights = exported_weights(tmp_path / "one")
    reference_optimizer = load_checkpoint(tmp_path / "one" / "checkpoints" / f"step-{STEPS:09d}.pt")["optimizer"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for name in ("ddp", "zero1"):
        run = tmp_path / name
        assert losses(run) == pytest.approx(reference, abs=LOSS_TOLERANCE), name
        assert max_difference(exported_weights(run), reference_weights) < WEIGHT_TOLERANCE, name
        checkpoint = load_checkpoint(run / "checkpoints" / f"step-{STEPS:09d}.pt")
        assert len(checkpoint["per_rank"]) == WORLD
        # ZeRO-1's consolidated optimizer state is the one-process state: every parameter's moments.
        state = checkpoint["optimizer"]["state"]
        assert state.keys() == reference_optimizer["state"].keys()
        for index, moments in state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(moments[key], reference_optimizer["state"][index][key], atol=1e-6, rtol=1e-4)
        scales = [group["lr_scale"] for group in checkpoint["optimizer"]["param_groups"]]
        assert scales == [group["lr_scale"] for group in reference_optimizer["param_groups"]]
        assert len(set(scales)) > 1  # layer decay: the groups really have different learning rates
    assert losses(tmp_path / "one_to_zero1") == pytest.approx(reference[STEPS // 2:], abs=LOSS_TOLERANCE)
    assert max_difference(exported_weights(tmp_path / "one_to_zero1"), reference_weights) < WEIGHT_TOLERANCE
    # Only the main process writes: one model, one summary, one log.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == \
        ["checkpoints", "config.yaml", "metrics.jsonl", "model", "summary.json"]
    # 2 optimizer steps x 2 micro-batches; the first micro-batch of each step runs under no_sync, so the
    # toy's single gradient bucket is all-reduced once per step, not twice.
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"allreduces-{rank}.pt") == 2
