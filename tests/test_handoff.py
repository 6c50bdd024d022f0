"""Hand-offs between stages (handoff.py): no trip through the event loop when
the item can change hands at once, a cancellable wait when it cannot, and no
item lost or held twice when a wait is cancelled."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from batchrunner.handoff import Handoff

pytestmark = pytest.mark.anyio


async def test_items_for_waiting_workers_go_without_the_sender_yielding() -> None:
    # asyncio.Queue buffers first: with room for one item, the sender and a
    # worker took turns through the loop, one item a turn.
    handoff: Handoff[int] = Handoff(0, workers=3)
    ran: list[str] = []
    got: list[int | None] = []

    async def worker() -> None:
        got.append(await handoff.get())

    async def bystander() -> None:
        ran.append("bystander")

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()  # the workers wait
        tg.start_soon(bystander)  # runs at the next trip through the loop
        for item in (7, 8, 9):
            await handoff.put(item)
        assert ran == []  # no put yielded to the loop
    assert got == [7, 8, 9]


async def test_with_no_room_a_sender_waits_for_a_worker() -> None:
    handoff: Handoff[int] = Handoff(0, workers=1)
    with anyio.move_on_after(5) as scope:
        await handoff.put(1)  # no worker: waits
    assert scope.cancelled_caught
    got: list[int | None] = []

    async def worker() -> None:
        got.append(await handoff.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(handoff.put, 2)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(worker)
    assert got == [2]  # the cancelled put left nothing behind


async def test_ready_items_are_taken_in_order_then_one_end_per_worker() -> None:
    handoff: Handoff[int] = Handoff(5, workers=2)
    for item in (1, 2, 3):
        await handoff.put(item)
    await handoff.close()
    taken = [await handoff.get() for _ in range(5)]
    assert taken == [1, 2, 3, None, None]


async def test_a_full_handoff_makes_the_sender_wait_and_a_cancelled_put_leaves_nothing() -> None:
    handoff: Handoff[int] = Handoff(1, workers=1)
    await handoff.put(1)
    with anyio.move_on_after(5) as scope:
        await handoff.put(2)  # nobody takes: waits
    assert scope.cancelled_caught
    assert await handoff.get() == 1
    await handoff.close()
    assert await handoff.get() is None  # the cancelled item never went in


async def test_a_worker_cancelled_as_its_item_came_neither_loses_nor_doubles_it() -> None:
    handoff: Handoff[int] = Handoff(1, workers=2)
    got: list[tuple[str, int | None]] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def worker(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            got.append((name, await handoff.get()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "first")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(worker, "second")
        await anyio.wait_all_tasks_blocked()
        await handoff.put(3)  # for the first waiter...
        scopes["first"].cancel()  # ...cancelled before it ran
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    # anyio lets a task whose wait is already over keep what it got; plain
    # asyncio cancels it, and the queue wakes the next worker: one way or the
    # other, exactly one worker has the item.
    assert [item for _, item in got] == [3]


async def test_a_task_cancelled_as_its_item_came_hands_it_to_the_next_worker() -> None:
    # Plain asyncio cancellation lands even when the wait is already over:
    # the item stays in the queue for the next waiting worker.
    handoff: Handoff[int] = Handoff(1, workers=2)
    got: list[tuple[str, int | None]] = []

    async def worker(name: str) -> None:
        got.append((name, await handoff.get()))

    first = asyncio.create_task(worker("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(worker("second"))
    await asyncio.sleep(0)
    await handoff.put(3)
    first.cancel()
    await asyncio.wait([first, second])
    assert first.cancelled()
    assert got == [("second", 3)]


async def test_waiting_workers_see_the_end() -> None:
    handoff: Handoff[int] = Handoff(1, workers=3)
    got: list[int | None] = []

    async def worker() -> None:
        got.append(await handoff.get())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()
        await handoff.close()
    assert got == [None, None, None]


async def test_a_task_cancelled_as_its_item_came_puts_it_back_first_in_line() -> None:
    handoff: Handoff[int] = Handoff(2, workers=1)
    got: list[int | None] = []

    async def worker() -> None:
        got.append(await handoff.get())

    waiting = asyncio.create_task(worker())
    await asyncio.sleep(0)
    await handoff.put(1)  # straight to the waiting worker...
    waiting.cancel()  # ...cancelled before it ran
    await handoff.put(2)  # buffered
    await asyncio.wait([waiting])
    assert waiting.cancelled() and got == []
    assert [await handoff.get(), await handoff.get()] == [1, 2]


async def test_a_sender_cancelled_as_a_wake_up_passed_it_by_leaves_cleanly() -> None:
    handoff: Handoff[int] = Handoff(1, workers=1)
    await handoff.put(0)  # the buffer is full
    first = asyncio.create_task(handoff.put(1))
    second = asyncio.create_task(handoff.put(2))
    await asyncio.sleep(0)  # both wait for room
    first.cancel()  # its wait is cancelled at once; its task sees it later
    assert await handoff.get() == 0  # the wake-up passes the cancelled wait by
    await asyncio.wait([first, second])
    assert first.cancelled() and second.done() and second.exception() is None
    assert await handoff.get() == 2


async def test_a_worker_cancelled_as_an_item_passed_it_by_leaves_cleanly() -> None:
    handoff: Handoff[int] = Handoff(0, workers=2)
    got: list[int | None] = []

    async def worker() -> None:
        got.append(await handoff.get())

    first = asyncio.create_task(worker())
    second = asyncio.create_task(worker())
    await asyncio.sleep(0)  # both wait
    first.cancel()
    await handoff.put(5)  # passes the cancelled wait by, to the second worker
    await asyncio.wait([first, second])
    assert first.cancelled() and second.exception() is None
    assert got == [5]
