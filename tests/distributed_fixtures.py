"""Helpers for the multi-process tests: a tiny pre-training config, 2-process gloo workers, readers.

Every worker uses one thread: two processes on two cores, where more threads would only fight.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from evamim.engine.distributed import import_modules_binding_the_default_group, release_process_groups
from test_pretrain import tiny_overrides

WORLD = 2
GLOBAL_BATCH = 8


def equivalence_overrides(teacher_dir: Path, output_dir: Path, steps: int, *, strategy: str, world: int,
                          extra: tuple[str, ...] = ()) -> list[str]:
    """The tiny run of test_pretrain, made deterministic across process counts.

    - ``batch_size`` = GLOBAL_BATCH / world: rank r takes the global positions r, r + world, ... of the
      epoch's order, so the ranks' batches together are the one-process batch; crops and masks are
      drawn per sample from (seed, epoch, index), so every sample is identical too;
    - random masking (8 of 16 patches per image): each rank's loss is a mean over the same number of
      masked tokens, so the mean of the ranks' means is the one-process mean (with block masking the
      counts vary per image and the two differ slightly, as in the EVA paper's own DeepSpeed runs);
    - no drop path: its random draws differ per rank;
    - layer-wise lr decay, so that each parameter group has its own learning rate.
    """
    return tiny_overrides(teacher_dir, output_dir, steps) + [
        "model.drop_path_rate=0.0",
        "optim.warmup_steps=1",
        "optim.layer_decay=0.8",  # per-group learning rates, which ZeRO-1 must carry into its shards
        "masking.kind=random",
        "masking.mask_ratio=0.5",
        f"batch_size={GLOBAL_BATCH // world}",
        "loop.tensorboard=false",
        f"distributed.strategy={strategy}",
        *extra,
    ]


@contextlib.contextmanager
def gloo_group(rank: int, rendezvous: str, timeout_s: float = 60.0, world_size: int = WORLD):
    """A gloo process group for a spawned test worker, set up as ``init_distributed`` does and released as
    ``destroy_distributed`` does: on a clean exit every group must be freed (ProcessGroupLeak otherwise), so a
    worker never reaches interpreter shutdown with gloo threads alive (they can abort it with SIGABRT)."""
    torch.set_num_threads(1)
    import_modules_binding_the_default_group()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # the traceback still references the wrappers: report the test's error
        raise
    release_process_groups()


def native_threads() -> int:
    """OS threads of this process (Linux): gloo's worker threads are native threads Python does not list."""
    return len(os.listdir("/proc/self/task"))


def losses(output_dir: Path) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def steps_logged(output_dir: Path) -> list[int]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "model" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OneThread:
    """Run the one-process reference with one thread (as each of the two workers), then restore."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def torchrun_env(rank: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def set_env(values: dict[str, str]) -> None:
    os.environ.update(values)
