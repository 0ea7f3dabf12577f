"""The load balancer task: listeners, accept loop, one session per client, limits and drain.

Owns: binding VIP:port (IP_FREEBIND, so before the VIP is present) or the configured address,
raising RLIMIT_NOFILE, accept back-pressure (``max_connections``; EMFILE backs off), connecting
to the chosen backend with retry on the next healthy one, handing the established pair to the
pump's reactor (which owns the bytes, timeouts and resets), shutdown-sessions, logging backend
transitions, the proxy counters in ``state.proxy``, and the drain on shutdown.

Must never: let one connection's failure reach the accept loop or the server (each session
contains its own errors), swallow ``trio.Cancelled``, or leave a client connected to nothing
(no healthy backend → the client is closed at once).

Threads: accepting, connecting and sessions run in the pump's reactor thread; trio-side entry
points that touch that state (``observe``, ``update_backends``, listener changes, the drain)
take ``reactor.lock``, and the thread reaches trio only through ``reactor.to_trio``.

Shutdown: when the task is cancelled the listeners close at once; the reactor (every open
session) and the connects in progress live in a nursery under a shielded scope that gets
``drain_timeout`` to finish before being cancelled, which closes what is left.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import select
import socket
import time
from typing import Any

import trio

from vipd import log
from vipd.config import Config, ProxyConfig
from vipd.errors import ProxyError
from vipd.proxy import rawfd
from vipd.proxy.backends import Backend, BackendPool, Transition
from vipd.proxy.health import CheckFn, HealthChecks, make_check
from vipd.proxy.pump import PipePool, Reactor, Session, tune
from vipd.state import ProxyState, RuntimeState

_IP_FREEBIND = 15
_IPV6_FREEBIND = 78
_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF = 0.1  # EMFILE and friends: the listener stays readable, so wait instead of spin
_DNS_TTL = 30.0
_EPOLLOUT = select.EPOLLOUT
_EPOLLIN = select.EPOLLIN
_CONNECT_FAILED = select.EPOLLERR | select.EPOLLHUP
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# getsockopt(TCP_INFO) cut to its first byte: tcpi_state, the socket's TCP state.
_TCP_STATE = (socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 1)
_ESTABLISHED = b"\x01"


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


def backend_addresses(pcfg: ProxyConfig) -> list[tuple[str, int]]:
    """Backends known from the configuration alone (kubernetes discovery starts empty)."""
    if pcfg.discovery == "static":
        return list(pcfg.backends)
    if pcfg.discovery == "peers":
        # A peer's own port is its election/peer port; the apiserver listens on backend_port.
        return [(p.host, pcfg.backend_port) for p in pcfg.peers]
    return []


def listen_addresses(cfg: Config) -> list[str]:
    pcfg = cfg.proxy
    if pcfg.bind_address:
        return [pcfg.bind_address]
    if pcfg.bind_to_vip and cfg.vip.addresses:
        return [v.address for v in cfg.vip.addresses]
    return [""]  # every address


def open_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening socket. Specific addresses bind with FREEBIND so the VIP need
    not be present yet; "" binds every address (dual-stack where IPv6 exists)."""
    if host == "":
        family, addr = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    else:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        addr = host
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(sock)  # accepted sockets inherit TCP_NODELAY and keep-alive
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "" else 1)
            if host:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
        elif host:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ProxyError(f"cannot listen on {host or '*'}:{port}: {exc.strerror or exc}") from exc
    return sock


class Proxy:
    """The running load balancer. ``run_proxy`` builds one; tests may drive it directly."""

    def __init__(self, cfg: Config, state: ProxyState, check: CheckFn | None = None) -> None:
        self.cfg = cfg
        self.pcfg = cfg.proxy
        self.state = state
        self.log = log.get("proxy")
        self.pool = BackendPool(
            backend_addresses(self.pcfg),
            balance=self.pcfg.balance,
            rise=self.pcfg.health.rise,
            fall=self.pcfg.health.fall,
            stats=state.backends,
        )
        self.pipes = PipePool()
        self.reactor = Reactor(self.pipes, idle_timeout=self.pcfg.idle_timeout,
                               half_close_timeout=self.pcfg.half_close_timeout)
        self.reactor.on_error = self._session_failed
        self.stopping = False
        self.drained = trio.Event()
        self.check = check or make_check(self.pcfg.health)
        self.health: HealthChecks | None = None
        self.listeners: list[socket.socket] = []
        self._acceptors: list[_Acceptor] = []
        self._limited = False
        self._families: dict[str, int] = {}
        self._resolved: dict[tuple[str, int], tuple[float, int, Any]] = {}
        self._nursery: trio.Nursery | None = None
        self._resource_errors = False  # logged once per episode

    # -- backends ------------------------------------------------------------------------

    def update_backends(self, addresses: list[tuple[str, int]]) -> None:
        """Apply a new backend list (discovery). Open connections are untouched."""
        with self.reactor.lock:
            added, removed = self.pool.update(addresses)
        if added or removed:
            self.log.info(
                "proxy.backends_updated",
                added=[b.key for b in added],
                removed=[b.key for b in removed],
                backends=[b.key for b in self.pool],
            )
        if self.health is not None:
            self.health.sync(list(self.pool))

    def observe(self, backend: Backend, ok: bool, reason: str) -> None:
        """A check result (trio) or a connect outcome (reactor thread)."""
        with self.reactor.lock:
            self._observe(backend, ok, reason)

    def _observe(self, backend: Backend, ok: bool, reason: str) -> None:
        if backend.removed:
            return
        t = self.pool.observe(backend, ok)
        if t is Transition.UP:
            self.log.info("backend.up", backend=backend.key, reason=reason)
        elif t is Transition.DOWN:
            self.log.warning(
                "backend.down", backend=backend.key, reason=reason,
                sessions=len(backend.sessions) if self.pcfg.health.shutdown_sessions else 0,
            )
            if self.pcfg.health.shutdown_sessions:
                for session in list(backend.sessions):
                    session.close("backend marked down")

    # -- serving ---------------------------------------------------------------------------

    def open_listeners(self) -> None:
        for host in listen_addresses(self.cfg):
            self.listeners.append(open_listener(host, self.pcfg.port, self.pcfg.backlog))

    def close_listeners(self) -> None:
        with self.reactor.lock:
            for acc in self._acceptors:
                self._unwatch(acc)
                acc.backoff = True  # never watched again
            for sock in self.listeners:
                sock.close()
            self.listeners = []
        self.state.listening = False

    # -- accepting (in the reactor: listeners sit in its epoll set) ----------------------------

    def start_accepting(self) -> None:
        with self.reactor.lock:
            for lsock in self.listeners:
                self._acceptors.append(_Acceptor(self, lsock))
            self._watch_listeners()

    def _watch_listeners(self) -> None:
        for acc in self._acceptors:
            if not acc.watched and not acc.backoff and not self._limited:
                self.reactor.watch(acc.fd, acc, _EPOLLIN)
                acc.watched = True

    def _unwatch(self, acc: _Acceptor) -> None:
        if acc.watched:
            self.reactor.unwatch(acc.fd)
            acc.watched = False

    def accept_batch(self, acc: _Acceptor) -> None:
        """The listener is readable: accept up to a batch; pause at the limit or on EMFILE."""
        st = self.state
        limit = self.pcfg.max_connections
        lfd = acc.fd
        for _ in range(_ACCEPT_BATCH):
            if st.active_connections >= limit:
                if not self._limited:
                    self._limited = True
                    self.log.warning("proxy.connection_limit", max_connections=limit)
                for other in self._acceptors:
                    self._unwatch(other)
                return
            client = rawfd.accept(lfd)  # non-blocking already; TCP options from the listener
            if client < 0:
                if client == -errno.EAGAIN:
                    return
                if -client in _RESOURCE_ERRNOS:
                    # The listener stays readable: stop listening for a while, never spin.
                    self._short_of_resources("accept", OSError(-client, os.strerror(-client)))
                    return
                continue  # ECONNABORTED and the like: that client is gone, not us
            self._resource_errors = False
            st.active_connections += 1
            st.total_connections += 1
            try:
                self.start(client)
            except Exception as exc:  # contain: never let one client stop accepting
                self._session_failed(None, exc)

    def _short_of_resources(self, what: str, exc: OSError) -> None:
        """Out of fds or memory: log once per episode and stop accepting for a back-off period
        (clients wait in the listen queue instead of being accepted and dropped)."""
        if not self._resource_errors:
            self._resource_errors = True
            self.log.warning("proxy.accept_failed", step=what, error=exc.strerror)
        for acc in self._acceptors:
            if not acc.backoff:
                self._unwatch(acc)
                acc.backoff = True
                self.reactor.call_later(_ACCEPT_BACKOFF, acc.resume)

    def _released(self) -> None:
        st = self.state
        st.active_connections -= 1
        if self.stopping and st.active_connections == 0:
            self.reactor.to_trio(self.drained.set)
        if self._limited and st.active_connections < self.pcfg.max_connections:
            self._limited = False
            self._watch_listeners()
            self.log.info("proxy.connection_limit_cleared", active=st.active_connections)

    # -- connecting (driven by the reactor: no task per connection) ----------------------------

    def start(self, client: int) -> None:
        """A new client (its fd): connect it to a healthy backend, then hand the pair to the
        reactor."""
        self._try_next(_Connecting(self, client))

    def _try_next(self, c: _Connecting) -> None:
        """Connect ``c`` to the next healthy backend not tried yet; none left → close it."""
        while True:
            backend = self.pool.pick(c.tried)
            if backend is None:
                self.state.rejected_connections += 1
                os.close(c.client)
                self._released()
                return
            c.tried.append(backend)
            addr = self._address(backend)
            if addr is None:  # a host name not resolved recently: resolve in a task, then retry
                c.tried.pop()
                self.reactor.to_trio(self._nursery.start_soon, self._resolve_then_retry, c, backend)
                return
            family, sockaddr = addr
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:  # e.g. no IPv6 here: this backend fails
                    self._connect_failed(backend, exc.errno or errno.EIO)
                    continue
                # Out of fds or memory: not the backend's fault. Hold the client and try again
                # after the back-off, until its connect timeout; drop it only then.
                c.tried.pop()
                self._short_of_resources("socket", exc)
                self._park(c)
                return
            try:
                tune(sock)
                err = sock.connect_ex(sockaddr)
            except OSError as exc:
                err = exc.errno or errno.EIO
            if err == 0 or (err == errno.EINPROGRESS and sock.getsockopt(*_TCP_STATE) == _ESTABLISHED):
                # A nearby backend (this node's own apiserver, loopback) has usually finished
                # the handshake by the time connect() returns EINPROGRESS: go straight on, with
                # no epoll round and no epoll_ctl to wait for writability (HAProxy does the same).
                self._established(c.client, backend, sock)
                return
            if err == errno.EINPROGRESS:
                c.backend, c.sock = backend, sock
                self.reactor.watch(sock.fileno(), c, _EPOLLOUT)
                c.timer = self.reactor.call_later(self.pcfg.connect_timeout, c.timed_out)
                return
            sock.close()
            self._connect_failed(backend, err)

    def _park(self, c: _Connecting) -> None:
        if self.stopping or time.monotonic() >= c.give_up_at:
            self.state.rejected_connections += 1
            os.close(c.client)
            self._released()
            return
        c.parked = True  # watched for a hang-up (ERR/HUP need no mask) so the drain can reach it
        self.reactor.watch(c.client, c, 0)
        c.timer = self.reactor.call_later(_ACCEPT_BACKOFF, c.unpark)

    def _connect_failed(self, backend: Backend, err: int) -> None:
        backend.stats.failed_connects += 1
        self._observe(backend, False, f"connect: {os.strerror(err)}")

    def _connected(self, c: _Connecting, err: int) -> None:
        sock, backend = c.sock, c.backend
        c.sock = c.backend = None
        if c.timer is not None:
            c.timer[2] = None
            c.timer = None
        if err == 0:  # the fd stays in the epoll set: the session takes it over
            self._established(c.client, backend, sock, upstream_watched=True)
            return
        self.reactor.unwatch(sock.fileno())
        sock.close()
        self._connect_failed(backend, err)
        self._try_next(c)

    def _address(self, backend: Backend) -> tuple[int, Any] | None:
        host = backend.host
        fam = self._families.get(host)
        if fam is None:
            try:
                fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            except ValueError:
                fam = 0  # a name
            self._families[host] = fam
        if fam:
            return fam, (host, backend.port)
        cached = self._resolved.get((host, backend.port))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        return None

    async def _resolve_then_retry(self, c: _Connecting, backend: Backend) -> None:
        try:
            infos = await trio.socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
            failed = None
        except OSError as exc:
            failed = exc
        with self.reactor.lock:
            if failed is None:
                self._resolved[(backend.host, backend.port)] = (time.monotonic() + _DNS_TTL, family, sockaddr)
            else:
                c.tried.append(backend)
                self._connect_failed(backend, failed.errno or errno.EHOSTUNREACH)
            try:
                self._try_next(c)
            except Exception as exc:  # contain
                self._session_failed(None, exc)
                c.close("error")

    def _established(self, client: int, backend: Backend, upstream: socket.socket,
                     upstream_watched: bool = False) -> None:
        stats = backend.stats
        stats.active_connections += 1
        stats.total_connections += 1
        session = Session(self.reactor, client, upstream.detach(), stats, self._session_closed, backend)
        backend.sessions.add(session)
        self.reactor.add(session, upstream_watched)

    def _session_closed(self, session: Session) -> None:
        backend: Backend = session.tag
        backend.sessions.discard(session)
        backend.stats.active_connections -= 1
        self._released()

    def _session_failed(self, session: Any, exc: BaseException) -> None:
        self.log.error("proxy.session_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)


class _Acceptor:
    """A listener in the reactor's epoll set."""

    __slots__ = ("proxy", "lsock", "fd", "watched", "backoff")

    def __init__(self, proxy: Proxy, lsock: socket.socket) -> None:
        self.proxy = proxy
        self.lsock = lsock
        self.fd = lsock.fileno()
        self.watched = False
        self.backoff = False

    def event(self, fd: int, ev: int) -> None:
        self.proxy.accept_batch(self)

    def resume(self) -> None:
        """End of an EMFILE back-off."""
        if self.backoff and self.lsock.fileno() != -1:
            self.backoff = False
            self.proxy._watch_listeners()

    def close(self, reason: str) -> None:
        """The reactor is stopping; the proxy closes its listeners itself."""


class _Connecting:
    """A client whose backend connection is in progress (registered for EPOLLOUT)."""

    __slots__ = ("proxy", "client", "sock", "backend", "tried", "timer", "parked", "give_up_at")

    def __init__(self, proxy: Proxy, client: int) -> None:
        self.proxy = proxy
        self.client = client  # its fd
        self.sock: socket.socket | None = None
        self.backend: Backend | None = None
        self.tried: list[Backend] = []
        self.timer: list[Any] | None = None
        self.parked = False  # waiting for fds or memory to connect at all (see Proxy._park)
        self.give_up_at = time.monotonic() + proxy.pcfg.connect_timeout

    def event(self, fd: int, ev: int) -> None:
        if self.parked:  # the waiting client hung up or failed
            self.close("client gone")
            return
        # Writable without an error condition means connected: SO_ERROR only when needed.
        err = 0
        if ev & _CONNECT_FAILED:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
        self.proxy._connected(self, err)

    def timed_out(self) -> None:
        self.timer = None
        if self.sock is not None:
            self.proxy._connected(self, errno.ETIMEDOUT)

    def unpark(self) -> None:
        self.timer = None
        self.parked = False
        self.proxy.reactor.unwatch(self.client)
        try:
            self.proxy._try_next(self)
        except Exception as exc:  # contain, as for any session
            self.proxy._session_failed(None, exc)

    def close(self, reason: str) -> None:
        """Drain deadline or an error: give up on this client."""
        if self.parked:
            self.parked = False
            self.proxy.reactor.unwatch(self.client)
            if self.timer is not None:
                self.timer[2] = None
                self.timer = None
            os.close(self.client)
            self.proxy._released()
        elif self.sock is not None:
            self.proxy.reactor.unwatch(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if self.timer is not None:
                self.timer[2] = None
            os.close(self.client)
            self.proxy._released()


async def _hold_sessions(
    proxy: Proxy, stopped: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """The reactor and the connecting clients, in a nursery that outer cancellation does not
    reach: after ``stopped`` they run until every session ended or the scope's deadline (the
    drain timeout) cancels them, which closes what is left."""
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            reactor_scope = trio.CancelScope()

            async def reactor() -> None:
                with reactor_scope:
                    await proxy.reactor.run()

            nursery.start_soon(reactor)
            task_status.started((scope, nursery))
            await stopped.wait()
            with proxy.reactor.lock:  # the reactor thread reads `stopping` when a session ends
                proxy.stopping = True
                active = proxy.state.active_connections
            if active:
                await proxy.drained.wait()
            reactor_scope.cancel()


async def run_proxy(
    cfg: Config,
    state: RuntimeState,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    check: CheckFn | None = None,
) -> None:
    """Serve until cancelled; then stop accepting and drain for ``cfg.proxy.drain_timeout``."""
    logger = log.get("proxy")
    nofile = raise_nofile_limit()
    proxy = Proxy(cfg, state.proxy, check)
    proxy.open_listeners()
    stopped = trio.Event()
    drain_scope: trio.CancelScope | None = None
    try:
        async with trio.open_nursery() as nursery:
            drain_scope, sessions = await nursery.start(_hold_sessions, proxy, stopped)
            proxy.health = HealthChecks(nursery, cfg.proxy.health.interval, proxy.check, proxy.observe)
            proxy.health.sync(list(proxy.pool))
            if cfg.proxy.discovery == "kubernetes":
                from vipd.proxy.discovery import run_kubernetes_discovery

                await nursery.start(run_kubernetes_discovery, cfg, proxy.update_backends)
            proxy._nursery = sessions
            proxy.start_accepting()
            state.proxy.listening = True
            logger.info(
                "proxy.listening",
                addresses=[_sockname(s) for s in proxy.listeners],
                backends=[b.key for b in proxy.pool],
                discovery=cfg.proxy.discovery,
                balance=cfg.proxy.balance,
                splice=proxy.pipes.splice,
                nofile=nofile,
            )
            task_status.started(proxy)
            try:
                await trio.sleep_forever()
            finally:
                # Stop accepting at once; sessions get drain_timeout, then are cancelled.
                active = state.proxy.active_connections
                proxy.close_listeners()
                if drain_scope is not None:
                    drain_scope.deadline = trio.current_time() + cfg.proxy.drain_timeout
                stopped.set()
                if active:
                    logger.info("proxy.draining", active=active, timeout=cfg.proxy.drain_timeout)
    finally:
        proxy.close_listeners()
        proxy.pipes.close()
        state.proxy.listening = False
        if drain_scope is not None and drain_scope.cancelled_caught:
            logger.warning("proxy.drain_timeout", closed=True)


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
