"""Image-caption tables: a CSV or TSV file with a header row naming a path column and a caption column.

The layout of open_clip's and EVA-CLIP's ``--dataset-type csv`` (``CsvDataset``: ``--csv-img-key filepath``,
``--csv-caption-key title``, ``--csv-separator``), with stricter reading: the first row names the columns,
every other row is one image and its caption; other columns are ignored. Relative paths are resolved against
the table's folder (open_clip reads them against the working directory), so a table can travel with its images.
Quoting follows Python's ``csv`` module (RFC 4180): a caption holding the delimiter, a quote or a line break is
quoted, ``"like ""this"", say"``.

Everything wrong with the table itself is refused here, in one line naming the file (and the line) and the fix:
a missing column (with the columns found), a header of one column (the wrong delimiter), a row with another
number of fields than the header (an unquoted delimiter inside a caption), an empty path or caption. An image
that is missing or unreadable is not the table's fault: it fails when loaded, is skipped and counted like any
bad file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from evamim.data.config import TABLE_SUFFIXES
from evamim.data.files import FileEntry

# Spellings of a delimiter that are awkward to type as one character on a command line or in YAML.
DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
# What a one-column header is checked for, to name the delimiter the file probably uses.
LIKELY_DELIMITERS = ("\t", ",", ";", "|")


def delimiter_name(delimiter: str) -> str:
    """How a message shows a delimiter: ``tab``, ``comma``, ... or the character quoted."""
    names = {value: name for name, value in DELIMITER_NAMES.items() if name.isalpha()}
    return names.get(delimiter, repr(delimiter))


def resolve_delimiter(path: str | os.PathLike, delimiter: str | None, key: str = "data.csv_delimiter") -> str:
    """The one-character delimiter of a table: ``delimiter`` (a character or a name: tab, comma, semicolon,
    pipe, ``\\t``), else the extension's (``.csv`` comma, ``.tsv`` tab).

    Raises:
        ValueError: ``delimiter`` is neither a character nor a known name, or it is None and the extension
            does not say (the path and ``key`` are named).
    """
    if delimiter is not None:
        value = DELIMITER_NAMES.get(str(delimiter).lower(), delimiter)
        if not isinstance(value, str) or len(value) != 1 or value in "\"\r\n":
            raise ValueError(f"{key}={delimiter!r} is not one character: give the character (',' or ';'), or "
                             f"one of {', '.join(DELIMITER_NAMES)}")
        return value
    suffix = Path(str(path)).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: the extension {suffix or '(none)'} does not say how columns are separated "
                         f"(.csv: comma, .tsv: tab); set {key}, e.g. {key}=tab")
    return TABLE_SUFFIXES[suffix]


def read_caption_table(
    table: str | os.PathLike,
    *,
    path_column: str,
    caption_column: str,
    delimiter: str | None = None,
    keys: tuple[str, str, str] = ("data.csv_path_column", "data.csv_caption_column", "data.csv_delimiter"),
) -> list[FileEntry]:
    """The (path, caption) entries of a caption table, in file order (see the module docstring).

    ``delimiter``: as ``resolve_delimiter`` takes it (None = from the extension). ``keys`` are the config keys
    the messages name as the fix (the path column's, the caption column's, the delimiter's).

    Raises:
        FileNotFoundError: the table is missing, or lists no images.
        ValueError: the table is not UTF-8 text, its header lacks a column, its delimiter is wrong, or a row
            has another number of fields than the header, or an empty path or caption (line number given).
    """
    path_key, caption_key, delimiter_key = keys
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"caption table {table} does not exist or is not a file (data.path)")
    sep = resolve_delimiter(table, delimiter, delimiter_key)
    base = table.resolve().parent
    try:
        with open(table, encoding="utf-8-sig", newline="") as handle:
            return _read_rows(csv.reader(handle, delimiter=sep), table, base, sep, path_column, caption_column,
                              path_key, caption_key, delimiter_key)
    except UnicodeDecodeError as error:
        raise ValueError(f"caption table {table} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except csv.Error as error:  # e.g. a NUL byte, or a quoted field never closed
        raise ValueError(f"caption table {table}: not readable as {delimiter_name(sep)}-separated text ({error}); "
                         "check its quoting") from None


def _read_rows(reader, table: Path, base: Path, sep: str, path_column: str, caption_column: str,
               path_key: str, caption_key: str, delimiter_key: str) -> list[FileEntry]:
    header = next((row for row in reader if row), None)
    if header is None:
        raise ValueError(f"caption table {table} is empty: its first line must name the columns "
                         f"({path_column}{sep}{caption_column})")
    header = [name.strip() for name in header]
    if len(header) == 1 and path_column not in header:  # nothing was split: most likely another delimiter
        raise ValueError(_one_column_message(table, header[0], sep, delimiter_key))
    columns = {}
    for wanted, key, what in ((path_column, path_key, "image paths"), (caption_column, caption_key, "captions")):
        if wanted not in header:
            found = ", ".join(repr(name) for name in header)
            raise ValueError(f"caption table {table} has no column {wanted!r} (columns found: {found}): set {key} "
                             f"to the column holding the {what}")
        columns[what] = header.index(wanted)
    entries = []
    for row in reader:
        if not row:  # a blank line
            continue
        where = f"{table}:{reader.line_num}"
        if len(row) != len(header):
            raise ValueError(f"{where}: {len(row)} fields, but the header names {len(header)} columns: quote a "
                             f"caption or path that holds the delimiter ({delimiter_name(sep)}), or fix the row")
        path, caption = row[columns["image paths"]].strip(), row[columns["captions"]]
        if not path:
            raise ValueError(f"{where}: empty image path in column {path_column!r}: fill it in or remove the row")
        if not caption.strip():
            raise ValueError(f"{where}: empty caption in column {caption_column!r} for {path}: fill it in or remove "
                             "the row (a pair without a caption teaches CLIP nothing)")
        entries.append(FileEntry(path if os.path.isabs(path) else str(base / path), caption=caption))
    if not entries:
        raise FileNotFoundError(f"caption table {table} lists no images: it has a header and no rows")
    return entries


def _one_column_message(table: Path, header: str, sep: str, delimiter_key: str) -> str:
    likely = [candidate for candidate in LIKELY_DELIMITERS if candidate != sep and candidate in header]
    if likely:
        hint = f"it looks {delimiter_name(likely[0])}-separated: set {delimiter_key}={delimiter_name(likely[0])}"
    else:
        hint = f"a header row naming the columns is missing, or they are not separated by {delimiter_name(sep)}"
    return (f"caption table {table}: one column found in the header ({header[:80]!r}) with the delimiter "
            f"{delimiter_name(sep)}: {hint}")


__all__ = ["delimiter_name", "read_caption_table", "resolve_delimiter"]
