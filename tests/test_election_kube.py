"""KubeLeaseBackend through the real kubernetes-asyncio client over HTTPS, against the fake
apiserver of tests/kube_fixtures.py (which enforces resourceVersion, AlreadyExists, MicroTime)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import kube_fixtures
import pytest
import trio
import trio_asyncio
from kube_fixtures import MICROTIME_RE, FakeApiServer, kube_config

from tests.election_fixtures import (
    Board,
    ElectorHarness,
    assert_spans_disjoint,
    leader_spans,
    wait_for,
)
from vipd.election.backend import BackendUnavailable, LeaseConflict, LeaseRecord
from vipd.election.kube import KubeLeaseBackend, micro_time, record_from_lease

fake_apiserver = kube_fixtures.fake_apiserver  # the fixture, used by name
# The kubeconfig's server in the override tests: a loopback "VIP" where nothing listens on
# port 1 (an address, not a name: no DNS query leaves the machine).
VIP = "127.0.0.2"
NS, NAME = "kube-system", "vipd-test-lock"


@contextlib.asynccontextmanager
async def backends(fake: FakeApiServer, *nodes: str, **flags: Any) -> AsyncIterator[list[KubeLeaseBackend]]:
    """Backends for ``nodes`` inside one trio-asyncio loop (as vipd.app.run has it)."""
    async with trio_asyncio.open_loop():
        made = [KubeLeaseBackend(kube_config(fake, node=n, **flags)) for n in nodes]
        try:
            yield made
        finally:
            for b in made:
                await b.aclose()


def soon(seconds: float = 5.0) -> float:
    return trio.current_time() + seconds


def test_micro_time_always_has_six_fractional_digits() -> None:
    whole = dt.datetime(2024, 5, 1, 12, 0, 0, 0, tzinfo=dt.UTC)
    assert micro_time(whole) == "2024-05-01T12:00:00.000000Z"
    local = dt.datetime(2024, 5, 1, 14, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert micro_time(local) == "2024-05-01T12:00:00.000005Z"
    assert MICROTIME_RE.match(micro_time())


def test_malformed_records_parse_leniently() -> None:
    bad = record_from_lease({"metadata": {"resourceVersion": "7"},
                             "spec": {"holderIdentity": 5, "leaseDurationSeconds": -3,
                                      "leaseTransitions": "x", "renewTime": "garbage"}})
    assert bad == LeaseRecord(holder=None, version="7", term=0, lease_duration=None)
    assert record_from_lease(None) == LeaseRecord(holder=None, version="", term=0)
    assert record_from_lease({"spec": {"holderIdentity": ""}}).holder is None


async def test_create_on_404_then_renew(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            assert await a.observe(soon()) is None
            rec = await a.acquire(None, soon())
            assert (rec.holder, rec.term, rec.lease_duration) == ("node-a", 0, 2.0)
            stored = fake_apiserver.lease(NS, NAME)
            assert stored is not None
            spec = stored["spec"]
            assert MICROTIME_RE.match(spec["acquireTime"]) and MICROTIME_RE.match(spec["renewTime"])
            assert spec["leaseDurationSeconds"] == 2 and spec["leaseTransitions"] == 0
            renewed = await a.renew(rec, soon())
            assert renewed.version != rec.version and renewed.holder == "node-a"
            assert renewed.term == 0
            assert fake_apiserver.lease(NS, NAME)["spec"]["acquireTime"] == spec["acquireTime"]
            assert await a.observe(soon()) == renewed


async def test_library_timestamps_are_refused_by_the_fake(fake_apiserver: FakeApiServer) -> None:
    """Why kube.py formats MicroTime itself: the library's isoformat() drops the fraction."""
    from kubernetes_asyncio import client as k8s

    from vipd.kubeclient import open_api_client

    async def create_typed() -> int:
        async with open_api_client(fake_apiserver.kubeconfig) as api:
            whole = dt.datetime(2024, 5, 1, 12, 0, 0, 0, tzinfo=dt.UTC)
            lease = k8s.V1Lease(metadata=k8s.V1ObjectMeta(name="typed"),
                                spec=k8s.V1LeaseSpec(holder_identity="x", renew_time=whole))
            try:
                await k8s.CoordinationV1Api(api).create_namespaced_lease(NS, lease)
            except k8s.ApiException as exc:
                return int(exc.status)
            return 201

    with trio.fail_after(20):
        async with trio_asyncio.open_loop():
            assert await trio_asyncio.aio_as_trio(create_typed)() == 400


async def test_stale_version_is_a_conflict(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            rec = await a.acquire(None, soon())
            fake_apiserver.set_lease(NS, NAME, holder="node-b", lease_duration_seconds=2,
                                     lease_transitions=1)
            with pytest.raises(LeaseConflict):
                await a.renew(rec, soon())
            seen = await a.observe(soon())
            assert seen is not None and (seen.holder, seen.term) == ("node-b", 1)


async def test_create_race_already_exists_is_a_conflict(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            assert await a.observe(soon()) is None
            fake_apiserver.set_lease(NS, NAME, holder="node-b", lease_duration_seconds=2)
            with pytest.raises(LeaseConflict):
                await a.acquire(None, soon())
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == "node-b"


async def test_takeover_counts_a_transition(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_lease(NS, NAME, holder="node-b", lease_duration_seconds=15,
                             lease_transitions=3, acquire_time="2020-01-01T00:00:00.000000Z")
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            seen = await a.observe(soon())
            assert seen is not None and seen.holder == "node-b"
            rec = await a.acquire(seen, soon())
            assert (rec.holder, rec.term) == ("node-a", 4)
            spec = fake_apiserver.lease(NS, NAME)["spec"]
            assert spec["acquireTime"] != "2020-01-01T00:00:00.000000Z"
            assert spec["leaseTransitions"] == 4


async def test_malformed_record_is_taken_over(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_lease(NS, NAME, raw_spec={"holderIdentity": None, "leaseDurationSeconds": -5,
                                                 "renewTime": "garbage", "acquireTime": 12,
                                                 "leaseTransitions": "x"})
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            seen = await a.observe(soon())
            assert seen is not None and seen.holder is None and seen.lease_duration is None
            rec = await a.acquire(seen, soon())
            assert (rec.holder, rec.term) == ("node-a", 1)


async def test_release_clears_holder_and_next_node_acquires(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a", "node-b") as (a, b):
            rec = await a.acquire(None, soon())
            rec = await a.renew(rec, soon())
            await a.release(rec, soon())
            spec = fake_apiserver.lease(NS, NAME)["spec"]
            assert "holderIdentity" not in spec and spec["leaseTransitions"] == 0
            seen = await b.observe(soon())
            assert seen is not None and seen.holder is None
            got = await b.acquire(seen, soon())
            assert (got.holder, got.term) == ("node-b", 1)
            # a's release of a lease it no longer holds leaves b's lease alone
            await a.release(rec, soon())
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == "node-b"


async def test_release_with_stale_record_retries_once(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            first = await a.acquire(None, soon())
            await a.renew(first, soon())  # `first` is now stale
            await a.release(first, soon())
            assert "holderIdentity" not in fake_apiserver.lease(NS, NAME)["spec"]


async def test_forbidden_is_unavailable_and_marked(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.mode = "forbidden"
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            with pytest.raises(BackendUnavailable) as info:
                await a.observe(soon())
            assert info.value.forbidden
            with pytest.raises(BackendUnavailable) as info:
                await a.acquire(None, soon())
            assert info.value.forbidden
            fake_apiserver.mode = "ok"  # RBAC bound: the same client now works
            assert await a.observe(soon()) is None


async def test_server_error_is_unavailable(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.mode = "fail"
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            with pytest.raises(BackendUnavailable) as info:
                await a.observe(soon())
            assert not info.value.forbidden


async def test_hung_server_surfaces_by_the_deadline(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            rec = await a.acquire(None, soon())  # client and connection pool are warm
            fake_apiserver.mode = "hang"
            for call in (lambda d: a.observe(d), lambda d: a.renew(rec, d)):
                deadline = trio.current_time() + 0.6
                with pytest.raises(BackendUnavailable):
                    await call(deadline)
                # trio's cancellation is prompt; the margin is for a loaded 2-core box
                assert trio.current_time() < deadline + 0.5
            fake_apiserver.mode = "ok"
            seen = await a.observe(soon())
            assert seen is not None and seen.holder == "node-a"


async def test_deadline_in_the_past_fails_at_once(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a") as (a,):
            with pytest.raises(BackendUnavailable):
                await a.observe(trio.current_time() - 1)
            assert fake_apiserver.requests == []


async def test_missing_kubeconfig_is_unavailable_until_it_appears(fake_apiserver: FakeApiServer,
                                                                   tmp_path: Any) -> None:
    later = tmp_path / "later-admin.conf"
    with trio.fail_after(20):
        async with backends(fake_apiserver, "node-a",
                            **{"election.kubernetes.kubeconfig": str(later)}) as (a,):
            with pytest.raises(BackendUnavailable):
                await a.observe(soon())
            fake_apiserver.write_kubeconfig(later, auth="token")
            assert await a.observe(soon()) is None


async def test_api_server_override_keeps_kubeconfig_credentials(tmp_path: Any) -> None:
    """The kubeconfig names the VIP (nothing there); --api-server points at the local
    apiserver, whose certificate names only the VIP (not 127.0.0.1): TLS still verifies."""
    with FakeApiServer(tmp_path, cert_names=(VIP,),
                       kubeconfig_server=f"https://{VIP}:1") as fake, trio.fail_after(20):
        async with backends(fake, "node-a", **{"election.kubernetes.api_server": fake.url}) as (a,):
            assert await a.observe(soon()) is None
            await a.acquire(None, soon())
        async with backends(fake, "node-b") as (b,):
            with pytest.raises(BackendUnavailable):
                await b.observe(soon())


# ---------------------------------------------------------------------------------------------
# Three electors (the real election runner + KubeLeaseBackend) against the fake apiserver.
# ---------------------------------------------------------------------------------------------


def kube_elector(fake: FakeApiServer, node: str, board: Board, **flags: Any) -> ElectorHarness:
    """One node: run_election with its own KubeLeaseBackend (run it inside a trio-asyncio loop);
    no VIP to remove first, so it releases as soon as it is stopped."""
    cfg = kube_config(fake, node=node, **flags)
    return ElectorHarness(node, cfg, KubeLeaseBackend(cfg), vip_gone=True, board=board)


async def wait_leader(electors: list[ElectorHarness], exclude: ElectorHarness | None = None) -> ElectorHarness:
    def one() -> bool:
        return len([e for e in electors if e.leader and e is not exclude]) == 1

    await wait_for(electors, one)
    (leader,) = [e for e in electors if e.leader and e is not exclude]
    return leader


@contextlib.asynccontextmanager
async def three_electors(fake: FakeApiServer) -> AsyncIterator[list[ElectorHarness]]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        board = Board()
        electors = [kube_elector(fake, f"node-{c}", board) for c in "abc"]
        for e in electors:
            await nursery.start(e.run)
        yield electors
        nursery.cancel_scope.cancel()


async def exactly_one_leader_while(electors: list[ElectorHarness], seconds: float) -> None:
    """Sample every 50 ms: exactly one leader at every instant."""
    for _ in range(int(seconds / 0.05)):
        assert sum(e.leader for e in electors) == 1, [(e.node, e.leader) for e in electors]
        await trio.sleep(0.05)


def assert_never_two(electors: list[ElectorHarness]) -> None:
    assert_spans_disjoint(leader_spans(electors))


@pytest.mark.slow
async def test_three_electors_one_leader_and_release_handover(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(40):
        async with three_electors(fake_apiserver) as electors:
            first = await wait_leader(electors)
            await exactly_one_leader_while(electors, 3.0)  # steady state: 6 lease renewals
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == first.node
            # graceful stop of the leader: it releases, another takes over within a retry or so
            stopped_at = trio.current_time()
            assert first.scope is not None
            first.scope.cancel()
            await first.done.wait()
            assert first.leader is False
            second = await wait_leader(electors, exclude=first)
            took = trio.current_time() - stopped_at
            assert took < first.cfg.election.lease_duration, f"took {took:.2f}s: release was not seen"
            await exactly_one_leader_while(electors, 1.0)
            assert_never_two(electors)
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == second.node


@pytest.mark.slow
async def test_hung_apiserver_leader_steps_down_by_renew_deadline(fake_apiserver: FakeApiServer) -> None:
    with trio.fail_after(40):
        async with three_electors(fake_apiserver) as electors:
            leader = await wait_leader(electors)
            await trio.sleep(1.0)  # a few renewals
            hung_at = trio.current_time()
            fake_apiserver.mode = "hang"
            await wait_for(electors, lambda: not leader.leader)
            stepped_down = min(t for t, ev in leader.events if t >= hung_at and not ev.leader)
            rd = leader.cfg.election.renew_deadline
            # the last successful renew started before hung_at, so the deadline is < hung_at + RD
            assert stepped_down <= hung_at + rd + 0.25, f"stepped down {stepped_down - hung_at:.2f}s after the hang"
            # nobody can lead while every request hangs
            await trio.sleep(leader.cfg.election.lease_duration)
            assert not any(e.leader for e in electors)
            fake_apiserver.mode = "ok"
            await wait_leader(electors)
            assert_never_two(electors)


async def start_bootstrap_leader(nursery: trio.Nursery, fake: FakeApiServer) -> ElectorHarness:
    """node-a with start_as_leader (the first node during kubeadm init), once it leads."""
    elector = kube_elector(fake, "node-a", Board(), **{"election.start_as_leader": True})
    await nursery.start(elector.run)
    await wait_leader([elector])
    return elector


@pytest.mark.slow
async def test_bootstrap_leads_while_forbidden_then_takes_the_lease(fake_apiserver: FakeApiServer) -> None:
    """Kubernetes ≥ 1.29 during kubeadm init: admin.conf is forbidden until RBAC is bound."""
    fake_apiserver.mode = "forbidden"
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            first = await start_bootstrap_leader(nursery, fake_apiserver)
            assert fake_apiserver.lease(NS, NAME) is None  # leading without a lease
            fake_apiserver.mode = "ok"  # kubeadm bound kubeadm:cluster-admins
            await wait_for([first], lambda: any(ev.reason == "acquired" for _, ev in first.events))
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == "node-a"
            assert first.leader and all(ev.leader for _, ev in first.events)  # never stepped down
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_bootstrap_yields_to_a_lease_held_by_another_node(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_lease(NS, NAME, holder="node-b", lease_duration_seconds=15,
                             renew_time="2024-01-01T00:00:00.000000Z")
    fake_apiserver.mode = "forbidden"
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            late = await start_bootstrap_leader(nursery, fake_apiserver)
            fake_apiserver.mode = "ok"
            await wait_for([late], lambda: not late.leader)
            assert [ev.reason for _, ev in late.events][-1] == "bootstrap_yield"
            assert fake_apiserver.lease(NS, NAME)["spec"]["holderIdentity"] == "node-b"
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_renew_applied_but_answered_late_does_not_flap(fake_apiserver: FakeApiServer) -> None:
    """The apiserver applies a renew but answers after the request deadline: the leader keeps a
    stale resourceVersion and its next renew gets 409. It re-reads at once, finds its own name
    (only it writes that) and renews with the fresh version: no step-down, no VIP flap."""
    # LD 4 s / RD 3 s: request timeout max(RP, RD/2) = 1.5 s, and after the 409 the re-read and
    # the renew still have ~1 s before the renew deadline even on this loaded 2-core machine.
    timing = {"election.lease_duration": "4s", "election.renew_deadline": "3s",
              "election.retry_period": "0.5s"}
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            a = kube_elector(fake_apiserver, "node-a", Board(), **timing)
            await nursery.start(a.run)
            await wait_for([a], lambda: sum(ev.reason == "renewed" for _, ev in a.events) >= 2)
            term = fake_apiserver.lease(NS, NAME)["spec"]["leaseTransitions"]
            armed, answers_before = trio.current_time(), len(fake_apiserver.lease_answers)
            fake_apiserver.answer_lease_write_late(2.0)  # later than any request deadline
            # next renew (≤ RP) + its timeout (1.5 s) + 409 + re-read + renew, then some more
            await trio.sleep(0.5 + 1.5 + 2.0)
            answers = fake_apiserver.lease_answers[answers_before:]
            assert any(x.status == 409 for x in answers), "the stale renew was never refused"
            assert all(ev.leader for t, ev in a.events if t >= armed), \
                [(round(t - armed, 3), ev.reason) for t, ev in a.events if t >= armed]
            assert sum(ev.reason == "renewed" for t, ev in a.events if t > armed + 2.0) >= 2
            spec = fake_apiserver.lease(NS, NAME)["spec"]
            assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("node-a", term)
            nursery.cancel_scope.cancel()


# Transit of the answer that showed the last change and of the take-over PUT, plus scheduling on
# this shared 2-core machine; both only ever make the measured gap longer than the rule's LD.
ROUND_TRIPS_ALLOWANCE = 0.25


@pytest.mark.slow
@pytest.mark.parametrize("skew_hours", [-1, 1])
async def test_takeover_lease_duration_after_last_seen_change_whatever_the_skew(
        fake_apiserver: FakeApiServer, skew_hours: int) -> None:
    """node-b (written out of band) renews the Lease every RP with its wall clock an hour off,
    then dies. node-a takes over exactly lease_duration after it last saw the record change, by
    its own monotonic clock. A follower that compared renewTime with its own wall clock would
    take over at once (-1 h) or only after an hour (+1 h)."""

    def holder_renews() -> str:
        stamp = micro_time(dt.datetime.now(dt.UTC) + dt.timedelta(hours=skew_hours))
        obj = fake_apiserver.set_lease(NS, NAME, holder="node-b", lease_duration_seconds=2,
                                       lease_transitions=0, acquire_time=stamp, renew_time=stamp)
        return obj["metadata"]["resourceVersion"]

    holder_renews()
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            a = kube_elector(fake_apiserver, "node-a", Board())
            await nursery.start(a.run)
            rp = a.cfg.election.retry_period
            for _ in range(6):  # node-b alive for 3 s: node-a must not take over meanwhile
                await trio.sleep(rp)
                last = holder_renews()
                assert not a.leader
            await wait_for([a], lambda: a.leader)  # node-b has died
            nursery.cancel_scope.cancel()
    # The timeline on the fake's clock (time.monotonic): when node-a was first shown node-b's
    # last write, and when node-a's take-over arrived.
    answers = fake_apiserver.lease_answers
    seen = min(x.at for x in answers if x.method == "GET" and x.version == last)
    took = min(x.at for x in answers if x.method == "PUT" and x.status == 200 and x.holder == "node-a")
    ld = a.cfg.election.lease_duration
    assert ld <= took - seen <= ld + ROUND_TRIPS_ALLOWANCE, f"took over {took - seen:.3f}s after the last change"
