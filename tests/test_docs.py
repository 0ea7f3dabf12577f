"""Docs that are generated from code stay in sync with it."""

from pathlib import Path

from vipd.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_table_in_sync() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in text, "docs/configuration.md is stale: run tools/gen-config-doc"
