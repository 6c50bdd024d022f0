"""Poller set: follows every request_id against its retention deadline until it has a result.

A heap keyed by next poll time; when several polls are due, the one whose
retention deadline is nearest goes first. COMPLETED is fetched at once;
FAILED is written as inference_failed; a request that vanished (404) or is
past its deadline is resubmitted once, then written as expired. Answers
nobody documented are asked again a bounded number of times, then written as
errored with the start of the last one. Every request goes through the one
retry loop (`retrying`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import anyio
from anyio.abc import TaskGroup

from batchrunner.api import ApiResponse, NoMessage, decode_output, over_cap_message
from batchrunner.context import RunContext
from batchrunner.handoff import Handoff
from batchrunner.policy import (
    MAX_ODD_ANSWERS,
    Action,
    Verdict,
    classify_poll,
    compute_backoff,
    retention_deadline,
    wait_too_long_message,
)
from batchrunner.results import errored, expired, result_line, succeeded
from batchrunner.retrying import send_with_retries
from batchrunner.schedule import next_poll_at
from batchrunner.stop import Level, Reason
from batchrunner.submitter import Submission, Submitter, Tracked, release_if_held
from batchrunner.threads import run_blocking

NOT_FOUND_RETRIES = 3
"""A 404 before the deadline may be a replica that has not seen the request yet."""

MAX_RESUBMISSIONS = 1
"""Per run: a request that expired before its result was fetched is submitted once more."""
POLL_CONCURRENCY = 64
"""Poll workers: requests polled or fetched at once (the rest wait on the heap)."""


def _classify_status(response: ApiResponse) -> Verdict:
    if response.oversized:  # a status answer is small: this is not one
        message = over_cap_message("a status answer", response.declared_bytes)
        return Verdict(Action.ODD, response.status, message=message)
    return classify_poll(response.status, response.body, response.retry_after_s)


def _classify_result(response: ApiResponse) -> Verdict:
    if response.oversized:
        return Verdict(
            Action.JOB_FAILED,
            response.status,
            "inference_failed",
            over_cap_message("the result", response.declared_bytes),
        )
    return classify_poll(response.status, response.body, response.retry_after_s)


class Poller:
    def __init__(self, ctx: RunContext, submitter: Submitter) -> None:
        self.ctx = ctx
        self.submitter = submitter
        self._heap: list[tuple[float, int, Tracked]] = []
        self._order = itertools.count()
        self._added = itertools.count(1)
        self._wake = anyio.Event()
        self._sleeping_until = -math.inf  # while the loop is not asleep, it sees every push
        self._active = 0
        self._intake_closed = False
        self._tg: TaskGroup | None = None

    # --- feeding ----------------------------------------------------------

    def add(self, tracked: Tracked, *, resumed: bool = False) -> None:
        """Start following a request (fresh from submit, or from the journal on resume)."""
        now = self.ctx.clock()
        tracked.probe = next(self._added) % self.ctx.poll_schedule().probe_every == 0
        tracked.next_poll_at = self._schedule(tracked, now)
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

    def collectable(self, now: float) -> int:
        """Followed requests whose result may still be fetched."""
        waiting = sum(1 for _, _, tracked in self._heap if self._deadline(tracked) > now)
        return waiting + self._active

    def earliest_deadline(self) -> float | None:
        """The first retention deadline among followed requests: resume before it."""
        deadlines = [self._deadline(tracked) for _, _, tracked in self._heap]
        return min(deadlines) if deadlines else None

    def _push(self, tracked: Tracked) -> None:
        heapq.heappush(self._heap, (tracked.next_poll_at, next(self._order), tracked))
        # Wake the loop only when this poll is due before the time it sleeps
        # until: one wake-up per job cost more than the heap (issue 12).
        if tracked.next_poll_at < self._sleeping_until:
            self._wake.set()

    def _deadline(self, tracked: Tracked) -> float:
        return retention_deadline(tracked.submitted_at, self.ctx.retention_s)

    def _schedule(self, tracked: Tracked, now: float) -> float:
        schedule = self.ctx.poll_schedule()
        return next_poll_at(
            submitted_at=tracked.submitted_at,
            polls_done=tracked.polls,
            now=now,
            deadline=self._deadline(tracked),
            model=self.ctx.latency,
            schedule=schedule,
            rng=self.ctx.rng,
            probe=tracked.probe,
            first_age_factor=(
                1.0 if schedule.first_done_share is None else self.ctx.first_poll.factor
            ),
        )

    # --- the loop -----------------------------------------------------------

    async def run(self) -> None:
        # POLL_CONCURRENCY workers take due requests from one hand-off rather
        # than a task per poll: anyio's start_soon cost 40 microseconds a poll
        # in issue 12's capacity profile, the hand-off 9.
        due_polls: Handoff[Tracked] = Handoff(0, POLL_CONCURRENCY)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for _ in range(POLL_CONCURRENCY):
                tg.start_soon(self._poll_worker, due_polls)
            await self._hand_out(due_polls)
            await due_polls.close()

    async def _hand_out(self, due_polls: Handoff[Tracked]) -> None:
        """Hand each request to a poll worker when its poll is due, until all are done."""
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
                self._active += 1
                await due_polls.put(tracked)  # waits while every worker is busy
            wait = self._heap[0][0] - self.ctx.clock() if self._heap else None
            if wait is not None and wait <= 0:
                continue
            self._wake = anyio.Event()
            self._sleeping_until = self._heap[0][0] if self._heap else math.inf
            try:
                if wait is None:
                    await self._wake.wait()
                else:
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
            finally:
                self._sleeping_until = -math.inf

    async def _poll_worker(self, due_polls: Handoff[Tracked]) -> None:
        while (tracked := await due_polls.get()) is not None:
            try:
                await self._poll(tracked)
            finally:
                self._active -= 1
                self._wake_if_done()

    def _wake_if_done(self) -> None:
        """The loop waits for the last active poll only to return once all is done."""
        if self._intake_closed and not self._heap and self._active == 0:
            self._wake.set()

    async def _poll(self, tracked: Tracked) -> None:
        ctx = self.ctx
        deadline = self._deadline(tracked)
        answer = await send_with_retries(
            ctx,
            "status",
            lambda: ctx.client.status(tracked.request_id, tracked.status_url),
            _classify_status,
            acquire=lambda: ctx.budget.acquire_poll(deadline),
            job=tracked.job.custom_id,
            deadline=deadline,
        )
        verdict = answer.verdict
        if answer.requests and answer.sent_at is not None and tracked.polls == 0:
            share = ctx.poll_schedule().first_done_share
            if share is not None and not tracked.probe:
                done = verdict.action in (Action.COMPLETED, Action.JOB_FAILED)
                ctx.first_poll.observe(
                    answer.sent_at - tracked.submitted_at,
                    tracked.next_poll_at - tracked.submitted_at,
                    done,
                    share,
                )
        if answer.requests:
            tracked.polls += 1
        if verdict.action is Action.PENDING:
            tracked.pending_seen_at = answer.sent_at
        elif verdict.action in (Action.COMPLETED, Action.JOB_FAILED) and answer.sent_at:
            self._observe_latency(tracked, answer.sent_at, planned_at=tracked.next_poll_at)
        if verdict.action is Action.COMPLETED:
            await self._fetch(tracked)
        else:
            self._handle(tracked, verdict)

    async def _fetch(self, tracked: Tracked) -> None:
        ctx = self.ctx
        deadline = self._deadline(tracked)
        answer = await send_with_retries(
            ctx,
            "result",
            lambda: ctx.client.result(tracked.request_id, tracked.response_url),
            _classify_result,
            acquire=lambda: ctx.budget.acquire_result(deadline),
            job=tracked.job.custom_id,
            deadline=deadline,
        )
        verdict = answer.verdict
        if verdict.action is not Action.COMPLETED:
            self._handle(tracked, verdict)
            return
        assert answer.response is not None
        decoded = decode_output(answer.response.body)
        if isinstance(decoded, NoMessage):
            if decoded.missing:
                verdict = Verdict(Action.ODD, answer.response.status, message=decoded.reason)
            else:
                verdict = Verdict(
                    Action.JOB_FAILED, answer.response.status, "inference_failed", decoded.reason
                )
            self._handle(tracked, verdict)
            return
        if ctx.cache is not None and tracked.cache_key is not None:
            await run_blocking(ctx.cache.put, tracked.cache_key, decoded)
        ctx.budget.on_success(counted=ctx.budget.polls_count)
        self._finish(tracked, succeeded(decoded))

    def _handle(self, tracked: Tracked, verdict: Verdict) -> None:
        """Every answer but a fetched message: reschedule, resubmit, stop, or finish."""
        ctx = self.ctx
        now = ctx.clock()
        action = verdict.action
        if action is Action.PENDING:
            ctx.budget.on_success(counted=ctx.budget.polls_count)
            tracked.not_found = 0
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
        elif action in (Action.FATAL, Action.WAIT_TOO_LONG):
            self.account_refused(tracked, verdict)
        elif action is Action.ODD:
            tracked.odd += 1
            if tracked.odd >= MAX_ODD_ANSWERS:
                message = (
                    f"{tracked.odd} unrecognised answers from the API; last: {verdict.message}"
                )
                self._finish(tracked, errored("retries_exhausted", message, verdict.status))
            else:
                self._reschedule(tracked, now + self._backoff(tracked.odd))
        elif (
            action is Action.GONE
            and not self._past_deadline(tracked)
            and (tracked.not_found < NOT_FOUND_RETRIES)
        ):
            # A 404 before the deadline may be a replica that has not seen the request yet.
            tracked.not_found += 1
            self._reschedule(tracked, now + self._backoff(tracked.not_found))
        elif action is Action.GONE:
            self._start_resubmit(tracked)
        else:  # transient failures past the retry budget
            self._finish(
                tracked,
                errored(
                    "retries_exhausted",
                    verdict.message or "polling failed",
                    verdict.status,
                ),
            )

    def account_refused(self, tracked: Tracked, verdict: Verdict) -> None:
        """A poll found the account refused (the key stopped working mid-run), or
        was asked to wait past --max-retry-after: nothing more can be collected;
        a run stops, and unfinished requests stay in the journal for a resume.
        (`serve` answers the one request instead.)"""
        ctx = self.ctx
        if verdict.action is Action.FATAL:
            ctx.stop.stop_now(Reason.ACCOUNT, verdict.message)
        else:
            assert verdict.retry_after_s is not None
            message = wait_too_long_message(
                verdict.retry_after_s, ctx.clock(), ctx.max_retry_after_s
            )
            ctx.stop.stop_now(Reason.RETRY_AFTER, message)

    def _backoff(self, attempt: int) -> float:
        retry = self.ctx.retry
        return compute_backoff(
            attempt,
            initial_s=retry.initial_s,
            max_backoff_s=retry.max_backoff_s,
            exp_base=retry.exp_base,
            rng=self.ctx.rng,
        )

    def _reschedule(self, tracked: Tracked, when: float) -> None:
        # Never later than the deadline: at the deadline the retry loop sends
        # nothing and answers GONE, which resubmits. Never a poll after it.
        tracked.next_poll_at = min(when, self._deadline(tracked))
        self._push(tracked)

    def _past_deadline(self, tracked: Tracked) -> bool:
        return self.ctx.clock() >= self._deadline(tracked)

    def _start_resubmit(self, tracked: Tracked) -> None:
        ctx = self.ctx
        if tracked.resubmits >= MAX_RESUBMISSIONS:
            self._finish(
                tracked,
                expired(
                    f"request {tracked.request_id} expired before its result could be fetched, "
                    "and so did its resubmission"
                ),
            )
            return
        ctx.stats.in_flight -= 1
        if not ctx.stop.taking_jobs:
            # Stopping: leave it without a result; a resume resubmits it.
            release_if_held(ctx, tracked.borrower)
            return
        self._active += 1
        assert self._tg is not None
        self._tg.start_soon(self._resubmit, tracked)

    async def _resubmit(self, tracked: Tracked) -> None:
        ctx = self.ctx
        try:
            ctx.stats.resubmitted += 1
            item = Submission(
                tracked.job,
                tracked.borrower,
                attempt=tracked.attempt + 1,
                prior_requests=tracked.http_attempts,
                resubmits=tracked.resubmits + 1,
            )
            tracked_again = False
            with ctx.stop.scope(Level.INTAKE):  # a drain cancels its waits, like the pool's
                tracked_again = await self.submitter.submit(item)
            if not tracked_again:
                release_if_held(ctx, tracked.borrower)
        finally:
            self._active -= 1
            self._wake_if_done()

    def _observe_latency(
        self, tracked: Tracked, done_answer_at: float, *, planned_at: float
    ) -> None:
        """Feed the latency model an estimate of when the request finished.

        The finish lies between the last PENDING answer and the first done
        answer: the midpoint when both are known. When the very first poll
        already found it done, only an upper bound is known; the poll's
        *scheduled* time stands in for it, not the time it was answered.
        The same for a later poll: under a saturated budget a poll waits for
        its token, and learning that wait as latency would lengthen the
        schedule and the in-flight limit, which lengthens the wait (a feedback
        loop seen in the budget benchmark: `auto` at 12 to 14 jobs in flight
        where 7 serve, detection p95 2.9 to 3.9 mean latencies).
        """
        done_by = min(done_answer_at, planned_at)
        if tracked.pending_seen_at is not None:
            finished = (tracked.pending_seen_at + max(done_by, tracked.pending_seen_at)) / 2
        else:
            finished = done_by
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
                fingerprint=tracked.job.fingerprint,
            )
        )
        ctx.stats.in_flight -= 1
        ctx.in_flight.release_on_behalf_of(tracked.borrower)
