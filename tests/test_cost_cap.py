"""--max-cost: stop submitting at the cap, finish what is in flight, resume with a higher cap."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_pipeline import KEY, run_jobs, write_jobs

from batchrunner.simulator import SimConfig, run_simulator

pytestmark = pytest.mark.anyio

PRICE_IN, PRICE_OUT = 3.0, 15.0


def dollars(results: list[dict]) -> float:
    usage = [line["result"]["message"]["usage"] for line in results]
    tokens_in = sum(u["input_tokens"] for u in usage)
    tokens_out = sum(u["output_tokens"] for u in usage)
    return (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6


async def test_cost_cap_stops_then_resumes_with_a_higher_cap(tmp_path: Path) -> None:
    ids = write_jobs(tmp_path / "jobs.jsonl", 100, images_every=10)
    cap = 0.01
    async with run_simulator(SimConfig(keys=frozenset({KEY}), seed=9)) as sim:
        outcome, results = await run_jobs(
            sim.url, tmp_path / "jobs.jsonl", rpm=600, max_cost_usd=cap, output_tokens_per_job=50
        )
        assert outcome.cost_capped
        assert outcome.exit_code == 1
        assert 0 < len(results) < 100
        assert all(line["result"]["type"] == "succeeded" for line in results)
        # Estimates (50 output tokens a job) are above the simulator's real usage,
        # so the real spend stays under the cap; nothing was left unfinished.
        assert dollars(results) <= cap
        assert outcome.unfinished == 0
        submitted_first = sim.stats.snapshot()["submits_accepted"]
        assert submitted_first == len(results)

        outcome, results = await run_jobs(
            sim.url, tmp_path / "jobs.jsonl", rpm=600, max_cost_usd=10.0, output_tokens_per_job=50
        )
        assert outcome.exit_code == 0
        assert not outcome.cost_capped
        assert sim.stats.snapshot()["submits_accepted"] == 100
    assert Counter(line["custom_id"] for line in results) == Counter(ids)
