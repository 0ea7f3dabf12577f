"""One lab: network, etcd, apiserver stand-ins, the daemons, observers; and its clean-up.

Owns: the lab's life cycle (``Lab.up`` / ``Lab.down``), its directory (logs, TLS, configs,
etcd data), the state file under /run/vipd-lab/ that lets ``vipd lab down`` clean up a lab
whose owner was killed, turning SIGTERM/SIGHUP into an orderly clean-up while the lab runs
(and holding off SIGINT/SIGTERM/SIGHUP while the clean-up itself runs, so a second Ctrl-C
cannot cut it short), keeping the logs when something failed (``save_logs``), and the
queries the scenarios need ("who leads", "ask the VIP as a client").

Must never: leave anything behind on any exit path: ``down`` kills every process still in the
lab's namespaces (only those: the namespaces are the lab's own), deletes the namespaces and
removes the directory, and is safe to call twice. Logs are copied out before, never lost
with the directory when the lab failed.
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
from typing import TYPE_CHECKING

from vipd.lab import apiserver
from vipd.lab.daemons import BACKEND_PORT, PROXY_PORT, VIPD, Fleet, KeepalivedFleet, VipdFleet
from vipd.lab.etcd import EtcdServer, etcd_binary
from vipd.lab.net import ETCD_IP, NODE_IPS, SUBNET, VIP, LabNet
from vipd.lab.nsutil import LabError, namespaces, ns_run, run
from vipd.lab.observe import ClientProbe, HolderSampler
from vipd.lab.procs import LabProcess, stop_all, wait_until

if TYPE_CHECKING:
    from vipd.lab.bounds import Bounds

STATE_DIR = Path("/run/vipd-lab")
PREFIX_STEM = "vl"
# Where a failed lab's logs are kept (override with VIPD_LAB_LOGS); one directory per lab.
LOGS_HOME = Path("/var/tmp/vipd-lab-logs")
KEPT = ("*.log", "*.conf")  # what save_logs copies (never TLS keys or etcd data)
HELD_OFF = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def logs_home() -> Path:
    return Path(os.environ.get("VIPD_LAB_LOGS") or LOGS_HOME)


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
                 vipd: tuple[str, ...] = VIPD, proxy: bool = True, progress=None,
                 keep_logs: Path | None = None):
        """``vipd``: the program run as vipd on the nodes (``sys.executable -m vipd``; tests put
        a deliberately broken one here); ``keep_logs``: copy the logs there on ``down``."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        if kind not in ("vipd", "keepalived", "none"):
            raise LabError(f"unknown daemon kind {kind!r}")
        if kind == "vipd":
            etcd_binary()  # fails (naming the package) before anything is made
        self.kind = kind
        self.prefix = prefix or new_prefix()
        self.net = LabNet(self.prefix)
        self.progress = progress or (lambda msg: None)
        self.node_ns = {n: self.net.ns(n) for n in self.net.nodes}
        self.standins: dict[str, LabProcess] = {}
        self.etcd: EtcdServer | None = None
        self.fleet: Fleet | None = None
        self.sampler: HolderSampler | None = None
        self.vip = VIP
        self.keep_logs = keep_logs
        self.failed = False  # set by whoever judged the lab; down() then keeps the logs
        self.saved_logs: Path | None = None
        self._old_handlers: dict[int, object] = {}
        self._down = False
        self.dir = Path(tempfile.mkdtemp(prefix=f"vipd-lab-{self.prefix}-"))  # last, and undone on error
        try:
            if kind == "vipd":
                self.etcd = EtcdServer(self.net.ns("etcd"), ETCD_IP, self.dir)
                self.fleet = VipdFleet(self.node_ns, self.dir, self.etcd.url, proxy=proxy, extra=vipd_extra,
                                       vipd=vipd)
            elif kind == "keepalived":
                self.fleet = KeepalivedFleet(self.node_ns, self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    # --- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self._trap_signals()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.failed = True
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
        if self.etcd is not None:
            self.progress(f"etcd at {self.etcd.url}")
            self.etcd.start()
        for node in self.node_ns:
            if not wait_until(lambda n=node: self.standin_answers(n), 15, 0.1):
                raise LabError(f"apiserver stand-in on {node} does not answer; see {self.standins[node].log_path}")
        self.sampler = HolderSampler(self.node_ns, VIP, self.net.switch, self.dir / "watch.log").start()
        self._write_state()
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
        """Remove everything; returns what could not be removed (empty when clean).

        SIGINT, SIGTERM and SIGHUP are held off until it is done (noted, not acted on): the
        clean-up runs to the end however often Ctrl-C is pressed. The daemons stop together;
        then the logs are kept if the lab failed or ``keep_logs`` asks for them.
        """
        if self._down:
            return []
        self._down = True
        held = self._hold_off_signals()
        self.progress(f"cleaning up lab {self.prefix}")
        try:
            try:
                if self.sampler:
                    with contextlib.suppress(LabError):
                        self.sampler.stop()
                if self.fleet:
                    self.fleet.stop_all()
                stop_all([*self.standins.values(), *([self.etcd.process] if self.etcd else [])], 2)
            finally:
                if self.failed or self.keep_logs:
                    with contextlib.suppress(OSError):
                        self.save_logs(self.keep_logs)
                        self.progress(f"logs kept in {self.saved_logs}")
                left = teardown(self.prefix, self.dir)
        finally:
            for sig, handler in {**held, **self._old_handlers}.items():
                signal.signal(sig, handler)
        return left

    def _hold_off_signals(self) -> dict[int, object]:
        """Replace the handlers of HELD_OFF by one that only notes the signal; returns the old."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum, frame):
            self.progress(f"signal {signum} while cleaning up: finishing the clean-up first")

        return {sig: signal.signal(sig, note) for sig in HELD_OFF}

    def save_logs(self, dest: Path | None = None) -> Path:
        """Copy the lab's logs (and daemon configs) to ``dest`` (default: one directory per lab
        under ``logs_home()``), overwriting an earlier copy; returns where."""
        dest = dest or logs_home() / f"vipd-lab-{self.prefix}"
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in KEPT:
            for path in self.dir.glob(pattern):
                shutil.copy(path, dest / path.name)
        self.saved_logs = dest
        return dest

    def bounds(self) -> Bounds:
        """The bounds for this lab's vipd nodes, from the flags they actually run with."""
        from vipd.lab.bounds import Bounds

        if isinstance(self.fleet, VipdFleet):
            return Bounds.for_vipd_args(self.fleet.args(next(iter(self.node_ns))))
        return Bounds.defaults()

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pids = [p.pid for p in self.standins.values() if p.pid]
        if self.fleet:
            pids += list(self.fleet.pids().values())
        if self.etcd is not None and self.etcd.process.pid:
            pids.append(self.etcd.process.pid)
        if self.sampler is not None and self.sampler.pid:
            pids.append(self.sampler.pid)
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
        if self.etcd is not None:
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
