"""Hostile answers (issue 10, items 8 to 11): the real pipeline against the real
simulator over loopback, in looptime's virtual time, one test per kind of odd
answer. Each asserts that the run ends (a guard cancels it, and fails the test,
when the simulator has served more requests than a bounded client would ever
send), its exit code, one line per job, the error's type and message, and that
no request was polled at or after its retention deadline.

The deadline check needs when each request was polled. The simulator counts
per request only the polls it answered itself (an odd answer replaces the
answer before the request is looked at), so a test-local aiohttp middleware
logs every request the simulator serves, with the simulator's clock.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web
from helpers_process import REPO, read_jsonl_strict, runner_env
from helpers_process import Simulator as ProcessSimulator
from helpers_process import write_jobs as write_process_jobs
from test_pipeline import KEY, run_jobs, write_jobs

from batchrunner import api, cli
from batchrunner.policy import MAX_ODD_ANSWERS, RetryPolicy, wait_too_long_message
from batchrunner.runner import RunOutcome
from batchrunner.simulator import SimConfig, Simulator

pytestmark = pytest.mark.anyio

MODEL = "claude-3.5-sonnet"
FAST = {"latency_mean": 2.0, "latency_sigma": 0.0, "queue_s": 0.2}
"""A fixed 2 s latency: every job is done by its first poll."""


# --------------------------------------------------------------------------- helpers


@dataclass(slots=True)
class Served:
    """One request the simulator served: which endpoint, for which request id, when."""

    endpoint: str  # "submit", "status", "result"
    request_id: str | None
    at: float  # simulator clock
    status: int | None = None


class Recorder:
    """Logs every API request the simulator serves; past `cap` of them the run is
    cancelled (`tripped`): a client that loops would otherwise hang the test."""

    def __init__(self, sim: Simulator, cap: int) -> None:
        self.sim = sim
        self.cap = cap
        self.log: list[Served] = []
        self.tripped = False
        self.scope: anyio.CancelScope | None = None

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        endpoint = _endpoint(request)
        if endpoint is None:
            return await handler(request)
        served = Served(endpoint, request.match_info.get("id"), self.sim.now())
        self.log.append(served)
        if len(self.log) > self.cap and not self.tripped:
            self.tripped = True
            if self.scope is not None:
                self.scope.cancel()
        response = await handler(request)
        served.status = response.status
        return response

    def count(self, endpoint: str) -> int:
        return sum(1 for served in self.log if served.endpoint == endpoint)

    def polls_after_deadline(self, retention_s: float) -> list[Served]:
        """GETs of a request at or after its deadline. The client's deadline is its
        send time + retention_s, and it sends before the simulator records the
        submit: so the simulator's submit time + retention_s is no earlier."""
        per_request = self.sim.stats.per_request
        return [
            served
            for served in self.log
            if served.endpoint != "submit"
            and served.request_id in per_request
            and served.at >= per_request[served.request_id].submitted_at + retention_s
        ]


def _endpoint(request: web.Request) -> str | None:
    path = request.path
    if path.startswith("/_sim/"):
        return None
    if request.method == "POST":
        return "submit"
    return "status" if path.endswith("/status") else "result"


@asynccontextmanager
async def simulator(config: SimConfig, *, cap: int = 2000) -> AsyncIterator[Recorder]:
    """`run_simulator`, with the recording middleware in front of every endpoint."""
    sim = Simulator(config)
    recorder = Recorder(sim, cap)
    sim.app.middlewares.append(recorder.middleware)
    runner = web.AppRunner(sim.app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        sim.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield recorder
    finally:
        await runner.cleanup()


@dataclass(slots=True)
class Ran:
    outcome: RunOutcome
    results: list[dict[str, Any]]
    virtual_s: float
    """How long the run took on the (virtual) loop clock."""

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {line["custom_id"]: line["result"] for line in self.results}

    def types(self) -> Counter[str]:
        return Counter(line["result"]["type"] for line in self.results)


async def run_guarded(
    recorder: Recorder, jobs: Path, *, virtual_limit_s: float = 4 * 3600, **overrides: Any
) -> Ran:
    """run_jobs, failed if it serves more than the recorder's cap or outlasts the limit."""
    started = anyio.current_time()
    with anyio.CancelScope() as scope:
        recorder.scope = scope
        with anyio.fail_after(virtual_limit_s):
            outcome, results = await run_jobs(recorder.sim.url, jobs, **overrides)
    if recorder.tripped:
        pytest.fail(f"the client loops: {len(recorder.log)} requests served, cap {recorder.cap}")
    assert not scope.cancelled_caught
    return Ran(outcome, results, anyio.current_time() - started)


def assert_one_line_per_job(ids: list[str], results: list[dict[str, Any]]) -> None:
    seen = Counter(line["custom_id"] for line in results)
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1


# --------------------------------------------------------------------------- item 8


ODD_POLLS = [
    pytest.param("p_undocumented_state", "RUNNING", id="unknown-state"),
    pytest.param("p_empty_body", "an empty body", id="empty-body"),
    pytest.param("p_html_body", "<!DOCTYPE html>", id="html-body"),
]


@pytest.mark.parametrize(("mode", "quoted"), ODD_POLLS)
async def test_odd_poll_answers_always_end_each_job_errored(
    tmp_path: Path, mode: str, quoted: str
) -> None:
    """Every status poll answers 200 with something nobody documented. Old code:
    policy.classify_poll took a 2xx without a known state for PENDING
    (`return Verdict(Action.PENDING, status)`), polled it until the deadline,
    then, `_reschedule` clamping to the past deadline, in a hot loop."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 4)
    config = SimConfig(keys=frozenset({KEY}), **FAST, **{mode: 1.0})  # type: ignore[arg-type]
    async with simulator(config, cap=200) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert ran.outcome.exit_code == 1
    assert_one_line_per_job(ids, ran.results)
    for result in ran.by_id().values():
        assert result["type"] == "errored"
        error = result["error"]
        assert error["type"] == "retries_exhausted"
        assert error["status"] == 200
        assert f"{MAX_ODD_ANSWERS} unrecognised answers" in error["message"]
        assert quoted in error["message"]
    # A bounded number of polls per job, each job submitted once, nothing fetched.
    assert recorder.count("submit") == len(ids)
    assert recorder.count("status") == len(ids) * MAX_ODD_ANSWERS
    assert recorder.count("result") == 0
    assert recorder.polls_after_deadline(3600.0) == []
    assert ran.virtual_s < 600


async def test_odd_answers_across_the_retention_deadline_never_poll_past_it(
    tmp_path: Path,
) -> None:
    """A retention window shorter than the odd answers take to run out: the
    deadline comes first. Nothing is polled at or after it; the request is
    submitted once more, then written as expired. Old code: at the deadline
    `_reschedule` clamped the next poll to the (past) deadline and
    classify_poll's PENDING rescheduled it there again: about 2,100 polls/s."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 6)
    config = SimConfig(keys=frozenset({KEY}), p_undocumented_state=1.0, **FAST)
    retention_s = 5.0
    async with simulator(config, cap=300) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600, retention_s=retention_s)
    assert_one_line_per_job(ids, ran.results)
    assert ran.outcome.exit_code == 1
    assert recorder.polls_after_deadline(retention_s) == []
    types = ran.types()
    assert types["expired"] > 0, types  # the deadline did come first
    assert set(types) <= {"expired", "errored"}
    # Each job: at most two submits (one resubmission), each request at most
    # MAX_ODD_ANSWERS polls.
    assert recorder.count("submit") <= 2 * len(ids)
    assert recorder.count("status") <= recorder.count("submit") * MAX_ODD_ANSWERS
    assert recorder.count("result") == 0


@pytest.mark.parametrize(("mode", "quoted"), ODD_POLLS)
async def test_odd_poll_answers_sometimes_cost_a_poll_not_the_job(
    tmp_path: Path, mode: str, quoted: str
) -> None:
    """30% of polls (status and result) odd: asked again, and jobs still succeed,
    unless one request drew MAX_ODD_ANSWERS of them."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 30)
    config = SimConfig(keys=frozenset({KEY}), seed=4, **FAST, **{mode: 0.3})  # type: ignore[arg-type]
    async with simulator(config, cap=800) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert_one_line_per_job(ids, ran.results)
    types = ran.types()
    assert types["succeeded"] >= 27, types
    assert ran.outcome.exit_code == (0 if types["succeeded"] == len(ids) else 1)
    for result in ran.by_id().values():
        if result["type"] != "succeeded":
            assert result["error"]["type"] == "retries_exhausted"
            assert quoted in result["error"]["message"]
    assert sum(recorder.sim.stats.odd_answers.values()) > 0
    assert recorder.count("submit") == len(ids)
    # Per job: a status poll and a fetch, plus one more of each per odd answer.
    assert recorder.count("status") + recorder.count("result") <= len(ids) * (
        2 + 2 * MAX_ODD_ANSWERS
    )
    assert recorder.polls_after_deadline(3600.0) == []


async def test_an_html_page_for_every_submit_is_retried_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    """Submits answered 200 with an HTML page (a proxy's "please wait"), no
    request_id: each job is retried up to its retry budget, then errored with
    the start of the page. Nothing was accepted, so nothing is polled."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 5)
    config = SimConfig(keys=frozenset({KEY}), p_html_body=1.0, odd_bodies_on_submit=True, **FAST)
    async with simulator(config, cap=100) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert ran.outcome.exit_code == 1
    assert_one_line_per_job(ids, ran.results)
    max_attempts = RetryPolicy().max_attempts
    for line in ran.results:
        error = line["result"]["error"]
        assert error["type"] == "retries_exhausted"
        assert error["status"] == 200
        assert "without a request_id: '<!DOCTYPE html>" in error["message"]
        assert line["attempts"] == max_attempts
    assert recorder.count("submit") == len(ids) * max_attempts
    assert recorder.count("status") == recorder.count("result") == 0


# --------------------------------------------------------------------------- item 9

HUGE_RETRY_AFTER = [
    pytest.param("86400", "86,400 s (until {day} ", id="86400"),
    pytest.param("1e308", "1e+308 s (until after the year 9999)", id="1e308"),
]


def expected_stop(template: str, ran: Ran) -> str:
    """The stop line's wait, with the day it ends when it has one (local time,
    like the message; the run's clock is epoch time)."""
    day = (datetime.now() + timedelta(seconds=86400 + ran.virtual_s)).strftime("%Y-%m-%d")
    return template.format(day=day)


def first_refusal(recorder: Recorder, status: int) -> Served:
    return next(served for served in recorder.log if served.status == status)


def served_after(recorder: Recorder, refusal: Served, endpoints: tuple[str, ...]) -> list[Served]:
    """Requests that reached the simulator after a refusal had been answered
    (those already in the air at that moment arrive with it, in virtual time)."""
    return [s for s in recorder.log if s.endpoint in endpoints and s.at > refusal.at + 0.5]


def assert_stopped_for_retry_after(ran: Ran, stop_text: str) -> None:
    assert ran.outcome.exit_code == 3
    message = ran.outcome.fatal_message or ""
    assert f"the API asked to wait {stop_text}" in message, message
    assert "--max-retry-after 300 s" in message
    assert ran.virtual_s < 60  # it did not wait


@pytest.mark.parametrize(("retry_after", "stop_text"), HUGE_RETRY_AFTER)
async def test_huge_retry_after_on_a_submit_429_stops_intake_and_collects_in_flight(
    tmp_path: Path, retry_after: str, stop_text: str
) -> None:
    """The 4th submit gets a 429 asking to wait a day (or 1e308 s). Old code
    (92a70b2): submitter.py handed it to `budget.on_rate_limited`, whose
    `self._cooldown_until = max(self._cooldown_until, now + delay)` held every
    submit and poll for a day, past every deadline (1e308: for ever)."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 10)
    config = SimConfig(
        keys=frozenset({KEY}), rpm=3, polls_count=False, retry_after_429=retry_after, **FAST
    )
    async with simulator(config) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        stats = recorder.sim.stats
    assert_stopped_for_retry_after(ran, expected_stop(stop_text, ran))
    # Intake stopped at once; the three accepted jobs were still collected.
    refusal = first_refusal(recorder, 429)
    assert refusal.endpoint == "submit"
    assert served_after(recorder, refusal, ("submit",)) == []
    assert stats.submits_accepted == 3
    assert ran.types() == Counter(succeeded=3)
    assert ran.outcome.unfinished == 0
    # The same command, once the API behaves, does the rest and nothing twice.
    async with simulator(SimConfig(keys=frozenset({KEY}), **FAST)) as recorder:
        resumed = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        assert recorder.sim.stats.submits_accepted == 7
    assert resumed.outcome.exit_code == 0
    assert_one_line_per_job(ids, resumed.results)
    assert resumed.types() == Counter(succeeded=10)


@pytest.mark.parametrize(("retry_after", "stop_text"), HUGE_RETRY_AFTER)
async def test_huge_retry_after_on_a_503_stops_and_the_resume_collects(
    tmp_path: Path, retry_after: str, stop_text: str
) -> None:
    """30% of answers are 503 asking to wait a day: the first one (here a submit)
    stops intake, the next (a poll) stops collecting. The journaled requests
    are collected by the resume, not paid for again. Old code
    (92a70b2): submitter.py `delay = max(delay, verdict.retry_after_s)`, then
    `await anyio.sleep(delay)`: a day's sleep per worker; a poll's 503 went
    through `Poller._backoff`, the same `max(delay, verdict.retry_after_s)`."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 10)
    config = SimConfig(
        keys=frozenset({KEY}), p_503=0.3, retry_after_503=retry_after, seed=2, **FAST
    )
    async with simulator(config) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        assert_stopped_for_retry_after(ran, expected_stop(stop_text, ran))
        refusal = first_refusal(recorder, 503)
        assert served_after(recorder, refusal, ("submit",)) == []
        accepted = recorder.sim.stats.submits_accepted
        assert 0 < accepted < len(ids)
        assert len(ran.results) + ran.outcome.unfinished == accepted
        # The API recovers; the same command resumes against it.
        recorder.sim.config = replace(config, p_503=0.0)
        resumed = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        stats = recorder.sim.stats.snapshot()
    assert resumed.outcome.exit_code == 0
    assert resumed.outcome.stats.resumed == ran.outcome.unfinished
    assert_one_line_per_job(ids, ran.results + resumed.results)
    assert stats["submits_accepted"] == len(ids)
    assert stats["duplicate_submits"] == 0
    assert recorder.polls_after_deadline(3600.0) == []


@pytest.mark.parametrize(("retry_after", "stop_text"), HUGE_RETRY_AFTER)
async def test_huge_retry_after_on_a_poll_429_stops_at_once(
    tmp_path: Path, retry_after: str, stop_text: str
) -> None:
    """The rate limit counts polls; the 5th request, a poll, gets a 429 asking to
    wait a day. Nothing can be collected without ignoring that: the run stops
    at once, the three requests stay journaled. Old code
    (92a70b2): `Poller._handle`'s RATE_LIMITED branch called
    `budget.on_rate_limited` (a day's cool-down for every request) and
    rescheduled the poll for then."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 3)
    config = SimConfig(keys=frozenset({KEY}), rpm=4, retry_after_429=retry_after, **FAST)
    async with simulator(config) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert_stopped_for_retry_after(ran, expected_stop(stop_text, ran))
    refusal = first_refusal(recorder, 429)
    assert refusal.endpoint in ("status", "result")
    assert served_after(recorder, refusal, ("submit", "status", "result")) == []
    assert ran.results == [] and ran.outcome.unfinished == 3
    # A resume against an API that behaves (another process: the old request ids
    # are unknown to it, so they are submitted again) finishes.
    async with simulator(SimConfig(keys=frozenset({KEY}), **FAST)) as recorder:
        resumed = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert resumed.outcome.exit_code == 0
    assert_one_line_per_job(ids, resumed.results)
    assert resumed.types() == Counter(succeeded=3)


async def test_retry_after_under_the_cap_is_honoured(tmp_path: Path) -> None:
    """A 2 s Retry-After is waited for, every time, by every worker; the run
    then finishes. The limit frees a slot a minute later, so it takes 30 asks."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 6)
    config = SimConfig(keys=frozenset({KEY}), rpm=4, polls_count=False, retry_after_429="2", **FAST)
    async with simulator(config) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert ran.outcome.exit_code == 0
    assert ran.types() == Counter(succeeded=len(ids))
    submits = [served for served in recorder.log if served.endpoint == "submit"]
    refused = [served for served in submits if served.status == 429]
    assert 20 <= len(refused) <= 40
    for refusal in refused:
        too_soon = [s for s in submits if refusal.at < s.at < refusal.at + 2.0 - 1e-6]
        assert too_soon == [], (refusal, too_soon)
    assert ran.virtual_s >= 60


@pytest.mark.parametrize(
    ("retry_after_s", "expected"),
    [
        (86400.0, "wait 86,400 s (until 2026-11-26 "),
        (1e308, "wait 1e+308 s (until after the year 9999)"),
        (1e15, "wait 1e+15 s (until after the year 9999)"),
    ],
)
def test_wait_too_long_message_is_readable(retry_after_s: float, expected: str) -> None:
    """Old (59539f2) message: `{retry_after_s:,.0f}` printed 1e308 as 309 digits."""
    now = datetime(2026, 11, 25, 12, 0, 0).timestamp()
    message = wait_too_long_message(retry_after_s, now, 300.0)
    assert expected in message
    assert "--max-retry-after 300 s" in message
    assert len(message) < 200


# --------------------------------------------------------------------------- item 10


async def test_error_object_output_is_a_failed_inference(tmp_path: Path) -> None:
    """COMPLETED, but `output` is the provider's error object. Old code
    (92a70b2 api.py decode_output): `if isinstance(output, dict): return output`
    made it the message of a `succeeded` line, exit 0."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 4)
    config = SimConfig(keys=frozenset({KEY}), p_error_object_output=1.0, **FAST)
    async with simulator(config, cap=100) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert ran.outcome.exit_code == 1
    assert_one_line_per_job(ids, ran.results)
    for result in ran.by_id().values():
        assert result["type"] == "errored"
        assert result["error"]["type"] == "inference_failed"
        assert "overloaded_error: Overloaded" in result["error"]["message"]
    # A final answer: fetched once, never asked again.
    assert recorder.count("result") == len(ids)
    assert recorder.count("submit") == len(ids)
    assert recorder.polls_after_deadline(3600.0) == []


async def test_output_that_is_not_json_is_errored_not_succeeded(tmp_path: Path) -> None:
    """COMPLETED with an output string that is not JSON. Old code (92a70b2 api.py
    decode_output): `except orjson.JSONDecodeError:` wrapped the text as a
    message ("Plain text output: wrap it as a message"): `succeeded`, exit 0."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 4)
    config = SimConfig(keys=frozenset({KEY}), p_not_json_output=1.0, **FAST)
    async with simulator(config, cap=100) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
    assert ran.outcome.exit_code == 1
    assert_one_line_per_job(ids, ran.results)
    for result in ran.by_id().values():
        assert result["type"] == "errored"
        assert result["error"]["type"] == "inference_failed"
        assert "not JSON" in result["error"]["message"]
        assert "<html>oops</html>" in result["error"]["message"]
    assert recorder.count("result") == len(ids)


async def test_a_result_over_the_size_cap_ends_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the jobs complete with a 1 MiB message; the cap is lowered to 256 KiB
    (the real one, 32 MB, is tested with a subprocess below). Those jobs end with
    a clear error after one fetch; the others succeed. Old code (92a70b2
    api.py): `await response.read()` read any size, and the line was written."""
    cap = 256 * 1024
    monkeypatch.setattr(api, "MAX_BODY_BYTES", cap)
    ids = write_jobs(tmp_path / "jobs.jsonl", 8)
    config = SimConfig(
        keys=frozenset({KEY}), p_oversized_output=0.5, oversized_output_mb=1.0, seed=3, **FAST
    )
    async with simulator(config, cap=100) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        per_request = recorder.sim.stats.per_request
    assert_one_line_per_job(ids, ran.results)
    oversized = {
        line["custom_id"]
        for line in ran.results
        if per_request[line["request_id"]].odd_output == "oversized"
    }
    assert 0 < len(oversized) < len(ids)
    assert ran.outcome.exit_code == 1
    for custom_id, result in ran.by_id().items():
        if custom_id in oversized:
            assert result["type"] == "errored"
            assert result["error"]["type"] == "inference_failed"
            assert "the result (1 MB) is over the 0.25 MB cap" in result["error"]["message"]
        else:
            assert result["type"] == "succeeded"
    for line in ran.results:
        assert len(orjson.dumps(line)) < 4096
    assert recorder.count("result") == len(ids)


def run_command(
    jobs: Path, output: Path, base_url: str, *extra: str, timeout: float = 60.0
) -> tuple[int, str, int]:
    """`python -m batchrunner` to its end: (exit code, stderr, its peak RSS in KiB).
    The simulator runs in its own process, so its memory is not counted."""
    argv = [sys.executable, "-m", "batchrunner", str(jobs), "-o", str(output)]
    argv += ["--base-url", base_url, "--rpm", "6000", "--expected-latency", "0.3", "--quiet"]
    stderr_path = output.with_name(output.name + ".stderr")
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*argv, *extra],
            cwd=REPO,
            env=runner_env("sk-test-key"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + timeout
    while True:  # os.wait4, not Popen.wait: the child's own rusage
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, stderr_path.read_text(), usage.ru_maxrss
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{argv} did not finish in {timeout} s")
        time.sleep(0.02)


def test_a_40_mb_result_at_the_real_cap_is_not_read(tmp_path: Path) -> None:
    """The real 32 MB cap, a 40 MB result, the real command against the simulator
    in its own process: the job ends with the error, and the runner's peak RSS
    is that of the same command on normal answers (the body is refused on its
    Content-Length, unread). Old code read it whole: 841 MB RSS on 100 MB lines."""
    jobs = tmp_path / "jobs.jsonl"
    write_process_jobs(jobs, 2)
    rss: dict[str, int] = {}
    for name, extra in (
        ("normal", ()),
        ("oversized", ("--p-oversized-output", "1", "--oversized-output-mb", "40")),
    ):
        output = tmp_path / f"{name}.results.jsonl"
        with ProcessSimulator(list(extra), tmp_path / f"{name}.sim.stderr") as sim:
            code, stderr, rss[name] = run_command(jobs, output, sim.url)
            requests = sim.stats()["requests"]
        lines = read_jsonl_strict(output)
        assert len(lines) == 2
        assert requests["result"] == 2
        if name == "normal":
            assert code == 0, stderr
            continue
        assert code == 1, stderr
        for line in lines:
            error = line["result"]["error"]
            assert error["type"] == "inference_failed"
            assert error["message"].startswith("the result (40 MB) is over the 32 MB cap")
        assert output.stat().st_size < 4096
    assert rss["oversized"] < rss["normal"] + 16 * 1024, rss


def test_max_retry_after_flag_at_the_command_line(tmp_path: Path) -> None:
    """`--max-retry-after 5` against a simulator whose 429s ask for 10 s (which
    the default, 300, would wait for): exit 3, the stop line says how long and
    until when, and how to resume; the same command against a simulator that
    behaves finishes the rest, exit 0."""
    jobs = tmp_path / "jobs.jsonl"
    ids = [job["custom_id"] for job in write_process_jobs(jobs, 6)]
    output = tmp_path / "out.results.jsonl"
    limited = ["--rpm", "2", "--polls-free", "--retry-after-429", "10"]
    with ProcessSimulator(limited, tmp_path / "sim1.stderr") as sim:
        code, stderr, _ = run_command(jobs, output, sim.url, "--max-retry-after", "5")
        stats = sim.stats()
    assert code == 3, stderr
    assert re.search(
        r"stopped: the API asked to wait 10 s \(until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\), "
        r"longer than --max-retry-after 5 s",
        stderr,
    ), stderr
    assert "resume with: python -m batchrunner" in stderr
    assert "Traceback" not in stderr
    assert stats["submits_accepted"] == 2
    assert stats["responses"]["submit"] == {"200": 2, "429": 1}
    first = read_jsonl_strict(output)
    assert [line["result"]["type"] for line in first] == ["succeeded"] * 2
    with ProcessSimulator([], tmp_path / "sim2.stderr") as sim:
        code, stderr, _ = run_command(jobs, output, sim.url, "--max-retry-after", "5")
        assert sim.stats()["submits_accepted"] == 4
    assert code == 0, stderr
    lines = read_jsonl_strict(output)
    assert sorted(line["custom_id"] for line in lines) == ids
    assert {line["result"]["type"] for line in lines} == {"succeeded"}


# --------------------------------------------------------------------------- item 11

UNKNOWN_MODEL = "claude-9-imaginary"


def write_two_model_jobs(path: Path, count: int) -> dict[str, str]:
    """Jobs alternating between a model the simulator serves and one it does not;
    returns each job's model."""
    models = {}
    with path.open("wb") as handle:
        for n in range(count):
            custom_id = f"job-{n:05d}"
            model = UNKNOWN_MODEL if n % 2 else MODEL
            models[custom_id] = model
            job = {
                "custom_id": custom_id,
                "model": model,
                "messages": [{"role": "user", "content": f"What is {n} + {n}?"}],
            }
            handle.write(orjson.dumps(job) + b"\n")
    return models


@pytest.mark.parametrize("rpm", [600, 60_000], ids=["paced", "burst"])
async def test_an_unknown_model_ends_only_its_jobs(tmp_path: Path, rpm: int) -> None:
    """Every other job names a model the API does not know. Old code (92a70b2):
    classify_submit's 404 was FATAL ("on submit: stop (wrong model)"), and the
    submitter's `ctx.stop_submitting(verdict.message)` ended the whole batch,
    exit 3, every rerun again at the next such job."""
    models = write_two_model_jobs(tmp_path / "jobs.jsonl", 20)
    async with simulator(SimConfig(keys=frozenset({KEY}), **FAST), cap=200) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=rpm)
        stats = recorder.sim.stats.snapshot()
    assert ran.outcome.exit_code == 1
    assert_one_line_per_job(list(models), ran.results)
    for custom_id, result in ran.by_id().items():
        if models[custom_id] == MODEL:
            assert result["type"] == "succeeded"
            continue
        assert result["type"] == "errored"
        assert result["error"]["type"] == "invalid_request"
        assert result["error"]["status"] == 404
        assert repr(UNKNOWN_MODEL) in result["error"]["message"]
    assert ran.outcome.unknown_models == (UNKNOWN_MODEL,)
    # One submit of the unknown model was sent; its other jobs were refused here.
    assert stats["responses"]["submit"] == {"200": 10, "404": 1}
    assert stats["submits_accepted"] == 10


def test_dry_run_lists_the_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_two_model_jobs(tmp_path / "jobs.jsonl", 5)
    assert cli.main([str(tmp_path / "jobs.jsonl"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{re.escape(MODEL)}\D+3\b", out), out
    assert re.search(rf"{re.escape(UNKNOWN_MODEL)}\D+2\b", out), out


# --------------------------------------------------------------------------- the other rows


async def test_slow_submit_answers_under_the_timeout_are_waited_for(tmp_path: Path) -> None:
    """Every submit answer comes 30 s late (under the 120 s request timeout): each job
    is submitted once and succeeds; the first submit of the model goes alone
    (it asks whether the model exists), so the run takes two delays, not one."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 10)
    config = SimConfig(keys=frozenset({KEY}), submit_delay_s=30.0, **FAST)
    async with simulator(config, cap=100) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        stats = recorder.sim.stats.snapshot()
    assert ran.outcome.exit_code == 0
    assert ran.types() == Counter(succeeded=len(ids))
    assert recorder.count("submit") == stats["submits_accepted"] == len(ids)
    assert stats["duplicate_submits"] == 0
    assert 60 <= ran.virtual_s < 90


async def test_a_5xx_burst_is_retried_and_every_job_succeeds(tmp_path: Path) -> None:
    """Half of all answers are 500, 502, 503 or 504 (no Retry-After): retried
    with backoff, each job paid once, bounded requests."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 20)
    config = SimConfig(
        keys=frozenset({KEY}), p_500=0.2, p_502=0.1, p_503=0.1, p_504=0.1, seed=1, **FAST
    )
    async with simulator(config, cap=400) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600)
        stats = recorder.sim.stats.snapshot()
    assert ran.outcome.exit_code == 0
    assert ran.types() == Counter(succeeded=len(ids))
    assert stats["submits_accepted"] == len(ids) and stats["duplicate_submits"] == 0
    assert len(recorder.log) <= len(ids) * 3 * 4
    assert recorder.polls_after_deadline(3600.0) == []


async def test_5xx_on_every_answer_is_an_outage_not_the_jobs_fault(tmp_path: Path) -> None:
    """Every answer is a 500: the circuit breaker sees it across many jobs at once
    and opens, no job is charged (none is written as retries_exhausted), and
    the run stops at --max-outage, exit 3, resumable. (A first version of the
    one-submit-per-unknown-model gate held every job behind the first one's
    eight retries: that job was written as retries_exhausted, and the outage
    was seen a minute late.)"""
    write_jobs(tmp_path / "jobs.jsonl", 20)
    config = SimConfig(keys=frozenset({KEY}), p_500=1.0, **FAST)
    async with simulator(config, cap=300) as recorder:
        ran = await run_guarded(recorder, tmp_path / "jobs.jsonl", rpm=600, max_outage_s=60.0)
    assert ran.outcome.exit_code == 3
    assert "unreachable" in (ran.outcome.fatal_message or "")
    assert ran.results == []
    assert ran.virtual_s < 90
    assert recorder.count("status") == recorder.count("result") == 0
