"""The one reader of results files (DESIGN.md section 3).

- `load_prior` is what a run (and `status`) reads: strict, every complete line
  must be a result line, and each job's latest line wins.
- `iter_rows` / `iter_rows_at` are what report, export and diff read:
  read-only and lenient. A last line without its newline is taken when it
  parses (a file written by another tool), else it is a torn write and is
  skipped; a damaged line elsewhere is skipped and counted; of two lines of
  one job, the later one counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from batchrunner.digests import DigestMap, id_digest
from batchrunner.errors import ResultsFileError
from batchrunner.jsonl import count_lines, is_torn_write, is_zeros, numbered_lines, truncate
from batchrunner.price import usage_tokens
from batchrunner.rerun import Prior


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
    replaced: int = 0
    """Lines a later line of the same job replaced (skipped: the later one counts)."""

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
    """(byte offset of the line, row) for each job's latest result line, in file order.

    A run keeps one line per job; a run killed after it wrote a new line for
    a job, and before it moved the old one to the history file, leaves two:
    the later one is the job's result. So the file is read twice: first for
    where each job's last line is, then for those lines.
    """
    latest = DigestMap(count_lines(path) if path.is_file() else 0)
    rows = 0
    for start, row in _iter_all_rows_at(path, ReadStats()):
        latest.put(row.custom_id, start)
        rows += 1
    stats = stats if stats is not None else ReadStats()
    for start, row in _iter_all_rows_at(path, stats):
        if rows == len(latest) or latest.get(row.custom_id) == start:
            yield start, row
        else:
            stats.replaced += 1


def _iter_all_rows_at(path: Path, stats: ReadStats) -> Iterator[tuple[int, ResultRow]]:
    """(byte offset of the line, row) for each readable result line, in file order."""
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


def iter_lines(path: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Each job's latest result line whole (a dict), in file order, streamed
    (for what needs more than a ResultRow: exports in other APIs' shapes)."""
    with _open(path) as handle:
        for offset, _ in iter_rows_at(path, stats):
            handle.seek(offset)
            yield orjson.loads(handle.readline())


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


# --------------------------------------------------------------------------- the runner's view


OUTCOMES = (
    "succeeded",
    "expired",
    "invalid_job",
    "invalid_request",
    "inference_failed",
    "retries_exhausted",
    "errored",  # an error type this version does not know
)
_CODE = {outcome: code for code, outcome in enumerate(OUTCOMES)}
_SEEN, _REPLACED, _HAS_FP, _FP_SHIFT = 1 << 3, 1 << 4, 1 << 5, 6


def outcome_of(result: dict[str, Any]) -> str:
    """'succeeded', 'expired', or the error type of an errored result."""
    kind = result.get("type")
    if kind in ("succeeded", "expired"):
        return str(kind)
    error = result.get("error")
    error_type = error.get("type") if isinstance(error, dict) else None
    return error_type if error_type in _CODE else "errored"


def result_type(outcome: str) -> str:
    return outcome if outcome in ("succeeded", "expired") else "errored"


class PriorResults:
    """The latest line of each custom_id in an existing results file, as a run needs it.

    Compact, because a results file may hold millions of lines (see
    `digests`): each custom_id maps to one 64-bit value packing the outcome,
    two flags (the current input has the job; this run replaced its line) and
    the first 56 bits of the line's fingerprint. Request ids are kept only for
    lines a rerun may retry.
    """

    __slots__ = ("_lines", "_request_ids", "duplicates", "input_tokens", "output_tokens")

    def __init__(self, expected: int = 0) -> None:
        self._lines = DigestMap(expected)
        self._request_ids: dict[str, str] = {}
        self.duplicates = 0
        """Lines that an id's later line replaced (left by a run killed mid-way)."""
        self.input_tokens = 0
        self.output_tokens = 0
        """Tokens of every succeeded, not cached line: what the file has spent."""

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, item: dict[str, Any]) -> None:
        """One result line of the file, in file order (a later line replaces an earlier one)."""
        custom_id = item["custom_id"]
        result = item["result"]
        outcome = outcome_of(result)
        packed = _CODE[outcome]
        fingerprint = item.get("fp")
        if isinstance(fingerprint, str) and fingerprint:
            packed |= _HAS_FP | (_fingerprint_bits(fingerprint) << _FP_SHIFT)
        if not self._lines.put(custom_id, packed):
            self.duplicates += 1
            self._request_ids.pop(custom_id, None)
        request_id = item.get("request_id")
        if outcome != "succeeded" and isinstance(request_id, str):
            self._request_ids[custom_id] = request_id
        if outcome == "succeeded" and item.get("cached") is not True:
            tokens_in, tokens_out = usage_tokens(result.get("message"))
            self.input_tokens += tokens_in
            self.output_tokens += tokens_out

    def get(self, custom_id: str) -> Prior | None:
        packed = self._lines.get(custom_id)
        if packed is None:
            return None
        # A prefix of the fingerprint, 14 hex digits (see rerun.same_request).
        fingerprint = f"{packed >> _FP_SHIFT:014x}" if packed & _HAS_FP else None
        return Prior(OUTCOMES[packed & 7], fingerprint, self._request_ids.get(custom_id))

    def mark_seen(self, custom_id: str) -> None:
        """The current input has this job."""
        self._flag(custom_id, _SEEN)

    def mark_replaced(self, custom_id: str) -> bool:
        """This run wrote a new line for the job; True when it had an earlier one."""
        return self._flag(custom_id, _REPLACED)

    def in_input(self, custom_id: str) -> bool:
        """False only for a job with a line that the current input has not had (so far)."""
        packed = self._lines.get(custom_id)
        return packed is None or bool(packed & _SEEN)

    def outcomes_in_input(self) -> Counter[str]:
        """Result types of the lines of jobs in the current input that this run kept."""
        return self.result_types(only_input=True)

    def result_types(self, *, only_input: bool = False) -> Counter[str]:
        counts: Counter[str] = Counter()
        for packed in self._lines.values():
            if not only_input or (packed & _SEEN and not packed & _REPLACED):
                counts[result_type(OUTCOMES[packed & 7])] += 1
        return counts

    def not_in_input(self) -> int:
        """Jobs with a line whose custom_id the current input does not have."""
        return sum(1 for packed in self._lines.values() if not packed & _SEEN)

    def _flag(self, custom_id: str, flag: int) -> bool:
        packed = self._lines.get(custom_id)
        if packed is None:
            return False
        self._lines.put(custom_id, packed | flag)
        return True


def _fingerprint_bits(fingerprint: str) -> int:
    """The first 56 bits of a hex fingerprint (of a digest of it, if it is not hex)."""
    try:
        return int(fingerprint[:14], 16)
    except ValueError:
        return id_digest(fingerprint) >> 8


def load_prior(path: Path, *, repair: bool = True) -> PriorResults:
    """Read an existing results file (strict): every complete line must be a
    result line, else the file is not a results file and is left untouched
    (ResultsFileError); then, with `repair`, a torn last line is cut (without,
    it is only skipped: `status` reads while a run writes). Streams the file."""
    if not path.exists():
        return PriorResults()
    if not path.is_file():
        raise ResultsFileError(f"{path} is not a file")
    prior = PriorResults(count_lines(path))
    keep = 0  # offset after the last line worth keeping
    offset = 0
    zeros_from: int | None = None
    for number, raw, _ in numbered_lines(path):
        start, offset = offset, offset + len(raw)
        if not raw.endswith(b"\n"):  # the last line, without its newline: torn?
            if not is_torn_write(raw, b'"result":'):
                raise _not_ours(path, number, "has no newline and is not a result line")
            break
        if is_zeros(raw):
            zeros_from = start if zeros_from is None else zeros_from
            continue
        if not raw.strip():
            keep = offset
            continue
        if zeros_from is not None:
            raise _not_ours(path, number - 1, "is not a result line (zero bytes)")
        try:
            item = orjson.loads(raw)
            row_from_line(item)
        except (orjson.JSONDecodeError, ValueError):
            raise _not_ours(path, number, "is not a result line") from None
        prior.add(item)
        keep = offset
    if repair:
        truncate(path, keep)
    return prior


def _not_ours(path: Path, number: int, what: str) -> ResultsFileError:
    return ResultsFileError(
        f"{path}: line {number} {what}: this is not a batchrunner results file, so it is "
        "left as it is; give another -o"
    )
