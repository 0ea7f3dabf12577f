"""Netlink message framing: the header walk and the rtnetlink numbers vipd reads by hand.

Owns: splitting a netlink datagram into (type, sequence, payload) and the constants of the few
rtnetlink messages vipd parses itself (address and link events, acknowledgements, address
dumps). Imports nothing but the standard library, so the lab's holder watcher (a process of
its own at real-time priority) can use it without loading trio.

Must never: do I/O; raise on a truncated datagram (the walk stops there).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 20, 21, 22
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x100, 0x400, 0x300
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, ifindex
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, ifindex, flags, change
RTATTR = struct.Struct("=HH")  # length, type


def messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(type, sequence number, payload) of each netlink message in one datagram."""
    view = memoryview(data)
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            return
        yield kind, seq, view[off + NLMSGHDR.size : off + length]
        off += (length + 3) & ~3


def error_code(payload: memoryview) -> int | None:
    """The errno of an NLMSG_ERROR payload (0: an acknowledgement); None if truncated."""
    if len(payload) < 4:
        return None
    return -struct.unpack_from("=i", payload)[0]
