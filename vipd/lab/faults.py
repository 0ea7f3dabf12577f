"""The fault scenarios: inject one fault into a running lab, observe, restore, judge.

Owns: the scenario list of issue 7 (leader SIGKILL, SIGTERM, SIGSTOP past the lease, link
cut, etcd cut, etcd down past the lease, the leader's apiserver stand-in down, VIP deleted by
hand, two nodes restarted at once), the restore step that puts the lab back to steady state
between scenarios, and the checks every scenario makes:

- never two namespaces holding the VIP in the same sample (from the fault to the end);
- a leader exists again within the bound from ``bounds``;
- no VIP left on a stopped (or cut-off) node past the fence bound;
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

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

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
    if lab.kind == "vipd" and not lab.etcd.process.running:
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
    # Stable: the same single holder for a retry period and a bit (no flapping after restarts).
    stable = lab.sampler.wait_for(lambda h: h != (holder,), max(1.0, 2 * bounds.retry_period))
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


def _no_split_brain(lab: Lab, out: Outcome, since: float) -> None:
    bad = lab.sampler.split_brain(since)
    out.two_holder_samples = len(bad)
    first = f"; first at +{bad[0].t - since:.3f}s: {','.join(bad[0].holders)}" if bad else ""
    n = len(lab.sampler.since(since))
    out.check("never two VIP holders in one sample", not bad,
              f"{len(bad)} of {n} samples had two holders{first}")


def _new_leader(lab: Lab, out: Outcome, t0: float, bound: float, *, not_: str | None = None) -> str | None:
    exclude = (not_,) if not_ else ()
    s = lab.sampler.wait_for(lambda h: len(h) == 1 and h[0] not in exclude,
                             max(0.0, t0 + bound - time.monotonic()), since=t0)
    out.check(f"a leader{' other than ' + not_ if not_ else ''} holds the VIP within {bound:.1f}s",
              s is not None, f"after {s.t - t0:.2f}s: {s.holders[0]}" if s else f"holders now {lab.holders()}")
    return s.holders[0] if s else None


def _vip_gone_from(lab: Lab, out: Outcome, node: str, t0: float, bound: float, why: str) -> None:
    s = lab.sampler.wait_for(lambda h: node not in h, max(0.0, t0 + bound - time.monotonic()), since=t0)
    out.check(f"no VIP left on {why} node {node} after {bound:.1f}s", s is not None,
              f"gone after {s.t - t0:.2f}s" if s else "still there")


def _outage(lab: Lab, out: Outcome, probe, t0: float) -> None:
    probe.wait_ok(3.0)
    out.outage = probe.outage(t0, time.monotonic())


# --- the scenarios --------------------------------------------------------------------------


def leader_sigkill(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = time.monotonic()
    lab.fleet.kill(leader, signal.SIGKILL)
    _vip_gone_from(lab, out, leader, t0, b.fence, "a killed")
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


def leader_sigterm(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = time.monotonic()
    lab.fleet.kill(leader, signal.SIGTERM)
    _new_leader(lab, out, t0, b.handover, not_=leader)
    code = lab.fleet.wait_exit(leader, b.graceful_exit)
    out.check("the stopped daemon exits 0", code == 0, f"exit {code}")
    _vip_gone_from(lab, out, leader, t0, b.handover, "a stopped")
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


def leader_sigstop(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = time.monotonic()
    lab.fleet.kill(leader, signal.SIGSTOP)
    _vip_gone_from(lab, out, leader, t0, b.fence, "a frozen")
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    time.sleep(max(0.0, t0 + 2 * b.lease_duration - time.monotonic()))  # frozen well past the lease
    t_cont = time.monotonic()
    lab.fleet.kill(leader, signal.SIGCONT)
    # Woken, it must notice it lost the lease and not put the VIP back.
    back = lab.sampler.wait_for(lambda h: leader in h, 2 * b.lease_duration + b.retry_period)
    out.check("the woken old leader does not take the VIP back", back is None,
              f"it did after {back.t - t_cont:.2f}s" if back else "")
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


def _partition(lab: Lab, b: Bounds, out: Outcome, probe, cut, restore_, why: str) -> None:
    """Cut the leader off (``cut(node)``), judge, restore; the VIP must stay single after."""
    leader = out.leader
    t0 = time.monotonic()
    cut(leader)
    _vip_gone_from(lab, out, leader, t0, b.fence, why)
    _new_leader(lab, out, t0, b.takeover, not_=leader)
    _outage(lab, out, probe, t0)
    restore_(leader)
    back = lab.sampler.wait_for(lambda h: len(h) != 1, 2 * b.lease_duration)
    out.check("after the cut is mended the VIP stays with one node", back is None,
              f"holders {back.holders}" if back else "")
    _no_split_brain(lab, out, t0)


def leader_link_cut(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    _partition(lab, b, out, probe, lab.net.cut_link, lab.net.restore_link, "a cut-off")


def leader_etcd_cut(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    _partition(lab, b, out, probe, lab.net.cut_from_etcd, lab.net.restore_etcd, "an etcd-less")


def etcd_down(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    t0 = time.monotonic()
    lab.etcd.stop()
    time.sleep(2 * b.lease_duration)  # down longer than the lease
    holders = lab.holders()
    out.check("with etcd down past the lease, at most one node holds the VIP", len(holders) <= 1,
              f"holders {holders}")
    t_up = time.monotonic()
    lab.etcd.start()
    _new_leader(lab, out, t_up, b.first_leader)
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


def leader_standin_down(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = time.monotonic()
    lab.standins[leader].stop(2)
    # Clients keep being served, by the other stand-ins, through the leader's proxy.
    _client_served(lab, out, b.backend_down, avoid=leader)
    served = [lab.client_get(f"https://{VIP}:{probe_port(lab)}/readyz", 2) for _ in range(6)]
    out.check("six requests in a row are all served by the other stand-ins",
              all(a.ok and a.node != leader for a in served), "; ".join(a.detail for a in served))
    _no_split_brain(lab, out, t0)


def vip_deleted(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    t0 = time.monotonic()
    run(["ip", "-n", lab.net.ns(leader), "addr", "del", f"{VIP}/32", "dev", IFACE])
    back = lab.sampler.wait_for(lambda h: len(h) == 1, b.restore_vip)
    out.check(f"the VIP is back on one node within {b.restore_vip:.1f}s", back is not None,
              f"on {back.holders[0]} after {back.t - t0:.2f}s" if back else f"holders {lab.holders()}")
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


def two_restarted(lab: Lab, b: Bounds, out: Outcome, probe) -> None:
    leader = out.leader
    other = next(n for n in lab.node_ns if n != leader)
    t0 = time.monotonic()
    for n in (leader, other):
        lab.fleet.kill(n, signal.SIGTERM)
    for n in (leader, other):
        code = lab.fleet.wait_exit(n, b.graceful_exit)
        out.check(f"{n} exits 0 on SIGTERM", code == 0, f"exit {code}")
        lab.fleet.start(n)
    _new_leader(lab, out, t0, b.first_leader)
    settled = lab.sampler.wait_for(lambda h: len(h) != 1, 2 * b.lease_duration)
    out.check("one holder once restarted", settled is None, f"holders {settled.holders}" if settled else "")
    _outage(lab, out, probe, t0)
    _no_split_brain(lab, out, t0)


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
    """Restore, inject ``name``, judge, and finally check a client is served; never raises on a
    failed check (the Outcome says), only when the lab itself cannot be driven."""
    out = Outcome(name)
    out.leader = restore(lab, bounds)
    probe = lab.probe(probe_port(lab))
    try:
        probe.wait_ok(3.0)
        SCENARIOS[name](lab, bounds, out, probe)
    finally:
        probe.stop()
    restore(lab, bounds)
    _client_served(lab, out, bounds.backend_down)
    return out
