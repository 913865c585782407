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


def interleaved_seconds_per_step(
    steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int, device: torch.device
) -> dict[str, float]:
    """Median seconds/step of each candidate, alternating candidates every round so that machine noise
    (other processes, clock changes) hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(time_steps(step, steps_per_round, device))
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
