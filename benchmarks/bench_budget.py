"""Rate-budget benchmarks (issue 4, item 5; issue 11, item 6): batchrunner against
the official SDK and a plain asyncio loop, on the same time-scaled simulator and
the same jobs.

    python benchmarks/bench_budget.py            # full: 300 jobs a scenario, seeds 7 8 9
    python benchmarks/bench_budget.py --quick    # a smoke run: fewer jobs, one seed
    python benchmarks/bench_budget.py --only 3 --seeds 1 2 3 4 5 --no-baselines
    python benchmarks/bench_budget.py --only 1 --no-baselines --jobs 1000  # a longer run

Each client runs in its own process (benchmarks/budget_clients.py) against a
fresh simulator process started with the same seed (so the same latency draws
in submission order), one client at a time. Every figure comes from the
simulator's /_sim/stats (per_request times are simulator clock seconds; divided
by the time scale S they are model seconds, the unit everything is reported in):

- goodput: the steady-state rate of fetched results, in jobs per model minute:
  results fetched between the 10% and the 90% marks / the time between them
  (the pipeline's fill and drain are in the makespan row instead), and as a
  fraction of the ideal (R/3 when polls count: submit + one status + one
  result; R when polls are free);
- req/job: every HTTP request the server saw (429s included) / jobs; ok req/job
  without the 429s;
- 429s: rate-limited answers, and their share of all requests;
- detection delay: first_result_at - done_at (result fetched minus completed),
  p50 and p95, in model seconds and as a fraction of the mean latency;
- makespan: last result fetched - first submit accepted, against the lower bound
  jobs x requests-per-job / R + one mean latency; "goodput over the whole
  makespan" is that lower bound / makespan (fill, learning and drain included).

batchrunner runs once per seed (simulator and client seeded alike); the two
baselines run at the first seed only, in the same invocation. A target holds
only if it holds at every seed.

Scenarios: (1) polls count at R; (2) polls free; (3) the server's real limit is
half the client's --rpm, no Retry-After, figures after the first model minute;
(4) overhead: no latency, no rate limit, batchrunner alone: jobs/s and CPU ms
per job of its process (getrusage), the simulator in another process, against
the minimal client, and the bytecodes a job each runs (traced runs); (5) as
(1), but the server also counts the requests it refuses (`--count-refused`:
whether Segmind does is unknown). Scenario (3) is also judged over the whole
makespan (issue 11: at least 0.92 of the real limit). A client that has not
finished by its time limit is stopped; its goodput is then jobs done / model
minutes it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_text_jobs

REPO = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "budget_clients.py"
BATCHRUNNER_EXTRA: list[str] = []
"""Arguments added to every batchrunner run (--max-in-flight N: the in-flight experiments)."""
LATENCY_S = 11.2
SIGMA = 0.35


# --------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["SEGMIND_API_KEY"] = "bench-key"
    return env


class Simulator:
    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "batchrunner.simulator", "--port", "0", *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env()
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.url = line.removeprefix("listening on ")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=60) as response:
            return json.load(response)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Run:
    label: str
    client: str
    report: dict[str, Any]
    stats: dict[str, Any]
    snapshot: dict[str, Any] | None
    child_cpu_s: float
    child_wall_s: float
    timed_out: bool
    seed: int


def run_client(
    label: str,
    client: str,
    sim_args: list[str],
    *,
    jobs: Path,
    scale: float,
    rpm: float,
    polls_count: str = "auto",
    concurrency: int = 16,
    seed: int = 0,
    time_limit_s: float = 300.0,
    snapshot_after_s: float | None = None,
    extra: list[str] | None = None,
) -> Run:
    """One client process against one fresh simulator process."""
    sim = Simulator(*sim_args, "--seed", str(seed))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
            command = [
                sys.executable, str(CLIENTS), client,
                "--base-url", sim.url, "--jobs", str(jobs), "--out", str(Path(tmp) / "out.jsonl"),
                "--scale", str(scale), "--rpm", str(rpm), "--polls-count", polls_count,
                "--concurrency", str(concurrency), "--seed", str(seed), *(extra or []),
                *(BATCHRUNNER_EXTRA if client == "batchrunner" else []),
            ]  # fmt: skip
            started = time.monotonic()
            child = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env=_env(),
            )
            snapshot = None
            if snapshot_after_s is not None:
                snapshot = _snapshot_after_first_submit(sim, child, snapshot_after_s)
            timed_out = False
            deadline = started + time_limit_s
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    child.kill()
                    pid, status, usage = os.wait4(child.pid, 0)
                    break
                time.sleep(0.05)
            wall = time.monotonic() - started
            child.returncode = os.waitstatus_to_exitcode(status)
            out = child.stdout.read() if child.stdout else ""
            err = child.stderr.read() if child.stderr else ""
            report: dict[str, Any] = {}
            for line in out.splitlines():
                if line.startswith("{"):
                    report = json.loads(line)
            if not report and not timed_out:
                raise RuntimeError(
                    f"{label}: client failed (exit {child.returncode}):\n{err[-3000:]}"
                )
            stats = sim.stats()
    finally:
        sim.close()
    cpu_s = usage.ru_utime + usage.ru_stime
    return Run(label, client, report, stats, snapshot, cpu_s, wall, timed_out, seed)


def _snapshot_after_first_submit(
    sim: Simulator, child: subprocess.Popen[str], after_s: float
) -> dict[str, Any] | None:
    """Stats `after_s` clock seconds after the server saw the client's first request."""
    first_at = None
    while child.poll() is None:
        stats = sim.stats()
        if sum(stats["requests"].values()) > 0:
            first_at = stats["now"]
            break
        time.sleep(0.01)
    if first_at is None:
        return None
    time.sleep(after_s)
    if child.poll() is not None:
        return None
    return sim.stats()


# --------------------------------------------------------------------------- figures


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _rate(times: list[float], scale: float, *, after: float | None = None) -> float:
    """Results per model minute between the 10% mark (or `after`, if later) and
    the 90% mark of the sorted fetch times: the steady state, without fill and drain."""
    if len(times) < 5:
        return float("nan")
    lo = times[int(0.1 * (len(times) - 1))]
    hi = times[int(0.9 * (len(times) - 1))]
    if after is not None:
        lo = max(lo, after)
    count = sum(1 for t in times if lo < t <= hi)
    span = (hi - lo) / scale / 60.0
    return count / span if span > 0 else float("nan")


@dataclass
class Figures:
    label: str
    jobs: int
    done: int
    goodput: float  # jobs per model minute
    ideal: float
    requests: int
    ok_requests: int
    rate_limited: int
    det_p50: float
    det_p95: float
    seen_lag_p50: float  # done -> first GET that answered COMPLETED (status poll timing)
    fetch_lag_p50: float  # that answer -> result fetched (queueing for the budget)
    status_polls: float  # mean status polls per job
    mean_latency: float
    makespan: float  # model seconds
    lower_bound: float
    client_cpu_s: float
    concurrency: int
    timed_out: bool
    seed: int
    after: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    diagnosis: str = ""

    @property
    def goodput_frac(self) -> float:
        return self.goodput / self.ideal

    @property
    def makespan_frac(self) -> float:
        """Goodput over the whole makespan, fill and drain included: the lower
        bound (jobs x requests per job / R + one mean latency) / makespan. A
        client stopped at its time limit: its goodput as a fraction of the ideal."""
        if self.timed_out or self.done < self.jobs:
            return self.goodput_frac
        return self.lower_bound / self.makespan

    @property
    def req_per_job(self) -> float:
        return self.requests / max(1, self.done)

    @property
    def ok_req_per_job(self) -> float:
        return self.ok_requests / max(1, self.done)

    @property
    def share_429(self) -> float:
        return self.rate_limited / max(1, self.requests)


def figures(run: Run, *, jobs: int, scale: float, rpm: float, polls_count: bool) -> Figures:
    stats = run.stats
    per_request = stats["per_request"].values()
    fetched = [r for r in per_request if r["first_result_at"] is not None and not r["failed"]]
    done = len({r["body_hash"] for r in fetched})
    requests = sum(stats["requests"].values())
    rate_limited = stats["rate_limited"]["total"]
    latencies = [(r["done_at"] - r["submitted_at"]) / scale for r in per_request]
    mean_latency = statistics.fmean(latencies) if latencies else float("nan")
    delays = [(r["first_result_at"] - r["done_at"]) / scale for r in fetched]
    seen = [(r["first_seen_done_at"] - r["done_at"]) / scale for r in fetched]
    fetch = [(r["first_result_at"] - r["first_seen_done_at"]) / scale for r in fetched]
    start = min((r["submitted_at"] for r in per_request), default=0.0)
    end = max((r["first_result_at"] for r in fetched), default=start)
    makespan = (end - start) / scale
    fetched_at = sorted(r["first_result_at"] for r in fetched)
    per_job = 3.0 if polls_count else 1.0
    ideal = rpm / per_job
    lower_bound = jobs * per_job / rpm * 60.0 + mean_latency
    # A client stopped at its time limit: what it did in the time it had (the
    # steady-state window would flatter one that stalled).
    goodput = (
        done / (run.child_wall_s / scale / 60.0) if run.timed_out else _rate(fetched_at, scale)
    )
    result = Figures(
        label=run.label,
        jobs=jobs,
        done=done,
        goodput=goodput,
        ideal=ideal,
        requests=requests,
        ok_requests=requests - rate_limited,
        rate_limited=rate_limited,
        det_p50=_quantile(delays, 0.5),
        det_p95=_quantile(delays, 0.95),
        seen_lag_p50=_quantile(seen, 0.5),
        fetch_lag_p50=_quantile(fetch, 0.5),
        status_polls=statistics.fmean(r["status_polls"] for r in fetched)
        if fetched
        else float("nan"),
        mean_latency=mean_latency,
        makespan=makespan,
        lower_bound=lower_bound,
        client_cpu_s=run.child_cpu_s,
        concurrency=int(run.report.get("concurrency") or 0),
        timed_out=run.timed_out,
        seed=run.seed,
        extra=run.report,
        diagnosis=diagnose(list(per_request), scale) if run.client == "batchrunner" else "",
    )
    snap = run.snapshot
    if snap is not None:
        t1 = snap["now"]
        late = [r for r in fetched if r["first_result_at"] > t1]
        req_after = requests - sum(snap["requests"].values())
        rl_after = rate_limited - snap["rate_limited"]["total"]
        result.after = {
            "done": len(late),
            "requests": req_after,
            "rate_limited": rl_after,
            "share_429": rl_after / max(1, req_after),
            "goodput": _rate(fetched_at, scale, after=t1),
            "req_per_job": req_after / max(1, len(late)),
        }
    return result


# --------------------------------------------------------------------------- printing


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN check


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b or b != b or a != a else f"{a / b:.2f}x"


def table(title: str, rows: list[Figures], after: bool = False) -> str:
    """Figures as rows, clients as columns, then batchrunner's ratio to each baseline."""
    head = rows[0]
    baselines = [r for r in rows if not r.label.startswith("batchrunner")]
    metrics: list[tuple[str, Any, bool]] = [
        # (name, getter, higher is better -> ratio shown as br/baseline)
        (
            "jobs done / jobs",
            lambda r: f"{r.done}/{r.jobs}" + (" (TIMED OUT)" if r.timed_out else ""),
            None,
        ),
        ("goodput, jobs/model-min", lambda r: r.goodput, True),
        ("goodput / ideal", lambda r: r.goodput_frac, True),
        (
            "goodput over the whole makespan (lower bound / makespan)",
            lambda r: r.makespan_frac,
            True,
        ),
        ("requests / job (all)", lambda r: r.req_per_job, False),
        ("requests / job (non-429)", lambda r: r.ok_req_per_job, False),
        ("429s", lambda r: r.rate_limited, False),
        ("429 share of requests", lambda r: r.share_429, False),
        ("detection p50, model s", lambda r: r.det_p50, False),
        ("detection p50 / mean latency", lambda r: r.det_p50 / r.mean_latency, False),
        ("detection p95, model s", lambda r: r.det_p95, False),
        ("detection p95 / mean latency", lambda r: r.det_p95 / r.mean_latency, False),
        ("  of which done -> COMPLETED seen, p50", lambda r: r.seen_lag_p50, False),
        ("  of which seen -> result fetched, p50", lambda r: r.fetch_lag_p50, False),
        ("status polls / job (served, non-429)", lambda r: r.status_polls, False),
        ("makespan, model s", lambda r: r.makespan, False),
        ("makespan / lower bound", lambda r: r.makespan / r.lower_bound, False),
        ("client CPU s (process)", lambda r: r.client_cpu_s, False),
        ("concurrency (peak in flight)", lambda r: r.concurrency, None),
    ]
    if after:
        metrics += [
            ("after 1st min: jobs", lambda r: r.after.get("done", float("nan")), None),
            (
                "after 1st min: goodput, jobs/min",
                lambda r: r.after.get("goodput", float("nan")),
                True,
            ),
            (
                "after 1st min: goodput / real limit",
                lambda r: r.after.get("goodput", float("nan")) / r.ideal,
                True,
            ),
            (
                "after 1st min: requests / job",
                lambda r: r.after.get("req_per_job", float("nan")),
                False,
            ),
            ("after 1st min: 429 share", lambda r: r.after.get("share_429", float("nan")), False),
        ]
    columns = [r.label for r in rows] + [f"{head.label.split()[0]}/{b.label}" for b in baselines]
    lines = [
        f"### {title}",
        "",
        "| figure | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, get, _higher in metrics:
        cells = []
        for r in rows:
            value = get(r)
            cells.append(
                value
                if isinstance(value, str)
                else (
                    str(value) if isinstance(value, int) else _f(value, 3 if abs(value) < 1 else 2)
                )
            )
        for b in baselines:
            a_value, b_value = get(head), get(b)
            cells.append(_ratio(a_value, b_value) if _higher is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(name: str, ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {name}: {detail}"


def check_all(
    name: str, rows: list[Figures], ok: Callable[[Figures], bool], value: Callable[[Figures], str]
) -> str:
    """PASS iff every run (one per seed) passes; the detail lists each seed's figure."""
    detail = ", ".join(f"seed {r.seed}: {value(r)}" for r in rows)
    return check(name, all(ok(r) for r in rows), detail)


# --------------------------------------------------------------------------- scenarios


def sim_args(
    scale: float, *extra: str, latency: float = LATENCY_S, sigma: float = SIGMA
) -> list[str]:
    return [
        "--time-scale",
        str(scale),
        "--latency",
        str(latency),
        "--latency-sigma",
        str(sigma),
        *extra,
    ]


def limit_for(jobs: int, per_job: float, rpm: float, scale: float, slack: float) -> float:
    """Real seconds a client may take: `slack` x the lower bound, plus start-up."""
    return slack * (jobs * per_job / rpm * 60.0 + LATENCY_S) * scale + 15.0


def scenario_polls_count(
    work: Path, jobs: int, scale: float, rpm: float, seed: int, yes_row: bool, baselines: bool
) -> list[Figures]:
    path = work / "jobs_s1.jsonl"
    write_text_jobs(path, jobs)
    server = sim_args(scale, "--rpm", str(rpm))
    common = dict(
        jobs=path, scale=scale, rpm=rpm, seed=seed, time_limit_s=limit_for(jobs, 3, rpm, scale, 5)
    )
    runs = [run_client("batchrunner", "batchrunner", server, polls_count="auto", **common)]
    concurrency = max(4, int(runs[0].report.get("peak_in_flight") or 16))
    if yes_row:
        runs.append(
            run_client(
                "batchrunner --polls-count yes", "batchrunner", server, polls_count="yes", **common
            )
        )
    if baselines:
        runs.append(run_client("SDK", "sdk", server, concurrency=concurrency, **common))
        runs.append(
            run_client(
                "plain loop", "plain", server, concurrency=concurrency, polls_count="yes", **common
            )
        )
    rows = [figures(r, jobs=jobs, scale=scale, rpm=rpm, polls_count=True) for r in runs]
    for row in rows:
        if row.label.startswith("batchrunner"):
            row.concurrency = int(row.extra.get("peak_in_flight") or 0)
    return rows


def checks_polls_count(rows: list[Figures]) -> list[str]:
    """Issue 4's targets, for each batchrunner row (every seed), against the SDK of the run."""
    sdk = next((r for r in rows if r.label == "SDK"), None)
    checks = []
    for label in dict.fromkeys(r.label for r in rows if r.label.startswith("batchrunner")):
        brs = [r for r in rows if r.label == label]
        tag = f"[{label}] "
        checks += [
            check_all(tag + "goodput >= 0.9 of R/3", brs, lambda r: r.goodput_frac >= 0.9,
                      lambda r: f"{r.goodput_frac:.3f}"),
            check_all(tag + "<= 3.5 requests per job (all, 429s included)", brs,
                      lambda r: r.req_per_job <= 3.5, lambda r: f"{r.req_per_job:.2f}"),
            check_all(tag + "detection p50 < 10% of mean latency", brs,
                      lambda r: r.det_p50 < 0.1 * r.mean_latency,
                      lambda r: f"{r.det_p50 / r.mean_latency:.3f}"),
        ]  # fmt: skip
        if sdk is not None:
            br = brs[0]
            checks.append(
                check(
                    tag + "goodput >= 3x SDK (same seed)",
                    br.goodput >= 3 * sdk.goodput,
                    f"{br.goodput / sdk.goodput:.2f}x",
                )
            )
    return checks


def with_baselines(
    server: list[str],
    path: Path,
    *,
    jobs: int,
    scale: float,
    rpm: float,
    seed: int,
    time_limit_s: float,
    ideal_rpm: float,
    polls_count: bool,
    baselines: bool,
    snapshot_after_s: float | None = None,
) -> list[Figures]:
    """batchrunner (`auto`), then the SDK and the plain loop at its peak in-flight."""
    common: dict[str, Any] = dict(
        jobs=path, scale=scale, rpm=rpm, seed=seed, time_limit_s=time_limit_s,
        snapshot_after_s=snapshot_after_s,
    )  # fmt: skip
    runs = [run_client("batchrunner", "batchrunner", server, polls_count="auto", **common)]
    concurrency = max(4, int(runs[0].report.get("peak_in_flight") or 16))
    if baselines:
        runs.append(run_client("SDK", "sdk", server, concurrency=concurrency, **common))
        # The plain loop knows what the server counts: its polls take tokens
        # only when they count (when they are free it is the 1-second poller).
        plain_polls = "yes" if polls_count else "no"
        runs.append(
            run_client(
                "plain loop",
                "plain",
                server,
                concurrency=concurrency,
                polls_count=plain_polls,
                **common,
            )
        )
    rows = [
        figures(r, jobs=jobs, scale=scale, rpm=ideal_rpm, polls_count=polls_count) for r in runs
    ]
    rows[0].concurrency = int(rows[0].extra.get("peak_in_flight") or 0)
    return rows


def scenario_polls_free(
    work: Path, jobs: int, scale: float, rpm: float, seed: int, baselines: bool
) -> list[Figures]:
    path = work / "jobs_s2.jsonl"
    write_text_jobs(path, jobs)
    server = sim_args(scale, "--rpm", str(rpm), "--polls-free")
    return with_baselines(
        server, path, jobs=jobs, scale=scale, rpm=rpm, seed=seed,
        time_limit_s=limit_for(jobs, 1, rpm, scale, 5), ideal_rpm=rpm, polls_count=False,
        baselines=baselines,
    )  # fmt: skip


def checks_polls_free(rows: list[Figures]) -> list[str]:
    brs = [r for r in rows if r.label == "batchrunner"]
    return [
        check_all("goodput >= 0.95 of R", brs, lambda r: r.goodput_frac >= 0.95,
                  lambda r: f"{r.goodput_frac:.3f}"),
    ]  # fmt: skip


def scenario_half_limit(
    work: Path, jobs: int, scale: float, rpm: float, seed: int, baselines: bool
) -> list[Figures]:
    path = work / "jobs_s3.jsonl"
    write_text_jobs(path, jobs)
    real = rpm / 2
    server = sim_args(scale, "--rpm", str(real), "--no-retry-after")
    # The ideal is the server's real limit: real / 3 jobs per minute.
    return with_baselines(
        server, path, jobs=jobs, scale=scale, rpm=rpm, seed=seed,
        time_limit_s=limit_for(jobs, 3, real, scale, 4), ideal_rpm=real, polls_count=True,
        baselines=baselines, snapshot_after_s=60.0 * scale,
    )  # fmt: skip


def checks_half_limit(rows: list[Figures]) -> list[str]:
    brs = [r for r in rows if r.label == "batchrunner"]
    return [
        check_all("after the first minute: 429s < 5% of requests", brs,
                  lambda r: r.after.get("share_429", 1.0) < 0.05,
                  lambda r: f"{r.after.get('share_429', float('nan')):.3f}"),
        check_all("after the first minute: goodput >= 0.85 of the real limit", brs,
                  lambda r: r.after.get("goodput", 0.0) / r.ideal >= 0.85,
                  lambda r: f"{r.after.get('goodput', float('nan')) / r.ideal:.3f}"),
        # Issue 11 item 6: over the whole makespan, fill, learning and drain included.
        check_all("whole makespan: goodput (N x 3 / R + L) / makespan >= 0.92", brs,
                  lambda r: r.makespan_frac >= 0.92, lambda r: f"{r.makespan_frac:.3f}"),
    ]  # fmt: skip


def scenario_refused_count(
    work: Path, jobs: int, scale: float, rpm: float, seed: int, baselines: bool
) -> list[Figures]:
    path = work / "jobs_s5.jsonl"
    write_text_jobs(path, jobs)
    server = sim_args(scale, "--rpm", str(rpm), "--count-refused")
    return with_baselines(
        server, path, jobs=jobs, scale=scale, rpm=rpm, seed=seed,
        time_limit_s=limit_for(jobs, 3, rpm, scale, 3), ideal_rpm=rpm, polls_count=True,
        baselines=baselines,
    )  # fmt: skip


def checks_refused_count(rows: list[Figures]) -> list[str]:
    brs = [r for r in rows if r.label == "batchrunner"]
    checks = [
        check_all("[refused requests counted] goodput >= 0.9 of R/3", brs,
                  lambda r: r.goodput_frac >= 0.9, lambda r: f"{r.goodput_frac:.3f}"),
    ]  # fmt: skip
    sdk = next((r for r in rows if r.label == "SDK"), None)
    if sdk is not None:
        br = brs[0]
        checks.append(
            check(
                "[refused requests counted] goodput >= 3x SDK (same seed)",
                br.goodput >= 3 * sdk.goodput,
                f"{br.goodput / sdk.goodput:.2f}x"
                if sdk.goodput > 0
                else "the SDK finished no job",
            )
        )
    return checks


def seed_summary(title: str, rows: list[Figures]) -> str:
    """One line per batchrunner run (every seed): the figures that move between seeds."""
    lines = [
        f"#### {title}: batchrunner, seed by seed",
        "",
        "| run | seed | goodput / ideal (10-90%) | goodput over the makespan | 429s | "
        "requests / job | makespan, model s |",
        "|---|---|---|---|---|---|---|",
    ]
    brs = [r for r in rows if r.label.startswith("batchrunner")]
    for r in brs:
        lines.append(
            f"| {r.label} | {r.seed} | {r.goodput_frac:.3f} | {r.makespan_frac:.3f} | "
            f"{r.rate_limited} | {r.req_per_job:.2f} | {r.makespan:.0f} |"
        )
    for label in dict.fromkeys(r.label for r in brs):
        values = [r.makespan_frac for r in brs if r.label == label]
        lines.append(
            f"\n{label}: goodput over the makespan over {len(values)} seeds: mean "
            f"{statistics.fmean(values):.3f}, min {min(values):.3f}, max {max(values):.3f}"
        )
    return "\n".join(lines)


OVERHEAD_RUNS = 7
"""Alternating pairs: this machine's speed drifts by a third within minutes
(the minimal client alone at 0.76 to 1.10 CPU ms per job), so each
batchrunner run is compared with the minimal client's run next to it."""


BYTECODE_JOBS = (250, 1250)
"""Job counts of the traced runs (`--count-bytecodes`): bytecodes a job is the
difference of the counts over the difference of the jobs, so what each client
runs once (its start-up inside the measured window) cancels out."""


def bytecodes_per_job(work: Path, server: list[str], seed: int) -> dict[str, float]:
    """Each client's bytecodes a job, marginal over BYTECODE_JOBS: a figure of
    the work a job costs that does not drift with the machine's speed."""
    paths = {jobs: work / f"jobs_s4_{jobs}.jsonl" for jobs in BYTECODE_JOBS}
    for jobs, path in paths.items():
        write_text_jobs(path, jobs)
    per_job: dict[str, float] = {}
    for client in ("batchrunner", "minimal"):
        counts = []
        for path in paths.values():
            extra = ["--latency-prior", "0.001"] if client == "batchrunner" else []
            run = run_client(
                client, client, server, jobs=path, scale=1.0, rpm=1e6, polls_count="no",
                concurrency=64, seed=seed, time_limit_s=900,
                extra=[*extra, "--count-bytecodes"],
            )  # fmt: skip
            counts.append(int(run.report.get("bytecodes") or 0))
        per_job[client] = (counts[1] - counts[0]) / (BYTECODE_JOBS[1] - BYTECODE_JOBS[0])
    return per_job


def scenario_overhead(work: Path, jobs: int, seed: int) -> list[str]:
    """Client capacity: no latency, no rate limit. batchrunner against the minimal
    client (budget_clients.py `minimal`), alternating, OVERHEAD_RUNS pairs; the
    medians of each client and the median of the pairs' ratios (issue 12: jobs/s
    >= 0.7 of the minimal client's, CPU per job <= 1.5x)."""
    path = work / "jobs_s4.jsonl"
    write_text_jobs(path, jobs)
    server = ["--time-scale", "1", "--latency", "0.001", "--latency-sigma", "0", "--queue-s", "0"]
    measured: dict[str, list[tuple[float, float, float]]] = {"batchrunner": [], "minimal": []}
    for _ in range(OVERHEAD_RUNS):
        for client in measured:
            extra = ["--latency-prior", "0.001"] if client == "batchrunner" else []
            run = run_client(
                client, client, server, jobs=path, scale=1.0, rpm=1e6, polls_count="no",
                concurrency=64, seed=seed, time_limit_s=300, extra=extra,
            )  # fmt: skip
            done = int((run.report.get("results") or {}).get("succeeded", 0))
            wall = float(run.report.get("wall_s") or float("nan"))
            cpu = float(run.report.get("cpu_s") or float("nan"))
            requests = sum(run.stats["requests"].values())
            measured[client].append(
                (done / wall, 1000 * cpu / max(1, done), requests / max(1, done))
            )
    med = {
        client: tuple(statistics.median(run[i] for run in runs) for i in range(3))
        for client, runs in measured.items()
    }
    br, floor = med["batchrunner"], med["minimal"]
    pairs = list(zip(measured["batchrunner"], measured["minimal"], strict=True))
    speed = statistics.median(b[0] / m[0] for b, m in pairs)
    cpu = statistics.median(b[1] / m[1] for b, m in pairs)
    bytecodes = bytecodes_per_job(work, server, seed)
    lines = [
        f"### (4) client capacity: no latency, no rate limit; {jobs} jobs, "
        f"{OVERHEAD_RUNS} alternating pairs of runs",
        "",
        "| figure | batchrunner (median) | minimal client (median) | ratio of medians "
        "| median of the pairs' ratios |",
        "|---|---|---|---|---|",
        f"| jobs per second | {br[0]:.0f} | {floor[0]:.0f} | {br[0] / floor[0]:.2f} "
        f"| {speed:.2f} |",
        f"| CPU ms per job | {br[1]:.3f} | {floor[1]:.3f} | {br[1] / floor[1]:.2f} | {cpu:.2f} |",
        f"| requests per job | {br[2]:.2f} | {floor[2]:.2f} | | |",
        f"| bytecodes per job (traced runs, {BYTECODE_JOBS[0]} -> {BYTECODE_JOBS[1]} jobs) "
        f"| {bytecodes['batchrunner']:,.0f} | {bytecodes['minimal']:,.0f} "
        f"| {bytecodes['batchrunner'] / bytecodes['minimal']:.2f} | |",
        "",
        "pairs (jobs/s, CPU ms/job; batchrunner | minimal): "
        + "; ".join(f"{b[0]:.0f}/{b[1]:.2f} | {m[0]:.0f}/{m[1]:.2f}" for b, m in pairs),
        "",
        check("capacity >= 0.7 of the minimal client's jobs/s", speed >= 0.7, f"{speed:.2f}"),
        check("CPU per job <= 1.5x the minimal client's", cpu <= 1.5, f"{cpu:.2f}x"),
    ]
    return lines


# --------------------------------------------------------------------------- main


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}, "
        f"{platform.system()} {platform.release()}, load average at start {load[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs, one seed: a smoke run")
    parser.add_argument(
        "--rpm", type=float, default=50.0, help="R, model-time requests/min (Pro plan: 50)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="batchrunner runs once per seed, the baselines at the first (default 7 8 9)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="batchrunner only (no SDK, no plain loop)"
    )
    parser.add_argument(
        "--only",
        type=int,
        action="append",
        choices=[1, 2, 3, 4, 5],
        help="run only these scenarios",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="batchrunner's (default: its own)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="jobs of scenarios 1, 2, 3 and 5 (default 300): a longer run shows what a "
        "start-up cost (auto learning that polls count) is worth once spread out",
    )
    args = parser.parse_args(argv)
    if args.max_in_flight is not None:
        BATCHRUNNER_EXTRA[:] = ["--max-in-flight", str(args.max_in_flight)]
    seeds = args.seeds or ([7] if args.quick else [7, 8, 9])
    sizes = (
        {1: 60, 2: 100, 3: 60, 4: 1000, 5: 60}
        if args.quick
        else {1: 300, 2: 300, 3: 300, 4: 3000, 5: 300}
    )
    if args.jobs is not None:
        sizes.update({scenario: args.jobs for scenario in (1, 2, 3, 5)})
    # Time scales: 1 model minute = 60*S real seconds. Polls-free runs use a larger
    # S because the SDK then polls every model second per thread with no 429 to
    # slow it, and at S=0.05 that is ~600 requests/s on a 2-core machine.
    scales = {1: 0.05, 2: 0.1, 3: 0.05, 5: 0.05}
    only = set(args.only or [1, 2, 3, 4, 5])
    started = time.monotonic()
    quick = "--quick " if args.quick else ""
    print(f"# bench_budget {quick}R={args.rpm:g} rpm (model time), seeds {seeds}")
    print(f"machine: {machine()}")
    print(f"jobs per scenario: {sizes}; time scales: {scales}")
    print(f"baselines (SDK, plain loop): {'none' if args.no_baselines else f'seed {seeds[0]}'}")
    print()
    r = args.rpm
    titles = {
        1: f"(1) polls count, server --rpm {r:g}; ideal R/3 = {r / 3:.2f} jobs/min; S={scales[1]}",
        2: f"(2) polls free, server --rpm {r:g} --polls-free; ideal R = {r:g} jobs/min; "
        f"S={scales[2]}",
        3: f"(3) client --rpm {r:g}, server's real limit {r / 2:g} rpm, polls count, "
        f"no Retry-After; ideal {r / 6:.2f} jobs/min; S={scales[3]}",
        5: f"(5) as (1), and refused requests count too: server --rpm {r:g} --count-refused; "
        f"ideal R/3 = {r / 3:.2f} jobs/min; S={scales[5]}",
    }
    names = {1: "(1) polls count", 2: "(2) polls free", 3: "(3) half limit", 5: "(5) refused count"}
    runners: dict[int, Callable[..., list[Figures]]] = {
        1: lambda seed, baselines: scenario_polls_count(
            work, sizes[1], scales[1], r, seed, yes_row=not args.quick, baselines=baselines
        ),
        2: lambda seed, baselines: scenario_polls_free(
            work, sizes[2], scales[2], r, seed, baselines
        ),
        3: lambda seed, baselines: scenario_half_limit(
            work, sizes[3], scales[3], r, seed, baselines
        ),
        5: lambda seed, baselines: scenario_refused_count(
            work, sizes[5], scales[5], r, seed, baselines
        ),
    }
    checkers = {
        1: checks_polls_count,
        2: checks_polls_free,
        3: checks_half_limit,
        5: checks_refused_count,
    }
    all_checks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        work = Path(tmp)
        for number in (1, 2, 3, 5):
            if number not in only:
                continue
            rows: list[Figures] = []
            for index, seed in enumerate(seeds):
                runs = runners[number](seed, index == 0 and not args.no_baselines)
                print(table(f"{titles[number]}; seed {seed}", runs, after=number == 3))
                sdk = next((row for row in runs if row.label == "SDK"), None)
                if sdk is not None and sdk.goodput > 0:
                    print(f"\ngoodput ratio batchrunner/SDK: {runs[0].goodput / sdk.goodput:.2f}")
                for row in runs:
                    if row.label.startswith("batchrunner"):
                        print(f"[{row.label}]")
                        _print_trace(row)
                if number == 1 and index == 0:
                    print(
                        "batchrunner time-scaled: " + ", ".join(runs[0].extra.get("scaled") or [])
                    )
                print()
                rows += runs
            checks = checkers[number](rows)
            print(seed_summary(names[number], rows))
            print("\n".join(["", *checks, ""]))
            all_checks += checks
        if 4 in only:
            print("\n".join(scenario_overhead(work, sizes[4], seeds[0])))
            print()
    print("## Targets (issue 4, 'Done when'; issue 11 item 6)")
    print("\n".join(all_checks))
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")
    return 0 if all(line.startswith("PASS") for line in all_checks) else 1


def _print_trace(row: Figures) -> None:
    trace = row.extra.get("rpm_trace") or []
    if trace:
        points = ", ".join(f"{t:.0f}s:{rate:g}" for t, rate in trace[:: max(1, len(trace) // 12)])
        print(f"batchrunner effective rpm over model time: {points}")
    if row.diagnosis:
        print(f"batchrunner request pattern (simulator per_request): {row.diagnosis}")


def diagnose(per_request: list[dict[str, Any]], scale: float) -> str:
    """How the polls of one client fell: polls per job, and how late the poll
    that first saw COMPLETED came, split by whether it was the job's first poll."""
    fetched = [r for r in per_request if r["first_result_at"] is not None]
    if not fetched:
        return ""
    hist: dict[int, int] = {}
    for r in fetched:
        hist[r["status_polls"]] = hist.get(r["status_polls"], 0) + 1
    shown = ", ".join(f"{k}: {100 * v / len(fetched):.0f}%" for k, v in sorted(hist.items())[:6])
    first = [
        (r["first_seen_done_at"] - r["done_at"]) / scale for r in fetched if r["status_polls"] == 1
    ]
    later = [
        (r["first_seen_done_at"] - r["done_at"]) / scale for r in fetched if r["status_polls"] > 1
    ]
    fetch = [(r["first_result_at"] - r["first_seen_done_at"]) / scale for r in fetched]
    extra_fetches = sum(max(0, r["result_fetches"] - 1) for r in fetched)
    return (
        f"status polls per job {{{shown}}}; a job's first poll saw COMPLETED "
        f"{100 * len(first) / len(fetched):.0f}% of the time, {_f(_quantile(first, 0.5))} s (p50)"
        f" / {_f(_quantile(first, 0.9))} s (p90) after done; "
        f"jobs polled more than once saw it {_f(_quantile(later, 0.5))} s (p50) after done; "
        f"COMPLETED seen -> result fetched p50 {_f(_quantile(fetch, 0.5))} s,"
        f" p90 {_f(_quantile(fetch, 0.9))} s; "
        f"repeated result fetches {extra_fetches}"
    )


if __name__ == "__main__":
    sys.exit(main())
