"""Map-style sources backed by image files: a folder tree, a text file listing paths, or a caption table.

Folder layout (ImageFolder): ``root/<class>/**/<image>`` gives class labels (classes sorted by
name, index = position). Without labels any tree works, flat or nested; every image below ``root``
is used. List layout: one image per line, ``path`` or ``path label`` (label an integer, separated
by whitespace from the path); relative paths are resolved against the list file's folder; blank
lines and lines starting with ``#`` are ignored. Caption tables (CSV / TSV with a path and a caption
column) are read by ``evamim.data.tables``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from evamim.data.config import IMAGE_EXTENSIONS
from evamim.data.samples import RawSample

logger = logging.getLogger("evamim.data")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    label: int | None = None
    caption: str | None = None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_folder(
    root: str | os.PathLike, *, labels: bool, skipped: list[str] | None = None
) -> tuple[list[FileEntry], list[str]]:
    """Every image file below ``root`` in sorted order, and the class names (empty without labels).

    Hidden files and folders (names starting with ``.``) are skipped. Symlinked folders are followed,
    but each real folder is read once: a link back into the scanned tree (or to a folder holding it)
    would otherwise repeat its images, or loop until the path is too long. Such links, and entries
    that cannot be examined (a symlink loop, an unreadable folder), are skipped: each as a
    ``path: reason`` line appended to ``skipped`` when given, else logged as a warning. A broken or
    looping link with an image name is kept as an entry: loading it fails, and it is then counted as
    a bad sample with its path.

    Raises:
        FileNotFoundError: ``root`` is missing, not a folder, holds no images, or (with labels)
            has images outside class folders or a class folder without images.
    """
    notes: list[str] = []
    try:
        return _scan_folder(Path(root), labels, notes)
    finally:
        if skipped is None:
            for note in notes:
                logger.warning("skipped %s", note)
        else:
            skipped.extend(notes)


def _scan_folder(root: Path, labels: bool, skipped: list[str]) -> tuple[list[FileEntry], list[str]]:
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist (data.path)")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset path {root} is not a folder; for a list of paths use data.source=list")
    if not labels:
        entries = [FileEntry(path) for path in _walk_images(root, skipped)]
        if not entries:
            raise FileNotFoundError(_no_images_message(root))
        return entries, []
    files, folders = _top_level(root, skipped)
    loose = [name for name in files if is_image_name(name)]
    if loose:
        raise FileNotFoundError(
            f"{len(loose)} images lie directly in {root} (e.g. {loose[0]}), but with data.labels on every "
            "image must be inside a class sub-folder root/<class>/...; move them or turn labels off"
        )
    entries: list[FileEntry] = []
    for index, name in enumerate(folders):
        found = [FileEntry(path, index) for path in _walk_images(root / name, skipped)]
        if not found:
            raise FileNotFoundError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it, or the labels of the classes after it would shift"
            )
        entries.extend(found)
    if not entries:
        raise FileNotFoundError(_no_images_message(root))
    return entries, folders


def _top_level(root: Path, skipped: list[str]) -> tuple[list[str], list[str]]:
    """Sorted names of the regular files and of the (non-hidden) folders directly in ``root``."""
    files, folders = [], []
    for entry in _sorted_entries(root, skipped):
        if entry.name.startswith("."):
            continue
        kind = _kind(entry, skipped)
        if kind == "file":
            files.append(entry.name)
        elif kind == "folder":
            folders.append(entry.name)
    return files, folders


def _walk_images(folder: Path, skipped: list[str]) -> list[str]:
    """Image paths below ``folder``, depth first in sorted order, each real folder read once.

    Symlinked folders are read after the real tree, so an image reachable both directly and through
    a link is listed under its real path.
    """
    inside = os.path.realpath(folder)
    visited: set[str] = set()
    found: list[str] = []
    real_stack, linked = [str(folder)], []
    while real_stack or linked:
        directory = real_stack.pop() if real_stack else linked.pop(0)
        real = os.path.realpath(directory)
        reason = _revisit_reason(real, inside, visited)
        if reason:
            _skip(skipped, directory, reason)
            continue
        visited.add(real)
        subfolders = []
        for entry in _sorted_entries(Path(directory), skipped):
            if entry.name.startswith("."):
                continue
            kind = _kind(entry, skipped)
            if kind == "folder":
                subfolders.append(entry)
            elif is_image_name(entry.name):  # files, and broken links with image names (bad samples later)
                found.append(entry.path)
        real_stack.extend(entry.path for entry in reversed(subfolders) if not entry.is_symlink())
        linked.extend(entry.path for entry in subfolders if entry.is_symlink())
    return found


def _revisit_reason(real: str, inside: str, visited: set[str]) -> str | None:
    """Why the folder whose real path is ``real`` must not be read (again), or None."""
    if real in visited:
        return f"symlink to {real}, a folder already scanned; skipped so that its images are not counted twice"
    if real != inside and os.path.commonpath([real, inside]) == real:
        return f"symlink to {real}, which contains the scanned folder {inside}; skipped (it would loop)"
    return None


def _sorted_entries(directory: Path, skipped: list[str]) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        _skip(skipped, str(directory), f"folder cannot be read: {error.strerror or error}")
        return []


def _kind(entry: os.DirEntry, skipped: list[str]) -> str | None:
    """``folder``, ``file`` (following links), or None for what is neither (a broken link or a loop)."""
    try:
        if entry.is_dir():
            return "folder"
        if entry.is_file():
            return "file"
    except OSError as error:  # a symlink loop raises ELOOP instead of answering False
        if not is_image_name(entry.name):  # image-named ones are listed, and counted when they fail to load
            _skip(skipped, entry.path, f"cannot be examined: {error.strerror or error}")
        return None
    if entry.is_symlink() and not is_image_name(entry.name):
        _skip(skipped, entry.path, "broken symlink")
    return None


def _skip(skipped: list[str], path: str, reason: str) -> None:
    skipped.append(f"{path}: {reason}")


def _no_images_message(root: Path) -> str:
    return f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); check data.path"


def read_list(list_file: str | os.PathLike, *, labels: bool) -> list[FileEntry]:
    """Entries of a list file (see the module docstring for the format).

    Raises:
        FileNotFoundError: the list file is missing or lists nothing.
        ValueError: the file is not UTF-8 text, or labels are on and a line has no integer label
            (line number in the message).
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file {list_file} does not exist or is not a file (data.path)")
    base = list_file.resolve().parent
    entries = []
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"list file {list_file} is not UTF-8 text (byte {error.start}): data.path must be a text file "
            "naming one image per line, or an image folder"
        ) from None
    for number, line in enumerate(lines, start=1):
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

    def __init__(self, entries: list[FileEntry], classes: list[str], origin: str):
        self.entries = entries
        self.classes = classes
        self.origin = origin
        self.has_labels = bool(entries) and entries[0].label is not None
        self.has_captions = bool(entries) and entries[0].caption is not None

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, labels: bool) -> FileSource:
        entries, classes = scan_folder(root, labels=labels)
        return cls(entries, classes, str(root))

    @classmethod
    def from_list(cls, list_file: str | os.PathLike, *, labels: bool) -> FileSource:
        return cls(read_list(list_file, labels=labels), [], str(list_file))

    @classmethod
    def from_table(cls, table: str | os.PathLike, *, path_column: str, caption_column: str,
                   delimiter: str | None = None) -> FileSource:
        """Image-caption pairs of a CSV / TSV table (``evamim.data.tables.read_caption_table``)."""
        from evamim.data.tables import read_caption_table

        entries = read_caption_table(table, path_column=path_column, caption_column=caption_column,
                                     delimiter=delimiter)
        return cls(entries, [], str(table))

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, index: int) -> str:
        return self.entries[index].path

    def load(self, index: int, decode: Decoder) -> RawSample:
        entry = self.entries[index]
        return RawSample(decode(entry.path), label=entry.label, caption=entry.caption)
