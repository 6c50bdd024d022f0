"""What a run does with each job of its input, given what earlier runs left
behind: the job's result line (at most one) and its latest journal record.

Pure: no I/O, `now` passed in. The reader stage asks `decide` for every job.

| earlier result line                 | request unchanged                        | changed |
|-------------------------------------|------------------------------------------|---------|
| none                                | re-poll a journaled request, else submit | -       |
| succeeded                           | skip                                     | re-run  |
| retries_exhausted, expired          | retry (the run's failure, not the job's) | re-run  |
| inference_failed, invalid_request   | skip; retry with --retry-errored         | re-run  |
| invalid_job                         | skip while the line is the same          | run it  |

"Changed" compares fingerprints: of the request (model and body) for a valid
job, of the line itself for an invalid one; a result line without a
fingerprint (written before they existed) counts as unchanged.

A journaled request is re-polled instead of paid for again when it is for
this version of the job (same fingerprint), still inside the retention window
(less the margin), and not the request the earlier line already answers
(unless that line is `retries_exhausted`: accepted, perhaps completed, never
fetched). A journaled request for an old version is dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from batchrunner.journal import JournalRecord
from batchrunner.policy import is_collectable

TRANSIENT = frozenset({"retries_exhausted", "expired"})
"""Outcomes that are the run's failures, not the job's: a plain rerun retries them."""
FINAL_ERRORS = frozenset({"inference_failed", "invalid_request"})
"""Errors that are the job's own: retried only with --retry-errored."""


class Do(enum.Enum):
    SKIP = "skip"
    SUBMIT = "submit"
    REPOLL = "re-poll"
    WRITE_INVALID = "write invalid_job"


@dataclass(frozen=True, slots=True)
class Prior:
    """What a run keeps of a job's earlier result line."""

    outcome: str
    """'succeeded', 'expired' or the error type ('retries_exhausted', 'invalid_job', ...)."""
    fingerprint: str | None
    request_id: str | None = None


class Decision(NamedTuple):
    """What a run does with a job (a NamedTuple: one a job; see `JournalRecord`)."""

    do: Do
    why: str | None = None
    """Why a job that has a result line runs again: 'changed', or the outcome retried."""
    record: JournalRecord | None = None
    """The journaled request to re-poll (Do.REPOLL)."""


@dataclass(frozen=True, slots=True)
class Window:
    """The retention arithmetic `decide` needs."""

    retention_s: float
    margin_s: float


def decide(
    *,
    valid: bool,
    fingerprint: str,
    prior: Prior | None,
    record: JournalRecord | None,
    now: float,
    window: Window,
    retry_errored: bool,
) -> Decision:
    if not valid:
        if (
            prior is not None
            and prior.outcome == "invalid_job"
            and same_request(prior, fingerprint)
        ):
            return Decision(Do.SKIP)
        return Decision(Do.WRITE_INVALID, "changed" if prior is not None else None)
    why: str | None = None
    if prior is not None:
        if prior.outcome == "invalid_job" or not same_request(prior, fingerprint):
            why = "changed"
        elif prior.outcome in TRANSIENT:
            why = prior.outcome
        elif prior.outcome == "succeeded":
            return Decision(Do.SKIP)
        elif prior.outcome in FINAL_ERRORS and retry_errored:
            why = prior.outcome
        elif prior.outcome in FINAL_ERRORS:
            # Unless a retry of it is already in flight (a --retry-errored run
            # that was stopped): that request is paid for, collect it.
            if _in_flight_beyond(prior, record, fingerprint, now, window):
                return Decision(Do.REPOLL, prior.outcome, record)
            return Decision(Do.SKIP)
        else:  # an outcome this version does not know: treat it as the run's failure
            why = prior.outcome
    elif record is not None and record.fingerprint != fingerprint:
        why = "changed"  # edited while its request was in flight: that request is dropped
    if record is not None and _collectable(record, fingerprint, now, window):
        answered = prior is not None and prior.request_id == record.request_id
        if not answered or (prior is not None and prior.outcome == "retries_exhausted"):
            return Decision(Do.REPOLL, why, record)
    return Decision(Do.SUBMIT, why)


def same_request(prior: Prior, fingerprint: str) -> bool:
    """Whether the earlier line answers this version of the job. A results file
    may keep only a prefix of the fingerprint (64 bits are plenty); a line
    without one (written before lines had them) counts as the same."""
    return prior.fingerprint is None or fingerprint.startswith(prior.fingerprint)


def _collectable(record: JournalRecord, fingerprint: str, now: float, window: Window) -> bool:
    return record.fingerprint == fingerprint and is_collectable(
        record.submitted_at, now, retention_s=window.retention_s, margin_s=window.margin_s
    )


def _in_flight_beyond(
    prior: Prior, record: JournalRecord | None, fingerprint: str, now: float, window: Window
) -> bool:
    return (
        record is not None
        and record.request_id != prior.request_id
        and _collectable(record, fingerprint, now, window)
    )


def still_in_flight(prior: Prior | None, record: JournalRecord) -> bool:
    """Whether a job's latest journaled request is one a resume would collect,
    judged from the files alone (without the jobs, so without fingerprints):
    no result line yet, or a line that another request may still replace."""
    if prior is None:
        return True
    if prior.outcome == "succeeded":
        return False
    return prior.request_id != record.request_id or prior.outcome == "retries_exhausted"
