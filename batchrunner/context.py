"""What the stages of one run share: configuration, clock, counters, the stop controller."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio

from batchrunner.api import SegmindClient
from batchrunner.breaker import CircuitBreaker
from batchrunner.budget import Budget, PollsCount
from batchrunner.cache import ResponseCache
from batchrunner.estimate import DEFAULT_OUTPUT_TOKENS_PER_JOB
from batchrunner.fetch import ImageFetcher
from batchrunner.policy import MAX_RETRY_AFTER_S, RETENTION_S, RetryPolicy
from batchrunner.price import PriceList, usage_tokens
from batchrunner.rerun import FINAL_ERRORS, Decision, Do, Prior
from batchrunner.schedule import (
    EAGER_SCHEDULE,
    FRUGAL_SCHEDULE,
    FirstPollFactor,
    LatencyModel,
    PollSchedule,
)
from batchrunner.stop import StopController
from batchrunner.writer import Writer


class LoopClock:
    """Epoch seconds that follow the event loop's clock.

    Under looptime's virtual time an hour of retention passes in milliseconds,
    and everything that compares times (journal, deadlines, the simulator)
    must see the same hour: so epoch time is derived from loop time.
    """

    __slots__ = ("_loop_time", "_offset")

    def __init__(self) -> None:
        self._loop_time = asyncio.get_running_loop().time  # called for every request
        self._offset = time.time() - self._loop_time()

    def __call__(self) -> float:
        return self._offset + self._loop_time()


class CostLedger(Protocol):
    """What the stages of a run ask of the --max-cost ledger: `Spend` locally,
    a proxy to one ledger of the whole cluster under the Ray engine."""

    @property
    def prices(self) -> PriceList: ...

    @property
    def cap_usd(self) -> float | None: ...

    @property
    def spent_usd(self) -> float: ...

    @property
    def earlier_usd(self) -> float: ...

    async def reserve(self, custom_id: str, estimate_usd: float) -> bool: ...

    def release(self, custom_id: str) -> None: ...

    def finished(self, line: dict[str, Any]) -> None: ...


class SharedLimits(Protocol):
    """Makes a run's budget and cost ledger when they are shared beyond the run
    (RunConfig.shared): the Ray engine's workers share one of each."""

    def budget(self, rpm: float, polls_count: PollsCount, clock: LoopClock) -> Budget: ...

    def ledger(self, prices: PriceList, cap_usd: float | None, spent_usd: float) -> CostLedger: ...


class Spend:
    """Dollars for the --max-cost cap: what the results file has spent (its
    earlier runs and this one, from the usage the API reported; cached answers
    are free) plus the estimates of jobs on their way, reserved just before
    their submit and replaced by the real cost when their line is written."""

    __slots__ = (
        "_finished",
        "_reserved",
        "cap_usd",
        "earlier_usd",
        "prices",
        "reserved_usd",
        "spent_usd",
    )

    def __init__(self, prices: PriceList, cap_usd: float | None, spent_usd: float = 0.0) -> None:
        self.prices = prices
        self.cap_usd = cap_usd
        self.spent_usd = spent_usd
        self.earlier_usd = spent_usd
        """What the file had spent before this run (progress shows this run's part too)."""
        self.reserved_usd = 0.0
        self._reserved: dict[str, float] = {}
        self._finished = anyio.Event()

    async def reserve(self, custom_id: str, estimate_usd: float) -> bool:
        """Reserve a job's estimate under the cap. When only other jobs'
        estimates stand in the way, wait for them to finish (their real cost is
        usually lower); False when what the file has spent leaves no room."""
        if self.cap_usd is not None:
            while self.spent_usd + self.reserved_usd + estimate_usd > self.cap_usd:
                if self.spent_usd + estimate_usd > self.cap_usd or not self._reserved:
                    return False
                await self._finished.wait()
        self.reserved_usd += estimate_usd
        self._reserved[custom_id] = estimate_usd
        return True

    def release(self, custom_id: str) -> None:
        """The job stopped without a line: its reservation goes back."""
        self.reserved_usd -= self._reserved.pop(custom_id, 0.0)
        if self.cap_usd is not None:  # only then can anyone wait in reserve()
            self._finished.set()
            self._finished = anyio.Event()

    def finished(self, line: dict[str, Any]) -> None:
        result = line["result"]
        if result["type"] == "succeeded" and not line.get("cached"):
            self.spent_usd += self.prices.cost_usd(*usage_tokens(result["message"]))
        self.release(line["custom_id"])


@dataclass(slots=True)
class RunStats:
    """Counters for the progress display, the summary and tests."""

    jobs_read: int = 0
    skipped_done: int = 0
    resumed: int = 0
    submitted: int = 0
    in_flight: int = 0
    results: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    retries: int = 0
    unanswered_submits: int = 0
    """Submits sent whose answer never came: each may have been accepted (and
    is paid twice if its retry is accepted too)."""
    resubmitted: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rerun: Counter[str] = field(default_factory=Counter)
    """Jobs with a result line that run again, by why: 'changed', or the outcome retried."""
    errored_kept: Counter[str] = field(default_factory=Counter)
    """Final errors left as they are (--retry-errored retries them), by error type."""

    def count_result(self, line: dict[str, Any]) -> None:
        result = line["result"]
        self.results[result["type"]] += 1
        if result["type"] == "errored":
            self.error_types[result["error"]["type"]] += 1
        elif result["type"] == "succeeded":
            tokens_in, tokens_out = usage_tokens(result["message"])
            self.input_tokens += tokens_in
            self.output_tokens += tokens_out

    def count_decision(self, decision: Decision, prior: Prior | None) -> None:
        if decision.do is Do.SKIP:
            self.skipped_done += 1
            if prior is not None and prior.outcome in FINAL_ERRORS:
                self.errored_kept[prior.outcome] += 1
        elif decision.why is not None:
            self.rerun[decision.why] += 1

    @property
    def finished(self) -> int:
        return sum(self.results.values())


@dataclass(slots=True)
class RunContext:
    """The run's shared parts. Decisions live in them (stop, budget, breaker,
    spend), not in flags here."""

    client: SegmindClient
    budget: Budget
    breaker: CircuitBreaker
    stop: StopController
    writer: Writer
    clock: LoopClock
    stats: RunStats
    spend: CostLedger
    jobs_dir: Path
    retry: RetryPolicy
    latency: LatencyModel
    schedule: PollSchedule | None  # None: frugal when polls count, eager when free
    in_flight: anyio.CapacityLimiter
    rng: random.Random
    fetcher: ImageFetcher
    """Images given by URL; its own session, which never carries the API key."""
    first_poll: FirstPollFactor = field(default_factory=FirstPollFactor)
    """When polls are free, the correction to the first poll's age (learned from its answers)."""
    retention_s: float = RETENTION_S
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    cache: ResponseCache | None = None
    output_tokens_per_job: int = DEFAULT_OUTPUT_TOKENS_PER_JOB

    def poll_schedule(self) -> PollSchedule:
        if self.schedule is not None:
            return self.schedule
        return FRUGAL_SCHEDULE if self.budget.polls_count else EAGER_SCHEDULE
