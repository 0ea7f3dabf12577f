"""curl through the proxy to an HTTPS backend that the proxy health-checks over HTTPS."""

from __future__ import annotations

import structlog
import trio
import trustme

from tests.proxy_fixtures import (
    free_port,
    loopback_address,
    proxy_config,
    running_proxy,
    start_peer,
    stop_peer,
    wait_until,
)
from vipd.proxy.backends import backend_key


async def test_curl_through_proxy_to_https_checked_backend(tmp_path) -> None:
    backend_host, proxy_host = loopback_address(), loopback_address()
    bport = free_port(backend_host)
    ca = trustme.CA()
    cert = ca.issue_cert(backend_host, proxy_host)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cfg = proxy_config([(backend_host, bport)], host=proxy_host, health__check="https",
                       health__ca=str(tmp_path / "ca.pem"), health__interval="200ms")
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery, running_proxy(cfg) as (_, state):
            st = state.proxy.backends[backend_key(backend_host, bport)]
            await wait_until(lambda: not st.healthy)  # nothing listens yet: the check fails
            peer = await start_peer(nursery, "https", backend_host, bport,
                                    tmp_path / "cert.pem", tmp_path / "key.pem")
            try:
                await wait_until(lambda: st.healthy)  # verified HTTPS GET /readyz → 200, twice
                res = await trio.run_process(
                    ["curl", "-sS", "--max-time", "5", "--cacert", str(tmp_path / "ca.pem"),
                     f"https://{proxy_host}:{cfg.proxy.port}/"], capture_stdout=True, capture_stderr=True,
                    check=False)
            finally:
                stop_peer(peer)
            assert res.returncode == 0, res.stderr
            assert res.stdout == b"hello from backend\n"
            assert st.total_connections >= 1 and st.bytes_out > 0
    ups = [e for e in logs if e["event"] == "backend.up"]
    assert len(ups) == 1 and ups[0]["reason"] == "HTTP 200"
