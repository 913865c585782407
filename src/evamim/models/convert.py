"""``evamim convert SRC DST``: any supported checkpoint -> an evamim model directory, or timm / open_clip weights.

The architecture comes from ``--model`` (a preset), else from the config the source carries (evamim
directories, .safetensors with evamim metadata, evamim training checkpoints), else it is read off the weights
(docs/models.md, "Conversion guide"); a fact the weights cannot show is refused with the flag that supplies it.
``--set key=value`` overrides any EvaViTConfig field, e.g. ``--set img_size=336`` to resample positions.

Loading is strict: every backbone tensor must match (task heads ``head``, ``lm_head``, ``mask_token`` may be
new or dropped, and are reported); otherwise nothing is written and the exit code is 2. ``--non-strict``
writes what matched and leaves the rest at initialisation, saying so in one line.

``--to``: ``evamim`` (DST/model.safetensors + config.json), ``timm`` (DST/model.safetensors for
``timm.models.eva.Eva(**kwargs)`` + DST/timm_kwargs.json), ``open_clip`` (the same trunk under
``visual.trunk.``, as open_clip's EVA towers hold it, + DST/timm_kwargs.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from evamim import atomic
from evamim.flags import int_at_least
from evamim.models.checkpoint import load_weights, save_pretrained
from evamim.models.export import TIMM_KWARGS_NAME, timm_model_kwargs, to_open_clip_state_dict, to_timm_state_dict
from evamim.models.infer import infer_architecture
from evamim.models.presets import list_models, model_config
from evamim.models.sources import (
    WEIGHTS_NAME,
    CorruptCheckpointError,
    SourceWeights,
    UnsafeCheckpointError,
    read_source,
)
from evamim.models.vit import EvaViT, EvaViTConfig

FORMATS = ("evamim", "timm", "open_clip")


def parse_overrides(items: list[str]) -> dict:
    """['img_size=336', 'num_classes=0'] -> {'img_size': 336, 'num_classes': 0} (values parsed as YAML).
    Raises ValueError for an item that is not key=value or whose value is not YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, e.g. --set img_size=336; got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
        overrides[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="checkpoint: official EVA .pt, timm/open_clip state dict, "
                                                         ".safetensors, evamim dir or training checkpoint")
    parser.add_argument("destination", metavar="OUTPUT", help="output directory")
    parser.add_argument("--model", choices=list_models(), help="preset to build; default: the source's config, "
                                                               "else inferred from the weights")
    parser.add_argument("--num-heads", type=int_at_least(1), help="heads, when the weights cannot show them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set an EvaViTConfig field (repeatable), e.g. use_rope=true, rope_ref_grid=[16,16]")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights (model_ema / state_dict_ema); "
                                                           "default: 'model', as the official EVA code does")
    parser.add_argument("--non-strict", action="store_true",
                        help="write even when backbone tensors do not match (they stay at initialisation)")
    parser.add_argument("--to", choices=FORMATS, default="evamim", help="output format (default: evamim)")
    parser.add_argument("--qkv", choices=("fused", "separate"),
                        help="timm / open_clip: one qkv projection or q/k/v_proj (default: timm's layout for "
                             "the architecture: separate for EVA-02 with sub-LN, fused otherwise)")
    parser.add_argument("--allow-resize-difference", action="store_true",
                        help="timm / open_clip: export a dynamic-size model although timm resamples pos_embed "
                             "with antialiasing and this model does not")
    # Kept so that older scripts still run: strict and 'model' over 'model_ema' are the defaults now.
    parser.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-ema", action="store_true", help=argparse.SUPPRESS)


def resolve_config(source: SourceWeights, args: argparse.Namespace, overrides: dict) -> tuple[EvaViTConfig, list[str]]:
    """The architecture to build and how it was decided: --model, the source's own config, or inference."""
    if args.model:
        values = dict(overrides, **({"num_heads": args.num_heads} if args.num_heads else {}))
        return model_config(args.model, **values), [f"architecture: the preset {args.model}"]
    inference = infer_architecture(source.state, num_heads=args.num_heads, source_config=source.config,
                                   source_origin=source.config_origin or "the file's config", given=overrides)
    notes = [f"architecture: from {source.config_origin}"] if source.config else []
    return EvaViTConfig.from_dict({**inference.config.to_dict(), **overrides}), notes + inference.notes


def export_kwargs(config: EvaViTConfig, args: argparse.Namespace) -> dict | None:
    """timm's kwargs for --to timm / open_clip, checked before any weights are read (None for evamim)."""
    if args.to == "evamim":
        return None
    qkv_fused = None if args.qkv is None else args.qkv == "fused"
    return timm_model_kwargs(config, qkv_fused=qkv_fused, allow_resize_difference=args.allow_resize_difference)


def write_output(model: EvaViT, destination: str, to: str, kwargs: dict | None) -> list[str]:
    """Write DST in the chosen format; returns the lines to print."""
    if to == "evamim":
        directory = save_pretrained(model, destination)
        return [f"wrote {directory} ({sum(p.numel() for p in model.parameters()):,} parameters)"]
    from safetensors.torch import save_file

    from evamim import __version__

    export = to_timm_state_dict if to == "timm" else to_open_clip_state_dict
    state = {k: v.contiguous() for k, v in export(model, qkv_fused=kwargs["qkv_fused"]).items()}
    directory = Path(destination)
    directory.mkdir(parents=True, exist_ok=True)
    # No "config" entry in the metadata: that marks evamim's own files.
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "exported_by": f"evamim {__version__}",
                                                               "layout": to})
    atomic.write_json(directory / TIMM_KWARGS_NAME, kwargs)
    lines = [f"wrote {directory / WEIGHTS_NAME} ({to} layout, {len(state)} tensors) and {directory / TIMM_KWARGS_NAME}"]
    left_out = [name for name in ("mask_token", "lm_head.weight", "lm_head.bias") if name in model.state_dict()]
    if left_out:
        lines.append(f"not exported (timm's Eva has no MIM head): {', '.join(left_out)}")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_overrides(args.overrides)
        source = read_source(args.source, prefer_ema=args.ema)
        config, notes = resolve_config(source, args, overrides)
        kwargs = export_kwargs(config, args)
        model = EvaViT(config)
        report = load_weights(model, source, strict=not args.non_strict)
    except (ValueError, FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError) as error:
        print(f"evamim convert: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    print(report)
    try:
        lines = write_output(model, args.destination, args.to, kwargs)
    except OSError as error:  # a read-only or full destination
        where = error.filename or args.destination
        print(f"evamim convert: {where}: {error.strerror or error}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
