"""A real etcd server for tests: started on free loopback ports with a temporary data dir,
killed and removed afterwards, with helpers to stop, kill and restart it.

Use the ``etcd_server`` fixture (one server per test module), or ``EtcdServer`` directly
(``with EtcdServer() as etcd: ...``). Other areas (the lab) may reuse it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One single-member etcd cluster on 127.0.0.1. ``url`` is its client URL."""

    def __init__(self, name: str = "vipd-test", extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.extra_args = extra_args
        self.data_dir = tempfile.mkdtemp(prefix="vipd-etcd-")
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    def start(self, timeout: float = 20.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--logger", "zap", "--log-level", "warn",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd not ready within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients."""
        self._end(signal.SIGKILL)

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) and start again on the same ports with the same data."""
        self.kill() if kill else self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
