"""Observers: who holds the VIP (every few ms, in every node namespace) and what a client sees.

Owns: ``HolderSampler`` — one rtnetlink socket per node namespace (opened inside it once,
then used from one thread), an ``RTM_GETADDR`` dump per namespace per sample, and the record
of every sample with more than one holder; ``ClientProbe`` — from the client namespace, a
non-blocking TCP connect to VIP:port started every 20 ms, each with its own deadline, so one
hung attempt never delays the next; outage = the longest gap between two consecutive
successful connects (when each completed: an attempt whose SYN was lost and retransmitted a
second later succeeds a second late, and must not count as a success at the time it started).

Must never: write to the kernel (dump requests only), or send traffic anywhere but the VIP.
Times are ``time.monotonic()`` seconds, comparable across both observers.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from vipd.lab import nsutil

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _ipv4_addresses(sock: socket.socket, seq: int) -> set[bytes]:
    """One RTM_GETADDR dump (IPv4) on ``sock``: the set of local addresses, packed."""
    body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    found: set[bytes] = set()
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size:
                raise nsutil.LabError("netlink: malformed message")
            if mseq == seq:
                if mtype == NLMSG_DONE:
                    return found
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    if code:
                        raise nsutil.LabError(f"netlink dump failed: {errno.errorcode.get(-code, code)}")
                if mtype == RTM_NEWADDR:
                    a = off + _NLMSGHDR.size + _IFADDRMSG.size
                    end = off + length
                    while a + _RTATTR.size <= end:
                        alen, atype = _RTATTR.unpack_from(data, a)
                        if alen < _RTATTR.size:
                            break
                        if atype in (IFA_LOCAL, IFA_ADDRESS):
                            found.add(bytes(data[a + 4 : a + alen]))
                        a += (alen + 3) & ~3
            off += (length + 3) & ~3


@dataclass
class Sample:
    t: float
    holders: tuple[str, ...]


@dataclass
class HolderSampler:
    """Samples, every ``interval`` seconds, which node namespaces hold ``vip``."""

    namespaces: dict[str, str]  # node → namespace name
    vip: str
    interval: float = 0.005
    samples: list[Sample] = field(default_factory=list)
    max_gap: float = 0.0  # longest time between two samples (the sampler's own stalls)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        self._vip = socket.inet_aton(self.vip)
        self._socks: dict[str, socket.socket] = {}
        for node, ns in self.namespaces.items():
            with nsutil.entered(ns):
                self._socks[node] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._seq = 0

    def sample_once(self) -> Sample:
        holders = []
        for node, sock in self._socks.items():
            self._seq += 1
            if self._vip in _ipv4_addresses(sock, self._seq):
                holders.append(node)
        return Sample(time.monotonic(), tuple(holders))

    def start(self) -> HolderSampler:
        self._thread = threading.Thread(target=self._loop, name="holder-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            last = None
            while not self._stop.is_set():
                s = self.sample_once()
                self.samples.append(s)
                if last is not None:
                    self.max_gap = max(self.max_gap, s.t - last)
                last = s.t
                self._stop.wait(self.interval)
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for sock in self._socks.values():
            sock.close()
        if self._error:
            raise nsutil.LabError(f"sampler failed: {self._error}") from self._error

    # --- reading the record -------------------------------------------------------------------

    def since(self, t0: float) -> list[Sample]:
        return [s for s in list(self.samples) if s.t >= t0]

    def split_brain(self, t0: float = 0.0) -> list[Sample]:
        """Samples (after ``t0``) in which more than one namespace held the VIP."""
        return [s for s in self.since(t0) if len(s.holders) > 1]

    def current(self) -> tuple[str, ...]:
        return self.samples[-1].holders if self.samples else ()

    def wait_for(self, predicate, timeout: float, since: float | None = None) -> Sample | None:
        """First sample whose holders satisfy ``predicate``, taken from now on (or from the
        monotonic time ``since``, looking back first); None after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = len(self.samples)
        if since is not None:
            seen = next((i for i, s in enumerate(list(self.samples)) if s.t >= since), seen)
        while time.monotonic() < deadline:
            while seen < len(self.samples):
                s = self.samples[seen]
                seen += 1
                if predicate(s.holders):
                    return s
            if self._error or not (self._thread and self._thread.is_alive()):
                raise nsutil.LabError(f"sampler stopped: {self._error}")
            time.sleep(0.005)
        return None


@dataclass
class Attempt:
    t: float  # when the connect was started
    ok: bool
    took: float


@dataclass
class ClientProbe:
    """Starts a TCP connect to ``host:port`` from namespace ``ns`` every ``interval`` s."""

    ns: str
    host: str
    port: int
    interval: float = 0.020
    timeout: float = 1.0
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self) -> ClientProbe:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="client-probe", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def _loop(self, ready: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        try:
            nsutil.enter(self.ns)  # this thread only; it ends with the probe
            ready.set()
            next_start = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_start:
                    self._launch(sel, now)
                    next_start += self.interval
                    if next_start < now:  # we stalled: do not burst to catch up
                        next_start = now + self.interval
                timeout = max(0.0, min(next_start - time.monotonic(), 0.005))
                for key, _ in sel.select(timeout):
                    self._finish(sel, key.fileobj, key.data)
                now = time.monotonic()
                for key in list(sel.get_map().values()):
                    if now - key.data > self.timeout:
                        self._close(sel, key.fileobj, key.data, ok=False)
        except BaseException as exc:
            self._error = exc
            ready.set()
        finally:
            for key in list(sel.get_map().values()):
                self._close(sel, key.fileobj, key.data, ok=False)
            sel.close()

    def _launch(self, sel: selectors.BaseSelector, now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no TIME_WAIT
        err = s.connect_ex((self.host, self.port))
        if err in (0, errno.EINPROGRESS):
            sel.register(s, selectors.EVENT_WRITE, now)
        else:
            self.attempts.append(Attempt(now, False, 0.0))
            s.close()

    def _finish(self, sel: selectors.BaseSelector, s, started: float) -> None:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._close(sel, s, started, ok=(err == 0))

    def _close(self, sel: selectors.BaseSelector, s, started: float, *, ok: bool) -> None:
        sel.unregister(s)
        s.close()
        self.attempts.append(Attempt(started, ok, time.monotonic() - started))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self._error:
            raise nsutil.LabError(f"probe failed: {self._error}") from self._error

    # --- reading the record -------------------------------------------------------------------

    def outage(self, t0: float, t1: float) -> float:
        """Longest gap between consecutive successful connects (completion times) that
        overlaps [t0, t1].

        In steady state this is the probe interval (20 ms); it counts from the last success
        before the event to the first success after it.
        """
        oks = sorted(a.t + a.took for a in list(self.attempts) if a.ok)
        worst = 0.0
        for a, b in zip(oks, oks[1:], strict=False):
            if b >= t0 and a <= t1:
                worst = max(worst, b - a)
        before = [t for t in oks if t <= t0]
        after = [t for t in oks if t >= t0]
        if not after:  # never recovered within the record
            return float("inf")
        if not before:
            worst = max(worst, after[0] - t0)
        return worst

    def last_ok(self) -> float | None:
        oks = [a.t for a in list(self.attempts) if a.ok]
        return oks[-1] if oks else None

    def wait_ok(self, timeout: float, after: float | None = None) -> bool:
        """Wait for a successful attempt started after ``after`` (default: now)."""
        after = time.monotonic() if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.last_ok()
            if last is not None and last >= after:
                return True
            time.sleep(0.01)
        return False
