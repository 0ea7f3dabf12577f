"""A real etcd server (Debian ``etcd-server``) in its own lab namespace: the lease backend.

Owns: the etcd command line (single member, data in the lab directory, fast raft timing so
short lease TTLs behave), starting it, waiting until it answers ``/health``, and stopping /
restarting it with the same data (the "etcd down longer than the lease" scenario).

Must never: listen outside its namespace, or use a data directory outside the lab's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vipd.lab.nsutil import LabError, ns_run
from vipd.lab.procs import LabProcess, wait_until

PORT = 2379


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if not path:
        raise LabError("etcd not found: install the Debian package etcd-server")
    return path


class EtcdServer:
    def __init__(self, ns: str, ip: str, directory: Path):
        self.ns, self.ip, self.directory = ns, ip, directory
        self.url = f"http://{ip}:{PORT}"
        cmd = [
            etcd_binary(), "--name", "lab", "--data-dir", str(directory / "etcd-data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
            "--initial-cluster", f"lab=http://{ip}:2380", "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn",
        ]
        self.process = LabProcess("etcd", ns, cmd, directory / "etcd.log")

    def start(self, timeout: float = 20.0) -> None:
        self.process.start()
        if not wait_until(self.healthy, timeout, 0.1):
            self.process.stop()
            raise LabError(f"etcd did not become healthy in {timeout:.0f}s; see {self.process.log_path}")

    def healthy(self) -> bool:
        if not self.process.running:
            raise LabError(f"etcd exited ({self.process.proc.returncode}); see {self.process.log_path}")
        proc = ns_run(self.ns, ["curl", "-s", "--max-time", "1", f"{self.url}/health"], check=False)
        try:
            return proc.returncode == 0 and json.loads(proc.stdout).get("health") == "true"
        except ValueError:
            return False

    def stop(self) -> None:
        self.process.stop()

    def get_prefix(self, prefix: str) -> dict:
        """The keys under ``prefix`` (for status and debugging), via the JSON gateway."""
        import base64

        key = base64.b64encode(prefix.encode()).decode()
        end = base64.b64encode(prefix[:-1].encode() + bytes([prefix.encode()[-1] + 1])).decode()
        body = json.dumps({"key": key, "range_end": end}).encode()
        proc = ns_run(self.ns, ["curl", "-s", "--max-time", "1", "-X", "POST", "-d", body.decode(),
                                f"{self.url}/v3/kv/range"], check=False)
        try:
            kvs = json.loads(proc.stdout).get("kvs", [])
        except ValueError:
            return {}
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode() for kv in kvs}
