"""Can `auto` reach 0.97 of R/3 at 300 jobs without breaking the polls-free p95?

Issue 12 asks `--polls-count auto` for the goodput of `yes` (0.97 of R/3 or
more, bench_budget.py scenario 1, 300 jobs) and, when polls turn out free, a
detection p95 of at most 0.15 mean latencies (scenario 2). Until the server
answers something that tells the two worlds apart, `auto` sends the same
requests in both: a poll 429 where polls count, which comes only when the
rate window holds `rpm` requests, or more requests in a window than the rpm
allows without one (`FreePollsEvidence`, 1.1 x) where they are free. So the
polls of the jobs in flight before then are one choice with two prices:
- polls count: every status poll before the first 429 beyond what `yes`
  spends on the same jobs (1.03 a job, scenario 1) is a request no job needed;
  `auto`'s goodput is `yes`'s times 909 / (909 + waste) (300 jobs at 3.03
  requests a job), plus the refused request;
- polls free: a job polled sparsely before the proof is found late, and the
  p95 allows 5% of the run's jobs (15 of 300) late, some of which the eager
  schedule spends itself.

The model is the benchmarks' law (lognormal, mean 11.2 model s, sigma 0.35),
known exactly; submits paced at 50 rpm (1.2 s); before the proof at most 8
jobs in flight (`default_max_in_flight` with polls unknown: 7.96), after it
as many as the pacing gives; a fetch right after a done answer; schedules
without jitter. Eager: the first poll where 13% of requests are done, then
every 0.135 of the median (`schedule.EAGER_SCHEDULE`); frugal: the first at
the p92, then steps of 0.1 of the median growing 1.5x (`FRUGAL_SCHEDULE`).
After the proof (polls free), a job's next scheduled poll stands and the
eager gaps follow it. Policies before the first answer: the first k jobs
eager and the rest frugal; or every job's first poll at quantile q with
gaps g x the eager gap. "both": the mean waste within the target and the p95
met in at least half the runs.

What it found (300 seeds, 14 s here; benchmarks/README.md, stop 27): the two
targets meet only on the frontier, with nothing to spare: the first poll at
the median and gaps 1.5 x the eager one waste 13.3 requests (13.1 allowed)
with the p95 met in 53% of runs; the package's eager start wastes 26 (the
benchmark: 0.10 to 0.13 requests a job more than `yes`, 30 to 39) with the
p95 met in 99%. The model knows the law
exactly and has no jitter, which flatters every policy.

    python benchmarks/auto_first_window.py              # 300 seeds, about 15 s here
    python benchmarks/auto_first_window.py --seeds 50   # quicker
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

MEAN_S = 11.2
SIGMA = 0.35
RPM = 50.0
JOBS = 300
INTERVAL_S = 60.0 / RPM
LIMIT_UNKNOWN = 8  # in flight while polls are not known to be free or counted
YES_POLLS_A_JOB = 1.03  # scenario 1, `yes`: status polls a job (served)
YES_REQUESTS = JOBS * 3.03
REFUSED_AT = int(RPM) + 1  # the request that draws the first 429 where polls count
PROVEN_AT = int(1.1 * RPM) + 1  # FreePollsEvidence: more than 1.1 x rpm in a window
TARGET_P95 = 0.15
TARGET_RATIO = 0.97 / 0.984  # `auto` >= 0.97 where `yes` measured 0.984 (stop 27 mean)

MU = math.log(MEAN_S) - SIGMA * SIGMA / 2
MEDIAN_S = math.exp(MU)
EAGER_GAP_S = 0.135 * MEDIAN_S


def quantile(q: float) -> float:
    return math.exp(MU + SIGMA * NormalDist().inv_cdf(q))


EAGER_FIRST_S = quantile(0.13)


@dataclass(frozen=True)
class Schedule:
    """Poll ages after the submit: `first`, then gaps from `gap` growing by `growth`."""

    first: float
    gap: float
    growth: float = 1.0

    def age(self, n: int) -> float:
        """The age of poll n (0: the first)."""
        if self.growth == 1.0:
            return self.first + n * self.gap
        return self.first + self.gap * (self.growth**n - 1) / (self.growth - 1)


EAGER = Schedule(EAGER_FIRST_S, EAGER_GAP_S)
FRUGAL = Schedule(quantile(0.92), 0.1 * MEDIAN_S, 1.5)


@dataclass
class Outcome:
    waste: float  # status polls before the first 429 beyond `yes`'s, plus the refused one
    p95: float  # polls free: detection p95, mean latencies
    first_answer_s: float  # model time of the 429 (polls count)


def run(policy: Callable[[int], Schedule], rng: random.Random) -> Outcome:
    """One run of 300 jobs in both worlds (identical up to the first answer)."""
    latencies = [rng.lognormvariate(MU, SIGMA) for _ in range(JOBS)]
    polls: list[tuple[float, int, int]] = []  # (time, job, poll number), a heap
    submitted: list[float] = []
    schedule_of: list[Schedule] = []
    eager_from: dict[int, int] = {}  # job -> the poll after which eager gaps apply (proven free)
    detected_at: dict[int, float] = {}
    sent = 0
    first_answer = proven_at = math.inf
    polls_before_answer = 0
    in_flight = 0
    next_submit_at = 0.0

    def send(when: float) -> None:
        nonlocal sent, first_answer, proven_at
        sent += 1
        if sent == REFUSED_AT:
            first_answer = when
        if sent == PROVEN_AT:
            proven_at = when
            for _, job, n in polls:  # the next poll stands; eager gaps after it
                eager_from.setdefault(job, n)

    def poll_at(job: int, n: int) -> float:
        schedule = schedule_of[job]
        start = eager_from.get(job)
        if start is not None and n > start:
            return submitted[job] + schedule.age(start) + (n - start) * EAGER_GAP_S
        return submitted[job] + schedule.age(n)

    while len(detected_at) < JOBS:
        next_poll = polls[0][0] if polls else math.inf
        job = len(submitted)
        limit = LIMIT_UNKNOWN if next_submit_at < proven_at else JOBS
        if job < JOBS and in_flight < limit and next_submit_at <= next_poll:
            now = next_submit_at
            send(now)
            submitted.append(now)
            schedule_of.append(EAGER if now >= proven_at else policy(job))
            in_flight += 1
            next_submit_at = now + INTERVAL_S
            heapq.heappush(polls, (poll_at(job, 0), job, 0))
            continue
        now, job, n = heapq.heappop(polls)
        if now < first_answer:
            polls_before_answer += 1
        send(now)
        if submitted[job] + latencies[job] <= now:
            detected_at[job] = now
            send(now)  # the fetch
            in_flight -= 1
            next_submit_at = max(next_submit_at, now)  # a slot freed: the next submit
        else:
            if proven_at <= now:
                eager_from.setdefault(job, n)
            heapq.heappush(polls, (poll_at(job, n + 1), job, n + 1))
    done_before = sum(1 for at in detected_at.values() if at < first_answer)
    waste = polls_before_answer - YES_POLLS_A_JOB * done_before + 1
    delays = sorted(
        (at - submitted[job] - latencies[job]) / MEAN_S for job, at in detected_at.items()
    )
    p95 = delays[round(0.95 * (len(delays) - 1))]  # nearest rank, as bench_budget.py
    return Outcome(waste, p95, first_answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=300)
    args = parser.parse_args()

    policies: list[tuple[str, Callable[[int], Schedule]]] = [
        ("eager (the package)", lambda _: EAGER)
    ]
    for k in (0, 2, 4, 6, 8, 10):
        policies.append(
            (f"first {k} jobs eager, the rest frugal", lambda j, k=k: EAGER if j < k else FRUGAL)
        )
    for q in (0.13, 0.2, 0.3, 0.4, 0.5, 0.6):
        for g in (1.0, 1.25, 1.5, 2.0, 3.0):
            schedule = Schedule(quantile(q), g * EAGER_GAP_S)
            policies.append((f"first poll at q{q:.2f}, gap {g:g} x eager", lambda _, s=schedule: s))

    print(
        f"{JOBS} jobs, {RPM:g} rpm, lognormal mean {MEAN_S} s sigma {SIGMA}; {args.seeds} seeds.\n"
        f"Targets: `auto` / `yes` goodput >= {TARGET_RATIO:.4f} (0.97 where `yes` is 0.984), "
        f"i.e. waste <= {YES_REQUESTS * (1 / TARGET_RATIO - 1):.1f} requests; polls-free p95 <= "
        f"{TARGET_P95}.\n"
    )
    print(
        "| policy before the first answer | waste, requests (mean) | auto / yes "
        "| first 429, model s | polls-free p95 (median) | runs with p95 <= 0.15 | both |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, policy in policies:
        rng = random.Random(12)
        outcomes = [run(policy, rng) for _ in range(args.seeds)]
        waste = statistics.fmean(o.waste for o in outcomes)
        ratio = YES_REQUESTS / (YES_REQUESTS + waste)
        p95 = statistics.median(o.p95 for o in outcomes)
        p95_ok = sum(o.p95 <= TARGET_P95 for o in outcomes) / len(outcomes)
        both = ratio >= TARGET_RATIO and p95_ok >= 0.5
        first = statistics.median(o.first_answer_s for o in outcomes)
        print(
            f"| {name} | {waste:.1f} | {ratio:.4f} | {first:.1f} | {p95:.3f} | "
            f"{p95_ok:.0%} | {'yes' if both else 'no'} |"
        )


if __name__ == "__main__":
    main()
