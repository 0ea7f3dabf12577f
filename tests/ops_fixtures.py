"""Shared helpers for the operations tests (status endpoint, sd_notify, manifests, packaging).

Fakes here are named as fakes: ``fake_task`` stands in for a data-plane task in supervisor
tests, ``NotifySocket`` stands in for systemd's notify socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from vipd import config as config_mod
from vipd.config import Config, StatusConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def scratch_netns() -> Iterator[str]:
    """A network namespace of the test's own (``vops-<random>``, loopback up), always deleted."""
    name = f"vops-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30, check=False)


def make_config(*, listen: str = "127.0.0.1:0", **flags: Any) -> Config:
    """A valid Config for a single node (election none, no proxy) with a status listener.

    ``listen`` may use port 0 (the loader only accepts real ports, so it is set afterwards).
    """
    base = {"vip.address": ["192.0.2.10"], "election.backend": "none", "proxy.enabled": False,
            "node": "node-a", "shutdown_timeout": "3s", "proxy.drain_timeout": "1s"}
    base.update(flags)
    cfg = config_mod.load(environ={}, flags=base)
    return cfg.replace(status=StatusConfig(listen=listen))


class StartedBox:
    """Wraps a task so the test learns the value it passed to ``task_status.started``."""

    def __init__(self) -> None:
        self.value: Any = None
        self.event = trio.Event()

    def wrap(self, task: Any) -> Any:
        box = self

        async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            class _Status:
                def started(self, value: Any = None) -> None:
                    box.value = value
                    box.event.set()
                    task_status.started(value)

            await task(task_status=_Status())

        return run


def fake_task(gate: trio.Event | None = None, hold_on_cancel: trio.Event | None = None,
              on_started: Any = None) -> Any:
    """FAKE data-plane task: reports started once ``gate`` is set (calling ``on_started()``
    first); on cancellation it waits (shielded) for ``hold_on_cancel`` so a test can look at
    the daemon while it stops."""

    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if gate is not None:
            await gate.wait()
        if on_started is not None:
            on_started()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            if hold_on_cancel is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await hold_on_cancel.wait()

    return run


class NotifySocket:
    """FAKE systemd notify socket: a bound AF_UNIX datagram socket that collects messages."""

    def __init__(self, abstract: bool = False):
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"vipd-test-notify-{os.getpid()}-{id(self)}"
            self._addr: str = "\0" + name
            self.env_value = "@" + name
            self._dir = None
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="vipd-notify-")
            self._addr = os.path.join(self._dir.name, "notify.sock")
            self.env_value = self._addr
        self.sock._sock.bind(self._addr)  # binding a unix path does no I/O worth awaiting
        self.messages: list[dict[str, str]] = []

    async def receive(self) -> dict[str, str]:
        data = await self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    async def wait_for(self, key: str, value: str | None = None) -> dict[str, str]:
        while True:
            msg = await self.receive()
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            self._dir.cleanup()


@contextmanager
def notify_socket(abstract: bool = False) -> Iterator[NotifySocket]:
    ns = NotifySocket(abstract)
    try:
        yield ns
    finally:
        ns.close()


async def http_raw(port: int, payload: bytes, *, host: str = "127.0.0.1", read_limit: int = 1 << 20) -> bytes:
    """Send raw bytes to the status endpoint and read until it closes (tests of garbage input)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        if payload:
            await stream.send_all(payload)
        chunks = []
        total = 0
        while total < read_limit:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)
    finally:
        await stream.aclose()


def status_code(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
