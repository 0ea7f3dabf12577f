"""Configuration: precedence, parsing, validation, kube-vip names, show, and fuzzing."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        ({"status.listen": "nowhere"}, ["status.listen", "HOST:PORT"]),
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
    assert err.value.problems == [f"proxy.prot (file {f}): unknown setting; expected one of the keys in docs/configuration.md"]
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, flags=MIN, file=str(tmp_path / "missing.yaml"))
    assert "cannot be read" in err.value.problems[0]


def test_secret_never_shown() -> None:
    cfg = load(flags={"election.etcd.password": "hunter2"})
    assert cfg.election.etcd.password == "hunter2"
    assert "hunter2" not in config.render_show(cfg)
    assert "hunter2" not in repr(cfg)


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
