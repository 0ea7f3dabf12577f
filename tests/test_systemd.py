"""The systemd unit and env file, checked with systemd-analyze, and the real daemon speaking
sd_notify to a socket standing in for systemd's (in a network namespace this test creates)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.ops_fixtures import REPO, notify_socket, scratch_netns
from vipd import config as config_mod

UNIT = Path(REPO) / "systemd" / "vipd.service"
ENV_FILE = Path(REPO) / "systemd" / "vipd.env"
DOC = Path(REPO) / "docs" / "systemd.md"
VIPD_BIN = Path(sys.executable).with_name("vipd")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key → every value assigned (systemd allows repeats), sections flattened."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_file_values(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_unit_has_the_required_settings():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"]
    assert s["EnvironmentFile"] == ["/etc/vipd/vipd.env"]
    assert s["ExecStart"] == ["/usr/local/bin/vipd start"]
    assert "WatchdogSec" in s and "LimitNOFILE" in s
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(s["CapabilityBoundingSet"][0].split()) == caps
    assert set(s["AmbientCapabilities"][0].split()) == caps
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert "@system-service" in s["SystemCallFilter"]
    # admin.conf is optional at start (first node before `kubeadm init`): a SetCredential= of
    # the same ID is systemd's fallback when the LoadCredential= file cannot be read.
    assert s["LoadCredential"] == ["kubeconfig:/etc/kubernetes/admin.conf"]
    assert [v.split(":", 1)[0] for v in s["SetCredential"]] == ["kubeconfig"]
    assert s["SetCredential"][0].split(":", 1)[1].strip()  # systemd ignores an empty value
    assert s["Environment"] == ["VIPD_KUBECONFIG=%d/kubeconfig"]
    # Documentation= names where packaging/install.sh puts this repository's docs/systemd.md.
    assert "file:/usr/local/share/doc/vipd/systemd.md" in s["Documentation"][0].split()
    assert 'docdir="${VIPD_DOCDIR:-/usr/local/share/doc/vipd}"' in (Path(REPO) / "packaging/install.sh").read_text()
    # The watchdog period vipd will use is half of WatchdogSec, well above the 0.5 s tick.
    assert int(s["WatchdogSec"][0].removesuffix("s")) >= 4
    # The stop timeout leaves room for vipd's default graceful shutdown.
    assert int(s["TimeoutStopSec"][0].removesuffix("s")) > config_mod.FIELDS_BY_KEY["shutdown_timeout"].default


def test_env_file_is_a_valid_configuration():
    env = env_file_values(ENV_FILE)
    assert all(k.startswith("VIPD_") for k in env)
    cfg = config_mod.load(environ=env)
    assert cfg.proxy.discovery == "peers" and len(cfg.proxy.peers) == 3
    # And through the real CLI, as an operator would check it.
    proc = subprocess.run([str(VIPD_BIN), "config", "check"], env={**env, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's vipd (verify checks the binary exists)."""
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/vipd", f"ExecStart={VIPD_BIN}")
    path = tmp_path / "vipd.service"
    path.write_text(text)
    return path


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path):
    proc = subprocess.run(["systemd-analyze", "verify", str(_unit_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_and_doc_figure(tmp_path):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for vipd\.service: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    exposure = float(m.group(1))
    assert exposure <= 3.0
    documented = re.search(r"overall exposure \*\*(\d+\.\d+)\*\*", DOC.read_text())
    assert documented and float(documented.group(1)) == exposure, "update the figure in docs/systemd.md"


# --------------------------------------------------------------------------------------------
# The real daemon, as systemd would run it, in a namespace of its own.
# --------------------------------------------------------------------------------------------


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    with scratch_netns() as name:
        _ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p", ns=name)
        _ip("link", "set", "d0", "up", ns=name)
        _ip("link", "set", "d0p", "up", ns=name)
        _ip("addr", "add", "192.0.2.2/24", "dev", "d0", ns=name)
        yield name


async def _in_ns(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return await trio.run_process(["ip", "netns", "exec", ns, *cmd], capture_stdout=True, capture_stderr=True,
                                  check=False)


@pytest.mark.netns
async def test_real_daemon_notifies_serves_metrics_and_stops(netns, tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "VIPD_ADDRESS": "192.0.2.10", "VIPD_INTERFACE": "d0", "VIPD_ELECTION": "none",
        "VIPD_PROXY": "false", "VIPD_STATUS_LISTEN": "127.0.0.1:2112", "VIPD_NODE": "node-a",
        "WATCHDOG_USEC": "1000000",
    }
    log_path = tmp_path / "vipd.log"

    def daemon_log() -> str:
        return log_path.read_text()[-3000:]

    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with notify_socket() as ns_sock, trio.fail_after(60):
        env["NOTIFY_SOCKET"] = ns_sock.env_value
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(functools.partial(
                trio.run_process, ["ip", "netns", "exec", netns, str(VIPD_BIN), "start"], env=env, check=False,
                stdout=log_fd, stderr=subprocess.STDOUT))
            os.close(log_fd)  # the daemon has its own copy

            async def notify_until(pred) -> None:
                """Read notify messages until pred(messages); fail with the daemon's log if it exits."""
                async with trio.open_nursery() as inner:
                    async def watch_exit() -> None:
                        await proc.wait()
                        raise AssertionError(f"vipd exited {proc.returncode}:\n{daemon_log()}")

                    inner.start_soon(watch_exit)
                    with trio.move_on_after(30) as scope:
                        while not pred(ns_sock.messages):
                            await ns_sock.receive()
                    inner.cancel_scope.cancel()
                assert not scope.cancelled_caught, f"notify messages {ns_sock.messages}\n{daemon_log()}"

            try:
                # READY=1 and the leader's STATUS=, in whichever order the tasks got there.
                await notify_until(lambda ms: any(m.get("READY") == "1" for m in ms)
                                   and any(m.get("STATUS", "").startswith("leader") for m in ms))
                status = [m["STATUS"] for m in ns_sock.messages if m.get("STATUS", "").startswith("leader")]
                assert "192.0.2.10/32" in status[0]
                seen = len(ns_sock.messages)
                await notify_until(lambda ms: any(m.get("WATCHDOG") == "1" for m in ms[seen:]))

                metrics = await _in_ns(netns, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:2112/metrics")
                assert metrics.returncode == 0, metrics.stderr
                text = metrics.stdout.decode()
                samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
                assert samples["vipd_leader"] == 1 and samples["vipd_ready"] == 1
                assert samples["vipd_vip_present"] == 1
                if shutil.which("promtool"):
                    lint = await trio.run_process(["promtool", "check", "metrics"], stdin=metrics.stdout,
                                                  capture_stdout=True, capture_stderr=True, check=False)
                    assert lint.returncode == 0, lint.stdout + lint.stderr

                shown = await _in_ns(netns, str(VIPD_BIN), "status")
                assert shown.returncode == 0, shown.stderr
                out = shown.stdout.decode()
                assert re.search(r"^role\s+leader$", out, re.M) and re.search(r"^192\.0\.2\.10/32\s+d0\s+yes$", out, re.M)
            finally:
                proc.send_signal(signal.SIGTERM)
            await ns_sock.wait_for("STOPPING", "1")
        assert proc.returncode == 0, daemon_log()
        addrs = await _in_ns(netns, "ip", "-o", "addr", "show", "dev", "d0")
        assert "192.0.2.10" not in addrs.stdout.decode()  # the VIP left with the daemon
