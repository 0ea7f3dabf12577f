"""Fixtures for the lab tests: a lab per module (built once, removed after), the bounds, and
judging a scenario so that a failure names logs that still exist.

The vipd lab skips, naming the missing pieces, while this build still runs stubs for the
etcd election, the address task or the proxy (``missing_vipd_pieces``). Tests that build a
vipd lab are marked ``etcd`` (conftest skips them cleanly without the etcd binary).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vipd.lab.bounds import Bounds
from vipd.lab.daemons import missing_vipd_pieces
from vipd.lab.faults import Outcome, run_scenario
from vipd.lab.lab import Lab


def need_vipd() -> None:
    missing = missing_vipd_pieces()
    if missing:
        pytest.skip("vipd pieces not in this build yet: " + ", ".join(missing))


@pytest.fixture(scope="module")
def vipd_lab() -> Iterator[Lab]:
    need_vipd()
    with Lab(kind="vipd") as lab:
        yield lab


@pytest.fixture(scope="module")
def bounds(vipd_lab: Lab) -> Bounds:
    """The bounds of the module's vipd lab, from the flags its nodes run with."""
    return vipd_lab.bounds()


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    """Network, apiserver stand-ins and sampler; no daemon (the harness itself)."""
    with Lab(kind="none") as lab:
        yield lab


def scenario(lab: Lab, name: str) -> Outcome:
    """Run one scenario; if it raises, keep the lab's logs and say where."""
    try:
        return run_scenario(lab, lab.bounds(), name)
    except BaseException as exc:
        exc.add_note(f"lab logs kept in {keep_logs(lab)}")
        raise


def keep_logs(lab: Lab) -> str:
    """Copy the logs out now (the lab directory goes with the lab) and on the lab's exit."""
    lab.failed = True
    try:
        return str(lab.save_logs())
    except OSError as exc:
        return f"(could not copy: {exc}; lab directory {lab.dir})"


def assert_ok(lab: Lab, out: Outcome) -> None:
    if not out.ok:
        pytest.fail(f"{out.report()}\nlab logs kept in {keep_logs(lab)}", pytrace=False)
