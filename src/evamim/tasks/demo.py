"""``evamim demo``: EVA pre-training end to end on CPU in a few minutes, with nothing to download.

The embedded default: a small EvaViT student learns, on procedurally drawn synthetic images, to regress at
block-masked patches the features of a frozen teacher. No CLIP weights can be assumed offline, so the
teacher is a randomly initialised ViT written as an evamim model directory and loaded through the same
``local:`` teacher path a real run uses; swap in ``teacher.spec=open_clip:ViT-L-14-quickgelu/openai`` for EVA's.
Extra ``key=value`` arguments override the demo config like ``evamim pretrain``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from evamim.config import ConfigError, load_config

DEMO_OUTPUT = "runs/demo"

# Deltas over PretrainConfig's defaults; small enough for two CPU cores (~1 s per step).
DEMO_OVERRIDES = [
    "model.name=eva_tiny_p16",
    "model.drop_path_rate=0.0",
    "model.options={patch_size: 8, depth: 6}",
    "masking.min_num_patches=4",  # an 8x8 grid is too small for EVA's 16-patch blocks
    "data.source=synthetic",
    "data.image_size=64",
    "data.synthetic_resolution=96",
    "data.synthetic_size=4096",
    "data.num_workers=1",
    "data.pin_memory=false",
    "optim.lr=1e-3",
    "optim.min_lr=1e-5",
    "optim.warmup_steps=15",
    "loop.total_steps=120",
    "loop.epochs=null",
    "loop.log_every=10",
    "checkpoint.every=60",
    "batch_size=48",
    "device=cpu",
]


def make_demo_teacher(directory: Path, seed: int = 0) -> Path:
    """A frozen random ViT (patch 8, 64 px) saved as an evamim model directory, once."""
    from evamim.models.checkpoint import save_pretrained
    from evamim.models.presets import create_model

    if (directory / "model.safetensors").exists():
        return directory
    torch.manual_seed(seed)
    teacher = create_model("eva_tiny_p16", patch_size=8, img_size=64, depth=4, global_pool="token")
    return save_pretrained(teacher, directory)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the demo config, e.g. loop.total_steps=40")


def run(args: argparse.Namespace) -> int:
    from evamim.tasks.pretrain import PretrainConfig, run_pretrain

    logging.basicConfig(level=os.environ.get("EVAMIM_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    output = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir=")), DEMO_OUTPUT)
    teacher_dir = make_demo_teacher(Path(output) / "teacher")
    overrides = DEMO_OVERRIDES + [f"output_dir={output}", f"teacher.spec=local:{teacher_dir}"] + list(args.overrides)
    try:
        config = load_config(PretrainConfig, None, overrides)
    except ConfigError as error:
        print(f"evamim demo: {error}", file=sys.stderr)
        return 2
    result = run_pretrain(config)
    print(summarize(Path(config.output_dir)))
    return 0 if result["steps"] == config.loop.total_steps else 1


def summarize(output_dir: Path) -> str:
    """The loss curve from metrics.jsonl, and where everything was written."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    lines = ["", "step   loss     lr"]
    lines += [f"{r['step']:>4}  {r['loss']:+.4f}  {r.get('lr', float('nan')):.2e}" for r in train]
    if len(train) >= 2:
        lines.append(f"loss {train[0]['loss']:+.4f} -> {train[-1]['loss']:+.4f} (negative cosine to the teacher's features)")
    lines.append(f"outputs in {output_dir}: config.yaml, metrics.jsonl, tensorboard events, checkpoints/, model/")
    return "\n".join(lines)
