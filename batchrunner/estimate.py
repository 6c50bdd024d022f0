"""Dry run: read and validate every job without calling the API, and estimate
tokens, cost and duration before paying.

Token estimate (the simulator's formula, `batchrunner.simulator.server.input_tokens`):
ceil(characters of the instruction and every text / 4) plus, per image,
ceil(width x height / 750) for the image as it would be sent (after
`max_side` downsizing). Output tokens cannot be known before the run: the
estimate assumes a fixed number per job (capped by the job's `max_tokens`) and
says so. Duration: every valid job costs 1 request against `--rpm` (submit),
or 3 when status polls count too (submit, status, result), plus one model
latency for the last job.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchrunner.argtypes import non_negative_float, positive_int
from batchrunner.budget import PollsCount
from batchrunner.digests import DigestSet
from batchrunner.imagecheck import (
    MAX_IMAGE_SIDE,
    image_tokens,
    prepare_image,
    prepare_image_bytes,
    probe_image,
    probe_image_bytes,
)
from batchrunner.images import (
    MAX_IMAGE_BYTES,
    ImageError,
    image_blocks,
    max_side_of,
    resolve_image_path,
)
from batchrunner.models import IMAGE_TOKENS_AT_MOST, LIMITS
from batchrunner.prepare import is_member, read_member, source_label
from batchrunner.price import DEFAULT_PRICE_IN, DEFAULT_PRICE_OUT, PriceList
from batchrunner.reader import InvalidJob, Job
from batchrunner.schedule import MODEL_PAGE_LATENCY_S

CHARS_PER_TOKEN = 4
DEFAULT_OUTPUT_TOKENS_PER_JOB = 150
"""Assumed answer length: a caption of a few sentences."""
SHOWN_INVALID = 10


@dataclass(frozen=True, slots=True)
class JobEstimate:
    input_tokens: int
    image_bytes: int
    images: int
    resized: int
    url_images: int = 0


@dataclass(slots=True)
class DryRunReport:
    jobs: int = 0
    valid: int = 0
    invalid: int = 0
    invalid_examples: list[tuple[str, int, str]] = field(default_factory=list)
    """(custom_id, line, message) of the first invalid jobs."""
    invalid_by_kind: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    models: Counter[str] = field(default_factory=Counter)
    """Valid jobs per model (the prices are one model's: a mix of models is worth seeing)."""
    model_aliases: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(model id of the line, Segmind slug it was mapped to): jobs."""
    url_images: int = 0
    """Images given by URL: not fetched, counted at IMAGE_TOKENS_AT_MOST tokens each."""
    images: int = 0
    resized_images: int = 0
    image_bytes: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    output_tokens_per_job: int = DEFAULT_OUTPUT_TOKENS_PER_JOB
    price_in: float = DEFAULT_PRICE_IN
    price_out: float = DEFAULT_PRICE_OUT
    rpm: float = 50.0
    polls_count: bool | None = None
    latency_s: float = MODEL_PAGE_LATENCY_S
    notes: list[str] = field(default_factory=list)

    @property
    def cost_in_usd(self) -> float:
        return PriceList(self.price_in, self.price_out).cost_usd(self.input_tokens, 0)

    @property
    def cost_out_usd(self) -> float:
        return PriceList(self.price_in, self.price_out).cost_usd(0, self.output_tokens)

    @property
    def cost_usd(self) -> float:
        return self.cost_in_usd + self.cost_out_usd

    @property
    def requests_per_job(self) -> tuple[int, int]:
        """(fewest, most) requests per job against the rpm budget."""
        if self.polls_count is None:
            return 1, 3
        return (3, 3) if self.polls_count else (1, 1)

    @property
    def duration_s(self) -> tuple[float, float]:
        """(shortest, longest) estimated wall time of the run."""
        if not self.valid:
            return 0.0, 0.0
        low, high = self.requests_per_job
        per_request = 60.0 / self.rpm
        return (
            self.valid * low * per_request + self.latency_s,
            self.valid * high * per_request + self.latency_s,
        )

    @property
    def exit_code(self) -> int:
        return 0 if self.invalid == 0 else 1


def body_text_chars(body: dict[str, Any]) -> int:
    """Characters of the instruction and of every text the model reads."""
    instruction = body.get("instruction")
    chars = len(instruction) if isinstance(instruction, str) else 0
    for message in body.get("messages", ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "text":
                    text = block.get("text")
                    chars += len(text) if isinstance(text, str) else 0
    return chars


def estimate_job_tokens(job: Job, jobs_dir: Path) -> tuple[int, int]:
    """(estimated input tokens, bytes of images to send) of one job.

    Reads image headers only (no full decode) and makes no request; raises
    ImageError for an image that could not be sent. Cheap enough to call per
    job before submitting it (for a cost cap), best from a worker thread.
    """
    estimate = estimate_job(job, jobs_dir)
    return estimate.input_tokens, estimate.image_bytes


def estimate_job(job: Job, jobs_dir: Path) -> JobEstimate:
    tokens = math.ceil(body_text_chars(job.body) / CHARS_PER_TOKEN)
    image_bytes = images = resized = url_images = 0
    for source in (block["source"] for block in image_blocks(job.body)):
        images += 1
        if source.get("type") == "url":
            # Not fetched: an estimate makes no request, to the API or elsewhere.
            tokens += IMAGE_TOKENS_AT_MOST
            url_images += 1
            continue
        if source.get("type") == "path":
            width, height, size, was_resized = _path_image(source, jobs_dir)
            resized += was_resized
        else:
            width, height, size = _inline_image(source)
        tokens += image_tokens(width, height)
        image_bytes += size
    return JobEstimate(tokens, image_bytes, images, resized, url_images)


def output_tokens_for(job: Job, per_job: int) -> int:
    """The assumed output tokens of a job: `per_job`, capped by its max_tokens."""
    cap = job.body.get("max_tokens")
    return min(per_job, cap) if isinstance(cap, int) and cap > 0 else per_job


def dry_run(
    items: Iterable[Job | InvalidJob],
    jobs_dir: Path,
    *,
    rpm: float,
    polls_count: bool | None,
    price_in: float = DEFAULT_PRICE_IN,
    price_out: float = DEFAULT_PRICE_OUT,
    output_tokens_per_job: int | None = None,
) -> DryRunReport:
    """Read and check every job (images included) and estimate the run; no network.

    `polls_count` None means unknown (the CLI's `auto`): the duration is a range.
    """
    per_job = output_tokens_per_job or DEFAULT_OUTPUT_TOKENS_PER_JOB
    report = DryRunReport(
        output_tokens_per_job=per_job,
        price_in=price_in,
        price_out=price_out,
        rpm=rpm,
        polls_count=polls_count,
    )
    seen = DigestSet()
    for item in items:
        report.jobs += 1
        if item.custom_id in seen:
            _duplicate(report, item.custom_id)
            _invalid(report, item.custom_id, item.line, "duplicate custom_id", None)
            continue
        seen.add(item.custom_id)
        if isinstance(item, InvalidJob):
            if "custom_id: duplicate" in item.message:
                _duplicate(report, item.custom_id.partition("#line-")[0])
            _invalid(report, item.custom_id, item.line, reason_kind(item.message), item.message)
            continue
        try:
            estimate = estimate_job(item, jobs_dir)
        except ImageError as exc:
            _invalid(report, item.custom_id, item.line, f"image: {exc.kind}", str(exc))
            continue
        limits = LIMITS.get(item.model)
        if limits is not None and estimate.input_tokens > limits.context_tokens:
            message = (
                f"line {item.line}: about {estimate.input_tokens:,} input tokens (estimated), "
                f"over the {limits.context_tokens:,}-token context window of {item.model}"
            )
            _invalid(report, item.custom_id, item.line, "over the context window", message)
            continue
        if item.model_alias is not None:
            report.model_aliases[(item.model_alias, item.model)] += 1
        report.url_images += estimate.url_images
        report.valid += 1
        report.models[item.model] += 1
        report.images += estimate.images
        report.resized_images += estimate.resized
        report.image_bytes += estimate.image_bytes
        report.input_tokens += estimate.input_tokens
        report.output_tokens += output_tokens_for(item, per_job)
    return report


def reason_kind(message: str) -> str:
    """A short kind for an invalid job's message, to count them by reason."""
    rest = re.sub(r"^line \d+: ", "", message)
    if "custom_id: duplicate" in rest:
        return "duplicate custom_id"
    if rest.startswith(("image ", "file ")):
        for fragment, kind in (
            ("not found", "not_found"),
            ("is a directory", "not_found"),
            ("not a regular file", "not_a_file"),
            ("truncated", "truncated"),
            ("corrupt", "corrupt"),
            ("5 MB", "too_large"),
            ("pixel limit", "too_large"),
            ("not a JPEG, PNG, GIF or WebP", "not_an_image"),
            ("cannot be read", "unreadable"),
        ):
            if fragment in rest:
                if kind == "not_an_image" and re.search(r" is an? [\w ]+ image, not", rest):
                    kind = "unsupported_format"
                return f"image: {kind}"
        return "image"
    field_match = re.match(r"([A-Za-z_][\w.\[\]]*): ", rest)
    if field_match:
        return re.sub(r"\[\d+\]", "[]", field_match.group(1))
    return re.split(r"[(,]", rest, maxsplit=1)[0].strip()


def print_report(report: DryRunReport, console: Console | None = None) -> None:
    """The report as a rich table on stdout (or `console`)."""
    console = console or Console(highlight=False)
    table = Table(title="batchrunner dry run (no request was made)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("jobs", f"{report.jobs:,}")
    table.add_row("  valid", f"{report.valid:,}")
    table.add_row("  invalid", f"{report.invalid:,}")
    for kind, count in sorted(report.invalid_by_kind.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"    {kind}", f"{count:,}")
    table.add_row("duplicate custom_ids", f"{report.duplicates:,}")
    table.add_row("models (valid jobs)", f"{len(report.models):,}")
    for model, count in sorted(report.models.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"  {model}", f"{count:,}")
    table.add_row("images", f"{report.images:,}")
    if report.resized_images:
        table.add_row("  resized (bytes estimated by pixel ratio)", f"{report.resized_images:,}")
    table.add_row("image bytes to send", _bytes(report.image_bytes))
    table.add_row("input tokens (estimated)", f"{report.input_tokens:,}")
    table.add_row(
        f"output tokens (assumed {report.output_tokens_per_job:,} per job)",
        f"{report.output_tokens:,}",
    )
    table.add_row(
        f"cost at ${report.price_in:g} / ${report.price_out:g} per M tokens in / out",
        f"${report.cost_usd:,.2f} (in ${report.cost_in_usd:,.2f}, out ${report.cost_out_usd:,.2f})",
    )
    low, high = report.requests_per_job
    low_s, high_s = report.duration_s
    if low == high:
        per_job = f"{low} request(s) per job"
        duration = _duration(low_s)
    else:
        per_job = f"{low} to {high} requests per job (polls may count)"
        duration = f"{_duration(low_s)} to {_duration(high_s)}"
    table.add_row(f"duration at {report.rpm:g} rpm, {per_job}", duration)
    console.print(table)
    for custom_id, line, message in report.invalid_examples:
        reason = re.sub(r"^line \d+: ", "", message)
        console.print(f"invalid: {custom_id} (line {line}): {reason}", markup=False)
    shown = len(report.invalid_examples)
    if report.invalid > shown:
        console.print(f"... and {report.invalid - shown:,} more invalid job(s), counted above")
    if report.duplicate_examples:
        more = report.duplicates - len(report.duplicate_examples)
        console.print(
            "duplicate custom_ids: "
            + ", ".join(report.duplicate_examples)
            + (f" and {more:,} more" if more > 0 else ""),
            markup=False,
        )
    for (alias, slug), count in sorted(report.model_aliases.items()):
        console.print(f"model id mapped: {alias} -> {slug} ({count:,} job(s))", markup=False)
    if report.url_images:
        console.print(
            f"{report.url_images:,} image(s) given by URL: fetched only when their job is "
            f"submitted; counted here at {IMAGE_TOKENS_AT_MOST:,} input tokens each (the most "
            "an image costs once the model has scaled it down)",
            markup=False,
        )
    for note in report.notes:
        console.print(note, markup=False)
    console.print(
        f"Output tokens are an assumption ({report.output_tokens_per_job:,} per job, capped "
        "by max_tokens; change it with --output-tokens); input tokens use width x height / 750 "
        "per image and characters / 4 for text."
    )


def main_dry_run(
    items: Iterable[Job | InvalidJob],
    jobs_dir: Path,
    *,
    rpm: float,
    polls_count: bool | PollsCount | None,
    price_in: float = DEFAULT_PRICE_IN,
    price_out: float = DEFAULT_PRICE_OUT,
    output_tokens_per_job: int | None = None,
    notes: Iterable[str] = (),
    console: Console | None = None,
) -> int:
    """Dry run, report on stdout, exit code: 0 when every job is valid, 1 otherwise."""
    report = dry_run(
        items,
        jobs_dir,
        rpm=rpm,
        polls_count=polls_count_flag(polls_count),
        price_in=price_in,
        price_out=price_out,
        output_tokens_per_job=output_tokens_per_job,
    )
    report.notes.extend(notes)
    print_report(report, console)
    return report.exit_code


def polls_count_flag(mode: bool | PollsCount | str | None) -> bool | None:
    """True/False when known, None for `auto`."""
    if mode is None or isinstance(mode, bool):
        return mode
    value = PollsCount(mode) if isinstance(mode, str) else mode
    return {PollsCount.YES: True, PollsCount.NO: False}.get(value)


def add_dry_run_options(parser: argparse.ArgumentParser) -> None:
    """--dry-run, --price-in, --price-out, --output-tokens (shared by both commands)."""
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read and check every job, estimate tokens, cost and duration; no request",
    )
    parser.add_argument(
        "--price-in",
        type=non_negative_float,
        default=DEFAULT_PRICE_IN,
        help="dollars per million input tokens (default %(default)s)",
    )
    parser.add_argument(
        "--price-out",
        type=non_negative_float,
        default=DEFAULT_PRICE_OUT,
        help="dollars per million output tokens (default %(default)s)",
    )
    parser.add_argument(
        "--output-tokens",
        type=positive_int,
        default=DEFAULT_OUTPUT_TOKENS_PER_JOB,
        help="output tokens assumed per job in estimates (default %(default)s)",
    )


# --------------------------------------------------------------------------- internals


def _path_image(source: dict[str, Any], jobs_dir: Path) -> tuple[int, int, int, bool]:
    """(width, height, bytes, resized) of a local image as it would be sent."""
    label = source["path"]
    path = resolve_image_path(label, jobs_dir)
    max_side = max_side_of(source)
    data: bytes | None = None
    if is_member(source):  # a tar member or a Parquet cell
        label = source_label(source)
        data = read_member(source, jobs_dir)
        info = probe_image_bytes(data, label)
    else:
        info = probe_image(path, label)
    width, height = info.sent_size(max_side)
    size = info.estimated_sent_bytes(max_side)
    if size > MAX_IMAGE_BYTES or max(width, height) > MAX_IMAGE_SIDE:
        # Refused as it is, or maybe after resizing: find out for certain.
        if data is not None:
            prepared = prepare_image_bytes(data, label, max_side)
        else:
            prepared = prepare_image(path, label, max_side)
        return prepared.width, prepared.height, len(prepared.data), prepared.resized
    return width, height, size, info.needs_resize(max_side)


def _inline_image(source: dict[str, Any]) -> tuple[int, int, int]:
    from PIL import Image

    try:
        raw = base64.b64decode(source.get("data", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("inline image: data is not valid base64", kind="corrupt") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ImageError(f"inline image: {len(raw):,} bytes, over the 5 MB limit", kind="too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
    except Exception as exc:
        raise ImageError(f"inline image: cannot be read ({exc})", kind="corrupt") from None
    return width, height, len(raw)


def _invalid(
    report: DryRunReport, custom_id: str, line: int, kind: str, message: str | None
) -> None:
    report.invalid += 1
    report.invalid_by_kind[kind] += 1
    if len(report.invalid_examples) < SHOWN_INVALID:
        report.invalid_examples.append((custom_id, line, message or kind))


def _duplicate(report: DryRunReport, custom_id: str) -> None:
    report.duplicates += 1
    if len(report.duplicate_examples) < SHOWN_INVALID:
        report.duplicate_examples.append(custom_id)


def _bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit} ({count:,} bytes)"
    return f"{count:,} bytes"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"
