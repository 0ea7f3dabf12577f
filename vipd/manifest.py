"""Static pod manifests: ``vipd manifest pod`` and the origin's ``vipd kubeadm init|join``.

Owns: turning a Config into a kubelet static pod (``v1`` Pod ``vipd`` in ``kube-system``,
host network, NET_ADMIN + NET_RAW only, the kubeconfig or etcd files mounted read-only,
probes on the status endpoint, ``system-node-critical``), the configuration written as
vipd's own ``VIPD_*`` environment variables, and the mapping of the origin's kubeadm flags
(``--vip``, ``--startAsLeader=true``, ``--addPeersToLB``, ``--lbBackEndPort``, ...) onto
vipd's configuration keys.

Only values that differ from vipd's defaults are written (the image is pinned to this
version, so the defaults it runs with are the ones compared against): manifests stay short
and say what is special about the node. The node name is written only when given, so one
manifest fits any node (vipd defaults to the hostname, which a host-network pod shares).

Must never: write a secret into a manifest (static pods cannot reference Secrets; an etcd
password is refused), or talk to the network except ``kubeadm join`` listing the
control-plane nodes through ``vipd.kubeclient``.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from vipd import __version__
from vipd import config as config_mod
from vipd.config import FIELDS, Config
from vipd.errors import ConfigError, VipdError

IMAGE_REPOSITORY = "ghcr.io/vipd/vipd"
POD_NAME = "vipd"
NAMESPACE = "kube-system"
SUPER_ADMIN_CONF = "/etc/kubernetes/super-admin.conf"
ADMIN_CONF = "/etc/kubernetes/admin.conf"


def default_image() -> str:
    return f"{IMAGE_REPOSITORY}:{__version__}"


# ---------------------------------------------------------------------------------------------
# Config → environment.
# ---------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    ms = seconds * 1000
    if seconds < 1 and math.isclose(ms, round(ms)):
        return f"{round(ms)}ms"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def _plain(spec: config_mod.FieldSpec, value: Any) -> str:
    """A value as vipd's own environment parser reads it back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if spec.parse is config_mod.parse_duration and isinstance(value, int | float):
        return format_duration(float(value))
    return str(value)


def config_env(cfg: Config) -> list[dict[str, str]]:
    """``[{name, value}]`` for every setting that differs from the default, in table order."""
    effective = config_mod.effective_values(cfg)
    v4, v6 = cfg.vip.subnet
    # VIPs are written as given when their prefix is the default for their family.
    effective["vip.address"] = [
        v.address if v.prefixlen == (v4 if v.interface.version == 4 else v6) else str(v)
        for v in cfg.vip.addresses
    ]
    env = []
    for spec in FIELDS:
        if spec.key == "node" and cfg.sources.get("node", "default") == "default":
            continue
        value = _plain(spec, effective[spec.key])
        if value == _plain(spec, spec.default):
            continue
        if spec.secret:
            raise ConfigError([f"{spec.key} ({cfg.sources.get(spec.key, 'default')}): a secret cannot go into a "
                               "static pod manifest; expected it unset here (use client certificates)"])
        env.append({"name": spec.vipd_env, "value": value})
    return env


# ---------------------------------------------------------------------------------------------
# The pod.
# ---------------------------------------------------------------------------------------------


def _probe_target(listen: str) -> tuple[str, int] | None:
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return host, int(port, 10)


def _file_mounts(cfg: Config, bootstrap: bool) -> list[tuple[str, str, str]]:
    """(volume name, host path, container path) of the files vipd reads."""
    mounts: list[tuple[str, str, str]] = []
    kube = cfg.election.kubernetes.kubeconfig
    if kube and (cfg.election.backend == "kubernetes" or cfg.proxy.discovery == "kubernetes"):
        mounts.append(("kubeconfig", SUPER_ADMIN_CONF if bootstrap else kube, kube))
    if cfg.election.backend == "etcd":
        etcd = cfg.election.etcd
        for name, path in (("etcd-ca", etcd.ca), ("etcd-cert", etcd.cert), ("etcd-key", etcd.key)):
            if path:
                mounts.append((name, path, path))
    if cfg.proxy.enabled and cfg.proxy.health.ca:
        mounts.append(("health-ca", cfg.proxy.health.ca, cfg.proxy.health.ca))
    seen: set[str] = set()
    unique = []
    for name, host, inside in mounts:
        if inside not in seen:
            seen.add(inside)
            unique.append((name, host, inside))
    return unique


def build_pod(cfg: Config, *, image: str | None = None, bootstrap: bool = False,
              pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    """The static pod as a plain dict (YAML/JSON-ready, V1Pod-shaped)."""
    if bootstrap and cfg.election.backend != "kubernetes":
        raise ConfigError(["--bootstrap: mounts super-admin.conf for the Kubernetes lease; "
                           f"expected election.backend kubernetes (got {cfg.election.backend})"])
    caps = ["NET_ADMIN", "NET_RAW"]
    probe = _probe_target(cfg.status.listen)
    low_ports = [cfg.proxy.port] if cfg.proxy.enabled else []
    if probe:
        low_ports.append(probe[1])
    if any(p < 1024 for p in low_ports):
        caps.append("NET_BIND_SERVICE")
    container: dict[str, Any] = {
        "name": POD_NAME,
        "image": image or default_image(),
        "imagePullPolicy": pull_policy,
        "args": ["start"],
        "env": config_env(cfg),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        "securityContext": {"capabilities": {"add": caps, "drop": ["ALL"]}},
    }
    if not container["env"]:
        del container["env"]
    if probe:
        host, port = probe
        container["livenessProbe"] = {
            "httpGet": {"host": host, "path": "/livez", "port": port},
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        }
        container["readinessProbe"] = {
            "httpGet": {"host": host, "path": "/readyz", "port": port},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2,
        }
    mounts = _file_mounts(cfg, bootstrap)
    if mounts:
        container["volumeMounts"] = [{"name": n, "mountPath": inside, "readOnly": True} for n, _, inside in mounts]
    spec: dict[str, Any] = {
        "containers": [container],
        "hostNetwork": True,
        "priorityClassName": "system-node-critical",
        # Room for vipd's own bounded shutdown (VIP removed, lease released, proxy drained).
        "terminationGracePeriodSeconds": math.ceil(cfg.shutdown_timeout) + 5,
    }
    if mounts:
        spec["volumes"] = [{"name": n, "hostPath": {"path": host, "type": "File"}} for n, host, _ in mounts]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD_NAME,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "vipd", "app.kubernetes.io/version": __version__},
        },
        "spec": spec,
    }


def render(pod: Mapping[str, Any], *, bootstrap: bool = False) -> str:
    header = [f"# vipd {__version__} static pod: save as /etc/kubernetes/manifests/vipd.yaml"]
    if bootstrap:
        header += [
            "# BOOTSTRAP: mounts super-admin.conf (kubeadm >= 1.29 binds admin.conf's RBAC only after init).",
            "# Once `kubeadm init` has finished, switch back to admin.conf:",
            f"#   sed -i 's#path: {SUPER_ADMIN_CONF}#path: {ADMIN_CONF}#' /etc/kubernetes/manifests/vipd.yaml",
        ]
    return "\n".join(header) + "\n" + yaml.safe_dump(dict(pod), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# The origin's kubeadm flow.
# ---------------------------------------------------------------------------------------------


def _go_bool(raw: str) -> bool:
    try:
        return config_mod.parse_bool(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}") from None


# origin flag → (config key, default as the origin had it); bool flags take Go's --flag=true form.
ORIGIN_FLAGS: dict[str, str] = {
    "--interface": "vip.interface",
    "--vip": "vip.address",
    "--startAsLeader": "election.start_as_leader",
    "--arp": "announce.enabled",
    "--lbBindToVip": "proxy.bind_to_vip",
    "--lbType": "proxy.type",
    "--lbName": "proxy.name",
    "--lbPort": "proxy.port",
    "--lbBackEndPort": "proxy.backend_port",
}
_BOOL_FLAGS = {"--startAsLeader", "--arp", "--lbBindToVip", "--addPeersToLB"}


def _add_origin_flags(p: argparse.ArgumentParser, join: bool) -> None:
    for flag in (*ORIGIN_FLAGS, "--addPeersToLB"):
        dest = flag.lstrip("-")
        if flag in _BOOL_FLAGS:
            p.add_argument(flag, dest=dest, nargs="?", const=True, default=None, type=_go_bool,
                           metavar="true|false")
        else:
            p.add_argument(flag, dest=dest, default=None)
    if join:
        p.add_argument("--config", dest="kubeadm_kubeconfig", default=ADMIN_CONF, metavar="KUBECONFIG",
                       help=f"kubeconfig to list the control-plane nodes with (default {ADMIN_CONF})")
    else:
        p.add_argument("--bootstrap", action="store_true",
                       help="mount super-admin.conf (first node, Kubernetes >= 1.29); switch back after init")
    p.add_argument("--node-ip", metavar="ADDRESS",
                   help="this node's address, for the peer list and the local apiserver "
                        "(default: --interface's IPv4 address)")
    p.add_argument("--api-server", metavar="URL", default=None,
                   help="apiserver the election talks to (default https://NODE-IP:LB-BACKEND-PORT, "
                        "this node's own; '' keeps the kubeconfig's server, i.e. the VIP)")
    p.add_argument("--node", metavar="NAME", help="this node's name (default: the hostname)")
    p.add_argument("--image", metavar="IMAGE", help=f"container image (default {default_image()})")


def interface_ipv4(ifname: str) -> str | None:
    """The first IPv4 address of an interface (SIOCGIFADDR), or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def origin_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The origin's flags that were given, as vipd config keys (values stay raw)."""
    out: dict[str, Any] = {}
    for flag, key in ORIGIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-"), None)
        if value is not None:
            out[key] = value
    if args.node:
        out["node"] = args.node
    return out


def _load(flags: dict[str, Any]) -> Config:
    # The environment is not read: a manifest printed by `kubeadm init` depends on its flags only.
    return config_mod.load(environ={}, flags=flags)


def _peer(name: str, ip: str, port: int) -> str:
    return f"{name}:[{ip}]:{port}" if ":" in ip else f"{name}:{ip}:{port}"


def _node_ip(args: argparse.Namespace, probe: Config) -> str | None:
    return args.node_ip or (interface_ipv4(probe.vip.interface) if probe.vip.interface else None)


def _local_apiserver(flags: dict[str, Any], args: argparse.Namespace, probe: Config, ip: str | None) -> None:
    """The election talks to this node's own apiserver, not to the VIP named in admin.conf:
    electing the VIP's holder through the VIP deadlocks when every vipd starts at once (a
    cluster power cycle), and a node whose apiserver is dead must not keep the lease through
    the others' (docs/kubernetes.md). The certificate is still checked against admin.conf's
    host. ``--api-server ''`` keeps the kubeconfig's server."""
    if args.api_server is not None:
        if args.api_server:
            flags["election.kubernetes.api_server"] = args.api_server
        return
    if probe.election.backend == "kubernetes" and ip:
        host = f"[{ip}]" if ":" in ip else ip
        flags["election.kubernetes.api_server"] = f"https://{host}:{probe.proxy.backend_port}"


def kubeadm_init_config(args: argparse.Namespace) -> Config:
    flags = origin_flags(args)
    probe = _load({**flags, "proxy.enabled": False})  # ports and node name, before peers exist
    ip = _node_ip(args, probe)
    if args.addPeersToLB is not False:
        if not ip:
            raise ConfigError([
                "--addPeersToLB: this node's address is needed for the peer list; expected "
                "--interface naming an interface with an IPv4 address, or --node-ip ADDRESS"])
        flags["proxy.discovery"] = "peers"
        flags["proxy.peers"] = [_peer(probe.node, ip, probe.proxy.backend_port)]
    else:
        flags.setdefault("proxy.enabled", False)
    _local_apiserver(flags, args, probe, ip)
    return _load(flags)


def kubeadm_join_config(args: argparse.Namespace) -> Config:
    import asyncio

    from vipd.kubeclient import list_control_plane_nodes

    flags = origin_flags(args)
    probe = _load({**flags, "proxy.enabled": False})
    ip = _node_ip(args, probe)
    if args.addPeersToLB is False:
        flags["proxy.enabled"] = False
    else:
        nodes = asyncio.run(list_control_plane_nodes(args.kubeadm_kubeconfig))
        if not nodes:
            raise VipdError(f"no control-plane node with an InternalIP found through {args.kubeadm_kubeconfig}")
        flags["proxy.discovery"] = "peers"
        flags["proxy.peers"] = [_peer(name, node_ip, probe.proxy.backend_port) for name, node_ip in nodes]
        if not ip:  # this node is in the list it just read
            ip = next((node_ip for name, node_ip in nodes if name == probe.node), None)
    _local_apiserver(flags, args, probe, ip)
    return _load(flags)


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------


def cmd_manifest_pod(args: argparse.Namespace) -> int:
    cfg = config_mod.load_args(args)
    sys.stdout.write(render(build_pod(cfg, image=args.image, bootstrap=args.bootstrap), bootstrap=args.bootstrap))
    return 0


def cmd_kubeadm(args: argparse.Namespace) -> int:
    join = args.kubeadm_command == "join"
    try:
        cfg = kubeadm_join_config(args) if join else kubeadm_init_config(args)
    except ConfigError:
        raise
    except VipdError as exc:
        print(f"vipd: error: {exc}", file=sys.stderr)
        return 1
    bootstrap = bool(getattr(args, "bootstrap", False))
    sys.stdout.write(render(build_pod(cfg, image=args.image, bootstrap=bootstrap), bootstrap=bootstrap))
    return 0


def register_cli(subparsers: Any, config_args: Any) -> None:
    pm = subparsers.add_parser("manifest", help="print a static pod manifest")
    msub = pm.add_subparsers(dest="manifest_command", metavar="KIND", parser_class=type(pm))
    msub.required = True
    p = msub.add_parser("pod", help="static pod for /etc/kubernetes/manifests (vipd's own flags)")
    config_args(p)
    p.add_argument("--image", metavar="IMAGE", help=f"container image (default {default_image()})")
    p.add_argument("--bootstrap", action="store_true",
                   help="mount super-admin.conf (first node, Kubernetes >= 1.29); switch back after init")
    p.set_defaults(func=cmd_manifest_pod)

    pk = subparsers.add_parser("kubeadm", help="the origin's kubeadm flow: print a static pod (origin flags)")
    ksub = pk.add_subparsers(dest="kubeadm_command", metavar="ACTION", parser_class=type(pk))
    ksub.required = True
    p = ksub.add_parser("init", help="manifest for the first control-plane node (before kubeadm init)")
    _add_origin_flags(p, join=False)
    p.set_defaults(func=cmd_kubeadm)
    p = ksub.add_parser("join", help="manifest for a joined control-plane node (after kubeadm join)")
    _add_origin_flags(p, join=True)
    p.set_defaults(func=cmd_kubeadm)
