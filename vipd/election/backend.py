"""The contract between the election task and a lease backend (Kubernetes Lease, etcd, static).

Owns: ``LeaseRecord`` (what a backend reports), the two outcomes that are not errors
(``LeaseConflict``) or are (``BackendUnavailable``), and the ``LeaseBackend`` protocol.
Backends do the I/O; ``machine.py`` decides; ``runner.py`` connects them.

Rules every backend keeps:
- Every call takes ``deadline`` (trio clock, absolute) and returns or raises by then
  (``trio.fail_at``/``move_on_at`` inside; a hung server surfaces as BackendUnavailable).
- Library errors are translated here, once: ``raise BackendUnavailable(...) from exc``.
- ``acquire`` and ``renew`` are optimistic: the server decides (resourceVersion, etcd txn).
  A write that lost the race raises ``LeaseConflict``; the caller re-reads at once.
- ``trio.Cancelled`` is never swallowed.
- Optional class attribute ``server_expires = True``: the server itself removes a record whose
  holder stopped renewing (etcd: the key lives on a TTL lease of at least lease_duration).
  Followers then take the lease only when the record is empty, never by the "unchanged for
  lease_duration" rule. Absent or False (Kubernetes Lease): the machine applies that rule.
- Optional attribute ``renew_note`` (str | None): after a successful renew, why it took a
  detour an operator should know about (etcd: keep-alives fail, the key was moved onto a fresh
  lease); None when the renew was ordinary. The runner logs when a detour starts and ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vipd.errors import ElectionBackendError


@dataclass(frozen=True)
class LeaseRecord:
    """One observation of the lease.

    ``holder``   node holding it, or None when free (released, expired, never taken).
    ``version``  opaque; changes on every write (Lease resourceVersion, etcd mod_revision).
                 The machine's "unchanged for lease_duration" rule watches this.
    ``term``     grows with each change of holder (leaseTransitions, etcd create_revision).
    ``lease_duration`` what the holder wrote (seconds), if the backend records it.
    """

    holder: str | None
    version: str
    term: int
    lease_duration: float | None = None


class LeaseConflict(Exception):
    """The server refused a write because the record changed (409 / failed txn)."""


class BackendUnavailable(ElectionBackendError):
    """The backend did not answer usefully by the deadline (error, refused, timeout, 403)."""

    def __init__(self, message: str, *, forbidden: bool = False):
        super().__init__(message)
        self.forbidden = forbidden  # e.g. RBAC not yet in place during kubeadm init


class LeaseBackend(Protocol):
    name: str

    async def observe(self, deadline: float) -> LeaseRecord | None:
        """Current record, or None when there is no record at all."""

    async def acquire(self, seen: LeaseRecord | None, deadline: float) -> LeaseRecord:
        """Take the lease if it is still ``seen``; the new record (holder = this node)."""

    async def renew(self, held: LeaseRecord, deadline: float) -> LeaseRecord:
        """Extend this node's lease; LeaseConflict when it is no longer ours."""

    async def release(self, held: LeaseRecord, deadline: float) -> None:
        """Give the lease up so another node can take it at once."""

    async def wait_change(self, seen: LeaseRecord | None, until: float) -> None:
        """Return at ``until``, or earlier when the record may have changed (etcd watch)."""

    async def aclose(self) -> None:
        """Drop connections. Idempotent."""
