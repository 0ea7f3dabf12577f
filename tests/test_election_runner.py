"""The election task under MockClock with the in-memory FakeBackend: one leader at a time,
step-down by the renew deadline on a hung backend, bootstrap, logging once per change,
release only after the VIP is gone."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from tests.election_fixtures import (
    ElectorHarness,
    FakeBackend,
    FakeLeaseStore,
    FakeNetwork,
    sample_leaders,
    start_all,
)
from vipd import config as config_mod
from vipd.election.backend import LeaseRecord
from vipd.election.runner import build_backend, run_election
from vipd.election.static import StaticBackend
from vipd.events import Fanout
from vipd.state import RuntimeState


def make_cfg(node: str, **flags: Any) -> config_mod.Config:
    base = {"vip.address": ["192.0.2.10"], "election.backend": "etcd", "proxy.enabled": False,
            "node": node, "shutdown_timeout": "3s", "proxy.drain_timeout": "1s",
            "election.etcd.endpoints": ["http://127.0.0.1:1"]}
    base.update(flags)
    return config_mod.load(environ={}, flags=base)


class Elector(ElectorHarness):
    def __init__(self, node: str, store: FakeLeaseStore, net: FakeNetwork, **flags: Any) -> None:
        cfg = make_cfg(node, **flags)
        super().__init__(node, cfg, FakeBackend(store, node, net, lease_duration=cfg.election.lease_duration))


async def test_three_electors_exactly_one_leader_and_hung_leader_steps_down(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    electors = [Elector(f"n{i}", store, net) for i in range(3)]
    async with trio.open_nursery() as n:
        await start_all(n, electors, wait_leader=False)
        samples = await sample_leaders(electors, 5.0)
        assert all(len(s) <= 1 for s in samples)
        assert samples[-1] and len({tuple(s) for s in samples if s}) == 1
        (leader,) = [e for e in electors if e.leader]
        net.mode[leader.node] = "hang"  # accepts and never answers
        t_hang = trio.current_time()
        last_safe = max(ev.safe_until for _, ev in leader.events if ev.leader and ev.safe_until)
        samples = await sample_leaders(electors, 6.0)
        assert all(len(s) <= 1 for s in samples)
        lost = [t for t, ev in leader.events if not ev.leader and ev.reason == "renew_deadline"]
        assert lost and lost[0] <= last_safe and lost[0] - t_hang <= 1.5
        others = [e for e in electors if e.leader]
        assert len(others) == 1 and others[0] is not leader
        n.cancel_scope.cancel()


async def test_graceful_stop_releases_after_gate_and_another_acquires_within_retry(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    electors = [Elector(f"n{i}", store, net) for i in range(3)]
    async with trio.open_nursery() as n:
        await start_all(n, electors, wait_leader=False)
        await sample_leaders(electors, 3.0)
        (leader,) = [e for e in electors if e.leader]
        leader.scope.cancel()
        await trio.sleep(1.0)
        assert "release" not in leader.backend.calls  # the VIP is not confirmed gone yet
        assert not leader.done.is_set()
        t_gate = trio.current_time()
        leader.gate.set()
        await leader.done.wait()
        assert leader.backend.calls[-1] == "release" and leader.backend.closed
        assert [ev.reason for _, ev in leader.events][-1] == "released"
        await sample_leaders(electors, 1.0)
        new = [e for e in electors if e.leader]
        assert len(new) == 1
        t_new = min(t for t, ev in new[0].events if ev.leader)
        assert t_new - t_gate <= 0.5 + 0.01
        n.cancel_scope.cancel()


async def test_start_as_leader_while_forbidden_then_yields_to_valid_lease(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    net.mode["n1"] = "forbidden"
    e = Elector("n1", store, net, **{"election.start_as_leader": True})
    async with trio.open_nursery() as n:
        with capture_logs() as logs:
            await n.start(e.run)
            await trio.testing.wait_all_tasks_blocked()
            assert e.leader
            await trio.sleep(10.0)
            assert e.leader and e.state.election.backend_up is False
            store.acquire("n2", None, trio.current_time(), 2.0)  # another node holds a lease
            net.mode["n1"] = "up"
            await trio.sleep(5.0)
        # It yields at the first answer; n2 never renews, so n1 takes over lease_duration later.
        (t_yield,) = [t for t, ev in e.events if ev.reason == "bootstrap_yield"]
        assert [ev.holder for t, ev in e.events if t == t_yield] == ["n2"]
        (t_take,) = [t for t, ev in e.events if ev.reason == "acquired"]
        assert t_take - t_yield == pytest.approx(2.0, abs=0.01)
        names = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
        assert names.count("election.backend_unreachable") == 1
        assert names.count("leadership.acquired") == 2 and names.count("leadership.lost") == 1
        assert "election.backend_recovered" in names
        n.cancel_scope.cancel()


async def test_start_as_leader_takes_empty_lease_once_backend_answers(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    net.mode["n1"] = "down"
    e = Elector("n1", store, net, **{"election.start_as_leader": True})
    async with trio.open_nursery() as n:
        await n.start(e.run)
        await trio.sleep(5.0)
        assert e.leader and store.record is None
        net.mode["n1"] = "up"
        await trio.sleep(3.0)
        assert e.leader and store.record is not None and store.record.holder == "n1"
        assert [ev.reason for _, ev in e.events if ev.leader][-1] == "renewed"
        n.cancel_scope.cancel()


async def test_renew_events_carry_fresh_horizons_and_logs_are_quiet(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    e = Elector("n1", store, net)
    with capture_logs() as logs:
        async with trio.open_nursery() as n:
            await n.start(e.run)
            await trio.sleep(5.0)
            net.mode["*"] = "down"
            await trio.sleep(5.0)
            net.mode["*"] = "up"
            await trio.sleep(5.0)
            assert e.state.election.transitions == 3  # acquired, lost, acquired
            n.cancel_scope.cancel()
    renews = [ev for _, ev in e.events if ev.reason == "renewed"]
    assert len(renews) >= 15
    assert all(b.safe_until > a.safe_until for a, b in zip(renews, renews[1:], strict=False))
    assert all(ev.fence_until - ev.safe_until == pytest.approx(0.5) for ev in renews)
    info = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
    assert info.count("election.backend_unreachable") == 1
    assert info.count("election.backend_recovered") == 1
    assert info.count("leadership.lost") == 1 and info.count("leadership.acquired") == 2
    assert e.state.election.renew_failures >= 2


async def test_malformed_records_do_not_crash_the_task(autojump_clock):
    store, net = FakeLeaseStore(), FakeNetwork()
    net.mode["n1"] = "garbage"
    e = Elector("n1", store, net)
    async with trio.open_nursery() as n:
        await n.start(e.run)
        await trio.sleep(3.0)  # garbage observe → "free" → acquire answers None: errors, no crash
        net.mode["n1"] = "up"
        await trio.sleep(2.0)
        assert e.leader
        n.cancel_scope.cancel()


async def test_watch_wakes_follower_immediately_after_release(autojump_clock):
    store, net = FakeLeaseStore(ttl=2.0), FakeNetwork(watch=True)
    a, b = Elector("a", store, net), Elector("b", store, net)
    async with trio.open_nursery() as n:
        await n.start(a.run)
        await trio.sleep(1.0)
        await n.start(b.run)
        await trio.sleep(3.0)
        assert a.leader and not b.leader
        a.gate.set()
        t_stop = trio.current_time()
        a.scope.cancel()
        await trio.sleep(0.3)
        assert b.leader
        t_new = min(t for t, ev in b.events if ev.leader)
        assert t_new - t_stop < 0.1  # watch, not the 0.5 s poll
        n.cancel_scope.cancel()


async def test_none_backend_is_always_leader(autojump_clock):
    cfg = make_cfg("solo", **{"election.backend": "none"})
    backend = build_backend(cfg)
    assert isinstance(backend, StaticBackend)
    state, fanout, gate = RuntimeState(node="solo"), Fanout(), trio.Event()
    recv = fanout.subscribe()
    async with trio.open_nursery() as n:
        await n.start(run_election, cfg, backend, fanout, state, gate)
        ev = await recv.receive()
        assert ev.leader and ev.holder == "solo" and state.election.role == "leader"
        await trio.sleep(10_000)
        assert state.election.role == "leader"
        gate.set()
        n.cancel_scope.cancel()
    assert state.election.role == "follower"


def test_build_backend_picks_etcd():
    from vipd.election.etcd import EtcdLeaseBackend

    assert isinstance(build_backend(make_cfg("n1")), EtcdLeaseBackend)


def test_record_type_is_frozen():
    with pytest.raises(AttributeError):
        LeaseRecord("a", "1", 1).holder = "b"  # type: ignore[misc]


async def test_a_subscriber_that_stops_reading_never_stalls_the_election(autojump_clock):
    """A consumer that stops reading (buffer 16) must not hold up renewals or a step-down;
    once it reads again it is handed the newest state, in order, not stale ones after it."""
    store, net = FakeLeaseStore(), FakeNetwork()
    e = Elector("n1", store, net)
    stuck = e.fanout.subscribe(16)  # first in the fan-out: a delivery waits on it first
    async with trio.open_nursery() as n:
        await n.start(e.run)
        await trio.sleep(30.0)  # ~60 renewals, each an event: far more than the 16 it can buffer
        assert e.leader and e.backend.calls.count("renew") >= 55
        net.mode["n1"] = "hang"
        t_hang = trio.current_time()
        await trio.sleep(2.0)
        assert not e.leader and e.state.election.role == "candidate"  # stepped down on time
        got = []
        with trio.move_on_after(1.0):  # read again: the buffer, then what waited
            async for ev in stuck:
                got.append((trio.current_time(), ev))
        assert len(got) < 16 + 1 + 8 + 2  # the backlog stayed bounded
        last = got[-1][1]
        assert (last.leader, last.reason) == (False, "renew_deadline")
        assert e.events[-1][1] == last  # the other subscriber caught up to the same state
        renewed = [ev for _, ev in got if ev.reason == "renewed"]
        assert all(a.safe_until < b.safe_until for a, b in zip(renewed, renewed[1:], strict=False))
        assert max(ev.safe_until for ev in renewed) <= t_hang + 1.5
        n.cancel_scope.cancel()
