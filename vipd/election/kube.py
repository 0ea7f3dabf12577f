"""The Kubernetes lease backend: one coordination.k8s.io/v1 Lease, via kubernetes-asyncio.

Owns: reading and writing the Lease (``cfg.election.kubernetes.namespace``/``lease_name``)
with optimistic concurrency, and translating every library/HTTP outcome, once, into the
backend contract of ``backend.py``:

    200/201            → LeaseRecord (parsed leniently from the raw JSON)
    404 on GET         → None (no record); 404 on PUT → LeaseConflict (deleted meanwhile)
    409 (Conflict or AlreadyExists) → LeaseConflict: the caller re-reads at once
    401/403            → BackendUnavailable(forbidden=True) (kubeadm ≥ 1.29: admin.conf has
                         no RBAC until init finishes; see docs/kubernetes.md)
    anything else, connection errors, deadline passed → BackendUnavailable

Theory of operation:
- kubernetes-asyncio is asyncio; vipd is trio. Calls go through trio-asyncio
  (``aio_as_trio(fn)(args)``, inside the ``trio_asyncio.open_loop()`` that ``app.run``
  opens). The ApiClient is created lazily on the first call, inside that loop, so that a
  missing kubeconfig (early in ``kubeadm init``) is just a BackendUnavailable to retry.
- Every call is bounded by its absolute ``deadline`` (trio clock) twice over: a trio cancel
  scope around the bridged call (cancelling it cancels the asyncio task and its aiohttp
  request) and aiohttp's own total timeout. A hung apiserver therefore surfaces as
  BackendUnavailable at the deadline, never later.
- Responses are read raw (``_preload_content=False``) and parsed leniently: the library's
  deserialiser raises on a garbage timestamp, which would make a malformed record
  un-takeable forever. vipd never uses remote timestamps for decisions (the machine uses its
  own monotonic clock), so they are written, not read.
- Writes send dict bodies with timestamps formatted here with exactly six fractional digits
  (MicroTime): the library's ``isoformat()`` drops the fraction when microseconds are 0 and
  the apiserver then answers 400. ``leaseTransitions`` (the term) grows on every change of
  holder; ``holderIdentity`` is removed on release; ``leaseDurationSeconds`` is
  ceil(lease_duration). Updates are PUTs of the last object read (other fields, labels and
  annotations kept) with its ``resourceVersion``, as client-go does.

Must never: use kubernetes-asyncio's ``leaderelection`` module (no request timeout, wall-clock
expiry, broken timestamps, no release), compare remote timestamps, swallow trio.Cancelled,
or let an exception other than LeaseConflict / BackendUnavailable escape.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.election.backend import BackendUnavailable, LeaseConflict, LeaseRecord
from vipd.kubeclient import KubeConfigError, close_api_from_trio, open_api

API_VERSION = "coordination.k8s.io/v1"
_MICRO_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")


def micro_time(when: dt.datetime | None = None) -> str:
    """RFC 3339 UTC with exactly six fractional digits, as MicroTime requires."""
    when = (when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _int_or(value: Any, default: int | None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return int(value)


def record_from_lease(obj: Any) -> LeaseRecord:
    """Parse a Lease object leniently: malformed fields read as absent, never raise."""
    obj = obj if isinstance(obj, dict) else {}
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    holder = spec.get("holderIdentity")
    holder = holder if isinstance(holder, str) and holder else None
    transitions = _int_or(spec.get("leaseTransitions"), 0) or 0
    duration = _int_or(spec.get("leaseDurationSeconds"), None)
    return LeaseRecord(
        holder=holder,
        version=str(meta.get("resourceVersion") or ""),
        term=max(transitions, 0),
        lease_duration=float(duration) if duration is not None and duration > 0 else None,
    )


class _Status(Exception):
    """An HTTP answer outside 2xx, carried from the asyncio side to the translation."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class KubeLeaseBackend:
    """LeaseBackend on a coordination.k8s.io/v1 Lease. See the module docstring."""

    name = "kubernetes"
    server_expires = False  # the apiserver never expires a Lease: followers count the duration

    def __init__(self, cfg: Config):
        k = cfg.election.kubernetes
        self.node = cfg.node
        self.namespace = k.namespace
        self.lease_name = k.lease_name
        self.kubeconfig = k.kubeconfig
        self.api_server = k.api_server
        self.lease_duration_seconds = max(1, math.ceil(cfg.election.lease_duration))
        self._log = log.get("election.kube")
        self._stack: contextlib.AsyncExitStack | None = None
        self._api: Any = None  # CoordinationV1Api, created lazily inside the asyncio loop
        self._seen: dict[str, dict[str, Any]] = {}  # resourceVersion → raw object (last few)

    # -- the protocol --------------------------------------------------------------------

    async def observe(self, deadline: float) -> LeaseRecord | None:
        try:
            obj = await self._call("read", deadline)
        except _Status as st:
            if st.status == 404:
                return None
            raise self._translate(st, "read") from st
        return self._remember(obj)

    async def acquire(self, seen: LeaseRecord | None, deadline: float) -> LeaseRecord:
        now = micro_time()
        if seen is None:
            body = {
                "apiVersion": API_VERSION, "kind": "Lease",
                "metadata": {"name": self.lease_name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.node,
                         "leaseDurationSeconds": self.lease_duration_seconds,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }
            return await self._write("create", body, deadline)
        body = self._body_from(seen)
        spec = body["spec"]
        if seen.holder != self.node:
            spec["leaseTransitions"] = seen.term + 1
            spec["acquireTime"] = now
        else:
            spec["leaseTransitions"] = seen.term
            spec.setdefault("acquireTime", now)
        spec.update(holderIdentity=self.node, leaseDurationSeconds=self.lease_duration_seconds,
                    renewTime=now)
        return await self._write("replace", body, deadline)

    async def renew(self, held: LeaseRecord, deadline: float) -> LeaseRecord:
        body = self._body_from(held)
        spec = body["spec"]
        now = micro_time()
        spec.update(holderIdentity=self.node, leaseDurationSeconds=self.lease_duration_seconds,
                    renewTime=now, leaseTransitions=held.term)
        spec.setdefault("acquireTime", now)
        return await self._write("replace", body, deadline)

    async def release(self, held: LeaseRecord, deadline: float) -> None:
        """Clear the holder if the lease is still ours; a lease that is not ours is left alone.

        A stale ``held`` (we renewed since) gets one re-read and retry within the deadline.
        """
        record: LeaseRecord | None = held
        for _ in range(2):
            if record is None or record.holder != self.node:
                return
            body = self._body_from(record)
            spec = body["spec"]
            spec.pop("holderIdentity", None)
            now = micro_time()
            spec.update(leaseTransitions=record.term, renewTime=now, acquireTime=now,
                        leaseDurationSeconds=1)
            try:
                await self._write("replace", body, deadline)
                self._log.debug("lease.released", lease=self.lease_name, term=record.term)
                return
            except LeaseConflict:
                record = await self.observe(deadline)
        raise BackendUnavailable("lease kept changing while releasing it")

    async def wait_change(self, seen: LeaseRecord | None, until: float) -> None:
        # The Kubernetes backend polls: every retry_period the machine re-reads.
        await trio.sleep_until(until)

    async def aclose(self) -> None:
        stack, self._stack, self._api = self._stack, None, None
        await close_api_from_trio(stack, self._log, "client.close_failed")

    # -- internals -------------------------------------------------------------------------

    def _body_from(self, record: LeaseRecord) -> dict[str, Any]:
        """The last object read at ``record.version`` (fields kept), or a minimal one."""
        base = self._seen.get(record.version)
        body = json.loads(json.dumps(base)) if base else {}
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        meta = {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations",
                                                        "uid", "ownerReferences")}
        meta.update(name=self.lease_name, namespace=self.namespace, resourceVersion=record.version)
        spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
        # Keep only fields we understand and that are well-formed (a garbage acquireTime from
        # another writer must not make our write fail with 400).
        spec = {k: v for k, v in spec.items()
                if k in ("acquireTime",) and isinstance(v, str) and _is_micro_time(v)}
        return {"apiVersion": API_VERSION, "kind": "Lease", "metadata": meta, "spec": spec}

    def _remember(self, obj: Any) -> LeaseRecord:
        record = record_from_lease(obj)
        if record.version:
            self._seen[record.version] = obj
            while len(self._seen) > 4:
                self._seen.pop(next(iter(self._seen)))
        return record

    async def _write(self, op: str, body: dict[str, Any], deadline: float) -> LeaseRecord:
        try:
            obj = await self._call(op, deadline, body)
        except _Status as st:
            # 409: stale resourceVersion, or AlreadyExists on create (another node was first);
            # 404 on replace: deleted meanwhile. Either way the caller re-reads at once.
            if st.status == 409 or (st.status == 404 and op == "replace"):
                raise LeaseConflict(st.message) from st
            raise self._translate(st, op) from st
        return self._remember(obj)

    def _translate(self, st: _Status, op: str) -> BackendUnavailable:
        where = f"{op} lease {self.namespace}/{self.lease_name}"
        if st.status in (401, 403):
            return BackendUnavailable(f"{where}: {st}", forbidden=True)
        return BackendUnavailable(f"{where}: {st}")

    async def _call(self, op: str, deadline: float, body: dict[str, Any] | None = None) -> Any:
        """One API request, bounded by ``deadline``; returns the decoded JSON or raises
        _Status (HTTP answer outside 2xx) or BackendUnavailable (no usable answer)."""
        import trio_asyncio

        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise BackendUnavailable(f"{op} lease: no time left before the deadline")
        with trio.move_on_at(deadline):
            try:
                if self._api is None:
                    await trio_asyncio.aio_as_trio(self._open)()
                remaining = max(deadline - trio.current_time(), 0.001)
                return await trio_asyncio.aio_as_trio(self._request)(op, remaining, body)
            except (_Status, BackendUnavailable):
                raise
            except KubeConfigError as exc:
                raise BackendUnavailable(str(exc)) from exc
            except Exception as exc:  # aiohttp/ssl/OS errors of the library: translated once
                raise BackendUnavailable(f"{op} lease: {type(exc).__name__}: {exc}") from exc
        raise BackendUnavailable(f"{op} lease {self.namespace}/{self.lease_name}: "
                                 "no answer by the deadline")

    async def _open(self) -> None:
        """asyncio side: build the client (kubeconfig or in-cluster, local apiserver override)."""
        from kubernetes_asyncio import client as k8s

        self._stack, self._api = await open_api(self.kubeconfig, self.api_server, k8s.CoordinationV1Api)

    async def _request(self, op: str, seconds_left: float, body: dict[str, Any] | None) -> Any:
        """asyncio side: one request; raw response so that status and JSON are ours to read."""
        import aiohttp

        kw: dict[str, Any] = {"_preload_content": False,
                              "_request_timeout": aiohttp.ClientTimeout(total=seconds_left)}
        api = self._api
        if op == "read":
            resp = await api.read_namespaced_lease(self.lease_name, self.namespace, **kw)
        elif op == "create":
            resp = await api.create_namespaced_lease(self.namespace, body, **kw)
        else:
            resp = await api.replace_namespaced_lease(self.lease_name, self.namespace, body, **kw)
        async with resp:
            raw = await resp.read()
            status = resp.status
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {}
        if 200 <= status <= 299:
            if not isinstance(data, dict):
                raise BackendUnavailable(f"{op} lease: HTTP {status} with a body that is not an object")
            return data
        if not isinstance(data, dict):
            data = {}
        raise _Status(status, str(data.get("reason") or resp.reason or ""),
                      str(data.get("message") or raw[:200].decode(errors="replace")))


def _is_micro_time(value: str) -> bool:
    return _MICRO_TIME_RE.fullmatch(value) is not None
