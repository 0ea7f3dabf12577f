"""`vipd start`: as a real process in a network namespace (JSON-only output, clean SIGTERM stop,
bad input found at start is exit 2), and what cmd_start does with errors that escape the supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from vipd import app
from vipd.cli import main
from vipd.errors import ConfigError, ProxyError


@pytest.fixture
def netns():
    name = f"vs{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _wait_for_line(proc: subprocess.Popen, event: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if json.loads(line).get("event") == event:
            return lines
    raise AssertionError(f"no {event} line within {timeout}s; got {lines}")


@pytest.mark.netns
def test_start_json_only_and_sigterm_exit_0(netns: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIPD_")}
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "vipd", "start", "--election", "none",
           "--no-proxy", "--address", "10.250.0.5", "--interface", "lo", "--status-listen", "",
           "--shutdown-timeout", "5s", "--drain-timeout", "1s", "--node", "n1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = _wait_for_line(proc, "started", timeout=30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert elapsed < 5
    lines += out.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is JSON
    events = [r["event"] for r in records]
    assert {"started", "shutdown.started", "shutdown.completed"} <= set(events)
    assert all(r["node"] == "n1" and "ts" in r and "level" in r for r in records)
    assert err.strip() == "", err
    # The VIP is not left behind.
    addrs = subprocess.run(["ip", "-n", netns, "-o", "addr", "show", "dev", "lo"], capture_output=True,
                           text=True, check=True).stdout
    assert "10.250.0.5" not in addrs


def _start_in(netns: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIPD_")}
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "vipd", "start", "--address", "10.250.0.5",
           "--interface", "lo", "--status-listen", "", "--no-proxy", "--node", "n1", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.netns
def test_start_backend_that_cannot_be_built_is_bad_input_exit_2(netns: str) -> None:
    # The etcd backend is built from the config at start: a CA file that is not there is bad
    # input (exit 2, one field-named line), not a traceback out of trio-asyncio's nursery.
    done = _start_in(netns, "--election", "etcd", "--etcd-endpoint", "https://127.0.0.1:2379",
                     "--etcd-ca", "/nonexistent.pem")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout and done.stderr == ""
    records = [json.loads(line) for line in done.stdout.splitlines()]  # still only JSON lines
    invalid = [r for r in records if r["event"] == "config.invalid"]
    assert len(invalid) == 1
    assert invalid[0]["problem"].startswith("election.etcd") and "--etcd-ca" in invalid[0]["problem"]
    assert not any(r["event"] == "started" for r in records)


@pytest.mark.netns
def test_start_bad_status_listen_is_rejected_before_start(netns: str) -> None:
    done = _start_in(netns, "--election", "none", "--status-listen", "999.1.1.1:2112")
    assert done.returncode == 2
    assert done.stdout == ""  # nothing started, nothing logged
    assert done.stderr.startswith("vipd: error: status.listen (flag --status-listen): got '999.1.1.1:2112'")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("raised", "code", "event", "field"),
    [
        (ExceptionGroup("loop", [ConfigError(["vip.interface (flag --interface): 'eth9' does not exist"])]),
         2, "config.invalid", "problem"),
        (ConfigError(["election.etcd (flag --etcd-ca): cannot be read"]), 2, "config.invalid", "problem"),
        (ExceptionGroup("loop", [ExceptionGroup("inner", [ProxyError("cannot listen on 10.0.0.5:6443")])]),
         1, "startup.failed", "error"),
    ],
)
def test_cmd_start_handles_what_escapes_the_supervisor(monkeypatch: pytest.MonkeyPatch, capsys: Any,
                                                       raised: BaseException, code: int, event: str,
                                                       field: str) -> None:
    """What app.run raises, bare or in trio-asyncio's exception group, becomes a logged line."""
    def run(cfg: Any) -> int:
        raise raised

    monkeypatch.setattr(app, "run", run)
    assert main(["start", "--address", "10.250.0.5", "--no-proxy", "--election", "none"]) == code
    out, err = capsys.readouterr()
    assert err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event"] for r in records] == [event]
    leaf = raised
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert str(leaf).split(": ")[-1] in records[0][field]
