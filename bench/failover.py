"""Failover benchmark: vipd at its defaults beside keepalived (VRRP advert_int 1), same lab.

``main(progress)`` runs, per daemon, ≥ 5 runs each of: leader daemon SIGKILLed (every
process of it), SIGTERMed, and the leader's link cut at the switch; measures the
client-visible outage (a TCP connect to VIP:6444 from the client namespace started every
20 ms; outage = longest gap between successful attempts around the fault) and counts the
samples (every ~5 ms, all node namespaces) in which two nodes held the VIP. It writes
docs/failover.md (table + commands) and docs/failover.svg, and returns the markdown.

Both daemons are probed on port 6444 (the apiserver stand-in listening on every node) so the
figure measures the VIP moving, not vipd's proxy. ``VIPD_BENCH_FAILOVER_RUNS`` sets runs.
Must never: run outside the lab's namespaces.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from vipd.lab import chart
from vipd.lab.bounds import Bounds
from vipd.lab.daemons import BACKEND_PORT, missing_vipd_pieces
from vipd.lab.faults import restore
from vipd.lab.lab import Lab

FAULTS = ("SIGKILL", "SIGTERM", "link cut")
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Run:
    daemon: str
    fault: str
    leader: str
    outage: float
    two_holder_samples: int
    new_leader: str | None


def _one_run(lab: Lab, b: Bounds, fault: str) -> Run:
    leader = restore(lab, b)
    probe = lab.probe(BACKEND_PORT)
    try:
        probe.wait_ok(3)
        t0 = time.monotonic()
        if fault == "SIGKILL":
            lab.fleet.kill(leader, signal.SIGKILL)
        elif fault == "SIGTERM":
            lab.fleet.kill(leader, signal.SIGTERM)
        else:
            lab.net.cut_link(leader)
        # The new holder appears (keepalived killed: while the old one still holds it too).
        s = lab.sampler.wait_for(lambda h: any(n != leader for n in h), 3 * b.takeover, since=t0)
        probe.wait_ok(5, after=s.t if s else None)
        time.sleep(0.2)
        outage = probe.outage(t0, time.monotonic())
        new = next((n for n in s.holders if n != leader), None) if s else None
        # Count two-holder samples until the old leader lets go (or the fence bound passes).
        lab.sampler.wait_for(lambda h: leader not in h, b.fence, since=t0)
        if fault == "link cut":
            lab.net.restore_link(leader)
            time.sleep(2 * b.lease_duration)  # two holders after the link returns count too
        two = len(lab.sampler.split_brain(t0))
    finally:
        probe.stop()
    return Run(lab.kind, fault, leader, outage, two, new)


def _table(runs: list[Run], notes: list[str]) -> tuple[str, list[chart.Bar]]:
    lines = ["| fault | daemon | runs | median outage | max outage | samples with two holders (per run) |",
             "|---|---|---|---|---|---|"]
    bars = []
    for fault in FAULTS:
        for daemon in ("vipd", "keepalived"):
            rs = [r for r in runs if r.fault == fault and r.daemon == daemon]
            if not rs:
                continue
            med = statistics.median(r.outage for r in rs)
            worst = max(r.outage for r in rs)
            two = [r.two_holder_samples for r in rs]
            lines.append(f"| {fault} | {daemon} | {len(rs)} | {med * 1000:.0f} ms | {worst * 1000:.0f} ms | "
                         f"{', '.join(map(str, two))} |")
            bars.append(chart.Bar(fault, daemon, med, worst, sum(two)))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]), bars


def main(progress) -> str:
    runs_each = int(os.environ.get("VIPD_BENCH_FAILOVER_RUNS", "5"))
    b = Bounds.defaults()
    runs: list[Run] = []
    notes: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for daemon in ("vipd", "keepalived"):
        if daemon == "vipd" and (missing := missing_vipd_pieces()):
            notes.append(f"vipd not measured: this build lacks {', '.join(missing)}")
            progress(f"failover: skipping vipd ({notes[-1]})")
            continue
        with Lab(kind=daemon, progress=lambda m: progress("failover: " + m)) as lab:
            for fault in FAULTS:
                for i in range(runs_each):
                    r = _one_run(lab, b, fault)
                    runs.append(r)
                    progress(f"failover: {daemon} {fault} run {i + 1}/{runs_each}: leader {r.leader} → "
                             f"{r.new_leader}, outage {r.outage * 1000:.0f} ms, two-holder samples "
                             f"{r.two_holder_samples}")
    table, bars = _table(runs, notes)
    md = render_doc(table, started, runs_each, b)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "failover.md").write_text(md)
    (DOCS / "failover.svg").write_text(chart.render(bars, "Client-visible outage on failover (lower is better)"))
    progress(f"failover: wrote {DOCS / 'failover.md'} and failover.svg")
    return "## Failover\n\n" + table + "\n"


def render_doc(table: str, started: str, runs_each: int, b: Bounds) -> str:
    return f"""# Failover: vipd beside keepalived

Written by `make bench` (`python -m bench`, which calls `bench/failover.py`); last run
{started}, {runs_each} runs per fault and daemon. Do not edit by hand: run it again.

![outage chart](failover.svg)

{table}

## What was measured

- **Lab**: `vipd lab` (see [lab.md](lab.md)): three node namespaces on a bridge, a client
  namespace, real etcd 3.4 in its own namespace; on each node an HTTPS apiserver stand-in on
  :6444. Same nodes, same probe for both daemons.
- **vipd** at its defaults (lease {b.lease_duration:g}s, renew deadline {b.renew_deadline:g}s,
  retry {b.retry_period:g}s), `--election etcd`, proxy on VIP:6443.
  **keepalived** (Debian, `--vrrp`), VRRP `advert_int 1`, priorities 150/100/50, otherwise
  its defaults (preemption on, gARP as configured by default).
- **Faults**: SIGKILL to every process of the leader's daemon (keepalived's parent and VRRP
  child both); SIGTERM to the daemon; the leader's port on the switch set down. The apiserver
  stand-in on the leader keeps running in every case.
- **Outage**: from the client namespace a TCP connect to VIP:6444 is started every 20 ms
  (each with a 1 s deadline, so a hung attempt never delays the next); the outage is the
  longest gap between the starts of two successful attempts around the fault (20 ms when
  nothing is lost).
- **Two holders**: every ~5 ms the sampler dumps the addresses of all three node namespaces
  over netlink; a sample in which two of them hold the VIP is split brain, whatever a client
  saw. keepalived has no fencing: killed, its VIP stays on the node while a backup takes
  over, so clients still reach the old node's (live) stand-in — no outage, but two holders.
- Between runs the lab is restored (daemon restarted, link up) and waits for one stable holder.

## Commands

```
make bench                                   # all benchmarks, this table included
VIPD_BENCH_FAILOVER_RUNS=5 .venv/bin/python -c 'import bench.failover as f; print(f.main(print))'
vipd lab demo                                # the story, one SIGKILL and one SIGTERM
```

Goals (issue 7): SIGKILL / link cut ≤ 2.5 s median at vipd's defaults; SIGTERM ≤ 0.1 s;
zero samples with two holders in every vipd run.
"""
