"""Where this process sits in a job, read from the launcher's environment variables.

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
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

_log = logging.getLogger(__name__)

SLURM_PORT_BASE = 29500
"""Default SLURM port: ``SLURM_PORT_BASE + SLURM_JOB_ID % 1000`` (``MASTER_PORT`` overrides it)."""

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedEnvError(RuntimeError):
    """The launch environment is incomplete or inconsistent; the message says what to set."""


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
