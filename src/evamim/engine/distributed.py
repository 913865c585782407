"""Several processes training one model: launch environments, the process group, DDP / ZeRO-1 / FSDP2.

Launchers (read by :func:`read_launch_env`, in this order):

1. torchrun (or any launcher that sets the same variables): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
   (and ``LOCAL_WORLD_SIZE``), ``MASTER_ADDR``, ``MASTER_PORT``. torchrun's c10d rendezvous already
   happened when the script starts; the process group joins it through ``env://``.
2. SLURM, one task per GPU started by ``srun``: ``SLURM_PROCID`` (rank), ``SLURM_STEP_NUM_TASKS`` or
   ``SLURM_NTASKS`` (world size), ``SLURM_LOCALID`` (local rank) and the node list
   (``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``), whose first host is the
   master (``scontrol show hostnames`` when available, else the list is parsed). The port is
   ``MASTER_PORT`` if set, else :func:`slurm_default_port` (``29500 + SLURM_JOB_ID % 1000``, so two
   jobs whose first node is shared rarely collide).
3. Neither: one process, no process group.

A half-set environment (``RANK`` without ``WORLD_SIZE``, a non-integer rank, ...) is an error that
says what is missing; it never falls back to one process. A SLURM allocation with several tasks
where this process was not started by ``srun`` runs one process and says so in a warning.

Strategies (:class:`DistributedConfig`, ``strategy``):

- ``ddp``: every process holds the whole model and optimizer; gradients are all-reduced (averaged)
  in buckets during backward. Accumulation micro-steps skip the all-reduce (``no_sync``).
- ``zero1``: DDP for the gradients plus ``ZeroRedundancyOptimizer``: each process keeps the optimizer
  state (AdamW moments) of 1/world of the parameters, steps those and broadcasts them (ZeRO stage 1,
  what the EVA paper ran with DeepSpeed).
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on the root: parameters,
  gradients and optimizer state are all sharded; each block's parameters are all-gathered just
  before it runs and freed after.

With one process every strategy trains the plain model (no wrapper); only the checkpoint format
follows the strategy (single file, or sharded directories for ``fsdp``), so a run can move between
one and many processes.

Collectives time out after ``timeout_minutes``: a rank that died or hangs makes the others fail with
an error instead of waiting forever. With NCCL, torch's watchdog enforces it
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default, tears the process down).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

_log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "fsdp")
TEACHER_PLACEMENTS = ("replicate",)
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SLURM_PORT_BASE = 29500
"""Default SLURM port: ``SLURM_PORT_BASE + SLURM_JOB_ID % 1000`` (``MASTER_PORT`` overrides it)."""

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedEnvError(RuntimeError):
    """The launch environment is incomplete or inconsistent; the message says what to set."""


# ------------------------------------------------------------------------------------------- config


@dataclass
class FsdpOptions:
    """FSDP2 settings (``distributed.strategy=fsdp``)."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for backward
    (ZeRO-3 memory); False keeps them until backward (ZeRO-2-like: more memory, one all-gather less)."""
    param_dtype: str | None = None
    """``bf16`` / ``fp16``: all-gather and compute with parameters in that dtype (half the traffic);
    None: gather fp32 parameters and let ``loop.precision``'s autocast choose the compute dtype."""
    reduce_dtype: str | None = "fp32"
    """Dtype of the gradient reduce-scatter; fp32 keeps the averaged gradients exact to fp32 rounding.
    None: the parameter dtype."""


@dataclass
class DistributedConfig:
    """How several processes share the training (ignored with one process, except the checkpoint format)."""

    strategy: str = "ddp"
    """``ddp`` (replicated model and optimizer), ``zero1`` (optimizer state sharded: the EVA paper's
    DeepSpeed ZeRO-1) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded)."""
    backend: str = "auto"
    """``auto`` (nccl on CUDA, gloo on CPU) or any torch.distributed backend string."""
    timeout_minutes: float = 30.0
    """A collective that waits longer than this fails the run (a dead or stuck rank). Raise it if
    checkpoints take longer than this to write (the other ranks wait for the writer)."""
    find_unused_parameters: bool = False
    """DDP: look for parameters that got no gradient on every backward (slow; only for models that
    skip parameters). The pre-training student uses every parameter."""
    bucket_cap_mb: float = 25.0
    """DDP: gradient all-reduce bucket size."""
    teacher: str = "replicate"
    """Where the frozen teacher lives: ``replicate`` (a full copy on every process; a CLIP-L/14 is
    0.3B parameters, 0.6 GB in bf16). Sharding the teacher is not implemented."""
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)

    def problems(self) -> list[str]:
        """What is wrong with this config, as messages naming the key and the valid values."""
        found = []
        if self.strategy not in STRATEGIES:
            found.append(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not self.timeout_minutes > 0:
            found.append(f"distributed.timeout_minutes must be > 0, got {self.timeout_minutes}")
        if not self.bucket_cap_mb > 0:
            found.append(f"distributed.bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")
        if self.teacher not in TEACHER_PLACEMENTS:
            found.append(f"distributed.teacher must be 'replicate' (every process holds the frozen teacher), "
                         f"got {self.teacher!r}")
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self.fsdp, key)
            if value is not None and value not in DTYPE_NAMES:
                found.append(f"distributed.fsdp.{key} must be null or one of {', '.join(DTYPE_NAMES)}, got {value!r}")
        return found


# --------------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    launcher: str
    """``torchrun``, ``slurm`` or ``none`` (one process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_launch_env(environ: Mapping[str, str] | None = None, *, use_scontrol: bool = True) -> LaunchEnv:
    """This process's rank, world size, local rank and master address from torchrun's or SLURM's variables.

    Raises:
        DistributedEnvError: a half-set or inconsistent environment (the message says what to set).
    """
    environ = os.environ if environ is None else environ
    if any(key in environ for key in _TORCHRUN_KEYS):
        return _torchrun_env(environ)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _slurm_env(environ, use_scontrol)
    tasks = environ.get("SLURM_NTASKS")
    if tasks is not None and tasks.isdigit() and int(tasks) > 1:
        _log.warning(
            "SLURM_NTASKS=%s but this process was not started by srun (no SLURM_STEP_ID): running ONE process. "
            "Start one task per GPU with `srun python -m evamim ...`, or run torchrun inside the job", tasks)
    return LaunchEnv("none")


def _int_var(environ: Mapping[str, str], key: str, hint: str) -> int:
    value = environ.get(key)
    if value is None:
        raise DistributedEnvError(f"{key} is not set; {hint}")
    try:
        return int(value)
    except ValueError:
        raise DistributedEnvError(f"{key}={value!r} is not an integer; {hint}") from None


def _check_ranks(rank: int, world: int, local_rank: int, local_world: int, names: str) -> None:
    if world < 1:
        raise DistributedEnvError(f"the world size must be >= 1, got {world} ({names})")
    if not 0 <= rank < world:
        raise DistributedEnvError(f"rank {rank} is outside [0, world size {world}) ({names})")
    if not 0 <= local_rank < max(local_world, 1) or local_world > world:
        raise DistributedEnvError(
            f"local rank {local_rank} / local world size {local_world} do not fit a world of {world} ({names})")


def _torchrun_env(environ: Mapping[str, str]) -> LaunchEnv:
    hint = ("launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), set all "
            "of them yourself, or unset " + "/".join(k for k in _TORCHRUN_KEYS if k in environ)
            + " to run one process")
    missing = [key for key in ("RANK", "WORLD_SIZE") if key not in environ]
    if missing:
        present = [f"{key}={environ[key]}" for key in _TORCHRUN_KEYS if key in environ]
        raise DistributedEnvError(f"incomplete torchrun environment: {', '.join(present)} "
                                  f"{'is' if len(present) == 1 else 'are'} set but {' and '.join(missing)} "
                                  f"{'is' if len(missing) == 1 else 'are'} not; {hint}")
    rank, world = _int_var(environ, "RANK", hint), _int_var(environ, "WORLD_SIZE", hint)
    if world == 1:
        _check_ranks(rank, world, 0, 1, "RANK/WORLD_SIZE")
        return LaunchEnv("torchrun")
    local_rank = _int_var(environ, "LOCAL_RANK", hint)
    local_world = int(environ["LOCAL_WORLD_SIZE"]) if environ.get("LOCAL_WORLD_SIZE", "").isdigit() else world
    _check_ranks(rank, world, local_rank, local_world, "RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(key)]
    if missing:
        raise DistributedEnvError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; {hint}")
    port = _int_var(environ, "MASTER_PORT", hint)
    return LaunchEnv("torchrun", rank, world, local_rank, local_world, environ["MASTER_ADDR"], port)


def _slurm_env(environ: Mapping[str, str], use_scontrol: bool) -> LaunchEnv:
    hint = "these are set by `srun` for each task; launch with srun, or run torchrun inside the allocation"
    tasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world = _int_var(environ, tasks_key, hint)
    rank = _int_var(environ, "SLURM_PROCID", hint)
    if world == 1:
        _check_ranks(rank, world, 0, 1, f"SLURM_PROCID/{tasks_key}")
        return LaunchEnv("slurm")
    local_rank = _int_var(environ, "SLURM_LOCALID", hint)
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE") or ""
    match = re.match(r"\d+", per_node)
    local_world = int(match.group()) if match else world
    _check_ranks(rank, world, local_rank, local_world, f"SLURM_PROCID/{tasks_key}/SLURM_LOCALID")
    address = environ.get("MASTER_ADDR")
    if not address:
        nodelist = next((environ[key] for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(key)), None)
        if nodelist is None:
            raise DistributedEnvError(f"SLURM_PROCID is set but no node list (SLURM_JOB_NODELIST) nor MASTER_ADDR; {hint}")
        address = slurm_first_host(nodelist, use_scontrol=use_scontrol)
    port = _int_var(environ, "MASTER_PORT", hint) if environ.get("MASTER_PORT") else slurm_default_port(
        environ.get("SLURM_JOB_ID"))
    return LaunchEnv("slurm", rank, world, local_rank, local_world, address, port)


def slurm_default_port(job_id: str | None) -> int:
    """``29500 + job id % 1000`` (29500 without a job id): the same on every task of a job."""
    return SLURM_PORT_BASE + (int(job_id) % 1000 if job_id and job_id.isdigit() else 0)


def slurm_first_host(nodelist: str, *, use_scontrol: bool = True) -> str:
    """The first host of a SLURM node list such as ``gpu[003-010,012],login1`` (-> ``gpu003``).

    Asks ``scontrol show hostnames`` when it is on the PATH (it knows every syntax SLURM emits), and
    parses the list otherwise (or when scontrol fails)."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as error:
            _log.warning("scontrol show hostnames %s failed (%s); parsing the node list instead", nodelist, error)
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """The first host of a compressed SLURM node list: ``node[01-04,07]`` -> ``node01``,
    ``a[1-2]-b[3-4]`` -> ``a1-b3``, ``host1,host2`` -> ``host1`` (zero padding is kept)."""
    first, depth = [], 0
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        first.append(char)
    entry = "".join(first)
    if not entry or depth != 0:
        raise DistributedEnvError(f"cannot read the node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    # Each bracket group -> its first item; a range "03-10" -> its start "03".
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if not host:
        raise DistributedEnvError(f"cannot read the node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    return host


# ------------------------------------------------------------------------------- the process group


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
    """Join the job described by the environment (see the module docstring) and pick this process's device.

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


# ------------------------------------------------------------------------------------------- helpers


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes logs, checkpoints and exports."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend here takes CPU tensors."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    import torch.distributed as dist

    if not _initialized():
        return
    if _collective_device().type == "cuda":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over processes of each value (a collective: every process calls it with the same keys).

    Used for logged metrics: the loss each process computed on its own batch -> the global mean.
    Identity with one process.
    """
    import torch.distributed as dist

    if not _initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    import torch.distributed as dist

    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` is True on every process (a collective)."""
    return all(all_gather_object(bool(flag)))


# ------------------------------------------------------------------------------------------ wrapping


def wrap_model(
    module: nn.Module,
    cfg: DistributedConfig,
    *,
    device: torch.device,
    world_size: int,
    shard_units: Iterable[nn.Module] = (),
    sync_buffers: bool = True,
) -> nn.Module:
    """``module`` ready for ``cfg.strategy`` on ``world_size`` processes (returned as is with one).

    ``module`` is the module whose ``forward`` runs the whole computation that needs gradients (for
    pre-training the ``ObjectiveModule``: hooks of the wrappers only see calls that go through it).
    ``shard_units``: the submodules FSDP shards one by one (the transformer blocks); the rest of
    ``module`` is sharded as one root unit. ``sync_buffers``: DDP re-broadcasts rank 0's buffers before
    every forward; needless for models without running statistics (buffers are synced once at wrapping
    either way).
    """
    if world_size == 1:
        if cfg.strategy != "ddp":
            _log.info("distributed.strategy=%s with one process: training the plain model", cfg.strategy)
        return module
    if cfg.strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.13 renamed the per-forward buffer broadcast; older versions only know the old name.
        sync_key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
            bucket_cap_mb=cfg.bucket_cap_mb,
            # Gradients live in the all-reduce buckets instead of beside them: one gradient copy less.
            gradient_as_bucket_view=True,
            **{sync_key: sync_buffers},
        )
    return _fully_shard(module, cfg.fsdp, list(shard_units))


def _fully_shard(module: nn.Module, options: FsdpOptions, units: Sequence[nn.Module]) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Each process shards the weights it built itself: make sure they are rank 0's everywhere
    # (DDP does the same broadcast when it wraps).
    broadcast_module_state(module)
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPE_NAMES[options.param_dtype] if options.param_dtype else None,
        reduce_dtype=DTYPE_NAMES[options.reduce_dtype] if options.reduce_dtype else None,
    )
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    fully_shard(module, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    return module


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``module`` (a collective)."""
    import torch.distributed as dist

    if not _initialized():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def build_optimizer_for_strategy(
    strategy: str,
    groups: list[dict],
    factory: Callable[[list[dict]], torch.optim.Optimizer],
    *,
    world_size: int,
    defaults: Mapping[str, Any],
) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (from ``evamim.engine.optim.param_groups``): ``factory(groups)``,
    or for ``zero1`` with several processes a ``ZeroRedundancyOptimizer`` whose per-process optimizer
    is ``factory(this process's share of the groups)``.

    The ZeRO wrapper exposes the full groups with their ``lr_scale``/``wd_scale``; the loop sets every
    group's lr and weight decay there and ZeRO copies them into the local optimizer before each step.
    ``defaults``: hyper-parameters the groups may lack (``lr``, ``weight_decay``, ...).
    """
    if strategy != "zero1" or world_size == 1:
        return factory(groups)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def local_optimizer(local_groups, **_defaults):
        # The defaults were already merged into the groups by the ZeRO wrapper.
        return factory(local_groups)

    return ZeroRedundancyOptimizer(groups, optimizer_class=local_optimizer, **dict(defaults))


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module):
    """FSDP2's counterpart of DDP's ``no_sync()``: skip the gradient reduce-scatter (accumulate unsharded
    gradients) inside the context; the next backward outside it reduces everything accumulated."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_fsdp(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2 ``fully_shard``."""
    return callable(getattr(model, "set_requires_gradient_sync", None)) and callable(getattr(model, "unshard", None))
