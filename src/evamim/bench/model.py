"""``evamim bench model``: training steps of EvaViT, side by side with timm's Eva of the same config.

One step = forward_features on random images + a scalar loss + backward + AdamW. The two models are built
from one config (weights copied via ``to_timm_state_dict``), timed in alternating rounds in one process,
and reported as img/s, the ratio, and on GPUs MFU (3 x forward FLOPs per image) and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from evamim.bench.common import (
    DTYPES,
    device_description,
    environment,
    interleaved_seconds_per_step,
    mfu_and_memory_cells,
    peak_tflops,
)
from evamim.flags import add_device_argument, add_hidden_alias, add_precision_argument, int_at_least, positive_float
from evamim.models.checkpoint import timm_model_kwargs, to_timm_state_dict
from evamim.models.flops import forward_flops
from evamim.models.presets import list_models, model_config
from evamim.models.vit import EvaViT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="eva_small_p16", choices=list_models())
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--image-size", type=int_at_least(1), default=None, help="default: the preset's (224)")
    add_hidden_alias(parser, "--img-size", "image_size", type=int_at_least(1))
    add_device_argument(parser)
    add_precision_argument(parser, default="fp32")
    parser.add_argument("--compare", choices=["timm", "none"], default="timm")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--rounds", type=int_at_least(1), default=5)
    parser.add_argument("--steps", type=int_at_least(1), default=3, help="steps per round")
    parser.add_argument("--warmup", type=int_at_least(0), default=2)
    parser.add_argument("--peak-tflops", type=positive_float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, dtype: torch.dtype):
    autocast = (
        torch.autocast(images.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = model.forward_features(images).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05, **fused)


def _peak_memory_gib(step, device: torch.device, steps: int) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def build_candidates(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    overrides = {"img_size": args.image_size} if args.image_size else {}
    config = model_config(args.model, grad_checkpointing=args.grad_checkpointing, **overrides)
    models = {"evamim": EvaViT(config).to(device)}
    if args.compare == "timm":
        from timm.models.eva import Eva

        reference = Eva(**timm_model_kwargs(config))
        reference.load_state_dict(to_timm_state_dict(models["evamim"]))
        reference.set_grad_checkpointing(args.grad_checkpointing)
        models["timm"] = reference.to(device)
    return models


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    models = build_candidates(args, device)
    config = models["evamim"].config
    images = torch.randn(args.batch_size, 3, *config.img_size, device=device)
    steps = {}
    for name, model in models.items():
        model.train()
        if args.compile:
            model = torch.compile(model)
        steps[name] = _train_step(model, _optimizer(model, device), images, dtype)
        for _ in range(args.warmup):
            steps[name]()
    seconds = interleaved_seconds_per_step(steps, args.rounds, args.steps, device)
    flops_per_image = 3 * forward_flops(config)  # forward + backward (2x)
    peak = peak_tflops(device, args.peak_tflops)
    results = {}
    for name, per_step in seconds.items():
        throughput = args.batch_size / per_step
        results[name] = {
            "img_per_s": throughput,
            "s_per_step": per_step,
            "mfu": throughput * flops_per_image / (peak * 1e12) if peak else None,
            "peak_mem_gib": _peak_memory_gib(steps[name], device, 1),
        }
    report = {
        "benchmark": "model",
        "model": args.model,
        "batch_size": args.batch_size,
        "img_size": list(config.img_size),
        "dtype": args.precision,
        "device": device_description(device),
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "train_gflops_per_img": flops_per_image / 1e9,
        "results": results,
        **environment(),
    }
    if "timm" in results:
        report["speedup_vs_timm"] = results["evamim"]["img_per_s"] / results["timm"]["img_per_s"]
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [
        f"{report['model']} batch {report['batch_size']} at {report['img_size'][0]}px, {report['dtype']}, "
        f"{report['device']} (torch {report['torch']}, commit {report['commit']})",
        f"{'':8} {'img/s':>9} {'s/step':>8} {'MFU':>6} {'peak GiB':>9}",
    ]
    for name, r in report["results"].items():
        mfu, mem = mfu_and_memory_cells(r)
        lines.append(f"{name:8} {r['img_per_s']:9.2f} {r['s_per_step']:8.3f} {mfu:>6} {mem}")
    if "speedup_vs_timm" in report:
        lines.append(f"evamim / timm: {report['speedup_vs_timm']:.3f}x")
    return "\n".join(lines)
