"""Blocking file work (fsync, image reads, cache files) off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def run_blocking(func: Callable[..., T], *args: object) -> T:
    """Run `func(*args)` on the event loop's default executor and wait for it.

    Shielded: a cancelled caller still waits for the thread, so a write is
    never left running while the next one starts (the writer's lock would
    otherwise be released mid-write). The loop's own executor rather than
    anyio's worker threads because looptime's virtual clock knows to wait for
    it instead of jumping ahead while a thread works: virtual-time tests stay
    repeatable.
    """
    loop = asyncio.get_running_loop()
    with anyio.CancelScope(shield=True):
        result = await loop.run_in_executor(None, functools.partial(func, *args))
    return result
