"""The global RNG states of a process (Python, NumPy, torch CPU and CUDA), as a checkpoint stores them."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

# Every checkpoint message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.checkpoint")


def capture_rng_state() -> dict:
    """The global RNG states of Python, NumPy, torch CPU and (if initialised) every CUDA device,
    as tensors and plain types (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state["cuda"]
    if cuda_states:
        if not torch.cuda.is_available():
            _log.warning("checkpoint holds CUDA RNG states but CUDA is not available here; they are not restored")
        else:
            if len(cuda_states) != torch.cuda.device_count():
                _log.warning("checkpoint holds %d CUDA RNG states, this machine has %d devices; restoring the first %d",
                             len(cuda_states), torch.cuda.device_count(),
                             min(len(cuda_states), torch.cuda.device_count()))
            for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)


def _as_tuple(value):
    """``random.setstate`` needs nested tuples; keep them tuples even if a list came back."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
