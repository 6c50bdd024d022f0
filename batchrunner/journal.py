"""Journal: an append-only JSONL log of submissions, beside the results file.

One record per accepted submission: custom_id, request_id, submitted_at (epoch
seconds), attempt (how many times the job was submitted, counting this one), and
the fingerprint of the request. A restart reads it to re-poll
request_ids still inside the API's 1-hour retention window instead of paying
for them again. Chosen over SQLite because appends of whole lines with group
fsync are all it needs, and a torn tail is repaired the same way as the
results file's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from batchrunner.errors import ResultsFileError
from batchrunner.jsonl import is_torn_write, is_zeros, numbered_lines, truncate


class JournalRecord(NamedTuple):
    """One accepted submit (a NamedTuple: one a job, and a frozen dataclass's
    __init__ ran ~3.5x its bytecode; issue 12)."""

    custom_id: str
    request_id: str
    submitted_at: float
    attempt: int
    fingerprint: str
    status_url: str | None = None
    response_url: str | None = None

    def to_json(self) -> bytes:
        record: dict[str, Any] = {
            "custom_id": self.custom_id,
            "request_id": self.request_id,
            "submitted_at": round(self.submitted_at, 3),
            "attempt": self.attempt,
            "fp": self.fingerprint,
        }
        if self.status_url:
            record["status_url"] = self.status_url
        if self.response_url:
            record["response_url"] = self.response_url
        return orjson.dumps(record) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> JournalRecord:
        data = orjson.loads(raw)
        return cls(
            custom_id=data["custom_id"],
            request_id=data["request_id"],
            submitted_at=float(data["submitted_at"]),
            attempt=int(data["attempt"]),
            fingerprint=data["fp"],
            status_url=data.get("status_url"),
            response_url=data.get("response_url"),
        )


def journal_path_for(results_path: Path) -> Path:
    return results_path.with_name(results_path.name + ".journal")


def load_journal(
    path: Path, keep: Callable[[JournalRecord], bool] | None = None, *, repair: bool = True
) -> dict[str, JournalRecord]:
    """The latest record of each custom_id, in file order (the log is append-only,
    so the last record is the newest), dropping those `keep` rejects.

    Streams the file: a resume holds only the records it may still use. A torn
    last line (a crash mid-write) is cut (with `repair`; skipped without, for
    readers like `status`); any other damaged line is an error.
    """
    latest: dict[str, JournalRecord] = {}
    if not path.exists():
        return latest
    if not path.is_file():
        raise ResultsFileError(f"journal {path} is not a file")
    good = 0
    offset = 0
    for number, raw, _ in numbered_lines(path):
        offset += len(raw)
        if not raw.endswith(b"\n"):
            if not is_torn_write(raw, b'"request_id":'):
                raise ResultsFileError(f"{path}: line {number} is not a journal record")
            break
        if not raw.strip() or is_zeros(raw):
            continue
        try:
            record = JournalRecord.from_json(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ResultsFileError(f"{path}: line {number} is not a journal record") from None
        good = offset
        if keep is None or keep(record):
            latest[record.custom_id] = record
        else:
            latest.pop(record.custom_id, None)
    if repair:
        truncate(path, good)
    return latest
