"""The one retry loop: every API request (submit, status poll, result fetch) goes through it.

stamina's shape: the backoff is a pure function (`policy.compute_backoff`),
the loop is written once, here. Per attempt it:
1. waits for its turn at the circuit breaker (closed, or this is the probe);
2. waits for a token of the rate budget (`acquire`);
3. never sends past the request's retention deadline;
4. sends, the request shielded by the stop controller when it is a submit
   (a submit that went out may be accepted: it must finish and be journaled);
5. classifies the answer, and on a 429 shares the cool-down with every
   worker, on a transient failure backs off and tries again.

A transient failure is charged to the request's own retry budget only while
the breaker is closed: during an outage nothing is the job's fault. A
Retry-After longer than `--max-retry-after` is not waited for: the caller
gets `Action.WAIT_TOO_LONG` and the run stops taking jobs.

Every wait here is cancellable by the stop controller's scopes; the send of
a submit is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, NamedTuple

import anyio

from batchrunner.api import ApiResponse, TransportError
from batchrunner.policy import Action, Verdict, compute_backoff, is_transient_failure

if TYPE_CHECKING:
    from batchrunner.context import RunContext


class Answer(NamedTuple):
    """A request's last verdict and what it took (a NamedTuple: see `api.ApiResponse`)."""

    verdict: Verdict
    response: ApiResponse | None
    requests: int
    """HTTP requests this call made (accepted or not)."""
    sent_at: float | None
    """When the last request went out (a submit's retention hour starts then, at the latest)."""


async def send_with_retries(
    ctx: RunContext,
    kind: str,
    send: Callable[[], Awaitable[ApiResponse]],
    classify: Callable[[ApiResponse], Verdict],
    *,
    acquire: Callable[[], Awaitable[None]],
    job: Hashable,
    deadline: float | None = None,
) -> Answer:
    """Send one request until it has an answer that is not worth retrying.

    `kind` is "submit", "status" or "result" (counted per kind; submits are
    shielded). Returns the last verdict: RETRY only once the retry budget is
    spent, GONE when the retention deadline passed before it could be sent.
    """
    is_submit = kind == "submit"
    charged = 0
    requests = 0
    sent_at: float | None = None
    while True:
        probe = ctx.breaker.is_open and await ctx.breaker.wait_turn()
        try:
            await acquire()
            now = ctx.clock()
            if deadline is not None and now >= deadline:
                gone = Verdict(Action.GONE, None, message="past its retention deadline")
                return Answer(gone, None, requests, sent_at)
            requests += 1
            sent_at = now
            ctx.stats.requests[kind] += 1
            response: ApiResponse | None = None
            try:
                if is_submit:
                    with ctx.stop.request_in_air() as air:
                        response = await send()
                    if air.cancel_called:  # abandoned by a third Ctrl-C: no answer
                        await anyio.lowlevel.checkpoint()  # the run is stopping: leave
                        raise TransportError("abandoned in the air")
                else:
                    response = await send()
            except TransportError as exc:
                verdict = Verdict(Action.RETRY, None, "retries_exhausted", str(exc))
                if is_submit and exc.sent:
                    # At-least-once, honestly: it may have been accepted, and
                    # the retry may pay for it again. Counted for the summary.
                    ctx.stats.unanswered_submits += 1
            else:
                verdict = classify(response)
            ctx.breaker.record(is_transient_failure(verdict), job, probe=probe)
            probe = False
        finally:
            if probe:  # cancelled before the probe had its answer
                ctx.breaker.abandon_probe()
        action = verdict.action
        if action not in (Action.RATE_LIMITED, Action.RETRY):
            return Answer(verdict, response, requests, sent_at)
        wait = verdict.retry_after_s
        if wait is not None and wait > ctx.max_retry_after_s:
            if action is Action.RATE_LIMITED:
                ctx.stats.rate_limited += 1
            too_long = Verdict(Action.WAIT_TOO_LONG, verdict.status, retry_after_s=wait)
            return Answer(too_long, response, requests, sent_at)
        if action is Action.RATE_LIMITED:
            ctx.stats.rate_limited += 1
            ctx.budget.on_rate_limited(wait, is_poll=not is_submit)
            continue
        if not ctx.breaker.is_open:
            charged += 1
        if charged >= ctx.retry.max_attempts:
            exhausted = Verdict(
                Action.RETRY,
                verdict.status,
                "retries_exhausted",
                f"{kind} failed {charged} times; last: {verdict.message or verdict.status}",
            )
            return Answer(exhausted, response, requests, sent_at)
        ctx.stats.retries += 1
        delay = compute_backoff(
            max(1, charged),
            initial_s=ctx.retry.initial_s,
            max_backoff_s=ctx.retry.max_backoff_s,
            exp_base=ctx.retry.exp_base,
            rng=ctx.rng,
        )
        await anyio.sleep(max(delay, wait or 0.0))
