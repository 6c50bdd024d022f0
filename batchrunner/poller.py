"""Poller set: follows every request_id against its retention deadline until it has a result.

A heap keyed by next poll time; when several polls are due, the one whose
retention deadline is nearest goes first. COMPLETED is fetched at once;
FAILED is written as inference_failed; a request that vanished (404) or is
past its deadline is resubmitted once, then written as expired.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import anyio
from anyio.abc import TaskGroup

from batchrunner.api import TransportError, decode_output
from batchrunner.context import RunContext
from batchrunner.policy import Action, Verdict, classify_poll, compute_backoff, retention_deadline
from batchrunner.results import errored, expired, result_line, succeeded
from batchrunner.schedule import next_poll_at
from batchrunner.submitter import Submitter, Tracked, release_if_held
from batchrunner.threads import run_blocking

NOT_FOUND_RETRIES = 3
"""A 404 before the deadline may be a replica that has not seen the request yet."""

MAX_RESUBMISSIONS = 1
POLL_CONCURRENCY = 64


class Poller:
    def __init__(self, ctx: RunContext, submitter: Submitter) -> None:
        self.ctx = ctx
        self.submitter = submitter
        self._heap: list[tuple[float, int, Tracked]] = []
        self._order = itertools.count()
        self._added = itertools.count(1)
        self._wake = anyio.Event()
        self._active = 0
        self._intake_closed = False
        self._slots = anyio.Semaphore(POLL_CONCURRENCY)
        self._tg: TaskGroup | None = None

    # --- feeding ----------------------------------------------------------

    def add(self, tracked: Tracked, *, resumed: bool = False) -> None:
        """Start following a request (fresh from submit, or from the journal on resume)."""
        now = self.ctx.clock()
        tracked.probe = next(self._added) % self.ctx.poll_schedule().probe_every == 0
        tracked.next_poll_at = self._schedule(tracked, now)
        tracked.first_poll_at = tracked.next_poll_at
        self._push(tracked)
        self.ctx.stats.in_flight += 1
        if resumed:
            self.ctx.stats.resumed += 1

    def close_intake(self) -> None:
        """No more requests will be added: run() returns once the heap drains."""
        self._intake_closed = True
        self._wake.set()

    @property
    def tracked_count(self) -> int:
        return len(self._heap) + self._active

    def earliest_deadline(self) -> float | None:
        """The first retention deadline among followed requests: resume before it."""
        deadlines = [self._deadline(tracked) for _, _, tracked in self._heap]
        return min(deadlines) if deadlines else None

    def _push(self, tracked: Tracked) -> None:
        heapq.heappush(self._heap, (tracked.next_poll_at, next(self._order), tracked))
        self._wake.set()

    def _deadline(self, tracked: Tracked) -> float:
        return retention_deadline(tracked.submitted_at, self.ctx.retention_s)

    def _schedule(self, tracked: Tracked, now: float) -> float:
        return next_poll_at(
            submitted_at=tracked.submitted_at,
            polls_done=tracked.polls,
            now=now,
            deadline=self._deadline(tracked),
            model=self.ctx.latency,
            schedule=self.ctx.poll_schedule(),
            rng=self.ctx.rng,
            probe=tracked.probe,
        )

    # --- the loop -----------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                if self._intake_closed and not self._heap and self._active == 0:
                    return
                now = self.ctx.clock()
                due: list[Tracked] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
                # Most urgent retention deadline first.
                due.sort(key=self._deadline)
                for tracked in due:
                    await self._slots.acquire()
                    self._active += 1
                    tg.start_soon(self._poll_guarded, tracked)
                wait = self._heap[0][0] - self.ctx.clock() if self._heap else None
                self._wake = anyio.Event()
                if wait is None:
                    await self._wake.wait()
                elif wait > 0:
                    with anyio.move_on_after(wait):
                        await self._wake.wait()

    async def _poll_guarded(self, tracked: Tracked) -> None:
        try:
            await self._poll(tracked)
        finally:
            self._active -= 1
            self._slots.release()
            self._wake.set()

    async def _poll(self, tracked: Tracked) -> None:
        ctx = self.ctx
        await ctx.budget.acquire_poll(self._deadline(tracked))
        ctx.stats.requests["status"] += 1
        tracked.polls += 1
        asked_at = ctx.clock()
        verdict = await self._ask(ctx.client.status, tracked, tracked.status_url)
        if verdict.action is Action.PENDING:
            tracked.pending_seen_at = asked_at
        elif verdict.action in (Action.COMPLETED, Action.JOB_FAILED):
            self._observe_latency(tracked, asked_at)
        if verdict.action is Action.COMPLETED:
            await self._fetch(tracked)
            return
        self._handle(tracked, verdict)

    async def _fetch(self, tracked: Tracked) -> None:
        ctx = self.ctx
        while True:
            await ctx.budget.acquire_result(self._deadline(tracked))
            ctx.stats.requests["result"] += 1
            try:
                response = await ctx.client.result(tracked.request_id, tracked.response_url)
            except TransportError as exc:
                verdict = Verdict(Action.RETRY, None, "retries_exhausted", str(exc))
                body: Any = None
            else:
                body = response.body
                verdict = classify_poll(response.status, body, response.retry_after_s)
            if verdict.action is Action.COMPLETED:
                message = decode_output(body)
                if message is not None:
                    if ctx.cache is not None and tracked.cache_key is not None:
                        await run_blocking(ctx.cache.put, tracked.cache_key, message)
                    ctx.budget.on_success(counted=ctx.budget.polls_count)
                    self._finish(tracked, succeeded(message))
                    return
                verdict = Verdict(
                    Action.RETRY,
                    response.status,
                    "retries_exhausted",
                    "COMPLETED result without a decodable output",
                )
            if verdict.action in (Action.RETRY, Action.RATE_LIMITED) and not self._past_deadline(
                tracked
            ):
                if verdict.action is Action.RATE_LIMITED:
                    ctx.stats.rate_limited += 1
                    ctx.budget.on_rate_limited(verdict.retry_after_s, is_poll=True)
                    continue
                tracked.transient += 1
                if tracked.transient < ctx.retry.max_attempts:
                    ctx.stats.retries += 1
                    await anyio.sleep(self._backoff(tracked.transient, verdict))
                    continue
            self._handle(tracked, verdict)
            return

    async def _ask(self, call: Any, tracked: Tracked, url: str | None) -> Verdict:
        try:
            response = await call(tracked.request_id, url)
        except TransportError as exc:
            return Verdict(Action.RETRY, None, "retries_exhausted", str(exc))
        return classify_poll(response.status, response.body, response.retry_after_s)

    def _handle(self, tracked: Tracked, verdict: Verdict) -> None:
        """Everything but a successful fetch: reschedule, resubmit, or finish."""
        ctx = self.ctx
        now = ctx.clock()
        action = verdict.action
        if action is Action.PENDING:
            ctx.budget.on_success(counted=ctx.budget.polls_count)
            tracked.not_found = 0
            tracked.transient = 0
            self._reschedule(tracked, self._schedule(tracked, now))
        elif action is Action.JOB_FAILED:
            ctx.budget.on_success(counted=ctx.budget.polls_count)
            self._finish(
                tracked,
                errored(
                    verdict.error_type or "inference_failed",
                    verdict.message or "the request failed",
                    verdict.status,
                ),
            )
        elif action is Action.FATAL:
            # The key stopped working mid-run: nothing more can be collected.
            # Unfinished requests stay in the journal for a resume.
            ctx.abort_run(verdict.message)
        elif action is Action.RATE_LIMITED:
            ctx.stats.rate_limited += 1
            delay = ctx.budget.on_rate_limited(verdict.retry_after_s, is_poll=True)
            tracked.polls -= 1  # a refused poll tells nothing about the request
            self._reschedule(tracked, now + delay)
        elif (
            action is Action.GONE
            and not self._past_deadline(tracked)
            and (tracked.not_found < NOT_FOUND_RETRIES)
        ):
            tracked.not_found += 1
            self._reschedule(tracked, now + self._backoff(tracked.not_found, verdict))
        elif action is Action.GONE or self._past_deadline(tracked):
            self._start_resubmit(tracked)
        else:  # transient failure of the status call
            tracked.transient += 1
            if tracked.transient >= ctx.retry.max_attempts:
                self._finish(
                    tracked,
                    errored(
                        "retries_exhausted",
                        f"polling failed {tracked.transient} times; last: {verdict.message}",
                        verdict.status,
                    ),
                )
                return
            ctx.stats.retries += 1
            self._reschedule(tracked, now + self._backoff(tracked.transient, verdict))

    def _backoff(self, attempt: int, verdict: Verdict) -> float:
        retry = self.ctx.retry
        delay = compute_backoff(
            attempt,
            initial_s=retry.initial_s,
            max_backoff_s=retry.max_backoff_s,
            exp_base=retry.exp_base,
            rng=self.ctx.rng,
        )
        return max(delay, verdict.retry_after_s or 0.0)

    def _reschedule(self, tracked: Tracked, when: float) -> None:
        tracked.next_poll_at = min(when, self._deadline(tracked))
        self._push(tracked)

    def _past_deadline(self, tracked: Tracked) -> bool:
        return self.ctx.clock() >= self._deadline(tracked)

    def _start_resubmit(self, tracked: Tracked) -> None:
        ctx = self.ctx
        if tracked.submission > MAX_RESUBMISSIONS:
            self._finish(
                tracked,
                expired(
                    f"request {tracked.request_id} expired before its result could be fetched, "
                    "and so did its resubmission"
                ),
            )
            return
        if ctx.stop_intake.is_set():
            # Stopping: leave it without a result; a resume resubmits it.
            ctx.stats.in_flight -= 1
            ctx.in_flight.release_on_behalf_of(tracked.borrower)
            return
        self._active += 1
        assert self._tg is not None
        self._tg.start_soon(self._resubmit, tracked)

    async def _resubmit(self, tracked: Tracked) -> None:
        ctx = self.ctx
        try:
            ctx.stats.resubmitted += 1
            ctx.stats.in_flight -= 1
            fresh = await self.submitter.submit(
                tracked.job,
                submission=tracked.submission + 1,
                borrower=tracked.borrower,
                prior_attempts=tracked.http_attempts,
            )
            if fresh is not None:
                self.add(fresh)
            else:
                release_if_held(ctx, tracked.borrower)
        finally:
            self._active -= 1
            self._wake.set()

    def _observe_latency(self, tracked: Tracked, done_answer_at: float) -> None:
        """Feed the latency model an estimate of when the request finished.

        The finish lies between the last PENDING answer and the first done
        answer: the midpoint when both are known. When the very first poll
        already found it done, only an upper bound is known; the poll's
        *scheduled* time stands in for it, not the time it was answered: under
        a saturated budget a poll waits for its token, and learning that wait
        as latency would lengthen the schedule and the in-flight limit, which
        lengthens the wait (a feedback loop seen in the budget benchmark).
        """
        if tracked.pending_seen_at is not None:
            finished = (tracked.pending_seen_at + done_answer_at) / 2
        else:
            finished = min(done_answer_at, tracked.first_poll_at or done_answer_at)
        self.ctx.latency.observe(finished - tracked.submitted_at)

    def _finish(self, tracked: Tracked, result: dict[str, Any]) -> None:
        ctx = self.ctx
        now = ctx.clock()
        ctx.writer.write_result(
            result_line(
                tracked.job.custom_id,
                result,
                request_id=tracked.request_id,
                attempts=tracked.http_attempts,
                submitted_at=tracked.submitted_at,
                finished_at=now,
            )
        )
        ctx.stats.in_flight -= 1
        ctx.in_flight.release_on_behalf_of(tracked.borrower)
