"""The clients that bench_budget.py races, one per process (issue 4, item 5).

    python benchmarks/budget_clients.py batchrunner|sdk|plain --base-url URL --jobs JOBS \
        --out OUT --scale S --rpm R [--polls-count yes|no|auto] [--concurrency C]

Every time here is *model* time (what the simulator's --time-scale S shrinks):
the client multiplies it by S before sleeping, and `--rpm R` is the model-time
limit, so a client paces at R / S requests per real minute. Prints one JSON
line with what the client itself saw (wall time, CPU of this process during the
run, peak in-flight, results); the server-side figures come from /_sim/stats.

- batchrunner: `batchrunner.runner.run(RunConfig(...))`, its defaults untouched
  except that its clock is made to match the simulator's: every duration it
  has is multiplied by S and every rate divided by S (rpm is R / S per real
  minute); `scale_batchrunner` lists exactly what, and the JSON says it.
- sdk: the official `segmind` SDK 1.3.0, `client.submit_chat(...).wait()` in a
  ThreadPoolExecutor of C threads. Pointed at the simulator with
  `SegmindClient(base_url=URL + "/v1")` (the SDK derives /v2 from it). Its fixed
  1.0 s poll is scaled with wait()'s own knob: `wait(interval=1.0 * S,
  timeout=600 * S)`. Made as fair as a careful user would: a submit answered
  429/5xx (or a dropped connection) is retried after a pause; a wait() that dies
  on 429/5xx/timeout polls the same request_id again after a pause (the job is
  never lost or resubmitted). The pause is 2 s model time +-50% jitter (the SDK
  does not expose Retry-After, so a user cannot honour it).
- plain: asyncio + aiohttp, C jobs at a time, each job polled every model
  second, result fetched on COMPLETED; a 429 waits Retry-After when sent, else
  one model second. Every request the server counts takes a token from one
  aiolimiter bucket at R per model minute (capacity 1, evenly paced), as a
  careful user writes it: submits, and with `--polls-count yes|auto` the status
  and result GETs too (an earlier version let its polls bypass the limiter and
  met a 429 on 93% of its requests). With `--polls-count no` the GETs are free.
- minimal: the least a client can do per job, for the overhead scenario (no
  rate limit, latency ~0): aiohttp, C jobs at a time, submit, poll the status
  until COMPLETED, fetch, one orjson line appended to the output. No budget,
  retries, journal or checks: the floor of CPU per job an asyncio client pays.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODEL = "claude-3.5-sonnet"
SDK_PAUSE_S = 2.0  # model seconds, +-50% jitter


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BytecodeCounter:
    """Bytecodes the interpreter runs on this thread while it is open
    (`--count-bytecodes`; otherwise it counts nothing and costs nothing).

    A figure of a client's own work that, unlike CPU time, does not move with
    the machine's speed: two runs of the same package agree to 0.1%, where
    CPU ms a job moved by a third within minutes on this VM. The tracer makes
    a run about eight times slower, so its wall time means nothing.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.count = 0

    def __enter__(self) -> BytecodeCounter:
        if self.enabled:
            sys.settrace(self._frame)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            sys.settrace(None)

    def _frame(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._opcode

    def _opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.count += 1
        return self._opcode


def _load_jobs(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _body(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("custom_id", "model")}


# --------------------------------------------------------------------------- batchrunner


def _scaled_durations(obj: Any, scale: float) -> Any:
    """A copy of a dataclass instance with every float field named *_s times `scale`."""
    changes = {
        f.name: getattr(obj, f.name) * scale
        for f in dataclasses.fields(obj)
        if f.name.endswith("_s")
        and isinstance(getattr(obj, f.name), (int, float))
        and not isinstance(getattr(obj, f.name), bool)
    }
    return dataclasses.replace(obj, **changes)


def scale_batchrunner(scale: float) -> tuple[dict[str, Any], list[str]]:
    """Make batchrunner's notion of time match a simulator run at --time-scale S.

    Returns the RunConfig keyword arguments and a description of every change.
    Durations (seconds) are multiplied by S, rates (requests per minute) divided
    by S; nothing else is touched:
    - RunConfig fields named *_s (latency prior, retention, margins, grace), and
      the *_s fields of its RetryPolicy and PollSchedule defaults;
    - module constants named *_S in batchrunner's modules (e.g. URGENT_POLL_S),
      and the *_s fields of module-level dataclass constants (FRUGAL_SCHEDULE);
    - AimdPolicy (if the budget has one): *_s fields x S, and *_rpm fields and
      any `increase_per*` (requests/min per request) / S, so the rate learner
      moves at the same pace in model time (a share of --rpm needs no scaling).
    """
    import functools

    import batchrunner.budget as budget
    from batchrunner.runner import RunConfig

    notes: list[str] = []
    kwargs: dict[str, Any] = {}
    scaled: dict[int, Any] = {}  # id of a module-level constant -> its scaled copy
    if scale == 1.0:
        return kwargs, notes
    for f in dataclasses.fields(RunConfig):
        if f.name.endswith("_s") and isinstance(f.default, (int, float)):
            kwargs[f.name] = f.default * scale
            notes.append(f"RunConfig.{f.name}")
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value) and f.name in ("retry", "schedule"):
                kwargs[f.name] = _scaled_durations(value, scale)
                notes.append(f"RunConfig.{f.name} (*_s fields)")
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("batchrunner.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if (
                attr.endswith("_S")
                and attr.isupper()
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                setattr(module, attr, value * scale)
                notes.append(f"{name}.{attr}")
            elif (
                attr.isupper()
                and dataclasses.is_dataclass(value)
                and not isinstance(value, type)
                and any(f.name.endswith("_s") for f in dataclasses.fields(value))
            ):
                # e.g. schedule.FRUGAL_SCHEDULE / EAGER_SCHEDULE (max_step_s,
                # deadline_margin_s). One copy per constant, whichever modules
                # import it, so it stays one object as in a real run (a copy per
                # module broke an identity check the package had, issue 12 stop 25).
                if id(value) not in scaled:
                    scaled[id(value)] = _scaled_durations(value, scale)
                setattr(module, attr, scaled[id(value)])
                notes.append(f"{name}.{attr} (*_s fields)")
    policy_cls = getattr(budget, "AimdPolicy", None)
    if policy_cls is not None and dataclasses.is_dataclass(policy_cls):
        defaults = policy_cls()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(defaults):
            value = getattr(defaults, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if f.name.endswith("_s"):
                changes[f.name] = value * scale
            elif f.name.endswith("_rpm") or f.name.startswith("increase_per"):
                changes[f.name] = value / scale
        if changes:
            budget.AimdPolicy = functools.partial(policy_cls, **changes)  # type: ignore[misc]
            notes.append("AimdPolicy(" + ", ".join(sorted(changes)) + ")")
    return kwargs, notes


def run_batchrunner(args: argparse.Namespace) -> dict[str, Any]:
    from batchrunner.api import ApiKey
    from batchrunner.budget import PollsCount
    from batchrunner.runner import RunConfig, run

    scale = args.scale
    kwargs, notes = scale_batchrunner(scale)
    if args.latency_prior is not None:
        kwargs["latency_prior_s"] = args.latency_prior
    if args.max_in_flight is not None:
        kwargs["max_in_flight"] = args.max_in_flight
    config = RunConfig(
        jobs_path=args.jobs,
        output_path=args.out,
        api_key=ApiKey("bench-key"),
        base_url=args.base_url,
        rpm=args.rpm / scale,
        polls_count=PollsCount(args.polls_count),
        seed=args.seed,
        restart=True,
        **kwargs,
    )
    seen: dict[str, Any] = {"peak_in_flight": 0, "peak_limit": 0, "budget": {}, "rpm_trace": []}
    started = time.monotonic()

    def on_tick(ctx: Any, poller: Any) -> None:
        seen["peak_in_flight"] = max(seen["peak_in_flight"], ctx.stats.in_flight)
        limit = getattr(ctx.in_flight, "total_tokens", 0)
        if isinstance(limit, (int, float)):
            seen["peak_limit"] = max(seen["peak_limit"], int(limit))
        try:
            budget = dict(ctx.budget.statistics())
        except Exception:
            budget = {}
        seen["budget"] = budget
        rate = next((budget[k] for k in ("effective_rpm", "rate_rpm", "rpm") if k in budget), None)
        if isinstance(rate, (int, float)):
            # model-time rpm, sampled every tick: shows what the rate learner settles on
            seen["rpm_trace"].append(
                [round((time.monotonic() - started) / scale, 1), round(rate * scale, 2)]
            )

    cpu0 = _cpu_s()
    t0 = time.monotonic()
    with BytecodeCounter(args.count_bytecodes) as bytecodes:
        outcome = asyncio.run(run(config, on_tick=on_tick))
    wall = time.monotonic() - t0
    cpu = _cpu_s() - cpu0
    trace = seen.pop("rpm_trace")
    step = max(1, len(trace) // 40)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "results": dict(outcome.in_file),
        "client_requests": dict(outcome.stats.requests),
        "client_rate_limited": outcome.stats.rate_limited,
        "concurrency": seen["peak_limit"],
        "rpm_trace": trace[::step],
        "scaled": notes,
        "bytecodes": bytecodes.count,
        **seen,
    }


# --------------------------------------------------------------------------- SDK


def run_sdk(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import segmind
    from segmind import SegmindClient
    from segmind.exceptions import SegmindError
    from segmind.v2 import InferenceFailed, InferenceTimeout

    scale = args.scale
    jobs = _load_jobs(args.jobs)
    local = threading.local()
    counts = {"submit_retries": 0, "wait_retries": 0, "failed": 0, "ok": 0}
    lock = threading.Lock()
    rng = random.Random(args.seed)

    def client() -> SegmindClient:
        # One SDK client (httpx.Client) per thread, as a careful user would.
        if not hasattr(local, "client"):
            local.client = SegmindClient(api_key="bench-key", base_url=args.base_url + "/v1")
        return local.client

    def pause() -> None:
        with lock:
            jitter = rng.uniform(0.5, 1.5)
        time.sleep(SDK_PAUSE_S * jitter * scale)

    def retryable(exc: Exception) -> bool:
        if isinstance(exc, (httpx.TransportError, InferenceTimeout)):
            return True
        status = getattr(exc, "status", None)
        return isinstance(exc, SegmindError) and (status == 429 or (status or 0) >= 500)

    def one(job: dict[str, Any]) -> None:
        body = _body(job)
        while True:
            try:
                handle = client().submit_chat(MODEL, **body)
                break
            except Exception as exc:
                if not retryable(exc):
                    raise
                with lock:
                    counts["submit_retries"] += 1
                pause()
        while True:
            try:
                response = handle.wait(timeout=600.0 * scale, interval=1.0 * scale)
            except InferenceFailed:
                with lock:
                    counts["failed"] += 1
                return
            except Exception as exc:
                if not retryable(exc):
                    raise
                with lock:
                    counts["wait_retries"] += 1
                pause()
                continue
            assert response.text is not None
            with lock:
                counts["ok"] += 1
            return

    cpu0 = _cpu_s()
    t0 = time.monotonic()
    errors = 0
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            try:
                future.result()
            except Exception:
                errors += 1
    wall = time.monotonic() - t0
    return {
        "wall_s": wall,
        "cpu_s": _cpu_s() - cpu0,
        "results": {"succeeded": counts["ok"], "errored": counts["failed"] + errors},
        "concurrency": args.concurrency,
        "sdk_version": getattr(segmind, "__version__", "?"),
        **counts,
    }


# --------------------------------------------------------------------------- plain loop


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from aiolimiter import AsyncLimiter

    scale = args.scale
    jobs = _load_jobs(args.jobs)
    poll_gap = 1.0 * scale
    counts = {"ok": 0, "failed": 0, "rate_limited": 0}
    polls_count = args.polls_count != "no"

    async def main() -> None:
        headers = {"x-api-key": "bench-key"}
        connector = aiohttp.TCPConnector(limit=max(64, args.concurrency))
        limiter = AsyncLimiter(1, 60.0 / args.rpm * scale)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            slots = asyncio.Semaphore(args.concurrency)

            async def call(method: str, url: str, counted: bool, **kw: Any) -> tuple[int, Any]:
                while True:
                    if counted:
                        await limiter.acquire()
                    async with session.request(method, url, **kw) as response:
                        body = await response.json(content_type=None)
                        if response.status != 429:
                            return response.status, body
                        counts["rate_limited"] += 1
                        retry_after = response.headers.get("Retry-After")
                    await asyncio.sleep(float(retry_after) if retry_after else poll_gap)

            async def one(job: dict[str, Any]) -> None:
                async with slots:
                    status, body = await call(
                        "POST", f"{args.base_url}/v2/{MODEL}", True, json=_body(job)
                    )
                    if status != 200:
                        counts["failed"] += 1
                        return
                    while True:
                        await asyncio.sleep(poll_gap)
                        _, state = await call("GET", body["status_url"], polls_count)
                        if state.get("status") == "COMPLETED":
                            break
                        if state.get("status") == "FAILED":
                            counts["failed"] += 1
                            return
                    status, result = await call("GET", body["response_url"], polls_count)
                    counts["ok" if status == 200 and result.get("output") else "failed"] += 1

            await asyncio.gather(*(one(job) for job in jobs))

    cpu0 = _cpu_s()
    t0 = time.monotonic()
    asyncio.run(main())
    return {
        "wall_s": time.monotonic() - t0,
        "cpu_s": _cpu_s() - cpu0,
        "results": {"succeeded": counts["ok"], "errored": counts["failed"]},
        "concurrency": args.concurrency,
        "client_rate_limited": counts["rate_limited"],
    }


# --------------------------------------------------------------------------- minimal


def run_minimal(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import orjson

    # The clock and the CPU count start before the jobs are read: batchrunner's
    # figures include reading and checking its input, so the floor's must too.
    cpu0 = _cpu_s()
    t0 = time.monotonic()
    counts = {"ok": 0, "failed": 0}

    async def main() -> None:
        headers = {"x-api-key": "bench-key"}
        connector = aiohttp.TCPConnector(limit=max(64, args.concurrency))
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            slots = asyncio.Semaphore(args.concurrency)
            with args.out.open("wb") as out:

                async def one(job: dict[str, Any]) -> None:
                    async with slots:
                        url = f"{args.base_url}/v2/{MODEL}"
                        async with session.post(url, data=orjson.dumps(_body(job))) as response:
                            submitted = orjson.loads(await response.read())
                        while True:
                            async with session.get(submitted["status_url"]) as response:
                                state = orjson.loads(await response.read())["status"]
                            if state in ("COMPLETED", "FAILED"):
                                break
                        async with session.get(submitted["response_url"]) as response:
                            result = orjson.loads(await response.read())
                        out.write(orjson.dumps({"custom_id": job["custom_id"], **result}) + b"\n")
                        counts["ok" if state == "COMPLETED" else "failed"] += 1

                await asyncio.gather(*(one(job) for job in jobs))

    with BytecodeCounter(args.count_bytecodes) as counter:
        jobs = _load_jobs(args.jobs)
        asyncio.run(main())
    return {
        "wall_s": time.monotonic() - t0,
        "cpu_s": _cpu_s() - cpu0,
        "results": {"succeeded": counts["ok"], "errored": counts["failed"]},
        "concurrency": args.concurrency,
        "bytecodes": counter.count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("client", choices=["batchrunner", "sdk", "plain", "minimal"])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, required=True, help="simulator --time-scale")
    parser.add_argument("--rpm", type=float, required=True, help="client rpm, model time")
    parser.add_argument("--polls-count", default="auto", choices=["yes", "no", "auto"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latency-prior", type=float, default=None, help="batchrunner prior, real seconds"
    )
    parser.add_argument("--max-in-flight", type=int, default=None, help="batchrunner's")
    parser.add_argument(
        "--count-bytecodes",
        action="store_true",
        help="batchrunner and minimal: count the bytecodes run (slow; see BytecodeCounter)",
    )
    args = parser.parse_args(argv)
    runner = {
        "batchrunner": run_batchrunner,
        "sdk": run_sdk,
        "plain": run_plain,
        "minimal": run_minimal,
    }[args.client]
    report = runner(args)
    report["client"] = args.client
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
