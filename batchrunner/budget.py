"""The request budget: one rate limit shared by submits (and polls when they count).

Built on aiolimiter's leaky bucket, plus what it does not do: a shared
cool-down after a 429 (every worker pauses together, so a rate-limited server
is not hammered by N independent backoffs), learning the rate the server
really allows when it is below `--rpm` (AIMD, `AimdPolicy`), and learning
whether polls count against the limit (`auto`: free until the first 429 on a
poll).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from aiolimiter import AsyncLimiter


class PollsCount(enum.Enum):
    YES = "yes"
    NO = "no"
    AUTO = "auto"


LATE_SLACK = 0.5
"""Share of a pacing quantum by which a late token is made up (see make_limiter)."""

TIMER_GRAIN_MS = 1.0
"""The shortest wait the event loop has: epoll takes its timeout in whole
milliseconds, and asyncio's selector rounds a shorter one up. A property of
the machine, not of the API's time: not named *_S, so the benchmarks'
time-scaling harness leaves it alone."""

_HAIR = 1e-9
"""Floating-point slack of a bucket's capacity (see make_limiter)."""


def pacing_quantum(rpm: float) -> float:
    """Tokens the bucket paces as one: a request, or what `rpm` allows in
    TIMER_GRAIN_MS when that is more (above 60,000 rpm).

    Pacing finer than the loop's timer cannot be honoured: at 1,000,000 rpm
    (an interval of 60 microseconds) 56 to 77% of the capacity benchmark's
    submits waited for the pump to sleep out their interval, at an eighth of
    the rate, and that pacing was a quarter of the client's CPU (issue 12).
    """
    return max(1.0, rpm / 60_000.0 * TIMER_GRAIN_MS)


def make_limiter(rpm: float) -> AsyncLimiter:
    """A leaky bucket of capacity 1.5 quanta (1.5 below 60,000 rpm) leaking
    rpm/60 per second.

    A bucket of capacity `rpm` would allow a burst of rpm requests and then the
    steady rate, i.e. up to 2 x rpm in the first minute: a sliding-window server
    answers that with 429s. Capacity 1 paces requests evenly, but loses every
    moment a waiter wakes late (the event loop's timer, a busy loop, a round
    trip to the Ray engine's budget actor): measured 37.9 requests/s of 40 in a
    local run, 38.3 on Ray. The half quantum of slack (LATE_SLACK) makes up a
    lateness of up to half an interval at the next token. A token taken from
    an empty (idle) bucket takes the slack too (PriorityGate._wait_token), so
    after idling a quantum goes at once and the next token is never early;
    any minute still holds at most rpm + 1 requests (rpm + 1.5, rounded down)
    below 60,000 rpm, as with capacity 1, and rpm + 1.5 quanta above (2.5
    requests in 100,000); `WindowLog` holds back the ones too many where it
    keeps a window (WINDOW_LOG_MAX).
    The capacity gets a hair of slack (_HAIR) more because the leak is computed
    in floating point: 1 - 1.2 * (1 / 1.2) can leave 1e-16 in the bucket, and a
    clock that does not move between checks (virtual time) would then wait
    forever for a zero-length timer.
    """
    capacity = pacing_quantum(rpm) * (1.0 + LATE_SLACK) + _HAIR
    return AsyncLimiter(capacity, 60.0 / rpm * capacity)


def idle_token(limiter: AsyncLimiter) -> float:
    """What a token from an empty bucket takes: one, and the bucket's slack
    (what its capacity holds beyond a quantum, see make_limiter); a bucket
    with no room for both (capacity 1) gives one."""
    slack = (limiter.max_rate - _HAIR) * LATE_SLACK / (1.0 + LATE_SLACK)
    return min(limiter.max_rate, 1.0 + slack)


class _Waiter:
    __slots__ = ("event", "granted", "key")

    def __init__(self, key: tuple[int, float, int]) -> None:
        self.key = key
        self.granted = False
        # Made only when it has to wait for another pump: most acquires pump
        # themselves, and an anyio.Event per request showed in the profile.
        self.event: anyio.Event | None = None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class PriorityGate:
    """Hands out the limiter's tokens to waiters in priority order (lowest key first).

    aiolimiter serves waiters in arrival order; a batch runner needs the poll
    of a request about to expire to go before a new submit. One waiter at a
    time (the "pump") waits on the limiter; each token goes to the most urgent
    waiter, which may be another task than the pump.
    """

    __slots__ = ("_granted_at", "_heap", "_limiter", "_order", "_paced_by", "_pumping")

    def __init__(self, limiter: AsyncLimiter) -> None:
        self._limiter = limiter
        self._paced_by = limiter
        self._granted_at = float("-inf")  # loop time of the last token
        self._heap: list[_Waiter] = []
        self._order = itertools.count()
        self._pumping = False

    def replace_limiter(self, limiter: AsyncLimiter) -> None:
        """Pace at a new rate from the next token on."""
        self._limiter = limiter

    @property
    def waiting(self) -> int:
        return len(self._heap)

    async def acquire(self, priority: tuple[int, float]) -> None:
        """Wait for a token; `priority` is (class, then earliest first within it)."""
        waiter = _Waiter((*priority, next(self._order)))
        heapq.heappush(self._heap, waiter)
        try:
            while not waiter.granted:
                if self._pumping:
                    waiter.event = anyio.Event()
                    await waiter.event.wait()
                    continue
                self._pumping = True
                try:
                    await self._wait_token()
                finally:
                    self._pumping = False
                top = heapq.heappop(self._heap)
                top.granted = True
                top.wake()
                self._wake_next_pump()
        except BaseException:
            if not waiter.granted:
                self._heap.remove(waiter)
                heapq.heapify(self._heap)
                self._wake_next_pump()
            raise

    async def _wait_token(self) -> None:
        limiter = self._limiter
        if limiter is not self._paced_by:
            # A new limiter's bucket starts empty and would hand out a token at
            # once: one request more per change of rate, which at a real limit
            # just under the rate was enough to draw 429s. Space the first
            # token from the last one at the new period instead.
            period = limiter.time_period / limiter.max_rate
            await anyio.sleep_until(self._granted_at + period)
            self._paced_by = limiter
        # An empty bucket has been idle, not late: its token takes the slack
        # too, so the next one comes a whole interval later (see make_limiter).
        idle = limiter.has_capacity(limiter.max_rate - _HAIR)
        await limiter.acquire(idle_token(limiter) if idle else 1.0)
        # The loop's clock, which anyio's is on asyncio: anyio.current_time()
        # costs ten times more (2.8 against 0.2 microseconds), once a request.
        self._granted_at = asyncio.get_running_loop().time()

    def _wake_next_pump(self) -> None:
        if self._heap and not self._pumping:
            self._heap[0].wake()


# Who gets the next token, by class: a result known to be ready (the job holds
# an in-flight slot and is pure gain once fetched), then polls of requests
# close to their retention deadline, then submits (the pipeline stays full;
# in-flight backpressure keeps them from starving polls), then other polls.
# Within a class, the earliest retention deadline first: an absolute time, so
# a poll that has waited keeps its place (time *left*, computed on arrival,
# would let every later poll overtake it).
RESULT, URGENT_POLL, SUBMIT, POLL = range(4)
URGENT_POLL_S = 600.0


RATE_WINDOW_S = 60.0
"""The window a requests-per-minute limit is counted over."""


class FreePollsEvidence:
    """Whether `auto` has seen that polls are free: for sizing the work in flight.

    Until a poll draws a 429, `auto` sends polls as free; but sizing the work in
    flight as if they were free puts about three times as many jobs in the air
    as a budget that counts polls can serve, and when the first poll 429 says
    they count, those jobs wait their turn for poll tokens (detection p95 of
    five mean latencies, bench_budget.py scenario 1). So the run sizes as if
    polls count until this says otherwise: more requests in one rate window
    than the rpm allows, by a tenth, with no 429 on a poll, which a server that
    counted polls would have refused. Pure: `now` and the running total of
    requests sent are passed in.
    """

    __slots__ = ("_proven", "_rpm", "_samples")

    def __init__(self, rpm: float) -> None:
        self._rpm = rpm
        self._samples: deque[tuple[float, int]] = deque()  # (time, requests sent so far)
        self._proven = False

    def proven(self, now: float, sent_total: int) -> bool:
        if not self._proven:
            self._samples.append((now, sent_total))
            while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_S:
                self._samples.popleft()
            in_window = sent_total - self._samples[0][1]
            self._proven = in_window > 1.1 * self._rpm * RATE_WINDOW_S / 60.0
            if self._proven:
                self._samples.clear()
        return self._proven


class SentWindow:
    """Requests sent in the last RATE_WINDOW_S, counted in 60 buckets (constant memory).

    Kept while `auto` still believes polls are free: the server may have
    counted every one of those polls, and when the first 429 on a poll says
    so, its window is still full of them.
    """

    __slots__ = ("_buckets", "_width")

    def __init__(self) -> None:
        self._width = RATE_WINDOW_S / 60
        self._buckets: deque[list[int]] = deque()  # [bucket index, count], oldest first

    def record(self, now: float) -> None:
        index = self._expire(now)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([index, 1])

    def count(self, now: float) -> int:
        self._expire(now)
        return sum(count for _, count in self._buckets)

    def first_leaves_at(self, now: float) -> float:
        """When the oldest request recorded here may leave the window: `now`
        if there is none (never later than it does, up to one bucket early)."""
        self._expire(now)
        if not self._buckets:
            return now
        return max(now, self._buckets[0][0] * self._width + RATE_WINDOW_S)

    def drained_at(self, now: float, limit: float) -> float:
        """When at most `limit` - 1 of the requests sent so far are still inside
        a window ending then: `now` if that is already so."""
        self._expire(now)
        total = sum(count for _, count in self._buckets)
        drained = now
        for index, count in self._buckets:
            if total <= limit - 1:
                break
            total -= count
            # Every request of a bucket has left the window once its end has.
            drained = (index + 1) * self._width + RATE_WINDOW_S
        return max(now, drained)

    def _expire(self, now: float) -> int:
        """Drop the buckets that have left the window; return the bucket of `now`."""
        index = math.floor(now / self._width)
        while self._buckets and self._buckets[0][0] <= index - 60:
            self._buckets.popleft()
        return index


WINDOW_MARGIN = 0.3
"""Of a request interval: how long after the oldest request of a full window
has left it the next may go (WindowLog). It costs that share of one request a
window: 0.6% of the rate at 50 rpm. At 0.1, `--polls-count yes` drew 12
429s in 9 runs of bench_budget.py scenario 1 on a busier day (seeds 7 to 9;
each a rate cut of a tenth for three minutes, about 1.5% of a run), 3 in 15 at
0.3 (the request times there are scaled by 0.05: 0.1 of an interval was 6 ms
of real time against the jitter of two processes on two cores; on a real
network 0.3 of an interval is 360 ms at 50 rpm, 30 ms at 600)."""

WINDOW_LOG_MAX = 10_000
"""The most send times `WindowLog` keeps: limits above this many requests a
window are left to the leaky bucket alone (one request more in ten thousand)."""


class WindowLog:
    """The send times of the last requests that count, so that no window of
    RATE_WINDOW_S holds more than the limit, with a margin for network jitter.

    The leaky bucket alone spaces the requests of a minute exactly a minute
    apart: a server that keeps a log of the last minute sees them arrive with
    the network's jitter, and a request that arrives a hair early finds a
    full window (2 to 3 429s a run at a limit of exactly --rpm, bench_budget.py
    scenario 1; each a rate cut of a tenth that took minutes to climb back
    from, about 2% of goodput). Here the request one too many waits until the
    oldest of the window has been gone WINDOW_MARGIN of an interval (360 ms
    at 50 rpm), which costs that share of an interval a minute (0.6% at 50 rpm).
    Pure: `now` is passed in.
    """

    __slots__ = ("_times",)

    def __init__(self, rpm: float) -> None:
        self._times: deque[float] = deque(maxlen=min(WINDOW_LOG_MAX, _per_window(rpm)))

    def room_at(self, now: float, rpm: float) -> float:
        """When one more request keeps every window within `rpm`: `now` if at once."""
        limit = _per_window(rpm)
        if limit > len(self._times):
            return now
        margin = WINDOW_MARGIN * 60.0 / rpm
        return max(now, self._times[-limit] + RATE_WINDOW_S + margin)

    def record(self, now: float) -> None:
        self._times.append(now)


def _per_window(rpm: float) -> int:
    """Requests a window may hold at `rpm`: whole ones, at least one."""
    return max(1, math.floor(rpm * RATE_WINDOW_S / 60.0 + 1e-9))


@dataclass(frozen=True, slots=True)
class AimdPolicy:
    """Additive-increase, multiplicative-decrease of the effective rate (TCP Reno's rule).

    Increase: `increase_share` of the ceiling (`--rpm`) per window of time in
    which requests go through, so that after a cut the climb back takes the
    same number of windows whatever the rpm. Decrease: a 429 cuts the rate to
    `decrease_factor` x, or to what the server let through over the last
    window if that is lower, but never below half (one signal is never worth
    more than Reno's halving). For `guard_s` after a cut further 429s are the
    same signal: the server's window still holds requests sent at the old rate.
    """

    increase_share: float = 0.03
    decrease_factor: float = 0.9
    guard_s: float = RATE_WINDOW_S
    floor_rpm: float = 1.0


def aimd_after_success(
    effective_rpm: float, ceiling_rpm: float, last_success_at: float, now: float, policy: AimdPolicy
) -> float:
    """The rate after a counted request went through at `now`, the previous at `last_success_at`.

    The time between the two is credited up to two request intervals: enough
    when only some requests report a success (the poll that sees COMPLETED
    goes straight on to the fetch), and no credit for time the budget sat
    idle (a rate never tried is not known to be safe).
    """
    credited_s = min(max(0.0, now - last_success_at), 2 * 60.0 / effective_rpm)
    step = policy.increase_share * ceiling_rpm * credited_s / RATE_WINDOW_S
    return min(ceiling_rpm, effective_rpm + step)


def aimd_after_429(
    effective_rpm: float,
    last_decrease_at: float,
    now: float,
    policy: AimdPolicy,
    delivered_rpm: float | None = None,
) -> tuple[float, float]:
    """(new rate, time of the decrease) after a 429 at `now`; `last_decrease_at`
    comes back unchanged when this 429 is no new signal.

    `delivered_rpm`: the counted requests the server accepted over the last
    window, as a rate (None: unknown).
    """
    if now - last_decrease_at < policy.guard_s:
        return effective_rpm, last_decrease_at
    target = effective_rpm * policy.decrease_factor
    if delivered_rpm is not None:
        target = max(effective_rpm / 2, min(target, delivered_rpm))
    return max(policy.floor_rpm, target), now


class Budget(Protocol):
    """What the stages of a run ask of the request budget. `RateBudget` is the
    one of a local run; the Ray engine's proxy (`batchrunner.engine_ray`)
    forwards each call to one budget shared by every worker of a cluster."""

    @property
    def rpm(self) -> float: ...

    @property
    def effective_rpm(self) -> float:
        """The rate paced at now (below `rpm` after 429s)."""
        ...

    @property
    def polls_count(self) -> bool: ...

    async def acquire_submit(self) -> None: ...

    async def acquire_result(self, deadline: float) -> None: ...

    async def acquire_poll(self, deadline: float) -> None: ...

    def on_rate_limited(self, retry_after_s: float | None, *, is_poll: bool) -> float: ...

    def on_success(self, *, counted: bool = True) -> None: ...


class RateBudget:
    __slots__ = (
        "_aimd",
        "_clock",
        "_cooldown_until",
        "_gate",
        "_last_decrease_at",
        "_last_success_at",
        "_learned_drain_until",
        "_limiter_rpm",
        "_log",
        "_polls_unknown",
        "_refused",
        "_rng",
        "_sent",
        "effective_rpm",
        "polls_count",
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
        aimd: AimdPolicy | None = None,
    ) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = rpm
        self.effective_rpm = rpm
        self._limiter_rpm = rpm
        self._gate = PriorityGate(make_limiter(rpm))
        # Plain attributes, not properties: read several times a request.
        self.polls_count = polls_count is PollsCount.YES
        """Whether status polls and fetches take tokens (as far as known)."""
        self._polls_unknown = polls_count is PollsCount.AUTO
        """`auto` and no 429 on a poll yet: polls go out free, maybe counted."""
        self._clock = clock
        self._rng = rng or random.Random()
        self._aimd = aimd or AimdPolicy()
        self._cooldown_until = 0.0
        self._last_decrease_at = float("-inf")
        self._last_success_at = float("-inf")
        self._learned_drain_until = float("-inf")
        # Requests that count, sent and refused in the last window (while
        # `auto` takes polls for free, every request: the server may count
        # them). Sent minus refused is what the server let through, counted
        # here rather than from on_success, which not every request reports.
        self._sent = SentWindow()
        self._log = WindowLog(rpm)
        self._refused = SentWindow()
        self.rate_limited = 0
        self.polls_learned_counting = False

    async def acquire_submit(self) -> None:
        await self._acquire(lambda: (SUBMIT, 0.0))

    async def acquire_result(self, deadline: float) -> None:
        """A token to fetch a result known to be ready (when polls count)."""
        await self._acquire(lambda: (RESULT, deadline) if self.polls_count else None)

    async def acquire_poll(self, deadline: float) -> None:
        """A token for a status poll (when polls count), ordered by the request's
        retention deadline (epoch seconds)."""

        def priority() -> tuple[int, float] | None:
            if not self.polls_count:
                return None
            urgent = deadline - self._clock() < URGENT_POLL_S
            return (URGENT_POLL if urgent else POLL, deadline)

        await self._acquire(priority)

    async def _acquire(self, priority: Callable[[], tuple[int, float] | None]) -> None:
        """Wait out the cool-down, then for a token (none needed when `priority` is None).

        A token handed out while a cool-down runs (one that began while this
        request queued for it) is dropped and the wait starts again: the
        server has just said its window is full, or named when to come back.
        """
        while True:
            # One clock read on the way through when nothing waits: every
            # request of the run passes here (issue 12's capacity profile).
            now = self._clock()
            if now < self._cooldown_until:
                await anyio.sleep(self._cooldown_until - now)
                continue
            wanted = priority()
            if wanted is None:
                break
            await self._gate.acquire(wanted)
            await self._wait_window_room()
            now = self._clock()
            if now >= self._cooldown_until:
                break
        if wanted is not None:
            self._log.record(now)
        if wanted is not None or self._polls_unknown:
            self._sent.record(now)

    async def _wait_window_room(self) -> None:
        """Hold a token until one more request keeps the window within the rate (WindowLog)."""
        while True:
            now = self._clock()
            # At --rpm, not the learned rate: below it the rate is AIMD's to find,
            # and a log at a cut rate held requests back after every cut (issue
            # 11's half-limit scenario: 0.916 of the limit where 0.944 was).
            remaining = self._log.room_at(now, self.rpm) - now
            # A nanosecond's rounding is no room to wait for: a virtual clock
            # (looptime) does not advance by it, and the loop would spin.
            if remaining <= 1e-9:
                return
            await anyio.sleep(remaining)

    def cooling_down(self) -> bool:
        return self._clock() < self._cooldown_until

    def on_rate_limited(self, retry_after_s: float | None, *, is_poll: bool) -> float:
        """Start (or extend) the shared cool-down and lower the rate; return the pause.

        Only a new signal cuts the rate: 429s that arrive during a cool-down,
        a drain or the guard after a cut answer requests sent before it (the
        server's window still held the old rate's requests), so they are one
        signal with it.
        """
        now = self._clock()
        self.rate_limited += 1
        self._refused.record(now)
        if is_poll and self._polls_unknown:
            # The 429s so far came from polls we thought free, not from too
            # high a rate: learn the accounting, and take back the decreases.
            # The server's window still holds every request sent while polls
            # looked free: wait until it has room again, and read the 429s of
            # requests sent before then as part of this one signal. (Sending
            # on at once was met by a window of 429s, a rate cut to 0.8 x and
            # minutes of additive increase back.)
            self.polls_learned_counting = self.polls_count = True
            self._polls_unknown = False
            self.effective_rpm = self.rpm
            per_window = self.rpm * RATE_WINDOW_S / 60.0
            self._learned_drain_until = self._sent.drained_at(now, per_window)
            self._cooldown_until = max(self._cooldown_until, self._learned_drain_until)
            self._last_decrease_at = float("-inf")
        elif now >= max(self._learned_drain_until, self._cooldown_until):
            # Plus one: the count may just have lost a request at the window's
            # edge (buckets leave whole); at 3 a window that is a third.
            delivered = self._sent.count(now) - self._refused.count(now) + 1
            delivered_rpm = max(1, delivered) * 60.0 / RATE_WINDOW_S
            self.effective_rpm, self._last_decrease_at = aimd_after_429(
                self.effective_rpm, self._last_decrease_at, now, self._aimd, delivered_rpm
            )
        self._apply_rate()
        if retry_after_s is not None:
            delay = retry_after_s
        else:
            # The server's window is full and it did not say for how long: it
            # has room again once the oldest request we sent in it leaves (a
            # sliding window's Retry-After, from our own log). Sending before
            # then only draws 429s, and where refused requests count too, each
            # keeps the window full. At least full jitter over one request
            # interval at the new rate: while nothing gets through, each
            # signal halves the rate, so this doubles (exponential backoff).
            jitter = self._rng.uniform(0.0, min(RATE_WINDOW_S, 60.0 / self.effective_rpm))
            delay = max(jitter, self._sent.first_leaves_at(now) - now)
        self._cooldown_until = max(self._cooldown_until, now + delay)
        return delay

    def on_success(self, *, counted: bool = True) -> None:
        if counted:
            now = self._clock()
            self.effective_rpm = aimd_after_success(
                self.effective_rpm, self.rpm, self._last_success_at, now, self._aimd
            )
            self._last_success_at = now
            self._apply_rate()

    def _apply_rate(self) -> None:
        # A new bucket only when the rate moved by 2%: cheap, and waiters
        # already pumping finish at the old pace.
        if abs(self.effective_rpm - self._limiter_rpm) >= 0.02 * self._limiter_rpm:
            self._limiter_rpm = self.effective_rpm
            self._gate.replace_limiter(make_limiter(self.effective_rpm))

    def statistics(self) -> dict[str, float | bool]:
        return {
            "rpm": self.rpm,
            "effective_rpm": round(self.effective_rpm, 2),
            "rate_limited": self.rate_limited,
            "polls_count": self.polls_count,
            "cooling_down": self.cooling_down(),
        }
