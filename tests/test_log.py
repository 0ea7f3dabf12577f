"""Log lines: one JSON object per line, stable fields, stdlib routed, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import re

from vipd import log

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines_of(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_have_stable_fields() -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="cp-1", stream=buf)
    log.get("election").info("leadership.acquired", holder="cp-1", term=3)
    log.get("election").debug("election.tick")  # below level: not written
    logging.getLogger("aiohttp.client").warning("connection reset by peer")
    try:
        raise ValueError("boom")
    except ValueError:
        log.get("app").error("task.failed", exc_info=True)
    out = lines_of(buf)
    assert len(out) == 3
    first = out[0]
    assert list(first)[:5] == ["ts", "level", "event", "logger", "node"]
    assert TS.match(first["ts"])
    assert first == {**first, "level": "info", "event": "leadership.acquired", "logger": "election",
                     "node": "cp-1", "holder": "cp-1", "term": 3}
    assert out[1]["logger"] == "aiohttp.client" and out[1]["event"] == "connection reset by peer"
    assert out[1]["node"] == "cp-1" and out[1]["level"] == "warning"
    assert "ValueError: boom" in out[2]["exception"]


def test_secrets_redacted() -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="debug", node="n", stream=buf)
    log.get("etcd").info("etcd.auth", user="root", password="hunter2", token="abc.def")
    text = buf.getvalue()
    assert "hunter2" not in text and "abc.def" not in text
    assert lines_of(buf)[0]["password"] == "<redacted>"


def test_console_format_is_not_json() -> None:
    buf = io.StringIO()
    log.configure(fmt="console", level="info", node="n", stream=buf)
    log.get("app").info("started")
    assert "started" in buf.getvalue() and not buf.getvalue().startswith("{")
