"""Peak memory of `python -m batchrunner` on a big jobs file (issue 2).

Memory must be bounded by the work in flight, not by the size of the file.
This feeds N caption jobs (images given by local path: a handful of small real
images reused by every line) through the real command line, in its own
process, against the simulator in another process (time-scaled so the 11.2 s
model latency is ~11 ms, no server rpm limit, polls free), and reports the
runner process's peak RSS (its own ru_maxrss, from a bare launcher's wait4:
see `_common.PEAK_RSS_LAUNCHER`) and
jobs/s. The baseline is the same runner on a small file in the same run: the
ratio shows whether memory grows with the file.

    python benchmarks/bench_memory.py                  # 200,000 lines vs 2,000
    python benchmarks/bench_memory.py --lines 20000    # quicker
    python benchmarks/bench_memory.py --profile        # + cProfile of the big run
    python benchmarks/bench_memory.py --resume         # + a resume over the finished run
    python benchmarks/bench_memory.py --kind text --sizes 10000 100000 1000000 \
        --max-in-flight 1000                           # issue 12: bytes per job

Target (issue 2): peak RSS under 200 MB at 200,000 lines. Issue 12: memory flat
in the number of jobs, at most 40 bytes a job beyond a fixed base, and a million
text jobs under 100 MB. With `--sizes`, every size runs with the same
`--max-in-flight` (the work in flight is the fixed base), and the growth is
(peak RSS of the largest - of the smallest) / (the difference in jobs).
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    SimProcess,
    count_results,
    launched_for_peak_rss,
    launched_pid,
    machine,
    make_images,
    peak_rss_of_launched_mb,
    rss_mb,
    runner_env,
    simulator,
    write_image_jobs,
    write_text_jobs,
)

TARGET_MB = 200.0


@dataclass
class Measured:
    lines: int
    file_mb: float
    wall_s: float
    peak_rss_mb: float
    rss_at: dict[int, float]  # percent of results written -> RSS MB seen then
    exit_code: int
    results: dict[str, int]
    submits_accepted: int
    timed_out: bool

    @property
    def jobs_per_s(self) -> float:
        return self.lines / self.wall_s if self.wall_s else 0.0


def run_one(
    sim: SimProcess,
    folder: Path,
    lines: int,
    image_names: list[str],
    *,
    rpm: float,
    timeout_s: float,
    profile: Path | None = None,
    resume: bool = False,
    kind: str = "image",
    max_in_flight: int | None = None,
    expected_latency_s: float | None = None,
) -> Measured:
    """One run of the command line; `resume` runs it again over its own finished results."""
    jobs = folder / f"jobs-{lines}.jsonl"
    out = folder / f"jobs-{lines}.results.jsonl"
    if resume:
        size = jobs.stat().st_size
    elif kind == "text":
        size = write_text_jobs(jobs, lines)
    else:
        size = write_image_jobs(jobs, lines, image_names)
    before = sim.stats()["submits_accepted"]
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += [
        "-m",
        "batchrunner",
        str(jobs),
        "-o",
        str(out),
        "--base-url",
        sim.url,
        "--rpm",
        str(rpm),
        "--quiet",
        *(["--max-in-flight", str(max_in_flight)] if max_in_flight else []),
        *(["--expected-latency", str(expected_latency_s)] if expected_latency_s else []),
    ]
    # The results file grows by ~ the same number of bytes per job: its size
    # tells how far the run is, without reading it.
    approx_result_bytes = None
    samples: list[tuple[float, float]] = []  # (fraction done, RSS MB)
    start = time.perf_counter()
    report = folder / f"jobs-{lines}.maxrss"
    process = subprocess.Popen(
        launched_for_peak_rss(command, report),
        cwd=REPO,
        env=runner_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    timed_out = False
    runner_pid = None
    while True:
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        elapsed = time.perf_counter() - start
        if elapsed > timeout_s and not timed_out:
            timed_out = True
            process.send_signal(signal.SIGINT)  # passed on: the runner flushes, exits 130
        if runner_pid is None:
            runner_pid = launched_pid(report)
        rss = rss_mb(runner_pid) if runner_pid else None
        try:
            written = out.stat().st_size
        except FileNotFoundError:
            written = 0
        if approx_result_bytes is None and written > 64 * 1024:
            with out.open("rb") as handle:
                head = handle.read(64 * 1024)
            approx_result_bytes = len(head) / max(1, head.count(b"\n"))
        if rss is not None and approx_result_bytes:
            samples.append((written / approx_result_bytes / lines, rss))
        time.sleep(0.25)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.stderr and process.stderr.close()
    if process.returncode not in (0, 130):
        print(stderr, file=sys.stderr)
    rss_at: dict[int, float] = {}
    for percent in (10, 25, 50, 75, 90):
        seen = [rss for done, rss in samples if done <= percent / 100]
        if seen:
            rss_at[percent] = seen[-1]
    results = count_results(out) if out.exists() else {}
    accepted = sim.stats()["submits_accepted"] - before
    return Measured(
        lines=lines,
        file_mb=size / 1e6,
        wall_s=wall,
        peak_rss_mb=peak_rss_of_launched_mb(report),
        rss_at=rss_at,
        exit_code=process.returncode,
        results=results,
        submits_accepted=accepted,
        timed_out=timed_out,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="lines of the big file")
    parser.add_argument("--baseline", type=int, default=2_000, help="lines of the baseline file")
    parser.add_argument("--rpm", type=float, default=600_000, help="runner --rpm")
    parser.add_argument("--time-scale", type=float, default=0.001, help="simulator time scale")
    parser.add_argument("--timeout", type=float, default=900, help="SIGINT the big run after")
    parser.add_argument("--profile", action="store_true", help="cProfile the big run")
    parser.add_argument(
        "--resume", action="store_true", help="also time a resume of the finished big run"
    )
    parser.add_argument("--kind", choices=["image", "text"], default="image", help="job kind")
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="issue 12: run these sizes, report bytes per job"
    )
    parser.add_argument("--max-in-flight", type=int, help="runner --max-in-flight")
    args = parser.parse_args()
    if args.sizes:
        return growth(args)

    print(f"machine: {machine()}")
    print(
        f"simulator: own process, time scale {args.time_scale} (latency ~"
        f"{11.2 * args.time_scale * 1000:.1f} ms), no rpm limit, polls free; "
        f"runner: python -m batchrunner --rpm {args.rpm:g} --quiet"
    )
    rows: list[tuple[str, Measured]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        names = make_images(folder / "images")
        with simulator(time_scale=args.time_scale) as sim:
            runs = [
                ("baseline", args.baseline, None, False),
                ("big", args.lines, folder / "big.prof" if args.profile else None, False),
            ]
            if args.resume:
                # The same command again over the finished big run: every job is
                # skipped, so this is the cost of loading the results and journal.
                runs.append(("resume", args.lines, None, True))
            for label, lines, profile, resume in runs:
                m = run_one(
                    sim,
                    folder,
                    lines,
                    names,
                    rpm=args.rpm,
                    timeout_s=args.timeout if label == "big" else 600,
                    profile=profile,
                    resume=resume,
                )
                rows.append((label, m))
                print(
                    f"  {label}: {lines} lines done in {m.wall_s:.1f} s, exit {m.exit_code}",
                    flush=True,
                )
            if args.profile:
                print("\ncProfile of the big run (top 25 by cumulative time):")
                pstats.Stats(str(folder / "big.prof")).sort_stats("cumulative").print_stats(25)
                print("top 25 by own time:")
                pstats.Stats(str(folder / "big.prof")).sort_stats("tottime").print_stats(25)

    base = rows[0][1]
    print()
    header = (
        f"{'run':<9}{'lines':>9}{'file MB':>9}{'wall s':>9}{'jobs/s':>9}"
        f"{'peak RSS MB':>13}{'x baseline':>12}{'exit':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, m in rows:
        print(
            f"{label:<9}{m.lines:>9}{m.file_mb:>9.1f}{m.wall_s:>9.1f}{m.jobs_per_s:>9.0f}"
            f"{m.peak_rss_mb:>13.1f}{m.peak_rss_mb / base.peak_rss_mb:>12.2f}{m.exit_code:>6}"
        )
    print()
    for label, m in rows:
        progress = ", ".join(f"{p}%: {mb:.0f}" for p, mb in m.rss_at.items())
        print(f"{label}: RSS MB by share of results written: {progress or 'n/a'}")
        print(
            f"{label}: results {m.results}; simulator accepted {m.submits_accepted} submits"
            + ("; TIMED OUT (stopped with SIGINT)" if m.timed_out else "")
        )
    big = rows[1][1]
    complete = (
        big.results.get("succeeded") == big.lines
        and big.results.get("distinct_ids") == big.lines
        and not big.timed_out
    )
    ok = complete and big.peak_rss_mb < TARGET_MB
    print(
        f"\npeak RSS at {big.lines} lines: {big.peak_rss_mb:.1f} MB "
        f"({big.peak_rss_mb / base.peak_rss_mb:.2f}x the {base.lines}-line baseline); "
        f"target < {TARGET_MB:.0f} MB: {'PASS' if ok else 'FAIL'}"
        + ("" if complete else " (run incomplete)")
    )
    return 0 if ok else 1


PER_JOB_TARGET = 40.0
MILLION_TARGET_MB = 100.0


def growth(args: argparse.Namespace) -> int:
    """Peak RSS at each size with the same work in flight; the growth per job."""
    sizes = sorted(args.sizes)
    print(f"machine: {machine()}")
    print(
        f"{args.kind} jobs, sizes {sizes}; simulator time scale {args.time_scale}, no rpm limit, "
        f"polls free; runner --rpm {args.rpm:g} --max-in-flight {args.max_in_flight} "
        f"--expected-latency {11.2 * args.time_scale:g} --quiet"
    )
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        names = make_images(folder / "images")
        with simulator(time_scale=args.time_scale) as sim:
            for lines in sizes:
                m = run_one(
                    sim, folder, lines, names, rpm=args.rpm, timeout_s=args.timeout,
                    kind=args.kind, max_in_flight=args.max_in_flight,
                    expected_latency_s=11.2 * args.time_scale,
                )  # fmt: skip
                rows.append(m)
                print(
                    f"  {lines}: {m.wall_s:.0f} s, {m.jobs_per_s:.0f} jobs/s, peak RSS "
                    f"{m.peak_rss_mb:.1f} MB, exit {m.exit_code}, results {m.results}",
                    flush=True,
                )
    print("\n| jobs | peak RSS MB | bytes per job over the smallest run |")
    print("|---|---|---|")
    small = rows[0]
    for m in rows:
        per_job = (
            (m.peak_rss_mb - small.peak_rss_mb) * 2**20 / (m.lines - small.lines)
            if m.lines > small.lines
            else float("nan")
        )
        print(f"| {m.lines:,} | {m.peak_rss_mb:.1f} | {per_job:.1f} |")
    big = rows[-1]
    slope = (big.peak_rss_mb - small.peak_rss_mb) * 2**20 / max(1, big.lines - small.lines)
    complete = all(m.results.get("distinct_ids") == m.lines for m in rows)
    ok = complete and slope <= PER_JOB_TARGET
    print(
        f"\ngrowth {slope:.1f} bytes per job ({small.lines:,} -> {big.lines:,}); target <= "
        f"{PER_JOB_TARGET:.0f}: {'PASS' if ok else 'FAIL'}"
        + ("" if complete else " (a run was incomplete)")
    )
    if big.lines >= 1_000_000:
        under = big.peak_rss_mb < MILLION_TARGET_MB
        print(
            f"peak RSS at {big.lines:,} jobs: {big.peak_rss_mb:.1f} MB; target < "
            f"{MILLION_TARGET_MB:.0f} MB: {'PASS' if under else 'FAIL'}"
        )
        ok = ok and under
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
