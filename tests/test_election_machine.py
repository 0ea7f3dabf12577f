"""The sans-IO lease machine: table-driven decisions, take-over timing, and a discrete-event
simulation (several machines, one FakeLeaseStore with the server's rules) that no two nodes
ever lead at the same time: on hypothesis-generated schedules (a sample of random latencies,
losses and faults, not every interleaving) and on directed schedules for known hazards."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.election_fixtures import FakeLeaseStore, FakeSession
from vipd.election.backend import LeaseConflict, LeaseRecord
from vipd.election.machine import (
    Action,
    Decision,
    LeaseMachine,
    Outcome,
    Reason,
    Result,
    Role,
    Timing,
    Why,
)

T = Timing(lease_duration=2.0, renew_deadline=1.5, retry_period=0.5)
OTHER = LeaseRecord("n2", "v1", 3, 2.0)
MINE = LeaseRecord("n1", "v9", 4, 2.0)


def reasons(d: Decision) -> list[str]:
    return [c.reason.value for c in d.changes]


def leader_at(t0: float = 0.0, **kw) -> LeaseMachine:
    """A machine that acquired at ``t0`` (acquire request started at t0)."""
    m = LeaseMachine("n1", T, rng=random.Random(1), **kw)
    m.decide(t0)  # observe
    m.decide(t0, Outcome.ok(t0, None))  # → acquire
    d = m.decide(t0, Outcome.ok(t0, MINE))
    assert m.role is Role.LEADER, d
    return m


# (name, machine kwargs, [(now, outcome)], expected action, why, change reasons)
ERR = Result.ERROR
CASES = [
    ("start observes", {}, [(0, None)], Action.OBSERVE, Why.START, []),
    ("empty record → acquire", {}, [(0, None), (0.01, Outcome.ok(0))], Action.ACQUIRE, Why.EMPTY, ["observed"]),
    ("no holder → acquire", {}, [(0, None), (0.01, Outcome.ok(0, LeaseRecord(None, "v2", 1)))],
     Action.ACQUIRE, Why.EMPTY, ["observed"]),
    ("own record → acquire", {}, [(0, None), (0.01, Outcome.ok(0, MINE))], Action.ACQUIRE, Why.OWN_RECORD, ["observed"]),
    ("other's record → wait for poll", {}, [(0, None), (0.01, Outcome.ok(0, OTHER))],
     Action.WAIT, Why.WAITING, ["observed"]),
    ("acquire conflict → re-read", {}, [(0, None), (0, Outcome.ok(0)), (0.01, Outcome(Result.CONFLICT, 0))],
     Action.WAIT, Why.WAITING, []),  # min observe gap, then OBSERVE CONFLICT
    ("observe error → back off", {}, [(0, None), (0.01, Outcome(ERR, 0))], Action.WAIT, Why.WAITING, []),
    ("bootstrap leads at once", {"start_as_leader": True}, [(0, None)], Action.OBSERVE, Why.BOOTSTRAP_PROBE,
     ["bootstrap"]),
    ("bootstrap stays leader when forbidden", {"start_as_leader": True},
     [(0, None), (0.01, Outcome(Result.FORBIDDEN, 0))], Action.WAIT, Why.WAITING, ["bootstrap"]),
    ("bootstrap stays leader when unreachable", {"start_as_leader": True},
     [(0, None), (0.01, Outcome(Result.TIMEOUT, 0))], Action.WAIT, Why.WAITING, ["bootstrap"]),
    ("bootstrap yields to a held lease", {"start_as_leader": True},
     [(0, None), (0.01, Outcome.ok(0, OTHER))], Action.WAIT, Why.WAITING, ["bootstrap_yield"]),
    ("bootstrap takes an empty lease", {"start_as_leader": True},
     [(0, None), (0.01, Outcome.ok(0))], Action.ACQUIRE, Why.EMPTY, []),
    ("bootstrap → acquired", {"start_as_leader": True},
     [(0, None), (0.01, Outcome.ok(0)), (0.02, Outcome.ok(0.01, MINE))], Action.WAIT, Why.WAITING, ["acquired"]),
    ("etcd-style follower never takes a held key", {"server_expires": True},
     [(0, None), (0.01, Outcome.ok(0, OTHER)), (60, None)], Action.OBSERVE, Why.POLL, []),
    ("kube-style follower takes an unchanged record", {},
     [(0, None), (0.01, Outcome.ok(0, OTHER)), (2.01, None)], Action.ACQUIRE, Why.EXPIRED, []),
    ("holder's longer lease is honoured", {},
     [(0, None), (0.01, Outcome.ok(0, LeaseRecord("n2", "v1", 3, 15.0))), (2.01, None)],
     Action.OBSERVE, Why.POLL, []),
    ("watch change → observe", {},
     [(0, None), (0.01, Outcome.ok(0, OTHER)), (0.3, Outcome(Result.CHANGED, 0.02))], Action.OBSERVE, Why.CHANGED, []),
]


@pytest.mark.parametrize("name,kw,steps,action,why,changes", CASES, ids=[c[0] for c in CASES])
def test_decision_table(name, kw, steps, action, why, changes):
    m = LeaseMachine("n1", T, rng=random.Random(7), **kw)
    d = None
    for now, outcome in steps:
        d = m.decide(now, outcome)
    assert d is not None
    assert (d.action, d.why) == (action, why)
    assert reasons(d) == changes


def test_acquired_event_carries_safe_and_fence_horizons():
    m = LeaseMachine("n1", T)
    m.decide(10.0)
    m.decide(10.0, Outcome.ok(10.0))
    d = m.decide(10.2, Outcome.ok(10.05, MINE))
    (c,) = d.changes
    assert (c.leader, c.holder, c.term, c.reason) == (True, "n1", 4, Reason.ACQUIRED)
    assert c.safe_until == pytest.approx(10.05 + 1.5) and c.fence_until == pytest.approx(10.05 + 2.0)
    assert (d.action, d.at) == (Action.WAIT, pytest.approx(10.55))


def test_renew_every_retry_period_with_deadline_before_renew_deadline():
    m = leader_at(0.0)
    d = m.decide(0.5)
    assert (d.action, d.why) == (Action.RENEW, Why.RENEW_DUE)
    assert d.deadline < m.renew_by and d.deadline - 0.5 <= T.request
    d = m.decide(0.6, Outcome.ok(0.5, LeaseRecord("n1", "v10", 4, 2.0)))
    assert reasons(d) == ["renewed"] and d.changes[0].safe_until == pytest.approx(2.0)
    assert d.changes[0].fence_until == pytest.approx(2.5)
    assert d.at == pytest.approx(1.0)


def test_leader_steps_down_exactly_at_renew_deadline_when_renewals_fail():
    m = leader_at(0.0)
    now, steps = 0.5, []
    for _ in range(20):
        d = m.decide(now)
        if d.action is Action.RENEW:
            assert d.deadline < 1.5
            d = m.decide(min(d.deadline, now + 0.01), Outcome(Result.ERROR, now))
        steps.append(d)
        if any(c.reason is Reason.RENEW_DEADLINE for c in d.changes):
            break
        now = d.at
    assert now == pytest.approx(1.5)
    assert m.role is Role.CANDIDATE and not m.leader
    assert m.renew_failures >= 2


def test_renew_credit_counts_from_request_start_not_answer():
    m = leader_at(0.0)
    assert m.decide(0.5).action is Action.RENEW
    d = m.decide(1.2, Outcome.ok(0.5, LeaseRecord("n1", "v10", 4, 2.0)))  # slow answer
    assert d.changes[0].safe_until == pytest.approx(2.0)
    assert m.renew_by == pytest.approx(2.0)


def test_hung_renew_still_steps_down_by_renew_deadline():
    m = leader_at(0.0)
    d = m.decide(0.5)
    d = m.decide(d.deadline, Outcome(Result.TIMEOUT, 0.5))  # hung until its own deadline
    while not any(c.reason is Reason.RENEW_DEADLINE for c in d.changes):
        assert d.at <= 1.5
        now = d.at
        d = m.decide(now)
        if d.action is Action.RENEW:
            d = m.decide(d.deadline, Outcome(Result.TIMEOUT, now))
    assert not m.leader


def refused_renew(at: float = 0.5) -> tuple[LeaseMachine, Decision]:
    """A leader (acquired at 0) whose renew at ``at`` the server refused."""
    m = leader_at(0.0)
    assert m.decide(at).action is Action.RENEW
    return m, m.decide(at + 0.01, Outcome(Result.CONFLICT, at))


def test_refused_renew_rereads_at_once_still_leading():
    m, d = refused_renew()
    assert (d.action, d.why, reasons(d)) == (Action.OBSERVE, Why.VERIFY, [])
    assert m.renew_failures == 1  # vipd_election_renew_failures_total counts refusals too
    assert m.leader and d.deadline <= m.renew_by - T.margin


def test_refused_renew_of_a_still_own_record_renews_with_the_fresh_version():
    """A renew applied but answered late left ``held`` stale: no flap, no step-down."""
    m, d = refused_renew()
    fresh = LeaseRecord("n1", "v11", 4, 2.0)
    d = m.decide(0.53, Outcome.ok(0.51, fresh))
    assert (d.action, d.why, d.record, reasons(d)) == (Action.RENEW, Why.RENEW_DUE, fresh, [])
    d = m.decide(0.55, Outcome.ok(0.53, LeaseRecord("n1", "v12", 4, 2.0)))
    assert reasons(d) == ["renewed"] and d.changes[0].safe_until == pytest.approx(0.53 + T.renew_deadline)


@pytest.mark.parametrize("after", [OTHER, None, LeaseRecord(None, "v12", 4)], ids=["other", "gone", "released"])
def test_refused_renew_of_a_lost_record_steps_down_at_once(after):
    m, d = refused_renew()
    d = m.decide(0.53, Outcome.ok(0.51, after))
    assert reasons(d)[0] == "conflict" and not m.leader and m.held is None


def test_renew_refused_again_after_the_reread_steps_down():
    m, d = refused_renew()
    d = m.decide(0.53, Outcome.ok(0.51, LeaseRecord("n1", "v11", 4, 2.0)))
    assert d.action is Action.RENEW
    d = m.decide(0.54, Outcome(Result.CONFLICT, 0.53))
    assert reasons(d) == ["conflict"] and not m.leader


def test_refused_renew_with_backend_failing_steps_down_at_renew_deadline():
    m, d = refused_renew()
    now = d.at
    while m.leader:
        if d.action is not Action.WAIT:
            assert d.deadline <= m.renew_by - T.margin
            d = m.decide(now + 0.01, Outcome(Result.ERROR, now))
            now += 0.01
        else:
            now = d.at
            d = m.decide(now)
    assert now == pytest.approx(T.renew_deadline) and reasons(d) == ["renew_deadline"]


def test_follower_backoff_is_capped_and_jittered():
    m = LeaseMachine("n1", T, rng=random.Random(3))
    now, waits = 0.0, []
    m.decide(now)
    for _ in range(10):
        d = m.decide(now, Outcome(Result.ERROR, now))
        assert d.action is Action.WAIT
        waits.append(d.at - now)
        now = d.at
        assert m.decide(now).why is Why.RETRY
    assert all(w <= T.cap for w in waits)
    assert waits[0] <= T.retry_period and waits[-1] >= T.cap / 2
    assert len({round(w, 6) for w in waits[-4:]}) > 1  # jitter


def test_malformed_records_never_crash():
    m = LeaseMachine("n1", T)
    m.decide(0)
    for i, bad in enumerate([
        LeaseRecord("", 5, -3, float("nan")),  # type: ignore[arg-type]
        LeaseRecord(None, "v", True, -1.0),  # type: ignore[arg-type]
        LeaseRecord(42, None, "x", float("inf")),  # type: ignore[arg-type]
    ]):
        d = m.decide(i, Outcome.ok(i, bad))
        assert d.action is Action.ACQUIRE and d.why is Why.EMPTY
        d = m.decide(i + 0.5, Outcome(Result.CONFLICT, i))
        assert d.action is Action.OBSERVE and d.why is Why.CONFLICT
    d = m.decide(2.6, Outcome.ok(2.5, LeaseRecord("n2", "v", 1, 1e12)))  # absurd declared lease: ignored
    assert d.action is Action.WAIT and m.role is Role.FOLLOWER


def test_no_acquire_while_renewals_are_observed():
    m = LeaseMachine("n1", T)
    now, version = 0.0, 0
    d = m.decide(now)
    while now < 30:
        if d.action is Action.OBSERVE:
            version += 1
            d = m.decide(now + 0.01, Outcome.ok(now, LeaseRecord("n2", str(version), 1, 2.0)))
        assert d.action is not Action.ACQUIRE
        now = d.at
        d = m.decide(now)
    assert m.role is Role.FOLLOWER


def test_takeover_exactly_lease_duration_after_last_observed_change():
    """Counted from the arrival of the answer that showed the last change. The record carries
    no timestamps into the machine at all; the ±1 h skew of a Lease's renewTime is tested
    against the Kubernetes backend (test_election_kube.py)."""
    m = LeaseMachine("n1", T)
    now = 100.0
    d = m.decide(now)
    last_change = None
    for version in range(1, 6):  # the holder renews five times, then dies
        d = m.decide(now + 0.01, Outcome.ok(now, LeaseRecord("n2", str(version), 1, 2.0)))
        last_change = now + 0.01
        now += 0.5
        d = m.decide(now)
    while d.action is not Action.ACQUIRE:
        if d.action is Action.OBSERVE:
            d = m.decide(now, Outcome.ok(now, LeaseRecord("n2", "5", 1, 2.0)))
            continue
        now = d.at
        d = m.decide(now)
    assert d.why is Why.EXPIRED
    assert now == pytest.approx(last_change + T.lease_duration)


def test_start_as_leader_against_unreachable_then_answering_backend():
    m = LeaseMachine("n1", T, start_as_leader=True, rng=random.Random(2))
    d = m.decide(0.0)
    assert m.leader and reasons(d) == ["bootstrap"]
    now = 0.0
    for _ in range(5):  # refused, unreachable, forbidden: still leading, horizon extended
        d = m.decide(now + 0.01, Outcome(Result.FORBIDDEN, now))
        assert m.leader and d.changes[0].reason is Reason.BOOTSTRAP
        assert d.changes[0].fence_until >= d.at + T.lease_duration
        now = d.at
        assert m.decide(now).why is Why.BOOTSTRAP_PROBE
    d = m.decide(now + 0.01, Outcome.ok(now, OTHER))  # answers: another node holds a lease
    assert not m.leader and reasons(d) == ["bootstrap_yield"]


def test_stop_releases_held_lease():
    m = leader_at(0.0)
    d = m.stop(0.3)
    assert (d.action, d.record, reasons(d)) == (Action.RELEASE, MINE, ["released"])
    assert m.decide(0.31, Outcome.ok(0.3)).action is Action.WAIT
    f = LeaseMachine("n1", T)
    assert f.stop(0).action is Action.WAIT


# -- simulation: several machines, one store, random latencies and losses -----------------------


@dataclass
class Sim:
    rnd: random.Random
    nodes: list[str]
    timing: Timing = T
    ttl: float | None = None  # etcd-style server expiry
    max_latency: float = 0.05
    answer_delay: float | None = None  # every renew's answer takes this long after it was applied
    drop: float = 0.0
    reuse_lease: bool = False  # etcd style: the old, unsafe acquire (see FakeSession)
    now: float = 0.0
    queue: list = field(default_factory=list)
    seq: int = 0

    def __post_init__(self) -> None:
        self.store = FakeLeaseStore(ttl=self.ttl)
        self.sessions = {n: FakeSession(self.store, n, reuse_lease=self.reuse_lease) for n in self.nodes}
        self.m = {n: LeaseMachine(n, self.timing, server_expires=self.ttl is not None,
                                  rng=random.Random(self.rnd.random())) for n in self.nodes}
        self.alive = {n: True for n in self.nodes}
        self.gen = {n: 0 for n in self.nodes}  # bumps on stop: drops stale callbacks
        self.intervals: dict[str, list[list[float]]] = {n: [] for n in self.nodes}
        self.acquired: list[tuple[float, str]] = []
        self.stopped: set[str] = set()
        self.partitioned: dict[str, float] = {}  # node → until: its requests and answers are lost
        self.renews_lost: dict[str, float] = {}  # node → until: only its renew requests are lost
        for n in self.nodes:
            self.at(self.rnd.uniform(0, 0.3), self._step, n, None)

    def at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, fn, args))

    def run(self, until: float) -> None:
        while self.queue and self.queue[0][0] <= until:
            t, _, fn, args = heapq.heappop(self.queue)
            self.now = max(self.now, t)
            fn(*args)
        self.now = until

    def _record(self, node: str, d: Decision) -> None:
        for c in d.changes:
            iv = self.intervals[node]  # [start, end, fence at end, released]
            if c.leader and (not iv or iv[-1][1] != math.inf):
                iv.append([self.now, math.inf, -math.inf, False])
                self.acquired.append((self.now, node))
            elif not c.leader and iv and iv[-1][1] == math.inf:
                iv[-1][1] = self.now
                iv[-1][3] = c.reason is Reason.RELEASED
            if c.fence_until is not None and iv:
                iv[-1][2] = c.fence_until

    def _step(self, node: str, outcome: Outcome | None, gen: int = 0) -> None:
        if not self.alive[node] or gen != self.gen[node]:
            return
        self._handle(node, self.m[node].decide(self.now, outcome))

    def _handle(self, node: str, d: Decision) -> None:
        self._record(node, d)
        g = self.gen[node]
        if d.action is Action.WAIT:
            if d.at != math.inf:
                self.at(d.at, self._step, node, None, g)
            return
        start, box = self.now, {}
        cut = self.now < self.partitioned.get(node, -math.inf)
        renew_cut = d.action is Action.RENEW and self.now < self.renews_lost.get(node, -math.inf)
        lost = cut or renew_cut or self.rnd.random() < self.drop  # request never reaches the server
        unanswered = cut or self.rnd.random() < self.drop  # applied, but the answer is lost
        applied = start + self.rnd.uniform(0, self.max_latency)
        slow = self.answer_delay if d.action is Action.RENEW else None
        answered = applied + (slow or self.rnd.uniform(0, self.max_latency))

        def apply() -> None:
            s, t = self.sessions[node], self.now
            try:
                if d.action is Action.OBSERVE:
                    box["out"] = Outcome.ok(start, s.read(t))
                elif d.action is Action.ACQUIRE:
                    box["out"] = Outcome.ok(start, s.acquire(d.record, t, self.timing.lease_duration))
                elif d.action is Action.RENEW:
                    box["out"] = Outcome.ok(start, s.renew(d.record, t))
                else:
                    s.release(d.record, t)
                    box["out"] = Outcome.ok(start)
            except LeaseConflict:
                box["out"] = Outcome(Result.CONFLICT, start)

        if not lost:
            self.at(applied, apply)
        if not lost and not unanswered and answered <= d.deadline:
            self.at(answered, lambda: self._step(node, box["out"], g))
        else:
            self.at(d.deadline, self._step, node, Outcome(Result.TIMEOUT, start), g)

    def crash(self, node: str) -> None:
        """Process dies: no more calls; the kernel keeps the VIP until the last fence."""
        self.alive[node] = False
        iv = self.intervals[node]
        if iv and iv[-1][1] == math.inf:
            iv[-1][1] = max(self.now, iv[-1][2])

    def stop(self, node: str) -> None:
        """Graceful stop: step down, then release."""
        self.gen[node] += 1
        self.stopped.add(node)
        self._handle(node, self.m[node].stop(self.now))

    def assert_never_two_leaders(self) -> None:
        """No overlap of leadership spans; and unless a leader released the lease, the next
        leader starts no earlier than that leader's last fence_until."""
        spans = sorted((s, e, f, r, n) for n, ivs in self.intervals.items() for s, e, f, r in ivs)
        for (s1, e1, f1, r1, n1), (s2, _e2, _f2, _r2, n2) in zip(spans, spans[1:], strict=False):
            if n1 == n2:
                continue
            assert e1 <= s2, f"{n1} led [{s1:.3f}, {e1:.3f}) and {n2} from {s2:.3f}"
            assert r1 or s2 >= f1 - 1e-9, f"{n2} took over at {s2:.3f}, before {n1}'s fence {f1:.3f}"


GENERATED_SCHEDULES = 150


@settings(max_examples=GENERATED_SCHEDULES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # A seed for a plain Random, not st.randoms(): hypothesis' own random draws cluster on simple
    # values and never found the etcd lease-reuse bug (test_retake_between_renew_deadline_and_ttl)
    # in 150 examples; seeded runs find it within the first few.
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 4),
    etcd_style=st.booleans(),
    max_latency=st.sampled_from([0.001, 0.05, 0.4, 1.2]),
    drop=st.sampled_from([0.0, 0.05, 0.3]),
    answer_delay=st.sampled_from([None, None, 0.6]),
    faults=st.lists(st.tuples(st.floats(0.5, 18.0), st.sampled_from(["leader", "leader", 0, 1, 2, 3]),
                              st.sampled_from(["crash", "stop", "partition", "partition", "renew_loss"]),
                              st.floats(0.2, 5.0)),
                    min_size=1, max_size=4),
)
def test_generated_schedules_never_have_two_leaders(seed, n, etcd_style, max_latency, drop, answer_delay, faults):
    """Samples GENERATED_SCHEDULES schedules (hypothesis; it is a sample, not an exhaustive
    search of interleavings): 2-4 nodes, either backend kind, random request/answer latencies
    and losses, and up to four faults (crash, graceful stop, partition, lost renewals only)."""
    nodes = [f"n{i}" for i in range(n)]
    sim = Sim(random.Random(seed), nodes, ttl=2.0 if etcd_style else None, max_latency=max_latency, drop=drop,
              answer_delay=answer_delay)
    for when, who, kind, length in sorted(faults, key=lambda f: f[0]):
        sim.run(when)
        leaders = [x for x, m in sim.m.items() if m.leader and sim.alive[x]]
        node = (leaders or nodes)[0] if who == "leader" else nodes[who % n]
        if kind == "partition":  # this node's requests and answers are lost for a while
            sim.partitioned[node] = when + length
        elif kind == "renew_loss":  # only its renewals (etcd keep-alives) are lost
            sim.renews_lost[node] = when + length
        elif sim.alive[node] and sim.m[node].role is not Role.STOPPED:
            sim.crash(node) if kind == "crash" else sim.stop(node)
    sim.run(20.0)
    sim.assert_never_two_leaders()


def test_release_lets_another_node_acquire_within_one_retry_period():
    sim = Sim(random.Random(5), ["n0", "n1", "n2"], max_latency=0.005)
    sim.run(5.0)
    (leader,) = [n for n, m in sim.m.items() if m.leader]
    sim.stop(leader)
    t_release = sim.now
    sim.run(5.0 + 2 * T.retry_period)
    after = [(t, n) for t, n in sim.acquired if t > t_release]
    assert after and after[0][1] != leader
    assert after[0][0] - t_release <= T.retry_period + 4 * 0.005
    sim.assert_never_two_leaders()


def test_crashed_leader_replaced_within_lease_plus_retry():
    for seed in range(10):
        sim = Sim(random.Random(seed), ["n0", "n1", "n2"], max_latency=0.005)
        sim.run(5.0)
        (leader,) = [n for n, m in sim.m.items() if m.leader]
        sim.crash(leader)
        t_crash = sim.now
        sim.run(10.0)
        after = [t for t, n in sim.acquired if t > t_crash]
        assert after, seed
        assert after[0] - t_crash <= T.lease_duration + T.retry_period + 4 * 0.005
        sim.assert_never_two_leaders()


@pytest.mark.parametrize("etcd_style", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_partitioned_leader_steps_down_before_takeover(seed, etcd_style):
    sim = Sim(random.Random(seed), ["n0", "n1", "n2"], ttl=2.0 if etcd_style else None, max_latency=0.001)
    sim.run(5.0)
    (leader,) = [n for n, m in sim.m.items() if m.leader]
    sim.partitioned[leader] = 9.0
    sim.run(12.0)
    assert [n for n, m in sim.m.items() if m.leader] != [leader]
    sim.assert_never_two_leaders()


@pytest.mark.parametrize("etcd_style", [False, True])
@pytest.mark.parametrize("reuse_lease", [False, True])
def test_retake_between_renew_deadline_and_ttl(etcd_style, reuse_lease):
    """The leader's renewals (etcd: keep-alives) are lost while its reads and writes get through:
    it steps down at the renew deadline, sees its own record and takes it again before the old
    lease runs out. Kubernetes: the retake is a write, followers count LD from it. etcd: only a
    fresh lease is safe; the old unsafe acquire (``reuse_lease``) must make this test fail."""
    sim = Sim(random.Random(11), ["n0", "n1"], ttl=2.0 if etcd_style else None, max_latency=0.002,
              reuse_lease=reuse_lease)
    sim.run(3.0)
    (leader,) = [n for n, m in sim.m.items() if m.leader]
    sim.renews_lost[leader] = math.inf
    sim.run(12.0)
    spans = sim.intervals[leader]
    assert len(spans) >= 2, "the leader never retook its record"
    first_end, retake = spans[0][1], spans[1][0]
    # Retaken after the renew deadline (it stepped down) and before the TTL counted from the
    # last successful renew (first_end - RD) ran out: the hazardous window.
    assert first_end < retake < first_end - T.renew_deadline + 2.0
    if etcd_style and reuse_lease:
        with pytest.raises(AssertionError):
            sim.assert_never_two_leaders()
    else:
        sim.assert_never_two_leaders()
