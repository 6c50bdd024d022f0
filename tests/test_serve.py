"""`batchrunner serve` as a real process, with the official `openai` and
`anthropic` SDKs as clients, in front of the simulator as its own process
(time scaled 50x: serve's budget follows the simulator's clock through the
hidden --time-scale)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.helpers_process import REPO, TIME_SCALE, Simulator, bodies_per_hash, runner_env

TOKEN = "serve-test-token"
SIM_KEY = "sim-key"


class Serve:
    """`python -m batchrunner serve ...` as a subprocess; `url` once it listens."""

    def __init__(self, tmp: Path, sim_url: str, *extra: str, port: int = 0, name: str = "serve"):
        self.argv = [
            sys.executable,
            "-m",
            "batchrunner",
            "serve",
            "--base-url",
            sim_url,
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--journal",
            str(tmp / "serve.journal"),
            "--time-scale",
            str(TIME_SCALE),
            "--quiet",
            *extra,
        ]
        self.stderr_path = tmp / f"{name}.stderr"
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Serve:
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=runner_env(SIM_KEY),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("listening on "), f"{line!r}: {self.stderr_path.read_text()}"
        self.url = line.removeprefix("listening on ").strip()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        process = self.process
        assert process is not None
        if process.poll() is None:
            process.send_signal(signum)
        code = process.wait(timeout=timeout)
        if process.stdout is not None:
            process.stdout.close()
        return code

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKEN, **kwargs)

    def anthropic(self, **kwargs: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=TOKEN, **kwargs)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    with Simulator(["--key", SIM_KEY, "--rpm", "60"], tmp_path / "sim.log") as simulator:
        yield simulator


def ask_openai(client: openai.OpenAI, n: int) -> str:
    answer = client.chat.completions.create(
        model="claude-3.5-sonnet",
        messages=[
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": f"Tell me about openai-item-{n}"},
        ],
        max_tokens=64,
        temperature=0.2,
    )
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert answer.choices[0].finish_reason == "stop"
    return answer.choices[0].message.content or ""


def ask_anthropic(client: anthropic.Anthropic, n: int) -> str:
    answer = client.messages.create(
        model="claude-3-5-sonnet-20241022",
        system="Answer in one line.",
        messages=[{"role": "user", "content": f"Tell me about anthropic-item-{n}"}],
        max_tokens=64,
    )
    assert answer.usage.output_tokens > 0 and answer.stop_reason == "end_turn"
    assert answer.model == "claude-3-5-sonnet-20241022"
    block = answer.content[0]
    assert block.type == "text"
    return block.text


def test_forty_clients_share_one_budget_each_paid_once(sim: Simulator, tmp_path: Path) -> None:
    """20 requests through each SDK at once, under --rpm 60 counted on submits
    and polls alike: every answer is its own, the simulator never refused one
    (so the budget was never exceeded), and each request was submitted once."""
    with Serve(tmp_path, sim.url, "--rpm", "60", "--polls-count", "yes") as serve:
        oa, an = serve.openai(), serve.anthropic()
        with ThreadPoolExecutor(40) as pool:
            openai_answers = pool.map(lambda n: ask_openai(oa, n), range(20))
            anthropic_answers = pool.map(lambda n: ask_anthropic(an, n), range(20))
            for n, text in enumerate(openai_answers):
                assert f"openai-item-{n}" in text
            for n, text in enumerate(anthropic_answers):
                assert f"anthropic-item-{n}" in text
        # The wrong token is refused in both dialects, before any Segmind request.
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{serve.url}/v1", api_key="wrong").chat.completions.create(
                model="claude-3.5-sonnet", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=serve.url, api_key="wrong").messages.create(
                model="claude-3.5-sonnet",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
            )
        # stream: true is a 400 naming the field (documented in the README).
        with pytest.raises(openai.BadRequestError, match="stream"):
            oa.chat.completions.create(
                model="claude-3.5-sonnet",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
        with pytest.raises(anthropic.BadRequestError, match="stream"):
            an.messages.create(
                model="claude-3.5-sonnet",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                stream=True,
            )
        # A bad request names its field, in each dialect's error shape.
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(
                model="claude-3.5-sonnet",
                messages=[{"role": "user", "content": "hi"}],
                temperature=1.5,
            )
        assert bad.value.param == "temperature"
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            an.messages.create(
                model="claude-3.5-sonnet",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=0,
            )
        assert "claude-3-5-sonnet-20241022" in {m.id for m in oa.models.list()}
        assert "claude-3.5-sonnet" in {m.id for m in an.models.list()}
        stats = sim.stats()
        assert serve.stop() == 130
    assert stats["submits_accepted"] == 40
    assert stats["duplicate_submits"] == 0
    assert stats["rate_limited"]["total"] == 0
    assert stats["responses"]["submit"] == {"200": 40}
    results = [
        json.loads(line) for line in (tmp_path / "serve.results.jsonl").read_text().splitlines()
    ]
    assert len(results) == 40
    assert {r["result"]["type"] for r in results} == {"succeeded"}


def test_stop_sequences_cut_the_answer_in_each_dialect(sim: Simulator, tmp_path: Path) -> None:
    with Serve(tmp_path, sim.url, "--rpm", "6000") as serve:
        answer = serve.openai().chat.completions.create(
            model="claude-3.5-sonnet",
            messages=[{"role": "user", "content": "Hello stop-test"}],
            stop=["simulated"],
            seed=1234,
        )
        text = answer.choices[0].message.content or ""
        assert "stop-test" in text and "simulated" not in text
        assert answer.choices[0].finish_reason == "stop"
        message = serve.anthropic().messages.create(
            model="claude-3.5-sonnet",
            messages=[{"role": "user", "content": "Hello stop-test"}],
            max_tokens=64,
            stop_sequences=["simulated"],
        )
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == "simulated"
        block = message.content[0]
        assert block.type == "text" and "simulated" not in block.text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_killed_mid_request_the_clients_retry_is_not_paid_again(tmp_path: Path) -> None:
    """SIGKILL while a request is at Segmind: the SDK's own retry reaches the
    restarted serve, which polls the journaled request_id instead of submitting."""
    port = free_port()
    slow = ["--key", SIM_KEY, "--latency", "150", "--latency-sigma", "0"]  # 3 s of real time
    with Simulator(slow, tmp_path / "sim.log") as sim:
        first = Serve(tmp_path, sim.url, port=port, name="first").__enter__()
        client = first.openai(max_retries=8, timeout=60)
        answers: list[str] = []
        asking = threading.Thread(target=lambda: answers.append(ask_openai(client, 7)))
        asking.start()
        journal = tmp_path / "serve.journal"
        deadline = time.monotonic() + 20
        while not (journal.exists() and journal.read_bytes().count(b"\n")):
            assert time.monotonic() < deadline, "the request was never journaled"
            time.sleep(0.02)
        first.stop(signal.SIGKILL)
        with Serve(tmp_path, sim.url, port=port, name="second") as second:
            asking.join(timeout=60)
            assert answers and "openai-item-7" in answers[0]
            assert second.stop() == 130
        stats = sim.stats()
    assert stats["submits_accepted"] == 1
    assert stats["requests"]["submit"] == 1


def test_a_long_retry_after_is_passed_on_as_429(tmp_path: Path) -> None:
    """Segmind asks to wait an hour: the client gets 429 with Retry-After at
    once (not held for an hour), and so does the next one, without a request."""
    args = ["--key", SIM_KEY, "--rpm", "1", "--polls-free", "--retry-after-429", "3600"]
    with Simulator(args, tmp_path / "sim.log") as sim, Serve(tmp_path, sim.url) as serve:
        client = serve.openai(max_retries=0)
        assert "openai-item-1" in ask_openai(client, 1)
        for n in (2, 3):
            with pytest.raises(openai.RateLimitError) as refused:
                ask_openai(client, n)
            assert refused.value.response.headers["retry-after"] == "3600"
        stats = sim.stats()
    assert stats["requests"]["submit"] == 2  # the third was answered without asking


def test_sigterm_finishes_what_is_in_flight_then_exits_130(tmp_path: Path) -> None:
    """SIGTERM stops accepting; the request already at Segmind is still
    answered within --grace; the exit code is 130."""
    slow = ["--key", SIM_KEY, "--latency", "100", "--latency-sigma", "0"]  # 2 s of real time
    with Simulator(slow, tmp_path / "sim.log") as sim, Serve(tmp_path, sim.url) as serve:
        client = serve.anthropic(max_retries=0)
        answers: list[str] = []
        asking = threading.Thread(target=lambda: answers.append(ask_anthropic(client, 5)))
        asking.start()
        journal = tmp_path / "serve.journal"
        deadline = time.monotonic() + 20
        while not (journal.exists() and journal.read_bytes().count(b"\n")):
            assert time.monotonic() < deadline, "the request was never journaled"
            time.sleep(0.02)
        assert serve.stop(signal.SIGTERM) == 130
        asking.join(timeout=30)
        assert answers and "anthropic-item-5" in answers[0]
        assert sim.stats()["submits_accepted"] == 1


# The README's inspect_ai recipe, run as written (test_readme_has_the_tested_inspect_recipe
# keeps them the same): the simulator echoes the prompt, so every answer includes
# its own sample's target.
INSPECT_TASK = """\
from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, system_message


@task
def echo():
    return Task(
        dataset=[Sample(input=f"Say item-{i}", target=f"item-{i}") for i in range(5)],
        solver=[system_message("Answer briefly."), generate()],
        scorer=includes(),
    )
"""
INSPECT_ENV = "export BATCHRUNNER_API_KEY=TOKEN BATCHRUNNER_BASE_URL=http://127.0.0.1:8000/v1"
INSPECT_COMMAND = (
    "inspect eval task.py --model openai-api/batchrunner/claude-3.5-sonnet --max-connections 16"
)


def test_readme_has_the_tested_inspect_recipe() -> None:
    readme = (REPO / "README.md").read_text()
    assert f"```python\n{INSPECT_TASK}```" in readme
    assert f"```sh\n{INSPECT_ENV}\n{INSPECT_COMMAND}\n```" in readme


def post_status(url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a minimal chat completion sent with `headers` (no proxy)."""
    body = json.dumps(
        {"model": "claude-3.5-sonnet", "messages": [{"role": "user", "content": "hi"}]}
    )
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.skipif(
    importlib.util.find_spec("inspect_ai") is None,
    reason="inspect_ai is not installed (the test extra brings it on Python 3.11+)",
)
def test_inspect_ai_eval_runs_end_to_end(sim: Simulator, tmp_path: Path) -> None:
    """The README's inspect_ai recipe as a real `inspect eval` process against a
    real serve: every sample answered and scored, each paid exactly once, and
    the token (inspect's API key, from the environment) was what let it in."""
    (tmp_path / "task.py").write_text(INSPECT_TASK)
    env = {k: v for k, v in runner_env(None).items() if not k.startswith(("OPENAI_", "INSPECT_"))}
    with Serve(tmp_path, sim.url) as serve:
        env |= {
            "BATCHRUNNER_API_KEY": TOKEN,
            "BATCHRUNNER_BASE_URL": f"{serve.url}/v1",
            "XDG_DATA_HOME": str(tmp_path / "xdg"),  # inspect's traces stay out of $HOME
        }
        # `inspect` is `python -m inspect_ai`; the log is written as JSON to read it here.
        argv = [sys.executable, "-m", "inspect_ai", *shlex.split(INSPECT_COMMAND)[1:]]
        argv += ["--log-format", "json", "--log-dir", "logs", "--display", "none"]
        inspect = subprocess.run(
            argv,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert inspect.returncode == 0, inspect.stderr[-3000:]
        # Without the token, or with another one, serve answers 401: inspect got in
        # only because it sent BATCHRUNNER_API_KEY as its Bearer token.
        assert post_status(serve.url, {}) == 401
        assert post_status(serve.url, {"Authorization": "Bearer not-the-token"}) == 401
        stats = sim.stats()
        assert serve.stop() == 130
    (log_file,) = (tmp_path / "logs").glob("*.json")
    log = json.loads(log_file.read_text())
    assert log["status"] == "success", log.get("error")
    assert log["results"]["total_samples"] == log["results"]["completed_samples"] == 5
    (score,) = log["results"]["scores"]
    assert score["scored_samples"] == 5 and score["metrics"]["accuracy"]["value"] == 1.0
    answers = {}
    for sample in log["samples"]:
        assert sample.get("error") is None and not sample.get("error_retries")
        answers[sample["target"]] = sample["output"]["choices"][0]["message"]["content"]
    assert sorted(answers) == [f"item-{i}" for i in range(5)]
    for target, text in answers.items():
        assert f"Say {target}" in text
    # One Segmind submit per sample, each body once, none refused or repeated.
    assert stats["submits_accepted"] == 5 and stats["requests"]["submit"] == 5
    assert stats["duplicate_submits"] == 0
    assert sorted(bodies_per_hash(stats).values()) == [1] * 5
    results = (tmp_path / "serve.results.jsonl").read_text().splitlines()
    assert [json.loads(line)["result"]["type"] for line in results] == ["succeeded"] * 5
