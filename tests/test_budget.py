"""RateBudget: shared 429 cool-down, learning whether polls count, pacing in virtual time."""

from __future__ import annotations

import asyncio
import itertools
import math
import random

import anyio
import pytest

from batchrunner.budget import (
    POLL,
    RESULT,
    SUBMIT,
    URGENT_POLL,
    WINDOW_LOG_MAX,
    WINDOW_MARGIN,
    AimdPolicy,
    FreePollsEvidence,
    PollsCount,
    PriorityGate,
    RateBudget,
    SentWindow,
    WindowLog,
    aimd_after_429,
    aimd_after_success,
    make_limiter,
    pacing_quantum,
)


class FakeClock:
    def __init__(self, now: float = 1_795_608_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MaxRandom(random.Random):
    """uniform() answers its upper bound: exposes the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def budget(
    rpm: float = 60.0,
    polls: PollsCount = PollsCount.AUTO,
    clock: FakeClock | None = None,
    rng: random.Random | None = None,
) -> tuple[RateBudget, FakeClock]:
    clock = clock or FakeClock()
    return RateBudget(rpm, polls, clock, rng or random.Random(0)), clock


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("rpm", [0, -1, -50.0])
def test_rpm_must_be_positive(rpm: float) -> None:
    with pytest.raises(ValueError, match="rpm"):
        RateBudget(rpm, PollsCount.AUTO, FakeClock())


def test_fresh_budget_is_not_cooling_down() -> None:
    b, _ = budget()
    assert not b.cooling_down()
    assert b.rate_limited == 0


# --------------------------------------------------------------------------- cool-down


@pytest.mark.parametrize("retry_after", [0.5, 1.0, 7.0, 30.0, 120.0])
@pytest.mark.parametrize("is_poll", [False, True])
def test_cool_down_honours_retry_after(retry_after: float, is_poll: bool) -> None:
    b, clock = budget()
    assert b.on_rate_limited(retry_after, is_poll=is_poll) == retry_after
    assert b.cooling_down()
    clock.advance(retry_after - 0.01)
    assert b.cooling_down()
    clock.advance(0.01)
    assert not b.cooling_down()


def test_retry_after_zero_means_no_cool_down() -> None:
    b, _ = budget()
    assert b.on_rate_limited(0.0, is_poll=False) == 0.0
    assert not b.cooling_down()
    assert b.rate_limited == 1


@pytest.mark.parametrize(
    ("first", "gap", "second", "cool_until"),
    [
        (30.0, 0.0, 5.0, 30.0),  # a shorter later cool-down does not shorten it
        (30.0, 10.0, 5.0, 30.0),
        (10.0, 0.0, 40.0, 40.0),  # a longer one extends it
        (10.0, 5.0, 10.0, 15.0),
        (10.0, 20.0, 3.0, 23.0),  # after it ended, a new one starts from now
    ],
)
def test_cool_down_is_shared_and_only_extends(
    first: float, gap: float, second: float, cool_until: float
) -> None:
    b, clock = budget()
    start = clock.now
    b.on_rate_limited(first, is_poll=False)
    clock.advance(gap)
    b.on_rate_limited(second, is_poll=True)
    clock.now = start + cool_until - 0.001
    assert b.cooling_down()
    clock.now = start + cool_until
    assert not b.cooling_down()


@pytest.mark.parametrize(
    ("rpm", "ceilings"),
    [
        # Nothing ever gets through: each signal (one a window) halves the
        # rate, so the jitter ceiling, one request interval, doubles; the rate
        # stops at the floor (1 rpm) and the ceiling at one window (60 s).
        (60.0, [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (50.0, [2.4, 4.8, 9.6, 19.2, 38.4, 60.0]),
        (5.0, [24.0, 48.0, 60.0, 60.0]),
        (600.0, [0.2, 0.4, 0.8, 1.6]),
    ],
)
def test_cool_down_without_retry_after_doubles_while_nothing_gets_through(
    rpm: float, ceilings: list[float]
) -> None:
    b, clock = budget(rpm=rpm, polls=PollsCount.YES, rng=MaxRandom())
    for ceiling in ceilings:
        delay = b.on_rate_limited(None, is_poll=False)
        assert delay == pytest.approx(ceiling)
        assert b.cooling_down()
        clock.advance(60.0)  # the next 429 comes after the guard: a new signal
        assert not b.cooling_down()


def test_a_burst_of_429s_is_one_signal() -> None:
    """Requests in the air when the first 429 came back, or sent while the
    server's window still held the old rate's requests, get 429s too: one cut."""
    b, clock = budget(rpm=60.0, polls=PollsCount.YES, rng=MaxRandom())
    assert b.on_rate_limited(None, is_poll=False) == pytest.approx(2.0)
    assert b.effective_rpm == 30.0
    for _ in range(12):
        clock.advance(4.0)
        assert b.on_rate_limited(None, is_poll=True) == pytest.approx(2.0)
    assert b.effective_rpm == 30.0
    clock.advance(12.0)  # 60 s after the cut
    b.on_rate_limited(None, is_poll=False)
    assert b.effective_rpm == 15.0


def test_learning_that_polls_count_takes_back_the_rate_decreases() -> None:
    b, clock = budget(rpm=50.0, polls=PollsCount.AUTO)
    b.on_rate_limited(None, is_poll=False)
    assert b.effective_rpm == pytest.approx(25.0)  # nothing of ours got through: halved
    clock.advance(60)
    b.on_rate_limited(None, is_poll=True)
    assert b.polls_count
    assert b.effective_rpm == 50.0
    clock.advance(60)
    b.on_rate_limited(None, is_poll=True)  # now a rate signal
    assert b.effective_rpm == pytest.approx(25.0)


@pytest.mark.parametrize("seed", range(5))
def test_cool_down_without_retry_after_stays_within_jitter_bounds(seed: int) -> None:
    b, clock = budget(rpm=30.0, polls=PollsCount.YES, rng=random.Random(seed))
    for _ in range(1, 10):
        delay = b.on_rate_limited(None, is_poll=False)
        assert 0.0 <= delay <= min(60.0, 60.0 / b.effective_rpm)
        clock.advance(60.0)


def test_rate_limited_counter() -> None:
    b, _ = budget()
    for i in range(1, 6):
        b.on_rate_limited(1.0, is_poll=i % 2 == 0)
        assert b.rate_limited == i
    b.on_success()
    assert b.rate_limited == 5


# --------------------------------------------------------------------------- polls_count


def test_auto_polls_are_free_until_a_429_on_a_poll() -> None:
    b, _ = budget(polls=PollsCount.AUTO)
    assert b.polls_count is False
    b.on_rate_limited(1.0, is_poll=False)
    assert b.polls_count is False
    assert b.polls_learned_counting is False
    b.on_rate_limited(1.0, is_poll=True)
    assert b.polls_count is True
    assert b.polls_learned_counting is True
    b.on_success()
    assert b.polls_count is True  # learned once, kept


@pytest.mark.parametrize(
    ("mode", "counts"),
    [(PollsCount.YES, True), (PollsCount.NO, False)],
)
@pytest.mark.parametrize("is_poll", [False, True])
def test_fixed_polls_count(mode: PollsCount, counts: bool, is_poll: bool) -> None:
    b, _ = budget(polls=mode)
    assert b.polls_count is counts
    b.on_rate_limited(1.0, is_poll=is_poll)
    assert b.polls_count is counts


@pytest.mark.parametrize("value", ["yes", "no", "auto"])
def test_polls_count_values(value: str) -> None:
    assert PollsCount(value).value == value


# --------------------------------------------------------------------------- statistics


def test_statistics() -> None:
    b, clock = budget(rpm=50.0, polls=PollsCount.AUTO)
    assert b.statistics() == {
        "rpm": 50.0,
        "effective_rpm": 50.0,
        "rate_limited": 0,
        "polls_count": False,
        "cooling_down": False,
    }
    b.on_rate_limited(10.0, is_poll=True)
    assert b.statistics() == {
        "rpm": 50.0,
        "effective_rpm": 50.0,
        "rate_limited": 1,
        "polls_count": True,
        "cooling_down": True,
    }
    clock.advance(10.0)
    assert b.statistics()["cooling_down"] is False


# --------------------------------------------------------------------------- pacing (virtual time)


# Rates whose period (60 / rpm) is exact in binary floating point: with a period like
# 1.2 s (rpm 50) aiolimiter's float residue asks to be woken "now" again and again,
# and looptime's quantised clock never moves on (a hang in virtual time only).


def loop_budget(rpm: float, polls: PollsCount = PollsCount.AUTO) -> RateBudget:
    return RateBudget(rpm, polls, asyncio.get_running_loop().time, random.Random(0))


def now() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("n", "rpm"),
    [(1, 60.0), (2, 60.0), (5, 60.0), (10, 120.0), (4, 6.0), (41, 240.0), (20, 30.0), (7, 12.0)],
)
async def test_sequential_submits_are_paced(n: int, rpm: float) -> None:
    b = loop_budget(rpm)
    start = now()
    for _ in range(n):
        await b.acquire_submit()
    assert now() - start == pytest.approx((n - 1) * 60.0 / rpm, rel=0.02, abs=0.05)


@pytest.mark.anyio
@pytest.mark.parametrize(("n", "rpm"), [(8, 60.0), (25, 240.0)])
async def test_concurrent_submits_are_paced(n: int, rpm: float) -> None:
    b = loop_budget(rpm)
    start = now()
    times: list[float] = []

    async def worker() -> None:
        await b.acquire_submit()
        times.append(now() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(worker)
    assert len(times) == n
    assert max(times) == pytest.approx((n - 1) * 60.0 / rpm, rel=0.02, abs=0.05)
    ordered = sorted(times)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ordered)]
    assert all(gap >= 60.0 / rpm - 0.01 for gap in gaps)  # no burst


def test_the_pacing_quantum_is_one_request_until_a_millisecond_holds_more() -> None:
    assert pacing_quantum(50.0) == 1.0
    assert pacing_quantum(60_000.0) == 1.0
    assert pacing_quantum(600_000.0) == pytest.approx(10.0)
    assert make_limiter(50.0).max_rate == pytest.approx(1.5)
    assert make_limiter(600_000.0).max_rate == pytest.approx(15.0)


@pytest.mark.anyio
@pytest.mark.parametrize("concurrent", [False, True])
async def test_above_60000_rpm_tokens_are_paced_a_millisecond_at_a_time(concurrent: bool) -> None:
    """The loop cannot wait less than a millisecond: at 600,000 rpm (10 a
    millisecond) an idle bucket gives 10 tokens at once, then 10 a
    millisecond, where pacing each token (an interval of 0.1 ms) gave one at
    once and put a sleep of the pump behind every other one."""
    b = loop_budget(600_000.0)
    start = now()
    times: list[float] = []

    async def take() -> None:
        await b.acquire_submit()
        times.append(now() - start)

    if concurrent:
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(take)
    else:
        for _ in range(100):
            await take()
    assert sum(1 for t in times if t == 0.0) == 10
    assert max(times) == pytest.approx(90 / 10_000, rel=0.02)
    # Any window of w seconds holds at most w x the rate + the capacity (15).
    ordered = sorted(times)
    for i, first in enumerate(ordered):
        for j in range(i, len(ordered)):
            assert j - i + 1 <= (ordered[j] - first) * 10_000 + 15 + 1e-6


@pytest.mark.anyio
async def test_free_polls_do_not_use_the_budget() -> None:
    b = loop_budget(60.0, PollsCount.NO)
    start = now()
    for _ in range(100):
        await b.acquire_poll(now() + 3600)
    assert now() - start == pytest.approx(0.0, abs=0.01)
    # And they leave the submit budget untouched.
    await b.acquire_submit()
    assert now() - start == pytest.approx(0.0, abs=0.01)


@pytest.mark.anyio
async def test_counted_polls_share_the_budget_with_submits() -> None:
    b = loop_budget(60.0, PollsCount.YES)
    start = now()
    for _ in range(3):
        await b.acquire_poll(now() + 3600)
        await b.acquire_submit()
    assert now() - start == pytest.approx(5.0, rel=0.02, abs=0.05)


@pytest.mark.anyio
async def test_auto_polls_start_counting_after_a_poll_429() -> None:
    b = loop_budget(60.0, PollsCount.AUTO)
    start = now()
    for _ in range(10):
        await b.acquire_poll(now() + 3600)
    assert now() - start == pytest.approx(0.0, abs=0.01)
    b.on_rate_limited(2.0, is_poll=True)
    start = now()
    for _ in range(4):
        await b.acquire_poll(now() + 3600)
    # 2 s of cool-down, then 4 polls paced at the rate (not lowered: the 429
    # taught that polls count, it was not a sign of too high a rate).
    assert b.effective_rpm == pytest.approx(60.0)
    assert now() - start == pytest.approx(2.0 + 3.0, rel=0.02, abs=0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("polls", [PollsCount.NO, PollsCount.YES])
async def test_cool_down_pauses_submits_and_polls_together(polls: PollsCount) -> None:
    b = loop_budget(240.0, polls)
    b.on_rate_limited(30.0, is_poll=False)
    start = now()
    released: list[tuple[str, float]] = []

    async def submit() -> None:
        await b.acquire_submit()
        released.append(("submit", now() - start))

    async def poll() -> None:
        await b.acquire_poll(now() + 3600)
        released.append(("poll", now() - start))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(submit)
            tg.start_soon(poll)
    assert len(released) == 6
    assert all(t >= 30.0 - 0.01 for _, t in released)
    assert all(t <= 30.0 + 5 * 60 / b.effective_rpm + 0.01 for _, t in released)


@pytest.mark.anyio
async def test_cool_down_extended_while_waiting() -> None:
    b = loop_budget(60.0)
    b.on_rate_limited(10.0, is_poll=False)
    start = now()

    async def extend() -> None:
        await anyio.sleep(5.0)
        b.on_rate_limited(20.0, is_poll=False)  # now until start + 25

    async with anyio.create_task_group() as tg:
        tg.start_soon(extend)
        # A free poll (`auto`, no 429 on a poll yet) waits out the cool-down only.
        await b.acquire_poll(start + 3600.0)
    assert now() - start == pytest.approx(25.0, abs=0.05)


@pytest.mark.anyio
async def test_a_free_poll_goes_at_once_when_not_cooling() -> None:
    b = loop_budget(60.0)
    start = now()
    await b.acquire_poll(start + 3600.0)
    assert now() - start == 0.0


@pytest.mark.anyio
async def test_a_queued_submit_honours_a_cool_down_that_began_while_it_waited() -> None:
    b = loop_budget(60.0, PollsCount.YES)
    start = now()
    sent: list[float] = []

    async def submit() -> None:
        await b.acquire_submit()
        sent.append(now() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(submit)
        await anyio.sleep(1.5)  # two sent (t=0, t=1); two queued in the gate
        b.on_rate_limited(30.0, is_poll=False)
    assert sent[:2] == pytest.approx([0.0, 1.0], abs=0.01)
    # Retry-After 30 s from t=1.5: nothing goes out before t=31.5.
    assert all(t >= 31.5 - 0.01 for t in sent[2:])
    assert 1.0 - 0.01 <= sent[3] - sent[2] <= 2.0  # paced again, no burst


def test_sent_window_drains_when_the_oldest_requests_leave_it() -> None:
    window = SentWindow()
    for i in range(100):  # 100 requests over 10 s, at t = 0.0, 0.1, ..., 9.9
        window.record(i / 10)
    # A 50-per-window limit: room for one more once 51 of them have left the
    # window, i.e. the 50 sent before t=5.0 and the one at 5.0; the one at t=5.0
    # lies in the 1-s bucket [5, 6), which leaves at 66.
    assert window.drained_at(10.0, 50) == pytest.approx(66.0)
    # Under the limit already: no wait.
    assert window.drained_at(10.0, 500) == 10.0
    # Long after, the window is empty.
    assert window.drained_at(200.0, 1) == 200.0


@pytest.mark.anyio
async def test_auto_learning_waits_for_the_window_of_free_polls_to_drain() -> None:
    b = loop_budget(60.0, PollsCount.AUTO)
    start = now()
    for _ in range(120):  # "free" polls, 2 a second for a minute
        await b.acquire_poll(now() + 3600)
        await anyio.sleep(0.5)
    learned_at = now()
    b.on_rate_limited(None, is_poll=True)
    assert b.polls_count and b.effective_rpm == 60.0
    # The server's window holds the last minute's 120 polls: room for one
    # more once 61 have left it, i.e. ~30 s after learning.
    assert b.cooling_down()
    # 429s of requests sent before learning keep arriving: no rate cut.
    await anyio.sleep(5.0)
    b.on_rate_limited(None, is_poll=False)
    assert b.effective_rpm == 60.0
    await b.acquire_submit()
    assert now() - learned_at == pytest.approx(31.0, abs=1.1)
    assert now() - start > 90.0
    # After the drain, a 429 is a rate signal again: 0.9 x, since the window
    # shows the server let more than 54 through (the polls it counted).
    b.on_rate_limited(None, is_poll=False)
    assert b.effective_rpm == pytest.approx(54.0)


# --------------------------------------------------------------------------- AIMD and priority


def recovery_windows(
    rpm: float, start_rpm: float, target_rpm: float, reporting: int = 1, of: int = 1
) -> float:
    """Windows (60 s) from `start_rpm` back to `target_rpm` under AimdPolicy(),
    requests going out at the effective rate and `reporting` of every `of`
    reporting a success (the poller reports none for the poll that sees
    COMPLETED: 2 of 3 when polls count)."""
    policy = AimdPolicy()
    rate, now, last_success = start_rpm, 0.0, 0.0
    for n in itertools.count():
        if rate >= target_rpm:
            return now / 60.0
        now += 60.0 / rate
        if n % of < reporting:
            rate = aimd_after_success(rate, rpm, last_success, now, policy)
            last_success = now
    raise AssertionError  # unreachable


@pytest.mark.parametrize("rpm", [5.0, 50.0, 600.0, 6000.0])
@pytest.mark.parametrize(
    ("limit_share", "reporting", "of"),
    [
        (1.0, 1, 1),  # a cut at --rpm, every request reports
        (0.5, 1, 1),  # a cut at a real limit of half --rpm (bench_budget scenario 3)
        (0.5, 2, 3),  # the same, polls counting: 2 of 3 requests report a success
        (0.2, 1, 1),
    ],
)
def test_recovery_after_a_cut_takes_the_same_windows_whatever_the_rpm(
    rpm: float, limit_share: float, reporting: int, of: int
) -> None:
    """Additive increase of 3% of --rpm a window: from 0.9 x a rate back to it
    takes 0.1 x rate / (0.03 x rpm) windows, whatever the rpm (the old fixed
    0.04 rpm per request took 5 windows at rpm 5, under one at rpm 6000)."""
    limit = rpm * limit_share
    expected = 0.1 * limit_share / 0.03
    got = recovery_windows(rpm, 0.9 * limit, limit, reporting, of)
    # One request interval of slack, a whole one at rpm 5.
    assert got == pytest.approx(expected, abs=60.0 / limit / 60.0 + 0.01)


@pytest.mark.parametrize(
    ("gap_s", "credited_s"),
    [
        (1.0, 1.0),  # at 60 rpm: one interval
        (2.0, 2.0),  # a request that reported nothing in between
        (10.0, 2.0),  # idle: at most two intervals are credited
        (3600.0, 2.0),
        (-1.0, 0.0),  # a clock that stepped back credits nothing
    ],
)
def test_the_increase_credits_time_sending_not_time_idle(gap_s: float, credited_s: float) -> None:
    policy = AimdPolicy()
    rate = aimd_after_success(60.0, 100.0, 1000.0, 1000.0 + gap_s, policy)
    assert rate - 60.0 == pytest.approx(0.03 * 100.0 * credited_s / 60.0)


def test_the_increase_stops_at_the_ceiling() -> None:
    assert aimd_after_success(49.99, 50.0, 0.0, 1.0, AimdPolicy()) == 50.0


@pytest.mark.parametrize(
    ("rate", "delivered", "expected"),
    [
        (50.0, None, 45.0),  # Reno: 0.9 x
        (50.0, 48.0, 45.0),  # the server let more through than 0.9 x: 0.9 x
        (50.0, 26.0, 26.0),  # it let through about half: straight there (the first cut at start)
        (50.0, 10.0, 25.0),  # never below half in one signal
        (50.0, 1.0, 25.0),  # nothing of ours in the window: someone else's, halve
        (25.5, 26.0, 22.95),  # overshoot of a real limit of 25: 0.9 x
        (1.5, 0.5, 1.0),  # the floor
    ],
)
def test_a_429_cuts_to_the_lower_of_0_9x_and_what_got_through(
    rate: float, delivered: float | None, expected: float
) -> None:
    new, at = aimd_after_429(rate, float("-inf"), 100.0, AimdPolicy(), delivered)
    assert (new, at) == (pytest.approx(expected), 100.0)


@pytest.mark.parametrize(
    ("since_cut_s", "new_signal"), [(0.0, False), (30.0, False), (59.9, False), (60.0, True)]
)
def test_429s_within_a_window_of_a_cut_are_the_same_signal(
    since_cut_s: float, new_signal: bool
) -> None:
    new, at = aimd_after_429(45.0, 100.0, 100.0 + since_cut_s, AimdPolicy(), None)
    assert (new, at) == ((40.5, 100.0 + since_cut_s) if new_signal else (45.0, 100.0))


def test_rate_never_below_the_floor() -> None:
    policy = AimdPolicy(floor_rpm=2.0)
    rate, at = 2.1, float("-inf")
    for step in range(10):
        rate, at = aimd_after_429(rate, at, 1000.0 * step, policy)
    assert rate == 2.0


@pytest.mark.anyio
async def test_a_429_cuts_to_what_the_server_let_through() -> None:
    """35 of ours went through in the window (the server's limit, say): the cut
    goes to about 35 rpm at once, not 0.9 x 60 and 0.9 x that, window after window."""
    b = loop_budget(60.0, PollsCount.YES)
    for _ in range(36):  # one a second; the 36th is refused
        await b.acquire_submit()
    b.on_rate_limited(None, is_poll=False)
    assert b.effective_rpm == pytest.approx(36.0)  # 35 through, + 1 for the window's edge


@pytest.mark.anyio
async def test_without_retry_after_the_cool_down_lasts_until_our_oldest_request_leaves() -> None:
    b = loop_budget(60.0, PollsCount.YES)
    start = now()
    for _ in range(26):
        await b.acquire_submit()
    # Refused at t=25: the server's window holds our requests since t=0, and
    # the first leaves it at t=60; any request sent before then is refused.
    delay = b.on_rate_limited(None, is_poll=False)
    assert now() - start + delay == pytest.approx(60.0, abs=0.01)
    await b.acquire_submit()
    assert now() - start == pytest.approx(60.0, abs=0.01)


@pytest.mark.anyio
async def test_a_new_rate_paces_from_the_last_token() -> None:
    """A fresh leaky bucket starts empty: swapped in, it handed out a token at
    once, one request too many per change of rate."""
    gate = PriorityGate(make_limiter(60.0))
    start = now()
    await gate.acquire((SUBMIT, 0.0))
    gate.replace_limiter(make_limiter(30.0))
    await gate.acquire((SUBMIT, 0.0))
    assert now() - start == pytest.approx(2.0, abs=0.01)
    await gate.acquire((SUBMIT, 0.0))
    assert now() - start == pytest.approx(4.0, abs=0.01)


@pytest.mark.anyio
async def test_priority_gate_serves_the_most_urgent_waiter_first() -> None:
    from aiolimiter import AsyncLimiter

    gate = PriorityGate(AsyncLimiter(1, 1.0))
    await gate.acquire((RESULT, 0.0))  # empties the bucket: the next tokens come 1 a second
    served: list[str] = []

    async def take(name: str, priority: tuple[int, float], delay: float) -> None:
        await anyio.sleep(delay)
        await gate.acquire(priority)
        served.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "submit-1", (SUBMIT, 0.0), 0.0)
        tg.start_soon(take, "submit-2", (SUBMIT, 0.0), 0.1)
        tg.start_soon(take, "late-deadline-poll", (POLL, 9000.0), 0.1)
        tg.start_soon(take, "early-deadline-poll", (POLL, 5000.0), 0.15)
        tg.start_soon(take, "urgent-poll", (URGENT_POLL, 100.0), 0.2)
        tg.start_soon(take, "result", (RESULT, 9999.0), 0.3)
    assert served == [
        "result",
        "urgent-poll",
        "submit-1",
        "submit-2",
        "early-deadline-poll",
        "late-deadline-poll",
    ]


@pytest.mark.anyio
async def test_priority_gate_survives_a_cancelled_waiter() -> None:
    from aiolimiter import AsyncLimiter

    gate = PriorityGate(AsyncLimiter(1, 1.0))
    await gate.acquire((SUBMIT, 0.0))
    with anyio.move_on_after(0.5):
        await gate.acquire((SUBMIT, 0.0))  # the pump, cancelled while waiting
    assert gate.waiting == 0
    with anyio.fail_after(2):
        await gate.acquire((SUBMIT, 0.0))


def test_window_log_holds_the_request_one_too_many_until_the_oldest_leaves() -> None:
    log = WindowLog(50.0)  # 50 a minute, interval 1.2 s
    for i in range(50):
        assert log.room_at(i * 1.0, 50.0) == i * 1.0
        log.record(i * 1.0)
    # The 51st: when the first (at 0) has left, plus WINDOW_MARGIN of an interval.
    assert log.room_at(50.0, 50.0) == pytest.approx(60.0 + WINDOW_MARGIN * 1.2)
    # At a rate cut to 40 a minute, 40 may be in the window: the 11th of them.
    assert log.room_at(50.0, 40.0) == pytest.approx(10.0 + 60.0 + WINDOW_MARGIN * 1.5)


def test_window_log_is_off_above_its_size() -> None:
    log = WindowLog(10 * WINDOW_LOG_MAX)
    for i in range(WINDOW_LOG_MAX + 5):
        log.record(i * 1e-3)
    assert log.room_at(20.0, 10 * WINDOW_LOG_MAX) == 20.0


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_window_a_margin_longer_than_a_minute_holds_at_most_the_rpm(seed: int) -> None:
    """The bucket alone spaces the requests of a minute exactly a minute apart,
    and a server counting arrivals refuses the one that the network's jitter
    brings in a hair early (2 to 3 429s a run, each a rate cut). The window
    log keeps them a minute and WINDOW_MARGIN of an interval apart."""
    rpm = 60.0
    b = loop_budget(rpm, PollsCount.YES)
    rng = random.Random(seed)
    sent: list[float] = []
    for _ in range(200):
        await b.acquire_submit()
        sent.append(now())
        if rng.random() < 0.3:  # this caller comes back late for its next token
            await anyio.sleep(rng.uniform(0.1, 0.5))
    margin = WINDOW_MARGIN * 60.0 / rpm
    gaps = [later - earlier for earlier, later in zip(sent, sent[int(rpm) :], strict=False)]
    assert min(gaps) >= 60.0 + margin - 1e-6
    # ... and the pace is kept: 200 requests take about 200 intervals, not more.
    assert sent[-1] - sent[0] <= 199 * 60.0 / rpm * 1.05


# --------------------------------------------------------------------------- max in flight


@pytest.mark.parametrize(
    ("rpm", "p90", "polls_count", "expected"),
    [
        # 50 rpm, polls count: 1.1 x 1/3.6 jobs/s x 16.5 s = 5.04, + 2 (submit and fetch).
        (50.0, 16.5, True, 1.1 * 16.5 / 3.6 + 2),
        # Polls free: 2 (headroom for latency spikes) x 50/60 jobs/s x 16.5 s = 27.5, + 2.
        (50.0, 16.5, False, 29.5),
        # 5 rpm (Segmind Free), polls free: 2.75 + 2; the retention cap (150) is not hit.
        (5.0, 16.5, False, 4.75),
        # A slow API at a high rate: capped so every request in flight can be
        # fetched inside the retention hour (rpm x 60 / 2).
        (20.0, 6000.0, True, 600),
        (600_000.0, 16.5, False, 10_000),
        (1.0, 1.0, True, 4),
    ],
)
def test_default_max_in_flight_is_littles_law(
    rpm: float, p90: float, polls_count: bool, expected: float
) -> None:
    from batchrunner.runner import default_max_in_flight

    assert default_max_in_flight(rpm, p90, polls_count) == pytest.approx(expected)


def test_auto_sizes_with_more_headroom_until_it_knows_whether_polls_count() -> None:
    """While `auto` has not seen whether polls count it sizes as if they did,
    but with the headroom of 1.3: if they turn out free, the tight level of
    known-counted polls cost detection (scenario 2: p95 0.156 against 0.129)."""
    from batchrunner.runner import default_max_in_flight

    unsure = default_max_in_flight(50.0, 16.5, True, polls_known=False)
    assert unsure == pytest.approx(1.3 * 16.5 / 3.6 + 2)
    assert default_max_in_flight(50.0, 16.5, True) < unsure
    assert default_max_in_flight(50.0, 16.5, False, polls_known=False) == pytest.approx(29.5)


@pytest.mark.parametrize("target", [4.0, 7.5, 7.25, 7.9, 29.5, 10_000.0])
def test_in_flight_dither_averages_the_fractional_limit(target: float) -> None:
    """Whole limits, each the floor or the ceiling of the target, averaging it
    over any run of ticks to within one job over the run."""
    from batchrunner.runner import InFlightDither

    dither = InFlightDither()
    limits = [dither.next(target) for _ in range(400)]
    assert set(limits) <= {math.floor(target), math.ceil(target)}
    for n in (4, 10, 400):
        assert abs(sum(limits[:n]) - n * target) < 1.0


def test_free_polls_are_proven_by_more_requests_in_a_window_than_the_rpm_allows() -> None:
    """`auto` sizes its work in flight as if polls count until one window (60 s)
    held more than 1.1 x rpm requests: a server that counted them would have
    refused some (and a 429 on a poll would have taught `auto` that they count)."""
    evidence = FreePollsEvidence(rpm=50)
    sent = 0
    for second in range(120):  # 50 a minute, exactly the budget: proves nothing
        assert not evidence.proven(float(second), sent)
        sent += 1 if second % 6 < 5 else 0
    assert not evidence.proven(120.0, sent)
    for second in range(121, 200):  # then 3 a second: the window holds 50 + 3 x n
        sent += 3
        if evidence.proven(float(second), sent):
            break
    assert 122 <= second <= 124, second  # over 55 (1.1 x 50) after two or three seconds
    assert evidence.proven(1000.0, sent)  # proven once, proven for good
