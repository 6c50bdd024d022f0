"""Journal: an append-only JSONL log of submissions, beside the results file.

One record per accepted submission: custom_id, request_id, submitted_at (epoch
seconds), attempt, and the job's fingerprint. A restart reads it to re-poll
request_ids still inside the API's 1-hour retention window instead of paying
for them again. Chosen over SQLite because appends of whole lines with group
fsync are all it needs, and a torn tail is repaired the same way as the
results file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchrunner.results import (
    ResultsFileError,
    numbered_lines,
    repair_torn_tail,
    truncate_last_line,
)


@dataclass(frozen=True, slots=True)
class JournalRecord:
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
    path: Path, finished: set[str] | None = None
) -> tuple[dict[str, JournalRecord], int]:
    """The latest submission of each unfinished custom_id, and the torn bytes repaired.

    Streams the file and skips jobs in `finished` (they have a result line),
    so a resume holds records only for the jobs it may still poll.
    """
    torn = repair_torn_tail(path)
    latest: dict[str, JournalRecord] = {}
    if not path.exists():
        return latest, torn
    for number, raw, last in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            record = JournalRecord.from_json(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            if last:
                truncate_last_line(path, len(raw))
                torn += len(raw)
                break
            raise ResultsFileError(f"{path}: line {number} is not a journal record") from None
        if finished is not None and record.custom_id in finished:
            continue
        previous = latest.get(record.custom_id)
        if previous is None or record.attempt >= previous.attempt:
            latest[record.custom_id] = record
    return latest, torn
