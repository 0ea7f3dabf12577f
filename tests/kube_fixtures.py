"""A FAKE kube-apiserver for tests: HTTPS (trustme), a kubeconfig pointing at it, and the
rules of the real one for the few resources vipd uses.

It stands in for kube-apiserver so tests can drive vipd's real kubernetes-asyncio client over
HTTPS, and it enforces what the real server enforces (so a client bug fails here too):

- coordination.k8s.io/v1 Leases: GET (404 NotFound when missing), POST (409 AlreadyExists when
  present; 500 when metadata.resourceVersion is set, as the real storage layer does), PUT
  (422 without metadata.resourceVersion, 409 Conflict when stale, 404 when missing), PATCH
  (merge / strategic-merge; 409 when a given resourceVersion is stale), DELETE.
  400 when spec.acquireTime / spec.renewTime lack exactly six fractional digits (MicroTime),
  422 when leaseDurationSeconds <= 0 or leaseTransitions < 0.
- discovery.k8s.io/v1 EndpointSlices in any namespace: list (labelSelector) and watch
  (``?watch=true&resourceVersion=N``, one JSON object per line; an ERROR event with a 410
  Status when N is older than the retained history, as after etcd compaction).
- v1 Nodes: list with labelSelector (``key``, ``key=value``, ``!key``, comma = and).
- Authentication: a bearer token or a client certificate signed by the fake's CA; 401 else.

Fault modes (``fake.mode = ...``, default "ok"): "forbidden" (403 on every resource call,
like admin.conf before kubeadm ≥ 1.29 has bound its RBAC), "fail" (500), "hang" (the request
is read and never answered; leaving hang mode releases the hung requests with a 503).
``answer_lease_write_late(seconds)``: the next Lease write is applied at once and answered late.

It runs aiohttp in its own thread with its own asyncio loop, so it is isolated from the trio
test (and from trio-asyncio's loop). Every test-side method is synchronous and thread-safe:
it runs the change on the server's loop and waits for it.

Usage::

    with FakeApiServer(tmp_path) as fake:          # or the ``fake_apiserver`` fixture
        fake.kubeconfig                             # path of a kubeconfig (client cert auth)
        fake.url                                    # https://127.0.0.1:PORT
        fake.set_lease("kube-system", "l", holder="other")   # seed / change out of band
        fake.lease("kube-system", "l")              # the stored object (dict) or None
        fake.set_endpoint_slice("kubernetes", [("10.0.0.1", True)], port=6443)
        fake.compact(drop_watches=True)             # watches from older versions get 410
        fake.drop_watches()                         # end open watch streams
        fake.set_node("cp1", "10.0.0.1", control_plane=True)
        fake.mode = "hang"
        fake.requests                               # [Request(method, path, query), ...]
        fake.lease_answers                          # [LeaseAnswer(at, method, status, ...)]
        fake.answer_lease_write_late(1.5)           # next Lease write: applied, answered 1.5 s late

A fake is a fake: it implements only what vipd uses; it does not do RBAC per verb, field
selectors, server-side apply, or real etcd compaction timing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trustme
import yaml
from aiohttp import web

MICROTIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
TOKEN = "fake-admin-token"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
SLICE_LABEL = "kubernetes.io/service-name"


class Request(NamedTuple):
    """One request the fake received (before auth and fault modes were applied)."""

    method: str
    path: str
    query: dict[str, str]


class LeaseAnswer(NamedTuple):
    """One Lease request the fake handled: when (``time.monotonic()`` as the answer was ready;
    a late write is sent later), the status, and the Lease in the answer (version, holder)."""

    at: float
    method: str
    status: int
    version: str | None
    holder: str | None


def is_watch(query: Any) -> bool:
    """Go's strconv.ParseBool, as the real apiserver reads ``?watch=`` (the Python client
    sends ``True``)."""
    return query.get("watch") in ("1", "t", "T", "true", "TRUE", "True")


def _status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    return True


class FakeApiServer:
    """See the module docstring. ``auth`` is "cert" (client certificate) or "token"."""

    def __init__(self, directory: Path, *, auth: str = "cert",
                 cert_names: tuple[str, ...] = ("127.0.0.1", "localhost"),
                 kubeconfig_server: str | None = None):
        self.directory = Path(directory)
        self.auth = auth
        self.ca = trustme.CA()
        self._server_cert = self.ca.issue_cert(*cert_names)
        self._client_cert = self.ca.issue_cert("kubernetes-admin")
        self._kubeconfig_server = kubeconfig_server
        self._mode = "ok"  # ok | forbidden | fail | hang
        self.requests: list[Request] = []
        self.lease_answers: list[LeaseAnswer] = []
        self._late_writes: list[float] = []  # delays for the next Lease writes' answers
        self.port = 0
        self.kubeconfig = ""
        self.ca_path = self.directory / "fake-ca.crt"
        # server-loop state
        self._rv = 100
        self._leases: dict[tuple[str, str], dict[str, Any]] = {}
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._slice_history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, object)
        self._oldest_watchable = 0
        self._watchers: set[asyncio.Queue[Any]] = set()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._unhang: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        assert value in ("ok", "forbidden", "fail", "hang"), value
        leaving_hang = self._mode == "hang" and value != "hang"
        self._mode = value
        if leaving_hang and self._loop is not None:
            self.release_hung()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                        name="fake-apiserver")
        self._thread.start()
        ready.result(timeout=10)
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.kubeconfig = str(self.write_kubeconfig(self.directory / "fake-admin.conf",
                                                    server=self._kubeconfig_server))

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def write_kubeconfig(self, path: Path, *, server: str | None = None,
                         auth: str | None = None) -> Path:
        """A kubeconfig for this server (``server`` overrides the URL written)."""
        auth = auth or self.auth
        user: dict[str, Any]
        if auth == "token":
            user = {"token": TOKEN}
        else:
            cert = self.directory / "fake-client.crt"
            key = self.directory / "fake-client.key"
            self._client_cert.cert_chain_pems[0].write_to_path(str(cert))
            self._client_cert.private_key_pem.write_to_path(str(key))
            user = {"client-certificate": str(cert), "client-key": str(key)}
        doc = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {
                "server": server or self.url,
                "certificate-authority-data": _b64(self.ca.cert_pem.bytes())}}],
            "users": [{"name": "kubernetes-admin", "user": user}],
            "contexts": [{"name": "admin@fake", "context": {"cluster": "fake",
                                                            "user": "kubernetes-admin"}}],
            "current-context": "admin@fake",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(doc))
        return path

    def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # report to the starting thread
            ready.set_exception(exc)
            return
        ready.set_result(None)
        loop.run_forever()
        loop.close()

    async def _startup(self) -> None:
        self._unhang = asyncio.Event()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_cert.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=ctx).start()

    async def _shutdown(self) -> None:
        assert self._unhang is not None
        self._unhang.set()
        for q in list(self._watchers):
            q.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop and return its result (thread-safe)."""
        assert self._loop is not None, "FakeApiServer is not running"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # -- test-side API: leases ---------------------------------------------------------------

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(lambda: copy.deepcopy(self._leases.get((namespace, name))))

    def set_lease(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        """Create or overwrite a Lease out of band (another node's write). ``spec`` keys are
        Python names: holder, lease_duration_seconds, lease_transitions, acquire_time,
        renew_time; or pass ``raw_spec=dict`` to store a spec verbatim (malformed records)."""
        raw = spec.pop("raw_spec", None)
        names = {"holder": "holderIdentity", "lease_duration_seconds": "leaseDurationSeconds",
                 "lease_transitions": "leaseTransitions", "acquire_time": "acquireTime",
                 "renew_time": "renewTime"}
        body_spec = raw if raw is not None else {names[k]: v for k, v in spec.items()}

        def do() -> dict[str, Any]:
            old = self._leases.get((namespace, name))
            obj = self._new_object("coordination.k8s.io/v1", "Lease", namespace, name,
                                   old["metadata"] if old else None)
            obj["spec"] = body_spec
            self._leases[(namespace, name)] = obj
            return copy.deepcopy(obj)

        return self._call(do)

    def answer_lease_write_late(self, seconds: float) -> None:
        """The next Lease write (PUT/POST/PATCH) is applied at once but answered ``seconds``
        later: a client whose deadline passes meanwhile never learns the new resourceVersion."""
        self._call(lambda: self._late_writes.append(seconds))

    def delete_lease(self, namespace: str, name: str) -> None:
        self._call(lambda: self._leases.pop((namespace, name), None))

    # -- test-side API: endpoint slices ------------------------------------------------------

    def set_endpoint_slice(self, name: str, endpoints: list[tuple[str, bool | None]], *,
                           port: int | None = 6443, namespace: str = "default",
                           service: str = "kubernetes", address_type: str = "IPv4",
                           notify: bool = True) -> None:
        """Create or replace a slice. ``endpoints``: (address, ready); ready None leaves the
        condition out (the API says: treat as ready). ``port`` None: a slice without ports.
        ``notify=False``: open watches miss this change (as a disconnected client would); with
        ``compact()`` after it, only a re-list shows it."""
        eps = []
        for addr, ready in endpoints:
            ep: dict[str, Any] = {"addresses": [addr], "conditions": {}}
            if ready is not None:
                ep["conditions"]["ready"] = ready
            eps.append(ep)

        def do() -> None:
            key = (namespace, name)
            old = self._slices.get(key)
            obj = self._new_object("discovery.k8s.io/v1", "EndpointSlice", namespace, name,
                                   old["metadata"] if old else None)
            obj["metadata"]["labels"] = {SLICE_LABEL: service}
            obj["addressType"] = address_type
            obj["endpoints"] = eps
            obj["ports"] = ([{"name": "https", "port": port, "protocol": "TCP"}]
                            if port is not None else [])
            self._slices[key] = obj
            if notify:
                self._slice_event("MODIFIED" if old else "ADDED", obj)

        self._call(do)

    def delete_endpoint_slice(self, name: str, namespace: str = "default") -> None:
        def do() -> None:
            obj = self._slices.pop((namespace, name), None)
            if obj is not None:
                self._rv += 1
                obj = copy.deepcopy(obj)
                obj["metadata"]["resourceVersion"] = str(self._rv)
                self._slice_event("DELETED", obj)

        self._call(do)

    def compact(self, *, drop_watches: bool = False) -> None:
        """Forget the watch history: a watch from any version before now gets 410 Gone.
        ``drop_watches``: also end the open streams, in the same step."""
        def do() -> None:
            self._slice_history.clear()
            self._oldest_watchable = self._rv
            if drop_watches:
                for q in list(self._watchers):
                    q.put_nowait(None)
        self._call(do)

    def drop_watches(self) -> None:
        """End every open watch stream (the client must reconnect)."""
        self._call(lambda: [q.put_nowait(None) for q in list(self._watchers)])

    @property
    def watch_count(self) -> int:
        return self._call(lambda: len(self._watchers))

    # -- test-side API: nodes ----------------------------------------------------------------

    def set_node(self, name: str, internal_ip: str | None, *, control_plane: bool = True,
                 legacy_master: bool = False) -> None:
        labels = {"kubernetes.io/hostname": name}
        if control_plane:
            labels["node-role.kubernetes.io/control-plane"] = ""
        if legacy_master:
            labels["node-role.kubernetes.io/master"] = ""
        addresses = [{"type": "Hostname", "address": name}]
        if internal_ip:
            addresses.insert(0, {"type": "InternalIP", "address": internal_ip})

        def do() -> None:
            obj = self._new_object("v1", "Node", None, name, None)
            obj["metadata"]["labels"] = labels
            obj["status"] = {"addresses": addresses}
            self._nodes[name] = obj

        self._call(do)

    # -- server side -------------------------------------------------------------------------

    def _new_object(self, api_version: str, kind: str, namespace: str | None, name: str,
                    old_meta: dict[str, Any] | None) -> dict[str, Any]:
        self._rv += 1
        meta: dict[str, Any] = {"name": name, "resourceVersion": str(self._rv)}
        if namespace is not None:
            meta["namespace"] = namespace
        meta["uid"] = old_meta["uid"] if old_meta else str(uuid.uuid4())
        meta["creationTimestamp"] = (old_meta or {}).get("creationTimestamp", "2024-01-01T00:00:00Z")
        return {"apiVersion": api_version, "kind": kind, "metadata": meta}

    def _slice_event(self, kind: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        snapshot = copy.deepcopy(obj)
        self._slice_history.append((rv, kind, snapshot))
        for q in list(self._watchers):
            q.put_nowait((rv, kind, snapshot))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(Request(request.method, request.path, dict(request.query)))
        if not self._authenticated(request):
            return _status(401, "Unauthorized", "Unauthorized")
        if self.mode == "hang":
            assert self._unhang is not None
            await self._unhang.wait()
            return _status(503, "ServiceUnavailable", "released from hang")
        if self.mode == "fail":
            return _status(500, "InternalError", "fake apiserver failing on purpose")
        if self.mode == "forbidden":
            return _status(403, "Forbidden",
                           f'{request.path} is forbidden: User "kubernetes-admin" cannot '
                           f'{request.method.lower()} this resource')
        return await handler(request)

    def release_hung(self) -> None:
        """Answer every hung request with 503 (also happens when ``mode`` leaves "hang")."""
        def do() -> None:
            assert self._unhang is not None
            self._unhang.set()
            self._unhang = asyncio.Event()
        self._call(do)

    def _authenticated(self, request: web.Request) -> bool:
        if request.headers.get("Authorization", "") == f"Bearer {TOKEN}":
            return True
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport else None
        return bool(peercert)  # only certificates signed by our CA pass the handshake

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        m = re.fullmatch(r"/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?", path)
        if m:
            resp = await self._lease(request, m.group(1), m.group(2))
            self._note_lease_answer(request.method, resp)
            if request.method in ("PUT", "POST", "PATCH") and resp.status < 300 and self._late_writes:
                await asyncio.sleep(self._late_writes.pop(0))
            return resp
        m = re.fullmatch(r"/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices", path)
        if m and request.method == "GET":
            if is_watch(request.query):
                return await self._watch_slices(request, m.group(1))
            return self._list_slices(request, m.group(1))
        if path == "/api/v1/nodes" and request.method == "GET":
            sel = request.query.get("labelSelector", "")
            items = [n for n in self._nodes.values()
                     if _selector_matches(sel, n["metadata"].get("labels", {}))]
            return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self._rv)},
                                      "items": items})
        return _status(404, "NotFound", f"the server could not find the requested resource ({path})")

    # leases

    def _note_lease_answer(self, method: str, resp: web.Response) -> None:
        try:
            obj = json.loads(resp.body) if isinstance(resp.body, bytes) else {}
        except ValueError:
            obj = {}
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        self.lease_answers.append(LeaseAnswer(time.monotonic(), method, resp.status,
                                              meta.get("resourceVersion"), spec.get("holderIdentity")))

    def _validate_lease(self, body: dict[str, Any]) -> web.Response | None:
        spec = body.get("spec") or {}
        if not isinstance(spec, dict):
            return _status(400, "BadRequest", "spec: expected an object")
        for field in ("acquireTime", "renewTime"):
            value = spec.get(field)
            if value is not None and (not isinstance(value, str) or not MICROTIME_RE.match(value)):
                return _status(400, "BadRequest",
                               f'Lease in version "v1" cannot be handled as a Lease: '
                               f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": '
                               f"cannot parse as MicroTime ({field})")
        lds = spec.get("leaseDurationSeconds")
        if lds is not None and (not isinstance(lds, int) or isinstance(lds, bool) or lds <= 0):
            return _status(422, "Invalid", "spec.leaseDurationSeconds: must be greater than 0")
        lt = spec.get("leaseTransitions")
        if lt is not None and (not isinstance(lt, int) or isinstance(lt, bool) or lt < 0):
            return _status(422, "Invalid", "spec.leaseTransitions: must be greater than or equal to 0")
        return None

    async def _lease(self, request: web.Request, ns: str, name: str | None) -> web.Response:
        gone = _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found',
                       name=name, group="coordination.k8s.io", kind="leases")
        if request.method == "GET" and name:
            obj = self._leases.get((ns, name))
            return web.json_response(obj) if obj else gone
        if request.method == "DELETE" and name:
            return web.json_response(self._leases.pop((ns, name))) if (ns, name) in self._leases else gone
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _status(400, "BadRequest", "request body is not JSON")
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "request body is not an object")
        meta = body.get("metadata") or {}
        if request.method == "POST" and not name:
            name = meta.get("name")
            if not name:
                return _status(422, "Invalid", "metadata.name: Required value")
            if meta.get("resourceVersion"):
                return _status(500, "InternalError", "resourceVersion should not be set on objects to be created")
            if (bad := self._validate_lease(body)) is not None:
                return bad
            if (ns, name) in self._leases:
                return _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists',
                               name=name, group="coordination.k8s.io", kind="leases")
            obj = self._new_object("coordination.k8s.io/v1", "Lease", ns, name, None)
            obj["metadata"].update({k: v for k, v in meta.items() if k in ("labels", "annotations")})
            obj["spec"] = body.get("spec") or {}
            self._leases[(ns, name)] = obj
            return web.json_response(obj, status=201)
        if not name:
            return _status(405, "MethodNotAllowed", "method not allowed")
        current = self._leases.get((ns, name))
        if request.method == "PUT":
            if current is None:
                return gone
            if meta.get("name", name) != name:
                return _status(400, "BadRequest", "the name of the object does not match the URL")
            rv = meta.get("resourceVersion")
            if not rv:
                return _status(422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: "
                                               "must be specified for an update")
            if rv != current["metadata"]["resourceVersion"]:
                return self._conflict(name)
            if (bad := self._validate_lease(body)) is not None:
                return bad
            obj = self._new_object("coordination.k8s.io/v1", "Lease", ns, name, current["metadata"])
            obj["metadata"].update({k: v for k, v in meta.items() if k in ("labels", "annotations")})
            obj["spec"] = body.get("spec") or {}
            self._leases[(ns, name)] = obj
            return web.json_response(obj)
        if request.method == "PATCH":
            if current is None:
                return gone
            ctype = request.content_type
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                return _status(415, "UnsupportedMediaType", f"the fake supports merge patches only, not {ctype}")
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                return self._conflict(name)
            merged = _merge_patch(copy.deepcopy(current), body)
            if (bad := self._validate_lease(merged)) is not None:
                return bad
            obj = self._new_object("coordination.k8s.io/v1", "Lease", ns, name, current["metadata"])
            obj["spec"] = merged.get("spec") or {}
            self._leases[(ns, name)] = obj
            return web.json_response(obj)
        return _status(405, "MethodNotAllowed", "method not allowed")

    @staticmethod
    def _conflict(name: str) -> web.Response:
        return _status(409, "Conflict",
                       f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                       "the object has been modified; please apply your changes to the latest "
                       "version and try again", name=name, group="coordination.k8s.io", kind="leases")

    # endpoint slices

    def _matching_slices(self, request: web.Request, ns: str) -> list[dict[str, Any]]:
        sel = request.query.get("labelSelector", "")
        return [s for (sns, _), s in sorted(self._slices.items())
                if sns == ns and _selector_matches(sel, s["metadata"].get("labels", {}))]

    def _list_slices(self, request: web.Request, ns: str) -> web.Response:
        return web.json_response({
            "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._matching_slices(request, ns)})

    async def _watch_slices(self, request: web.Request, ns: str) -> web.StreamResponse:
        sel = request.query.get("labelSelector", "")
        try:
            since = int(request.query.get("resourceVersion") or self._rv)
        except ValueError:
            return _status(400, "BadRequest", "resourceVersion: not a number")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(json.dumps(event).encode() + b"\n")

        if since < self._oldest_watchable:
            await send({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since} ({self._oldest_watchable})",
                "reason": "Expired", "code": 410}})
            return resp
        q: asyncio.Queue[Any] = asyncio.Queue()
        for item in self._slice_history:
            if item[0] > since:
                q.put_nowait(item)
        self._watchers.add(q)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await q.get()
                    if item is None:
                        break
                    rv, kind, obj = item
                    if obj["metadata"].get("namespace") != ns or not _selector_matches(
                            sel, obj["metadata"].get("labels", {})):
                        continue
                    await send({"type": kind, "object": obj})
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self._watchers.discard(q)
        return resp


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge_patch(target.get(k), v)
    return target


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


@pytest.fixture
def fake_apiserver(tmp_path: Path) -> Iterator[FakeApiServer]:
    """A running FakeApiServer (client-certificate kubeconfig) for one test."""
    with FakeApiServer(tmp_path) as fake:
        yield fake


def kube_config(fake: FakeApiServer, node: str = "node-a", **flags: Any) -> Any:
    """A vipd Config whose Kubernetes settings point at ``fake`` (flags by dotted key)."""
    from vipd.config import load

    values = {
        "node": node,
        "election.backend": "kubernetes",
        "election.kubernetes.kubeconfig": fake.kubeconfig,
        "election.kubernetes.namespace": "kube-system",
        "election.kubernetes.lease_name": "vipd-test-lock",
        "proxy.enabled": False,
    }
    values.update(flags)
    return load(environ={}, flags=values, require_vip=False)
