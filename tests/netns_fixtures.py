"""Network-namespace test bed for the VIP-on-the-wire tests, and the helpers to drive it.

Topology (every name starts with a per-run prefix "vw<random>", all removed in teardown):

    ns <p>s (switch): bridge br0, ports pa pb pc
    ns <p>a (node A):  d0 (veth to pa)  10.77.0.1/24  fd77::1/64
    ns <p>b (node B):  d0 (veth to pb)  10.77.0.2/24  fd77::2/64
    ns <p>c (client):  c0 (veth to pc)  10.77.0.100/24 fd77::100/64

Nodes run vipd's address task + announcer in a subprocess under ``ip netns exec`` (see
tests/wire_driver.py); the test process reaches into a namespace only to create sockets (a
short-lived thread calls setns(2), creates the socket, exits: the socket stays in that
namespace, the test's threads never change namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "wire_driver.py"
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # Linux; all times in these tests are time.time() (kernel frame stamps)

VIP4 = "10.77.0.50"
VIP6 = "fd77::50"
NODE_IP = {"a": ("10.77.0.1", "fd77::1"), "b": ("10.77.0.2", "fd77::2"), "c": ("10.77.0.100", "fd77::100")}


def ip(*args: str, check: bool = True, input: str | None = None) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


@dataclass
class Bed:
    prefix: str
    ns: dict[str, str]  # role (s, a, b, c) → namespace name
    mac: dict[str, str] = field(default_factory=dict)  # a, b, c → MAC of d0 / c0

    def ifname(self, role: str) -> str:
        return "c0" if role == "c" else "d0"

    def addrs(self, role: str) -> list[dict[str, Any]]:
        data = json.loads(ip("-n", self.ns[role], "-j", "addr", "show", "dev", self.ifname(role)))
        return data[0]["addr_info"] if data else []

    def has(self, role: str, address: str) -> bool:
        return any(a["local"] == address for a in self.addrs(role))

    def neigh(self, address: str) -> tuple[str | None, str | None]:
        """The client's neighbour entry for ``address``: (lladdr, state)."""
        data = json.loads(ip("-n", self.ns["c"], "-j", "neigh", "show", address, "dev", "c0") or "[]")
        if not data:
            return None, None
        return data[0].get("lladdr"), (data[0].get("state") or [None])[0]


@contextlib.contextmanager
def build_bed() -> Iterator[Bed]:
    prefix = "vw" + secrets.token_hex(3)
    bed = Bed(prefix, {r: f"{prefix}{r}" for r in "sabc"})
    try:
        for name in bed.ns.values():
            ip("netns", "add", name)
        s = bed.ns["s"]
        ip("-n", s, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0")
        ip("-n", s, "link", "set", "br0", "up")
        for role in "abc":
            port, inner, ns = f"p{role}", bed.ifname(role), bed.ns[role]
            ip("-n", s, "link", "add", port, "type", "veth", "peer", "name", inner, "netns", ns)
            ip("-n", s, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", inner, "up")
            v4, v6 = NODE_IP[role]
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", inner)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", inner, "nodad")
            info = json.loads(ip("-n", ns, "-j", "link", "show", inner))
            bed.mac[role] = info[0]["address"]
        yield bed
    finally:
        for name in bed.ns.values():
            ip("netns", "del", name, check=False)


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a fresh thread that first joins network namespace ``ns``."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join(10)
    if "error" in result:
        raise result["error"]
    return result["value"]


def ns_socket(ns: str, family: int, kind: int, proto: int = 0, bind: Any = None) -> trio.socket.SocketType:
    """A trio socket created (and optionally bound) inside namespace ``ns``."""

    def make() -> socket.socket:
        sock = socket.socket(family, kind, proto)
        if family == socket.AF_INET6 and kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if bind is not None:
            sock.bind(bind)
        return sock

    return trio.socket.from_stdlib_socket(in_netns(ns, make))


async def wait_until(pred: Callable[[], Any], limit: float, interval: float = 0.01) -> Any:
    """Poll a condition that has no event to await (kernel tables via ``ip``); bounded."""
    with trio.fail_after(limit):
        while True:
            value = pred()
            if value:
                return value
            await trio.sleep(interval)


@dataclass
class Frame:
    t: float  # time.time() when the client's kernel received / sent it
    outgoing: bool
    data: bytes

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.data[12:14], "big")

    @property
    def src_mac(self) -> str:
        return ":".join(f"{b:02x}" for b in self.data[6:12])

    def arp(self) -> tuple[int, str, str, str, str] | None:
        """(op, sender MAC, sender IP, target MAC, target IP) or None."""
        if self.ethertype != 0x0806:
            return None
        d = self.data[14:]
        mac = lambda b: ":".join(f"{x:02x}" for x in b)  # noqa: E731
        return (int.from_bytes(d[6:8], "big"), mac(d[8:14]), socket.inet_ntoa(d[14:18]), mac(d[18:24]),
                socket.inet_ntoa(d[24:28]))

    def icmp6(self) -> tuple[int, bytes] | None:
        """(ICMPv6 type, raw IPv6 packet) or None."""
        if self.ethertype != 0x86DD or self.data[20] != 58:
            return None
        return self.data[54], self.data[14:]


class Capture:
    """Every frame seen on one interface (default: the client's c0), incoming and outgoing,
    timestamped by the kernel (arrival, or for outgoing frames the moment they were sent)."""

    def __init__(self, bed: Bed, role: str = "c") -> None:
        self.sock = ns_socket(bed.ns[role], socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL),
                              bind=(bed.ifname(role), ETH_P_ALL))
        # The kernel stamps each frame on arrival: our loop may be busy when it comes in.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.frames: list[Frame] = []
        self._changed = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self.sock:
            while True:
                data, anc, _flags, addr = await self.sock.recvmsg(65535, 256)
                stamp = time.time()
                for level, kind, value in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        stamp = sec + nsec / 1e9
                self.frames.append(Frame(stamp, addr[2] == PACKET_OUTGOING, data))
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, pred: Callable[[Frame], bool], since: float = 0.0, limit: float = 5.0) -> Frame:
        with trio.fail_after(limit):
            while True:
                for f in self.frames:
                    if f.t >= since and pred(f):
                        return f
                await self._changed.wait()


class Driver:
    """One node's address task + announcer, in a subprocess inside the node's namespace."""

    def __init__(self, bed: Bed, role: str, addresses: list[str], refresh: str = "3s",
                 interface: str | None = "d0", event_rcvbuf: int | None = None) -> None:
        self.bed, self.role = bed, role
        cmd = ["ip", "netns", "exec", bed.ns[role], sys.executable, str(DRIVER), "--node", role,
               "--refresh", refresh]
        for a in addresses:
            cmd += ["--address", a]
        if interface:
            cmd += ["--interface", interface]
        if event_rcvbuf:
            cmd += ["--event-rcvbuf", str(event_rcvbuf)]
        self.cmd = cmd
        self.logs: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.proc: trio.Process | None = None
        self.eof = False

    async def start(self, nursery: trio.Nursery) -> Driver:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = await trio.lowlevel.open_process(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, env=env)
        nursery.start_soon(self._read)
        await self.wait_log("driver.ready", limit=20)
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        while True:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    self.logs.append(json.loads(line))
                except ValueError:
                    self.logs.append({"event": "raw", "line": line.decode(errors="replace")})
                self._changed.set()
                self._changed = trio.Event()
        self.eof = True
        self._changed.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    async def wait_log(self, name: str, count: int = 1, limit: float = 5.0) -> dict[str, Any]:
        with trio.fail_after(limit):
            while len(self.events(name)) < count:
                if self.eof:
                    raise AssertionError(f"driver {self.role} exited: {self.logs[-5:]}")
                await self._changed.wait()
            return self.events(name)[count - 1]

    async def wait_where(self, pred: Callable[[dict[str, Any]], bool], limit: float = 5.0) -> dict[str, Any]:
        """The first log entry matching ``pred`` (waits for it)."""
        with trio.fail_after(limit):
            while True:
                for entry in self.logs:
                    if pred(entry):
                        return entry
                if self.eof:
                    raise AssertionError(f"driver {self.role} exited: {self.logs[-5:]}")
                await self._changed.wait()

    async def say(self, **msg: Any) -> float:
        """Send one Leadership message; returns time.time() just before writing it."""
        assert self.proc is not None and self.proc.stdin is not None
        t = time.time()
        await self.proc.stdin.send_all(json.dumps(msg).encode() + b"\n")
        return t

    async def stop(self, limit: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.stdin is not None:
            await self.proc.stdin.aclose()
        with trio.fail_after(limit):
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def recreate_node_link(bed: Bed, role: str) -> str:
    """Delete the node's veth (its bridge port goes with it) and build it again: same name and
    addresses, new ifindex, new MAC (returned, and stored in ``bed.mac``)."""
    ns, s, inner, port = bed.ns[role], bed.ns["s"], bed.ifname(role), f"p{role}"
    ip("-n", ns, "link", "del", inner)
    ip("-n", s, "link", "add", port, "type", "veth", "peer", "name", inner, "netns", ns)
    ip("-n", s, "link", "set", port, "master", "br0", "up")
    v4, v6 = NODE_IP[role]
    ip("-n", ns, "addr", "add", f"{v4}/24", "dev", inner)
    ip("-n", ns, "addr", "add", f"{v6}/64", "dev", inner, "nodad")
    ip("-n", ns, "link", "set", inner, "up")
    bed.mac[role] = json.loads(ip("-n", ns, "-j", "link", "show", inner))[0]["address"]
    return bed.mac[role]


@pytest.fixture(name="bed")
def bed_fixture() -> Iterator[Bed]:
    with build_bed() as b:
        yield b


@contextlib.asynccontextmanager
async def running(bed: Bed):
    """A nursery with a client capture; every driver started in it is killed on the way out."""
    drivers: list[Driver] = []
    async with trio.open_nursery() as nursery:
        cap = Capture(bed)
        await nursery.start(cap.run)

        async def start(role: str, addresses: list[str], **kw: Any) -> Driver:
            d = Driver(bed, role, addresses, **kw)
            drivers.append(d)
            return await d.start(nursery)

        try:
            yield cap, start
        except BaseException:
            for d in drivers:
                print(f"--- driver {d.role} log (last 30 lines)")
                for entry in d.logs[-30:]:
                    print(entry)
            raise
        finally:
            for d in drivers:
                d.kill()
            for d in drivers:
                if d.proc is not None:
                    with trio.move_on_after(5) as scope:
                        scope.shield = True
                        await d.proc.wait()
            nursery.cancel_scope.cancel()
