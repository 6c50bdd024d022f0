"""Read a results file (DESIGN.md section 3) one line at a time, for report, export and diff.

Read-only, like `batchrunner status`: nothing is repaired. A last line without
its newline is taken when it parses (a file written by another tool), else it
is a torn write and is skipped. A damaged line elsewhere is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson


class ResultsReadError(Exception):
    """The results file cannot be read at all (missing, a folder, unreadable)."""


@dataclass(frozen=True, slots=True)
class ResultRow:
    """What report, export and diff use of one result line (the full message is dropped)."""

    custom_id: str
    type: str
    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_s: float | None = None
    attempts: int = 0
    finished_at: float | None = None  # epoch seconds
    error_type: str | None = None
    error_message: str | None = None
    error_status: int | None = None
    cached: bool = False


@dataclass(slots=True)
class ReadStats:
    """Lines seen by a reader: how many were rows and how many were skipped."""

    rows: int = 0
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers, first few only
    bad_count: int = 0
    torn_tail: bool = False

    def note_bad(self, number: int) -> None:
        self.bad_count += 1
        if len(self.bad_lines) < 10:
            self.bad_lines.append(number)


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds from the ISO-8601 `...Z` stamps of result lines; None when absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def message_text(message: Any) -> str | None:
    """The text blocks of an Anthropic message, joined; None when it has none."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = [
        block["text"]
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    ]
    return "".join(parts) if parts else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def row_from_line(item: Any) -> ResultRow:
    """A ResultRow from a decoded result line; ValueError when it is not one."""
    if not isinstance(item, dict):
        raise ValueError("not an object")
    custom_id = item.get("custom_id")
    result = item.get("result")
    if not isinstance(custom_id, str) or not isinstance(result, dict):
        raise ValueError("no custom_id or result")
    kind = result.get("type")
    if not isinstance(kind, str):
        raise ValueError("no result.type")
    text = input_tokens = output_tokens = None
    message = result.get("message")
    if isinstance(message, dict):
        text = message_text(message)
        usage = message.get("usage")
        if isinstance(usage, dict):
            input_tokens = _int_or_none(usage.get("input_tokens"))
            output_tokens = _int_or_none(usage.get("output_tokens"))
    error_type = error_message = error_status = None
    error = result.get("error")
    if isinstance(error, dict):
        error_type = error.get("type") if isinstance(error.get("type"), str) else None
        raw_message = error.get("message")
        error_message = raw_message if isinstance(raw_message, str) else None
        error_status = _int_or_none(error.get("status"))
    elif kind == "expired":
        error_type = "expired"
    attempts = _int_or_none(item.get("attempts")) or 0
    return ResultRow(
        custom_id=custom_id,
        type=kind,
        text=text,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        latency_s=_float_or_none(item.get("latency_s")),
        attempts=attempts,
        finished_at=parse_timestamp(item.get("finished_at")),
        error_type=error_type,
        error_message=error_message,
        error_status=error_status,
        cached=item.get("cached") is True,
    )


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise ResultsReadError(f"results file {path} not found") from None
    except IsADirectoryError:
        raise ResultsReadError(f"results file {path} is a folder") from None
    except OSError as exc:
        raise ResultsReadError(f"cannot read results file {path}: {exc.strerror}") from None


def iter_rows_at(path: Path, stats: ReadStats | None = None) -> Iterator[tuple[int, ResultRow]]:
    """(byte offset of the line, row) for each readable result line, in file order."""
    stats = stats if stats is not None else ReadStats()
    with _open(path) as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            complete = raw.endswith(b"\n")
            try:
                row = row_from_line(orjson.loads(raw))
            except (orjson.JSONDecodeError, ValueError):
                if complete:
                    stats.note_bad(number)
                else:
                    stats.torn_tail = True
                continue
            stats.rows += 1
            yield start, row


def iter_rows(path: Path, stats: ReadStats | None = None) -> Iterator[ResultRow]:
    """Each readable result line of `path` as a ResultRow, in file order, streamed."""
    for _, row in iter_rows_at(path, stats):
        yield row


def read_row_at(handle: Any, offset: int) -> ResultRow:
    """The row whose line starts at `offset` of an open results file (see iter_rows_at)."""
    handle.seek(offset)
    return row_from_line(orjson.loads(handle.readline()))


def describe_skipped(path: Path, stats: ReadStats) -> str | None:
    """A one-line warning about skipped lines, or None when every line was read."""
    if not stats.bad_count:
        return None
    shown = ", ".join(str(n) for n in stats.bad_lines)
    more = ", ..." if stats.bad_count > len(stats.bad_lines) else ""
    return (
        f"{path}: skipped {stats.bad_count} line(s) that are not result lines (line {shown}{more})"
    )
