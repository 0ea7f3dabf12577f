"""``vipd lab demo``: the failover story told in the terminal, with a verdict per step.

Story: build the lab → who leads → a client probes through the VIP every 20 ms → the
leader is SIGKILLed → take-over, with the client-visible outage → the old node returns as a
follower → a graceful SIGTERM hand-over, with its outage → summary table. Exit 0 only when
every step behaved (including: never two VIP holders in any sample of the whole run).

Owns: the narration and the table. The judging is ``faults`` (same checks as the suite).

Must never: leave the lab behind (it runs inside ``with Lab(...)``, which also turns Ctrl-C
and SIGTERM into a clean-up), or lose the logs of a run that did not behave (the lab keeps
them, and the summary says where).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vipd.lab import faults
from vipd.lab.bounds import Bounds
from vipd.lab.daemons import missing_vipd_pieces
from vipd.lab.lab import Lab
from vipd.lab.nsutil import LabError, ns_run


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else ("never" if x == float("inf") else f"{x * 1000:.0f} ms")


def node_role(lab: Lab, node: str) -> str | None:
    """The node's own view (vipd's /status in its namespace); None if it does not answer."""
    if lab.kind != "vipd":
        return None
    proc = ns_run(lab.net.ns(node), ["curl", "-s", "--max-time", "1", "http://127.0.0.1:2112/status"], check=False)
    try:
        return json.loads(proc.stdout).get("role")
    except ValueError:
        return None


def render_table(steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"  {'step'.ljust(width)}  result  detail", f"  {'-' * width}  ------  ------"]
    lines += [f"  {s.name.ljust(width)}  {'ok' if s.ok else 'FAILED':6}  {s.detail}" for s in steps]
    return "\n".join(lines)


def _returns_as_follower(lab: Lab, b: Bounds, node: str, say: Callable[[str], None]) -> Step:
    say(f"… starting {node} again; it must come back as a follower")
    holder_before = lab.holders()
    lab.fleet.start(node)
    t0 = time.monotonic()
    role = None
    while time.monotonic() < t0 + b.first_leader:
        role = node_role(lab, node)
        if role == "follower" or (lab.kind != "vipd" and time.monotonic() > t0 + b.startup):
            break
        time.sleep(0.2)
    moved = lab.sampler.wait_for(lambda h: h != holder_before, b.stays, since=t0)
    ok = moved is None and (role == "follower" or lab.kind != "vipd")
    detail = f"role {role or '?'}; VIP stayed on {','.join(holder_before)}" if moved is None else \
        f"VIP moved to {moved.holders}"
    say(f"{'✓' if ok else '✗'} {node} is back: {detail}")
    return Step(f"{node} returns as follower", ok, detail)


def run_demo(say: Callable[[str], None], *, kind: str = "vipd", keep_logs: Path | None = None) -> int:
    if kind == "vipd" and (missing := missing_vipd_pieces()):
        say("vipd lab demo: this build lacks " + ", ".join(missing) + "; the story needs them")
        return 1
    steps: list[Step] = []
    t_start = time.monotonic()
    lab = Lab(kind=kind, progress=lambda m: say("… " + m), keep_logs=keep_logs)
    try:
        with lab:
            try:
                _story(lab, lab.bounds(), steps, say)
            finally:
                lab.failed = lab.failed or not steps or not all(s.ok for s in steps)
    except LabError as exc:
        steps.append(Step("lab", False, str(exc)))
    say("")
    say(f"summary ({kind}, {time.monotonic() - t_start:.0f}s, lab removed):")
    say(render_table(steps))
    ok = bool(steps) and all(s.ok for s in steps)
    say("every step behaved" if ok else "some steps did not behave")
    say(f"logs kept in {lab.saved_logs}" if lab.saved_logs else
        "logs went with the lab (--keep-logs DIR keeps them; they are kept anyway when a step fails)")
    return 0 if ok else 1


def _story(lab: Lab, b: Bounds, steps: list[Step], say: Callable[[str], None]) -> None:
    for what, path in lab.logs().items():
        say(f"  log {what}: {path}   (tail -f it in another terminal)")
    leader = lab.wait_single_holder(b.first_leader)
    steps.append(Step("a leader is elected", leader is not None,
                      f"{leader} holds VIP {lab.vip}" if leader else "nobody holds the VIP"))
    say(f"{'✓' if leader else '✗'} {steps[-1].detail}")
    if leader is None:
        raise LabError("no leader: see the logs above")
    port = faults.probe_port(lab)
    ans = lab.client_get(f"https://{lab.vip}:{port}/readyz")
    steps.append(Step("a client is served through the VIP", ans.ok, ans.detail))
    say(f"{'✓' if ans.ok else '✗'} client → https://{lab.vip}:{port}/readyz: {ans.detail}")
    say(f"… a client now connects to {lab.vip}:{port} every 20 ms")
    for scenario, verb in (("leader-sigkill", "SIGKILL"), ("leader-sigterm", "SIGTERM")):
        probe = lab.probe(port)
        try:
            probe.wait_ok(b.client_back)
            out = faults.Outcome(scenario, leader=lab.holders()[0])
            say(f"… {verb} to the leader: {lab.kind} on {out.leader}")
            faults.SCENARIOS[scenario](lab, b, out, probe)
        finally:
            probe.stop()
        new = lab.holders()
        bound = b.takeover if verb == "SIGKILL" else b.handover
        steps.append(Step(f"{verb}: take-over within {bound:.1f}s, one holder", out.ok,
                          f"{out.leader} → {','.join(new) or 'nobody'}; client outage "
                          f"{_fmt_s(out.outage)}" + ("" if out.ok else "; " + "; ".join(out.failures()))))
        say(f"{'✓' if out.ok else '✗'} {steps[-1].detail}")
        steps.append(_returns_as_follower(lab, b, out.leader, say))
    whole = faults.Outcome("demo")  # the whole run, from the first observation on
    faults.judge_window(lab, whole, lab.sampler.samples[0].t, time.monotonic())
    for c in whole.checks:
        steps.append(Step(c.name, c.ok, c.detail))
