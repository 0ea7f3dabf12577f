"""Log lines: one JSON object per line, stable fields, stdlib routed, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings

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


def test_scapy_and_warnings_go_through_the_json_renderer() -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="n", stream=buf)
    from scapy.error import log_loading, log_runtime

    scapy_root = logging.getLogger("scapy")
    assert scapy_root.propagate and not scapy_root.handlers  # scapy sets propagate=False + its own handler
    log_runtime.warning("more than one interface holds %s", "10.0.0.5")
    log_loading.error("cannot load %s", "manuf")
    warnings.warn("a library says: deprecated", UserWarning, stacklevel=1)
    out = lines_of(buf)
    assert [(r["logger"], r["level"]) for r in out] == [
        ("scapy.runtime", "warning"), ("scapy.loading", "error"), ("py.warnings", "warning")]
    assert out[0]["event"] == "more than one interface holds 10.0.0.5"
    assert "UserWarning: a library says: deprecated" in out[2]["event"]
    assert all(r["node"] == "n" for r in out)


# Run as its own process: no test harness in between, libraries imported after configure()
# (as `vipd start` does), their output on the real stdout/stderr.
_LIBRARY_NOISE = """
import logging, warnings
from vipd import log
log.configure(fmt="json", level="info", node="n1")
import scapy.all  # noqa: F401  (vipd.announce imports it after configure)
from scapy.error import log_runtime, warning
log_runtime.warning("runtime warning")
warning("scapy's warning() helper")
logging.getLogger("scapy.interactive").debug("interactive chatter")
logging.getLogger("pyroute2.ndb").warning("pyroute2 warning")
warnings.warn("library warning", RuntimeWarning)
warnings.warn("library deprecation", DeprecationWarning)  # shown: -c code is __main__
log.get("app").info("done")
"""


def test_every_library_line_is_json_in_a_real_process() -> None:
    done = subprocess.run([sys.executable, "-c", _LIBRARY_NOISE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # scapy's own handler and plain warnings wrote here
    records = [json.loads(line) for line in done.stdout.splitlines()]  # every line parses
    assert [r["event"] for r in records if r["logger"] != "py.warnings"] == [
        "runtime warning", "scapy's warning() helper", "pyroute2 warning", "done"]
    shown = [r["event"] for r in records if r["logger"] == "py.warnings"]
    assert len(shown) == 2 and "RuntimeWarning: library warning" in shown[0]
    assert "DeprecationWarning: library deprecation" in shown[1]
    assert all(r["node"] == "n1" and TS.match(r["ts"]) for r in records)
