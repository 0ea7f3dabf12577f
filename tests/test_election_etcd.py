"""The etcd backend against a real etcd-server (Debian etcd-server 3.4) on loopback.

In-process: the protocol calls, three electors (exactly one leader at every sampled instant),
graceful hand-over through the watch, etcd killed and restarted. Out of process (real SIGKILL):
the crashed leader is replaced within TTL + retry period.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from bench.election_timing import ElectorProc, assert_never_two_leaders, first_leader
from tests.election_fixtures import (
    Board,
    ElectorHarness,
    assert_spans_disjoint,
    leader_spans,
    sample_leaders,
    start_all,
    wait_for,
)
from tests.etcd_fixtures import EtcdServer, TcpRelay, etcd_server, etcd_tls_server  # noqa: F401 (fixtures)
from vipd import config as config_mod
from vipd.election.backend import BackendUnavailable, LeaseConflict
from vipd.election.etcd import EtcdLeaseBackend, lease_ttl

pytestmark = pytest.mark.etcd


# Bounds from the issue, derived from the configured timers (defaults LD 2 s, RD 1.5 s, RP 0.5 s,
# so TTL = 2 s), plus two named allowances:
GRACEFUL_HANDOVER = 0.2  # the bound: release → watch → take-over, far below RP (no poll)
ETCD_EXPIRY_SWEEP = 0.5  # etcd 3.4 revokes expired leases in a 500 ms loop: a key outlives its TTL by ≤ 0.5 s
# This 2-core machine is shared with other test runs: the take-over's read + grant + txn and the
# elector process's report can each wait a scheduling slice. 0.25 s, about 3x the slowest
# graceful hand-over measured here (72 ms), is the allowance; a real regression (missing the
# watch and waiting for a poll, or counting from the wrong instant) costs more.
LOADED_MACHINE_MARGIN = 0.25


def make_cfg(node: str, endpoints: list[str], prefix: str, **flags: Any) -> config_mod.Config:
    base = {"vip.address": ["192.0.2.10"], "election.backend": "etcd", "proxy.enabled": False,
            "node": node, "shutdown_timeout": "3s", "proxy.drain_timeout": "1s",
            "election.etcd.endpoints": endpoints, "election.etcd.prefix": prefix}
    base.update(flags)
    return config_mod.load(environ={}, flags=base)


def fresh_prefix() -> str:
    return f"/vipd-test-{uuid.uuid4().hex[:8]}/"


def electors_for(server: EtcdServer, count: int = 3) -> list[ElectorHarness]:
    prefix, board = fresh_prefix(), Board()
    cfgs = [make_cfg(f"n{i}", [server.url], prefix) for i in range(count)]
    return [ElectorHarness(c.node, c, EtcdLeaseBackend(c), vip_gone=True, board=board) for c in cfgs]


async def sample(electors: list[ElectorHarness], duration: float, step: float = 0.01) -> list[int]:
    return [len(who) for who in await sample_leaders(electors, duration, step)]


async def test_backend_calls_against_real_etcd(etcd_server):  # noqa: F811
    prefix = fresh_prefix()
    a = EtcdLeaseBackend(make_cfg("a", [etcd_server.url], prefix))
    b = EtcdLeaseBackend(make_cfg("b", [etcd_server.url], prefix))
    assert a.server_expires and a.ttl == 2 and lease_ttl(2.5) == 3 and lease_ttl(0.5) == 2
    with trio.fail_after(10):
        dl = lambda: trio.current_time() + 2  # noqa: E731
        assert await a.observe(dl()) is None
        rec = await a.acquire(None, dl())
        assert rec.holder == "a" and rec.term == int(rec.version)
        with pytest.raises(LeaseConflict):
            await b.acquire(None, dl())
        seen = await b.observe(dl())
        assert seen == rec
        renewed = await a.renew(rec, dl())
        assert renewed.version == rec.version  # keep-alive does not write the key
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            woke = trio.Event()

            async def watch() -> None:
                await b.wait_change(seen, trio.current_time() + 5)
                woke.set()

            n.start_soon(watch)
            await trio.sleep(0.2)
            await a.release(rec, dl())
            await woke.wait()
        assert trio.current_time() - t0 < 1.0
        assert await b.observe(dl()) is None
        # An expired lease: keep-alive answers 200 without TTL → the lease is lost.
        rec = await b.acquire(None, dl())
        lease = b.lease_id
        await b._post("/v3/lease/revoke", {"ID": lease}, dl())
        with pytest.raises(LeaseConflict):
            await b.renew(rec, dl())
        await a.aclose()
        await b.aclose()


async def test_failover_to_second_endpoint(etcd_server):  # noqa: F811
    from tests.etcd_fixtures import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    backend = EtcdLeaseBackend(make_cfg("a", [dead, etcd_server.url], fresh_prefix()))
    with trio.fail_after(10):
        assert await backend.observe(trio.current_time() + 2) is None
        assert backend.endpoints[backend._current] == etcd_server.url
        await backend.aclose()


async def test_election_over_tls_with_client_certificates(etcd_tls_server):  # noqa: F811
    """kubeadm's stacked etcd: HTTPS, client certificate required (--client-cert-auth)."""
    server = etcd_tls_server
    prefix, board = fresh_prefix(), Board()
    tls = {"election.etcd.ca": server.ca, "election.etcd.cert": server.client_cert,
           "election.etcd.key": server.client_key}
    cfgs = [make_cfg(f"n{i}", [server.url], prefix, **tls) for i in range(2)]
    electors = [ElectorHarness(c.node, c, EtcdLeaseBackend(c), vip_gone=True, board=board) for c in cfgs]
    with trio.fail_after(30):
        anonymous = EtcdLeaseBackend(make_cfg("x", [server.url], prefix, **{"election.etcd.ca": server.ca}))
        with pytest.raises(BackendUnavailable):  # the server really demands a client certificate
            await anonymous.observe(trio.current_time() + 2)
        await anonymous.aclose()
        async with trio.open_nursery() as n:
            await start_all(n, electors)
            assert all(c == 1 for c in await sample(electors, 1.0))
            (leader,) = [e for e in electors if e.leader]
            leader.scope.cancel()  # graceful: revoke over TLS, the other one's watch fires
            await wait_for(electors, lambda: any(e.leader for e in electors if e is not leader))
            n.cancel_scope.cancel()
    assert_spans_disjoint(leader_spans(electors))


async def test_a_call_with_no_time_left_keeps_the_endpoint(etcd_server):  # noqa: F811
    """A call made after its deadline (a renew's re-grant after a keep-alive that hung until
    the deadline) sends nothing and must not move off the endpoint: only a call that got no
    answer does. Two rotations for one hang would, with two endpoints, land on the hung one."""
    from tests.etcd_fixtures import free_port

    backend = EtcdLeaseBackend(make_cfg("a", [etcd_server.url, f"http://127.0.0.1:{free_port()}"],
                                        fresh_prefix()))
    with trio.fail_after(10):
        with pytest.raises(BackendUnavailable, match="no time left"):
            await backend.observe(trio.current_time())
        assert backend._current == 0
        assert await backend.observe(trio.current_time() + 2) is None
        await backend.aclose()


@pytest.mark.parametrize("fault", ["die", "hang"])
async def test_first_endpoint_fails_while_leading(etcd_server, fault):  # noqa: F811
    """Endpoints [relay → etcd, etcd]: the relay dies (connections closed, then refused) or
    hangs (accepts, never answers) while its clients lead and follow through it. The backend
    fails over to the second endpoint; never two leaders; a leader again on the second one."""
    prefix, board = fresh_prefix(), Board()
    relay = TcpRelay(int(etcd_server.url.rsplit(":", 1)[1]))
    with trio.fail_after(40):
        async with trio.open_nursery() as n:
            await n.start(relay.run)
            cfgs = [make_cfg(f"n{i}", [relay.url, etcd_server.url], prefix) for i in range(3)]
            electors = [ElectorHarness(c.node, c, EtcdLeaseBackend(c), vip_gone=True, board=board)
                        for c in cfgs]
            await start_all(n, electors)
            counts = await sample(electors, 1.0)
            (leader,) = [e for e in electors if e.leader]
            assert leader.backend._current == 0  # leading through the relay
            t_fault = trio.current_time()
            relay.die() if fault == "die" else relay.hang()
            # Two renew deadlines: a hung request costs at most one, then the next endpoint.
            counts += await sample(electors, 2 * leader.cfg.election.renew_deadline)
            assert counts.count(0) < len(counts) and max(counts) <= 1
            leaders = [e for e in electors if e.leader]
            assert len(leaders) == 1 and leaders[0].backend._current == 1
            if fault == "die":  # refused/closed → the same call retries on the next endpoint
                assert all(ev.leader for t, ev in leader.events if t >= t_fault)
            for e in electors:
                e.scope.cancel()
            for e in electors:
                await e.done.wait()
            n.cancel_scope.cancel()
    assert_spans_disjoint(leader_spans(electors))


async def test_three_electors_one_leader_and_graceful_handover(etcd_server, record_property):  # noqa: F811
    electors = electors_for(etcd_server)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            await start_all(n, electors)
            counts = await sample(electors, 3.0)
            assert counts and all(c == 1 for c in counts)
            (leader,) = [e for e in electors if e.leader]
            t_stop = trio.current_time()
            leader.scope.cancel()
            await wait_for(electors, lambda: any(e.leader for e in electors if e is not leader))
            handover = trio.current_time() - t_stop
            record_property("graceful_handover_ms", round(handover * 1000, 1))
            print(f"graceful hand-over: {handover * 1000:.1f} ms")
            # In-process, nothing but trio scheduling between the electors: the bound.
            assert handover <= GRACEFUL_HANDOVER
            counts = await sample(electors, 1.0)
            assert all(c == 1 for c in counts)
            n.cancel_scope.cancel()


async def test_etcd_restart_never_two_leaders(etcd_server):  # noqa: F811
    electors = electors_for(etcd_server)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await start_all(n, electors)
            counts = await sample(electors, 1.0)
            await trio.to_thread.run_sync(etcd_server.kill)
            counts += await sample(electors, 2.5)
            assert not any(e.leader for e in electors)  # renew deadline passed: everyone stepped down
            ready = trio.Event()

            async def restart() -> None:
                await trio.to_thread.run_sync(etcd_server.start)  # returns once /health is true
                ready.set()

            n.start_soon(restart)
            while not ready.is_set():  # sample throughout the restart, until etcd serves again
                counts.append(sum(e.leader for e in electors))
                await trio.sleep(0.01)
            counts += await sample(electors, 5.0)
            assert max(counts) == 1 and counts[-1] == 1
            n.cancel_scope.cancel()
    # Fencing: nobody took over before the previous leader's last fence_until.
    spans = []
    for e in electors:
        start = fence = None
        for t, ev in e.events:
            if ev.leader and start is None:
                start = t
            if ev.fence_until is not None:
                fence = ev.fence_until
            if not ev.leader and start is not None:
                spans.append((start, t, fence, e.node))
                start = None
    spans.sort()
    for (_s1, e1, f1, n1), (s2, _e2, _f2, n2) in zip(spans, spans[1:], strict=False):
        if n1 != n2:
            assert e1 <= s2 and s2 >= f1


class KeepaliveLoss(EtcdLeaseBackend):
    """The real backend, except that while ``lose`` is set its keep-alives fail (a slow or
    one-way-lossy path: reads, grants and transactions still get through)."""

    lose = False

    async def _post(self, path: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        if self.lose and path == "/v3/lease/keepalive":
            raise BackendUnavailable("injected: keep-alive lost")
        return await super()._post(path, body, deadline)


async def test_keepalive_loss_regrants_without_stepping_down(etcd_server):  # noqa: F811
    """A leader whose keep-alives fail while etcd still takes writes keeps leading: each renew
    moves the key onto a fresh lease (no step-down at the renew deadline and retake, which
    flapped the VIP every renew deadline). Regression guard as well: a re-grant that reused the
    old lease (whose TTL it could not extend) would publish safe_until/fence_until past the
    key's real expiry, and the other node would take the expired key while this one still led
    — the sampling below sees two leaders then."""
    prefix = fresh_prefix()
    ca, cb = make_cfg("a", [etcd_server.url], prefix), make_cfg("b", [etcd_server.url], prefix)
    board = Board()
    a = ElectorHarness("a", ca, KeepaliveLoss(ca), vip_gone=True, board=board)
    b = ElectorHarness("b", cb, EtcdLeaseBackend(cb), vip_gone=True, board=board)
    rd = ca.election.renew_deadline

    def detours() -> list[tuple[str, str]]:
        return [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("election.renew_")]

    with trio.fail_after(40), capture_logs() as logs:
        async with trio.open_nursery() as n:
            await n.start(a.run)
            await wait_for([a], lambda: a.leader)
            await n.start(b.run)
            await sample(electors := [a, b], 1.0)
            t_loss = trio.current_time()
            first_lease = a.backend.lease_id
            a.backend.lose = True
            # Two renew deadlines and a TTL with etcd's sweep: the first lease has expired by
            # then, so the key survives only on leases granted since.
            counts = await sample(electors, 2 * rd + a.backend.ttl + 0.5, step=0.005)
            still_leader, last_lease = a.leader, a.backend.lease_id
            degraded = detours()
            a.backend.lose = False
            await wait_for(electors, lambda: len(detours()) > 1)
            n.cancel_scope.cancel()
    # Logged when the detour starts and when it ends, not on every renew.
    assert degraded == [("election.renew_degraded", "warning")]
    assert detours() == [("election.renew_degraded", "warning"), ("election.renew_recovered", "info")]
    assert max(counts) <= 1
    assert_spans_disjoint(leader_spans(electors))
    assert still_leader and not b.leader
    assert last_lease not in (None, first_lease)
    dropped = [ev.reason for t, ev in a.events if t > t_loss and not ev.leader]
    assert dropped == [], f"a stepped down although etcd took its writes: {dropped}"


def test_sigkilled_leader_replaced_within_ttl_plus_retry(etcd_server, record_property):  # noqa: F811
    prefix = fresh_prefix()
    procs = [ElectorProc(etcd_server.url, f"n{i}", prefix=prefix) for i in range(3)]
    try:
        got = first_leader(procs, 0.0, 30)
        assert got is not None, "no leader"
        leader, _ = got
        time.sleep(1.0)
        leader.kill()
        nxt = first_leader(procs, leader.killed_at, 10, exclude=leader)
        assert nxt is not None
        took = nxt[1] - leader.killed_at
        record_property("crash_failover_ms", round(took * 1000, 1))
        print(f"crash fail-over: {took * 1000:.1f} ms")
        # The last keep-alive was at most RP before the kill, so the key goes by kill + TTL +
        # sweep; the watch wakes a follower at once (RP more if it had to poll instead).
        cfg = make_cfg("x", [etcd_server.url], prefix).election
        bound = lease_ttl(cfg.lease_duration) + cfg.retry_period + ETCD_EXPIRY_SWEEP + LOADED_MACHINE_MARGIN
        assert took <= bound, f"crash fail-over {took:.3f}s > {bound:.2f}s"
        # graceful stop of the new leader (real SIGTERM): hand-over through the watch
        t_term = nxt[0].terminate()
        again = first_leader(procs, t_term, 10, exclude=nxt[0])
        assert again is not None
        handover = again[1] - t_term
        record_property("sigterm_handover_ms", round(handover * 1000, 1))
        print(f"SIGTERM hand-over: {handover * 1000:.1f} ms")
        # Across processes: the signal, the stopping process's wake-up and the follower's
        # report each need a scheduling slice.
        assert handover <= GRACEFUL_HANDOVER + LOADED_MACHINE_MARGIN, f"SIGTERM hand-over {handover:.3f}s"
        assert_never_two_leaders(procs)
    finally:
        for p in procs:
            p.close()


def test_etcd_server_helper_restart():
    with EtcdServer(name="vipd-helper") as server:
        assert server.running
        server.restart(kill=False)
        assert server.running
    assert not server.running
