"""Submit pool: workers that turn jobs into request_ids under the shared rate budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from batchrunner.api import TransportError
from batchrunner.cache import cache_key
from batchrunner.context import RunContext
from batchrunner.images import ImageError
from batchrunner.journal import JournalRecord
from batchrunner.policy import Action, classify_submit, compute_backoff
from batchrunner.reader import Job, materialize_body
from batchrunner.results import errored, result_line, succeeded
from batchrunner.threads import run_blocking


@dataclass(slots=True)
class Tracked:
    """A submitted request the poller follows until it has a result."""

    job: Job
    request_id: str
    submitted_at: float
    submission: int  # 1 for the first accepted submit, 2 after a resubmission
    http_attempts: int
    borrower: object
    status_url: str | None = None
    response_url: str | None = None
    polls: int = 0
    not_found: int = 0
    transient: int = 0
    next_poll_at: float = 0.0
    first_poll_at: float | None = None
    pending_seen_at: float | None = None  # when a poll last answered QUEUED/PROCESSING
    cache_key: str | None = None
    probe: bool = False  # first poll early, to learn latency from below


class Submitter:
    """Submits one job at a time for any caller: pool workers and the poller's resubmits."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def submit(
        self, job: Job, *, submission: int, borrower: object, prior_attempts: int = 0
    ) -> Tracked | None:
        """Submit until accepted. None when the job ended without a request_id
        (a result line was written) or when submission stopped (no result: resumable)."""
        ctx = self.ctx
        try:
            body = await run_blocking(materialize_body, job.body, ctx.jobs_dir)
        except Exception as exc:  # any failure to read this job's images ends this job only
            if not isinstance(exc, ImageError):
                exc = ImageError(f"images could not be read: {type(exc).__name__}: {exc}")
            self._finish(
                job,
                errored("invalid_job", f"line {job.line}: {exc}", None, line=job.line),
                borrower,
                attempts=prior_attempts,
            )
            return None
        key: str | None = None
        if ctx.cache is not None:
            key = cache_key(job.model, body)
            message = await run_blocking(ctx.cache.get, key)
            if message is not None:
                ctx.stats.cached += 1
                self._finish(job, succeeded(message), borrower, attempts=0, cached=True)
                return None
        attempts = prior_attempts
        transient = 0
        while True:
            if ctx.stop_intake.is_set():
                return None
            await ctx.budget.acquire_submit()
            if ctx.stop_intake.is_set():
                return None
            attempts += 1
            ctx.stats.requests["submit"] += 1
            submitted_at = ctx.clock()
            try:
                response = await ctx.client.submit(job.model, body)
            except TransportError as exc:
                verdict = None
                reason = str(exc)
            else:
                verdict = classify_submit(response.status, response.body, response.retry_after_s)
                reason = verdict.message or f"HTTP {response.status}"
            if verdict is not None and verdict.action is Action.ACCEPTED:
                ctx.budget.on_success()
                payload = response.body
                tracked = Tracked(
                    job=job,
                    request_id=payload["request_id"],
                    submitted_at=submitted_at,
                    submission=submission,
                    http_attempts=attempts,
                    borrower=borrower,
                    status_url=_str_or_none(payload.get("status_url")),
                    response_url=_str_or_none(payload.get("response_url")),
                    cache_key=key,
                )
                ctx.writer.record_submission(
                    JournalRecord(
                        job.custom_id,
                        tracked.request_id,
                        submitted_at,
                        submission,
                        job.fingerprint,
                        tracked.status_url,
                        tracked.response_url,
                    )
                )
                ctx.stats.submitted += 1
                return tracked
            if verdict is not None and verdict.action is Action.RATE_LIMITED:
                ctx.stats.rate_limited += 1
                ctx.budget.on_rate_limited(verdict.retry_after_s, is_poll=False)
                continue
            if verdict is not None and verdict.action is Action.FATAL:
                ctx.stop_submitting(verdict.message)
                return None
            if verdict is not None and verdict.action is Action.JOB_FAILED:
                self._finish(
                    job,
                    errored(
                        verdict.error_type or "invalid_request",
                        verdict.message or "rejected",
                        verdict.status,
                    ),
                    borrower,
                    attempts=attempts,
                )
                return None
            # Transient: 5xx, dropped connection, timeout, 2xx without request_id.
            transient += 1
            if transient >= ctx.retry.max_attempts:
                status = verdict.status if verdict is not None else None
                self._finish(
                    job,
                    errored(
                        "retries_exhausted",
                        f"submit failed {transient} times; last: {reason}",
                        status,
                    ),
                    borrower,
                    attempts=attempts,
                )
                return None
            ctx.stats.retries += 1
            delay = compute_backoff(
                transient,
                initial_s=ctx.retry.initial_s,
                max_backoff_s=ctx.retry.max_backoff_s,
                exp_base=ctx.retry.exp_base,
                rng=ctx.rng,
            )
            if verdict is not None and verdict.retry_after_s is not None:
                delay = max(delay, verdict.retry_after_s)
            await anyio.sleep(delay)

    def _finish(
        self,
        job: Job,
        result: dict[str, Any],
        borrower: object,
        *,
        attempts: int,
        cached: bool = False,
    ) -> None:
        now = self.ctx.clock()
        line = result_line(job.custom_id, result, attempts=attempts, finished_at=now)
        if cached:
            line["cached"] = True
        self.ctx.writer.write_result(line)
        self.ctx.in_flight.release_on_behalf_of(borrower)


async def run_submit_worker(
    submitter: Submitter,
    jobs: ObjectReceiveStream[tuple[Job, object, int]],
    on_submitted: Callable[[Tracked], None],
) -> None:
    """Take (job, borrower, submission) until the stream ends or intake stops."""
    ctx = submitter.ctx
    async with jobs:
        async for job, borrower, submission in jobs:
            if ctx.stop_intake.is_set():
                ctx.in_flight.release_on_behalf_of(borrower)
                continue
            tracked = await submitter.submit(job, submission=submission, borrower=borrower)
            if tracked is not None:
                on_submitted(tracked)
            else:
                release_if_held(ctx, borrower)


def release_if_held(ctx: RunContext, borrower: object) -> None:
    try:
        ctx.in_flight.release_on_behalf_of(borrower)
    except RuntimeError:
        pass  # already released with its result line


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
