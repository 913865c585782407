"""Several processes training one model: launch environments, the process group, DDP / ZeRO-1 / FSDP2,
and the collectives the engine and the tasks use.

- :mod:`~evamim.engine.distributed.launch`: rank, world size and master address from torchrun's or
  SLURM's variables (:func:`read_launch_env`).
- :mod:`~evamim.engine.distributed.process_group`: joining and leaving the process group
  (:func:`init_distributed`, :func:`destroy_distributed`) and freeing it for good
  (:func:`release_process_groups`).
- :mod:`~evamim.engine.distributed.strategies`: :class:`DistributedConfig`, wrapping a model for
  ``ddp`` / ``zero1`` / ``fsdp`` and the matching optimizer.
- :mod:`~evamim.engine.distributed.collectives`: rank helpers, barriers, reductions, broadcasts and
  gathering rows on rank 0.
"""

from evamim.engine.distributed.collectives import (
    GATHER_CHUNK_BYTES,
    all_gather_object,
    all_ranks_agree,
    all_reduce_mean,
    barrier,
    broadcast_from_main,
    broadcast_module_state,
    gather_rows,
    gather_to_main,
    get_rank,
    get_world_size,
    is_main_process,
)
from evamim.engine.distributed.launch import (
    SLURM_PORT_BASE,
    DistributedEnvError,
    LaunchEnv,
    parse_first_host,
    read_launch_env,
    slurm_default_port,
    slurm_first_host,
)
from evamim.engine.distributed.process_group import (
    DistributedState,
    ProcessGroupLeak,
    destroy_distributed,
    import_modules_binding_the_default_group,
    init_distributed,
    release_process_groups,
    resolve_backend,
    select_device,
)
from evamim.engine.distributed.strategies import (
    DTYPE_NAMES,
    STRATEGIES,
    TEACHER_PLACEMENTS,
    DistributedConfig,
    FsdpOptions,
    build_optimizer_for_strategy,
    fsdp_no_sync,
    is_fsdp,
    wrap_model,
)

__all__ = [
    "DTYPE_NAMES",
    "GATHER_CHUNK_BYTES",
    "SLURM_PORT_BASE",
    "STRATEGIES",
    "TEACHER_PLACEMENTS",
    "DistributedConfig",
    "DistributedEnvError",
    "DistributedState",
    "FsdpOptions",
    "LaunchEnv",
    "ProcessGroupLeak",
    "all_gather_object",
    "all_ranks_agree",
    "all_reduce_mean",
    "barrier",
    "broadcast_from_main",
    "broadcast_module_state",
    "build_optimizer_for_strategy",
    "destroy_distributed",
    "fsdp_no_sync",
    "gather_rows",
    "gather_to_main",
    "get_rank",
    "get_world_size",
    "import_modules_binding_the_default_group",
    "init_distributed",
    "is_fsdp",
    "is_main_process",
    "parse_first_host",
    "read_launch_env",
    "release_process_groups",
    "resolve_backend",
    "select_device",
    "slurm_default_port",
    "slurm_first_host",
    "wrap_model",
]
