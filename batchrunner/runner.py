"""One run: wires reader -> submit pool -> poller set -> writer in one anyio task group."""

from __future__ import annotations

import math
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectSendStream

from batchrunner.api import ApiKey, HttpSettings, SegmindClient, make_session
from batchrunner.budget import PollsCount, RateBudget
from batchrunner.cache import ResponseCache
from batchrunner.context import InFlightCost, LoopClock, RunContext, RunStats
from batchrunner.errors import ConfigError, JobsChangedError
from batchrunner.estimate import (
    DEFAULT_OUTPUT_TOKENS_PER_JOB,
    DEFAULT_PRICE_IN,
    DEFAULT_PRICE_OUT,
    cost_usd,
    estimate_job_tokens,
    output_tokens_for,
)
from batchrunner.images import ImageError
from batchrunner.journal import JournalRecord, journal_path_for, load_journal
from batchrunner.policy import RETENTION_MARGIN_S, RETENTION_S, RetryPolicy, is_collectable
from batchrunner.poller import Poller
from batchrunner.reader import InvalidJob, Job, read_jobs
from batchrunner.results import ExistingResults, errored, load_results, result_line
from batchrunner.schedule import MODEL_PAGE_LATENCY_S, LatencyModel, PollSchedule
from batchrunner.submitter import Submitter, Tracked, run_submit_worker
from batchrunner.threads import run_blocking
from batchrunner.writer import Writer

SUBMIT_WORKERS = 16


JobSource = Callable[[], Iterable[Job | InvalidJob]]
"""Makes a fresh iterator over the jobs each call (the resume check reads them twice)."""


@dataclass(slots=True)
class RunConfig:
    jobs_path: Path | None
    output_path: Path
    api_key: ApiKey
    base_url: str = "https://api.segmind.com"
    model: str = "claude-3.5-sonnet"
    rpm: float = 50.0
    max_in_flight: int | None = None
    polls_count: PollsCount = PollsCount.AUTO
    restart: bool = False
    journal: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    schedule: PollSchedule | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    retention_s: float = RETENTION_S
    retention_margin_s: float = RETENTION_MARGIN_S
    grace_s: float = 60.0
    handle_signals: bool = False
    latency_prior_s: float = MODEL_PAGE_LATENCY_S
    seed: int | None = None
    jobs: JobSource | None = None
    """Jobs from elsewhere than `jobs_path` (a folder of images, a Python iterable)."""
    on_result: Callable[[dict[str, Any]], None] | None = None
    """Called with each result line as it is written (before it is durable)."""
    should_stop: Callable[[], bool] | None = None
    """Polled twice a second; True stops the run at once (the journal keeps the rest)."""
    max_cost_usd: float | None = None
    """Stop submitting once spent + in-flight estimates would pass this (exit 1, resumable)."""
    price_in: float = DEFAULT_PRICE_IN
    price_out: float = DEFAULT_PRICE_OUT
    output_tokens_per_job: int = DEFAULT_OUTPUT_TOKENS_PER_JOB
    cache_dir: Path | None = None
    """Opt-in response cache (see batchrunner.cache)."""
    cache_max_age_s: float | None = None
    jobs_dir: Path | None = None
    """Folder that relative image paths are resolved against (default: the jobs file's)."""

    def job_source(self) -> JobSource:
        if self.jobs is not None:
            return self.jobs
        path = self.jobs_path
        if path is None:
            raise ConfigError("no jobs: give a jobs file or a job source")
        return lambda: read_jobs(path, self.model)

    def image_dir(self) -> Path:
        if self.jobs_dir is not None:
            return self.jobs_dir
        return self.jobs_path.parent if self.jobs_path is not None else Path.cwd()


@dataclass(slots=True)
class RunOutcome:
    stats: RunStats
    previous: Counter[str]
    fatal_message: str | None
    interrupted: bool
    unfinished: int
    total_results: Counter[str]
    cost_capped: bool = False
    spent_usd: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.fatal_message:
            return 3
        if self.interrupted:
            return 130
        if self.cost_capped:
            return 1
        if any(kind != "succeeded" for kind, n in self.total_results.items() if n):
            return 1
        return 0


def default_max_in_flight(rpm: float, latency_p90_s: float, polls_count: bool) -> int:
    """Little's law: in flight = throughput x time in the system, with headroom.

    Throughput is rpm/3 jobs per minute when polls count (submit, status,
    result), rpm when they do not. When polls count the budget is the
    bottleneck, and submits take a token before a poll that is not urgent:
    every job in flight beyond throughput x latency only waits, finished, for
    a poll token (detection delay = in flight / throughput - latency, and no
    more goodput). So no headroom on the p90 there: the first poll goes out
    near the p85, and the +2 covers the submit and fetch. bench_budget.py,
    polls counting at 50 rpm: headroom 1.5 gave detection p50 1.8 mean
    latencies, 1.0 gave 1.2 at the same goodput (0.97 of R/3); 0.8 began to
    cost goodput. When polls are free, latency is the bottleneck and a
    generous headroom keeps the submit budget busy through latency spikes.
    Capped so that every in-flight request can still be fetched inside the
    retention hour at the request budget.
    """
    jobs_per_s = rpm / 60.0 / (3.0 if polls_count else 1.0)
    headroom = 1.0 if polls_count else 2.0
    wanted = math.ceil(headroom * jobs_per_s * latency_p90_s) + 2
    retention_cap = max(4, int(rpm * 60 / 2))
    return max(4, min(wanted, retention_cap, 10_000))


Progress = Callable[[RunContext, Poller], None]
Interrupted = Callable[[int, float | None, float], None]
"""Called on the first signal with (jobs in flight, earliest retention deadline, grace seconds)."""


async def run(
    config: RunConfig,
    *,
    on_tick: Progress | None = None,
    on_interrupt: Interrupted | None = None,
) -> RunOutcome:
    """Run the jobs of `config` to completion (or a stop), resuming by default."""
    if config.jobs is None and (config.jobs_path is None or not config.jobs_path.is_file()):
        raise ConfigError(f"jobs file {config.jobs_path} not found")
    journal_path = journal_path_for(config.output_path) if config.journal else None
    if config.restart:
        existing = ExistingResults()
        journaled: dict[str, JournalRecord] = {}
    else:
        existing = load_results(config.output_path)
        journaled = load_journal(journal_path, existing.done)[0] if journal_path else {}
        if journaled:
            check_jobs_unchanged(config, journaled, existing)

    clock = LoopClock()
    rng = random.Random(config.seed)
    stats = RunStats()
    in_flight_cost = InFlightCost()

    def on_result(line: dict[str, Any]) -> None:
        stats.count_result(line)
        in_flight_cost.finish(line["custom_id"])
        if config.on_result is not None:
            config.on_result(line)

    writer = Writer(config.output_path, journal_path, on_result=on_result)
    writer.open(truncate=config.restart)
    budget = RateBudget(config.rpm, config.polls_count, clock, rng)
    latency = LatencyModel(prior_s=config.latency_prior_s)
    fixed_limit = config.max_in_flight
    limit = fixed_limit or default_max_in_flight(
        config.rpm, latency.quantile(0.9), budget.polls_count
    )
    try:
        async with make_session(config.http) as session:
            ctx = RunContext(
                client=SegmindClient(session, config.base_url, config.api_key),
                budget=budget,
                writer=writer,
                clock=clock,
                stats=stats,
                jobs_dir=config.image_dir(),
                retry=config.retry,
                latency=latency,
                schedule=config.schedule,
                in_flight=anyio.CapacityLimiter(limit),
                rng=rng,
                retention_s=config.retention_s,
                price_in=config.price_in,
                price_out=config.price_out,
                cost_in_flight=in_flight_cost,
                cache=ResponseCache(config.cache_dir, config.cache_max_age_s)
                if config.cache_dir is not None
                else None,
            )
            submitter = Submitter(ctx)
            poller = Poller(ctx, submitter)
            if on_interrupt is not None:
                ctx.on_interrupt = lambda: on_interrupt(
                    poller.tracked_count, poller.earliest_deadline(), config.grace_s
                )
            with anyio.CancelScope() as run_scope:
                ctx.run_scope = run_scope
                async with anyio.create_task_group() as services:
                    services.start_soon(writer.run)
                    services.start_soon(
                        _tick, ctx, poller, on_tick, fixed_limit is None, config.should_stop
                    )
                    if config.handle_signals:
                        services.start_soon(_watch_signals, ctx, config.grace_s)
                    await _pipeline(ctx, config, submitter, poller, existing, journaled)
                    services.cancel_scope.cancel()
            if on_tick is not None:
                on_tick(ctx, poller)
    finally:
        await writer.aclose()
    total = Counter(existing.by_type)
    total.update(stats.results)
    return RunOutcome(
        stats=stats,
        previous=existing.by_type,
        fatal_message=ctx.fatal_message,
        interrupted=ctx.interrupted,
        unfinished=stats.in_flight,
        total_results=total,
        cost_capped=ctx.cost_capped,
        spent_usd=ctx.spent_usd(),
    )


async def _pipeline(
    ctx: RunContext,
    config: RunConfig,
    submitter: Submitter,
    poller: Poller,
    existing: ExistingResults,
    journaled: dict[str, JournalRecord],
) -> None:
    send, receive = anyio.create_memory_object_stream[tuple[Job, object, int]](SUBMIT_WORKERS)
    async with anyio.create_task_group() as pipeline:
        pipeline.start_soon(poller.run)
        async with anyio.create_task_group() as intake:
            intake.start_soon(_read, ctx, config, send, poller, existing, journaled)
            for _ in range(SUBMIT_WORKERS):
                intake.start_soon(run_submit_worker, submitter, receive.clone(), poller.add)
            receive.close()
        poller.close_intake()


async def _read(
    ctx: RunContext,
    config: RunConfig,
    send: ObjectSendStream[tuple[Job, object, int]],
    poller: Poller,
    existing: ExistingResults,
    journaled: dict[str, JournalRecord],
) -> None:
    """Reader stage: skip finished jobs, re-poll journaled ones, queue the rest."""
    async with send:
        with anyio.CancelScope() as scope:
            ctx.reader_scope = scope
            if ctx.stop_intake.is_set():
                return
            for count, item in enumerate(config.job_source()()):
                if count % 256 == 0:
                    await anyio.lowlevel.checkpoint()
                ctx.stats.jobs_read += 1
                if item.custom_id in existing.done:
                    ctx.stats.skipped_done += 1
                    continue
                borrower = object()
                # Waiting here is the backpressure: memory is bounded by the
                # jobs in flight, not by the size of the file.
                await ctx.in_flight.acquire_on_behalf_of(borrower)
                if isinstance(item, InvalidJob):
                    ctx.writer.write_result(
                        result_line(
                            item.custom_id,
                            errored("invalid_job", item.message, None, line=item.line),
                            finished_at=ctx.clock(),
                        )
                    )
                    ctx.in_flight.release_on_behalf_of(borrower)
                    continue
                record = journaled.get(item.custom_id)
                if record is not None and is_collectable(
                    record.submitted_at,
                    ctx.clock(),
                    retention_s=config.retention_s,
                    margin_s=config.retention_margin_s,
                ):
                    poller.add(_tracked_from_journal(item, record, borrower), resumed=True)
                    continue
                if config.max_cost_usd is not None and not await _within_budget(ctx, config, item):
                    ctx.in_flight.release_on_behalf_of(borrower)
                    return
                submission = record.attempt + 1 if record is not None else 1
                await send.send((item, borrower, submission))


async def _within_budget(ctx: RunContext, config: RunConfig, job: Job) -> bool:
    """The cost cap: spent (real usage) + in-flight estimates + this job <= max_cost_usd.

    On reaching the cap, intake stops; in-flight jobs finish, the run exits 1,
    and a resume with a higher cap carries on.
    """
    assert config.max_cost_usd is not None
    try:
        input_tokens, _ = await run_blocking(estimate_job_tokens, job, ctx.jobs_dir)
    except ImageError:
        return True  # the submit path records it as invalid_job, at no cost
    estimate = cost_usd(
        input_tokens,
        output_tokens_for(job, config.output_tokens_per_job),
        config.price_in,
        config.price_out,
    )
    committed = ctx.spent_usd() + ctx.cost_in_flight.total
    if committed + estimate > config.max_cost_usd:
        ctx.cost_capped = True
        ctx.stop_submitting()
        return False
    ctx.cost_in_flight.add(job.custom_id, estimate)
    return True


def _tracked_from_journal(job: Job, record: JournalRecord, borrower: object) -> Tracked:
    return Tracked(
        job=job,
        request_id=record.request_id,
        submitted_at=record.submitted_at,
        submission=record.attempt,
        http_attempts=record.attempt,
        borrower=borrower,
        status_url=record.status_url,
        response_url=record.response_url,
    )


def check_jobs_unchanged(
    config: RunConfig, journaled: dict[str, JournalRecord], existing: ExistingResults
) -> None:
    """Refuse to mix results of two different jobs files under one custom_id."""
    changed: list[str] = []
    for item in _valid_jobs(config.job_source()()):
        record = journaled.get(item.custom_id)
        if record is not None and record.fingerprint != item.fingerprint:
            changed.append(f"{item.custom_id} (line {item.line})")
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        raise JobsChangedError(
            f"{len(changed)} job(s) changed since the results in {config.output_path} were "
            f"started: {shown}. Use --restart to start afresh or -o to write elsewhere."
        )


def _valid_jobs(items: Iterable[Job | InvalidJob]) -> Iterator[Job]:
    return (item for item in items if isinstance(item, Job))


async def _tick(
    ctx: RunContext,
    poller: Poller,
    on_tick: Progress | None,
    adapt: bool,
    should_stop: Callable[[], bool] | None,
) -> None:
    """Refresh the progress display and re-derive max-in-flight from learned latency."""
    while True:
        await anyio.sleep(0.5)
        if should_stop is not None and should_stop():
            ctx.abort_run()
        if adapt and ctx.latency.count >= 8:
            ctx.in_flight.total_tokens = default_max_in_flight(
                ctx.budget.effective_rpm, ctx.latency.quantile(0.9), ctx.budget.polls_count
            )
        if on_tick is not None:
            on_tick(ctx, poller)


async def _watch_signals(ctx: RunContext, grace_s: float) -> None:
    """First SIGINT/SIGTERM: stop intake, collect in-flight results for a grace
    period. Second: stop at once (the writer still flushes, shielded)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if ctx.interrupted:
                if ctx.run_scope is not None:
                    ctx.run_scope.cancel()
                return
            ctx.interrupted = True
            ctx.stop_submitting()
            if ctx.on_interrupt is not None:
                ctx.on_interrupt()
            ctx.grace_deadline = anyio.current_time() + grace_s
            if ctx.run_scope is not None:
                ctx.run_scope.deadline = ctx.grace_deadline
