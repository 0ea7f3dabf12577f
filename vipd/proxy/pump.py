"""The zero-copy pump: moves the bytes of every established proxied connection.

Owns: the pipe pool (non-blocking pipes sized with F_SETPIPE_SZ, held only while bytes are in
flight, never returned to the pool holding bytes), the ``Reactor`` (one epoll set for every
established connection's two sockets, waited on by a dedicated OS thread blocking in
``epoll_wait`` that the trio task ``Reactor.run`` starts and stops, plus a timer heap for
connect, idle and half-close timeouts), and the
``Session`` state machine of one connection: splice socket→pipe→socket each way (or
recv_into/send where splice is unavailable), EOF forwarded as shutdown(SHUT_WR) while the
other direction keeps flowing, resets propagated with SO_LINGER 0, socket tuning
(TCP_NODELAY, keep-alive). Socket errors are translated here, once.

Must never: choose backends, log, block, or raise out of an event callback or a timer (an error
closes its owner only: that session, connect or listener). No SPLICE_F_MORE (it delays small
messages by up to 200 ms).

Why a reactor instead of two trio tasks per connection: a trio wait re-arms epoll (one
epoll_ctl) on every wake and costs a task switch; on the request/response path those were most
of the difference to HAProxy, and two tasks per idle connection cost ~10 KB. Here the sockets
are registered once, level-triggered, and the interest set changes only when a destination
blocks or a source ends; an idle connection is two dict entries and three small objects.
Why a thread: waiting for the epoll fd through trio cost three syscalls per wake (trio's
epoll_ctl re-arm and epoll_wait, then ours) plus a scheduler round in Python; the thread makes
one epoll_wait per wake, like HAProxy. Trio keeps health checks, discovery, logging and the
drain; the two meet under ``Reactor.lock`` (see the class).

Theory of operation (HAProxy src/raw_sock.c): a splice from a socket into a pipe returns EAGAIN
both when the socket is empty and when the pipe is full, so each direction counts the bytes it
put in its pipe (``in_pipe``). A direction reads only with an empty pipe (so EAGAIN on read
means "socket empty"), then drains the pipe into the destination. If the destination would
block, the direction stops listening on its source and listens for the destination becoming
writable instead; once the pipe is empty again it goes back to the source. One read per event
is enough: the epoll set is level-triggered, so a socket with more data is reported again on
the next round, and a short read never needs a second splice that would return EAGAIN. The
pipe is released as soon as it is empty: idle connections hold no pipe. A pipe interrupted
while holding bytes (reset, close, timeout) is closed, never pooled. Reads shorter than 16 KiB
(requests, watch events) are not spliced at all: they are read into one buffer shared by all
connections and sent at once (cheaper than two splices for small messages, HAProxy's
splice-auto idea); a full buffer switches the direction to splicing, a short splice back.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from vipd.proxy.rawfd import abort, shutdown_write, so_error

readv, write = os.readv, os.write

PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_COPY_SIZE = 64 * 1024
_SMALL = 16 * 1024  # reads shorter than this are copied (recv/send), longer ones spliced
_BULK = 256 * 1024  # a read this large suggests more is queued: read again at once...
_BULK_READS = 4  # ...up to this many times per event
_RDHUP = select.EPOLLRDHUP
# Sessions listen with RDHUP too: a peer's FIN reported with the data lets a short read end
# the direction without one more recv() that returns 0 (HAProxy does the same).
_IN, _OUT = select.EPOLLIN | _RDHUP, select.EPOLLOUT
_ERR = select.EPOLLERR
_MAX_EVENTS = 512


def _max_pipe_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 65536


class PipePool:
    """Pooled non-blocking pipes of ``size`` bytes. ``held`` counts pipes out on loan; at most
    ``keep`` idle pipes are kept open for reuse."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = 16, use_splice: bool | None = None) -> None:
        self.size = min(size, _max_pipe_size())
        self.keep = keep
        self.held = 0
        self._idle: list[tuple[int, int]] = []
        self.splice = hasattr(os, "splice") if use_splice is None else use_splice
        # Small reads go through this one buffer (send() at once), not through a pipe.
        self.scratch = bytearray(_SMALL if self.splice else _COPY_SIZE)
        self.scratch_view = memoryview(self.scratch)
        self.scratch_list = [self.scratch]  # os.readv's argument, built once
        if self.splice:
            try:  # probe once: size the pipe, and find out whether this kernel/Python splices
                self.release(self.acquire())
            except OSError:
                self.splice = False

    @property
    def open_pipes(self) -> int:
        return self.held + len(self._idle)

    def acquire(self) -> tuple[int, int]:
        self.held += 1
        if self._idle:
            return self._idle.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self.held -= 1
            raise
        try:
            self.size = min(self.size, fcntl.fcntl(w, _F_SETPIPE_SZ, self.size))
        except OSError:
            pass  # keep the kernel's default size; correctness does not depend on it
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Give back an EMPTY pipe."""
        self.held -= 1
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may hold bytes (interrupted transfer)."""
        self.held -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        while self._idle:
            r, w = self._idle.pop()
            os.close(r)
            os.close(w)


def tune(sock: socket.socket, keepalive_idle: int = 60) -> None:
    """TCP_NODELAY and keep-alive (first probe after ``keepalive_idle`` s). Set on a listener,
    accepted sockets inherit them, so the client leg costs no syscall per connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
    except (AttributeError, OSError):
        pass


class Broken(Exception):
    """A peer reset or vanished; ``fd`` is the socket whose peer broke."""

    def __init__(self, fd: int, exc: OSError | None = None) -> None:
        super().__init__(str(exc))
        self.fd = fd
        self.errno = exc.errno if exc is not None else None


class _Direction:
    """One direction of a session: src → pipe → dst."""

    __slots__ = ("sfd", "dfd", "pipe", "in_pipe", "eof", "blocked", "stats", "inbound", "buf",
                 "bulk", "other")

    def __init__(self, sfd: int, dfd: int, stats: Any, inbound: bool) -> None:
        self.sfd, self.dfd = sfd, dfd
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.eof = False  # src sent FIN and it was forwarded (dst shut for writing)
        self.blocked = False  # bytes wait in the pipe for dst to become writable
        self.stats = stats  # BackendState: bytes_in (client → backend) / bytes_out
        self.inbound = inbound
        self.buf: bytes | memoryview | None = None  # copy path: the unsent tail
        self.bulk = False  # splice (True) or copy small reads through the shared buffer

    def read(self, pipes: PipePool, hup: int = 0) -> None:
        """src is readable (and our pipe is empty): read, then drain. Bulk keeps going while
        reads are large and the destination keeps up (fewer reactor rounds per MiB). ``hup``:
        epoll saw the peer's FIN (EPOLLRDHUP)."""
        if not self.bulk:
            self._recv(pipes, hup)
            return
        for _ in range(_BULK_READS):
            try:
                pipe = pipes.acquire()
            except OSError:  # no fd for a pipe (EMFILE): copy this read instead of failing
                self.bulk = False
                self._recv(pipes, hup)
                return
            try:
                n = os.splice(self.sfd, pipe[1], pipes.size, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                pipes.release(pipe)
                return
            except OSError as exc:
                pipes.release(pipe)
                raise Broken(self.sfd, exc) from exc
            if n == 0:
                pipes.release(pipe)
                self._forward_eof()
                return
            if n < _SMALL:
                self.bulk = False  # back to copying: small messages are cheaper through send()
            self.pipe, self.in_pipe = pipe, n
            self.drain(pipes)
            if self.blocked or n < _BULK:
                return

    def drain(self, pipes: PipePool) -> None:
        """Move what the pipe holds into dst; on EAGAIN stay blocked (caller re-arms)."""
        if self.buf is not None:
            self._send()
            return
        pr = self.pipe[0]  # type: ignore[index]
        while self.in_pipe:
            try:
                m = os.splice(pr, self.dfd, self.in_pipe, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                self.blocked = True
                return
            except OSError as exc:
                raise Broken(self.dfd, exc) from exc
            self.in_pipe -= m
            if self.inbound:
                self.stats.bytes_in += m
            else:
                self.stats.bytes_out += m
        self.blocked = False
        pipes.release(self.pipe)  # type: ignore[arg-type]
        self.pipe = None

    def _recv(self, pipes: PipePool, hup: int = 0) -> None:
        """Copy path: read into the pool's shared buffer and send at once; only an unsent tail
        is kept (copied) per connection. A full buffer means bulk: splice from now on."""
        scratch = pipes.scratch
        try:
            n = readv(self.sfd, pipes.scratch_list)
        except BlockingIOError:
            return
        except OSError as exc:
            raise Broken(self.sfd, exc) from exc
        if n == 0:
            self._forward_eof()
            return
        if n == len(scratch) and pipes.splice:
            self.bulk = True
        view = pipes.scratch_view
        try:
            m = write(self.dfd, view[:n])
        except BlockingIOError:
            m = 0
        except OSError as exc:
            raise Broken(self.dfd, exc) from exc
        if m:
            if self.inbound:
                self.stats.bytes_in += m
            else:
                self.stats.bytes_out += m
        if m < n:
            self.buf = bytes(view[m:n])
            self.blocked = True
        elif hup and n < len(scratch):
            # The FIN was already in when epoll reported, and a short read emptied the queue:
            # the next read would return 0, so forward the EOF now (one recv saved).
            self._forward_eof()

    def _send(self) -> None:
        while self.buf is not None:
            try:
                m = write(self.dfd, self.buf)
            except BlockingIOError:
                self.blocked = True
                return
            except OSError as exc:
                raise Broken(self.dfd, exc) from exc
            if self.inbound:
                self.stats.bytes_in += m
            else:
                self.stats.bytes_out += m
            self.buf = self.buf[m:] if m < len(self.buf) else None
        self.blocked = False

    def _forward_eof(self) -> None:
        self.eof = True
        if self.other.eof:
            return  # both directions are done: the close that follows sends our FIN
        err = shutdown_write(self.dfd)
        if err:  # ENOTCONN: the destination was already reset
            raise Broken(self.dfd, OSError(-err, os.strerror(-err)))

    def release(self, pipes: PipePool) -> None:
        if self.pipe is not None:
            if self.in_pipe:
                pipes.discard(self.pipe)
            else:
                pipes.release(self.pipe)
            self.pipe = None
        self.buf = None


class Session:
    """One established proxied connection, driven by the reactor's events."""

    __slots__ = ("reactor", "cfd", "ufd", "up", "down", "masks", "closed",
                 "on_close", "tag", "last", "timer", "half", "reason")

    def __init__(
        self,
        reactor: Reactor,
        cfd: int,
        ufd: int,
        stats: Any,
        on_close: Callable[[Session], None],
        tag: Any = None,
    ) -> None:
        """``cfd`` and ``ufd``: the client's and the backend's connected, non-blocking socket
        fds, owned by the session from now on (it closes them)."""
        self.reactor = reactor
        self.cfd, self.ufd = cfd, ufd
        self.up = _Direction(cfd, ufd, stats, True)  # client → backend
        self.down = _Direction(ufd, cfd, stats, False)  # backend → client
        self.up.other, self.down.other = self.down, self.up
        self.masks = [0, 0]  # registered interest: [client, upstream]
        self.closed = False
        self.on_close = on_close
        self.tag = tag  # the caller's (the backend)
        self.last = 0.0  # last activity (idle timeout only)
        self.timer: list[Any] | None = None
        self.half = False  # a direction finished: the half-close timer runs
        self.reason = ""

    # -- events ---------------------------------------------------------------------------

    def event(self, fd: int, ev: int) -> None:
        reactor = self.reactor
        pipes = reactor.pipes
        if reactor.idle_timeout:
            self.last = reactor.now
        if ev & _ERR:
            err = so_error(fd) or errno.ECONNRESET
            raise Broken(fd, OSError(err, os.strerror(err)))
        if fd == self.cfd:
            rd, wr = self.up, self.down
        else:
            rd, wr = self.down, self.up
        if ev & _OUT and wr.blocked:
            wr.drain(pipes)
        if ev & ~_OUT and not rd.blocked and not rd.eof:  # IN, HUP, RDHUP
            rd.read(pipes, ev & _RDHUP)
        if self.up.eof and self.down.eof:
            self.close("done")
            return
        self.rearm()

    def rearm(self) -> None:
        up, down = self.up, self.down
        cm = (0 if up.eof or up.blocked else _IN) | (_OUT if down.blocked else 0)
        um = (0 if down.eof or down.blocked else _IN) | (_OUT if up.blocked else 0)
        masks = self.masks
        ep = self.reactor.epoll
        if cm != masks[0]:
            ep.modify(self.cfd, cm)
            masks[0] = cm
        if um != masks[1]:
            ep.modify(self.ufd, um)
            masks[1] = um
        if (up.eof or down.eof) and not self.half:
            # Half-closed: the other direction gets half_close_timeout to finish (it replaces
            # the idle timer: a half-closed connection cannot outlive it by being busy).
            self.half = True
            if self.timer is not None:
                self.timer[2] = None
                self.timer = None
            if self.reactor.half_close_timeout:
                self.timer = self.reactor.call_later(self.reactor.half_close_timeout, self._half_close_expired)

    def _half_close_expired(self) -> None:
        self.timer = None
        if not self.closed:
            self.close("half-close timeout")

    def _idle_check(self) -> None:
        self.timer = None
        if self.closed:
            return
        due = self.last + self.reactor.idle_timeout
        if due <= self.reactor.now:
            self.close("idle timeout")
        elif not self.half:
            self.timer = self.reactor.call_at(due, self._idle_check)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self, reason: str, reset: int = -1) -> None:
        """Release pipes, close both sockets (the fd ``reset`` with RST), tell the owner.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        reactor = self.reactor
        reactor.forget(self)
        if self.timer is not None:
            self.timer[2] = None  # cancelled
            self.timer = None
        up, down = self.up, self.down
        up.release(reactor.pipes)
        down.release(reactor.pipes)
        up.other = down.other = None  # no reference cycle: freed now, not by the cyclic GC
        for fd in (self.cfd, self.ufd):
            if fd == reset:
                abort(fd)
            else:
                os.close(fd)
        self.on_close(self)


class Reactor:
    """Every established session's sockets in one level-triggered epoll set, waited on by a
    dedicated OS thread blocking in ``epoll_wait`` (``run`` starts it from trio and stops it
    when cancelled); events and timers are dispatched in that thread under ``lock``.

    Threading rules: the reactor thread holds ``lock`` (a re-entrant lock) whenever it runs
    Python on the proxy's state, and releases it only while blocked in ``epoll_wait``. Code
    running in trio that touches sessions, the watched fds, the timers, the backend pool or the
    counters it shares with the thread takes ``lock`` first (the proxy's ``observe``,
    ``update_backends``, listener changes, the drain). The thread never waits for trio: what it
    needs done there (set a trio.Event, start a task) goes through ``to_trio`` (the trio
    token's thread-safe ``run_sync_soon``). Counters are plain ints written only under the
    lock, so status (trio, read-only) sees whole values."""

    def __init__(self, pipes: PipePool, *, idle_timeout: float = 0.0, half_close_timeout: float = 0.0) -> None:
        self.pipes = pipes
        self.epoll = select.epoll()
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.sessions: dict[int, Any] = {}  # fd → Session (both fds) or a watched handler
        self.count = 0
        self.now = 0.0
        self.lock = threading.RLock()
        self._timers: list[list[Any]] = []
        self._seq = itertools.count()
        self._next_wake = 0.0  # when the thread's current epoll_wait times out (inf: never)
        self._thread: int | None = None  # the reactor thread's ident while it runs
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.watch(self._wake, self, _IN)
        self.on_error: Callable[[Session, BaseException], None] | None = None

    def add(self, session: Session, upstream_watched: bool = False) -> None:
        """Start driving an established session (both sockets non-blocking). With
        ``upstream_watched`` the upstream fd is already in the set (its connect was watched)."""
        self.sessions[session.cfd] = session
        self.sessions[session.ufd] = session
        self.count += 1
        self.epoll.register(session.cfd, _IN)
        if upstream_watched:
            self.epoll.modify(session.ufd, _IN)
        else:
            self.epoll.register(session.ufd, _IN)
        session.masks[0] = session.masks[1] = _IN
        if self.idle_timeout:
            self.now = time.monotonic()
            session.last = self.now
            session.timer = self.call_later(self.idle_timeout, session._idle_check)

    def forget(self, session: Session) -> None:
        """Before closing a session's sockets (closing removes them from the epoll set)."""
        self.sessions.pop(session.cfd, None)
        self.sessions.pop(session.ufd, None)
        self.count -= 1

    def watch(self, fd: int, handler: Any, mask: int) -> None:
        """Send ``fd``'s events to ``handler.event(fd, ev)`` (e.g. a connect in progress)."""
        self.sessions[fd] = handler
        self.epoll.register(fd, mask)

    def unwatch(self, fd: int) -> None:
        if self.sessions.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def call_at(self, when: float, fn: Callable[[], None]) -> list[Any]:
        """Run ``fn`` in the reactor thread at ``when`` (time.monotonic()); returns the entry,
        whose [2] set to None cancels it. From outside the thread: hold ``lock``."""
        entry = [when, next(self._seq), fn]
        heapq.heappush(self._timers, entry)
        if when < self._next_wake and threading.get_ident() != self._thread:
            self._next_wake = when
            os.eventfd_write(self._wake, 1)  # the thread sleeps past it: wake it to re-arm
        return entry

    def call_later(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        return self.call_at(time.monotonic() + delay, fn)

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in trio's thread soon (from either thread; never blocks)."""
        if self._token is None:
            fn(*args)
        else:
            self._token.run_sync_soon(fn, *args)

    def event(self, fd: int, ev: int) -> None:
        """The wake-up eventfd fired (stop, or a timer added from trio): consume it."""
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass

    def close(self, reason: str) -> None:
        """close_all() reaches the eventfd's entry too; it is closed with the epoll set."""

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.close(reason)  # Session or a watched handler (connect in progress)

    def _fail(self, owner: Any, exc: BaseException) -> None:
        """An event handler or timer of ``owner`` (a Session, a connect in progress, a
        listener; None: nobody) raised: close the owner, report anything but a peer's reset.
        Never raises: the reactor thread must outlive any one connection's failure."""
        try:
            if isinstance(exc, Broken) and isinstance(owner, Session):
                # The survivor gets a reset too (SO_LINGER 0 on close).
                other = owner.ufd if exc.fd == owner.cfd else owner.cfd
                owner.close(f"reset: {exc}", reset=other)
                return
            if owner is not None:
                owner.close(f"error: {type(exc).__name__}: {exc}")
        except Exception as again:  # closing failed too: report that one
            exc = again
        if self.on_error is not None:
            try:
                self.on_error(owner, exc)
            except Exception:
                pass

    def _fire_timers(self) -> None:
        timers = self._timers
        self.now = now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, fn = heapq.heappop(timers)
            if fn is not None:
                try:
                    fn()
                except Exception as exc:  # contain, as for events: the timer's owner pays
                    self._fail(getattr(fn, "__self__", None), exc)
        while timers and timers[0][2] is None:
            heapq.heappop(timers)

    async def run(self) -> None:
        """Run the reactor thread until cancelled (then wake it through the eventfd and wait
        for it to return: shutdown stays structured); closes every session on the way out."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                # A limiter of its own: the thread lives as long as the proxy and must not hold
                # one of trio's default thread tokens (getaddrinfo needs those).
                await trio.to_thread.run_sync(self._loop, abandon_on_cancel=False,
                                              limiter=trio.CapacityLimiter(1),
                                              thread_name="vipd proxy reactor")
                nursery.cancel_scope.cancel()
        finally:
            with self.lock:  # the thread has returned; trio callers may still hold the lock
                self._thread = None
                self.close_all("proxy stopped")
            self.epoll.close()
            os.close(self._wake)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._stop = True
            os.eventfd_write(self._wake, 1)

    def _arm(self) -> float:
        """Under the lock: note when the next epoll_wait must return (the earliest timer) and
        return its timeout (-1: none)."""
        if self._timers:
            self._next_wake = self._timers[0][0]
            return max(0.0, self._next_wake - time.monotonic())
        self._next_wake = float("inf")
        return -1.0

    def _loop(self) -> None:
        """The reactor thread: one epoll_wait per wake (no trio round in between), dispatch
        under the lock, timers, then block again with the next timer as the timeout."""
        self._thread = threading.get_ident()
        poll = self.epoll.poll
        sessions = self.sessions
        timers = self._timers
        lock = self.lock
        with lock:
            # Timers added from trio before this thread got here did not wake it (it was not
            # waiting yet): start with the earliest as the first timeout.
            timeout = self._arm()
        while True:
            events = poll(timeout, _MAX_EVENTS)
            with lock:
                if self._stop:
                    return
                if self.idle_timeout:
                    self.now = time.monotonic()
                while events:
                    for fd, ev in events:
                        session = sessions.get(fd)
                        if session is None:
                            continue
                        try:
                            session.event(fd, ev)
                        except Exception as exc:  # contain: one session's failure is its own
                            self._fail(session, exc)
                    events = poll(0, _MAX_EVENTS) if len(events) == _MAX_EVENTS else None
                if timers:
                    self._fire_timers()
                timeout = self._arm()
