"""vipd.kubeclient through the real kubernetes-asyncio client over HTTPS against the fake
apiserver, called with asyncio.run() exactly as ``vipd kubeadm join`` does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import kube_fixtures
import pytest
from kube_fixtures import FakeApiServer

from vipd.kubeclient import (
    KubeApiError,
    KubeConfigError,
    list_control_plane_nodes,
    load_configuration,
)

fake_apiserver = kube_fixtures.fake_apiserver  # the fixture, used by name
# The kubeconfig's server in the override tests: a loopback "VIP" where nothing listens on
# port 1 (an address, not a name: no DNS query leaves the machine).
VIP = "127.0.0.2"


def test_lists_control_plane_nodes_with_internal_ip(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_node("cp2", "10.0.0.12")
    fake_apiserver.set_node("cp1", "10.0.0.11")
    fake_apiserver.set_node("worker1", "10.0.0.21", control_plane=False)
    fake_apiserver.set_node("cp3", None)  # no InternalIP yet: left out
    nodes = asyncio.run(list_control_plane_nodes(fake_apiserver.kubeconfig))
    assert nodes == [("cp1", "10.0.0.11"), ("cp2", "10.0.0.12")]
    selectors = [r.query.get("labelSelector") for r in fake_apiserver.requests]
    assert selectors == ["node-role.kubernetes.io/control-plane"]


def test_legacy_master_label_when_no_control_plane_label(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.set_node("old1", "10.0.0.31", control_plane=False, legacy_master=True)
    nodes = asyncio.run(list_control_plane_nodes(fake_apiserver.kubeconfig))
    assert nodes == [("old1", "10.0.0.31")]


def test_token_kubeconfig(tmp_path: Path) -> None:
    with FakeApiServer(tmp_path, auth="token") as fake:
        fake.set_node("cp1", "10.0.0.11")
        assert asyncio.run(list_control_plane_nodes(fake.kubeconfig)) == [("cp1", "10.0.0.11")]


def test_api_server_override_is_honoured_and_tls_still_verified(tmp_path: Path) -> None:
    """kubeconfig → the VIP (nothing listens); override → 127.0.0.1, whose certificate names
    only the VIP (as kubeadm's apiserver certificate does not name 127.0.0.1)."""
    with FakeApiServer(tmp_path, cert_names=(VIP,),
                       kubeconfig_server=f"https://{VIP}:1") as fake:
        fake.set_node("cp1", "10.0.0.11")
        nodes = asyncio.run(list_control_plane_nodes(fake.kubeconfig, fake.url, within=10))
        assert nodes == [("cp1", "10.0.0.11")]
        with pytest.raises(KubeApiError):  # without the override: the kubeconfig's server
            asyncio.run(list_control_plane_nodes(fake.kubeconfig, within=10))


def test_tls_name_is_verified(tmp_path: Path) -> None:
    """A certificate that names neither host is refused, override or not."""
    with FakeApiServer(tmp_path, cert_names=("someone-else.test",)) as fake:
        with pytest.raises(KubeApiError):
            asyncio.run(list_control_plane_nodes(fake.kubeconfig, within=10))
        other = fake.write_kubeconfig(tmp_path / "other.conf", server=f"https://{VIP}:1")
        with pytest.raises(KubeApiError):
            asyncio.run(list_control_plane_nodes(str(other), fake.url, within=10))


def test_override_configuration_details(fake_apiserver: FakeApiServer, tmp_path: Path) -> None:
    async def load(server: str | None, kubeconfig: str = fake_apiserver.kubeconfig):
        return await load_configuration(kubeconfig, server)

    plain = asyncio.run(load(None))
    assert plain.host == fake_apiserver.url and plain.tls_server_name is None
    same_host = asyncio.run(load(f"https://127.0.0.1:{fake_apiserver.port}/"))
    assert same_host.tls_server_name is None and not same_host.host.endswith("/")
    named = fake_apiserver.write_kubeconfig(tmp_path / "named.conf", server="https://vip.example:6443")
    moved = asyncio.run(load("https://127.0.0.1:6444", str(named)))
    assert (moved.host, moved.tls_server_name) == ("https://127.0.0.1:6444", "vip.example")


def test_unauthorized_and_unreachable_are_api_errors(fake_apiserver: FakeApiServer,
                                                      tmp_path: Path) -> None:
    anonymous = tmp_path / "anon.conf"
    fake_apiserver.write_kubeconfig(anonymous, auth="token")
    anonymous.write_text(anonymous.read_text().replace(kube_fixtures.TOKEN, "wrong-token"))
    with pytest.raises(KubeApiError, match="401"):
        asyncio.run(list_control_plane_nodes(str(anonymous)))
    fake_apiserver.mode = "hang"
    with pytest.raises(KubeApiError, match="no answer"):
        asyncio.run(list_control_plane_nodes(fake_apiserver.kubeconfig, within=0.5))


def test_bad_kubeconfig_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeConfigError, match="no such file"):
        asyncio.run(list_control_plane_nodes(str(tmp_path / "missing.conf")))
    garbage = tmp_path / "garbage.conf"
    garbage.write_text("::: not yaml [")
    with pytest.raises(KubeConfigError):
        asyncio.run(list_control_plane_nodes(str(garbage)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster"):
        asyncio.run(list_control_plane_nodes(""))
