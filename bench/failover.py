"""Failover benchmark: vipd at its defaults beside keepalived (VRRP advert_int 1), same lab.

``main(progress)`` runs, per daemon, ≥ 5 runs each of: leader daemon SIGKILLed (every
process of it), SIGTERMed, and the leader's link cut at the switch. Each fault lands at a
random point of the renew cycle (a random wait of 0..retry_period first). It measures the
client-visible outage with the 20 ms TCP probe of issue 7, through the VIP on the port a
client uses: VIP:6443, vipd's proxy (as ``vipd lab demo`` does); keepalived has no proxy, so
its clients connect to the apiserver stand-ins' own port, VIP:6444 (``faults.probe_port``).
Outage = longest gap between successful connects (completion times) around the fault. It
counts the observations (dumps every 5 ms of all node namespaces, plus every address event)
in which two nodes held the VIP, and compares each row with the goals of issue 7. It writes
docs/failover.md (table + commands) and docs/failover.svg, and returns the markdown.

``python -m bench.failover --runs 1 --daemon vipd --no-write`` is a quick check that prints
the table without touching docs/. ``VIPD_BENCH_FAILOVER_RUNS`` sets runs for ``make bench``.
Must never: run outside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vipd.lab import chart
from vipd.lab.bounds import Bounds
from vipd.lab.daemons import missing_vipd_pieces
from vipd.lab.faults import probe_port, restore
from vipd.lab.lab import Lab

FAULTS = ("SIGKILL", "SIGTERM", "link cut")
DAEMONS = ("vipd", "keepalived")
# Issue 7's goals for vipd at its defaults: median client-visible outage per fault.
GOALS = {"SIGKILL": 2.5, "SIGTERM": 0.1, "link cut": 2.5}
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Run:
    daemon: str
    fault: str
    leader: str
    outage: float
    two_holder_samples: int
    new_leader: str | None
    delay: float  # the random wait before the fault (its point in the renew cycle)
    port: int


def _one_run(lab: Lab, b: Bounds, fault: str, rng: random.Random) -> Run:
    leader = restore(lab, b)
    port = probe_port(lab)
    probe = lab.probe(port)
    try:
        probe.wait_ok(b.client_back)
        delay = rng.uniform(0.0, b.retry_period)
        time.sleep(delay)  # land anywhere in the leader's renew cycle
        t0 = time.monotonic()
        if fault == "SIGKILL":
            lab.fleet.kill(leader, signal.SIGKILL)
        elif fault == "SIGTERM":
            lab.fleet.kill(leader, signal.SIGTERM)
        else:
            lab.net.cut_link(leader)
        # The new holder appears (keepalived killed: while the old one still holds it too).
        s = lab.sampler.wait_for(lambda h: any(n != leader for n in h), b.takeover, since=t0)
        probe.wait_ok(b.client_back, after=s.t if s else None)
        time.sleep(0.2)
        outage = probe.outage(t0, time.monotonic())
        new = next((n for n in s.holders if n != leader), None) if s else None
        # Count two-holder observations until the old leader lets go (or the fence bound passes).
        lab.sampler.wait_for(lambda h: leader not in h, b.kernel_fence, since=t0)
        if fault == "link cut":
            lab.net.restore_link(leader)
            time.sleep(b.stays)  # two holders after the link returns count too
        two = len(lab.sampler.split_brain(t0, time.monotonic()))
    finally:
        probe.stop()
    return Run(lab.kind, fault, leader, outage, two, new, delay, port)


def _goal(fault: str, daemon: str, med: float, two: list[int]) -> str:
    if daemon != "vipd":
        return "—"
    met = med <= GOALS[fault] and not any(two)
    return f"{'met' if met else 'MISSED'} (median ≤ {GOALS[fault] * 1000:.0f} ms, no two holders)"


def _table(runs: list[Run], notes: list[str]) -> tuple[str, list[chart.Bar]]:
    lines = ["| fault | daemon | probe port | runs | median outage | max outage | "
             "observations with two holders (per run) | goal (issue 7) |",
             "|---|---|---|---|---|---|---|---|"]
    bars = []
    for fault in FAULTS:
        for daemon in DAEMONS:
            rs = [r for r in runs if r.fault == fault and r.daemon == daemon]
            if not rs:
                continue
            med = statistics.median(r.outage for r in rs)
            worst = max(r.outage for r in rs)
            two = [r.two_holder_samples for r in rs]
            lines.append(f"| {fault} | {daemon} | {rs[0].port} | {len(rs)} | {med * 1000:.0f} ms | "
                         f"{worst * 1000:.0f} ms | {', '.join(map(str, two))} | {_goal(fault, daemon, med, two)} |")
            bars.append(chart.Bar(fault, daemon, med, worst, sum(two)))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]), bars


def measure(progress, runs_each: int, daemons: tuple[str, ...] = DAEMONS,
            seed: int | None = None) -> tuple[list[Run], list[str], Bounds]:
    rng = random.Random(seed)
    b = Bounds.defaults()
    runs: list[Run] = []
    notes: list[str] = []
    for daemon in daemons:
        if daemon == "vipd" and (missing := missing_vipd_pieces()):
            notes.append(f"vipd not measured: this build lacks {', '.join(missing)}")
            progress(f"failover: skipping vipd ({notes[-1]})")
            continue
        with Lab(kind=daemon, progress=lambda m: progress("failover: " + m)) as lab:
            if daemon == "vipd":
                b = lab.bounds()
            for fault in FAULTS:
                for i in range(runs_each):
                    r = _one_run(lab, b, fault, rng)
                    runs.append(r)
                    progress(f"failover: {daemon} {fault} run {i + 1}/{runs_each}: leader {r.leader} → "
                             f"{r.new_leader}, fault {r.delay * 1000:.0f} ms into the cycle, outage "
                             f"{r.outage * 1000:.0f} ms (VIP:{r.port}), two-holder observations "
                             f"{r.two_holder_samples}")
    return runs, notes, b


def main(progress, runs_each: int | None = None, *, daemons: tuple[str, ...] = DAEMONS,
         write: bool = True) -> str:
    runs_each = runs_each or int(os.environ.get("VIPD_BENCH_FAILOVER_RUNS", "5"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs, notes, b = measure(progress, runs_each, daemons)
    table, bars = _table(runs, notes)
    if write:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "failover.md").write_text(render_doc(table, started, runs_each, b))
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
  stand-in on the leader keeps running in every case. Each fault comes after a random wait of
  0..{b.retry_period:g}s (one retry period), so it lands anywhere in the leader's renew cycle.
- **Outage** (issue 7: "20 ms TCP probe through the VIP"): from the client namespace a TCP
  connect is started every 20 ms (each with a 1 s deadline, so a hung attempt never delays
  the next) to the port a client of that set-up uses: **VIP:6443, vipd's proxy** (as
  `vipd lab demo` probes it); keepalived has no proxy, so its clients use the stand-ins' own
  port, **VIP:6444**. The outage is the longest gap between two successful connects around
  the fault, by the time each completed (20 ms when nothing is lost; an attempt whose SYN was
  retransmitted after TCP's 1 s timeout counts when it got through, not when it started).
- **Two holders**: every 5 ms the holder watcher dumps the addresses of all three node
  namespaces over netlink, and it also replays every address event of all of them in kernel
  order; an observation in which two of them hold the VIP is split brain, whatever a client
  saw. keepalived has no fencing: killed, its VIP stays on the node while a backup takes
  over, so clients still reach the old node's (live) stand-in — no outage, but two holders.
- **Goals** (issue 7, vipd at its defaults): SIGKILL and link cut ≤ 2.5 s median outage,
  SIGTERM ≤ 0.1 s median, and no observation with two holders in any run; the last column
  says whether this run met them.
- Between runs the lab is restored (daemon restarted, link up) and waits for one stable holder.

## Commands

```
make bench                                   # all benchmarks, this table included
VIPD_BENCH_FAILOVER_RUNS=5 .venv/bin/python -m bench failover   # this suite only
.venv/bin/python -m bench.failover --runs 1 --daemon vipd --no-write   # quick check, no docs
vipd lab demo                                # the story, one SIGKILL and one SIGTERM
```
"""


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description="failover benchmark (root)")
    p.add_argument("--runs", type=int, default=None, help="runs per fault and daemon (default 5)")
    p.add_argument("--daemon", choices=DAEMONS, action="append", help="only this daemon (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print the table; leave docs/ alone")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error(f"--runs: {args.runs}: expected at least 1")
    md = main(lambda m: print(m, file=sys.stderr, flush=True), args.runs,
              daemons=tuple(args.daemon or DAEMONS), write=not args.no_write)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
