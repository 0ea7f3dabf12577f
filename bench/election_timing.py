"""Election failover timing: ``python -m bench.election_timing [--runs 5] [--backend etcd|kubernetes]``.

etcd (default): starts a throw-away etcd on loopback, then per run three elector processes
(the real ``run_election`` + ``EtcdLeaseBackend``, nothing else), and measures:

  crash     SIGKILL of the leader's process → another process reports leadership
  graceful  SIGTERM of the leader (steps down, releases) → another reports leadership
  etcd      etcd SIGKILLed and restarted → time with no leader; and never two leaders

kubernetes: starts the FAKE apiserver of tests/kube_fixtures.py (HTTPS, resourceVersion 409s)
in this process, then per run three elector processes (the real ``run_election`` +
``KubeLeaseBackend`` through kubernetes-asyncio and trio-asyncio) on a fresh Lease, and
measures crash and graceful as above. The fake answers from memory with no storage behind it, so the
figures are vipd's client-side timing, not a real apiserver's latency.

Prints one line per run and the medians (JSON with ``--json``). Times come from
CLOCK_MONOTONIC in every process, so they compare across processes.

``python -m bench.election_timing elector --endpoint URL --node N`` runs one elector and
prints one JSON line per Leadership event (tests/test_election_etcd.py uses it too);
``elector --backend kubernetes --kubeconfig PATH --lease-name NAME --node N`` does the same
against a Lease.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- one elector process -------------------------------------------------------------------------

def run_elector(args: argparse.Namespace) -> int:
    import trio

    from vipd import config as config_mod
    from vipd import log
    from vipd.election.runner import run_election
    from vipd.events import Fanout
    from vipd.state import RuntimeState

    log.configure(fmt="json", level="warning", node=args.node, stream=sys.stderr)
    flags: dict[str, Any] = {
        "vip.address": ["192.0.2.10"], "election.backend": args.elector_backend, "proxy.enabled": False,
        "node": args.node,
        "election.lease_duration": args.lease_duration, "election.renew_deadline": args.renew_deadline,
        "election.retry_period": args.retry_period, "shutdown_timeout": "3s", "proxy.drain_timeout": "1s",
    }
    if args.elector_backend == "kubernetes":
        from vipd.election.kube import KubeLeaseBackend as Backend
        flags.update({"election.kubernetes.kubeconfig": args.kubeconfig,
                      "election.kubernetes.namespace": args.namespace,
                      "election.kubernetes.lease_name": args.lease_name})
    else:
        from vipd.election.etcd import EtcdLeaseBackend as Backend
        flags.update({"election.etcd.endpoints": args.endpoint, "election.etcd.prefix": args.prefix})
    cfg = config_mod.load(environ={}, flags=flags)

    def emit(**fields: Any) -> None:
        print(json.dumps({"mono": time.monotonic(), "node": args.node, **fields}), flush=True)

    async def elect() -> None:
        fanout, state, gate = Fanout(), RuntimeState(node=args.node), trio.Event()
        gate.set()  # no VIP here: the lease may be released at once
        recv = fanout.subscribe(100)

        async def relay() -> None:
            async for ev in recv:
                off = time.monotonic() - trio.current_time()
                emit(leader=ev.leader, holder=ev.holder, term=ev.term, reason=ev.reason,
                     fence=None if ev.fence_until is None else ev.fence_until + off)

        async with trio.open_nursery() as n:
            n.start_soon(relay)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async with trio.open_nursery() as inner:
                    await inner.start(run_election, cfg, Backend(cfg), fanout, state, gate)
                    emit(started=True)
                    async for _ in sigs:
                        emit(stopping=True)
                        inner.cancel_scope.cancel()
                        break
            await fanout.aclose()
        emit(exited=True)

    async def main() -> None:
        if args.elector_backend == "kubernetes":
            import trio_asyncio  # kubernetes-asyncio runs on asyncio, bridged as vipd.app does

            async with trio_asyncio.open_loop():
                await elect()
        else:
            await elect()

    trio.run(main)
    return 0


class ElectorProc:
    """A child elector; a thread collects its JSON lines."""

    def __init__(self, endpoint: str, node: str, *, prefix: str = "/vipd-bench/", timing: tuple[str, str, str] = ("2s", "1.5s", "0.5s")) -> None:
        self._start(node, ["--endpoint", endpoint, "--prefix", prefix], timing)

    def _start(self, node: str, backend_args: list[str], timing: tuple[str, str, str]) -> None:
        cmd = [sys.executable, "-m", "bench.election_timing", "elector", "--node", node, *backend_args,
               "--lease-duration", timing[0], "--renew-deadline", timing[1], "--retry-period", timing[2]]
        self.node = node
        self.lines: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.killed_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.lines.append(msg)
                self.cond.notify_all()

    def wait_for(self, pred: Any, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.lines:
                    if pred(msg):
                        return msg
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def leader_events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [m for m in self.lines if "leader" in m]

    @property
    def leading(self) -> bool:
        evs = self.leader_events()
        return bool(evs) and evs[-1]["leader"] and self.killed_at is None

    def kill(self) -> None:
        self.killed_at = time.monotonic()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> float:
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class KubeElectorProc(ElectorProc):
    """A child elector on a Kubernetes Lease (kubeconfig pointing at the fake apiserver)."""

    def __init__(self, kubeconfig: str, node: str, *, lease_name: str, namespace: str = "kube-system",
                 timing: tuple[str, str, str] = ("2s", "1.5s", "0.5s")) -> None:
        self._start(node, ["--backend", "kubernetes", "--kubeconfig", kubeconfig,
                           "--namespace", namespace, "--lease-name", lease_name], timing)


def leadership_spans(procs: list[ElectorProc]) -> list[tuple[float, float, float, bool, str]]:
    """(start, end, fence at end, released, node) of every leadership, in CLOCK_MONOTONIC.
    A SIGKILLed leader's span ends at its last fence (the kernel address lifetime)."""
    spans = []
    for p in procs:
        start = fence = None
        for m in p.leader_events():
            if m["leader"] and start is None:
                start = m["mono"]
            if m.get("fence") is not None:
                fence = m["fence"]
            if not m["leader"] and start is not None:
                spans.append((start, m["mono"], fence or m["mono"], m["reason"] == "released", p.node))
                start = None
        if start is not None:
            end = max(p.killed_at, fence or 0.0) if p.killed_at else float("inf")
            spans.append((start, end, fence or end, False, p.node))
    return sorted(spans)


def assert_never_two_leaders(procs: list[ElectorProc]) -> None:
    spans = leadership_spans(procs)
    for (_s1, e1, f1, released, n1), (s2, _e2, _f2, _r2, n2) in zip(spans, spans[1:], strict=False):
        if n1 == n2:
            continue
        assert e1 <= s2, f"{n1} led until {e1:.3f}, {n2} from {s2:.3f}"
        assert released or s2 >= f1, f"{n2} took over at {s2:.3f}, before {n1}'s fence {f1:.3f}"


def first_leader(procs: list[ElectorProc], after: float, timeout: float,
                 exclude: ElectorProc | None = None) -> tuple[ElectorProc, float] | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = []
        for p in procs:
            if p is exclude:
                continue
            for m in p.leader_events():
                if m["leader"] and m["mono"] > after and m["reason"] == "acquired":
                    hits.append((m["mono"], p))
                    break
        if hits:
            t, p = min(hits, key=lambda h: h[0])
            return p, t
        time.sleep(0.01)
    return None


# -- measurement ---------------------------------------------------------------------------------

def one_run(endpoint: str, case: str, run: int, *, kubeconfig: str | None = None) -> float | None:
    """One crash/graceful run: against etcd at ``endpoint``, or the apiserver of ``kubeconfig``."""
    if kubeconfig is not None:
        lease = f"vipd-bench-{os.getpid()}-{case}-{run}"
        procs: list[ElectorProc] = [KubeElectorProc(kubeconfig, f"n{i}", lease_name=lease) for i in range(3)]
    else:
        prefix = f"/vipd-bench-{os.getpid()}-{case}-{run}/"
        procs = [ElectorProc(endpoint, f"n{i}", prefix=prefix) for i in range(3)]
    try:
        got = first_leader(procs, 0.0, 30)
        if got is None:
            return None
        leader, _ = got
        time.sleep(1.0 + random.uniform(0, 0.5))  # a few renewals; then a random phase of the renew cycle
        if case == "crash":
            leader.kill()
            t0 = leader.killed_at
        else:
            t0 = leader.terminate()
        assert t0 is not None
        nxt = first_leader(procs, t0, 10, exclude=leader)
        assert_never_two_leaders(procs)
        return None if nxt is None else nxt[1] - t0
    finally:
        for p in procs:
            p.close()


def etcd_restart_run(server: Any, endpoint: str, run: int) -> float | None:
    procs = [ElectorProc(endpoint, f"n{i}", prefix=f"/vipd-bench-{os.getpid()}-etcd-{run}/") for i in range(3)]
    try:
        if first_leader(procs, 0.0, 30) is None:
            return None
        time.sleep(1.0)
        t0 = time.monotonic()
        server.kill()
        time.sleep(1.0)
        server.start()
        nxt = first_leader(procs, t0, 15)
        assert_never_two_leaders(procs)
        return None if nxt is None else nxt[1] - t0
    finally:
        for p in procs:
            p.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.election_timing")
    sub = parser.add_subparsers(dest="cmd")
    el = sub.add_parser("elector")
    el.add_argument("--backend", dest="elector_backend", choices=("etcd", "kubernetes"), default="etcd")
    el.add_argument("--endpoint", action="append", help="etcd endpoint (required for etcd)")
    el.add_argument("--node", required=True)
    el.add_argument("--prefix", default="/vipd/")
    el.add_argument("--kubeconfig", help="kubeconfig (required for kubernetes)")
    el.add_argument("--namespace", default="kube-system")
    el.add_argument("--lease-name", default="vipd-bench-lock")
    el.add_argument("--lease-duration", default="2s")
    el.add_argument("--renew-deadline", default="1.5s")
    el.add_argument("--retry-period", default="0.5s")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--backend", choices=("etcd", "kubernetes"), default="etcd")
    args = parser.parse_args(argv)
    if args.cmd == "elector":
        if args.elector_backend == "etcd" and not args.endpoint:
            el.error("--endpoint is required with --backend etcd")
        if args.elector_backend == "kubernetes" and not args.kubeconfig:
            el.error("--kubeconfig is required with --backend kubernetes")
        return run_elector(args)

    sys.path.insert(0, REPO)
    results: dict[str, list[float]] = {"crash": [], "graceful": []}
    if args.backend == "kubernetes":
        run_kubernetes(args.runs, results)
    else:
        run_etcd(args.runs, results)
    summary = {k: {"median_ms": round(statistics.median(v) * 1000, 1), "min_ms": round(min(v) * 1000, 1),
                   "max_ms": round(max(v) * 1000, 1), "runs": len(v)} for k, v in results.items() if v}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:12s} median {v['median_ms']:7.1f} ms  (min {v['min_ms']}, max {v['max_ms']}, n={v['runs']})")
    return 0


def run_kubernetes(runs: int, results: dict[str, list[float]]) -> None:
    import tempfile
    from pathlib import Path

    from tests.kube_fixtures import FakeApiServer

    with tempfile.TemporaryDirectory(prefix="vipd-bench-kube-") as tmp, FakeApiServer(Path(tmp)) as fake:
        for run in range(runs):
            for case in ("crash", "graceful"):
                t = one_run("", case, run, kubeconfig=fake.kubeconfig)
                if t is not None:
                    results[case].append(t)
                    print(f"run {run} {case:12s} new leader after {t * 1000:7.1f} ms", file=sys.stderr)


def run_etcd(runs: int, results: dict[str, list[float]]) -> None:
    from tests.etcd_fixtures import EtcdServer

    results["etcd_restart"] = []
    with EtcdServer(name="vipd-bench") as server:
        for run in range(runs):
            for case in ("crash", "graceful"):
                t = one_run(server.url, case, run)
                if t is not None:
                    results[case].append(t)
                    print(f"run {run} {case:12s} new leader after {t * 1000:7.1f} ms", file=sys.stderr)
            t = etcd_restart_run(server, server.url, run)
            if t is not None:
                results["etcd_restart"].append(t)
                print(f"run {run} {'etcd_restart':12s} new leader after {t * 1000:7.1f} ms", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
