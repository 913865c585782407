"""evamim: EVA-style masked image modeling. Usage: evamim COMMAND [args]; evamim COMMAND --help.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when chosen, so ``evamim --help`` and light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from evamim.tasks.command import CommandFinished

# name -> (module, one-line help). The module is imported only when its command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("evamim.tasks.pretrain", "EVA pre-training: regress frozen CLIP features at masked patches"),
    "convert": ("evamim.models.convert", "convert official EVA / timm / open_clip / evamim weights (to evamim, timm or open_clip)"),
    "data": ("evamim.data.cli", "prepare and inspect datasets (make-shards, make-instances, inspect)"),
    "bench": ("evamim.bench.cli", "measure throughput, MFU and memory (model, data, pretrain)"),
    "demo": ("evamim.demo.command", "EVA end to end on built-in synthetic scenes, on CPU, with a report (teacher CLIP, students, probes, EVA-CLIP, detection)"),
    "knn": ("evamim.tasks.knn", "k-nearest-neighbour classification of frozen features (DINO protocol)"),
    "linprobe": ("evamim.tasks.linear_probe", "linear probe on frozen features, a grid of learning rates at once"),
    "finetune": ("evamim.tasks.finetune", "full fine-tuning with layer decay, mixup/cutmix and EMA"),
    "segment": ("evamim.tasks.segmentation", "semantic segmentation (ADE20K layout): linear or UPerNet head"),
    "detect": ("evamim.tasks.detection", "detection and instance segmentation (COCO format): ViTDet-style Mask R-CNN"),
    "embed": ("evamim.tasks.embed", "extract embeddings of a folder, list or shards to .npy/.safetensors"),
    "clip": ("evamim.tasks.clip", "EVA-CLIP: contrastive image-text training with zero-shot evaluation"),
    "list": ("evamim.tasks.listing", "list models, teachers, objectives or recipes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evamim", description=__doc__.splitlines()[0])
    from evamim import __version__

    parser.add_argument("--version", action="version", version=f"evamim {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        # Let argparse print help, or its "invalid choice" error listing the commands.
        parser.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            print(f"evamim {name}: not built yet in this version of evamim", file=sys.stderr)
            return 2
        raise
    command_parser = argparse.ArgumentParser(prog=f"evamim {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    try:
        code = int(module.run(args) or 0)
    except CommandFinished as done:  # --print-config / --dry-run printed their report
        code = done.code if isinstance(done.code, int) else 0
    except BaseException as error:
        if not _in_process_group():
            raise
        if not isinstance(error, SystemExit):
            import traceback

            traceback.print_exception(error)
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        _end_process_now(code)
    if _in_process_group():  # a run that reported its own error without leaving its process group
        _end_process_now(code)
    return code


def _in_process_group() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: no group (and no import cost for light commands)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_process_now(code: int) -> None:
    """End a process that is still in its process group (a multi-process run that failed) now, not by
    interpreter shutdown.

    Its group cannot be released: peers may be waiting in a collective, and the error's traceback keeps the
    wrapped model alive. An interpreter shutdown with the group's gloo threads still running can abort the
    process (SIGABRT) instead of exiting with its error, so logs and streams are flushed and it exits at once.
    """
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
