"""sd_notify: the datagram, READY/STATUS/STOPPING, and a watchdog that stops with the supervisor."""

from __future__ import annotations

import os

import pytest
import trio

from tests.ops_fixtures import make_config, notify_socket
from vipd.events import Leadership
from vipd.notify import notify_address, role_text, run_notify, watchdog_period
from vipd.state import RuntimeState, VipState


def test_notify_address_forms():
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract/name"}) == "\0abstract/name"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None  # not spoken here


@pytest.mark.parametrize(
    ("env", "period"),
    [({}, None), ({"WATCHDOG_USEC": "10000000"}, 5.0), ({"WATCHDOG_USEC": "0"}, None),
     ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
     ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
     ({"WATCHDOG_USEC": "junk"}, None)],
)
def test_watchdog_period(env, period):
    assert watchdog_period(env, os.getpid()) == period


def test_role_text():
    assert role_text(Leadership(True, "a", 4), ["192.0.2.10/32"]) == "leader (term 4), serving 192.0.2.10/32"
    assert role_text(Leadership(False, "b", 4), []) == "follower, leader is b (term 4)"
    assert role_text(Leadership(False, None, 0), []) == "candidate, no leader"


@pytest.mark.parametrize("abstract", [False, True])
async def test_ready_status_stopping_on_the_socket(abstract):
    cfg = make_config()
    state = RuntimeState(node="node-a", vips=[VipState("192.0.2.10/32")])
    state.expected = {"notify", "election"}
    send, recv = trio.open_memory_channel(4)
    with notify_socket(abstract) as ns, trio.fail_after(10):
        env = {"NOTIFY_SOCKET": ns.env_value}
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_notify(cfg, state, recv, environ=env, **kw))
            state.ready.add("notify")
            await send.send(Leadership(False, "node-b", 2))
            assert (await ns.wait_for("STATUS"))["STATUS"] == "follower, leader is node-b (term 2)"
            await send.send(Leadership(False, "node-b", 2))  # a repeat says nothing new
            await send.send(Leadership(True, "node-a", 3, reason="acquired"))
            msg = await ns.wait_for("STATUS")
            assert msg["STATUS"] == "leader (term 3), serving 192.0.2.10/32"
            state.ready.add("election")
            msg = await ns.wait_for("READY")
            assert msg["READY"] == "1" and msg["STATUS"] == "leader (term 3), serving 192.0.2.10/32"
            state.stopping = True
            assert (await ns.wait_for("STOPPING"))["STOPPING"] == "1"
            nursery.cancel_scope.cancel()
    statuses = [m["STATUS"] for m in ns.messages if "STATUS" in m]
    assert statuses.count("follower, leader is node-b (term 2)") == 1
    assert not any("WATCHDOG" in m for m in ns.messages)  # not asked for


async def test_stopping_is_sent_even_when_cancelled_at_once():
    cfg = make_config()
    state = RuntimeState(node="node-a")
    send, recv = trio.open_memory_channel(1)
    with notify_socket() as ns, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_notify(cfg, state, recv, environ={"NOTIFY_SOCKET": ns.env_value}, **kw))
            state.stopping = True
            nursery.cancel_scope.cancel()  # before the lifecycle loop had a chance to look
        assert (await ns.wait_for("STOPPING"))["STOPPING"] == "1"


async def test_watchdog_pings_only_while_supervisor_ticks(autojump_clock):
    """Mock clock: WATCHDOG=1 every 0.5 s (WatchdogSec=1) while the tick is fresh; a stuck
    supervisor (tick stopped) stops the pings; a resumed one restarts them."""
    cfg = make_config()
    state = RuntimeState(node="node-a")
    send, recv = trio.open_memory_channel(1)
    ticking = trio.Event()
    with notify_socket() as ns:
        env = {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}

        async def tick(cancel_scope: trio.CancelScope) -> None:
            with cancel_scope:
                while True:
                    state.last_tick = trio.current_time()
                    ticking.set()
                    await trio.sleep(0.5)

        async def pings_between(t0: float, t1: float) -> int:
            count = 0
            with trio.move_on_at(t1):
                while True:
                    msg = await ns.receive()
                    if "WATCHDOG" in msg and trio.current_time() >= t0:
                        count += 1
            return count

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                ticker = trio.CancelScope()
                nursery.start_soon(tick, ticker)
                await ticking.wait()
                await nursery.start(lambda **kw: run_notify(cfg, state, recv, environ=env, **kw))
                start = trio.current_time()
                healthy = await pings_between(start, start + 5)
                assert 8 <= healthy <= 11
                ticker.cancel()  # the supervisor is stuck from here on
                stuck_from = trio.current_time()
                stuck = await pings_between(stuck_from + 2.5, stuck_from + 10)
                assert stuck == 0
                ticker2 = trio.CancelScope()
                nursery.start_soon(tick, ticker2)
                again = trio.current_time()
                assert await pings_between(again, again + 3) >= 4
                nursery.cancel_scope.cancel()


async def test_without_notify_socket_it_only_drains_leadership():
    cfg = make_config()
    state = RuntimeState(node="node-a")
    send, recv = trio.open_memory_channel(0)  # unbuffered: a sender blocks unless someone reads
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_notify(cfg, state, recv, environ={}, **kw))
            for term in range(20):
                await send.send(Leadership(True, "node-a", term))
            nursery.cancel_scope.cancel()
