"""Configuration: precedence, parsing, validation, kube-vip names, show, and fuzzing."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipd import config
from vipd.cli import main
from vipd.errors import ConfigError

MIN = {"vip.address": ["10.0.0.5"], "proxy.backends": ["10.0.0.11:6444"]}


def load(environ: dict[str, str] | None = None, flags: dict[str, Any] | None = None,
         file: str | None = None) -> config.Config:
    return config.load(environ=environ or {}, flags={**MIN, **(flags or {})}, file=file)


# -- precedence --------------------------------------------------------------------------------

def test_precedence_default_file_env_flag(tmp_path: Path) -> None:
    f = tmp_path / "vipd.yaml"
    f.write_text("election:\n  lease_duration: 4s\n  renew_deadline: 3s\nproxy:\n  port: 7443\n")
    assert load().election.lease_duration == 2.0  # default
    cfg = load(file=str(f))
    assert (cfg.election.lease_duration, cfg.proxy.port) == (4.0, 7443)
    assert cfg.sources["election.lease_duration"] == f"file {f}"
    cfg = load(file=str(f), environ={"VIPD_LEASE_DURATION": "6s", "VIPD_RENEW_DEADLINE": "5s"})
    assert cfg.election.lease_duration == 6.0
    assert cfg.sources["election.lease_duration"] == "env VIPD_LEASE_DURATION"
    cfg = load(file=str(f), environ={"VIPD_LEASE_DURATION": "6s", "VIPD_RENEW_DEADLINE": "5s"},
               flags={"election.lease_duration": "8s"})
    assert cfg.election.lease_duration == 8.0
    assert cfg.sources["election.lease_duration"] == "flag --lease-duration"
    assert cfg.proxy.port == 7443  # untouched layers still show through


def test_vipd_env_beats_kubevip_env() -> None:
    cfg = load(environ={"VIPD_LB_PORT": "7000", "lb_port": "8000"})
    assert cfg.proxy.port == 7000


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        ({"vip_address": "10.1.2.3"}, lambda c: [str(a) for a in c.vip.addresses], ["10.1.2.3/32"]),
        ({"address": "fd00::5"}, lambda c: [str(a) for a in c.vip.addresses], ["fd00::5/128"]),
        ({"vip_address": "10.1.2.3", "vip_subnet": "24,64"}, lambda c: str(c.vip.addresses[0]), "10.1.2.3/24"),
        ({"vip_interface": "ens192"}, lambda c: c.vip.interface, "ens192"),
        ({"vip_arp": "false"}, lambda c: c.announce.enabled, False),
        ({"vip_arpRate": "3000"}, lambda c: c.announce.refresh, 3.0),
        ({"vip_startleader": "true"}, lambda c: c.election.start_as_leader, True),
        ({"vip_leaseduration": "15", "vip_renewdeadline": "10", "vip_retryperiod": "2"},
         lambda c: (c.election.lease_duration, c.election.renew_deadline, c.election.retry_period), (15, 10, 2)),
        ({"vip_leaseduration": "5", "vip_renewdeadline": "3", "vip_retryperiod": "1"},
         lambda c: (c.election.lease_duration, c.election.renew_deadline, c.election.retry_period), (5, 3, 1)),
        ({"vip_leasename": "plndr-cp-lock"}, lambda c: c.election.kubernetes.lease_name, "plndr-cp-lock"),
        ({"cp_namespace": "infra"}, lambda c: c.election.kubernetes.namespace, "infra"),
        ({"vip_nodename": "cp-1"}, lambda c: c.node, "cp-1"),
        ({"vip_leaderelection": "false"}, lambda c: c.election.backend, "none"),
        ({"lb_port": "06443"}, lambda c: c.proxy.port, 6443),  # decimal, never octal
        ({"port": "443"}, lambda c: c.proxy.port, 443),
        ({"lb_backendport": "6444"}, lambda c: c.proxy.backend_port, 6444),
        ({"lb_bindtovip": "false"}, lambda c: c.proxy.bind_to_vip, False),
        ({"lb_type": "tcp", "lb_name": "Kubernetes Control Plane"}, lambda c: c.proxy.name, "Kubernetes Control Plane"),
        ({"vip_addpeerstolb": "true", "vip_localpeer": "n1:10.0.0.11:10000", "vip_peers": "n2:10.0.0.12:10000,n3:10.0.0.13:10000"},
         lambda c: (c.proxy.discovery, [p.id for p in c.proxy.peers]), ("peers", ["n1", "n2", "n3"])),
        ({"prometheus_server": ":2112"}, lambda c: c.status.listen, "0.0.0.0:2112"),
        ({"k8s_config_file": "/etc/kubernetes/super-admin.conf"}, lambda c: c.election.kubernetes.kubeconfig,
         "/etc/kubernetes/super-admin.conf"),
        ({"vip_loglevel": "5"}, lambda c: c.log.level, "debug"),
    ],
)
def test_kubevip_env_names(env: dict[str, str], attr: Any, expected: Any) -> None:
    flags = {} if "vip_address" in env or "address" in env else None
    cfg = config.load(environ=env, flags={**MIN, **({"vip.address": None} if flags is not None else {})})
    assert attr(cfg) == expected


def test_every_field_has_a_vipd_env_name() -> None:
    for spec in config.FIELDS:
        assert spec.vipd_env.startswith("VIPD_") and spec.vipd_env == spec.vipd_env.upper()
    names = [s.vipd_env for s in config.FIELDS]
    assert len(names) == len(set(names))
    assert "VIPD_ADDRESS" in names and "VIPD_INTERFACE" in names and "VIPD_LEASE_DURATION" in names


# -- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "seconds"), [("500ms", 0.5), ("3s", 3), ("1m", 60), ("1.5s", 1.5), ("2", 2), (4, 4)])
def test_durations(raw: Any, seconds: float) -> None:
    assert config.parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["", "3x", "-1s", "s", "1e9999s", True, "nan"])
def test_bad_durations(raw: Any) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(raw)


def test_file_lists_and_nesting(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "node": "cp1",
        "vip": {"address": ["10.0.0.5", "fd00::5/64"], "interface": "eth0"},
        "proxy": {"backends": ["10.0.0.11:6444", "[fd00::11]:6444"], "health": {"rise": 3}},
        "election": {"backend": "etcd", "etcd": {"endpoints": ["https://10.0.0.1:2379"], "prefix": "/x/"}},
    }))
    cfg = config.load(environ={}, file=str(f))
    assert [str(v) for v in cfg.vip.addresses] == ["10.0.0.5/32", "fd00::5/64"]
    assert cfg.proxy.backends == (("10.0.0.11", 6444), ("fd00::11", 6444))
    assert cfg.proxy.health.rise == 3
    assert cfg.election.etcd.endpoints == ("https://10.0.0.1:2379",)


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        ({"vip.address": ["300.1.2.3"], "proxy.port": "70000"}, ["vip.address (flag --address): '300.1.2.3'", "proxy.port (flag --lb-port): got '70000'"]),
        ({"vip.address": ["10.0.0.5/33"]}, ["vip.address", "/1 to /32"]),
        ({"vip.address": ["fd00::1/129"]}, ["vip.address", "/1 to /128"]),
        ({"vip.address": ["224.0.0.1"]}, ["cannot be a VIP"]),
        ({"election.lease_duration": "1s"}, ["lease_duration > renew_deadline > retry_period > 0"]),
        ({"election.retry_period": "0s"}, ["lease_duration > renew_deadline > retry_period > 0"]),
        ({"election.backend": "zookeeper"}, ["election.backend (flag --election): got 'zookeeper'; expected one of kubernetes, etcd, none"]),
        ({"proxy.backends": []}, ["proxy.backends", "no backends"]),
        ({"proxy.backends": ["nohost"]}, ["'nohost' is not HOST:PORT"]),
        ({"proxy.discovery": "peers"}, ["proxy.peers", "no peer"]),
        ({"election.etcd.cert": "/c.pem"}, ["both --etcd-cert and --etcd-key"]),
        ({"proxy.drain_timeout": "20s"}, ["proxy.drain_timeout", "less than shutdown_timeout"]),
        ({"status.listen": "nowhere"}, ["status.listen", "IP:PORT"]),
        ({"status.listen": "999.1.1.1:2112"}, ["status.listen (flag --status-listen): got '999.1.1.1:2112'",
                                                "with an IP address as host"]),
        ({"status.listen": "localhost:2112"}, ["status.listen", "with an IP address as host"]),
        ({"proxy.port": "\u0666\u0664\u0664\u0663"}, ["proxy.port", "expected a port number"]),  # Arabic-Indic 6443
        ({"vip.address": ["10.0.0.5/\u0663\u0662"]}, ["'10.0.0.5/\u0663\u0662' has a bad prefix; expected /1 to /32"]),
        ({"vip.address": ["10.0.0.5/\u00b2"]}, ["'10.0.0.5/\u00b2' has a bad prefix; expected /1 to /32"]),
        ({"vip.subnet": "\u0663\u0662"}, ["vip.subnet", "prefix lengths"]),
        ({"election.lease_duration": "\u0665s"}, ["election.lease_duration", "expected a duration"]),
        ({"log.level": "\u0665"}, ["log.level", "expected one of debug"]),
        ({"vip.address": ["fe80::1%eth0"]}, ["'fe80::1%eth0' has a zone index; expected the address without %zone"]),
        ({"vip.address": ["10.0.0.0/8"]}, ["'10.0.0.0/8' is the network address of 10.0.0.0/8; expected a host address"]),
        ({"vip.address": ["10.255.255.255/8"]}, ["is the broadcast address of 10.0.0.0/8"]),
        ({"vip.address": ["fd00::/64"]}, ["'fd00::/64' is the network address of fd00::/64"]),
        ({"vip.address": ["10.1.0.0"], "vip.subnet": "16"},
         ["'10.1.0.0/16' (prefix from vip.subnet (flag --subnet)) is the network address of 10.1.0.0/16"]),
        ({"vip.address": []}, ["no VIP given"]),
        ({"log.level": "loud"}, ["log.level"]),
    ],
)
def test_validation_names_field_source_value(flags: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags={**MIN, **flags})
    text = "\n".join(err.value.problems)
    for needle in needles:
        assert needle in text
    assert all("\n" not in p for p in err.value.problems)


def test_every_problem_reported_at_once() -> None:
    env = {"VIPD_LB_PORT": "0", "vip_leaseduration": "abc", "VIPD_BALANCE": "random"}
    with pytest.raises(ConfigError) as err:
        config.load(environ=env, flags={**MIN, "vip.address": ["1.2.3"]})
    keys = sorted(p.split(" ")[0] for p in err.value.problems)
    assert keys == ["election.lease_duration", "proxy.balance", "proxy.port", "vip.address"]


def test_file_problems(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("proxy:\n  prot: 1\nvip: [1\n")
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(f))
    assert "is not valid YAML" in err.value.problems[0]
    f.write_text("proxy:\n  prot: 1\n")
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(f))
    assert err.value.problems == [f"proxy.prot (file {f}): unknown setting; expected one of the keys in "
                                  "docs/configuration.md (did you mean proxy.port?)"]
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(tmp_path / "missing.yaml"))
    assert "cannot be read" in err.value.problems[0]


def test_secret_never_shown() -> None:
    cfg = load(flags={"election.etcd.password": "hunter2"})
    assert cfg.election.etcd.password == "hunter2"
    assert "hunter2" not in config.render_show(cfg)
    assert "hunter2" not in repr(cfg)


@pytest.mark.parametrize(
    ("flags", "check"),
    [
        ({"status.listen": "[::1]:2112"}, lambda c: c.status.listen == "[::1]:2112"),
        ({"status.listen": ":2112"}, lambda c: c.status.listen == "0.0.0.0:2112"),
        ({"status.listen": ""}, lambda c: c.status.listen == ""),
        ({"vip.address": ["10.0.0.4/31"]}, lambda c: str(c.vip.addresses[0]) == "10.0.0.4/31"),
        ({"vip.address": ["fd00::/127"]}, lambda c: str(c.vip.addresses[0]) == "fd00::/127"),
        ({"vip.address": ["10.1.0.5"], "vip.subnet": "16"}, lambda c: str(c.vip.addresses[0]) == "10.1.0.5/16"),
    ],
)
def test_valid_edge_values(flags: dict[str, Any], check: Any) -> None:
    assert check(load(flags=flags))


def test_bad_value_under_an_override_is_still_reported(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("proxy:\n  enabled: maybe\n  port: 70000\n")
    with pytest.raises(ConfigError) as err:
        config.load(environ={"VIPD_LB_PORT": "6443"}, flags={**MIN, "proxy.enabled": False}, file=str(f))
    assert sorted(err.value.problems) == [
        f"proxy.enabled (file {f}): got 'maybe'; expected true or false (overridden by flag --proxy)",
        f"proxy.port (file {f}): got '70000'; expected a port number from 1 to 65535 (overridden by env VIPD_LB_PORT)",
    ]
    # A kube-vip name shadowed by the VIPD_ name is read too.
    with pytest.raises(ConfigError) as err:
        load(environ={"VIPD_LB_PORT": "7000", "lb_port": "x"})
    assert err.value.problems == ["proxy.port (env lb_port): got 'x'; expected a port number from 1 to 65535 "
                                  "(overridden by env VIPD_LB_PORT)"]


# -- the file: empty values, sections, YAML errors --------------------------------------------

@pytest.mark.parametrize(
    ("text", "check"),
    [
        # `key:` with nothing after it is null in YAML: unset, never the text "None".
        ("node:\n", lambda c: c.node == socket.gethostname() and c.sources["node"] == "default"),
        ("vip:\n  interface:\n", lambda c: c.vip.interface is None),
        ("election:\n  kubernetes:\n    kubeconfig:\n    lease_name: ~\n",
         lambda c: (c.election.kubernetes.kubeconfig, c.election.kubernetes.lease_name)
         == ("/etc/kubernetes/admin.conf", "vipd-cp-lock")),
        ("election:\n  etcd:\n    ca: null\n", lambda c: c.election.etcd.ca is None),
        # A section whose settings are all commented out.
        ("proxy:\n#  port: 7443\n", lambda c: c.proxy.port == 6443 and c.proxy.enabled),
        ("proxy:\n  health:\n  port:\nelection:\n", lambda c: c.proxy.port == 6443),
        ("announce: {}\n", lambda c: c.announce.enabled),
        # An empty list entry is no entry.
        ("proxy:\n  backends:\n  - 10.0.0.12:6444\n  -\n", lambda c: c.proxy.backends == (("10.0.0.12", 6444),)),
        ("", lambda c: c.node == socket.gethostname()),
        ("# only a comment\n", lambda c: c.proxy.port == 6443),
    ],
)
def test_file_empty_value_is_unset(tmp_path: Path, text: str, check: Any) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    cfg = config.load(environ={}, flags={"vip.address": ["10.0.0.5"], "proxy.backends": ["10.0.0.11:6444"]}
                      if "backends" not in text else {"vip.address": ["10.0.0.5"]}, file=str(f))
    assert check(cfg)
    assert "None" not in config.render_show(cfg)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vip: 5\n", "vip (file {f}): got '5'; expected a mapping of settings (address, interface, subnet)"),
        ("proxy: [1, 2]\n", "proxy (file {f}): got '[1, 2]'; expected a mapping of settings (backend_port, "),
        ("election:\n  etcd: on\n", "election.etcd (file {f}): got 'true'; expected a mapping of settings (ca, "),
        ("proxy:\n  prot: 1\n", "proxy.prot (file {f}): unknown setting; expected one of the keys in "
                                "docs/configuration.md (did you mean proxy.port?)"),
        ("prxy:\n  port: 1\n", "prxy (file {f}): unknown setting; expected one of the keys in docs/configuration.md "
                               "(did you mean proxy?)"),
        ("vip: [1\n", "config file {f}: is not valid YAML (at line 2, column 1: expected ',' or ']', but got "
                      "'<stream end>' (while parsing a flow sequence at line 1, column 6)); expected a mapping"),
        ("node: a: b\n", "config file {f}: is not valid YAML (at line 1, column 8: mapping values are not allowed"),
        ("node: 2020-13-01\n", "config file {f}: is not valid YAML (month must be in 1..12)"),
        ("node: !!int abc\n", "config file {f}: is not valid YAML (invalid literal for int()"),
        ("node: !!int\n", "config file {f}: is not valid YAML (string index out of range)"),
        ("- 1\n", "config file {f}: top level is list; expected a mapping of settings"),
    ],
)
def test_file_structure_problems(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(f))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(expected.format(f=f)), err.value.problems[0]


def test_problem_shows_scalars_without_yaml_end_marker(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("proxy:\n  enabled: 1.5\n  port: 70000\n  balance: 7\n")
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(f))
    text = "\n".join(err.value.problems)
    assert "got '1.5'; expected true or false" in text  # was "got '1.5\\n...'"
    assert "got '70000'; expected a port number" in text
    assert "got '7'; expected one of roundrobin" in text
    assert "..." not in text and "\\n" not in text


# -- kube-vip env blocks, unchanged ------------------------------------------------------------

# What kube-vip's `manifest pod --controlplane --arp --leaderElection` writes today (v0.8).
KUBEVIP_CURRENT = {
    "vip_arp": "true", "port": "6443", "vip_nodename": "cp-1", "vip_interface": "ens192", "vip_subnet": "32",
    "dns_mode": "first", "cp_enable": "true", "cp_namespace": "kube-system", "svc_enable": "false",
    "svc_leasename": "plndr-svcs-lock", "vip_leaderelection": "true", "vip_leasename": "plndr-cp-lock",
    "vip_leaseduration": "5", "vip_renewdeadline": "3", "vip_retryperiod": "1", "address": "192.168.0.40",
    "prometheus_server": ":2112",
}
# The origin's (kube-vip 0.1.5 `kubeadm init`) env block.
KUBEVIP_ORIGIN = {
    "vip_arp": "true", "vip_interface": "ens192", "vip_address": "192.168.0.75", "vip_startleader": "true",
    "vip_addpeerstolb": "true", "vip_localpeer": "controlPlane01:192.168.0.70:10000", "lb_backendport": "6443",
    "lb_name": "Kubeadm Load Balancer", "lb_type": "tcp", "lb_bindtovip": "true",
}


def test_current_kubevip_env_block_works_unchanged() -> None:
    cfg = config.load(environ=KUBEVIP_CURRENT)
    assert not cfg.proxy.enabled  # kube-vip's lb_enable is off by default
    assert cfg.sources["proxy.enabled"] == "default for kube-vip names"
    assert [str(v) for v in cfg.vip.addresses] == ["192.168.0.40/32"]
    assert (cfg.node, cfg.vip.interface, cfg.announce.enabled) == ("cp-1", "ens192", True)
    e = cfg.election
    assert (e.backend, e.lease_duration, e.renew_deadline, e.retry_period) == ("kubernetes", 5, 3, 1)
    assert (e.kubernetes.namespace, e.kubernetes.lease_name) == ("kube-system", "plndr-cp-lock")
    assert cfg.status.listen == "0.0.0.0:2112"
    # With kube-vip's load balancer switched on, it balances over the apiservers it discovers.
    cfg = config.load(environ={**KUBEVIP_CURRENT, "lb_enable": "true", "lb_port": "6443"})
    assert cfg.proxy.enabled and cfg.proxy.discovery == "kubernetes"
    cfg = config.load(environ={**KUBEVIP_CURRENT, "lb_enable": "false"})
    assert not cfg.proxy.enabled and cfg.sources["proxy.enabled"] == "env lb_enable"
    # An explicit vipd setting still decides.
    cfg = config.load(environ=KUBEVIP_CURRENT, flags={"proxy.backends": ["192.168.0.41:6444"]})
    assert cfg.proxy.enabled and cfg.proxy.discovery == "static"
    with pytest.raises(ConfigError, match="no backends"):
        config.load(environ=KUBEVIP_CURRENT, flags={"proxy.enabled": True})


def test_origin_kubevip_env_block_works_unchanged() -> None:
    cfg = config.load(environ=KUBEVIP_ORIGIN)
    assert cfg.proxy.enabled and cfg.proxy.discovery == "peers"
    assert [(p.id, p.host, p.port) for p in cfg.proxy.peers] == [("controlPlane01", "192.168.0.70", 10000)]
    assert (cfg.proxy.backend_port, cfg.proxy.bind_to_vip, cfg.proxy.name) == (6443, True, "Kubeadm Load Balancer")
    assert cfg.election.start_as_leader and cfg.announce.enabled


def test_vipd_names_alone_keep_the_proxy_default_on() -> None:
    cfg = config.load(environ={"VIPD_ADDRESS": "10.0.0.5", "VIPD_BACKEND": "10.0.0.11:6444"})
    assert cfg.proxy.enabled and cfg.sources["proxy.enabled"] == "default"
    with pytest.raises(ConfigError, match="no backends"):
        config.load(environ={"VIPD_ADDRESS": "10.0.0.5"})


@pytest.mark.parametrize("block", [KUBEVIP_CURRENT, KUBEVIP_ORIGIN], ids=["current", "origin-0.1.5"])
def test_kubevip_env_block_passes_config_check(block: dict[str, str]) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIPD_")}, **block}
    done = subprocess.run([sys.executable, "-m", "vipd", "config", "check"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "configuration is valid" in done.stdout


def test_empty_kubevip_name_is_unset() -> None:
    cfg = load(environ={"vip_interface": "", "prometheus_server": "", "VIPD_NODE": "n1"})
    assert cfg.vip.interface is None and cfg.status.listen == "127.0.0.1:2112"


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_check_two_lines_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--address", "300.1.2.3", "--lb-port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("vipd: error: vip.address (flag --address)")
    assert err[1].startswith("vipd: error: proxy.port (flag --lb-port)")


def test_cli_show_env_sources() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIPD_")},
           "vip_address": "10.0.0.5", "vip_leaseduration": "5"}
    out = subprocess.run([sys.executable, "-m", "vipd", "config", "show"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "address: [10.0.0.5/32]  # env vip_address" in out
    assert "lease_duration: 5.0  # env vip_leaseduration" in out
    parsed = yaml.safe_load(out)  # comments aside, it is YAML
    assert parsed["election"]["lease_duration"] == 5.0


def test_cli_check_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--address", "10.0.0.5", "--backend", "10.0.0.11:6444"]) == 0
    assert "valid" in capsys.readouterr().out


def test_cli_unknown_flag_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", "--no-such-flag"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- fuzz: no input ever produces a traceback --------------------------------------------------

_text = st.text(alphabet=string.printable + "é\u2028", max_size=30)
_scalar = st.one_of(_text, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())
_yaml_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(_text, inner, max_size=3)), max_leaves=6)
_keys = st.sampled_from([f.key for f in config.FIELDS])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.dictionaries(_keys, _text, max_size=6),
       env=st.dictionaries(st.sampled_from([f.vipd_env for f in config.FIELDS]
                                           + [e.name for f in config.FIELDS for e in f.kubevip_env]), _text, max_size=6))
def test_fuzz_flags_and_env(flags: dict[str, str], env: dict[str, str]) -> None:
    try:
        cfg = config.load(environ=env, flags=flags)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and "\n" not in p and p for p in err.problems)
    else:
        config.render_show(cfg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=st.one_of(_yaml_value, st.dictionaries(_keys, _yaml_value, max_size=5)), raw=st.binary(max_size=40))
def test_fuzz_files(tmp_path: Path, doc: Any, raw: bytes) -> None:
    for i, content in enumerate((yaml.safe_dump(doc).encode(), raw)):
        f = tmp_path / f"c{i}.yaml"
        f.write_bytes(content)
        try:
            config.load(environ={}, file=str(f), flags=MIN)
        except ConfigError as err:
            assert err.problems and all("\n" not in p for p in err.problems)


_YAML_TOKENS = ["node", "vip", "proxy", "address", "enabled", ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",",
                "!!int ", "!!float ", "!!timestamp ", "!!binary ", "!!set ", "!!python/name:os.system ", "&a ", "*a",
                "2020-13-01", "1", "0x1F", "~", "'", '"', "#", "? ", "|", "%YAML 1.1\n", "---\n", "...\n", "\t", "é",
                "\u0663", "<<: "]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(_YAML_TOKENS), max_size=25).map("".join))
def test_fuzz_yaml_text(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    try:
        config.load(environ={}, file=str(f), flags=MIN)
    except ConfigError as err:
        assert err.problems and all("\n" not in p for p in err.problems)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} → {"a": {"b": 1}}: the shape an operator writes."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


_sections = sorted({k.rsplit(".", 1)[0] for k in (f.key for f in config.FIELDS) if "." in k})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(nulls=st.lists(_keys, max_size=8), empty_sections=st.lists(st.sampled_from(_sections), max_size=4))
def test_fuzz_file_empty_values_are_unset(tmp_path: Path, nulls: list[str], empty_sections: list[str]) -> None:
    doc = _nest(dict.fromkeys(nulls))
    for section in empty_sections:  # `proxy:` alone (its settings commented out), unless it has some
        node = doc
        *parents, leaf = section.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node.setdefault(leaf, None)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    cfg = config.load(environ={}, file=str(f), flags=MIN)
    assert cfg == config.load(environ={}, flags=MIN)
    assert not any(source.startswith("file") for source in cfg.sources.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flat=st.dictionaries(_keys, _yaml_value, max_size=6))
def test_fuzz_nested_files(tmp_path: Path, flat: dict[str, Any]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(_nest(flat)))
    try:
        cfg = config.load(environ={}, file=str(f), flags=MIN)
    except ConfigError as err:
        assert err.problems and all("\n" not in p and "None" != p.split("got ")[-1][:6] for p in err.problems)
    else:
        config.render_show(cfg)


# -- fuzz the command line through the real parser and main() ----------------------------------

_GOOD = ["10.0.0.5", "fd00::5/64", "10.0.0.11:6444", "[fd00::11]:6444", "3s", "500ms", "true", "no", ":2112",
         "127.0.0.1:2112", "", "n1:10.0.0.12:6444", "https://127.0.0.1:2379", "eth0", "static", "peers", "etcd"]
_good = st.sampled_from(_GOOD)
_arg = st.one_of(_good, _good, st.text(alphabet=string.printable + "é\u0663\u00b2%", max_size=20))
_FLAGGED = [f for f in config.FIELDS if f.flag]
_CLEAN_ENV = {k: v for k, v in os.environ.items()
              if not k.startswith("VIPD_") and k not in {e.name for f in config.FIELDS for e in f.kubevip_env}}


@st.composite
def _argv(draw: Any) -> list[str]:
    argv = ["config", draw(st.sampled_from(["check", "show"]))]
    if draw(st.booleans()):  # a valid base, so that valid command lines (exit 0) are reached too
        argv += ["--address", "10.0.0.5", "--no-proxy"]
    for spec in draw(st.lists(st.sampled_from(_FLAGGED), max_size=7)):
        if spec.kind == "bool":
            argv.append(draw(st.sampled_from([spec.flag, f"--no-{spec.flag[2:]}"])))
        elif spec.kind == "list":  # a list flag repeats: one item per occurrence
            argv += [f"{spec.flag}={item}" for item in draw(st.lists(_arg, min_size=1, max_size=3))]
        else:
            value = draw(_arg)
            argv += draw(st.sampled_from([[f"{spec.flag}={value}"], [spec.flag, value]]))
    return argv


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=_argv())
def test_fuzz_argv_through_main(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, _CLEAN_ENV, clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors (a value that looks like a flag, ...)
            code = exc.code
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2:
        lines = err.getvalue().splitlines()
        assert lines and all(line.startswith(("vipd: error: ", "vipd config check: error: ",
                                              "vipd config show: error: ")) for line in lines), lines
    elif argv[1] == "check":
        assert out.getvalue().startswith("configuration is valid")
    else:
        assert isinstance(yaml.safe_load(out.getvalue()), dict)
