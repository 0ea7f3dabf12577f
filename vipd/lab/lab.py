"""One lab: network, etcd, apiserver stand-ins, the daemons, observers; and its clean-up.

Owns: the lab's life cycle (``Lab.up`` / ``Lab.down``), its directory (logs, TLS, configs,
etcd data), the state file under /run/vipd-lab/ that lets ``vipd lab down`` clean up a lab
whose owner was killed, turning SIGTERM/SIGHUP into an orderly clean-up while the lab runs,
and the queries the scenarios need ("who leads", "ask the VIP as a client").

Must never: leave anything behind on any exit path: ``down`` kills every process still in the
lab's namespaces (only those: the namespaces are the lab's own), deletes the namespaces and
removes the directory, and is safe to call twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vipd.lab import apiserver
from vipd.lab.daemons import BACKEND_PORT, PROXY_PORT, Fleet, KeepalivedFleet, VipdFleet
from vipd.lab.etcd import EtcdServer
from vipd.lab.net import ETCD_IP, NODE_IPS, SUBNET, VIP, LabNet
from vipd.lab.nsutil import LabError, namespaces, ns_run, run
from vipd.lab.observe import ClientProbe, HolderSampler
from vipd.lab.procs import LabProcess, wait_until

STATE_DIR = Path("/run/vipd-lab")
PREFIX_STEM = "vl"


def new_prefix() -> str:
    taken = {ns.split("-")[0] for ns in namespaces()}
    while True:
        prefix = PREFIX_STEM + secrets.token_hex(2)
        if prefix not in taken:
            return prefix


@dataclass
class Answer:
    ok: bool
    node: str | None  # which stand-in answered
    detail: str


class Lab:
    """``with Lab(kind="vipd") as lab:`` builds everything; leaving the block removes it."""

    def __init__(self, kind: str = "vipd", *, prefix: str | None = None, vipd_extra: tuple[str, ...] = (),
                 proxy: bool = True, progress=None):
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        if kind not in ("vipd", "keepalived", "none"):
            raise LabError(f"unknown daemon kind {kind!r}")
        self.kind = kind
        self.prefix = prefix or new_prefix()
        self.net = LabNet(self.prefix)
        self.dir = Path(tempfile.mkdtemp(prefix=f"vipd-lab-{self.prefix}-"))
        self.progress = progress or (lambda msg: None)
        self.node_ns = {n: self.net.ns(n) for n in self.net.nodes}
        self.etcd = EtcdServer(self.net.ns("etcd"), ETCD_IP, self.dir)
        self.standins: dict[str, LabProcess] = {}
        self.fleet: Fleet | None = None
        if kind == "vipd":
            self.fleet = VipdFleet(self.node_ns, self.dir, self.etcd.url, proxy=proxy, extra=vipd_extra)
        elif kind == "keepalived":
            self.fleet = KeepalivedFleet(self.node_ns, self.dir)
        self.sampler: HolderSampler | None = None
        self.vip = VIP
        self._old_handlers: dict[int, object] = {}
        self._down = False

    # --- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self._trap_signals()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _trap_signals(self) -> None:
        """SIGTERM/SIGHUP become KeyboardInterrupt so every ``finally`` runs (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, interrupt)

    def up(self) -> None:
        self._write_state()
        self.progress(f"lab {self.prefix}: network (switch, {', '.join(self.net.nodes)}, etcd, client) "
                      f"on {SUBNET}, VIP {VIP}")
        self.net.up()
        self._write_state()
        _, cert, key = apiserver.write_tls(self.dir, [*NODE_IPS.values(), VIP])
        for node in self.node_ns:
            self.start_standin(node, cert, key)
        if self.kind == "vipd":
            self.progress(f"etcd at {self.etcd.url}")
            self.etcd.start()
        for node in self.node_ns:
            if not wait_until(lambda n=node: self.standin_answers(n), 15, 0.1):
                raise LabError(f"apiserver stand-in on {node} does not answer; see {self.standins[node].log_path}")
        self.sampler = HolderSampler(self.node_ns, VIP).start()
        if self.fleet:
            self.progress(f"starting {self.kind} on {', '.join(self.node_ns)}; logs: {self.dir}/{self.kind}-n*.log")
            self.fleet.start_all()
            self._write_state()

    def start_standin(self, node: str, cert: Path | None = None, key: Path | None = None) -> None:
        cert = cert or self.dir / "apiserver.pem"
        key = key or self.dir / "apiserver-key.pem"
        cmd = [sys.executable, "-m", "vipd.lab.apiserver", "--node", node, "--cert", str(cert),
               "--key", str(key), "--listen", f"0.0.0.0:{BACKEND_PORT}"]
        self.standins[node] = LabProcess(f"apiserver stand-in {node}", self.node_ns[node], cmd,
                                         self.dir / f"apiserver-{node}.log").start()
        self._write_state()

    def down(self) -> list[str]:
        """Remove everything; returns what could not be removed (empty when clean)."""
        if self._down:
            return []
        self._down = True
        if self.sampler:
            with contextlib.suppress(LabError):
                self.sampler.stop()
        if self.fleet:
            self.fleet.stop_all()
        for p in self.standins.values():
            p.stop(2)
        self.etcd.stop()
        left = teardown(self.prefix, self.dir)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        return left

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pids = [p.pid for p in self.standins.values() if p.pid]
        if self.fleet:
            pids += list(self.fleet.pids().values())
        if self.etcd.process.pid:
            pids.append(self.etcd.process.pid)
        state = {"prefix": self.prefix, "dir": str(self.dir), "kind": self.kind, "owner": os.getpid(),
                 "namespaces": self.net.all_namespaces(), "pids": pids, "vip": VIP,
                 "nodes": self.node_ns, "created": time.time()}
        (STATE_DIR / f"{self.prefix}.json").write_text(json.dumps(state, indent=1))

    # --- queries ------------------------------------------------------------------------------

    def holders(self) -> tuple[str, ...]:
        assert self.sampler is not None
        return self.sampler.current()

    def wait_single_holder(self, timeout: float, exclude: tuple[str, ...] = ()) -> str | None:
        """Wait for exactly one holder (not in ``exclude``); returns it, or None on timeout."""
        assert self.sampler is not None
        s = self.sampler.wait_for(lambda h: len(h) == 1 and h[0] not in exclude, timeout)
        return s.holders[0] if s else None

    def standin_answers(self, node: str) -> bool:
        ans = self.client_get(f"https://{NODE_IPS[node]}:{BACKEND_PORT}/readyz", timeout=2)
        return ans.ok and ans.node == node

    def client_get(self, url: str, timeout: float = 3.0) -> Answer:
        """HTTPS GET from the client namespace (curl), TLS verified against the lab CA."""
        proc = ns_run(self.net.ns("cl"), ["curl", "-s", "--cacert", str(self.dir / "ca.pem"),
                                          "--max-time", str(timeout), "-w", "\n%{http_code}", url], check=False)
        body, _, code = proc.stdout.rpartition("\n")
        if proc.returncode != 0 or code != "200":
            return Answer(False, None, f"curl exit {proc.returncode}, http {code or '-'}")
        words = body.split()
        return Answer(True, words[1] if len(words) > 1 else None, body.strip())

    def client_via_vip(self, timeout: float = 3.0) -> Answer:
        """What a client gets from https://VIP:6443/readyz (the proxy path)."""
        return self.client_get(f"https://{VIP}:{PROXY_PORT}/readyz", timeout)

    def probe(self, port: int) -> ClientProbe:
        return ClientProbe(self.net.ns("cl"), VIP, port).start()

    def logs(self) -> dict[str, Path]:
        out = {}
        if self.fleet:
            out.update({f"{self.kind} {n}": self.fleet.log_path(n) for n in self.node_ns})
        out["etcd"] = self.etcd.process.log_path
        return out


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL every process in one of the lab's own namespaces (they can only be the lab's)."""
    proc = run(["ip", "netns", "pids", ns], check=False)
    for word in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


def teardown(prefix: str, directory: Path | None) -> list[str]:
    """Kill what runs in the lab's namespaces, delete them, remove the directory and state file."""
    if not prefix.startswith(PREFIX_STEM) or "-" in prefix:
        raise LabError(f"{prefix!r} is not a lab prefix")
    mine = [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    for _ in range(3):
        for ns in mine:
            _kill_namespace_pids(ns)
        if not any(run(["ip", "netns", "pids", ns], check=False).stdout.strip() for ns in mine):
            break
        time.sleep(0.2)
    for ns in mine:
        run(["ip", "netns", "del", ns], check=False)
    if directory and directory.name.startswith(f"vipd-lab-{prefix}-"):
        shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{prefix}.json").unlink()
    return [ns for ns in namespaces() if ns.startswith(prefix + "-")]


def recorded_labs() -> list[dict]:
    out = []
    for path in sorted(STATE_DIR.glob(f"{PREFIX_STEM}*.json")) if STATE_DIR.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            out.append({"prefix": path.stem, "dir": None})
    return out


def teardown_recorded(prefix: str | None = None) -> list[str]:
    """``vipd lab down``: remove every recorded lab (or one); returns leftovers."""
    left: list[str] = []
    for state in recorded_labs():
        if prefix and state.get("prefix") != prefix:
            continue
        directory = Path(state["dir"]) if state.get("dir") else None
        left += teardown(state["prefix"], directory)
    return left
