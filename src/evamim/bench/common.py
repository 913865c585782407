"""Shared benchmark plumbing: timing with device syncs, peak FLOP/s tables, and the environment record."""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from evamim.dtypes import PRECISIONS

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; override with --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}

DTYPES = PRECISIONS  # the one table (evamim.dtypes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``steps`` calls, with the device synchronised around the window."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def interleaved_samples(
    steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int, device: torch.device,
    *, alternate: bool = False,
) -> dict[str, list[float]]:
    """Seconds/step of each candidate in each round, running the candidates in turn every round so that machine
    noise (other processes, clock changes) hits them alike; ``alternate`` reverses their order every other
    round, so that neither always runs right after the other (caches, allocator state, clocks)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for index in range(rounds):
        for name in (reversed(order) if alternate and index % 2 else order):
            samples[name].append(time_steps(steps[name], steps_per_round, device))
    return samples


def interleaved_seconds_per_step(
    steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int, device: torch.device,
    *, alternate: bool = False,
) -> dict[str, float]:
    """Median seconds/step of each candidate over :func:`interleaved_samples`' rounds."""
    samples = interleaved_samples(steps, rounds, steps_per_round, device, alternate=alternate)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "cpu",
    )
    return f"{model_name}, {torch.get_num_threads()} threads"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """What a benchmark result must be recorded with."""
    import evamim

    info = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "evamim": evamim.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def mfu_and_memory_cells(result: dict) -> tuple[str, str]:
    """A result's MFU and peak memory as table cells ``(6 wide, 9 wide)``; ``-`` where not measured (CPU)."""
    mfu = f"{100 * result['mfu']:5.1f}%" if result.get("mfu") is not None else "    -"
    mem = f"{result['peak_mem_gib']:9.2f}" if result.get("peak_mem_gib") is not None else "        -"
    return mfu, mem
