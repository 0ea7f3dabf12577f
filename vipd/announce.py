"""Announcer: tells every host on the segment that the VIP now lives at this node's MAC.

Owns: the frames (gratuitous ARP request and reply for IPv4 VIPs, unsolicited Neighbor
Advertisement for IPv6 VIPs), the schedule (a burst at once, repeats that beat the neighbour
locktime, then a periodic refresh that keeps switch FDB entries alive), and a thin sender on a
trio ``AF_PACKET`` socket. It starts on ``VipChange(present=True)`` and stops at once on
``VipChange(present=False)``; the address task sends those only after the kernel confirmed. A stop
is acknowledged (``VipChange.stopped``) once nothing more will be sent, and the address task
removes the address only after that. Pending changes are read before every round, so a due
round never goes out after a stop was sent. The socket is reopened (and the frames rebuilt with
the new MAC) when the interface was recreated: a new ``ifindex`` in a change, or a send that
fails with ENXIO/ENODEV.

Must never: add or remove addresses (netlink.py does), block the trio loop (scapy's own
sockets block: scapy only builds bytes here), or log per packet above debug.

Layout: ``garp``/``unsolicited_na``/``frames_for`` and ``AnnounceSchedule`` are pure (no I/O,
no clock: they take ``now``); ``PacketSender`` and ``run_announcer`` are the I/O shell.
See docs/announce.md for what is sent when, and why.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from vipd import log
from vipd.config import Config, Vip
from vipd.events import VipChange
from vipd.state import RuntimeState

# --------------------------------------------------------------------------------------------
# Pure frame builders.
# --------------------------------------------------------------------------------------------

ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST = "ff:ff:ff:ff:ff:ff"
ALL_NODES_MAC = "33:33:00:00:00:01"  # ff02::1 mapped to Ethernet (RFC 2464)
MIN_FRAME = 60  # Ethernet minimum without FCS; pad ARP so every NIC sends the same bytes


def _mac_str(mac: bytes | str) -> str:
    return mac if isinstance(mac, str) else ":".join(f"{b:02x}" for b in mac)


def garp(mac: bytes | str, ip: str, op: int = ARP_REQUEST) -> bytes:
    """Gratuitous ARP (RFC 5227 announcement): broadcast, sender = target = VIP.

    Request: target hardware address zero (RFC 5227). Reply: target hardware broadcast
    (what MetalLB and kube-vip send). Both padded to the 60-byte Ethernet minimum.
    """
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Padding

    src = _mac_str(mac)
    tha = "00:00:00:00:00:00" if op == ARP_REQUEST else BROADCAST
    frame = Ether(dst=BROADCAST, src=src, type=0x0806) / ARP(
        hwtype=1, ptype=0x0800, hwlen=6, plen=4, op=op, hwsrc=src, psrc=ip, hwdst=tha, pdst=ip
    )
    raw = bytes(frame)
    return bytes(frame / Padding(load=b"\x00" * (MIN_FRAME - len(raw)))) if len(raw) < MIN_FRAME else raw


def unsolicited_na(mac: bytes | str, ip: str) -> bytes:
    """Unsolicited Neighbor Advertisement (RFC 4861 7.2.6): to ff02::1, hop limit 255,
    R=0 S=0 O=1 (override existing entries), Target Link-Layer Address option = our MAC."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import Ether

    src = _mac_str(mac)
    vip = ipaddress.IPv6Address(ip).compressed
    frame = (
        Ether(dst=ALL_NODES_MAC, src=src, type=0x86DD)
        / IPv6(src=vip, dst="ff02::1", hlim=255)
        / ICMPv6ND_NA(R=0, S=0, O=1, tgt=vip)
        / ICMPv6NDOptDstLLAddr(lladdr=src)
    )
    return bytes(frame)


@dataclass(frozen=True)
class Frame:
    kind: str  # garp-request | garp-reply | unsolicited-na
    address: str
    data: bytes


def frames_for(vips: Sequence[Vip], mac: bytes | str) -> list[Frame]:
    """One announcement round: request + reply per IPv4 VIP, one NA per IPv6 VIP."""
    out: list[Frame] = []
    for vip in vips:
        if vip.family == socket.AF_INET:
            out.append(Frame("garp-request", vip.address, garp(mac, vip.address, ARP_REQUEST)))
            out.append(Frame("garp-reply", vip.address, garp(mac, vip.address, ARP_REPLY)))
        else:
            out.append(Frame("unsolicited-na", vip.address, unsolicited_na(mac, vip.address)))
    return out


# --------------------------------------------------------------------------------------------
# Pure schedule.
# --------------------------------------------------------------------------------------------

# Offsets after acquiring: 1.1 s apart beats Linux's neighbour locktime (1 s), inside which a
# second update to an entry is ignored; five rounds over 4.4 s ride out a lost frame or a
# switch port still coming up (MetalLB sends for 5 s at 1.1 s).
REPEATS: tuple[float, ...] = (0.0, 1.1, 2.2, 3.3, 4.4)


class AnnounceSchedule:
    """When to send the next round. No clock: every call takes ``now`` (trio time)."""

    def __init__(self, refresh: float, repeats: Sequence[float] = REPEATS) -> None:
        self.refresh = refresh
        self.repeats = tuple(repeats)
        self.origin: float | None = None
        self._next: float | None = None
        self._index = 0  # index into repeats of the next round; past the end: refresh rounds

    @property
    def active(self) -> bool:
        return self.origin is not None

    @property
    def next_due(self) -> float | None:
        return self._next

    def start(self, now: float) -> None:
        """(Re)start from a burst at ``now`` (acquired, restored, link up)."""
        self.origin, self._index, self._next = now, 0, now

    def stop(self) -> None:
        self.origin = self._next = None

    def pop_due(self, now: float) -> str | None:
        """If a round is due, return its kind (burst | repeat | refresh) and move on."""
        if self._next is None or now < self._next or self.origin is None:
            return None
        kind = "burst" if self._index == 0 else ("repeat" if self._index < len(self.repeats) else "refresh")
        self._index += 1
        # Skip rounds we are too late for (a stalled loop must not fire a backlog at once).
        while self._index < len(self.repeats) and self.origin + self.repeats[self._index] <= now:
            self._index += 1
        if self._index < len(self.repeats):
            self._next = self.origin + self.repeats[self._index]
        elif self.refresh > 0:
            last = self.origin + self.repeats[-1]
            periods = max(1, math.floor((now - last) / self.refresh) + 1)
            while last + periods * self.refresh <= now:  # floor() of an inexact quotient
                periods += 1
            self._next = last + periods * self.refresh
        else:
            self._next = None
        return kind


# --------------------------------------------------------------------------------------------
# I/O shell.
# --------------------------------------------------------------------------------------------


# A send that fails with one of these means the interface the socket is bound to is gone.
INTERFACE_GONE = (errno.ENXIO, errno.ENODEV)


class PacketSender:
    """A trio AF_PACKET/SOCK_RAW socket bound to (ifname, 0): sends frames, receives nothing."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            raw.bind((ifname, 0))  # protocol 0: nothing is ever queued for us to read
            self.mac: bytes = raw.getsockname()[4]
            self.ifindex: int = socket.if_nametoindex(ifname)
        except OSError:
            raw.close()
            raise
        self.sock = trio.socket.from_stdlib_socket(raw)  # non-blocking from here on

    async def send(self, frame: bytes) -> None:
        await self.sock.send(frame)

    def close(self) -> None:
        self.sock.close()


async def run_announcer(
    cfg: Config, state: RuntimeState, vip_changes: trio.MemoryReceiveChannel, *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    open_sender: Callable[[str], PacketSender] = PacketSender,
) -> None:
    """Announce while the address task says the VIPs are present (see module doc).

    ``open_sender`` exists for tests (a recording fake under MockClock).
    """
    logger = log.get("announce")
    schedule = AnnounceSchedule(cfg.announce.refresh)
    sender: PacketSender | None = None
    frames: list[Frame] = []
    failing = False
    interface: str | None = cfg.vip.interface  # where to announce (the address task says)
    ifindex = 0  # its index as the address task last saw it (0: unknown)

    def close_sender() -> None:
        nonlocal sender
        if sender is not None:
            sender.close()
            sender = None

    def open_for(name: str) -> bool:
        """(Re)open the socket on ``name`` and rebuild the frames for its MAC."""
        nonlocal sender, frames
        close_sender()
        try:
            sender = open_sender(name)
        except OSError as exc:
            state.announce.errors += 1
            logger.error("announce.socket_failed", interface=name, error=exc.strerror or str(exc))
            return False
        frames = frames_for(cfg.vip.addresses, sender.mac)
        return True

    def note_failure(exc: OSError, frame: Frame, where: str) -> None:
        nonlocal failing
        state.announce.errors += 1
        logger.debug("announce.send_failed", kind=frame.kind, address=frame.address,
                     interface=where, error=exc.strerror or str(exc))
        if not failing:
            failing = True
            logger.warning("announce.failing", interface=where, error=exc.strerror or str(exc))

    async def send_round(kind: str) -> None:
        nonlocal failing
        if sender is None and (interface is None or not open_for(interface)):
            return  # socket_failed was logged and counted; the next round tries again
        assert sender is not None
        for frame in frames:
            try:
                await sender.send(frame.data)
            except OSError as exc:
                note_failure(exc, frame, sender.ifname)
                if exc.errno in INTERFACE_GONE:  # recreated interface: reopen next round
                    close_sender()
                    return
                continue
            state.announce.sent += 1
            logger.debug("announce.sent", kind=frame.kind, round=kind, address=frame.address,
                         interface=sender.ifname)
            if failing:
                failing = False
                logger.info("announce.recovered", interface=sender.ifname)

    def apply(change: VipChange) -> None:
        """Take one change into account; a stop is acknowledged here (nothing more is sent)."""
        nonlocal interface, ifindex
        interface, ifindex = change.interface, change.ifindex or ifindex
        if not change.present:
            if schedule.active:
                schedule.stop()
                logger.info("announce.stopped", interface=change.interface, reason=change.reason)
            if change.stopped is not None:
                # Acknowledged at once: the address task removes the VIP only after this. The
                # socket is looked at again with the next change that names an interface.
                change.stopped.set()
                return
        if sender is None or sender.ifname != interface or (ifindex and sender.ifindex != ifindex):
            # Open the socket and build the frames as soon as the interface is known (the
            # address task names it at start, "standby"), so acquiring costs only the sends.
            open_for(interface)
        if change.present:
            schedule.start(trio.current_time())
            logger.info("announce.started", interface=change.interface, reason=change.reason,
                        mac=_mac_str(sender.mac) if sender is not None else None)

    # Import scapy and build once before reporting ready: the first import takes ~0.5 s, which
    # must not stall the loop once started (the interface may only be named later, at
    # "standby"). Before started(), no leadership event can be waiting on us.
    frames_for(cfg.vip.addresses, b"\x00" * 6)
    if interface:  # get ready before the first acquire (else on the "standby" change)
        with contextlib.suppress(OSError):
            sender = open_sender(interface)
            frames = frames_for(cfg.vip.addresses, sender.mac)
            ifindex = sender.ifindex
    task_status.started()
    try:
        while True:
            # Every pending change first: a stop sent while a round was due wins.
            with contextlib.suppress(trio.WouldBlock):
                while True:
                    apply(vip_changes.receive_nowait())
            due = schedule.next_due
            if due is not None:
                kind = schedule.pop_due(trio.current_time())
                if kind is not None:
                    await send_round(kind)
                    continue
            change: VipChange | None = None
            with trio.move_on_at(due if due is not None else math.inf):
                change = await vip_changes.receive()
            if change is not None:
                apply(change)
    except trio.EndOfChannel:
        return
    finally:
        # Nothing is sent from here on: acknowledge every stop still queued, then close.
        schedule.stop()
        close_sender()
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                pending = vip_changes.receive_nowait()
                if pending.stopped is not None:
                    pending.stopped.set()
        vip_changes.close()
