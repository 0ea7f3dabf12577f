"""The VIP on the wire, end to end, in network namespaces on a bridge (two nodes, one client).

Each node runs vipd's real address task and announcer in a subprocess inside its namespace
(tests/wire_driver.py); this test plays the election over the driver's stdin and watches the
client's wire with a raw socket. Figures (latencies) are reported with ``record_property`` and
printed. Bounds asserted are the issue's where it states one (first gARP within 10 ms, plus the
documented tolerance ``LOADED_BOX``), else derived from configured timers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import statistics
import time

import pytest
import trio

from tests.netns_fixtures import (  # noqa: F401
    VIP4,
    VIP6,
    Bed,
    Capture,
    bed_fixture,
    ip,
    ns_socket,
    recreate_node_link,
    running,
    wait_until,
)

pytestmark = pytest.mark.netns


def is_garp_from(mac: str, op: int | None = None, outgoing: bool = False):
    """A gARP for VIP4 from ``mac``; received on the capture's interface (or sent from it)."""
    def pred(f) -> bool:
        a = f.arp()
        return (a is not None and f.outgoing == outgoing and a[1] == mac and a[2] == VIP4 and a[4] == VIP4
                and (op is None or a[0] == op))
    return pred


def is_na_from(mac: str, outgoing: bool = False):
    """An unsolicited NA for VIP6 from ``mac``; received (or sent) on the capture's interface."""
    def pred(f) -> bool:
        p = f.icmp6()
        return (p is not None and f.outgoing == outgoing and p[0] == 136 and f.src_mac == mac
                and ipaddress.IPv6Address(p[1][8:24]) == ipaddress.IPv6Address(VIP6))
    return pred


def log_time(entry: dict) -> float:
    return datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()


def leader(term: int, safe_in: float = 30.0, fence_in: float = 40.0, **extra) -> dict:
    return {"leader": True, "term": term, "safe_in": safe_in, "fence_in": fence_in, **extra}


# The goal: the first gARP on the wire within 10 ms of the Leadership event. Measured
# from the driver handing the event to the address task (wall clock, taken right before) to the
# client's kernel receive stamp of the first frame, over ACQUISITIONS acquisitions; the median is
# asserted. Idle, this machine gives 3-7 ms. LOADED_BOX is the tolerance for a shared 2-core
# machine running other suites at once: adding an address takes the kernel's global RTNL lock,
# which other namespaces' churn holds for milliseconds (single samples up to ~30 ms were seen
# here at load 3-4, with the code before this test existed too); the median rides out those.
FIRST_GARP_GOAL = 0.010
LOADED_BOX = 0.010
ACQUISITIONS = 5


async def test_leader_adds_vip_and_announces_at_once(bed: Bed, record_property):
    async with running(bed) as (cap, start):
        a = await start("a", [VIP4, VIP6])
        assert not bed.has("a", VIP4)
        t0 = await a.say(**leader(1))
        first = await cap.wait_for(is_garp_from(bed.mac["a"]), since=t0, limit=5)
        handed = (await a.wait_log("driver.leadership"))["t"]
        latencies = [first.t - handed]
        reply = await cap.wait_for(is_garp_from(bed.mac["a"], op=2), since=t0)
        na = await cap.wait_for(is_na_from(bed.mac["a"]), since=t0)
        op, sha, spa, tha, tpa = first.arp()
        assert (op, sha, spa, tha, tpa) == (1, bed.mac["a"], VIP4, "00:00:00:00:00:00", VIP4)
        assert first.data[:6] == b"\xff" * 6
        assert reply.arp() == (2, bed.mac["a"], VIP4, "ff:ff:ff:ff:ff:ff", VIP4)
        raw6 = na.icmp6()[1]
        assert raw6[7] == 255 and ipaddress.IPv6Address(raw6[24:40]) == ipaddress.IPv6Address("ff02::1")
        assert raw6[44] & 0xE0 == 0x20  # R=0 S=0 O=1
        # the kernel has it, behind the node's own address, IPv6 without DAD, with a lifetime
        addrs = bed.addrs("a")
        v4 = [x["local"] for x in addrs if x["family"] == "inet"]
        assert v4 == ["10.77.0.1", VIP4]
        vip6 = next(x for x in addrs if x["local"] == VIP6)
        assert vip6["prefixlen"] == 128 and "tentative" not in vip6 and vip6.get("nodad")
        assert 0 < next(x for x in addrs if x["local"] == VIP4)["valid_life_time"] <= 40
        added = await a.wait_log("vip.added", count=2)
        assert added["interface"] == "d0"
        # more acquisitions (lose, then lead again) for the latency figure
        for n in range(1, ACQUISITIONS):
            await a.say(leader=False, term=2 * n, holder="b")
            await a.wait_log("vip.removed", count=2 * n)
            t0 = await a.say(**leader(2 * n + 1))
            first = await cap.wait_for(is_garp_from(bed.mac["a"]), since=t0, limit=5)
            latencies.append(first.t - (await a.wait_log("driver.leadership", count=2 * n + 1))["t"])
        median = statistics.median(latencies)
        record_property("first_garp_ms", [round(x * 1000, 2) for x in latencies])
        print(f"\nfirst gARP on the wire after the Leadership event: median {median * 1000:.2f} ms "
              f"of {', '.join(f'{x * 1000:.2f}' for x in latencies)} ms")
        assert all(x > 0 for x in latencies)
        assert median <= FIRST_GARP_GOAL + LOADED_BOX
        assert await a.stop() == 0
        assert not bed.has("a", VIP4) and not bed.has("a", VIP6)
        assert len(a.events("vip.removed")) == 2 * ACQUISITIONS


async def _connect_reaches(bed: Bed, family: int, vip: str, port: int, listener) -> bytes:
    client = ns_socket(bed.ns["c"], family, socket.SOCK_STREAM)
    with client, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def accept_one() -> None:
                conn, _ = await listener.accept()
                with conn:
                    await conn.send(b"B")

            nursery.start_soon(accept_one)
            await client.connect((vip, port))
            got.append(await client.recv(1))
        return got[0]


async def test_handover_moves_client_neighbour_entry_and_traffic(bed: Bed, record_property):
    port = 6443
    listeners = {fam: ns_socket(bed.ns["b"], fam, socket.SOCK_STREAM,
                                bind=("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                 for fam in (socket.AF_INET, socket.AF_INET6)}
    for sock in listeners.values():
        sock.listen(4)
    async with running(bed) as (cap, start):
        # A announces every 20 ms after its burst, so a round is often due when it loses
        a = await start("a", [VIP4, VIP6], refresh="20ms")
        b = await start("b", [VIP4, VIP6])
        a_wire = Capture(bed, "a")  # A's own d0: outgoing frames stamped as they are sent
        async with trio.open_nursery() as watch:
            await watch.start(a_wire.run)
            await _handover(bed, cap, a, b, a_wire, listeners, port, record_property)
            watch.cancel_scope.cancel()
    for sock in listeners.values():
        sock.close()


async def _handover(bed, cap, a, b, a_wire, listeners, port, record_property) -> None:
    await a.say(**leader(1))
    await a.wait_log("announce.started")
    # the client learns the VIP at A's MAC the ordinary way
    for fam, vip in ((socket.AF_INET, VIP4), (socket.AF_INET6, VIP6)):
        with ns_socket(bed.ns["c"], fam, socket.SOCK_DGRAM) as udp:
            await udp.sendto(b"x", (vip, 9))
    await wait_until(lambda: bed.neigh(VIP4)[0] == bed.mac["a"] and bed.neigh(VIP6)[0] == bed.mac["a"],
                     limit=5)

    # past A's 1.1 s repeats, into its 20 ms refresh rounds
    await a.wait_where(lambda e: e.get("event") == "announce.sent" and e.get("round") == "refresh", limit=10)
    t0 = await a.say(leader=False, term=2, holder="b")
    removed = await a.wait_log("vip.removed", count=1)
    await a.wait_log("vip.removed", count=2)
    await b.say(**leader(2))
    await wait_until(lambda: bed.neigh(VIP4)[0] == bed.mac["b"] and bed.neigh(VIP6)[0] == bed.mac["b"],
                     limit=5)
    switched = time.time() - t0
    record_property("handover_neighbour_switch_ms", round(switched * 1000, 1))
    print(f"\nclient neighbour entries switched to B {switched * 1000:.1f} ms after A lost")
    # ... from B's announcements alone: the client asked nobody in the meantime
    asked = [f for f in cap.frames if f.t >= t0 and f.outgoing and (
        f.arp() is not None or (f.icmp6() is not None and f.icmp6()[0] == 135))]
    assert asked == [], [f.data.hex() for f in asked]
    assert not bed.has("a", VIP4) and not bed.has("a", VIP6)
    assert bed.has("b", VIP4) and bed.has("b", VIP6)
    # and new connections to the VIP reach B
    assert await _connect_reaches(bed, socket.AF_INET, VIP4, port, listeners[socket.AF_INET]) == b"B"
    assert await _connect_reaches(bed, socket.AF_INET6, VIP6, port, listeners[socket.AF_INET6]) == b"B"
    # stop announcing, then remove: A sent its last frame before it removed the first VIP
    # (log stamps are truncated to the millisecond: +1 ms)
    from_a = [f for f in a_wire.frames
              if is_garp_from(bed.mac["a"], outgoing=True)(f) or is_na_from(bed.mac["a"], outgoing=True)(f)]
    assert any(f.t >= t0 - 0.1 for f in from_a)  # A really was announcing up to the loss
    late = [f.t - log_time(removed) for f in from_a if f.t > log_time(removed) + 0.001]
    assert late == [], late
    assert await b.stop() == 0 and await a.stop() == 0


async def test_drift_is_repaired_and_reannounced(bed: Bed, record_property):
    async with running(bed) as (cap, start):
        a = await start("a", [VIP4, VIP6])
        await a.say(**leader(1))
        await a.wait_log("announce.started")
        # ip addr del by hand → restored and re-announced
        t0 = time.time()
        ip("-n", bed.ns["a"], "addr", "del", f"{VIP4}/32", "dev", "d0")
        entry = await a.wait_log("vip.restored")
        assert entry["address"] == f"{VIP4}/32"
        assert bed.has("a", VIP4)
        # The scheduled 1.1 s repeats are on the wire too: take the restore burst's own frame,
        # the first gARP at or after the driver logged the restore (log stamps are in ms).
        burst = await a.wait_where(lambda e: e.get("event") == "announce.sent" and e.get("round") == "burst"
                                   and log_time(e) >= log_time(entry))
        f = await cap.wait_for(is_garp_from(bed.mac["a"]), since=log_time(burst) - 0.001, limit=5)
        restored = f.t - t0
        record_property("restore_reannounce_ms", round(restored * 1000, 1))
        print(f"\nip addr del → VIP back and re-announced in {restored * 1000:.1f} ms "
              f"(restored {(log_time(entry) - t0) * 1000:.0f} ms after the del command started)")
        assert restored < 0.25
        # link down/up: IPv6 addresses go with the link; both are back (and announced) after up
        ip("-n", bed.ns["a"], "link", "set", "d0", "down")
        await a.wait_log("link.down")
        t1 = time.time()
        ip("-n", bed.ns["a"], "link", "set", "d0", "up")
        await cap.wait_for(is_garp_from(bed.mac["a"]), since=t1, limit=5)
        await cap.wait_for(is_na_from(bed.mac["a"]), since=t1, limit=5)
        assert bed.has("a", VIP4) and bed.has("a", VIP6)
        v4 = [x["local"] for x in bed.addrs("a") if x["family"] == "inet"]
        assert v4 == ["10.77.0.1", VIP4]
        # #682: the node's own address re-added after the VIP → the VIP moves behind it again
        ip("-n", bed.ns["a"], "addr", "del", "10.77.0.1/24", "dev", "d0")
        ip("-n", bed.ns["a"], "addr", "add", "10.77.0.1/24", "dev", "d0")
        await a.wait_log("vip.reordered")
        await wait_until(lambda: [x["local"] for x in bed.addrs("a") if x["family"] == "inet"]
                         == ["10.77.0.1", VIP4], limit=2)
        assert await a.stop() == 0
        assert not bed.has("a", VIP4)


async def test_crash_leftover_removed_on_follower(bed: Bed):
    # left by a run with another prefix configured: removed all the same
    ip("-n", bed.ns["a"], "addr", "add", f"{VIP4}/24", "dev", "d0")
    ip("-n", bed.ns["a"], "addr", "add", f"{VIP6}/128", "dev", "d0", "nodad")
    async with running(bed) as (_cap, start):
        a = await start("a", [VIP4, VIP6])  # ready means: the leftover check is done
        assert not bed.has("a", VIP4) and not bed.has("a", VIP6)
        removed = a.events("vip.removed")
        assert {e["reason"] for e in removed} == {"leftover"} and len(removed) == 2
        # a follower keeps it off: someone adds it again by hand → removed again
        ip("-n", bed.ns["a"], "addr", "add", f"{VIP4}/32", "dev", "d0")
        await a.wait_log("vip.removed", count=3)
        assert not bed.has("a", VIP4)
        assert await a.stop() == 0


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
async def test_kernel_fencing_when_process_freezes_or_dies(bed: Bed, how: str, record_property):
    from vipd.netlink import expiry_bound, lifetime_for

    # 3.6 s to the fence → a guaranteed 2 s lifetime, with 0.13 s to spare for a slow event
    safe_in, fence_in, every = 3.0, 3.6, 0.5
    lifetime = lifetime_for(fence_in - 0.05)
    assert lifetime.strict and lifetime.seconds == 2 and lifetime_for(fence_in - 0.05 - 0.12) == lifetime
    async with running(bed) as (_cap, start):
        a = await start("a", [VIP4, VIP6])
        last = await a.say(**leader(1, safe_in=safe_in, fence_in=fence_in))
        added = await a.wait_log("vip.added", count=2)
        assert added["lifetime"] == lifetime.seconds
        # renewals every 0.5 s for more than twice the lifetime: the VIP stays, untouched
        renewed_until = last + 2 * lifetime.seconds + 1.0
        renewals = 0
        while time.time() < renewed_until:
            await trio.sleep(every)  # the election's renew cadence (retry period), simulated
            assert bed.has("a", VIP4) and bed.has("a", VIP6)
            last = await a.say(**leader(1, safe_in=safe_in, fence_in=fence_in, reason="renewed"))
            renewals += 1
        await wait_until(lambda: len(a.events("driver.leadership")) == renewals + 1, limit=2)
        assert bed.has("a", VIP4) and bed.has("a", VIP6)
        for name in ("vip.restored", "vip.removed", "vip.deferred", "vip.fence_weak", "vip.fence_expired"):
            assert a.events(name) == [], name
        refreshed = [e for e in a.events("vip.lifetime_refreshed")]
        assert len(refreshed) >= 2 * renewals - 2 and {e["lifetime"] for e in refreshed} == {2}
        # renewals stop and the process cannot clean up
        os.kill(a.proc.pid, getattr(signal, how))
        try:
            gone = await wait_until(lambda: (not bed.has("a", VIP4) and not bed.has("a", VIP6)
                                             and time.time()), limit=fence_in + 2)
        finally:
            if how == "SIGSTOP":
                a.kill()
        took = gone - last
        record_property(f"fence_{how}_s", round(took, 3))
        print(f"\n{how}: VIP gone from the kernel {took:.3f} s after the last renew "
              f"(lifetime {lifetime.seconds} s, bound {expiry_bound(lifetime.seconds):.3f} s, fence {fence_in} s)")
        assert lifetime.seconds - 0.1 <= took <= fence_in
        assert took <= expiry_bound(lifetime.seconds) + 0.1  # +0.1: our poll interval and ip(8) runs


async def test_event_overrun_is_survived_and_reconciled(bed: Bed):
    """A tiny event buffer, a frozen driver and a burst of address changes: the kernel drops
    events (recv fails with ENOBUFS), including the deletion of the VIP; the task survives and
    puts the VIP back from a full dump."""
    lo_burst = "".join(f"address add 10.99.{i // 250}.{i % 250 + 1}/32 dev lo\n" for i in range(300))
    async with running(bed) as (_cap, start):
        a = await start("a", [VIP4, VIP6], event_rcvbuf=4096)
        await a.say(**leader(1))
        await a.wait_log("announce.started")
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            ip("-n", bed.ns["a"], "-batch", "-", input=lo_burst)  # fills the buffer (not our link)
            ip("-n", bed.ns["a"], "addr", "del", f"{VIP4}/32", "dev", "d0")  # dropped
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        await a.wait_log("netlink.overrun")
        restored = await a.wait_log("vip.restored")
        assert restored["address"] == f"{VIP4}/32" and bed.has("a", VIP4)
        # still watching: the next change is seen as usual
        ip("-n", bed.ns["a"], "addr", "del", f"{VIP6}/128", "dev", "d0")
        await a.wait_log("vip.restored", count=2)
        assert bed.has("a", VIP6)
        assert await a.stop() == 0
        assert not bed.has("a", VIP4) and not bed.has("a", VIP6)
        assert a.events("driver.stopped")[0]["released"] is True


async def test_recreated_interface_gets_the_vip_and_announcements_with_its_new_mac(bed: Bed):
    async with running(bed) as (cap, start):
        a = await start("a", [VIP4, VIP6])
        await a.say(**leader(1))
        await cap.wait_for(is_garp_from(bed.mac["a"]), limit=5)
        old_mac = bed.mac["a"]
        t1 = time.time()
        new_mac = recreate_node_link(bed, "a")
        assert new_mac != old_mac
        # back on the new d0, announced from its MAC: a burst at once, not only the next refresh
        await cap.wait_for(is_garp_from(new_mac), since=t1, limit=2.5)
        await cap.wait_for(is_na_from(new_mac), since=t1, limit=2.5)
        await wait_until(lambda: bed.has("a", VIP4) and bed.has("a", VIP6), limit=2)
        changed = await a.wait_log("link.changed")
        started = a.events("announce.started")
        assert started[-1]["mac"] == new_mac
        # The socket was reopened before any send on the new link. (A send racing the deletion
        # itself, before the address task has heard of it, may fail: that is the old link's.)
        assert [e for e in a.events("announce.failing") + a.events("announce.send_failed")
                if log_time(e) >= log_time(changed)] == []
        # and nothing from the old MAC after the link was recreated (it no longer exists)
        assert not [f for f in cap.frames if f.t > t1 + 0.5 and is_garp_from(old_mac)(f)]
        await wait_until(lambda: [x["local"] for x in bed.addrs("a") if x["family"] == "inet"]
                         == ["10.77.0.1", VIP4], limit=2)
        assert await a.stop() == 0
        assert not bed.has("a", VIP4) and not bed.has("a", VIP6)


async def test_ecmp_default_route_picks_the_first_nexthop(bed: Bed):
    """No subnet holds the VIP; the default route is multipath (no RTA_OIF): its first nexthop's
    interface is the VIP's."""
    ns, vip = bed.ns["a"], "192.0.2.50"
    ip("-n", ns, "link", "add", "e1", "type", "veth", "peer", "name", "e1p")
    for link in ("e1", "e1p"):
        ip("-n", ns, "link", "set", link, "up")
    ip("-n", ns, "addr", "add", "10.88.0.1/24", "dev", "e1")
    ip("-n", ns, "route", "add", "default", "nexthop", "via", "10.88.0.254", "dev", "e1",
       "nexthop", "via", "10.77.0.254", "dev", "d0")
    assert "nexthop" in ip("-n", ns, "route", "show", "default")
    async with running(bed) as (_cap, start):
        a = await start("a", [vip], interface=None)
        started = await a.wait_log("address.started")
        assert started["interface"] == "e1"
        await a.say(**leader(1))
        await a.wait_log("vip.added")
        assert vip in ip("-n", ns, "addr", "show", "dev", "e1")
        assert await a.stop() == 0


async def test_interface_auto_detected_and_bad_name_is_config_error(bed: Bed):
    async with running(bed) as (_cap, start):
        a = await start("a", [VIP4], interface=None)
        started = await a.wait_log("address.started")
        assert started["interface"] == "d0"
        assert await a.stop() == 0
    from tests.netns_fixtures import Driver

    async with trio.open_nursery() as nursery:
        d = Driver(bed, "b", [VIP4], interface="eth9")
        with pytest.raises(AssertionError, match="exited"):
            await d.start(nursery)
        rc = await d.proc.wait()
    assert rc != 0
    text = " ".join(str(e) for e in d.logs)
    assert "'eth9' does not exist; expected one of d0" in text
