"""What the stages of one run share: configuration, clock, counters, stop signals."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from batchrunner.api import SegmindClient
from batchrunner.budget import RateBudget
from batchrunner.cache import ResponseCache
from batchrunner.policy import RETENTION_S, RetryPolicy
from batchrunner.schedule import EAGER_SCHEDULE, FRUGAL_SCHEDULE, LatencyModel, PollSchedule
from batchrunner.writer import Writer


class LoopClock:
    """Epoch seconds that follow the event loop's clock.

    Under looptime's virtual time an hour of retention passes in milliseconds,
    and everything that compares times (journal, deadlines, the simulator)
    must see the same hour: so epoch time is derived from loop time.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = time.time() - asyncio.get_running_loop().time()

    def __call__(self) -> float:
        return self._offset + asyncio.get_running_loop().time()


class InFlightCost:
    """Estimated dollars of the jobs in flight, kept as a running total:
    the cost cap checks it before every submit."""

    __slots__ = ("_by_id", "total")

    def __init__(self) -> None:
        self._by_id: dict[str, float] = {}
        self.total = 0.0

    def add(self, custom_id: str, usd: float) -> None:
        self.total += usd - self._by_id.get(custom_id, 0.0)
        self._by_id[custom_id] = usd

    def finish(self, custom_id: str) -> None:
        self.total -= self._by_id.pop(custom_id, 0.0)


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
    resubmitted: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def count_result(self, line: dict[str, Any]) -> None:
        result = line["result"]
        self.results[result["type"]] += 1
        if result["type"] == "errored":
            self.error_types[result["error"]["type"]] += 1
        elif result["type"] == "succeeded":
            usage = result["message"].get("usage") or {}
            self.input_tokens += int(usage.get("input_tokens") or 0)
            self.output_tokens += int(usage.get("output_tokens") or 0)

    @property
    def finished(self) -> int:
        return sum(self.results.values())


@dataclass(slots=True)
class RunContext:
    client: SegmindClient
    budget: RateBudget
    writer: Writer
    clock: LoopClock
    stats: RunStats
    jobs_dir: Path
    retry: RetryPolicy
    latency: LatencyModel
    schedule: PollSchedule | None  # None: frugal when polls count, eager when free
    in_flight: anyio.CapacityLimiter
    rng: random.Random
    retention_s: float = RETENTION_S
    cache: ResponseCache | None = None
    price_in: float = 3.0
    price_out: float = 15.0
    cost_in_flight: InFlightCost = field(default_factory=InFlightCost)
    cost_capped: bool = False
    stop_intake: anyio.Event = field(default_factory=anyio.Event)
    fatal_message: str | None = None
    interrupted: bool = False
    run_scope: anyio.CancelScope | None = None
    reader_scope: anyio.CancelScope | None = None
    on_interrupt: Callable[[], None] | None = None
    grace_deadline: float | None = None

    def spent_usd(self) -> float:
        """Estimated dollars spent so far, from the usage the API reported."""
        return (
            self.stats.input_tokens * self.price_in + self.stats.output_tokens * self.price_out
        ) / 1e6

    def poll_schedule(self) -> PollSchedule:
        if self.schedule is not None:
            return self.schedule
        return FRUGAL_SCHEDULE if self.budget.polls_count else EAGER_SCHEDULE

    def stop_submitting(self, fatal_message: str | None = None) -> None:
        if fatal_message and self.fatal_message is None:
            self.fatal_message = fatal_message
        self.stop_intake.set()
        # The reader only reads and queues: safe to cancel mid-wait. Submit
        # workers are not cancelled: a submit in the air must be journaled.
        if self.reader_scope is not None:
            self.reader_scope.cancel()

    def abort_run(self, fatal_message: str | None = None) -> None:
        """Stop everything now (a fatal answer while polling): the journal keeps the rest."""
        self.stop_submitting(fatal_message)
        if self.run_scope is not None:
            self.run_scope.cancel()
