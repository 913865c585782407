"""What every config-driven command shares: ``--config`` (a recipe name or a YAML file), ``key=value``
overrides, ``--print-config`` and ``--dry-run``, console logging, and turning a run's outcome into an exit code
and one line on stderr (exit 2: the input cannot be used; exit 1: the run failed for a known reason) instead of
a traceback."""

from __future__ import annotations

import sys
from typing import Any


class CommandFinished(SystemExit):
    """Raised once ``--print-config`` or ``--dry-run`` has printed its report: the command is complete and ran
    nothing, so the caller's summary of a run is skipped. ``evamim.cli.main`` returns its code (0), as
    ``--help`` ends a command."""


def add_config_arguments(parser, example_config: str | None = None, example_overrides: str = "") -> None:
    """The arguments every config-driven command takes: ``--config NAME|FILE``, ``key=value`` overrides,
    ``--print-config`` and ``--dry-run``.

    The command is the last word of ``parser.prog`` (``evamim pretrain``); its recipes are listed in the help.
    ``example_config`` is shown only for a command that ships no recipes."""
    from evamim import recipes

    available = recipes.names(parser.prog.split()[-1])
    if available:
        config_help = (f"a recipe by name ({', '.join(available)}; evamim list recipes) or a YAML file of "
                       f"deltas over the defaults")
    else:
        config_help = "a YAML file of deltas over the defaults" + (f", e.g. {example_config}" if example_config else "")
    parser.add_argument("--config", metavar="NAME|FILE", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set a config key" + (f", e.g. {example_overrides}" if example_overrides else ""))
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults + recipe + overrides) as YAML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and the inputs, print what the run would do, and exit")


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


def _refuse(command: str, message: str, code: int = 2) -> tuple[int, None, None, int]:
    print(f"evamim {command}: {message}", file=sys.stderr)
    return code, None, None, 0


def run_config_command(command: str, schema: type, run_fn, args, extra_errors: tuple = (), dry_run_fn=None):
    """Load ``schema`` from ``args`` and call ``run_fn(config)``. An input that cannot be used (a config, a missing
    file, weights or checkpoints that do not load: ``_refusals``) is printed on stderr as ``evamim COMMAND: ...``
    instead of a traceback (exit code 2); so is a run that failed for a known reason (``_failures``: divergence,
    too many bad samples) or an OS error while running (a full disk, a read-only or missing directory), with exit
    code 1 (``EVAMIM_LOG_LEVEL=DEBUG`` logs their tracebacks). Returns (exit code, config, result, rank).

    ``--print-config`` prints the loaded config as YAML; ``--dry-run`` prints ``dry_run_fn(config)`` (a text
    report; its refusals are handled as a run's, and a command without one refuses ``--dry-run``). Both then
    raise :class:`CommandFinished` (exit code 0) without calling ``run_fn``."""
    import logging

    from evamim import recipes
    from evamim.config import load_config, to_yaml

    print_config, dry_run = getattr(args, "print_config", False), getattr(args, "dry_run", False)
    if print_config and dry_run:
        return _refuse(command, "--print-config and --dry-run do not go together; give one of them")
    if dry_run and dry_run_fn is None:
        return _refuse(command, "--dry-run is not available for this command; "
                                "--print-config shows the resolved config without running")
    refused, failed = _refusals(), _failures()
    rank, config, report = 0, None, None
    try:
        rank = configure_logging()
        config = load_config(schema, recipes.resolve(command, args.config), args.overrides)
        if print_config:
            report = to_yaml(config).rstrip("\n")
        elif dry_run:
            report = dry_run_fn(config)
        else:
            result = run_fn(config)
    except (*refused, *extra_errors) as error:
        # A FileNotFoundError from the OS ("[Errno 2] ...: 'path'") reads better as "path: reason".
        os_error = isinstance(error, OSError) and error.errno is not None
        print(f"evamim {command}: {describe_os_error(error) if os_error else error}", file=sys.stderr)
        return 2, None, None, rank
    except failed as error:
        logging.getLogger(__name__).debug("evamim %s failed", command, exc_info=True)
        print(f"evamim {command}: {error}", file=sys.stderr)
        return 1, None, None, rank
    except OSError as error:  # after the config errors: FileNotFoundError is an OSError too
        logging.getLogger(__name__).debug("evamim %s failed", command, exc_info=True)
        print(f"evamim {command}: {describe_os_error(error, getattr(config, 'output_dir', None))}", file=sys.stderr)
        return 1, None, None, rank
    if print_config or dry_run:
        if report:
            print(report)
        raise CommandFinished(0)
    return 0, config, result, rank
