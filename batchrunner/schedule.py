"""Poll schedule: when to ask about a request again, learned from observed latency.

Pure: the latency model is fed observations and the schedule takes `now`; no
clock, no I/O.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass

MODEL_PAGE_LATENCY_S = 11.2
"""Typical Claude 3.5 Sonnet latency on Segmind (model page): the prior."""


class LatencyModel:
    """Sliding-window empirical quantiles of completion latency.

    Algorithm: keep the last `window` observations both in arrival order (to
    evict the oldest) and sorted (bisect.insort), so a quantile is an index
    lookup. O(window) per observation, exact within the window, and it follows
    drift (a slower afternoon) because old observations leave. Until enough
    observations arrive, the prior (the model page's figure) answers.
    """

    __slots__ = ("_order", "_prior_s", "_sorted", "_window")

    def __init__(self, prior_s: float = MODEL_PAGE_LATENCY_S, window: int = 512) -> None:
        self._prior_s = prior_s
        self._window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def observe(self, latency_s: float) -> None:
        if latency_s < 0:
            return
        self._order.append(latency_s)
        bisect.insort(self._sorted, latency_s)
        if len(self._order) > self._window:
            oldest = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]

    @property
    def count(self) -> int:
        return len(self._sorted)

    def quantile(self, q: float) -> float:
        """The q-quantile of latency; the prior scaled by a lognormal-ish spread when cold."""
        if len(self._sorted) < 8:
            # Cold start: shape the prior like a lognormal with sigma ~0.35
            # so early polls are neither all too early nor all too late.
            spread = {0.1: 0.65, 0.25: 0.8, 0.5: 0.95, 0.75: 1.15, 0.9: 1.4}
            nearest = min(spread, key=lambda k: abs(k - q))
            return self._prior_s * spread[nearest]
        index = min(len(self._sorted) - 1, max(0, round(q * (len(self._sorted) - 1))))
        return self._sorted[index]

    def statistics(self) -> dict[str, float]:
        return {"count": float(self.count), "p50": self.quantile(0.5), "p90": self.quantile(0.9)}


class FirstPollFactor:
    """A correction to the first poll's age read off the latency model, learned
    from first polls' answers (Robbins-Monro) so that a share of first polls
    find the request done (the schedule's `first_done_share`).

    The model learns a first poll that found the request done as done at the
    poll's planned age (an upper bound). If every first poll finds the request
    done (an API faster than the model thinks: the prior, or a slow hour gone
    by), the model keeps learning its own first-poll age and stays there: with
    polls free and a 4 s API against the 11.2 s prior, 97% of first polls found
    the request done and detection p50 stayed at 0.92 mean latencies
    (bench_budget.py's harness, issue 12 stop 25). Here a done answer shrinks
    the factor by exp(-step x (1 - target)) and a pending one grows it by
    exp(step x target), so first polls go earlier until some find the request
    pending; their re-polls bracket the latency, and the model comes down with
    them. With a right model the factor stays near 1 and the model's quantile,
    steady over its 512 observations, sets the age: an age learned from the
    answers alone moved with each one (polls-free p95 0.13 to 0.16 at the
    same requests, stop 25).
    """

    __slots__ = ("_done_in_a_row", "factor", "step")

    def __init__(self, step: float = 0.02) -> None:
        self.step = step
        self.factor = 1.0
        self._done_in_a_row = 0

    def observe(self, age_s: float, planned_age_s: float, done: bool, target: float) -> None:
        if age_s <= 0 or age_s > 4 * planned_age_s:
            return  # a request resumed from the journal, or a poll held back: no evidence
        self._done_in_a_row = self._done_in_a_row + 1 if done else 0
        # A small step keeps the age steady; a run of done answers that a right
        # age makes unlikely (under 1e-4: 5 in a row at a target of 0.13) says
        # the model is stuck late, and the age comes down five times as fast.
        hurry = self._done_in_a_row >= math.log(1e-4) / math.log(target)
        step = self.step * (5.0 if hurry else 1.0)
        self.factor *= math.exp(-step * ((1.0 if done else 0.0) - target))


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """Parameters of the widening poll schedule.

    first_quantile: the first poll goes out when this fraction of requests is
    expected to be done: late enough that most first polls find a result, early
    enough that few results sit waiting.
    first_step_fraction: the first re-poll comes this fraction of the median
    latency later; each later step grows by `growth`, capped at max_step_s.
    """

    first_quantile: float = 0.6
    first_step_fraction: float = 0.08
    growth: float = 1.5
    max_step_s: float = 30.0
    max_step_fraction: float = 3.0  # re-polls at most this fraction of the median apart
    age_fraction: float = 0.05
    """...or this fraction of the request's age, if that is more (still at most
    max_step_s): a request long past the usual latency is not polled every
    second for the rest of the hour (EAGER_SCHEDULE's cap alone is 0.135 of the
    median, about 1.5 s), while the typical ones are still noticed at once
    (at age 2 medians this is 0.1 of the median)."""
    jitter: float = 0.1
    deadline_margin_s: float = 60.0
    probe_every: int = 10
    probe_quantile: float = 0.25
    """One request in `probe_every` is first polled early, at `probe_quantile`.

    A first poll that finds the request done only bounds its latency from
    above; without early probes a model that starts too slow (the prior, or a
    slow hour) could never learn that the API got faster."""
    first_done_share: float | None = None
    """If set, the first poll's age is the model's `first_quantile` times a
    `FirstPollFactor` learned so that this share of first polls find the
    request done. Only where a poll goes out when it is due (polls free): a
    counted poll waits for its token, and its answer says little about the
    age it was meant for."""


def next_poll_at(
    *,
    submitted_at: float,
    polls_done: int,
    now: float,
    deadline: float,
    model: LatencyModel,
    schedule: PollSchedule,
    rng: random.Random,
    probe: bool = False,
    first_age_factor: float = 1.0,
) -> float:
    """Epoch time of the next status poll of one request.

    Never later than the retention deadline minus the margin (a result must be
    fetched before it expires), never earlier than `now`.
    """
    median = model.quantile(0.5)
    first_step = median * schedule.first_step_fraction
    min_gap = first_step / 2
    if polls_done == 0:
        if probe:
            quantile = min(schedule.probe_quantile, schedule.first_quantile)
            when = submitted_at + model.quantile(quantile)
        else:
            when = submitted_at + model.quantile(schedule.first_quantile) * first_age_factor
    else:
        exponent = min(polls_done - 1, 64)  # the cap wins long before; avoid overflow
        age = max(0.0, now - submitted_at)
        cap = min(
            schedule.max_step_s,
            max(schedule.max_step_fraction * median, schedule.age_fraction * age),
        )
        step = min(cap, first_step * schedule.growth**exponent)
        step *= 1.0 + rng.uniform(-schedule.jitter, schedule.jitter)
        when = now + step
    # Poll before the result expires; inside the last margin keep a minimum gap
    # so a slow request is not polled back-to-back, but never pass the deadline.
    when = min(when, deadline - schedule.deadline_margin_s)
    return min(max(when, now + min_gap if polls_done else now), max(now, deadline))


FRUGAL_SCHEDULE = PollSchedule(first_quantile=0.92, first_step_fraction=0.1, growth=1.5)
"""When polls count against the rate limit: every PENDING answer is a job not
run, so the first poll waits until most requests are done: at 0.92, about 1.1
status polls a job, and 3 requests / 3.1 is 0.97 of R/3 at most. With the
latency learned without token waits, 0.85 found more
requests pending, and `auto` stayed at 0.957 to 0.963 of R/3 (bench_budget.py
scenario 1, seeds 7 to 9); 0.92 gave 0.969 and 0.970 at the same in-flight
level."""

EAGER_SCHEDULE = PollSchedule(
    first_quantile=0.10,
    first_step_fraction=0.135,
    max_step_fraction=0.135,
    jitter=0.0,
    first_done_share=0.13,
)
"""When polls are free: notice a finished request within 0.15 of the mean latency
(p95) at half the requests of a one-second poller. The first poll goes at the
latency model's p10 times `FirstPollFactor`, which keeps 13% of first polls
finding the request done; then re-polls every 0.135 of the median, from the
first re-poll on and without jitter. That is the shape of the best schedule
for a p95 (benchmarks/detection_bound.py --p95-free): the first poll spends
the 5% of the p95 on the requests done well before it, and every later gap is
as wide as the target allows. Steps that grew from 0.1 to 0.13 of the median
and a 10% jitter (until stop 26) spent polls where most requests finish and
made the widest gap 10% wider than the typical one: p95 0.133 / 0.133 / 0.149
at 6.84 / 6.78 / 6.53 requests a job (seeds 7 / 8 / 9, 0.51x / 0.51x / 0.49x
the one-second poller's 13.36); now 0.128 / 0.131 / 0.131 at 6.50 / 6.58 /
6.37 (0.49x / 0.49x / 0.48x; bench_budget.py scenario 2, issue 12 stop 26).
Jitter spreads nothing useful here: polls are free, and requests are submitted
at different times. The bound for p95 0.15 is 5.59 requests a job."""
