"""Joining and leaving the job's process group, and choosing this process's device.

Collectives time out after ``timeout_minutes``: a rank that died or hangs makes the others fail with
an error instead of waiting forever. With NCCL, torch's watchdog enforces it
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default, tears the process down).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch

from evamim.engine.distributed.launch import DistributedEnvError, LaunchEnv, read_launch_env

if TYPE_CHECKING:
    from evamim.engine.distributed.strategies import DistributedConfig

_log = logging.getLogger(__name__)


@dataclass
class DistributedState:
    """This process in the job: what :func:`init_distributed` set up."""

    env: LaunchEnv
    device: torch.device
    backend: str | None = None
    owns_group: bool = False
    """True when :func:`init_distributed` created the process group (and :func:`destroy_distributed` should end it)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def select_device(name: str, env: LaunchEnv) -> torch.device:
    """The device of this process: ``auto`` -> CUDA if available (``cuda:LOCAL_RANK``), else CPU.

    With several processes per node each takes ``cuda:LOCAL_RANK``; when a process sees a single GPU
    (SLURM ``--gpus-per-task=1`` or ``CUDA_VISIBLE_DEVICES`` per process) it takes ``cuda:0``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if device.index is not None:
        if env.local_world_size > 1:
            raise ValueError(f"device={name!r} would put all {env.local_world_size} processes of this node on one GPU; "
                             "use device=cuda (each process takes cuda:LOCAL_RANK)")
        return device
    if count == 1:
        return torch.device("cuda", 0)
    if env.local_rank >= count:
        raise ValueError(f"local rank {env.local_rank} needs GPU {env.local_rank} but this process sees {count} GPUs; "
                         "start at most one process per GPU (torchrun --nproc-per-node, srun --ntasks-per-node)")
    return torch.device("cuda", env.local_rank)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ValueError(f"distributed.backend=nccl needs CUDA devices but this process trains on {device}; "
                         "use distributed.backend=gloo (or auto)")
    return name


def init_distributed(cfg: DistributedConfig, device: str = "auto", environ: Mapping[str, str] | None = None
                     ) -> DistributedState:
    """Join the job described by the environment (see :mod:`evamim.engine.distributed.launch`) and pick
    this process's device.

    An already initialised default process group is used as it is (``owns_group=False``). One process:
    no process group. Several: sets the CUDA device first (NCCL needs it), then
    ``init_process_group(backend, timeout=timeout_minutes)``.

    Raises:
        DistributedEnvError: half-set launch variables.
        ValueError: a device or backend that cannot work here (the message says what to change).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        env = LaunchEnv("existing", rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        chosen = select_device(device, env)
        return DistributedState(env, chosen, dist.get_backend(), owns_group=False, rank=rank, world_size=world)
    env = read_launch_env(environ)
    chosen = select_device(device, env)
    if not env.distributed:
        return DistributedState(env, chosen)
    if not dist.is_available():
        raise DistributedEnvError(f"{env.launcher} started {env.world_size} processes but this torch build has no "
                                  "torch.distributed")
    backend = resolve_backend(cfg.backend, chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    # torchrun's agent already holds the rendezvous store: env:// joins it; srun tasks meet over TCP.
    init_method = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    _log.info("joining %d processes as rank %d (local %d) via %s at %s:%s, backend %s, collective timeout %g min",
              env.world_size, env.rank, env.local_rank, env.launcher, env.master_addr, env.master_port, backend,
              cfg.timeout_minutes)
    kwargs: dict[str, Any] = {"device_id": chosen} if chosen.type == "cuda" else {}
    import_modules_binding_the_default_group()
    dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timeout, **kwargs)
    return DistributedState(env, chosen, backend, owns_group=True, rank=env.rank, world_size=env.world_size)


def destroy_distributed(state: DistributedState | None = None) -> None:
    """End the process group if :func:`init_distributed` created it (or, without ``state``, if any), and
    free it now (see :func:`release_process_groups`)."""
    import torch.distributed as dist

    if (state is None or state.owns_group) and dist.is_available() and dist.is_initialized():
        release_process_groups()


# torch modules that bind ``group=dist.group.WORLD`` as a default argument when they are first imported.
# Imported after a process group exists (DDP, ZeRO and FSDP import them lazily), their defaults hold that group
# for the rest of the process, and with it the group's backend threads (see release_process_groups).
_MODULES_BINDING_THE_DEFAULT_GROUP = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
)


def import_modules_binding_the_default_group() -> None:
    """Import those modules while no process group exists, so that their defaults are None (= the default
    group at call time). Call before ``init_process_group`` (:func:`init_distributed` does)."""
    import importlib

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("import_modules_binding_the_default_group() must run before the process group is created")
    for name in _MODULES_BINDING_THE_DEFAULT_GROUP:
        importlib.import_module(name)


def _clear_dtensor_caches() -> None:
    """Empty DTensor's memo caches (FSDP2's parameters are DTensors). Their entries hold sharding specs, which
    hold the DeviceMesh, which holds the process group; they are recomputed on demand, so clearing is safe.
    Uses the clearing functions torch provides; one that a torch version lacks is skipped, and a group that
    stays referenced because of it is reported by release_process_groups."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # DTensor never used: nothing cached
        return
    import importlib

    for module_name, function_name in (
        ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # Python and C++ fast-path caches
        ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
        ("torch.distributed.tensor._redistribute", "_gen_transform_infos"),
        ("torch.distributed.tensor._collective_utils", "MeshTopoInfo"),
    ):
        try:
            target = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError):
            continue
        if function_name == "MeshTopoInfo":
            target = target.build_from_mesh
        clear = getattr(target, "cache_clear", target)
        clear()


class ProcessGroupLeak(RuntimeError):
    """A destroyed process group is still referenced, so its backend threads outlive ``destroy_process_group``."""


def release_process_groups() -> None:
    """``destroy_process_group()``, then make sure every group object is actually freed before returning.

    Why: ``destroy_process_group`` only unregisters the groups. A gloo group's worker threads live until its
    C++ object is destroyed, and whatever still references it (DDP, ZeRO, FSDP meshes, reference cycles)
    keeps it alive until the interpreter shuts down. A gloo thread that then drops the last reference to the
    tensors of a collective needs the GIL of a finalizing interpreter, is killed inside a noexcept destructor
    and the process dies with SIGABRT after finishing its work. Freed here instead (``gc`` breaks the
    wrappers' cycles; the group's destructor releases the GIL while it joins its threads), no backend thread
    is left when the interpreter exits.

    Raises:
        ProcessGroupLeak: a group is still referenced after collection; the message names the referrers.
    """
    import gc
    import weakref

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    groups = [weakref.ref(group) for group in list(_world.pg_map)]
    dist.destroy_process_group()
    _clear_dtensor_caches()
    gc.collect()
    alive = [group for group in (ref() for ref in groups) if group is not None]
    if alive:
        referrers = sorted({type(r).__name__ for group in alive for r in gc.get_referrers(group)} - {"frame", "list"})
        del alive
        raise ProcessGroupLeak(
            "a destroyed process group is still referenced (by " + (", ".join(referrers) or "an untracked object")
            + "): drop every wrapped model, optimizer and device mesh that uses it before ending the process group, "
            "and call import_modules_binding_the_default_group() before creating a group yourself; otherwise its "
            "backend threads can abort the process at exit")
