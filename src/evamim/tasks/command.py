"""What every config-driven command shares: ``--config`` and ``key=value`` arguments, console logging, and
turning a run's outcome into an exit code and one line (exit 2: the input cannot be used; exit 1: the run
failed for a known reason) instead of a traceback."""

from __future__ import annotations

from typing import Any


def add_config_arguments(parser, example_config: str, example_overrides: str) -> None:
    """The arguments every config-driven command takes: ``--config FILE`` and ``key=value`` overrides."""
    parser.add_argument("--config", help=f"YAML recipe (deltas over the defaults), e.g. {example_config}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example_overrides}")


def configure_logging() -> int:
    """Console logging: INFO (or ``EVAMIM_LOG_LEVEL``) on the main process; warnings and errors only, tagged
    with the rank, on the others. Returns this process's rank (from the launch environment)."""
    import logging
    import os

    from evamim.engine.distributed import read_launch_env

    env = read_launch_env(use_scontrol=False)  # only the rank matters here
    level = os.environ.get("EVAMIM_LOG_LEVEL", "INFO")
    prefix = f"[rank {env.rank}] " if env.distributed else ""
    logging.basicConfig(level=level if env.rank == 0 else "WARNING",
                        format=f"%(asctime)s {prefix}%(levelname)s %(message)s")
    return env.rank


def describe_os_error(error: OSError, output_dir: Any = None) -> str:
    """One line: the path (or, when the error names none, the run's output directory) and the OS's reason."""
    import errno

    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(paths) if paths else (f"writing in output_dir {output_dir}" if output_dir else "")
    full = "free some space or choose another output_dir; re-running resumes from the last checkpoint"
    hints = {"ENOSPC": full, "EDQUOT": full, "EROFS": "choose a writable output_dir",
             "EACCES": "check the permissions, or choose another path",
             "ENOTDIR": "a file stands where a directory is needed; choose another path"}
    hint = hints.get(errno.errorcode.get(error.errno, ""))
    return f"{where + ': ' if where else ''}{reason}{'; ' + hint if hint else ''}"


def _refusals() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input cannot be used" (exit code 2): a config, a launch environment, a missing
    file, weights that do not fit or cannot be trusted, checkpoints that do not load."""
    from evamim.config import ConfigError
    from evamim.engine.checkpoint import CheckpointError
    from evamim.engine.distributed import DistributedEnvError
    from evamim.models.checkpoint import WeightsMismatchError
    from evamim.models.sources import CorruptCheckpointError, UnsafeCheckpointError

    return (ConfigError, FileNotFoundError, DistributedEnvError, CheckpointError, WeightsMismatchError,
            CorruptCheckpointError, UnsafeCheckpointError)


def _failures() -> tuple[type[BaseException], ...]:
    """Errors that end a run that started (exit code 1) and say what happened and what to try."""
    from evamim.data.failures import TooManyBadSamples
    from evamim.engine.loop import NonFiniteLossError
    from evamim.models.checkpoint import NonFiniteWeightsError

    return (NonFiniteLossError, TooManyBadSamples, NonFiniteWeightsError)


def run_config_command(command: str, schema: type, run_fn, args, extra_errors: tuple = ()):
    """Load ``schema`` from ``args`` and call ``run_fn(config)``. An input that cannot be used (a config, a missing
    file, weights or checkpoints that do not load: ``_refusals``) is printed as ``evamim COMMAND: ...`` instead
    of a traceback (exit code 2); so is a run that failed for a known reason (``_failures``: divergence, too
    many bad samples) or an OS error while running (a full disk, a read-only or missing directory), with exit
    code 1 (``EVAMIM_LOG_LEVEL=DEBUG`` logs their tracebacks). Returns (exit code, config, result, rank)."""
    import logging

    from evamim.config import ConfigError, load_config

    refused, failed = _refusals(), _failures()
    rank, config = 0, None
    try:
        rank = configure_logging()
        config = load_config(schema, args.config, args.overrides)
        result = run_fn(config)
    except (*refused, *extra_errors) as error:
        # A FileNotFoundError from the OS ("[Errno 2] ...: 'path'") reads better as "path: reason".
        os_error = isinstance(error, OSError) and error.errno is not None
        print(f"evamim {command}: {describe_os_error(error) if os_error else error}")
        return 2, None, None, rank
    except failed as error:
        logging.getLogger(__name__).debug("evamim %s failed", command, exc_info=True)
        print(f"evamim {command}: {error}")
        return 1, None, None, rank
    except OSError as error:  # after the config errors: FileNotFoundError is an OSError too
        logging.getLogger(__name__).debug("evamim %s failed", command, exc_info=True)
        print(f"evamim {command}: {describe_os_error(error, getattr(config, 'output_dir', None))}")
        return 1, None, None, rank
    return 0, config, result, rank
