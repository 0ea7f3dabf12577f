"""The proxy with real clients (iperf3, wrk) and the settings the other proxy tests leave out:
IPv6 on both legs, the origin's peer list as backends, and the idle timeout."""

from __future__ import annotations

import functools
import json
import shutil
import socket

import pytest
import trio

from tests.proxy_fixtures import (
    always_healthy,
    echo_handler,
    free_port,
    listener_port,
    loopback_address,
    proxy_config,
    receive_all,
    roundtrip,
    running_proxy,
    tcp_listener,
    tcp_listening,
    wait_until,
)


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3 (Debian iperf3)")
@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
async def test_iperf3_four_streams_through_the_proxy(reverse: bool) -> None:
    """iperf3's control and data connections all pass; every byte iperf3 counts, the proxy
    counted too (in the direction it flowed)."""
    host = loopback_address()
    bport = free_port(host)
    cfg = proxy_config([(host, bport)])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await trio.lowlevel.open_process(["iperf3", "-s", "-1", "-B", host, "-p", str(bport)])
            try:
                # Only once the one-shot server listens: a client the proxy cannot connect
                # onward is closed at once, and iperf3 3.12 with -J exits 0 even on errors.
                await wait_until(lambda: tcp_listening(host, bport))
                async with running_proxy(cfg, check=always_healthy) as (_, state):
                    args = ["iperf3", "-c", cfg.proxy.bind_address, "-p", str(cfg.proxy.port), "-P", "4",
                            "-n", str(256 << 20), "-J", *(["-R"] if reverse else [])]
                    res = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
                    report = json.loads(res.stdout)
                    assert res.returncode == 0 and "error" not in report, res.stdout.decode()[-2000:]
                    sent, received = report["end"]["sum_sent"]["bytes"], report["end"]["sum_received"]["bytes"]
                    assert sent >= 256 << 20
                    # iperf3 ends the test once the sender is done and counts what has arrived by
                    # then: socket buffers and the proxy's pipes hold tens of MB in flight.
                    assert received > sent // 2
                    assert len(report["intervals"][0]["streams"]) == 4
                    await _drained(state)  # every session closed: all it forwarded is counted
                    counters = state.proxy.backends[f"{host}:{bport}"]
                    proxied = counters.bytes_out if reverse else counters.bytes_in
                    assert proxied >= received  # plus iperf3's control connection
            finally:
                server.kill()
                await server.wait()
            nursery.cancel_scope.cancel()


async def _drained(state) -> None:
    await wait_until(lambda: state.proxy.active_connections == 0, limit=5)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian wrk)")
async def test_wrk_connection_close_requests_all_answered(tmp_path) -> None:
    """wrk with `Connection: close` (a new proxied connection per request) against an HTTP
    backend: no socket errors, no non-2xx answers, and the proxy saw every connection."""
    host = loopback_address()
    listener = await tcp_listener(host, backlog=1024)

    async def http(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    cfg = proxy_config([(host, listener_port(listener))])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, http, [listener])
            res = await trio.run_process(
                ["wrk", "-t1", "-c8", "-d1s", "-H", "Connection: close",
                 f"http://{cfg.proxy.bind_address}:{cfg.proxy.port}/"],
                capture_stdout=True, check=False)
            out = res.stdout.decode()
            assert res.returncode == 0, out
            assert "Socket errors" not in out and "Non-2xx" not in out, out
            requests = int(out.split(" requests in ")[0].split()[-1])
            assert requests > 0
            assert state.proxy.total_connections >= requests
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_listener_and_ipv6_backend() -> None:
    listener = await tcp_listener("::1")
    cfg = proxy_config([("::1", listener_port(listener))], host="::1", port=free_port("::1"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            async with await trio.open_tcp_stream("::1", cfg.proxy.port) as client:
                assert await roundtrip(client, b"over six") == b"over six"
            assert state.proxy.backends[f"[::1]:{listener_port(listener)}"].total_connections == 1
            nursery.cancel_scope.cancel()


async def test_origin_peers_are_backends_on_the_backend_port() -> None:
    """`vip_localpeer`/`vip_peers` + `vip_addpeerstolb`: each peer's address with
    `lb_backendport`, not the peer's own (election) port."""
    a, b = loopback_address(), loopback_address()
    la = await tcp_listener(a)
    port = listener_port(la)
    lb = await tcp_listener(b, port)  # the same backend port on the second peer
    cfg = proxy_config([], discovery="peers", backend_port=port,
                       peers=[f"n1:{a}:10000", f"n2:{b}:10000"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"A:"), [la])
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"B:"), [lb])
            seen = set()
            for _ in range(4):
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    seen.add((await roundtrip(c, b"x"))[:2])
            assert seen == {b"A:", b"B:"}  # round-robin over both peers
            assert sorted(state.proxy.backends) == sorted([f"{a}:{port}", f"{b}:{port}"])
            nursery.cancel_scope.cancel()


async def test_idle_timeout_closes_only_silent_connections() -> None:
    """idle_timeout set: a silent connection is closed once it passes; one that keeps talking
    more often than that lives on past it."""
    host = loopback_address()
    listener = await tcp_listener(host)
    cfg = proxy_config([(host, listener_port(listener))], idle_timeout="400ms")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            t0 = trio.current_time()  # before the sessions exist: their idle clocks start later
            silent = await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port)
            busy = await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port)
            closed_at: list[float] = []

            async def wait_silent_closed() -> None:
                assert await receive_all(silent) == b""  # EOF from the proxy
                closed_at.append(trio.current_time() - t0)

            nursery.start_soon(wait_silent_closed)
            while not closed_at or trio.current_time() - t0 < 1.0:
                # The traffic itself is timed: one message every 100 ms, well inside 400 ms.
                assert await roundtrip(busy, b"tick") == b"tick"
                await trio.sleep(0.1)
            assert 0.4 <= closed_at[0] < 1.0
            assert await roundtrip(busy, b"still here") == b"still here"
            await silent.aclose()
            await busy.aclose()
            nursery.cancel_scope.cancel()


async def test_no_idle_timeout_by_default() -> None:
    """The default (watches, `kubectl logs -f`): the reactor arms no timer for an idle session."""
    host = loopback_address()
    listener = await tcp_listener(host)
    cfg = proxy_config([(host, listener_port(listener))])
    assert cfg.proxy.idle_timeout == 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (proxy, _):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                assert await roundtrip(c, b"x") == b"x"
                with proxy.reactor.lock:
                    sessions = {s for s in proxy.reactor.sessions.values() if hasattr(s, "timer")}
                    assert sessions and all(s.timer is None for s in sessions)
            nursery.cancel_scope.cancel()
