"""Map-style sources backed by image files: a folder tree, or a text file listing paths.

Folder layout (ImageFolder): ``root/<class>/**/<image>`` gives class labels (classes sorted by
name, index = position). Without labels any tree works, flat or nested; every image below ``root``
is used. List layout: one image per line, ``path`` or ``path label`` (label an integer, separated
by whitespace from the path); relative paths are resolved against the list file's folder; blank
lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from evamim.data.samples import RawSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    label: int | None = None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_folder(root: str | os.PathLike, *, labels: bool) -> tuple[list[FileEntry], list[str]]:
    """Every image file below ``root`` in sorted order, and the class names (empty without labels).

    Hidden files and folders (names starting with ``.``) are skipped; symlinked folders are followed.

    Raises:
        FileNotFoundError: ``root`` is missing, not a folder, holds no images, or (with labels)
            has images outside class folders or a class folder without images.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist (data.path)")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset path {root} is not a folder; for a list of paths use data.source=list")
    if not labels:
        entries = [FileEntry(path) for path in _walk_images(root)]
        if not entries:
            raise FileNotFoundError(_no_images_message(root))
        return entries, []
    loose = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and is_image_name(entry.name))
    if loose:
        raise FileNotFoundError(
            f"{len(loose)} images lie directly in {root} (e.g. {loose[0]}), but with data.labels on every "
            "image must be inside a class sub-folder root/<class>/...; move them or turn labels off"
        )
    classes = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".")
    )
    entries: list[FileEntry] = []
    for index, name in enumerate(classes):
        found = [FileEntry(path, index) for path in _walk_images(root / name)]
        if not found:
            raise FileNotFoundError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it, or the labels of the classes after it would shift"
            )
        entries.extend(found)
    if not entries:
        raise FileNotFoundError(_no_images_message(root))
    return entries, classes


def _walk_images(folder: Path) -> list[str]:
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        found.extend(os.path.join(directory, name) for name in sorted(names) if is_image_name(name))
    return found


def _no_images_message(root: Path) -> str:
    return f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); check data.path"


def read_list(list_file: str | os.PathLike, *, labels: bool) -> list[FileEntry]:
    """Entries of a list file (see the module docstring for the format).

    Raises:
        FileNotFoundError: the list file is missing or lists nothing.
        ValueError: labels are on and a line has no integer label (line number in the message).
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file {list_file} does not exist or is not a file (data.path)")
    base = list_file.resolve().parent
    entries = []
    with open(list_file, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, label = _split_line(line)
            if labels and label is None:
                raise ValueError(
                    f"{list_file}:{number}: no integer label after the path ({line!r}); with data.labels on "
                    "every line must read `path label`"
                )
            resolved = path if os.path.isabs(path) else str(base / path)
            entries.append(FileEntry(resolved, label if labels else None))
    if not entries:
        raise FileNotFoundError(f"list file {list_file} lists no images")
    return entries


def _split_line(line: str) -> tuple[str, int | None]:
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            return parts[0], int(parts[1])
        except ValueError:
            pass  # no label: the whole line is the path (paths may contain spaces)
    return line, None


Decoder = Callable[[str], Image.Image]


class FileSource:
    """Map-style source over image files; ``load`` decodes with the decoder it is given."""

    has_captions = False

    def __init__(self, entries: list[FileEntry], classes: list[str], origin: str):
        self.entries = entries
        self.classes = classes
        self.origin = origin
        self.has_labels = bool(entries) and entries[0].label is not None

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, labels: bool) -> FileSource:
        entries, classes = scan_folder(root, labels=labels)
        return cls(entries, classes, str(root))

    @classmethod
    def from_list(cls, list_file: str | os.PathLike, *, labels: bool) -> FileSource:
        return cls(read_list(list_file, labels=labels), [], str(list_file))

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, index: int) -> str:
        return self.entries[index].path

    def load(self, index: int, decode: Decoder) -> RawSample:
        entry = self.entries[index]
        return RawSample(decode(entry.path), label=entry.label)
