"""Submit pool: workers that turn jobs into request_ids under the shared rate budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio

from batchrunner.api import ApiResponse, TransportError
from batchrunner.cache import cache_key
from batchrunner.context import RunContext
from batchrunner.estimate import estimate_job_tokens, output_tokens_for
from batchrunner.fetch import UNREACHABLE
from batchrunner.handoff import Handoff
from batchrunner.images import ImageError
from batchrunner.journal import JournalRecord
from batchrunner.policy import Action, Verdict, classify_submit, wait_too_long_message
from batchrunner.prepare import materialize, needs_preparing
from batchrunner.reader import Job
from batchrunner.results import errored, result_line, succeeded
from batchrunner.retrying import Answer, send_with_retries
from batchrunner.stop import Reason
from batchrunner.threads import run_blocking


@dataclass(slots=True)
class Tracked:
    """A submitted request the poller follows until it has a result."""

    job: Job
    request_id: str
    submitted_at: float
    attempt: int  # how many times the job was submitted, this one included (journal)
    http_attempts: int  # submit requests made for the job (result lines' `attempts`)
    borrower: object
    status_url: str | None = None
    response_url: str | None = None
    resubmits: int = 0  # by this run, after the request expired
    polls: int = 0
    not_found: int = 0
    odd: int = 0  # unrecognised answers
    next_poll_at: float = 0.0
    pending_seen_at: float | None = None  # when a poll last answered QUEUED/PROCESSING
    cache_key: str | None = None
    probe: bool = False  # first poll early, to learn latency from below


class Submission(NamedTuple):
    """A job on its way to a submit (a NamedTuple: one a job; see `JournalRecord`)."""

    job: Job
    borrower: object
    attempt: int = 1
    prior_requests: int = 0
    resubmits: int = 0


class ModelProbe:
    """A model's first submit goes out alone; its other jobs wait for the first
    answer about it. With 16 workers, 8 of 10 jobs of an unknown model were
    sent, each a 404. A 404 marks the model unknown and the waiting jobs are
    refused without a request; any other answer, a failure included, lets them
    all go (an outage must reach the circuit breaker from many jobs at once,
    not from one job's retries)."""

    __slots__ = ("_answered", "_gates", "unknown")

    def __init__(self) -> None:
        self.unknown: set[str] = set()
        self._answered: set[str] = set()
        self._gates: dict[str, anyio.Event] = {}

    async def wait_turn(self, model: str) -> bool:
        """Wait for the first answer about `model`, unless there was one. True:
        this submit goes first, and must call `release` whatever happens."""
        while model not in self._answered and model not in self.unknown:
            gate = self._gates.get(model)
            if gate is None:
                self._gates[model] = anyio.Event()
                return True
            await gate.wait()
        return False

    def answered(self, model: str, status: int | None) -> None:
        """An answer to a submit of `model` (None: a failure without an answer)."""
        if status == 404:  # classify_submit: UNKNOWN_MODEL
            self.unknown.add(model)
        self._answered.add(model)
        self.release(model)

    def release(self, model: str) -> None:
        gate = self._gates.pop(model, None)
        if gate is not None:
            gate.set()


class Submitter:
    """Submits one job at a time for any caller: pool workers and the poller's resubmits.

    Each accepted submit is journaled and handed to `track` (the poller) in
    the same step as its answer arrives: nothing can cancel in between.
    """

    def __init__(self, ctx: RunContext, track: Callable[[Tracked], None]) -> None:
        self.ctx = ctx
        self.track = track
        self.models = ModelProbe()

    @property
    def unknown_models(self) -> set[str]:
        return self.models.unknown

    async def submit(self, item: Submission) -> bool:
        """Submit until accepted (True: the poller follows it now), finished (a
        result line), or stopped (neither: a resume submits it). The caller
        runs it inside an INTAKE scope of the stop controller, so that a drain
        cancels its waits (never a request in the air); the job's in-flight
        slot is the caller's unless tracked."""
        ctx, job = self.ctx, item.job
        if job.model in self.models.unknown:
            self._unknown_model(item, item.prior_requests)
            return False
        body = await self._body(item)
        if body is None:
            return False
        key: str | None = None
        if ctx.cache is not None:
            key = cache_key(job.model, body)
            message = await run_blocking(ctx.cache.get, key)
            if message is not None:
                ctx.stats.cached += 1
                self._finish(item, succeeded(message), attempts=0, cached=True)
                return False
        estimate = await self._estimate(job) if ctx.spend.cap_usd is not None else 0.0
        if not await ctx.spend.reserve(job.custom_id, estimate):
            ctx.stop.drain(Reason.COST_CAP)
            return False
        tracked = False
        first = await self.models.wait_turn(job.model)
        try:
            if job.model in self.models.unknown:
                self._unknown_model(item, item.prior_requests)
            else:
                tracked = self._answered(item, await self._send(job, body), key)
        finally:
            if first:  # stopped before any answer: the next waiter goes first
                self.models.release(job.model)
            if not tracked:  # its line released it, or it stopped: nothing paid
                ctx.spend.release(job.custom_id)
        return tracked

    async def _send(self, job: Job, body: dict[str, Any]) -> Answer:
        ctx = self.ctx

        async def send() -> ApiResponse:
            try:
                response = await ctx.client.submit(job.model, body)
            except TransportError:
                self.models.answered(job.model, None)
                raise
            self.models.answered(job.model, response.status)
            return response

        return await send_with_retries(
            ctx,
            "submit",
            send,
            lambda response: classify_submit(
                response.status, response.body, response.retry_after_s
            ),
            acquire=ctx.budget.acquire_submit,
            job=job.custom_id,
        )

    def _answered(self, item: Submission, answer: Answer, key: str | None) -> bool:
        """Sync on purpose: no await between an accepted submit and its journal
        record, so no stop can come between them."""
        ctx, job = self.ctx, item.job
        verdict, attempts = answer.verdict, item.prior_requests + answer.requests
        if verdict.action is Action.ACCEPTED:
            assert answer.response is not None and answer.sent_at is not None
            ctx.budget.on_success()
            self._accepted(item, answer, attempts, key)
            return True
        if verdict.action is Action.UNKNOWN_MODEL:
            self.models.unknown.add(job.model)
            self._unknown_model(item, attempts)
        elif verdict.action in (Action.FATAL, Action.WAIT_TOO_LONG):
            self.account_refused(item, verdict)
        else:  # refused (4xx), or transient failures past the retry budget
            error = errored(
                verdict.error_type or "invalid_request",
                verdict.message or f"HTTP {verdict.status}",
                verdict.status,
            )
            self._finish(item, error, attempts=attempts)
        return False

    def account_refused(self, item: Submission, verdict: Verdict) -> None:
        """The API refused the account (FATAL), or asked to wait past
        --max-retry-after: a run stops taking jobs; the job is left without a
        line, for a resume. (`serve` answers the one request instead.)"""
        ctx = self.ctx
        if verdict.action is Action.FATAL:
            ctx.stop.drain(Reason.ACCOUNT, verdict.message)
        else:
            assert verdict.retry_after_s is not None
            ctx.stop.drain(
                Reason.RETRY_AFTER,
                wait_too_long_message(verdict.retry_after_s, ctx.clock(), ctx.max_retry_after_s),
            )

    def _accepted(self, item: Submission, answer: Answer, attempts: int, key: str | None) -> None:
        ctx, job = self.ctx, item.job
        assert answer.response is not None and answer.sent_at is not None
        payload = answer.response.body
        submitted_at = answer.sent_at
        tracked = Tracked(
            job=job,
            request_id=payload["request_id"],
            submitted_at=submitted_at,
            attempt=item.attempt,
            http_attempts=attempts,
            borrower=item.borrower,
            status_url=_str_or_none(payload.get("status_url")),
            response_url=_str_or_none(payload.get("response_url")),
            resubmits=item.resubmits,
            cache_key=key,
        )
        ctx.writer.record_submission(
            JournalRecord(
                job.custom_id,
                tracked.request_id,
                submitted_at,
                item.attempt,
                job.fingerprint,
                tracked.status_url,
                tracked.response_url,
            )
        )
        ctx.stats.submitted += 1
        self.track(tracked)

    async def _body(self, item: Submission) -> dict[str, Any] | None:
        """The body to send (local images read, images by URL fetched, both
        checked and encoded), or None when that failed: the job then ends at no
        cost, as invalid_job, or as retries_exhausted when an image host could
        not be reached (a rerun tries again)."""
        job = item.job
        if not needs_preparing(job.body):
            return job.body  # nothing to read: no thread hop
        try:
            return await materialize(job.body, self.ctx.jobs_dir, self.ctx.fetcher)
        except Exception as exc:  # any failure to read this job's images ends this job only
            if not isinstance(exc, ImageError):
                exc = ImageError(f"images could not be read: {type(exc).__name__}: {exc}")
            kind = "retries_exhausted" if exc.kind == UNREACHABLE else "invalid_job"
            error = errored(kind, f"line {job.line}: {exc}", None, line=job.line)
            self._finish(item, error, attempts=item.prior_requests)
            return None

    async def _estimate(self, job: Job) -> float:
        """Estimated dollars of a job, for the --max-cost cap."""
        ctx = self.ctx
        try:
            input_tokens, _ = await run_blocking(estimate_job_tokens, job, ctx.jobs_dir)
        except ImageError:
            return 0.0  # its submit records it as invalid_job, at no cost
        output_tokens = output_tokens_for(job, ctx.output_tokens_per_job)
        return ctx.spend.prices.cost_usd(input_tokens, output_tokens)

    def _unknown_model(self, item: Submission, attempts: int) -> None:
        model = item.job.model
        message = (
            f"model {model!r} was not found (404): check --model or the job's model; "
            "jobs of other models carry on"
        )
        self._finish(item, errored("invalid_request", message, 404), attempts=attempts)

    def _finish(
        self, item: Submission, result: dict[str, Any], *, attempts: int, cached: bool = False
    ) -> None:
        ctx = self.ctx
        line = result_line(
            item.job.custom_id,
            result,
            attempts=attempts,
            finished_at=ctx.clock(),
            fingerprint=item.job.fingerprint,
        )
        if cached:
            line["cached"] = True
        ctx.writer.write_result(line)
        release_if_held(ctx, item.borrower)


async def run_submit_worker(submitter: Submitter, submissions: Handoff[Submission]) -> None:
    """Submit what the reader hands over until it ends (or intake stops)."""
    ctx = submitter.ctx
    while (item := await submissions.get()) is not None:
        if not (ctx.stop.taking_jobs and await submitter.submit(item)):
            release_if_held(ctx, item.borrower)  # finished, or left for a resume


def release_if_held(ctx: RunContext, borrower: object) -> None:
    """Give back a job's in-flight slot unless it was already given back."""
    try:
        ctx.in_flight.release_on_behalf_of(borrower)
    except RuntimeError:
        pass  # already released with its result line


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
