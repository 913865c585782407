"""``evamim bench data``: decode + augment + collate throughput, side by side with a plain pipeline.

Pipelines (same images, same batch size, same DataLoader settings, same crop recipe):
- ``ours``: evamim's pre-training loader as ``evamim pretrain`` builds it (JPEG draft decode,
  crop-then-resize in one PIL pass, per-sample seeded crops, bad-sample handling, collate with masks
  off), delivering uint8 crops (``output="uint8"``): the normalisation runs on the accelerator in the
  training step (``normalize_on_device``) and is not part of this measurement.
- ``ours-float``: the same loader delivering normalised float32 (``output="float"``, fused
  normalisation in the workers): what it delivered before, and what the other tasks still get.
- ``ours-nodraft``: ``ours`` with ``jpeg_draft=False``, to show what the draft alone buys.
- ``baseline``: ``Image.open(path).convert("RGB")`` + torchvision ``RandomResizedCrop`` (same
  scale, ratio and bicubic filter) + flip + ``ToTensor`` + ``Normalize``, ``default_collate``: the
  pipeline as a user would write it, float32 out.
- ``gpu-decode`` (measurement only, needs CUDA): the file bytes are read in the workers and decoded
  in the main process on the GPU with ``torchvision.io.decode_jpeg(device="cuda")``, then cropped,
  resized (bicubic, antialiased) and flipped there; uint8 crops on the GPU. Its pixels are not
  torchvision's PIL-based ``resized_crop``: it is for sizing what GPU decoding could buy.

Runs alternate between pipelines (the order flips every repeat) and the median is reported, so a
slow spell on a shared machine hits every pipeline alike. A run is timed from creating the
DataLoader iterator to its last batch: worker start-up is included, which slightly penalises both.

``--make-images DIR`` writes benchmark JPEGs made from the photos shipped with scikit-image and
scikit-learn: resized, cropped and lightly grained so that file sizes resemble real photos.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from evamim.flags import int_at_least, int_in_range

PIPELINES = ("ours", "ours-float", "ours-nodraft", "baseline", "gpu-decode")


class PipelineError(ValueError):
    """A pipeline that cannot be measured here (unknown, or gpu-decode without a usable CUDA decoder)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="folder of images to load (e.g. made with --make-images)")
    parser.add_argument("--workers", type=int_at_least(0), nargs="+", default=[1, 2],
                        help="DataLoader worker counts to measure (default 1 2)")
    parser.add_argument("--batches", type=int_at_least(1), default=20, help="batches per timed run (default 20)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per batch (default 32)")
    parser.add_argument("--image-size", type=int_at_least(1), default=224, help="output crop side (default 224)")
    parser.add_argument("--repeats", type=int_at_least(1), default=3,
                        help="alternating runs per pipeline (median reported; default 3)")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=["ours", "ours-float", "baseline"],
                        help="what to compare (default ours ours-float baseline; gpu-decode needs CUDA)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--make-images", metavar="DIR", help="write benchmark JPEGs into DIR and exit")
    parser.add_argument("--count", type=int_at_least(1), default=256, help="with --make-images: number of images (default 256)")
    parser.add_argument(
        "--size", default="500x375", help="with --make-images: WIDTHxHEIGHT (500x375 ImageNet-like, 1600x1200 web-photo-like)"
    )
    parser.add_argument("--quality", type=int_in_range(1, 100), default=90, help="with --make-images: JPEG quality (default 90)")
    parser.add_argument("--grain", type=float, default=3.0, help="with --make-images: grain (pixel noise std) added (default 3)")


def run(args: argparse.Namespace) -> int:
    if args.make_images:
        width, height = _parse_size(args.size)
        paths = make_benchmark_images(
            args.make_images, count=args.count, size=(width, height), quality=args.quality, grain=args.grain
        )
        sizes = [os.path.getsize(p) for p in paths]
        print(f"wrote {len(paths)} JPEGs of {width}x{height} into {args.make_images} (mean {np.mean(sizes) / 1024:.0f} KiB)")
        return 0
    if not args.source:
        print("evamim bench data: pass --source DIR (or --make-images DIR to create benchmark images)")
        return 2
    try:
        result = benchmark(
            args.source,
            workers=args.workers,
            batches=args.batches,
            batch_size=args.batch_size,
            image_size=args.image_size,
            repeats=args.repeats,
            pipelines=args.pipelines,
        )
    except PipelineError as error:  # e.g. gpu-decode without CUDA, found before anything is timed
        print(f"evamim bench data: {error}")
        return 2
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must read WIDTHxHEIGHT, e.g. 1600x1200; got {text!r}") from None
    return width, height


# ------------------------------------------------------------------------------------ images


def _base_photos() -> list[np.ndarray]:
    import evamim  # noqa: F401  (torchvision guard before skimage)
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    photos.extend(load_sample_images().images)
    return [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]


def make_benchmark_images(
    directory: str | os.PathLike,
    *,
    count: int = 256,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    grain: float = 3.0,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` distinct JPEGs of ``size`` (width, height) made from the offline sample photos.

    Each is a random crop of one photo at the target aspect ratio, resized, colour-shifted,
    possibly mirrored, with grain (pixel noise of std ``grain``): resized photos alone are smoother
    than camera images and would compress (and decode) unrealistically well. ``quality=95,
    grain=5`` at 500x375 gives about 90 KiB per file (ImageNet's average is about 110 KB);
    ``quality=90, grain=3`` at 1600x1200 about 310 KiB, typical of web photos.
    """
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _base_photos()
    width, height = size
    paths = []
    for number in range(count):
        photo = photos[number % len(photos)]
        ph, pw = photo.shape[:2]
        aspect = width / height
        crop_w = int(min(pw, ph * aspect) * rng.uniform(0.6, 1.0))
        crop_h = int(crop_w / aspect)
        left, top = int(rng.integers(0, pw - crop_w + 1)), int(rng.integers(0, ph - crop_h + 1))
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.85, 1.15, size=3)
        pixels += rng.normal(0, grain, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = directory / f"bench_{width}x{height}_{number:05d}.jpg"
        image.save(path, quality=quality)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ pipelines


class _BaselineDataset:
    """The plain pipeline: PIL open + convert, torchvision transforms, nothing else."""

    def __init__(self, paths: list[str], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def _baseline_loader(paths: list[str], workers: int, batch_size: int, image_size: int):
    import evamim  # noqa: F401
    import torch
    from torchvision import transforms

    from evamim.data.config import CLIP_MEAN, CLIP_STD

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                image_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return torch.utils.data.DataLoader(
        _BaselineDataset(paths, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )


def _ours_loader(list_file: str, workers: int, batch_size: int, image_size: int, draft: bool, output: str):
    from evamim.data.config import DataConfig
    from evamim.data.loader import build_loader

    cfg = DataConfig(
        source="list",
        path=list_file,
        image_size=image_size,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=False,
        jpeg_draft=draft,
    )
    return build_loader(cfg, batch_size=batch_size, rank=0, world_size=1, output=output)


# ------------------------------------------------------------------------------------ GPU decoding


def gpu_decode_problem() -> str | None:
    """Why ``gpu-decode`` cannot run here (one line), or None when it can."""
    import evamim  # noqa: F401  (torchvision guard)
    import torch

    if not torch.cuda.is_available():
        return "a CUDA GPU (torch.cuda.is_available() is False here)"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        decode_jpeg([_tiny_jpeg()], mode=ImageReadMode.RGB, device="cuda")  # the call the pipeline makes
    except Exception as error:  # noqa: BLE001  (any failure means: not usable here)
        return f"torchvision.io.decode_jpeg on CUDA, which failed: {type(error).__name__}: {error}".splitlines()[0]
    return None


def _tiny_jpeg():
    import io

    import torch
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


class _BytesDataset:
    """The workers' share of ``gpu-decode``: the encoded file bytes, nothing else."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        with open(self.paths[index], "rb") as file:
            return torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)


class _GpuDecodeLoader:
    """Batches of encoded JPEGs from the workers, decoded, cropped and resized on the GPU in this process."""

    def __init__(self, paths: list[str], workers: int, batch_size: int, image_size: int):
        import torch

        self.loader = torch.utils.data.DataLoader(
            _BytesDataset(paths), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
            prefetch_factor=2 if workers else None, collate_fn=list,
        )
        self.image_size = image_size
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        from evamim.data.image_ops import sample_crop

        size = self.image_size
        for encoded in self.loader:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
            crops = []
            for image in decoded:
                height, width = image.shape[-2:]
                left, top, crop_w, crop_h = sample_crop(width, height, (0.2, 1.0), (3 / 4, 4 / 3), self.rng)
                crop = image[None, :, top : top + crop_h, left : left + crop_w].float()
                crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
                if self.rng.random() < 0.5:
                    crop = crop.flip(-1)
                crops.append(crop.round_().clamp_(0, 255).to(torch.uint8))
            batch = torch.cat(crops)
            torch.cuda.synchronize()  # the batch is ready when it is handed out, as a loader's would be
            yield {"images": batch}


@dataclasses.dataclass
class _Run:
    wall_s: float
    worker_cpu_s: float  # CPU time of the loading processes (the workers, or this one without workers)
    main_cpu_s: float  # CPU time of this process (receiving batches; everything when workers=0)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _time_run(loader, images: int, workers: int) -> _Run:
    """Run one whole epoch of ``loader``; wall time from creating the iterator (worker start-up included).

    A whole epoch, not a number of batches: stopping early would leave prefetched batches whose CPU
    time counts but whose images do not. Workers end with the epoch and are reaped, so their CPU
    time shows in RUSAGE_CHILDREN.
    """
    import torch

    # DataLoader workers run torch single-threaded; loading in this process (workers=0) must too, or
    # intra-op threads fighting over busy cores make tiny tensor ops many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    children, main = _cpu_seconds(resource.RUSAGE_CHILDREN), _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        got = sum(len(batch["images"] if isinstance(batch, dict) else batch) for batch in loader)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    if got != images:
        raise RuntimeError(f"the loader delivered {got} images, expected {images}")
    main_cpu = _cpu_seconds(resource.RUSAGE_SELF) - main
    worker_cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - children if workers else main_cpu
    return _Run(wall, worker_cpu, main_cpu)


def benchmark(
    source: str,
    *,
    workers: list[int],
    batches: int = 20,
    batch_size: int = 32,
    image_size: int = 224,
    repeats: int = 3,
    pipelines: list[str] | tuple[str, ...] = ("ours", "ours-float", "baseline"),
) -> dict:
    """Throughput of each pipeline for each worker count, plus the machine and image facts.

    Per run: wall-clock images/s (what a training job would see on this machine, now) and images
    per CPU-second of the loading processes (what one worker does when it has a core to itself;
    insensitive to other load on a shared machine).

    Raises:
        PipelineError (a ValueError): an unknown pipeline, or ``gpu-decode`` without a CUDA GPU (one line
        saying so), before anything is timed.
    """
    from evamim.data.files import scan_folder

    unknown = [name for name in pipelines if name not in PIPELINES]
    if unknown:
        raise PipelineError(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    if "gpu-decode" in pipelines and (problem := gpu_decode_problem()):  # also warms nvjpeg up
        raise PipelineError(f"pipeline gpu-decode needs {problem}")

    # Absolute paths: the list file the loader reads lives in a temporary folder, and a list's relative
    # paths are read relative to the list file.
    entries, _ = scan_folder(os.path.abspath(source), labels=False)
    paths = [entry.path for entry in entries]
    load_before = [round(x, 2) for x in os.getloadavg()]
    images = batch_size * batches
    # Both pipelines read the same list of exactly one run's images (the page cache is warm for all).
    repeated = (paths * (images // len(paths) + 1))[:images]
    with tempfile.TemporaryDirectory() as tmp:
        list_file = os.path.join(tmp, "bench.txt")
        Path(list_file).write_text("\n".join(repeated) + "\n")
        makers = {
            "ours": lambda w: _ours_loader(list_file, w, batch_size, image_size, draft=True, output="uint8"),
            "ours-float": lambda w: _ours_loader(list_file, w, batch_size, image_size, draft=True, output="float"),
            "ours-nodraft": lambda w: _ours_loader(list_file, w, batch_size, image_size, draft=False, output="uint8"),
            "baseline": lambda w: _baseline_loader(repeated, w, batch_size, image_size),
            "gpu-decode": lambda w: _GpuDecodeLoader(repeated, w, batch_size, image_size),
        }
        runs: dict[tuple[str, int], list[_Run]] = {}
        for repeat in range(repeats):
            order = list(pipelines) if repeat % 2 == 0 else list(reversed(pipelines))
            for count in workers:
                for name in order:
                    runs.setdefault((name, count), []).append(_time_run(makers[name](count), images, count))
    rows = []
    for count in workers:
        for name in pipelines:
            done = runs[(name, count)]
            rate = images / statistics.median(run.wall_s for run in done)
            rows.append(
                {
                    "pipeline": name,
                    "workers": count,
                    "images_per_s": round(rate, 1),
                    "images_per_s_per_worker": round(rate / max(1, count), 1),
                    # The fastest run: the least disturbed by other load on a shared machine.
                    "best_images_per_s": round(images / min(run.wall_s for run in done), 1),
                    "images_per_worker_cpu_s": round(images / statistics.median(run.worker_cpu_s for run in done), 1),
                    "main_cpu_ms_per_batch": round(1000 * statistics.median(run.main_cpu_s for run in done) / batches, 1),
                    "runs_s": [round(run.wall_s, 3) for run in done],
                }
            )
    env = environment()
    env["load_average_before"] = load_before
    return {
        "environment": env,
        "images": image_facts(paths, image_size),
        "batches": batches,
        "batch_size": batch_size,
        "image_size": image_size,
        "results": rows,
    }


def image_facts(paths: list[str], image_size: int) -> dict:
    """Count, size and file size of the benchmark images, and the decode sizes the JPEG draft picks."""
    from collections import Counter

    from PIL import Image

    from evamim.data.transforms import PretrainTransform

    with Image.open(paths[0]) as first:
        width, height = first.size
    transform = PretrainTransform(size=image_size)
    decoded: Counter[str] = Counter()
    for seed in range(100):  # the per-crop draft of 100 crops of the first image
        request = transform.prepare(np.random.default_rng(seed)).draft_size(width, height)
        with Image.open(paths[0]) as image:
            if request is not None:
                image.draft("RGB", request)
            decoded[f"{image.size[0]}x{image.size[1]}"] += 1
    return {
        "count": len(paths),
        "first_size": f"{width}x{height}",
        "mean_kib": round(float(np.mean([os.path.getsize(p) for p in paths])) / 1024, 1),
        "jpeg_draft_decodes_at": ", ".join(f"{size} ({count}%)" for size, count in decoded.most_common()),
    }


def environment() -> dict:
    import PIL
    import torch

    import evamim  # noqa: F401
    import torchvision

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def format_result(result: dict) -> str:
    env, images = result["environment"], result["images"]
    lines = [
        f"{env['date']}  {env['cpu']} ({env['cpu_count']} cores)  "
        f"torch {env['torch']}  torchvision {env['torchvision']}  pillow {env['pillow']}",
        f"load average (1, 5, 15 min) before: {env.get('load_average_before')}, after: {env['load_average']}",
        f"{images['count']} images, {images['first_size']}, mean {images['mean_kib']} KiB; "
        f"JPEG draft decodes 100 crops of the first at {images['jpeg_draft_decodes_at']}",
        f"{result['batches']} batches of {result['batch_size']}, {result['image_size']} px crops; "
        "median of alternating runs (best = fastest run)",
        "ours and ours-nodraft deliver uint8 crops (normalised later on the accelerator, not timed here); "
        "ours-float and baseline deliver normalised float32",
        "",
        f"{'pipeline':<14}{'workers':>8}{'img/s':>9}{'img/s/worker':>14}{'best img/s':>12}{'img/worker-CPU-s':>18}",
    ]
    baseline = {row["workers"]: row for row in result["results"] if row["pipeline"] == "baseline"}
    for row in result["results"]:
        text = (
            f"{row['pipeline']:<14}{row['workers']:>8}{row['images_per_s']:>9.1f}{row['images_per_s_per_worker']:>14.1f}"
            f"{row['best_images_per_s']:>12.1f}{row['images_per_worker_cpu_s']:>18.1f}"
        )
        reference = baseline.get(row["workers"])
        if row["pipeline"] != "baseline" and reference:
            wall = row["images_per_s"] / reference["images_per_s"]
            cpu = row["images_per_worker_cpu_s"] / reference["images_per_worker_cpu_s"]
            text += f"   vs baseline: {wall:.2f}x wall, {cpu:.2f}x per CPU-s"
        lines.append(text)
    return "\n".join(lines)
