"""Flags shared by the flag-based commands (``convert``, ``bench``, ``data``): one spelling and one check per
thing, so that a bad value is refused by argparse with what is valid (exit code 2), before any work.

Spellings: kebab-case; ``--device`` (cpu, cuda, cuda:N, mps); ``--precision`` for autocast (fp32, bf16,
fp16), ``--dtype`` only where a storage dtype is meant; ``--image-size``; ``--batch-size``; ``--workers``;
``--json`` for one JSON object instead of text. Nothing here imports torch until a device is checked.
"""

from __future__ import annotations

import argparse
from typing import Callable

PRECISIONS = ("fp32", "bf16", "fp16")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number

    return parse


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high]."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value!r}")
        return number

    return parse


def positive_float(value: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def device(value: str) -> str:
    """An argparse ``type``: cpu, cuda, cuda:N or mps, present on this machine."""
    import torch

    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; valid: cpu, cuda, cuda:N, mps")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value}: this machine has no CUDA device; use --device cpu")
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(f"{value}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available on this machine; use --device cpu")
    return value


def default_device() -> str:
    """cuda when this machine has a CUDA device, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--device`` (default: ``default``, else cuda when available, else cpu)."""
    default = default or default_device()
    parser.add_argument("--device", type=device, default=default, metavar="DEVICE",
                        help=f"cpu, cuda, cuda:N or mps (default {default})")


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "fp32", help_text: str = "") -> None:
    """``--precision {fp32,bf16,fp16}``: the autocast dtype (weights stay fp32); ``--dtype`` is a hidden alias."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help=help_text or f"autocast precision; weights stay fp32 (default {default})")
    add_hidden_alias(parser, "--dtype", "precision", choices=PRECISIONS)


def add_hidden_alias(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag that still works but is not shown in ``--help``; it sets ``dest`` only when
    given, so the documented flag's default stands."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
