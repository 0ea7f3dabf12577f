"""The etcd lease backend: etcd v3's JSON gateway (``/v3/...``) over httpx, native on trio.

Owns: translating the lease protocol into etcd calls and etcd/httpx errors into
``BackendUnavailable`` / ``LeaseConflict``, once, here:

    acquire  grant a FRESH lease (TTL = max(2, ceil(lease_duration))), then one transaction:
             key absent (create_revision == 0; or mod_revision == the version seen, for this
             node's own or an orphaned record) → put ``<prefix>leader`` = node with that lease
             (a put moves the key off any lease it was on)
    renew    keep-alive of that lease (an expired lease answers 200 without TTL → lost), then
             a read confirming the key is still this node's on this lease; a keep-alive that
             fails (no answer, error) falls back to a re-grant: acquire against the held
             record, which moves the key onto a fresh lease only if nobody changed it
    release  revoke the lease: etcd deletes the key at once, watchers see it
    observe  read the key; ``version`` = mod_revision, ``term`` = create_revision
    wait_change  a streaming watch from the seen revision: a released or expired key wakes
             followers at once (no polling delay)

The key lives on the lease, so etcd itself removes it when the holder stops renewing
(``server_expires``); TTL ≥ lease_duration keeps the holder's fence_until honest.

Why acquire never reuses a lease it already has: putting a key onto an existing lease does not
extend that lease, and after failed keep-alives its remaining TTL is unknown (it may be about to
expire). The machine counts a successful acquire as safe from the request's start for
renew_deadline / lease_duration; only a lease granted inside this very request is sure to live
TTL ≥ lease_duration from then. The replaced lease then holds nothing and runs out by itself
(not revoked: that would cost the take-over a round trip).
TLS (CA, client certificate/key), username/password auth (token per endpoint, re-fetched
when rejected) and failover between several endpoints: a refused or closed connection tries the
next endpoint within the same call; an endpoint that never answers fails that call at its
deadline and the next call starts at the next endpoint.

Must never: log or put into an error message the password or the auth token; let an httpx or
JSON error escape untranslated; block past a call's deadline.
"""

from __future__ import annotations

import base64
import json
import math
import ssl
from typing import Any

import httpx
import trio

from vipd.config import Config
from vipd.election.backend import BackendUnavailable, LeaseConflict, LeaseRecord
from vipd.errors import ConfigError

# gRPC status codes etcd puts into gateway errors.
_PERMISSION_DENIED, _UNAUTHENTICATED, _NOT_FOUND = 7, 16, 5
MIN_TTL = 2  # etcd 3.4's minimum lease TTL at default raft timing


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def lease_ttl(lease_duration: float) -> int:
    return max(MIN_TTL, math.ceil(lease_duration))


class _EtcdError(Exception):
    def __init__(self, message: str, code: int | None, status: int) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class EtcdLeaseBackend:
    name = "etcd"
    server_expires = True

    def __init__(self, cfg: Config) -> None:
        e = cfg.election.etcd
        self.node = cfg.node
        self.endpoints = [u.rstrip("/") for u in e.endpoints]
        self.key = _b64((e.prefix + "leader").encode())
        self.ttl = lease_ttl(cfg.election.lease_duration)
        self._username = e.username
        self._password = e.password
        self._tokens: dict[int, str] = {}
        self._current = 0
        self.lease_id: str | None = None
        self.renew_note: str | None = None  # why the last successful renew took a detour
        self._client = httpx.AsyncClient(verify=self._tls(e.ca, e.cert, e.key), timeout=None)

    @staticmethod
    def _tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | bool:
        if not (ca or cert):
            return True
        try:
            ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            if cert:
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"election.etcd: TLS files cannot be used ({exc}); expected readable "
                               "PEM files for --etcd-ca / --etcd-cert / --etcd-key"]) from exc
        return ctx

    # -- transport ------------------------------------------------------------------------

    async def _token(self, idx: int, deadline: float) -> dict[str, str]:
        if not self._username:
            return {}
        if idx not in self._tokens:
            body = {"name": self._username, "password": self._password or ""}
            data = await self._send(idx, "/v3/auth/authenticate", body, deadline, {})
            token = data.get("token")
            if not isinstance(token, str) or not token:
                raise _EtcdError("authentication answered without a token", None, 200)
            self._tokens[idx] = token
        return {"Authorization": self._tokens[idx]}

    async def _send(self, idx: int, path: str, body: dict[str, Any], deadline: float,
                    headers: dict[str, str]) -> dict[str, Any]:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise trio.TooSlowError
        resp = await self._client.post(self.endpoints[idx] + path, json=body, headers=headers, timeout=remaining)
        try:
            data = json.loads(resp.content.splitlines()[0] if resp.content else b"{}")
        except (ValueError, IndexError) as exc:
            raise _EtcdError(f"HTTP {resp.status_code}, not JSON", None, resp.status_code) from exc
        if not isinstance(data, dict):
            raise _EtcdError(f"HTTP {resp.status_code}, unexpected answer", None, resp.status_code)
        err = data.get("error")
        if resp.status_code >= 400 or err:
            if isinstance(err, dict):  # streaming endpoints wrap errors
                data = err
            code = data.get("code")
            message = data.get("message") or (err if isinstance(err, str) else f"HTTP {resp.status_code}")
            raise _EtcdError(str(message), code if isinstance(code, int) else None, resp.status_code)
        return data

    async def _post(self, path: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        """POST to the current endpoint, failing over to the next on connection errors."""
        if trio.current_time() >= deadline:
            # Nothing was sent, so nothing says the current endpoint is bad: keep it (a renew's
            # re-grant after a keep-alive that used up the deadline must not rotate twice).
            raise BackendUnavailable(f"etcd {path}: no time left before the deadline")
        last = "no endpoint"
        n, first = len(self.endpoints), self._current
        for i in range(n):
            idx = (first + i) % n
            self._current = idx
            answered = False
            try:
                with trio.fail_at(deadline):
                    for attempt in (1, 2):
                        try:
                            data = await self._send(idx, path, body, deadline, await self._token(idx, deadline))
                        except _EtcdError as exc:
                            if exc.code == _UNAUTHENTICATED and self._username and attempt == 1:
                                self._tokens.pop(idx, None)  # expired token: fetch a new one once
                                continue
                            raise
                        answered = True
                        return data
            except trio.TooSlowError as exc:
                raise BackendUnavailable(f"etcd {self.endpoints[idx]}{path}: no answer by the deadline") from exc
            except httpx.TransportError as exc:
                last = f"etcd {self.endpoints[idx]}{path}: {type(exc).__name__}: {exc}"
                self._tokens.pop(idx, None)
                continue
            except httpx.HTTPError as exc:
                answered = True
                raise BackendUnavailable(f"etcd {self.endpoints[idx]}{path}: {type(exc).__name__}: {exc}") from exc
            except _EtcdError as exc:
                answered = True
                forbidden = exc.code in (_PERMISSION_DENIED, _UNAUTHENTICATED) or exc.status in (401, 403)
                if exc.code == _NOT_FOUND and "lease" in str(exc):
                    self.lease_id = None
                    raise LeaseConflict(f"etcd: {exc}") from exc
                raise BackendUnavailable(f"etcd {self.endpoints[idx]}{path}: {exc}", forbidden=forbidden) from exc
            finally:
                if not answered:
                    # No answer (refused, hung, or this call cancelled by the caller's deadline,
                    # which usually fires before ours, so no handler above runs): the next call
                    # starts at the next endpoint. While a call is in flight, ``_current`` still
                    # names the endpoint it went to.
                    self._current = (idx + 1) % n
        raise BackendUnavailable(last)

    # -- records --------------------------------------------------------------------------

    def _record(self, kv: Any) -> LeaseRecord:
        """A record from a key-value; a key without a lease (written by hand) counts as free."""
        if not isinstance(kv, dict):
            raise BackendUnavailable("etcd: malformed key-value in answer")
        try:
            holder: str | None = base64.b64decode(kv.get("value", "")).decode("utf-8").strip() or None
        except (ValueError, UnicodeDecodeError):
            holder = None
        lease = str(kv.get("lease", "0"))
        if lease in ("", "0"):
            holder = None
        try:
            term = int(kv.get("create_revision", 0))
        except (TypeError, ValueError):
            term = 0
        rec = LeaseRecord(holder=holder, version=str(kv.get("mod_revision", "")), term=term)
        return rec

    @staticmethod
    def _first_kv(range_response: Any) -> Any | None:
        kvs = range_response.get("kvs") if isinstance(range_response, dict) else None
        return kvs[0] if isinstance(kvs, list) and kvs else None

    # -- protocol -------------------------------------------------------------------------

    async def observe(self, deadline: float) -> LeaseRecord | None:
        kv = self._first_kv(await self._post("/v3/kv/range", {"key": self.key}, deadline))
        return None if kv is None else self._record(kv)

    async def acquire(self, seen: LeaseRecord | None, deadline: float) -> LeaseRecord:
        # Always a fresh lease (module docstring): the old one's remaining TTL is unknown.
        grant = await self._post("/v3/lease/grant", {"TTL": self.ttl}, deadline)
        if not grant.get("ID") or int(grant.get("TTL", 0)) < self.ttl:
            raise BackendUnavailable(f"etcd: lease grant answered {grant.get('TTL')!r}s, wanted {self.ttl}s")
        lease = str(grant["ID"])
        if seen is None:
            compare = {"key": self.key, "target": "CREATE", "create_revision": "0"}
        else:
            compare = {"key": self.key, "target": "MOD", "mod_revision": seen.version or "0"}
        txn = {
            "compare": [compare],
            "success": [
                {"request_put": {"key": self.key, "value": _b64(self.node.encode()), "lease": lease}},
                {"request_range": {"key": self.key}},
            ],
        }
        data = await self._post("/v3/kv/txn", txn, deadline)
        if not data.get("succeeded"):
            # The fresh lease is unused and runs out within its TTL. ``lease_id`` stays: the key
            # may still be on it, and a graceful stop revokes it.
            raise LeaseConflict("etcd: the leader key changed")
        self.lease_id = lease
        try:
            kv = self._first_kv(data["responses"][1]["response_range"])
        except (KeyError, IndexError, TypeError):
            kv = None
        if kv is None:
            raise BackendUnavailable("etcd: transaction answer without the key")
        return self._record(kv)

    async def renew(self, held: LeaseRecord, deadline: float) -> LeaseRecord:
        lease = self.lease_id
        if lease is None:
            raise LeaseConflict("etcd: no lease held")
        try:
            data = await self._post("/v3/lease/keepalive", {"ID": lease}, deadline)
        except BackendUnavailable as exc:
            # Keep-alives fail but etcd may still take writes (a lossy or half-broken path, a
            # gateway that mishandles the streaming call): move the key onto a fresh lease, as
            # acquire does, instead of stepping down at the renew deadline and retaking the
            # same key a moment later (a VIP flap every renew deadline). Safe for the same
            # reason acquire is: the new lease was granted inside this request.
            record = await self.acquire(held, deadline)
            self.renew_note = f"keep-alive failed ({exc}); the key was moved onto a fresh lease"
            return record
        result = data.get("result", data)
        try:
            ttl = int(result.get("TTL", 0)) if isinstance(result, dict) else 0
        except (TypeError, ValueError):
            ttl = 0
        if ttl <= 0:  # an expired lease answers 200 with no TTL
            self.lease_id = None
            raise LeaseConflict("etcd: lease expired")
        kv = self._first_kv(await self._post("/v3/kv/range", {"key": self.key}, deadline))
        if kv is None or str(kv.get("lease")) != lease:
            raise LeaseConflict("etcd: the leader key is no longer on this node's lease")
        self.renew_note = None
        return self._record(kv)

    async def release(self, held: LeaseRecord, deadline: float) -> None:
        lease, self.lease_id = self.lease_id, None
        if lease is None:
            return
        try:
            await self._post("/v3/lease/revoke", {"ID": lease}, deadline)
        except LeaseConflict:
            pass  # already gone

    async def wait_change(self, seen: LeaseRecord | None, until: float) -> None:
        """Return when the leader key changes after ``seen`` (watch), or at ``until``."""
        create: dict[str, Any] = {"key": self.key}
        if seen is not None and seen.version.isdigit():
            create["start_revision"] = str(int(seen.version) + 1)
        idx = self._current
        with trio.move_on_at(until):
            try:
                headers = await self._token(idx, until)
                async with self._client.stream("POST", self.endpoints[idx] + "/v3/watch",
                                               json={"create_request": create}, headers=headers) as resp:
                    if resp.status_code == 200:
                        async for line in resp.aiter_lines():
                            if self._watch_fired(line):
                                return
            except (httpx.HTTPError, _EtcdError, trio.TooSlowError):
                pass  # no watch: the caller's poll at ``until`` still happens
            await trio.sleep_until(until)

    @staticmethod
    def _watch_fired(line: str) -> bool:
        if not line.strip():
            return False
        try:
            msg = json.loads(line)
        except ValueError:
            return True  # unreadable: let the caller look
        result = msg.get("result", {}) if isinstance(msg, dict) else {}
        if not isinstance(result, dict) or "error" in msg:
            return True
        return bool(result.get("events") or result.get("canceled") or result.get("compact_revision"))

    async def aclose(self) -> None:
        await self._client.aclose()
