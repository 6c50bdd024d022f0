"""`batchrunner serve`: a local OpenAI- and Anthropic-compatible endpoint in
front of Segmind, for eval tools that generate their own requests.

Each request is one job of a pipeline built like a run's (`runner.make_context`,
`runner.run_services`): one rate budget for every client, the same retry
loop, 429 learning, circuit breaker, cache and stop controller; submits go
through the same Submitter inside the stop controller's INTAKE scope, polls
through the same Poller. The results file (one line per answered request)
and the journal are written by the same Writer.

Exactly-once for a client's retries: a request's identity is its converted
body (`dialects.convert`). A request whose client went away before its answer
(disconnected, or `serve` was killed) stays open: the next identical request
adopts it instead of paying again: it waits for the same submit, takes its
finished answer, or, after a restart, polls its journaled request_id (within
the retention hour). Identical requests whose clients are all still waiting
are separate requests (an eval's epochs sample independently).
"""

from __future__ import annotations

import argparse
import hmac
import math
import os
import random
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiohttp import web
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrunner import cli, dialects
from batchrunner.api import make_session
from batchrunner.argtypes import Parser, duration, non_negative_float, positive_float, positive_int
from batchrunner.budget import PollsCount
from batchrunner.context import LoopClock, RunContext, RunStats, Spend
from batchrunner.display import PROGRESS_EVERY_S, Display, progress_mode
from batchrunner.errors import ConfigError
from batchrunner.fetch import ImageFetcher
from batchrunner.journal import JournalRecord, load_journal
from batchrunner.policy import MAX_OUTAGE_S, Action, Verdict, is_collectable
from batchrunner.poller import Poller
from batchrunner.price import DEFAULT_PRICE_IN, DEFAULT_PRICE_OUT, PriceList
from batchrunner.reader import Job
from batchrunner.resultsfile import load_prior
from batchrunner.runner import RunConfig, make_context, run_services, tracked_from_journal
from batchrunner.schedule import MODEL_PAGE_LATENCY_S
from batchrunner.stop import Level, Reason, StopController
from batchrunner.submitter import Submission, Submitter, Tracked, release_if_held
from batchrunner.writer import OutputLock, Writer

DEFAULT_JOURNAL = Path("serve.journal")
DEFAULT_MAX_RETRY_AFTER_S = 60.0
"""How long a client's request may be held for a 429's Retry-After: eval tools'
HTTP timeouts are commonly 60 s to 10 min. A longer one is passed on: 429."""
SUBMIT_WORKERS = 16
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def results_path_for(journal: Path) -> Path:
    """`serve.journal` -> `serve.results.jsonl`: one result line per answered request."""
    stem = journal.name.removesuffix(".journal")
    return journal.with_name(stem + ".results.jsonl")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request has no result line: the account was refused, or serve stopped."""

    status: int
    message: str
    retry_after_s: float | None = None


STOPPED = Refusal(503, "batchrunner serve is stopping; retry the same request once it is back")


@dataclass(slots=True, eq=False)
class Call:
    """One Segmind request on behalf of clients (its object is its in-flight borrower)."""

    custom_id: str
    identity: str
    job: Job
    record: JournalRecord | None = None
    """Set when the request is journaled but not followed: poll it, do not submit."""
    clients: int = 0
    queued: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    line: dict[str, Any] | None = None
    refusal: Refusal | None = None

    def resolve(self, refusal: Refusal) -> None:
        if not self.done.is_set():
            self.refusal = refusal
            self.done.set()


class Calls:
    """Open calls by identity: in flight, finished but not delivered, or
    journaled by an earlier serve. A new request adopts one nobody waits for."""

    def __init__(self, ctx: RunContext, retention_margin_s: float) -> None:
        self.ctx = ctx
        self.margin_s = retention_margin_s
        self._open: dict[str, list[Call]] = {}
        self._by_id: dict[str, Call] = {}
        self._journaled: dict[str, list[JournalRecord]] = {}
        self.received = 0
        self.refused_until = -math.inf

    def load(self, records: dict[str, JournalRecord]) -> None:
        """Requests an earlier serve submitted and never answered."""
        for record in records.values():
            self._journaled.setdefault(_identity_of(record.custom_id), []).append(record)

    def take(self, request: dialects.ServedRequest) -> tuple[Call, bool]:
        """The call that answers `request`, and whether it must be queued."""
        self.received += 1
        for call in list(self._open.get(request.identity, ())):
            if call.refusal is not None:  # a refusal is no answer to keep: ask again
                self.close(call)
            elif call.clients == 0:
                return call, False
        now = self.ctx.clock()
        records = self._journaled.get(request.identity, [])
        while records:
            record = records.pop()
            if is_collectable(
                record.submitted_at, now, retention_s=self.ctx.retention_s, margin_s=self.margin_s
            ):
                return self._new(request, record.custom_id, record), True
        custom_id = f"serve-{request.identity}-{secrets.token_hex(4)}"
        return self._new(request, custom_id, None), True

    def _new(
        self, request: dialects.ServedRequest, custom_id: str, record: JournalRecord | None
    ) -> Call:
        job = Job(custom_id, 0, request.model, request.body, request.fingerprint)
        call = Call(custom_id, request.identity, job, record)
        self._open.setdefault(request.identity, []).append(call)
        self._by_id[custom_id] = call
        return call

    def close(self, call: Call) -> None:
        """Delivered (or failed for good): a later identical request is a new one."""
        calls = self._open.get(call.identity, [])
        if call in calls:
            calls.remove(call)
        if not calls:
            self._open.pop(call.identity, None)
        self._by_id.pop(call.custom_id, None)

    def on_result(self, line: dict[str, Any]) -> None:
        call = self._by_id.get(line["custom_id"])
        if call is not None and not call.done.is_set():
            call.line = line
            call.done.set()

    def reopen(self, call: Call, record: JournalRecord, refusal: Refusal) -> None:
        """A followed request whose polls were refused: answer its clients now,
        and let a retry poll it again (it is journaled, and may still finish)."""
        self.close(call)
        call.resolve(refusal)
        self._journaled.setdefault(call.identity, []).append(record)

    def stop_all(self) -> None:
        for calls in self._open.values():
            for call in calls:
                call.resolve(STOPPED)


def _identity_of(custom_id: str) -> str:
    return custom_id.split("-")[1] if custom_id.count("-") >= 2 else custom_id


def _refusal(ctx: RunContext, verdict: Verdict) -> Refusal:
    if verdict.action is Action.WAIT_TOO_LONG:
        assert verdict.retry_after_s is not None
        wait = verdict.retry_after_s
        return Refusal(
            429,
            f"Segmind asks to wait {wait:,.0f} s before the next request (longer than "
            f"--max-retry-after {ctx.max_retry_after_s:g} s); retry after that",
            wait,
        )
    return Refusal(502, f"Segmind refused the account: {verdict.message or verdict.status}")


class ServeSubmitter(Submitter):
    def __init__(self, ctx: RunContext, track: Callable[[Tracked], None], calls: Calls) -> None:
        super().__init__(ctx, track)
        self.calls = calls

    def account_refused(self, item: Submission, verdict: Verdict) -> None:
        """Answer this request (429 or 502); serve goes on. A long Retry-After
        answers the next requests at once too, until it has passed."""
        refusal = _refusal(self.ctx, verdict)
        if refusal.retry_after_s is not None:
            self.calls.refused_until = self.ctx.clock() + refusal.retry_after_s
        assert isinstance(item.borrower, Call)
        item.borrower.resolve(refusal)


class ServePoller(Poller):
    def __init__(self, ctx: RunContext, submitter: Submitter, calls: Calls) -> None:
        super().__init__(ctx, submitter)
        self.calls = calls

    def account_refused(self, tracked: Tracked, verdict: Verdict) -> None:
        ctx = self.ctx
        ctx.stats.in_flight -= 1
        release_if_held(ctx, tracked.borrower)
        assert isinstance(tracked.borrower, Call)
        record = JournalRecord(
            tracked.job.custom_id,
            tracked.request_id,
            tracked.submitted_at,
            tracked.attempt,
            tracked.job.fingerprint,
            tracked.status_url,
            tracked.response_url,
        )
        self.calls.reopen(tracked.borrower, record, _refusal(ctx, verdict))


# --------------------------------------------------------------------------- HTTP


class App:
    """The HTTP side: checks the token, converts, hands calls to the pipeline, answers."""

    def __init__(
        self, token: str, default_model: str, calls: Calls, queue: MemoryObjectSendStream[Call]
    ) -> None:
        self.token = token.encode()
        self.default_model = default_model
        self.calls = calls
        self.queue = queue
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_get("/v1/models", self.models)

    async def chat_completions(self, request: web.Request) -> web.Response:
        return await self._answer(request, dialects.OPENAI)

    async def messages(self, request: web.Request) -> web.Response:
        return await self._answer(request, dialects.ANTHROPIC)

    async def models(self, request: web.Request) -> web.Response:
        dialect = dialects.ANTHROPIC if "x-api-key" in request.headers else dialects.OPENAI
        if not self._authorized(request):
            return _unauthorized(dialect)
        return _json(200, dialects.models(self.default_model))

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else None
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def _answer(self, request: web.Request, dialect: str) -> web.Response:
        if not self._authorized(request):
            return _unauthorized(dialect)
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(dialect, 400, f"the body is not valid JSON ({exc})")
        try:
            served = dialects.convert(dialect, data, self.default_model)
        except dialects.RequestError as exc:
            return _error(dialect, 400, str(exc), exc.field)
        ctx = self.calls.ctx
        if not ctx.stop.taking_jobs:
            return _error(dialect, 503, STOPPED.message)
        wait = self.calls.refused_until - ctx.clock()
        if wait > 0:
            return _too_many(dialect, f"Segmind refuses requests for {wait:,.0f} s more", wait)
        call, queue = self.calls.take(served)
        call.clients += 1
        try:
            if queue and not call.queued:
                call.queued = True
                try:
                    self.queue.send_nowait(call)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    call.resolve(STOPPED)
            await call.done.wait()
        finally:  # a client that went away leaves its call open, for its retry
            call.clients -= 1
        return self._respond(served, call)

    def _respond(self, served: dialects.ServedRequest, call: Call) -> web.Response:
        dialect = served.dialect
        if call.refusal is not None:
            if call.refusal is not STOPPED:
                self.calls.close(call)
            if call.refusal.retry_after_s is not None:
                return _too_many(dialect, call.refusal.message, call.refusal.retry_after_s)
            return _error(dialect, call.refusal.status, call.refusal.message)
        assert call.line is not None
        self.calls.close(call)
        result = call.line["result"]
        if result["type"] == "succeeded":
            body = dialects.answer(served, result["message"], call.line.get("request_id"))
            return _json(200, body)
        status, message = _failure(result)
        return _error(dialect, status, message)


def _failure(result: dict[str, Any]) -> tuple[int, str]:
    """The HTTP status and message of a result that is not a message."""
    if result["type"] == "expired":
        return 504, f"the request expired at Segmind: {result.get('error', {}).get('message', '')}"
    error = result["error"]
    kind, status = error["type"], error.get("status")
    message = str(error.get("message", "")).removeprefix("line 0: ")
    if kind == "invalid_job":
        return 400, message
    if kind == "invalid_request":
        return (404 if status == 404 else 400), f"Segmind refused the request: {message}"
    if kind == "retries_exhausted" and status is None:
        return 504, f"Segmind did not answer: {message}"
    return 502, f"Segmind failed: {message}"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _error(dialect: str, status: int, message: str, field: str | None = None) -> web.Response:
    return _json(status, dialects.error(dialect, status, message, field))


def _unauthorized(dialect: str) -> web.Response:
    message = (
        "wrong or missing token: send the token batchrunner serve printed (or was given with "
        "--token) as the API key (Authorization: Bearer TOKEN, or x-api-key: TOKEN)"
    )
    return _error(dialect, 401, message)


def _too_many(dialect: str, message: str, wait_s: float) -> web.Response:
    body = dialects.error(dialect, 429, message)
    return _json(429, body, {"Retry-After": str(max(1, math.ceil(wait_s)))})


# --------------------------------------------------------------------------- the pipeline


async def _intake(
    ctx: RunContext,
    poller: Poller,
    queue: MemoryObjectReceiveStream[Call],
    submissions: ObjectSendStream[Submission],
) -> None:
    """The reader's part: an in-flight slot per call, then a journaled request
    to the poller or a new one to the submit workers."""
    async with submissions:
        try:
            async for call in queue:
                await ctx.in_flight.acquire_on_behalf_of(call)
                if call.record is not None:
                    poller.add(tracked_from_journal(call.job, call.record, call), resumed=True)
                else:
                    await submissions.send(Submission(call.job, call))
        finally:
            queue.close()  # later requests are answered 503 at once


async def _submit_worker(
    submitter: Submitter, calls: Calls, submissions: ObjectReceiveStream[Submission]
) -> None:
    ctx = submitter.ctx
    async with submissions:
        async for item in submissions:
            if not (ctx.stop.taking_jobs and await submitter.submit(item)):
                release_if_held(ctx, item.borrower)
                assert isinstance(item.borrower, Call)
                item.borrower.resolve(STOPPED)  # unless its line or a refusal came


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str
    port: int
    token: str
    token_generated: bool
    journal: Path
    quiet: bool
    progress_every_s: float


async def serve(config: RunConfig, options: ServeOptions) -> int:
    """Serve until a stop; returns the exit code (130 after SIGINT/SIGTERM)."""
    results = config.output_path
    lock = OutputLock(results)
    lock.acquire()
    try:
        return await _serve_locked(config, options)
    finally:
        lock.release()


async def _serve_locked(config: RunConfig, options: ServeOptions) -> int:
    results = config.output_path
    prior = load_prior(results)
    journaled = load_journal(options.journal, lambda record: prior.get(record.custom_id) is None)
    stop = StopController()
    stats = RunStats()
    prices = PriceList(config.price_in, config.price_out)
    spend = Spend(prices, None, prices.cost_usd(prior.input_tokens, prior.output_tokens))
    calls: Calls | None = None

    def on_result(line: dict[str, Any]) -> None:
        stats.count_result(line)
        spend.finished(line)
        if calls is not None:
            calls.on_result(line)

    writer = Writer(
        results,
        options.journal,
        on_result=on_result,
        on_failure=lambda message: stop.stop_now(Reason.FILE_ERROR, message),
    )
    writer.open()
    mode = progress_mode(quiet=options.quiet, every_s=options.progress_every_s)
    display = Display(total=0, mode=mode, every_s=options.progress_every_s)

    def on_tick(ctx: RunContext, poller: Poller) -> None:
        display.total = calls.received if calls is not None else 0
        display.update(ctx, poller)

    try:
        async with make_session(config.http, config.api_key) as session, ImageFetcher() as fetcher:
            ctx = make_context(
                config,
                session,
                fetcher,
                writer=writer,
                stop=stop,
                stats=stats,
                spend=spend,
                clock=LoopClock(),
                rng=random.Random(config.seed),
            )
            calls = Calls(ctx, config.retention_margin_s)
            calls.load(journaled)
            poller: ServePoller
            submitter = ServeSubmitter(ctx, lambda tracked: poller.add(tracked), calls)
            poller = ServePoller(ctx, submitter, calls)
            queue_send, queue_receive = anyio.create_memory_object_stream[Call](math.inf)
            app = App(options.token, config.model, calls, queue_send)
            runner = web.AppRunner(app.app, access_log=None, handler_cancellation=True)
            await runner.setup()
            try:
                site = web.TCPSite(runner, options.host, options.port)
                await site.start()
                _announce(options, runner)
                with display:
                    async with run_services(ctx, config, poller, on_tick, cli.say):
                        with stop.scope(Level.COLLECT):
                            await _pipeline(ctx, submitter, poller, calls, queue_receive)
                        await site.stop()
                calls.stop_all()
            finally:
                queue_send.close()
                with anyio.move_on_after(5, shield=True):
                    await runner.cleanup()
    finally:
        await writer.aclose()
    return stop.exit_code(all_succeeded=True)


async def _pipeline(
    ctx: RunContext,
    submitter: Submitter,
    poller: Poller,
    calls: Calls,
    queue: MemoryObjectReceiveStream[Call],
) -> None:
    send, receive = anyio.create_memory_object_stream[Submission](SUBMIT_WORKERS)
    async with anyio.create_task_group() as pipeline:
        pipeline.start_soon(poller.run)
        with ctx.stop.scope(Level.INTAKE):
            async with anyio.create_task_group() as workers:
                for _ in range(SUBMIT_WORKERS):
                    workers.start_soon(_submit_worker, submitter, calls, receive.clone())
                receive.close()
                await _intake(ctx, poller, queue, send)
        poller.close_intake()


def _announce(options: ServeOptions, runner: web.AppRunner) -> None:
    host, port = runner.addresses[0][:2]
    url_host = f"[{host}]" if ":" in host else host
    base = f"http://{url_host}:{port}"
    print(f"listening on {base}", flush=True)
    print(f"OpenAI base_url {base}/v1, Anthropic base_url {base}", flush=True)
    if options.token_generated:
        print(f"token: {options.token}", flush=True)
    if options.host not in LOOPBACK:
        cli.say(
            f"listening on {options.host}, beyond loopback: anyone who reaches this port with "
            "the token spends your Segmind credit"
        )


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="batchrunner serve",
        description="Serve a local OpenAI-compatible (POST /v1/chat/completions) and "
        "Anthropic-compatible (POST /v1/messages) endpoint; GET /v1/models lists the models. "
        "Every request becomes a Segmind submit and poll under one rate budget, with retries, "
        "a journal and an optional cache.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8000, help="port; 0 picks a free one")
    add(
        "--token",
        help="the token clients must send as their API key (env BATCHRUNNER_SERVE_TOKEN; "
        "default: a new one, printed at start)",
    )
    add(
        "--journal",
        type=Path,
        default=DEFAULT_JOURNAL,
        metavar="PATH",
        help="journal of submitted requests, for crash safety; the answered requests go "
        "beside it, PATH without .journal + .results.jsonl",
    )
    add("--model", default="claude-3.5-sonnet", help="model for requests that name none")
    add(
        "--base-url",
        default=os.environ.get("SEGMIND_BASE_URL", cli.DEFAULT_BASE_URL),
        help="API origin (env SEGMIND_BASE_URL; default %(default)s)",
    )
    add("--api-key-file", type=Path, help="file holding the Segmind API key")
    add("--simulate", action="store_true", help="serve from the built-in simulator")
    add("--rpm", type=positive_float, default=50.0, help="request budget per minute, all clients")
    add("--max-in-flight", type=positive_int, help="most requests submitted but unfinished")
    add(
        "--polls-count",
        choices=[mode.value for mode in PollsCount],
        default="auto",
        help="whether status polls count against --rpm (auto: learn it from the first 429)",
    )
    add("--cache", type=Path, metavar="DIR", help="reuse answers of identical requests from DIR")
    add("--cache-max-age", type=duration, metavar="AGE", help="ignore older cache entries")
    add(
        "--max-retry-after",
        type=positive_float,
        default=DEFAULT_MAX_RETRY_AFTER_S,
        metavar="S",
        help="a longer Retry-After from Segmind is passed to the client as 429 with "
        "Retry-After instead of held",
    )
    add(
        "--max-outage",
        type=duration,
        default=MAX_OUTAGE_S,
        metavar="S",
        help="stop (exit 3) once Segmind has been unreachable this long with nothing to collect",
    )
    add(
        "--grace",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="after SIGTERM or Ctrl-C: stop accepting, keep collecting for S seconds",
    )
    add("--expected-latency", type=positive_float, metavar="S", help=argparse.SUPPRESS)
    add("--quiet", action="store_true", help="no progress display")
    add(
        "--progress-every",
        type=non_negative_float,
        default=PROGRESS_EVERY_S,
        metavar="S",
        help="when stderr is not a terminal, one progress line every S seconds; 0: none",
    )
    add("--seed", type=int, help=argparse.SUPPRESS)
    # The clock of a simulator started apart (tests): the budget follows it.
    add("--time-scale", type=positive_float, default=1.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return cli.run_command(_main, args, argv)


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    token = args.token or os.environ.get("BATCHRUNNER_SERVE_TOKEN") or None
    generated = token is None
    if token is None:
        token = secrets.token_urlsafe(24)
    journal: Path = args.journal
    if journal.is_dir():
        raise ConfigError(f"--journal {journal} is a folder; give a file")
    async with cli._api_origin(args) as (base_url, key, time_scale):
        config = RunConfig(
            jobs_path=None,
            output_path=results_path_for(journal),
            api_key=key,
            base_url=base_url,
            model=args.model,
            rpm=args.rpm,
            max_in_flight=args.max_in_flight,
            polls_count=PollsCount(args.polls_count),
            max_retry_after_s=args.max_retry_after,
            max_outage_s=args.max_outage,
            latency_prior_s=args.expected_latency or MODEL_PAGE_LATENCY_S,
            grace_s=args.grace,
            handle_signals=True,
            seed=args.seed,
            cache_dir=args.cache,
            cache_max_age_s=args.cache_max_age,
            price_in=DEFAULT_PRICE_IN,
            price_out=DEFAULT_PRICE_OUT,
            jobs=lambda: iter(()),
        )
        scale = time_scale if time_scale != 1.0 else args.time_scale
        if scale != 1.0:
            config.scale_time(scale)
        config.check()
        options = ServeOptions(
            host=args.host,
            port=args.port,
            token=token,
            token_generated=generated,
            journal=journal,
            quiet=args.quiet,
            progress_every_s=args.progress_every,
        )
        code = await serve(config, options)
    if code == 130:
        cli.say(
            "stopped; a client's retry of a request left unanswered is collected, not paid again"
        )
    return code
