"""Cost of the submission journal (issue 3): throughput with and without it, same run.

The runner runs in this process (`batchrunner.runner.run`, RunConfig
journal=False / journal=True), the simulator in its own process (time-scaled
so the 11.2 s model latency is ~11 ms, no rpm limit, polls free), and the
runner is told that latency (latency_prior_s) and given an rpm far above what
the machine can do: nothing waits on a rate limit, so the figure is the
pipeline's own cost. Runs alternate without/with the journal (the first of
each pair swapped every round, so drift on a shared machine hits both sides);
the medians are compared.

    python benchmarks/bench_journal.py                       # 5,000 text jobs, 5 rounds
    python benchmarks/bench_journal.py --jobs 2000 --rounds 3

Target (issue 3): overhead under 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import count_results, machine, simulator, write_text_jobs

from batchrunner.api import ApiKey
from batchrunner.journal import journal_path_for
from batchrunner.runner import RunConfig, run

TARGET_PERCENT = 10.0


def one_run(
    url: str, jobs: Path, out: Path, *, journal: bool, rpm: float, latency_s: float, seed: int
) -> tuple[float, float, dict[str, int], int]:
    """(wall seconds, runner CPU seconds, result counts, journal bytes) of one complete run."""
    for path in (out, journal_path_for(out)):
        path.unlink(missing_ok=True)
    config = RunConfig(
        jobs_path=jobs,
        output_path=out,
        api_key=ApiKey("bench-key"),
        base_url=url,
        rpm=rpm,
        journal=journal,
        restart=True,
        latency_prior_s=latency_s,
        seed=seed,
    )
    start = time.perf_counter()
    cpu_start = time.process_time()
    outcome = anyio.run(run, config)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if outcome.exit_code != 0:
        raise SystemExit(f"run failed with exit code {outcome.exit_code}: {outcome.stats}")
    journal_file = journal_path_for(out)
    journal_bytes = journal_file.stat().st_size if journal_file.exists() else 0
    return wall, cpu, count_results(out), journal_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5_000, help="text jobs per run")
    parser.add_argument("--rounds", type=int, default=5, help="pairs of runs (off, on)")
    parser.add_argument("--rpm", type=float, default=6_000_000, help="runner rpm (no limit)")
    parser.add_argument("--time-scale", type=float, default=0.001, help="simulator time scale")
    args = parser.parse_args()
    latency_s = 11.2 * args.time_scale

    print(f"machine: {machine()}")
    print(
        f"{args.jobs} text jobs per run, {args.rounds} rounds of (without, with) journal; "
        f"simulator in its own process, latency ~{latency_s * 1000:.1f} ms, no rpm limit"
    )
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    journal_bytes = 0
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        folder = Path(tmp)
        jobs = folder / "jobs.jsonl"
        write_text_jobs(jobs, args.jobs)
        with simulator(time_scale=args.time_scale) as sim:
            # One unmeasured warm-up run: imports, first connections, page cache.
            one_run(
                sim.url,
                jobs,
                folder / "warm.jsonl",
                journal=True,
                rpm=args.rpm,
                latency_s=latency_s,
                seed=0,
            )
            for round_ in range(args.rounds):
                order = (False, True) if round_ % 2 == 0 else (True, False)
                for journal in order:
                    out = folder / f"out-{int(journal)}.jsonl"
                    wall, cpu, counts, jbytes = one_run(
                        sim.url,
                        jobs,
                        out,
                        journal=journal,
                        rpm=args.rpm,
                        latency_s=latency_s,
                        seed=round_,
                    )
                    if counts.get("succeeded") != args.jobs or counts["distinct_ids"] != args.jobs:
                        raise SystemExit(f"incomplete run: {counts}")
                    if journal:
                        journal_bytes = jbytes
                    walls[journal].append(wall)
                    cpus[journal].append(cpu)
                    print(
                        f"  round {round_ + 1}: journal {'on ' if journal else 'off'} "
                        f"{wall:6.2f} s  {args.jobs / wall:7.0f} jobs/s  runner CPU {cpu:6.2f} s",
                        flush=True,
                    )
            accepted = sim.stats()["submits_accepted"]

    expected = args.jobs * (2 * args.rounds + 1)
    off = statistics.median(walls[False])
    on = statistics.median(walls[True])
    # Per-round ratio (each pair ran back to back): less exposed to slow drift of
    # the machine's load than the ratio of medians.
    paired = statistics.median(
        w_on / w_off for w_on, w_off in zip(walls[True], walls[False], strict=True)
    )
    cpu_off, cpu_on = statistics.median(cpus[False]), statistics.median(cpus[True])
    overhead = (1 - off / on) * 100  # throughput lost: 1 - rate_on / rate_off
    overhead_paired = (1 - 1 / paired) * 100
    overhead_cpu = (cpu_on / cpu_off - 1) * 100
    print()
    header = (
        f"{'journal':<9}{'median s':>10}{'jobs/s':>9}{'min s':>8}{'max s':>8}"
        f"{'x off':>8}{'CPU s':>8}{'CPU ms/job':>12}"
    )
    print(header)
    print("-" * len(header))
    for journal, median, cpu in ((False, off, cpu_off), (True, on, cpu_on)):
        print(
            f"{'on' if journal else 'off':<9}{median:>10.2f}{args.jobs / median:>9.0f}"
            f"{min(walls[journal]):>8.2f}{max(walls[journal]):>8.2f}{off / median:>8.3f}"
            f"{cpu:>8.2f}{cpu / args.jobs * 1000:>12.3f}"
        )
    print(
        f"\njournal: {journal_bytes / 1e6:.2f} MB for {args.jobs} jobs; simulator accepted "
        f"{accepted} submits for {expected} jobs run"
    )
    print(f"throughput lost to the journal, ratio of medians:      {overhead:+.1f}%")
    print(f"throughput lost to the journal, median of round pairs: {overhead_paired:+.1f}%")
    print(f"runner CPU added by the journal (medians):             {overhead_cpu:+.1f}%")
    ok = overhead_paired < TARGET_PERCENT
    print(
        f"journal overhead (median of round pairs): {overhead_paired:+.1f}%; "
        f"target < {TARGET_PERCENT:.0f}%: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
