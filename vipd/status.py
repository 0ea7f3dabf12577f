"""Status endpoint: /livez /readyz /healthz /metrics /status over HTTP/1.1.

Owns: the HTTP listener on ``status.listen`` (h11 over trio sockets; never hand-parsed HTTP),
the routing of those five paths, the Prometheus collector that reads ``RuntimeState`` at
scrape time (so no task knows about Prometheus), and the /status JSON document.

Theory of operation:
    * ``route()`` is the sans-IO part: (method, target, accept header, state, now) → a
      ``Response``. Tests call it directly; the server only moves bytes.
    * Each connection runs under ``Limits.request_timeout`` per request (a slow client cannot
      hold a slot), at most ``Limits.max_connections`` connections are served at once (the
      accept loop waits for a free slot; the kernel backlog queues the rest), request heads
      larger than ``Limits.max_head`` get 431 and bodies larger than ``Limits.max_body`` get
      413. Any malformed request gets h11's 4xx hint and the connection is closed. Errors of
      one connection are contained in its task: the daemon is never disturbed.
    * Liveness is "the supervisor's tick is recent" (it ticks every 0.5 s); readiness is
      ``state.is_ready`` (every expected task reported started, and not stopping) and, when
      the proxy runs, its listener open (``state.proxy.listening``).

Must never: change ``RuntimeState``, block the trio thread, or let one connection's error
escape into the supervisor.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from vipd import __version__, log
from vipd.config import Config
from vipd.state import RuntimeState

# The supervisor ticks every 0.5 s; ten missed ticks means its loop is stuck.
LIVENESS_STALE = 5.0

_ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class Limits:
    max_connections: int = 32
    request_timeout: float = 5.0  # to receive one whole request (head + body)
    send_timeout: float = 5.0  # to hand one response to the kernel
    max_head: int = 8 * 1024  # request line + headers
    max_body: int = 1024  # GET/HEAD need none; a little is tolerated and discarded
    linger: float = 0.5  # after an error response: drain input this long so the client reads it


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# What the endpoint says (pure).
# ---------------------------------------------------------------------------------------------


def is_live(state: RuntimeState, now: float) -> bool:
    return state.last_tick > 0 and now - state.last_tick <= LIVENESS_STALE


def status_document(state: RuntimeState) -> dict[str, Any]:
    """The /status JSON (names fixed by docs/interface: keep them)."""
    e = state.election
    return {
        "node": state.node,
        "role": e.role,
        "holder": e.holder,
        "term": e.term,
        "vips": [{"address": v.address, "interface": v.interface, "present": v.present} for v in state.vips],
        "backends": [
            {"address": b.address, "healthy": b.healthy, "active_connections": b.active_connections}
            for b in state.proxy.backends.values()
        ],
    }


def readiness_missing(state: RuntimeState) -> list[str]:
    """What /readyz waits for: tasks not started yet, and the proxy's listener."""
    missing = sorted(state.expected - state.ready)
    if "proxy" in state.expected and "proxy" not in missing and not state.proxy.listening:
        missing.append("proxy listener")
    return missing


def is_ready(state: RuntimeState) -> bool:
    return state.is_ready and not readiness_missing(state)


def readiness_text(state: RuntimeState) -> str:
    if state.stopping:
        return "not ready: stopping\n"
    missing = readiness_missing(state)
    if missing:
        return "not ready: waiting for " + ", ".join(missing) + "\n"
    return "ok\n"


class RuntimeCollector(Collector):
    """Prometheus metrics read from ``RuntimeState`` at scrape time (see docs/metrics.md)."""

    def __init__(self, state: RuntimeState, election_backend: str = ""):
        self.state = state
        self.election_backend = election_backend

    def collect(self) -> Iterator[Metric]:
        s = self.state
        e = s.election

        info = InfoMetricFamily("vipd_build", "vipd version", labels=["version"])
        info.add_metric([__version__], {})
        yield info
        yield GaugeMetricFamily("vipd_ready", "1 when every task has started and vipd is not stopping",
                                value=int(is_ready(s)))

        g = GaugeMetricFamily("vipd_leader", "1 when this node holds the lease", labels=["node"])
        g.add_metric([s.node], int(e.role == "leader"))
        yield g
        yield GaugeMetricFamily("vipd_election_term", "term of the lease as last seen (grows on every change of holder)",
                                value=e.term)
        yield CounterMetricFamily("vipd_leadership_transitions",
                                  "times this node gained or lost leadership", value=e.transitions)
        yield CounterMetricFamily("vipd_election_renew_failures",
                                  "lease renewals that failed", value=e.renew_failures)
        g = GaugeMetricFamily("vipd_election_backend_up", "1 when the lease backend answers", labels=["backend"])
        g.add_metric([self.election_backend], int(e.backend_up))
        yield g

        present = GaugeMetricFamily("vipd_vip_present", "1 when the VIP is on this node's interface",
                                    labels=["address", "interface"])
        restored = CounterMetricFamily("vipd_vip_restored", "times the VIP was re-added after drift",
                                       labels=["address"])
        for v in s.vips:
            present.add_metric([v.address, v.interface or ""], int(v.present))
            restored.add_metric([v.address], v.restored)
        yield present
        yield restored

        yield CounterMetricFamily("vipd_announcements_sent", "gratuitous ARP / unsolicited NA frames sent",
                                  value=s.announce.sent)
        yield CounterMetricFamily("vipd_announce_errors", "announcement frames that could not be sent",
                                  value=s.announce.errors)

        p = s.proxy
        yield GaugeMetricFamily("vipd_proxy_listening", "1 when the load balancer listens", value=int(p.listening))
        yield CounterMetricFamily("vipd_proxy_connections_rejected",
                                  "client connections closed at once because no backend was healthy",
                                  value=p.rejected_connections)
        active = GaugeMetricFamily("vipd_proxy_connections_active", "open proxied connections", labels=["backend"])
        total = CounterMetricFamily("vipd_proxy_connections", "proxied connections accepted", labels=["backend"])
        failed = CounterMetricFamily("vipd_proxy_connections_failed", "connects to the backend that failed",
                                     labels=["backend"])
        nbytes = CounterMetricFamily("vipd_proxy_bytes", "bytes proxied", labels=["backend", "direction"])
        up = GaugeMetricFamily("vipd_backend_up", "1 when the backend passes its health checks", labels=["backend"])
        flips = CounterMetricFamily("vipd_backend_transitions", "times the backend went up or down",
                                    labels=["backend"])
        for b in p.backends.values():
            active.add_metric([b.address], b.active_connections)
            total.add_metric([b.address], b.total_connections)
            failed.add_metric([b.address], b.failed_connects)
            nbytes.add_metric([b.address, "client_to_backend"], b.bytes_in)
            nbytes.add_metric([b.address, "backend_to_client"], b.bytes_out)
            up.add_metric([b.address], int(b.healthy))
            flips.add_metric([b.address], b.transitions)
        yield from (active, total, failed, nbytes, up, flips)


def build_registry(state: RuntimeState, election_backend: str = "") -> CollectorRegistry:
    """A private registry (no global state): vipd's collector plus process_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(state, election_backend))
    ProcessCollector(registry=registry)
    return registry


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode())


def route(method: str, target: str, accept: str, state: RuntimeState, registry: CollectorRegistry,
          now: float) -> Response:
    """Decide the response to one request (sans-IO)."""
    path = urlsplit(target).path
    if path not in ("/livez", "/healthz", "/readyz", "/metrics", "/status"):
        return _text(404, "not found; try /livez /readyz /healthz /metrics /status\n")
    if method not in ("GET", "HEAD"):
        return Response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
    if path in ("/livez", "/healthz"):
        return _text(200, "ok\n") if is_live(state, now) else _text(503, "supervisor loop stalled\n")
    if path == "/readyz":
        text = readiness_text(state)
        return _text(200 if is_ready(state) else 503, text)
    if path == "/metrics":
        encoder, content_type = choose_encoder(accept)
        return Response(200, encoder(registry), content_type)
    body = json.dumps(status_document(state), separators=(",", ":")).encode() + b"\n"
    return Response(200, body, "application/json")


# ---------------------------------------------------------------------------------------------
# Moving the bytes.
# ---------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port, 10)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(16384))


async def _read_request(stream: trio.SocketStream, conn: h11.Connection, limits: Limits) -> h11.Request | None:
    """The next request, with its body read and discarded; None when the client is done."""
    event = await _next_event(stream, conn)
    if isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request), event
    seen = 0
    while True:
        part = await _next_event(stream, conn)
        if isinstance(part, h11.EndOfMessage):
            return event
        if isinstance(part, h11.Data):
            seen += len(part.data)
            if seen > limits.max_body:
                raise _BodyTooLarge


async def _send(stream: trio.SocketStream, conn: h11.Connection, resp: Response, head_only: bool,
                limits: Limits) -> None:
    headers = [
        ("Content-Type", resp.content_type),
        ("Content-Length", str(len(resp.body))),
        ("Cache-Control", "no-store"),
        *resp.headers,
    ]
    if resp.status >= 400 and resp.status not in (404, 405, 503):
        headers.append(("Connection", "close"))
    with trio.fail_after(limits.send_timeout):
        await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
        if resp.body and not head_only:
            await stream.send_all(conn.send(h11.Data(data=resp.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _linger(stream: trio.SocketStream, limits: Limits) -> None:
    """Half-close and drain a little input, so the client reads our 4xx instead of a reset."""
    try:
        await stream.send_eof()
        with trio.move_on_after(limits.linger):
            drained = 0
            while drained < 65536:
                data = await stream.receive_some(16384)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def serve_connection(stream: trio.SocketStream, state: RuntimeState, registry: CollectorRegistry,
                           limits: Limits = Limits()) -> None:
    """Answer requests on one connection until it closes, errs or times out. Never raises."""
    logger = log.get("status")
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
    error: Response | None = None
    try:
        while True:
            try:
                with trio.fail_after(limits.request_timeout):
                    request = await _read_request(stream, conn, limits)
            except h11.RemoteProtocolError as exc:
                hint = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                error = _text(hint, f"bad request: {exc}\n")
                break
            except _BodyTooLarge:
                error = _text(413, "request body too large\n")
                break
            except trio.TooSlowError:
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    error = _text(408, "request timeout\n")
                break
            if request is None:
                break
            method = request.method.decode("ascii", "replace")
            accept = ""
            for name, value in request.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            resp = route(method, request.target.decode("ascii", "replace"), accept, state, registry,
                         trio.current_time())
            await _send(stream, conn, resp, method == "HEAD", limits)
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
        if error is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            logger.debug("status.bad_request", status=error.status, detail=error.body.decode().strip())
            await _send(stream, conn, error, False, limits)
            await _linger(stream, limits)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError,
            h11.LocalProtocolError) as exc:
        logger.debug("status.connection_error", error=f"{type(exc).__name__}: {exc}")
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _accept_loop(listener: trio.SocketListener, state: RuntimeState, registry: CollectorRegistry,
                       limits: Limits, slots: trio.Semaphore, nursery: trio.Nursery) -> None:
    logger = log.get("status")
    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno in _ACCEPT_BACKOFF_ERRNOS:
                logger.warning("status.accept_backoff", error=str(exc))
                await trio.sleep(0.1)
                continue
            raise
        except BaseException:
            slots.release()
            raise

        async def handle(stream: trio.SocketStream = stream) -> None:
            try:
                await serve_connection(stream, state, registry, limits)
            finally:
                slots.release()

        nursery.start_soon(handle)


async def run_status(cfg: Config, state: RuntimeState, *, limits: Limits = Limits(),
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the status endpoint on ``cfg.status.listen`` until cancelled."""
    logger = log.get("status")
    if not cfg.status.listen:
        task_status.started()
        await trio.sleep_forever()
    host, port = _split_listen(cfg.status.listen)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    registry = build_registry(state, cfg.election.backend)
    slots = trio.Semaphore(limits.max_connections)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, state, registry, limits, slots, nursery)
            bound = [listener.socket.getsockname() for listener in listeners]
            logger.info("status.listening", address=cfg.status.listen, bound=[f"{a[0]}:{a[1]}" for a in bound])
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
