"""The proxy carrying real traffic on loopback: bulk integrity, half-close, churn, drain."""

from __future__ import annotations

import errno
import json
import socket

import trio

from tests.proxy_fixtures import (
    always_healthy,
    free_port,
    listener_port,
    loopback_address,
    open_fds,
    proxy_config,
    receive_all,
    run_peer,
    running_proxy,
    start_peer,
    stop_peer,
    tcp_listener,
    wait_until,
)

GiB = 1 << 30


async def test_one_gib_each_way_checksums_match() -> None:
    host = loopback_address()
    bport = free_port(host)
    cfg = proxy_config([(host, bport)])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_peer(nursery, "blast-serve", host, bport, GiB)
            try:
                async with running_proxy(cfg) as (proxy, state):
                    client = await run_peer("blast-client", cfg.proxy.bind_address, cfg.proxy.port, GiB)
                    assert server.stdout is not None
                    served = json.loads((await receive_all(server.stdout)).decode().splitlines()[-1])
                    key = f"{host}:{bport}"
                    assert state.proxy.backends[key].bytes_in == GiB
                    assert state.proxy.backends[key].bytes_out == GiB
                    assert proxy.pipes.held == 0
            finally:
                stop_peer(server)
    assert client["sent"] == served["received"] == GiB
    assert served["sent"] == client["received"] == GiB
    assert client["sent_crc"] == served["received_crc"]
    assert served["sent_crc"] == client["received_crc"]


async def test_no_fd_for_a_pipe_falls_back_to_copying_without_losing_a_byte() -> None:
    """Out of fds mid-transfer (EMFILE from pipe2): each bulk read is copied instead of spliced."""
    host = loopback_address()
    bport = free_port(host)
    cfg = proxy_config([(host, bport)])
    size = 64 << 20
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_peer(nursery, "blast-serve", host, bport, size)
            try:
                async with running_proxy(cfg) as (proxy, state):
                    refused = []

                    def no_pipe() -> tuple[int, int]:
                        refused.append(1)
                        raise OSError(errno.EMFILE, "Too many open files")

                    proxy.pipes.acquire = no_pipe
                    client = await run_peer("blast-client", cfg.proxy.bind_address, cfg.proxy.port, size)
                    assert server.stdout is not None
                    served = json.loads((await receive_all(server.stdout)).decode().splitlines()[-1])
                    assert refused  # bulk reads did ask for pipes...
                    assert proxy.pipes.held == 0  # ...and none is on loan
                    assert state.proxy.backends[f"{host}:{bport}"].bytes_in == size
            finally:
                stop_peer(server)
    assert client["sent_crc"] == served["received_crc"] and client["sent"] == size
    assert served["sent_crc"] == client["received_crc"] and client["received"] == size


async def _connect(cfg) -> trio.SocketStream:
    return await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port)


async def test_client_half_close_is_forwarded_and_the_reply_still_flows() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)

    async def backend(stream: trio.SocketStream) -> None:
        data = await receive_all(stream)  # ends only when the client's FIN came through
        await stream.send_all(b"got %d" % len(data))
        await stream.aclose()

    cfg = proxy_config([(host, listener_port(listener))])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy):
            nursery.start_soon(trio.serve_listeners, backend, [listener])
            client = await _connect(cfg)
            await client.send_all(b"a" * 300_000)
            await client.send_eof()
            assert await receive_all(client) == b"got 300000"
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_backend_half_close_is_forwarded_and_the_client_keeps_sending() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)
    late = trio.Event()
    received: list[bytes] = []

    async def backend(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await stream.send_eof()
        received.append(await receive_all(stream))
        late.set()

    cfg = proxy_config([(host, listener_port(listener))])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy):
            nursery.start_soon(trio.serve_listeners, backend, [listener])
            client = await _connect(cfg)
            assert await receive_all(client) == b"hello"  # the backend's FIN arrived
            await client.send_all(b"late data")  # this direction still flows
            await client.send_eof()
            await late.wait()
            assert received == [b"late data"]
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_half_closed_connection_is_closed_after_half_close_timeout() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)
    closed = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        await stream.send_eof()  # the backend is done; the client never sends its FIN
        assert await receive_all(stream) == b""
        closed.set()

    cfg = proxy_config([(host, listener_port(listener))], half_close_timeout="300ms")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy):
            nursery.start_soon(trio.serve_listeners, backend, [listener])
            client = await _connect(cfg)
            assert await receive_all(client) == b""
            await closed.wait()  # the proxy gave up on the silent direction
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_backend_reset_is_propagated_to_the_client() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)

    async def backend(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await stream.aclose()  # RST

    cfg = proxy_config([(host, listener_port(listener))])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy):
            nursery.start_soon(trio.serve_listeners, backend, [listener])
            client = await _connect(cfg)
            await client.send_all(b"x")
            try:
                data = await client.receive_some(100)
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, ConnectionResetError)
            else:
                raise AssertionError(f"expected a reset, got {data!r}")
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_ten_thousand_connections_leave_no_fds_or_pipes_behind() -> None:
    host = loopback_address()
    bport = free_port(host)
    cfg = proxy_config([(host, bport)], health__interval="1h")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            echo = await start_peer(nursery, "echo", host, bport)
            try:
                async with running_proxy(cfg) as (proxy, state):
                    # warm up: one connection, so lazily created things exist before counting
                    result = await run_peer("churn", cfg.proxy.bind_address, cfg.proxy.port, 1, 1)
                    assert result == {"ok": 1, "failed": 0}
                    await wait_until(lambda: state.proxy.active_connections == 0)
                    fds, pipes = open_fds(), proxy.pipes.open_pipes
                    result = await run_peer("churn", cfg.proxy.bind_address, cfg.proxy.port, 10_000, 50)
                    assert result == {"ok": 10_000, "failed": 0}
                    await wait_until(lambda: state.proxy.active_connections == 0)
                    assert state.proxy.total_connections == 10_001
                    assert proxy.pipes.held == 0
                    assert proxy.pipes.open_pipes <= max(pipes, proxy.pipes.keep)
                    assert open_fds() - proxy.pipes.open_pipes * 2 == fds - pipes * 2
            finally:
                stop_peer(echo)


async def test_drain_keeps_in_flight_transfers_until_the_deadline() -> None:
    from vipd.proxy.server import run_proxy
    from vipd.state import RuntimeState

    host = loopback_address()
    listener = await tcp_listener(host)
    chunk = b"z" * 10_000
    go = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        mode = await stream.receive_some(10)
        await stream.send_all(chunk)
        await go.wait()  # shutdown has started
        if mode == b"short":  # finishes well inside the drain window
            for _ in range(5):
                await trio.sleep(0.05)
                await stream.send_all(chunk)
            await stream.aclose()
        else:  # would go on forever: the drain deadline ends it
            while True:
                await trio.sleep(0.05)
                await stream.send_all(chunk)

    cfg = proxy_config([(host, listener_port(listener))], drain_timeout="2s")
    state = RuntimeState(node="test")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, backend, [listener])
            scope = trio.CancelScope()
            done = trio.Event()

            async def proxy_task(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await run_proxy(cfg, state, task_status=task_status, check=always_healthy)
                done.set()

            await nursery.start(proxy_task)
            short, endless = await _connect(cfg), await _connect(cfg)
            await short.send_all(b"short")
            await endless.send_all(b"endless")
            for stream in (short, endless):
                got = b""
                while len(got) < len(chunk):
                    got += await stream.receive_some(65536)

            scope.cancel()  # what the supervisor does at shutdown
            started = trio.current_time()
            await trio.lowlevel.checkpoint()
            try:
                await _connect(cfg)
            except OSError:
                pass  # listeners are closed at once: refused
            else:
                raise AssertionError("the proxy still accepted after shutdown began")
            go.set()
            assert await receive_all(short) == chunk * 5  # the in-flight transfer is intact
            short_done = trio.current_time() - started
            tail = await receive_all(endless)  # ends when the drain deadline closes it
            endless_done = trio.current_time() - started
            assert tail  # it kept flowing during the drain
            assert short_done < 2.0 <= endless_done + 0.05  # closed at the deadline, not before
            await done.wait()
            assert state.proxy.active_connections == 0
            assert not state.proxy.listening
            nursery.cancel_scope.cancel()
