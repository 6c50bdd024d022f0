"""`--engine ray` on a real local Ray (issue 15): the real command against the
simulator as a subprocess, its worker processes and its driver killed for real.

One Ray for the module (starting one takes seconds): this process starts it
with 2 CPUs, and each `batchrunner ... --engine ray --ray-address ADDR` joins it
as its own driver, as on a cluster that already runs. The two process
scenarios run one after the other (the rate one must not share the cores).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_process import (
    FAULTS,
    REPO,
    Run,
    Simulator,
    complete_lines,
    duplicates,
    job_body_hash,
    journal_records,
    read_jsonl_strict,
    runner_env,
    wait_until,
    write_jobs,
)

ray = pytest.importorskip("ray")

from batchrunner.engine_ray import NAMESPACE, BudgetActor, actor_name  # noqa: E402
from batchrunner.shards import parts_dir_for  # noqa: E402

LATENCY = "0.22"  # the simulator's 11.2 s at --time-scale 0.02: first polls come early


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    context = ray.init(
        num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False
    )
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _command(jobs: Path, results: Path, sim: Simulator, address: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchrunner",
        str(jobs),
        "-o",
        str(results),
        "--base-url",
        sim.url,
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--expected-latency",
        LATENCY,
        *extra,
    ]


def _start(argv: list[str], folder: Path, name: str) -> Run:
    return Run(argv, runner_env("sk-test-key"), folder, name).start()


def _attempts(results: Path) -> dict[str, dict[str, Any]]:
    """What the driver's budget actor knows of each shard attempt ({} before it exists)."""
    try:
        actor = ray.get_actor(actor_name(results), namespace=NAMESPACE)
        return ray.get(actor.statistics.remote(), timeout=10)["attempts"]
    except (ValueError, ray.exceptions.RayError):
        return {}


def _merged(parts: Path) -> int:
    return sum(b'"done"' in line for line in complete_lines(parts / "merged.jsonl"))


# --------------------------------------------------------------------------- kills


@pytest.fixture(scope="module")
def kills(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 workers on 150 jobs in shards of 10: a worker process is SIGKILLed with
    requests in flight, later the driver; then the same command runs to the end."""
    folder = tmp_path_factory.mktemp("ray_kills")
    jobs_path = folder / "jobs.jsonl"
    jobs = write_jobs(jobs_path, 150)
    results = folder / "jobs.results.jsonl"
    parts = parts_dir_for(results)
    with Simulator(list(FAULTS), folder / "sim.log") as sim:
        argv = _command(
            jobs_path, results, sim, ray_address,
            "--workers", "3", "--shard-size", "10", "--rpm", "1200", "--progress-every", "0.5",
        )  # fmt: skip
        first = _start(argv, folder, "run1")
        try:
            victim: dict[str, Any] = {}

            def worker_mid_shard() -> bool:
                for figures in _attempts(results).values():
                    journal = parts / f"{figures['shard']}.jsonl.journal"
                    if figures["in_flight"] >= 3 and journal_records(journal):
                        victim.update(figures, journaled=len(journal_records(journal)))
                        return True
                return False

            wait_until(worker_mid_shard, first, 60, "a worker with journaled requests in flight")
            os.kill(victim["pid"], signal.SIGKILL)
            wait_until(lambda: _merged(parts) >= 5, first, 60, "5 shards merged")
            first.kill()  # the driver: Ray ends its job, its tasks and its actor
            merged_before = _merged(parts)
            status = subprocess.run(
                [sys.executable, "-m", "batchrunner", "status", str(results), "--json"],
                cwd=REPO, capture_output=True, text=True, check=True,
            )  # fmt: skip
            merged_lines = len(complete_lines(results))
            second = _start(argv, folder, "run2")
            code = second.wait(120)
        finally:
            first.kill()
        stats = sim.settled_stats()
    return {
        "jobs": jobs,
        "results": results,
        "parts": parts,
        "victim": victim,
        "merged_before": merged_before,
        "status": json.loads(status.stdout),
        "merged_lines": merged_lines,
        "runs": (first, second),
        "code": code,
        "stats": stats,
    }


def test_three_workers_one_merged_line_per_job_each_with_its_own_answer(
    kills: dict[str, Any],
) -> None:
    assert kills["code"] in (0, 1), kills["runs"][1].stderr()[-3000:]
    lines = read_jsonl_strict(kills["results"])
    ids = [line["custom_id"] for line in lines]
    assert not duplicates(ids)
    assert set(ids) == {job["custom_id"] for job in kills["jobs"]}
    succeeded = 0
    for line in lines:
        if line["result"]["type"] == "succeeded":
            succeeded += 1
            text = line["result"]["message"]["content"][0]["text"]
            number = int(line["custom_id"].split("-")[1])
            assert f"item job-{number}." in text, (line["custom_id"], text)
    assert succeeded >= 130  # the simulator fails ~2% of jobs on purpose
    for run in kills["runs"]:
        assert "Traceback" not in run.stderr(), run.stderr()[-3000:]
    # The driver showed the cluster and its workers.
    log = kills["runs"][0].stderr()
    assert re.search(r"cluster: \d+/150 jobs done", log), log[-2000:]
    assert re.search(r"worker pid \d+ on .*: shard lines-", log), log[-2000:]


def test_killed_worker_loses_nothing_and_no_journaled_job_is_paid_again(
    kills: dict[str, Any],
) -> None:
    victim = kills["victim"]
    # The killed worker's shard was finished by another process (Ray's retry or
    # the second driver's), from its journal: merged, every line there.
    parts = kills["parts"]
    assert f'"done":"{victim["shard"]}"'.encode() in (parts / "merged.jsonl").read_bytes()
    assert len(read_jsonl_strict(parts / f"{victim['shard']}.jsonl")) == 10
    assert len(journal_records(parts / f"{victim['shard']}.jsonl.journal")) >= victim["journaled"]
    per_request = kills["stats"]["per_request"]
    by_hash: dict[str, list[tuple[float, str]]] = {}
    for rid, rs in per_request.items():
        by_hash.setdefault(rs["body_hash"], []).append((rs["submitted_at"], rid))
    hash_of = {job["custom_id"]: job_body_hash(job) for job in kills["jobs"]}
    journaled = 0
    for journal in kills["parts"].glob("*.jsonl.journal"):
        for record in journal_records(journal):
            journaled += 1
            rid = record["request_id"]
            at = per_request[rid]["submitted_at"]
            later = [r for t, r in by_hash[hash_of[record["custom_id"]]] if t > at]
            assert not later, f"{record['custom_id']}: journaled {rid}, paid again as {later}"
    assert journaled >= 150
    # Paid twice at most for the submits in the air when the worker died.
    assert kills["stats"]["duplicate_submits"] <= 16


def test_killed_driver_rerun_of_the_same_command_resumes(kills: dict[str, Any]) -> None:
    second = kills["runs"][1].stderr()
    done_before = int(re.search(r"shard\(s\) of up to 10 jobs, (\d+) done before", second)[1])
    assert done_before >= 5 and done_before == kills["merged_before"]
    assert "results: " in second and "15 of 15 shards merged" in second
    # Meanwhile `status` counted the parts not merged yet (their lines and journals)
    # beside the merged lines: three shards were running when the driver died.
    status = kills["status"]
    assert kills["merged_lines"] == 10 * done_before
    assert status["done_total"] + status["in_flight"] > kills["merged_lines"], status


# --------------------------------------------------------------------------- caption, Ctrl-C


def test_caption_folder_on_ray_ctrl_c_then_the_same_command_resumes(
    ray_address: str, tmp_path: Path
) -> None:
    """`caption FOLDER --engine ray`: shards of the folder's images; a Ctrl-C
    stops the shards (exit 130, the resume command); the rerun finishes, each
    image with its own caption, no journaled image paid again."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(40):  # each its own size: the simulator's caption names it
        Image.new("RGB", (40 + n, 30), (n * 6, 80, 160)).save(photos / f"p{n:02d}.png")
    results = tmp_path / "captions.jsonl"
    parts = parts_dir_for(results)
    with Simulator([], tmp_path / "sim.log") as sim:
        argv = [
            sys.executable, "-m", "batchrunner", "caption", str(photos), "--prompt", "What?",
            "-o", str(results), "--base-url", sim.url, "--engine", "ray",
            "--ray-address", ray_address, "--workers", "2", "--shard-size", "10",
            "--rpm", "600", "--expected-latency", LATENCY, "--max-image-side", "32",
        ]  # fmt: skip
        first = _start(argv, tmp_path, "caption1")
        try:
            wait_until(
                lambda: any(journal_records(j) for j in parts.glob("*.journal")),
                first, 60, "a journaled submit",
            )  # fmt: skip
            first.signal(signal.SIGINT)
            code = first.wait(30)
        finally:
            first.kill()
        assert code == 130, first.stderr()[-3000:]
        assert "interrupted; resume with: batchrunner caption" in first.stderr()
        second = _start(argv, tmp_path, "caption2")
        try:
            assert second.wait(90) == 0, second.stderr()[-3000:]
        finally:
            second.kill()
        stats = sim.settled_stats()
    lines = read_jsonl_strict(results)
    assert sorted(line["custom_id"] for line in lines) == [f"p{n:02d}.png" for n in range(40)]
    for line in lines:
        n = int(line["custom_id"][1:3])
        width = 32
        height = round(30 * 32 / (40 + n))
        text = line["result"]["message"]["content"][0]["text"]
        assert text == f"A PNG image, {width}x{height} pixels.", (line["custom_id"], text)
    assert stats["duplicate_submits"] == 0
    for run in (first, second):
        assert "Traceback" not in run.stderr(), run.stderr()[-3000:]


# --------------------------------------------------------------------------- the budget


def test_one_budget_actor_orders_waiters_and_a_429_pauses_every_worker(ray_address: str) -> None:
    actor = BudgetActor.options(name="test-budget", max_concurrency=1000).remote(
        120.0, "yes", None, (3.0, 15.0), 0.0
    )
    try:
        ray.get(actor.acquire_submit.remote())  # the next slot is 0.5 s away: all four queue
        far = time.time() + 3000
        refs = {
            "poll": actor.acquire_poll.remote(far),
            "submit": actor.acquire_submit.remote(),
            "urgent poll": actor.acquire_poll.remote(time.time() + 60),
            "result": actor.acquire_result.remote(far),
        }
        order = []
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=10)
            assert ready, "no slot in 10 s"
            name = next(key for key, ref in pending.items() if ref == ready[0])
            order.append(name)
            del pending[name]
        assert order == ["result", "urgent poll", "submit", "poll"]
        # A 429 answered to one worker: the next slot, whoever asks, waits it out.
        started = time.monotonic()  # before the actor's clock starts the cool-down
        ray.get(actor.on_rate_limited.remote(1.0, False))
        ray.get(actor.acquire_submit.remote())
        assert time.monotonic() - started >= 1.0
        stats = ray.get(actor.statistics.remote())
        assert stats["rate_limited"] == 1 and stats["effective_rpm"] < 120.0
    finally:
        ray.kill(actor)


def test_combined_rate_at_most_the_rpm_and_under_1_percent_429s(
    ray_address: str, tmp_path: Path
) -> None:
    """3 workers, polls free, --rpm 2400 (40 requests/s) for all of them together:
    three budgets of their own would send 120/s. The account allows 60 per the
    simulator's 1.2 s window (50/s): time is scaled 50x but not the budget's
    60 s AIMD window, so a single 429 (a worker descheduled for a moment on a
    loaded 2-core machine, then sending with the others) would halve the rate
    for the rest of the test, as it would a local run's. A 429 here means the
    cluster sent a quarter more than --rpm."""
    jobs_path = tmp_path / "jobs.jsonl"
    write_jobs(jobs_path, 240)
    results = tmp_path / "out.jsonl"
    with Simulator(["--rpm", "60", "--polls-free"], tmp_path / "sim.log") as sim:
        argv = _command(
            jobs_path, results, sim, ray_address,
            "--workers", "3", "--shard-size", "30", "--rpm", "2400", "--polls-count", "no",
            "--quiet",
        )  # fmt: skip
        run = _start(argv, tmp_path, "rate")
        try:
            assert run.wait(120) == 0, run.stderr()[-3000:]
        finally:
            run.kill()
        stats = sim.settled_stats()
    times = sorted(rs["submitted_at"] for rs in stats["per_request"].values())
    assert len(times) == 240
    rate = (len(times) - 1) / (times[-1] - times[0])
    # Over --rpm is the shared budget's failure: three budgets of their own
    # would send 120/s.
    assert rate <= 40.0 * 1.03, f"{rate:.2f} requests/s against 40"
    # Under it is this machine's: a worker descheduled for 0.1 to 0.2 s (Ray,
    # three workers and the simulator on 2 cores) leaves a gap the bucket does
    # not make up (36.4 to 40.0/s over nine runs at stop 21, the package before
    # included). A budget split between the workers would give 13/s.
    assert rate >= 40.0 * 0.9, f"{rate:.2f} requests/s against 40"
    refused = stats["rate_limited"]["total"]
    assert refused / stats["requests"]["submit"] < 0.01, stats["rate_limited"]
    assert len(read_jsonl_strict(results)) == 240


def test_the_engine_module_alone_imports_ray() -> None:
    code = (
        "import sys, batchrunner.cli, batchrunner.caption, batchrunner.shards, batchrunner.runner;"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_restart_sets_the_parts_and_results_aside_and_deletes_nothing(tmp_path: Path) -> None:
    from batchrunner.engine_ray import _set_aside

    results = tmp_path / "out.jsonl"
    parts = parts_dir_for(results)
    parts.mkdir()
    (parts / "lines-000000001-000000010.jsonl").write_text('{"custom_id": "a"}\n')
    results.write_text('{"custom_id": "a"}\n')
    _set_aside(parts, results)
    (aside,) = tmp_path.glob("out.parts.before-*")
    assert not parts.exists() and not results.exists()
    assert (aside / "out.jsonl").read_text() == '{"custom_id": "a"}\n'
    assert (aside / "lines-000000001-000000010.jsonl").read_text() == '{"custom_id": "a"}\n'
