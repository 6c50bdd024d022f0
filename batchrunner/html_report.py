"""`batchrunner report --html`: one self-contained page, charts as inline SVG.

No script, no font, no stylesheet from elsewhere: a Content-Security-Policy in
the page forbids every fetch, so it views the same offline, attached to a CI
run or mailed. Every text from the results file is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape

from batchrunner.report import Bin, Bucket, Report, nice_step

CHART_W = 1000
CHART_H = 270
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 24, 28, 52
BAR_COLOR = "#4c78a8"
TYPE_COLORS = {"succeeded": "#2e7d32", "errored": "#c62828", "expired": "#ef6c00"}
PERCENTILE_COLORS = {50: "#2e7d32", 90: "#ef6c00", 99: "#c62828"}

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0; background: #f5f6f8; color: #1d2330; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 22px 0 8px; }
.sub { color: #5b6475; margin: 0 0 18px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; }
.card { background: #fff; border: 1px solid #dfe3ea; border-radius: 8px; padding: 10px 14px; }
.card .label { color: #5b6475; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card .note { color: #5b6475; font-size: 12px; }
.chart { background: #fff; border: 1px solid #dfe3ea; border-radius: 8px; padding: 8px; }
.chart svg { display: block; width: 100%; height: auto; }
table { border-collapse: collapse; background: #fff; border: 1px solid #dfe3ea; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #edf0f4;
         vertical-align: top; }
th { background: #eef1f5; font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.msg { word-break: break-word; color: #3a4252; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
footer { color: #7a8394; font-size: 12px; margin-top: 28px; }
"""


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _fmt_num(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"


def _utc(epoch: float, with_seconds: bool = True) -> str:
    stamp = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return stamp.strftime("%H:%M:%S" if with_seconds else "%H:%M")


def y_scale(value: float) -> tuple[float, float]:
    """(top, tick step) of a y axis from 0 that holds `value`: round ticks, at most 6 of them."""
    if value <= 0:
        return 1.0, 0.2
    step = nice_step(value / 4)
    return math.ceil(value / step - 1e-9) * step, step


@dataclass(frozen=True, slots=True)
class _Frame:
    """Plot area geometry and scales of one chart."""

    x0: float
    x1: float
    y_max: float
    y_step: float

    @property
    def plot_w(self) -> float:
        return CHART_W - MARGIN_L - MARGIN_R

    @property
    def plot_h(self) -> float:
        return CHART_H - MARGIN_T - MARGIN_B

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return MARGIN_L + (value - self.x0) / span * self.plot_w

    def y(self, value: float) -> float:
        return MARGIN_T + self.plot_h - value / self.y_max * self.plot_h


def _svg_open(chart_id: str, label: str) -> list[str]:
    return [
        f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {CHART_H}"'
        f' role="img" aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
    ]


def _y_axis(frame: _Frame, y_label: str) -> list[str]:
    parts: list[str] = []
    ticks = round(frame.y_max / frame.y_step)
    for i in range(ticks + 1):
        value = frame.y_step * i
        y = frame.y(value)
        parts.append(
            f'<line x1="{MARGIN_L}" y1="{y:.1f}" x2="{CHART_W - MARGIN_R}" y2="{y:.1f}"'
            f' stroke="{"#9aa3b2" if i == 0 else "#e6e9ef"}" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{MARGIN_L - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="12"'
            f' fill="#5b6475">{_fmt_num(value)}</text>'
        )
    mid = MARGIN_T + frame.plot_h / 2
    parts.append(
        f'<text x="16" y="{mid:.1f}" transform="rotate(-90 16 {mid:.1f})" text-anchor="middle"'
        f' font-size="12" fill="#5b6475">{escape(y_label)}</text>'
    )
    return parts


def _x_label(text: str) -> str:
    return (
        f'<text x="{MARGIN_L + (CHART_W - MARGIN_L - MARGIN_R) / 2:.1f}" y="{CHART_H - 8}"'
        f' text-anchor="middle" font-size="12" fill="#5b6475">{escape(text)}</text>'
    )


def _no_data(parts: list[str], message: str) -> str:
    parts.append(
        f'<text x="{CHART_W / 2}" y="{CHART_H / 2}" text-anchor="middle" font-size="15"'
        f' fill="#7a8394">{escape(message)}</text></svg>'
    )
    return "\n".join(parts)


def latency_histogram_svg(bins: Sequence[Bin], percentiles: dict[int, float | None]) -> str:
    """An SVG histogram of latencies, with the percentiles drawn as labelled lines."""
    parts = _svg_open("latency-histogram", "Latency histogram (seconds, jobs per bin)")
    if not bins:
        return _no_data(parts, "no latencies: no job was submitted")
    frame = _Frame(bins[0].lo, bins[-1].hi, *y_scale(max(b.count for b in bins)))
    parts += _y_axis(frame, "jobs")
    for b in bins:
        x, right = frame.x(b.lo), frame.x(b.hi)
        top = frame.y(b.count)
        height = frame.y(0) - top
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{top:.1f}" width="{max(1.0, right - x - 2):.1f}"'
            f' height="{height:.1f}" fill="{BAR_COLOR}"><title>{b.lo:g}–{b.hi:g} s: {b.count:,}'
            f" job(s)</title></rect>"
        )
    tick = nice_step((frame.x1 - frame.x0) / 10)
    first = math.ceil(frame.x0 / tick - 1e-9)
    for k in range(first, math.floor(frame.x1 / tick + 1e-9) + 1):
        edge = round(k * tick, 9)
        parts.append(
            f'<text x="{frame.x(edge):.1f}" y="{CHART_H - MARGIN_B + 18}" text-anchor="middle"'
            f' font-size="12" fill="#5b6475">{edge:g}</text>'
        )
    for rank, (p, value) in enumerate(sorted(percentiles.items())):
        if value is None:
            continue
        x = frame.x(value)
        color = PERCENTILE_COLORS.get(p, "#333")
        parts.append(
            f'<line class="percentile" x1="{x:.1f}" y1="{MARGIN_T - 4}" x2="{x:.1f}"'
            f' y2="{frame.y(0):.1f}" stroke="{color}" stroke-width="2" stroke-dasharray="5 3"/>'
        )
        anchor = "end" if x > CHART_W - MARGIN_R - 90 else "start"
        dx = -5 if anchor == "end" else 5
        parts.append(
            f'<text x="{x + dx:.1f}" y="{MARGIN_T + 10 + rank * 15}" text-anchor="{anchor}"'
            f' font-size="12" font-weight="600" fill="{color}" stroke="#fff" stroke-width="3"'
            f' paint-order="stroke">p{p} {value:.3g} s</text>'
        )
    parts.append(_x_label("latency, seconds (submit to result)"))
    parts.append("</svg>")
    return "\n".join(parts)


def throughput_svg(buckets: Sequence[Bucket], bucket_s: int) -> str:
    """An SVG bar chart of jobs finished per minute, one bar per time bucket."""
    parts = _svg_open("throughput-chart", "Throughput over time (jobs finished per minute)")
    if not buckets:
        return _no_data(parts, "no finishing times")
    rates = [b.count * 60.0 / bucket_s for b in buckets]
    start, end = buckets[0].start, buckets[-1].start + bucket_s
    frame = _Frame(start, end, *y_scale(max(rates)))
    parts += _y_axis(frame, "jobs / min")
    for b, rate in zip(buckets, rates, strict=True):
        x, right = frame.x(b.start), frame.x(b.start + bucket_s)
        top = frame.y(rate)
        gap = 1.0 if right - x > 4 else 0.0
        parts.append(
            f'<rect class="bar" x="{x + gap:.1f}" y="{top:.1f}"'
            f' width="{max(0.5, right - x - 2 * gap):.1f}" height="{frame.y(0) - top:.1f}"'
            f' fill="{BAR_COLOR}"><title>{_utc(b.start)} UTC: {b.count:,} finished'
            f" ({rate:,.1f}/min)</title></rect>"
        )
    every = max(1, math.ceil(len(buckets) / 8))
    with_seconds = bucket_s < 60
    for i in range(0, len(buckets) + 1, every):
        t = start + i * bucket_s
        parts.append(
            f'<text x="{frame.x(t):.1f}" y="{CHART_H - MARGIN_B + 18}" text-anchor="middle"'
            f' font-size="12" fill="#5b6475">{_utc(t, with_seconds)}</text>'
        )
    day = datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%d")
    parts.append(_x_label(f"finish time, UTC, from {day} ({_bucket_words(bucket_s)} per bar)"))
    parts.append("</svg>")
    return "\n".join(parts)


def _bucket_words(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{escape(note)}</div>' if note else ""
    return (
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div>{note_html}</div>'
    )


def render_html(report: Report, *, generated_at: float | None = None) -> str:
    """The whole page for `report`, as a string."""
    total = report.total

    def share(n: int) -> str:
        return f"{100 * n / total:.1f}% of {total:,}" if total else ""

    p50, p90, p99 = report.latency(50), report.latency(90), report.latency(99)
    rate = report.jobs_per_min
    mean_attempts = report.attempts_mean
    retried = sum(n for k, n in report.attempts.items() if k > 1)
    jobs_note = (
        f"{report.submitted:,} submitted · mean attempts {mean_attempts:.2f} · {retried:,} retried"
        if mean_attempts is not None
        else "none submitted"
    )
    if report.cached:
        jobs_note += f" · {report.cached:,} cached"
    cards = [
        _card("jobs", f"{total:,}", jobs_note),
        _card(
            "succeeded",
            f"{report.counts.get('succeeded', 0):,}",
            share(report.counts.get("succeeded", 0)),
        ),
        _card(
            "errored",
            f"{report.counts.get('errored', 0):,}",
            share(report.counts.get("errored", 0)),
        ),
        _card(
            "expired",
            f"{report.counts.get('expired', 0):,}",
            share(report.counts.get("expired", 0)),
        ),
        _card("latency p50", _fmt_s(p50), f"p90 {_fmt_s(p90)} · p99 {_fmt_s(p99)}"),
        _card(
            "throughput",
            "–" if rate is None else f"{rate:,.1f}/min",
            f"over {report.duration_s:,.1f} s" if report.duration_s is not None else "",
        ),
        _card(
            "tokens in / out",
            f"{report.input_tokens:,} / {report.output_tokens:,}",
        ),
        _card(
            "estimated cost",
            f"${report.cost:,.4f}",
            f"${report.price_in:g} / ${report.price_out:g} per M tokens",
        ),
    ]

    type_rows = "".join(
        f'<tr><td><span class="dot" style="background:{TYPE_COLORS.get(kind, "#777")}"></span>'
        f'{escape(kind)}</td><td class="num">{n:,}</td>'
        f'<td class="num">{(100 * n / total if total else 0):.1f}%</td></tr>'
        for kind, n in report.counts.items()
    )
    attempt_rows = "".join(
        f'<tr><td>{k if k else "0 (not submitted)"}</td><td class="num">{n:,}</td></tr>'
        for k, n in report.attempts.items()
    )
    if report.errors:
        error_rows = "".join(
            f'<tr><td>{escape(kind)}</td><td class="num">{n:,}</td>'
            f"<td>{escape(ex.custom_id)}</td>"
            f'<td class="num">{"" if ex.status is None else ex.status}</td>'
            f'<td class="msg">{escape(ex.message or "")}</td></tr>'
            for kind, n, ex in report.errors
        )
        errors_html = (
            '<table id="errors"><tr><th>error type</th><th class="num">jobs</th>'
            '<th>example job</th><th class="num">status</th><th>message</th></tr>'
            f"{error_rows}</table>"
        )
    else:
        errors_html = "<p>No errors.</p>"

    generated = datetime.fromtimestamp(
        generated_at if generated_at is not None else datetime.now(tz=timezone.utc).timestamp(),
        tz=timezone.utc,
    ).strftime("%Y-%m-%d %H:%M:%S UTC")
    skipped = (
        f" {report.skipped_lines:,} line(s) that were not result lines were skipped."
        if report.skipped_lines
        else ""
    )
    bins = report.latency_histogram()
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchrunner report: {escape(report.source)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>batchrunner report</h1>
<p class="sub">{escape(report.source)}</p>
<section class="cards">
{"".join(cards)}
</section>
<h2>Latency</h2>
<div class="chart">
{latency_histogram_svg(bins, {50: p50, 90: p90, 99: p99})}
</div>
<h2>Throughput over time</h2>
<div class="chart">
{throughput_svg(report.buckets, report.bucket_s)}
</div>
<h2>Errors</h2>
{errors_html}
<div class="two">
<div>
<h2>Results</h2>
<table id="results"><tr><th>result</th><th class="num">jobs</th><th class="num">share</th></tr>
{type_rows}</table>
</div>
<div>
<h2>Attempts</h2>
<table id="attempts"><tr><th>attempts</th><th class="num">jobs</th></tr>
{attempt_rows}</table>
</div>
</div>
<footer>Generated by batchrunner on {generated}. Latency percentiles: nearest rank over
{len(report.latencies):,} submitted jobs. Cost: an estimate from the tokens of succeeded,
not cached results.{skipped}</footer>
</main>
</body>
</html>
"""
