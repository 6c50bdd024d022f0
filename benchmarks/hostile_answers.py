"""The hostile-answer table (issue 10): one row per kind of odd answer.

Each row runs the real command, `python -m batchrunner JOBS -o OUT --base-url URL ...`,
against `python -m batchrunner.simulator` in its own process, with the simulator
option that serves that kind of answer, and reports what a user sees: the exit
code, the result lines written (by type), the requests the simulator served
(submit/status/result, from /_sim/stats), the wall time and the runner's peak
RSS. A row that outlasts --timeout is killed and shown as HANG; a row whose
requests per job pass --max-requests-per-job is flagged LOOP. Either one makes
the script exit 1.

The simulator's clock runs 50x fast (--time-scale 0.02: the 11.2 s latency is
0.22 s, its rpm window 1.2 s); its retention is kept at one hour of the
runner's clock, since the runner is not told about the scale, and the runner
is given --expected-latency 0.3 to match. Retry-After values are sent verbatim
(not scaled).

    python benchmarks/hostile_answers.py                  # every row, 20 jobs each
    python benchmarks/hostile_answers.py --rows unknown-state html-body --jobs 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import launched_for_peak_rss, launched_pid, peak_rss_of_launched_mb

REPO = Path(__file__).resolve().parent.parent
TIME_SCALE = 0.02
MODEL = "claude-3.5-sonnet"
UNKNOWN_MODEL = "claude-9-imaginary"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    sim: tuple[str, ...] = ()
    runner: tuple[str, ...] = ()
    two_models: bool = False
    """Every other job names a model the simulator does not serve."""


def rows(jobs: int) -> list[Row]:
    # With polls counting, `jobs + 2` lets every submit and two polls through:
    # the first refusal is a poll's.
    return [
        Row("baseline", "no odd answer"),
        Row(
            "unknown-state", 'every poll 200 {"status": "RUNNING"}', ("--p-undocumented-state", "1")
        ),
        Row("empty-body", "every poll 200 with an empty body", ("--p-empty-body", "1")),
        Row("html-body", "every poll 200 with an HTML page", ("--p-html-body", "1")),
        Row(
            "odd-30%",
            "30% of polls one of the three above",
            ("--p-undocumented-state", "0.1", "--p-empty-body", "0.1", "--p-html-body", "0.1"),
        ),
        Row(
            "html-submit",
            "every answer 200 with an HTML page, submits too",
            ("--p-html-body", "1", "--odd-bodies-on-submit"),
        ),
        Row(
            "error-object",
            "output is an Anthropic error object",
            ("--p-error-object-output", "1"),
        ),
        Row("not-json", "output is a string that is not JSON", ("--p-not-json-output", "1")),
        Row(
            "oversized",
            "output is a 40 MB message (cap 32 MB)",
            ("--p-oversized-output", "1", "--oversized-output-mb", "40"),
        ),
        Row(
            "ra-86400-submit",
            "submit 429 with Retry-After: 86400 (rpm 3)",
            ("--rpm", "3", "--polls-free", "--retry-after-429", "86400"),
        ),
        Row(
            "ra-1e308-submit",
            "submit 429 with Retry-After: 1e308 (rpm 3)",
            ("--rpm", "3", "--polls-free", "--retry-after-429", "1e308"),
        ),
        Row(
            "ra-86400-503",
            "20% of answers 503 with Retry-After: 86400",
            ("--p-503", "0.2", "--retry-after-503", "86400"),
        ),
        Row(
            "ra-86400-poll",
            f"poll 429 with Retry-After: 86400 (rpm {jobs + 2}, polls count)",
            ("--rpm", str(jobs + 2), "--retry-after-429", "86400"),
            # Every job submitted before the first poll: the first refusal is a poll's.
            ("--max-in-flight", str(jobs)),
        ),
        Row(
            "ra-2-submit",
            "submit 429 with Retry-After: 2 (rpm 5), under the cap",
            ("--rpm", "5", "--polls-free", "--retry-after-429", "2"),
        ),
        Row(
            "slow-submits",
            "every submit answer 1 s late",
            ("--submit-delay-s", str(1.0 / TIME_SCALE)),
        ),
        Row("unknown-model", "half the jobs name a model the API lacks", two_models=True),
        Row(
            "5xx-burst",
            "half of all answers 500/502/503/504",
            ("--p-500", "0.2", "--p-502", "0.1", "--p-503", "0.1", "--p-504", "0.1"),
        ),
        Row(
            "5xx-outage",
            "every answer 500; runner --max-outage 10",
            ("--p-500", "1"),
            ("--max-outage", "10"),
        ),
    ]


@dataclass
class Outcome:
    row: Row
    exit_code: int | None  # None: killed at the timeout
    lines: Counter[str] = field(default_factory=Counter)
    requests: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)
    """429s served, by submit and poll (from /_sim/stats)."""
    stop_line: str = ""
    first_error: str = ""
    loop: bool = False


@contextmanager
def simulator(extra: Sequence[str], seed: int) -> Iterator[str]:
    command = [
        sys.executable,
        "-m",
        "batchrunner.simulator",
        "--port",
        "0",
        "--time-scale",
        str(TIME_SCALE),
        "--retention",
        str(3600.0 / TIME_SCALE),
        "--seed",
        str(seed),
        *extra,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.removeprefix("listening on ")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def sim_stats(url: str) -> dict[str, Any]:
    with _NO_PROXY.open(url + "/_sim/stats", timeout=60) as response:
        stats: dict[str, Any] = json.load(response)
    return stats


def write_jobs(path: Path, count: int, *, two_models: bool) -> None:
    with path.open("w") as handle:
        for n in range(count):
            job: dict[str, Any] = {
                "custom_id": f"job-{n:04d}",
                "messages": [{"role": "user", "content": f"One short sentence about item {n}."}],
                "max_tokens": 64,
            }
            if two_models:
                job["model"] = UNKNOWN_MODEL if n % 2 else MODEL
            handle.write(json.dumps(job) + "\n")


def run_row(row: Row, jobs: int, directory: Path, timeout: float, seed: int) -> Outcome:
    jobs_path = directory / f"{row.name}.jobs.jsonl"
    output = directory / f"{row.name}.results.jsonl"
    write_jobs(jobs_path, jobs, two_models=row.two_models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMIND_")}
    env["SEGMIND_API_KEY"] = "sk-bench-key"
    stderr_path = directory / f"{row.name}.stderr"
    with simulator(row.sim, seed) as url:
        argv = [
            sys.executable,
            "-m",
            "batchrunner",
            str(jobs_path),
            "-o",
            str(output),
            "--base-url",
            url,
            "--rpm",
            "6000",
            "--expected-latency",
            "0.3",
            "--quiet",
            *row.runner,
        ]
        report = directory / f"{row.name}.maxrss"
        started = time.monotonic()
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                launched_for_peak_rss(argv, report),
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        exit_code: int | None = None
        while True:
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                exit_code = os.waitstatus_to_exitcode(status)
                process.returncode = exit_code
                break
            if time.monotonic() - started > timeout:
                runner = launched_pid(report)
                if runner is not None:
                    os.kill(runner, signal.SIGKILL)
                process.kill()
                process.wait()
                break
            time.sleep(0.01)
        wall = time.monotonic() - started
        stats = sim_stats(url)
    # The runner's own peak (see _common.PEAK_RSS_LAUNCHER); NaN after a timeout.
    outcome = Outcome(row, exit_code, wall_s=wall, peak_rss_mb=peak_rss_of_launched_mb(report))
    outcome.requests = {k: stats["requests"].get(k, 0) for k in ("submit", "status", "result")}
    outcome.refused = {k: stats["rate_limited"][k] for k in ("submit", "poll")}
    if output.exists():
        for raw in output.read_text().splitlines():
            result = json.loads(raw)["result"]
            kind = result["type"]
            if kind == "errored":
                kind = f"errored:{result['error']['type']}"
                outcome.first_error = outcome.first_error or result["error"]["message"]
            outcome.lines[kind] += 1
    for line in stderr_path.read_text(errors="replace").splitlines():
        if line.startswith("batchrunner: stopped:"):
            outcome.stop_line = line.removeprefix("batchrunner: ")
    return outcome


def lines_cell(lines: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(lines.items())) or "none"


def print_table(outcomes: list[Outcome], jobs: int) -> None:
    print(
        f"| row | odd answer | exit | result lines ({jobs} jobs) | requests submit/status/result "
        "| wall s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        exit_cell = "HANG" if o.exit_code is None else str(o.exit_code)
        r = o.requests
        flag = " LOOP" if o.loop else ""
        print(
            f"| {o.row.name} | {o.row.what} | {exit_cell} | {lines_cell(o.lines)} "
            f"| {r['submit']}/{r['status']}/{r['result']}{flag} | {o.wall_s:.1f} "
            f"| {o.peak_rss_mb:.0f} |"
        )
    print()
    for o in outcomes:
        said = [text for text in (o.stop_line, o.first_error) if text]
        if any(o.refused.values()):
            said.append(f"429s served: submit {o.refused['submit']}, poll {o.refused['poll']}")
        if said:
            print(f"- {o.row.name}: " + "; ".join(said))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per row (default: 20)")
    parser.add_argument("--rows", nargs="*", help="only these rows (names as in the table)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before HANG")
    parser.add_argument(
        "--max-requests-per-job",
        type=float,
        default=20.0,
        help="more requests per job than this is flagged LOOP (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    selected = [row for row in rows(args.jobs) if not args.rows or row.name in args.rows]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        for row in selected:
            outcome = run_row(row, args.jobs, Path(tmp), args.timeout, args.seed)
            outcome.loop = sum(outcome.requests.values()) > args.max_requests_per_job * args.jobs
            print(
                f"{row.name}: exit {outcome.exit_code}, {lines_cell(outcome.lines)}, "
                f"{outcome.wall_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            outcomes.append(outcome)
    print(f"commit {_commit()}, {args.jobs} jobs per row, simulator --time-scale {TIME_SCALE}")
    print()
    print_table(outcomes, args.jobs)
    return 1 if any(o.exit_code is None or o.loop for o in outcomes) else 0


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
