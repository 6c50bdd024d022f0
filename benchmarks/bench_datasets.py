"""Issue 14: caption over datasets, the three figures the issue asks for, each
against a baseline measured in the same run.

1. Dry-run check. N 3-megapixel JPEGs (photo-like: a gradient plus noise,
   quality 90): `imagecheck.probe_image` (the dry run's check: the header, the
   EOI marker) against a full decode (`Image.open(p).load()`, what a careful
   user's check does) and against the 1/8-scale draft decode the dry run used
   before. Target: >= 50x faster than the full decode.

2. Preparation. The same JPEGs with `--max-image-side 1024`: the runner's path
   (`prepare.prepare_one` from 16 concurrent asyncio tasks, as the 16 submit
   workers call it: read, EXIF orientation, resize, encode, base64 in the
   process pool) against a single-process Pillow loop doing the same work
   (open, draft, exif_transpose, resize LANCZOS, save JPEG q85, b64encode).
   Target: >= 0.8 x cores x the loop's images per second.

3. Memory. Peak RSS (the runner's own; `_common.PEAK_RSS_LAUNCHER`) of
   `batchrunner caption SHARDS --prompt ... --dry-run` over WebDataset shards of
   10,000 and of --big tiny images (the dry run streams every shard and checks
   every image, as a run's reader does), and of the real run through the
   simulator over 10,000 (`--real` also at --big).

    python benchmarks/bench_datasets.py                 # 24 JPEGs, 10k / 1M shards
    python benchmarks/bench_datasets.py --big 200000    # quicker memory figure
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    launched_for_peak_rss,
    machine,
    peak_rss_of_launched_mb,
    runner_env,
)
from PIL import Image, ImageOps

sys.path.insert(0, str(REPO))

from batchrunner import prepare
from batchrunner.imagecheck import probe_image


def make_jpegs(folder: Path, count: int) -> list[Path]:
    base = Image.linear_gradient("L").resize((2048, 1536)).convert("RGB")
    paths = []
    for n in range(count):
        noise = Image.effect_noise((2048, 1536), 40 + n).convert("RGB")
        image = Image.blend(base, noise, 0.3)
        path = folder / f"photo-{n:03d}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def per_image(func, paths: list[Path], rounds: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            func(path)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best


PREPARE_ROUNDS = 5


def full_decode(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def draft_decode(path: Path) -> None:
    with Image.open(path) as image:
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()


def pillow_loop(path: Path, max_side: int = 1024) -> str:
    """What a careful user writes: draft, orientation, resize, encode, base64.

    The draft asks for the target size itself (aspect kept), as batchrunner
    does: `draft("RGB", (max_side, max_side))` would ask a 2048x1536 JPEG for
    at least 1024 rows, get no DCT scaling at all, and make the loop 2-3x
    slower than the same work done well (an unfair baseline)."""
    with Image.open(path) as image:
        scale = max_side / max(image.size)
        image.draft("RGB", (round(image.width * scale), round(image.height * scale)))
        image = ImageOps.exif_transpose(image)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=None)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


async def pooled(paths: list[Path], max_side: int) -> None:
    queue = list(paths)

    async def worker() -> None:
        while queue:
            path = queue.pop()
            source = {"type": "path", "path": str(path), "max_side": max_side}
            await prepare.prepare_one(source, Path("/"), None)

    await asyncio.gather(*(worker() for _ in range(16)))


def dry_run_and_prepare(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), count)
        size = sum(p.stat().st_size for p in paths) / len(paths)
        print(f"{count} JPEGs 2048x1536, {size / 1024:.0f} KB each on average")
        full = per_image(full_decode, paths)
        draft = per_image(draft_decode, paths)
        quick = per_image(probe_image, paths)
        print(
            f"dry-run check: full decode {full * 1000:.2f} ms, 1/8 draft {draft * 1000:.2f} ms, "
            f"probe_image {quick * 1000:.3f} ms per image -> {full / quick:.0f}x faster than "
            f"the full decode (target >= 50x), {draft / quick:.0f}x than the draft"
        )
        cores = prepare.cores()
        # Rounds of at least 48 images (each file several times: the same work),
        # loop and pool alternating, so both see the same neighbours' load; the
        # median of the per-round ratios, and their range.
        batch = paths * max(1, -(-48 // len(paths)))
        prepare.prepare_pool()  # started before timing: a run starts it once
        asyncio.run(pooled(paths[:cores], 1024))
        ratios, loop_rates, pool_rates = [], [], []
        for _ in range(PREPARE_ROUNDS):
            loop_s = per_image(pillow_loop, batch, rounds=1)
            start = time.perf_counter()
            asyncio.run(pooled(batch, 1024))
            pool_s = (time.perf_counter() - start) / len(batch)
            loop_rates.append(1 / loop_s)
            pool_rates.append(1 / pool_s)
            ratios.append((1 / pool_s) / (cores / loop_s))
        print(
            f"preparation (--max-image-side 1024), {PREPARE_ROUNDS} alternating rounds of "
            f"{len(batch)} images: Pillow loop {statistics.median(loop_rates):.1f} images/s on "
            f"one core, batchrunner's pool {statistics.median(pool_rates):.1f} images/s on "
            f"{cores} cores = {statistics.median(ratios):.2f} x cores x the loop (median; "
            f"rounds {min(ratios):.2f} to {max(ratios):.2f}; target >= 0.8)"
        )
        prepare.shutdown_pool()


def make_shards(folder: Path, images: int, per_shard: int = 10_000) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(buffer, "PNG")
    png = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, images, per_shard):
        with tarfile.open(folder / f"{shards:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for n in range(start, min(images, start + per_shard)):
                info = tarfile.TarInfo(f"{n:09d}.png")
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))
        shards += 1
    return str(folder)


def peak_rss(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """The command's own peak RSS (MB; see `_common.PEAK_RSS_LAUNCHER`), wall time, exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "maxrss"
        start = time.perf_counter()
        child = subprocess.Popen(
            launched_for_peak_rss(args, report),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, status, _ = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        return peak_rss_of_launched_mb(report), elapsed, child.returncode


def memory(sizes: list[int], real: list[int]) -> None:
    env = runner_env()
    env.pop("SEGMIND_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        for images in sizes:
            shards = make_shards(Path(tmp) / f"s{images}", images)
            base = [sys.executable, "-m", "batchrunner", "caption", shards, "--prompt", "Describe."]
            mb, seconds, code = peak_rss([*base, "--dry-run"], env)
            print(f"dry run over {images:>9,} images in shards: peak RSS {mb:6.1f} MB, "
                  f"{seconds:6.1f} s (exit {code})")  # fmt: skip
            if images in real:
                out = str(Path(tmp) / f"r{images}.jsonl")
                run = [*base, "--simulate", "--quiet", "--rpm", "600000", "--polls-count", "no",
                       "-o", out]  # fmt: skip
                mb, seconds, code = peak_rss(run, env)
                print(f"real run over {images:>9,} images (simulator): peak RSS {mb:6.1f} MB, "
                      f"{seconds:6.1f} s (exit {code})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=24)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--real", action="store_true", help="the real run at --big too")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(machine())
    dry_run_and_prepare(args.jpegs)
    if not args.skip_memory:
        memory([args.small, args.big], [args.small, args.big] if args.real else [args.small])


if __name__ == "__main__":
    main()
