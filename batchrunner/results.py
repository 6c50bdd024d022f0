"""Result lines (DESIGN.md section 3): how each one is built. Reading them: `resultsfile`."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from typing import Any


def iso_utc(epoch: float) -> str:
    """'2026-11-25T12:00:00.123Z' (milliseconds truncated, after rounding to the
    microsecond as `datetime.fromtimestamp` does). The date and time of day are
    formatted once per second: twice per result line, they showed in the
    capacity profile (2% of the client's CPU, issue 12)."""
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _second(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def result_line(
    custom_id: str,
    result: dict[str, Any],
    *,
    request_id: str | None = None,
    attempts: int = 0,
    submitted_at: float | None = None,
    finished_at: float,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A result line; `fingerprint` is that of the request it answers (a rerun
    compares it with the job's, to re-run a job whose request changed)."""
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "result": result,
        "request_id": request_id,
        "attempts": attempts,
        "submitted_at": iso_utc(submitted_at) if submitted_at is not None else None,
        "finished_at": iso_utc(finished_at),
        "latency_s": round(finished_at - submitted_at, 3) if submitted_at is not None else None,
    }
    if fingerprint is not None:
        line["fp"] = fingerprint
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
