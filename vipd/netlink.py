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
trio(-asyncio) loop, so every request runs through ``trio.to_thread.run_sync`` on one shared
``IPRoute`` (one request at a time, ~1 ms each). That works the same under ``vipd start``
(inside ``trio_asyncio.open_loop()``) and in plain trio tests. Change notifications come from a
trio-native ``AF_NETLINK`` socket subscribed to the link and address multicast groups; an event
for our interface only *triggers* a reconcile (dump, compare, fix), so a lost or overrun event
can never leave us wrong for longer than the next event, and our own changes are harmless.

*Fencing arithmetic* (see docs/announce.md). The election sends ``fence_until``: the trio time
before which no other node can take the lease. The kernel takes whole seconds and removes an
expired address late by at most ``kernel_late(L)`` (timer batching + timer-wheel slack). So we
ask for ``L = lifetime_for(fence_until - now - REQUEST_BUDGET)``; if the request itself took
longer than the budget, we recompute from the time of the kernel's answer and shorten again.
When even L = 1 cannot be guaranteed (lease too short), vipd uses L = 1 (the shortest the kernel
knows) and says so once at info: ``vip.fence_weak``. Independently, the task drops the VIP itself once
``safe_until`` passes without a renew (userspace fence, covers a wedged election).
"""

from __future__ import annotations

import ipaddress
import math
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from vipd import log
from vipd.config import Config, Vip
from vipd.errors import ConfigError, NetlinkError
from vipd.events import Fanout, Leadership, VipChange
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


RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
NLMSG_ERROR, NLMSG_OVERRUN = 2, 4
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")


@dataclass(frozen=True)
class NetlinkEvent:
    kind: str  # link | link-gone | addr | overrun
    ifindex: int
    flags: int = 0  # link: ifi_flags


def parse_events(data: bytes) -> list[NetlinkEvent]:
    """Split one netlink datagram into the few facts the address task reacts to."""
    out: list[NetlinkEvent] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        body = off + _NLMSGHDR.size
        if kind in (RTM_NEWADDR, RTM_DELADDR) and body + _IFADDRMSG.size <= len(data):
            out.append(NetlinkEvent("addr", _IFADDRMSG.unpack_from(data, body)[4]))
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= len(data):
            _family, _type, index, ifi_flags, _change = _IFINFOMSG.unpack_from(data, body)
            out.append(NetlinkEvent("link" if kind == RTM_NEWLINK else "link-gone", index, ifi_flags))
        elif kind == NLMSG_OVERRUN:
            out.append(NetlinkEvent("overrun", 0))
        off += (length + 3) & ~3
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


_FOREVER = 0xFFFFFFFF
IFA_F_SECONDARY, IFA_F_NODAD, IFA_F_PERMANENT = 0x01, 0x02, 0x80


class Kernel:
    """Thin pyroute2 adapter: every call runs in a worker thread, one at a time.

    Translates pyroute2/OS errors into NetlinkError, once.
    """

    def __init__(self) -> None:
        self._ipr: Any = None
        self._lock = trio.CapacityLimiter(1)

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

        def call() -> T:
            try:
                return fn(*args)
            except PyrouteNetlinkError as exc:
                raise NetlinkError(f"{what}: {exc.args[-1] if exc.args else exc} (errno {exc.code})") from exc
            except OSError as exc:
                raise NetlinkError(f"{what}: {exc.strerror or exc}") from exc

        return await trio.to_thread.run_sync(call, limiter=self._lock)

    async def open(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = await self._run("open rtnetlink", IPRoute)

    async def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            await self._run("close rtnetlink", ipr.close)

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
                if r["dst_len"] == 0 and r.get("RTA_OIF"):
                    return r.get("RTA_OIF")
            return None

        return await self._run("dump routes", find)

    async def set_address(self, ifindex: int, vip: Vip, lifetime: Lifetime) -> None:
        """Add or refresh (idempotent 'replace'); IPv6 without duplicate address detection."""
        kwargs: dict[str, Any] = {"index": ifindex, "address": vip.address, "prefixlen": vip.prefixlen}
        if vip.family == socket.AF_INET6:
            kwargs["flags"] = IFA_F_NODAD
        if lifetime.seconds is not None:
            kwargs["valid_lft"] = kwargs["preferred_lft"] = lifetime.seconds
        await self._run(f"add {vip} on ifindex {ifindex}", lambda: self._ipr.addr("replace", **kwargs))

    async def delete_address(self, ifindex: int, vip: Vip) -> bool:
        """Remove; False when it was not there (EADDRNOTAVAIL)."""

        def delete() -> bool:
            from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

            try:
                self._ipr.addr("del", index=ifindex, address=vip.address, prefixlen=vip.prefixlen)
            except PyrouteNetlinkError as exc:
                if exc.code in (99, 19):  # EADDRNOTAVAIL, ENODEV: already gone
                    return False
                raise
            return True

        return await self._run(f"remove {vip} from ifindex {ifindex}", delete)


def open_event_socket() -> trio.socket.SocketType:
    """A trio netlink socket on the link + IPv4/IPv6 address groups (events, never requests)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    except OSError as exc:
        sock.close()
        raise NetlinkError(f"netlink event socket: {exc.strerror or exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


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
    """The address task's state and reactions; I/O only through ``Kernel`` and ``vip_changes``."""

    def __init__(self, cfg: Config, state: RuntimeState, kernel: Kernel, vip_changes: Fanout,
                 ifname: str, ifindex: int) -> None:
        self.cfg, self.state, self.kernel, self.vip_changes = cfg, state, kernel, vip_changes
        self.ifname, self.ifindex = ifname, ifindex
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
        was_leader, self.leader = self.leader, False
        self.safe_until = self.fence_until = None
        if self.announced:  # stop announcing first
            self.announced = False
            await self.vip_changes.send(VipChange(False, self.ifname, reason))
        if was_leader or any(r.present for r in self.records):
            await self.remove_all(reason)

    # -- kernel changes ----------------------------------------------------------------------
    async def _program(self, vip: Vip) -> Lifetime:
        """Add/refresh one VIP with a lifetime that expires before fence_until (see module doc)."""
        for _attempt in range(3):
            start = trio.current_time()
            remaining = None if self.fence_until is None else self.fence_until - start - REQUEST_BUDGET
            lifetime = lifetime_for(remaining)
            await self.kernel.set_address(self.ifindex, vip, lifetime)
            if lifetime.seconds is None or not lifetime.strict:
                break
            done = trio.current_time()
            if done - start <= REQUEST_BUDGET:
                break
            if lifetime_for(self.fence_until - done).seconds == lifetime.seconds:
                break  # slow, but still inside the bound
            self.log.debug("vip.lifetime_recompute", address=str(vip), took=round(done - start, 3))
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
        for vip, rec in zip(self.vips, self.records, strict=True):
            lifetime = await self._program(vip)
            if not rec.present:
                rec.present, rec.interface = True, self.ifname
                self.log.info("vip.added", address=str(vip), interface=self.ifname, term=term,
                              reason=reason, lifetime=lifetime.seconds)
        if self.running and not self.announced:
            self.announced = True
            await self.vip_changes.send(VipChange(True, self.ifname, reason))

    async def refresh(self) -> None:
        for vip in self.vips:
            lifetime = await self._program(vip)
            self.log.debug("vip.lifetime_refreshed", address=str(vip), lifetime=lifetime.seconds)

    async def remove_all(self, reason: str) -> None:
        for vip, rec in zip(self.vips, self.records, strict=True):
            removed = await self.kernel.delete_address(self.ifindex, vip)
            if removed or rec.present:
                self.log.info("vip.removed", address=str(vip), interface=self.ifname, reason=reason)
            rec.present = False

    # -- drift ---------------------------------------------------------------------------------
    async def reconcile(self, links: dict[int, tuple[str, int]] | None = None,
                        not_leader_reason: str = "not-leader") -> None:
        """Compare the kernel with what we want and repair; triggered by netlink events."""
        if links is not None:
            await self._follow_link(links)
        if self.leader and trio.current_time() >= self.deadline:
            await self.on_deadline()
            return
        current = [a for _i, a in await self.kernel.addresses(self.ifindex)]
        have = {a.interface for a in current}
        restored = False
        for vip, rec in zip(self.vips, self.records, strict=True):
            present = vip.interface in have
            if not self.leader:
                if present:
                    await self.kernel.delete_address(self.ifindex, vip)
                    self.log.info("vip.removed", address=str(vip), interface=self.ifname,
                                  reason=not_leader_reason)
                rec.present = False
                continue
            if present and not _behind_node_address(vip, current, self.vips):
                rec.present = True
                continue
            if present:  # #682: the node's own address came back behind the VIP; re-add VIP last
                await self.kernel.delete_address(self.ifindex, vip)
                self.log.info("vip.reordered", address=str(vip), interface=self.ifname)
            await self._program(vip)
            rec.present, rec.interface = True, self.ifname
            if not present:
                rec.restored += 1
                restored = True
                self.log.info("vip.restored", address=str(vip), interface=self.ifname,
                              restored=rec.restored)
        if self.leader and self.running and (restored or not self.announced):
            self.announced = True
            await self.vip_changes.send(VipChange(True, self.ifname, "restored"))

    async def _follow_link(self, links: dict[int, tuple[str, int]]) -> None:
        entry = links.get(self.ifindex)
        if entry is None or entry[0] != self.ifname:  # gone or renamed: follow the name
            found = [i for i, (name, _f) in links.items() if name == self.ifname]
            if not found:
                await self._set_running(False, "link-gone")
                return
            self.ifindex = found[0]
            entry = links[self.ifindex]
        await self._set_running(link_running(entry[1]), "link-down")

    async def _set_running(self, running: bool, reason: str) -> None:
        if running == self.running:
            return
        self.running = running
        self.log.info("link.up" if running else "link.down", interface=self.ifname)
        if not running and self.announced:
            self.announced = False
            await self.vip_changes.send(VipChange(False, self.ifname, reason))
        # Link up: reconcile() re-announces (reason "restored") when leader.


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
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the VIP(s) on the interface exactly while this node leads (see module doc)."""
    logger = log.get("address")
    kernel = Kernel()
    await kernel.open()
    events: trio.socket.SocketType | None = None
    mgr: AddressManager | None = None
    try:
        ifname, ifindex = await resolve_interface(cfg, kernel)
        events = open_event_socket()  # before the first look, so no change slips between
        mgr = AddressManager(cfg, state, kernel, vip_changes, ifname, ifindex)
        await mgr.reconcile(await kernel.links(), "leftover")  # not leader yet: a crash leftover goes
        logger.info("address.started", interface=ifname, vips=[str(v) for v in cfg.vip.addresses])
        # Name the interface to the announcer now, so it can get ready before any acquire.
        await vip_changes.send(VipChange(False, ifname, "standby"))
        task_status.started()

        inbox_send, inbox = trio.open_memory_channel[tuple[str, Any]](64)

        async def forward_leadership() -> None:
            async with leadership:
                async for ev in leadership:
                    await inbox_send.send(("leadership", ev))

        async def watch_netlink() -> None:
            assert events is not None
            while True:
                data = await events.recv(1 << 16)
                ours = any(e.ifindex == mgr.ifindex or e.kind != "addr" for e in parse_events(data))
                if ours:
                    try:
                        inbox_send.send_nowait(("netlink", None))
                    except trio.WouldBlock:
                        pass  # a reconcile is already queued

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward_leadership)
            nursery.start_soon(watch_netlink)
            while True:
                with trio.move_on_at(mgr.deadline):
                    kind, payload = await inbox.receive()
                    if kind == "leadership":
                        await mgr.on_leadership(payload)
                    else:
                        await mgr.reconcile(await kernel.links())
                    continue
                await mgr.on_deadline()
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLEANUP_TIMEOUT) as cleanup:
                if mgr is not None and (mgr.leader or any(r.present for r in mgr.records)):
                    if mgr.announced:
                        mgr.announced = False
                        vip_changes.send_nowait(VipChange(False, mgr.ifname, "stopping"))
                    mgr.leader = False
                    try:
                        await mgr.remove_all("stopping")
                    except NetlinkError as exc:
                        logger.error("vip.remove_failed", error=str(exc))
                if events is not None:
                    events.close()
                await kernel.close()
            if cleanup.cancelled_caught:
                logger.error("vip.cleanup_timeout", timeout=CLEANUP_TIMEOUT)
