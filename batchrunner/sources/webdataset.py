"""WebDataset tar shards: a `.tar`, a folder of them, or a brace pattern
(`shards/{00000..00099}.tar`).

A shard is read straight from the tar, headers only: members are grouped into
samples by key (the member name up to the first dot of its file name, as
WebDataset does), and a sample's image is its first jpg/jpeg/png/webp member
whose first bytes are an accepted image. The job names that member by its
byte range in the shard, so submitting it is a seek and a read. `.json`
members give the sample's fields (for `--prompt` templates), `.txt`/`.cls`
members a field named after the extension. `custom_id` is
`<shard file name>/<key>`.

Only uncompressed tars: a member of a `.tar.gz` has no byte range to read.
"""

from __future__ import annotations

import itertools
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchrunner.images import SNIFF_BYTES, other_format, sniff_media_type
from batchrunner.sources import Row

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
TEXT_EXTENSIONS = frozenset({"txt", "cls", "caption"})
MAX_FIELD_BYTES = 1 << 20
"""A .json or .txt member larger than this is not read as fields."""

_BRACES = re.compile(r"\{([^{}]*)\}")


class ShardError(ValueError):
    """A shard spec that names nothing, or a shard that is not a readable tar."""


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (zero padding kept);
    `{a,b}` lists alternatives; several groups multiply, in order."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def is_shard_spec(text: str) -> bool:
    return text.endswith(".tar") or (".tar" in text and "{" in text)


def shard_paths(spec: str) -> list[Path]:
    """The shards a spec names, in order. Raises ShardError when it names none
    or a named shard is missing."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards:
            raise ShardError(f"{spec}: no .tar shards in this folder")
        return shards
    shards = [Path(name) for name in expand_braces(spec)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ShardError(f"shard {missing[0]} not found{more}")
    return shards


def shard_names(shards: list[Path]) -> list[str]:
    """The name each shard's ids start with: its file name, or its path relative to
    the shards' common folder when two shards share a file name."""
    names = [p.name for p in shards]
    if len(set(names)) == len(names):
        return names
    base = Path(*_common_parts([p.resolve().parent.parts for p in shards]))
    return [p.resolve().relative_to(base).as_posix() for p in shards]


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return tuple(common)


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as WebDataset splits it."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def iter_samples(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo], BinaryIO]]:
    """(key, members, raw shard file) per sample, in shard order; memory holds one
    sample's headers, not the shard's."""
    with path.open("rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:")
        except tarfile.TarError as exc:
            raise ShardError(f"shard {path} is not an uncompressed tar ({exc})") from None
        with tar:
            key: str | None = None
            members: list[tarfile.TarInfo] = []
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    raise ShardError(f"shard {path} is damaged ({exc})") from None
                tar.members.clear()  # type: ignore[attr-defined]  # else every header is kept
                if member is None:
                    break
                if not member.isfile():
                    continue
                member_key, _ = split_key(member.name)
                if member_key != key and members:
                    assert key is not None
                    yield key, members, raw
                    members = []
                key = member_key
                members.append(member)
            if members and key is not None:
                yield key, members, raw


def read_at(raw: BinaryIO, offset: int, size: int) -> bytes:
    raw.seek(offset)
    return raw.read(size)


def sample_row(
    shard: Path,
    shard_name: str,
    key: str,
    members: list[tarfile.TarInfo],
    raw: BinaryIO,
    number: int,
) -> Row | None:
    """The Row of one sample, or None for a sample with no image-named member."""
    custom_id = f"{shard_name}/{key}"
    fields: dict[str, Any] = {"__key__": key}
    image: dict[str, Any] | None = None
    refused: str | None = None
    for member in members:
        _, ext = split_key(member.name)
        last = ext.rpartition(".")[2]
        if last == "json" and member.size <= MAX_FIELD_BYTES:
            try:
                data = orjson.loads(read_at(raw, member.offset_data, member.size))
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                fields.update({k: v for k, v in data.items() if k not in fields})
        elif last in TEXT_EXTENSIONS and member.size <= MAX_FIELD_BYTES:
            text = read_at(raw, member.offset_data, member.size).decode("utf-8", "replace")
            fields.setdefault(ext, text.strip())
        elif last in IMAGE_EXTENSIONS and image is None:
            head = read_at(raw, member.offset_data, min(SNIFF_BYTES, member.size))
            if sniff_media_type(head) is None:
                name = other_format(head)
                refused = (
                    f"{custom_id}: member {member.name!r} is "
                    + (f"a {name} image" if name else "not an image")
                    + ", not a JPEG, PNG or WebP image"
                )
                continue
            image = {
                "type": "path",
                "path": str(shard),
                "member": member.name,
                "offset": member.offset_data,
                "length": member.size,
            }
    if image is None and refused is None:
        return None
    return Row(custom_id, number, image, fields, None if image is not None else refused)


def read_shard(shard: Path, shard_name: str, start: int = 1) -> Iterator[Row]:
    """The rows of one shard, numbered from `start`."""
    counter = itertools.count(start)
    for key, members, raw in iter_samples(shard):
        row = sample_row(shard, shard_name, key, members, raw, next(counter))
        if row is not None:
            yield row
