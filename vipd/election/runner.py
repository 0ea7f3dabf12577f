"""The election task: drives the sans-IO lease machine with a lease backend under trio.

Owns: ``build_backend(cfg)`` (kubernetes | etcd | none), the loop that performs the machine's
chosen backend call within its deadline and feeds the outcome back, publishing ``Leadership``
on the fan-out, keeping ``state.election`` current, logging each state change once, and the
shutdown sequence: wait for the VIP to be gone (``release_gate``), release the lease, close.

Publishing never blocks the election: events go to a ``_Publisher`` task that delivers them in
order; while a subscriber does not read, at most ``_Publisher.BACKLOG`` events wait and older
ones are dropped, the latest always kept (consumers act on the newest state and ignore stale
terms). The address task needs no event to be safe: it drops the VIP itself at safe_until.

Must never: decide anything about timing itself (machine.py does), swallow ``trio.Cancelled``,
release the lease while the VIP may still be on this node, wait on a subscriber, or log a
retry at info.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.election.backend import BackendUnavailable, LeaseBackend, LeaseConflict
from vipd.election.machine import (
    Action,
    Change,
    LeaseMachine,
    Outcome,
    Reason,
    Result,
    Role,
    Timing,
)
from vipd.election.static import StaticBackend
from vipd.events import Fanout, Leadership
from vipd.state import RuntimeState


def build_backend(cfg: Config) -> Any:
    """The configured backend; adapters are imported only when chosen."""
    if cfg.election.backend == "none":
        return StaticBackend(cfg.node, leader=True)
    if cfg.election.backend == "etcd":
        from vipd.election.etcd import EtcdLeaseBackend

        return EtcdLeaseBackend(cfg)
    from vipd.election.kube import KubeLeaseBackend

    return KubeLeaseBackend(cfg)


def timing_of(cfg: Config) -> Timing:
    e = cfg.election
    return Timing(lease_duration=e.lease_duration, renew_deadline=e.renew_deadline, retry_period=e.retry_period)


async def run_election(
    cfg: Config,
    backend: Any,
    fanout: Fanout,
    state: RuntimeState,
    release_gate: trio.Event,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    if isinstance(backend, StaticBackend):
        await _run_static(cfg, backend, fanout, state, release_gate, task_status=task_status)
        return
    machine = LeaseMachine(cfg.node, timing_of(cfg), start_as_leader=cfg.election.start_as_leader,
                           server_expires=bool(getattr(backend, "server_expires", False)))
    publisher = _Publisher(fanout)
    election = _Election(cfg, backend, publisher, state, machine)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        task_status.started()
        try:
            await election.loop()
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + cfg.shutdown_timeout):
                await election.shutdown(release_gate)


class _Publisher:
    """Delivers Leadership events to the fan-out from its own task (see the module docstring)."""

    BACKLOG = 8

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self._queue: deque[Leadership] = deque()
        self._wake = trio.Event()
        self._scope = trio.CancelScope()

    def put(self, event: Leadership) -> None:
        """Never blocks."""
        self._queue.append(event)
        while len(self._queue) > self.BACKLOG:
            self._queue.popleft()
        self._wake.set()

    async def run(self) -> None:
        with self._scope:
            while True:
                while self._queue:
                    await self.fanout.send(self._queue.popleft())
                self._wake = trio.Event()
                await self._wake.wait()

    def close(self, final: list[Leadership]) -> None:
        """Shutdown: stop delivering (a blocked send is abandoned, so nothing older can arrive
        after ``final``), drop what still waits, and hand ``final`` over without blocking."""
        self._scope.cancel()
        self._queue.clear()
        for event in final:
            self.fanout.send_nowait(event)


class _Election:
    def __init__(self, cfg: Config, backend: LeaseBackend, publisher: _Publisher, state: RuntimeState,
                 machine: LeaseMachine) -> None:
        self.cfg, self.backend, self.publisher, self.state, self.m = cfg, backend, publisher, state, machine
        self.log = log.get("election")
        self.name = getattr(backend, "name", type(backend).__name__)
        self.was_leader = False
        self.was_up = True
        self.down_since: float | None = None
        self.last_error = ""
        self.renew_failures_logged = 0
        self.detour = False  # the backend's renews take a detour (see LeaseBackend renew_note)

    async def loop(self) -> None:
        outcome: Outcome | None = None
        while True:
            now = trio.current_time()
            d = self.m.decide(now, outcome)
            self._note_backend(now)
            for change in d.changes:
                self._log_change(change)
                self.publisher.put(_leadership(change))
            self._sync_state()
            if d.action is Action.WAIT:
                outcome = await self._wait(d.at, d.wake_on_change)
            else:
                outcome = await self._call(d.action, d.record, d.deadline)

    async def _wait(self, until: float, wake_on_change: bool) -> Outcome | None:
        started = trio.current_time()
        if not wake_on_change:
            await trio.sleep_until(until)
            return None
        try:
            await self.backend.wait_change(self.m.seen, until)
        except Exception as exc:  # a broken watch only loses the early wake-up
            self.log.debug("election.watch_failed", error=f"{type(exc).__name__}: {exc}")
            await trio.sleep_until(until)
        return Outcome(Result.CHANGED, started) if trio.current_time() < until else None

    async def _call(self, action: Action, record: Any, deadline: float | None) -> Outcome:
        assert deadline is not None
        started = trio.current_time()
        try:
            # The backend bounds itself; this is the net that keeps the machine's promise.
            with trio.fail_at(deadline):
                if action is Action.OBSERVE:
                    return Outcome.ok(started, await self.backend.observe(deadline))
                if action is Action.ACQUIRE:
                    return Outcome.ok(started, await self.backend.acquire(record, deadline))
                renewed = await self.backend.renew(record, deadline)
                self._note_detour()
                return Outcome.ok(started, renewed)
        except trio.TooSlowError:
            self.last_error = f"{action.value}: no answer within {deadline - started:.3g}s"
            return Outcome(Result.TIMEOUT, started)
        except LeaseConflict:
            return Outcome(Result.CONFLICT, started)
        except BackendUnavailable as exc:
            self.last_error = f"{action.value}: {exc}"
            return Outcome(Result.FORBIDDEN if exc.forbidden else Result.ERROR, started)
        except Exception as exc:  # malformed answers and adapter bugs must not end the election
            self.last_error = f"{action.value}: {type(exc).__name__}: {exc}"
            self.log.debug("election.backend_error", error=self.last_error, exc_info=exc)
            return Outcome(Result.ERROR, started)

    # -- bookkeeping ----------------------------------------------------------------------

    def _note_detour(self) -> None:
        """Log when the backend's renews start and stop taking a detour (once each)."""
        note = getattr(self.backend, "renew_note", None)
        if bool(note) == self.detour:
            return
        self.detour = bool(note)
        if note:
            self.log.warning("election.renew_degraded", backend=self.name, detail=note)
        else:
            self.log.info("election.renew_recovered", backend=self.name)

    def _note_backend(self, now: float) -> None:
        up = self.m.backend_up
        if up == self.was_up:
            if not up:
                self.log.debug("election.backend_retry", error=self.last_error, failures=self.m.failures)
            return
        self.was_up = up
        if not up:
            self.down_since = now
            self.log.warning("election.backend_unreachable", backend=self.name, error=self.last_error,
                             leader=self.m.leader)
        else:
            down_for = now - self.down_since if self.down_since is not None else 0.0
            self.log.info("election.backend_recovered", backend=self.name, down_for=round(down_for, 3))

    def _log_change(self, c: Change) -> None:
        if c.leader and not self.was_leader:
            self.log.info("leadership.acquired", holder=c.holder, term=c.term, reason=c.reason.value,
                          backend=self.name)
        elif c.leader and c.reason is Reason.ACQUIRED:  # bootstrap leader took the real lease
            self.log.info("leadership.lease_taken", holder=c.holder, term=c.term, backend=self.name)
        elif c.leader and c.reason is Reason.RENEWED:
            failed = self.m.renew_failures - self.renew_failures_logged
            if failed:
                self.log.info("leadership.renewed", term=c.term, after_failures=failed)
            else:
                self.log.debug("leadership.renewed", term=c.term)
        elif not c.leader and self.was_leader:
            self.log.warning("leadership.lost", reason=c.reason.value, term=c.term, error=self.last_error or None)
        elif not c.leader:
            self.log.info("leadership.observed", holder=c.holder, term=c.term)
        self.renew_failures_logged = self.m.renew_failures
        self.was_leader = c.leader

    def _sync_state(self) -> None:
        e = self.state.election
        role = "leader" if self.m.leader else ("follower" if self.m.role is Role.FOLLOWER else "candidate")
        if (role == "leader") != (e.role == "leader"):
            e.transitions += 1
        e.role, e.holder, e.term = role, self.m.holder, self.m.term
        e.renew_failures, e.backend_up = self.m.renew_failures, self.m.backend_up

    # -- shutdown -------------------------------------------------------------------------

    async def shutdown(self, release_gate: trio.Event) -> None:
        """Shielded, bounded by the caller's deadline: VIP gone → release → close."""
        m = self.m
        leading, held = m.leader, m.held
        gate_ok = True
        if leading or held is not None:  # keep time for the release itself
            with trio.move_on_at(trio.current_effective_deadline() - m.timing.request):
                await release_gate.wait()
            gate_ok = release_gate.is_set()
        d = m.stop(trio.current_time())
        self.publisher.close([_leadership(change) for change in d.changes])
        if d.action is Action.RELEASE and not gate_ok:
            # The VIP may still be up here: let the lease run out instead of handing it over.
            # (a ReleaseGate says why; a plain trio.Event cannot be withheld)
            why = getattr(release_gate, "withheld", None) or "vip not confirmed removed"
            self.log.warning("election.release_skipped", reason=why)
        elif d.action is Action.RELEASE:
            assert d.deadline is not None
            try:
                with trio.fail_at(d.deadline):
                    await self.backend.release(d.record, d.deadline)
            except LeaseConflict:
                self.log.info("leadership.released", holder=self.cfg.node, term=m.term, note="lease no longer ours")
            except (trio.TooSlowError, BackendUnavailable) as exc:
                self.log.warning("election.release_failed", error=f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                self.log.warning("election.release_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            else:
                self.log.info("leadership.released", holder=self.cfg.node, term=held.term if held else m.term)
        elif leading:
            self.log.info("leadership.released", holder=self.cfg.node, term=m.term, note="no lease held")
        e = self.state.election
        if e.role == "leader":
            e.transitions += 1
        e.role, e.holder = "follower", None
        try:
            await self.backend.aclose()
        except Exception as exc:
            self.log.debug("election.close_failed", error=f"{type(exc).__name__}: {exc}")


def _leadership(c: Change) -> Leadership:
    return Leadership(c.leader, c.holder, c.term, safe_until=c.safe_until, fence_until=c.fence_until,
                      reason=c.reason.value)


async def _run_static(cfg: Config, backend: StaticBackend, fanout: Fanout, state: RuntimeState,
                      release_gate: trio.Event, *, task_status: Any) -> None:
    """The ``none`` backend: a single node leads for good (or, in tests, never)."""
    logger = log.get("election")
    task_status.started()
    if not backend.leader:
        state.election.role = "follower"
        await trio.sleep_forever()
    term = 1
    e = state.election
    e.role, e.holder, e.term, e.transitions = "leader", cfg.node, term, e.transitions + 1
    logger.info("leadership.acquired", holder=cfg.node, term=term, backend="none")
    try:
        while True:
            now = trio.current_time()
            # Nothing can take this lease: the safety horizon just stays far ahead.
            await fanout.send(Leadership(True, cfg.node, term, safe_until=now + 3600,
                                         fence_until=now + 3600, reason=Reason.ACQUIRED.value))
            await trio.sleep(3000)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(cfg.shutdown_timeout):
                await release_gate.wait()
            fanout.send_nowait(Leadership(False, None, term, reason=Reason.RELEASED.value))
            e.role, e.holder, e.transitions = "follower", None, e.transitions + 1
            logger.info("leadership.released", holder=cfg.node, term=term)
