"""Local image files: media type from the bytes, size limit, base64 encoding
(checks and resizing in `batchrunner.imagecheck`)."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""Anthropic's limit per image, after decoding."""

SNIFF_BYTES = 32
"""Bytes read to recognise a format from its magic bytes."""

ACCEPTED_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FORMAT_NAMES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WebP"}

# Image formats the model refuses, recognised by their magic bytes, so that the
# reason says "a TIFF image" rather than "not an image".
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
)


class ImageError(ValueError):
    """A local image cannot be sent: missing, unreadable, wrong format, too big,
    corrupt or truncated. `kind` names the reason for counting (a dry run)."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def sniff_media_type(head: bytes) -> str | None:
    """Media type from magic bytes; None for anything the model refuses."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def other_format(head: bytes) -> str | None:
    """Name of an image format the model refuses, from its magic bytes."""
    for offset, magic, name in _OTHER_FORMATS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def resolve_image_path(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def load_image_block_source(
    path: str, base_dir: Path, max_side: int | None = None
) -> dict[str, str]:
    """Read a local image, check it, and return the base64 `source` the API expects.

    Called only when the job is submitted, so a million-image jobs file never
    holds images in memory. With `max_side`, an image whose longer side is
    larger is downsized first (see `imagecheck.prepare_image`). Raises
    ImageError naming `path` and the reason.
    """
    # Imported here: Pillow is only needed once an image is actually sent.
    from batchrunner.imagecheck import prepare_image

    prepared = prepare_image(resolve_image_path(path, base_dir), path, max_side)
    return base64_source(prepared.media_type, prepared.data)


def base64_source(media_type: str, data: bytes) -> dict[str, str]:
    """The `source` of an image block that carries the image itself."""
    return {
        "type": "base64",
        "media_type": media_type,
        "data": base64.b64encode(data).decode("ascii"),
    }


def max_side_of(source: dict[str, object]) -> int | None:
    """The optional `max_side` of a `{"type": "path"}` image source (a positive
    integer: downsize the image so its longer side is at most that)."""
    value = source.get("max_side")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImageError(
            f"image {source.get('path')!r}: max_side must be a positive integer, got {value!r}",
            kind="invalid_source",
        )
    return value


def image_blocks(body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The body's image blocks whose source is an object with a type."""
    for message in body.get("messages", ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "image":
                    source = block.get("source")
                    if isinstance(source, dict) and "type" in source:
                        yield block
