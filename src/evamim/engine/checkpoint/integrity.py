"""Checks that a checkpoint is what was written, and that it will load safely.

- Saving: :func:`check_plain` refuses, up front and naming the entry, anything that
  ``torch.load(weights_only=True)`` could not read back (no arbitrary code runs when loading a file someone
  handed you).
- Single files: a torch.save zip archive with a CRC-32 per record (:func:`zip_checksums_on` while saving),
  verified before loading (:func:`verify_zip_checksums`).
- Sharded directories: ``trainer.pt`` holds the CRC-32 of every shard file (:func:`shard_checksums`, checked
  by :func:`verify_shard_checksums`); the DCP index (``.metadata``, a pickle) is read with an unpickler that
  admits only the classes of a DCP index and must declare tensors only (:func:`read_shard_index`); a shard that
  is missing or shorter than the index says is refused (:func:`check_shards`).

A checkpoint whose bytes changed after it was written is refused like a truncated one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim.engine.checkpoint.layout import CheckpointError

# What torch.load raises on a truncated or garbled file (zip reader errors, unpickling, short reads).
LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, KeyError)


# Exact types: subclasses such as numpy.float64 (a float) or defaultdict (a dict) fail weights_only loading.
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` would
    refuse (anything but dicts, lists, tuples, str, numbers, bools, None and tensors)."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{where}.{key}")
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            check_plain(value, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
        "cannot read back; convert it to a tensor or plain Python types (int, float, str, list, dict)"
    )


@contextlib.contextmanager
def zip_checksums_on():
    """torch.save writes a CRC-32 per record of its zip archive unless turned off globally; evamim's checkpoints
    always have them: :func:`~evamim.engine.checkpoint.file.load_checkpoint` verifies every byte against them."""
    get, set_ = (getattr(torch.serialization, name, None) for name in ("get_crc32_options", "set_crc32_options"))
    if get is None or set_ is None:  # older torch: always computed
        yield
        return
    previous = get()
    set_(True)
    try:
        yield
    finally:
        set_(previous)


def verify_zip_checksums(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless every record of the torch.save archive ``path`` matches the CRC-32
    written with it. torch.load does not check them (with ``mmap`` it does not even read the tensors), so a
    flipped byte (a failing disk, a bad copy) would otherwise load silently and train on garbage."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: it is truncated or not a torch.save archive "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the bytes of {damaged} do not match the checksum written "
                              "at save (a disk or copy error)")


def file_checksum(path: str | os.PathLike, chunk_bytes: int = 16 << 20) -> int:
    """CRC-32 of a file's bytes (zlib's, as in zip archives)."""
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def shard_checksums(directory: Path) -> dict[str, int]:
    """``{file name: CRC-32}`` of every file DCP wrote into ``directory`` (a collective with several processes):
    each process hashes the shards it wrote itself (``__<rank>_*.distcp``), the main process the index too."""
    from evamim.engine.distributed import all_gather_object, get_rank

    rank = get_rank()
    names = [shard.name for shard in directory.glob(f"__{rank}_*.distcp")] + ([".metadata"] if rank == 0 else [])
    merged: dict[str, int] = {}
    for part in all_gather_object({name: file_checksum(directory / name) for name in names}):
        merged.update(part)
    return merged


def verify_shard_checksums(path: Path, checksums: Mapping[str, int] | None) -> None:
    """Check this process's share of ``checksums`` (each process a different slice of the files, so together
    they read each file once). Checkpoints written before checksums were stored are not checked."""
    from evamim.engine.distributed import get_rank, get_world_size

    if checksums is None:
        return
    for name in sorted(checksums)[get_rank()::get_world_size()]:
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: {name} is missing (an interrupted copy?)")
        if file_checksum(shard) != checksums[name]:
            raise CheckpointError(f"checkpoint {path} is corrupt: the bytes of {name} do not match the checksum "
                                  "written at save (a disk or copy error)")


# The classes a DCP index (.metadata) pickles, which are all that may be unpickled from one: DCP reads it with
# plain pickle.load, so a planted .metadata would otherwise run code when a run resumes.
_SHARD_INDEX_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _ShardIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _SHARD_INDEX_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True  # dtypes pickle as the attribute of torch
        if not allowed:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which an evamim checkpoint index never does")
        return super().find_class(module, name)


def read_shard_index(path: str | os.PathLike):
    """The DCP ``Metadata`` of the sharded checkpoint directory ``path``, unpickled without running code.

    Only the classes a DCP index consists of may be unpickled, and the index must describe what evamim writes:
    tensors only (a bytes entry would be loaded with ``torch.load(weights_only=False)``) in shard files inside
    the directory. Raises :class:`CheckpointError` naming the directory otherwise.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    index = Path(path) / ".metadata"
    try:
        with open(index, "rb") as handle:
            metadata = _ShardIndexUnpickler(handle).load()
    except (*LOAD_ERRORS, AttributeError, ImportError, TypeError) as err:
        raise CheckpointError(f"refused the shard index {index}: {type(err).__name__}: {str(err)[:300]}") from None
    problem = None
    if not isinstance(metadata, Metadata):
        problem = f"it holds a {type(metadata).__name__}, not a DCP Metadata"
    elif not all(isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values()):
        problem = "it declares non-tensor entries, which evamim never writes"
    elif not all(isinstance(info, _StorageInfo) and Path(str(info.relative_path)).name == str(info.relative_path)
                 for info in (metadata.storage_data or {}).values()):
        problem = "it names shard files outside its directory"
    if problem:
        raise CheckpointError(f"refused the shard index {index}: {problem}")
    return metadata


@functools.cache
def _checked_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedShardReader(FileSystemReader):
        """DCP's file reader, with the index read by :func:`read_shard_index` instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_shard_index(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedShardReader


def shard_reader(path: Path):
    """A DCP storage reader of the checkpoint directory ``path`` whose index is checked (DCP is imported lazily)."""
    return _checked_reader_class()(str(path))


def check_shards(path: Path) -> None:
    """Raise :class:`CheckpointError` if ``path``'s DCP index is refused (:func:`read_shard_index`) or a shard
    is missing/truncated."""
    metadata = read_shard_index(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        actual = shard.stat().st_size if shard.is_file() else None
        if actual is None or actual < size:
            raise CheckpointError(f"{path}: shard {name} is {'missing' if actual is None else f'{actual} bytes'}, "
                                  f"the index needs {size} bytes (an interrupted copy or write?)")
