"""Images given by URL, fetched when their job is submitted (and, later, by
`caption` for image URLs in datasets).

What a fetch promises:
- the API key never goes there: the fetcher has its own session, never sees
  the key, sends no cookies, and reads no proxy settings from the environment;
- only http and https, for the URL and for every redirect it follows (at
  most `max_redirects`): a redirect to `file:` or any other scheme is refused;
- a time limit per try (`timeout_s`) and a size limit (`read_cap`: the 5 MB
  the model takes; 20 MB when the image is to be downsized), read streamed
  and capped, never whole before the check;
- 5xx, 429, timeouts and dropped connections are tried again
  (`attempts` in all, exponential backoff with full jitter); other answers
  (404, 403, ...) are final;
- then the same checks as a local file (`imagecheck.prepare_image_bytes`).

This is deliberately not the API's retry loop (`retrying`): an image host's
failures must neither open the API's circuit breaker nor spend its rate budget.

Errors are `ImageError`s naming the URL; `kind` is "unreachable" when the
tries ran out (the host may come back: a rerun tries again), else the reason.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import anyio
from yarl import URL

from batchrunner import __version__
from batchrunner.images import MAX_IMAGE_BYTES, ImageError
from batchrunner.policy import compute_backoff

REDIRECTS = frozenset({301, 302, 303, 307, 308})
UNREACHABLE = "unreachable"
MAX_DOWNSIZED_URL_BYTES = 20 * 1024 * 1024
"""A URL image to be downsized is read to at most this (a file may be larger: its
size is known before it is read; an image host's answer is not)."""


def read_cap(max_side: int | None) -> int:
    """How much of a URL image to read: the model's own limit unless it is downsized."""
    return MAX_IMAGE_BYTES if max_side is None else MAX_DOWNSIZED_URL_BYTES


@dataclass(frozen=True, slots=True)
class FetchSettings:
    timeout_s: float = 30.0
    """One try, from connecting to the last byte."""
    connect_timeout_s: float = 10.0
    attempts: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_redirects: int = 5


class _Transient(Exception):
    """A failure worth another try: 5xx, 429, a timeout, a dropped connection."""


class ImageFetcher:
    """Fetches images by URL; one per run (a pool of connections), as a context manager."""

    def __init__(
        self, settings: FetchSettings | None = None, rng: random.Random | None = None
    ) -> None:
        self.settings = settings or FetchSettings()
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self.fetched = 0
        """Images fetched (for tests and statistics)."""

    async def __aenter__(self) -> ImageFetcher:
        settings = self.settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=settings.timeout_s, connect=settings.connect_timeout_s
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"user-agent": f"batchrunner/{__version__} (image fetch)"},
            trust_env=False,
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        """The body at `url` (at most `max_bytes`), tried again on transient failures."""
        settings = self.settings
        for attempt in range(1, settings.attempts + 1):
            try:
                data = await self._get(url, max_bytes)
            except _Transient as exc:
                if attempt == settings.attempts:
                    raise ImageError(
                        f"image URL {_label(url)!r} could not be fetched in {attempt} tries "
                        f"(last: {exc})",
                        kind=UNREACHABLE,
                    ) from None
                await anyio.sleep(
                    compute_backoff(
                        attempt,
                        initial_s=settings.initial_backoff_s,
                        max_backoff_s=settings.max_backoff_s,
                        exp_base=2.0,
                        rng=self._rng,
                    )
                )
            else:
                self.fetched += 1
                return data
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _get(self, url: str, max_bytes: int) -> bytes:
        """One try: follow http(s) redirects, then read the body, capped."""
        assert self._session is not None, "use ImageFetcher as an async context manager"
        label = _label(url)
        current = URL(url)
        for _ in range(self.settings.max_redirects + 1):
            _check_scheme(current, label)
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    if response.status in REDIRECTS:
                        current = _redirect_target(current, response, label)
                        continue
                    if response.status >= 500 or response.status == 429:
                        raise _Transient(f"HTTP {response.status}")
                    if response.status != 200:
                        raise ImageError(
                            f"image URL {label!r} answered HTTP {response.status}",
                            kind="not_found" if response.status in (404, 410) else "unreadable",
                        )
                    return await _read_capped(response, max_bytes, label)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise _Transient(type(exc).__name__) from None
            except asyncio.TimeoutError:
                raise _Transient(f"no answer within {self.settings.timeout_s:g} s") from None
            except aiohttp.ClientError as exc:  # an invalid URL, a malformed answer: final
                raise ImageError(
                    f"image URL {label!r} cannot be fetched ({type(exc).__name__})"
                ) from None
        raise ImageError(
            f"image URL {label!r} redirects more than {self.settings.max_redirects} times"
        )


def _label(url: str) -> str:
    """The URL as errors show it: its start (a signed URL's query can be long)."""
    return url if len(url) <= 120 else url[:117] + "..."


def _check_scheme(url: URL, label: str) -> None:
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageError(
            f"image URL {label!r} leads to {str(url)[:80]!r}: only http and https URLs are fetched",
            kind="bad_redirect",
        )


def _redirect_target(current: URL, response: aiohttp.ClientResponse, label: str) -> URL:
    location = response.headers.get("Location")
    if not location:
        raise ImageError(f"image URL {label!r} redirects without a Location", kind="unreadable")
    try:
        return current.join(URL(location))
    except ValueError:
        raise ImageError(f"image URL {label!r} redirects to an invalid URL") from None


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int, label: str) -> bytes:
    too_big = ImageError(
        f"image URL {label!r} is over the {max_bytes / 2**20:g} MB limit", kind="too_large"
    )
    if (response.content_length or 0) > max_bytes:
        raise too_big  # not read at all
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)
