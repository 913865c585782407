"""Decode one image file safely: RGB PIL image out, or ``BadSample`` with the reason.

Every way an untrusted file can fail (missing, empty, not an image, truncated, a decompression
bomb, a corrupt header) becomes ``BadSample``, so callers can skip and count it. Errors in our own
code (transforms, collate) are deliberately *not* caught here: they are bugs, not bad data.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator

from PIL import Image

# Returns the smallest (width, height) the decoder may reduce an image of the given size to, or None
# to decode at full size. Built by the transforms, which know how many pixels the output needs.
DraftSize = Callable[[int, int], "tuple[int, int] | None"]


class BadSample(Exception):
    """A sample that cannot be used: unreadable, not an image, truncated, too large, incomplete."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
        raw = source if isinstance(source, bytes) else _read(source)
        if not raw:
            raise BadSample("empty file (0 bytes)")
        with _pixel_limit(max_pixels):
            image = Image.open(io.BytesIO(raw))
        file_format = str(image.format)
        width, height = image.size
    if width * height > max_pixels:
        raise BadSample(f"{width}x{height} = {width * height} pixels exceeds max_image_pixels {max_pixels}")
    # Outside the guard: a bug in draft_size is ours, not the file's, and must not be counted as bad data.
    target = draft_size(width, height) if draft_size is not None and file_format == "JPEG" else None
    with _untrusted_bytes(), _pixel_limit(max_pixels):
        if target is not None:
            image.draft("RGB", target)
        image = _to_rgb(image)
    return image, file_format, (width, height)


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
    if image.mode == "P" and "transparency" in image.info:
        # Palette transparency must go through RGBA, else PIL warns and may pick the wrong colours.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.load()
    return image
