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
    """One lease record, written optimistically (compare-and-swap on ``version``).

    ``term`` grows when the holder changes to another node (like ``leaseTransitions``).
    With ``ttl`` set the store expires the record itself (like an etcd key on a lease):
    ``renew`` then only extends the expiry and leaves ``version`` unchanged.
    """

    record: LeaseRecord | None = None
    ttl: float | None = None
    expires_at: float = math.inf
    _counter: int = 0
    writes: int = 0

    def _tick(self, now: float) -> None:
        if self.record is not None and self.record.holder is not None and now >= self.expires_at:
            self._write(LeaseRecord(None, "", self.record.term, None))
            self.record = None

    def _write(self, rec: LeaseRecord) -> LeaseRecord:
        self._counter += 1
        self.writes += 1
        self.record = LeaseRecord(rec.holder, str(self._counter), rec.term, rec.lease_duration)
        return self.record

    def read(self, now: float) -> LeaseRecord | None:
        self._tick(now)
        return self.record

    def acquire(self, node: str, seen: LeaseRecord | None, now: float, lease_duration: float) -> LeaseRecord:
        self._tick(now)
        cur = self.record
        if self.ttl is not None:  # etcd style: only an absent key (or our own) can be taken
            if cur is not None and not (seen is not None and cur.version == seen.version and cur.holder == node):
                raise LeaseConflict("key exists")
        elif (cur is None) != (seen is None) or (cur is not None and seen is not None and cur.version != seen.version):
            raise LeaseConflict("version changed")
        term = (cur.term if cur else 0) + (0 if cur is not None and cur.holder == node else 1)
        if self.ttl is not None:
            self.expires_at = now + self.ttl
        return self._write(LeaseRecord(node, "", term, lease_duration))

    def renew(self, node: str, held: LeaseRecord, now: float) -> LeaseRecord:
        self._tick(now)
        cur = self.record
        if cur is None or cur.holder != node or (self.ttl is None and cur.version != held.version):
            raise LeaseConflict("not ours any more")
        if self.ttl is not None:
            self.expires_at = now + self.ttl
            return cur
        return self._write(LeaseRecord(node, "", cur.term, cur.lease_duration))

    def release(self, node: str, held: LeaseRecord, now: float) -> None:
        self._tick(now)
        cur = self.record
        if cur is None or cur.holder != node or cur.version != held.version:
            raise LeaseConflict("not ours any more")
        if self.ttl is not None:
            self.record = None
            self._counter += 1
        else:
            self._write(LeaseRecord(None, "", cur.term, None))


class FakeBackend:
    """A LeaseBackend over a shared FakeLeaseStore, with faults switchable per node or store-wide
    through ``FakeNetwork``. Calls take ``latency`` seconds of trio time."""

    name = "fake"

    def __init__(self, store: FakeLeaseStore, node: str, net: FakeNetwork | None = None,
                 lease_duration: float = 2.0, latency: float = 0.001) -> None:
        self.store, self.node, self.net = store, node, net or FakeNetwork()
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
        return self.store.read(trio.current_time())

    async def acquire(self, seen: LeaseRecord | None, deadline: float) -> LeaseRecord:
        await self._call("acquire", deadline)
        rec = self.store.acquire(self.node, seen, trio.current_time(), self.lease_duration)
        self.net.notify()
        return rec

    async def renew(self, held: LeaseRecord, deadline: float) -> LeaseRecord:
        await self._call("renew", deadline)
        rec = self.store.renew(self.node, held, trio.current_time())
        if self.store.ttl is None:
            self.net.notify()
        return rec

    async def release(self, held: LeaseRecord, deadline: float) -> None:
        await self._call("release", deadline)
        self.store.release(self.node, held, trio.current_time())
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


class ElectorHarness:
    """One node's election task with its state, its Leadership events (with trio times), a
    cancel scope that stops it gracefully, and its release gate."""

    def __init__(self, node: str, cfg: Config, backend: Any, *, vip_gone: bool = False) -> None:
        self.node, self.cfg, self.backend = node, cfg, backend
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


async def until(pred: Any, step: float = 0.01) -> None:
    """Poll a condition on the trio clock (cap the caller with fail_after)."""
    while True:
        if pred():
            return
        await trio.sleep(step)


async def start_all(nursery: trio.Nursery, electors: list[ElectorHarness], *, wait_leader: bool = True) -> None:
    for e in electors:
        await nursery.start(e.run)
    if wait_leader:
        await until(lambda: any(e.leader for e in electors))


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
