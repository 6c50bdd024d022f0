"""Progress display and summary table (rich, on stderr)."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from batchrunner.context import RunContext
    from batchrunner.poller import Poller
    from batchrunner.runner import RunOutcome

stderr = Console(stderr=True, highlight=False)


class Display:
    """A live table of the run's counters; does nothing when disabled."""

    def __init__(self, *, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._live: Live | None = None
        self._started = time.monotonic()
        self._finished_history: deque[tuple[float, int]] = deque(maxlen=120)
        self._request_history: deque[tuple[float, int]] = deque(maxlen=120)

    def __enter__(self) -> Display:
        if self.enabled:
            self._live = Live(Table(), console=stderr, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)

    def update(self, ctx: RunContext, poller: Poller) -> None:
        if self._live is None:
            return
        self._live.update(self.render(ctx, poller))

    def render(self, ctx: RunContext, poller: Poller) -> Table:
        stats = ctx.stats
        now = time.monotonic()
        done = stats.finished + stats.skipped_done
        requests = sum(stats.requests.values())
        self._finished_history.append((now, done))
        self._request_history.append((now, requests))
        jobs_rate = _rate(self._finished_history)
        req_rate = _rate(self._request_history)
        remaining = max(0, self.total - done)
        eta = f"{remaining / jobs_rate:,.0f} s" if jobs_rate > 0 else "-"
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("done", f"{done:,} / {self.total:,}", "in flight", f"{stats.in_flight:,}")
        table.add_row(
            "succeeded",
            f"{stats.results['succeeded']:,}",
            "failed",
            f"{stats.results['errored'] + stats.results['expired']:,}",
        )
        table.add_row("submitted", f"{stats.submitted:,}", "429s", f"{stats.rate_limited:,}")
        table.add_row(
            "requests/min",
            f"{req_rate * 60:,.1f} (rate {ctx.budget.effective_rpm:,.1f} of {ctx.budget.rpm:g})",
            "polls count",
            "yes" if ctx.budget.polls_count else "no",
        )
        table.add_row(
            "tokens in/out",
            f"{stats.input_tokens:,} / {stats.output_tokens:,}",
            "cost so far",
            f"${ctx.spent_usd():,.4f}",
        )
        table.add_row("ETA", eta, "", "")
        return table


def _rate(history: deque[tuple[float, int]]) -> float:
    if len(history) < 2:
        return 0.0
    (t0, n0), (t1, n1) = history[0], history[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def print_summary(outcome: RunOutcome, output: Path, total_lines: int) -> None:
    stats = outcome.stats
    table = Table(title="batchrunner summary", show_header=True)
    table.add_column("result")
    table.add_column("this run", justify="right")
    table.add_column("in the file", justify="right")
    for kind in ("succeeded", "errored", "expired"):
        table.add_row(kind, f"{stats.results[kind]:,}", f"{outcome.total_results[kind]:,}")
    for error_type, count in sorted(stats.error_types.items()):
        table.add_row(f"  errored: {error_type}", f"{count:,}", "")
    if stats.cached:
        table.add_row("from the cache (no request)", f"{stats.cached:,}", "")
    table.add_row("skipped (already done)", f"{stats.skipped_done:,}", "")
    table.add_row("resumed from journal", f"{stats.resumed:,}", "")
    table.add_row("unfinished", f"{outcome.unfinished:,}", "")
    requests = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.requests.items())) or "0"
    table.add_row("requests", requests, "")
    table.add_row("429s / retries", f"{stats.rate_limited:,} / {stats.retries:,}", "")
    table.add_row("tokens in / out", f"{stats.input_tokens:,} / {stats.output_tokens:,}", "")
    table.add_row("estimated cost", f"${outcome.spent_usd:,.4f}", "")
    stderr.print(table)
    stderr.print(
        f"results: {output} ({sum(outcome.total_results.values()):,} of {total_lines:,} jobs)"
    )
