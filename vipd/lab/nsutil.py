"""Entering network namespaces from Python threads, and running commands inside them.

Owns: ``setns(2)`` for the calling thread (Python 3.11 has no ``os.setns``), a context that
enters a named namespace for the current thread and returns to where it was, and
``run``/``ns_run`` wrappers around ``subprocess`` that raise ``LabError`` with the command's
stderr.

Must never: change the namespace of a thread it did not enter itself (the main thread is
only ever entered with ``entered()``, which always restores it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
from collections.abc import Iterator, Sequence

from vipd.errors import VipdError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LabError(VipdError):
    """Building, driving or tearing down the lab failed."""


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns failed: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (for worker threads)."""
    fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread in namespace ``name``, then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(cmd)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ns_run(ns: str, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", ns, *cmd], **kw)


def namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
