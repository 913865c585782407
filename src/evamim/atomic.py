"""Atomic file writes: whoever reads ``path`` sees the old file (or none) or the complete new one, never a part.

Every writer follows the same four steps: write a hidden temp file in the destination's directory (the same
filesystem, so the rename is atomic), flush and fsync it, ``os.replace`` it over the destination, then fsync
the directory so the rename itself survives a power loss. A process killed half-way leaves only the temp file
``.<name>.<random>.tmp`` behind (a glob for ``.<name>.*.tmp`` finds it); on an exception it is removed.

- :func:`write_bytes`, :func:`write_text`, :func:`write_json`: whole contents in memory.
- :func:`open_for_write`: a binary or text handle to stream into (e.g. ``torch.save(obj, handle)``).
- :func:`write_with`: a callback that writes the temp file by path (``safetensors.torch.save_file``).
- :func:`replace_file`: move an already written temp file into place durably.
- :func:`replace_dir`: swap a finished directory into place (over an older one at the same name).

Files are created with mode ``0o666`` minus the umask, like any other file (``tempfile.mkstemp`` would
make them ``0o600``, and the rename keeps that mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TMP_SUFFIX = ".tmp"


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``path``: ``.<name>.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync ``directory`` so that the entries just renamed or created in it survive a power loss."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows, where a rename is durable
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished file ``tmp`` appear as ``path``: fsync it, ``os.replace`` it over ``path`` (same
    directory), fsync the directory. Returns ``path``."""
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    """Create an empty temp file next to ``path``, exclusively (never reusing or following a planted name)."""
    while True:
        tmp = temp_path_for(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
            return tmp
        except FileExistsError:  # a random name already taken: draw another
            continue


@contextlib.contextmanager
def _temp_beside(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp file next to ``path``; move it over ``path`` when the block succeeds, delete it when
    it raises (including KeyboardInterrupt)."""
    path = Path(path)
    tmp = _create_temp(path)
    try:
        yield tmp
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Atomically create ``path`` with ``write(tmp_path)``, a callback that writes the whole file at the path it
    is given (it exists, empty). Returns ``path``."""
    with _temp_beside(path) as tmp:
        write(tmp)
    return Path(path)


@contextlib.contextmanager
def open_for_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """``with open_for_write(path) as handle: ...``: write the new contents of ``path`` into ``handle``; they
    replace ``path`` when the block ends without an exception. ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8
    unless ``encoding`` says otherwise)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_for_write writes a whole new file: mode must be 'wb' or 'w', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with _temp_beside(path) as tmp:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    with open_for_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text``."""
    with open_for_write(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Atomically replace ``path`` with ``json.dumps(obj, indent=indent, **dumps_kwargs)`` and a final newline.
    The object is serialised before anything is written, so an unserialisable one leaves ``path`` untouched."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def replace_dir(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished directory ``source`` to ``target`` (same parent directory) durably.

    ``source``'s entries are fsync'ed first, its parent after the rename. An existing ``target`` (e.g. an older
    version that did not load) is first renamed to the hidden ``.<target name>.old-<random>`` and deleted once
    the new one is in place; a crash between the two renames leaves that ``.old-`` directory for the caller's
    clean-up (the caller globs for it). Returns ``target``.
    """
    source, target = Path(source), Path(target)
    fsync_dir(source)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
    fsync_dir(target.parent)
    return target
