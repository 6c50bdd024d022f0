"""`batchrunner status RESULTS.jsonl`: where a run stands, from its files alone (no API call).

Read-only: unlike a resume, it repairs nothing; a torn last line is simply not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from batchrunner.argtypes import Parser
from batchrunner.errors import ResultsFileError
from batchrunner.journal import JournalRecord, journal_path_for, load_journal
from batchrunner.policy import RETENTION_MARGIN_S, RETENTION_S, time_left
from batchrunner.reader import read_jobs
from batchrunner.rerun import still_in_flight
from batchrunner.resultsfile import iter_lines, load_prior
from batchrunner.shards import parts_dir_for, unmerged_parts


@dataclass(slots=True)
class RunStatus:
    done: Counter[str] = field(default_factory=Counter)
    in_flight: list[tuple[str, float]] = field(default_factory=list)  # (custom_id, seconds left)
    expired_in_journal: int = 0  # journaled, unfinished, past the window: a resume pays again
    not_started: int | None = None  # None when the jobs file is unknown
    jobs_file: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        lefts = [left for _, left in self.in_flight]
        return {
            "done": dict(self.done),
            "done_total": sum(self.done.values()),
            "in_flight": len(self.in_flight),
            "in_flight_min_seconds_left": min(lefts) if lefts else None,
            "journaled_past_retention": self.expired_in_journal,
            "not_started": self.not_started,
            "jobs_file": str(self.jobs_file) if self.jobs_file else None,
        }


def compute_status(results: Path, jobs: Path | None, now: float, model: str) -> RunStatus:
    """Read-only: the same readers and the same rules as a resume, nothing repaired."""
    status = RunStatus(jobs_file=jobs)
    prior = load_prior(results, repair=False)
    # A Ray run (--engine ray): the shards not merged yet have their lines and
    # journals in RESULTS.parts/.
    parts = unmerged_parts(results)
    for part in parts:
        for line in iter_lines(part):
            prior.add(line)
    records: dict[str, JournalRecord] = {}
    for journal in [journal_path_for(results), *map(journal_path_for, parts)]:
        records.update(
            load_journal(
                journal,
                lambda record: still_in_flight(prior.get(record.custom_id), record),
                repair=False,
            )
        )
    for custom_id, record in records.items():
        left = time_left(record.submitted_at, now, RETENTION_S) - RETENTION_MARGIN_S
        if left > 0:
            status.in_flight.append((custom_id, left))
        else:
            status.expired_in_journal += 1
    if jobs is not None and jobs.is_file():
        total = 0
        for item in read_jobs(jobs, model):
            total += 1
            prior.mark_seen(item.custom_id)
        status.done = prior.outcomes_in_input()
        status.not_started = max(0, total - sum(status.done.values()) - len(records))
    else:
        status.done = prior.result_types()
    return status


def guess_jobs_file(results: Path) -> Path | None:
    name = results.name
    if name.endswith(".results.jsonl"):
        candidate = results.with_name(name[: -len(".results.jsonl")] + ".jsonl")
        if candidate.is_file():
            return candidate
    return None


def main(argv: Sequence[str]) -> int:
    parser = Parser(
        prog="batchrunner status",
        description="Where a run stands, from its results file and journal alone (no API call; "
        "with --engine ray, also the parts of shards not merged yet).",
    )
    parser.add_argument("results", type=Path, help="the results file of a run")
    parser.add_argument("--jobs", type=Path, help="the jobs file (default: guessed from the name)")
    parser.add_argument("--model", default="claude-3.5-sonnet", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not any(
        path.exists()
        for path in (args.results, journal_path_for(args.results), parts_dir_for(args.results))
    ):
        print(
            f"batchrunner status: error: no results or journal at {args.results}", file=sys.stderr
        )
        return 2
    jobs = args.jobs or guess_jobs_file(args.results)
    try:
        status = compute_status(args.results, jobs, time.time(), args.model)
    except (ResultsFileError, OSError) as exc:
        print(f"batchrunner status: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(orjson.dumps(status.as_dict()).decode() + "\n")
        return 0
    print_status(status, time.time())
    return 0


def print_status(status: RunStatus, now: float) -> None:
    table = Table(title="batchrunner status", show_header=False)
    table.add_column("what")
    table.add_column("jobs", justify="right")
    for kind in ("succeeded", "errored", "expired"):
        table.add_row(f"done: {kind}", f"{status.done[kind]:,}")
    table.add_row("in flight (collectable)", f"{len(status.in_flight):,}")
    if status.in_flight:
        first = min(left for _, left in status.in_flight)
        until = datetime.fromtimestamp(now + first).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row("  resume before", f"{until} ({first / 60:.0f} min)")
    table.add_row("journaled, past retention", f"{status.expired_in_journal:,}")
    if status.not_started is None:
        table.add_row("not yet started", "unknown (pass --jobs)")
    else:
        table.add_row("not yet started", f"{status.not_started:,}")
    Console().print(table)
