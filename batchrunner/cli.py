"""Command line (DESIGN.md section 1): arguments, API key, progress, summary, exit codes."""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import shlex
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from batchrunner import __version__, interrupts
from batchrunner.api import ApiKey
from batchrunner.argtypes import (
    Parser,
    duration,
    non_negative_float,
    positive_float,
    positive_int,
)
from batchrunner.batch import SIMULATE_TIME_SCALE, default_results_path
from batchrunner.budget import PollsCount
from batchrunner.display import PROGRESS_EVERY_S, Display, print_summary, progress_mode
from batchrunner.errors import ConfigError, ResultsFileError
from batchrunner.estimate import add_dry_run_options, main_dry_run
from batchrunner.journal import journal_path_for
from batchrunner.policy import MAX_OUTAGE_S, MAX_RETRY_AFTER_S
from batchrunner.reader import count_job_lines, read_jobs
from batchrunner.runner import JobSource, RunConfig, RunOutcome, plan_notes, run
from batchrunner.schedule import MODEL_PAGE_LATENCY_S
from batchrunner.stop import Reason

DEFAULT_BASE_URL = "https://api.segmind.com"

EXIT_USAGE = 2

SUBCOMMANDS = {
    "caption": "caption images from a folder, manifest, WebDataset or Parquet",
    "status": "where a run stands, from its files alone (no API call)",
    "report": "counts, errors, latency, tokens and cost of a results file",
    "export": "results as CSV, JSONL, Parquet, batch lines or dataset captions",
    "diff": "what changed between two results files (last night, tonight)",
    "serve": "OpenAI/Anthropic-compatible local endpoint for eval tools",
}
"""Other commands: `batchrunner NAME ...` runs `batchrunner.NAME.main(argv)`; the
text is their line in --help."""

DESCRIPTION = (
    "Run a JSONL file of requests against the Segmind serverless API, rate-limited and "
    "resumable: batchrunner JOBS.jsonl [options]\n\nOther commands (each has --help):\n"
    + "\n".join(f"  {name:<8} {line}" for name, line in SUBCOMMANDS.items())
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchrunner", description=DESCRIPTION)
    parser.add_argument("jobs", type=Path, help="jobs file, one JSON object per line")
    parser.add_argument("--version", action="version", version=f"batchrunner {__version__}")
    parser.add_argument(
        "-o", "--output", type=Path, help="results file (default JOBS.results.jsonl)"
    )
    parser.add_argument(
        "--model", default="claude-3.5-sonnet", help="model for jobs that name none"
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get("SEGMIND_BASE_URL", DEFAULT_BASE_URL),
        help="API origin (env SEGMIND_BASE_URL; default %(default)s)",
    )
    parser.add_argument(
        "--rpm",
        type=positive_float,
        default=50.0,
        help="request budget per minute (submits, and polls when they count)",
    )
    parser.add_argument(
        "--max-in-flight", type=positive_int, help="most jobs submitted but unfinished"
    )
    parser.add_argument(
        "--polls-count",
        choices=[mode.value for mode in PollsCount],
        default="auto",
        help="whether status polls count against --rpm (auto: learn it from the first 429)",
    )
    parser.add_argument("--api-key-file", type=Path, help="file holding the API key")
    parser.add_argument(
        "--simulate", action="store_true", help="run against the built-in simulator"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start afresh: earlier results move to the history file, every job is paid again",
    )
    parser.add_argument(
        "--retry-errored",
        action="store_true",
        help="also re-run jobs whose result is a final error (inference_failed, "
        "invalid_request); retries_exhausted and expired are always retried",
    )
    parser.add_argument("--yes", action="store_true", help="do not ask before --restart")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress and no summary table: only the results line and, on a stop, why "
        "and the command that resumes",
    )
    parser.add_argument(
        "--progress-every",
        type=non_negative_float,
        default=PROGRESS_EVERY_S,
        metavar="S",
        help="when stderr is not a terminal (a log, CI), one progress line every S seconds "
        "and one at the end; 0: none",
    )
    parser.add_argument(
        "--grace",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="seconds to keep collecting in-flight results after Ctrl-C",
    )
    parser.add_argument(
        "--max-retry-after",
        type=positive_float,
        default=MAX_RETRY_AFTER_S,
        metavar="S",
        help="a longer Retry-After stops taking jobs (exit 3, resumable) instead of waiting",
    )
    parser.add_argument(
        "--max-outage",
        type=duration,
        default=MAX_OUTAGE_S,
        metavar="S",
        help="give up once the API has been unreachable this long with nothing left to "
        "collect (exit 3, resumable); seconds, or 90m, 2h",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="reuse succeeded answers of identical requests from DIR (and store new ones)",
    )
    parser.add_argument(
        "--cache-max-age",
        type=duration,
        metavar="AGE",
        help="ignore cache entries older than AGE (seconds, or with a unit: 90m, 12h, 7d)",
    )
    parser.add_argument(
        "--expected-latency",
        type=positive_float,
        metavar="S",
        help="seconds a request is expected to take, until observed (default: the model "
        "page's 11.2)",
    )
    parser.add_argument(
        "--max-cost",
        type=positive_float,
        metavar="USD",
        help="stop submitting once spent plus in-flight estimated cost would pass USD "
        "(in-flight jobs finish; exit 1; resume with a higher cap)",
    )
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where the work runs: this process, or shards on a Ray cluster (pip install "
        "'batchrunner[ray]'; one budget for the whole cluster)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --engine ray: the cluster to join (default: RAY_ADDRESS, as `ray job "
        "submit` sets it, else the one `ray start` started here, else a local Ray for the run)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="with --engine ray: shards run at once (default: the cluster's CPUs)",
    )
    parser.add_argument(
        "--shard-size",
        type=positive_int,
        metavar="N",
        help="with --engine ray: jobs per shard, the unit of work and of recovery (default "
        "1000; a rerun keeps the size its parts were made with)",
    )
    add_dry_run_options(parser)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    return parser


def check_engine_options(args: argparse.Namespace) -> None:
    """The Ray options mean nothing to the local engine: say so rather than ignore them."""
    if args.engine == "ray":
        return
    for flag, value in (
        ("--ray-address", args.ray_address),
        ("--workers", args.workers),
        ("--shard-size", args.shard_size),
    ):
        if value is not None:
            raise ConfigError(f"{flag} needs --engine ray")


def read_api_key(args: argparse.Namespace) -> ApiKey:
    if args.api_key_file is not None:
        try:
            text = args.api_key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}"
            ) from None
        if not text:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
        return ApiKey(text)
    value = os.environ.get("SEGMIND_API_KEY", "").strip()
    if not value:
        raise ConfigError(
            "no API key: set SEGMIND_API_KEY (export SEGMIND_API_KEY=...) or pass "
            "--api-key-file PATH; or try the built-in simulator with --simulate"
        )
    return ApiKey(value)


def main(argv: Sequence[str] | None = None) -> int:
    interrupts.record()  # again, for callers that did not come through __main__
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS and not Path(argv[0]).exists():
        module = importlib.import_module(f"batchrunner.{argv[0]}")
        return int(module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.dry_run:
        return _dry_run(args)
    return run_command(_main, args, argv)


def _dry_run(args: argparse.Namespace) -> int:
    """Validate and estimate every job, and say what a rerun would do; no request."""
    if not args.jobs.is_file():
        print(f"batchrunner: error: jobs file {args.jobs} not found", file=sys.stderr)
        return EXIT_USAGE
    output = args.output or default_results_path(args.jobs)
    try:
        notes = dry_run_notes(args, output, jobs_path=args.jobs)
    except (ConfigError, ResultsFileError) as exc:
        print(f"batchrunner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return main_dry_run(
        read_jobs(args.jobs, args.model),
        args.jobs.parent,
        rpm=args.rpm,
        polls_count=args.polls_count,
        price_in=args.price_in,
        price_out=args.price_out,
        output_tokens_per_job=args.output_tokens,
        notes=notes,
    )


def dry_run_notes(
    args: argparse.Namespace,
    output: Path,
    *,
    jobs_path: Path | None = None,
    jobs: JobSource | None = None,
    jobs_dir: Path | None = None,
) -> list[str]:
    """What a run would do with the results and journal earlier runs left (`plan_notes`)."""
    config = run_config(
        args,
        output=output,
        base_url=args.base_url,
        key=ApiKey("dry run: no request is sent"),
        time_scale=SIMULATE_TIME_SCALE if args.simulate else 1.0,
        jobs_path=jobs_path,
        jobs=jobs,
        jobs_dir=jobs_dir,
    )
    return plan_notes(config, time.time())


def run_command(
    command: Callable[[argparse.Namespace, list[str]], Awaitable[int]],
    args: argparse.Namespace,
    argv: list[str],
) -> int:
    """Run a command's event loop; a user's mistake or a file system error is one line, exit 2."""
    try:
        code = anyio.run(command, args, argv)
    except (ConfigError, ResultsFileError) as exc:
        print(f"batchrunner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"batchrunner: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        interrupts.record()  # the run's own handling is gone: a late signal is not a traceback
    return code


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    check_engine_options(args)
    jobs: Path = args.jobs
    if not jobs.is_file():
        raise ConfigError(f"jobs file {jobs} not found or not a file")
    total = count_job_lines(jobs)
    if total == 0:
        # Nothing is opened: an empty file must not move earlier results to history.
        say(f"the jobs file {jobs} is empty (no job lines): nothing to do")
        return 0
    output = args.output or default_results_path(jobs)
    if args.restart and not _confirm_restart(output, args.yes):
        print("batchrunner: not restarted", file=sys.stderr)
        return EXIT_USAGE
    async with _api_origin(args) as (base_url, key, time_scale):
        config = run_config(
            args, output=output, base_url=base_url, key=key, time_scale=time_scale, jobs_path=jobs
        )
        if args.engine == "ray":
            from batchrunner.shards import JsonlShards

            return await run_on_ray(args, argv, JsonlShards(jobs, args.model), config, total)
        with make_display(args, total) as display:
            outcome = await run(
                config,
                on_tick=display.update,
                on_notice=say,
                signals_before_start=interrupts.take,
            )
    print_summary(outcome, output, total, quiet=args.quiet)
    _print_ending(outcome, argv)
    return outcome.exit_code


async def run_on_ray(
    args: argparse.Namespace, argv: list[str], source: Any, config: RunConfig, total: int
) -> int:
    """`--engine ray`: the shards of `source` on a Ray cluster (batchrunner.engine_ray);
    the results line and the ending as the local engine prints them."""
    try:
        from batchrunner import engine_ray
    except ImportError as exc:
        raise ConfigError(
            f"--engine ray needs Ray ({exc.name or exc}): pip install 'batchrunner[ray]'"
        ) from None
    config.check()
    job = engine_ray.ClusterRun(
        source=source,
        config=config,
        total=total,
        workers=args.workers,
        ray_address=args.ray_address,
        progress_every_s=args.progress_every or float("inf"),
        quiet=args.quiet,
    )
    if args.shard_size is not None:
        job.shard_size = args.shard_size
    outcome = await engine_ray.run_cluster(job, say)
    in_file = outcome.in_file
    kinds = ", ".join(
        f"{in_file[kind]:,} {kind}" for kind in ("succeeded", "errored", "expired") if in_file[kind]
    )
    print(
        f"results: {config.output_path} ({sum(in_file.values()):,} of {total:,} jobs"
        f"{': ' + kinds if kinds else ''}; {outcome.merged:,} of {outcome.shards:,} shards "
        f"merged, parts in {engine_ray.parts_dir_for(config.output_path)})",
        file=sys.stderr,
        flush=True,
    )
    if outcome.exit_code != 0 and outcome.merged < outcome.shards:
        resume = "batchrunner " + shlex.join(a for a in argv if a not in ("--restart", "--yes"))
        why = "interrupted" if outcome.interrupted else "not every shard finished"
        say(f"{why}; resume with: {resume}")
    return outcome.exit_code


def make_display(args: argparse.Namespace, total: int) -> Display:
    """The progress display the options and stderr ask for (see `progress_mode`)."""
    mode = progress_mode(quiet=args.quiet, every_s=args.progress_every)
    return Display(total=total, mode=mode, every_s=args.progress_every)


def say(message: str) -> None:
    print(f"batchrunner: {message}", file=sys.stderr, flush=True)


def run_config(
    args: argparse.Namespace,
    *,
    output: Path,
    base_url: str,
    key: ApiKey,
    time_scale: float,
    jobs_path: Path | None = None,
    jobs: JobSource | None = None,
    jobs_dir: Path | None = None,
) -> RunConfig:
    """The RunConfig of the parsed run options (shared by the main command and `caption`)."""
    config = RunConfig(
        jobs_path=jobs_path,
        output_path=output,
        api_key=key,
        base_url=base_url,
        model=args.model,
        rpm=args.rpm,
        max_in_flight=args.max_in_flight,
        polls_count=PollsCount(args.polls_count),
        restart=args.restart,
        retry_errored=args.retry_errored,
        max_retry_after_s=args.max_retry_after,
        max_outage_s=args.max_outage,
        latency_prior_s=args.expected_latency or MODEL_PAGE_LATENCY_S,
        grace_s=args.grace,
        handle_signals=True,
        seed=args.seed,
        cache_dir=args.cache,
        cache_max_age_s=args.cache_max_age,
        max_cost_usd=args.max_cost,
        price_in=args.price_in,
        price_out=args.price_out,
        output_tokens_per_job=args.output_tokens,
        jobs=jobs,
        jobs_dir=jobs_dir,
    )
    if time_scale != 1.0:
        config.scale_time(time_scale)
    return config


@asynccontextmanager
async def _api_origin(args: argparse.Namespace) -> AsyncIterator[tuple[str, ApiKey, float]]:
    """(base URL, key, time scale): the real API, or a simulator on loopback."""
    if not args.simulate:
        yield args.base_url, read_api_key(args), 1.0
        return
    from batchrunner.simulator import SimConfig, run_simulator

    key = secrets.token_urlsafe(16)
    sim_config = SimConfig(
        keys=frozenset({key}),
        time_scale=SIMULATE_TIME_SCALE,
        rpm=args.rpm,
        polls_count=False,
        seed=args.seed or 0,
    )
    async with run_simulator(sim_config) as sim:
        if not args.quiet:
            speed = 1 / SIMULATE_TIME_SCALE
            say(
                f"simulating the Segmind API at {sim.url}: time and rate run {speed:g}x faster "
                f"than the real API (an {MODEL_PAGE_LATENCY_S:g} s answer takes "
                f"{MODEL_PAGE_LATENCY_S * SIMULATE_TIME_SCALE:.2g} s; "
                f"--rpm {args.rpm:g} allows {args.rpm * speed:,.0f} requests a minute)"
            )
        yield sim.url, ApiKey(key), SIMULATE_TIME_SCALE


def _confirm_restart(output: Path, yes: bool) -> bool:
    if yes or not (output.exists() or journal_path_for(output).exists()):
        return True
    if not sys.stdin.isatty():
        return True
    answer = input(f"--restart discards the results in {output}. Continue? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _print_ending(outcome: RunOutcome, argv: list[str]) -> None:
    resume = "python -m batchrunner " + shlex.join(
        a for a in argv if a not in ("--restart", "--yes")
    )
    stop = outcome.stop
    if stop is None:
        return
    if stop.reason is Reason.COST_CAP:
        say(f"stopped at the --max-cost cap; resume with a higher cap: {resume}")
    elif stop.reason in (Reason.INTERRUPTED, Reason.CALLER):
        say(f"interrupted; resume with: {resume}")
    else:  # one line: under --quiet a refused key is this and the results line
        say(f"stopped: {stop.message or stop.reason.value}; resume with: {resume}")
    if outcome.submits_abandoned:
        say(
            f"{outcome.submits_abandoned} submit(s) were abandoned in the air: a resume "
            "submits them again, and pays twice for those the API had accepted"
        )


if __name__ == "__main__":
    raise SystemExit(main())
