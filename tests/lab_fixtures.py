"""Fixtures for the lab tests: a lab per module (built once, removed after), the bounds.

The vipd lab skips, naming the missing pieces, while this build still runs stubs for the
etcd election, the address task or the proxy (``missing_vipd_pieces``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vipd.lab.bounds import Bounds
from vipd.lab.daemons import missing_vipd_pieces
from vipd.lab.lab import Lab


@pytest.fixture(scope="module")
def bounds() -> Bounds:
    return Bounds.defaults()


@pytest.fixture(scope="module")
def vipd_lab() -> Iterator[Lab]:
    missing = missing_vipd_pieces()
    if missing:
        pytest.skip("vipd pieces not in this build yet: " + ", ".join(missing))
    with Lab(kind="vipd") as lab:
        yield lab


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    """Network, apiserver stand-ins and sampler; no daemon (the harness itself)."""
    with Lab(kind="none") as lab:
        yield lab
