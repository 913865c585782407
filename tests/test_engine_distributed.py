"""Two gloo processes with DDP: every process's RNG and data position survive a resume; the collectives in one process."""

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from distributed_fixtures import gloo_group
from evamim.engine import CheckpointConfig, OptimConfig
from test_engine_toys import Recorder, ToyData, ToyNet, make_trainer

N = 3
WORLD = 2


def _phase(out_dir, rank, seed, stop_at=None):
    torch.manual_seed(seed * 100 + rank)  # different dropout streams per process
    model = DistributedDataParallel(ToyNet(dropout=0.3))
    recorder = Recorder(stop_at=stop_at)
    trainer = make_trainer(out_dir, model=model, data=ToyData(seed=rank), hooks=[recorder], total_steps=2 * N,
                           optim=OptimConfig(lr=5e-3, warmup_steps=2), checkpoint=CheckpointConfig(every=N),
                           trainer_kwargs=dict(is_main_process=rank == 0, rank=rank, world_size=WORLD))
    trainer.train()
    return recorder.losses, model.module.state_dict()


def _worker(rank, tmp_dir):
    with gloo_group(rank, f"{tmp_dir}/rendezvous", world_size=WORLD):
        full, full_weights = _phase(f"{tmp_dir}/full", rank, seed=0)
        first, _ = _phase(f"{tmp_dir}/split", rank, seed=0, stop_at=N)
        second, weights = _phase(f"{tmp_dir}/split", rank, seed=7)
        torch.save({"full": full, "resumed": first + second, "same_weights": all(
            torch.equal(weights[k], v) for k, v in full_weights.items())}, f"{tmp_dir}/rank{rank}.pt")


@pytest.mark.slow  # two spawned processes: about 10 s on 2 cores
def test_ddp_resume_restores_each_process_state(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for result in results:
        assert len(result["full"]) == 2 * N
        assert result["resumed"] == result["full"]
        assert result["same_weights"]
    assert results[0]["full"] != results[1]["full"]  # the processes really saw different batches
    checkpoint = torch.load(tmp_path / "split" / "checkpoints" / f"step-{2 * N:09d}.pt", weights_only=True)
    assert len(checkpoint["per_rank"]) == WORLD


def test_collectives_without_a_process_group_return_the_callers_own_data():
    from evamim.engine.distributed import broadcast_from_main, gather_rows, gather_to_main

    rows = {"indices": torch.arange(3), "x": torch.ones(3, 2)}
    gathered, infos = gather_to_main(rows, {"keys": ["a"]})
    assert infos == [{"keys": ["a"]}] and torch.equal(gathered["x"], rows["x"])
    assert gather_rows(rows["x"], [3]) is rows["x"] and broadcast_from_main(5) == 5
    with pytest.raises(ValueError, match="one row count"):
        gather_to_main({"indices": torch.arange(3), "x": torch.ones(2, 2)}, None)
