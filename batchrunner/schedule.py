"""Poll schedule: when to ask about a request again, learned from observed latency.

Pure: the latency model is fed observations and the schedule takes `now`; no
clock, no I/O.
"""

from __future__ import annotations

import bisect
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
    second for the rest of the hour (EAGER_SCHEDULE's cap alone is 0.13 of the
    median, about 1.4 s), while the typical ones are still noticed at once
    (at age 2 medians this is 0.1 of the median)."""
    jitter: float = 0.1
    deadline_margin_s: float = 60.0
    probe_every: int = 10
    probe_quantile: float = 0.25
    """One request in `probe_every` is first polled early, at `probe_quantile`.

    A first poll that finds the request done only bounds its latency from
    above; without early probes a model that starts too slow (the prior, or a
    slow hour) could never learn that the API got faster."""


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
) -> float:
    """Epoch time of the next status poll of one request.

    Never later than the retention deadline minus the margin (a result must be
    fetched before it expires), never earlier than `now`.
    """
    median = model.quantile(0.5)
    first_step = median * schedule.first_step_fraction
    min_gap = first_step / 2
    if polls_done == 0:
        quantile = schedule.probe_quantile if probe else schedule.first_quantile
        when = submitted_at + model.quantile(min(quantile, schedule.first_quantile))
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
    first_quantile=0.10, first_step_fraction=0.1, growth=1.2, max_step_fraction=0.13
)
"""When polls are free: notice a finished request within 0.15 of the mean latency
(p95) at half the requests of a one-second poller. The first poll goes at the
latency model's p10 (about 15% of requests are done by then: the model learns
the age of the poll that found a request done, at most one re-poll step late);
then steps of 0.1 of the median, growing 1.2x, at most 0.13 of it. Tuned with
bench_budget.py scenario 2 (issue 12): p95 0.137 to 0.145 at 6.55 to 6.66
requests a job, 0.49x to 0.50x the one-second poller's 13.36 (stops 21 to 25).
A first-poll age learned from first polls' answers alone (Robbins-Monro, a
tenth of them found done) was tried and removed at stop 25: 0.118 to 0.127 at
7.12 to 7.15 requests a job (0.53x); aimed at 15% done, 0.136 to 0.160 at
6.69 to 6.78; its age wanders with each answer, the model's does not. The bound
for p95 0.15 is 5.59 requests a job (benchmarks/detection_bound.py --p95-free)."""
