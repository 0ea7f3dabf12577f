"""Socket calls on raw file descriptors, for the proxy's hot path.

Owns: ``accept`` (accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC, through libc), ``shutdown_write``,
``so_error`` and ``abort`` (close with RST) on plain fds.

Why: an accepted connection as a Python socket object costs two syscalls more than HAProxy
pays — the socket constructor validates the fd with getsockname(), and Python's accept()
cannot pass SOCK_NONBLOCK, so setblocking(False) is one ioctl more — plus the object itself.
Under a `Connection: close` load that was ~4 µs of ~100 µs per connection. The pump therefore
moves bytes on fds (os.readv / os.write / os.splice) and needs only these few calls that
``os`` lacks. Hot calls report errors as a negative errno (no exception on EAGAIN, which ends
every accept batch); the rare ones borrow a socket object around the fd.

Must never: close an fd it did not get to close (``so_error`` borrows and gives back).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_accept4 = _libc.accept4
_accept4.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_accept4.restype = ctypes.c_int
_shutdown = _libc.shutdown
_shutdown.argtypes = [ctypes.c_int, ctypes.c_int]
_shutdown.restype = ctypes.c_int
_get_errno = ctypes.get_errno
_ACCEPT_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_SHUT_WR = socket.SHUT_WR
_LINGER_ABORT = struct.pack("ii", 1, 0)


def accept(listener_fd: int) -> int:
    """A new connection's fd (non-blocking, close-on-exec), or ``-errno`` (``-EAGAIN``: none)."""
    fd = _accept4(listener_fd, None, None, _ACCEPT_FLAGS)
    return fd if fd >= 0 else -_get_errno()


def shutdown_write(fd: int) -> int:
    """Send FIN (shutdown(SHUT_WR)); 0, or ``-errno`` (``-ENOTCONN``: the peer reset already)."""
    return 0 if _shutdown(fd, _SHUT_WR) == 0 else -(_get_errno() or errno.EIO)


def so_error(fd: int) -> int:
    """The socket's pending error (SO_ERROR), cleared by reading it."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.detach()


def abort(fd: int) -> None:
    """Close with RST (SO_LINGER 0): how a reset is propagated to the other side."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()
