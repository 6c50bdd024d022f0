"""Hand-offs between stages (handoff.py): no trip through the event loop when
the item can change hands at once, a wait (cancellable) when it cannot."""

from __future__ import annotations

import anyio
import pytest

from batchrunner.handoff import receive_soon, send_soon

pytestmark = pytest.mark.anyio


async def test_an_item_for_a_waiting_receiver_changes_hands_without_a_loop_trip() -> None:
    send, receive = anyio.create_memory_object_stream[int](0)
    with send, receive:
        ran: list[str] = []
        got: list[int | None] = []

        async def receiver() -> None:
            got.append(await receive_soon(receive))

        async def bystander() -> None:
            ran.append("bystander")

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()  # the receiver waits
            tg.start_soon(bystander)  # runs at the next trip through the loop
            await send_soon(send, 7)
            assert ran == []  # send_soon did not yield: anyio's send() would have
        assert got == [7]


async def test_ready_items_are_taken_in_order_and_the_end_is_none() -> None:
    send, receive = anyio.create_memory_object_stream[int](4)
    with send, receive:
        for item in (1, 2, 3):
            await send_soon(send, item)
        send.close()
        taken = [await receive_soon(receive) for _ in range(4)]
        assert taken == [1, 2, 3, None]


async def test_a_full_stream_makes_the_sender_wait_and_the_wait_is_cancellable() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    with send, receive:
        await send_soon(send, 1)
        with anyio.move_on_after(5) as scope:
            await send_soon(send, 2)  # nobody receives: waits
        assert scope.cancelled_caught
        assert await receive_soon(receive) == 1
        send.close()
        assert await receive_soon(receive) is None  # the cancelled item never went in


async def test_a_waiting_receiver_sees_the_end_of_the_stream() -> None:
    send, receive = anyio.create_memory_object_stream[int](0)
    with send, receive:
        got: list[int | None] = []

        async def receiver() -> None:
            got.append(await receive_soon(receive))

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            send.close()
        assert got == [None]
