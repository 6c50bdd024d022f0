"""Helpers shared by the benchmarks: the simulator in its own process, sample images,
job files, machine description. Nothing here measures anything."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SimProcess:
    url: str
    process: subprocess.Popen[str]

    def stats(self, *, per_request: bool = False) -> dict:
        """The simulator's counters (the per_request dict dropped unless asked for)."""
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=120) as response:
            data = json.load(response)
        if not per_request:
            data.pop("per_request", None)
        return data


@contextlib.contextmanager
def simulator(*extra: str, time_scale: float = 0.001, seed: int = 0) -> Iterator[SimProcess]:
    """`python -m batchrunner.simulator` on a free loopback port, in its own process.

    Polls are free and there is no server-side rpm limit unless `extra` says so.
    """
    command = [
        sys.executable,
        "-m",
        "batchrunner.simulator",
        "--port",
        "0",
        "--time-scale",
        str(time_scale),
        "--latency",
        "11.2",
        "--latency-sigma",
        "0.35",
        "--polls-free",
        # Retention is scaled too: keep it an hour of the runner's (unscaled) clock,
        # since the runner is not told about the time scale.
        "--retention",
        str(3600.0 / time_scale),
        "--seed",
        str(seed),
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield SimProcess(line.removeprefix("listening on "), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def runner_env() -> dict[str, str]:
    env = _env()
    env["SEGMIND_API_KEY"] = "bench-key"
    return env


def make_images(folder: Path) -> list[str]:
    """A handful of small real images (JPEG, PNG, GIF, WebP) made with Pillow."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (ext, fmt) in enumerate(
        [("jpg", "JPEG"), ("png", "PNG"), ("gif", "GIF"), ("webp", "WEBP"), ("jpeg", "JPEG")]
    ):
        size = (64 + 16 * i, 48 + 8 * i)
        image = Image.new("RGB", size, (40 * i % 256, 120, 200 - 30 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((4, 4, size[0] - 4, size[1] - 4), fill=(250, 200 - 20 * i, 30))
        name = f"img{i}.{ext}"
        image.save(folder / name, fmt)
        names.append(name)
    return names


def write_image_jobs(path: Path, count: int, image_names: list[str]) -> int:
    """`count` caption jobs, each naming one of the images by a relative path."""
    with path.open("w") as handle:
        for i in range(count):
            image = image_names[i % len(image_names)]
            job = {
                "custom_id": f"img-{i:07d}",
                "instruction": "You write one-sentence alt text.",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "path", "path": f"images/{image}"},
                            },
                            {"type": "text", "text": "Describe this image in one sentence."},
                        ],
                    }
                ],
                "max_tokens": 128,
                "temperature": 0.2,
            }
            handle.write(json.dumps(job, separators=(",", ":")) + "\n")
    return path.stat().st_size


def write_text_jobs(path: Path, count: int) -> int:
    with path.open("w") as handle:
        for i in range(count):
            job = {
                "custom_id": f"q-{i:06d}",
                "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                "max_tokens": 64,
            }
            handle.write(json.dumps(job, separators=(",", ":")) + "\n")
    return path.stat().st_size


def rss_mb(pid: int) -> float | None:
    """A live process's resident memory in MB (Linux /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# Peak RSS of a runner alone. ru_maxrss of a child as its parent's os.wait4
# sees it starts at the parent's own high-water mark: Linux carries the old
# address space's peak into the process's maxrss at exec (exec_mmap ->
# setmax_mm_hiwater_rss), and subprocess execs from a vfork of the driver. A
# driver that once held 200 MB (the simulator's per-request stats, parsed)
# made a runner of 59 MB report 227 (bench_memory.py, stop 27). So the runner
# is started by a bare Python launcher (~13 MB) that forks and execs it, and
# reports the ru_maxrss of that grandchild from its own wait4 (SIGINT is
# passed on).
PEAK_RSS_LAUNCHER = r"""
import os, signal, sys
report, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(command[0], command)
signal.signal(signal.SIGINT, lambda *_: os.kill(pid, signal.SIGINT))
with open(report + ".pid", "w") as handle:
    handle.write(str(pid))
while True:
    try:
        _, status, usage = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
with open(report, "w") as handle:
    handle.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def launched_for_peak_rss(command: list[str], report: Path) -> list[str]:
    """`command` (an absolute executable first) run by PEAK_RSS_LAUNCHER: its
    own peak RSS goes to `report`, its pid to `report`.pid."""
    return [sys.executable, "-c", PEAK_RSS_LAUNCHER, str(report), *command]


def launched_pid(report: Path) -> int | None:
    """The pid of a command started by `launched_for_peak_rss`, once known."""
    try:
        return int(Path(f"{report}.pid").read_text())
    except (OSError, ValueError):
        return None


def peak_rss_of_launched_mb(report: Path) -> float:
    """The peak RSS a launched command reached (NaN if its launcher wrote none)."""
    try:
        return int(report.read_text()) / 1024  # Linux: kilobytes
    except (OSError, ValueError):
        return float("nan")


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.machine()}, {platform.system()} {platform.release()}"
    )


def count_results(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    ids: set[str] = set()
    with path.open("rb") as handle:
        for raw in handle:
            line = json.loads(raw)
            ids.add(line["custom_id"])
            kind = line["result"]["type"]
            counts[kind] = counts.get(kind, 0) + 1
    counts["distinct_ids"] = len(ids)
    return counts
