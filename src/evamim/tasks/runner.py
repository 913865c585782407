"""The task runner: the one place where a task meets processes, devices, wrappers, checkpoints and logs.

(Being written: the training runner joins this module next.)
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def evaluation_process(device_name: str):
    """Join the job the launcher describes (torchrun or SLURM; ``evamim.engine.distributed``), yield this
    process's device (``cuda:LOCAL_RANK`` with several GPUs per node) and leave the group it created.

    Raises:
        ConfigError: a device that cannot work here (the message says what to change).
    """
    from evamim.config import ConfigError
    from evamim.engine.distributed import DistributedConfig, destroy_distributed, init_distributed

    try:
        state = init_distributed(DistributedConfig(), device_name)
    except ValueError as error:
        raise ConfigError(f"device: {error}") from None
    try:
        yield state.device
    finally:
        destroy_distributed(state)
