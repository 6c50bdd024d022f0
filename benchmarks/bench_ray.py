"""The Ray engine (issue 15): one budget shared by the cluster, against the
alternatives a user has without it, in one run; and image preparation scaling
with workers.

    python benchmarks/bench_ray.py            # 400 jobs a configuration, 200 images
    python benchmarks/bench_ray.py --quick    # a smoke run

Everything runs through the real command line, each batchrunner in its own
process, against one simulator process (time scale 0.02: an 11.2 s answer
takes 0.22 s, a minute of the account's rate window is 1.2 s). Ray is
started once in this process (`ray.init(num_cpus=2)`); the Ray driver joins it
with `--ray-address`.

Part 1, one account shared by 4 workers. The account allows R requests a
minute and polls count (submit + status + result: at best R/3 jobs a minute).
Every client runs with `--polls-count yes --expected-latency 0.22`, N jobs in
all (40%, 30%, 20% and 10% of them for the independent processes, SPLIT):
- ray: `--engine ray --workers 4 --rpm R` (one budget actor for all four);
- 4 x full: 4 independent processes, each `--rpm R` (each thinks it has the
  account to itself);
- 4 x quarter: 4 independent processes, each `--rpm R/4`.
Figures, from the simulator's `/_sim/stats`: goodput = results fetched between
the 10% and 90% marks over the time between them, as a share of R/3; the
whole makespan (first submit to last result) against N x 3 / R; 429s and their
share of all requests. The simulator's limit is 1.05 x R: the clients' --rpm is
R, and a client at exactly the limit on this loaded 2-core machine draws an
occasional 429 from timing jitter that, with the time scaled 50x but not the
budget's 60 s AIMD window, would halve its rate for the rest of the run; with
5% headroom a 429 means a client really sent too much.

Part 2, image preparation: `caption FOLDER --max-image-side 256` of M large
JPEGs (1600x1200 noise, so decoding, resizing and encoding cost what real
photos do), no rate limit, polls free, latency 0.5 model s: preparing images
is the bottleneck. The local engine (one process) against `--engine ray
--workers 1` and `--workers 2` (the machine has 2 cores). Figure: images
submitted per second between the first and the last submit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, runner_env

TIME_SCALE = 0.02
LATENCY = str(11.2 * TIME_SCALE)
R = 1800.0  # requests per minute of the clients' clocks: 30 per second
HEADROOM = 1.05
SPLIT = (0.4, 0.3, 0.2, 0.1)
"""How the independent processes share the jobs: work is seldom split evenly
(files of different sizes, machines that start late), and a process that is
done leaves its quarter of the budget unused. Ray's shards are handed out as
workers free up, so its split is whatever keeps all four busy."""


def start_simulator(*extra: str) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "batchrunner.simulator", "--port", "0",
        "--time-scale", str(TIME_SCALE), "--retention", str(3600.0 / TIME_SCALE), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("listening on "):
        raise RuntimeError(f"simulator did not start: {line!r}")
    return process, line.removeprefix("listening on ")


def sim_stats(url: str) -> dict[str, Any]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/_sim/stats", timeout=120) as response:
        return json.load(response)


def write_jobs(path: Path, first: int, count: int) -> None:
    with path.open("w") as handle:
        for n in range(first, first + count):
            job = {"custom_id": f"q-{n:06d}", "messages": [{"role": "user", "content": f"Q{n}"}]}
            handle.write(json.dumps(job) + "\n")


def batchrunner(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchrunner", *args, "--quiet"],
        cwd=REPO,
        env=runner_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if process.returncode not in (0, 1):
            print(f"  ! exit {process.returncode}: {err.decode()[-800:]}", file=sys.stderr)


def budget_figures(stats: dict[str, Any], jobs: int, rpm: float) -> dict[str, float]:
    fetched = sorted(
        rs["first_result_at"]
        for rs in stats["per_request"].values()
        if rs["first_result_at"] is not None
    )
    submitted = min(rs["submitted_at"] for rs in stats["per_request"].values())
    ideal_per_s = rpm / 60.0 / 3.0
    low, high = fetched[len(fetched) // 10], fetched[len(fetched) * 9 // 10]
    steady = (len(fetched) * 9 // 10 - len(fetched) // 10) / (high - low)
    total = sum(stats["requests"].values())
    refused = stats["rate_limited"]["total"]
    return {
        "results": len(fetched),
        "goodput_share": steady / ideal_per_s,
        "makespan_s": fetched[-1] - submitted,
        "makespan_share": jobs * 3 / (rpm / 60.0) / (fetched[-1] - submitted),
        "429s": refused,
        "429_share": refused / total,
        "requests_per_job": total / max(1, len(fetched)),
    }


def part1(folder: Path, address: str, jobs: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    common = ["--polls-count", "yes", "--expected-latency", LATENCY]
    # Per the simulator's scaled minute; it rounds a limit down, so round up.
    limit = str(math.ceil(R * TIME_SCALE * HEADROOM))
    for name in ("ray: 4 workers, one budget", "4 x full --rpm", "4 x --rpm/4"):
        sim, url = start_simulator("--rpm", limit, "--seed", "7")
        try:
            work = folder / name.split(":")[0].replace(" ", "_").replace("/", "")
            work.mkdir()
            if name.startswith("ray"):
                write_jobs(work / "jobs.jsonl", 0, jobs)
                processes = [
                    batchrunner(
                        str(work / "jobs.jsonl"), "--base-url", url, "--rpm", str(R),
                        "--engine", "ray", "--ray-address", address, "--workers", "4",
                        "--shard-size", str(jobs // 8), *common,
                    )
                ]  # fmt: skip
            else:
                rpm = R if "full" in name else R / 4
                processes = []
                first = 0
                for k, share in enumerate(SPLIT):
                    count = round(jobs * share)
                    write_jobs(work / f"jobs{k}.jsonl", first, count)
                    first += count
                    own = [str(work / f"jobs{k}.jsonl"), "--base-url", url, "--rpm", str(rpm)]
                    processes.append(batchrunner(*own, *common))
            finish(processes, timeout=600)
            time.sleep(0.5)
            rows.append((name, budget_figures(sim_stats(url), jobs, R)))
        finally:
            sim.terminate()
            sim.wait()
        print(f"  {name}: {rows[-1][1]}", file=sys.stderr)
    return rows


def make_photos(folder: Path, count: int) -> None:
    import random

    from PIL import Image

    folder.mkdir(parents=True)
    rng = random.Random(1)
    distinct = 8
    for n in range(distinct):  # noise does not compress: a real photo's decode cost
        image = Image.frombytes("RGB", (1600, 1200), rng.randbytes(1600 * 1200 * 3))
        image.save(folder / f"photo-{n:05d}.jpg", quality=90)
    for n in range(distinct, count):
        shutil.copyfile(folder / f"photo-{n % distinct:05d}.jpg", folder / f"photo-{n:05d}.jpg")


def part2(folder: Path, address: str, images: int) -> list[tuple[str, float]]:
    photos = folder / "photos"
    make_photos(photos, images)
    rows = []
    for name, extra in (
        ("local engine (1 process)", []),
        ("ray --workers 1", ["--engine", "ray", "--ray-address", address, "--workers", "1"]),
        ("ray --workers 2", ["--engine", "ray", "--ray-address", address, "--workers", "2"]),
    ):
        sim, url = start_simulator("--polls-free", "--latency", "0.5", "--seed", "3")
        output = folder / f"{name.split()[0]}-{len(rows)}.jsonl"
        try:
            command = [
                "caption", str(photos), "--prompt", "Describe it.", "--max-image-side", "256",
                "--base-url", url, "--rpm", "600000", "--polls-count", "no", "-o", str(output),
                "--expected-latency", "0.01", *extra,
            ]  # fmt: skip
            if extra:
                command += ["--shard-size", str(images // 8)]
            process = batchrunner(*command)
            finish([process], timeout=600)
            times = sorted(rs["submitted_at"] for rs in sim_stats(url)["per_request"].values())
        finally:
            sim.terminate()
            sim.wait()
        rate = (len(times) - 1) / (times[-1] - times[0])
        rows.append((name, rate))
        print(f"  {name}: {len(times)} images, {rate:.1f} images/s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    jobs, images = (160, 64) if args.quick else (400, 200)

    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = context.address_info["gcs_address"]
    print(f"machine: {machine()}; Ray {ray.__version__}; time scale {TIME_SCALE}")
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        folder = Path(tmp)
        print(
            f"\nPart 1: {jobs} jobs, 4 workers, one account of R = {R:g} requests/min "
            f"(simulator limit {HEADROOM:g} R), polls count; ideal R/3 = {R / 3:g} jobs/min"
        )
        print(f"{'configuration':32} {'goodput/(R/3)':>14} {'makespan/ideal':>15} {'429s':>6} "
              f"{'429 share':>10} {'req/job':>8}")  # fmt: skip
        for name, f in part1(folder, address, jobs):
            print(
                f"{name:32} {f['goodput_share']:14.3f} {f['makespan_share']:15.3f} "
                f"{f['429s']:6.0f} {f['429_share']:10.1%} {f['requests_per_job']:8.2f}"
            )
        print(f"\nPart 2: caption --max-image-side 256 of {images} 1600x1200 JPEGs")
        rows = part2(folder, address, images)
        base = rows[0][1]
        for name, rate in rows:
            print(f"{name:32} {rate:8.1f} images/s  x{rate / base:.2f} of the local engine")
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


if __name__ == "__main__":
    main()
