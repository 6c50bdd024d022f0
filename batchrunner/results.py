"""Result lines (DESIGN.md section 3) and the repair-and-load of an existing results file."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from batchrunner.errors import ResultsFileError


def iso_utc(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def result_line(
    custom_id: str,
    result: dict[str, Any],
    *,
    request_id: str | None = None,
    attempts: int = 0,
    submitted_at: float | None = None,
    finished_at: float,
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "result": result,
        "request_id": request_id,
        "attempts": attempts,
        "submitted_at": iso_utc(submitted_at) if submitted_at is not None else None,
        "finished_at": iso_utc(finished_at),
        "latency_s": round(finished_at - submitted_at, 3) if submitted_at is not None else None,
    }
    return line


def succeeded(message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "succeeded", "message": message}


def errored(
    error_type: str, message: str, status: int | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {"type": error_type, "message": message, "status": status, **extra},
    }


def expired(message: str) -> dict[str, Any]:
    return {"type": "expired", "error": {"type": "expired", "message": message, "status": 404}}


def repair_torn_tail(path: Path) -> int:
    """Cut a last line left half-written by a crash; return the bytes removed.

    Appends are whole lines, so anything after the last newline is a torn
    write: it is dropped, and the job it belonged to is resumed instead.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as handle:
        chunk = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - chunk)
            handle.seek(start)
            block = handle.read(end - start)
            newline = block.rfind(b"\n")
            if newline != -1:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep


@dataclass(slots=True)
class ExistingResults:
    done: set[str] = field(default_factory=set)
    by_type: Counter[str] = field(default_factory=Counter)
    torn_bytes: int = 0


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, is it the last line) of a file, streamed one line at a time."""
    with path.open("rb") as handle:
        previous: bytes | None = None
        number = 0
        for raw in handle:
            if previous is not None:
                yield number, previous, False
            number += 1
            previous = raw
        if previous is not None:
            yield number, previous, True


def load_results(path: Path) -> ExistingResults:
    """Which jobs already have a result line (after repairing a torn tail).

    Streams the file: memory is the set of finished ids, not the file.
    """
    state = ExistingResults(torn_bytes=repair_torn_tail(path))
    if not path.exists():
        return state
    for number, raw, last in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
            custom_id = item["custom_id"]
            kind = item["result"]["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            if last:
                # A complete-looking but garbled last line (e.g. zeros after a
                # power loss): drop it like a torn one.
                truncate_last_line(path, len(raw))
                state.torn_bytes += len(raw)
                break
            raise ResultsFileError(f"{path}: line {number} is not a result line") from None
        if custom_id not in state.done:
            state.done.add(custom_id)
            state.by_type[kind] += 1
    return state


def truncate_last_line(path: Path, length: int) -> None:
    """Drop the last `length` bytes (a garbled last line), durably."""
    with path.open("rb+") as handle:
        handle.truncate(path.stat().st_size - length)
        os.fsync(handle.fileno())
