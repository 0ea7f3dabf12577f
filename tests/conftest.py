"""Shared pytest configuration. Area-specific fixtures live in tests/<area>_fixtures.py and
are imported by the test modules that use them (keeps areas independent)."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    have_etcd = shutil.which("etcd") is not None
    for item in items:
        if "netns" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root for network namespaces"))
        if "etcd" in item.keywords and not have_etcd:
            item.add_marker(pytest.mark.skip(reason="needs the etcd binary (Debian etcd-server)"))
