"""The fault scenarios: inject one fault into a running lab, observe, restore, judge.

Owns: the scenario list of issue 7 (leader SIGKILL, SIGTERM, SIGSTOP past the lease, link
cut, etcd cut, etcd down past the lease, the leader's apiserver stand-in down, VIP deleted by
hand, two nodes restarted at once), the restore step that puts the lab back to steady state
between scenarios, and the checks every scenario makes:

- never two namespaces holding the VIP at once, from the restore before the fault to the end
  of the restore after it (restarting a killed or woken node is part of the scenario);
- the holder watcher saw that whole window: no address event lost, dumps every <= 10 ms
  (or, when the machine stalled the dumps, the event stream covered the gap);
- a leader exists again within the bound from ``bounds``, and it appears only after the old
  holder's VIP was seen gone (a check cannot be met by a sample from before the fault);
- no VIP left on a stopped (or cut-off) node past the fence bound that applies to how it
  was cut off (step-down for a running leader, kernel lifetime for a killed or frozen one);
- afterwards a client reaches a healthy apiserver stand-in through the VIP.

Each scenario returns an ``Outcome`` (named checks with details) instead of asserting, so
the pytest suite, the demo and a dev run against keepalived read the same verdicts.

Must never: leave the lab changed: ``restore`` undoes every fault a scenario can inject.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vipd.lab.bounds import Bounds
from vipd.lab.daemons import BACKEND_PORT, PROXY_PORT
from vipd.lab.lab import Lab
from vipd.lab.net import IFACE, VIP
from vipd.lab.nsutil import LabError, run
from vipd.lab.observe import DUMP_BOUND, Sample

SPLIT_BRAIN = "never two VIP holders at once"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Outcome:
    scenario: str
    leader: str | None = None
    checks: list[Check] = field(default_factory=list)
    outage: float | None = None  # client-visible, seconds
    two_holder_samples: int = 0
    vacancy: float | None = None  # old holder's VIP gone → new holder has it (the safety margin)
    t_fault: float | None = None  # when the fault was injected (monotonic)

    def fault(self) -> float:
        """Note (and return) the time of the fault, just before injecting it."""
        self.t_fault = time.monotonic()
        return self.t_fault

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self, name: str) -> bool:
        return any(c.name == name and not c.ok for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def report(self) -> str:
        lines = [f"{self.scenario} (leader {self.leader}): {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name} {c.detail}" for c in self.checks]
        return "\n".join(lines)


def probe_port(lab: Lab) -> int:
    """The proxy front end when vipd runs its proxy, else the stand-ins' own port."""
    return PROXY_PORT if lab.kind == "vipd" and getattr(lab.fleet, "proxy", False) else BACKEND_PORT


# --- steady state ------------------------------------------------------------------------------


def restore(lab: Lab, bounds: Bounds) -> str:
    """Undo every fault, (re)start whatever is down, wait for one stable holder; return it."""
    for node in lab.node_ns:
        lab.net.restore_link(node)
        with contextlib.suppress(LabError):
            lab.net.restore_etcd(node)
    if lab.etcd is not None and not lab.etcd.process.running:
        lab.etcd.start()
    for node, proc in lab.standins.items():
        if not proc.running:
            lab.start_standin(node)
    assert lab.fleet is not None
    for node in lab.node_ns:
        p = lab.fleet.procs.get(node)
        if p is not None and p.running:
            p.signal(signal.SIGCONT)
        else:
            lab.fleet.start(node)
    holder = lab.wait_single_holder(bounds.first_leader + bounds.takeover)
    if holder is None:
        raise LabError(f"lab did not settle on one VIP holder; holders now {lab.holders()}")
    # Stable: the same single holder for a while (no flapping after restarts).
    stable = lab.sampler.wait_for(lambda h: h != (holder,), bounds.settle)
    if stable is not None:
        holder = lab.wait_single_holder(bounds.takeover)
        if holder is None:
            raise LabError(f"lab did not settle; holders now {lab.holders()}")
    return holder


def _client_served(lab: Lab, out: Outcome, timeout: float, *, avoid: str | None = None) -> None:
    """A client reaches a healthy stand-in through the VIP (not ``avoid``'s, which is down)."""
    deadline = time.monotonic() + timeout
    url = f"https://{VIP}:{probe_port(lab)}/readyz"
    ans = None
    while time.monotonic() < deadline:
        ans = lab.client_get(url, timeout=2)
        if ans.ok and ans.node != avoid:
            break
        time.sleep(0.1)
    out.check("client reaches a healthy apiserver stand-in through the VIP",
              ans is not None and ans.ok and ans.node != avoid, ans.detail if ans else "no answer")


def judge_window(lab: Lab, out: Outcome, t0: float, t1: float) -> None:
    """The checks over a whole window: never two holders, and the watcher saw all of it."""
    s = lab.sampler
    bad = s.split_brain(t0, t1)
    out.two_holder_samples = len(bad)
    seen = s.since(t0, t1)
    events = sum(x.kind == "event" for x in seen)
    ref, what = (out.t_fault, "the fault") if out.t_fault is not None else (t0, "the start")
    first = (f"; first {bad[0].t - ref:+.3f}s from {what} ({bad[0].kind}): {','.join(bad[0].holders)}"
             if bad else "")
    out.check(SPLIT_BRAIN, not bad,
              f"{len(bad)} of {len(seen)} observations ({len(seen) - events} dumps, {events} address "
              f"events) had two holders{first}")
    gap = s.max_gap(t0, t1)
    complete = s.events_complete(t0, t1)
    out.check("the holder watcher saw every moment", complete or gap <= DUMP_BOUND,
              f"address events {'complete' if complete else 'LOST (overrun or watcher gone)'}; dumps "
              f"every {s.interval * 1000:.0f} ms, longest gap {gap * 1000:.1f} ms "
              f"(bound {DUMP_BOUND * 1000:.0f} ms{'' if gap <= DUMP_BOUND else '; events covered it'}"
              f"{'' if s.realtime else '; no real-time priority'})")


def _vacated(lab: Lab, node: str, t0: float, timeout: float) -> Sample | None:
    """The first observation from ``t0`` on in which ``node`` does not hold the VIP."""
    return lab.sampler.wait_for(lambda h: node not in h, max(0.0, timeout), since=t0)


def _new_leader(lab: Lab, out: Outcome, t0: float, bound: float, *, not_: str | None = None,
                after: float | None = None) -> str | None:
    """One holder (not ``not_``) within ``bound`` of ``t0``, seen at or after ``after`` (by
    default ``t0``; pass the time the old VIP was seen gone when the old holder may return)."""
    exclude = (not_,) if not_ else ()
    since = t0 if after is None else after
    s = lab.sampler.wait_for(lambda h: len(h) == 1 and h[0] not in exclude,
                             max(0.0, t0 + bound - time.monotonic()), since=since)
    margin = ""
    if s is not None and not_:
        gone = _vacated(lab, not_, t0, 0.0)
        if gone is not None and gone.t <= s.t:
            out.vacancy = s.t - gone.t
            margin = f" (the VIP was on no node for {out.vacancy:.2f}s before)"
    out.check(f"a leader{' other than ' + not_ if not_ else ''} holds the VIP within {bound:.1f}s",
              s is not None,
              f"after {s.t - t0:.2f}s: {s.holders[0]}{margin}" if s else f"holders now {lab.holders()}")
    return s.holders[0] if s else None


def _vip_gone_from(lab: Lab, out: Outcome, node: str, t0: float, bound: float, why: str) -> Sample | None:
    s = _vacated(lab, node, t0, t0 + bound - time.monotonic())
    out.check(f"no VIP left on {why} node {node} after {bound:.1f}s", s is not None,
              f"gone after {s.t - t0:.2f}s" if s else "still there")
    return s


def _outage(lab: Lab, b: Bounds, out: Outcome, probe, t0: float) -> None:
    probe.wait_ok(b.client_back)
    out.outage = probe.outage(t0, time.monotonic())


# --- the scenarios --------------------------------------------------------------------------


def leader_sigkill(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = out.fault()
    lab.fleet.kill(leader, signal.SIGKILL)
    _vip_gone_from(lab, out, leader, t0, b.kernel_fence, "a killed")  # only the kernel can
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    _outage(lab, b, out, probe, t0)


def leader_sigterm(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = out.fault()
    lab.fleet.kill(leader, signal.SIGTERM)
    _new_leader(lab, out, t0, b.handover, not_=leader)
    code = lab.fleet.wait_exit(leader, b.graceful_exit)
    out.check("the stopped daemon exits 0", code == 0, f"exit {code}")
    _vip_gone_from(lab, out, leader, t0, b.handover, "a stopped")
    _outage(lab, b, out, probe, t0)


def leader_sigstop(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = out.fault()
    lab.fleet.kill(leader, signal.SIGSTOP)
    _vip_gone_from(lab, out, leader, t0, b.kernel_fence, "a frozen")  # only the kernel can
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    time.sleep(max(0.0, t0 + 2 * b.lease_duration - time.monotonic()))  # frozen well past the lease
    t_cont = time.monotonic()
    lab.fleet.kill(leader, signal.SIGCONT)
    # Woken, it must notice it lost the lease and not put the VIP back.
    back = lab.sampler.wait_for(lambda h: leader in h, b.stays, since=t_cont)
    out.check("the woken old leader does not take the VIP back", back is None,
              f"it did after {max(0.0, back.t - t_cont):.2f}s" if back else "")
    _outage(lab, b, out, probe, t0)


def _stays_off(lab: Lab, out: Outcome, node: str | None, t0: float, t_from: float, t_to: float,
               what: str) -> None:
    """``node`` (None: every node) holds no VIP in [t_from, t_to]; report when it last did."""
    def holds(s: Sample) -> bool:
        return bool(s.holders) if node is None else node in s.holders

    late = [s for s in lab.sampler.since(t_from, t_to) if holds(s)]
    last = next((s for s in reversed(lab.sampler.since(t0, t_to)) if holds(s)), None)
    out.check(what, not late and t_to > t_from,
              (f"held at +{late[0].t - t0:.2f}s" if late else "none") + f" in +{t_from - t0:.1f}s..+{t_to - t0:.1f}s"
              + (f"; last held +{last.t - t0:.2f}s after the fault" if last else ""))


def _partition(lab: Lab, b: Bounds, out: Outcome, probe, cut, restore_, why: str) -> None:
    """Cut the leader off (``cut(node)``), judge, restore; the VIP must stay single after."""
    leader = out.leader
    t0 = out.fault()
    cut(leader)
    _vip_gone_from(lab, out, leader, t0, b.step_down, why)  # it runs: it steps down itself
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    _outage(lab, b, out, probe, t0)
    # Cut off for a lease past the step-down bound: by then it must be off for good (before it,
    # vipd may legitimately put back a VIP the kernel lifetime removed while it still led).
    time.sleep(max(0.0, t0 + b.step_down + b.lease_duration - time.monotonic()))
    t_mend = time.monotonic()
    _stays_off(lab, out, leader, t0, t0 + b.step_down, t_mend, f"the VIP stays off {leader} while it is cut off")
    restore_(leader)
    back = lab.sampler.wait_for(lambda h: len(h) != 1, b.stays, since=t_mend)
    out.check("after the cut is mended the VIP stays with one node", back is None,
              f"holders {back.holders}" if back else "")


def leader_link_cut(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    _partition(lab, b, out, probe, lab.net.cut_link, lab.net.restore_link, "a cut-off")


def leader_etcd_cut(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    _partition(lab, b, out, probe, lab.net.cut_from_etcd, lab.net.restore_etcd, "an etcd-less")


def etcd_down(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = out.fault()
    lab.etcd.stop()
    _vip_gone_from(lab, out, leader, t0, b.step_down, "an etcd-less")
    # Down for a lease past the step-down bound (so also longer than the lease): without etcd
    # nobody may take the lease, so from the step-down on nobody may hold the VIP.
    time.sleep(max(0.0, t0 + b.step_down + b.lease_duration - time.monotonic()))
    t_up = time.monotonic()
    _stays_off(lab, out, None, t0, t0 + b.step_down, t_up, "nobody holds the VIP while etcd is down")
    lab.etcd.start()
    _new_leader(lab, out, t_up, b.first_leader)
    _outage(lab, b, out, probe, t0)


def leader_standin_down(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    out.fault()
    lab.standins[leader].stop(2)
    # Clients keep being served, by the other stand-ins, through the leader's proxy.
    _client_served(lab, out, b.backend_down, avoid=leader)
    served = [lab.client_get(f"https://{VIP}:{probe_port(lab)}/readyz", 2) for _ in range(6)]
    out.check("six requests in a row are all served by the other stand-ins",
              all(a.ok and a.node != leader for a in served), "; ".join(a.detail for a in served))


def vip_deleted(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = out.fault()
    run(["ip", "-n", lab.net.ns(leader), "addr", "del", f"{VIP}/32", "dev", IFACE])
    gone = _vacated(lab, leader, t0, b.restore_vip)
    out.check("the deletion is seen", gone is not None, "" if gone else f"holders {lab.holders()}")
    # The leader still holds the lease: its drift watch puts the VIP back, on itself.
    back = lab.sampler.wait_for(lambda h: h == (leader,), max(0.0, t0 + b.restore_vip - time.monotonic()),
                                since=gone.t) if gone else None
    out.check(f"the VIP is back on {leader} within {b.restore_vip:.1f}s", back is not None,
              f"after {back.t - t0:.3f}s" if back else f"holders {lab.holders()}")
    _outage(lab, b, out, probe, t0)


def two_restarted(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    other = next(n for n in lab.node_ns if n != leader)
    t0 = out.fault()
    for n in (leader, other):
        lab.fleet.kill(n, signal.SIGTERM)
    for n in (leader, other):
        code = lab.fleet.wait_exit(n, b.graceful_exit)
        out.check(f"{n} exits 0 on SIGTERM", code == 0, f"exit {code}")
        lab.fleet.start(n)
    # The old leader's own samples from before the SIGTERM must not count: first its VIP goes.
    gone = _vip_gone_from(lab, out, leader, t0, b.graceful_exit, "a stopped")
    if gone is not None:
        _new_leader(lab, out, t0, b.first_leader, after=gone.t)
    settled = lab.sampler.wait_for(lambda h: len(h) != 1, b.stays)
    out.check("one holder once restarted", settled is None, f"holders {settled.holders}" if settled else "")
    _outage(lab, b, out, probe, t0)


SCENARIOS: dict[str, Callable[[Lab, Bounds, Outcome, object], None]] = {
    "leader-sigkill": leader_sigkill,
    "leader-sigterm": leader_sigterm,
    "leader-sigstop": leader_sigstop,
    "leader-link-cut": leader_link_cut,
    "leader-etcd-cut": leader_etcd_cut,
    "etcd-down": etcd_down,
    "leader-apiserver-down": leader_standin_down,
    "vip-deleted": vip_deleted,
    "two-restarted": two_restarted,
}


def run_scenario(lab: Lab, bounds: Bounds, name: str) -> Outcome:
    """Restore, inject ``name``, judge, restore again, check a client is served, and judge the
    whole window (from before the first restore to the end of the last) for two holders.

    Never raises on a failed check or a lab that cannot be driven: the Outcome says."""
    out = Outcome(name)
    t_begin = time.monotonic()
    try:
        out.leader = restore(lab, bounds)
    except LabError as exc:
        out.check("the lab settles on one VIP holder before the fault", False, str(exc))
    if out.leader is not None:
        probe = lab.probe(probe_port(lab))
        try:
            probe.wait_ok(bounds.client_back)
            SCENARIOS[name](lab, bounds, out, probe)
        except LabError as exc:
            out.check("the scenario could be driven", False, str(exc))
        finally:
            probe.stop()
        try:
            restore(lab, bounds)
        except LabError as exc:
            out.check("the lab settles on one VIP holder after the scenario", False, str(exc))
        else:
            _client_served(lab, out, bounds.backend_down)
    judge_window(lab, out, t_begin, time.monotonic())
    return out
