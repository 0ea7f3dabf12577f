"""Fakes for the VIP-on-the-wire unit tests (named as fakes, live here, used under MockClock).

``FakeKernel`` stands in for ``vipd.netlink.Kernel`` and keeps its rules: ``replace`` is
idempotent, deleting a missing address answers False (EADDRNOTAVAIL), a request on an interface
that does not exist raises NetlinkError with errno ENODEV. ``FakeSender`` stands in for
``vipd.announce.PacketSender``. Both write to a shared ``journal`` so tests can check the order
of kernel changes and frames.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from typing import Any

import trio

from vipd.config import Vip
from vipd.errors import NetlinkError
from vipd.netlink import KernelAddress, Lifetime

I = ipaddress.ip_interface  # noqa: E741


class FakeKernel:
    """One interface ``eth0`` (ifindex 2) unless told otherwise; addresses as str → lifetime."""

    def __init__(self, journal: list | None = None, ifindex: int = 2) -> None:
        self.journal = journal if journal is not None else []
        self.links_now: dict[int, tuple[str, int]] = {ifindex: ("eth0", 0x10043)}
        self.present: dict[str, int | None] = {}
        self.calls: list[tuple[float, str, str, int | None]] = []
        self.links_once: dict[int, tuple[str, int]] | None = None  # one stale answer (a race)
        self.fail_delete: Exception | None = None
        self.hang_delete = False
        self.closed = False

    def _check(self, ifindex: int) -> None:
        if ifindex not in self.links_now:
            raise NetlinkError(f"ifindex {ifindex}: No such device", errno.ENODEV)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    async def links(self) -> dict[int, tuple[str, int]]:
        await trio.lowlevel.checkpoint()
        if self.links_once is not None:
            stale, self.links_once = self.links_once, None
            return stale
        return dict(self.links_now)

    async def default_route_ifindex(self, family: int) -> int | None:
        return next(iter(self.links_now), None)  # the default route leaves through eth0

    async def addresses(self, ifindex: int | None = None) -> list[tuple[int, KernelAddress]]:
        await trio.lowlevel.checkpoint()
        index = ifindex if ifindex is not None else next(iter(self.links_now))
        return [(index, KernelAddress(I(a), 0, v)) for a, v in self.present.items()]

    async def set_address(self, ifindex: int, vip: Vip, lifetime: Lifetime) -> None:
        await trio.lowlevel.checkpoint()
        self._check(ifindex)
        self.calls.append((trio.current_time(), "set", str(vip), lifetime.seconds))
        self.journal.append(("set", str(vip)))
        self.present[str(vip)] = lifetime.seconds

    async def delete_address(self, ifindex: int, address: Any) -> bool:
        await trio.lowlevel.checkpoint()
        if self.hang_delete:
            await trio.sleep_forever()
        if self.fail_delete is not None:
            raise self.fail_delete
        self.calls.append((trio.current_time(), "del", str(address), None))
        self.journal.append(("del", str(address)))
        return self.present.pop(str(address), "gone") != "gone"


class FakeSender:
    """Records (trio time, interface, frame) instead of touching an interface."""

    def __init__(self, ifname: str, log: list, mac: bytes = bytes.fromhex("02000000000a"),
                 ifindex: int = 2, fail: OSError | None = None) -> None:
        self.ifname, self.mac, self.log, self.ifindex = ifname, mac, log, ifindex
        self.fail, self.closed = fail, False

    async def send(self, frame: bytes) -> None:
        await trio.lowlevel.checkpoint()  # like a trio socket: a scheduling point before the send
        if self.fail is not None:
            raise self.fail
        self.log.append((trio.current_time(), self.ifname, frame))

    def close(self) -> None:
        self.closed = True


async def acknowledge_stops(rx: trio.MemoryReceiveChannel, seen: list, journal: list | None = None) -> None:
    """An announcer stand-in: records every VipChange (also as ("announce", present, reason) in
    ``journal``) and acknowledges stops at once, like the announcer also on its way out."""

    def take(change: Any) -> None:
        seen.append(change)
        if journal is not None:
            journal.append(("announce", change.present, change.reason))
        if change.stopped is not None:
            change.stopped.set()

    try:
        async for change in rx:
            take(change)
    finally:
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                take(rx.receive_nowait())
        rx.close()


def event_socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A (quiet) stand-in for the netlink event socket, and its other end."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)
