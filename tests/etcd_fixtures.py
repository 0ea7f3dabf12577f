"""A real etcd server for tests: started on free loopback ports with a temporary data dir,
killed and removed afterwards, with helpers to stop, kill and restart it; and a TCP relay to put
in front of it as a faulty endpoint.

Use the ``etcd_server`` fixture (one server per test module), ``etcd_tls_server`` (HTTPS with
client certificates, as kubeadm's stacked etcd: ``--client-cert-auth``, CA/cert/key made with
trustme), or ``EtcdServer`` directly (``with EtcdServer() as etcd: ...``). Other areas (the
lab) may reuse it. ``TcpRelay`` forwards to a port and can hang or die on demand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trustme

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One single-member etcd cluster on 127.0.0.1. ``url`` is its client URL.

    ``tls=True``: clients must speak HTTPS and present a certificate signed by the test CA
    (``--client-cert-auth``); ``ca``, ``client_cert`` and ``client_key`` are the PEM paths a
    client needs (kubeadm's /etc/kubernetes/pki/etcd/ca.crt, healthcheck-client.crt/.key).
    """

    def __init__(self, name: str = "vipd-test", extra_args: tuple[str, ...] = (), *, tls: bool = False) -> None:
        self.name = name
        self.extra_args = extra_args
        self.data_dir = tempfile.mkdtemp(prefix="vipd-etcd-")
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        self.tls_args: tuple[str, ...] = ()
        self.ca = self.client_cert = self.client_key = None
        if tls:
            self._make_certs()

    def _make_certs(self) -> None:
        ca = trustme.CA()
        server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("vipd-test-client")
        path = lambda name: os.path.join(self.data_dir, name)  # noqa: E731
        ca.cert_pem.write_to_path(path("ca.crt"))
        server.cert_chain_pems[0].write_to_path(path("server.crt"))
        server.private_key_pem.write_to_path(path("server.key"))
        client.cert_chain_pems[0].write_to_path(path("client.crt"))
        client.private_key_pem.write_to_path(path("client.key"))
        self.ca, self.client_cert, self.client_key = path("ca.crt"), path("client.crt"), path("client.key")
        self.tls_args = ("--cert-file", path("server.crt"), "--key-file", path("server.key"),
                         "--client-cert-auth", "--trusted-ca-file", self.ca)

    def start(self, timeout: float = 20.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--logger", "zap", "--log-level", "warn",
            *self.tls_args, *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        ctx = None
        if self.ca:
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.load_cert_chain(self.client_cert, self.client_key)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1, context=ctx) as resp:
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


@pytest.fixture(scope="module")
def etcd_tls_server() -> Iterator[EtcdServer]:
    server = EtcdServer(name="vipd-test-tls", tls=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


class TcpRelay:
    """A TCP relay on 127.0.0.1 in front of ``target_port``: a faulty endpoint on demand.

    ``hang()``: every connection, open or new, stays open and nothing more is forwarded (an
    endpoint that accepts and never answers). ``die()``: every connection is closed and the
    listener with it (connection refused from then on). Run it in a nursery:
    ``await nursery.start(relay.run)``; ``url`` is then its http URL.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self._scope = trio.CancelScope()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hang(self) -> None:
        self._flowing = trio.Event()

    def die(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, both: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side closed: close the other
