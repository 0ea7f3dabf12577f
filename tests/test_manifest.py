"""Static pod manifests: golden files, V1Pod round trips, the origin's kubeadm flags.

Golden files live in tests/golden/. After an intended change, regenerate them with

    VIPD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_manifest.py

and review the diff. The package version is written as @VERSION@ in the golden files.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from tests.kube_fixtures import FakeApiServer
from vipd import __version__
from vipd import config as config_mod
from vipd.cli import main

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("VIPD_UPDATE_GOLDEN") == "1"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    normalised = text
    for form in ("vipd {}", "vipd:{}", "version: {}"):
        normalised = normalised.replace(form.format(__version__), form.format("@VERSION@"))
    if UPDATE:
        path.write_text(normalised)
    assert path.exists(), f"{path} missing; run with VIPD_UPDATE_GOLDEN=1 to create it"
    assert normalised == path.read_text(), f"{name} differs from the golden file (VIPD_UPDATE_GOLDEN=1 regenerates)"


def v1pod_round_trip(text: str) -> dict:
    """Parse with kubernetes-asyncio's V1Pod model and serialise back: nothing may be lost."""
    from kubernetes_asyncio.client import ApiClient

    data = yaml.safe_load(text)

    async def convert():
        api = ApiClient()
        try:
            pod = api._ApiClient__deserialize(data, "V1Pod")
            return pod, api.sanitize_for_serialization(pod)
        finally:
            await api.close()

    pod, back = asyncio.run(convert())
    assert back == data
    assert pod.kind == "Pod" and pod.metadata.name == "vipd" and pod.metadata.namespace == "kube-system"
    assert pod.spec.host_network is True
    assert pod.spec.priority_class_name == "system-node-critical"
    c = pod.spec.containers[0]
    assert c.args == ["start"]
    assert c.security_context.capabilities.drop == ["ALL"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(c.security_context.capabilities.add)
    assert all(m.read_only for m in c.volume_mounts or [])
    return data


def env_of(data: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in data["spec"]["containers"][0].get("env", [])}


def reload_from_env(data: dict) -> config_mod.Config:
    """What vipd inside the pod will run with (the image has no other configuration)."""
    return config_mod.load(environ=env_of(data))


# --------------------------------------------------------------------------------------------
# vipd manifest pod
# --------------------------------------------------------------------------------------------

POD_ARGS = ["manifest", "pod", "--address", "192.0.2.10", "--interface", "ens192", "--discovery", "peers",
            "--peer", "cp1:192.0.2.21:6444", "--peer", "cp2:192.0.2.22:6444",
            "--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s",
            "--announce-refresh", "500ms", "--status-listen", "127.0.0.1:2112"]


def test_manifest_pod_golden_and_round_trip(capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("VIPD_")]:
        monkeypatch.delenv(name)
    code, out, err = run_cli(capsys, *POD_ARGS)
    assert code == 0, err
    check_golden("manifest-pod.yaml", out)
    data = v1pod_round_trip(out)
    c = data["spec"]["containers"][0]
    assert c["image"] == f"ghcr.io/vipd/vipd:{__version__}"
    assert c["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/livez", "port": 2112}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert data["spec"]["volumes"] == [{"name": "kubeconfig",
                                        "hostPath": {"path": "/etc/kubernetes/admin.conf", "type": "File"}}]
    assert "VIPD_NODE" not in env_of(data)  # one manifest fits every node

    # The env reproduces the configuration that was asked for.
    cfg = reload_from_env(data)
    wanted = config_mod.load(environ={}, flags=config_mod.collect_flags(
        __import__("vipd.cli", fromlist=["build_parser"]).build_parser().parse_args(POD_ARGS)))
    got, exp = config_mod.effective_values(cfg), config_mod.effective_values(wanted)
    assert got == exp


def test_manifest_pod_bootstrap_mounts_super_admin(capsys):
    code, out, _ = run_cli(capsys, "manifest", "pod", "--address", "192.0.2.10", "--backend", "192.0.2.21:6444",
                           "--bootstrap", "--image", "registry.example/vipd:test")
    assert code == 0
    check_golden("manifest-pod-bootstrap.yaml", out)
    data = v1pod_round_trip(out)
    assert data["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/kubernetes/super-admin.conf"
    assert data["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/kubernetes/admin.conf"
    assert "sed -i 's#path: /etc/kubernetes/super-admin.conf#path: /etc/kubernetes/admin.conf#'" in out
    assert data["spec"]["containers"][0]["image"] == "registry.example/vipd:test"


def test_manifest_pod_etcd_mounts_its_files_and_low_port_gets_bind_cap(capsys):
    code, out, _ = run_cli(capsys, "manifest", "pod", "--address", "192.0.2.10", "--address", "2001:db8::10",
                           "--election", "etcd", "--etcd-endpoint", "https://127.0.0.1:2379",
                           "--etcd-ca", "/etc/kubernetes/pki/etcd/ca.crt",
                           "--etcd-cert", "/etc/kubernetes/pki/etcd/healthcheck-client.crt",
                           "--etcd-key", "/etc/kubernetes/pki/etcd/healthcheck-client.key",
                           "--backend", "192.0.2.21:6444", "--lb-port", "443", "--status-listen", ":9100")
    assert code == 0
    check_golden("manifest-pod-etcd.yaml", out)
    data = v1pod_round_trip(out)
    c = data["spec"]["containers"][0]
    assert [m["mountPath"] for m in c["volumeMounts"]] == [
        "/etc/kubernetes/pki/etcd/ca.crt", "/etc/kubernetes/pki/etcd/healthcheck-client.crt",
        "/etc/kubernetes/pki/etcd/healthcheck-client.key"]
    assert "NET_BIND_SERVICE" in c["securityContext"]["capabilities"]["add"]
    assert c["livenessProbe"]["httpGet"]["host"] == "127.0.0.1" and c["livenessProbe"]["httpGet"]["port"] == 9100
    assert env_of(data)["VIPD_ADDRESS"] == "192.0.2.10,2001:db8::10"
    reload_from_env(data)


def test_manifest_pod_without_status_has_no_probes(capsys):
    code, out, _ = run_cli(capsys, "manifest", "pod", "--address", "192.0.2.10", "--no-proxy", "--status-listen", "")
    assert code == 0
    c = v1pod_round_trip(out)["spec"]["containers"][0]
    assert "livenessProbe" not in c and "readinessProbe" not in c
    assert env_of({"spec": {"containers": [c]}})["VIPD_STATUS_LISTEN"] == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["manifest", "pod", "--backend", "192.0.2.21:6444"], "no VIP given"),
     (["manifest", "pod", "--address", "192.0.2.10", "--backend", "192.0.2.21:6444", "--election", "etcd",
       "--etcd-password", "hunter2"], "secret cannot go into a static pod"),
     (["manifest", "pod", "--address", "192.0.2.10", "--backend", "192.0.2.21:6444", "--election", "none",
       "--bootstrap"], "expected election.backend kubernetes"),
     (["kubeadm", "init", "--vip", "192.0.2.10", "--node-ip", "192.0.2.21", "--lbType", "udp"], "expected tcp"),
     (["kubeadm", "init", "--vip", "192.0.2.10"], "this node's address is needed")],
)
def test_bad_input_exits_2_with_the_problem(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and "hunter2" not in err


def test_go_style_booleans(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kubeadm", "init", "--vip", "192.0.2.10", "--startAsLeader=maybe"])
    assert exc.value.code == 2
    capsys.readouterr()
    base = ["kubeadm", "init", "--vip", "192.0.2.10", "--node-ip", "192.0.2.21"]
    env = env_of(yaml.safe_load(run_cli(capsys, *base, "--arp=false", "--startAsLeader")[1]))
    assert env["VIPD_ANNOUNCE"] == "false" and env["VIPD_START_AS_LEADER"] == "true"
    env = env_of(yaml.safe_load(run_cli(capsys, *base, "--arp", "--startAsLeader=false", "--addPeersToLB=false")[1]))
    assert "VIPD_ANNOUNCE" not in env and "VIPD_START_AS_LEADER" not in env  # both are the defaults
    assert env["VIPD_PROXY"] == "false"  # no peers, no balancer: VIP only


# --------------------------------------------------------------------------------------------
# vipd kubeadm init | join (the origin's flow)
# --------------------------------------------------------------------------------------------


def test_kubeadm_init_origin_flow_golden(capsys):
    code, out, err = run_cli(capsys, "kubeadm", "init", "--interface", "ens192", "--vip", "192.0.2.10",
                             "--startAsLeader=true", "--node", "controlplane01", "--node-ip", "192.0.2.21")
    assert code == 0, err
    check_golden("kubeadm-init.yaml", out)
    data = v1pod_round_trip(out)
    cfg = reload_from_env(data)
    assert cfg.election.start_as_leader is True and cfg.vip.interface == "ens192"
    assert cfg.proxy.discovery == "peers" and cfg.proxy.backend_port == 6444
    assert [(p.id, p.host, p.port) for p in cfg.proxy.peers] == [("controlplane01", "192.0.2.21", 6444)]
    # The election talks to this node's own apiserver, not through the VIP.
    assert cfg.election.kubernetes.api_server == "https://192.0.2.21:6444"


def test_kubeadm_init_second_layout_bootstrap_golden(capsys):
    """apiserver on the node IP:6443, the balancer bound to VIP:6443; super-admin.conf mounted."""
    code, out, err = run_cli(capsys, "kubeadm", "init", "--interface", "ens192", "--vip", "192.0.2.10",
                             "--startAsLeader=true", "--arp=true", "--addPeersToLB=true", "--lbBindToVip=true",
                             "--lbType", "tcp", "--lbName", "Kubeadm Load Balancer", "--lbPort", "6443",
                             "--lbBackEndPort", "6443", "--node", "controlplane01", "--node-ip", "192.0.2.21",
                             "--bootstrap")
    assert code == 0, err
    check_golden("kubeadm-init-6443-bootstrap.yaml", out)
    data = v1pod_round_trip(out)
    cfg = reload_from_env(data)
    assert cfg.proxy.port == 6443 and cfg.proxy.backend_port == 6443 and cfg.proxy.bind_to_vip
    assert cfg.proxy.name == "Kubeadm Load Balancer"
    assert cfg.election.kubernetes.api_server == "https://192.0.2.21:6443"  # apiserver on the node IP
    assert data["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/kubernetes/super-admin.conf"


def test_kubeadm_init_reads_the_interface_address(capsys):
    code, out, err = run_cli(capsys, "kubeadm", "init", "--interface", "lo", "--vip", "192.0.2.10",
                             "--node", "cp1")
    assert code == 0, err
    assert env_of(yaml.safe_load(out))["VIPD_PEER"] == "cp1:127.0.0.1:6444"


def test_kubeadm_join_lists_control_plane_nodes_golden(capsys, tmp_path):
    with FakeApiServer(tmp_path) as fake:
        fake.set_node("controlplane01", "192.0.2.21", control_plane=True)
        fake.set_node("controlplane02", "192.0.2.22", control_plane=True)
        fake.set_node("controlplane03", "192.0.2.23", control_plane=True)
        fake.set_node("worker01", "192.0.2.31", control_plane=False)
        code, out, err = run_cli(capsys, "kubeadm", "join", "--interface", "ens192", "--vip", "192.0.2.10",
                                 "--startAsLeader=false", "--config", fake.kubeconfig, "--node", "controlplane02")
        assert any(r[0] == "GET" and r[1] == "/api/v1/nodes" for r in fake.requests)
    assert code == 0, err
    check_golden("kubeadm-join.yaml", out)
    data = v1pod_round_trip(out)
    cfg = reload_from_env(data)
    assert [(p.id, p.host, p.port) for p in cfg.proxy.peers] == [
        ("controlplane01", "192.0.2.21", 6444), ("controlplane02", "192.0.2.22", 6444),
        ("controlplane03", "192.0.2.23", 6444)]
    assert cfg.election.start_as_leader is False
    # No address for ens192 here: this node's own is taken from the list it is in.
    assert cfg.election.kubernetes.api_server == "https://192.0.2.22:6444"
    # The pod mounts the node's admin.conf, not the file the nodes were listed with.
    assert data["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/kubernetes/admin.conf"


@pytest.mark.parametrize(("extra", "expected"), [
    ((), "https://127.0.0.1:6444"),
    (("--api-server", "https://10.1.2.3:6443"), "https://10.1.2.3:6443"),
    (("--api-server", ""), None),  # keep the kubeconfig's server (the VIP)
])
def test_kubeadm_election_uses_the_local_apiserver_unless_told_otherwise(capsys, extra, expected):
    code, out, err = run_cli(capsys, "kubeadm", "init", "--interface", "lo", "--vip", "192.0.2.10",
                             "--node", "cp1", *extra)
    assert code == 0, err
    assert env_of(yaml.safe_load(out)).get("VIPD_API_SERVER") == expected


def test_kubeadm_join_unreachable_apiserver_exits_1(capsys, tmp_path):
    with FakeApiServer(tmp_path) as fake:
        fake.mode = "forbidden"
        code, out, err = run_cli(capsys, "kubeadm", "join", "--interface", "ens192", "--vip", "192.0.2.10",
                                 "--config", fake.kubeconfig)
    assert code == 1 and out == ""
    assert err.startswith("vipd: error:") and "403" in err


# --------------------------------------------------------------------------------------------
# The operator docs name real settings.
# --------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
OPS_DOCS = ("quickstart-kubeadm.md", "systemd.md", "metrics.md", "logging.md", "troubleshooting.md", "migrating.md",
            "container.md")
NOT_SETTINGS = {"VIPD_PREFIX", "VIPD_BINDIR", "VIPD_UNITDIR", "VIPD_CONFDIR", "VIPD_UPDATE_GOLDEN"}


def test_ops_docs_name_only_real_vipd_variables():
    import re

    known = {spec.vipd_env for spec in config_mod.FIELDS} | NOT_SETTINGS
    for name in OPS_DOCS:
        used = set(re.findall(r"\bVIPD_[A-Z_]+[A-Z]\b", (DOCS / name).read_text()))
        assert used <= known, f"{name}: unknown {sorted(used - known)}"


def test_migrating_maps_every_kube_vip_name_and_its_examples_are_valid():
    import re

    text = (DOCS / "migrating.md").read_text()
    for spec in config_mod.FIELDS:
        for env in spec.kubevip_env:
            assert f"`{env.name}`" in text, env.name
            assert f"`{spec.vipd_env}`" in text
    # The keepalived + HAProxy example is a valid configuration as written.
    block = text.split("The same with vipd", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    env = dict(re.match(r"(\w+)=(\S+)", line).groups() for line in block.splitlines() if line.strip())
    cfg = config_mod.load(environ=env)
    assert cfg.proxy.backends == (("192.0.2.21", 6444), ("192.0.2.22", 6444), ("192.0.2.23", 6444))
    assert cfg.proxy.health.path == "/readyz" and cfg.proxy.health.fall == 3


# --------------------------------------------------------------------------------------------
# Layout B of the quickstart: apiserver and vipd both on port 6443 of one node.
# --------------------------------------------------------------------------------------------

# Runs inside a namespace of the test's own: listeners opened the way kube-apiserver (Go's
# net.Listen: SO_REUSEADDR; a wildcard "tcp" address becomes a dual-stack [::] socket) and
# vipd (vipd.proxy.server.open_listener, the real one) open them.
_BIND_PROBE = r"""
import json, socket
from vipd.errors import ProxyError
from vipd.proxy.server import open_listener
VIP, NODE = "127.0.0.2", "127.0.0.3"

def apiserver(host, port=0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen()
    return s

def vipd_after(api):
    try:
        open_listener(VIP, api.getsockname()[1], 16).close()
        return "ok"
    except ProxyError as exc:
        return str(exc)
    finally:
        api.close()

out = {"wildcard4": vipd_after(apiserver("0.0.0.0")), "node_ip": vipd_after(apiserver(NODE))}
if socket.has_ipv6:
    out["wildcard6"] = vipd_after(apiserver("::"))
lst = open_listener(VIP, 0, 16)
try:
    apiserver("0.0.0.0", lst.getsockname()[1]).close()
    out["vipd_first"] = "ok"
except OSError as exc:
    out["vipd_first"] = exc.strerror
print(json.dumps(out))
"""


@pytest.mark.netns
def test_layout_b_needs_the_apiserver_off_the_wildcard_address():
    """What docs/quickstart-kubeadm.md and troubleshooting.md say about port 6443: a wildcard
    listener and vipd's VIP:6443 collide in either order; the apiserver on the node IP does not."""
    import json
    import subprocess
    import sys

    from tests.ops_fixtures import REPO, scratch_netns

    with scratch_netns() as ns:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _BIND_PROBE],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["node_ip"] == "ok"
    for case in ("wildcard4", "wildcard6"):
        if case in out:
            assert out[case].startswith("cannot listen on 127.0.0.2:") and "Address already in use" in out[case], out
    assert out["vipd_first"] == "Address already in use"


def test_layout_b_kubeadm_patch_in_the_quickstart_sets_bind_address(tmp_path):
    import re
    import subprocess

    text = (DOCS / "quickstart-kubeadm.md").read_text()
    # The shell lines as written, with tee writing into a scratch directory instead of /etc.
    block = text.split("# layout B only: on each control-plane node", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    script = block.replace("sudo ", "").replace("/etc/kubernetes/vipd-patches", str(tmp_path / "patches"))
    proc = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    files = list((tmp_path / "patches").iterdir())
    assert len(files) == 1
    # kubeadm's naming: target[suffix][+patchtype].extension
    m = re.fullmatch(r"(kube-apiserver)([^+.]*)\+(json)\.(yaml|json)", files[0].name)
    assert m, files[0].name
    ops = yaml.safe_load(files[0].read_text())
    node_ip = re.search(r"^NODE_IP=(\S+)", block, re.M).group(1)
    assert ops == [{"op": "add", "path": "/spec/containers/0/command/-", "value": f"--bind-address={node_ip}"}]
    # Applied (RFC 6902 "add", "-" = append) to the shape of kubeadm's apiserver manifest.
    pod = {"spec": {"containers": [{"name": "kube-apiserver",
                                    "command": ["kube-apiserver", f"--advertise-address={node_ip}"]}]}}
    *parents, last = ops[0]["path"].strip("/").split("/")
    target = pod
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    assert last == "-"
    target.append(ops[0]["value"])
    assert pod["spec"]["containers"][0]["command"][-1] == f"--bind-address={node_ip}"
    # Every layout B kubeadm command passes the patches, including the upgrade note.
    assert "--apiserver-advertise-address 192.0.2.21 \\\n    --patches /etc/kubernetes/vipd-patches" in text
    assert "--apiserver-advertise-address <this node's IP> --patches /etc/kubernetes/vipd-patches" in text
    assert "kubeadm upgrade apply|node" in text
    # The configuration-file form parses and carries the same pieces.
    docs = list(yaml.safe_load_all(text.split("# kubeadm init --config init.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]))
    init = next(d for d in docs if d["kind"] == "InitConfiguration")
    cluster = next(d for d in docs if d["kind"] == "ClusterConfiguration")
    assert init["patches"]["directory"] == "/etc/kubernetes/vipd-patches"
    assert init["localAPIEndpoint"]["advertiseAddress"] == node_ip
    assert cluster["controlPlaneEndpoint"] == "192.0.2.10:6443" and "apiServer" not in cluster


def test_quickstart_reprint_on_the_first_node_drops_start_as_leader():
    """Step 4's reason holds: the init manifest sets VIPD_START_AS_LEADER, the join one does not
    (both golden files are checked against the real output above)."""
    init = yaml.safe_load((GOLDEN / "kubeadm-init.yaml").read_text().replace("@VERSION@", "v"))
    join = yaml.safe_load((GOLDEN / "kubeadm-join.yaml").read_text().replace("@VERSION@", "v"))

    def env(pod):
        return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}

    assert env(init)["VIPD_START_AS_LEADER"] == "true"
    assert "VIPD_START_AS_LEADER" not in env(join)
    assert "drops it" in (DOCS / "quickstart-kubeadm.md").read_text()
