"""Address manager: the sans-IO parts (lifetime arithmetic, interface choice, event parsing,
address order) as tables, and the task's rules under MockClock with a recording fake kernel
(tests/wire_fixtures.py): leadership, the userspace fence, the release gate, deferred re-adds,
stop-before-remove, a vanishing interface. Wire behaviour: tests/test_wire_netns.py."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from tests.netns_fixtures import wait_until
from tests.wire_fixtures import FakeKernel, FakeSender, acknowledge_stops, event_socket_pair
from vipd.announce import run_announcer
from vipd.config import Vip, load
from vipd.errors import ConfigError, NetlinkError
from vipd.events import Fanout, Leadership, ReleaseGate
from vipd.netlink import (
    ANNOUNCE_STOP_TIMEOUT,
    IFA_F_SECONDARY,
    REQUEST_BUDGET,
    RTM_DELADDR,
    RTM_NEWLINK,
    AddressManager,
    Kernel,
    KernelAddress,
    _behind_node_address,
    choose_interface,
    default_route_oif,
    expiry_bound,
    lifetime_for,
    link_running,
    parse_events,
    read_events,
    run_address_task,
)
from vipd.state import RuntimeState

I = ipaddress.ip_interface  # noqa: E741


@pytest.mark.parametrize("remaining, seconds, strict", [
    (None, None, True),     # no fence (static backend): permanent
    (40.0, 34, True),
    (15.0, 12, True),       # kube-vip's 15 s lease
    (3.45, 2, True),
    (2.3, 1, True),         # the shortest remaining time that still gives a guarantee
    (2.29, 1, False),       # shorter: 1 s best effort
    (1.9, 1, False),        # vipd's default 2 s lease
    (0.2, 1, False),
])
def test_lifetime_for(remaining, seconds, strict):
    lt = lifetime_for(remaining)
    assert (lt.seconds, lt.strict) == (seconds, strict)
    if strict and seconds is not None:
        assert expiry_bound(seconds) <= remaining  # the guarantee itself
        assert expiry_bound(seconds + 1) > remaining  # and the longest such lifetime


def test_choose_interface():
    addrs = [("lo", I("127.0.0.1/8")), ("eth0", I("192.168.1.10/24")), ("eth1", I("10.0.0.5/8")),
             ("eth2", I("10.1.2.3/16")), ("eth3", I("10.1.2.50/32")), ("eth4", I("fd00::1/64"))]
    assert choose_interface(I("10.1.2.200/32"), addrs, "eth0") == "eth2"  # most specific subnet
    assert choose_interface(I("10.9.9.9/32"), addrs, "eth0") == "eth1"
    assert choose_interface(I("172.16.0.1/32"), addrs, "eth0") == "eth0"  # default route's
    assert choose_interface(I("172.16.0.1/32"), addrs, None) is None
    assert choose_interface(I("10.1.2.50/32"), [("eth3", I("10.1.2.50/32"))], "eth0") == "eth0"  # leftover VIP
    assert choose_interface(I("fd00::50/128"), addrs, None) == "eth4"


def _nlmsg(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_parse_events():
    addr = _nlmsg(RTM_DELADDR, struct.pack("=BBBBI", 2, 32, 0, 0, 7) + b"\x08\x00\x01\x00\x0a\x00\x00\x32")
    link = _nlmsg(RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 0x10043, 0))
    events = parse_events(addr + link + b"\x00\x00")  # trailing junk is ignored
    assert [(e.kind, e.ifindex) for e in events] == [("addr", 7), ("link", 7)]
    assert link_running(events[1].flags)
    assert not link_running(0x1003)  # up, no carrier


def test_vip_behind_node_address():
    vip = Vip(I("10.0.0.50/32"))
    node, other = KernelAddress(I("10.0.0.1/24"), 0x80, None), KernelAddress(I("10.0.0.9/24"), IFA_F_SECONDARY, None)
    mine = KernelAddress(I("10.0.0.50/32"), 0, 30)
    assert not _behind_node_address(vip, [node, mine], [vip])
    assert _behind_node_address(vip, [mine, node], [vip])  # kube-vip #682
    assert not _behind_node_address(vip, [mine, other], [vip])  # a secondary is nobody's node IP
    assert not _behind_node_address(Vip(I("fd00::50/128")), [], [])


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def _cfg(*addresses: str, **flags: Any):
    base = {"vip.address": list(addresses or ["10.0.0.50"]), "election.backend": "none",
            "proxy.enabled": False}
    base.update(flags)
    return load(environ={}, flags=base)


@dataclass
class Manager:
    mgr: AddressManager
    kernel: FakeKernel
    seen: list  # VipChanges the announcer stand-in got
    journal: list  # kernel changes and announcer messages, in order
    state: RuntimeState


@contextlib.asynccontextmanager
async def manager(cfg, kernel: FakeKernel | None = None) -> AsyncIterator[Manager]:
    """An AddressManager with an announcer stand-in that acknowledges stops."""
    journal: list = []
    kernel = kernel or FakeKernel(journal)
    kernel.journal = journal
    state, changes, seen = RuntimeState(node="n1"), Fanout(), []
    rx = changes.subscribe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge_stops, rx, seen, journal)
        yield Manager(AddressManager(cfg, state, kernel, changes, "eth0", 2), kernel, seen, journal, state)
        nursery.cancel_scope.cancel()


async def test_leadership_rules(mock_clock):
    async with manager(_cfg()) as m:
        kernel, state = m.kernel, m.state
        now = trio.current_time()
        await m.mgr.on_leadership(Leadership(True, "n1", 5, safe_until=now + 3, fence_until=now + 4.5))
        assert kernel.present == {"10.0.0.50/32": 2} and state.vips[0].present
        await trio.testing.wait_all_tasks_blocked()
        assert [c.present for c in m.seen] == [True]
        # a renew refreshes the lifetime, says nothing new to the announcer
        await m.mgr.on_leadership(Leadership(True, "n1", 5, safe_until=now + 13, fence_until=now + 14.5))
        assert kernel.calls[-1][1:] == ("set", "10.0.0.50/32", 11)
        await trio.testing.wait_all_tasks_blocked()
        assert len(m.seen) == 1
        # an older term is ignored
        await m.mgr.on_leadership(Leadership(False, "n2", 4))
        assert m.mgr.leader and kernel.present
        # the userspace fence: no renew before safe_until → announcer stopped, then address removed
        await trio.sleep_until(m.mgr.deadline)
        await m.mgr.reconcile()
        assert m.journal[-2:] == [("announce", False, "expired"), ("del", "10.0.0.50/32")]
        assert kernel.present == {} and not state.vips[0].present and not m.mgr.leader
        # a leader event that arrives already expired does not add
        late = trio.current_time()
        await m.mgr.on_leadership(Leadership(True, "n1", 6, safe_until=late - 0.1, fence_until=late + 1))
        assert kernel.present == {}


def test_default_route_oif():
    assert default_route_oif(3, None) == 3
    # ECMP: no RTA_OIF, the nexthops carry it; the first one wins
    assert default_route_oif(None, [{"oif": 5, "attrs": []}, {"oif": 3, "attrs": []}]) == 5
    assert default_route_oif(None, [{"oif": 0}, {"oif": 4}]) == 4
    assert default_route_oif(None, None) is None and default_route_oif(None, []) is None


class _FailingSocket:
    def __init__(self, err: int) -> None:
        self.err = err

    async def recv(self, size: int) -> bytes:
        raise OSError(self.err, os.strerror(self.err))


async def test_read_events_reads_enobufs_as_overrun():
    assert [e.kind for e in await read_events(_FailingSocket(errno.ENOBUFS))] == ["overrun"]
    with pytest.raises(NetlinkError) as info:
        await read_events(_FailingSocket(errno.EBADF))
    assert info.value.errno == errno.EBADF and str(info.value).startswith("netlink events: ")


@dataclass
class Task:
    leadership: Fanout
    seen: list
    journal: list
    events: Any  # the other end of the fake event socket: write netlink datagrams to it
    state: RuntimeState

    async def lead(self, safe_in: float, fence_in: float, term: int = 1) -> float:
        """Send a leader event (times from now) and let the task act on it; returns now."""
        now = trio.current_time()
        await self.leadership.send(Leadership(True, "n1", term, safe_until=now + safe_in,
                                              fence_until=now + fence_in))
        await trio.testing.wait_all_tasks_blocked()
        return now


@contextlib.asynccontextmanager
async def address_task(cfg, kernel: FakeKernel, gate: ReleaseGate | None = None) -> AsyncIterator[Task]:
    """run_address_task on the fake kernel, with an announcer stand-in; cancelled on exit."""
    state, leadership, changes, seen = RuntimeState(node="n1"), Fanout(), Fanout(), []
    rx, lead_rx = changes.subscribe(), leadership.subscribe()
    ours, theirs = event_socket_pair()
    with theirs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acknowledge_stops, rx, seen, kernel.journal)
            await nursery.start(lambda **kw: run_address_task(
                cfg, state, lead_rx, changes, gate, kernel=kernel, open_events=lambda: ours, **kw))
            yield Task(leadership, seen, kernel.journal, theirs, state)
            nursery.cancel_scope.cancel()


def _addr_event(ifindex: int) -> bytes:
    return _nlmsg(RTM_DELADDR, struct.pack("=BBBBI", 2, 32, 0, 0, ifindex))


def _link_event(ifindex: int) -> bytes:
    return _nlmsg(RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, ifindex, 0x10043, 0))


async def test_task_fences_itself_when_no_renew_comes(mock_clock):
    kernel = FakeKernel()
    with capture_logs() as logs:
        async with address_task(_cfg(), kernel) as t:
            t0 = await t.lead(safe_in=3, fence_in=4.5)
            assert kernel.present == {"10.0.0.50/32": 2}
            await trio.sleep(10)  # no renew: the task's own deadline (safe_until) fires
            assert kernel.present == {} and not t.state.vips[0].present
    deleted = [c for c in kernel.calls if c[1] == "del"]
    assert deleted[0][0] == pytest.approx(t0 + 3)  # exactly at safe_until (MockClock)
    assert t.journal[1:5] == [("set", "10.0.0.50/32"), ("announce", True, "acquired"),
                             ("announce", False, "expired"), ("del", "10.0.0.50/32")]
    assert [e["event"] for e in logs].count("vip.fence_expired") == 1


async def test_unacknowledged_stop_never_delays_removal_past_the_fence(mock_clock):
    """An announcer that never acknowledges its stop: at safe_until the address task waits for
    it only as long as the fence allows (here 0.2 s, not ANNOUNCE_STOP_TIMEOUT), then removes."""
    journal: list = []
    kernel = FakeKernel(journal)
    state, changes = RuntimeState(node="n1"), Fanout()
    deaf = changes.subscribe()  # an announcer that takes messages and never answers
    mgr = AddressManager(_cfg(), state, kernel, changes, "eth0", 2)
    t0 = trio.current_time()
    await mgr.on_leadership(Leadership(True, "n1", 1, safe_until=t0 + 1.5, fence_until=t0 + 1.75))
    assert deaf.receive_nowait().present
    await trio.sleep_until(mgr.deadline)
    await mgr.on_deadline()
    deleted = [c for c in kernel.calls if c[1] == "del"]
    assert deleted and deleted[0][0] <= t0 + 1.75 - REQUEST_BUDGET + 1e-9  # inside the fence
    assert deleted[0][0] < t0 + 1.5 + ANNOUNCE_STOP_TIMEOUT
    assert kernel.present == {}


@pytest.mark.parametrize("fault", [None, "error", "hang"])
async def test_release_gate_only_after_confirmed_removal(mock_clock, fault):
    kernel, gate = FakeKernel(), ReleaseGate()
    with capture_logs() as logs:
        async with address_task(_cfg(), kernel, gate) as t:
            await t.lead(safe_in=30, fence_in=40)
            assert kernel.present
            if fault == "error":
                kernel.fail_delete = NetlinkError("remove 10.0.0.50/32: Operation not permitted", 1)
            elif fault == "hang":
                kernel.hang_delete = True
            stopped_at = trio.current_time()
    assert gate.given  # the election never waits for its deadline to learn the answer
    withheld = [e for e in logs if e["event"] == "vip.release_withheld"]
    if fault is None:
        assert gate.is_set() and kernel.present == {} and not withheld
    else:
        assert not gate.is_set() and kernel.present and len(withheld) == 1
        assert gate.withheld == withheld[0]["reason"]
        assert ("timed out" if fault == "hang" else "Operation not permitted") in gate.withheld
        assert trio.current_time() - stopped_at <= 3.0 + 0.001  # CLEANUP_TIMEOUT bounds the stop
    assert kernel.closed


async def test_gate_set_when_start_fails_before_any_address():
    kernel, gate = FakeKernel(), ReleaseGate()
    cfg = _cfg(**{"vip.interface": "eth9"})
    with pytest.raises(ConfigError):
        await run_address_task(cfg, RuntimeState(node="n1"), Fanout().subscribe(), Fanout(), gate,
                               kernel=kernel)
    assert gate.is_set() and kernel.closed


LEASE_5S = {"election.lease_duration": "5s", "election.renew_deadline": "3s", "election.retry_period": "1s"}


async def test_late_restore_waits_for_the_next_renew(mock_clock):
    with capture_logs() as logs:
        async with manager(_cfg(**LEASE_5S)) as m:
            assert m.mgr.strict_possible
            t0 = trio.current_time()
            await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=t0 + 3, fence_until=t0 + 5))
            assert m.kernel.present == {"10.0.0.50/32": 3}
            # 2.1 s before the fence (2.05 s after the request budget): no whole second is safe
            await trio.sleep(2.9)
            del m.kernel.present["10.0.0.50/32"]  # ip addr del
            sets = len([c for c in m.kernel.calls if c[1] == "set"])
            await m.mgr.reconcile()
            await m.mgr.reconcile()  # more events: still deferred, logged once
            assert m.kernel.present == {} and not m.state.vips[0].present
            assert len([c for c in m.kernel.calls if c[1] == "set"]) == sets
            # the renew brings a new fence: restored with a guaranteed lifetime, re-announced
            now = trio.current_time()
            await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=now + 3, fence_until=now + 5))
            assert m.kernel.present == {"10.0.0.50/32": 3} and m.state.vips[0].present
            await trio.testing.wait_all_tasks_blocked()
            assert [(c.present, c.reason) for c in m.seen] == [(True, "acquired"), (True, "restored")]
    events = [e["event"] for e in logs]
    assert events.count("vip.deferred") == 1 and events.count("vip.restored") == 1
    assert "vip.fence_weak" not in events  # the configuration can guarantee: nothing weak was used
    deferred = next(e for e in logs if e["event"] == "vip.deferred")
    assert deferred["action"] == "restore" and deferred["remaining"] == pytest.approx(2.05)


async def test_late_reorder_waits_for_the_next_renew(mock_clock):
    async with manager(_cfg(**LEASE_5S)) as m:
        t0 = trio.current_time()
        await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=t0 + 3, fence_until=t0 + 5))
        await trio.sleep(2.9)
        m.kernel.present["10.0.0.1/24"] = None  # the node's own address comes back behind the VIP
        calls = len(m.kernel.calls)
        await m.mgr.reconcile()
        assert len(m.kernel.calls) == calls and m.state.vips[0].present  # left where it is
        now = trio.current_time()
        await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=now + 3, fence_until=now + 5))
        await m.mgr.reconcile()
        assert list(m.kernel.present) == ["10.0.0.1/24", "10.0.0.50/32"]  # the VIP moved behind it


async def test_short_lease_keeps_best_effort_and_says_so_once(mock_clock):
    with capture_logs() as logs:
        async with manager(_cfg()) as m:  # defaults 2 s / 1.5 s / 0.5 s: never a guarantee
            assert not m.mgr.strict_possible
            t0 = trio.current_time()
            await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=t0 + 1.5, fence_until=t0 + 1.95))
            await trio.sleep(0.6)
            del m.kernel.present["10.0.0.50/32"]  # ip addr del, inside the 1 s lifetime
            await m.mgr.reconcile()
            assert m.kernel.present == {"10.0.0.50/32": 1}  # restored at once, 1 s best effort
    events = [e["event"] for e in logs]
    assert events.count("vip.fence_weak") == 1 and "vip.deferred" not in events


async def test_vip_gone_by_its_own_lifetime_waits_for_the_next_renew(mock_clock):
    """Renewals stopped refreshing the lifetime and the kernel dropped the VIP: putting it back
    (still before safe_until) would keep it a whole lifetime past the last renew's fence."""
    with capture_logs() as logs:
        async with manager(_cfg()) as m:
            t0 = trio.current_time()
            await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=t0 + 1.5, fence_until=t0 + 1.95))
            await trio.sleep(1.0)  # no renew came: the 1 s lifetime is over
            del m.kernel.present["10.0.0.50/32"]  # the kernel expired it
            sets = len([c for c in m.kernel.calls if c[1] == "set"])
            await m.mgr.reconcile()
            await m.mgr.reconcile()
            assert m.kernel.present == {} and not m.state.vips[0].present
            assert len([c for c in m.kernel.calls if c[1] == "set"]) == sets  # not re-added
            now = trio.current_time()  # a late renew after all: the VIP comes back with it
            await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=now + 1.5, fence_until=now + 1.95))
            assert m.kernel.present == {"10.0.0.50/32": 1} and m.state.vips[0].present
    events = [e["event"] for e in logs]
    assert events.count("vip.expired") == 1 and events.count("vip.restored") == 1


async def test_leftover_with_another_prefix_is_removed(mock_clock):
    async with manager(_cfg()) as m:
        m.kernel.present.update({"10.0.0.1/24": None, "10.0.0.50/24": None})
        await m.mgr.reconcile(not_leader_reason="leftover")
        assert list(m.kernel.present) == ["10.0.0.1/24"]
        # as leader: ours with the wrong prefix goes, the configured one is added
        m.kernel.present["10.0.0.50/28"] = None
        now = trio.current_time()
        await m.mgr.on_leadership(Leadership(True, "n1", 1, safe_until=now + 30, fence_until=now + 40))
        await m.mgr.reconcile()
        assert sorted(m.kernel.present) == ["10.0.0.1/24", "10.0.0.50/32"]


async def test_announcer_stops_before_the_address_goes(mock_clock):
    """lose() while the real announcer is in the middle of a round: every frame of that round
    is out before the address is removed, and none after (repeated: trio shuffles the order)."""
    cfg = _cfg("10.0.0.50", "fd00::50", **{"announce.refresh": "0.1s"})
    journal: list = []
    kernel, changes, state = FakeKernel(journal), Fanout(), RuntimeState(node="n1")
    mid_round = trio.Event()

    class Pausing(FakeSender):
        """A send that waits for the socket a moment (EAGAIN), as a busy NIC queue makes it."""

        async def send(self, frame: bytes) -> None:
            mid_round.set()
            await trio.sleep(0.001)
            await super().send(frame)

    mgr = AddressManager(cfg, state, kernel, changes, "eth0", 2)
    rx = changes.subscribe()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_announcer(cfg, state, rx,
                                                           open_sender=lambda i: Pausing(i, journal), **kw))
            for term in range(1, 41, 2):
                now = trio.current_time()
                await mgr.on_leadership(Leadership(True, "n1", term, safe_until=now + 90, fence_until=now + 99))
                await trio.sleep(4.5 + (term % 7) * 0.1)  # into the refresh rounds
                mid_round = trio.Event()
                await mid_round.wait()
                start = len(journal)
                await mgr.on_leadership(Leadership(False, "n2", term + 1))
                await trio.sleep(1.0)  # whatever the announcer still had in hand is out by now
                tail = journal[start:]
                removed = min(i for i, e in enumerate(tail) if e[0] == "del")
                assert not any(isinstance(e[0], float) for e in tail[removed:]), tail
            nursery.cancel_scope.cancel()


async def test_interface_vanishing_under_a_request_is_waited_out(mock_clock):
    kernel = FakeKernel()
    with capture_logs() as logs:
        async with address_task(_cfg(), kernel) as t:
            await t.lead(safe_in=60, fence_in=70)
            # the interface goes, and our next look still sees it (a race): set → ENODEV
            kernel.links_once, kernel.links_now, kernel.present = dict(kernel.links_now), {}, {}
            await t.events.send(_addr_event(2))
            await trio.testing.wait_all_tasks_blocked()
            assert not t.state.vips[0].present
            # it comes back under the same name with a new ifindex: re-added there, announced anew
            kernel.links_now = {7: ("eth0", 0x10043)}
            await t.events.send(_link_event(7))
            await trio.testing.wait_all_tasks_blocked()
            assert list(kernel.present) == ["10.0.0.50/32"] and t.state.vips[0].present
    assert [(c.present, c.reason, c.ifindex) for c in t.seen][1:4] == [
        (True, "acquired", 2), (False, "link-gone", 2), (True, "restored", 7)]
    assert "link.gone" in [e["event"] for e in logs]


async def test_pyroute2_runs_on_one_thread_and_keeps_no_fds(monkeypatch):
    """Read-only in this namespace. trio's worker threads are made to exit after 10 ms idle, so
    several thread generations pass; pyroute2 keeps a loop (fds) per thread it ran on."""
    import trio._core._thread_cache as thread_cache  # private: the only knob for its idle timeout

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.01)
    kernel = Kernel()
    await kernel.open()
    counts = []
    try:
        for _ in range(4):
            assert await kernel.links()
            await trio.to_thread.run_sync(lambda: None)  # a trio worker thread comes and goes
            await wait_until(lambda: not any(t.name.startswith("Trio thread") for t in threading.enumerate()),
                             limit=10)
            counts.append(len(os.listdir("/proc/self/fd")))
    finally:
        await kernel.close()
    assert counts == [counts[0]] * 4


async def test_missing_interface_is_a_config_error():
    # read-only: looks the name up in this (host) namespace and stops before any change
    cfg = load(environ={}, flags={"vip.address": ["10.0.0.50"], "vip.interface": "vwnope0",
                                  "election.backend": "none", "proxy.enabled": False})
    with trio.fail_after(10), pytest.raises(ConfigError) as info:
        await run_address_task(cfg, RuntimeState(node="n1"), Fanout().subscribe(), Fanout())
    assert "'vwnope0' does not exist; expected one of" in str(info.value)
    assert "lo" in str(info.value).split("expected one of ")[1].split(", ")  # every real interface, lo too
    assert info.value.problems[0].startswith("vip.interface (flag --interface)")
