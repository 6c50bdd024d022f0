"""`batchrunner report --html`: a self-contained page, rendered in headless Chromium.

The Chromium test is skipped when Debian's `chromium` is not installed
(`apt-get install chromium`). With BATCHRUNNER_SCREENSHOT_TO=docs/report.png it
also saves its screenshot there (the README's picture).
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from batchrunner.html_report import BAR_COLOR, render_html, y_scale
from batchrunner.report import compute_report, main, report_file
from batchrunner.results import errored, expired, result_line, succeeded
from batchrunner.resultsfile import ResultRow

T0 = 1_764_072_000.0  # 2025-11-25T12:00:00Z
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1200, 1400)


def nightly_eval_lines(jobs: int = 1500, seed: int = 6) -> list[bytes]:
    """A night's evaluation run as the real API would produce it: submits paced at 50 rpm,
    latency around the model's 11.2 s, a few retried jobs, some errors of each kind."""
    rng = random.Random(seed)
    lines: list[tuple[float, bytes]] = []
    for i in range(jobs):
        custom_id = f"eval-{i:04d}"
        submitted = T0 + i * 1.2 + rng.uniform(0, 0.3)
        if i % 500 == 17:
            item = result_line(
                custom_id,
                errored("invalid_job", f"line {i + 1}: messages: must be a non-empty list", None),
                finished_at=T0 + 0.01 * i,
            )
            lines.append((T0, orjson.dumps(item) + b"\n"))
            continue
        attempts = 1 if rng.random() > 0.04 else rng.randint(2, 4)
        latency = rng.lognormvariate(math.log(11.2), 0.25) + (attempts - 1) * rng.uniform(4, 12)
        if 600 < i < 660:  # a slow patch in the middle of the night
            latency *= 1.8
        finished = submitted + latency
        roll = rng.random()
        if roll < 0.006:
            result = errored("retries_exhausted", "503 Service Unavailable after 8 tries", 503)
            attempts = 8
        elif roll < 0.01:
            result = errored("inference_failed", "model error: content could not be processed", 422)
        elif roll < 0.013:
            result = expired("result expired before it was fetched (404)")
        else:
            words = rng.randint(5, 60)
            result = succeeded(
                {
                    "id": f"msg_{i:08x}",
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": " ".join(["word"] * words)}],
                    "usage": {"input_tokens": rng.randint(20, 400), "output_tokens": words * 2},
                }
            )
        item = result_line(
            custom_id,
            result,
            request_id=f"req-{i}",
            attempts=attempts,
            submitted_at=submitted,
            finished_at=finished,
        )
        lines.append((finished, orjson.dumps(item) + b"\n"))
    lines.sort(key=lambda pair: pair[0])  # results are written in finishing order
    return [raw for _, raw in lines]


@pytest.fixture
def nightly(tmp_path: Path) -> Path:
    path = tmp_path / "eval-2025-11-25.results.jsonl"
    path.write_bytes(b"".join(nightly_eval_lines()))
    return path


# --- the page itself ----------------------------------------------------------


def test_page_is_self_contained(nightly: Path) -> None:
    report, _ = report_file(nightly)
    html = render_html(report, generated_at=T0)
    assert "<script" not in html.lower()
    assert not re.search(r"\b(src|href)\s*=", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # The only URL is the SVG namespace, which is never fetched.
    assert set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}


def test_page_has_both_charts_with_one_bar_per_bin_and_bucket(nightly: Path) -> None:
    report, _ = report_file(nightly)
    html = render_html(report, generated_at=T0)
    histogram_svg = html.split('<svg id="latency-histogram"')[1].split("</svg>")[0]
    throughput_svg = html.split('<svg id="throughput-chart"')[1].split("</svg>")[0]
    assert histogram_svg.count('class="bar"') == len(report.latency_histogram())
    assert throughput_svg.count('class="bar"') == len(report.buckets)
    assert histogram_svg.count('class="percentile"') == 3
    assert report.bucket_s == 60  # a 30-minute run: one bar per minute
    for needle in ("p50", "p90", "p99", "retries_exhausted", "inference_failed", "invalid_job"):
        assert needle in html


def test_page_escapes_results_text() -> None:
    rows = [
        ResultRow(
            '<img src=x onerror="alert(1)">',
            "errored",
            latency_s=1.0,
            attempts=1,
            finished_at=T0,
            error_type="inference_failed",
            error_message="<script>alert(2)</script> & more",
        )
    ]
    html = render_html(compute_report(rows, source="<b>file</b>.jsonl"), generated_at=T0)
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>file" not in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt; &amp; more" in html


def test_page_of_empty_results() -> None:
    html = render_html(compute_report([], source="empty.jsonl"), generated_at=T0)
    assert 'id="latency-histogram"' in html and 'id="throughput-chart"' in html
    assert "no latencies" in html and "no finishing times" in html


@pytest.mark.parametrize(
    ("value", "expected"),
    [(120, (150, 50)), (1200, (1500, 500)), (4, (4, 1)), (0, (1.0, 0.2)), (7, (8, 2))],
)
def test_y_scale_is_round_and_tight(value: float, expected: tuple[float, float]) -> None:
    top, step = y_scale(value)
    assert (top, step) == pytest.approx(expected)
    assert top >= value and round(top / step) <= 6


# --- rendered in headless Chromium -------------------------------------------


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={user_data}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium)",
)
def test_html_report_renders_in_chromium(
    nightly: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(nightly.parent)  # the page names the results file as given
    assert main([nightly.name, "--html", "report.html", "--json"]) == 0
    page = (nightly.parent / "report.html").resolve()
    report, _ = report_file(nightly)

    dom = chromium("--dump-dom", page.as_uri(), user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in ("latency-histogram", "throughput-chart"):
        assert f'<svg id="{chart}"' in dom.stdout, f"{chart} missing from the rendered DOM"
    assert dom.stdout.count('class="bar"') == len(report.latency_histogram()) + len(report.buckets)

    png = tmp_path / "report.png"
    shot = chromium(f"--screenshot={png}", page.as_uri(), user_data=tmp_path / "profile-shot")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.stat().st_size > 30_000, "the screenshot is (nearly) blank"
    with Image.open(png) as image:
        assert image.size == WINDOW
        pixels: Any = image.convert("RGB")
        colors = pixels.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot has almost no detail"
    bar_rgb = tuple(int(BAR_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    bar_pixels = sum(n for n, rgb in colors if rgb == bar_rgb)
    assert bar_pixels > 20_000, f"only {bar_pixels} pixels of chart bars: the charts did not draw"

    target = os.environ.get("BATCHRUNNER_SCREENSHOT_TO")
    if target:
        shutil.copyfile(png, target)
