"""Test doubles for the election: an in-memory lease store that enforces version conflicts like
a real server, and an async FAKE backend on top of it (faults on demand: down, forbidden, hung).

Imported by tests/test_election_machine.py and tests/test_election_runner.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import trio

from vipd.config import Config
from vipd.election.backend import BackendUnavailable, LeaseConflict, LeaseRecord
from vipd.election.runner import run_election
from vipd.events import Fanout, Leadership
from vipd.state import RuntimeState


@dataclass
class FakeLeaseStore:
    """The server side: one lease record, written optimistically (compare-and-swap on
    ``version``); ``term`` grows when the record changes hands (like ``leaseTransitions``).

    Without ``ttl``: a Kubernetes Lease. Nothing expires; every write changes ``version``.

    With ``ttl``: an etcd key on an etcd lease, with etcd's rules. ``grant`` makes a lease that
    expires ``ttl`` after the grant; ``keepalive`` restarts that TTL; a put (``acquire``) attaches
    the key to the lease it names and leaves that lease's expiry alone (a retake on an old lease
    does NOT extend it); when the key's lease expires or is revoked, the key is deleted.
    """

    record: LeaseRecord | None = None
    ttl: float | None = None
    _counter: int = 0
    _terms: int = 0
    writes: int = 0

    def __post_init__(self) -> None:
        self.leases: dict[int, float] = {}  # etcd mode: lease id → expiry
        self.record_lease: int | None = None  # etcd mode: the lease the key is on

    @property
    def expires_at(self) -> float:
        """etcd mode: when the key goes by itself (inf: no key, or no expiry)."""
        return self.leases.get(self.record_lease, math.inf) if self.record_lease is not None else math.inf

    def _tick(self, now: float) -> None:
        for lease, expiry in list(self.leases.items()):
            if now >= expiry:
                self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        del self.leases[lease]
        if self.record_lease == lease:  # etcd deletes the keys attached to the lease
            self.record, self.record_lease = None, None
            self._counter += 1

    def _write(self, rec: LeaseRecord) -> LeaseRecord:
        self._counter += 1
        self.writes += 1
        self.record = LeaseRecord(rec.holder, str(self._counter), rec.term, rec.lease_duration)
        return self.record

    def read(self, now: float) -> LeaseRecord | None:
        self._tick(now)
        return self.record

    # -- etcd leases ------------------------------------------------------------------------

    def grant(self, now: float) -> int:
        assert self.ttl is not None, "leases exist in etcd mode only"
        self._tick(now)
        self._counter += 1
        self.leases[self._counter] = now + self.ttl
        return self._counter

    def keepalive(self, lease: int, now: float) -> bool:
        """Restart the lease's TTL; False when it has expired or was revoked."""
        assert self.ttl is not None
        self._tick(now)
        if lease not in self.leases:
            return False
        self.leases[lease] = now + self.ttl
        return True

    def revoke(self, lease: int, now: float) -> None:
        self._tick(now)
        if lease in self.leases:
            self._drop_lease(lease)

    # -- writes -----------------------------------------------------------------------------

    def acquire(self, node: str, seen: LeaseRecord | None, now: float, lease_duration: float,
                lease: int | None = None) -> LeaseRecord:
        """Kubernetes: write if the record is still ``seen``. etcd: the backend's transaction
        (key absent, or mod_revision == seen's) putting the key on ``lease``."""
        self._tick(now)
        cur = self.record
        if (cur is None) != (seen is None) or (cur is not None and seen is not None and cur.version != seen.version):
            raise LeaseConflict("version changed")
        if self.ttl is not None and lease not in self.leases:
            raise LeaseConflict("requested lease not found")
        if cur is None:
            self._terms += 1
            term = self._terms
        else:
            term = cur.term + (0 if cur.holder == node else 1)
        self._terms = max(self._terms, term)
        self.record_lease = lease if self.ttl is not None else None
        return self._write(LeaseRecord(node, "", term, lease_duration))

    def renew(self, node: str, held: LeaseRecord, now: float, lease: int | None = None) -> LeaseRecord:
        """Kubernetes: rewrite if still ``held``. etcd: keep ``lease`` alive, then confirm the
        key is still on it (as EtcdLeaseBackend.renew); the key's version does not change."""
        self._tick(now)
        if self.ttl is not None:
            if lease is None or not self.keepalive(lease, now):
                raise LeaseConflict("lease expired")
            if self.record is None or self.record_lease != lease:
                raise LeaseConflict("the key is no longer on this lease")
            return self.record
        cur = self.record
        if cur is None or cur.holder != node or cur.version != held.version:
            raise LeaseConflict("not ours any more")
        return self._write(LeaseRecord(node, "", cur.term, cur.lease_duration))

    def release(self, node: str, held: LeaseRecord, now: float, lease: int | None = None) -> None:
        """Kubernetes: clear the holder if still ``held``. etcd: revoke ``lease``."""
        self._tick(now)
        if self.ttl is not None:
            if lease is not None:
                self.revoke(lease, now)
            return
        cur = self.record
        if cur is None or cur.holder != node or cur.version != held.version:
            raise LeaseConflict("not ours any more")
        self._write(LeaseRecord(None, "", cur.term, None))


class FakeSession:
    """One node's client of a FakeLeaseStore: what the real backend does on top of the server.

    etcd mode, like EtcdLeaseBackend: every acquire grants a fresh lease and puts the key on it;
    renew keeps the key's lease alive; release revokes it. ``reuse_lease=True`` is the old,
    unsafe variant (acquire reuses the lease it already has, whose remaining TTL is unknown), so
    tests can show that they catch it. Kubernetes mode: plain compare-and-swap writes.
    """

    def __init__(self, store: FakeLeaseStore, node: str, *, reuse_lease: bool = False) -> None:
        self.store, self.node, self.reuse_lease = store, node, reuse_lease
        self.lease: int | None = None  # etcd mode: the lease the key was last put on by us

    def read(self, now: float) -> LeaseRecord | None:
        return self.store.read(now)

    def acquire(self, seen: LeaseRecord | None, now: float, lease_duration: float) -> LeaseRecord:
        if self.store.ttl is None:
            return self.store.acquire(self.node, seen, now, lease_duration)
        lease = self.lease if self.reuse_lease and self.lease is not None else self.store.grant(now)
        rec = self.store.acquire(self.node, seen, now, lease_duration, lease)
        self.lease = lease
        return rec

    def renew(self, held: LeaseRecord, now: float) -> LeaseRecord:
        return self.store.renew(self.node, held, now, self.lease)

    def release(self, held: LeaseRecord, now: float) -> None:
        lease, self.lease = self.lease, None
        self.store.release(self.node, held, now, lease)


class FakeBackend:
    """A LeaseBackend over a shared FakeLeaseStore, with faults switchable per node or store-wide
    through ``FakeNetwork``. Calls take ``latency`` seconds of trio time."""

    name = "fake"

    def __init__(self, store: FakeLeaseStore, node: str, net: FakeNetwork | None = None,
                 lease_duration: float = 2.0, latency: float = 0.001) -> None:
        self.store, self.node, self.net = store, node, net or FakeNetwork()
        self.session = FakeSession(store, node)
        self.lease_duration, self.latency = lease_duration, latency
        self.server_expires = store.ttl is not None
        self.calls: list[str] = []
        self.closed = False
        self.changed = trio.Event()

    async def _call(self, what: str, deadline: float) -> None:
        self.calls.append(what)
        mode = self.net.mode.get(self.node, self.net.mode.get("*", "up"))
        if mode == "hang":
            await trio.sleep_until(deadline)
            raise BackendUnavailable(f"{what}: no answer by the deadline")
        if mode == "down":
            await trio.sleep(self.latency)
            raise BackendUnavailable(f"{what}: connection refused")
        if mode == "forbidden":
            await trio.sleep(self.latency)
            raise BackendUnavailable(f"{what}: 403 forbidden", forbidden=True)
        if mode == "garbage":
            await trio.sleep(self.latency)
            return
        with trio.move_on_at(deadline) as scope:
            await trio.sleep(self.latency)
        if scope.cancelled_caught:
            raise BackendUnavailable(f"{what}: timeout")

    def _garbage(self) -> LeaseRecord:
        return LeaseRecord(holder="", version=12345, term=-7, lease_duration=float("nan"))  # type: ignore[arg-type]

    async def observe(self, deadline: float) -> LeaseRecord | None:
        await self._call("observe", deadline)
        if self.net.mode.get(self.node, self.net.mode.get("*")) == "garbage":
            return self._garbage()
        return self.session.read(trio.current_time())

    async def acquire(self, seen: LeaseRecord | None, deadline: float) -> LeaseRecord:
        await self._call("acquire", deadline)
        rec = self.session.acquire(seen, trio.current_time(), self.lease_duration)
        self.net.notify()
        return rec

    async def renew(self, held: LeaseRecord, deadline: float) -> LeaseRecord:
        await self._call("renew", deadline)
        rec = self.session.renew(held, trio.current_time())
        if self.store.ttl is None:
            self.net.notify()
        return rec

    async def release(self, held: LeaseRecord, deadline: float) -> None:
        await self._call("release", deadline)
        self.session.release(held, trio.current_time())
        self.net.notify()

    async def wait_change(self, seen: LeaseRecord | None, until: float) -> None:
        if not self.net.watch:
            await trio.sleep_until(until)
            return
        with trio.move_on_at(until):
            await self.net.changed.wait()

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeNetwork:
    """Fault switches shared by FakeBackends: ``mode[node or "*"]`` in
    up | down | forbidden | hang | garbage; ``watch`` makes wait_change wake on writes."""

    def __init__(self, watch: bool = False) -> None:
        self.mode: dict[str, str] = {}
        self.watch = watch
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Board:
    """Wakes whoever waits on a condition over electors each time one of them records an event
    (electors that share a board can be waited on together: ``await board.until(pred)``)."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, pred: Any) -> None:
        while not pred():
            await self._changed.wait()


class ElectorHarness:
    """One node's election task with its state, its Leadership events (with trio times), a
    cancel scope that stops it gracefully, and its release gate. Every event it records wakes
    its ``board`` (pass one board to electors that are waited on together)."""

    def __init__(self, node: str, cfg: Config, backend: Any, *, vip_gone: bool = False,
                 board: Board | None = None) -> None:
        self.node, self.cfg, self.backend = node, cfg, backend
        self.board = board or Board()
        self.state = RuntimeState(node=node)
        self.fanout = Fanout()
        self.events: list[tuple[float, Leadership]] = []
        self.gate = trio.Event()
        if vip_gone:
            self.gate.set()
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        recv = self.fanout.subscribe(200)

        async def collect() -> None:
            async for ev in recv:
                self.events.append((trio.current_time(), ev))
                self.board.changed()

        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(collect)
                with self.scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(run_election, self.cfg, self.backend, self.fanout, self.state,
                                          self.gate)
                        task_status.started()
                await self.fanout.aclose()  # the election's cleanup is done: let the collector finish
        finally:
            self.done.set()

    @property
    def leader(self) -> bool:
        return self.state.election.role == "leader"


async def wait_for(electors: list[ElectorHarness], pred: Any) -> None:
    """Until ``pred()`` holds, re-checked on each event the electors record (they must share a
    board; cap the caller with fail_after)."""
    board = electors[0].board
    assert all(e.board is board for e in electors), "electors waited on together share a board"
    await board.until(pred)


async def start_all(nursery: trio.Nursery, electors: list[ElectorHarness], *, wait_leader: bool = True) -> None:
    for e in electors:
        await nursery.start(e.run)
    if wait_leader:
        await wait_for(electors, lambda: any(e.leader for e in electors))


def leader_spans(electors: list[ElectorHarness], end: float | None = None) -> list[tuple[float, float, str]]:
    """(start, end, node) of every leadership span in the electors' events, sorted by start;
    a span still open ends at ``end`` (default: now)."""
    end = trio.current_time() if end is None else end
    spans = []
    for e in electors:
        start = None
        for t, ev in e.events:
            if ev.leader and start is None:
                start = t
            elif not ev.leader and start is not None:
                spans.append((start, t, e.node))
                start = None
        if start is not None:
            spans.append((start, end, e.node))
    return sorted(spans)


def assert_spans_disjoint(spans: list[tuple[float, float, str]]) -> None:
    """No two nodes' leadership spans overlap (touching is fine)."""
    for i, (s1, e1, n1) in enumerate(spans):
        for s2, e2, n2 in spans[i + 1:]:
            assert n1 == n2 or min(e1, e2) <= max(s1, s2), \
                f"{n1} led {s1:.3f}-{e1:.3f} and {n2} led {s2:.3f}-{e2:.3f}"


async def sample_leaders(electors: list[ElectorHarness], duration: float, step: float = 0.01) -> list[list[str]]:
    """Who claims leadership, sampled every ``step`` for ``duration`` (trio clock)."""
    seen = []
    end = trio.current_time() + duration
    while trio.current_time() < end:
        seen.append([e.node for e in electors if e.leader])
        await trio.sleep(step)
    return seen
