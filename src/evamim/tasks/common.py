"""Pieces every downstream task shares: choosing the backbone, the device, and reporting results.

Each task writes ``output_dir/config.yaml`` and ``output_dir/results.json`` and ends its console output
with a short table, so that a run directory always says what was run and what came out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch


@dataclass
class BackboneSection:
    """Which pre-trained model a downstream task starts from."""

    pretrained: str | None = None
    """An evamim model directory (architecture from its config.json), or any weights file ``load_weights``
    reads (official EVA .pt, timm, open_clip) together with ``name``."""
    name: str | None = None
    """A preset (``evamim.list_models()``); needed when ``pretrained`` is not an evamim directory."""
    options: dict[str, Any] = field(default_factory=dict)
    """EvaViTConfig overrides, e.g. ``{img_size: 336, drop_path_rate: 0.1}``."""


def load_backbone(section: BackboneSection, **overrides: Any):
    """Build the EvaViT a task starts from; ``overrides`` (task-specific, e.g. num_classes) win over options."""
    from evamim.models.presets import create_model

    if section.pretrained is None and section.name is None:
        raise ValueError("backbone: set backbone.pretrained (an evamim model directory or weights file) or backbone.name")
    return create_model(section.name, pretrained=section.pretrained, **{**section.options, **overrides})


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return device


def write_results(output_dir: str | Path, config: Any, results: Mapping[str, Any]) -> Path:
    """``output_dir/config.yaml`` (the resolved config) and ``output_dir/results.json``; returns the JSON path."""
    from evamim.config import save_config

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return path


def format_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table; floats with 4 significant decimals."""
    if not rows:
        return "(no results)"
    columns = columns or list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: logits (B, classes), labels (B,) long -> {'top1': ..., 'top5': ...}.
    k larger than the number of classes counts every sample as correct."""
    if labels.numel() == 0:
        return {f"top{k}": float("nan") for k in ks}
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=-1).float().mean().item() for k in ks}


# ------------------------------------------------------------------------------------------------ the CLI
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


def run_config_command(command: str, schema: type, run_fn, args, extra_errors: tuple = ()):
    """Load ``schema`` from ``args`` and call ``run_fn(config)``; a config or missing-file error is printed as
    ``evamim COMMAND: ...`` instead of a traceback. Returns (exit code, config, result, rank)."""
    from evamim.config import ConfigError, load_config

    rank = configure_logging()
    try:
        config = load_config(schema, args.config, args.overrides)
        result = run_fn(config)
    except (ConfigError, FileNotFoundError, *extra_errors) as error:
        print(f"evamim {command}: {error}")
        return 2, None, None, rank
    return 0, config, result, rank
