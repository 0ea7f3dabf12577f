"""The lab harness itself: build/teardown leave nothing, stand-ins answer, observers see true.

These run without vipd's data plane (no daemon, or keepalived), so the harness is trusted
before the vipd scenarios rely on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lab_fixtures import bare_lab, bounds  # noqa: F401 (fixtures)

from vipd.lab import lab as lab_mod
from vipd.lab.faults import run_scenario
from vipd.lab.lab import Lab
from vipd.lab.net import IFACE, NODE_IPS, VIP
from vipd.lab.nsutil import namespaces, run

pytestmark = [pytest.mark.netns]
GAP = 1.5  # seconds without the VIP in the probe test: longer than the first SYN retransmission


def _vip(lab: Lab, node: str, op: str) -> None:
    run(["ip", "-n", lab.net.ns(node), "addr", op, f"{VIP}/32", "dev", IFACE])


def _lab_pids(lab: Lab) -> list[int]:
    return [p.pid for p in lab.standins.values()] + ([lab.etcd.process.pid] if lab.etcd.process.pid else [])


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


def test_exception_inside_the_lab_still_cleans_up() -> None:
    with pytest.raises(RuntimeError), Lab(kind="none") as lab:
        prefix = lab.prefix
        raise RuntimeError("boom")
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]


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
    # It samples often: the median spacing is well under the 10 ms the suite relies on.
    recent = s.since(t0)
    gaps = sorted(b.t - a.t for a, b in zip(recent, recent[1:], strict=False))
    assert gaps and gaps[len(gaps) // 2] <= 0.010


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


def test_interrupted_owner_still_cleans_up() -> None:
    """SIGTERM to a process holding a lab: its finally blocks remove everything."""
    code = ("import time; from vipd.lab.lab import Lab\n"
            "with Lab(kind='none') as lab:\n    print(lab.prefix, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
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
def test_split_brain_check_fires_on_keepalived_sigkill(bounds) -> None:  # noqa: F811
    """keepalived has no fencing: SIGKILL of the master leaves its VIP while a backup takes
    over. The same check that guards vipd must see it (so it is not vacuous)."""
    if os.system("command -v keepalived >/dev/null") != 0:
        pytest.skip("keepalived not installed")
    with Lab(kind="keepalived") as lab:
        out = run_scenario(lab, bounds, "leader-sigkill")
    failed = {c.name for c in out.checks if not c.ok}
    assert "never two VIP holders in one sample" in failed, out.report()
    assert out.two_holder_samples > 0
