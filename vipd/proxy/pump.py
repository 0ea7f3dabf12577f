"""The zero-copy pump: moves one direction of a proxied TCP connection with ``os.splice``.

Owns: the pipe pool (non-blocking pipes sized with F_SETPIPE_SZ, held only while bytes are in
flight, never returned to the pool holding bytes), one direction's copy loop (splice
socket→pipe→socket, or recv_into/send where splice is unavailable), forwarding EOF as
shutdown(SHUT_WR), socket tuning (TCP_NODELAY, keep-alive) and abortive close (SO_LINGER 0).
Socket errors are translated here, once, into ``Broken`` naming the side that broke.

Must never: choose backends, log, or swallow ``trio.Cancelled``. No SPLICE_F_MORE (it delays
small messages by up to 200 ms).

Theory of operation (HAProxy src/raw_sock.c): a splice from a socket into a pipe returns
EAGAIN both when the socket is empty and when the pipe is full, so we count the bytes we put
in the pipe (``in_pipe``). This loop always drains the pipe completely into the destination
before reading again, so a read always starts with an empty pipe and EAGAIN on it can only
mean "socket empty": release the (empty) pipe and wait for the socket to become readable. An
idle connection therefore holds no pipe. A pipe that still holds bytes when the transfer is
interrupted (cancel, error) is closed, never pooled, so bytes never leak between connections.
A short read (less than ``_SHORT``) is taken to mean the socket is drained, and we go straight
to waiting instead of paying a splice that would return EAGAIN (the request/response path);
waiting is level-triggered, so data that arrived meanwhile wakes us at once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Callable

import trio

PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SHORT = 64 * 1024  # a read shorter than this means the socket is (very likely) drained
_COPY_SIZE = 64 * 1024
_LINGER_ABORT = struct.pack("ii", 1, 0)

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


class Broken(Exception):
    """The peer on one side reset or vanished. ``side`` is "src" or "dst" of the pump."""

    def __init__(self, side: str, exc: OSError | None = None) -> None:
        super().__init__(f"{side}: {exc}")
        self.side = side
        self.errno = exc.errno if exc is not None else None


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
            got = fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
            self.size = min(self.size, got)
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
    """TCP_NODELAY and keep-alive (probes after ``keepalive_idle`` s, 6 × 10 s) on one leg."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (AttributeError, OSError):
        pass


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): how a reset is propagated to the other side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()


def _shutdown_write(dst: socket.socket) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError as exc:  # ENOTCONN: the destination was already reset
        raise Broken("dst", exc) from exc


async def pump(
    src: socket.socket,
    dst: socket.socket,
    pipes: PipePool,
    count: Callable[[int], None],
) -> None:
    """Copy src → dst until src's EOF, then forward it with shutdown(SHUT_WR) and return.

    ``count(n)`` is called after every n bytes delivered. Raises ``Broken`` if either peer
    resets; the caller closes both sockets.
    """
    if not pipes.splice:
        await _copy(src, dst, count)
        return
    sfd = src.fileno()
    dfd = dst.fileno()
    splice = os.splice
    flags = _SPLICE_FLAGS
    size = pipes.size
    while True:
        await _wait_readable(sfd)
        pipe = pipes.acquire()
        pr, pw = pipe
        in_pipe = 0
        eof = False
        try:
            while True:
                try:
                    n = splice(sfd, pw, size, None, None, flags)
                except BlockingIOError:
                    break  # the pipe is empty, so EAGAIN means the socket is
                except OSError as exc:
                    raise Broken("src", exc) from exc
                if n == 0:
                    eof = True
                    break
                in_pipe = n
                while in_pipe:
                    try:
                        in_pipe -= splice(pr, dfd, in_pipe, None, None, flags)
                    except BlockingIOError:
                        await _wait_writable(dfd)
                    except OSError as exc:
                        raise Broken("dst", exc) from exc
                count(n)
                if n < _SHORT:
                    break
        except BaseException:
            if in_pipe:
                pipes.discard(pipe)
            else:
                pipes.release(pipe)
            raise
        pipes.release(pipe)
        if eof:
            _shutdown_write(dst)
            return


async def _copy(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """The recv_into/send fallback for kernels or sockets without splice."""
    while True:
        await _wait_readable(src)
        buf = bytearray(_COPY_SIZE)  # held only while awake: idle connections hold no buffer
        view = memoryview(buf)
        while True:
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                raise Broken("src", exc) from exc
            if n == 0:
                _shutdown_write(dst)
                return
            sent = 0
            while sent < n:
                try:
                    sent += dst.send(view[sent:n])
                except BlockingIOError:
                    await _wait_writable(dst)
                except OSError as exc:
                    raise Broken("dst", exc) from exc
            count(n)
            if n < _COPY_SIZE:
                break
