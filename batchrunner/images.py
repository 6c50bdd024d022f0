"""Local image files: media type from the bytes, size limit, base64 encoding."""

from __future__ import annotations

import base64
from pathlib import Path

MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""Anthropic's limit per image, after decoding."""

ACCEPTED_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


class ImageError(ValueError):
    """A local image cannot be sent: missing, unreadable, wrong format, too big."""


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


def resolve_image_path(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def load_image_block_source(path: str, base_dir: Path) -> dict[str, str]:
    """Read a local image and return the base64 `source` the API expects.

    Called only when the job is submitted, so a million-image jobs file never
    holds images in memory.
    """
    full = resolve_image_path(path, base_dir)
    try:
        size = full.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"image {path!r} is {size} bytes, over the 5 MB limit")
        data = full.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {path!r} not found (looked at {full})") from None
    except IsADirectoryError:
        raise ImageError(f"image {path!r} is a directory") from None
    except OSError as exc:
        raise ImageError(f"image {path!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {path!r} is {len(data)} bytes, over the 5 MB limit")
    media_type = sniff_media_type(data[:16])
    if media_type is None:
        raise ImageError(f"file {path!r} is not a JPEG, PNG, GIF or WebP image")
    return {
        "type": "base64",
        "media_type": media_type,
        "data": base64.b64encode(data).decode("ascii"),
    }
