"""The fault suite: each scenario of issue 7 against three vipd nodes, real etcd, in the lab.

One lab serves every scenario (``run_scenario`` restores it to one stable leader first).
Every scenario checks, from before the fault to the end of the restore after it: never two
VIP holders at once (dumps every 5 ms in every node namespace plus every address event, in
kernel order), a leader again within the bound from ``vipd.lab.bounds``, no VIP left on a
stopped or cut-off node, and a client served by a healthy apiserver stand-in through the VIP.
A failure keeps the lab's logs and names where. Run alone with ``pytest -m fault``.
tests/test_lab_broken.py shows these checks fire when vipd's protection is taken away.
"""

from __future__ import annotations

import pytest
from lab_fixtures import assert_ok, scenario, vipd_lab  # noqa: F401 (fixtures)

from vipd.lab.faults import SCENARIOS

pytestmark = [pytest.mark.fault, pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow,
              pytest.mark.timeout(180)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(vipd_lab, name: str) -> None:  # noqa: F811
    assert_ok(vipd_lab, scenario(vipd_lab, name))
