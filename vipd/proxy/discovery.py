"""Live backend discovery: the kube-apiservers, from the EndpointSlices of default/kubernetes.

Owns: keeping the proxy's backend list equal to the ready endpoints of the ``kubernetes``
service (``discovery.k8s.io/v1`` EndpointSlices in ``default`` labelled
``kubernetes.io/service-name=kubernetes``), which every kube-apiserver maintains for itself
(the endpoint reconciler adds an apiserver while it runs and removes it when it stops).

Theory of operation (client-go's reflector, simplified):
- LIST the slices → the full set and a resourceVersion; publish; then WATCH from that
  version (one JSON event per line) and apply ADDED / MODIFIED / DELETED to the set,
  publishing after each change. BOOKMARK only moves the version forward.
- The server ends a watch after ``timeoutSeconds``: re-watch from the last version at once.
- 410 Gone (an ERROR event with code 410, or HTTP 410: the version was compacted away) →
  LIST again at once; this is the only way back to a consistent view.
- Any other failure (refused, 5xx, 403, hung request, kubeconfig missing) → capped
  exponential backoff with jitter, then LIST again. The last published list stays in force
  meanwhile: the proxy keeps balancing over what it knew.
- ``on_update`` is called only when the list of (host, port) actually changes, sorted, and
  never with an empty list: the apiserver that answered is itself alive, so an empty set
  means a transient reconciler view, and emptying the proxy would cut every client.
- Port: the slice's own port (named ``https`` or the only one). That is the port the
  apiserver really serves on (``--secure-port``, 6444 behind a VIP on 6443 or 6443 when it is
  bound to the node address), so it is right in both of the origin's layouts, while
  ``proxy.backend_port`` (``lb_backendport``) is 6444 in every pasted kube-vip manifest and
  would be wrong for the second. ``proxy.backend_port`` is used only for a slice that lists
  no port at all.
- The API is reached like the election's: ``election.kubernetes.kubeconfig`` and its
  ``api_server`` override (the local apiserver), through trio-asyncio.

Must never: block the proxy (it runs as its own task), call ``on_update`` from asyncio code
(every call happens in this trio task), swallow trio.Cancelled, or log per retry at info.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.kubeclient import KubeConfigError, close_api_from_trio, open_api

SERVICE_LABEL = "kubernetes.io/service-name=kubernetes"
NAMESPACE = "default"

Backends = list[tuple[str, int]]


def backends_from_slices(slices: Iterable[Any], fallback_port: int) -> Backends:
    """Ready endpoints of the slices as sorted, unique (host, port). Malformed parts skipped.

    An endpoint whose ``conditions.ready`` is absent counts as ready (the API's rule);
    ``addressType: FQDN`` slices are skipped (the proxy connects to addresses).
    """
    found: set[tuple[str, int]] = set()
    for sl in slices:
        if not isinstance(sl, dict) or sl.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        port = _slice_port(sl.get("ports"), fallback_port)
        for ep in sl.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            cond = ep.get("conditions") if isinstance(ep.get("conditions"), dict) else {}
            if cond.get("ready") is False:
                continue
            for addr in ep.get("addresses") or []:
                if isinstance(addr, str) and addr:
                    found.add((addr, port))
    return sorted(found)


def _slice_port(ports: Any, fallback: int) -> int:
    candidates = [p for p in (ports or []) if isinstance(p, dict) and isinstance(p.get("port"), int)
                  and not isinstance(p.get("port"), bool) and 0 < p["port"] < 65536]
    for p in candidates:
        if p.get("name") == "https":
            return int(p["port"])
    return int(candidates[0]["port"]) if candidates else fallback


class _Gone(Exception):
    """410: the resourceVersion we watch from was compacted away; LIST again."""


class _Failed(Exception):
    """The API did not give a usable answer (translated once, here)."""


class _Backoff:
    def __init__(self, first: float, cap: float):
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)  # jitter, not crypto
        self.current = min(self.current * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first


class _SliceWatcher:
    def __init__(self, cfg: Config, on_update: Callable[[Backends], None], *,
                 request_timeout: float, watch_seconds: int, backoff: _Backoff):
        k = cfg.election.kubernetes
        self.kubeconfig, self.api_server = k.kubeconfig, k.api_server
        self.fallback_port = cfg.proxy.backend_port
        self.on_update = on_update
        self.request_timeout = request_timeout
        self.watch_seconds = watch_seconds
        self.backoff = backoff
        self.log = log.get("proxy.discovery")
        self.slices: dict[str, Any] = {}
        self.published: Backends | None = None
        self.listed = trio.Event()
        self.stack: contextlib.AsyncExitStack | None = None
        self.api: Any = None
        self.failing = False

    async def run(self) -> None:
        try:
            while True:
                try:
                    version = await self._list()
                    self._mark_up()
                    while True:
                        started = trio.current_time()
                        version = await self._watch(version)
                        if trio.current_time() - started < 1.0:  # a server closing at once
                            await trio.sleep(self.backoff.next())
                        else:
                            self.backoff.reset()
                except _Gone:
                    self.log.debug("discovery.relist", reason="resource version gone (410)")
                except _Failed as exc:
                    self._mark_down(str(exc))
                    await trio.sleep(self.backoff.next())
        finally:
            await self._close()

    # -- state changes, logged once --------------------------------------------------------

    def _mark_up(self) -> None:
        self.backoff.reset()
        if self.failing:
            self.failing = False
            self.log.info("discovery.recovered")

    def _mark_down(self, error: str) -> None:
        if not self.failing:
            self.failing = True
            self.log.warning("discovery.unavailable", error=error, keeping=self.published or [])
        else:
            self.log.debug("discovery.retry_failed", error=error)

    def _publish(self) -> None:
        backends = backends_from_slices(self.slices.values(), self.fallback_port)
        if backends == self.published:
            return
        if not backends:
            self.log.warning("discovery.empty_ignored", keeping=self.published or [])
            return
        self.published = backends
        self.log.info("discovery.updated", backends=[f"{h}:{p}" for h, p in backends])
        self.on_update(list(backends))

    # -- API calls (trio side) ----------------------------------------------------------------

    async def _list(self) -> str:
        import trio_asyncio

        with trio.move_on_after(self.request_timeout):
            await self._ensure_client()
            status, data = await self._bridge(trio_asyncio.aio_as_trio(self._aio_list)())
            if status == 410:
                raise _Gone()
            if status != 200 or not isinstance(data, dict):
                raise _Failed(f"list endpointslices: HTTP {status} {_message(data)}")
            items = data.get("items") or []
            self.slices = {_name(s): s for s in items if isinstance(s, dict)}
            self._publish()
            self.listed.set()
            meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
            return str(meta.get("resourceVersion") or "")
        raise _Failed(f"list endpointslices: no answer within {self.request_timeout:g}s")

    async def _watch(self, version: str) -> str:
        """Follow one watch stream to its end; return the version to continue from."""
        import trio_asyncio

        resp = None
        # The server ends the stream after watch_seconds; a stream silent well past that is dead.
        with trio.move_on_after(self.watch_seconds + self.request_timeout) as scope:
            try:
                with trio.fail_after(self.request_timeout):
                    resp = await self._bridge(trio_asyncio.aio_as_trio(self._aio_watch)(version))
            except trio.TooSlowError:
                raise _Failed(f"watch endpointslices: no answer within {self.request_timeout:g}s") from None
            if resp.status == 410:
                raise _Gone()
            if resp.status != 200:
                raise _Failed(f"watch endpointslices: HTTP {resp.status}")
            try:
                while True:
                    line = await self._bridge(trio_asyncio.aio_as_trio(resp.content.readline)())
                    if not line:
                        return version  # the server ended the watch: continue from here
                    version = self._apply(line, version)
            finally:
                resp.close()
        if scope.cancelled_caught:
            raise _Failed("watch endpointslices: stream silent past its timeout")
        return version

    def _apply(self, line: bytes, version: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            raise _Failed("watch endpointslices: a line that is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise _Failed(f"watch endpointslices: an event without an object: {line[:120]!r}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise _Failed(f"watch endpointslices: {_message(obj)}")
        if kind in ("ADDED", "MODIFIED"):
            self.slices[_name(obj)] = obj
        elif kind == "DELETED":
            self.slices.pop(_name(obj), None)
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        version = str(meta.get("resourceVersion") or version)
        if kind != "BOOKMARK":
            self._publish()
        return version

    async def _ensure_client(self) -> None:
        import trio_asyncio

        if self.api is None:
            await self._bridge(trio_asyncio.aio_as_trio(self._aio_open)())

    async def _bridge(self, awaitable: Any) -> Any:
        """Await an asyncio-side call; library errors become _Failed, once, here."""
        try:
            return await awaitable
        except (_Gone, _Failed):
            raise
        except KubeConfigError as exc:
            raise _Failed(str(exc)) from exc
        except Exception as exc:  # aiohttp / ssl / OS errors of the library
            raise _Failed(f"{type(exc).__name__}: {exc}") from exc

    async def _close(self) -> None:
        stack, self.stack, self.api = self.stack, None, None
        await close_api_from_trio(stack, self.log, "discovery.close_failed")

    # -- asyncio side -------------------------------------------------------------------------

    async def _aio_open(self) -> None:
        from kubernetes_asyncio import client as k8s

        self.stack, self.api = await open_api(self.kubeconfig, self.api_server, k8s.DiscoveryV1Api)

    async def _aio_list(self) -> tuple[int, Any]:
        import aiohttp

        resp = await self.api.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=SERVICE_LABEL, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        async with resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, None

    async def _aio_watch(self, version: str) -> Any:
        import aiohttp

        return await self.api.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=SERVICE_LABEL, watch=True, resource_version=version,
            allow_watch_bookmarks=True, timeout_seconds=self.watch_seconds, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout,
                                                   sock_read=self.watch_seconds + self.request_timeout))


def _name(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) else {}
    return str(meta.get("name") or "")


def _message(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("message") or data.get("reason") or "")
    return ""


async def run_kubernetes_discovery(
    cfg: Config,
    on_update: Callable[[Backends], None],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    startup_wait: float = 5.0,
    request_timeout: float = 10.0,
    watch_seconds: int | None = None,
    backoff_first: float = 0.5,
    backoff_cap: float = 30.0,
) -> None:
    """Keep calling ``on_update(backends)`` with the apiservers' ready endpoints. Runs forever.

    Reports started after the first successful LIST (``on_update`` has then been called if
    the list was not empty), or after ``startup_wait`` seconds without one — the proxy must
    not wait forever for an unreachable API; discovery keeps trying behind it.
    """
    watcher = _SliceWatcher(
        cfg, on_update, request_timeout=request_timeout,
        # client-go picks 5-10 min at random so that many watchers do not reconnect together
        watch_seconds=watch_seconds or random.randint(300, 600),
        backoff=_Backoff(backoff_first, backoff_cap),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        with trio.move_on_after(startup_wait):
            await watcher.listed.wait()
        if not watcher.listed.is_set():
            watcher.log.warning("discovery.not_ready", waited=startup_wait)
        task_status.started()
