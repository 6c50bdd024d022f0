"""`batchrunner caption` on big folders of images (issue 5): the dry run's token
estimate against the tokens the simulator reports, and peak memory.

1. Estimate. A folder of N real images (default 10,000; JPEG, PNG, GIF and WebP
   of several sizes, one JPEG with an EXIF rotation, some with the wrong file
   extension, nested folders, plus a few text and hidden files that must be
   skipped) made with Pillow (a pool of distinct encoded images whose bytes are
   copied, so making 100,000 files takes seconds). `python -m batchrunner
   caption FOLDER --prompt ... --dry-run --base-url SIM` is run against the
   simulator, whose /_sim/stats request counters must stay at zero; its printed
   "input tokens (estimated)" is parsed (the dry run has no --json) and
   cross-checked with `batchrunner.estimate` called per job in this process.
   Then the real run, `python -m batchrunner caption FOLDER --prompt ...
   --base-url SIM --rpm 600000 --polls-count no --quiet -o OUT
   --expected-latency 0.02`, and the sum of `usage.input_tokens` of its results
   is compared with the estimate (total and per image). The same again with
   `--max-image-side 256` (images downsized at submit; the estimate predicts
   the resized size). Target: within 10%.

2. Memory. Peak RSS (the runner's own, from a bare launcher's os.wait4, as
   bench_memory.py measures it: `_common.PEAK_RSS_LAUNCHER`) of `caption` (the real run, and also
   `--dry-run` and `--write-jobs`, which stream the same source) over a folder
   of 100,000 image files, against the same commands over 1,000 files in the
   same run. Target: the real run under 200 MB at 100,000 files.

    python benchmarks/bench_caption.py                       # 10,000 / 1,000 / 100,000
    python benchmarks/bench_caption.py --images 2000 --files 20000   # quicker
    python benchmarks/bench_caption.py --no-real-big         # 100k: dry run and --write-jobs only

The simulator runs in its own process (time scale 0.001: the 11.2 s latency is
~11 ms; retention one hour of the runner's clock, as in bench_memory.py; no
rpm limit; polls free).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    SimProcess,
    launched_for_peak_rss,
    launched_pid,
    machine,
    peak_rss_of_launched_mb,
    rss_mb,
    runner_env,
    simulator,
)

TARGET_MB = 200.0
TARGET_ESTIMATE = 0.10
PROMPT = "Write one sentence of alt text for this image: what it shows, and its main colours."
INSTRUCTION = "You write short, factual alt text for a museum's image archive."
RESIZE_SIDE = 256
FILES_PER_LEAF = 100  # files per leaf folder; leaves grouped 10 to a folder


# --------------------------------------------------------------------------- images


def image_pool() -> list[tuple[str, bytes, int]]:
    """(extension, encoded bytes, tokens) of distinct small real images.

    Extensions are mostly right; a few are wrong on purpose (the runner goes by
    the bytes). Tokens: ceil(width x height / 750), the simulator's formula.
    """
    from PIL import Image, ImageDraw

    sizes = [(48, 32), (96, 64), (160, 120), (320, 240), (640, 480), (300, 900), (1024, 700)]
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("gif", "GIF"), ("webp", "WEBP")]
    pool: list[tuple[str, bytes, int]] = []
    for s, (width, height) in enumerate(sizes):
        for f, (ext, fmt) in enumerate(formats):
            image = Image.new("RGB", (width, height), (37 * s % 256, 60 * f % 256, 140))
            draw = ImageDraw.Draw(image)
            draw.ellipse((2, 2, width - 3, height - 3), fill=(250, 190 - 20 * f, 30 + 25 * s))
            draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(20, 20, 20))
            buffer = io.BytesIO()
            image.save(buffer, fmt)
            tokens = math.ceil(width * height / 750)
            if (s + f) % 7 == 3:  # the wrong name, e.g. a PNG named .jpg
                ext = {"jpg": "png", "png": "jpg", "gif": "webp", "webp": "gif"}[ext]
            pool.append((ext, buffer.getvalue(), tokens))
    # A JPEG shot "sideways": stored 400x300, EXIF orientation 6 (rotate 90).
    image = Image.new("RGB", (400, 300), (90, 160, 60))
    ImageDraw.Draw(image).rectangle((10, 10, 200, 100), fill=(240, 240, 240))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    pool.append(("jpg", buffer.getvalue(), math.ceil(400 * 300 / 750)))
    return pool


@dataclass
class Folder:
    path: Path
    images: int
    image_bytes: int
    tokens_by_pixels: int  # image tokens only, from the pool's known sizes
    skipped_files: int  # text files and hidden files, which must not become jobs


def make_folder(path: Path, count: int, pool: list[tuple[str, bytes, int]]) -> Folder:
    """`count` images in nested folders (NNN/M/img-NNNNNNN.ext), plus in every
    top folder a notes.txt and a .DS_Store (skipped by the runner)."""
    total_bytes = tokens = skipped = 0
    made: set[Path] = set()
    for i in range(count):
        top, leaf = divmod(i // FILES_PER_LEAF, 10)
        folder = path / f"{top:03d}" / f"{leaf}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
            if leaf == 0:
                (folder.parent / "notes.txt").write_text("shot list, not an image\n")
                (folder.parent / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 64)
                skipped += 2
        ext, data, image_tokens = pool[(i * 7 + i // 29) % len(pool)]
        with open(folder / f"img-{i:07d}.{ext}", "wb") as handle:
            handle.write(data)
        total_bytes += len(data)
        tokens += image_tokens
    return Folder(path, count, total_bytes, tokens, skipped)


# --------------------------------------------------------------------------- processes


@dataclass
class Measured:
    label: str
    files: int
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    rss_samples: list[tuple[float, float]]  # (seconds, RSS MB)

    @property
    def per_s(self) -> float:
        return self.files / self.wall_s if self.wall_s else 0.0


def run_measured(label: str, files: int, args: list[str], timeout_s: float, tmp: Path) -> Measured:
    """`python -m batchrunner caption ARGS` in its own process: wall time, peak RSS."""
    report = tmp / f"{label}.maxrss"
    command = launched_for_peak_rss([sys.executable, "-m", "batchrunner", "caption", *args], report)
    env = runner_env()
    env["COLUMNS"] = "160"  # the dry run's rich table, unwrapped
    out_path, err_path = tmp / f"{label}.stdout", tmp / f"{label}.stderr"
    samples: list[tuple[float, float]] = []
    runner_pid = None
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
        timed_out = False
        while True:
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if elapsed > timeout_s and not timed_out:
                timed_out = True
                process.send_signal(signal.SIGINT)  # passed on: the runner flushes, exits 130
            if runner_pid is None:
                runner_pid = launched_pid(report)
            rss = rss_mb(runner_pid) if runner_pid else None
            if rss is not None:
                samples.append((elapsed, rss))
            time.sleep(0.2)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    peak_mb = peak_rss_of_launched_mb(report)
    return Measured(
        label=label,
        files=files,
        wall_s=wall,
        peak_rss_mb=peak_mb,
        exit_code=process.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        timed_out=timed_out,
        rss_samples=samples,
    )


def requests_made(sim: SimProcess) -> tuple[dict[str, int], int]:
    stats = sim.stats()
    return stats["requests"], stats["submits_accepted"]


def dry_run_tokens(stdout: str) -> int | None:
    match = re.search(r"input tokens \(estimated\)\s*│\s*([\d,]+)", stdout)
    return int(match.group(1).replace(",", "")) if match else None


def results_tokens(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(input tokens by custom_id, result types counted) of a results file."""
    tokens: dict[str, int] = {}
    kinds: dict[str, int] = {}
    with path.open("rb") as handle:
        for raw in handle:
            line = json.loads(raw)
            result = line["result"]
            kinds[result["type"]] = kinds.get(result["type"], 0) + 1
            if result["type"] == "succeeded":
                tokens[line["custom_id"]] = result["message"]["usage"]["input_tokens"]
    return tokens, kinds


def estimates_in_process(folder: Path, max_side: int | None) -> tuple[int, dict[str, int]]:
    """(batchrunner.estimate.dry_run total, estimate per custom_id), no network."""
    from batchrunner.caption import CaptionSource
    from batchrunner.estimate import dry_run, estimate_job
    from batchrunner.reader import Job

    source = CaptionSource(folder, prompt=PROMPT, instruction=INSTRUCTION, max_side=max_side)
    report = dry_run(source(), source.path_base, rpm=600_000, polls_count=False)
    per_job: dict[str, int] = {}
    for item in source():
        if isinstance(item, Job):
            per_job[item.custom_id] = estimate_job(item, source.path_base).input_tokens
    return report.input_tokens, per_job


# --------------------------------------------------------------------------- part 1


@dataclass
class EstimateRow:
    variant: str
    images: int
    dry_s: float
    dry_exit: int
    requests_during_dry: int
    cli_estimate: int | None
    api_estimate: int
    reported: int
    results: dict[str, int]
    worst_job: tuple[str, int, int] | None  # (custom_id, estimated, reported), biggest gap
    jobs_off: int  # jobs whose estimate differs from what was reported
    real: Measured

    @property
    def ratio(self) -> float:
        return (self.cli_estimate or 0) / self.reported if self.reported else float("nan")


def real_run_args(common: list[str], url: str, out: Path) -> list[str]:
    """`caption` arguments of a real run: no rate limit, polls free, the scaled latency."""
    return [
        *common,
        "--base-url", url, "--rpm", "600000", "--polls-count", "no", "--quiet",
        "-o", str(out), "--expected-latency", "0.02",
    ]  # fmt: skip


def estimate_vs_real(
    sim: SimProcess, folder: Folder, tmp: Path, variant: str, max_side: int | None
) -> EstimateRow:
    extra = ["--max-image-side", str(max_side)] if max_side else []
    common = [str(folder.path), "--prompt", PROMPT, "--instruction", INSTRUCTION, *extra]
    before, accepted_before = requests_made(sim)
    dry = run_measured(
        f"dry-{variant}",
        folder.images,
        [*common, "--dry-run", "--base-url", sim.url, "--rpm", "600000", "--polls-count", "no"],
        600,
        tmp,
    )
    after, accepted_after = requests_made(sim)
    during = sum(after.values()) - sum(before.values()) + accepted_after - accepted_before
    cli_estimate = dry_run_tokens(dry.stdout)
    if cli_estimate is None:
        print(dry.stdout, dry.stderr, file=sys.stderr)
    api_estimate, per_job = estimates_in_process(folder.path, max_side)
    out = tmp / f"results-{variant}.jsonl"
    real = run_measured(
        f"real-{variant}",
        folder.images,
        real_run_args(common, sim.url, out),
        900,
        tmp,
    )
    if real.exit_code != 0:
        print(real.stderr[-3000:], file=sys.stderr)
    reported, kinds = results_tokens(out) if out.exists() else ({}, {})
    worst = None
    off = 0
    for custom_id, tokens in reported.items():
        estimated = per_job.get(custom_id, 0)
        if estimated != tokens:
            off += 1
            if worst is None or abs(estimated - tokens) > abs(worst[1] - worst[2]):
                worst = (custom_id, estimated, tokens)
    kinds["distinct_ids"] = len(reported)
    return EstimateRow(
        variant=variant,
        images=folder.images,
        dry_s=dry.wall_s,
        dry_exit=dry.exit_code,
        requests_during_dry=during,
        cli_estimate=cli_estimate,
        api_estimate=api_estimate,
        reported=sum(reported.values()),
        results=kinds,
        worst_job=worst,
        jobs_off=off,
        real=real,
    )


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images for the estimate")
    parser.add_argument("--files", type=int, default=100_000, help="files of the big folder")
    parser.add_argument("--baseline", type=int, default=1_000, help="files of the baseline")
    parser.add_argument(
        "--no-real-big", action="store_true", help="no real run over the big folder"
    )
    parser.add_argument("--timeout", type=float, default=900, help="SIGINT the big run after")
    parser.add_argument("--skip-estimate", action="store_true", help="memory part only")
    parser.add_argument("--skip-memory", action="store_true", help="estimate part only")
    args = parser.parse_args()

    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; load average {load:.1f}; {started:%Y-%m-%d %H:%M %Z}")
    print(
        "simulator: own process, time scale 0.001 (latency ~11 ms), retention 1 h of the "
        "runner's clock, no rpm limit, polls free"
    )
    print(
        "runner: python -m batchrunner caption FOLDER --prompt P --instruction I "
        "--base-url SIM --rpm 600000 --polls-count no --quiet -o OUT --expected-latency 0.02"
    )
    pool = image_pool()
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp_name:
        tmp = Path(tmp_name)
        with simulator(time_scale=0.001) as sim:
            if not args.skip_estimate:
                t0 = time.perf_counter()
                folder = make_folder(tmp / "estimate", args.images, pool)
                print(
                    f"\nestimate folder: {folder.images:,} images, "
                    f"{folder.image_bytes / 1e6:.1f} MB, {folder.skipped_files} text/hidden files, "
                    f"made in {time.perf_counter() - t0:.1f} s"
                )
                rows = []
                for variant, side in (("as-is", None), (f"max-side-{RESIZE_SIDE}", RESIZE_SIDE)):
                    row = estimate_vs_real(sim, folder, tmp, variant, side)
                    rows.append(row)
                    print(
                        f"  {variant}: dry run {row.dry_s:.1f} s (exit {row.dry_exit}), "
                        f"real run {row.real.wall_s:.1f} s (exit {row.real.exit_code})",
                        flush=True,
                    )
                ok &= print_estimates(rows, folder)
                shutil.rmtree(folder.path)
            if not args.skip_memory:
                ok &= memory(sim, tmp, pool, args)
    return 0 if ok else 1


def print_estimates(rows: list[EstimateRow], folder: Folder) -> bool:
    print()
    header = (
        f"{'variant':<15}{'images':>8}{'dry s':>8}{'img/s':>8}{'reqs':>6}"
        f"{'estimated':>12}{'reported':>12}{'est/rep':>9}{'jobs off':>10}{'real s':>8}{'jobs/s':>8}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for row in rows:
        print(
            f"{row.variant:<15}{row.images:>8}{row.dry_s:>8.1f}{row.images / row.dry_s:>8.0f}"
            f"{row.requests_during_dry:>6}{row.cli_estimate or 0:>12,}{row.reported:>12,}"
            f"{row.ratio:>9.4f}{row.jobs_off:>10}{row.real.wall_s:>8.1f}{row.real.per_s:>8.0f}"
        )
    print()
    for row in rows:
        complete = (
            row.results.get("succeeded") == row.images
            and row.results.get("distinct_ids") == row.images
        )
        within = abs(row.ratio - 1) <= TARGET_ESTIMATE
        row_ok = (
            complete
            and within
            and row.requests_during_dry == 0
            and row.dry_exit == 0
            and row.real.exit_code == 0
            and row.cli_estimate == row.api_estimate
        )
        ok &= row_ok
        print(
            f"{row.variant}: requests to the simulator during the dry run: "
            f"{row.requests_during_dry}; dry run printed {row.cli_estimate:,} input tokens, "
            f"batchrunner.estimate.dry_run gives {row.api_estimate:,}; results {row.results}"
        )
        if row.worst_job:
            cid, est, rep = row.worst_job
            print(f"{row.variant}: largest per-image gap: {cid}: estimated {est}, reported {rep}")
        print(
            f"{row.variant}: estimate / reported = {row.ratio:.4f}; target within "
            f"{TARGET_ESTIMATE:.0%}: {'PASS' if row_ok else 'FAIL'}"
        )
    return ok


def memory(sim: SimProcess, tmp: Path, pool: list[tuple[str, bytes, int]], args) -> bool:
    rows: list[Measured] = []
    results: dict[str, dict[str, int]] = {}
    for label, count in (("1k", args.baseline), ("big", args.files)):
        t0 = time.perf_counter()
        folder = make_folder(tmp / f"mem-{label}", count, pool)
        print(
            f"\nmemory folder {count:,} files ({folder.image_bytes / 1e6:.0f} MB) made in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        common = [str(folder.path), "--prompt", PROMPT, "--instruction", INSTRUCTION]
        commands = [
            ("dry-run", [*common, "--dry-run", "--rpm", "600000", "--polls-count", "no"]),
            ("write-jobs", [*common, "--write-jobs", str(tmp / f"jobs-{label}.jsonl")]),
        ]
        out = tmp / f"mem-{label}.results.jsonl"
        if label != "big" or not args.no_real_big:
            commands.append(
                (
                    "real",
                    real_run_args(common, sim.url, out),
                )
            )
        for kind, command in commands:
            m = run_measured(
                f"{kind}-{count}",
                count,
                command,
                args.timeout if label == "big" else 600,
                tmp,
            )
            m.label = kind
            rows.append(m)
            if kind == "real":
                _, kinds = results_tokens(out) if out.exists() else ({}, {})
                results[f"{kind} {count}"] = kinds
            if m.exit_code != 0:
                print(m.stderr[-3000:], file=sys.stderr)
            print(
                f"  {kind} over {count:,} files: {m.wall_s:.1f} s, peak RSS "
                f"{m.peak_rss_mb:.1f} MB, exit {m.exit_code}"
                + (" (TIMED OUT, stopped with SIGINT)" if m.timed_out else ""),
                flush=True,
            )
        shutil.rmtree(folder.path)
        (tmp / f"jobs-{label}.jsonl").unlink(missing_ok=True)
    baseline = {m.label: m for m in rows if m.files == args.baseline}
    print()
    header = (
        f"{'command':<12}{'files':>9}{'wall s':>9}{'files/s':>9}"
        f"{'peak RSS MB':>13}{'x 1k':>8}{'exit':>6}"
    )
    print(header)
    print("-" * len(header))
    for m in rows:
        base = baseline[m.label].peak_rss_mb
        print(
            f"{m.label:<12}{m.files:>9}{m.wall_s:>9.1f}{m.per_s:>9.0f}"
            f"{m.peak_rss_mb:>13.1f}{m.peak_rss_mb / base:>8.2f}{m.exit_code:>6}"
        )
    print()
    for name, kinds in results.items():
        print(f"{name}: results {kinds}")
    for m in rows:
        if m.files == args.files and m.rss_samples:
            marks = []
            for share in (0.1, 0.25, 0.5, 0.75, 0.9):
                at = m.wall_s * share
                seen = [rss for t, rss in m.rss_samples if t <= at]
                if seen:
                    marks.append(f"{share:.0%}: {seen[-1]:.0f}")
            top_t, top = max(m.rss_samples, key=lambda sample: sample[1])
            print(
                f"{m.label} {m.files}: RSS MB by share of wall time: {', '.join(marks)}; "
                f"highest sample {top:.0f} at {top_t / m.wall_s:.0%}"
            )
    ok = True
    for m in rows:
        if m.files != args.files:
            continue
        complete = m.exit_code == 0 and not m.timed_out
        if m.label == "real":
            kinds = results.get(f"real {m.files}", {})
            complete &= kinds.get("succeeded") == m.files
        passed = complete and m.peak_rss_mb < TARGET_MB
        ok &= passed
        print(
            f"peak RSS of caption {m.label} over {m.files:,} files: {m.peak_rss_mb:.1f} MB "
            f"({m.peak_rss_mb / baseline[m.label].peak_rss_mb:.2f}x {args.baseline:,} files); "
            f"target < {TARGET_MB:.0f} MB: {'PASS' if passed else 'FAIL'}"
            + ("" if complete else " (incomplete)")
        )
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
