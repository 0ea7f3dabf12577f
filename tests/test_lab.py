"""The lab harness itself: build/teardown leave nothing, stand-ins answer, observers see true.

These run without vipd's data plane (no daemon, or keepalived), so the harness is trusted
before the vipd scenarios rely on it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from lab_fixtures import bare_lab, need_vipd  # noqa: F401 (fixtures)

from vipd.lab import lab as lab_mod
from vipd.lab.bounds import Bounds
from vipd.lab.faults import SPLIT_BRAIN, run_scenario
from vipd.lab.lab import Lab
from vipd.lab.net import IFACE, NODE_IPS, VIP
from vipd.lab.nsutil import LabError, namespaces, run

pytestmark = [pytest.mark.netns]
GAP = 1.5  # seconds without the VIP in the probe test: longer than the first SYN retransmission


def _vip(lab: Lab, node: str, op: str) -> None:
    run(["ip", "-n", lab.net.ns(node), "addr", op, f"{VIP}/32", "dev", IFACE])


def _lab_pids(lab: Lab) -> list[int]:
    return [p.pid for p in lab.standins.values()] + [lab.sampler.pid]


def test_up_then_down_leaves_nothing_behind() -> None:
    with Lab(kind="none") as lab:
        prefix, directory, pids = lab.prefix, lab.dir, _lab_pids(lab)
        assert {ns for ns in namespaces() if ns.startswith(prefix + "-")} == set(lab.net.all_namespaces())
        assert (lab_mod.STATE_DIR / f"{prefix}.json").exists()
        assert directory.is_dir()
        # Nothing was added to the root namespace.
        root = run(["ip", "-o", "addr"]).stdout
        assert "10.251.72." not in root
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    assert not directory.exists()
    assert not (lab_mod.STATE_DIR / f"{prefix}.json").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_exception_inside_the_lab_still_cleans_up_and_keeps_the_logs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VIPD_LAB_LOGS", str(tmp_path))
    with pytest.raises(RuntimeError), Lab(kind="none") as lab:
        prefix, directory = lab.prefix, lab.dir
        raise RuntimeError("boom")
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    assert not directory.exists()
    assert lab.saved_logs == tmp_path / f"vipd-lab-{prefix}"
    assert sorted(p.name for p in lab.saved_logs.iterdir()) == [
        "apiserver-n1.log", "apiserver-n2.log", "apiserver-n3.log", "watch.log"]


def test_a_lab_that_cannot_be_made_leaves_no_directory(monkeypatch) -> None:
    """No etcd on the machine: a vipd lab fails before it makes anything (and says why)."""
    before = set(Path(tempfile.gettempdir()).glob("vipd-lab-*"))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LabError, match="etcd-server"):
        Lab(kind="vipd")
    assert set(Path(tempfile.gettempdir()).glob("vipd-lab-*")) <= before


@pytest.mark.etcd
def test_bounds_follow_the_flags_the_nodes_run_with() -> None:
    lab = Lab(kind="vipd", vipd_extra=("--lease-duration", "5s", "--renew-deadline", "3s", "--retry-period", "1s"))
    try:
        assert "--lease-duration" in lab.fleet.command("n1")
        b = lab.bounds()
    finally:
        lab.down()
    assert (b.lease_duration, b.renew_deadline, b.retry_period) == (5.0, 3.0, 1.0)
    assert b.fence_strict and not Bounds.defaults().fence_strict  # a 2 s lease: kernel fence best effort
    assert b.kernel_fence > Bounds.defaults().kernel_fence


def test_every_apiserver_stand_in_answers_and_names_its_node(bare_lab: Lab) -> None:  # noqa: F811
    for node, ip in NODE_IPS.items():
        ans = bare_lab.client_get(f"https://{ip}:6444/readyz")
        assert ans.ok, ans.detail
        assert ans.node == node
        assert "stand-in" in ans.detail
    assert not bare_lab.client_get(f"https://{NODE_IPS['n1']}:6444/nope").ok


def test_sampler_sees_holders_and_catches_two_at_once(bare_lab: Lab) -> None:  # noqa: F811
    s = bare_lab.sampler
    assert s.wait_for(lambda h: h == (), 5) is not None
    t0 = time.monotonic()
    _vip(bare_lab, "n2", "add")
    try:
        assert s.wait_for(lambda h: h == ("n2",), 5) is not None
        assert not s.split_brain(t0)
        _vip(bare_lab, "n3", "add")
        try:
            assert s.wait_for(lambda h: h == ("n2", "n3"), 5) is not None
        finally:
            _vip(bare_lab, "n3", "del")
        assert s.split_brain(t0), "two holders must be recorded"
    finally:
        _vip(bare_lab, "n2", "del")
    assert s.wait_for(lambda h: h == (), 5) is not None
    # It dumps often: the median spacing is well under the 10 ms the suite relies on.
    dumps = [x.t for x in s.since(t0) if x.kind == "dump"]
    gaps = sorted(b - a for a, b in zip(dumps, dumps[1:], strict=False))
    assert gaps and gaps[len(gaps) // 2] <= 0.010
    assert s.events_complete(t0, time.monotonic())


def test_a_second_holder_too_brief_for_any_dump_is_still_recorded(bare_lab: Lab) -> None:  # noqa: F811
    """The address events cover what dumps cannot: n3 holds the VIP for microseconds (one
    `ip -batch`: add, then delete) while n2 holds it; that moment must be on the record."""
    s = bare_lab.sampler
    _vip(bare_lab, "n2", "add")
    try:
        assert s.wait_for(lambda h: h == ("n2",), 5) is not None
        t0 = time.monotonic()
        batch = f"addr add {VIP}/32 dev {IFACE}\naddr del {VIP}/32 dev {IFACE}\n"
        subprocess.run(["ip", "-n", bare_lab.net.ns("n3"), "-batch", "-"], input=batch, text=True, check=True)
        assert s.wait_for(lambda h: h == ("n2",), 5, since=time.monotonic()) is not None
        bad = s.split_brain(t0, time.monotonic())
    finally:
        _vip(bare_lab, "n2", "del")
    assert [x.holders for x in bad if x.kind == "event"] == [("n2", "n3")]


def test_probe_measures_a_gap_it_was_shown(bare_lab: Lab) -> None:  # noqa: F811
    """The VIP disappears for longer than TCP's first SYN retransmission (1 s): an attempt
    started in the gap whose retransmitted SYN gets through after it must not shorten it."""
    _vip(bare_lab, "n1", "add")
    try:
        probe = bare_lab.probe(6444)
        try:
            assert probe.wait_ok(5)
            t0 = time.monotonic()
            _vip(bare_lab, "n1", "del")
            time.sleep(GAP)  # the gap we inject and expect to see measured
            _vip(bare_lab, "n1", "add")
            assert probe.wait_ok(5)
            time.sleep(1.0)  # let attempts started in the gap finish (retransmitted SYNs)
            gap = probe.outage(t0, time.monotonic())
        finally:
            probe.stop()
    finally:
        _vip(bare_lab, "n1", "del")
    assert GAP <= gap < GAP + 1.0


def test_cli_up_status_down(tmp_path: Path) -> None:
    """`vipd lab up` leaves a lab running (recorded); `vipd lab down` removes it."""
    vipd = [sys.executable, "-m", "vipd", "lab"]
    up = subprocess.run([*vipd, "up", "--daemon", "none"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    labs = lab_mod.recorded_labs()
    mine = [s for s in labs if s.get("owner") and str(s["prefix"]) in up.stdout]
    assert len(mine) == 1
    prefix = mine[0]["prefix"]
    try:
        status = subprocess.run([*vipd, "status"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and prefix in status.stdout
    finally:
        down = subprocess.run([*vipd, "down", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    assert not Path(mine[0]["dir"]).exists()


def test_interrupted_owner_still_cleans_up(tmp_path: Path) -> None:
    """SIGTERM to a process holding a lab: its finally blocks remove everything."""
    code = ("import time; from vipd.lab.lab import Lab\n"
            "with Lab(kind='none') as lab:\n    print(lab.prefix, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "VIPD_LAB_LOGS": str(tmp_path)})
    try:
        prefix = proc.stdout.readline().strip()
        assert prefix.startswith("vl")
        assert [ns for ns in namespaces() if ns.startswith(prefix + "-")]
        proc.terminate()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]


@pytest.mark.slow
@pytest.mark.etcd
def test_ctrl_c_twice_during_the_demo_still_removes_everything(tmp_path: Path) -> None:
    """`vipd lab demo` interrupted mid-story (SIGINT, as Ctrl-C sends it), and again while it
    cleans up: namespaces, processes, lab directory and state file are all gone; the logs of
    the interrupted run are kept where it says."""
    need_vipd()
    env = {**os.environ, "VIPD_LAB_LOGS": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "vipd", "lab", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    prefix, state, lines = None, None, []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            prefix = prefix or next(iter(re.findall(r"lab (vl[0-9a-f]{4}):", line)), None)
            if "SIGKILL to the leader" in line:
                break
        assert prefix, "".join(lines)
        state = json.loads((lab_mod.STATE_DIR / f"{prefix}.json").read_text())
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:
            lines.append(line)
            if "cleaning up lab" in line:
                break
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C, while it cleans up
        lines += proc.stdout.readlines()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            lab_mod.teardown_recorded(prefix)
    text = "".join(lines)
    assert "while cleaning up: finishing the clean-up first" in text, text
    assert proc.returncode == 130, text
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    assert not Path(state["dir"]).exists()
    assert not (lab_mod.STATE_DIR / f"{prefix}.json").exists()
    assert len(state["pids"]) >= 8  # stand-ins, vipd nodes, etcd, the holder watcher
    for pid in state["pids"]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    kept = tmp_path / f"vipd-lab-{prefix}"
    assert f"logs kept in {kept}" in text
    assert (kept / "vipd-n1.log").stat().st_size > 0


@pytest.mark.slow
def test_split_brain_check_fires_on_keepalived_sigkill() -> None:
    """keepalived has no fencing: SIGKILL of the master leaves its VIP while a backup takes
    over. The same check that guards vipd must see it (so it is not vacuous)."""
    if os.system("command -v keepalived >/dev/null") != 0:
        pytest.skip("keepalived not installed")
    with Lab(kind="keepalived") as lab:
        out = run_scenario(lab, lab.bounds(), "leader-sigkill")
    assert out.failed(SPLIT_BRAIN), out.report()
    assert out.two_holder_samples > 0
