"""``evamim bench pretrain``: full EVA pre-training steps -- teacher forward, student forward/backward on
block-masked inputs, clip_mim loss, AdamW -- on random images already on the device (data loading is
``evamim bench data``'s job).

MFU counts the student as 3x its forward (forward + backward) over all tokens plus the lm_head on the masked
ones, and the teacher as 1x its forward (measured with torch's FLOP counter on one image).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from evamim.bench.common import device_description, environment, interleaved_seconds_per_step, peak_tflops
from evamim.config import load_config
from evamim.flags import add_device_argument, add_hidden_alias, add_precision_argument, int_at_least, positive_float
from evamim.models.flops import forward_flops
from evamim.models.presets import list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="eva_base_p16", choices=list_models())
    parser.add_argument("--teacher", default="open_clip:ViT-L-14-quickgelu/random",
                        help="teacher spec; the tag 'random' builds the architecture without weights")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--image-size", type=int_at_least(1), default=224)
    add_hidden_alias(parser, "--img-size", "image_size", type=int_at_least(1))
    add_device_argument(parser)
    add_precision_argument(parser, default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--min-block-patches", type=int_at_least(1), default=16, help="block masking's smallest block (EVA: 16)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student's blocks")
    parser.add_argument("--rounds", type=int_at_least(1), default=5)
    parser.add_argument("--steps", type=int_at_least(1), default=3, help="steps per round")
    parser.add_argument("--warmup", type=int_at_least(0), default=2)
    parser.add_argument("--peak-tflops", type=positive_float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--json", action="store_true")


def _teacher_flops(teacher, img_size: int, device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(1, 3, img_size, img_size, device=device))
    return counter.get_total_flops()


def run(args: argparse.Namespace) -> int:
    from evamim.engine import OptimConfig, Precision, build_optimizer
    from evamim.models.vit import EvaViT
    from evamim.pretrain.objectives import get_objective
    from evamim.tasks.pretrain import PretrainConfig, build_mask_generator, build_teacher, student_config

    device = torch.device(args.device)
    config = load_config(PretrainConfig, None, [
        f"model.name={args.model}", f"model.grad_checkpointing={args.grad_checkpointing}",
        f"teacher.spec={args.teacher}", f"data.image_size={args.image_size}", "data.source=synthetic",
        f"masking.min_num_patches={args.min_block_patches}",
    ])
    grid = student_config(config, mim_head_dim=1).grid_size
    teacher = build_teacher(config, grid, device)
    student = EvaViT(student_config(config, mim_head_dim=teacher.embed_dim)).to(device).train()
    if args.compile:
        for block in student.blocks:
            block.compile()
    objective = get_objective("clip_mim")
    optimizer = build_optimizer(student, OptimConfig())
    precision = Precision(args.precision, device.type)
    masks = build_mask_generator(config, grid)(args.batch_size, np.random.default_rng(0)).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    batch = {"images": images, "masks": masks}

    def step() -> None:
        with precision.autocast():
            targets = teacher(images)
            loss = objective(student, batch, targets)["loss"]
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    seconds = interleaved_seconds_per_step({"pretrain": step}, args.rounds, args.steps, device)["pretrain"]
    throughput = args.batch_size / seconds
    masked = float(masks.sum(1).float().mean())
    student_flops = 3 * forward_flops(student.config, head_tokens=round(masked))
    teacher_flops = _teacher_flops(teacher, args.image_size, device)
    peak = peak_tflops(device, args.peak_tflops)
    peak_mem = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    report = {
        "benchmark": "pretrain",
        "model": args.model,
        "teacher": args.teacher,
        "batch_size": args.batch_size,
        "img_size": args.image_size,
        "dtype": args.precision,
        "device": device_description(device),
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "img_per_s": throughput,
        "s_per_step": seconds,
        "tflop_per_img": (student_flops + teacher_flops) / 1e12,
        "teacher_flop_fraction": teacher_flops / (student_flops + teacher_flops),
        "mean_masked_patches": masked,
        "mfu": throughput * (student_flops + teacher_flops) / (peak * 1e12) if peak else None,
        "peak_mem_gib": peak_mem,
        **environment(),
    }
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def format_report(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "- (CPU: no peak)"
    mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
    return "\n".join([
        f"{r['model']} <- {r['teacher']}, batch {r['batch_size']} at {r['img_size']}px, {r['dtype']}, {r['device']}",
        f"  {r['img_per_s']:.2f} img/s ({r['s_per_step']:.3f} s/step), {r['tflop_per_img'] * 1e3:.1f} GFLOP/img "
        f"(teacher {100 * r['teacher_flop_fraction']:.0f}%), {r['mean_masked_patches']:.1f} masked patches/img",
        f"  MFU {mfu}, peak memory {mem}  (torch {r['torch']}, commit {r['commit']})",
    ])
