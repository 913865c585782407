"""Reading one WebDataset tar shard after another, with every kind of damage reported, never silent.

``shard_events`` turns a stream of shard URLs into samples (webdataset's raw dicts), an ``end`` event
after each shard, and one ``error`` event per damaged shard: a shard that cannot be opened or is not a
tar, or a corrupt header or truncated data in the middle, which Python's tarfile takes for the end of
the archive. The error names the shard, the byte offset and the last member read.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any


def require_webdataset():
    """The ``webdataset`` module, or an error saying how to install it."""
    try:
        import webdataset
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "reading or writing WebDataset shards needs the webdataset package: pip install 'evamim[data]'"
        ) from error
    return webdataset


def _error_text(error: BaseException) -> str:
    # Only the first argument: webdataset appends the stream and URL to the others.
    first = error.args[0] if error.args else ""
    if isinstance(error, OSError) and error.strerror:  # args[0] of an OSError is its errno
        first = error.strerror
    return f"{type(error).__name__}: {first}"


def shard_events(urls: Iterable[str], *, give_up_after_empty: int | None = None) -> Iterator[tuple[str, Any]]:
    """``("sample", raw dict)``, ``("end", url)`` after each shard, ``("error", "url: reason")``.

    Every way a shard can be damaged (unopenable, not a tar, a corrupt header or truncated data in
    the middle, duplicate members) becomes one ``error`` event naming the shard and, when the tar
    data could be partly read, the byte offset and the last member read.
    """
    require_webdataset()
    from webdataset.tariterators import group_by_keys

    empty_in_a_row = 0
    for url in urls:
        errors: list[str] = []

        def handler(error: BaseException, url: str = url, errors: list[str] = errors) -> bool:
            errors.append(f"{url}: {_error_text(error)}")
            return True  # skip what is broken, keep reading

        count = 0
        for raw in group_by_keys(tar_members(url, errors), handler=handler):
            count += 1
            yield "sample", raw
        for error in errors:
            yield "error", error
        yield "end", url
        empty_in_a_row = 0 if count else empty_in_a_row + 1
        if give_up_after_empty is not None and empty_in_a_row >= give_up_after_empty:
            raise RuntimeError(f"the last {empty_in_a_row} shards read held no samples (last: {url}); check data.path")


class _WatchedHeader(tarfile.TarInfo):
    """Records on the archive why reading headers stopped: tarfile keeps it to itself, and treats a
    corrupt header after the first member exactly like the end of the archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as error:
            tarfile_.stopped_at = (error, tarfile_.offset)  # type: ignore[attr-defined]
            raise


# Members webdataset skips too: its metadata, named like ``__name__``.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def tar_members(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The regular members of shard ``url`` as ``{"fname", "data", "__url__"}`` (webdataset's format).

    The shard is read as a stream (so URLs and ``pipe:`` commands work). Damage is appended to
    ``errors`` as ``url: what, at byte N, after member M; the rest of the shard was not read``: a
    corrupt header in the middle used to end the shard silently, losing every sample after it.
    """
    from webdataset.gopen import gopen

    try:
        stream = gopen(url)
    except Exception as error:  # noqa: BLE001 - any failure to open is this shard's, reported with its URL
        errors.append(f"{url}: cannot open: {_error_text(error)}")
        return
    first_error, archive, member, last_read, finished = len(errors), None, None, None, False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedHeader)
        for member in archive:
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            data = archive.extractfile(member).read()
            last_read = member.name
            yield {"fname": member.name, "data": data, "__url__": url}
            archive.members = []  # a streamed archive would otherwise keep every header in memory
        damage = _stop_reason(archive)
        if damage:
            errors.append(f"{url}: {damage}{_after(last_read)}; the rest of the shard was not read")
        finished = True
    # Corrupt bytes make tarfile and the decompressors raise many types (ReadError, EOFError,
    # zlib.error, OSError from a failing pipe ...): all of them are this shard's damage.
    except Exception as error:  # noqa: BLE001
        errors.append(f"{url}: {_read_failure(error, archive, member, last_read)}")
        finished = True
    finally:
        _close(stream, url, errors if finished else None, first_error)


def _read_failure(error: Exception, archive: tarfile.TarFile | None, member: Any, last_read: str | None) -> str:
    if archive is None:  # the first header already failed
        return f"not a readable tar archive ({_error_text(error)})"
    if member is not None and member.name != last_read:  # failed inside this member's data
        where = f" in member {member.name} (header at byte {member.offset})"
    else:
        where = f" at byte {archive.offset}"
    return f"{_error_text(error)}{where}{_after(last_read)}; the rest of the shard was not read"


def _stop_reason(archive: tarfile.TarFile) -> str | None:
    """What ended a streamed archive early, or None when it ended at its end."""
    stopped = getattr(archive, "stopped_at", None)
    if stopped is None:
        return None
    error, offset = stopped
    if isinstance(error, (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)):
        return f"corrupt tar header at byte {offset} ({error})"
    if isinstance(error, tarfile.EOFHeaderError) and _data_after_end(archive):
        return f"an end-of-archive block at byte {offset} is followed by more data"
    return None  # EOFHeaderError or EmptyHeaderError: the archive's regular end


def _data_after_end(archive: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows the end-of-archive block (normally < 10 KiB)."""
    while chunk := archive.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            return True
    return False


def _after(member: str | None) -> str:
    return f", after member {member}" if member else ", before its first member"


def _close(stream: Any, url: str, errors: list[str] | None, first_error: int) -> None:
    """Close a shard stream; a ``pipe:`` command's failing exit status is reported when the shard was
    read to its end (``errors`` given): added to this shard's damage line, whose likely cause it
    is, else on a line of its own. After stopping early (a quota reached) the command was cut off on
    purpose, and its status means nothing."""
    try:
        stream.close()
    except Exception as error:  # noqa: BLE001 - webdataset's Pipe raises OSError for a bad exit status
        if errors is None:
            return
        if len(errors) > first_error:
            errors[-1] += f" (closing it: {_error_text(error)})"
        else:
            errors.append(f"{url}: {_error_text(error)}")
