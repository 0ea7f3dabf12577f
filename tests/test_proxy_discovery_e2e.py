"""The proxy fed by the real EndpointSlice discovery: the fake apiserver changes the slice of
default/kubernetes, the real kubernetes-asyncio client watches it over HTTPS, the proxy's pool
follows, and a connection opened before the change keeps flowing to its old backend."""

from __future__ import annotations

import functools

import kube_fixtures
import trio
import trio_asyncio

from tests.proxy_fixtures import (
    always_healthy,
    echo_handler,
    free_port,
    loopback_address,
    proxy_config,
    roundtrip,
    running_proxy,
    tcp_listener,
    wait_until,
)
from vipd.proxy.backends import backend_key

fake_apiserver = kube_fixtures.fake_apiserver  # the fixture, used by name


async def test_endpointslice_change_reaches_the_pool_without_dropping_connections(
    fake_apiserver: kube_fixtures.FakeApiServer,
) -> None:
    # An EndpointSlice has one port for all its endpoints: two apiserver stand-ins on two
    # loopback addresses share it.
    host_a, host_b = loopback_address(), loopback_address()
    port = free_port(host_a)
    la, lb = await tcp_listener(host_a, port), await tcp_listener(host_b, port)
    fake_apiserver.set_endpoint_slice("kubernetes", [(host_a, True)], port=port)
    cfg = proxy_config([], discovery="kubernetes", extra={
        "election.kubernetes.kubeconfig": fake_apiserver.kubeconfig,
    })
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"A:"), [la])
            nursery.start_soon(trio.serve_listeners, functools.partial(echo_handler, tag=b"B:"), [lb])
            async with running_proxy(cfg, check=always_healthy) as (_proxy, state):
                await wait_until(lambda: list(state.proxy.backends) == [backend_key(host_a, port)])
                connect = functools.partial(trio.open_tcp_stream, cfg.proxy.bind_address, cfg.proxy.port)
                old = await connect()
                assert await roundtrip(old, b"1") == b"A:1"

                fake_apiserver.set_endpoint_slice("kubernetes", [(host_b, True), (host_a, False)], port=port)
                await wait_until(lambda: list(state.proxy.backends) == [backend_key(host_b, port)])
                async with await connect() as new:
                    assert await roundtrip(new, b"2") == b"B:2"
                assert await roundtrip(old, b"3") == b"A:3"  # opened before the change: untouched
                await old.aclose()
            nursery.cancel_scope.cancel()
