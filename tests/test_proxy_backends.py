"""Backend choice and health: rise/fall arithmetic, retries, timeouts, discovery updates, limits."""

from __future__ import annotations

import functools
import socket
import sys
import time
import types

import pytest
import structlog
import trio
import trio.testing

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
    wait_until,
)
from vipd.proxy.backends import BackendPool, HealthCounter, backend_key
from vipd.proxy.health import HealthChecks
from vipd.proxy.server import Proxy
from vipd.state import ProxyState

# -- sans-IO --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "transitions"),
    [
        # starts up (health = rise): the first failure marks it down at once, like HAProxy
        ("F", ["down"]),
        ("S", [None]),
        # down: rise successes bring it up; one failure in between restarts the climb
        ("FSS", ["down", None, "up"]),
        ("FSFSS", ["down", None, None, None, "up"]),
        # up (after rising): fall failures in a row take it down; a success refills
        ("FSSFFF", ["down", None, "up", None, None, "down"]),
        ("FSSFSFF", ["down", None, "up", None, None, None, None]),
        ("FSSFSFFF", ["down", None, "up", None, None, None, None, "down"]),
    ],
)
def test_health_counter_follows_haproxy_rise_fall(results: str, transitions: list[str | None]) -> None:
    hc = HealthCounter(rise=2, fall=3)
    got = [t.value if (t := hc.observe(r == "S")) else None for r in results]
    assert got == transitions


def test_roundrobin_skips_down_and_excluded_backends() -> None:
    pool = BackendPool([("a", 1), ("b", 1), ("c", 1)])
    assert [pool.pick().host for _ in range(4)] == ["a", "b", "c", "a"]
    pool.observe(pool.get("b:1"), False)
    assert [pool.pick().host for _ in range(3)] == ["c", "a", "c"]
    assert pool.pick(exclude=[pool.get("a:1"), pool.get("c:1")]) is None


def test_leastconn_prefers_the_least_loaded() -> None:
    pool = BackendPool([("a", 1), ("b", 1), ("c", 1)], balance="leastconn")
    pool.get("a:1").stats.active_connections = 5
    pool.get("b:1").stats.active_connections = 1
    pool.get("c:1").stats.active_connections = 3
    assert pool.pick().host == "b"
    pool.get("b:1").stats.active_connections = 9
    assert pool.pick().host == "c"


def test_update_keeps_health_and_stops_choosing_removed_backends() -> None:
    stats = {}
    pool = BackendPool([("a", 1), ("b", 1)], stats=stats)
    a, b = pool.get("a:1"), pool.get("b:1")
    pool.observe(b, False)
    added, removed = pool.update([("b", 1), ("c", 1)])
    assert [x.key for x in added] == ["c:1"] and removed == [a]
    assert a.removed and not a.up
    assert pool.get("b:1") is b and not b.up  # kept its (down) health
    assert sorted(stats) == ["b:1", "c:1"]
    assert {pool.pick().host for _ in range(3)} == {"c"}


# -- health checks on the clock ---------------------------------------------------------------


async def test_flapping_backend_transitions_once_per_rise_fall_under_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = list("FSFSSSFSFFFSS")  # per check, every 2 s
    cfg = proxy_config([("10.255.0.1", 6443)], health__interval="2s")
    proxy = Proxy(cfg, ProxyState())
    backend = proxy.pool.get("10.255.0.1:6443")
    seen: list[tuple[float, bool]] = []

    async def scripted(host: str, port: int) -> tuple[bool, str]:
        await trio.sleep(0.1)  # the check itself takes a little time
        ok = script.pop(0) == "S" if script else True
        seen.append((trio.current_time(), ok))
        return ok, "scripted"

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            checks = HealthChecks(nursery, 2.0, scripted, proxy.observe)
            checks.sync(list(proxy.pool))
            await trio.sleep(2.0 * 13 - 1)
            nursery.cancel_scope.cancel()
    events = [(e["event"]) for e in logs if e["event"].startswith("backend.")]
    # F→down; S F: no; S S→up; S F S: no; F F F→down; S S→up
    assert events == ["backend.down", "backend.up", "backend.down", "backend.up"]
    assert backend.stats.transitions == 4 and backend.stats.healthy
    assert [round(t, 1) for t, _ in seen[:3]] == [0.1, 2.1, 4.1]  # steady interval


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# -- connecting -----------------------------------------------------------------------------------


async def test_refused_backend_is_retried_on_the_next_healthy_one() -> None:
    host = loopback_address()
    dead = (host, free_port(host))
    listener = await tcp_listener(host)
    live = (host, listener_port(listener))
    cfg = proxy_config([dead, live])
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            for i in range(4):
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await roundtrip(c, b"hi %d" % i) == b"hi %d" % i
            # each refused connect counts as a failed check (down after `fall` of them)
            assert state.proxy.backends[backend_key(*dead)].failed_connects >= 1
            assert state.proxy.backends[backend_key(*live)].total_connections == 4
            nursery.cancel_scope.cancel()
    assert {e["backend"] for e in logs if e["event"] == "backend.down"} <= {backend_key(*dead)}


async def test_a_timer_added_before_the_reactor_thread_waits_still_fires() -> None:
    """A timer added from trio before the reactor thread reaches its first epoll_wait cannot
    wake it (nothing waits yet): the thread must start with that timer's deadline, not block
    for ever."""
    from vipd.proxy.pump import PipePool, Reactor

    pipes = PipePool()
    reactor = Reactor(pipes)
    fired = trio.Event()
    with reactor.lock:
        reactor.call_later(0.05, lambda: reactor.to_trio(fired.set))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reactor.run)
                await fired.wait()
                nursery.cancel_scope.cancel()
    finally:
        pipes.close()


async def test_a_failing_timer_is_contained_and_the_proxy_keeps_serving() -> None:
    """A timer callback that raises (a bug in one connection's timeout handling) closes its
    owner and is logged; the reactor thread lives on and new connections are served."""
    host = loopback_address()
    listener = await tcp_listener(host)
    cfg = proxy_config([(host, listener_port(listener))])

    def broken_timer() -> None:
        raise RuntimeError("injected timer failure")

    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (proxy, _):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            with proxy.reactor.lock:
                proxy.reactor.call_later(0, broken_timer)
            await wait_until(lambda: any(e["event"] == "proxy.session_failed" for e in logs))
            for i in range(3):
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await roundtrip(c, b"after %d" % i) == b"after %d" % i
            nursery.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "proxy.session_failed"]
    assert len(failed) == 1 and "injected timer failure" in failed[0]["error"]


def _hanging_listener(host: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: further SYNs are dropped, connects hang."""
    ls = socket.socket()
    ls.bind((host, 0))
    ls.listen(0)
    fillers = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(ls.getsockname())
        fillers.append(s)
    return ls, fillers


async def test_connect_timeout_moves_on_to_the_next_backend() -> None:
    host = loopback_address()
    hanging, fillers = _hanging_listener(host)
    listener = await tcp_listener(host)
    cfg = proxy_config([hanging.getsockname(), (host, listener_port(listener))], connect_timeout="300ms")
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
                nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await roundtrip(c, b"through") == b"through"
                st = state.proxy.backends[backend_key(*hanging.getsockname())]
                assert st.failed_connects == 1 and st.total_connections == 0
                nursery.cancel_scope.cancel()
    finally:
        for s in [hanging, *fillers]:
            s.close()


async def test_connect_timer_started_from_trio_wakes_the_reactor_thread() -> None:
    """A backend name is resolved in a trio task, which then starts the connect and its timer
    from trio's thread; the reactor thread, asleep in epoll_wait with no timer at all, must be
    woken to honour it (else the client would hang on the silent backend for ever)."""
    hanging, fillers = _hanging_listener("127.0.0.1")
    name = ("localhost", hanging.getsockname()[1])
    cfg = proxy_config([name], connect_timeout="300ms")
    try:
        with trio.fail_after(10):
            async with running_proxy(cfg, check=always_healthy) as (_, state):
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await receive_all(c) == b""  # timed out, no backend left: closed
                st = state.proxy.backends[backend_key(*name)]
                assert st.failed_connects == 1 and st.total_connections == 0
                assert state.proxy.rejected_connections == 1
    finally:
        for s in [hanging, *fillers]:
            s.close()


async def test_backend_accepting_then_hanging_fails_its_http_check_by_timeout() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts, never answers

    cfg = proxy_config([(host, listener_port(listener))], health__check="http",
                       health__timeout="200ms", health__interval="300ms")
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg) as (_, state):
            nursery.start_soon(trio.serve_listeners, silent, [listener])
            st = state.proxy.backends[backend_key(host, listener_port(listener))]
            await wait_until(lambda: not st.healthy)
            nursery.cancel_scope.cancel()
    down = [e for e in logs if e["event"] == "backend.down"]
    assert len(down) == 1 and "timeout" in down[0]["reason"]


async def test_all_backends_down_closes_the_client_at_once() -> None:
    host = loopback_address()
    cfg = proxy_config([(host, free_port(host)), (host, free_port(host))])
    with trio.fail_after(5):
        async with running_proxy(cfg, check=always_healthy) as (_, state):
            for _ in range(2):  # first: both connects refused; then: nobody healthy to try
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await receive_all(c) == b""
            assert state.proxy.rejected_connections == 2
            assert all(b.failed_connects >= 1 for b in state.proxy.backends.values())


async def test_marked_down_backend_sessions_are_shut_when_configured() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)
    healthy = True

    async def switchable(host: str, port: int) -> tuple[bool, str]:
        await trio.lowlevel.checkpoint()
        return healthy, "test switch"

    cfg = proxy_config([(host, listener_port(listener))], health__interval="100ms",
                       health__shutdown_sessions=True, health__fall=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=switchable):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            c = await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port)
            assert await roundtrip(c, b"x") == b"x"
            healthy = False
            assert await receive_all(c) == b""  # closed by the proxy on marked-down
            await c.aclose()
            nursery.cancel_scope.cancel()


# -- discovery --------------------------------------------------------------------------------------


async def test_discovery_update_keeps_open_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    host = loopback_address()
    la, lb = await tcp_listener(host), await tcp_listener(host)
    a, b = (host, listener_port(la)), (host, listener_port(lb))
    updates: trio.MemorySendChannel
    updates, pending = trio.open_memory_channel(10)

    async def run_kubernetes_discovery(cfg, on_update, *, task_status=trio.TASK_STATUS_IGNORED):
        """Fake discovery (EndpointSlice watch stand-in): applies what the test sends."""
        on_update(await pending.receive())
        task_status.started()
        async for addresses in pending:
            on_update(addresses)

    fake = types.ModuleType("vipd.proxy.discovery")
    fake.run_kubernetes_discovery = run_kubernetes_discovery
    monkeypatch.setitem(sys.modules, "vipd.proxy.discovery", fake)
    cfg = proxy_config([], discovery="kubernetes")
    await updates.send([a])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (proxy, state):
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"A:"), [la])
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"B:"), [lb])
            connect = functools.partial(trio.open_tcp_stream, cfg.proxy.bind_address, cfg.proxy.port)
            old = await connect()
            assert await roundtrip(old, b"1") == b"A:1"
            await updates.send([b])
            await wait_until(lambda: list(state.proxy.backends) == [backend_key(*b)])
            assert await roundtrip(old, b"2") == b"A:2"  # still open, still to A
            async with await connect() as new:
                assert await roundtrip(new, b"3") == b"B:3"
            await updates.send([a, b])
            await wait_until(lambda: len(state.proxy.backends) == 2)
            tags = set()
            for _ in range(2):
                async with await connect() as c:
                    tags.add((await roundtrip(c, b"4"))[:2])
            assert tags == {b"A:", b"B:"}
            assert await roundtrip(old, b"5") == b"A:5"
            await old.aclose()
            nursery.cancel_scope.cancel()


# -- listener and limits ------------------------------------------------------------------------------


async def test_listener_binds_the_vip_before_it_is_present() -> None:
    cfg = proxy_config([("127.0.0.1", 1)], extra={"vip.address": ["192.0.2.77"], "proxy.bind_to_vip": True,
                                                  "proxy.bind_address": ""})
    async with running_proxy(cfg, check=always_healthy) as (proxy, _):
        assert [s.getsockname() for s in proxy.listeners] == [("192.0.2.77", cfg.proxy.port)]


async def test_max_connections_pauses_accepting_and_resumes() -> None:
    host = loopback_address()
    listener = await tcp_listener(host)
    cfg = proxy_config([(host, listener_port(listener))], max_connections=2)
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            connect = functools.partial(trio.open_tcp_stream, cfg.proxy.bind_address, cfg.proxy.port)
            first, second = await connect(), await connect()
            assert await roundtrip(first, b"1") == b"1" and await roundtrip(second, b"2") == b"2"
            third = await connect()  # the kernel completes it; the proxy does not accept it yet
            await third.send_all(b"3")
            await trio.sleep(0.2)
            assert state.proxy.total_connections == 2
            await first.aclose()
            assert await third.receive_some(10) == b"3"  # accepted once below the limit
            assert state.proxy.total_connections == 3
            await second.aclose()
            await third.aclose()
            nursery.cancel_scope.cancel()
    # logged once per episode: full at 2, cleared, full again with the third, cleared
    assert [e["event"] for e in logs if e["event"].startswith("proxy.connection_limit")] == [
        "proxy.connection_limit", "proxy.connection_limit_cleared"] * 2


async def test_backend_given_by_name_is_resolved_and_reached() -> None:
    listener = await tcp_listener("127.0.0.1")
    cfg = proxy_config([("localhost", listener_port(listener))])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (_, state):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            for i in range(2):  # the first resolves, the second uses the cached address
                async with await trio.open_tcp_stream(cfg.proxy.bind_address, cfg.proxy.port) as c:
                    assert await roundtrip(c, b"n%d" % i) == b"n%d" % i
            assert state.proxy.backends[backend_key("localhost", listener_port(listener))].total_connections == 2
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("spare_fds, step", [(0, "accept"), (1, "socket")])
async def test_out_of_file_descriptors_backs_off_then_serves_the_waiting_client(spare_fds, step) -> None:
    """No fd at all: accept fails and the client waits in the listen queue. One fd: accept takes
    it, the backend socket cannot be made, and the accepted client is held, not dropped. Either
    way the proxy backs off without spinning and serves the client once fds are back."""
    import resource

    from tests.proxy_fixtures import lowest_free_fd

    host = loopback_address()
    listener = await tcp_listener(host)
    cfg = proxy_config([(host, listener_port(listener))])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg, check=always_healthy) as (proxy, state):
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            # The client runs in another process: only the proxy's and the backend's fds count here.
            client = await trio.lowlevel.open_process(
                [sys.executable, "-c", "import socket,sys; s=socket.create_connection(sys.argv[1:3] and "
                 "(sys.argv[1], int(sys.argv[2]))); s.sendall(b'late'); print(s.recv(10).decode(), flush=True)",
                 cfg.proxy.bind_address, str(cfg.proxy.port)], stdout=-1)
            try:
                # Every fd below the limit is taken, plus ``spare_fds`` free numbers.
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + spare_fds, hard))
                await wait_until(lambda: any(e["event"] == "proxy.accept_failed" for e in logs))
                cpu = time.process_time()
                await trio.sleep(0.4)  # several back-off periods pass...
                assert time.process_time() - cpu < 0.2  # ...without a busy accept loop
                assert state.proxy.rejected_connections == 0
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                assert (await client.stdout.receive_some(10)).strip() == b"late"
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                client.kill()
                await client.wait()
            nursery.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "proxy.accept_failed"]
    assert [e["step"] for e in failed] == [step]  # once per episode, naming where fds ran out
