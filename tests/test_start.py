"""`vipd start` as a real process in a network namespace: JSON-only output, clean SIGTERM stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.netns


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
