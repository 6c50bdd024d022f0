"""Pure policy: backoff, Retry-After, response classification, retention arithmetic.

Nothing here does I/O or reads a clock: every function takes `now` (epoch seconds)
or the values it needs, so the whole module is tested table-driven without a loop.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import orjson

RETENTION_S = 3600.0
"""Segmind keeps a request's status and result for one hour after submission."""

RETENTION_MARGIN_S = 120.0
"""Safety margin: a request this close to its deadline is treated as gone on resume."""

MAX_RETRY_AFTER_S = 300.0
"""Longest Retry-After a run waits for (--max-retry-after): nothing bounds what
an API or a proxy may ask (a daily quota asks for hours)."""

MAX_OUTAGE_S = 3600.0
"""How long a run rides out an unreachable API with nothing left to collect (--max-outage)."""

TERMINAL_STATES = frozenset({"COMPLETED", "FAILED"})
PENDING_STATES = frozenset({"QUEUED", "PROCESSING"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures (5xx, dropped connections, timeouts) are retried."""

    max_attempts: int = 8
    initial_s: float = 1.0
    max_backoff_s: float = 60.0
    exp_base: float = 2.0


def compute_backoff(
    attempt: int,
    *,
    initial_s: float,
    max_backoff_s: float,
    exp_base: float,
    rng: random.Random,
) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's "Full Jitter").

    `attempt` counts from 1 (the first retry). Full jitter spreads retrying
    clients evenly over the whole interval, which is what avoids synchronised
    retry storms against a shared rate limit.
    """
    exponent = min(max(0, attempt - 1), 64)  # past 2**64 the cap has long won; avoid overflow
    ceiling = min(max_backoff_s, initial_s * exp_base**exponent)
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    Fractional seconds are accepted (some servers and our time-scaled simulator
    send them). Unparseable or negative values give None: the caller falls back
    to its own backoff rather than trusting garbage.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # asctime and "-0000" dates are GMT by RFC 9110
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
        return max(0.0, seconds)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return None
    return seconds


class Action(enum.Enum):
    """What the caller should do with a response."""

    ACCEPTED = "accepted"  # submit succeeded: a request_id was issued
    PENDING = "pending"  # poll: not finished yet
    COMPLETED = "completed"  # poll: result ready (or the result itself)
    JOB_FAILED = "job_failed"  # this job is finished as errored; do not retry
    RETRY = "retry"  # transient: retry after a delay
    RATE_LIMITED = "rate_limited"  # 429: every worker pauses together
    GONE = "gone"  # poll: 404, the request_id is unknown or expired
    FATAL = "fatal"  # the account is refused: stop the run
    UNKNOWN_MODEL = "unknown_model"  # submit: 404, this model does not exist
    ODD = "odd"  # a 2xx answer nobody documented: ask again, a bounded number of times
    WAIT_TOO_LONG = "wait_too_long"  # Retry-After over --max-retry-after: stop intake


class Verdict(NamedTuple):
    """What an answer means for its request (a NamedTuple: see `api.ApiResponse`)."""

    action: Action
    status: int | None = None
    error_type: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


MAX_ODD_ANSWERS = 5
"""Unrecognised answers (unknown state, empty or non-JSON body) one request may
get before its job ends as errored, quoting the last one."""

QUOTED_CHARS = 200


def quote_body(body: Any) -> str:
    """The start of an answer's body, for an error message."""
    if body is None:
        return "an empty body"
    text = body if isinstance(body, str) else _json_text(body)
    text = text[:QUOTED_CHARS] + ("..." if len(text) > QUOTED_CHARS else "")
    return repr(text)


def _json_text(body: Any) -> str:
    try:
        return orjson.dumps(body).decode()
    except TypeError:
        return repr(body)


FATAL_MESSAGES = {
    401: "the API key was refused (401): check SEGMIND_API_KEY or --api-key-file",
    403: "the API key lacks permission for this model (403): check the account's access",
    406: "the account has insufficient credits (406): add credits, then resume",
}


def error_text(body: Any) -> str | None:
    """The API's error message from a body like {"error": "..."}, if any."""
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict):
                nested = value.get("message")
                if isinstance(nested, str) and nested:
                    return nested
    if isinstance(body, str) and body:
        return body[:500]
    return None


def classify_submit(status: int, body: Any, retry_after_s: float | None = None) -> Verdict:
    """Classify the answer to `POST /v2/{model}`."""
    if 200 <= status < 300:
        if (
            isinstance(body, dict)
            and isinstance(body.get("request_id"), str)
            and body["request_id"]
        ):
            return Verdict(Action.ACCEPTED, status)
        # The SDK treats a 2xx without a request_id as an error. It may be a
        # proxy's page: retry, since the job was probably not accepted.
        return Verdict(
            Action.RETRY,
            status,
            "retries_exhausted",
            f"HTTP {status} answer without a request_id: {quote_body(body)}",
        )
    text = error_text(body)
    if status == 429:
        return Verdict(Action.RATE_LIMITED, status, retry_after_s=retry_after_s, message=text)
    if status in (400, 422):
        return Verdict(Action.JOB_FAILED, status, "invalid_request", text or f"HTTP {status}")
    if status in FATAL_MESSAGES:
        return Verdict(Action.FATAL, status, message=_fatal(status, text))
    if status == 404:
        return Verdict(Action.UNKNOWN_MODEL, status, "invalid_request", text or "not found")
    if status == 408 or status >= 500:
        return Verdict(
            Action.RETRY, status, "retries_exhausted", text or f"HTTP {status}", retry_after_s
        )
    return Verdict(
        Action.JOB_FAILED, status, "invalid_request", text or f"unexpected HTTP {status}"
    )


def classify_poll(status: int, body: Any, retry_after_s: float | None = None) -> Verdict:
    """Classify the answer to a status or result GET.

    A body that announces a terminal state is a valid answer whatever its HTTP
    code: Segmind serves FAILED as 422.
    """
    state = body.get("status") if isinstance(body, dict) else None
    if isinstance(state, str):
        state = state.upper()
        if state == "FAILED":
            message = error_text(body) or "the request failed"
            return Verdict(Action.JOB_FAILED, status, "inference_failed", message)
        if state == "COMPLETED" and 200 <= status < 300:
            return Verdict(Action.COMPLETED, status)
        if state in PENDING_STATES and 200 <= status < 300:
            return Verdict(Action.PENDING, status)
    text = error_text(body)
    if status == 429:
        return Verdict(Action.RATE_LIMITED, status, retry_after_s=retry_after_s, message=text)
    if status == 404:
        return Verdict(Action.GONE, status, message=text or "request not found or expired")
    if status in FATAL_MESSAGES:
        return Verdict(Action.FATAL, status, message=_fatal(status, text))
    if 200 <= status < 300:
        # A 2xx with an unknown or missing state, an empty or a non-JSON body:
        # not documented. Asked again a bounded number of times (MAX_ODD_ANSWERS).
        return Verdict(
            Action.ODD, status, "retries_exhausted", f"HTTP {status} with {quote_body(body)}"
        )
    return Verdict(
        Action.RETRY, status, "retries_exhausted", text or f"HTTP {status}", retry_after_s
    )


def is_transient_failure(verdict: Verdict) -> bool:
    """A failure that says the API (not the job) is in trouble: no answer at all,
    a 5xx or a 408. What the circuit breaker counts."""
    return verdict.action is Action.RETRY and (
        verdict.status is None or verdict.status >= 500 or verdict.status == 408
    )


def wait_too_long_message(retry_after_s: float, now: float, cap_s: float) -> str:
    """The line a run stops with when the API asks to wait longer than --max-retry-after."""
    try:
        until = datetime.fromtimestamp(now + retry_after_s).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        until = "after the year 9999"
    # 1e308 is a valid Retry-After number: not 309 digits in the user's face.
    wait = f"{retry_after_s:,.0f}" if retry_after_s < 1e12 else f"{retry_after_s:.3g}"
    return (
        f"the API asked to wait {wait} s (until {until}), longer than "
        f"--max-retry-after {cap_s:g} s; run the same command again after that to resume"
    )


def _fatal(status: int, text: str | None, default: str | None = None) -> str:
    base = default or FATAL_MESSAGES[status]
    return f"{base} (API said: {text})" if text else base


# --- retention arithmetic -------------------------------------------------


def retention_deadline(submitted_at: float, retention_s: float = RETENTION_S) -> float:
    """Epoch time after which a request's status and result are gone."""
    return submitted_at + retention_s


def is_collectable(
    submitted_at: float,
    now: float,
    *,
    retention_s: float = RETENTION_S,
    margin_s: float = RETENTION_MARGIN_S,
) -> bool:
    """Whether a journaled request can still be polled instead of paid for again."""
    return now < retention_deadline(submitted_at, retention_s) - margin_s


def time_left(submitted_at: float, now: float, retention_s: float = RETENTION_S) -> float:
    return retention_deadline(submitted_at, retention_s) - now
