"""Active health checks: one periodic check per backend, results fed to the pool by a callback.

Owns: a single check (TCP connect, or an HTTP(S) GET of the configured path spoken with h11
over a trio stream: 2xx/3xx is healthy, as in HAProxy; the certificate is not verified unless
a CA is configured), its timeout, and the per-backend loops started and stopped as the backend
list changes.

Must never: decide up/down (the pool's HealthCounter does), log transitions, or let one
backend's failure escape its own loop.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import h11
import trio

from vipd.config import HealthConfig
from vipd.proxy.backends import Backend

CheckFn = Callable[[str, int], Awaitable[tuple[bool, str]]]


def client_ssl_context(ca: str | None) -> ssl.SSLContext:
    """Unverified by default (apiservers' serving certs are often self-signed); with a CA the
    chain and the address are verified."""
    if ca:
        return ssl.create_default_context(cafile=ca)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_check(hcfg: HealthConfig) -> CheckFn:
    """The check function for ``hcfg.check``: ``await check(host, port) -> (ok, reason)``."""
    ctx = client_ssl_context(hcfg.ca) if hcfg.check == "https" else None

    async def check(host: str, port: int) -> tuple[bool, str]:
        with trio.move_on_after(hcfg.timeout):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                return False, f"connect: {exc.strerror or exc}"
            try:
                if hcfg.check == "tcp":
                    return True, "connected"
                if ctx is not None:
                    stream = trio.SSLStream(stream, ctx, server_hostname=host)
                    await stream.do_handshake()
                return await _http_get(stream, host, hcfg.path)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return False, f"{hcfg.check}: {type(exc).__name__}: {exc}"
            except h11.ProtocolError as exc:
                return False, f"{hcfg.check}: bad HTTP response: {exc}"
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                    await trio.aclose_forcefully(stream)
        return False, f"timeout after {hcfg.timeout:g}s"

    return check


async def _http_get(stream: trio.abc.Stream, host: str, path: str) -> tuple[bool, str]:
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(
        method="GET",
        target=path,
        headers=[("Host", host), ("User-Agent", "vipd-health"), ("Connection", "close")],
    )
    await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            ok = 200 <= event.status_code < 400
            return ok, f"HTTP {event.status_code}"
        if isinstance(event, h11.ConnectionClosed):
            return False, "closed without a response"


class HealthChecks:
    """Runs ``check`` for each backend every ``interval`` in ``nursery``; ``sync`` follows the
    backend list. ``on_result(backend, ok, reason)`` receives every outcome."""

    def __init__(
        self,
        nursery: trio.Nursery,
        interval: float,
        check: CheckFn,
        on_result: Callable[[Backend, bool, str], None],
    ) -> None:
        self._nursery = nursery
        self._interval = interval
        self._check = check
        self._on_result = on_result
        self._scopes: dict[Backend, trio.CancelScope] = {}

    def sync(self, backends: list[Backend]) -> None:
        current = set(backends)
        for b, scope in list(self._scopes.items()):
            if b not in current:
                scope.cancel()
                del self._scopes[b]
        for b in backends:
            if b not in self._scopes:
                scope = trio.CancelScope()
                self._scopes[b] = scope
                self._nursery.start_soon(self._loop, b, scope)

    async def _loop(self, backend: Backend, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                due = trio.current_time() + self._interval
                ok, reason = await self._check(backend.host, backend.port)
                if backend.removed:
                    return
                self._on_result(backend, ok, reason)
                await trio.sleep_until(due)
