"""Hand-offs between pipeline stages: the reader to the submit workers, the
poller to its poll workers.

An item goes straight to a worker that waits for one (no trip through the
event loop for the sender), else into a buffer of `capacity` items, else the
sender waits. Each wait is one future. anyio's memory object streams hand
over the same way, but every receive that has to wait first made a trip
through the loop, then an Event, a receiver record and a task-info lookup
(about 300 bytecodes a job in issue 12's capacity profile); `asyncio.Queue`
has no direct hand-over, so a sender with a small buffer and a waiting worker
took turns with it through the loop, one item a turn (eight times the loop
iterations).

Cancellation: a cancelled `put` leaves nothing behind; a worker cancelled
just as its item came passes the item on to the next waiting worker, or back
to the head of the buffer: nothing is lost, and no two hold the same item.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Items from one stage to `workers` workers; at most `capacity` wait in between."""

    __slots__ = ("_buffer", "_capacity", "_getters", "_putters", "_workers")

    def __init__(self, capacity: int, workers: int) -> None:
        self._capacity = capacity
        self._workers = workers
        self._buffer: deque[T | None] = deque()
        self._getters: deque[asyncio.Future[T | None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    async def put(self, item: T) -> None:
        """Hand `item` over, waiting only while no worker waits and the buffer is full."""
        await self._put(item)

    async def get(self) -> T | None:
        """The next item, waiting only when none is ready; None once the stage has ended."""
        if self._buffer:
            item = self._buffer.popleft()
            _wake(self._putters)
            return item
        getter: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._getters.append(getter)
        _wake(self._putters)  # a sender that waited for a worker may give to this one
        try:
            return await getter
        except BaseException:
            if getter.done() and not getter.cancelled():
                self._give(getter.result(), first=True)  # it came as this worker was cancelled
            else:
                getter.cancel()
                _forget(self._getters, getter)
            raise

    async def close(self) -> None:
        """No more items: each worker gets None, after the items still waiting."""
        for _ in range(self._workers):
            await self._put(None)

    async def _put(self, item: T | None) -> None:
        while not self._getters and len(self._buffer) >= self._capacity:
            putter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._putters.append(putter)
            try:
                await putter
            except BaseException:
                if putter.done() and not putter.cancelled():
                    _wake(self._putters)  # its room goes to the next sender
                else:
                    putter.cancel()
                    _forget(self._putters, putter)
                raise
        self._give(item)

    def _give(self, item: T | None, *, first: bool = False) -> None:
        """To the longest-waiting worker, else to the buffer (its head when the
        item had been first in line already)."""
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(item)
                return
        if first:
            self._buffer.appendleft(item)
        else:
            self._buffer.append(item)


def _wake(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _forget(waiters: deque[Any], waiter: asyncio.Future[Any]) -> None:
    """Take a cancelled waiter off its queue, unless a wake-up already did (and
    skipped it: it was done)."""
    try:
        waiters.remove(waiter)
    except ValueError:
        pass
