"""API client: the only module that knows HTTP and Segmind's wire format.

Every call returns an `ApiResponse` (status, decoded body, Retry-After) or
raises `TransportError`; what to do with it is decided by `policy`.
The key is attached only to URLs on the configured origin, and redirects are
never followed, so it cannot leak to another host.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from batchrunner.policy import parse_retry_after, quote_body


class ApiKey:
    """The API key, kept out of repr(), str() and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise ValueError("empty API key")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ApiKey('***')"

    __str__ = __repr__


MAX_BODY_BYTES = 32 * 1024 * 1024
"""Largest answer read: a result line over it would be a runaway (100 MB lines
and 841 MB of memory were seen); the job ends with an error instead."""


class ApiResponse(NamedTuple):
    """One answer of the API. A NamedTuple, like `Verdict` and `retrying.Answer`:
    three of each are made per job, and a frozen dataclass's __init__ ran about
    3.5 times the bytecode of a NamedTuple's __new__ (issue 12's capacity profile)."""

    status: int
    body: Any
    retry_after_s: float | None = None
    oversized: bool = False
    """The body was over MAX_BODY_BYTES and was not read (`body` is None)."""
    declared_bytes: int | None = None
    """The body's Content-Length, when it announced one (said in the error of an oversized one)."""


def over_cap_message(what: str, declared_bytes: int | None = None) -> str:
    """The error of an answer over MAX_BODY_BYTES: "the result (40 MB) is over the 32 MB cap"."""
    size = f" ({_megabytes(declared_bytes)})" if declared_bytes else ""
    return f"{what}{size} is over the {_megabytes(MAX_BODY_BYTES)} cap on answers; it was not read"


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.3g} MB"


class TransportError(Exception):
    """No HTTP answer: connection refused or dropped, timeout, garbled response.

    `sent` is False only when no connection was made (refused, unknown host,
    connect timeout): then the request cannot have reached the API. Any later
    failure may come after the API accepted it.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Deliberate connection limits and timeouts.

    connect: a healthy API answers a TCP/TLS handshake in well under 10 s.
    total: submit and status answers are small, and a 32 MB result reads in
    seconds; a request not done in 120 s is on a stuck connection, which we
    drop and retry (the retry budget bounds it). No separate read timeout:
    aiohttp re-arms a timer on every chunk received for it, about a fifth of
    the client's CPU per job at full speed (benchmarks/README.md, issue 12),
    and it only caught a stuck connection sooner.
    """

    connect_timeout_s: float = 10.0
    total_timeout_s: float = 120.0
    max_connections: int = 64


def origin_key(url: URL) -> tuple[str, str | None, int | None]:
    """What two URLs of one origin share: scheme, host and port (a default port
    written out or not)."""
    return url.scheme, url.host, url.explicit_port or url.port


@dataclass(frozen=True, slots=True)
class NoMessage:
    """Why a COMPLETED result holds no Anthropic message."""

    reason: str
    missing: bool = False
    """No output at all (may be a replica not yet written): worth asking again."""


def decode_output(body: Any) -> dict[str, Any] | NoMessage:
    """The Anthropic message inside a result body, or why there is none.

    For LLMs `output` is a string holding the provider's JSON (double-encoded);
    an object is tolerated, and so is a body without `output` that is itself a
    message. Only a message (`type` "message", `content` a list) is a result:
    the provider's error object, or anything else, is not.
    """
    if not isinstance(body, dict):
        return NoMessage(f"the result is {quote_body(body)}", missing=True)
    output = body.get("output")
    if output is None:
        if _is_message(body):
            return body
        return NoMessage(f"the result has no output: {quote_body(body)}", missing=True)
    if isinstance(output, str):
        try:
            output = orjson.loads(output)
        except orjson.JSONDecodeError:
            return NoMessage(f"the output is not JSON: {quote_body(output)}")
    if _is_message(output):
        return output
    if isinstance(output, dict) and output.get("type") == "error":
        return NoMessage(f"the model answered with an error: {_provider_error(output)}")
    return NoMessage(f"the output is not a message: {quote_body(output)}")


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("type") == "message"
        and isinstance(value.get("content"), list)
    )


def _provider_error(output: dict[str, Any]) -> str:
    error = output.get("error")
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) else message
    return quote_body(output)


def make_session(settings: HttpSettings, api_key: ApiKey) -> aiohttp.ClientSession:
    """One session per run: pooled keep-alive connections to the API origin.

    Every request of it carries the key, so only `SegmindClient` sends with
    it, and it refuses any URL off the origin before sending (redirects are
    never followed). A key added per request instead made aiohttp merge the
    session's headers with the request's for each of a job's three requests:
    130 bytecodes a job more (issue 12's count)."""
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections,
        limit_per_host=settings.max_connections,
        ttl_dns_cache=300,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout_s,
        connect=settings.connect_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        headers={
            "user-agent": "batchrunner/0.1",
            "accept": "application/json",
            "x-api-key": api_key.reveal(),
        },
    )


class SegmindClient:
    """Submit, status and result calls of the Segmind v2 asynchronous API.

    `session` is `make_session`'s, which carries the API key: every request
    goes through `_request`, which sends only to `base_url`'s origin."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        origin = URL(base_url.rstrip("/") or base_url)
        if origin.scheme not in ("http", "https") or not origin.host:
            raise ValueError(f"base URL must be http(s)://host[:port], got {base_url!r}")
        self._session = session
        self._origin = origin.origin()
        self._origin_key = origin_key(origin)  # every request is checked against it
        self._model_urls: dict[str, URL] = {}

    def __repr__(self) -> str:
        return f"SegmindClient(origin={str(self._origin)!r})"

    @property
    def origin(self) -> URL:
        return self._origin

    @property
    def timeout_s(self) -> float:
        """The longest one request can take (the session's total timeout)."""
        total = self._session.timeout.total
        return float(total) if total is not None else float("inf")

    async def submit(self, model: str, body: dict[str, Any]) -> ApiResponse:
        url = self._model_urls.get(model)
        if url is None:
            url = self._origin / "v2" / model
            if len(self._model_urls) < 64:  # a run has a handful of models: built once each
                self._model_urls[model] = url
        return await self._request("POST", url, orjson.dumps(body))

    async def status(self, request_id: str, status_url: str | None = None) -> ApiResponse:
        url = self._announced(status_url) or self._origin.with_path(
            f"/v2/requests/{quote(request_id, safe='')}/status"
        )
        return await self._request("GET", url, None)

    async def result(self, request_id: str, response_url: str | None = None) -> ApiResponse:
        url = self._announced(response_url) or self._origin.with_path(
            f"/v2/requests/{quote(request_id, safe='')}"
        )
        return await self._request("GET", url, None)

    def _announced(self, announced: str | None) -> URL | None:
        """A URL the API announced, when it is on our origin (None: build our own).
        The default is built only when needed: URL work was 5% of the client's
        CPU in the capacity profile (issue 12)."""
        if announced:
            try:
                url = URL(announced)
            except ValueError:
                return None
            if origin_key(url) == self._origin_key:  # a relative URL has no host: never ours
                return url
        return None

    async def _request(self, method: str, url: URL, data: bytes | None) -> ApiResponse:
        if origin_key(url) != self._origin_key:  # the session's requests carry the key
            raise TransportError(f"refusing to send the API key to {url.origin()}", sent=False)
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                # No per-request headers for a GET: aiohttp would merge them
                # with the session's (see make_session).
                headers=_JSON_BODY if data is not None else None,
                allow_redirects=False,
            ) as response:
                header = response.headers.get("Retry-After")
                retry_after = None if header is None else parse_retry_after(header, time.time())
                raw = await _read_capped(response)
                if raw is None:
                    return ApiResponse(
                        response.status,
                        None,
                        retry_after,
                        oversized=True,
                        declared_bytes=response.content_length,
                    )
                return ApiResponse(response.status, _decode(raw), retry_after)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Only the class and the URL path: aiohttp errors can carry request
            # info (headers); the key must not ride along into logs.
            sent = not isinstance(
                exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
            )
            raise TransportError(
                f"{type(exc).__name__} on {method} {url.path}", sent=sent
            ) from None


_JSON_BODY = {"content-type": "application/json"}


async def _read_capped(response: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None when it is over MAX_BODY_BYTES (read no further than that)."""
    declared = response.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        return None
    if declared is not None and "Content-Encoding" not in response.headers:
        # Not compressed, so aiohttp stops at the declared length: read it
        # whole, without the chunk loop (an async generator per answer, in the
        # profile of issue 12). A compressed body may inflate past the cap.
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:500].decode("utf-8", "replace")
