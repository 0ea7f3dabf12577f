"""The one typed configuration object and how it is loaded.

Owns: the table of every setting (``FIELDS``: file key, flag, environment names, default,
parser, help), the frozen ``Config`` built from it, and the loader that merges, in rising
precedence, defaults < YAML file < environment (``VIPD_*`` and kube-vip names) < flags. Every
problem is collected and raised together as one ``ConfigError`` (one line per problem naming
the field, its source, the value and what is expected). The same table drives the CLI flags,
``vipd config show`` and docs/configuration.md, so a setting exists in exactly one place.

Must never: touch the network, the kernel, or trio.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from vipd.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw value (str from env/flags, any YAML scalar/list from the
# file) and returns the typed value or raises ValueError("what is expected"). Digits are ASCII
# only: str.isdigit() and a plain \d also accept "٣" or "²", which int() then rejects or reads.
# ---------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_INT_RE = re.compile(r"[+-]?\d+", re.ASCII)


def _is_digits(s: str) -> bool:
    """``s`` is one or more ASCII digits (str.isdigit() is true for any Unicode digit)."""
    return s.isascii() and s.isdigit()
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(raw: Any, plain_unit: str = "s") -> float:
    """``500ms``, ``3s``, ``1.5s``, ``1m``; a plain number is in ``plain_unit``. Returns seconds."""
    if isinstance(raw, bool):
        raise ValueError("expected a duration such as 500ms, 3s or 1m")
    if isinstance(raw, int | float):
        value = float(raw) * _UNIT[plain_unit]
    else:
        m = _DURATION_RE.match(str(raw))
        if not m:
            raise ValueError("expected a duration such as 500ms, 3s or 1m")
        value = float(m.group(1)) * _UNIT[m.group(2) or plain_unit]
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a non-negative duration")
    return value


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    s = str(raw).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError("expected true or false")


def parse_int(raw: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number")
    if isinstance(raw, int):
        value = raw
    else:
        s = str(raw).strip()
        # Decimal only: the origin parsed "06443" as octal. Leading zeros are plain decimal here.
        if not _INT_RE.fullmatch(s):
            raise ValueError("expected a whole number")
        value = int(s, 10)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"expected a whole number from {lo} to {hi}")
    return value


def parse_port(raw: Any) -> int:
    try:
        return parse_int(raw, 1, 65535)
    except ValueError:
        raise ValueError("expected a port number from 1 to 65535") from None


def _as_list(raw: Any) -> list[str]:
    """A YAML list, or a comma/space separated string (env and repeated flags)."""
    if raw is None:
        return []
    if isinstance(raw, list | tuple):
        items: list[str] = []
        for item in raw:
            if item is not None:  # an empty list entry (`- `) is no entry
                items.extend(_as_list(item) if isinstance(item, str) else [str(item)])
        return items
    return [p for p in re.split(r"[,\s]+", str(raw).strip()) if p]


def parse_str(raw: Any) -> str:
    if isinstance(raw, dict | list | tuple):
        raise ValueError("expected a single value")
    return str(raw).strip()


def parse_opt_str(raw: Any) -> str | None:
    s = parse_str(raw)
    return s or None


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        s = parse_str(raw).lower()
        if s not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return s

    return parse


def parse_addresses(raw: Any) -> tuple[str, ...]:
    """VIPs as given (``10.0.0.5`` or ``10.0.0.5/32``); prefixes are resolved later."""
    out = []
    for item in _as_list(raw):
        addr, _, prefix = item.partition("/")
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address; expected an IPv4 or IPv6 address, optionally with /prefix"
            ) from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise ValueError(
                f"{item!r} has a zone index; expected the address without %zone (the interface is vip.interface)"
            )
        if prefix:
            maxlen = ip.max_prefixlen
            if not _is_digits(prefix) or not 0 < int(prefix) <= maxlen:
                raise ValueError(f"{item!r} has a bad prefix; expected /1 to /{maxlen}")
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise ValueError(f"{item!r} cannot be a VIP; expected a unicast address")
        out.append(item)
    return tuple(out)


def parse_subnet(raw: Any) -> tuple[int, int]:
    """kube-vip's ``vip_subnet``: ``32,128`` (IPv4 prefix, IPv6 prefix) or one number."""
    parts = _as_list(raw)
    if not 1 <= len(parts) <= 2 or not all(_is_digits(p) for p in parts):
        raise ValueError("expected IPv4 and IPv6 prefix lengths such as 32,128")
    v4 = int(parts[0])
    v6 = int(parts[1]) if len(parts) == 2 else 128
    if not 1 <= v4 <= 32 or not 1 <= v6 <= 128:
        raise ValueError("expected an IPv4 prefix 1-32 and an IPv6 prefix 1-128")
    return (v4, v6)


def _split_host_port(item: str) -> tuple[str, str]:
    if item.startswith("["):
        host, sep, port = item[1:].partition("]:")
        if not sep:
            raise ValueError
        return host, port
    host, sep, port = item.rpartition(":")
    if not sep or ":" in host:
        raise ValueError
    return host, port


def parse_host_ports(raw: Any) -> tuple[str, ...]:
    """``host:port`` or ``[v6]:port`` items, normalised to ``host:port`` / ``[v6]:port``."""
    out = []
    for item in _as_list(raw):
        try:
            host, port = _split_host_port(item)
            if not host:
                raise ValueError
            parse_port(port)
        except ValueError:
            raise ValueError(f"{item!r} is not HOST:PORT; expected e.g. 10.0.0.11:6444") from None
        out.append(item)
    return tuple(out)


def parse_listen(raw: Any) -> str:
    """``IP:PORT`` to listen on (IPv6 as ``[::1]:2112``); ``:2112`` (kube-vip's
    ``prometheus_server`` form) means every IPv4 address; empty disables.

    The host must be an IP literal: a name would be resolved only at start, where a typo
    (``999.1.1.1``) turns into a runtime failure instead of a configuration error.
    """
    s = parse_str(raw)
    if not s or s.lower() in ("off", "none", "false"):
        return ""
    if s.startswith(":"):
        s = "0.0.0.0" + s
    try:
        host, port = _split_host_port(s)
        parse_port(port)
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            "expected IP:PORT with an IP address as host, such as 127.0.0.1:2112, [::1]:2112, "
            ":2112 (every address), or empty to disable"
        ) from None
    return s


def parse_peers(raw: Any) -> tuple[str, ...]:
    """The origin's ``id:address:port`` peers."""
    out = []
    for item in _as_list(raw):
        ident, sep, rest = item.partition(":")
        try:
            if not ident or not sep:
                raise ValueError
            host, port = _split_host_port(rest)
            ipaddress.ip_address(host)
            parse_port(port)
        except ValueError:
            raise ValueError(f"{item!r} is not ID:ADDRESS:PORT; expected e.g. node2:10.0.0.12:6444") from None
        out.append(item)
    return tuple(out)


def parse_urls(raw: Any) -> tuple[str, ...]:
    out = []
    for item in _as_list(raw):
        if not re.fullmatch(r"https?://[^/\s]+/?", item):
            raise ValueError(f"{item!r} is not a URL; expected e.g. https://127.0.0.1:2379")
        out.append(item.rstrip("/"))
    return tuple(out)


def parse_url_opt(raw: Any) -> str | None:
    s = parse_str(raw)
    if not s:
        return None
    if not re.fullmatch(r"https?://[^\s]+", s):
        raise ValueError("expected a URL such as https://127.0.0.1:6444")
    return s.rstrip("/")


def parse_loglevel(raw: Any) -> str:
    s = parse_str(raw).lower()
    if _is_digits(s):  # kube-vip's logrus numbers: 4 info, 5 debug
        n = int(s)
        return "debug" if n >= 5 else "info" if n == 4 else "warning" if n == 3 else "error"
    if s == "warn":
        s = "warning"
    if s not in ("debug", "info", "warning", "error"):
        raise ValueError("expected one of debug, info, warning, error")
    return s


def _election_from_kubevip(raw: Any) -> str:
    return "kubernetes" if parse_bool(raw) else "none"


def _discovery_from_kubevip(raw: Any) -> str:
    return "peers" if parse_bool(raw) else "static"


def _lb_type(raw: Any) -> str:
    s = parse_str(raw).lower()
    if s != "tcp":
        raise ValueError("expected tcp (vipd balances TCP only)")
    return s


# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvName:
    """An environment variable that sets a field, and how its value is read."""

    name: str
    parse: Callable[[Any], Any] | None = None  # None: the field's own parser


@dataclass(frozen=True)
class FieldSpec:
    key: str  # dotted file key, e.g. election.lease_duration
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: str | None = None  # e.g. --lease-duration
    kind: str = "value"  # value | bool | list
    kubevip_env: tuple[EnvName, ...] = ()
    secret: bool = False
    choices: tuple[str, ...] = ()

    @property
    def vipd_env(self) -> str:
        name = (self.flag or "--" + self.key.replace(".", "-").replace("_", "-"))[2:]
        return "VIPD_" + name.upper().replace("-", "_")

    @property
    def attr(self) -> str:
        return self.key.replace(".", "_")


def _kv(*names: str, parse: Callable[[Any], Any] | None = None) -> tuple[EnvName, ...]:
    return tuple(EnvName(n, parse) for n in names)


def _secs(raw: Any) -> float:
    return parse_duration(raw, "s")


def _ms(raw: Any) -> float:
    return parse_duration(raw, "ms")


_ELECTIONS = ("kubernetes", "etcd", "none")
_DISCOVERY = ("static", "peers", "kubernetes")
_BALANCE = ("roundrobin", "leastconn")
_HEALTH = ("https", "http", "tcp")

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("node", parse_str, None, "this node's identity (default: the hostname)", "--node",
              kubevip_env=_kv("vip_nodename")),
    FieldSpec("vip.address", parse_addresses, (), "VIP(s), IPv4 and/or IPv6, optionally with /prefix",
              "--address", kind="list", kubevip_env=_kv("vip_address", "address")),
    FieldSpec("vip.interface", parse_opt_str, None,
              "interface for the VIP (default: the one whose subnet holds the VIP, else the default route's)",
              "--interface", kubevip_env=_kv("vip_interface")),
    FieldSpec("vip.subnet", parse_subnet, (32, 128),
              "prefix lengths for VIPs given without one: IPv4,IPv6", "--subnet",
              kubevip_env=_kv("vip_subnet")),
    FieldSpec("announce.enabled", parse_bool, True,
              "gratuitous ARP / unsolicited neighbour advertisement on taking the VIP",
              "--announce", kind="bool", kubevip_env=_kv("vip_arp")),
    FieldSpec("announce.refresh", parse_duration, 3.0,
              "periodic re-announcement while leader; 0 turns it off", "--announce-refresh",
              kubevip_env=_kv("vip_arpRate", parse=_ms)),
    FieldSpec("election.backend", parse_choice(*_ELECTIONS), "kubernetes",
              "lease backend", "--election", choices=_ELECTIONS,
              kubevip_env=_kv("vip_leaderelection", parse=_election_from_kubevip)),
    FieldSpec("election.lease_duration", parse_duration, 2.0,
              "how long a silent lease blocks others from taking it", "--lease-duration",
              kubevip_env=_kv("vip_leaseduration", parse=_secs)),
    FieldSpec("election.renew_deadline", parse_duration, 1.5,
              "a leader that has not renewed for this long steps down", "--renew-deadline",
              kubevip_env=_kv("vip_renewdeadline", parse=_secs)),
    FieldSpec("election.retry_period", parse_duration, 0.5,
              "interval between renewals (leader) and attempts (candidates)", "--retry-period",
              kubevip_env=_kv("vip_retryperiod", parse=_secs)),
    FieldSpec("election.start_as_leader", parse_bool, False,
              "bootstrap: claim leadership while the backend is unreachable or refuses (first node)",
              "--start-as-leader", kind="bool", kubevip_env=_kv("vip_startleader")),
    FieldSpec("election.kubernetes.kubeconfig", parse_str, "/etc/kubernetes/admin.conf",
              "kubeconfig file; empty = in-cluster service account", "--kubeconfig",
              kubevip_env=_kv("k8s_config_file")),
    FieldSpec("election.kubernetes.api_server", parse_url_opt, None,
              "talk to this apiserver instead of the kubeconfig's (e.g. the local one)",
              "--api-server", kubevip_env=_kv("kubernetes_addr")),
    FieldSpec("election.kubernetes.namespace", parse_str, "kube-system", "namespace of the Lease",
              "--lease-namespace", kubevip_env=_kv("cp_namespace")),
    FieldSpec("election.kubernetes.lease_name", parse_str, "vipd-cp-lock", "name of the Lease",
              "--lease-name", kubevip_env=_kv("vip_leasename")),
    FieldSpec("election.etcd.endpoints", parse_urls, ("https://127.0.0.1:2379",),
              "etcd endpoints, tried in turn", "--etcd-endpoint", kind="list"),
    FieldSpec("election.etcd.ca", parse_opt_str, None, "CA bundle for etcd", "--etcd-ca"),
    FieldSpec("election.etcd.cert", parse_opt_str, None, "client certificate for etcd", "--etcd-cert"),
    FieldSpec("election.etcd.key", parse_opt_str, None, "client key file for etcd", "--etcd-key"),
    FieldSpec("election.etcd.username", parse_opt_str, None, "etcd user (auth enabled)", "--etcd-username"),
    FieldSpec("election.etcd.password", parse_opt_str, None, "etcd password (auth enabled)",
              "--etcd-password", secret=True),
    FieldSpec("election.etcd.prefix", parse_str, "/vipd/", "key prefix in etcd", "--etcd-prefix"),
    FieldSpec("proxy.enabled", parse_bool, True, "TCP load balancer on VIP:port", "--proxy",
              kind="bool", kubevip_env=_kv("lb_enable")),
    FieldSpec("proxy.port", parse_port, 6443, "front-end port", "--lb-port",
              kubevip_env=_kv("lb_port", "port")),
    FieldSpec("proxy.bind_to_vip", parse_bool, True,
              "listen on the VIP (bound before it is present); else on every address",
              "--lb-bind-to-vip", kind="bool", kubevip_env=_kv("lb_bindtovip")),
    FieldSpec("proxy.bind_address", parse_opt_str, None,
              "listen on this address instead (overrides bind_to_vip)", "--lb-bind-address"),
    FieldSpec("proxy.backlog", lambda r: parse_int(r, 1, 1 << 20), 4096, "listen backlog", "--lb-backlog"),
    FieldSpec("proxy.backends", parse_host_ports, (), "static backends HOST:PORT", "--backend",
              kind="list", kubevip_env=_kv("lb_backends")),
    FieldSpec("proxy.backend_port", parse_port, 6444, "port of peer / discovered backends",
              "--lb-backend-port", kubevip_env=_kv("lb_backendport")),
    FieldSpec("proxy.discovery", parse_choice(*_DISCOVERY), "static", "where backends come from",
              "--discovery", choices=_DISCOVERY,
              kubevip_env=_kv("vip_addpeerstolb", parse=_discovery_from_kubevip)),
    FieldSpec("proxy.peers", parse_peers, (), "the origin's peers ID:ADDRESS:PORT", "--peer",
              kind="list", kubevip_env=_kv("vip_localpeer", "vip_peers")),
    FieldSpec("proxy.balance", parse_choice(*_BALANCE), "roundrobin", "balancing", "--balance",
              choices=_BALANCE),
    FieldSpec("proxy.type", _lb_type, "tcp", "load balancer type (tcp only)", "--lb-type",
              kubevip_env=_kv("lb_type")),
    FieldSpec("proxy.name", parse_str, "apiserver", "name of the load balancer (labels)", "--lb-name",
              kubevip_env=_kv("lb_name")),
    FieldSpec("proxy.health.check", parse_choice(*_HEALTH), "https",
              "active check: https/http GET of the path, or tcp connect only", "--health-check",
              choices=_HEALTH),
    FieldSpec("proxy.health.path", parse_str, "/readyz", "path for http(s) checks", "--health-path"),
    FieldSpec("proxy.health.interval", parse_duration, 2.0, "time between checks", "--health-interval"),
    FieldSpec("proxy.health.rise", lambda r: parse_int(r, 1, 100), 2,
              "successes to mark a backend up", "--health-rise"),
    FieldSpec("proxy.health.fall", lambda r: parse_int(r, 1, 100), 3,
              "failures to mark a backend down", "--health-fall"),
    FieldSpec("proxy.health.timeout", parse_duration, 1.0, "timeout of one check", "--health-timeout"),
    FieldSpec("proxy.health.ca", parse_opt_str, None,
              "CA to verify backends' certificates (default: not verified)", "--health-ca"),
    FieldSpec("proxy.health.shutdown_sessions", parse_bool, False,
              "close established connections to a backend marked down", "--shutdown-sessions",
              kind="bool"),
    FieldSpec("proxy.connect_timeout", parse_duration, 2.0, "backend connect timeout", "--connect-timeout"),
    FieldSpec("proxy.idle_timeout", parse_duration, 0.0,
              "close connections idle this long; 0 = never (watches, logs -f)", "--idle-timeout"),
    FieldSpec("proxy.half_close_timeout", parse_duration, 60.0,
              "close a half-closed connection after this long without the other FIN",
              "--half-close-timeout"),
    FieldSpec("proxy.drain_timeout", parse_duration, 5.0,
              "on shutdown, let open connections finish for this long", "--drain-timeout"),
    FieldSpec("proxy.max_connections", lambda r: parse_int(r, 1, 1_000_000), 9000,
              "maximum proxied connections; beyond it accepting pauses", "--max-connections"),
    FieldSpec("status.listen", parse_listen, "127.0.0.1:2112",
              "IP:PORT of the status/metrics HTTP endpoint (:PORT = every address); empty disables",
              "--status-listen",
              kubevip_env=_kv("prometheus_server")),
    FieldSpec("log.format", parse_choice("json", "console"), "json", "log line format", "--log-format",
              choices=("json", "console")),
    FieldSpec("log.level", parse_loglevel, "info", "log level", "--log-level",
              kubevip_env=_kv("vip_loglevel")),
    FieldSpec("shutdown_timeout", parse_duration, 10.0, "graceful stop deadline", "--shutdown-timeout"),
)

FIELDS_BY_KEY: dict[str, FieldSpec] = {f.key: f for f in FIELDS}


# ---------------------------------------------------------------------------------------------
# The typed object.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vip:
    """One VIP with its prefix, e.g. 10.0.0.5/32."""

    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    @property
    def prefixlen(self) -> int:
        return self.interface.network.prefixlen

    @property
    def family(self) -> int:
        return socket.AF_INET if self.interface.version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        return str(self.interface)


@dataclass(frozen=True)
class Peer:
    id: str
    host: str
    port: int


@dataclass(frozen=True)
class VipConfig:
    addresses: tuple[Vip, ...]
    interface: str | None
    subnet: tuple[int, int] = (32, 128)


@dataclass(frozen=True)
class AnnounceConfig:
    enabled: bool
    refresh: float


@dataclass(frozen=True)
class KubernetesConfig:
    kubeconfig: str
    api_server: str | None
    namespace: str
    lease_name: str


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    ca: str | None
    cert: str | None
    key: str | None
    username: str | None
    password: str | None = field(repr=False)
    prefix: str


@dataclass(frozen=True)
class ElectionConfig:
    backend: str
    lease_duration: float
    renew_deadline: float
    retry_period: float
    start_as_leader: bool
    kubernetes: KubernetesConfig
    etcd: EtcdConfig


@dataclass(frozen=True)
class HealthConfig:
    check: str
    path: str
    interval: float
    rise: int
    fall: int
    timeout: float
    ca: str | None
    shutdown_sessions: bool


@dataclass(frozen=True)
class ProxyConfig:
    enabled: bool
    port: int
    bind_to_vip: bool
    bind_address: str | None
    backlog: int
    backends: tuple[tuple[str, int], ...]  # static (host, port)
    backend_port: int
    discovery: str
    peers: tuple[Peer, ...]
    balance: str
    name: str
    health: HealthConfig
    connect_timeout: float
    idle_timeout: float
    half_close_timeout: float
    drain_timeout: float
    max_connections: int


@dataclass(frozen=True)
class StatusConfig:
    listen: str  # host:port, "" = disabled


@dataclass(frozen=True)
class LogConfig:
    format: str
    level: str


@dataclass(frozen=True)
class Config:
    node: str
    vip: VipConfig
    announce: AnnounceConfig
    election: ElectionConfig
    proxy: ProxyConfig
    status: StatusConfig
    log: LogConfig
    shutdown_timeout: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def replace(self, **changes: Any) -> Config:
        import dataclasses

        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Value:
    raw: Any
    source: str  # "file FILE", "env NAME", "flag --x"
    parse: Callable[[Any], Any] | None = None


# The file's sections: every dotted prefix of a field key (vip, election, election.etcd, ...).
_SECTIONS: frozenset[str] = frozenset(
    ".".join(parts[:i]) for parts in (f.key.split(".") for f in FIELDS) for i in range(1, len(parts))
)


def _section_children(section: str) -> list[str]:
    names = {f.key[len(section) + 1:].split(".")[0] for f in FIELDS if f.key.startswith(section + ".")}
    return sorted(names)


def _flatten(data: Mapping[Any, Any], path: str, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """The file's nested mapping → ({dotted field key: value}, problems).

    An empty value is unset, as if the line were not there: YAML reads ``node:`` with nothing
    after it, and a section whose settings are all commented out (``proxy:`` alone), as null.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in FIELDS_BY_KEY:
            if v is not None:
                out[key] = v
        elif key in _SECTIONS:
            if isinstance(v, Mapping):
                sub, more = _flatten(v, path, key + ".")
                out.update(sub)
                problems += more
            elif v is not None:
                problems.append(
                    f"{key} (file {path}): got {_show(v)}; expected a mapping of settings "
                    f"({', '.join(_section_children(key))})"
                )
        else:
            near = difflib.get_close_matches(key, [*FIELDS_BY_KEY, *_SECTIONS], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(
                f"{key} (file {path}): unknown setting; expected one of the keys in docs/configuration.md{hint}"
            )
    return out, problems


def _yaml_error(exc: Exception) -> str:
    """The parser's reason and position, on one line."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(exc).split())
    text = f"at line {mark.line + 1}, column {mark.column + 1}: {' '.join(str(exc.problem or '').split())}"
    ctx = exc.context_mark
    if exc.context and ctx is not None and (ctx.line, ctx.column) != (mark.line, mark.column):
        text += f" ({' '.join(exc.context.split())} at line {ctx.line + 1}, column {ctx.column + 1})"
    return text


def read_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML config file; returns (flat key → value, problems)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        return {}, [f"config file {path}: cannot be read ({exc.strerror or exc}); expected a readable YAML file"]
    except UnicodeDecodeError:
        return {}, [f"config file {path}: is not UTF-8 text; expected a YAML file"]
    except Exception as exc:
        # Not only YAMLError: PyYAML's constructors raise plain ValueError, IndexError... for
        # `node: 2020-13-01` or `node: !!int` (with nothing after it).
        return {}, [f"config file {path}: is not valid YAML ({_yaml_error(exc)}); expected a mapping of settings"]
    if data is None:
        return {}, []
    if not isinstance(data, Mapping):
        return {}, [f"config file {path}: top level is {type(data).__name__}; expected a mapping of settings"]
    return _flatten(data, path)


# kube-vip names that switch kube-vip's load balancer on or configure it; see _kubevip_lb_defaults.
_KUBEVIP_NAMES = frozenset(e.name for f in FIELDS for e in f.kubevip_env)
_KUBEVIP_LB_NAMES = frozenset(n for n in _KUBEVIP_NAMES if n.startswith("lb_")) | {"vip_addpeerstolb"}


def _env_present(environ: Mapping[str, str], name: str) -> bool:
    """A kube-vip name counts only when non-empty, as in kube-vip (``if env != ""``)."""
    return environ.get(name, "") != ""


def _env_layer(environ: Mapping[str, str]) -> dict[str, list[_Value]]:
    """Every environment value per field, lowest precedence first: the kube-vip names (of
    several, the first listed wins), then the ``VIPD_`` name. A list field joins its kube-vip
    names (``vip_localpeer`` + ``vip_peers`` form the peer list)."""
    out: dict[str, list[_Value]] = {}
    for spec in FIELDS:
        present = [e for e in spec.kubevip_env if _env_present(environ, e.name)]
        values: list[_Value]
        if spec.kind == "list" and len(present) > 1:
            values = [_Value(",".join(environ[e.name] for e in present),
                             "env " + "+".join(e.name for e in present), present[0].parse)]
        else:
            values = [_Value(environ[e.name], f"env {e.name}", e.parse) for e in reversed(present)]
        if spec.vipd_env in environ:
            values.append(_Value(environ[spec.vipd_env], f"env {spec.vipd_env}"))
        if values:
            out[spec.key] = values
    return out


def _kubevip_lb_defaults(given: Mapping[str, list[_Value]], environ: Mapping[str, str]) -> dict[str, Any]:
    """kube-vip's load-balancer defaults for an env block of kube-vip names, so it works unchanged.

    kube-vip's ``lb_enable`` is off by default, and with it on in control-plane mode kube-vip
    balances over the apiservers it finds through the API. So, when a kube-vip name is set and
    nothing asks for backends (no ``proxy.backends`` or ``proxy.discovery`` from any source, no
    ``vip_addpeerstolb``):
    - no ``proxy.enabled`` from any source and no ``lb_*`` name at all → the proxy is off;
    - ``lb_enable=true`` → discovery is ``kubernetes`` (the apiservers' EndpointSlices).
    Returns {field key: value} to use in place of the defaults.
    """
    if not any(_env_present(environ, n) for n in _KUBEVIP_NAMES):
        return {}
    if "proxy.backends" in given or "proxy.discovery" in given or _env_present(environ, "vip_addpeerstolb"):
        return {}
    if "proxy.enabled" not in given:
        return {} if any(_env_present(environ, n) for n in _KUBEVIP_LB_NAMES) else {"proxy.enabled": False}
    if [v.source for v in given["proxy.enabled"]] == ["env lb_enable"]:
        try:
            on = parse_bool(environ["lb_enable"])
        except ValueError:  # reported with the other values
            return {}
        return {"proxy.discovery": "kubernetes"} if on else {}
    return {}


def _default_node() -> str:
    return socket.gethostname() or "localhost"


def _problem(spec: FieldSpec, val: _Value, exc: ValueError) -> str:
    msg = str(exc)
    if msg.startswith("'") and not spec.secret:  # the parser named the bad item itself
        return f"{spec.key} ({val.source}): {msg}"
    shown = "<redacted>" if spec.secret else _show(val.raw)
    return f"{spec.key} ({val.source}): got {shown}; {msg}"


def load(
    *,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    require_vip: bool = True,
    warnings: list[str] | None = None,
) -> Config:
    """Merge the layers and build the Config, or raise ConfigError with every problem.

    With ``warnings`` (a list), rules between fields are reported into it instead of raising:
    ``vipd config show`` shows a configuration whose values parse even when it is not yet
    complete, and says what ``config check`` would reject.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    given: dict[str, list[_Value]] = {}  # field key → every value given, lowest precedence first

    if file:
        data, file_problems = read_file(file)
        problems += file_problems
        for key, raw in data.items():
            given.setdefault(key, []).append(_Value(raw, f"file {file}"))
    for key, env_values in _env_layer(environ).items():
        given.setdefault(key, []).extend(env_values)
    for key, raw in (flags or {}).items():
        if raw is not None:
            given.setdefault(key, []).append(_Value(raw, f"flag {FIELDS_BY_KEY[key].flag}"))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in FIELDS:
        layers = given.get(spec.key)
        if not layers:
            values[spec.key], sources[spec.key] = spec.default, "default"
            continue
        winner = layers[-1]
        sources[spec.key] = winner.source
        # Every layer is parsed: a bad value is reported even where a higher layer overrides it.
        for val in layers:
            try:
                values[spec.key] = (val.parse or spec.parse)(val.raw)
            except ValueError as exc:
                over = "" if val is winner else f" (overridden by {winner.source})"
                problems.append(_problem(spec, val, exc) + over)
    for key, value in _kubevip_lb_defaults(given, environ).items():
        values[key], sources[key] = value, "default for kube-vip names"

    # Two phases: every malformed value is reported at once; rules between fields are checked
    # (and all reported at once) when every value parsed, so one typo never yields a cascade.
    if problems:
        raise ConfigError(problems)
    _cross_checks(values, sources, problems, require_vip)
    if problems and warnings is None:
        raise ConfigError(problems)
    if warnings is not None:
        warnings.extend(problems)
    return _build(values, sources)


def load_args(args: Any, *, environ: Mapping[str, str] | None = None, require_vip: bool = True,
              warnings: list[str] | None = None) -> Config:
    """``load`` from an argparse namespace built with ``add_flags`` (and ``--config``)."""
    return load(file=getattr(args, "config", None), environ=environ, flags=collect_flags(args),
                require_vip=require_vip, warnings=warnings)


def _inline_yaml(value: Any) -> str:
    """One line of YAML flow style; a scalar without the ``...`` document end marker."""
    rendered = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return rendered.removesuffix("\n...").strip()


def _show(raw: Any) -> str:
    if isinstance(raw, list | tuple) and len(raw) == 1:
        raw = raw[0]
    s = raw if isinstance(raw, str) else _inline_yaml(raw)
    if len(s) > 80:
        s = s[:77] + "..."
    return repr(s)


def _src(sources: Mapping[str, str], key: str) -> str:
    return f"{key} ({sources.get(key, 'default')})"


def _cross_checks(v: dict[str, Any], sources: Mapping[str, str], problems: list[str], require_vip: bool) -> None:
    def have(*keys: str) -> bool:
        return all(k in v for k in keys)

    if have("election.lease_duration", "election.renew_deadline", "election.retry_period"):
        ld, rd, rp = v["election.lease_duration"], v["election.renew_deadline"], v["election.retry_period"]
        if not ld > rd > rp > 0:
            problems.append(
                f"{_src(sources, 'election.lease_duration')}: lease_duration {ld:g}s, renew_deadline {rd:g}s, "
                f"retry_period {rp:g}s; expected lease_duration > renew_deadline > retry_period > 0"
            )
    if require_vip and "vip.address" in v and not v["vip.address"]:
        problems.append(
            f"{_src(sources, 'vip.address')}: no VIP given; expected at least one address "
            "(--address, VIPD_ADDRESS or vip_address)"
        )
    if have("vip.address", "vip.subnet"):
        for item in v["vip.address"]:
            iface = _vip_interface(item, v["vip.subnet"])
            net = iface.network
            # A VIP is a host address: 10.0.0.0/8 names a network, 10.255.255.255/8 its broadcast
            # (/31, /32, /127 and /128 have neither). The prefix may come from vip.subnet.
            if net.num_addresses > 2 and iface.ip == net.network_address:
                what = "network address"
            elif net.num_addresses > 2 and iface.version == 4 and iface.ip == net.broadcast_address:
                what = "broadcast address"
            else:
                continue
            via = "" if "/" in item else f" (prefix from {_src(sources, 'vip.subnet')})"
            problems.append(
                f"{_src(sources, 'vip.address')}: {str(iface)!r}{via} is the {what} of {net}; "
                "expected a host address (a VIP is one address)"
            )
    if have("proxy.enabled", "proxy.discovery", "proxy.backends", "proxy.peers"):
        if v["proxy.enabled"] and v["proxy.discovery"] == "static" and not v["proxy.backends"]:
            problems.append(
                f"{_src(sources, 'proxy.backends')}: the proxy is enabled with static discovery but has no "
                "backends; expected at least one --backend HOST:PORT, or --discovery peers|kubernetes, or --no-proxy"
            )
        if v["proxy.enabled"] and v["proxy.discovery"] == "peers" and not v["proxy.peers"]:
            problems.append(
                f"{_src(sources, 'proxy.peers')}: discovery is peers but no peer is given; "
                "expected --peer ID:ADDRESS:PORT (vip_localpeer / vip_peers)"
            )
    if have("election.backend", "election.etcd.endpoints"):
        if v["election.backend"] == "etcd" and not v["election.etcd.endpoints"]:
            problems.append(f"{_src(sources, 'election.etcd.endpoints')}: etcd election needs an endpoint")
    if have("election.etcd.cert", "election.etcd.key"):
        if bool(v["election.etcd.cert"]) != bool(v["election.etcd.key"]):
            problems.append(
                f"{_src(sources, 'election.etcd.cert')}: a client certificate needs its key and the "
                "key its certificate; expected both --etcd-cert and --etcd-key"
            )
    if have("proxy.drain_timeout", "shutdown_timeout"):
        if v["proxy.drain_timeout"] >= v["shutdown_timeout"]:
            problems.append(
                f"{_src(sources, 'proxy.drain_timeout')}: {v['proxy.drain_timeout']:g}s; expected less than "
                f"shutdown_timeout ({v['shutdown_timeout']:g}s) so VIP removal and lease release still fit"
            )
    if have("proxy.health.timeout", "proxy.health.interval"):
        if v["proxy.health.timeout"] <= 0 or v["proxy.health.interval"] <= 0:
            problems.append(f"{_src(sources, 'proxy.health.interval')}: interval and timeout must be > 0")
    if have("proxy.connect_timeout") and v["proxy.connect_timeout"] <= 0:
        problems.append(f"{_src(sources, 'proxy.connect_timeout')}: expected a duration > 0")
    if have("proxy.bind_address") and v["proxy.bind_address"]:
        try:
            ipaddress.ip_address(v["proxy.bind_address"])
        except ValueError:
            problems.append(
                f"{_src(sources, 'proxy.bind_address')}: {v['proxy.bind_address']!r} is not an IP address"
            )


def _hostport(item: str) -> tuple[str, int]:
    host, port = _split_host_port(item)
    return host, int(port, 10)


def _vip_interface(item: str, subnet: tuple[int, int]) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """A parsed VIP item with its prefix: its own, else vip.subnet's for its family."""
    addr, _, prefix = item.partition("/")
    ip = ipaddress.ip_address(addr)
    plen = int(prefix) if prefix else subnet[0 if ip.version == 4 else 1]
    return ipaddress.ip_interface(f"{addr}/{plen}")


def _build(v: dict[str, Any], sources: Mapping[str, str]) -> Config:
    v4, v6 = v["vip.subnet"]
    vips = [Vip(_vip_interface(item, (v4, v6))) for item in v["vip.address"]]
    peers = []
    for item in v["proxy.peers"]:
        ident, _, rest = item.partition(":")
        host, port = _hostport(rest)
        peers.append(Peer(ident, host, port))
    return Config(
        node=v["node"] or _default_node(),
        vip=VipConfig(addresses=tuple(vips), interface=v["vip.interface"], subnet=(v4, v6)),
        announce=AnnounceConfig(enabled=v["announce.enabled"], refresh=v["announce.refresh"]),
        election=ElectionConfig(
            backend=v["election.backend"],
            lease_duration=v["election.lease_duration"],
            renew_deadline=v["election.renew_deadline"],
            retry_period=v["election.retry_period"],
            start_as_leader=v["election.start_as_leader"],
            kubernetes=KubernetesConfig(
                kubeconfig=v["election.kubernetes.kubeconfig"],
                api_server=v["election.kubernetes.api_server"],
                namespace=v["election.kubernetes.namespace"],
                lease_name=v["election.kubernetes.lease_name"],
            ),
            etcd=EtcdConfig(
                endpoints=tuple(v["election.etcd.endpoints"]),
                ca=v["election.etcd.ca"],
                cert=v["election.etcd.cert"],
                key=v["election.etcd.key"],
                username=v["election.etcd.username"],
                password=v["election.etcd.password"],
                prefix=v["election.etcd.prefix"],
            ),
        ),
        proxy=ProxyConfig(
            enabled=v["proxy.enabled"],
            port=v["proxy.port"],
            bind_to_vip=v["proxy.bind_to_vip"],
            bind_address=v["proxy.bind_address"],
            backlog=v["proxy.backlog"],
            backends=tuple(_hostport(b) for b in v["proxy.backends"]),
            backend_port=v["proxy.backend_port"],
            discovery=v["proxy.discovery"],
            peers=tuple(peers),
            balance=v["proxy.balance"],
            name=v["proxy.name"],
            health=HealthConfig(
                check=v["proxy.health.check"],
                path=v["proxy.health.path"],
                interval=v["proxy.health.interval"],
                rise=v["proxy.health.rise"],
                fall=v["proxy.health.fall"],
                timeout=v["proxy.health.timeout"],
                ca=v["proxy.health.ca"],
                shutdown_sessions=v["proxy.health.shutdown_sessions"],
            ),
            connect_timeout=v["proxy.connect_timeout"],
            idle_timeout=v["proxy.idle_timeout"],
            half_close_timeout=v["proxy.half_close_timeout"],
            drain_timeout=v["proxy.drain_timeout"],
            max_connections=v["proxy.max_connections"],
        ),
        status=StatusConfig(listen=v["status.listen"]),
        log=LogConfig(format=v["log.format"], level=v["log.level"]),
        shutdown_timeout=v["shutdown_timeout"],
        sources=dict(sources),
    )


# ---------------------------------------------------------------------------------------------
# Showing.
# ---------------------------------------------------------------------------------------------


def effective_values(cfg: Config) -> dict[str, Any]:
    """Flat key → plain (YAML-safe) value of the effective configuration."""
    out: dict[str, Any] = {}
    for spec in FIELDS:
        obj: Any = cfg
        parts = spec.key.split(".")
        # Map table keys onto the typed object where the names differ.
        special = {
            "vip.address": lambda: [str(a) for a in cfg.vip.addresses],
            "vip.subnet": lambda: ",".join(map(str, cfg.vip.subnet)),
            "proxy.backends": lambda: [_fmt_hostport(h, p) for h, p in cfg.proxy.backends],
            "proxy.peers": lambda: [f"{p.id}:{_fmt_hostport(p.host, p.port)}" for p in cfg.proxy.peers],
            "proxy.type": lambda: "tcp",
        }
        if spec.key in special:
            value = special[spec.key]()
        else:
            for part in parts:
                obj = getattr(obj, part)
            value = list(obj) if isinstance(obj, tuple) else obj
        if spec.secret and value:
            value = "<redacted>"
        out[spec.key] = value
    return out


def _fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_show(cfg: Config) -> str:
    """YAML of the effective config; each leaf carries a comment naming its source."""
    lines: list[str] = []
    open_path: list[str] = []
    for key, value in effective_values(cfg).items():
        parts = key.split(".")
        common = 0
        while common < min(len(open_path), len(parts) - 1) and open_path[common] == parts[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth] + ":")
        open_path = parts[:-1]
        rendered = _inline_yaml(value)
        source = cfg.sources.get(key, "default")
        lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {rendered}  # {source}")
    return "\n".join(lines) + "\n"


def flag_dest(spec: FieldSpec) -> str:
    return spec.key.replace(".", "__")


def collect_flags(namespace: Any) -> dict[str, Any]:
    """argparse namespace → {field key: raw value} for flags actually given."""
    out = {}
    for spec in FIELDS:
        if spec.flag is None:
            continue
        value = getattr(namespace, flag_dest(spec), None)
        if value is None:
            continue
        out[spec.key] = value
    return out


def add_flags(parser: Any, specs: Sequence[FieldSpec] = FIELDS) -> None:
    """Add one flag per field to an argparse parser (values stay raw; load() parses them)."""
    import argparse

    for spec in specs:
        if spec.flag is None:
            continue
        dest = flag_dest(spec)
        help_text = f"{spec.help} [{spec.key}]"
        if spec.kind == "bool":
            parser.add_argument(spec.flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif spec.kind == "list":
            parser.add_argument(spec.flag, dest=dest, action="append", default=None,
                                metavar=spec.key.split(".")[-1].upper(), help=help_text + " (repeatable)")
        else:
            parser.add_argument(spec.flag, dest=dest, default=None,
                                metavar=spec.key.split(".")[-1].upper(), help=help_text)


def reference_markdown() -> str:
    """The settings table of docs/configuration.md (kept in sync by a test)."""

    def default_of(spec: FieldSpec) -> str:
        d = spec.default
        if spec.key == "node":
            return "hostname"
        if d is None or d == ():
            return "—"
        if isinstance(d, bool):
            return "true" if d else "false"
        if spec.key == "vip.subnet":
            return "32,128"
        if isinstance(d, tuple):
            return ", ".join(map(str, d))
        if isinstance(d, float) and spec.parse is parse_duration:
            return f"{d:g}s"
        return str(d) if d != "" else '""'

    rows = ["| file key | flag | VIPD_ env | kube-vip env | default | meaning |", "|---|---|---|---|---|---|"]
    for spec in FIELDS:
        flag = spec.flag or ""
        if spec.kind == "bool" and flag:
            flag = f"{flag} / --no-{flag[2:]}"
        elif spec.kind == "list":
            flag += " (repeatable)"
        if spec.choices:
            flag += " {" + ",".join(spec.choices) + "}"
        kv = ", ".join(f"`{e.name}`" for e in spec.kubevip_env)
        meaning = spec.help + (" (secret: redacted in show)" if spec.secret else "")
        rows.append(f"| `{spec.key}` | `{flag}` | `{spec.vipd_env}` | {kv} | {default_of(spec)} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m vipd.config > table (docs/configuration.md is built from it)
    print(reference_markdown(), end="")
