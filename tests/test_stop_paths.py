"""Issue 10 at process level: every way a run stops keeps the promise.

The real `python -m batchrunner` (or the Python API) against the simulator as
its own subprocess over loopback; no mocks. The scenarios run concurrently
(see `helpers_process.Scenarios`): they mostly wait on subprocesses.

- Submits in the air (items 1, done-when 2): a double Ctrl-C, the end of
  `--grace` and leaving `iter_results` early each leave every submit the
  simulator accepted journaled or answered by a result line; the resume pays
  for nothing twice. Submits are made slow with the simulator's
  `--submit-delay-s` (the job is recorded at once, the answer comes late).
- The output lock (item 4), the jobs file changing under the run (item 13), a
  write failure mid-run (item 12) and signals in the first half second (14).

Times: the simulator runs 50x faster than model time (helpers_process
TIME_SCALE), so `--submit-delay-s 150` is 3 s of wall time and a job's
latency about 0.22 s; the runner is told `--expected-latency 0.3` so it polls
early instead of waiting the model page's 11.2 s.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers_process import (
    REPO,
    TIME_SCALE,
    Batch,
    Run,
    Scenarios,
    Simulator,
    at_least,
    caught_signals,
    duplicates,
    journal_records,
    read_jsonl_strict,
    result_ids,
    runner_env,
    unaccounted_submits,
    wait_until,
    write_jobs,
)

import batchrunner
from batchrunner.results import result_line, succeeded

FINISHED = (0, 1)
SLOW_SUBMITS = ("--submit-delay-s", "150")
"""Every submit answer comes 3 s of wall time late (150 model seconds x TIME_SCALE)."""
FAST_START = ("--expected-latency", "0.3")
IN_AIR = 8
"""Submits accepted by the simulator but not yet answered when a test stops the run."""
WAITING_RE = re.compile(r"waiting for (\d+) submits? in the air \(at most (\d+(?:\.\d+)?) s\)")
ABANDONED_RE = re.compile(r"abandoned (\d+) submits? in the air[^\n]*pay", re.IGNORECASE)

SCENARIOS = Scenarios(__file__)


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Any]]]:
    yield from SCENARIOS.run_selected(request, tmp_path_factory)


def outcome_of(request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]) -> Any:
    return SCENARIOS.outcome(request, scenarios)


# --------------------------------------------------------------------------- checks


def assert_exactly_once(results: Path, ids: list[str]) -> list[dict[str, Any]]:
    lines = read_jsonl_strict(results)
    got = [line["custom_id"] for line in lines]
    assert not duplicates(got), f"duplicate result lines: {duplicates(got)}"
    assert set(got) == set(ids), (
        f"missing {sorted(set(ids) - set(got))[:10]}, unexpected {sorted(set(got) - set(ids))[:10]}"
    )
    return lines


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


def submits_in_air(sim: Simulator, batch: Batch, count: int) -> Callable[[], bool]:
    """At least `count` submits accepted by the simulator that the journal does not know
    yet (their answers are on their way: slow submits)."""

    def condition() -> bool:
        return sim.stats()["submits_accepted"] - len(journal_records(batch.journal)) >= count

    return condition


def said(run: Run, text: str, times: int = 1) -> Callable[[], bool]:
    return lambda: run.stderr().count(text) >= times


# --------------------------------------------------------------------------- 1. submits in the air


@dataclass
class StopOutcome:
    """What one stopped run left, and what its resume paid."""

    code: int
    stderr: str
    in_air_at_stop: int
    unaccounted: set[str]
    """Submits the simulator accepted that neither the journal nor the results know."""
    stop_s: float = 0.0
    """Seconds from the last stop signal (or the end of iteration) to the exit."""
    resume_code: int | None = None
    resume_stderr: str = ""
    duplicate_submits: int | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def resume_and_account(sim: Simulator, batch: Batch, outcome: StopOutcome) -> StopOutcome:
    """Run the same command to the end; record what was paid twice."""
    resumed = batch.run_to_end(timeout=120)
    outcome.resume_code = resumed.returncode
    outcome.resume_stderr = resumed.stderr()
    outcome.duplicate_submits = sim.settled_stats()["duplicate_submits"]
    outcome.lines = read_jsonl_strict(batch.results)
    return outcome


def interrupted_with_slow_submits(
    signals: tuple[signal.Signals, ...], extra: tuple[str, ...], directory: Path
) -> StopOutcome:
    """Stop a run with `signals` (each sent once the previous one's message is out)
    while submits are in the air; then resume it."""
    jobs = write_jobs(directory / "jobs.jsonl", 60)
    with Simulator(["--seed", "21", *SLOW_SUBMITS], directory / "sim.stderr") as sim:
        batch = Batch(directory / "jobs.jsonl", directory / "out.jsonl", sim.url)
        batch.extra = [*FAST_START, *extra]
        try:
            run = batch.start()
            wait_until(submits_in_air(sim, batch, IN_AIR), run, 60, f"{IN_AIR} submits in the air")
            in_air = sim.stats()["submits_accepted"] - len(journal_records(batch.journal))
            last = time.monotonic()
            for number, signum in enumerate(signals, start=1):
                if number > 1:  # the previous signal was taken: its message is out
                    wait_until(said(run, "batchrunner: stopping", number - 1), run, 30, "a stop")
                last = time.monotonic()
                run.signal(signum)
            code = run.wait(timeout=60)
            stop_s = time.monotonic() - last
            stats = sim.settled_stats()
            outcome = StopOutcome(
                code=code,
                stderr=run.stderr(),
                in_air_at_stop=in_air,
                unaccounted=unaccounted_submits(stats, batch.results),
                stop_s=stop_s,
                ids=[job["custom_id"] for job in jobs],
            )
            return resume_and_account(sim, batch, outcome)
        finally:
            batch.kill_all()


SCENARIOS.add(
    "double_sigint_with_slow_submits",
    partial(interrupted_with_slow_submits, (signal.SIGINT, signal.SIGINT), ()),
)
SCENARIOS.add(
    "grace_end_with_slow_submits",
    partial(interrupted_with_slow_submits, (signal.SIGINT,), ("--grace", "0.3")),
)
for _third in (signal.SIGINT, signal.SIGTERM):
    SCENARIOS.add(
        f"third_signal_abandons_submits_in_the_air[{_third.name}]",
        partial(interrupted_with_slow_submits, (signal.SIGINT, signal.SIGINT, _third), ()),
    )


def assert_every_accepted_submit_known_and_paid_once(outcome: StopOutcome) -> None:
    assert outcome.in_air_at_stop >= IN_AIR
    assert not outcome.unaccounted, (
        f"{len(outcome.unaccounted)} submits accepted by the API are in neither the journal "
        f"nor the results: a resume pays for them twice. stderr: {outcome.stderr[-2000:]}"
    )
    assert outcome.resume_code in FINISHED, outcome.resume_stderr[-3000:]
    assert outcome.duplicate_submits == 0
    assert_exactly_once_lines(outcome)


def assert_exactly_once_lines(outcome: StopOutcome) -> None:
    got = [line["custom_id"] for line in outcome.lines]
    assert not duplicates(got) and set(got) == set(outcome.ids)


def test_double_sigint_with_slow_submits_journals_every_accepted_submit(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 1: the second Ctrl-C stops collecting but waits for the submits in
    the air, says so, and the journal knows every one the API accepted.
    (Before 59539f2 the second Ctrl-C cancelled them: accepted, never journaled.)"""
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert outcome.code == 130, outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    waiting = WAITING_RE.search(outcome.stderr)
    assert waiting, outcome.stderr[-3000:]
    assert int(waiting.group(1)) >= 1 and float(waiting.group(2)) > 0
    assert "resume with:" in outcome.stderr
    assert_every_accepted_submit_known_and_paid_once(outcome)


def test_grace_end_with_slow_submits_journals_every_accepted_submit(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 1: the end of --grace (0.3 s here, submits take 3 s) stops collecting
    but not the submits in the air."""
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert outcome.code == 130, outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    assert_every_accepted_submit_known_and_paid_once(outcome)


def test_grace_end_with_slow_submits_says_it_waits_for_them(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert WAITING_RE.search(outcome.stderr), outcome.stderr[-3000:]


def test_grace_end_with_slow_submits_first_message_counts_submits_in_the_air(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    outcome: StopOutcome = outcome_of(request, scenarios)
    first = next(line for line in outcome.stderr.splitlines() if "stopping" in line)
    assert "nothing in flight" not in first, first


@pytest.mark.parametrize("third", ["SIGINT", "SIGTERM"])
def test_third_signal_abandons_submits_in_the_air_and_says_what_it_costs(
    third: str, request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 1: a third Ctrl-C (or SIGTERM) may abandon the submits in the air; it
    says how many and that a resume may pay for them twice, and exits 130 at once."""
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert outcome.code == 130, outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    abandoned = ABANDONED_RE.search(outcome.stderr)
    assert abandoned, outcome.stderr[-3000:]
    count = int(abandoned.group(1))
    assert count >= 1
    # The submits in the air answer up to 3 s after the signal; a loaded machine
    # takes most of a second to tear a process down.
    assert outcome.stop_s < 2.7, "it waited for the submit answers (3 s) instead"
    # What it costs is exactly what it said: those submits, paid again by the resume.
    assert len(outcome.unaccounted) <= count
    assert outcome.resume_code in FINISHED, outcome.resume_stderr[-3000:]
    assert outcome.duplicate_submits == len(outcome.unaccounted)
    assert_exactly_once_lines(outcome)


# --------------------------------------------------------------------------- iter_results


def iter_results_left_early(directory: Path) -> StopOutcome:
    """The Python API in this process: `async with iter_results(...)`, break after
    the first result while submits are in the air; then the command resumes."""
    jobs = write_jobs(directory / "jobs.jsonl", 60)
    with Simulator(["--seed", "22", *SLOW_SUBMITS], directory / "sim.stderr") as sim:
        batch = Batch(directory / "jobs.jsonl", directory / "out.jsonl", sim.url)
        batch.extra = list(FAST_START)

        async def take_one() -> float:
            options: dict[str, Any] = {
                "base_url": sim.url,
                "api_key": "sk-test-key",
                "rpm": 6000,
                "latency_prior_s": 0.3,
            }
            in_air = submits_in_air(sim, batch, IN_AIR // 2)
            async with batchrunner.iter_results(batch.jobs, batch.results, **options) as results:
                async for _ in results:
                    if in_air():  # leave while submits are in the air
                        break
                else:
                    raise AssertionError("never left with submits in the air")
                left_at = time.monotonic()
            return left_at

        left_at = anyio.run(take_one)
        stats = sim.settled_stats()
        outcome = StopOutcome(
            code=0,
            stderr="",
            in_air_at_stop=IN_AIR,
            unaccounted=unaccounted_submits(stats, batch.results),
            stop_s=time.monotonic() - left_at,
            ids=[job["custom_id"] for job in jobs],
        )
        try:
            return resume_and_account(sim, batch, outcome)
        finally:
            batch.kill_all()


SCENARIOS.add("iter_results_left_early", iter_results_left_early)


def test_iter_results_left_early_journals_every_accepted_submit(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 1: leaving `async with iter_results(...)` early stops the run; the
    submits in the air are waited for and journaled; the resume pays nothing twice."""
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert_every_accepted_submit_known_and_paid_once(outcome)


ABANDONING_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import urllib.request

    import anyio

    import batchrunner

    jobs, output, base_url, wanted = sys.argv[1:5]


    def in_air() -> int:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(base_url + "/_sim/stats") as answer:
            accepted = json.loads(answer.read())["submits_accepted"]
        with open(output + ".journal", "rb") as journal:
            return accepted - journal.read().count(b"\\n")


    async def main() -> None:
        stream = batchrunner.iter_results(
            jobs, output, base_url=base_url, api_key="sk-test-key", rpm=6000, latency_prior_s=0.3
        )
        async for line in stream:
            count = in_air()
            if count >= int(wanted):
                print("left with", count, "submits in the air", flush=True)
                break  # no aclose, no async with: the program just ends


    anyio.run(main)
    """
)


def iter_results_abandoned_by_a_script(directory: Path) -> StopOutcome:
    """A script that breaks out of `async for line in iter_results(...)` and ends
    (no `async with`, no aclose): the run must still stop cleanly before the
    interpreter exits, not be killed with its submits in the air."""
    jobs = write_jobs(directory / "jobs.jsonl", 60)
    with Simulator(["--seed", "23", *SLOW_SUBMITS], directory / "sim.stderr") as sim:
        batch = Batch(directory / "jobs.jsonl", directory / "out.jsonl", sim.url)
        batch.extra = list(FAST_START)
        argv = [sys.executable, "-c", ABANDONING_SCRIPT, str(batch.jobs), str(batch.results)]
        script = subprocess.run(
            [*argv, sim.url, str(IN_AIR // 2)],
            cwd=REPO,
            env=runner_env(None),
            capture_output=True,
            text=True,
            timeout=120,
        )
        stats = sim.settled_stats()
        outcome = StopOutcome(
            code=script.returncode,
            stderr=script.stdout + script.stderr,
            in_air_at_stop=IN_AIR,
            unaccounted=unaccounted_submits(stats, batch.results),
            ids=[job["custom_id"] for job in jobs],
        )
        try:
            return resume_and_account(sim, batch, outcome)
        finally:
            batch.kill_all()


SCENARIOS.add("iter_results_abandoned_by_a_script", iter_results_abandoned_by_a_script)


def test_iter_results_abandoned_by_a_script_journals_every_accepted_submit(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    outcome: StopOutcome = outcome_of(request, scenarios)
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert outcome.stderr.startswith("left with "), outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    assert_every_accepted_submit_known_and_paid_once(outcome)


# --------------------------------------------------------------------------- 4. lock


@dataclass
class LockOutcome:
    first_code: int
    first_stderr: str
    first_pid: int
    second_code: int
    second_stderr: str
    second_s: float
    first_running_after_second: bool
    readers: dict[str, subprocess.CompletedProcess[str]]
    first_running_after_readers: bool
    lines: list[dict[str, Any]]
    ids: list[str]
    stats: dict[str, Any]


@SCENARIOS
def two_runs_on_one_output(directory: Path) -> LockOutcome:
    jobs = write_jobs(directory / "jobs.jsonl", 20)
    # Jobs take 60 s of wall time, until the test moves the simulator's clock on:
    # the first run is still running whatever the load (four processes start
    # meanwhile), and then finishes normally.
    # (Retention 10 times the usual: the clock jump must not expire them.)
    slow = ["--latency", "3000", "--latency-sigma", "0", "--retention", "36000"]
    with Simulator(["--seed", "24", *slow], directory / "sim.stderr") as sim:
        batch = Batch(directory / "jobs.jsonl", directory / "out.jsonl", sim.url)
        batch.extra = ["--expected-latency", "1"]
        try:
            first = batch.start()
            wait_until(at_least(batch.journal, 20), first, 60, "the first run's submits")
            started = time.monotonic()
            second = batch.start()
            second_code = second.wait(timeout=30)
            second_s = time.monotonic() - started
            running = first.running()
            readers = {
                command: subprocess.run(
                    [sys.executable, "-m", "batchrunner", command, str(batch.results)],
                    cwd=REPO,
                    env=runner_env(None),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                for command in ("status", "report", "export")
            }
            running_after_readers = first.running()
            sim.advance(3000 * TIME_SCALE)  # every job is done now
            assert first.process is not None
            pid = first.process.pid
            first_code = first.wait(timeout=120)
            return LockOutcome(
                first_code=first_code,
                first_stderr=first.stderr(),
                first_pid=pid,
                second_code=second_code,
                second_stderr=second.stderr(),
                second_s=second_s,
                first_running_after_second=running,
                readers=readers,
                first_running_after_readers=running_after_readers,
                lines=read_jsonl_strict(batch.results),
                ids=[job["custom_id"] for job in jobs],
                stats=sim.settled_stats(),
            )
        finally:
            batch.kill_all()


def test_two_runs_on_one_output_second_exits_2_naming_the_holder(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 4: the second run stops at once (exit 2), naming the process that
    holds the output; the first carries on and finishes every job exactly once."""
    outcome: LockOutcome = outcome_of(request, scenarios)
    assert outcome.second_code == 2, outcome.second_stderr[-3000:]
    assert outcome.first_running_after_second, "the first run ended before the second was refused"
    assert f"pid {outcome.first_pid}" in outcome.second_stderr, outcome.second_stderr
    error_lines = [line for line in outcome.second_stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, outcome.second_stderr
    assert outcome.second_s < 15.0, "the second run did not stop at once"
    assert outcome.first_code == 0, outcome.first_stderr[-3000:]
    got = [line["custom_id"] for line in outcome.lines]
    assert not duplicates(got) and sorted(got) == sorted(outcome.ids)
    assert outcome.stats["submits_accepted"] == len(outcome.ids)
    assert outcome.stats["duplicate_submits"] == 0


def test_two_runs_on_one_output_status_report_export_read_while_it_runs(
    request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    outcome: LockOutcome = outcome_of(request, scenarios)
    assert outcome.first_running_after_readers, "the first run ended before the readers ran"
    for command, done in outcome.readers.items():
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert_no_traceback(done.stderr)
        assert done.stdout.strip(), command
    assert "custom_id" in outcome.readers["export"].stdout.splitlines()[0]


# --------------------------------------------------------------------------- 13. jobs file changed

FILLER = "Answer briefly and plainly. " * 18
"""A long instruction: 300 jobs make a 170 KB file, read in three 64 KB chunks."""


def echo_jobs(ids: list[str], version: str, filler: str = FILLER) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": custom_id,
            "instruction": filler,
            "messages": [{"role": "user", "content": f"Echo {custom_id} from {version} now"}],
            "max_tokens": 32,
        }
        for custom_id in ids
    ]


def write_lines(path: Path, jobs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))


def expected_text(job: dict[str, Any]) -> str:
    """The simulator's answer to a text job: an echo of the prompt's first words."""
    return f'You said: "{job["messages"][0]["content"]}". This is a simulated answer.'


def answer_of(line: dict[str, Any]) -> str:
    return "".join(block["text"] for block in line["result"]["message"]["content"])


@dataclass
class ChangedOutcome:
    code: int
    stderr: str
    first_lines: list[dict[str, Any]]
    old: dict[str, dict[str, Any]]
    new: dict[str, dict[str, Any]]
    rerun_code: int
    rerun_stderr: str
    final_lines: list[dict[str, Any]]
    final_ids: list[str]
    duplicate_submits: int


def jobs_file_changed(how: str, directory: Path) -> ChangedOutcome:
    ids = [f"job-{number:04d}" for number in range(300)]
    old = echo_jobs(ids, "version one")
    path = directory / "jobs.jsonl"
    write_lines(path, old)
    with Simulator(["--seed", "25"], directory / "sim.stderr") as sim:
        batch = Batch(path, directory / "out.jsonl", sim.url)
        batch.extra = [*FAST_START, "--max-in-flight", "20"]
        try:
            run = batch.start()
            wait_until(at_least(batch.results, 30), run, 60, "30 results")
            if how == "truncated":
                new = old[:100]
                with path.open("r+b") as handle:
                    handle.truncate(sum(len(json.dumps(job)) + 1 for job in new))
            else:  # other content: other prompts, another order, other line lengths
                new = echo_jobs(ids[::-1], "version two", filler=FILLER[:-40])
                if how == "rewritten":
                    with path.open("w") as handle:  # in place: the run's handle sees it
                        handle.write("".join(json.dumps(job) + "\n" for job in new))
                else:  # replaced: written beside and renamed over, as editors do
                    write_lines(directory / "jobs.tmp", new)
                    (directory / "jobs.tmp").replace(path)
            code = run.wait(timeout=60)
            first_lines = read_jsonl_strict(batch.results)
            rerun = batch.run_to_end(timeout=120)
            return ChangedOutcome(
                code=code,
                stderr=run.stderr(),
                first_lines=first_lines,
                old={job["custom_id"]: job for job in old},
                new={job["custom_id"]: job for job in new},
                rerun_code=int(rerun.returncode),  # type: ignore[arg-type]
                rerun_stderr=rerun.stderr(),
                final_lines=read_jsonl_strict(batch.results),
                final_ids=[job["custom_id"] for job in new],
                duplicate_submits=sim.settled_stats()["duplicate_submits"],
            )
        finally:
            batch.kill_all()


CHANGES = ["rewritten", "replaced", "truncated"]
for _how in CHANGES:
    SCENARIOS.add(f"jobs_file_changed_mid_run[{_how}]", partial(jobs_file_changed, _how))


@pytest.mark.parametrize("how", CHANGES)
def test_jobs_file_changed_mid_run_exits_2_and_no_job_gets_another_answer(
    how: str, request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 13: the run notices the change, stops taking jobs (exit 2, one line
    saying so); every result line answers its own job; the rerun finishes the
    new version exactly once, paying for nothing twice."""
    outcome: ChangedOutcome = outcome_of(request, scenarios)
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    changed = [line for line in outcome.stderr.splitlines() if "changed during the run" in line]
    assert len(changed) == 1, outcome.stderr[-3000:]
    assert len(outcome.first_lines) < len(outcome.old), "the change was never noticed"
    for line in outcome.first_lines:  # read before the change: the old version's jobs
        if line["result"]["type"] == "succeeded":
            assert answer_of(line) == expected_text(outcome.old[line["custom_id"]]), line

    assert outcome.rerun_code in FINISHED, outcome.rerun_stderr[-3000:]
    got = [line["custom_id"] for line in outcome.final_lines]
    assert not duplicates(got) and sorted(got) == sorted(outcome.final_ids)
    for line in outcome.final_lines:
        if line["result"]["type"] == "succeeded":
            assert answer_of(line) == expected_text(outcome.new[line["custom_id"]]), line
    assert outcome.duplicate_submits == 0


# --------------------------------------------------------------------------- 12. write failure


@dataclass
class WriteFailureOutcome:
    code: int
    stderr: str
    failed_path: Path
    unaccounted: set[str]
    resume_code: int
    resume_stderr: str
    lines: list[dict[str, Any]]
    ids: list[str]
    duplicate_submits: int
    in_file_after_failure: int
    """Complete result lines of the input's jobs in the file the failed run left."""


def limit_file_size(limit: int) -> Callable[[], None]:
    """For the child: files may not grow past `limit` bytes, and a write past it
    fails with EFBIG instead of killing the process (as root, permission tricks
    do not work; this is how a full disk looks to a writer)."""

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return preexec


WHICH_FAILS = ["journal", "results"]
EARLIER_LINES = 50
"""Result lines of jobs no longer in the input, in the results file before the
run: the results file starts near the size limit while the journal starts
empty, so the results file fails first, while submits are in the air."""


def write_failure(which: str, directory: Path) -> WriteFailureOutcome:
    """EFBIG on one file mid-run, then the same command without the limit.

    - journal: the limit is 6,000 bytes, 18 journal records (~330 bytes each);
      no result line comes before the first poll, 3 s in (--expected-latency).
    - results: the file starts with EARLIER_LINES lines and may grow by 2,000
      bytes (three or four lines); submits are slow (3 s), so several are in
      the air when it fails, and the journal (60 records, ~20 KB) never does.
    """
    jobs = write_jobs(directory / "jobs.jsonl", 60)
    sim_args = ["--seed", "26"] if which == "journal" else ["--seed", "26", *SLOW_SUBMITS]
    with Simulator(sim_args, directory / "sim.stderr") as sim:
        batch = Batch(directory / "jobs.jsonl", directory / "out.jsonl", sim.url)
        if which == "journal":
            batch.extra = ["--expected-latency", "3"]
            limit = 6_000
        else:
            batch.extra = list(FAST_START)
            earlier = [
                result_line(
                    f"earlier-{number:04d}",
                    succeeded({"type": "message", "role": "assistant", "content": []}),
                    request_id=f"r-{number}",
                    finished_at=1.7e9,
                )
                for number in range(EARLIER_LINES)
            ]
            write_lines(batch.results, earlier)
            limit = batch.results.stat().st_size + 2_000
        try:
            run = batch.start(preexec_fn=limit_file_size(limit))
            code = run.wait(timeout=60)
            stats = sim.settled_stats()
            unaccounted = unaccounted_submits(stats, batch.results)
            ids = {job["custom_id"] for job in jobs}
            in_file = sum(custom_id in ids for custom_id in result_ids(batch.results))
            resumed = batch.run_to_end(timeout=120)
            return WriteFailureOutcome(
                code=code,
                stderr=run.stderr(),
                failed_path=batch.journal if which == "journal" else batch.results,
                unaccounted=unaccounted,
                resume_code=int(resumed.returncode),  # type: ignore[arg-type]
                resume_stderr=resumed.stderr(),
                lines=read_jsonl_strict(batch.results),
                ids=[job["custom_id"] for job in jobs],
                duplicate_submits=sim.settled_stats()["duplicate_submits"],
                in_file_after_failure=in_file,
            )
        finally:
            batch.kill_all()


for _which in WHICH_FAILS:
    SCENARIOS.add(f"write_failure_mid_run[{_which}]", partial(write_failure, _which))


@pytest.mark.parametrize("which", WHICH_FAILS)
def test_write_failure_mid_run_is_one_line_exit_2_and_resumes_exactly_once(
    which: str, request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 12: EFBIG mid-run: one line naming the file and the cause, exit 2,
    no traceback; the same command without the limit finishes every job once."""
    outcome: WriteFailureOutcome = outcome_of(request, scenarios)
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert_no_traceback(outcome.stderr)
    naming = [
        line
        for line in outcome.stderr.splitlines()
        if str(outcome.failed_path) + ":" in line and "File too large" in line
    ]
    assert len(naming) == 1, outcome.stderr[-3000:]
    errors = [
        line
        for line in outcome.stderr.splitlines()
        if line.startswith("batchrunner:") and ("cannot" in line or "error" in line)
    ]
    assert errors == naming, outcome.stderr[-3000:]

    assert outcome.resume_code in FINISHED, outcome.resume_stderr[-3000:]
    assert_no_traceback(outcome.resume_stderr)
    got = [line["custom_id"] for line in outcome.lines]
    assert not duplicates(got) and sorted(got) == sorted(outcome.ids)
    if which == "results":  # the journal still worked: it knows every accepted submit
        assert not outcome.unaccounted
    # Paid twice: at most the submits the journal could not record (those in the air).
    assert outcome.duplicate_submits <= len(outcome.unaccounted) <= 16


# --------------------------------------------------------------------------- 14. early signals

EARLY_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.6)


@dataclass
class EarlyOutcome:
    delay: float
    code: int
    stderr: str
    resume_code: int
    resume_stderr: str
    result_ids: list[str]


def early_signals(signum: signal.Signals, directory: Path) -> list[EarlyOutcome]:
    """For each delay: start a run, wait until batchrunner's own first code has run
    (SIGTERM shows up in the process's caught signals: `interrupts.record()`),
    wait `delay`, send `signum`; then run the same command to the end."""
    outcomes = []
    with Simulator(["--seed", "27"], directory / "sim.stderr") as sim:
        for number, delay in enumerate(EARLY_DELAYS):
            jobs = directory / f"jobs-{number}.jsonl"
            write_jobs(jobs, 20, prefix=f"d{number}")
            batch = Batch(jobs, directory / f"out-{number}.jsonl", sim.url)
            batch.extra = list(FAST_START)
            try:
                run = batch.start()
                assert run.process is not None
                pid = run.process.pid
                deadline = time.monotonic() + 30
                while signal.SIGTERM not in caught_signals(pid) and run.running():
                    assert time.monotonic() < deadline, "no handler for SIGTERM after 30 s"
                    time.sleep(0.001)
                time.sleep(delay)
                run.signal(signum)
                code = run.wait(timeout=60)
                resumed = batch.run_to_end(timeout=120)
                outcomes.append(
                    EarlyOutcome(
                        delay=delay,
                        code=code,
                        stderr=run.stderr(),
                        resume_code=int(resumed.returncode),  # type: ignore[arg-type]
                        resume_stderr=resumed.stderr(),
                        result_ids=[
                            line["custom_id"].split("-", 1)[1]
                            for line in read_jsonl_strict(batch.results)
                        ],
                    )
                )
            finally:
                batch.kill_all()
        duplicate_submits = sim.settled_stats()["duplicate_submits"]
    assert duplicate_submits == 0, f"{duplicate_submits} jobs paid twice"
    return outcomes


for _signum in (signal.SIGTERM, signal.SIGINT):
    SCENARIOS.add(
        f"signal_in_the_first_half_second[{_signum.name}]", partial(early_signals, _signum)
    )


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_in_the_first_half_second_exits_130_and_resumes(
    signame: str, request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    """Item 14: from the moment batchrunner's code runs, a signal at any moment of
    startup stops the run like any other: exit 130, the usual message, never a
    traceback, never -15/-2; the same command then finishes every job once.
    (A signal before the interpreter runs any of batchrunner, 40-110 ms here with
    the editable install's finder, is beyond any Python program.)"""
    outcomes: list[EarlyOutcome] = outcome_of(request, scenarios)
    ids = sorted(f"{number:04d}" for number in range(20))
    failures = []
    for outcome in outcomes:
        problems = []
        if outcome.code != 130:
            problems.append(f"exit {outcome.code}")
        if "Traceback" in outcome.stderr:
            problems.append("a traceback")
        if "interrupted; resume with: python -m batchrunner" not in outcome.stderr:
            problems.append("no 'interrupted; resume with'")
        if outcome.resume_code not in FINISHED or "Traceback" in outcome.resume_stderr:
            problems.append(f"resume exit {outcome.resume_code}")
        if sorted(outcome.result_ids) != ids:
            problems.append(f"{len(outcome.result_ids)} lines after the resume")
        if problems:
            failures.append(f"{outcome.delay} s: {', '.join(problems)}: {outcome.stderr[-800:]}")
    assert not failures, "\n".join(failures)


def test_signal_handlers_come_before_any_other_import() -> None:
    """Item 14: `python -m batchrunner` records signals before it imports anything
    that takes time: batchrunner.interrupts is the first module of ours after the
    package and comes before every third-party import."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "batchrunner", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    modules = [
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert done.returncode == 0, done.stderr[-3000:]
    ours = [name for name in modules if name.startswith("batchrunner.")]
    assert ours[0] == "batchrunner.interrupts", ours[:5]
    before = modules[: modules.index("batchrunner.interrupts")]
    third_party = {"aiohttp", "anyio", "orjson", "rich", "PIL", "yarl", "multidict", "aiolimiter"}
    assert not [name for name in before if name.split(".")[0] in third_party], before


@pytest.mark.parametrize("which", ["results"])
def test_write_failure_mid_run_summary_counts_the_lines_in_the_file(
    which: str, request: pytest.FixtureRequest, scenarios: dict[str, Future[Any]]
) -> None:
    outcome: WriteFailureOutcome = outcome_of(request, scenarios)
    said = re.search(r"results: .* \((\d+) of (\d+) jobs", outcome.stderr)
    assert said, outcome.stderr[-3000:]
    assert int(said.group(1)) == outcome.in_file_after_failure
