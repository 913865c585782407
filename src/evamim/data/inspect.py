"""``inspect_data``: count a dataset's samples, show a few, and measure its failure rate.

Works on an image folder, a list file, a caption table (``.csv`` / ``.tsv``), or shards (a ``.tar``, a
folder of them, a brace pattern, URLs). Every checked sample is decoded completely with the loader's own
failure rules, so the bad files it lists are exactly those a training run would skip.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from evamim.data.config import infer_source
from evamim.data.decode import BadSample, decode_image_and_format
from evamim.data.files import FileEntry, read_list, scan_folder
from evamim.data.shards import IMAGE_KEYS, caption_of, expand_shards, label_of, shard_events


@dataclasses.dataclass
class InspectReport:
    path: str
    kind: str  # folder, list, csv or shards
    layout: str  # human description (classes, shard count)
    total: int | None  # samples in the dataset when known without reading everything
    checked: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    shard_errors: list[str] = dataclasses.field(default_factory=list)  # shards (partly) unreadable
    skipped: list[str] = dataclasses.field(default_factory=list)  # links and folders the folder scan skipped
    complete: bool = True  # False when --limit stopped the check early

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.checked if self.checked else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bad_fraction": self.bad_fraction}


def detect_kind(path: str) -> str:
    """``folder``, ``list``, ``csv`` or ``shards`` for a path, pattern or URL: the rules of ``data.source=auto``.

    Raises:
        ValueError: the path does not exist or is a single image (the path is named).
    """
    return infer_source(path, name="path")


def inspect_data(path: str, *, limit: int = 1000, show: int = 5, max_pixels: int = 89_478_485,
                 csv_columns: tuple[str, str] = ("filepath", "title"),
                 csv_delimiter: str | None = None) -> InspectReport:
    """Check up to ``limit`` samples of ``path`` (0 = all) and describe the first ``show``.

    ``csv_columns`` (path column, caption column) and ``csv_delimiter`` (None = from the extension) read a
    caption table, as ``data.csv_path_column`` / ``csv_caption_column`` / ``csv_delimiter`` do."""
    path = str(path)
    kind = detect_kind(path)
    if kind == "shards":
        return _inspect_shards(path, limit, show, max_pixels)
    skipped: list[str] = []
    if kind == "folder":
        entries, classes, layout = _folder_entries(Path(path), skipped)
    elif kind == "csv":
        entries, classes, layout = _table_entries(path, csv_columns, csv_delimiter)
    else:
        entries, classes, layout = _list_entries(path)
    report = InspectReport(path, kind, layout, total=len(entries), skipped=skipped)
    checked = entries if limit <= 0 else entries[:limit]
    report.complete = len(checked) == len(entries)
    for entry in checked:
        _check(report, entry.path, lambda: Path(entry.path).read_bytes(), show, max_pixels, label=entry.label,
               classes=classes, caption=entry.caption)
    return report


def _folder_entries(root: Path, skipped: list[str]) -> tuple[list[FileEntry], list[str], str]:
    try:
        entries, classes = scan_folder(root, labels=True, skipped=skipped)
        return entries, classes, f"ImageFolder layout, {len(classes)} classes"
    except FileNotFoundError:
        # Not a class layout (loose images, or an empty class folder): list every image instead, and
        # say so; scan_folder still raises for a missing or image-less folder.
        skipped.clear()  # the second scan meets the same links again
        entries, _ = scan_folder(root, labels=False, skipped=skipped)
        return entries, [], "images without a class-folder layout"


def _table_entries(path: str, columns: tuple[str, str],
                   delimiter: str | None) -> tuple[list[FileEntry], list[str], str]:
    from evamim.data.tables import delimiter_name, read_caption_table, resolve_delimiter

    keys = ("--csv-path-column", "--csv-caption-column", "--csv-delimiter")
    entries = read_caption_table(path, path_column=columns[0], caption_column=columns[1], delimiter=delimiter,
                                 keys=keys)
    sep = delimiter_name(resolve_delimiter(path, delimiter, keys[2]))
    return entries, [], f"caption table ({sep}-separated, columns {columns[0]!r} and {columns[1]!r})"


def _list_entries(path: str) -> tuple[list[FileEntry], list[str], str]:
    try:
        return read_list(path, labels=True), [], "list file with labels"
    except ValueError:  # some line has no label: report the list as unlabelled
        return read_list(path, labels=False), [], "list file without labels"


def _check(report: InspectReport, name: str, read, show: int, max_pixels: int, **extra: Any) -> None:
    report.checked += 1
    try:
        image, file_format, stored = decode_image_and_format(read(), max_pixels=max_pixels)
    except BadSample as error:
        report.bad.append(f"{name}: {error.reason}")
        return
    except OSError as error:
        report.bad.append(f"{name}: {type(error).__name__}: {error}")
        return
    if len(report.examples) < show:
        example = {"name": name, "width": stored[0], "height": stored[1], "format": file_format}
        label, classes = extra.get("label"), extra.get("classes") or []
        if label is not None:
            example["label"] = label if not classes else f"{label} ({classes[label]})"
        if extra.get("caption") is not None:
            example["caption"] = extra["caption"]
        report.examples.append(example)


def _inspect_shards(path: str, limit: int, show: int, max_pixels: int) -> InspectReport:
    urls = expand_shards(path)
    report = InspectReport(path, "shards", f"{len(urls)} shards", total=None)
    for kind, value in shard_events(urls):
        if kind == "error":
            report.shard_errors.append(value)
            continue
        if kind != "sample":
            continue
        if limit > 0 and report.checked >= limit:
            report.complete = False
            break
        name = f"{os.path.basename(value['__url__'])}:{value['__key__']}"
        image_key = next((key for key in IMAGE_KEYS if key in value), None)
        if image_key is None:
            report.checked += 1
            report.bad.append(f"{name}: no image entry ({'/'.join(IMAGE_KEYS)})")
            continue
        try:
            label, caption = label_of(value), caption_of(value)
        except BadSample as error:
            report.checked += 1
            report.bad.append(f"{name}: {error.reason}")
            continue
        _check(report, name, lambda: value[image_key], show, max_pixels, label=label, caption=caption)
    if report.complete:
        report.total = report.checked
    return report


def format_report(report: InspectReport, max_bad_lines: int = 20) -> str:
    lines = [f"{report.path}: {report.kind}, {report.layout}"]
    if report.total is not None:
        lines.append(f"samples: {report.total}")
    scope = "all" if report.complete else f"the first {report.checked} (--limit 0 checks all)"
    lines.append(f"checked: {report.checked} ({scope})")
    lines.append(f"bad: {len(report.bad)} ({report.bad_fraction:.2%} of checked)")
    lines.extend(f"  {line}" for line in report.bad[:max_bad_lines])
    if len(report.bad) > max_bad_lines:
        lines.append(f"  ... and {len(report.bad) - max_bad_lines} more (--json lists all)")
    if report.shard_errors:
        lines.append(f"unreadable shards: {len(report.shard_errors)}")
        lines.extend(f"  {line}" for line in report.shard_errors[:max_bad_lines])
    if report.skipped:
        lines.append(f"skipped while scanning the folder: {len(report.skipped)}")
        lines.extend(f"  {line}" for line in report.skipped[:max_bad_lines])
    if report.examples:
        lines.append("examples:")
    for example in report.examples:
        text = f"  {example['name']}  {example['width']}x{example['height']} {example['format']}"
        if "label" in example:
            text += f"  label {example['label']}"
        if "caption" in example:
            text += f"  caption {example['caption']!r}"
        lines.append(text)
    return "\n".join(lines)
