"""sd_notify: the datagram, READY/STATUS/STOPPING, and a watchdog that stops with the supervisor."""

from __future__ import annotations

import os

import pytest
import trio
from structlog.testing import capture_logs

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


# --------------------------------------------------------------------------------------------
# The watchdog against the real supervisor (vipd.app.supervise writes the tick it follows),
# under trio's MockClock. A loop stall is the test task jumping the clock without yielding:
# no other task runs meanwhile, and afterwards the tick and the watchdog wake in one batch, in
# trio's (randomised) order.
# --------------------------------------------------------------------------------------------

WATCHDOG_SEC = 6.0


class PingLog:
    """Times (mock clock) at which WATCHDOG=1 arrived on the notify socket."""

    def __init__(self, ns):
        self.ns = ns
        self.times: list[float] = []
        self.first = trio.Event()

    async def collect(self) -> None:
        while True:
            msg = await self.ns.receive()
            if msg.get("WATCHDOG") == "1":
                self.times.append(trio.current_time())
                self.first.set()

    def max_gap(self, since: float = 0.0) -> float:
        times = [t for t in self.times if t >= since]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


def _notify_plan(cfg, state, env, *, with_notify: bool = True):
    from tests.ops_fixtures import fake_task
    from vipd import app

    def plan(w: app.Wiring) -> app.Plan:
        services = [("notify", lambda **kw: run_notify(cfg, state, w.leadership.subscribe(), environ=env, **kw))]
        return app.Plan(services=services if with_notify else [], vip=[("address", fake_task())], proxy=[],
                        election=("election", fake_task()))

    return plan


def _watchdog_env(ns) -> dict[str, str]:
    return {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1_000_000)),
            "WATCHDOG_PID": str(os.getpid())}


async def test_watchdog_survives_short_loop_stalls_and_stops_for_a_stuck_loop(autojump_clock):
    """Stalls of 2.5 s at every phase of the 3 s ping period never leave WatchdogSec (6 s)
    without a ping, and log nothing at error; a loop blocked for longer than WatchdogSec sends
    nothing for the whole time (systemd kills it), and pings come back once it runs again."""
    from vipd import app

    cfg = make_config()
    state = RuntimeState(node="node-a")
    with notify_socket() as ns, capture_logs() as logs, trio.fail_after(600):
        pings = PingLog(ns)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pings.collect)
            stop = trio.Event()
            nursery.start_soon(lambda: app.supervise(cfg, state, _notify_plan(cfg, state, _watchdog_env(ns)),
                                                     stop=stop, handle_signals=False))
            await pings.first.wait()
            for i in range(24):  # the stall starts 0.0 .. 2.875 s after a ping
                await trio.sleep_until(pings.times[-1] + (i % 24) * 0.125)
                autojump_clock.jump(2.5)
                await trio.sleep(4)
            assert len(pings.times) > 24
            assert pings.max_gap() < WATCHDOG_SEC, pings.times
            assert not [e for e in logs if e["log_level"] == "error"], logs

            await trio.sleep_until(pings.times[-1] + 1.0)
            stuck_at = trio.current_time()
            autojump_clock.jump(WATCHDOG_SEC + 2)  # stuck: nothing runs, systemd's timer runs out
            await trio.sleep(5)
            after = [t for t in pings.times if t > stuck_at]
            assert after and after[0] - max(t for t in pings.times if t <= stuck_at) > WATCHDOG_SEC
            assert after[0] - (stuck_at + WATCHDOG_SEC + 2) <= 0.25 + 1e-9  # back at once it runs
            stop.set()
            await trio.sleep(5)
            nursery.cancel_scope.cancel()


async def test_watchdog_stops_when_the_supervisors_tick_stops(autojump_clock):
    """The watchdog follows the tick vipd.app.supervise writes: with the supervisor gone
    (cancelled) and only the notify task left, the pings stop within WATCHDOG_STALE + a
    recheck, `watchdog.withheld` is logged once, and a new supervisor brings them back."""
    from vipd import app
    from vipd.notify import RECHECK, STALE_GRACE, WATCHDOG_STALE

    cfg = make_config()
    state = RuntimeState(node="node-a")
    leadership_tx, leadership_rx = trio.open_memory_channel(1)
    with notify_socket() as ns, capture_logs() as logs, trio.fail_after(600):
        pings = PingLog(ns)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pings.collect)
            supervisor = trio.CancelScope()

            async def supervised(scope: trio.CancelScope) -> None:
                with scope:
                    await app.supervise(cfg, state, _notify_plan(cfg, state, {}, with_notify=False),
                                        handle_signals=False)

            nursery.start_soon(supervised, supervisor)
            await nursery.start(lambda **kw: run_notify(cfg, state, leadership_rx, environ=_watchdog_env(ns), **kw))
            await trio.sleep(10)
            assert len(pings.times) >= 3 and pings.max_gap() <= WATCHDOG_SEC / 2 + 1e-9

            supervisor.cancel()  # the supervisor and its tick are gone; the notify task is not
            gone_at = trio.current_time()
            await trio.sleep(30)
            assert not [t for t in pings.times if t > gone_at + WATCHDOG_STALE + RECHECK]
            withheld = [e for e in logs if e["event"] == "watchdog.withheld"]
            assert len(withheld) == 1 and withheld[0]["log_level"] == "error"
            # noticed at the first look after the tick went stale (at most a period on), then the grace
            assert withheld[0]["tick_age"] <= WATCHDOG_STALE + WATCHDOG_SEC / 2 + STALE_GRACE + RECHECK

            back_at = trio.current_time()
            nursery.start_soon(supervised, trio.CancelScope())
            await trio.sleep(10)
            back = [t for t in pings.times if t > back_at]
            assert back and back[0] - back_at <= RECHECK + 1e-9 and len(back) >= 3
            assert [e["event"] for e in logs if e["event"].startswith("watchdog.")] == [
                "watchdog.withheld", "watchdog.resumed"]
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
