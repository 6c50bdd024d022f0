"""Image preparation at submit: read each image of a body (a file, a byte range
of a tar shard, a Parquet cell, a URL), check it, downsize it, base64-encode it.

Where the work runs:
- with resizing (`max_side` on some image), in a pool of processes, one per
  core: decoding and resizing hold the GIL long enough that threads would keep
  one core busy. The pool's queue is bounded by its callers, the submit
  workers (each prepares one body, then waits for the rate budget), so at most
  that many bodies are in memory and preparation runs ahead of the budget;
- without resizing, a read and a base64 encode, in a thread.

Parquet cells are read a row group's column at a time and kept while
consecutive rows of the same group are asked for (the reader submits in row
order), so a file is read about once, not once per row.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from batchrunner.fetch import read_cap
from batchrunner.images import (
    ImageError,
    base64_source,
    image_blocks,
    max_side_of,
    resolve_image_path,
)
from batchrunner.threads import run_blocking

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """The process pool (made on first use, kept for the process's life)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # forkserver: workers do not inherit the parent's threads, sockets or memory.
            method = (
                "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
            )
            _pool = ProcessPoolExecutor(
                max_workers=workers or cores(),
                mp_context=multiprocessing.get_context(method),
            )
        return _pool


def shutdown_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(cancel_futures=True)
            _pool = None


# --------------------------------------------------------------------------- reading


def is_member(source: Mapping[str, Any]) -> bool:
    """A byte range of a file (a tar member) or a Parquet cell, not a whole file."""
    return "offset" in source or "row" in source


def source_label(source: Mapping[str, Any]) -> str:
    if "member" in source:
        return f"{source['path']}:{source['member']}"
    if "row" in source:
        return f"{source['path']} row {source['row']} column {source.get('column')!r}"
    return str(source.get("path"))


def read_member(source: Mapping[str, Any], base_dir: Path) -> bytes:
    """The bytes of a tar member (byte range) or a Parquet cell."""
    path = resolve_image_path(str(source["path"]), base_dir)
    label = source_label(source)
    if "row" in source:
        return _parquet_cell(path, int(source["row"]), str(source.get("column")), label)
    from batchrunner.imagecheck import MAX_SOURCE_BYTES

    offset, length = source.get("offset"), source.get("length")
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise ImageError(f"image {label!r}: offset and length must be whole numbers")
    if length > MAX_SOURCE_BYTES:
        raise ImageError(f"image {label!r} is {length:,} bytes, too large", kind="too_large")
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except FileNotFoundError:
        raise ImageError(
            f"image {label!r} not found (looked at {path})", kind="not_found"
        ) from None
    except OSError as exc:
        raise ImageError(f"image {label!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) != length:
        raise ImageError(f"image {label!r} is truncated (the shard ends early)", kind="truncated")
    return data


class _RowGroupCache:
    """The last row group column read, per process (see the module's docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[str, int, str, int] | None = None
        self.values: list[Any] = []
        self.starts: dict[tuple[str, int], list[int]] = {}


_cache = _RowGroupCache()


def _parquet_cell(path: Path, row: int, column: str, label: str) -> bytes:
    from batchrunner.sources.parquet import ParquetSourceError, import_pyarrow

    try:
        pq = import_pyarrow()
    except ParquetSourceError as exc:
        raise ImageError(str(exc)) from None
    try:
        stat = path.stat()
        with _cache.lock:
            file_key = (str(path), stat.st_mtime_ns)
            pq_file = pq.ParquetFile(str(path))
            starts = _cache.starts.get(file_key)
            if starts is None:
                starts, total = [], 0
                for group in range(pq_file.metadata.num_row_groups):
                    starts.append(total)
                    total += pq_file.metadata.row_group(group).num_rows
                starts.append(total)
                _cache.starts = {file_key: starts}
            if not 0 <= row < starts[-1]:
                raise ImageError(f"image {label!r}: the file has {starts[-1]} rows", "not_found")
            group = max(g for g in range(len(starts) - 1) if starts[g] <= row)
            key = (str(path), stat.st_mtime_ns, column, group)
            if _cache.key != key:
                _cache.values = (
                    pq_file.read_row_group(group, columns=[column]).column(0).to_pylist()
                )
                _cache.key = key
            value = _cache.values[row - starts[group]]
    except FileNotFoundError:
        raise ImageError(f"image {label!r} not found", kind="not_found") from None
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"image {label!r} cannot be read: {exc}") from None
    if isinstance(value, dict):  # a Hugging Face Image struct: bytes, else a path
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            return _whole_file(path.parent / str(value["path"]), label)
    if not isinstance(value, bytes) or not value:
        raise ImageError(f"image {label!r} is empty", kind="not_an_image")
    return value


def _whole_file(path: Path, label: str) -> bytes:
    from batchrunner.imagecheck import MAX_SOURCE_BYTES

    try:
        with path.open("rb") as handle:
            return handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise ImageError(
            f"image {label!r} ({path}) cannot be read: {exc.strerror or exc}"
        ) from None


# --------------------------------------------------------------------------- preparing


def prepare_source(
    source: Mapping[str, Any], base_dir: Path, data: bytes | None = None
) -> dict[str, str]:
    """The base64 `source` for one image: a path source read here, or `data` (a
    URL's bytes) given. Runs in a worker process or a thread."""
    from batchrunner.imagecheck import prepare_image, prepare_image_bytes

    max_side = max_side_of(dict(source))
    if data is not None:
        prepared = prepare_image_bytes(data, _url_label(source), max_side)
    elif is_member(source):
        prepared = prepare_image_bytes(
            read_member(source, base_dir), source_label(source), max_side
        )
    else:
        label = str(source["path"])
        prepared = prepare_image(resolve_image_path(label, base_dir), label, max_side)
    return base64_source(prepared.media_type, prepared.data)


def _url_label(source: Mapping[str, Any]) -> str:
    url = str(source.get("url", ""))
    return url if len(url) <= 120 else url[:117] + "..."


def needs_preparing(body: Mapping[str, Any]) -> bool:
    return any(b["source"]["type"] in ("path", "url") for b in image_blocks(body))


async def prepare_one(
    source: Mapping[str, Any], base_dir: Path, data: bytes | None
) -> dict[str, str]:
    """`prepare_source` in the process pool when it resizes, else in a thread."""
    if source.get("max_side") is not None:
        loop = asyncio.get_running_loop()
        call = functools.partial(prepare_source, dict(source), base_dir, data)
        return await loop.run_in_executor(prepare_pool(), call)
    return await run_blocking(prepare_source, dict(source), base_dir, data)


async def materialize(body: dict[str, Any], base_dir: Path, fetcher: Any) -> dict[str, Any]:
    """The body to send: every path or URL image read (URLs through `fetcher`, an
    `ImageFetcher`), checked, maybe downsized, base64-encoded. The job's own body
    is left untouched. Raises ImageError naming the image."""
    import copy

    sent = copy.deepcopy(body)
    done: dict[str, dict[str, str]] = {}
    for block in image_blocks(sent):
        source = block["source"]
        if source["type"] == "url":
            url = source.get("url")
            if url not in done:
                data = await fetcher.fetch_bytes(url, read_cap(source.get("max_side")))
                done[url] = await prepare_one(source, base_dir, data)
            block["source"] = done[url]
        elif source["type"] == "path":
            block["source"] = await prepare_one(source, base_dir, None)
    return sent
