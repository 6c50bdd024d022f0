"""`--engine ray`: one runner per shard on a Ray cluster, under one cluster-wide budget.

The only module that imports Ray (`pip install 'batchrunner[ray]'`).

- The driver (the `batchrunner` process) plans the shards (batchrunner.shards),
  starts one named actor, `BudgetActor`, and keeps `--workers` shards running
  as Ray tasks; each finished part is merged into the results file at once.
- Each task runs the ordinary runner on its shard, with its own results part
  and journal under `RESULTS.parts/`: a rerun of the task (Ray retries it when
  its worker dies, or the next driver starts it) is a resume, so re-polls its
  journaled requests instead of paying for them again.
- The runner takes its budget and cost ledger from `RayLimits`: proxies whose
  every wait is a call to the actor. The actor holds the one `RateBudget` and
  `Spend` of the cluster: slots are granted one at a time when due (never
  reserved ahead), so a 429 anywhere starts a cool-down that the next grant,
  for any worker, waits out; the priority classes order waiters of every
  worker together; the learned polls-count state, the AIMD rate and the
  --max-cost spend are the cluster's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import orjson
import ray

from batchrunner import interrupts
from batchrunner.budget import PollsCount, RateBudget
from batchrunner.context import CostLedger, LoopClock, Spend
from batchrunner.display import hms
from batchrunner.errors import ConfigError
from batchrunner.price import PriceList, usage_tokens
from batchrunner.resultsfile import load_prior
from batchrunner.runner import RunConfig, RunOutcome, run
from batchrunner.shards import (
    DEFAULT_SHARD_SIZE,
    PLAN_FILE,
    PartsMerger,
    Shard,
    ShardedSource,
    part_path,
    parts_dir_for,
)
from batchrunner.writer import OutputLock, OutputLockedError

NAMESPACE = "batchrunner"
ACTOR_CONCURRENCY = 100_000
"""Waiters the actor holds at once: every submit worker and every poll of every
shard may wait for a slot (an async actor's waiters cost a coroutine each)."""
LOCK_WAIT_S = 60.0
"""A shard's part may still be locked by the process of an attempt that Ray
has just declared dead (or of a killed driver's task): wait for it this long."""
REPORT_EVERY_S = 0.5
EXIT_INTERRUPTED = 130


def actor_name(output: Path) -> str:
    """One budget actor per results file (a second driver on it is refused by its lock)."""
    digest = hashlib.blake2b(str(output.resolve()).encode(), digest_size=8).hexdigest()
    return f"budget-{digest}"


# --------------------------------------------------------------------------- the actor


@ray.remote(num_cpus=0)  # it waits; a CPU reserved for it would starve the shards on 2 cores
class BudgetActor:
    """Everything budget-wide of the cluster, behind one async actor."""

    def __init__(
        self,
        rpm: float,
        polls_count: str,
        cap_usd: float | None,
        prices: tuple[float, float],
        merged_usd: float,
    ) -> None:
        self.budget = RateBudget(rpm, PollsCount(polls_count), time.time)
        # What the shards merged before this run spent: they do not run again,
        # and the cap is on the whole results file, as a local run's.
        self.spend = Spend(PriceList(*prices), cap_usd, merged_usd)
        self._earlier: dict[str, float] = {}
        """Per shard: what its part had spent when its current attempt started."""
        self._run: dict[str, float] = {}
        """Per shard: what its current attempt has spent."""
        self._reports: dict[str, dict[str, Any]] = {}
        """Per attempt (shard and pid): the runner's latest counters."""
        self._stop = False

    # The budget ------------------------------------------------------------
    def _state(self) -> tuple[bool, float, float]:
        budget = self.budget
        return budget.polls_count, budget.effective_rpm, budget._cooldown_until

    async def acquire_submit(self) -> tuple[bool, float, float]:
        await self.budget.acquire_submit()
        return self._state()

    async def acquire_result(self, deadline: float) -> tuple[bool, float, float]:
        await self.budget.acquire_result(deadline)
        return self._state()

    async def acquire_poll(self, deadline: float) -> tuple[bool, float, float]:
        await self.budget.acquire_poll(deadline)
        return self._state()

    def on_rate_limited(self, retry_after_s: float | None, is_poll: bool) -> None:
        self.budget.on_rate_limited(retry_after_s, is_poll=is_poll)

    def on_success(self, counted: bool) -> None:
        self.budget.on_success(counted=counted)

    def state(self) -> tuple[bool, float, float]:
        return self._state()

    # The --max-cost ledger --------------------------------------------------
    def start_shard(self, shard: str, earlier_usd: float) -> None:
        """A shard's attempt starts: what its part holds replaces what an
        earlier attempt had (a dead attempt's written lines are in the part,
        its reservations are not coming back)."""
        spend = self.spend
        for key in [key for key in spend._reserved if key.startswith(shard + "/")]:
            spend.release(key)
        spend.spent_usd += earlier_usd - self._earlier.get(shard, 0.0) - self._run.pop(shard, 0.0)
        spend.earlier_usd += earlier_usd - self._earlier.get(shard, 0.0)
        self._earlier[shard] = earlier_usd

    async def reserve(self, shard: str, custom_id: str, estimate_usd: float) -> bool:
        return await self.spend.reserve(f"{shard}/{custom_id}", estimate_usd)

    def release(self, shard: str, custom_id: str) -> None:
        self.spend.release(f"{shard}/{custom_id}")

    def finished(self, shard: str, custom_id: str, cost_usd: float) -> None:
        self.spend.spent_usd += cost_usd
        self._run[shard] = self._run.get(shard, 0.0) + cost_usd
        self.spend.release(f"{shard}/{custom_id}")

    # Stop -------------------------------------------------------------------
    def request_stop(self) -> None:
        """The driver was interrupted: every shard stops (its journal keeps the rest)."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    # Progress ---------------------------------------------------------------
    def report(self, attempt: str, figures: dict[str, Any]) -> tuple[bool, float, float]:
        self._reports[attempt] = figures
        return self._state()

    def statistics(self) -> dict[str, Any]:
        budget = self.budget
        return {
            "rpm": budget.rpm,
            "effective_rpm": budget.effective_rpm,
            "polls_count": budget.polls_count,
            "rate_limited": budget.rate_limited,
            "spent_usd": self.spend.spent_usd,
            "earlier_usd": self.spend.earlier_usd,
            "attempts": dict(self._reports),
        }


# --------------------------------------------------------------------------- worker side


class RemoteBudget:
    """The runner's `Budget`, each wait a call to the actor. The sync reads
    (polls_count, effective_rpm) come from the actor's latest answer."""

    def __init__(self, actor: Any, rpm: float, state: tuple[bool, float, float]) -> None:
        self._actor = actor
        self.rpm = rpm
        self.polls_count, self.effective_rpm, self._cooldown_until = state

    def update(self, state: tuple[bool, float, float]) -> None:
        self.polls_count, self.effective_rpm, self._cooldown_until = state

    async def _call(self, ref: Any) -> None:
        try:
            self.update(await ref)
        except BaseException:
            # Cancelled while waiting: the slot must not go to nobody.
            ray.cancel(ref)
            raise

    async def acquire_submit(self) -> None:
        await self._call(self._actor.acquire_submit.remote())

    async def acquire_result(self, deadline: float) -> None:
        if not self.polls_count and time.time() >= self._cooldown_until:
            return  # free, and no cool-down known: no round trip
        await self._call(self._actor.acquire_result.remote(deadline))

    async def acquire_poll(self, deadline: float) -> None:
        if not self.polls_count and time.time() >= self._cooldown_until:
            return
        await self._call(self._actor.acquire_poll.remote(deadline))

    def on_rate_limited(self, retry_after_s: float | None, *, is_poll: bool) -> float:
        self._actor.on_rate_limited.remote(retry_after_s, is_poll)
        # The shared pause is the actor's; this worker's next wait asks it.
        self._cooldown_until = max(self._cooldown_until, time.time() + (retry_after_s or 0.0))
        return retry_after_s or 0.0

    def on_success(self, *, counted: bool = True) -> None:
        if counted:
            self._actor.on_success.remote(True)


class RemoteLedger:
    """The runner's `CostLedger`: reservations and spend go to the actor.
    Without a cap, nothing waits on it (the spend is still reported)."""

    def __init__(
        self, actor: Any, shard: str, prices: PriceList, cap_usd: float | None, spent_usd: float
    ) -> None:
        self._actor = actor
        self._shard = shard
        self.prices = prices
        self.cap_usd = cap_usd
        self.earlier_usd = spent_usd
        self.spent_usd = spent_usd
        """This shard's: the cluster's total is the driver's to show."""

    async def reserve(self, custom_id: str, estimate_usd: float) -> bool:
        if self.cap_usd is None:
            return True
        return bool(await self._actor.reserve.remote(self._shard, custom_id, estimate_usd))

    def release(self, custom_id: str) -> None:
        if self.cap_usd is not None:
            self._actor.release.remote(self._shard, custom_id)

    def finished(self, line: dict[str, Any]) -> None:
        result = line["result"]
        cost = 0.0
        if result["type"] == "succeeded" and not line.get("cached"):
            cost = self.prices.cost_usd(*usage_tokens(result["message"]))
        self.spent_usd += cost
        self._actor.finished.remote(self._shard, line["custom_id"], cost)


@dataclass(slots=True)
class RayLimits:
    """`SharedLimits` of one shard: the proxies to the cluster's actor."""

    actor_name: str
    shard: str

    def _actor(self) -> Any:
        return ray.get_actor(self.actor_name, namespace=NAMESPACE)

    def budget(self, rpm: float, polls_count: PollsCount, clock: LoopClock) -> RemoteBudget:
        actor = self._actor()
        return RemoteBudget(actor, rpm, ray.get(actor.state.remote()))

    def ledger(self, prices: PriceList, cap_usd: float | None, spent_usd: float) -> CostLedger:
        actor = self._actor()
        ray.get(actor.start_shard.remote(self.shard, spent_usd))
        return RemoteLedger(actor, self.shard, prices, cap_usd, spent_usd)


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    shard: str
    complete: bool
    """Every job of the shard has its line in the part."""
    exit_code: int
    reason: str | None
    message: str | None


@ray.remote(max_retries=3, retry_exceptions=False)
def run_shard(
    shard: Shard, source: ShardedSource, config: RunConfig, name: str, parts_dir: str
) -> ShardOutcome:
    """One shard, resumed from its part and journal whatever the attempt."""
    attempt = f"{shard.name}@{os.getpid()}"
    limits = RayLimits(name, shard.name)
    shard_config = replace(
        config,
        jobs_dir=config.image_dir(),
        jobs_path=None,
        jobs=source.shard_jobs(shard),
        output_path=part_path(Path(parts_dir), shard),
        shared=limits,
        handle_signals=False,
    )
    actor = ray.get_actor(name, namespace=NAMESPACE)
    shard_config.should_stop = lambda: bool(ray.get(actor.stop_requested.remote()))
    where = {"shard": shard.name, "pid": os.getpid(), "node": socket.gethostname()}
    last: list[Any] = [0.0, None]  # when the last report went, and its answer

    def report(ctx: Any, poller: Any) -> None:
        now = time.monotonic()
        if now - last[0] < REPORT_EVERY_S:
            return
        answer = last[1]
        if answer is not None and ray.wait([answer], timeout=0)[0]:
            # The budget's state as the actor has it: a worker that only polls
            # (its submits done) learns within a report that polls now count.
            ctx.budget.update(ray.get(answer))
        last[0], last[1] = now, actor.report.remote(attempt, {**where, **_figures(ctx)})

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            outcome: RunOutcome = anyio.run(lambda: run(shard_config, on_tick=report))
            break
        except OutputLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    stop = outcome.stop
    return ShardOutcome(
        shard.name,
        complete=stop is None,
        exit_code=outcome.exit_code,
        reason=stop.reason.name if stop is not None else None,
        message=(stop.message or stop.reason.value) if stop is not None else None,
    )


def _figures(ctx: Any) -> dict[str, Any]:
    stats = ctx.stats
    polls = stats.requests["status"] + stats.requests["result"]
    return {
        "done": stats.skipped_done + stats.finished,
        "succeeded": stats.results["succeeded"],
        "failed": stats.results["errored"] + stats.results["expired"],
        "in_flight": stats.in_flight,
        "requests": sum(stats.requests.values()),
        "counted": stats.requests["submit"] + (polls if ctx.budget.polls_count else 0),
        "rate_limited": stats.rate_limited,
        "at": time.time(),
    }


# --------------------------------------------------------------------------- the driver


@dataclass(slots=True)
class ClusterRun:
    """What the driver runs: the source's shards under a RunConfig template."""

    source: ShardedSource
    config: RunConfig
    total: int
    workers: int | None
    ray_address: str | None
    shard_size: int = DEFAULT_SHARD_SIZE
    progress_every_s: float = 30.0
    quiet: bool = False


@dataclass(slots=True)
class ClusterOutcome:
    exit_code: int
    in_file: Counter[str]
    merged: int
    shards: int
    failed_shards: list[str]
    stop_message: str | None
    interrupted: bool = False


def connect(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets
    it); with neither, start a local Ray on this machine."""
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level=logging.ERROR,  # not its token-authentication notice on every run
        log_to_driver=False,
        configure_logging=True,
    )


async def run_cluster(job: ClusterRun, say: Callable[[str], None]) -> ClusterOutcome:
    """Run every shard not merged yet; merge each as it finishes."""
    config = job.config
    output = config.output_path
    parts_dir = parts_dir_for(output)
    lock = OutputLock(output)
    lock.acquire()
    try:
        if config.restart:
            _set_aside(parts_dir, output)
        shard_size = _stored_shard_size(parts_dir) or job.shard_size
        shards = job.source.plan_shards(shard_size)
        connect(job.ray_address)
        merger = PartsMerger(output, parts_dir)
        plan = {"shard_size": shard_size, "input": job.source.identity(), "shards": len(shards)}
        merger.open(plan, fresh=config.restart or config.retry_errored)
        # Every attempt of a shard resumes: Ray's retry of a shard whose worker
        # died must not start it afresh (and pay again for what it journaled).
        job.config = replace(config, restart=False)
        return await _drive(job, shards, merger, say)
    finally:
        lock.release()


def _set_aside(parts_dir: Path, output: Path) -> None:
    """--restart: the earlier parts and results file move aside, kept, into
    `RESULTS.parts.before-<time>/`; nothing is deleted."""
    aside = parts_dir.with_name(f"{parts_dir.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    if parts_dir.exists():
        parts_dir.rename(aside)
    if output.exists():
        aside.mkdir(exist_ok=True)
        output.rename(aside / output.name)


def _stored_shard_size(parts_dir: Path) -> int | None:
    try:
        return int(orjson.loads((parts_dir / PLAN_FILE).read_bytes())["shard_size"])
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def _drive(
    job: ClusterRun, shards: list[Shard], merger: PartsMerger, say: Callable[[str], None]
) -> ClusterOutcome:
    config = job.config
    name = actor_name(config.output_path)
    try:  # a killed driver's actor may outlive it for a moment
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    actor = BudgetActor.options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, max_concurrency=ACTOR_CONCURRENCY
    ).remote(
        config.rpm,
        config.polls_count.value,
        config.max_cost_usd,
        (config.price_in, config.price_out),
        _spent_usd(config, merger, shards),
    )
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    workers = job.workers or max(1, int(cpus))
    # Each shard takes a CPU, or its share when more workers than CPUs are asked
    # for: most of a shard's time is waiting on the API, not computing.
    per_task_cpus = min(1.0, cpus / workers)
    task = run_shard.options(num_cpus=per_task_cpus)
    todo = [shard for shard in shards if shard.name not in merger.merged]
    display = ClusterDisplay(job, merger, shards, todo)
    if not job.quiet:
        say(
            f"ray: {len(shards):,} shard(s) of up to {shards[0].size if shards else 0:,} jobs, "
            f"{len(shards) - len(todo):,} done before; {workers} worker(s) at once; parts in "
            f"{merger.parts_dir}"
        )
    running: dict[Any, Shard] = {}
    failed: list[str] = []
    stop_message: str | None = None
    stop_code = 0
    queue = list(reversed(todo))
    while queue or running:
        signals = interrupts.take()  # recorded since the command began (cli.main)
        if signals and stop_code != EXIT_INTERRUPTED:
            stop_code, stop_message = EXIT_INTERRUPTED, "interrupted"
            actor.request_stop.remote()
            say(
                f"stopping: no new shards; the {len(running)} running stop now and keep their "
                "journals (the same command resumes them). Ctrl-C again to end them at once."
            )
            signals -= 1
        if signals:
            for ref in running:
                ray.cancel(ref, force=True)  # as a kill: the journals keep what was paid
            say("stopped the running shards at once; the same command resumes them")
            break
        while queue and len(running) < workers and stop_message is None:
            shard = queue.pop()
            ref = task.remote(shard, job.source, config, name, str(merger.parts_dir))
            running[ref] = shard
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        for ref in ready:
            shard = running.pop(ref)
            try:
                outcome: ShardOutcome = ray.get(ref)
            except (ray.exceptions.RayError, ConfigError) as exc:
                failed.append(shard.name)
                say(f"shard {shard.name} failed: {_first_line(exc)}; rerun to resume it")
                continue
            if outcome.complete:
                display.merged(merger.merge(shard))
            elif stop_message is None:  # refused key, cost cap, input changed, a full disk
                stop_code = outcome.exit_code
                stop_message = f"shard {shard.name}: {outcome.message}"
                say(f"stopping: {stop_message}; the running shards finish")
        if stop_message is not None:
            queue.clear()
        if not job.quiet:
            await display.tick(actor, {shard.name for shard in running.values()})
        await anyio.sleep(0.1)
    if not job.quiet:
        await display.tick(actor, set(), final=True)
    ray.kill(actor)
    in_file = _count_outcomes(config.output_path)
    all_merged = len(merger.merged) == len(shards)
    if stop_message is not None:
        code = stop_code
    elif failed or not all_merged:
        code = 1
    else:
        code = 0 if set(in_file) <= {"succeeded"} else 1
    return ClusterOutcome(
        exit_code=code,
        in_file=in_file,
        merged=len(merger.merged),
        shards=len(shards),
        failed_shards=failed,
        stop_message=stop_message,
        interrupted=stop_code == EXIT_INTERRUPTED,
    )


def _spent_usd(config: RunConfig, merger: PartsMerger, shards: list[Shard]) -> float:
    """What the parts of the shards merged before this run spent (one read of each)."""
    prices = PriceList(config.price_in, config.price_out)
    spent = 0.0
    for shard in shards:
        path = part_path(merger.parts_dir, shard)
        if shard.name in merger.merged and path.is_file():
            prior = load_prior(path, repair=False)
            spent += prices.cost_usd(prior.input_tokens, prior.output_tokens)
    return spent


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _count_outcomes(path: Path) -> Counter[str]:
    return load_prior(path, repair=False).result_types()


class ClusterDisplay:
    """The driver's progress: cluster totals and one line per running worker."""

    def __init__(
        self, job: ClusterRun, merger: PartsMerger, shards: list[Shard], todo: list[Shard]
    ) -> None:
        self.job = job
        self.total = job.total
        todo_names = {shard.name for shard in todo}
        self.merged_jobs = sum(
            _lines(part_path(merger.parts_dir, shard))
            for shard in shards
            if shard.name not in todo_names
        )
        self.started = time.monotonic()
        self.printed_at = float("-inf")
        self.samples: list[tuple[float, int, int]] = []

    def merged(self, lines: int) -> None:
        """A shard's part went into the results file: its jobs are done."""
        self.merged_jobs += lines

    async def tick(self, actor: Any, running: set[str], *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.printed_at < self.job.progress_every_s:
            return
        self.printed_at = now
        stats = await actor.statistics.remote()
        for line in self.lines(stats, now, running):
            print(f"batchrunner: {line}", file=sys.stderr, flush=True)

    def lines(self, stats: dict[str, Any], now: float, running: set[str]) -> list[str]:
        attempts: dict[str, dict[str, Any]] = stats["attempts"]
        latest: dict[str, dict[str, Any]] = {}
        for figures in attempts.values():  # the latest attempt of each running shard
            shard = figures["shard"]
            if shard in running and (shard not in latest or figures["at"] > latest[shard]["at"]):
                latest[shard] = figures
        done = self.merged_jobs + sum(f["done"] for f in latest.values())
        in_flight = sum(f["in_flight"] for f in latest.values())
        counted = sum(f["counted"] for f in attempts.values())
        self.samples.append((now, done, counted))
        while len(self.samples) > 2 and now - self.samples[1][0] >= 60.0:
            self.samples.pop(0)
        first = self.samples[0]
        span = now - first[0]
        rate = (counted - first[2]) * 60.0 / span if span > 0 else 0.0
        jobs_per_s = (done - first[1]) / span if span > 0 else 0.0
        remaining = max(0, self.total - done)
        eta = (
            hms(remaining / jobs_per_s) if jobs_per_s > 0 else ("0:00:00" if not remaining else "-")
        )
        percent = 100.0 * done / self.total if self.total else 100.0
        lines = [
            f"cluster: {done:,}/{self.total:,} jobs done ({percent:.1f}%), {in_flight:,} in "
            f"flight | requests/min {rate:,.1f} of the {stats['rpm']:g} budget (paced at "
            f"{stats['effective_rpm']:,.1f}) | 429s {stats['rate_limited']:,} | cost so far "
            f"${stats['spent_usd']:,.4f} | elapsed {hms(now - self.started)} | ETA {eta}"
        ]
        by_pid: dict[int, dict[str, Any]] = {}
        for figures in attempts.values():  # a worker's latest report, if its shard still runs
            if figures["shard"] in running and (
                figures["pid"] not in by_pid or figures["at"] > by_pid[figures["pid"]]["at"]
            ):
                by_pid[figures["pid"]] = figures
        for figures in sorted(by_pid.values(), key=lambda f: f["shard"]):
            lines.append(
                f"  worker pid {figures['pid']} on {figures['node']}: shard {figures['shard']}: "
                f"{figures['done']:,} done ({figures['succeeded']:,} succeeded, "
                f"{figures['failed']:,} failed), {figures['in_flight']:,} in flight, "
                f"{figures['requests']:,} requests, 429s {figures['rate_limited']:,}"
            )
        return lines


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
