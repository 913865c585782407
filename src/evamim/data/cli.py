"""``evamim data make-shards SRC OUT ...``, ``evamim data make-instances OUT ...`` and ``evamim data inspect PATH ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from evamim.flags import int_at_least, int_in_range

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    make = commands.add_parser(
        "make-shards",
        help="write WebDataset tar shards from an image folder or list file",
        description="Write WebDataset tar shards from an image folder (ImageFolder layout or flat) or a list "
        "file (`path` or `path label` per line). Bad images are skipped and reported.",
    )
    make.add_argument("src", metavar="SOURCE", help="image folder or list file")
    make.add_argument("out", metavar="OUTPUT", help="output folder (created if missing); nothing is written outside it")
    make.add_argument("--shard-size", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    make.add_argument("--max-side", type=int_at_least(1), default=None,
                      help="resize so the longer side is at most this (re-encodes)")
    make.add_argument("--quality", type=int_in_range(1, 100), default=95, help="JPEG quality when re-encoding (default 95)")
    make.add_argument("--labels", action="store_true", help="store class labels (cls): class folders or `path label` lines")
    make.add_argument("--prefix", default="shard", help="shard file name prefix (default shard -> shard-000000.tar)")
    make.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted order (default: seeded shuffle)")
    make.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the shuffled order (default 0)")
    make.add_argument("--workers", type=int_at_least(1), default=1, help="processes decoding and re-encoding (default 1)")
    make.add_argument("--max-image-pixels", type=int_at_least(1), default=MAX_IMAGE_PIXELS,
                      help=f"refuse larger images (bomb guard; default {MAX_IMAGE_PIXELS})")
    make.add_argument("--overwrite", action="store_true", help="replace existing <prefix>-*.tar shards in OUT")

    instances = commands.add_parser(
        "make-instances",
        help="write a synthetic COCO-format detection dataset (shapes with boxes and masks)",
        description="Write a synthetic detection / instance-segmentation dataset in the COCO layout: "
        "OUT/images/{train,val}/*.png and OUT/annotations/instances_{train,val}.json. Each image shows 1 to "
        "--max-objects non-touching shapes (8 categories), each its own colour, with tight boxes and RLE masks. "
        "The val split is drawn with seed + 1.",
    )
    instances.add_argument("out", metavar="OUTPUT", help="output folder (created if missing)")
    instances.add_argument("--train", type=int_at_least(0), default=1000, help="training images (default 1000)")
    instances.add_argument("--val", type=int_at_least(0), default=200, help="validation images (default 200)")
    instances.add_argument("--resolution", type=int_at_least(16), default=128, help="image side in pixels (default 128)")
    instances.add_argument("--max-objects", type=int_at_least(1), default=6, help="objects per image, at most (default 6)")
    instances.add_argument("--min-radius", type=float, default=0.08,
                           help="smallest outer radius, a fraction of the side (default 0.08)")
    instances.add_argument("--max-radius", type=float, default=0.18,
                           help="largest outer radius, a fraction of the side (default 0.18)")
    instances.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the train split (default 0)")
    instances.add_argument("--overwrite", action="store_true",
                           help="replace an existing dataset in OUTPUT (both splits: a split of 0 images is removed)")

    inspect = commands.add_parser(
        "inspect",
        help="count samples, show a few, and measure the failure rate",
        description="Describe an image folder, a list file, a caption table (.csv / .tsv) or shards (a .tar, a "
        "folder of them, a brace pattern or URL): sample count, a few samples' sizes, and which samples fail to "
        "decode.",
    )
    inspect.add_argument("path", metavar="SOURCE",
                         help="folder, list file, caption table, shard file, shard folder or pattern")
    inspect.add_argument("--limit", type=int_at_least(0), default=1000, help="samples to check (default 1000; 0 = all)")
    inspect.add_argument("--show", type=int_at_least(0), default=5, help="samples to describe (default 5)")
    inspect.add_argument("--max-image-pixels", type=int_at_least(1), default=MAX_IMAGE_PIXELS,
                         help=f"refuse larger images (bomb guard; default {MAX_IMAGE_PIXELS})")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.add_argument("--csv-path-column", default="filepath",
                         help="caption tables: the column of image paths (default filepath, as data.csv_path_column)")
    inspect.add_argument("--csv-caption-column", default="title",
                         help="caption tables: the caption column (default title, as data.csv_caption_column)")
    inspect.add_argument("--csv-delimiter", default=None,
                         help="caption tables: one character, or tab / comma / semicolon / pipe (default: from the "
                              "extension, .csv comma, .tsv tab)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data_command == "make-shards":
        return _make_shards(args)
    if args.data_command == "make-instances":
        return _make_instances(args)
    return _inspect(args)


def _make_instances(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evamim.data.detection import PYCOCOTOOLS_MISSING

    try:
        from evamim.data.instances import write_instances

        import pycocotools.mask  # noqa: F401
    except ImportError:
        print(f"evamim data make-instances: {PYCOCOTOOLS_MISSING}", file=sys.stderr)
        return 2
    out = Path(args.out)
    existing = [p for p in (out / "annotations" / "instances_train.json", out / "annotations" / "instances_val.json")
                if p.exists()]
    if existing and not args.overwrite:
        print(f"evamim data make-instances: {existing[0]} exists; pass --overwrite to replace the dataset, or choose "
              "another OUTPUT", file=sys.stderr)
        return 2
    if not args.train and not args.val:
        print("evamim data make-instances: --train 0 and --val 0 write nothing; ask for some images", file=sys.stderr)
        return 2
    if not 0 < args.min_radius <= args.max_radius <= 0.5:
        print(f"evamim data make-instances: --min-radius {args.min_radius} and --max-radius {args.max_radius} must "
              "satisfy 0 < min <= max <= 0.5 (fractions of the image side)", file=sys.stderr)
        return 2
    try:
        if args.overwrite:  # an old split left in place would be read as part of the new dataset
            from evamim.data.instances import remove_split

            for split in ("train", "val"):
                remove_split(out, split)
        summaries = write_instances(out, train=args.train, val=args.val, resolution=args.resolution, seed=args.seed,
                                    max_objects=args.max_objects, radius_range=(args.min_radius, args.max_radius))
    except ValueError as error:
        print(f"evamim data make-instances: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"evamim data make-instances: {out}: {error.strerror or error}", file=sys.stderr)
        return 1
    for summary in summaries:
        print(f"{summary['split']}: {summary['images']} images, {summary['instances']} instances -> "
              f"{summary['image_dir']}, {summary['annotations']}")
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from evamim.data.shard_writer import make_shards

    try:
        report = make_shards(
            args.src,
            args.out,
            shard_size=args.shard_size,
            max_side=args.max_side,
            quality=args.quality,
            labels=args.labels,
            prefix=args.prefix,
            shuffle=args.shuffle,
            seed=args.seed,
            workers=args.workers,
            max_image_pixels=args.max_image_pixels,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"evamim data make-shards: {error}", file=sys.stderr)
        return 2
    for line in report.bad:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"wrote {report.num_samples} samples into {len(report.shards)} shards in {args.out}; "
        f"skipped {len(report.bad)} bad files"
    )
    if report.num_samples == 0:
        print("evamim data make-shards: no image could be read; nothing written", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from evamim.data.inspect import format_report, inspect_data

    try:
        report = inspect_data(args.path, limit=args.limit, show=args.show, max_pixels=args.max_image_pixels,
                              csv_columns=(args.csv_path_column, args.csv_caption_column),
                              csv_delimiter=args.csv_delimiter)
    except (FileNotFoundError, ValueError) as error:
        print(f"evamim data inspect: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0
