"""Address manager: the VIP(s) on this node's interface while leader, and nowhere else.

Owns: resolving the interface (configured name, else auto-detection), adding each VIP as an
extra address with a kernel lifetime tied to the lease (kernel-enforced fencing), refreshing
that lifetime on every renew, removing the VIP on loss / shutdown / at start when a crash left
it behind, and repairing drift seen on netlink address and link events (``ip addr del``, link
down/up, the node's own address re-added in front of the VIP). It tells the announcer through
``VipChange`` after the kernel confirmed, so announcing always follows adding and stops before
removing. pyroute2 errors are translated here, once, into ``NetlinkError``.

Must never: send packets (announce.py does), decide leadership (the election does), poll the
kernel on a timer, or leave the VIP behind on a clean stop.

Theory of operation
-------------------
*pyroute2 under trio.* pyroute2 0.9's sync ``IPRoute`` refuses to run on a thread that has a
trio(-asyncio) loop, and it keeps an asyncio loop (with its fds) per thread that ever used it.
So every request runs on one long-lived thread of our own (``NetlinkThread``: one request at a
time, ~1 ms each), never on trio's worker threads, which exit after 10 s idle and would leak a
loop per generation. That works the same under ``vipd start`` (inside
``trio_asyncio.open_loop()``) and in plain trio tests. Change notifications come from a
trio-native ``AF_NETLINK`` socket subscribed to the link and address multicast groups; an event
for our interface only *triggers* a reconcile (dump, compare, fix), so our own changes are
harmless. When the kernel drops events because the socket buffer is full, ``recv`` fails with
ENOBUFS: that is read as "something may have changed" and also triggers a full reconcile.

*The interface* is followed by name: deleted → nothing to do (records absent, announcer
stopped) until an interface of that name exists again; recreated (new ifindex, new MAC) → the
VIPs are re-added there and the announcer is told the new ifindex, so it reopens its socket.

*Fencing arithmetic* (see docs/announce.md). The election sends ``fence_until``: the trio time
before which no other node can take the lease. The kernel takes whole seconds and removes an
expired address late by at most ``kernel_late(L)`` (timer batching + timer-wheel slack). So we
ask for ``L = lifetime_for(fence_until - now - REQUEST_BUDGET)``; if the request itself took
longer than the budget, we recompute from the time of the kernel's answer and shorten again.
When even L = 1 cannot be guaranteed, what happens depends on the configuration: if the lease
is too short for a guarantee even right after a renew (``strict_possible`` False, e.g. the 2 s
default), vipd uses L = 1 (the shortest the kernel knows) and says so once at info:
``vip.fence_weak``. If the lease normally gives a guaranteed lifetime and only *this* moment is too
late in the window (a restore or reorder just before the next renew, a slow renew), vipd does
not touch the address with an unguaranteed lifetime: it logs ``vip.deferred`` and adds it at the
next renew, which brings a new ``fence_until``. Independently, the task drops the VIP itself once
``safe_until`` passes without a renew (userspace fence, covers a wedged election).

*Ordering.* Before removing, the address task tells the announcer to stop and waits (bounded by
``ANNOUNCE_STOP_TIMEOUT``) for its acknowledgement, so no announcement follows a removal. At stop,
the ``ReleaseGate`` is set only after every VIP was confirmed removed; otherwise it is withheld
and the election lets the lease expire rather than hand it over.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import outcome
import trio

from vipd import log
from vipd.config import Config, Vip
from vipd.errors import ConfigError, NetlinkError
from vipd.events import Fanout, Leadership, ReleaseGate, VipChange
from vipd.nlmsg import (
    IFADDRMSG,
    IFINFOMSG,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_OVERRUN,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
    error_code,
    messages,
)
from vipd.state import RuntimeState, VipState

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Sans-IO: lifetime arithmetic, interface choice, event parsing.
# --------------------------------------------------------------------------------------------

# How late the kernel may remove an expired address, in seconds. The IPv4 (check_lifetime) and
# IPv6 (addrconf_verify) workers round their next run up to a whole second when that is within
# 250 ms (ADDRCONF_TIMER_FUZZ) and never run again sooner than 1 s (ADDRCONF_TIMER_FUZZ_MAX)
# after a run caused by *any* address change in the kernel; the timer wheel then adds up to 1/8
# of the delay; the workqueue needs a moment to run.
FUZZ_MAX = 1.0
WHEEL_SLACK = 0.125
DISPATCH = 0.05
# Time we allow one netlink request to take before we distrust the lifetime we computed.
REQUEST_BUDGET = 0.05
# Bound for the shielded cleanup on stop.
CLEANUP_TIMEOUT = 3.0
# How long we wait for the announcer to acknowledge "stop" before removing anyway (a wedged
# announcer must not keep the VIP on this node; the kernel fence bounds it regardless).
ANNOUNCE_STOP_TIMEOUT = 0.5
# The kernel counts an address as expired up to HZ/50 (ADDRCONF_TIMER_FUZZ_MINUS) before its
# lifetime is over; with margin: an address gone this close to (or after) the end of the
# lifetime we gave it has expired, it was not deleted.
EXPIRY_EARLY = 0.05
# Receive buffer of the event socket. Overruns are handled (full reconcile), this only makes
# them rare.
EVENT_RCVBUF = 1 << 20


def kernel_late(lifetime: int) -> float:
    """Worst-case seconds by which the kernel removes an address after its lifetime ran out."""
    return FUZZ_MAX + WHEEL_SLACK * (lifetime + FUZZ_MAX) + DISPATCH


def expiry_bound(lifetime: int) -> float:
    """Worst-case seconds from the kernel stamping the address until the address is gone."""
    return lifetime + kernel_late(lifetime)


@dataclass(frozen=True)
class Lifetime:
    seconds: int | None  # None: permanent (no fence given, e.g. the static backend)
    strict: bool  # True: gone before fence_until even in the worst case


PERMANENT = Lifetime(None, True)


def lifetime_for(remaining: float | None) -> Lifetime:
    """The whole-second lifetime that is surely expired ``remaining`` seconds from now."""
    if remaining is None:
        return PERMANENT
    # expiry_bound(L) = L * (1 + W) + FUZZ_MAX * (1 + W) + DISPATCH <= remaining
    seconds = math.floor((remaining - FUZZ_MAX * (1 + WHEEL_SLACK) - DISPATCH) / (1 + WHEEL_SLACK) + 1e-9)
    if seconds >= 1:
        return Lifetime(seconds, True)
    return Lifetime(1, False)



def renew_lifetime(lease_duration: float) -> Lifetime:
    """The lifetime a renew gives the VIP: right after a renew, ``fence_until - now`` is about
    the lease duration, less the request's budget."""
    return lifetime_for(lease_duration - REQUEST_BUDGET)

def choose_interface(
    vip: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
    addresses: Iterable[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]],
    default_route_ifname: str | None,
) -> str | None:
    """The interface whose subnet holds the VIP (most specific wins), else the default route's.

    Host routes (/32, /128) and the VIP itself (a crash leftover) never count as a subnet.
    """
    best: tuple[int, str] | None = None
    for ifname, addr in addresses:
        if ifname == "lo" or addr.version != vip.version or addr.ip == vip.ip:
            continue
        net = addr.network
        if net.prefixlen == net.max_prefixlen or vip.ip not in net:
            continue
        if best is None or net.prefixlen > best[0]:
            best = (net.prefixlen, ifname)
    return best[1] if best else default_route_ifname


IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


@dataclass(frozen=True)
class NetlinkEvent:
    kind: str  # link | link-gone | addr | overrun
    ifindex: int
    flags: int = 0  # link: ifi_flags


def parse_events(data: bytes) -> list[NetlinkEvent]:
    """Split one netlink datagram into the few facts the address task reacts to."""
    out: list[NetlinkEvent] = []
    for kind, _seq, body in messages(data):
        if kind in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= IFADDRMSG.size:
            out.append(NetlinkEvent("addr", IFADDRMSG.unpack_from(body)[4]))
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= IFINFOMSG.size:
            _family, _type, index, ifi_flags, _change = IFINFOMSG.unpack_from(body)
            out.append(NetlinkEvent("link" if kind == RTM_NEWLINK else "link-gone", index, ifi_flags))
        elif kind == NLMSG_OVERRUN:
            out.append(NetlinkEvent("overrun", 0))
    return out


def link_running(flags: int) -> bool:
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


# --------------------------------------------------------------------------------------------
# The pyroute2 boundary.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelAddress:
    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    flags: int
    valid: int | None  # seconds left, None: forever


Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_FOREVER = 0xFFFFFFFF
IFA_F_SECONDARY, IFA_F_NODAD, IFA_F_PERMANENT = 0x01, 0x02, 0x80


class NetlinkThread:
    """One long-lived thread that runs every pyroute2 call, one at a time, in order.

    pyroute2 keeps an asyncio loop per thread; trio's worker threads come and go (10 s idle),
    which leaked a loop and its fds per generation. Waiting for a call cannot be cancelled (like
    ``trio.to_thread.run_sync``): netlink requests answer in milliseconds.
    """

    def __init__(self, name: str = "vipd-netlink") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, deliver = job
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        token, task = trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()
        self._jobs.put((fn, lambda result: token.run_sync_soon(trio.lowlevel.reschedule, task, result)))
        return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)

    def stop(self) -> None:
        """The thread ends after the calls already queued."""
        self._jobs.put(None)


class Kernel:
    """Thin pyroute2 adapter: every call runs on one ``NetlinkThread``, one at a time.

    Translates pyroute2/OS errors into NetlinkError (with the errno), once.
    """

    def __init__(self) -> None:
        self._ipr: Any = None
        self._thread: NetlinkThread | None = None
        self._req: trio.socket.SocketType | None = None  # adds and removes (see set_address)
        self._seq = 0

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

        def call() -> T:
            try:
                return fn(*args)
            except PyrouteNetlinkError as exc:
                raise NetlinkError(f"{what}: {exc.args[-1] if exc.args else exc} (errno {exc.code})",
                                   exc.code) from exc
            except OSError as exc:
                raise NetlinkError(f"{what}: {exc.strerror or exc}", exc.errno) from exc

        assert self._thread is not None, "Kernel.open() first"
        return await self._thread.run(call)

    async def open(self) -> None:
        from pyroute2 import IPRoute

        self._thread = NetlinkThread()
        self._ipr = await self._run("open rtnetlink", IPRoute)
        try:
            sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except OSError as exc:
            raise NetlinkError(f"open rtnetlink: {exc.strerror or exc}", exc.errno) from exc
        self._req = sock  # close() closes it, also when the bind below fails
        try:
            await sock.bind((0, 0))
        except OSError as exc:
            raise NetlinkError(f"bind rtnetlink: {exc.strerror or exc}", exc.errno) from exc

    async def close(self) -> None:
        if self._req is not None:
            self._req.close()
            self._req = None
        if self._thread is None:
            return
        try:
            if self._ipr is not None:
                ipr, self._ipr = self._ipr, None
                await self._run("close rtnetlink", ipr.close)
        finally:
            self._thread.stop()
            self._thread = None

    async def links(self) -> dict[int, tuple[str, int]]:
        """ifindex → (name, flags)."""

        def dump() -> dict[int, tuple[str, int]]:
            return {m["index"]: (m.get("IFLA_IFNAME"), m["flags"]) for m in self._ipr.link("dump")}

        return await self._run("dump links", dump)

    async def addresses(self, ifindex: int | None = None) -> list[tuple[int, KernelAddress]]:
        """(ifindex, address) for every address, in the kernel's order."""

        def dump() -> list[tuple[int, KernelAddress]]:
            kwargs = {"index": ifindex} if ifindex is not None else {}
            out = []
            for m in self._ipr.addr("dump", **kwargs):
                addr = m.get("IFA_ADDRESS") if m["family"] == socket.AF_INET6 else (
                    m.get("IFA_LOCAL") or m.get("IFA_ADDRESS"))
                if addr is None:
                    continue
                info = m.get("IFA_CACHEINFO") or {}
                valid = info.get("ifa_valid", _FOREVER)
                out.append((m["index"], KernelAddress(
                    ipaddress.ip_interface(f"{addr}/{m['prefixlen']}"),
                    m.get("IFA_FLAGS") or m["flags"],
                    None if valid == _FOREVER else valid,
                )))
            return out

        return await self._run("dump addresses", dump)

    async def default_route_ifindex(self, family: int) -> int | None:
        def find() -> int | None:
            for r in self._ipr.route("dump", family=family, table=254):
                if r["dst_len"] == 0:
                    oif = default_route_oif(r.get("RTA_OIF"), r.get("RTA_MULTIPATH"))
                    if oif:
                        return oif
            return None

        return await self._run("dump routes", find)

    async def set_address(self, ifindex: int, vip: Vip, lifetime: Lifetime) -> None:
        """Add or refresh (idempotent 'replace'); IPv6 without duplicate address detection."""
        err = await self._address_request(
            RTM_NEWADDR, ifindex, vip.interface, lifetime.seconds,
            IFA_F_NODAD if vip.family == socket.AF_INET6 else 0)
        if err:
            raise NetlinkError(f"add {vip} on ifindex {ifindex}: {os.strerror(err)} (errno {err})", err)

    async def delete_address(self, ifindex: int, address: Address) -> bool:
        """Remove ``address`` (IP and prefix); False when it was not there (EADDRNOTAVAIL, ENODEV)."""
        err = await self._address_request(RTM_DELADDR, ifindex, address, None, 0)
        if err in (errno.EADDRNOTAVAIL, errno.ENODEV):  # already gone
            return False
        if err:
            raise NetlinkError(f"remove {address} from ifindex {ifindex}: {os.strerror(err)} (errno {err})", err)
        return True

    async def _address_request(self, kind: int, ifindex: int, address: Address, lifetime: int | None,
                               flags: int) -> int:
        """One RTM_NEWADDR/RTM_DELADDR on the trio request socket; the errno it was answered with.

        pyroute2 builds the message (``address_message``); the request itself skips pyroute2's
        per-call machinery and the hop to its thread (~2 ms together, against ~0.15 ms here):
        adding the VIP is on the path from the Leadership event to the first gARP.
        """
        assert self._req is not None, "Kernel.open() first"
        self._seq = seq = (self._seq + 1) & 0x7FFFFFFF or 1
        try:
            await self._req.send(address_message(kind, seq, ifindex, address, lifetime, flags))
            while True:  # the answer to this request (an earlier, abandoned one may precede it)
                data = await self._req.recv(65536)
                for rseq, err in parse_acks(data):
                    if rseq == seq:
                        return err
        except OSError as exc:
            raise NetlinkError(f"rtnetlink request: {exc.strerror or exc}", exc.errno) from exc


def address_message(kind: int, seq: int, ifindex: int, address: Address, lifetime: int | None,
                    flags: int) -> bytes:
    """An rtnetlink address request, encoded by pyroute2 (``ifaddrmsg``): RTM_NEWADDR is a
    create-or-replace (idempotent) with the lifetime (None: permanent) and IFA_FLAGS; every
    request asks for an acknowledgement."""
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

    ip = str(address.ip)
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    msg["prefixlen"] = address.network.prefixlen
    msg["flags"] = flags & 0xFF
    msg["scope"] = 0
    msg["index"] = ifindex
    attrs: list[tuple[str, Any]] = [("IFA_ADDRESS", ip)]
    if address.version == 4:
        attrs.insert(0, ("IFA_LOCAL", ip))
    if kind == RTM_NEWADDR:
        lft = _FOREVER if lifetime is None else lifetime
        attrs.append(("IFA_CACHEINFO", {"ifa_preferred": lft, "ifa_valid": lft, "cstamp": 0, "tstamp": 0}))
        attrs.append(("IFA_FLAGS", flags))
    msg["attrs"] = attrs
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_REPLACE if kind == RTM_NEWADDR else 0)
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def parse_acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every NLMSG_ERROR (an ACK when errno is 0) in ``data``."""
    return [(seq, err) for kind, seq, body in messages(data)
            if kind == NLMSG_ERROR and (err := error_code(body)) is not None]


def default_route_oif(oif: int | None, multipath: list[dict[str, Any]] | None) -> int | None:
    """The output interface of a default route: RTA_OIF, else (ECMP) the first nexthop's."""
    if oif:
        return oif
    for hop in multipath or ():
        if hop.get("oif"):
            return hop["oif"]
    return None


def open_event_socket(rcvbuf: int = EVENT_RCVBUF) -> trio.socket.SocketType:
    """A trio netlink socket on the link + IPv4/IPv6 address groups (events, never requests)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    except OSError as exc:
        sock.close()
        raise NetlinkError(f"netlink event socket: {exc.strerror or exc}", exc.errno) from exc
    return trio.socket.from_stdlib_socket(sock)


async def read_events(sock: trio.socket.SocketType) -> list[NetlinkEvent]:
    """The next datagram's events; a kernel-side overrun (ENOBUFS) is an ``overrun`` event."""
    try:
        data = await sock.recv(1 << 16)
    except OSError as exc:
        if exc.errno == errno.ENOBUFS:  # the kernel dropped events: we may have missed anything
            return [NetlinkEvent("overrun", 0)]
        raise NetlinkError(f"netlink events: {exc.strerror or exc}", exc.errno) from exc
    return parse_events(data)


async def resolve_interface(cfg: Config, kernel: Kernel) -> tuple[str, int]:
    """(name, ifindex) of the VIP interface; ConfigError when a named one does not exist."""
    links = await kernel.links()
    by_name = {name: index for index, (name, _flags) in links.items()}
    if cfg.vip.interface:
        if cfg.vip.interface not in by_name:
            known = ", ".join(sorted(n for n in by_name if n)) or "(none)"  # lo too: it exists
            raise ConfigError([
                f"vip.interface ({cfg.sources.get('vip.interface', 'default')}): "
                f"{cfg.vip.interface!r} does not exist; expected one of {known}"
            ])
        return cfg.vip.interface, by_name[cfg.vip.interface]
    if not cfg.vip.addresses:
        raise ConfigError(["vip.address (default): no VIP given; cannot auto-detect the interface"])
    vip = cfg.vip.addresses[0]
    addrs = [(links[i][0], a.interface) for i, a in await kernel.addresses() if i in links]
    oif = await kernel.default_route_ifindex(vip.family)
    name = choose_interface(vip.interface, addrs, links[oif][0] if oif in links else None)
    if name is None:
        raise ConfigError([
            f"vip.interface (default): no interface has a subnet holding {vip.address} and there is "
            "no default route; expected --interface NAME"
        ])
    return name, by_name[name]


# --------------------------------------------------------------------------------------------
# The task.
# --------------------------------------------------------------------------------------------


class AddressManager:
    """The address task's state and reactions; I/O only through ``Kernel`` and ``vip_changes``.

    ``ifindex`` is None while no interface of our name exists (deleted; waiting for it).
    """

    def __init__(self, cfg: Config, state: RuntimeState, kernel: Kernel, vip_changes: Fanout,
                 ifname: str, ifindex: int) -> None:
        self.cfg, self.state, self.kernel, self.vip_changes = cfg, state, kernel, vip_changes
        self.ifname: str = ifname
        self.ifindex: int | None = ifindex
        self.vips: tuple[Vip, ...] = cfg.vip.addresses
        self.records = _records(state, self.vips, ifname)
        self.log = log.get("address")
        self.leader = False
        self.term = -1
        self.safe_until: float | None = None
        self.fence_until: float | None = None
        self.announced = False  # the announcer was told "present"
        self.running = True  # link up with carrier
        self.weak_warned = False
        self.deferring = False  # a vip.deferred was logged and nothing was programmed since
        self.placed: set[Vip] = set()  # VIPs added since acquiring (re-adding them is a restore)
        # When the lifetime we last gave each VIP runs out (measured from the request's start,
        # so never later than the kernel's own stamp), and the VIPs we saw expire since.
        self.expires_at: dict[Vip, float] = {}
        self.expired: set[Vip] = set()
        # Right after a renew, fence_until - now is about the lease duration: if that gives a
        # guaranteed lifetime, never settle for an unguaranteed one (see module doc).
        self.strict_possible = renew_lifetime(cfg.election.lease_duration).strict

    # -- leadership ------------------------------------------------------------------------
    async def on_leadership(self, ev: Leadership) -> None:
        if ev.term < self.term:
            self.log.debug("leadership.stale", term=ev.term, last_term=self.term)
            return
        self.term = ev.term
        if not ev.leader:
            await self.lose(ev.reason or "lost")
            return
        now = trio.current_time()
        if ev.safe_until is not None and ev.safe_until <= now:
            self.log.warning("leadership.expired_on_arrival", term=ev.term, late=round(now - ev.safe_until, 3))
            await self.lose("expired")
            return
        acquiring = not self.leader
        self.leader, self.safe_until, self.fence_until = True, ev.safe_until, ev.fence_until
        if acquiring:
            self.placed.clear()
            await self.ensure(reason="acquired", term=ev.term)
        else:
            await self.refresh()

    async def on_deadline(self) -> None:
        """safe_until passed without a renew: the election should have said so; fence ourselves."""
        self.log.warning("vip.fence_expired", term=self.term)
        await self.lose("expired")

    @property
    def deadline(self) -> float:
        return self.safe_until if (self.leader and self.safe_until is not None) else math.inf

    async def lose(self, reason: str) -> None:
        was_leader, self.leader, fence = self.leader, False, self.fence_until
        self.safe_until = self.fence_until = None
        self.placed.clear()
        self.expires_at.clear()
        await self.stop_announcing(reason, fence=fence)  # stop announcing first (acknowledged) ...
        if was_leader or any(r.present for r in self.records):
            await self.remove_all(reason)  # ... then remove

    async def stop_announcing(self, reason: str, *, nowait: bool = False, fence: float | None = None) -> None:
        """Tell the announcer to stop and wait until it acknowledged (bounded, and never past
        ``fence`` less a request's time: the removal that follows must beat the next leader).

        ``nowait``: the shielded stop path, where a full channel must not block the cleanup.
        """
        if not self.announced:
            return
        self.announced = False
        stopped = trio.Event()
        change = VipChange(False, self.ifname, reason, self.ifindex or 0, stopped)
        delivered = self.vip_changes.send_nowait(change) if nowait else await self.vip_changes.send(change)
        if not delivered:
            return  # nobody announces (announce disabled, or the announcer is gone)
        timeout = ANNOUNCE_STOP_TIMEOUT
        if fence is not None:
            timeout = min(timeout, max(0.0, fence - trio.current_time() - REQUEST_BUDGET))
        with trio.move_on_after(timeout):
            await stopped.wait()
        if not stopped.is_set():
            self.log.warning("announce.stop_unconfirmed", interface=self.ifname, reason=reason,
                             timeout=round(timeout, 3))

    async def start_announcing(self, reason: str, *, again: bool = False) -> None:
        """Tell the announcer the VIPs are here; ``again``: restart its burst (after a restore)."""
        if (self.announced and not again) or not self.running or self.ifindex is None:
            return
        if not any(r.present for r in self.records):
            return
        self.announced = True
        await self.vip_changes.send(VipChange(True, self.ifname, reason, self.ifindex))

    # -- kernel changes ----------------------------------------------------------------------
    def _lifetime_now(self) -> tuple[Lifetime, float | None]:
        remaining = None if self.fence_until is None else self.fence_until - trio.current_time() - REQUEST_BUDGET
        return lifetime_for(remaining), remaining

    def _must_defer(self, lifetime: Lifetime) -> bool:
        return not lifetime.strict and self.strict_possible

    def _defer(self, vip: Vip, action: str, remaining: float | None) -> None:
        if not self.deferring:
            self.deferring = True
            self.log.info("vip.deferred", address=str(vip), action=action, term=self.term,
                          remaining=round(remaining or 0.0, 3), needed=round(expiry_bound(1), 3),
                          hint="too late in the lease window for a guaranteed lifetime; "
                               "waiting for the next renew")

    async def _program(self, vip: Vip, action: str) -> Lifetime | None:
        """Add/refresh one VIP with a lifetime that expires before fence_until (see module doc).

        None: deferred to the next renew (nothing programmed; a VIP this call had programmed
        with a lifetime that its slow request made unsafe is removed again).
        """
        assert self.ifindex is not None
        programmed = False
        for _attempt in range(3):
            start = trio.current_time()
            lifetime, remaining = self._lifetime_now()
            if self._must_defer(lifetime):
                if programmed:
                    await self.kernel.delete_address(self.ifindex, vip.interface)
                self._defer(vip, action, remaining)
                return None
            await self.kernel.set_address(self.ifindex, vip, lifetime)
            programmed = True
            self.expired.discard(vip)
            if lifetime.seconds is None:
                self.expires_at.pop(vip, None)
            else:
                self.expires_at[vip] = start + lifetime.seconds
            if lifetime.seconds is None or not lifetime.strict:
                break
            done = trio.current_time()
            if done - start <= REQUEST_BUDGET:
                break
            if lifetime_for(self.fence_until - done).seconds == lifetime.seconds:
                break  # slow, but still inside the bound
            self.log.debug("vip.lifetime_recompute", address=str(vip), took=round(done - start, 3))
        self.deferring = False
        if not lifetime.strict and not self.weak_warned:
            self.weak_warned = True
            self.log.info(
                "vip.fence_weak", address=str(vip), lifetime=lifetime.seconds,
                remaining=round(remaining or 0.0, 3), needed=round(expiry_bound(1), 3),
                hint="lease too short for a guaranteed kernel lifetime; see docs/announce.md",
            )
        return lifetime

    async def ensure(self, reason: str, term: int | None = None) -> None:
        """Put every VIP on the interface, then tell the announcer."""
        if self.ifindex is None:
            return  # no interface of our name: added when it comes back (reconcile)
        for vip, rec in zip(self.vips, self.records, strict=True):
            lifetime = await self._program(vip, "add")
            if lifetime is None:
                continue  # deferred: the next renew adds it
            self.placed.add(vip)
            if not rec.present:
                rec.present, rec.interface = True, self.ifname
                self.log.info("vip.added", address=str(vip), interface=self.ifname, term=term,
                              reason=reason, lifetime=lifetime.seconds)
        await self.start_announcing(reason)

    async def refresh(self) -> None:
        """A renew: refresh the lifetime of every VIP present; add what is missing."""
        if self.ifindex is None:
            return
        for vip, rec in zip(self.vips, self.records, strict=True):
            if rec.present:
                lifetime = await self._program(vip, "refresh")
                if lifetime is not None:
                    self.log.debug("vip.lifetime_refreshed", address=str(vip), lifetime=lifetime.seconds)
        if not all(r.present for r in self.records):
            # deferred, lost or expired VIPs: the new fence_until may allow them
            await self.reconcile(renewed=True)

    async def remove_all(self, reason: str) -> None:
        """Remove every VIP (whatever its prefix) from the interface; NetlinkError if one failed.

        The VIPs themselves go first, one request each: this removal races the next leader.
        Copies with another prefix (a changed configuration, added by hand) are looked for in a
        dump afterwards."""
        if self.ifindex is not None:
            removed = [await self.kernel.delete_address(self.ifindex, vip.interface) for vip in self.vips]
            current = [a for _i, a in await self.kernel.addresses(self.ifindex)]
            for i, (vip, rec) in enumerate(zip(self.vips, self.records, strict=True)):
                for address in _same_ip(vip, current):
                    removed[i] |= await self.kernel.delete_address(self.ifindex, address)
                if removed[i] or rec.present:
                    self.log.info("vip.removed", address=str(vip), interface=self.ifname, reason=reason)
        for rec in self.records:
            rec.present = False

    async def stop(self) -> None:
        """Shutdown: stop announcing (acknowledged), then remove; NetlinkError if not confirmed."""
        needed = self.leader or any(r.present for r in self.records)
        self.leader = False
        await self.stop_announcing("stopping", nowait=True)
        if needed:
            await self.remove_all("stopping")

    # -- drift ---------------------------------------------------------------------------------
    async def reconcile(self, links: dict[int, tuple[str, int]] | None = None,
                        not_leader_reason: str = "not-leader", *, renewed: bool = False) -> None:
        """Compare the kernel with what we want and repair; triggered by netlink events.

        A VIP that vanished because the lifetime we gave it ran out is not put back until the
        next renew (``renewed``): its expiry means no renew refreshed it in time, and re-adding
        it would stretch this node's hold past what the last renew allows (the kernel fence
        would then end only a whole lifetime later). One deleted by hand (or lost with its
        link) before its lifetime ended is restored at once."""
        if links is not None:
            await self._follow_link(links)
        if self.leader and trio.current_time() >= self.deadline:
            await self.on_deadline()
            return
        if self.ifindex is None:
            for rec in self.records:
                rec.present = False
            return
        current = [a for _i, a in await self.kernel.addresses(self.ifindex)]
        restored = False
        for vip, rec in zip(self.vips, self.records, strict=True):
            same_ip = _same_ip(vip, current)
            if not self.leader:
                for address in same_ip:  # a crash leftover, or added by hand: whatever its prefix
                    await self.kernel.delete_address(self.ifindex, address)
                    self.log.info("vip.removed", address=str(address), interface=self.ifname,
                                  reason=not_leader_reason)
                rec.present = False
                continue
            for address in same_ip:
                if address != vip.interface:  # ours with another prefix (config changed): not ours
                    await self.kernel.delete_address(self.ifindex, address)
                    self.log.info("vip.removed", address=str(address), interface=self.ifname,
                                  reason="other-prefix")
            present = vip.interface in same_ip
            if not present and not renewed and self._expired(vip):
                rec.present = False
                continue
            if present and not _behind_node_address(vip, current, self.vips):
                rec.present = True
                continue
            if present:  # #682: the node's own address came back behind the VIP; re-add VIP last
                lifetime, remaining = self._lifetime_now()
                if self._must_defer(lifetime):  # keep it where it is until the next renew
                    self._defer(vip, "reorder", remaining)
                    rec.present = True
                    continue
                await self.kernel.delete_address(self.ifindex, vip.interface)
                self.log.info("vip.reordered", address=str(vip), interface=self.ifname)
            lifetime = await self._program(vip, "reorder" if present else "restore")
            if lifetime is None:
                rec.present = False
                continue
            rec.present, rec.interface = True, self.ifname
            if present:
                continue
            if vip in self.placed:
                rec.restored += 1
                restored = True
                self.log.info("vip.restored", address=str(vip), interface=self.ifname,
                              restored=rec.restored)
            else:  # deferred at acquire, added now
                self.placed.add(vip)
                self.log.info("vip.added", address=str(vip), interface=self.ifname, term=self.term,
                              reason="deferred", lifetime=lifetime.seconds)
        if self.leader:
            await self.start_announcing("restored", again=restored)  # a restore: a new burst

    def _expired(self, vip: Vip) -> bool:
        """The VIP's lifetime has run out (see ``reconcile``); logged once per expiry."""
        expiry = self.expires_at.get(vip)
        if expiry is None or trio.current_time() < expiry - EXPIRY_EARLY:
            return False
        if vip not in self.expired:
            self.expired.add(vip)
            self.log.info("vip.expired", address=str(vip), interface=self.ifname, term=self.term,
                          late=round(trio.current_time() - expiry, 3),
                          hint="no renew refreshed its kernel lifetime in time; re-added at the next renew")
        return True

    async def interface_gone(self, error: NetlinkError) -> None:
        """A request said ENODEV: the interface went away under us; wait for it to return."""
        self.log.info("link.gone", interface=self.ifname, ifindex=self.ifindex, error=str(error))
        await self._set_running(False, "link-gone")
        self.ifindex = None
        for rec in self.records:
            rec.present = False

    async def _follow_link(self, links: dict[int, tuple[str, int]]) -> None:
        entry = links.get(self.ifindex) if self.ifindex is not None else None
        if entry is None or entry[0] != self.ifname:  # gone, renamed or recreated: follow the name
            found = [i for i, (name, _f) in links.items() if name == self.ifname]
            if not found:
                if self.ifindex is not None:
                    self.log.info("link.gone", interface=self.ifname, ifindex=self.ifindex)
                await self._set_running(False, "link-gone")
                self.ifindex = None
                return
            # A new interface of our name: the addresses went with the old one, and the
            # announcer must reopen its socket there (new ifindex, new MAC).
            await self.stop_announcing("link-changed")
            self.log.info("link.changed", interface=self.ifname, old_ifindex=self.ifindex,
                          ifindex=found[0])
            self.ifindex = found[0]
            entry = links[self.ifindex]
        await self._set_running(link_running(entry[1]), "link-down")

    async def _set_running(self, running: bool, reason: str) -> None:
        if running == self.running:
            return
        self.running = running
        if running:
            self.log.info("link.up", interface=self.ifname)
        else:
            self.log.info("link.down", interface=self.ifname, reason=reason)  # carrier lost, or gone
        if not running:
            await self.stop_announcing(reason)
        # Link up: reconcile() re-announces (reason "restored") when leader.


def _same_ip(vip: Vip, current: Sequence[KernelAddress]) -> list[Address]:
    """Addresses on the interface with the VIP's IP, whatever their prefix."""
    return [a.interface for a in current if a.interface.ip == vip.interface.ip]


def _behind_node_address(vip: Vip, current: Sequence[KernelAddress], ours: Sequence[Vip]) -> bool:
    """IPv4: True when the VIP is listed before one of the node's own primary addresses.

    Tools (kubelet, CNIs) take the first address of the interface as the node IP (kube-vip
    #682); the kernel appends a new primary after the existing ones, so re-adding puts it last.
    """
    if vip.interface.version != 4:
        return False  # IPv6 source selection follows RFC 6724 rules, not list order
    mine = {v.interface for v in ours}
    seen_vip = False
    for a in current:
        if a.interface == vip.interface:
            seen_vip = True
        elif (seen_vip and a.interface.version == 4 and a.interface not in mine
              and not a.flags & IFA_F_SECONDARY):
            return True
    return False


def _records(state: RuntimeState, vips: Sequence[Vip], ifname: str) -> list[VipState]:
    by_addr = {r.address: r for r in state.vips}
    records = [by_addr.get(str(v)) or VipState(address=str(v)) for v in vips]
    for r in records:
        r.interface = ifname
    state.vips = records
    return records


async def run_address_task(
    cfg: Config,
    state: RuntimeState,
    leadership: trio.MemoryReceiveChannel,
    vip_changes: Fanout,
    release_gate: ReleaseGate | None = None,
    *,
    kernel: Kernel | None = None,
    open_events: Callable[[], trio.socket.SocketType] = open_event_socket,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the VIP(s) on the interface exactly while this node leads (see module doc).

    At stop, ``release_gate`` is set once every VIP is confirmed removed, else withheld (why is
    logged). ``kernel`` and ``open_events`` exist for tests (a recording fake under MockClock).
    """
    logger = log.get("address")
    kernel = Kernel() if kernel is None else kernel
    events: trio.socket.SocketType | None = None
    mgr: AddressManager | None = None
    try:
        await kernel.open()
        ifname, ifindex = await resolve_interface(cfg, kernel)
        events = open_events()  # before the first look, so no change slips between
        mgr = AddressManager(cfg, state, kernel, vip_changes, ifname, ifindex)
        await mgr.reconcile(await kernel.links(), "leftover")  # not leader yet: a crash leftover goes
        logger.info("address.started", interface=ifname, vips=[str(v) for v in cfg.vip.addresses])
        # Name the interface to the announcer now, so it can get ready before any acquire.
        await vip_changes.send(VipChange(False, ifname, "standby", ifindex))
        task_status.started()

        # Leadership events and wake-ups share one inbox; "a reconcile is wanted" is a flag, so
        # a burst of netlink events costs one reconcile and can never fill the inbox.
        inbox_send, inbox = trio.open_memory_channel[tuple[str, Any]](64)
        reconcile_wanted = False
        # Only a link event (or lost events) needs the links dumped again; our own address
        # changes come back as address events, and the pass they trigger is one dump shorter.
        links_wanted = False

        def want_reconcile(links: bool = False) -> None:
            nonlocal reconcile_wanted, links_wanted
            links_wanted |= links
            if not reconcile_wanted:
                reconcile_wanted = True
                with contextlib.suppress(trio.WouldBlock):  # a full inbox wakes the loop anyway
                    inbox_send.send_nowait(("wake", None))

        async def forward_leadership() -> None:
            async with leadership:
                async for ev in leadership:
                    await inbox_send.send(("leadership", ev))

        async def watch_netlink() -> None:
            assert events is not None and mgr is not None
            while True:
                got = await read_events(events)
                if any(e.kind == "overrun" for e in got):
                    logger.warning("netlink.overrun", interface=mgr.ifname,
                                   hint="kernel dropped events; reconciling from a full dump")
                if any(e.kind != "addr" or e.ifindex == mgr.ifindex for e in got):
                    want_reconcile(links=any(e.kind != "addr" for e in got))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward_leadership)
            nursery.start_soon(watch_netlink)
            while True:
                # Leadership first (a renew already queued beats our own deadline), then a
                # wanted reconcile, else wait, but only until safe_until.
                try:
                    kind, payload = inbox.receive_nowait()
                except trio.WouldBlock:
                    kind, payload = "wake", None
                    if not reconcile_wanted:
                        with trio.move_on_at(mgr.deadline) as waiting:
                            kind, payload = await inbox.receive()
                        if waiting.cancelled_caught:
                            await mgr.on_deadline()
                            continue
                try:
                    if kind == "leadership":
                        await mgr.on_leadership(payload)
                    elif reconcile_wanted:
                        # events from now on want another pass
                        reconcile_wanted, dump_links, links_wanted = False, links_wanted, False
                        await mgr.reconcile(await kernel.links() if dump_links else None)
                except NetlinkError as exc:
                    if exc.errno != errno.ENODEV:
                        raise
                    await mgr.interface_gone(exc)
                    want_reconcile(links=True)  # it may be back already
    finally:
        with trio.CancelScope(shield=True):
            await _clean_up(mgr, kernel, events, release_gate, logger)


async def _clean_up(mgr: AddressManager | None, kernel: Kernel, events: trio.socket.SocketType | None,
                    release_gate: ReleaseGate | None, logger: Any) -> None:
    """Shielded, bounded: stop announcing, remove the VIPs, give the election its word, close."""
    failure: str | None = None
    with trio.move_on_after(CLEANUP_TIMEOUT) as cleanup:
        if mgr is not None:
            try:
                await mgr.stop()
            except NetlinkError as exc:
                failure = f"remove failed: {exc}"
                logger.error("vip.remove_failed", error=str(exc))
    if cleanup.cancelled_caught:
        failure = f"cleanup timed out after {CLEANUP_TIMEOUT:g}s"
        logger.error("vip.cleanup_timeout", timeout=CLEANUP_TIMEOUT)
    if release_gate is not None:
        if failure is None:  # every VIP confirmed gone (or never added by this process)
            release_gate.set()
        else:
            logger.error("vip.release_withheld", reason=failure,
                         hint="the lease is left to expire; the kernel lifetime removes the VIP")
            release_gate.withhold(failure)
    if events is not None:
        events.close()
    await kernel.close()  # a request in flight on pyroute2's thread cannot be cancelled: unbounded, ms
