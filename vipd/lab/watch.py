"""The VIP holder watcher: a process of its own that reports who holds the VIP, in every node
namespace, and misses no change.

Owns: the rtnetlink side of observing the lab (address dumps and address events, parsed here)
and the watcher process (``python -m vipd.lab.watch``, started by ``observe.HolderSampler``
inside the lab's switch namespace). Two observers, one process:

- **dumps**: every ``--interval`` (5 ms) an ``RTM_GETADDR`` dump on one socket per node
  namespace (opened inside it once): the holders "now", at a steady rate;
- **events**: one socket in the switch namespace with ``NETLINK_LISTEN_ALL_NSID``, joined to
  the IPv4 address group, receives every ``RTM_NEWADDR``/``RTM_DELADDR`` of every node
  namespace (each tagged with its nsid) through ONE queue, in the order the kernel made the
  changes (address changes all take the RTNL lock). Replaying them gives the holders after
  every single change, so two holders at once cannot slip between two dumps. A full queue
  (``ENOBUFS``) is reported as an overrun and the state re-read by a dump.

A process of its own, not a thread of the lab: no GIL shared with the probe and the scenario
code, and ``SCHED_FIFO`` priority (root) so a loaded 2-core machine does not stretch the
5 ms steps (without it the in-process sampler showed gaps of 42 ms).

Output, one line per record on stdout (times are ``time.monotonic()``, the same clock as the
lab's, as the node mask's bits in ``--node`` order)::

    R <t> <rt 0|1>     ready: sockets open, initial state read
    D <t> <mask>       a dump (t = when it started)
    E <t> <mask>       the holders after an address event changed them
    O <t>              events were lost (ENOBUFS); the next E comes from a fresh dump

Must never: write to the kernel (dump requests only), or send packets.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import sys
import time

from vipd.lab import nsutil
from vipd.nlmsg import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    RTATTR,
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_NEWADDR,
    error_code,
    messages,
)

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_LISTEN_ALL_NSID = 1, 8
RTNLGRP_IPV4_IFADDR = 5
EVENT_BUFFER = 8 << 20  # bytes of kernel queue for events (SO_RCVBUFFORCE, root)
PIPE_SIZE = 1 << 20

Key = tuple[int, int]  # (ifindex, prefix length) of one VIP address in one namespace


def address_of(payload: bytes) -> tuple[Key, set[bytes]]:
    """An ifaddrmsg: its (ifindex, prefixlen) and its IFA_LOCAL / IFA_ADDRESS values."""
    _family, prefixlen, _flags, _scope, ifindex = IFADDRMSG.unpack_from(payload)
    found: set[bytes] = set()
    a = IFADDRMSG.size
    while a + RTATTR.size <= len(payload):
        alen, atype = RTATTR.unpack_from(payload, a)
        if alen < RTATTR.size:
            break
        if atype in (IFA_LOCAL, IFA_ADDRESS):
            found.add(bytes(payload[a + 4 : a + alen]))
        a += (alen + 3) & ~3
    return (ifindex, prefixlen), found


def dump_keys(sock: socket.socket, seq: int, vip: bytes) -> set[Key]:
    """One RTM_GETADDR dump (IPv4) on ``sock``: where in that namespace ``vip`` is configured."""
    body = IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    keys: set[Key] = set()
    while True:
        for mtype, mseq, payload in messages(sock.recv(65536)):
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return keys
            if mtype == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise nsutil.LabError(f"netlink dump failed: {errno.errorcode.get(code, code)}")
            if mtype == RTM_NEWADDR:
                key, addrs = address_of(payload)
                if vip in addrs:
                    keys.add(key)


class DumpSockets:
    """One rtnetlink socket per node namespace, opened inside it; dumps in node order."""

    def __init__(self, namespaces: dict[str, str], vip: str):
        self.nodes = list(namespaces)
        self.vip = socket.inet_aton(vip)
        self.socks: list[socket.socket] = []
        self._seq = 0
        try:
            for ns in namespaces.values():
                with nsutil.entered(ns):
                    self.socks.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE))
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[set[Key]]:
        out = []
        for sock in self.socks:
            self._seq += 1
            out.append(dump_keys(sock, self._seq, self.vip))
        return out

    def holders(self) -> tuple[str, ...]:
        return tuple(n for n, k in zip(self.nodes, self.keys(), strict=True) if k)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def holders_now(namespaces: dict[str, str], vip: str) -> tuple[str, ...]:
    """Who holds ``vip`` right now (one dump per namespace; for ``vipd lab status``)."""
    socks = DumpSockets(namespaces, vip)
    try:
        return socks.holders()
    finally:
        socks.close()


def _mask(state: list[set[Key]]) -> int:
    return sum(1 << i for i, keys in enumerate(state) if keys)


def _event_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, EVENT_BUFFER)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENT_BUFFER)
    sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_IPV4_IFADDR)
    sock.setblocking(False)
    return sock


def _realtime() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (OSError, AttributeError):
        return False


def _emit(line: str) -> None:
    os.write(1, line.encode() + b"\n")


def run(namespaces: dict[str, str], nsids: dict[int, int], vip: str, interval: float) -> None:
    """The watcher loop (never returns; ends with the process). ``nsids``: nsid → node index."""
    with contextlib.suppress(OSError):  # stdout may not be a pipe
        fcntl.fcntl(1, 1031, PIPE_SIZE)  # F_SETPIPE_SZ: room for seconds of records
    dumps = DumpSockets(namespaces, vip)
    events = _event_socket()  # subscribe before the first dump: no change can fall in between
    rt = _realtime()
    state = dumps.keys()  # event-replayed state: node index → VIP keys there
    _emit(f"R {time.monotonic():.6f} {int(rt)}")
    next_dump = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_dump:
            _emit(f"D {now:.6f} {_mask(dumps.keys())}")
            next_dump += interval
            if next_dump < now:  # we were held up: no burst to catch up
                next_dump = now + interval
        ready, _, _ = select.select([events], [], [], max(0.0, next_dump - time.monotonic()))
        if not ready:
            continue
        while True:
            try:
                data, anc, _flags, _addr = events.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                _emit(f"O {time.monotonic():.6f}")
                state = dumps.keys()
                _emit(f"E {time.monotonic():.6f} {_mask(state)}")
                continue
            nsid = next((struct.unpack("=i", d[:4])[0] for lvl, typ, d in anc
                         if lvl == SOL_NETLINK and typ == NETLINK_LISTEN_ALL_NSID), None)
            node = nsids.get(nsid) if nsid is not None else None
            if node is None:  # the switch's own or a foreign namespace
                continue
            before = _mask(state)
            for mtype, _seq, payload in messages(data):
                if mtype not in (RTM_NEWADDR, RTM_DELADDR):
                    continue
                key, addrs = address_of(payload)
                if dumps.vip not in addrs:
                    continue
                if mtype == RTM_NEWADDR:
                    state[node].add(key)
                else:
                    state[node].discard(key)
            after = _mask(state)
            if after != before:
                _emit(f"E {time.monotonic():.6f} {after}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vipd.lab.watch", description=__doc__.splitlines()[0])
    p.add_argument("--vip", required=True)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--node", action="append", required=True, metavar="NAME=NAMESPACE=NSID",
                   help="a node namespace and its nsid in this (the switch's) namespace")
    args = p.parse_args(argv)
    namespaces: dict[str, str] = {}
    nsids: dict[int, int] = {}
    for i, item in enumerate(args.node):
        name, ns, nsid = item.split("=")
        namespaces[name] = ns
        nsids[int(nsid)] = i
    try:
        run(namespaces, nsids, args.vip, args.interval)
    except BrokenPipeError:  # the lab went away
        return 0
    except nsutil.LabError as exc:
        print(f"watch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
