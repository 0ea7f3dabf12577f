"""Address manager: the sans-IO parts (lifetime arithmetic, interface choice, event parsing,
address order) as tables, and the task's leadership rules under MockClock with a recording
fake kernel (named as one, lives here). Wire behaviour: tests/test_wire_netns.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest
import trio
import trio.testing

from vipd.config import Vip, load
from vipd.errors import ConfigError
from vipd.events import Fanout, Leadership
from vipd.netlink import (
    IFA_F_SECONDARY,
    RTM_DELADDR,
    RTM_NEWLINK,
    AddressManager,
    KernelAddress,
    Lifetime,
    _behind_node_address,
    choose_interface,
    expiry_bound,
    lifetime_for,
    link_running,
    parse_events,
    run_address_task,
)
from vipd.state import RuntimeState

I = ipaddress.ip_interface  # noqa: E741


@pytest.mark.parametrize("remaining, seconds, strict", [
    (None, None, True),     # no fence (static backend): permanent
    (40.0, 34, True),
    (15.0, 12, True),       # kube-vip's 15 s lease
    (3.45, 2, True),
    (2.3, 1, True),         # the shortest remaining time that still gives a guarantee
    (2.29, 1, False),       # shorter: 1 s best effort
    (1.9, 1, False),        # vipd's default 2 s lease
    (0.2, 1, False),
])
def test_lifetime_for(remaining, seconds, strict):
    lt = lifetime_for(remaining)
    assert (lt.seconds, lt.strict) == (seconds, strict)
    if strict and seconds is not None:
        assert expiry_bound(seconds) <= remaining  # the guarantee itself
        assert expiry_bound(seconds + 1) > remaining  # and the longest such lifetime


def test_choose_interface():
    addrs = [("lo", I("127.0.0.1/8")), ("eth0", I("192.168.1.10/24")), ("eth1", I("10.0.0.5/8")),
             ("eth2", I("10.1.2.3/16")), ("eth3", I("10.1.2.50/32")), ("eth4", I("fd00::1/64"))]
    assert choose_interface(I("10.1.2.200/32"), addrs, "eth0") == "eth2"  # most specific subnet
    assert choose_interface(I("10.9.9.9/32"), addrs, "eth0") == "eth1"
    assert choose_interface(I("172.16.0.1/32"), addrs, "eth0") == "eth0"  # default route's
    assert choose_interface(I("172.16.0.1/32"), addrs, None) is None
    assert choose_interface(I("10.1.2.50/32"), [("eth3", I("10.1.2.50/32"))], "eth0") == "eth0"  # leftover VIP
    assert choose_interface(I("fd00::50/128"), addrs, None) == "eth4"


def _nlmsg(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_parse_events():
    addr = _nlmsg(RTM_DELADDR, struct.pack("=BBBBI", 2, 32, 0, 0, 7) + b"\x08\x00\x01\x00\x0a\x00\x00\x32")
    link = _nlmsg(RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 0x10043, 0))
    events = parse_events(addr + link + b"\x00\x00")  # trailing junk is ignored
    assert [(e.kind, e.ifindex) for e in events] == [("addr", 7), ("link", 7)]
    assert link_running(events[1].flags)
    assert not link_running(0x1003)  # up, no carrier


def test_vip_behind_node_address():
    vip = Vip(I("10.0.0.50/32"))
    node, other = KernelAddress(I("10.0.0.1/24"), 0x80, None), KernelAddress(I("10.0.0.9/24"), IFA_F_SECONDARY, None)
    mine = KernelAddress(I("10.0.0.50/32"), 0, 30)
    assert not _behind_node_address(vip, [node, mine], [vip])
    assert _behind_node_address(vip, [mine, node], [vip])  # kube-vip #682
    assert not _behind_node_address(vip, [mine, other], [vip])  # a secondary is nobody's node IP
    assert not _behind_node_address(Vip(I("fd00::50/128")), [], [])


class FakeKernel:
    """Records set/delete calls; the 'kernel' is a dict of present addresses."""

    def __init__(self) -> None:
        self.present: dict[str, int | None] = {}
        self.calls: list[tuple[float, str, str, int | None]] = []

    async def set_address(self, ifindex: int, vip: Vip, lifetime: Lifetime) -> None:
        self.calls.append((trio.current_time(), "set", str(vip), lifetime.seconds))
        self.present[str(vip)] = lifetime.seconds

    async def delete_address(self, ifindex: int, vip: Vip) -> bool:
        self.calls.append((trio.current_time(), "del", str(vip), None))
        return self.present.pop(str(vip), "gone") != "gone"

    async def addresses(self, ifindex=None):
        return [(ifindex, KernelAddress(I(a), 0, v)) for a, v in self.present.items()]


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_leadership_rules(mock_clock):
    cfg = load(environ={}, flags={"vip.address": ["10.0.0.50"], "election.backend": "none",
                                  "proxy.enabled": False})
    state = RuntimeState(node="n1")
    kernel, changes = FakeKernel(), Fanout()
    rx = changes.subscribe()
    mgr = AddressManager(cfg, state, kernel, changes, "eth0", 2)
    now = trio.current_time()
    await mgr.on_leadership(Leadership(True, "n1", 5, safe_until=now + 3, fence_until=now + 4.5))
    assert kernel.present == {"10.0.0.50/32": 2} and state.vips[0].present
    assert rx.receive_nowait().present
    # a renew refreshes the lifetime, says nothing new to the announcer
    await mgr.on_leadership(Leadership(True, "n1", 5, safe_until=now + 13, fence_until=now + 14.5))
    assert kernel.calls[-1][1:] == ("set", "10.0.0.50/32", 11)
    with pytest.raises(trio.WouldBlock):
        rx.receive_nowait()
    # an older term is ignored
    await mgr.on_leadership(Leadership(False, "n2", 4))
    assert mgr.leader and kernel.present
    # the userspace fence: no renew before safe_until → announcer stopped, then address removed
    await trio.sleep_until(mgr.deadline)
    await mgr.reconcile()
    assert not rx.receive_nowait().present
    assert kernel.present == {} and not state.vips[0].present and not mgr.leader
    # a leader event that arrives already expired does not add
    late = trio.current_time()
    await mgr.on_leadership(Leadership(True, "n1", 6, safe_until=late - 0.1, fence_until=late + 1))
    assert kernel.present == {}


async def test_missing_interface_is_a_config_error():
    # read-only: looks the name up in this (host) namespace and stops before any change
    cfg = load(environ={}, flags={"vip.address": ["10.0.0.50"], "vip.interface": "vwnope0",
                                  "election.backend": "none", "proxy.enabled": False})
    with trio.fail_after(10), pytest.raises(ConfigError) as info:
        await run_address_task(cfg, RuntimeState(node="n1"), Fanout().subscribe(), Fanout())
    assert "'vwnope0' does not exist; expected one of" in str(info.value)
    assert "lo" in str(info.value).split("expected one of ")[1].split(", ")  # every real interface, lo too
    assert info.value.problems[0].startswith("vip.interface (flag --interface)")
