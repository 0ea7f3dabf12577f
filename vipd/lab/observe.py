"""Observers: who holds the VIP (in every node namespace, no change missed) and what a client sees.

Owns: ``HolderSampler`` — the lab-side half of the holder watcher (``watch``): it starts the
watcher process in the switch namespace, reads its records into a time-ordered record of
``Sample``s (periodic dumps every 5 ms and the state after every address event, in kernel
order), and answers questions about that record (split brain in a window, longest gap
between dumps, whether the event stream lost anything, waiting for a holder condition);
``ClientProbe`` — from the client namespace, a non-blocking TCP connect to VIP:port started
every 20 ms, each with its own deadline, so one hung attempt never delays the next;
outage = the longest gap between two consecutive successful connects (when each completed:
an attempt whose SYN was lost and retransmitted a second later succeeds a second late, and
must not count as a success at the time it started).

Must never: write to the kernel, or send traffic anywhere but the VIP.
Times are ``time.monotonic()`` seconds, comparable across both observers and the watcher.
"""

from __future__ import annotations

import bisect
import errno
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vipd.lab import nsutil

DUMP_EVERY = 0.005  # the watcher's dump interval
DUMP_BOUND = 0.010  # issue 7: "a sampler checks every <= 10 ms"


@dataclass
class Sample:
    t: float
    holders: tuple[str, ...]
    kind: str = "dump"  # "dump": a periodic dump; "event": the state after an address event


def nsids(switch: str, namespaces: dict[str, str]) -> dict[str, int]:
    """The nsid of each node namespace as seen from the switch namespace (assigning missing ones)."""
    def listed() -> dict[str, int]:
        out = nsutil.run(["ip", "-n", switch, "netns", "list-id"]).stdout
        ids = {}
        for line in out.splitlines():  # "nsid 0 (iproute2 netns name: vl12ab-n1)"
            words = line.replace("(", " ").replace(")", " ").split()
            if len(words) >= 2 and words[0] == "nsid" and words[-1] in namespaces.values():
                ids[words[-1]] = int(words[1])
        return ids

    ids = listed()
    for ns in namespaces.values():
        if ns not in ids:
            nsutil.run(["ip", "-n", switch, "netns", "set", ns, "auto"])
    ids = listed()
    missing = [ns for ns in namespaces.values() if ns not in ids]
    if missing:
        raise nsutil.LabError(f"no nsid for {', '.join(missing)} in {switch}")
    return {node: ids[ns] for node, ns in namespaces.items()}


@dataclass
class HolderSampler:
    """Which node namespaces hold ``vip``: dumps every 5 ms plus every address event."""

    namespaces: dict[str, str]  # node → namespace name
    vip: str
    switch: str  # the namespace the watcher runs in (listens to all node namespaces from there)
    log_path: Path
    interval: float = DUMP_EVERY
    samples: list[Sample] = field(default_factory=list)
    overruns: list[float] = field(default_factory=list)  # times the event queue overflowed
    realtime: bool = False  # the watcher got SCHED_FIFO
    ended: float | None = None  # when the watcher's output ended
    _times: list[float] = field(default_factory=list)
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> HolderSampler:
        ids = nsids(self.switch, self.namespaces)
        cmd = ["ip", "netns", "exec", self.switch, sys.executable, "-m", "vipd.lab.watch",
               "--vip", self.vip, "--interval", str(self.interval)]
        for node, ns in self.namespaces.items():
            cmd += ["--node", f"{node}={ns}={ids[node]}"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=log, start_new_session=True)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(ready,), name="holder-reader", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self.ended is not None:
            self.stop()
            raise nsutil.LabError(f"holder watcher did not start; see {self.log_path}")
        return self

    def _read(self, ready: threading.Event) -> None:
        nodes = list(self.namespaces)
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                kind, t_text, *rest = line.split()
                t = float(t_text)
                if kind in (b"D", b"E"):
                    mask = int(rest[0])
                    s = Sample(t, tuple(n for i, n in enumerate(nodes) if mask >> i & 1),
                               "dump" if kind == b"D" else "event")
                    self._times.append(t)  # times first: readers bisect on them, then index samples
                    self.samples.append(s)
                elif kind == b"O":
                    self.overruns.append(t)
                elif kind == b"R":
                    self.realtime = rest[0] == b"1"
                    ready.set()
        except BaseException as exc:  # surfaced by stop() and wait_for()
            self._error = exc
        finally:
            self.ended = time.monotonic()
            ready.set()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._thread:
            self._thread.join(5)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._error:
            raise nsutil.LabError(f"holder watcher failed: {self._error}") from self._error

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self.ended is None and self._error is None

    # --- reading the record -------------------------------------------------------------------

    def _index(self, t: float) -> int:
        """Index of the first sample taken at or after ``t``."""
        return bisect.bisect_left(self._times, t, 0, len(self.samples))

    def since(self, t0: float, t1: float | None = None) -> list[Sample]:
        n = len(self.samples)
        return self.samples[self._index(t0) : n if t1 is None else bisect.bisect_right(self._times, t1, 0, n)]

    def split_brain(self, t0: float = 0.0, t1: float | None = None) -> list[Sample]:
        """Samples in [t0, t1] in which more than one namespace held the VIP; also the event
        state in force at ``t0`` when it had two holders (it lasts until the next event)."""
        bad = [s for s in self.since(t0, t1) if len(s.holders) > 1]
        carried = next((s for s in reversed(self.samples[: self._index(t0)]) if s.kind == "event"), None)
        if carried is not None and len(carried.holders) > 1:
            bad.insert(0, carried)
        return bad

    def max_gap(self, t0: float = 0.0, t1: float | None = None) -> float:
        """Longest time between two consecutive dumps that overlaps [t0, t1]."""
        start = self._index(t0)
        before = next((i for i in range(start - 1, -1, -1) if self.samples[i].kind == "dump"), start)
        dumps = [s.t for s in self.samples[before:] if s.kind == "dump" and (t1 is None or s.t <= t1)]
        return max((b - a for a, b in zip(dumps, dumps[1:], strict=False)), default=0.0)

    def events_complete(self, t0: float, t1: float) -> bool:
        """No event was lost in [t0, t1] and the watcher ran through it."""
        return not any(t0 <= t <= t1 for t in self.overruns) and (self.ended is None or self.ended >= t1)

    def current(self) -> tuple[str, ...]:
        return self.samples[-1].holders if self.samples else ()

    def wait_for(self, predicate, timeout: float, since: float | None = None) -> Sample | None:
        """First sample whose holders satisfy ``predicate``, taken from now on (or from the
        monotonic time ``since``, looking back first); None after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = len(self.samples) if since is None else self._index(since)
        while True:
            while seen < len(self.samples):
                s = self.samples[seen]
                seen += 1
                if predicate(s.holders):
                    return s
            if time.monotonic() >= deadline:
                return None
            if not self.alive:
                raise nsutil.LabError(f"holder watcher stopped: {self._error or 'it exited'}; see {self.log_path}")
            time.sleep(0.005)


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
