"""The lease machine: sans-IO election decisions (client-go's rules, made explicit).

Owns: given the current monotonic time and the outcome of the last backend call, which
backend call to make next (observe / acquire / renew / release), the deadline of that call,
when to act next, and the leadership changes to publish. Reason enums say why, so tests can
assert on them.

Must never: import trio or sockets, read a clock, or compare timestamps written by other
machines. Time comes in as ``now`` (the trio clock); records come in as ``LeaseRecord``.

Theory of operation
-------------------
Timing: ``lease_duration`` (LD) > ``renew_deadline`` (RD) > ``retry_period`` (RP).

Follower (``candidate`` until it has seen a holder):
  * takes the lease at once when the record is empty (no record, no holder) or holds this
    node's own name;
  * otherwise remembers the local time at which it last saw the record's ``version`` change
    (the time the answer *arrived*, so the write happened before it) and takes the lease when
    the version has stayed unchanged for ``max(LD, the holder's declared LD)``. The take-over
    is an optimistic write of the version it saw: if the holder renewed in between, the
    server refuses (``LeaseConflict``) and the follower re-reads at once;
  * polls every RP (and earlier when the backend reports a change: etcd's watch); after
    errors it backs off exponentially from RP, capped, with jitter.
  Backends whose server expires the record itself (etcd: the key lives on a TTL lease ≥ LD)
  set ``server_expires``: followers then take the lease only when the record is empty.

Leader:
  * renews every RP; every renew request must finish before ``renewed_at + RD`` where
    ``renewed_at`` is the START of the last successful acquire/renew request;
  * steps down (leader=False, reason ``renew_deadline``) as soon as ``now >= renewed_at + RD``.
    No other node can take the lease before ``renewed_at + LD`` (its write reached the server
    after the request started, and others count LD from when they saw that write), so the
    step-down happens at least LD - RD before any take-over;
  * every successful renew publishes ``safe_until = start + RD`` and
    ``fence_until = start + LD``;
  * a renew the server refuses (``LeaseConflict``) may only mean that ``held`` is stale: an
    earlier renew was applied but answered after its deadline, so its new version never
    reached us. The leader re-reads at once (still leading: ``renewed_at`` is unchanged, so the
    renew deadline still bounds it). If the record still names this node — only this node
    writes its own name — it renews with the fresh version; if that renew is refused too, or
    the record names another node or none, it steps down at once (reason ``conflict``).

Bootstrap (``start_as_leader``): leader at once, without a lease, while the backend is
unreachable or forbids access. The first definitive answer ends it: a record held by another
node → step down (that node's lease wins); an empty record or this node's own → take the
lease (from then on normal leader rules). Errors keep the bootstrap leadership.

Shutdown: ``stop(now)`` stops renewing, publishes leader=False and asks to release the lease
if this node holds one (the runner releases only after the VIP is gone).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from dataclasses import dataclass

from vipd.election.backend import LeaseRecord

# A holder's declared lease duration above this is treated as malformed.
MAX_DECLARED_LEASE = 86400.0


class Role(enum.Enum):
    CANDIDATE = "candidate"  # no holder known (start, empty record, after stepping down)
    FOLLOWER = "follower"  # another node holds the lease
    LEADER = "leader"  # this node holds the lease
    BOOTSTRAP = "bootstrap"  # leads without a lease (start_as_leader, backend not answering)
    STOPPED = "stopped"


class Action(enum.Enum):
    OBSERVE = "observe"
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"
    WAIT = "wait"  # no call: decide() again at ``at`` (or on a backend change, if allowed)


class Why(enum.Enum):
    """Why the machine chose this action."""

    START = "start"  # first look at the record
    POLL = "poll"  # periodic re-read (follower)
    CHANGED = "changed"  # the backend reported a change (watch)
    CONFLICT = "conflict"  # a write lost the race: re-read at once
    RETRY = "retry"  # after a backend error, backoff elapsed
    EMPTY = "empty"  # record absent or without holder
    OWN_RECORD = "own_record"  # the record names this node
    EXPIRED = "expired"  # version unchanged for the lease duration
    RENEW_DUE = "renew_due"  # leader: retry period elapsed
    BOOTSTRAP_PROBE = "bootstrap_probe"  # bootstrap leader: is the backend answering yet?
    VERIFY = "verify"  # leader: a renew was refused; is the record still ours?
    SHUTDOWN = "shutdown"  # release on graceful stop
    WAITING = "waiting"  # nothing to do until ``at``
    DEADLINE = "deadline"  # leader: too little time left for a request; wait to step down
    STOPPED = "stopped"


class Reason(enum.Enum):
    """``Leadership.reason`` values."""

    ACQUIRED = "acquired"
    RENEWED = "renewed"
    BOOTSTRAP = "bootstrap"  # leading without a lease (start_as_leader)
    BOOTSTRAP_YIELD = "bootstrap_yield"  # bootstrap ended: another node holds the lease
    RENEW_DEADLINE = "renew_deadline"  # no successful renew within renew_deadline
    CONFLICT = "conflict"  # the server says the lease is no longer ours
    RELEASED = "released"  # graceful stop
    OBSERVED = "observed"  # follower: holder or term changed


class Result(enum.Enum):
    """Outcome of the last backend call."""

    OK = "ok"  # call succeeded; ``record`` is what it returned (observe may give None)
    CONFLICT = "conflict"  # LeaseConflict
    ERROR = "error"  # BackendUnavailable or any other failure
    TIMEOUT = "timeout"  # no answer by the deadline
    FORBIDDEN = "forbidden"  # BackendUnavailable(forbidden=True): 401/403
    CHANGED = "changed"  # a WAIT ended early because the backend saw a change


@dataclass(frozen=True)
class Outcome:
    result: Result
    started: float  # trio time the call (or wait) started
    record: LeaseRecord | None = None

    @classmethod
    def ok(cls, started: float, record: LeaseRecord | None = None) -> Outcome:
        return cls(Result.OK, started, record)


@dataclass(frozen=True)
class Change:
    """A leadership change to publish (the runner turns it into ``events.Leadership``)."""

    leader: bool
    holder: str | None
    term: int
    reason: Reason
    safe_until: float | None = None
    fence_until: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    why: Why
    at: float  # I/O actions: now. WAIT: call decide() again at this time.
    deadline: float | None = None  # I/O actions: the call must return or fail by then
    record: LeaseRecord | None = None  # argument of acquire (seen) / renew / release (held)
    wake_on_change: bool = False  # WAIT may end early via backend.wait_change
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True)
class Timing:
    lease_duration: float
    renew_deadline: float
    retry_period: float
    request_timeout: float | None = None  # default max(RP, RD / 2)
    backoff_cap: float | None = None  # default max(RP, min(LD, 4 * RP))

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("expected lease_duration > renew_deadline > retry_period > 0")

    @property
    def request(self) -> float:
        return self.request_timeout or max(self.retry_period, self.renew_deadline / 2)

    @property
    def cap(self) -> float:
        return self.backoff_cap or max(self.retry_period, min(self.lease_duration, 4 * self.retry_period))

    @property
    def margin(self) -> float:
        """A renew must end this long before the renew deadline (and needs this much time)."""
        return min(0.05, self.renew_deadline / 20)

    @property
    def min_observe_gap(self) -> float:
        """Change-triggered re-reads are at least this far apart (a flapping watch can't spin)."""
        return min(0.05, self.retry_period / 10)


def sanitize(record: LeaseRecord | None) -> LeaseRecord | None:
    """The record with malformed fields neutralised (never raises).

    Blank or non-string holder → None; non-string version → str; negative/odd term → 0;
    lease duration that is not a positive finite number up to a day → None.
    The original object is kept when nothing needed fixing (backends may subclass it).
    """
    if record is None:
        return None
    holder = getattr(record, "holder", None)
    version = getattr(record, "version", "")
    term = getattr(record, "term", 0)
    ld = getattr(record, "lease_duration", None)
    fixed = {
        "holder": holder if isinstance(holder, str) and holder.strip() else None,
        "version": version if isinstance(version, str) else str(version),
        "term": term if isinstance(term, int) and not isinstance(term, bool) and term >= 0 else 0,
        "lease_duration": (
            float(ld)
            if isinstance(ld, int | float) and not isinstance(ld, bool)
            and math.isfinite(ld) and 0 < ld <= MAX_DECLARED_LEASE
            else None
        ),
    }
    if isinstance(record, LeaseRecord):
        same = all(getattr(record, k) == v and type(getattr(record, k)) is type(v) for k, v in fixed.items())
        return record if same else dataclasses.replace(record, **fixed)
    return LeaseRecord(**fixed)


class LeaseMachine:
    """One node's view of one lease. Call ``decide(now, outcome)`` after every call or wait."""

    def __init__(
        self,
        node: str,
        timing: Timing,
        *,
        start_as_leader: bool = False,
        server_expires: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.timing = timing
        self.server_expires = server_expires
        self._rng = rng or random.Random()
        self.role = Role.BOOTSTRAP if start_as_leader else Role.CANDIDATE
        self._bootstrap_announced = False
        self.backend_up = True
        self.failures = 0  # consecutive failed calls
        self.renew_failures = 0  # failed renew calls, ever
        self.seen: LeaseRecord | None = None
        self.observed = False  # has any observe/acquire answered yet?
        self.seen_changed_at: float | None = None
        self.held: LeaseRecord | None = None  # last record this node wrote (may outlive leading)
        self.renewed_at = -math.inf  # start of the last successful acquire/renew
        self._next_renew = -math.inf
        self._next_attempt = -math.inf  # follower/bootstrap: earliest next call after an error
        self._last_observe = -math.inf  # start of the last observe
        self._reread = False  # conflict or change: observe soon
        self._verify = False  # leader: a renew was refused, re-read before renewing again
        self._verified = False  # leader: the next renew uses a version read after a refusal
        self._why_reread = Why.CONFLICT
        self._pending: Action | None = None
        self._published: tuple[bool, str | None, int] | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        return self.role in (Role.LEADER, Role.BOOTSTRAP)

    @property
    def holder(self) -> str | None:
        if self.leader:
            return self.node
        return self.seen.holder if self.seen else None

    @property
    def term(self) -> int:
        rec = self.held if self.role is Role.LEADER else self.seen
        return rec.term if rec else 0

    @property
    def renew_by(self) -> float:
        """Leader: the step-down time (start of the last successful renew + RD)."""
        return self.renewed_at + self.timing.renew_deadline

    def decide(self, now: float, outcome: Outcome | None = None) -> Decision:
        changes: list[Change] = []
        pending, self._pending = self._pending, None
        if self.role is Role.BOOTSTRAP and not self._bootstrap_announced:
            self._bootstrap_announced = True
            self._publish(self._bootstrap_change(now), changes)
        if outcome is not None:
            self._absorb(now, pending, outcome, changes)
        if self.role is Role.LEADER and now >= self.renew_by:
            self._step_down(Reason.RENEW_DEADLINE, changes)
        decision = self._plan(now)
        if decision.action is not Action.WAIT:
            self._pending = decision.action
            if decision.action is Action.OBSERVE:
                self._last_observe = now
                self._reread = False
            if decision.action is Action.RENEW or decision.why is Why.VERIFY:
                self._next_renew = now + self.timing.retry_period  # a failed call retries after RP
        return dataclasses.replace(decision, changes=tuple(changes))

    def stop(self, now: float) -> Decision:
        """Graceful stop: no more renewals; release the lease if this node holds one."""
        changes: list[Change] = []
        if self.leader:
            changes.append(Change(False, None, self.term, Reason.RELEASED))
        held = self.held
        self.role = Role.STOPPED
        self._pending = None
        if held is not None:
            self._pending = Action.RELEASE
            return Decision(Action.RELEASE, Why.SHUTDOWN, now, now + self.timing.request, held,
                            changes=tuple(changes))
        return Decision(Action.WAIT, Why.STOPPED, math.inf, changes=tuple(changes))

    # -- outcomes -------------------------------------------------------------------------

    def _absorb(self, now: float, pending: Action | None, out: Outcome, changes: list[Change]) -> None:
        if out.result is Result.CHANGED:
            self._reread, self._why_reread = True, Why.CHANGED
            return
        if pending is None:
            return
        if out.result in (Result.ERROR, Result.TIMEOUT, Result.FORBIDDEN):
            self.failures += 1
            self.backend_up = False
            if pending is Action.RENEW:
                self.renew_failures += 1
                self._verified = False  # no answer is no refusal: a later one may verify again
            if pending is Action.RELEASE:
                self.held = None
                return
            if self.role is not Role.LEADER:
                delay = min(self.timing.cap, self.timing.retry_period * 2 ** (self.failures - 1))
                self._next_attempt = now + delay * (0.5 + 0.5 * self._rng.random())
            if self.role is Role.BOOTSTRAP:  # extend the lease-less leadership's horizon
                self._publish(self._bootstrap_change(now), changes, always=True)
            return
        # The backend answered.
        self.backend_up = True
        self.failures = 0
        self._next_attempt = -math.inf
        if pending is Action.RELEASE:
            self.held = None
            return
        if out.result is Result.CONFLICT:
            if pending is Action.RENEW:
                self.renew_failures += 1  # refused: as failed as a timeout, for the operator
            if pending is Action.RENEW and self.role is Role.LEADER:
                if self._verified:  # refused even with a version read just now: not ours
                    self._lose_lease(changes)
                else:  # maybe only our copy is stale: re-read at once, still leading
                    self._verify, self._next_renew = True, now
                return
            self._reread, self._why_reread = True, Why.CONFLICT
            return
        record = sanitize(out.record)
        if pending in (Action.ACQUIRE, Action.RENEW) and record is None:  # backend bug: no record
            self._absorb(now, pending, Outcome(Result.ERROR, out.started), changes)
            return
        if pending is Action.OBSERVE:
            self._see(now, record)
            if self.role is Role.LEADER:  # the re-read after a refused renew
                self._verify = False
                if record is not None and record.holder == self.node:
                    self.held, self._verified, self._next_renew = record, True, now
                else:
                    self._lose_lease(changes, reread=False)
                    self._follow(changes)
                return
            if self.role is Role.BOOTSTRAP:
                if record is not None and record.holder not in (None, self.node):
                    self.role = Role.FOLLOWER
                    self._publish(Change(False, record.holder, record.term, Reason.BOOTSTRAP_YIELD), changes)
                return
            if self.role in (Role.CANDIDATE, Role.FOLLOWER):
                self._follow(changes)
            return
        if pending in (Action.ACQUIRE, Action.RENEW) and record is not None:
            self._see(now, record)
            was_leader = self.role is Role.LEADER
            self.role = Role.LEADER
            self._verify = self._verified = False
            self.held = record
            self.renewed_at = out.started
            self._next_renew = out.started + self.timing.retry_period
            reason = Reason.RENEWED if was_leader else Reason.ACQUIRED
            self._publish(Change(True, self.node, record.term, reason,
                                 safe_until=out.started + self.timing.renew_deadline,
                                 fence_until=out.started + self.timing.lease_duration),
                          changes, always=True)

    def _see(self, now: float, record: LeaseRecord | None) -> None:
        before = self.seen
        if not self.observed or (before is None) != (record is None) or (
            before is not None and record is not None and before.version != record.version
        ):
            self.seen_changed_at = now
        self.seen = record
        self.observed = True

    def _follow(self, changes: list[Change]) -> None:
        rec = self.seen
        holder = rec.holder if rec else None
        self.role = Role.FOLLOWER if holder not in (None, self.node) else Role.CANDIDATE
        self._publish(Change(False, holder, rec.term if rec else 0, Reason.OBSERVED), changes)

    def _step_down(self, reason: Reason, changes: list[Change]) -> None:
        self.role = Role.CANDIDATE
        self._verify = self._verified = False
        self._publish(Change(False, None, self.held.term if self.held else 0, reason), changes)

    def _lose_lease(self, changes: list[Change], *, reread: bool = True) -> None:
        """The server says the lease is not ours: step down at once (and read again)."""
        self._step_down(Reason.CONFLICT, changes)
        self.held = None
        if reread:
            self._reread, self._why_reread = True, Why.CONFLICT

    def _bootstrap_change(self, now: float) -> Change:
        horizon = max(now, self._next_attempt) + self.timing.lease_duration
        return Change(True, self.node, self.seen.term if self.seen else 0, Reason.BOOTSTRAP,
                      safe_until=horizon, fence_until=horizon)

    def _publish(self, change: Change, changes: list[Change], *, always: bool = False) -> None:
        key = (change.leader, change.holder, change.term)
        if always or key != self._published or change.reason in (
            Reason.RENEW_DEADLINE, Reason.CONFLICT, Reason.BOOTSTRAP_YIELD
        ):
            changes.append(change)
        self._published = key

    # -- planning -------------------------------------------------------------------------

    def _io(self, action: Action, why: Why, now: float, record: LeaseRecord | None,
            deadline: float | None = None) -> Decision:
        return Decision(action, why, now, deadline if deadline is not None else now + self.timing.request, record)

    def _plan(self, now: float) -> Decision:
        t = self.timing
        if self.role is Role.STOPPED:
            return Decision(Action.WAIT, Why.STOPPED, math.inf)
        if self.role is Role.LEADER:
            if now >= self._next_renew:
                deadline = min(now + t.request, self.renew_by - t.margin)
                if deadline - now >= t.margin:
                    if self._verify:
                        return self._io(Action.OBSERVE, Why.VERIFY, now, None, deadline)
                    return self._io(Action.RENEW, Why.RENEW_DUE, now, self.held, deadline)
                return Decision(Action.WAIT, Why.DEADLINE, self.renew_by)
            return Decision(Action.WAIT, Why.WAITING, min(self._next_renew, self.renew_by))
        if now < self._next_attempt:  # backing off after an error
            return Decision(Action.WAIT, Why.WAITING, self._next_attempt)
        if self.failures:
            return self._io(Action.OBSERVE, Why.BOOTSTRAP_PROBE if self.role is Role.BOOTSTRAP else Why.RETRY,
                            now, None)
        if self._reread:
            gap_end = self._last_observe + t.min_observe_gap
            if now < gap_end:
                return Decision(Action.WAIT, Why.WAITING, gap_end)
            return self._io(Action.OBSERVE, self._why_reread, now, None)
        if not self.observed:
            why = Why.BOOTSTRAP_PROBE if self.role is Role.BOOTSTRAP else Why.START
            return self._io(Action.OBSERVE, why, now, None)
        rec = self.seen
        if rec is None or rec.holder is None:
            return self._io(Action.ACQUIRE, Why.EMPTY, now, rec)
        if rec.holder == self.node:
            return self._io(Action.ACQUIRE, Why.OWN_RECORD, now, rec)
        # Another node holds it (a bootstrap leader has yielded by now).
        wake = self._last_observe + t.retry_period
        if not self.server_expires:
            assert self.seen_changed_at is not None
            expires = self.seen_changed_at + max(t.lease_duration, rec.lease_duration or 0.0)
            if now >= expires:
                return self._io(Action.ACQUIRE, Why.EXPIRED, now, rec)
            wake = min(wake, expires)
        if now >= self._last_observe + t.retry_period:
            return self._io(Action.OBSERVE, Why.POLL, now, None)
        return Decision(Action.WAIT, Why.WAITING, wake, wake_on_change=True)
