"""``evamim convert SRC DST``: any supported checkpoint -> an evamim model directory.

The architecture comes from ``--model`` (a preset) or is read off the weights (width, depth, patch size,
resolution, MLP type, heads from the matching preset or ``--num-heads``). ``--set key=value`` overrides
any EvaViTConfig field, e.g. ``--set img_size=336`` to resample positions for a new resolution.
"""

from __future__ import annotations

import argparse

import yaml

from evamim.models.checkpoint import infer_config, load_weights, read_state_dict, save_pretrained, unwrap_container
from evamim.models.presets import list_models, model_config
from evamim.models.vit import EvaViT, EvaViTConfig


def parse_overrides(items: list[str]) -> dict:
    """['img_size=336', 'num_classes=0'] -> {'img_size': 336, 'num_classes': 0} (values parsed as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"evamim convert: --set expects key=value, got {item!r}")
        parsed = yaml.safe_load(value)
        overrides[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint: official EVA .pt, timm/open_clip state dict, .safetensors, or evamim dir")
    parser.add_argument("destination", help="output directory (model.safetensors + config.json)")
    parser.add_argument("--model", choices=list_models(), help="preset to build; default: infer from the weights")
    parser.add_argument("--num-heads", type=int, help="heads, when inferring a size that matches no preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an EvaViTConfig field (repeatable)")
    parser.add_argument("--no-ema", action="store_true", help="take 'model' over 'model_ema' when a file has both")
    parser.add_argument("--strict", action="store_true", help="fail unless every key matches exactly")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    checkpoint = read_state_dict(args.source)
    state, container_key = unwrap_container(checkpoint, prefer_ema=not args.no_ema)
    if args.model:
        config = model_config(args.model, **overrides)
    else:
        inferred = infer_config(state, num_heads=args.num_heads)
        config = EvaViTConfig.from_dict({**inferred.to_dict(), **overrides})
    model = EvaViT(config)
    report = load_weights(model, {container_key or "state_dict": state}, strict=args.strict)
    print(report)
    directory = save_pretrained(model, args.destination)
    print(f"wrote {directory} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
