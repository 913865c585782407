"""``evamim bench pretrain``: full EVA pre-training steps -- teacher forward, student forward/backward on
masked inputs, the objective's loss, gradient clipping, AdamW -- on one random batch already on the device
(data loading is ``evamim bench data``'s job).

The timed step is the one ``evamim pretrain`` runs: the student, teacher and masks come from
``evamim.tasks.pretrain`` (``build_teacher``, ``build_student``, ``build_mask_generator``), the objective is
``ObjectiveModule`` + ``get_objective``, the step function ``PretrainStep``, the optimizer the engine's
``build_optimizer``, and each step is the real ``Trainer.train_step`` (lr schedule, autocast, backward, the
clipping of ``optim.clip_grad`` = 3.0, the non-finite guard, the optimizer step, ``zero_grad``). The Trainer
is built over a one-batch list and nothing else of it runs (no logs, no checkpoints, no data loader). The
batch is what the loader hands the step: uint8 images (normalised on the device by ``PretrainStep``) and
masks, here already on the device.

``--compare naive`` times it side by side (interleaved rounds in one process) with the loop a user writes
without evamim (``evamim.bench.naive``: timm's Eva + mask token + lm_head, open_clip's CLIP, autocast,
torch's AdamW, ``clip_grad_norm_``). Before timing, both start from the same weights (evamim's student and
teacher copied into timm's and open_clip's) and must compute the same loss and gradient norm on the same
batch (``--no-check`` skips this); the differences are reported.

``--compare objectives`` times ``--objective`` (e.g. clip_mae, MAE-style at 75 % random masking) against EVA's
clip_mim with its block masks (105/256), both built as above from the same model, teacher and batch size.

MFU counts the student as 3x its forward (forward + backward) over all tokens plus the lm_head on the masked
ones (analytic, ``evamim.models.flops``; objectives whose student is not a plain EvaViT over all tokens, such
as clip_mae's encoder-decoder, are measured with torch's FLOP counter instead), and the teacher as 1x its
forward (FLOP counter, one image; the counter is made to see ``nn.MultiheadAttention``'s projections and the
CPU attention kernel, see ``_counting_flops``). evamim and the naive loop do the same work, so they share the
FLOPs per image; two objectives each have their own. Peak memory (CUDA) is measured over one step of each candidate; with ``--compare`` both candidates'
weights live on the device at once, so each one's figure is its own resident tensors plus its step's peak
above them (``process_peak_mem_gib`` is the process's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from evamim.bench.common import (
    device_description,
    environment,
    interleaved_samples,
    mfu_and_memory_cells,
    peak_tflops,
    synchronize,
)
from evamim.flags import add_device_argument, add_hidden_alias, add_precision_argument, int_at_least, positive_float
from evamim.models.flops import forward_flops
from evamim.models.presets import list_models

# Objectives whose student FLOPs are EvaViT's forward over all tokens plus the lm_head on these tokens.
_ANALYTIC_HEAD_TOKENS = {"clip_mim": "masked", "pixel_mim": "masked", "feature_distill": "all"}
# How far apart the two candidates' step-0 loss (absolute) and gradient norm (relative) may be.
_CHECK_TOLERANCE = {"fp32": (1e-5, 1e-3), "bf16": (2e-3, 5e-2), "fp16": (2e-3, 5e-2)}


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evamim.pretrain.objectives import list_objectives

    parser.add_argument("--model", default="eva_base_p16", choices=list_models())
    parser.add_argument("--teacher", default="open_clip:ViT-L-14-quickgelu/random",
                        help="teacher spec; the tag 'random' builds the architecture without weights")
    parser.add_argument("--objective", default="clip_mim", choices=list_objectives(),
                        help="evamim's pre-training objective (the naive loop is clip_mim)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--image-size", type=int_at_least(1), default=224)
    add_hidden_alias(parser, "--img-size", "image_size", type=int_at_least(1))
    add_device_argument(parser)
    add_precision_argument(parser, default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--masking", choices=["block", "random"], default=None,
                        help="masking.kind: block (BEiT/EVA) or random (MAE) (default: the objective's)")
    parser.add_argument("--mask-ratio", type=_fraction, default=None,
                        help="masking.mask_ratio (default: 105/256 for block, 0.75 for random)")
    parser.add_argument("--min-block-patches", type=int_at_least(1), default=16, help="block masking's smallest block (EVA: 16)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="for the student(s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student's blocks (both students')")
    parser.add_argument("--compare", choices=["none", "naive", "objectives"], default="none",
                        help="naive: also time the loop a user writes with timm's Eva and open_clip; objectives: "
                             "also time EVA's clip_mim with block masks (for --objective clip_mae); interleaved")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="--compare naive: skip the step-0 check that both compute the same loss")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and masks")
    parser.add_argument("--rounds", type=int_at_least(1), default=5)
    parser.add_argument("--steps", type=int_at_least(1), default=3, help="steps per round")
    parser.add_argument("--warmup", type=int_at_least(0), default=2)
    parser.add_argument("--peak-tflops", type=positive_float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--json", action="store_true")


# --------------------------------------------------------------------------------------- evamim's step
@dataclasses.dataclass
class EvamimPretrain:
    """evamim's pre-training step on one batch, built by the functions ``evamim pretrain`` uses."""

    config: Any  # PretrainConfig
    teacher: nn.Module | None
    student: nn.Module
    model: nn.Module  # ObjectiveModule(student, objective)
    step_fn: Callable  # PretrainStep
    trainer: Any  # Trainer
    batch: dict  # what the loader hands the step (uint8 images, masks, clip_mae's indices), on the device
    images: torch.Tensor  # the batch's images normalised for the student (float), for the naive loop

    def step(self) -> None:
        self.trainer.train_step(self.batch)

    @property
    def masks(self) -> torch.Tensor | None:
        return self.batch.get("masks")


def pretrain_config(args: argparse.Namespace, output_dir: str):
    """The ``PretrainConfig`` of the benchmarked run (validated like ``evamim pretrain``'s)."""
    from evamim.config import load_config
    from evamim.tasks.pretrain import PretrainConfig, validate

    overrides = [
        f"model.name={args.model}", f"model.grad_checkpointing={args.grad_checkpointing}",
        f"teacher.spec={args.teacher}", f"objective={args.objective}",
        f"data.image_size={args.image_size}", "data.source=synthetic",
        f"masking.min_num_patches={args.min_block_patches}",
        f"batch_size={args.batch_size}", f"loop.precision={args.precision}", f"output_dir={output_dir}",
        f"seed={args.seed}",
    ]
    if args.masking is not None:
        overrides.append(f"masking.kind={args.masking}")
    if args.mask_ratio is not None:
        overrides.append(f"masking.mask_ratio={args.mask_ratio}")
    config = load_config(PretrainConfig, None, overrides)
    validate(config)
    return config


def _masking_kind(config) -> str:
    from evamim.tasks.pretrain import masking_kind

    return masking_kind(config)


def build_evamim(args: argparse.Namespace, device: torch.device, output_dir: str) -> EvamimPretrain:
    """Student, teacher, masks, objective, step function, optimizer and Trainer as ``PretrainTask.build`` and
    the runner make them for one process (the data loader aside: the batch is random and on the device)."""
    from evamim.engine import Trainer, build_optimizer
    from evamim.pretrain.objectives import ObjectiveModule, get_objective
    from evamim.data.image_ops import normalize_on_device
    from evamim.tasks.pretrain import build_mask_generator, build_step, build_student, build_teacher, student_config

    config = pretrain_config(args, output_dir)
    torch.manual_seed(config.seed)
    grid = student_config(config, mim_head_dim=1).grid_size
    spec = get_objective(config.objective).spec
    objective = get_objective(config.objective, **{key: getattr(config.data, key) for key in spec.data_options})
    teacher = build_teacher(config, grid, device) if spec.needs_teacher else None
    student = build_student(config, teacher, device).train()
    generator = torch.Generator().manual_seed(config.seed)
    batch = {"images": torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                                     dtype=torch.uint8, generator=generator)}
    if spec.uses_masks:
        batch["masks"] = torch.as_tensor(
            build_mask_generator(config, grid)(args.batch_size, np.random.default_rng(config.seed)))
    step_fn = build_step(config, teacher, device)
    if step_fn.prepare is not None:
        # What the step adds to every CPU batch of the loader (clip_mae's indices), added once here; the timed
        # steps find it in the batch and add nothing.
        batch = step_fn.prepare(batch)
    batch = {key: value.to(device) for key, value in batch.items()}
    images = normalize_on_device(batch["images"], config.data.mean, config.data.std)
    model = ObjectiveModule(student, objective)
    optimizer = build_optimizer(student, config.optim)
    loop = dataclasses.replace(config.loop, total_steps=1, epochs=None, progress_bar=False, tensorboard=False)
    trainer = Trainer(model, step_fn, [batch], optimizer, optim=config.optim, loop=loop,
                      checkpoint=config.checkpoint, out_dir=output_dir)
    return EvamimPretrain(config, teacher, student, model, step_fn, trainer, batch, images)


def _compile_blocks(module: nn.Module) -> None:
    """torch.compile every transformer block (each item of a ModuleList named ``*blocks``) in place."""
    for name, child in module.named_modules():
        if name.split(".")[-1].endswith("blocks") and isinstance(child, nn.ModuleList):
            for block in child:
                block.compile()


# ---------------------------------------------------------------------------------------- the naive loop
def build_naive(evamim: EvamimPretrain, device: torch.device):
    """The naive loop (``evamim.bench.naive``) with evamim's student and teacher weights copied in."""
    from evamim.bench.naive import NaiveClipTeacher, NaiveLoop, NaiveMimStudent
    from evamim.models.export import timm_model_kwargs, to_timm_state_dict
    from evamim.teachers.open_clip import OpenClipTokens

    config = evamim.config
    if config.objective != "clip_mim":
        raise ValueError(f"--compare naive: the naive loop is EVA's clip_mim; objective {config.objective} has no "
                         f"naive counterpart here (use --objective clip_mim, or no --compare)")
    teacher = evamim.teacher
    encoder = getattr(teacher, "encoder", None)
    open_clip_vit = isinstance(encoder, OpenClipTokens) and encoder.project
    if not config.teacher.spec.startswith("open_clip:") or not open_clip_vit:
        raise ValueError(f"--compare naive: the naive teacher is an open_clip CLIP ViT (open_clip:MODEL/TAG, e.g. "
                         f"open_clip:ViT-B-16/random), not {config.teacher.spec}")
    student = evamim.student
    target = config.teacher.spec[len("open_clip:"):]
    name = target if target.startswith(("hf-hub:", "local-dir:")) else target.partition("/")[0]
    with torch.device(device):
        naive_student = NaiveMimStudent(
            {**timm_model_kwargs(student.config), "drop_path_rate": student.config.drop_path_rate},
            target_dim=student.lm_head.out_features)
    naive_teacher = NaiveClipTeacher(name, teacher.image_size, device=device, student_mean=teacher.student_mean,
                                     student_std=teacher.student_std, mean=teacher.mean, std=teacher.std)
    with torch.no_grad():
        naive_student.eva.load_state_dict(to_timm_state_dict(student))
        naive_student.mask_token.copy_(student.mask_token)
        naive_student.lm_head.load_state_dict(student.lm_head.state_dict())
        naive_teacher.visual.load_state_dict(encoder.visual.state_dict())
    naive_student.set_grad_checkpointing(config.model.grad_checkpointing)
    naive_student.train()
    optim = config.optim
    return NaiveLoop(naive_student, naive_teacher, evamim.images, evamim.masks, precision=config.loop.precision,
                     lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                     clip_grad=optim.clip_grad)


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad.float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def check_same_loss(evamim: EvamimPretrain, naive) -> dict[str, Any]:
    """Loss and gradient norm of one forward/backward of each candidate on the same weights and batch, in eval
    mode (drop path off, so both compute the same function); no optimizer step is taken."""
    results = {}
    for name, module, loss_fn in (
        ("evamim", evamim.student, lambda: _evamim_loss(evamim)),
        ("naive", naive.student, naive.loss),
    ):
        module.eval()
        try:
            loss = loss_fn()
            loss.backward()
            results[name] = (float(loss.detach()), _grad_norm(module))
        finally:
            module.zero_grad(set_to_none=True)
            module.train()
    precision = evamim.config.loop.precision
    loss_tol, grad_tol = _CHECK_TOLERANCE[precision]
    (loss_e, grad_e), (loss_n, grad_n) = results["evamim"], results["naive"]
    loss_diff = abs(loss_e - loss_n)
    grad_diff = abs(grad_e - grad_n) / max(abs(grad_e), 1e-12)
    return {
        "loss_evamim": loss_e, "loss_naive": loss_n, "loss_abs_diff": loss_diff,
        "grad_norm_evamim": grad_e, "grad_norm_naive": grad_n, "grad_norm_rel_diff": grad_diff,
        "tolerance": {"loss_abs": loss_tol, "grad_norm_rel": grad_tol},
        "passed": loss_diff <= loss_tol and grad_diff <= grad_tol,
    }


def _evamim_loss(evamim: EvamimPretrain) -> torch.Tensor:
    with evamim.trainer.precision.autocast():
        return evamim.step_fn(evamim.model, evamim.batch)["loss"]


# ------------------------------------------------------------------------------------------------ FLOPs
def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextlib.contextmanager
def _counting_flops():
    """torch's FLOP counter, made to see every matmul of a forward: the CPU attention kernel is counted like the
    GPU ones (torch's table leaves it out), and ``nn.MultiheadAttention`` (open_clip's towers) takes its
    ordinary path instead of the fused inference one that the counter cannot see into (which hides its q/k/v
    and output projections: a third of a ViT's FLOPs)."""
    mapping = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        mapping[cpu_attention] = _sdpa_forward_flops
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _teacher_flops(teacher: nn.Module | None, img_size: int, device: torch.device) -> int:
    if teacher is None:
        return 0
    with _counting_flops() as counter:
        teacher(torch.zeros(1, 3, img_size, img_size, device=device))
    return counter.get_total_flops()


def _student_forward_flops(evamim: EvamimPretrain, teacher_flops: int) -> tuple[int, str]:
    """Forward FLOPs per image of the student with the objective; and how they were counted."""
    objective = evamim.config.objective
    masks = evamim.masks
    head = _ANALYTIC_HEAD_TOKENS.get(objective)
    if head is not None and hasattr(evamim.student, "config") and hasattr(evamim.student.config, "mim_head_dim"):
        head_tokens = None if head == "all" or masks is None else round(float(masks.sum(1).float().mean()))
        return forward_flops(evamim.student.config, head_tokens=head_tokens), "analytic"
    with torch.no_grad(), _counting_flops() as counter, evamim.trainer.precision.autocast():
        evamim.step_fn(evamim.model, evamim.batch)
    per_image = counter.get_total_flops() / len(evamim.images) - teacher_flops
    return int(per_image), "flop counter"


# ----------------------------------------------------------------------------------------------- memory
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if not torch.is_tensor(tensor) or tensor.device.type != "cuda":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _resident(modules, optimizer: torch.optim.Optimizer, inputs) -> list[torch.Tensor]:
    tensors = [t for module in modules if module is not None for t in (*module.parameters(), *module.buffers())]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return tensors + [t for t in inputs if t is not None]


def _peak_memory_gib(step: Callable[[], None], device: torch.device,
                     resident: list[torch.Tensor] | None) -> tuple[float | None, float | None]:
    """Peak memory of one step (GiB): (the candidate's, the process's). With ``resident`` (the candidate's own
    weights, optimizer state and inputs, while another candidate's also live on the device), the candidate's
    is those plus the step's peak above what was allocated before it: what it would peak at alone. Without,
    both are the process's peak during the step. (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    own = peak if resident is None else _tensor_bytes(resident) + peak - before
    return own / 2**30, peak / 2**30


# -------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from evamim.config import ConfigError

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="evamim-bench-") as output_dir:
        try:
            evamim = build_evamim(args, device, output_dir)
            naive = build_naive(evamim, device) if args.compare == "naive" else None
            reference = build_reference(args, device, output_dir) if args.compare == "objectives" else None
        except (ConfigError, ValueError) as error:
            print(f"evamim bench pretrain: {error}", file=sys.stderr)
            return 2
        report = (_measure_objectives(args, device, evamim, reference) if reference is not None
                  else _measure(args, device, evamim, naive))
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_compare(report) if args.compare != "none" else format_report(report))
    return 0


def build_reference(args: argparse.Namespace, device: torch.device, output_dir: str) -> EvamimPretrain:
    """``--compare objectives``: EVA's clip_mim with its own block masks, everything else as ``args`` say."""
    if args.objective == "clip_mim":
        raise ValueError("--compare objectives times --objective against clip_mim: choose another objective "
                         "(e.g. --objective clip_mae)")
    reference = argparse.Namespace(**{**vars(args), "objective": "clip_mim", "masking": None, "mask_ratio": None})
    return build_evamim(reference, device, output_dir)


def _flops(args: argparse.Namespace, device: torch.device, evamim: EvamimPretrain) -> tuple[int, int, str]:
    """(FLOPs per image of a training step, the teacher's share, how the student's were counted)."""
    teacher_flops = _teacher_flops(evamim.teacher, args.image_size, device)
    student_forward, counted = _student_forward_flops(evamim, teacher_flops)
    return 3 * student_forward + teacher_flops, teacher_flops, counted


def _evamim_resident(evamim: EvamimPretrain) -> list[torch.Tensor]:
    return _resident((evamim.student, evamim.teacher), evamim.trainer.optimizer, evamim.batch.values())


def _measure_objectives(args: argparse.Namespace, device: torch.device, evamim: EvamimPretrain,
                        reference: EvamimPretrain) -> dict:
    """``--objective`` and clip_mim, interleaved: img/s, MFU and peak memory of each, and their ratio."""
    candidates = {args.objective: evamim, "clip_mim": reference}
    if args.compile:
        for candidate in candidates.values():
            _compile_blocks(candidate.student)
    for candidate in candidates.values():
        for _ in range(args.warmup):
            candidate.step()
    samples = interleaved_samples({name: c.step for name, c in candidates.items()}, args.rounds, args.steps, device,
                                  alternate=True)
    peak = peak_tflops(device, args.peak_tflops)
    results = {}
    for name, candidate in candidates.items():
        seconds = statistics.median(samples[name])
        flops, teacher_flops, counted = _flops(args, device, candidate)
        throughput = args.batch_size / seconds
        masks = candidate.masks
        results[name] = {
            "img_per_s": throughput, "s_per_step": seconds, "s_per_step_rounds": samples[name],
            "mfu": throughput * flops / (peak * 1e12) if peak else None,
            "tflop_per_img": flops / 1e12, "teacher_flop_fraction": teacher_flops / flops, "student_flop_count": counted,
            "masking": _masking_kind(candidate.config), "masked_fraction": float(masks.float().mean()),
            "peak_mem_gib": _peak_memory_gib(candidate.step, device, _evamim_resident(candidate))[0],
            "input_dtype": str(candidate.batch["images"].dtype).replace("torch.", ""),
        }
    first, second = samples[args.objective], samples["clip_mim"]
    return {
        "benchmark": "pretrain", "compare": "objectives", "model": args.model, "teacher": args.teacher,
        "objective": args.objective, "batch_size": args.batch_size, "img_size": args.image_size,
        "dtype": args.precision, "device": device_description(device), "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing, "results": results,
        "speedup_vs_clip_mim": results[args.objective]["img_per_s"] / results["clip_mim"]["img_per_s"],
        "speedup_vs_clip_mim_paired": statistics.median([b / a for a, b in zip(first, second)]),
        "parameters": {name: _count(c.student) for name, c in candidates.items()},
        **environment(),
    }


def _measure(args: argparse.Namespace, device: torch.device, evamim: EvamimPretrain, naive) -> dict | None:
    check = None
    if naive is not None and args.check:
        check = check_same_loss(evamim, naive)
        if not check["passed"]:
            print("evamim bench pretrain: the two loops do not compute the same thing at step 0 (so the comparison "
                  f"would not be fair): {json.dumps(check)}; --no-check times them anyway", file=sys.stderr)
            return None
    if args.compile:
        _compile_blocks(evamim.student)
        if naive is not None:
            _compile_blocks(naive.student.eva)
    steps = {"evamim": evamim.step}
    if naive is not None:
        steps["naive"] = naive.step
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    samples = interleaved_samples(steps, args.rounds, args.steps, device, alternate=True)
    seconds = {name: statistics.median(values) for name, values in samples.items()}

    teacher_flops = _teacher_flops(evamim.teacher, args.image_size, device)
    student_forward, counted = _student_forward_flops(evamim, teacher_flops)
    student_flops = 3 * student_forward
    flops = student_flops + teacher_flops
    peak = peak_tflops(device, args.peak_tflops)
    masks = evamim.masks
    masked = float(masks.sum(1).float().mean()) if masks is not None else None
    config = evamim.config
    common = {
        "benchmark": "pretrain",
        "model": args.model,
        "teacher": args.teacher if evamim.teacher is not None else None,
        "objective": config.objective,
        "batch_size": args.batch_size,
        "img_size": args.image_size,
        "dtype": args.precision,
        "device": device_description(device),
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "masking": _masking_kind(config) if masks is not None else None,
        "masked_fraction": float(masks.float().mean()) if masks is not None else None,
        "input_dtype": str(evamim.batch["images"].dtype).replace("torch.", ""),
        "tflop_per_img": flops / 1e12,
        "teacher_flop_fraction": teacher_flops / flops,
        "student_flop_count": counted,
        "mean_masked_patches": masked,
    }

    def result(name: str) -> dict:
        throughput = args.batch_size / seconds[name]
        return {
            "img_per_s": throughput,
            "s_per_step": seconds[name],
            "s_per_step_rounds": samples[name],
            "mfu": throughput * flops / (peak * 1e12) if peak else None,
        }

    if naive is None:
        single = result("evamim")
        del single["s_per_step_rounds"]
        return {**common, **single, "peak_mem_gib": _peak_memory_gib(evamim.step, device, None)[0], **environment()}
    results = {name: result(name) for name in steps}
    process_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for name, step, resident in (
        ("evamim", evamim.step, lambda: _resident((evamim.student, evamim.teacher), evamim.trainer.optimizer,
                                                  evamim.batch.values())),
        ("naive", naive.step, lambda: _resident((naive.student, naive.teacher), naive.optimizer,
                                                (naive.images, naive.masks))),
    ):
        own, process = _peak_memory_gib(step, device, resident())
        results[name]["peak_mem_gib"] = own
        process_peak = max(process_peak, process) if process is not None else None
    results["evamim"]["input_dtype"] = common.pop("input_dtype")
    results["naive"]["input_dtype"] = str(naive.images.dtype).replace("torch.", "")
    return {
        **common,
        "compare": "naive",
        "results": results,
        "speedup_vs_naive": results["evamim"]["img_per_s"] / results["naive"]["img_per_s"],
        # the same, from each round's pair: robust to the machine's speed drifting during the run
        "speedup_vs_naive_paired": statistics.median(
            [naive_s / evamim_s for evamim_s, naive_s in zip(samples["evamim"], samples["naive"])]),
        "parameters": {"evamim": _count(evamim.student), "naive": _count(naive.student)},
        "check": check,
        "process_peak_mem_gib": process_peak,
        **environment(),
    }


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_report(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "- (CPU: no peak)"
    mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
    masked = f", {r['mean_masked_patches']:.1f} masked patches/img" if r["mean_masked_patches"] is not None else ""
    return "\n".join([
        f"{r['model']} <- {r['teacher']} ({r['objective']}), batch {r['batch_size']} at {r['img_size']}px, "
        f"{r['dtype']}, {r['device']}",
        f"  {r['img_per_s']:.2f} img/s ({r['s_per_step']:.3f} s/step), {r['tflop_per_img'] * 1e3:.1f} GFLOP/img "
        f"(teacher {100 * r['teacher_flop_fraction']:.0f}%){masked}",
        f"  MFU {mfu}, peak memory {mem}  (torch {r['torch']}, commit {r['commit']})",
    ])


def format_compare(r: dict) -> str:
    if r["compare"] == "objectives":
        return format_objectives(r)
    lines = [
        f"{r['model']} <- {r['teacher']} ({r['objective']}), batch {r['batch_size']} at {r['img_size']}px, "
        f"{r['dtype']}, {r['device']} (torch {r['torch']}, commit {r['commit']})",
        f"  {r['tflop_per_img'] * 1e3:.1f} GFLOP/img (teacher {100 * r['teacher_flop_fraction']:.0f}%), "
        f"{r['mean_masked_patches']:.1f} masked patches/img, {r['parameters']['evamim']:,} student parameters",
        f"{'':8} {'img/s':>9} {'s/step':>8} {'MFU':>6} {'peak GiB':>9}  input",
    ]
    for name, x in r["results"].items():
        mfu, mem = mfu_and_memory_cells(x)
        lines.append(f"{name:8} {x['img_per_s']:9.2f} {x['s_per_step']:8.3f} {mfu:>6} {mem}  {x['input_dtype']}")
    lines.append(f"evamim / naive: {r['speedup_vs_naive']:.3f}x (median of the rounds' ratios: "
                 f"{r['speedup_vs_naive_paired']:.3f}x)")
    check = r["check"]
    if check is not None:
        lines.append(f"step-0 check: loss {check['loss_evamim']:.6f} vs {check['loss_naive']:.6f} "
                     f"(|diff| {check['loss_abs_diff']:.1e}), grad norm {check['grad_norm_evamim']:.4f} vs "
                     f"{check['grad_norm_naive']:.4f} (rel diff {check['grad_norm_rel_diff']:.1e})")
    else:
        lines.append("step-0 check: skipped (--no-check)")
    return "\n".join(lines)


def format_objectives(r: dict) -> str:
    lines = [
        f"{r['model']} <- {r['teacher']}, batch {r['batch_size']} at {r['img_size']}px, {r['dtype']}, {r['device']} "
        f"(torch {r['torch']}, commit {r['commit']})",
        f"{'':10} {'masks':>14} {'img/s':>9} {'s/step':>8} {'GFLOP/img':>10} {'MFU':>6} {'peak GiB':>9}",
    ]
    for name, x in r["results"].items():
        mfu, mem = mfu_and_memory_cells(x)
        masks = f"{x['masking']} {100 * x['masked_fraction']:.0f}%"
        lines.append(f"{name:10} {masks:>14} {x['img_per_s']:9.2f} {x['s_per_step']:8.3f} "
                     f"{x['tflop_per_img'] * 1e3:10.1f} {mfu:>6} {mem}")
    lines.append(f"{r['objective']} / clip_mim: {r['speedup_vs_clip_mim']:.3f}x (median of the rounds' ratios: "
                 f"{r['speedup_vs_clip_mim_paired']:.3f}x)")
    return "\n".join(lines)
