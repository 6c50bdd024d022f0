"""Check and prepare local images with Pillow: format and size from the header,
cheap integrity checks, optional downsizing that respects EXIF orientation.

What the model accepts (SEGMIND_API.md, "The Claude 3.5 Sonnet model"): JPEG,
PNG, GIF and WebP, at most 5 MB per image after decoding the base64, at most
8000 pixels a side; an image costs about width x height / 750 input tokens.

Integrity checks stay cheap, one per format:
- JPEG: a decode at 1/8 scale (``Image.draft``): reads the whole entropy-coded
  stream, so a truncated file fails, at a fraction of a full decode's cost;
- PNG: ``Image.verify()``: every chunk's CRC up to IEND, without inflating;
- GIF: a decode of the first frame (the only one a resized GIF keeps);
- WebP: the RIFF length against the file length, and libwebp's own open.

Errors are `ImageError`s whose message names the path and the reason and whose
`kind` says which reason (for counts in a dry run).
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from batchrunner.images import (
    MAX_IMAGE_BYTES,
    SNIFF_BYTES,
    ImageError,
    other_format,
    sniff_media_type,
)

JPEG_QUALITY = 85
"""Quality of every JPEG and WebP this module encodes (resized images, and the
JPEG fallback used when that is the only way under 5 MB)."""

MAX_IMAGE_SIDE = 8000
"""Anthropic refuses images with a side over 8000 pixels."""

PIXELS_PER_IMAGE_TOKEN = 750

MAX_SOURCE_BYTES = 256 * 1024 * 1024
"""Largest file read for resizing (a bigger one is refused, not loaded into memory)."""

_PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WEBP"}


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says about a local image that passed the checks."""

    media_type: str
    width: int
    """As stored, before EXIF orientation is applied."""
    height: int
    file_bytes: int
    orientation: int = 1
    """EXIF orientation tag (1: none; 5 to 8 swap width and height)."""

    @property
    def oriented_size(self) -> tuple[int, int]:
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height

    def needs_resize(self, max_side: int | None) -> bool:
        return max_side is not None and max(self.width, self.height) > max_side

    def sent_size(self, max_side: int | None) -> tuple[int, int]:
        """Width and height of the image that would be sent (see `prepare_image`)."""
        if not self.needs_resize(max_side):
            return self.width, self.height
        assert max_side is not None
        return fit_within(*self.oriented_size, max_side)

    def estimated_sent_bytes(self, max_side: int | None) -> int:
        """The file's size, or for a resized image its size scaled by the pixel ratio."""
        if not self.needs_resize(max_side):
            return self.file_bytes
        width, height = self.sent_size(max_side)
        ratio = (width * height) / (self.width * self.height)
        return max(1, math.ceil(self.file_bytes * ratio))


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """The bytes to send for one image, and what was done to them."""

    media_type: str
    width: int
    height: int
    data: bytes
    resized: bool = False
    reencoded_as_jpeg: bool = False


def image_tokens(width: int, height: int) -> int:
    """Input tokens of one image: ceil(width x height / 750), the simulator's formula."""
    return math.ceil(width * height / PIXELS_PER_IMAGE_TOKEN)


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) so the longer side is `max_side`, rounding half up."""
    if max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, (2 * height * max_side + width) // (2 * width))
    return max(1, (2 * width * max_side + height) // (2 * height)), max_side


def sniff_file(path: Path, label: str | None = None) -> tuple[str | None, bytes]:
    """(accepted media type or None, first bytes) of a regular file.

    Raises ImageError naming `label` (default: the path) when the file is
    missing, unreadable, or not a regular file (a FIFO, a device, a folder).
    """
    label = str(path) if label is None else label
    with _open_regular(path, label) as (handle, _size):
        head = handle.read(SNIFF_BYTES)
    return sniff_media_type(head), head


def not_accepted_error(label: str, head: bytes) -> ImageError:
    """The error for a file whose magic bytes are none of the accepted formats."""
    name = other_format(head)
    if name is not None:
        return ImageError(
            f"image {label!r} is a {name} image, not a JPEG, PNG, GIF or WebP image",
            kind="unsupported_format",
        )
    return ImageError(f"file {label!r} is not a JPEG, PNG, GIF or WebP image", kind="not_an_image")


def probe_image(path: Path, label: str | None = None, *, quick: bool = True) -> ImageInfo:
    """Check an image from its header plus a structure check (`quick`, for a dry
    run: see `_structure_ok`), or the integrity check of its format.

    Does not decode the pixels (a JPEG is decoded at 1/8 scale when not
    `quick`). Raises ImageError naming `label` (default: the path) and the reason.
    """
    label = str(path) if label is None else label
    with _open_regular(path, label) as (handle, size):
        # Nothing larger can be sent, even downsized; Pillow reads at most this much.
        if size > MAX_SOURCE_BYTES:
            raise _too_large(label, size, MAX_SOURCE_BYTES)
        head = handle.read(SNIFF_BYTES)
        media_type = sniff_media_type(head)
        if media_type is None:
            raise not_accepted_error(label, head)
        handle.seek(0)
        return _probe(handle, media_type, size, label, quick=quick)


def probe_image_bytes(data: bytes, label: str, *, quick: bool = True) -> ImageInfo:
    """`probe_image` for bytes already read (a tar member, a Parquet cell)."""
    if len(data) > MAX_SOURCE_BYTES:
        raise _too_large(label, len(data), MAX_SOURCE_BYTES)
    media_type = sniff_media_type(data[:SNIFF_BYTES])
    if media_type is None:
        raise not_accepted_error(label, data[:SNIFF_BYTES])
    return _probe(io.BytesIO(data), media_type, len(data), label, quick=quick)


def prepare_image(
    path: Path, label: str | None = None, max_side: int | None = None
) -> PreparedImage:
    """The bytes to send for a local image, checked, and downsized when asked.

    Without `max_side` the file's own bytes are sent, and a file over 5 MB or
    with a side over 8000 pixels is refused. With `max_side`, an image whose
    longer side is larger is resized to it (EXIF orientation applied first),
    keeping its format; it is re-encoded as JPEG (quality `JPEG_QUALITY`) only
    when its own format stays over 5 MB. Animated images keep their first frame
    when resized.
    """
    label = str(path) if label is None else label
    limit = MAX_IMAGE_BYTES if max_side is None else MAX_SOURCE_BYTES
    with _open_regular(path, label) as (handle, size):
        if size > limit:
            raise _too_large(label, size, limit)
        # Capped: a file that grew since the fstat is refused, not read to its end.
        data = handle.read(limit + 1)
    return prepare_image_bytes(data, label, max_side)


def prepare_image_bytes(data: bytes, label: str, max_side: int | None = None) -> PreparedImage:
    """`prepare_image` for bytes already read (an image fetched from a URL):
    the same checks and the same downsizing."""
    limit = MAX_IMAGE_BYTES if max_side is None else MAX_SOURCE_BYTES
    if len(data) > limit:
        raise _too_large(label, len(data), limit)
    media_type = sniff_media_type(data[:SNIFF_BYTES])
    if media_type is None:
        raise not_accepted_error(label, data[:SNIFF_BYTES])
    # The header first: an image to be re-encoded is checked by the decode that
    # re-encodes it (a truncated or corrupt one fails there), so a separate
    # checking decode would only double the work (issue 14: 1.7x a Pillow loop).
    info = _probe(io.BytesIO(data), media_type, len(data), label, quick=True)
    if not info.needs_resize(max_side) and len(data) <= MAX_IMAGE_BYTES:
        # Sent as it is: the thorough check.
        info = _probe(io.BytesIO(data), media_type, len(data), label)
        _check_side(info.width, info.height, label)
        return PreparedImage(media_type, info.width, info.height, data)
    return _reencode(data, info, label, max_side)


# --------------------------------------------------------------------------- internals


_O_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
"""O_NONBLOCK: opening a FIFO swapped in after the stat returns at once instead of
waiting for a writer (where the flag exists; a no-op for regular files)."""

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@contextmanager
def _open_regular(path: Path, label: str) -> Iterator[tuple[BinaryIO, int]]:
    """(open file, its size) of a regular file; anything else is an ImageError.

    Only regular files are read: `/dev/zero` never ends and opening a FIFO
    blocks until a writer comes (Ctrl-C does not interrupt it), so the type is
    checked before opening, and again with fstat on what was opened.
    """
    try:
        _check_regular(os.stat(path).st_mode, label)
        fd = os.open(path, _O_FLAGS)
    except FileNotFoundError:
        raise ImageError(
            f"image {label!r} not found (looked at {path})", kind="not_found"
        ) from None
    except OSError as exc:
        raise ImageError(
            f"image {label!r} cannot be read: {exc.strerror or exc}", kind="unreadable"
        ) from None
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode, label)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        yield handle, info.st_size


def _check_regular(mode: int, label: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise ImageError(f"image {label!r} is a directory", kind="not_found")
    what = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    raise ImageError(f"image {label!r} is {what}, not a regular file", kind="not_a_file")


def _too_large(label: str, size: int, limit: int) -> ImageError:
    if limit == MAX_IMAGE_BYTES:
        return ImageError(
            f"image {label!r} is {size:,} bytes, over the 5 MB limit "
            "(--max-image-side can downsize it)",
            kind="too_large",
        )
    return ImageError(
        f"image {label!r} is {size:,} bytes, over the {limit // 2**20} MB batchrunner reads "
        "to downsize an image",
        kind="too_large",
    )


@contextmanager
def _pillow(label: str) -> Iterator[None]:
    """Pillow's errors as ImageErrors; its decompression-bomb warning silenced
    (our own side limit answers such images)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"image {label!r} has too many pixels to be decoded safely", kind="too_many_pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image {label!r} is corrupt: its header cannot be read", kind="corrupt"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ImageError(f"image {label!r} is truncated ({text})", kind="truncated") from None
        raise ImageError(f"image {label!r} is corrupt ({text})", kind="corrupt") from None


def _probe(
    handle: BinaryIO, media_type: str, size: int, label: str, *, quick: bool = False
) -> ImageInfo:
    start = handle.tell()
    fmt = [_PIL_FORMATS[media_type]]
    with _pillow(label):
        if media_type == "image/webp":
            _check_riff_length(handle, size, label)
            handle.seek(start)
        with Image.open(handle, formats=fmt) as image:  # reads the header only
            width, height = image.size
            orientation = _orientation(image)
            if quick and _structure_ok(handle, start, media_type, size, label):
                return ImageInfo(media_type, width, height, size, orientation)
            if media_type == "image/jpeg":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
            elif media_type == "image/gif":
                image.load()
        if media_type == "image/png":
            handle.seek(start)
            with Image.open(handle, formats=fmt) as image:
                image.verify()  # must come straight after open
    return ImageInfo(media_type, width, height, size, orientation)


def _structure_ok(handle: BinaryIO, start: int, media_type: str, size: int, label: str) -> bool:
    """The dry run's check, from a few reads instead of a decode: a JPEG ends with
    its EOI marker, a GIF with its trailer, a PNG's chunk lengths lead from the
    signature to an IEND that ends the file (a WebP's RIFF length was checked).

    True: the file is whole. False: it is not plainly whole (data after the
    JPEG's EOI, say, as phones append): the caller runs the thorough check.
    Raises ImageError for a PNG whose chunks run past the end of the file.
    """
    if media_type == "image/webp":
        return True
    if media_type == "image/png":
        return _png_chunks_ok(handle, start, size, label)
    handle.seek(start + max(0, size - 16))
    tail = handle.read(16).rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9" if media_type == "image/jpeg" else b"\x3b")


def _png_chunks_ok(handle: BinaryIO, start: int, size: int, label: str) -> bool:
    offset = 8  # the signature
    while offset + 12 <= size:
        handle.seek(start + offset)
        header = handle.read(8)
        length = int.from_bytes(header[:4], "big")
        offset += 12 + length
        if header[4:8] == b"IEND":
            return offset <= size
    raise ImageError(
        f"image {label!r} is truncated (its chunks run past the file's {size:,} bytes)",
        kind="truncated",
    )


def _check_riff_length(handle: BinaryIO, size: int, label: str) -> None:
    header = handle.read(12)
    declared = int.from_bytes(header[4:8], "little") + 8
    if declared > size:
        raise ImageError(
            f"image {label!r} is truncated (its RIFF header says {declared:,} bytes, "
            f"the file has {size:,})",
            kind="truncated",
        )


def _orientation(image: Image.Image) -> int:
    # A PNG whose eXIf chunk comes after the pixels would have to be decoded to
    # find it: such a PNG counts as unrotated (as most viewers show it).
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_side(width: int, height: int, label: str) -> None:
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(
            f"image {label!r} is {width}x{height} pixels, over the {MAX_IMAGE_SIDE} pixel "
            "limit (--max-image-side can downsize it)",
            kind="too_large",
        )


def _reencode(data: bytes, info: ImageInfo, label: str, max_side: int | None) -> PreparedImage:
    target = info.sent_size(max_side)
    _check_side(*target, label)
    fmt = _PIL_FORMATS[info.media_type]
    with _pillow(label), Image.open(io.BytesIO(data), formats=[fmt]) as source:
        if fmt == "JPEG":
            # Decode at the smallest DCT scale still at least as large as the target.
            draft = target if info.orientation < 5 else (target[1], target[0])
            source.draft(source.mode, draft)
        source.load()
        image = ImageOps.exif_transpose(source)
        image = _normalise_mode(image)
        if image.size != target:
            image = image.resize(target, Image.Resampling.LANCZOS)
        encoded = _encode(image, fmt)
        media_type = info.media_type
        as_jpeg = False
        if len(encoded) > MAX_IMAGE_BYTES and fmt != "JPEG":
            encoded = _encode(_flatten(image), "JPEG")
            media_type = "image/jpeg"
            as_jpeg = True
    if len(encoded) > MAX_IMAGE_BYTES:
        raise ImageError(
            f"image {label!r} is still {len(encoded):,} bytes at {target[0]}x{target[1]} "
            f"pixels as JPEG quality {JPEG_QUALITY}, over the 5 MB limit "
            "(a smaller --max-image-side would help)",
            kind="too_large",
        )
    return PreparedImage(
        media_type,
        target[0],
        target[1],
        encoded,
        resized=info.needs_resize(max_side),
        reencoded_as_jpeg=as_jpeg,
    )


def _normalise_mode(image: Image.Image) -> Image.Image:
    """A mode that resizes with a proper filter and saves in every accepted format."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    has_alpha = "transparency" in image.info or image.mode in ("PA", "RGBa", "La")
    return image.convert("RGBA" if has_alpha else "RGB")


def _flatten(image: Image.Image) -> Image.Image:
    """JPEG has no alpha: composite on white."""
    if image.mode in ("RGB", "L"):
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        _flatten(image).save(buffer, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "WEBP":
        image.save(buffer, "WEBP", quality=JPEG_QUALITY)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()
