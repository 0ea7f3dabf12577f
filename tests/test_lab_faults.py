"""The fault suite: each scenario of issue 7 against three vipd nodes, real etcd, in the lab.

One lab serves every scenario (``run_scenario`` restores it to one stable leader first).
Every scenario checks: never two VIP holders in one sample (sampled every ~5 ms in every node
namespace), a leader again within the bound from ``vipd.lab.bounds``, no VIP left on a stopped
or cut-off node, and a client served by a healthy apiserver stand-in through the VIP.
Run alone with ``pytest -m fault``.
"""

from __future__ import annotations

import pytest
from lab_fixtures import bounds, vipd_lab  # noqa: F401 (fixtures)

from vipd.lab.faults import SCENARIOS, run_scenario

pytestmark = [pytest.mark.fault, pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow,
              pytest.mark.timeout(180)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(vipd_lab, bounds, scenario: str) -> None:  # noqa: F811
    out = run_scenario(vipd_lab, bounds, scenario)
    assert out.ok, out.report() + "\nlogs: " + ", ".join(str(p) for p in vipd_lab.logs().values())
