"""`evamim pretrain` under torchrun through the real command line, and a rank that dies or hangs mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distributed_fixtures import (
    WORLD,
    equivalence_overrides,
    free_port,
    native_threads,
    set_env,
    steps_logged,
    torchrun_env,
)
from evamim.config import load_config
from evamim.engine import Hook
from evamim.tasks.pretrain import PretrainConfig, run_pretrain
from test_pretrain import teacher_dir  # noqa: F401  (pytest fixture)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow  # torchrun starts two interpreters: about 15 s on 2 busy cores
def test_torchrun_evamim_pretrain_writes_one_set_of_outputs(teacher_dir, tmp_path):  # noqa: F811
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "evamim", "pretrain", *equivalence_overrides(teacher_dir, output, 3, strategy="ddp", world=WORLD)]
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("done: 3 steps") == 1  # printed by the main process only
    assert done.stderr.count("student eva_tiny_p16") == 1  # INFO logs from the main process only
    assert steps_logged(output) == [1, 2, 3]  # one metrics.jsonl, written once per step
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["processes"], summary["strategy"], summary["steps"]) == (WORLD, "ddp", 3)
    assert (output / "model" / "model.safetensors").is_file() and (output / "model" / "config.json").is_file()
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["step-000000003.pt"]
    assert len(torch.load(output / "checkpoints" / "step-000000003.pt", weights_only=True)["per_rank"]) == WORLD


class FaultAtStep(Hook):
    """After ``step`` steps this process dies (``kill``: SIGKILL, no exception, no goodbye to the others) or
    freezes (``hang``: SIGSTOP, alive and holding its connections, like a process stuck in a kernel)."""

    def __init__(self, step: int, kind: str):
        self.step = step
        self.kind = kind

    def on_step_end(self, trainer, metrics, skipped):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "kill" else signal.SIGSTOP)


def _worker(rank: int, port: int, teacher: str, tmp: str, fault: str) -> None:
    set_env(torchrun_env(rank, port))  # run_pretrain joins through the environment, as under torchrun
    torch.set_num_threads(1)
    config = load_config(PretrainConfig, None, equivalence_overrides(
        Path(teacher), Path(tmp) / "run", 6, strategy="ddp", world=WORLD, extra=("distributed.timeout_minutes=0.1",)))
    try:
        run_pretrain(config, hooks=(FaultAtStep(2, fault),) if rank == 1 else ())
    except Exception as error:  # what the surviving process reports before it exits
        Path(tmp, f"error-{rank}.txt").write_text(f"{time.monotonic()}\n{type(error).__name__}: {error}")
        os._exit(1)  # as the CLI ends a failed process still in its group (an interpreter shutdown could abort)
    Path(tmp, f"finished-{rank}").touch()


@pytest.mark.slow  # about 10 s (kill) and 20 s (hang) on 2 busy cores
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_stuck_rank_makes_the_other_exit_with_an_error_instead_of_hanging(teacher_dir, tmp_path, fault):  # noqa: F811
    """Rank 1 dies or freezes after step 2, while rank 0 goes on into step 3's gradient all-reduce. A dead
    peer may be noticed by gloo (connection reset) or not (then, as with NCCL in general, only the timeout
    ends the wait); a frozen one only by the collective timeout. Either way rank 0 raises and exits non-zero."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, port, str(teacher_dir), str(tmp_path), fault))
                 for rank in range(WORLD)]
    for process in processes:
        process.start()
    try:
        start = time.monotonic()
        processes[0].join(timeout=120)
        waited = time.monotonic() - start
        assert processes[0].exitcode == 1, f"rank 0 did not exit with an error after {waited:.0f} s"
        assert not (tmp_path / "finished-0").exists()
        raised_at, error = (tmp_path / "error-0.txt").read_text().split("\n", 1)
        assert error.startswith("RuntimeError") and ("Timed out" in error or fault == "kill"), error
        print(f"rank 0 exited {time.monotonic() - float(raised_at):.1f} s after raising: {error[:200]}")
        assert waited < 60
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=30)
    assert processes[1].exitcode == -signal.SIGKILL


def _threads_worker(rank: int, port: int, teacher: str, tmp: str) -> None:
    set_env(torchrun_env(rank, port))
    torch.set_num_threads(1)
    counts = {"before": native_threads()}
    for strategy in ("ddp", "zero1", "fsdp"):
        run_pretrain(load_config(PretrainConfig, None, equivalence_overrides(
            Path(teacher), Path(tmp) / strategy, 2, strategy=strategy, world=WORLD)))
        counts[strategy] = native_threads()
    torch.save(counts, Path(tmp) / f"threads-{rank}.pt")


@pytest.mark.slow  # three 2-step runs on two processes: about 15 s on 2 busy cores
def test_no_backend_thread_outlives_a_multi_process_run(teacher_dir, tmp_path):  # noqa: F811
    """A finished multi-process run leaves no gloo thread behind. Such a thread, still alive at interpreter shutdown,
    can free a collective's tensors then and abort the process (SIGABRT after all work was saved): DDP, ZeRO-1 and
    FSDP each kept their group alive through module defaults, wrappers or DTensor caches."""
    mp.spawn(_threads_worker, args=(free_port(), str(teacher_dir), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        counts = torch.load(tmp_path / f"threads-{rank}.pt")
        assert counts == {"before": counts["before"], "ddp": counts["before"], "zero1": counts["before"],
                          "fsdp": counts["before"]}, counts


@pytest.mark.slow  # torchrun starts two interpreters: about 15 s on 2 busy cores
def test_a_failed_torchrun_run_exits_with_its_error_not_an_abort(teacher_dir, tmp_path):  # noqa: F811
    """The processes refuse a run directory whose only checkpoint does not load, after joining their group: the
    first to fail prints the one-line reason and exits with code 2 (not an abort at interpreter shutdown, not a
    traceback); torchrun then stops the other, which may or may not have printed the same line by then."""
    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "checkpoints" / "step-000000002.pt").write_bytes(b"not a checkpoint")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "evamim", "pretrain", *equivalence_overrides(teacher_dir, output, 3, strategy="ddp", world=WORLD)]
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("evamim pretrain:")]
    assert printed and all(line.startswith("evamim pretrain: none of the 1 checkpoints") for line in printed), \
        done.stdout + done.stderr[-3000:]
    root_cause = done.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2 " in root_cause, done.stderr[-3000:]  # torchrun's report of the first failure
    assert "exitcode  : -6" not in done.stderr and "terminate called" not in done.stderr
