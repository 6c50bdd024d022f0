"""Poll schedule: latency model quantiles and the widening, deadline-bounded poll times."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from statistics import NormalDist

import pytest

from batchrunner.schedule import (
    EAGER_SCHEDULE,
    MODEL_PAGE_LATENCY_S,
    FirstPollFactor,
    LatencyModel,
    PollSchedule,
    next_poll_at,
)

T0 = 1_795_608_000.0  # submission time used throughout
DEADLINE = T0 + 3600.0
NO_JITTER = PollSchedule(jitter=0.0)


def warm_model(values: list[float], window: int = 512) -> LatencyModel:
    model = LatencyModel(window=window)
    for value in values:
        model.observe(value)
    return model


# --------------------------------------------------------------------------- LatencyModel


def test_prior_is_the_model_page_figure() -> None:
    assert MODEL_PAGE_LATENCY_S == 11.2


@pytest.mark.parametrize(
    ("q", "factor"),
    [(0.1, 0.65), (0.25, 0.8), (0.5, 0.95), (0.6, 0.95), (0.75, 1.15), (0.9, 1.4), (0.99, 1.4)],
)
@pytest.mark.parametrize("prior", [MODEL_PAGE_LATENCY_S, 2.0])
def test_cold_quantiles_follow_the_prior(q: float, factor: float, prior: float) -> None:
    model = LatencyModel(prior_s=prior)
    assert model.count == 0
    assert model.quantile(q) == pytest.approx(prior * factor)


def test_cold_quantiles_are_monotone() -> None:
    model = LatencyModel()
    qs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    values = [model.quantile(q) for q in qs]
    assert values == sorted(values)
    assert values[0] < MODEL_PAGE_LATENCY_S < values[-1]


@pytest.mark.parametrize("n", [1, 7])
def test_few_observations_still_answer_with_the_prior(n: int) -> None:
    model = warm_model([100.0] * n)
    assert model.count == n
    assert model.quantile(0.5) == pytest.approx(MODEL_PAGE_LATENCY_S * 0.95)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([100.0] * 8, 0.5, 100.0),
        ([float(v) for v in range(1, 10)], 0.0, 1.0),
        ([float(v) for v in range(1, 10)], 0.5, 5.0),
        ([float(v) for v in range(1, 10)], 1.0, 9.0),
        ([float(v) for v in range(9, 0, -1)], 0.5, 5.0),  # arrival order is irrelevant
        ([float(v) for v in range(0, 101)], 0.9, 90.0),
        ([float(v) for v in range(0, 101)], 0.6, 60.0),
        ([float(v) for v in range(0, 101)], 0.1, 10.0),
    ],
)
def test_quantiles_after_observations(values: list[float], q: float, expected: float) -> None:
    assert warm_model(values).quantile(q) == pytest.approx(expected)


def test_quantiles_stay_inside_observed_range() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(2.4, 0.35) for _ in range(300)]
    model = warm_model(values)
    quantiles = [model.quantile(q) for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
    assert quantiles == sorted(quantiles)
    assert quantiles[0] == min(values)
    assert quantiles[-1] == max(values)


def test_negative_observation_is_ignored() -> None:
    model = warm_model([5.0] * 8)
    model.observe(-1.0)
    assert model.count == 8
    assert model.quantile(0.0) == 5.0


@pytest.mark.parametrize("window", [8, 10, 50])
def test_window_evicts_the_oldest(window: int) -> None:
    model = warm_model([100.0] * window, window=window)
    assert model.quantile(0.5) == 100.0
    for _ in range(window):
        model.observe(1.0)
    assert model.count == window
    assert model.quantile(1.0) == 1.0
    assert model.quantile(0.0) == 1.0


def test_window_follows_drift_gradually() -> None:
    model = warm_model([10.0] * 10, window=10)
    for _ in range(6):
        model.observe(20.0)  # 4 x 10.0 and 6 x 20.0 left
    assert model.count == 10
    assert model.quantile(0.0) == 10.0
    assert model.quantile(0.5) == 20.0
    assert model.quantile(1.0) == 20.0


def test_window_eviction_with_duplicate_values() -> None:
    model = warm_model([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 2.0, 3.0], window=8)
    for value in [9.0, 9.0, 9.0]:  # evicts 3.0, 1.0, 3.0
        model.observe(value)
    assert model.count == 8
    assert [model.quantile(i / 7) for i in range(8)] == [1.0, 2.0, 2.0, 3.0, 3.0, 9.0, 9.0, 9.0]


def test_statistics() -> None:
    stats = warm_model([float(v) for v in range(0, 101)]).statistics()
    assert stats == {"count": 101.0, "p50": 50.0, "p90": 90.0}
    cold = LatencyModel().statistics()
    assert cold["count"] == 0.0
    assert cold["p50"] == pytest.approx(MODEL_PAGE_LATENCY_S * 0.95)


# --------------------------------------------------------------------------- next_poll_at


def poll_at(
    model: LatencyModel,
    polls_done: int,
    now: float,
    *,
    deadline: float = DEADLINE,
    schedule: PollSchedule = NO_JITTER,
    seed: int = 0,
) -> float:
    return next_poll_at(
        submitted_at=T0,
        polls_done=polls_done,
        now=now,
        deadline=deadline,
        model=model,
        schedule=schedule,
        rng=random.Random(seed),
    )


@pytest.mark.parametrize(
    ("values", "first_quantile", "delay"),
    [
        ([], 0.6, MODEL_PAGE_LATENCY_S * 0.95),  # cold: the prior
        ([], 0.9, MODEL_PAGE_LATENCY_S * 1.4),
        ([float(v) for v in range(0, 101)], 0.6, 60.0),
        ([float(v) for v in range(0, 101)], 0.9, 90.0),
        ([float(v) for v in range(0, 101)], 0.5, 50.0),
    ],
)
def test_first_poll_at_the_chosen_quantile(
    values: list[float], first_quantile: float, delay: float
) -> None:
    schedule = PollSchedule(first_quantile=first_quantile)
    when = poll_at(warm_model(values), 0, now=T0, schedule=schedule)
    assert when == pytest.approx(T0 + delay)


def test_first_poll_is_not_jittered() -> None:
    model = warm_model([float(v) for v in range(0, 101)])
    times = {poll_at(model, 0, now=T0, schedule=PollSchedule(), seed=s) for s in range(20)}
    assert times == {T0 + 60.0}


def test_first_poll_after_a_late_start_is_now() -> None:
    # Resumed from the journal long after submission: poll at once.
    model = warm_model([10.0] * 8)
    assert poll_at(model, 0, now=T0 + 500.0) == T0 + 500.0


@pytest.mark.parametrize(
    ("polls_done", "step"),
    [
        (1, 8.0),  # 100 * 0.08
        (2, 12.0),  # * 1.5
        (3, 18.0),
        (4, 27.0),
        (5, 30.0),  # 40.5 capped
        (9, 30.0),
    ],
)
def test_steps_widen_up_to_the_cap(polls_done: int, step: float) -> None:
    model = warm_model([100.0] * 8)
    now = T0 + 120.0
    assert poll_at(model, polls_done, now=now) == pytest.approx(now + step)


def test_a_request_long_past_the_median_is_polled_by_its_age() -> None:
    """EAGER's cap is 0.135 of the median (1.35 s here); at an age of 20 medians
    the step is 0.05 of the age (10 s), and never over max_step_s."""
    model = warm_model([10.0] * 8)
    eager = replace(EAGER_SCHEDULE, jitter=0.0)
    assert poll_at(model, 30, now=T0 + 15.0, schedule=eager) == pytest.approx(T0 + 16.35)
    assert poll_at(model, 30, now=T0 + 200.0, schedule=eager) == pytest.approx(T0 + 210.0)
    assert poll_at(model, 30, now=T0 + 3000.0, schedule=eager) == pytest.approx(T0 + 3030.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eager_re_polls_are_evenly_spaced_from_the_first(seed: int) -> None:
    """Polls free: every re-poll 0.135 of the median after the last, from the
    first re-poll on and unjittered (the best schedule for a p95 has even gaps
    as wide as the target allows; a narrower first gap or a jittered wider one
    spends polls for nothing, issue 12 stop 26)."""
    model = warm_model([10.0] * 8)
    now = T0 + 1.0
    gaps = []
    for polls_done in range(1, 8):
        when = poll_at(model, polls_done, now=now, schedule=EAGER_SCHEDULE, seed=seed)
        gaps.append(when - now)
        now = when
    assert gaps == pytest.approx([1.35] * 7)


def test_steps_follow_custom_schedule() -> None:
    model = warm_model([50.0] * 8)
    schedule = PollSchedule(first_step_fraction=0.1, growth=2.0, max_step_s=100.0, jitter=0.0)
    now = T0 + 60.0
    steps = [poll_at(model, k, now=now, schedule=schedule) - now for k in range(1, 6)]
    assert steps == pytest.approx([5.0, 10.0, 20.0, 40.0, 80.0])


@pytest.mark.parametrize("polls_done", [1, 2, 4, 8])
@pytest.mark.parametrize("jitter", [0.1, 0.25])
def test_jitter_bounds(polls_done: int, jitter: float) -> None:
    model = warm_model([100.0] * 8)
    now = T0 + 120.0
    base = poll_at(model, polls_done, now=now) - now
    schedule = PollSchedule(jitter=jitter)
    rng = random.Random(11)
    steps = [
        next_poll_at(
            submitted_at=T0,
            polls_done=polls_done,
            now=now,
            deadline=DEADLINE,
            model=model,
            schedule=schedule,
            rng=rng,
        )
        - now
        for _ in range(300)
    ]
    low, high = base * (1 - jitter), base * (1 + jitter)
    assert all(low - 1e-9 <= s <= high + 1e-9 for s in steps)
    assert min(steps) < base < max(steps)
    assert min(steps) < low + 0.2 * (high - low)
    assert max(steps) > high - 0.2 * (high - low)


@pytest.mark.parametrize(
    ("polls_done", "now", "margin"),
    [
        (0, T0, 60.0),
        (0, T0, 180.0),
        (0, T0 + 10.0, 600.0),
    ],
)
def test_never_after_deadline_minus_margin(polls_done: int, now: float, margin: float) -> None:
    model = warm_model([3590.0] * 8)  # slow: the natural time would be past the margin
    schedule = PollSchedule(jitter=0.0, deadline_margin_s=margin)
    when = poll_at(model, polls_done, now=now, schedule=schedule)
    assert when == DEADLINE - margin


@pytest.mark.parametrize("polls_done", [1, 5, 40])
@pytest.mark.parametrize("now", [DEADLINE - 60.0, DEADLINE - 30.0, DEADLINE - 1.0])
def test_inside_the_margin_keeps_a_gap_but_not_past_the_deadline(
    polls_done: int, now: float
) -> None:
    """No back-to-back polling of a slow request near its deadline."""
    model = warm_model([100.0] * 8)
    when = poll_at(model, polls_done, now=now, schedule=PollSchedule())
    min_gap = 100.0 * PollSchedule().first_step_fraction / 2
    assert when == pytest.approx(min(now + min_gap, DEADLINE)) or when >= now + min_gap
    assert when <= DEADLINE


@pytest.mark.parametrize("polls_done", [0, 1, 5])
def test_past_the_deadline_polls_now(polls_done: int) -> None:
    """A first poll due long ago, or a request past its deadline, is asked at once
    (the answer decides between fetch and resubmit)."""
    model = warm_model([100.0] * 8)
    now = DEADLINE + 100.0
    assert poll_at(model, polls_done, now=now, schedule=PollSchedule()) == now


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("polls_done", [0, 1, 3, 10, 40])
def test_always_within_now_and_deadline(seed: int, polls_done: int) -> None:
    model = warm_model([random.Random(seed).uniform(1, 60) for _ in range(30)])
    for now in (T0, T0 + 30.0, T0 + 1800.0, DEADLINE - 61.0):
        when = poll_at(model, polls_done, now=now, schedule=PollSchedule(), seed=seed)
        assert now <= when <= DEADLINE


def test_huge_poll_count_stays_capped() -> None:
    model = warm_model([100.0] * 8)
    now = T0 + 120.0
    assert poll_at(model, 2000, now=now) == pytest.approx(now + 30.0)


@pytest.mark.parametrize("target", [0.12, 0.3, 0.85])
@pytest.mark.parametrize("median", [0.2, 11.2, 300.0])
def test_first_poll_factor_settles_at_the_target_share(target: float, median: float) -> None:
    """Fed only "done or not at the age it polled", it scales an age read off a
    model 3x too slow to the target quantile of a lognormal latency (sigma 0.35)."""
    rng = random.Random(7)
    tracker = FirstPollFactor()
    model_age = 3 * median * math.exp(0.35 * NormalDist().inv_cdf(target))
    done_late, log_ages = [], []
    for n in range(6000):
        age = model_age * tracker.factor
        done = median * math.exp(rng.gauss(0.0, 0.35)) <= age
        tracker.observe(age, age, done, target)
        if n >= 3000:
            done_late.append(done)
            log_ages.append(math.log(age))
    assert sum(done_late) / len(done_late) == pytest.approx(target, abs=0.03)
    assert math.exp(sum(log_ages) / len(log_ages)) == pytest.approx(
        median * math.exp(0.35 * NormalDist().inv_cdf(target)), rel=0.08
    )


def test_a_run_of_done_answers_brings_the_first_poll_down_fast() -> None:
    """A model stuck late (every first poll finds the request done): the factor
    halves within 20 answers, where the plain step would take over 40."""
    tracker = FirstPollFactor()
    for _ in range(20):
        tracker.observe(10.0, 10.0, True, 0.15)
    assert tracker.factor < 0.5


def test_a_right_model_keeps_the_factor_near_one() -> None:
    """The model's age already finds 15% done: the factor wanders a few percent
    around 1 (and a run of done answers, rare at 15%, hardly ever hurries it)."""
    rng = random.Random(3)
    tracker = FirstPollFactor()
    right_age = 11.2 * math.exp(0.35 * NormalDist().inv_cdf(0.15))
    logs = []
    for _ in range(6000):
        age = right_age * tracker.factor
        tracker.observe(age, age, 11.2 * math.exp(rng.gauss(0.0, 0.35)) <= age, 0.15)
        logs.append(math.log(tracker.factor))
    settled = logs[1000:]
    mean = sum(settled) / len(settled)
    spread = (sum((x - mean) ** 2 for x in settled) / len(settled)) ** 0.5
    assert abs(mean) < 0.03
    assert spread < 0.06


def test_first_poll_factor_ignores_answers_far_past_the_plan() -> None:
    tracker = FirstPollFactor()
    tracker.observe(10.0, 10.0, False, 0.3)
    before = tracker.factor
    tracker.observe(500.0, 10.0, True, 0.3)  # resumed from the journal: says nothing
    assert tracker.factor == before
