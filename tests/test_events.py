"""Fanout: delivery order, slow and departed subscribers (vipd/events.py)."""

from __future__ import annotations

import trio
import trio.testing

from vipd.events import Fanout


async def test_full_subscriber_does_not_delay_the_others() -> None:
    fanout = Fanout()
    slow = fanout.subscribe(buffer=0)  # nobody reads it until the end
    fast = fanout.subscribe(buffer=4)
    result: list[int] = []

    async def send() -> None:
        result.append(await fanout.send("m1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        with trio.fail_after(5):
            assert await fast.receive() == "m1"  # while send() still waits on `slow`
        await trio.testing.wait_all_tasks_blocked()
        assert result == []
        assert await slow.receive() == "m1"
    assert result == [2]


async def test_departed_subscriber_is_dropped_and_order_is_kept() -> None:
    fanout = Fanout()
    gone = fanout.subscribe()
    kept = fanout.subscribe(buffer=2)
    await gone.aclose()
    assert await fanout.send("a") == 1
    assert fanout.send_nowait("b") == 1
    assert fanout.send_nowait("c") == 0  # kept is full: missed, never blocks
    assert [kept.receive_nowait(), kept.receive_nowait()] == ["a", "b"]
    assert fanout.last == "c"
