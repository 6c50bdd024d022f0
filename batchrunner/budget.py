"""The request budget: one rate limit shared by submits (and polls when they count).

Built on aiolimiter's leaky bucket, plus two things it does not do: a shared
cool-down after a 429 (every worker pauses together, so a rate-limited server
is not hammered by N independent backoffs), and learning whether polls count
against the limit (`auto`: free until the first 429 on a poll).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

import anyio
from aiolimiter import AsyncLimiter

from batchrunner.policy import compute_backoff


class PollsCount(enum.Enum):
    YES = "yes"
    NO = "no"
    AUTO = "auto"


def make_limiter(rpm: float) -> AsyncLimiter:
    """A leaky bucket of capacity 1 at rpm/60 per second.

    A bucket of capacity `rpm` would allow a burst of rpm requests and then the
    steady rate, i.e. up to 2 x rpm in the first minute: a sliding-window server
    answers that with 429s. Capacity 1 paces requests evenly instead.
    The capacity gets a hair of slack (1e-9) because the leak is computed in
    floating point: 1 - 1.2 * (1 / 1.2) can leave 1e-16 in the bucket, and a
    clock that does not move between checks (virtual time) would then wait
    forever for a zero-length timer.
    """
    slack = 1.0 + 1e-9
    return AsyncLimiter(slack, 60.0 / rpm * slack)


class RateBudget:
    __slots__ = (
        "_clock",
        "_consecutive_429",
        "_cooldown_until",
        "_limiter",
        "_polls_count",
        "_rng",
        "polls_learned_counting",
        "rate_limited",
        "rpm",
    )

    def __init__(
        self,
        rpm: float,
        polls_count: PollsCount,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = rpm
        self._limiter = make_limiter(rpm)
        self._polls_count = polls_count
        self._clock = clock
        self._rng = rng or random.Random()
        self._cooldown_until = 0.0
        self._consecutive_429 = 0
        self.rate_limited = 0
        self.polls_learned_counting = False

    @property
    def polls_count(self) -> bool:
        if self._polls_count is PollsCount.AUTO:
            return self.polls_learned_counting
        return self._polls_count is PollsCount.YES

    async def acquire_submit(self) -> None:
        await self.wait_cooled_down()
        await self._limiter.acquire()

    async def acquire_poll(self) -> None:
        await self.wait_cooled_down()
        if self.polls_count:
            await self._limiter.acquire()

    async def wait_cooled_down(self) -> None:
        while True:
            remaining = self._cooldown_until - self._clock()
            if remaining <= 0:
                return
            await anyio.sleep(remaining)

    def cooling_down(self) -> bool:
        return self._clock() < self._cooldown_until

    def on_rate_limited(self, retry_after_s: float | None, *, is_poll: bool) -> float:
        """Start (or extend) the shared cool-down; return its length."""
        self.rate_limited += 1
        self._consecutive_429 += 1
        if is_poll and self._polls_count is PollsCount.AUTO:
            self.polls_learned_counting = True
        if retry_after_s is not None:
            delay = retry_after_s
        else:
            delay = compute_backoff(
                self._consecutive_429,
                initial_s=60.0 / self.rpm,
                max_backoff_s=60.0,
                exp_base=2.0,
                rng=self._rng,
            )
        self._cooldown_until = max(self._cooldown_until, self._clock() + delay)
        return delay

    def on_success(self) -> None:
        self._consecutive_429 = 0

    def statistics(self) -> dict[str, float | bool]:
        return {
            "rpm": self.rpm,
            "rate_limited": self.rate_limited,
            "polls_count": self.polls_count,
            "cooling_down": self.cooling_down(),
        }
