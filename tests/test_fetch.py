"""Images given by URL (issue 13): fetched at submit from a real aiohttp image
host on loopback, in virtual time, with the real simulator as the API. The key
never reaches the image host; every failure ends only its own job."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from test_pipeline import KEY, run_jobs

from batchrunner.fetch import ImageFetcher, read_cap
from batchrunner.images import ImageError
from batchrunner.simulator import SimConfig, run_simulator

pytestmark = pytest.mark.anyio


def png(size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ImageHost:
    """An image server on loopback that records every request it gets."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.url = ""

    def hits(self, path: str) -> int:
        return sum(1 for seen, _ in self.seen if seen == path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.headers)))
        return await self.routes[request.path](request)


@asynccontextmanager
async def image_host() -> AsyncIterator[ImageHost]:
    host = ImageHost()
    app = web.Application()
    app.router.add_get("/{tail:.*}", host.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    host.url = f"http://127.0.0.1:{port}"
    try:
        yield host
    finally:
        await runner.cleanup()


def answer(body: bytes, status: int = 200, **headers: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers=headers)

    return handler


def fails_then(times: int, then: Handler, status: int = 503) -> Handler:
    count = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal count
        count += 1
        if count <= times:
            return web.Response(status=status)
        return await then(request)

    return handler


async def never_answers(_: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3600)  # virtual time: the fetcher's 30 s limit comes first
    return web.Response(body=png())


async def streams_too_much(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # no Content-Length: the cap must hold while reading
    await response.prepare(request)
    chunk = png() + bytes(1 << 20)
    for _ in range(8):
        await response.write(chunk)
    return response


def redirect(location: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    return handler


def image_job(custom_id: str, url: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "url", "url": url}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
    }


CASES = {
    # custom_id: (path, handler, outcome, fragment of the message)
    "ok": ("/cat.png", answer(png()), "succeeded", "A PNG image, 8x6 pixels."),
    "flaky": ("/flaky.png", fails_then(2, answer(png((5, 5))), 503), "succeeded", "5x5"),
    "busy": ("/busy.png", fails_then(1, answer(png((4, 4))), 429), "succeeded", "4x4"),
    "gone": ("/gone.png", answer(b"no", 404), "invalid_job", "answered HTTP 404"),
    "down": ("/down.png", fails_then(10**6, answer(png())), "retries_exhausted", "4 tries"),
    "slow": ("/slow.png", never_answers, "retries_exhausted", "no answer within 30 s"),
    "big": ("/big.png", answer(png() + bytes(6 << 20)), "invalid_job", "over the 5 MB limit"),
    "stream": ("/stream.png", streams_too_much, "invalid_job", "over the 5 MB limit"),
    "text": ("/notes.png", answer(b"just text"), "invalid_job", "not a JPEG, PNG, GIF or WebP"),
    "to-file": ("/to-file", redirect("file:///etc/passwd"), "invalid_job", "only http and https"),
    "to-cat": ("/to-cat", redirect("/cat.png"), "succeeded", "8x6"),
    "loop": ("/loop", redirect("/loop"), "invalid_job", "redirects more than 5 times"),
}


def outcome(line: dict[str, Any]) -> tuple[str, str]:
    result = line["result"]
    if result["type"] == "succeeded":
        return "succeeded", result["message"]["content"][0]["text"]
    return result["error"]["type"], result["error"]["message"]


async def test_images_by_url_are_fetched_checked_and_never_see_the_key(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    async with image_host() as host:
        for path, handler, _, _ in CASES.values():
            host.routes[path] = handler
        lines = [image_job(custom_id, host.url + path) for custom_id, (path, *_) in CASES.items()]
        # An OpenAI line's http(s) image_url is fetched the same way.
        lines.append(
            {
                "custom_id": "openai",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": host.url + "/cat.png"}},
                            ],
                        }
                    ]
                },
            }
        )
        jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
        async with run_simulator(SimConfig(keys=frozenset({KEY}), seed=3)) as sim:
            result, results = await run_jobs(sim.url, jobs, rpm=600)
            by_id = {line["custom_id"]: outcome(line) for line in results}
            submits = sim.stats.snapshot()["submits_accepted"]

            for custom_id, (_, _, kind, fragment) in CASES.items():
                assert by_id[custom_id][0] == kind, (custom_id, by_id[custom_id])
                assert fragment in by_id[custom_id][1], (custom_id, by_id[custom_id])
            assert by_id["openai"] == ("succeeded", "A PNG image, 8x6 pixels.")
            assert result.exit_code == 1
            # Only jobs whose images arrived were paid for (the simulator takes base64 only).
            assert submits == 5
            assert host.hits("/gone.png") == 1  # a 404 is final
            assert host.hits("/down.png") == 4  # 5xx: 4 tries in all
            assert host.hits("/flaky.png") == 3
            assert host.hits("/etc/passwd") == 0
            for _, headers in host.seen:
                lowered = {name.lower(): value for name, value in headers.items()}
                assert "x-api-key" not in lowered and "authorization" not in lowered
                assert all(KEY not in value for value in headers.values())
                assert "cookie" not in lowered
                assert lowered["user-agent"].startswith("batchrunner/")

            # The host comes back: a rerun fetches again the job that could not be reached.
            host.routes["/down.png"] = answer(png((3, 3)))
            host.routes["/slow.png"] = answer(png((2, 2)))
            again, results = await run_jobs(sim.url, jobs, rpm=600)
    by_id = {line["custom_id"]: outcome(line) for line in results}
    assert by_id["down"] == ("succeeded", "A PNG image, 3x3 pixels.")
    assert by_id["slow"] == ("succeeded", "A PNG image, 2x2 pixels.")
    assert by_id["gone"][0] == "invalid_job"  # kept: the line did not change
    assert Counter(kind for kind, _ in by_id.values())["succeeded"] == 7
    assert again.exit_code == 1


async def test_a_url_image_to_be_downsized_is_read_to_at_most_20_mb() -> None:
    """Issue 14: the read cap is the model's 5 MB, or 20 MB when the image is
    downsized anyway; past it the read stops (no Content-Length here)."""

    def streams(megabytes: int) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(megabytes):
                await response.write(bytes(1 << 20))
            return response

        return handler

    async with image_host() as host, ImageFetcher() as fetcher:
        host.routes["/six"] = streams(6)
        host.routes["/many"] = streams(40)
        assert len(await fetcher.fetch_bytes(host.url + "/six", read_cap(1024))) == 6 << 20
        with pytest.raises(ImageError, match="over the 5 MB limit"):
            await fetcher.fetch_bytes(host.url + "/six", read_cap(None))
        with pytest.raises(ImageError, match="over the 20 MB limit"):
            await fetcher.fetch_bytes(host.url + "/many", read_cap(1024))
