"""End to end: the real pipeline against the real simulator over loopback, in virtual time."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from yarl import URL

from batchrunner.api import ApiKey, HttpSettings, SegmindClient, TransportError, make_session
from batchrunner.budget import PollsCount
from batchrunner.journal import journal_path_for
from batchrunner.runner import RunConfig, RunOutcome, run
from batchrunner.simulator import SimConfig, run_simulator

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdef"
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def write_jobs(path: Path, count: int, *, images_every: int = 0) -> list[str]:
    """Text jobs, with a local image every `images_every` jobs."""
    ids = []
    image = path.parent / "images" / "dot.png"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(PNG_1X1)
    with path.open("wb") as handle:
        for n in range(count):
            custom_id = f"job-{n:05d}"
            ids.append(custom_id)
            content: list[dict[str, Any]] = [{"type": "text", "text": f"What is {n} + {n}?"}]
            if images_every and n % images_every == 0:
                content.insert(
                    0, {"type": "image", "source": {"type": "path", "path": "images/dot.png"}}
                )
            job = {"custom_id": custom_id, "messages": [{"role": "user", "content": content}]}
            handle.write(orjson.dumps(job) + b"\n")
    return ids


def read_results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def run_jobs(
    url: str, jobs: Path, *, key: str = KEY, **overrides: Any
) -> tuple[RunOutcome, list[dict[str, Any]]]:
    output = jobs.with_name("out.results.jsonl")
    config = RunConfig(
        jobs_path=jobs,
        output_path=output,
        api_key=ApiKey(key),
        base_url=url,
        seed=7,
        **overrides,
    )
    outcome = await run(config)
    return outcome, read_results(output) if output.exists() else []


def assert_exactly_once(ids: list[str], results: list[dict[str, Any]]) -> None:
    seen = Counter(line["custom_id"] for line in results)
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1


async def test_happy_path_with_images(tmp_path: Path) -> None:
    ids = write_jobs(tmp_path / "jobs.jsonl", 30, images_every=3)
    async with run_simulator(SimConfig(keys=frozenset({KEY}), seed=1)) as sim:
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
        stats = sim.stats.snapshot()
    assert outcome.exit_code == 0
    assert_exactly_once(ids, results)
    for line in results:
        assert line["result"]["type"] == "succeeded"
        assert line["latency_s"] > 0
    captions = [
        line["result"]["message"]["content"][0]["text"]
        for line in results
        if int(line["custom_id"][4:]) % 3 == 0
    ]
    assert all("PNG image, 1x1" in text for text in captions)
    # The physical limit is submit + status + result per job.
    assert stats["submits_accepted"] == 30
    assert stats["requests"]["result"] == 30


@pytest.mark.parametrize("retry_after", [True, False], ids=["retry-after", "no-retry-after"])
async def test_thousand_jobs_with_faults_end_exactly_once(
    tmp_path: Path, retry_after: bool
) -> None:
    ids = write_jobs(tmp_path / "jobs.jsonl", 1000, images_every=50)
    sim_config = SimConfig(
        keys=frozenset({KEY}),
        rpm=300,
        retry_after=retry_after,
        p_500=0.0125,
        p_502=0.0125,
        p_503=0.0125,
        p_504=0.0125,
        p_drop=0.02,
        p_failed=0.02,
        seed=11,
    )
    async with run_simulator(sim_config) as sim:
        # --rpm above the server's real limit: the run must meet 429s and recover.
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=400)
        stats = sim.stats.snapshot()
    assert_exactly_once(ids, results)
    kinds = Counter(line["result"]["type"] for line in results)
    assert kinds["succeeded"] + kinds["errored"] == 1000
    failed = [line for line in results if line["result"]["type"] == "errored"]
    assert failed, "2% FAILED jobs should show up"
    for line in failed:
        error = line["result"]["error"]
        assert error["type"] == "inference_failed", line
        assert "simulated inference failure" in error["message"]
        assert stats["per_request"][line["request_id"]]["failed"]
    for line in results:
        if line["result"]["type"] == "succeeded":
            info = stats["per_request"][line["request_id"]]
            assert not info["failed"]
    assert stats["rate_limited"]["total"] > 0
    assert outcome.stats.rate_limited == stats["rate_limited"]["total"]
    assert outcome.exit_code == 1
    # Dropped connections before an answer are never accepted submits: no job is paid twice.
    assert stats["submits_accepted"] == 1000


async def test_wrong_key_stops_with_exit_3_and_writes_nothing(tmp_path: Path) -> None:
    write_jobs(tmp_path / "jobs.jsonl", 50)
    async with run_simulator(SimConfig(keys=frozenset({KEY}))) as sim:
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", key="wrong-key")
        stats = sim.stats.snapshot()
    assert outcome.exit_code == 3
    assert outcome.fatal_message is not None
    assert "401" in outcome.fatal_message and "SEGMIND_API_KEY" in outcome.fatal_message
    assert results == []
    # Submission stops at the first refusal: only the workers already in the air asked.
    assert stats["requests"]["submit"] <= 16


async def test_no_credits_lets_in_flight_jobs_finish(tmp_path: Path) -> None:
    ids = write_jobs(tmp_path / "jobs.jsonl", 40)
    async with run_simulator(SimConfig(keys=frozenset({KEY}), credits=10)) as sim:
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
    assert outcome.exit_code == 3
    assert "406" in (outcome.fatal_message or "")
    assert len(results) == 10
    assert all(line["result"]["type"] == "succeeded" for line in results)
    assert {line["custom_id"] for line in results} <= set(ids)


async def test_invalid_request_and_invalid_job_results(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"custom_id": "ok", "messages": [{"role": "user", "content": "hi"}]},
        {"custom_id": "bad-param", "messages": [{"role": "user", "content": "hi"}], "top_k": 3},
        {
            "custom_id": "no-file",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "path", "path": "missing.png"}}
                    ],
                }
            ],
        },
        {"custom_id": "role", "messages": [{"role": "system", "content": "hi"}]},
    ]
    jobs.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\nnot json\n")
    async with run_simulator(SimConfig(keys=frozenset({KEY}))) as sim:
        outcome, results = await run_jobs(sim.url, jobs, rpm=600)
    by_id = {line["custom_id"]: line["result"] for line in results}
    assert by_id["ok"]["type"] == "succeeded"
    assert by_id["bad-param"]["error"]["type"] == "invalid_request"
    assert by_id["bad-param"]["error"]["status"] == 400
    assert by_id["no-file"]["error"]["type"] == "invalid_job"
    assert "missing.png" in by_id["no-file"]["error"]["message"]
    assert by_id["role"]["error"]["line"] == 4
    assert "messages[0].role" in by_id["role"]["error"]["message"]
    assert by_id["line-5"]["error"]["type"] == "invalid_job"
    assert "line 5" in by_id["line-5"]["error"]["message"]
    assert outcome.exit_code == 1


async def test_foreign_status_url_is_never_followed(tmp_path: Path) -> None:
    ids = write_jobs(tmp_path / "jobs.jsonl", 20)
    async with run_simulator(SimConfig()) as elsewhere:
        sim_config = SimConfig(keys=frozenset({KEY}), public_origin=elsewhere.url)
        async with run_simulator(sim_config) as sim:
            outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
        foreign = elsewhere.stats.snapshot()
    assert outcome.exit_code == 0
    assert_exactly_once(ids, results)
    assert sum(foreign["requests"].values()) == 0


async def test_the_session_sends_the_key_only_to_the_api_origin() -> None:
    """Every request of the API session carries the key (make_session): the
    client refuses a URL off its origin before anything is sent."""
    async with (
        run_simulator(SimConfig()) as elsewhere,
        run_simulator(SimConfig(keys=frozenset({KEY}))) as sim,
        make_session(HttpSettings(), ApiKey(KEY)) as session,
    ):
        client = SegmindClient(session, sim.url)
        foreign = URL(elsewhere.url) / "v2" / "requests" / "abc" / "status"
        with pytest.raises(TransportError, match="refusing to send the API key") as refused:
            await client._request("GET", foreign, None)
        assert refused.value.sent is False
        assert KEY not in str(refused.value)
        # An announced URL off the origin is not used: the client's own goes to the API.
        answer = await client.status("abc", str(foreign))
        assert answer.status == 404  # the key was accepted (not 401), the id unknown
        assert sum(elsewhere.stats.snapshot()["requests"].values()) == 0
        assert sim.stats.snapshot()["requests"]


async def test_key_never_written(tmp_path: Path) -> None:
    write_jobs(tmp_path / "jobs.jsonl", 20)
    async with run_simulator(SimConfig(keys=frozenset({KEY}), p_failed=0.2, p_500=0.1)) as sim:
        outcome, _ = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
    output = tmp_path / "out.results.jsonl"
    for path in (output, journal_path_for(output)):
        assert KEY.encode() not in path.read_bytes()
    assert KEY not in repr(outcome)
    assert KEY not in repr(ApiKey(KEY))


async def test_expired_requests_are_resubmitted_once_then_expired(tmp_path: Path) -> None:
    """Results that expire before the poller gets to them (a server slower than
    the retention window) are resubmitted once, then written as expired."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 5)
    # Latency of two hours: every request expires before it completes.
    sim_config = SimConfig(keys=frozenset({KEY}), latency_mean=7200, latency_sigma=0)
    async with run_simulator(sim_config) as sim:
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
        stats = sim.stats.snapshot()
    assert_exactly_once(ids, results)
    assert {line["result"]["type"] for line in results} == {"expired"}
    assert stats["submits_accepted"] == 10
    assert outcome.exit_code == 1


async def test_resume_repolls_journaled_requests(tmp_path: Path) -> None:
    """A run stopped with requests in flight resumes by polling them, not paying again."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 60)
    async with run_simulator(SimConfig(keys=frozenset({KEY}), seed=3)) as sim:
        import anyio

        with anyio.move_on_after(8):  # virtual seconds: submits done, results not yet
            await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=6000)
        first = sim.stats.snapshot()["submits_accepted"]
        assert 0 < first
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=6000)
        stats = sim.stats.snapshot()
    assert_exactly_once(ids, results)
    assert outcome.stats.resumed > 0
    assert stats["submits_accepted"] == 60
    assert stats["duplicate_submits"] == 0


async def test_polls_count_auto_learns_from_a_429(tmp_path: Path) -> None:
    write_jobs(tmp_path / "jobs.jsonl", 60)
    sim_config = SimConfig(keys=frozenset({KEY}), rpm=60, polls_count=True, seed=5)
    async with run_simulator(sim_config) as sim:
        outcome, _ = await run_jobs(
            sim.url, tmp_path / "jobs.jsonl", rpm=60, polls_count=PollsCount.AUTO
        )
    assert outcome.exit_code == 0
    assert outcome.stats.rate_limited > 0


async def test_submits_whose_answer_never_came_are_counted_as_maybe_paid_twice(
    tmp_path: Path,
) -> None:
    """At-least-once, honestly: a submit accepted but whose answer was lost is
    retried and paid again; the run counts every such submit for the summary."""
    ids = write_jobs(tmp_path / "jobs.jsonl", 60)
    sim_config = SimConfig(keys=frozenset({KEY}), p_drop_after_submit=0.2, seed=5)
    async with run_simulator(sim_config) as sim:
        outcome, results = await run_jobs(sim.url, tmp_path / "jobs.jsonl", rpm=600)
        stats = sim.stats.snapshot()
    assert_exactly_once(ids, results)
    assert stats["dropped_after_submit"] > 0
    assert stats["duplicate_submits"] == stats["dropped_after_submit"]
    assert outcome.stats.unanswered_submits == stats["dropped_after_submit"]


async def test_polls_free_and_an_api_faster_than_the_prior_first_polls_come_down(
    tmp_path: Path,
) -> None:
    """A 4 s API against the model page's 11.2 s prior, polls free. The latency
    model learns a first poll that finds the request done at the poll's planned
    age, its own p10: left alone it stays there, and every first poll finds the
    request long done (97%, detection p50 0.9 mean latencies, issue 12 stop
    25). `FirstPollFactor` brings the first polls down until some find the
    request pending, as they should (the schedule aims at 15% done)."""
    write_jobs(tmp_path / "jobs.jsonl", 300)
    sim_config = SimConfig(
        keys=frozenset({KEY}), rpm=300, polls_count=False, latency_mean=4.0, seed=3
    )
    async with run_simulator(sim_config) as sim:
        # 5 submits a second: the first answers come back while jobs still go in.
        outcome, _ = await run_jobs(
            sim.url, tmp_path / "jobs.jsonl", rpm=300, polls_count=PollsCount.NO
        )
        requests = sorted(
            sim.stats.snapshot()["per_request"].values(), key=lambda r: r["submitted_at"]
        )
    assert outcome.exit_code == 0
    later = requests[200:]
    found_at_first_poll = sum(r["status_polls"] == 1 for r in later) / len(later)
    assert found_at_first_poll < 0.35
    delays = sorted(r["first_result_at"] - r["done_at"] for r in later)
    assert delays[len(delays) // 2] < 0.2 * 4.0
