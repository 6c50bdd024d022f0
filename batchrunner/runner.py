"""One run: wires reader -> submit pool -> poller set -> writer in one anyio task group."""

from __future__ import annotations

import math
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from yarl import URL

from batchrunner import interrupts
from batchrunner.api import ApiKey, HttpSettings, SegmindClient, make_session
from batchrunner.breaker import CircuitBreaker
from batchrunner.budget import Budget, FreePollsEvidence, PollsCount, RateBudget
from batchrunner.cache import ResponseCache
from batchrunner.context import CostLedger, LoopClock, RunContext, RunStats, SharedLimits, Spend
from batchrunner.display import rerun_lines
from batchrunner.errors import ConfigError, ResultsFileError
from batchrunner.estimate import DEFAULT_OUTPUT_TOKENS_PER_JOB
from batchrunner.fetch import ImageFetcher
from batchrunner.handoff import Handoff
from batchrunner.journal import JournalRecord, journal_path_for, load_journal
from batchrunner.policy import (
    MAX_OUTAGE_S,
    MAX_RETRY_AFTER_S,
    RETENTION_MARGIN_S,
    RETENTION_S,
    RetryPolicy,
)
from batchrunner.poller import Poller
from batchrunner.price import DEFAULT_PRICE_IN, DEFAULT_PRICE_OUT, PriceList
from batchrunner.reader import InvalidJob, Job, JobsFileChanged, read_jobs
from batchrunner.rerun import Decision, Do, Window, decide, same_request
from batchrunner.results import errored, result_line
from batchrunner.resultsfile import PriorResults, load_prior
from batchrunner.schedule import MODEL_PAGE_LATENCY_S, LatencyModel, PollSchedule
from batchrunner.stop import Level, Reason, Stop, StopController
from batchrunner.submitter import (
    Submission,
    Submitter,
    Tracked,
    release_if_held,
    run_submit_worker,
)
from batchrunner.threads import run_blocking
from batchrunner.writer import OutputLock, Writer, describe_os_error

SUBMIT_WORKERS = 16

TICK_S = 0.5
"""How often `_tick` looks at time-driven stops, re-derives the in-flight limit
and shows progress. A named duration, so that a time-scaled simulator run
(benchmarks/budget_clients.py scales every *_S constant) ticks as often in
model time as a real run does: at 0.05 a literal half second was ten model
seconds, and the in-flight limit and `FreePollsEvidence` moved 20x slower
than in a real run."""


JobSource = Callable[[], Iterable[Job | InvalidJob]]
"""Makes a fresh iterator over the jobs each call."""


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
    retry_errored: bool = False
    """Also re-run jobs whose result is a final error (inference_failed, invalid_request)."""
    journal: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    schedule: PollSchedule | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    retention_s: float = RETENTION_S
    retention_margin_s: float = RETENTION_MARGIN_S
    grace_s: float = 60.0
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    max_outage_s: float = MAX_OUTAGE_S
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
    """Stop submitting once the file's spend + in-flight estimates would pass this (exit 1)."""
    price_in: float = DEFAULT_PRICE_IN
    price_out: float = DEFAULT_PRICE_OUT
    output_tokens_per_job: int = DEFAULT_OUTPUT_TOKENS_PER_JOB
    cache_dir: Path | None = None
    """Opt-in response cache (see batchrunner.cache)."""
    cache_max_age_s: float | None = None
    jobs_dir: Path | None = None
    """Folder that relative image paths are resolved against (default: the jobs file's)."""
    shared: SharedLimits | None = None
    """The rate budget and cost ledger come from here when they are shared with
    other runs (the Ray engine's shards); None: this run's own."""

    def scale_time(self, time_scale: float) -> None:
        """Fit a simulator whose clock runs 1/time_scale times faster than the
        model's (`--simulate`): the retention hour, the latency prior and the
        request budget follow its clock, since its rate window is a scaled
        minute. Scaling only time left the rate at real speed: the README's
        first command took 32 s for 27 jobs instead of a few."""
        self.retention_s = RETENTION_S * time_scale
        self.retention_margin_s = min(RETENTION_MARGIN_S, self.retention_s / 30)
        self.latency_prior_s *= time_scale
        self.rpm /= time_scale

    def job_source(self) -> JobSource:
        if self.jobs is not None:
            return self.jobs
        path = self.jobs_path
        if path is None:
            raise ConfigError("no jobs: give a jobs file or a job source")
        return lambda: read_jobs(path, self.model, watch=True)

    def image_dir(self) -> Path:
        if self.jobs_dir is not None:
            return self.jobs_dir
        return self.jobs_path.parent if self.jobs_path is not None else Path.cwd()

    def check(self) -> None:
        """Everything that can be wrong with the configuration, before any file is touched."""
        origin = URL(self.base_url)
        if origin.scheme not in ("http", "https") or not origin.host:
            raise ConfigError(
                f"--base-url must look like https://host[:port], got {self.base_url!r}"
            )
        if self.jobs is None:
            if self.jobs_path is None:
                raise ConfigError("no jobs: give a jobs file or a job source")
            if not self.jobs_path.is_file():
                what = "is a folder" if self.jobs_path.is_dir() else "not found"
                raise ConfigError(f"jobs file {self.jobs_path} {what}")
        for path, what in (
            (self.output_path, "results file"),
            (journal_path_for(self.output_path), "journal"),
        ):
            if path.is_dir():
                raise ConfigError(f"{what} {path} is a folder; give a file with -o")
        if self.cache_dir is not None and self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise ConfigError(f"--cache {self.cache_dir} is not a folder")


@dataclass(slots=True)
class RunOutcome:
    stats: RunStats
    stop: Stop | None
    exit_code: int
    in_file: Counter[str]
    """Result types of the current input's jobs in the results file."""
    unfinished: int
    """Jobs in flight when the run ended (resumable)."""
    spent_usd: float = 0.0
    unknown_models: tuple[str, ...] = ()
    moved_to_history: int = 0
    submits_abandoned: int = 0

    @property
    def fatal_message(self) -> str | None:
        """Why the API refused to go on (exit 3), if it did."""
        if self.stop is not None and self.stop.reason in (
            Reason.ACCOUNT,
            Reason.RETRY_AFTER,
            Reason.OUTAGE,
        ):
            return self.stop.message or self.stop.reason.value
        return None

    @property
    def interrupted(self) -> bool:
        return self.stop is not None and self.stop.reason in (Reason.INTERRUPTED, Reason.CALLER)

    @property
    def cost_capped(self) -> bool:
        return self.stop is not None and self.stop.reason is Reason.COST_CAP


def default_max_in_flight(
    rpm: float, latency_p90_s: float, polls_count: bool, *, polls_known: bool = True
) -> float:
    """Little's law: in flight = throughput x time in the system, with headroom.

    A fraction: `InFlightDither` turns it into whole limits that average it.
    At 50 rpm with polls counting one job more in flight is 3.6 s more
    detection delay for every job, and whole numbers were too coarse: 7 gave
    0.96 of R/3 and detection p95 1.4 mean latencies, 8 gave 0.986 and 1.97
    (bench_budget.py scenario 1, `auto`, seed 9).

    Throughput is rpm/3 jobs per minute when polls count (submit, status,
    result), rpm when they do not. When polls count the budget is the
    bottleneck, and submits take a token before a poll that is not urgent:
    every job in flight beyond throughput x latency only waits, finished, for
    a poll token (detection delay = in flight / throughput - latency, and no
    more goodput); too few leave tokens unused. So a small headroom on the
    p90 there, 1.1 (plus 2 for the submit and the fetch): bench_budget.py
    scenario 1, seeds 7 to 9, 0.972 to 0.987 of R/3 and detection p50 0.84
    to 1.12 mean latencies; 1.0 gave p50 0.89 to 1.00 but 0.964 at one seed,
    1.3 (before `WindowLog` ended the rate cuts of 2 to 3 429s a run) p50 up
    to 1.47. `benchmarks/poll_order_frontier.py` models the trade. While
    `auto` does not know yet whether polls count (`polls_known` False; it
    sizes as if they did), 1.3: in a run where they turn out free, 1.1 in
    that first phase left detection p95 at 0.156 mean latencies where 1.3
    gave 0.129 (scenario 2, seed 8). When polls are free, latency is the
    bottleneck and a generous headroom keeps the submit budget busy through
    latency spikes. Capped so that every in-flight request can still be
    fetched inside the retention hour at the request budget.
    """
    jobs_per_s = rpm / 60.0 / (3.0 if polls_count else 1.0)
    if not polls_count:
        headroom = 2.0
    else:
        headroom = 1.1 if polls_known else 1.3
    wanted = headroom * jobs_per_s * latency_p90_s + 2
    retention_cap = max(4, int(rpm * 60 / 2))
    return max(4.0, min(wanted, retention_cap, 10_000))


class InFlightDither:
    """Whole in-flight limits whose running average is a fractional target
    (error diffusion): 7.5 is 7, 8, 7, 8, ..."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = 0.0

    def next(self, target: float) -> int:
        whole = math.floor(target)
        self._carry += target - whole
        if self._carry >= 1.0:
            self._carry -= 1.0
            return whole + 1
        return whole


Progress = Callable[[RunContext, Poller], None]
StopNotice = Callable[[str], None]
"""Called with a line to show the user when the run starts to stop (signals, outages)."""


async def run(
    config: RunConfig,
    *,
    on_tick: Progress | None = None,
    on_notice: StopNotice | None = None,
    signals_before_start: Callable[[], int] | None = None,
) -> RunOutcome:
    """Run the jobs of `config` to completion (or a stop), resuming by default.

    Holds the output's lock for the whole run; raises ConfigError (another run
    holds it, a file that cannot be read or created) before any job starts.
    """
    config.check()
    lock = OutputLock(config.output_path)
    lock.acquire()
    try:
        return await _run_locked(config, on_tick, on_notice or _ignore, signals_before_start)
    finally:
        lock.release()


def _ignore(_: str) -> None:
    pass


async def _run_locked(
    config: RunConfig,
    on_tick: Progress | None,
    notice: StopNotice,
    signals_before_start: Callable[[], int] | None,
) -> RunOutcome:
    clock = LoopClock()
    prior, journaled = _load_state(config)
    stop = StopController()
    rng = random.Random(config.seed)
    stats = RunStats()
    prices = PriceList(config.price_in, config.price_out)
    spent = prices.cost_usd(prior.input_tokens, prior.output_tokens)
    spend: CostLedger
    if config.shared is not None:
        spend = config.shared.ledger(prices, config.max_cost_usd, spent)
    else:
        spend = Spend(prices, config.max_cost_usd, spent)
    replaced = 0

    def on_result(line: dict[str, Any]) -> None:
        nonlocal replaced
        stats.count_result(line)
        spend.finished(line)
        replaced += prior.mark_replaced(line["custom_id"])
        if config.on_result is not None:
            config.on_result(line)

    writer = Writer(
        config.output_path,
        journal_path_for(config.output_path) if config.journal else None,
        on_result=on_result,
        on_failure=lambda message: stop.stop_now(Reason.FILE_ERROR, message),
    )
    _open(writer, prior, config.restart, clock())
    if config.restart:
        prior, journaled = PriorResults(), {}
    intake = _Intake()
    try:
        async with (
            make_session(config.http, config.api_key) as session,
            ImageFetcher(rng=rng) as fetcher,
        ):
            ctx = make_context(
                config,
                session,
                fetcher,
                writer=writer,
                stop=stop,
                stats=stats,
                spend=spend,
                clock=clock,
                rng=rng,
            )
            poller: Poller
            submitter = Submitter(ctx, lambda tracked: poller.add(tracked))
            poller = Poller(ctx, submitter)
            async with run_services(
                ctx, config, poller, on_tick, notice, signals_before_start=signals_before_start
            ):
                with stop.scope(Level.COLLECT):
                    await _pipeline(ctx, config, submitter, poller, prior, journaled, intake)
    finally:
        await writer.aclose()
    moved = 0
    if writer.failure is None and (
        prior.duplicates or replaced or (intake.complete and prior.not_in_input())
    ):
        moved = await _rewrite(writer, prior, intake.complete, clock())
    in_file = prior.outcomes_in_input()
    in_file.update(stats.results)
    in_file.subtract(writer.unwritten)  # a write failure: those lines are not in the file
    all_succeeded = intake.complete and not any(
        n for kind, n in in_file.items() if kind != "succeeded"
    )
    return RunOutcome(
        stats=stats,
        stop=stop.stop,
        exit_code=stop.exit_code(all_succeeded=all_succeeded),
        in_file=in_file,
        unfinished=stats.in_flight,
        spent_usd=spend.spent_usd,
        unknown_models=tuple(sorted(submitter.unknown_models)),
        moved_to_history=moved,
        submits_abandoned=stop.abandoned,
    )


def make_context(
    config: RunConfig,
    session: aiohttp.ClientSession,
    fetcher: ImageFetcher,
    *,
    writer: Writer,
    stop: StopController,
    stats: RunStats,
    spend: CostLedger,
    clock: LoopClock,
    rng: random.Random,
) -> RunContext:
    """The shared parts of a run (or of `serve`): one budget, breaker, latency
    model and in-flight limit for everything that goes through them."""
    budget: Budget
    if config.shared is not None:
        budget = config.shared.budget(config.rpm, config.polls_count, clock)
    else:
        budget = RateBudget(config.rpm, config.polls_count, clock, rng)
    latency = LatencyModel(prior_s=config.latency_prior_s)
    # `auto` sizes as if polls count until it has seen that they do not
    # (FreePollsEvidence): cheap when they are free, and no pile-up when they count.
    limit = config.max_in_flight or math.ceil(
        default_max_in_flight(
            config.rpm,
            latency.quantile(0.9),
            config.polls_count is not PollsCount.NO,
            polls_known=config.polls_count is PollsCount.YES,
        )
    )
    return RunContext(
        client=SegmindClient(session, config.base_url),
        budget=budget,
        breaker=CircuitBreaker(clock, rng),
        stop=stop,
        writer=writer,
        clock=clock,
        stats=stats,
        spend=spend,
        jobs_dir=config.image_dir(),
        retry=config.retry,
        latency=latency,
        schedule=config.schedule,
        in_flight=anyio.CapacityLimiter(limit),
        rng=rng,
        fetcher=fetcher,
        retention_s=config.retention_s,
        max_retry_after_s=config.max_retry_after_s,
        cache=ResponseCache(config.cache_dir, config.cache_max_age_s)
        if config.cache_dir is not None
        else None,
        output_tokens_per_job=config.output_tokens_per_job,
    )


@asynccontextmanager
async def run_services(
    ctx: RunContext,
    config: RunConfig,
    poller: Poller,
    on_tick: Progress | None,
    notice: StopNotice,
    *,
    signals_before_start: Callable[[], int] | None = None,
) -> AsyncIterator[None]:
    """The services around a pipeline, for the block's duration: the writer,
    the twice-a-second tick (grace, outage, in-flight limit, progress) and,
    with `config.handle_signals`, the signal watcher.

    They run outside the block's COLLECT scope: a stop must not silence the
    signal watcher while submits are in the air (a third Ctrl-C abandons them).
    """
    async with anyio.create_task_group() as services:
        services.start_soon(ctx.writer.run)
        services.start_soon(
            _tick, ctx, config, poller, on_tick, notice, config.max_in_flight is None
        )
        if config.handle_signals:
            services.start_soon(
                _watch_signals, ctx, config.grace_s, poller, notice, signals_before_start
            )
        yield
        services.cancel_scope.cancel()
    if config.handle_signals:
        interrupts.record()  # the final flush and rewrite: a signal is not a kill
    if on_tick is not None:
        on_tick(ctx, poller)


@dataclass(slots=True)
class _Intake:
    complete: bool = False
    """The reader saw every job of the input (so a line of a job it did not see is an orphan)."""


def _load_state(
    config: RunConfig, *, repair: bool = True
) -> tuple[PriorResults, dict[str, JournalRecord]]:
    """What earlier runs left: the results file's lines and the journal's records
    (torn tails repaired unless `repair` is off), keeping only records a rerun may use."""
    journal_path = journal_path_for(config.output_path)
    try:
        prior = load_prior(config.output_path, repair=repair)
        if config.restart or not config.journal:
            return prior, {}

        def worth_keeping(record: JournalRecord) -> bool:
            # A record whose job's result line already answers its request is never needed.
            line = prior.get(record.custom_id)
            return (
                line is None
                or line.outcome != "succeeded"
                or not same_request(line, record.fingerprint)
            )

        return prior, load_journal(journal_path, worth_keeping, repair=repair)
    except OSError as exc:
        path = Path(exc.filename) if exc.filename else config.output_path
        raise ConfigError(describe_os_error(path, exc, "read")) from None


def _open(writer: Writer, prior: PriorResults, restart: bool, now: float) -> None:
    """Open the files for appending. With --restart the earlier lines move to the
    history file first, and the journal starts empty."""
    try:
        if restart and len(prior):
            writer.rewrite(lambda _: False, now, why_dropped="--restart")
    except OSError as exc:
        raise ConfigError(describe_os_error(writer.results_path, exc, "rewrite")) from None
    writer.open(truncate=restart)


async def _rewrite(writer: Writer, prior: PriorResults, intake_complete: bool, now: float) -> int:
    """One line per job of the input; the rest to history (see Writer.rewrite)."""

    def in_input(custom_id: str) -> bool:
        return not intake_complete or prior.in_input(custom_id)

    try:
        return await run_blocking(writer.rewrite, in_input, now)
    except OSError as exc:
        raise ResultsFileError(describe_os_error(writer.results_path, exc, "rewrite")) from None


async def _pipeline(
    ctx: RunContext,
    config: RunConfig,
    submitter: Submitter,
    poller: Poller,
    prior: PriorResults,
    journaled: dict[str, JournalRecord],
    intake: _Intake,
) -> None:
    submissions: Handoff[Submission] = Handoff(SUBMIT_WORKERS, SUBMIT_WORKERS)
    async with anyio.create_task_group() as pipeline:
        pipeline.start_soon(poller.run)
        with ctx.stop.scope(Level.INTAKE):
            async with anyio.create_task_group() as workers:
                for _ in range(SUBMIT_WORKERS):
                    workers.start_soon(run_submit_worker, submitter, submissions)
                await _read(ctx, config, submissions, poller, prior, journaled, intake)
                await submissions.close()
        poller.close_intake()


async def _read(
    ctx: RunContext,
    config: RunConfig,
    submissions: Handoff[Submission],
    poller: Poller,
    prior: PriorResults,
    journaled: dict[str, JournalRecord],
    intake: _Intake,
) -> None:
    """Reader stage: for each job, what earlier runs left decides (see `rerun`):
    skip it, write its invalid_job line, re-poll its journaled request, or submit it."""
    window = Window(config.retention_s, config.retention_margin_s)
    stats = ctx.stats
    try:
        for count, item in enumerate(config.job_source()()):
            if count % 256 == 0:
                await anyio.lowlevel.checkpoint()
            stats.jobs_read += 1
            decision, record = _decide(item, prior, journaled, ctx.clock(), window, config)
            stats.count_decision(decision, prior.get(item.custom_id))
            if decision.do is Do.SKIP:
                continue
            borrower = object()
            # Waiting here is the backpressure: memory is bounded by the
            # jobs in flight, not by the size of the file.
            try:  # a free slot needs no trip through the event loop
                ctx.in_flight.acquire_on_behalf_of_nowait(borrower)
            except anyio.WouldBlock:
                await ctx.in_flight.acquire_on_behalf_of(borrower)
            if isinstance(item, InvalidJob):
                _write_invalid(ctx, item)
                ctx.in_flight.release_on_behalf_of(borrower)
            elif decision.do is Do.REPOLL:
                assert decision.record is not None
                poller.add(tracked_from_journal(item, decision.record, borrower), resumed=True)
            else:
                attempt = record.attempt + 1 if record is not None else 1
                try:
                    await submissions.put(Submission(item, borrower, attempt=attempt))
                except BaseException:
                    release_if_held(ctx, borrower)  # cancelled: no worker has it
                    raise
        intake.complete = True
    except JobsFileChanged as exc:
        ctx.stop.drain(Reason.JOBS_CHANGED, str(exc))


def _decide(
    item: Job | InvalidJob,
    prior: PriorResults,
    journaled: dict[str, JournalRecord],
    now: float,
    window: Window,
    config: RunConfig,
) -> tuple[Decision, JournalRecord | None]:
    """What to do with one job of the input (see `rerun`), and its journal record."""
    prior.mark_seen(item.custom_id)
    record = journaled.pop(item.custom_id, None)
    decision = decide(
        valid=isinstance(item, Job),
        fingerprint=item.fingerprint,
        prior=prior.get(item.custom_id),
        record=record,
        now=now,
        window=window,
        retry_errored=config.retry_errored,
    )
    return decision, record


def plan_notes(config: RunConfig, now: float) -> list[str]:
    """What running `config` would do with the jobs earlier runs left results or
    journaled requests for, in words (for --dry-run; reads, changes nothing)."""
    if config.restart:
        return [f"--restart: every job is paid again; {config.output_path} moves to history"]
    if not config.output_path.is_file() and not journal_path_for(config.output_path).is_file():
        return []
    prior, journaled = _load_state(config, repair=False)
    window = Window(config.retention_s, config.retention_margin_s)
    stats = RunStats()
    collect = new = 0
    for item in config.job_source()():
        decision, _ = _decide(item, prior, journaled, now, window, config)
        stats.count_decision(decision, prior.get(item.custom_id))
        collect += decision.do is Do.REPOLL
        new += decision.do is not Do.SKIP and decision.why is None
    notes = [
        f"{config.output_path}: {stats.skipped_done:,} job(s) done, skipped",
        *rerun_lines(stats.rerun, stats.errored_kept),
        f"{new:,} job(s) never run before",
    ]
    if collect:
        notes.append(f"{collect:,} journaled request(s) collected without paying again")
    if prior.not_in_input():
        notes.append(
            f"{prior.not_in_input():,} result line(s) of jobs no longer in the input move "
            "to the history file"
        )
    return notes


def _write_invalid(ctx: RunContext, item: InvalidJob) -> None:
    ctx.writer.write_result(
        result_line(
            item.custom_id,
            errored("invalid_job", item.message, None, line=item.line),
            finished_at=ctx.clock(),
            fingerprint=item.fingerprint,
        )
    )


def tracked_from_journal(job: Job, record: JournalRecord, borrower: object) -> Tracked:
    """A journaled request to poll again instead of paying for it again."""
    return Tracked(
        job=job,
        request_id=record.request_id,
        submitted_at=record.submitted_at,
        attempt=record.attempt,
        http_attempts=record.attempt,
        borrower=borrower,
        status_url=record.status_url,
        response_url=record.response_url,
    )


async def _tick(
    ctx: RunContext,
    config: RunConfig,
    poller: Poller,
    on_tick: Progress | None,
    notice: StopNotice,
    adapt: bool,
) -> None:
    """Every TICK_S: the stops that come from time (grace, outage, the caller),
    the in-flight limit re-derived from learned latency, the progress display."""
    outage = _OutageNotices(notice)
    free_polls = FreePollsEvidence(ctx.budget.rpm)
    dither = InFlightDither()
    while True:
        await anyio.sleep(TICK_S)
        now = ctx.clock()
        if ctx.stop.check_grace(anyio.current_time()):
            notice(_stopping_now(ctx, "the grace period is over"))
        if config.should_stop is not None and config.should_stop():
            ctx.stop.stop_now(Reason.CALLER)
        outage.update(ctx.breaker, now)
        opened_at = ctx.breaker.opened_at
        if (
            opened_at is not None
            and now - opened_at > config.max_outage_s
            and poller.collectable(now) == 0
        ):
            ctx.stop.stop_now(
                Reason.OUTAGE,
                f"the API has been unreachable since {_local_time(opened_at)} (over "
                f"--max-outage {config.max_outage_s:g} s) and nothing is left to collect; "
                "run the same command again to resume",
            )
        polls_count = polls_known = ctx.budget.polls_count
        if not polls_count and config.polls_count is PollsCount.AUTO:
            polls_count = not free_polls.proven(now, ctx.stats.requests.total())
        if adapt and ctx.latency.count >= 8:
            ctx.in_flight.total_tokens = dither.next(
                default_max_in_flight(
                    ctx.budget.effective_rpm,
                    ctx.latency.quantile(0.9),
                    polls_count,
                    polls_known=polls_known,
                )
            )
        if on_tick is not None:
            on_tick(ctx, poller)


class _OutageNotices:
    """One line when the API becomes unreachable and one when it answers again:
    an overnight log shows the outage even without the live display."""

    __slots__ = ("_notice", "_since")

    def __init__(self, notice: StopNotice) -> None:
        self._notice = notice
        self._since: float | None = None

    def update(self, breaker: CircuitBreaker, now: float) -> None:
        if breaker.opened_at is not None and self._since is None:
            self._since = breaker.opened_at
            self._notice(
                f"the API is unreachable since {_local_time(breaker.opened_at)} (most recent "
                "requests failed: refused or dropped connections, 5xx, timeouts); waiting, "
                "with one try at a time; no job is charged a retry for it"
            )
        elif breaker.opened_at is None and self._since is not None:
            self._notice(f"the API answers again, after {now - self._since:,.0f} s")
            self._since = None


def _count(n: int, noun: str) -> str:
    """'1 submit', '3 submits': messages that tests and people grep read naturally."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _local_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


async def _watch_signals(
    ctx: RunContext,
    grace_s: float,
    poller: Poller,
    notice: StopNotice,
    early: Callable[[], int] | None,
) -> None:
    """Each SIGINT/SIGTERM takes the stop one step further (StopController.interrupt).
    `early` tells how many arrived before the run listened (counted once it does)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        for _ in range(early() if early is not None else 0):
            notice(_interrupted(ctx, grace_s, poller))
        async for _ in signals:
            notice(_interrupted(ctx, grace_s, poller))


def _interrupted(ctx: RunContext, grace_s: float, poller: Poller) -> str:
    """Move the stop one step and say what that step means."""
    step = ctx.stop.interrupt(grace_s, anyio.current_time())
    in_air = ctx.stop.submits_in_air
    if step == 1:
        in_flight = poller.tracked_count
        deadline = poller.earliest_deadline()
        air = f" and {_count(in_air, 'submit')} in the air" if in_air else ""
        if not in_flight or deadline is None:
            if not in_air:
                return "stopping: no new submits, nothing in flight."
            return (
                f"stopping: no new submits; waiting for {_count(in_air, 'submit')} in the air "
                f"(at most {ctx.client.timeout_s:g} s), then collecting for up to {grace_s:g} s. "
                "Ctrl-C again to stop now."
            )
        return (
            f"stopping: no new submits; {_count(in_flight, 'job')} in flight{air}, collecting "
            f"them for up to {grace_s:g} s. They stay collectable by a resume until "
            f"{_local_time(deadline)} (after that they must be paid for again). Ctrl-C again "
            "to stop now."
        )
    if step == 2:
        return _stopping_now(ctx, "stopping now")
    if ctx.stop.abandoned:
        return (
            f"abandoned {_count(ctx.stop.abandoned, 'submit')} in the air: if the API "
            "accepted them, a resume pays for them again."
        )
    return "stopping now."


def _stopping_now(ctx: RunContext, why: str) -> str:
    """What stopping now means while submits are in the air: they finish first."""
    in_air = ctx.stop.submits_in_air
    if not in_air:
        return f"{why}."
    return (
        f"{why}: waiting for {_count(in_air, 'submit')} in the air (at most "
        f"{ctx.client.timeout_s:g} s), so that the journal knows them. Ctrl-C again to "
        "abandon them."
    )
