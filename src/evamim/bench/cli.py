"""``evamim bench <what>``: dispatch to one benchmark module, imported only when chosen."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("evamim.bench.model", "forward+backward+AdamW steps of EvaViT, side by side with timm's Eva"),
    "data": ("evamim.bench.data", "decode + augment + collate throughput, side by side with a plain pipeline"),
    "pretrain": ("evamim.bench.pretrain", "full pre-training steps: teacher + student + optimizer, with MFU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_bench_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            sub.set_defaults(_bench_missing=True)
            continue
        module.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", False):
        print(f"evamim bench {args.benchmark}: not built yet in this version of evamim", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._bench_module).run(args) or 0)
