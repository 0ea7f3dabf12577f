"""The daemons under test, one per node namespace: vipd, or keepalived for comparison.

Owns: each daemon's command line (``vipd start`` with the lab's VIP, etcd and the three
apiserver stand-ins as backends; keepalived with VRRP ``advert_int 1`` and otherwise its
defaults; the program that runs as vipd is a parameter, so a test can put a deliberately broken
vipd in its place), starting and stopping them per node (all at once on clean-up), and the check of which vipd pieces this
build still lacks (so the suite can say exactly why it skips).

Must never: hide a daemon's failure: a daemon that exits on its own is reported with its
log path.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vipd.lab.net import IFACE, NODE_IPS, VIP
from vipd.lab.procs import LabProcess, stop_all

PROXY_PORT = 6443
BACKEND_PORT = 6444
STOP_GRACE = 12.0  # clean-up: vipd's graceful stop (shutdown timeout) plus margin, then SIGKILL
VIPD = (sys.executable, "-m", "vipd")  # how the lab runs vipd (tests run a broken one instead)
ETCD_PREFIX = "/vipd-lab/"


def vipd_args(node: str, etcd_url: str, *, proxy: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """The arguments of ``vipd`` on one lab node (``start`` and its flags)."""
    args = ["start", "--node", node, "--address", VIP, "--interface", IFACE, "--election", "etcd",
            "--etcd-endpoint", etcd_url, "--etcd-prefix", ETCD_PREFIX, "--log-format", "json",
            "--status-listen", "127.0.0.1:2112"]
    if proxy:
        args += ["--proxy", "--lb-port", str(PROXY_PORT), "--health-check", "https"]
        for ip in NODE_IPS.values():
            args += ["--backend", f"{ip}:{BACKEND_PORT}"]
    else:
        args += ["--no-proxy"]
    return args + list(extra)


def missing_vipd_pieces() -> list[str]:
    """The pieces the vipd scenarios need that this build does not have yet."""
    missing = []
    if importlib.util.find_spec("vipd.election.etcd") is None:
        missing.append("etcd election (vipd/election/etcd.py)")
    import vipd.netlink

    if "placeholder" in (vipd.netlink.__doc__ or ""):
        missing.append("VIP address task (vipd/netlink.py)")
    if importlib.util.find_spec("vipd.proxy.pump") is None:
        missing.append("splice proxy (vipd/proxy/)")
    return missing


class Fleet:
    """One daemon per node; subclasses say how to start one."""

    kind = "?"

    def __init__(self, nodes: dict[str, str], directory: Path):
        self.nodes = nodes  # node → namespace
        self.directory = directory
        self.procs: dict[str, LabProcess] = {}

    def command(self, node: str) -> list[str]:
        raise NotImplementedError

    def log_path(self, node: str) -> Path:
        return self.directory / f"{self.kind}-{node}.log"

    def start(self, node: str) -> LabProcess:
        p = LabProcess(f"{self.kind} {node}", self.nodes[node], self.command(node), self.log_path(node))
        self.procs[node] = p.start()
        return p

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)

    def running(self, node: str) -> bool:
        p = self.procs.get(node)
        return p is not None and p.running

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Deliver ``sig``; KILL, STOP and CONT go to every process of the daemon (its group)."""
        self.procs[node].signal(sig, group=sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT))

    def wait_exit(self, node: str, timeout: float) -> int | None:
        return self.procs[node].wait(timeout)

    def stop(self, node: str, grace: float = STOP_GRACE) -> None:
        if node in self.procs:
            self.procs[node].stop(grace)

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """Every node at once (SIGTERM to all, one shared grace period)."""
        stop_all(self.procs.values(), grace)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.pid is not None and p.running}


class VipdFleet(Fleet):
    kind = "vipd"

    def __init__(self, nodes: dict[str, str], directory: Path, etcd_url: str, *, proxy: bool = True,
                 extra: Sequence[str] = (), vipd: Sequence[str] = VIPD):
        super().__init__(nodes, directory)
        self.etcd_url, self.proxy, self.extra, self.vipd = etcd_url, proxy, tuple(extra), tuple(vipd)

    def args(self, node: str) -> list[str]:
        return vipd_args(node, self.etcd_url, proxy=self.proxy, extra=self.extra)

    def command(self, node: str) -> list[str]:
        return [*self.vipd, *self.args(node)]


KEEPALIVED_PRIORITY = {"n1": 150, "n2": 100, "n3": 50}


class KeepalivedFleet(Fleet):
    kind = "keepalived"

    def config_path(self, node: str) -> Path:
        return self.directory / f"keepalived-{node}.conf"

    def command(self, node: str) -> list[str]:
        conf = self.config_path(node)
        conf.write_text(render_keepalived(node))
        base = self.directory / f"keepalived-{node}"
        return ["keepalived", "--dont-fork", "--log-console", "--vrrp", "-f", str(conf),
                "-p", f"{base}.pid", "-r", f"{base}-vrrp.pid", "-c", f"{base}-checkers.pid"]


def render_keepalived(node: str) -> str:
    """VRRP at ``advert_int 1``; everything else keepalived's defaults (preempt on)."""
    return f"""# vipd lab: keepalived for comparison (node {node})
global_defs {{
    router_id {node}
}}
vrrp_instance lab {{
    state BACKUP
    interface {IFACE}
    virtual_router_id 51
    priority {KEEPALIVED_PRIORITY[node]}
    advert_int 1
    virtual_ipaddress {{
        {VIP}/32 dev {IFACE}
    }}
}}
"""
