"""The fault suite can fail: with vipd's protection taken away, its checks report two holders.

Each test runs one scenario of tests/test_lab_faults.py against a lab whose nodes run the
deliberately broken vipd of tests/broken_vipd.py (vipd's own code with one or more
protections monkeypatched away) and asserts that the scenario's verdict says "two VIP
holders at once". If such a test passes with the protection removed, the suite's checks
would be blind to exactly the failure they exist for. Results: docs/lab.md ("Proof that the
suite can fail").
"""

from __future__ import annotations

import broken_vipd
import pytest
from lab_fixtures import keep_logs, need_vipd, scenario

from vipd.lab.faults import SPLIT_BRAIN
from vipd.lab.lab import Lab

pytestmark = [pytest.mark.fault, pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow,
              pytest.mark.timeout(240)]


@pytest.mark.parametrize(("name", "removed"), [
    # A frozen process cannot act: only the kernel's address lifetime takes its VIP away.
    ("leader-sigstop", ("kernel-lifetime",)),
    # A leader cut off from etcd only (clients still reach it) runs: it must step down by
    # itself. Every layer that would make it let go is removed (the kernel lifetime too,
    # which would otherwise still expire without renewals).
    ("leader-etcd-cut", ("step-down", "userspace-fence", "kernel-lifetime")),
], ids=["sigstop-without-kernel-lifetime", "etcd-cut-without-any-fence"])
def test_split_brain_is_reported_without_the_protection(name: str, removed: tuple[str, ...]) -> None:
    need_vipd()
    with Lab(kind="vipd", vipd=broken_vipd.command(*removed)) as lab:
        out = scenario(lab, name)
        if not out.failed(SPLIT_BRAIN) or out.two_holder_samples == 0:
            pytest.fail(f"vipd without {', '.join(removed)} passed the split-brain check:\n{out.report()}\n"
                        f"lab logs kept in {keep_logs(lab)}", pytrace=False)
    assert out.two_holder_samples > 0
