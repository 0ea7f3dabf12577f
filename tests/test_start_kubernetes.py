"""`vipd start --election kubernetes` as a real daemon: the real kubernetes-asyncio client over
HTTPS (inside trio-asyncio) against the fake apiserver, both in a test namespace. The daemon
takes the Lease, puts the VIP on its interface, and on SIGTERM removes the VIP, then clears
the Lease's holder so another node can take it at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
VIP = "10.252.0.100"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    name = f"vk{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d0p")
        for dev in ("d0", "d0p"):
            sh("ip", "-n", name, "link", "set", dev, "up")
        sh("ip", "-n", name, "addr", "add", "10.252.0.1/24", "dev", "d0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def vip_present(ns: str) -> bool:
    return VIP in sh("ip", "-n", ns, "-o", "addr", "show", "dev", "d0")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_daemon_takes_lease_holds_vip_and_hands_back_on_sigterm(netns: str, tmp_path: Path) -> None:
    fake = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(HERE / "kube_fake_serve.py"),
                             str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    daemon = None
    try:
        assert fake.stdout is not None and fake.stdin is not None
        info = json.loads(fake.stdout.readline())

        def lease() -> dict | None:
            fake.stdin.write("lease kube-system vipd-cp-lock\n")
            fake.stdin.flush()
            return json.loads(fake.stdout.readline())

        env = {k: v for k, v in os.environ.items() if not k.startswith("VIPD_")}
        log_path = tmp_path / "vipd.log"
        with open(log_path, "w") as log_file:
            daemon = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "vipd", "start", "--node", "cp-1",
                 "--election", "kubernetes", "--kubeconfig", info["kubeconfig"], "--address", VIP,
                 "--interface", "d0", "--no-proxy", "--status-listen", "", "--drain-timeout", "1s",
                 "--shutdown-timeout", "5s"],
                stdout=log_file, stderr=subprocess.STDOUT, env=env)
            wait_for(lambda: daemon.poll() is not None or vip_present(netns), 20, "VIP on d0")
            assert daemon.poll() is None, log_path.read_text()
            held = lease()
            assert held is not None and held["spec"]["holderIdentity"] == "cp-1"
            assert held["spec"]["leaseDurationSeconds"] == 2
            assert held["spec"]["renewTime"].endswith("Z") and len(held["spec"]["renewTime"]) == 27

            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=10) == 0, log_path.read_text()
        assert not vip_present(netns)
        released = lease()
        assert released is not None and not released["spec"].get("holderIdentity")
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
        for event in ("leadership.acquired", "vip.added", "vip.removed", "leadership.released",
                      "shutdown.completed"):
            assert event in events, events
        assert events.index("vip.removed") < events.index("leadership.released")
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if fake.stdin:
            fake.stdin.close()
        try:
            fake.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait()
