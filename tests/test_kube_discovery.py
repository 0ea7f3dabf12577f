"""Kubernetes backend discovery (EndpointSlices of default/kubernetes) through the real
kubernetes-asyncio client over HTTPS against the fake apiserver: list, watch, 410 → re-list,
reconnect, unreachable start."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import kube_fixtures
import trio
import trio_asyncio
from kube_fixtures import FakeApiServer, is_watch, kube_config

from vipd.proxy.discovery import backends_from_slices, run_kubernetes_discovery

fake_apiserver = kube_fixtures.fake_apiserver  # the fixture, used by name

FAST = {"startup_wait": 0.5, "request_timeout": 1.0, "backoff_first": 0.05, "backoff_cap": 0.2}


class Updates:
    """Collects on_update calls; tests await the next one."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[list[tuple[str, int]]](math.inf)
        self.calls: list[list[tuple[str, int]]] = []

    def __call__(self, backends: list[tuple[str, int]]) -> None:
        self.calls.append(backends)
        self.send.send_nowait(backends)

    async def next(self) -> list[tuple[str, int]]:
        with trio.fail_after(10):
            return await self.recv.receive()


@contextlib.asynccontextmanager
async def discovery(fake: FakeApiServer, **kw: Any) -> AsyncIterator[Updates]:
    updates = Updates()
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(lambda **ts: run_kubernetes_discovery(
            kube_config(fake), updates, **{**FAST, **kw}, **ts))
        yield updates
        nursery.cancel_scope.cancel()


def lists(fake: FakeApiServer) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/endpointslices")
               and not is_watch(r.query))


async def wait_for(predicate: Any) -> None:
    """Poll a condition on the fake's state: it lives on the fake's own thread and loop, so
    there is no trio event to await."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


def test_backends_from_slices_rules() -> None:
    slices = [
        {"addressType": "IPv4", "ports": [{"name": "metrics", "port": 1}, {"name": "https", "port": 6444}],
         "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                       {"addresses": ["10.0.0.1"]},  # no condition: ready
                       {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                       "garbage", {"addresses": [None, ""]}]},
        {"addressType": "IPv6", "ports": [{"port": 6443}], "endpoints": [{"addresses": ["fd00::1"]}]},
        {"addressType": "FQDN", "ports": [{"port": 443}], "endpoints": [{"addresses": ["a.example"]}]},
        {"addressType": "IPv4", "ports": [], "endpoints": [{"addresses": ["10.0.0.9"]}]},
        None,
    ]
    assert backends_from_slices(slices, 7000) == [
        ("10.0.0.1", 6444), ("10.0.0.2", 6444), ("10.0.0.9", 7000), ("fd00::1", 6443)]


async def test_first_list_before_started_then_changes_pushed(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.2", True), ("10.0.0.1", None),
                                                     ("10.0.0.3", False)], port=6444)
    async with discovery(fake_apiserver) as updates:
        assert updates.calls == [[("10.0.0.1", 6444), ("10.0.0.2", 6444)]]
        await wait_for(lambda: fake_apiserver.watch_count == 1)
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True), ("10.0.0.3", True)],
                                          port=6444)
        assert await updates.next() == updates.calls[0]  # the first update, still queued
        assert await updates.next() == [("10.0.0.1", 6444), ("10.0.0.3", 6444)]
        # a second slice (dual stack) adds to the set; deleting it removes its endpoints
        fake_apiserver.set_endpoint_slice("kubernetes-v6", [("fd00::1", True)], port=6444,
                                          address_type="IPv6")
        assert await updates.next() == [("10.0.0.1", 6444), ("10.0.0.3", 6444), ("fd00::1", 6444)]
        fake_apiserver.delete_endpoint_slice("kubernetes-v6")
        assert await updates.next() == [("10.0.0.1", 6444), ("10.0.0.3", 6444)]
        # slices of other services are not apiservers
        fake_apiserver.set_endpoint_slice("other", [("10.9.9.9", True)], service="other")
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)], port=6444)
        assert await updates.next() == [("10.0.0.1", 6444)]
        # an unchanged list is not re-published; an empty one is never applied
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)], port=6444)
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", False)], port=6444)
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.4", True)], port=6444)
        assert await updates.next() == [("10.0.0.4", 6444)]
        assert lists(fake_apiserver) == 1


async def test_gone_410_relists_and_sees_changes_missed(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    async with discovery(fake_apiserver) as updates:
        assert await updates.next() == [("10.0.0.1", 6443)]
        await wait_for(lambda: fake_apiserver.watch_count == 1)
        # a change the client's watch misses, then compaction: only a re-list can show it
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True), ("10.0.0.2", True)],
                                          notify=False)
        fake_apiserver.compact(drop_watches=True)
        assert await updates.next() == [("10.0.0.1", 6443), ("10.0.0.2", 6443)]
        assert lists(fake_apiserver) == 2
        # the stream re-opened after the re-list carries live changes
        await wait_for(lambda: fake_apiserver.watch_count == 1)
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.2", True)])
        assert await updates.next() == [("10.0.0.2", 6443)]


async def test_failed_reconnect_backs_off_then_relists(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    async with discovery(fake_apiserver) as updates:
        assert await updates.next() == [("10.0.0.1", 6443)]
        await wait_for(lambda: fake_apiserver.watch_count == 1)
        fake_apiserver.mode = "fail"
        fake_apiserver.drop_watches()
        failed_before = len(fake_apiserver.requests)
        await wait_for(lambda: len(fake_apiserver.requests) >= failed_before + 3)  # retrying
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.3", True)])
        fake_apiserver.mode = "ok"
        assert await updates.next() == [("10.0.0.3", 6443)]
        await wait_for(lambda: fake_apiserver.watch_count == 1)


async def test_watch_ended_by_server_resumes_without_relist(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    async with discovery(fake_apiserver, watch_seconds=1) as updates:
        await updates.next()
        # the server ends each stream after 1 s: wait for the client's second watch request
        await wait_for(lambda: sum(1 for r in fake_apiserver.requests if is_watch(r.query)) >= 2)
        await wait_for(lambda: fake_apiserver.watch_count == 1)
        fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.5", True)])
        assert await updates.next() == [("10.0.0.5", 6443)]
        assert lists(fake_apiserver) == 1
        resumed = [r for r in fake_apiserver.requests if is_watch(r.query)]
        assert all(r.query.get("resourceVersion") for r in resumed)


async def test_unreachable_at_start_reports_started_then_recovers(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    fake_apiserver.mode = "forbidden"
    async with discovery(fake_apiserver) as updates:
        assert updates.calls == []  # started after startup_wait without a list
        fake_apiserver.mode = "ok"
        assert await updates.next() == [("10.0.0.1", 6443)]


async def test_hung_apiserver_is_bounded_then_recovers(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    fake_apiserver.mode = "hang"
    async with discovery(fake_apiserver, request_timeout=0.3) as updates:
        assert updates.calls == []
        hung_lists = lists(fake_apiserver)
        await wait_for(lambda: lists(fake_apiserver) > hung_lists)  # gave up, tried again
        fake_apiserver.mode = "ok"
        assert await updates.next() == [("10.0.0.1", 6443)]


async def test_slice_without_port_uses_backend_port(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)], port=None)
    updates = Updates()
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        cfg = kube_config(fake_apiserver, **{"proxy.backend_port": 7443})
        await nursery.start(lambda **ts: run_kubernetes_discovery(cfg, updates, **FAST, **ts))
        assert updates.calls == [[("10.0.0.1", 7443)]]
        nursery.cancel_scope.cancel()
