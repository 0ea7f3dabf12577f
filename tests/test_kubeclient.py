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


def test_relative_certificate_paths_are_read_beside_the_kubeconfig(
        fake_apiserver: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubeadm and kubectl resolve a kubeconfig's file paths against the kubeconfig's own
    directory, not the working directory: vipd must too (client certificate and key here)."""
    import yaml

    conf_dir = tmp_path / "etc-kubernetes"
    conf_dir.mkdir()
    conf = fake_apiserver.write_kubeconfig(conf_dir / "admin.conf")
    doc = yaml.safe_load(conf.read_text())
    user = doc["users"][0]["user"]
    for field in ("client-certificate", "client-key"):
        source = Path(user[field])
        (conf_dir / source.name).write_bytes(source.read_bytes())
        user[field] = source.name  # relative
    conf.write_text(yaml.safe_dump(doc))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fake_apiserver.set_node("cp1", "10.0.0.11")
    assert asyncio.run(list_control_plane_nodes(str(conf))) == [("cp1", "10.0.0.11")]
    configuration = asyncio.run(load_configuration(str(conf)))
    assert configuration.cert_file == str(conf_dir / "fake-client.crt")


def test_bad_kubeconfig_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeConfigError, match="no such file"):
        asyncio.run(list_control_plane_nodes(str(tmp_path / "missing.conf")))
    garbage = tmp_path / "garbage.conf"
    garbage.write_text("::: not yaml [")
    with pytest.raises(KubeConfigError):
        asyncio.run(list_control_plane_nodes(str(garbage)))
    for text in ("", "placeholder, admin.conf not there yet\n", "apiVersion: v1\nkind: Config\n"):
        garbage.write_text(text)  # empty, systemd's placeholder credential, no clusters
        with pytest.raises(KubeConfigError, match="not a kubeconfig"):
            asyncio.run(list_control_plane_nodes(str(garbage)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster"):
        asyncio.run(list_control_plane_nodes(""))


# ---------------------------------------------------------------------------------------------
# docs/kubernetes.md's RBAC must allow every call vipd makes (checked against the fake's log).
# ---------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md"


def _documented_rules() -> dict[tuple[str, str], set[str]]:
    """(resource, name or '*') → verbs, from the Role/ClusterRole objects in the doc."""
    import re

    import yaml

    rules: dict[tuple[str, str], set[str]] = {}
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S):
        for doc in yaml.safe_load_all(block):
            if not isinstance(doc, dict) or doc.get("kind") not in ("Role", "ClusterRole"):
                continue
            for rule in doc["rules"]:
                for resource in rule["resources"]:
                    for name in rule.get("resourceNames") or ["*"]:
                        rules.setdefault((resource, name), set()).update(rule["verbs"])
    return rules


def _verb(req: kube_fixtures.Request) -> tuple[str, str, str]:
    parts = req.path.strip("/").split("/")
    collection_at = max(i for i, p in enumerate(parts) if p in ("leases", "endpointslices", "nodes"))
    resource = parts[collection_at]
    name = parts[collection_at + 1] if len(parts) > collection_at + 1 else "*"
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(req.method)
    if verb is None:
        verb = "get" if name != "*" else ("watch" if kube_fixtures.is_watch(req.query) else "list")
    return resource, name, verb


async def test_docs_rbac_allows_every_call(fake_apiserver: FakeApiServer) -> None:
    import trio
    import trio_asyncio

    from vipd.election.kube import KubeLeaseBackend
    from vipd.proxy.discovery import run_kubernetes_discovery

    cfg = kube_fixtures.kube_config(fake_apiserver, **{"election.kubernetes.lease_name": "vipd-cp-lock"})
    fake_apiserver.set_endpoint_slice("kubernetes", [("10.0.0.1", True)])
    fake_apiserver.set_node("cp1", "10.0.0.11")
    with trio.fail_after(20):
        async with trio_asyncio.open_loop():
            backend = KubeLeaseBackend(cfg)
            deadline = trio.current_time() + 5
            rec = await backend.acquire(await backend.observe(deadline), deadline)
            await backend.release(await backend.renew(rec, deadline), deadline)
            await backend.aclose()
            async with trio.open_nursery() as nursery:
                await nursery.start(run_kubernetes_discovery, cfg, lambda _: None)
                while fake_apiserver.watch_count == 0:  # noqa: ASYNC110 - state on the fake's thread
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            await trio_asyncio.aio_as_trio(list_control_plane_nodes)(fake_apiserver.kubeconfig)
    rules = _documented_rules()
    used = {_verb(r) for r in fake_apiserver.requests}
    assert {v for _, _, v in used} >= {"get", "create", "update", "list", "watch"}
    for resource, name, verb in used:
        allowed = rules.get((resource, name), set()) | rules.get((resource, "*"), set())
        assert verb in allowed, f"docs/kubernetes.md RBAC does not allow {verb} {resource}/{name}"
