"""Status endpoint: routing (sans-IO), the live server, garbage input, and a running supervisor."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.ops_fixtures import (
    StartedBox,
    fake_task,
    http_raw,
    make_config,
    notify_socket,
    status_code,
)
from vipd import app
from vipd.state import BackendState, RuntimeState, VipState
from vipd.status import LIVENESS_STALE, Limits, build_registry, route, run_status, status_document


def busy_state() -> RuntimeState:
    s = RuntimeState(node="node-a")
    s.election.role, s.election.holder, s.election.term = "leader", "node-a", 3
    s.election.transitions, s.election.renew_failures = 1, 2
    s.vips = [VipState("192.0.2.10/32", "eth0", True), VipState("2001:db8::10/128", "eth0", False)]
    s.announce.sent = 12
    s.proxy.listening = True
    s.proxy.rejected_connections = 4
    s.proxy.backends = {
        "10.0.0.11:6444": BackendState("10.0.0.11:6444", healthy=True, active_connections=2,
                                       total_connections=7, failed_connects=1, bytes_in=100, bytes_out=2000,
                                       transitions=1),
        "10.0.0.12:6444": BackendState("10.0.0.12:6444", healthy=False),
    }
    s.expected = {"status", "election"}
    s.ready = {"status", "election"}
    s.last_tick = 100.0
    return s


# --------------------------------------------------------------------------------------------
# route(): the decisions, without sockets.
# --------------------------------------------------------------------------------------------


def test_status_document_has_exactly_the_interface_fields():
    doc = status_document(busy_state())
    assert set(doc) == {"node", "role", "holder", "term", "vips", "backends"}
    assert doc["role"] == "leader" and doc["holder"] == "node-a" and doc["term"] == 3
    assert doc["vips"][0] == {"address": "192.0.2.10/32", "interface": "eth0", "present": True}
    assert doc["backends"][0] == {"address": "10.0.0.11:6444", "healthy": True, "active_connections": 2}
    json.dumps(doc)


@pytest.mark.parametrize(
    ("path", "now", "code"),
    [("/livez", 100.5, 200), ("/healthz", 100.5, 200), ("/livez", 100 + LIVENESS_STALE + 0.1, 503),
     ("/readyz", 100.5, 200), ("/status", 100.5, 200), ("/metrics", 100.5, 200), ("/nope", 100.5, 404),
     ("/livez?verbose", 100.5, 200)],
)
def test_route_codes(path, now, code):
    s = busy_state()
    resp = route("GET", path, "", s, build_registry(s), now)
    assert resp.status == code


def test_route_readyz_names_missing_tasks_and_stopping():
    s = busy_state()
    s.expected.add("proxy")
    resp = route("GET", "/readyz", "", s, build_registry(s), 100.5)
    assert resp.status == 503 and b"waiting for proxy" in resp.body
    s.ready.add("proxy")
    s.proxy.listening = False
    resp = route("GET", "/readyz", "", s, build_registry(s), 100.5)
    assert resp.status == 503 and b"waiting for proxy listener" in resp.body
    s.proxy.listening = True
    assert route("GET", "/readyz", "", s, build_registry(s), 100.5).status == 200
    s.stopping = True
    resp = route("GET", "/readyz", "", s, build_registry(s), 100.5)
    assert resp.status == 503 and b"stopping" in resp.body


def test_metrics_doc_names_the_real_tasks_and_readyz_text():
    """docs/metrics.md's /readyz line: the task names of the production plan (everything
    enabled) and a 503 text exactly as readiness_text() words it."""
    import re
    from pathlib import Path

    from vipd.status import readiness_text

    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    cfg = make_config(**{"proxy.enabled": True, "proxy.backends": ["10.0.0.11:6444"], "announce.enabled": True})
    state = RuntimeState(node=cfg.node)
    plan = app.default_plan(app.Wiring(cfg=cfg, state=state))
    names = [n for n, _ in plan.services + plan.vip + plan.proxy] + [plan.election[0]]
    listed = re.search(r"every task has reported started \(([^;)]*)", doc).group(1)
    assert re.findall(r"`([a-z]+)`", listed) == names
    state.expected = set(names)
    state.ready = set(names) - {"election"}
    text = readiness_text(state).strip()
    assert text == "not ready: waiting for election, proxy listener"
    assert f"`{text}`" in doc
    state.stopping = True
    assert f"`{readiness_text(state).strip()}`" in doc


def test_route_rejects_other_methods():
    s = busy_state()
    resp = route("POST", "/status", "", s, build_registry(s), 100.5)
    assert resp.status == 405 and ("Allow", "GET, HEAD") in resp.headers


def test_metrics_parse_with_prometheus_parser():
    s = busy_state()
    body = route("GET", "/metrics", "", s, build_registry(s, "kubernetes"), 100.5).body.decode()
    samples = {}
    for fam in text_string_to_metric_families(body):
        for sample in fam.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("vipd_leader", (("node", "node-a"),))] == 1
    assert samples[("vipd_leadership_transitions_total", ())] == 1
    assert samples[("vipd_election_renew_failures_total", ())] == 2
    assert samples[("vipd_vip_present", (("address", "192.0.2.10/32"), ("interface", "eth0")))] == 1
    assert samples[("vipd_vip_present", (("address", "2001:db8::10/128"), ("interface", "eth0")))] == 0
    assert samples[("vipd_announcements_sent_total", ())] == 12
    b = ("backend", "10.0.0.11:6444")
    assert samples[("vipd_proxy_connections_active", (b,))] == 2
    assert samples[("vipd_proxy_connections_total", (b,))] == 7
    assert samples[("vipd_proxy_connections_failed_total", (b,))] == 1
    assert samples[("vipd_proxy_bytes_total", (b, ("direction", "client_to_backend")))] == 100
    assert samples[("vipd_proxy_bytes_total", (b, ("direction", "backend_to_client")))] == 2000
    assert samples[("vipd_backend_up", (b,))] == 1
    assert samples[("vipd_backend_up", (("backend", "10.0.0.12:6444"),))] == 0
    assert samples[("vipd_proxy_connections_rejected_total", ())] == 4
    assert samples[("vipd_election_backend_up", (("backend", "kubernetes"),))] == 1
    assert any(name == "process_open_fds" for name, _ in samples)


def test_metrics_openmetrics_negotiation():
    s = busy_state()
    resp = route("GET", "/metrics", "application/openmetrics-text; version=1.0.0", s, build_registry(s), 100.5)
    assert resp.content_type.startswith("application/openmetrics-text")
    assert resp.body.rstrip().endswith(b"# EOF")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_metrics_pass_promtool_lint():
    s = busy_state()
    body = route("GET", "/metrics", "", s, build_registry(s), 100.5).body
    proc = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# --------------------------------------------------------------------------------------------
# The live server.
# --------------------------------------------------------------------------------------------


async def start_server(nursery, state, limits=None):
    cfg = make_config()
    limits = limits or Limits()
    bound = await nursery.start(lambda **kw: run_status(cfg, state, limits=limits, **kw))
    return bound[0][1]


async def test_server_answers_every_path_and_keeps_alive():
    state = busy_state()
    state.last_tick = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery, state)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for path in ("/livez", "/healthz", "/readyz", "/metrics", "/status"):
                    r = await client.get(path)
                    assert r.status_code == 200, (path, r.text)
                doc = (await client.get("/status")).json()
                assert doc["node"] == "node-a" and doc["role"] == "leader"
                r = await client.head("/metrics")
                assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
                r = await client.get("/missing")
                assert r.status_code == 404
                r = await client.post("/status", content=b"x")
                assert r.status_code == 405
                assert (await client.get("/livez")).status_code == 200  # same connection, still fine
            nursery.cancel_scope.cancel()


async def test_garbage_requests_get_4xx_and_daemon_stays_up():
    state = busy_state()
    state.last_tick = trio.current_time()
    limits = Limits(request_timeout=0.5, max_head=4096, max_body=64)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery, state, limits)
            cases = [
                (b"HELLO THERE\r\n\r\n", 400),
                (b"GET /livez HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
                (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # a TLS hello
                (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
                (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000, 413),
                (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
                (b"GET /liv", 408),  # half a request line, then silence
            ]
            for payload, expected in cases:
                raw = await http_raw(port, payload)
                assert status_code(raw) == expected, (payload[:40], raw[:200])
            # A client that connects and says nothing is closed after the timeout, with no answer.
            assert await http_raw(port, b"") == b""
            # Unaffected: a good request still works.
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{port}/livez")
                assert r.status_code == 200
            nursery.cancel_scope.cancel()


async def test_concurrency_is_bounded_and_slots_free_after_timeout():
    state = busy_state()
    state.last_tick = trio.current_time()
    limits = Limits(max_connections=2, request_timeout=0.5)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery, state, limits)
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            try:
                # Two silent clients hold both slots; a third is served once their timeout frees one.
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"http://127.0.0.1:{port}/readyz")
                    assert r.status_code == 200
                for stream in idle:  # the server closed them: reading gives EOF
                    assert await stream.receive_some(10) == b""
            finally:
                for stream in idle:
                    await stream.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# A running supervisor with the real status and notify tasks; fake data-plane tasks.
# --------------------------------------------------------------------------------------------


async def test_daemon_readyz_flips_and_metrics_scrape_and_notify():
    from vipd.notify import run_notify

    cfg = make_config()
    state = RuntimeState(node=cfg.node)
    gate, drain = trio.Event(), trio.Event()
    stop = trio.Event()
    box = StartedBox()
    with notify_socket() as ns, trio.fail_after(30):
        env = {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": "400000"}

        def plan(w: app.Wiring) -> app.Plan:
            return app.Plan(
                services=[
                    ("status", box.wrap(lambda **kw: run_status(cfg, state, **kw))),
                    ("notify", lambda **kw: run_notify(cfg, state, w.leadership.subscribe(), environ=env, **kw)),
                ],
                vip=[("address", fake_task(gate))],
                proxy=[("proxy", fake_task(hold_on_cancel=drain,
                                           on_started=lambda: setattr(state.proxy, "listening", True)))],
                election=("election", fake_task()),
            )

        async with trio.open_nursery() as nursery:
            result = []

            async def daemon():
                result.append(await app.supervise(cfg, state, plan, stop=stop, handle_signals=False))

            nursery.start_soon(daemon)
            await box.event.wait()
            port = box.value[0][1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                r = await client.get("/readyz")
                assert r.status_code == 503 and "waiting for" in r.text
                # The supervisor's tick task starts before the services: already live.
                assert (await client.get("/livez")).status_code == 200
                gate.set()
                assert (await ns.wait_for("READY", "1"))["READY"] == "1"
                assert (await client.get("/readyz")).status_code == 200
                await ns.wait_for("WATCHDOG", "1")

                r = await client.get("/metrics")
                names = {f.name for f in text_string_to_metric_families(r.text)}
                assert {"vipd_leader", "vipd_vip_present", "vipd_ready", "vipd_proxy_connections"} <= names
                assert "vipd_ready 1.0" in r.text

                stop.set()  # the proxy fake holds the shutdown open until `drain`
                await ns.wait_for("STOPPING", "1")
                r = await client.get("/readyz")
                assert r.status_code == 503 and "stopping" in r.text
                assert (await client.get("/livez")).status_code == 200
                drain.set()
        assert result == [0]


# --------------------------------------------------------------------------------------------
# `vipd status`.
# --------------------------------------------------------------------------------------------


def test_status_endpoint_resolution(tmp_path):
    from vipd.errors import ConfigError
    from vipd.statuscmd import endpoint_from

    assert endpoint_from(None, {}) == "http://127.0.0.1:2112"
    assert endpoint_from(None, {"prometheus_server": ":2113"}) == "http://127.0.0.1:2113"
    assert endpoint_from(None, {"VIPD_STATUS_LISTEN": "[::]:2114", "prometheus_server": ":1"}) == "http://[::1]:2114"
    f = tmp_path / "vipd.yaml"
    f.write_text("status:\n  listen: 127.0.0.2:2115\nvip:\n  address: [not-validated-here]\n")
    assert endpoint_from(str(f), {}) == "http://127.0.0.2:2115"
    with pytest.raises(ConfigError, match="disabled"):
        endpoint_from(None, {"VIPD_STATUS_LISTEN": ""})


def test_status_render_table():
    from vipd.statuscmd import render

    text = render(status_document(busy_state()), "yes")
    lines = text.splitlines()
    assert lines[0].split() == ["node", "node-a"] and lines[1].split() == ["role", "leader"]
    assert "192.0.2.10/32     eth0       yes" in text
    assert any(line.split() == ["10.0.0.11:6444", "yes", "2"] for line in lines)
    assert any(line.split() == ["10.0.0.12:6444", "no", "0"] for line in lines)


async def test_status_command_against_live_server(capsys):
    from vipd.cli import main

    state = busy_state()
    state.last_tick = trio.current_time()
    state.expected.add("proxy")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery, state)
            url = f"http://127.0.0.1:{port}"
            capsys.readouterr()  # the server's own log lines
            assert await trio.to_thread.run_sync(main, ["status", "--endpoint", url]) == 0
            out = capsys.readouterr().out
            assert "leader" in out and "ready   no (waiting for proxy)" in out
            assert await trio.to_thread.run_sync(main, ["status", "--endpoint", url, "--json"]) == 0
            assert json.loads(capsys.readouterr().out) == status_document(state)
            # Something that is not vipd at that address (here: vipd's own /metrics path as a base).
            assert await trio.to_thread.run_sync(main, ["status", "--endpoint", url + "/metrics"]) == 1
            assert "HTTP 404" in capsys.readouterr().err
            nursery.cancel_scope.cancel()


async def test_status_command_unreachable_exits_1():
    import sys

    with trio.fail_after(30):
        # Port 1 on loopback: nothing listens there, the connection is refused at once.
        proc = await trio.run_process([sys.executable, "-m", "vipd", "status", "--endpoint", "http://127.0.0.1:1"],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vipd: error: cannot reach the daemon at http://127.0.0.1:1")


def test_every_metric_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    s = busy_state()
    body = route("GET", "/metrics", "", s, build_registry(s), 100.5).body.decode()
    names = {sample.name for fam in text_string_to_metric_families(body) for sample in fam.samples}
    missing = sorted(n for n in names if n.startswith("vipd_") and f"`{n}`" not in doc)
    assert not missing, f"add to docs/metrics.md: {missing}"
