"""Every training task on the runner: two gloo processes against one process with the whole batch.

Same losses, same weights, same validation metrics (summed over processes on a validation set whose size is
not a multiple of the world size: no image counted twice or dropped), and a two-process run killed halfway
resumes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distributed_fixtures import WORLD, OneThread, exported_weights, gloo_group, losses, max_difference
from evamim.config import load_config
from evamim.tasks.finetune import FinetuneConfig, run_finetune
from evamim.tasks.segmentation import SegmentConfig, run_segmentation
from test_finetune import tiny_overrides as finetune_overrides
from test_pretrain import CrashAtStep
from test_segmentation import tiny_overrides as segment_overrides
from test_segmentation import write_ade20k

GLOBAL_BATCH = 8
STEPS = 4
TOLERANCE = 1e-6
# BatchNorm divides by per-channel deviations of a few hundred pixels: float32 rounding of the two processes'
# sums (another order than one process's) grows to a few 1e-6 in the losses over four steps, a few 1e-5 in the
# running statistics of the pyramid pooling's 1x1 stage (four values per channel and step).
SEGMENT_TOLERANCE = 2e-5


def finetune_config(output_dir: Path, world: int, *extra: str) -> FinetuneConfig:
    """The tiny fine-tune of test_finetune, deterministic across process counts: the ranks' batches together are
    the one-process batch (per-sample augmentation draws), no mixup (it pairs images within a process's batch),
    no drop path (its draws differ per process); 63 validation images: not a multiple of 2."""
    overrides = finetune_overrides(output_dir, STEPS, *extra) + [
        f"batch_size={GLOBAL_BATCH // world}",
        "model.drop_path_rate=0.0",
        "data.synthetic_size=63",
        "eval.batch_size=31",  # 32 + 31 images: 2 batches on one process, 1 on the other (FSDP replays one)
        "loop.eval_every=2",
        "checkpoint.every=2",
    ]
    return load_config(FinetuneConfig, None, overrides)


def _finetune_worker(rank: int, tmp: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        run_finetune(finetune_config(Path(tmp) / "ddp", WORLD))
        run_finetune(finetune_config(Path(tmp) / "fsdp", WORLD, "distributed.strategy=fsdp"))
        killed = finetune_config(Path(tmp) / "killed", WORLD)
        try:
            run_finetune(killed, hooks=(CrashAtStep(3),))  # after the checkpoint at step 2
        except KeyboardInterrupt:
            pass
        run_finetune(killed)  # the same command again: resumes from step 2


def summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "summary.json").read_text())


@pytest.mark.slow  # one process, then three two-process runs: ~30 s on 2 cores
def test_finetune_on_two_processes_matches_one_process_and_resumes_exactly(tmp_path):
    with OneThread():
        run_finetune(finetune_config(tmp_path / "one", 1))
    mp.spawn(_finetune_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    reference = losses(tmp_path / "one")
    assert len(reference) == STEPS
    for run in ("ddp", "fsdp", "killed"):
        assert losses(tmp_path / run) == pytest.approx(reference, abs=TOLERANCE), run
        assert max_difference(exported_weights(tmp_path / run), exported_weights(tmp_path / "one")) < TOLERANCE, run
        # Validation: the sums of both processes, over all 63 images, equal one process's.
        ours, theirs = summary(tmp_path / run)["validation"], summary(tmp_path / "one")["validation"]
        assert ours.keys() == theirs.keys() and "ema_top1" in ours
        assert ours == pytest.approx(theirs, abs=1e-4), run
    assert summary(tmp_path / "ddp")["processes"] == 2 and summary(tmp_path / "fsdp")["strategy"] == "fsdp"
    # The killed run really stopped and resumed (its log restarts at the checkpoint's step).
    assert (tmp_path / "killed" / "checkpoints").is_dir()


# ------------------------------------------------------------------------------------------- segmentation
def segment_config(root: Path, output_dir: Path, world: int) -> SegmentConfig:
    """The tiny UPerNet run of test_segmentation (BatchNorm in the head: it must normalise over the global
    batch), 5 validation images, no dropout or drop path (their draws differ per process).

    SGD rather than AdamW: the biases of the pyramid's transposed convolutions feed BatchNorm (through the
    UPerNet laterals), which removes them, so their true gradient is 0; AdamW would normalise the rounding noise
    that reaches them into full-size steps, which no two summation orders share."""
    overrides = segment_overrides(root, output_dir, "upernet", STEPS) + [
        f"batch_size={4 // world}", "model.drop_path_rate=0.0", "head.dropout=0.0", "loop.eval_every=2",
        "checkpoint.every=2", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]
    return load_config(SegmentConfig, None, overrides)


def _segment_worker(rank: int, tmp: str) -> None:
    with gloo_group(rank, f"{tmp}/rendezvous"):
        run_segmentation(segment_config(Path(tmp) / "ade", Path(tmp) / "ddp", WORLD))


@pytest.mark.slow  # ~15 s on 2 cores
def test_segmentation_on_two_processes_matches_one_process(tmp_path):
    write_ade20k(tmp_path / "ade", train=8, val=5)
    with OneThread():
        run_segmentation(segment_config(tmp_path / "ade", tmp_path / "one", 1))
    mp.spawn(_segment_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    reference = losses(tmp_path / "one")
    assert len(reference) == STEPS
    assert losses(tmp_path / "ddp") == pytest.approx(reference, abs=SEGMENT_TOLERANCE)
    ours, theirs = summary(tmp_path / "ddp"), summary(tmp_path / "one")
    for key in ("mIoU", "mAcc", "aAcc"):  # the confusion matrices of both processes, added up
        # (a pixel whose two best classes are within rounding of each other may flip: ~0.02 points here)
        assert ours[key] == pytest.approx(theirs[key], abs=0.1), key
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / run / "model" / "segmenter.safetensors")) for run in ("ddp", "one"))
    worst = max(a, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
    assert max_difference(a, b) < 5 * SEGMENT_TOLERANCE, worst  # running statistics too: the same on every process


# ------------------------------------------------------------------------------------------------- CLIP
def clip_config(output_dir: Path, world: int, *extra: str):
    """The tiny CLIP of test_clip_train; the contrastive loss compares each image with all 16 captions."""
    from evamim.tasks.clip import ClipTrainConfig
    from test_clip_train import tiny_overrides as clip_overrides

    overrides = clip_overrides(output_dir, STEPS, f"batch_size={16 // world}", "loop.eval_every=2",
                               "checkpoint.every=2", *extra)
    return load_config(ClipTrainConfig, None, overrides)


def _clip_worker(rank: int, tmp: str) -> None:
    from evamim.tasks.clip import run_clip

    with gloo_group(rank, f"{tmp}/rendezvous"):
        run_clip(clip_config(Path(tmp) / "ddp", WORLD))
        run_clip(clip_config(Path(tmp) / "fsdp", WORLD, "distributed.strategy=fsdp"))


@pytest.mark.slow  # ~15 s on 2 cores
def test_clip_on_two_processes_with_gathered_features_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from evamim.tasks.clip import run_clip

    with OneThread():
        run_clip(clip_config(tmp_path / "one", 1))
    mp.spawn(_clip_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    reference = losses(tmp_path / "one")
    assert len(reference) == STEPS
    assert losses(tmp_path / "ddp") == pytest.approx(reference, abs=TOLERANCE)
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("ddp", "one"))
    # AdamW turns the summation-order rounding of near-zero gradients into small steps: ~1e-6 after 4 steps.
    assert max_difference(a, b) < 5 * TOLERANCE
    ours, theirs = summary(tmp_path / "ddp")["validation"], summary(tmp_path / "one")["validation"]
    assert ours == pytest.approx(theirs, abs=1e-4)
    # FSDP: the towers sharded block by block, the 0-d logit scale replicated; zero-shot encodes through forward.
    assert losses(tmp_path / "fsdp") == pytest.approx(reference, abs=TOLERANCE)
    c = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    assert c.keys() == b.keys() and max_difference(c, b) < 5 * TOLERANCE
    assert summary(tmp_path / "fsdp")["validation"] == pytest.approx(theirs, abs=1e-4)


# -------------------------------------------------------------------------------------------- detection
def detect_config(root: Path, output_dir: Path, world: int):
    """The tiny detector of test_detection. Its losses cannot match across process counts (the RPN and RoI heads
    sample anchors and proposals with each process's own random draws); what must match is the evaluation."""
    from evamim.tasks.detection import DetectConfig
    from test_detection import tiny_overrides as detect_overrides

    overrides = detect_overrides(root, output_dir, STEPS) + [
        f"batch_size={8 // world}", "head.score_threshold=0.0", "checkpoint.every=2", "loop.eval_every=2"]
    return load_config(DetectConfig, None, overrides)


def _detection_scores(model_dir: Path, config, rank: int, world: int) -> dict:
    """The COCO metrics of an exported detector, each process scoring its share of the validation images (one
    image per forward: the same arithmetic for each image whatever its neighbours), gathered by the runner."""
    import torch

    from evamim.data.detection import CocoAnnotations, build_det_loader
    from evamim.models.detector import load_detector
    from evamim.tasks.det_metrics import DetectionEvaluation
    from evamim.tasks.runner import _AllReducedEvaluation

    annotations = CocoAnnotations(config.val_data.annotations)
    loader = build_det_loader(config.data, "eval", 1, images=config.val_data.images, annotations=annotations,
                              rank=rank, world_size=world)
    detector = load_detector(model_dir)[0].eval()
    evaluation = _AllReducedEvaluation(DetectionEvaluation(loader, torch.device("cpu"), annotations),
                                       torch.device("cpu"))
    with torch.no_grad():
        return evaluation(detector)


def _detect_worker(rank: int, tmp: str) -> None:
    from evamim.tasks.detection import run_detection

    with gloo_group(rank, f"{tmp}/rendezvous"):
        config = detect_config(Path(tmp) / "inst", Path(tmp) / "ddp", WORLD)
        run_detection(config)  # DDP: no parameter left without a gradient, the gathered evaluation inside
        scores = _detection_scores(Path(tmp) / "one" / "model", config, rank, WORLD)
        if rank == 0:
            (Path(tmp) / "two_process_scores.json").write_text(json.dumps(scores))


@pytest.mark.slow  # ~40 s on 2 cores
def test_detection_on_two_processes_trains_and_scores_as_one_process(tmp_path):
    """COCOeval of 9 validation images split 5 / 4 over two processes equals one process's, to the last digit."""
    from test_detection import write_dataset

    write_dataset(tmp_path / "inst", train=16, val=9)
    with OneThread():
        config = detect_config(tmp_path / "inst", tmp_path / "one", 1)
        from evamim.tasks.detection import run_detection

        run_detection(config)
        one_process = _detection_scores(tmp_path / "one" / "model", config, 0, 1)
    mp.spawn(_detect_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    two_processes = json.loads((tmp_path / "two_process_scores.json").read_text())
    assert one_process["detections"] == 9 * 100  # score threshold 0: every image keeps 100 detections
    assert two_processes == one_process
    trained = summary(tmp_path / "ddp")
    assert trained["processes"] == 2 and trained["steps"] == STEPS and "bbox_AP" in trained["validation"]
