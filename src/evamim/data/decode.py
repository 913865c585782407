"""Decode one image file safely: RGB PIL image out, or ``BadSample`` with the reason.

Every way an untrusted file can fail (missing, empty, not an image, truncated, a decompression
bomb, a corrupt header, a symlink loop) becomes ``BadSample``, so callers can skip and count it.
A transform that raises on a sample (``transform_guard``) becomes ``TransformFailed``, a
``BadSample`` naming the error and where it was raised: a rare failure of an augmentation on one
image must not kill a run of days, and a transform that fails on every image still stops it, through
the loader's failure-fraction check, with the error in the message.

High bit-depth images (16-bit ``I;16``, 32-bit integer ``I``, 32-bit float ``F``) are scaled to 8 bits
by their range (see ``to_8bit``); PIL's own conversion would clip them (a 16-bit PNG came out white).
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

# Returns the smallest (width, height) the decoder may reduce an image of the given size to, or None
# to decode at full size. Built by the transforms, which know how many pixels the output needs.
DraftSize = Callable[[int, int], "tuple[int, int] | None"]


class BadSample(Exception):
    """A sample that cannot be used: unreadable, not an image, truncated, too large, incomplete."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TransformFailed(BadSample):
    """A transform raised on one sample (the exception type, message and where it was raised)."""


@contextlib.contextmanager
def transform_guard(what: str = "transform") -> Iterator[None]:
    """Turn any exception of the transform code run inside into ``TransformFailed``.

    The reason reads ``transform failed: ValueError: ... (at ImageOps.py:623 in posterize)``: the
    innermost frame names the operation that failed, which the message alone often does not.
    """
    try:
        yield
    except BadSample:
        raise
    # Augmentation libraries raise many types on unusual inputs (ValueError, OSError, ZeroDivisionError,
    # RuntimeError ...); every one of them costs one sample, not the run. See the module docstring.
    except Exception as error:  # noqa: BLE001
        raise TransformFailed(f"{what} failed: {type(error).__name__}: {error}{_raised_at(error)}") from error


def _raised_at(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Apply ``max_pixels`` to PIL's bomb check for one load, and make its warning an error.

    PIL only has a process-wide limit; setting it around each load gives every dataset its own
    limit. Data-loading workers are single-threaded, so the swap cannot race with another load.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int,
    draft_size: DraftSize | None = None,
) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded RGB image.

    Args:
        source: a path, or the encoded bytes (e.g. a tar member).
        max_pixels: images with more pixels are refused (decompression-bomb guard).
        draft_size: for JPEGs, lets libjpeg decode at a reduced scale that is still at least this
            size (see ``evamim.data.transforms.draft_size_for_crop``).

    Raises:
        BadSample: with a one-line reason, for anything wrong with the file itself.
    """
    return decode_image_and_format(source, max_pixels=max_pixels, draft_size=draft_size)[0]


def decode_image_and_format(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int,
    draft_size: DraftSize | None = None,
) -> tuple[Image.Image, str, tuple[int, int]]:
    """Like ``decode_image``, also returning the file's format as PIL names it ("JPEG", "PNG" ...)
    and its stored (width, height), which a JPEG draft may have reduced in the returned image."""
    with _untrusted_bytes():
        image = _open(source, max_pixels)
        file_format = str(image.format)
        width, height = image.size
    if width * height > max_pixels:
        raise BadSample(f"{width}x{height} = {width * height} pixels exceeds max_image_pixels {max_pixels}")
    # The draft size comes from the transform (the pre-training plan draws its crop here): its failures
    # are the transform's, reported as such, not as a broken file.
    with transform_guard("transform (choosing the JPEG draft size)"):
        target = draft_size(width, height) if draft_size is not None and file_format == "JPEG" else None
    with _untrusted_bytes(), _pixel_limit(max_pixels):
        if target is not None:
            image.draft("RGB", target)
        image = _to_rgb(image)
    return image, file_format, (width, height)


def load_untrusted(source: str | os.PathLike | bytes, *, max_pixels: int) -> Image.Image:
    """A path or encoded bytes as a fully loaded PIL image in its stored mode (no conversion: a
    segmentation label keeps its class indices). Raises ``BadSample`` like ``decode_image``."""
    with _untrusted_bytes():
        image = _open(source, max_pixels)
        with _pixel_limit(max_pixels):
            image.load()
    return image


def _open(source: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    """The lazily opened image of a path or encoded bytes (header read, pixels not yet decoded); call inside
    ``_untrusted_bytes()``. An empty file is a BadSample."""
    raw = source if isinstance(source, bytes) else _read(source)
    if not raw:
        raise BadSample("empty file (0 bytes)")
    with _pixel_limit(max_pixels):
        return Image.open(io.BytesIO(raw))


@contextlib.contextmanager
def _untrusted_bytes() -> Iterator[None]:
    """Turn every failure of reading or parsing a file into ``BadSample`` with a one-line reason."""
    try:
        yield
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample(f"decompression bomb refused: {error}") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image PIL can identify") from None
    # Only the file read and PIL's parsers run inside this guard; corrupt bytes make them raise many
    # types (OSError for truncation, SyntaxError, ValueError, struct.error, IndexError, EOFError ...).
    except Exception as error:  # noqa: BLE001 - see the comment above
        raise BadSample(f"{type(error).__name__}: {error}") from None


def _read(path: str | os.PathLike) -> bytes:
    # Reading the bytes first (instead of Image.open(path)) closes the file at once and lets the
    # same code decode tar members.
    with open(path, "rb") as file:
        return file.read()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Load the pixels (forcing truncation errors to surface now) and convert to RGB."""
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        # Palette transparency must go through RGBA, else PIL warns and may pick the wrong colours.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.load()
    return image


# 16-bit sample -> 8 bits, by the full range (65535 -> 255). PIL opens 16-bit PNG, TIFF and PGM files
# as I;16 or I. A lookup table: no float copy of a possibly huge image.
_MAX_16BIT = 65535
_16BIT_TO_8BIT = np.rint(np.arange(_MAX_16BIT + 1) * (255 / _MAX_16BIT)).astype(np.uint8)


def to_8bit(image: Image.Image) -> Image.Image:
    """A one-channel high bit-depth image (``I;16*``, ``I``, ``F``) as 8-bit ``L``, scaled by its range.

    PIL's ``convert`` clips these to 0..255, so a 16-bit image turns white. The range used:
    - ``I;16``, ``I;16B``, ``I;16L``...: 0..65535 (65535 -> 255);
    - ``I`` (32-bit integer) whose values all lie in 0..65535: 0..65535 too, since that is how PIL
      opens 16-bit data (e.g. 16-bit PGM); otherwise the image's own minimum..maximum (there is no
      standard white for 32-bit integers);
    - ``F`` (32-bit float) whose values all lie in 0..1: 0..1; otherwise its own minimum..maximum;
      NaN and -inf read as the smallest finite value, +inf as the largest.
    A constant image outside those ranges maps to black.
    """
    values = np.asarray(image)
    if image.mode.startswith("I") and _fits_16_bits(image.mode, values):
        return Image.fromarray(_16BIT_TO_8BIT[values])
    return Image.fromarray(_stretch_to_8bit(values.astype(np.float32), unit_range=image.mode == "F"))


def _fits_16_bits(mode: str, values: np.ndarray) -> bool:
    return mode.startswith("I;16") or not values.size or (values.min() >= 0 and values.max() <= _MAX_16BIT)


def _stretch_to_8bit(values: np.ndarray, *, unit_range: bool) -> np.ndarray:
    """``values`` scaled from their own minimum..maximum (or 0..1, when ``unit_range`` and they fit) to 0..255."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if finite.size < values.size:  # float images may hold NaN or infinities
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if unit_range and 0.0 <= low and high <= 1.0:
        low, high = 0.0, 1.0
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
