"""docs/logging.md names every event vipd logs at info and above, with its level, logger and
every field: read from the log calls in vipd/ (ast), so a new event or field fails here until
the doc has it, and a documented one that the code dropped fails too."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "logging.md"
# Method → the level the line carries (structlog's `exception` logs at error).
LEVEL_OF = {"info": "info", "warning": "warning", "warn": "warning", "error": "error", "exception": "error",
            "critical": "critical"}
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_-]+)*")
LOGGER_NAME = re.compile(r'\blog\.get\("([a-z_.]+)"\)')


@dataclass
class Logged:
    levels: set[str] = field(default_factory=set)
    loggers: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    where: set[str] = field(default_factory=set)


def _is_logger(receiver: ast.expr) -> bool:
    text = ast.unparse(receiver)
    return text.split(".")[-1] in {"log", "logger", "_log", "_logger"} or text.startswith("log.get(")


def _event_names(arg: ast.expr) -> list[str] | None:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.IfExp):  # "link.up" if running else "link.down"
        body, orelse = _event_names(arg.body), _event_names(arg.orelse)
        if body is not None and orelse is not None:
            return body + orelse
    return None


def logged_events() -> tuple[dict[str, Logged], list[str]]:
    """Every event logged at info or above in vipd/, and the calls this scan cannot read."""
    events: dict[str, Logged] = defaultdict(Logged)
    unreadable: list[str] = []
    for path in sorted((ROOT / "vipd").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        loggers = set(LOGGER_NAME.findall(text))
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVEL_OF and _is_logger(node.func.value)):
                continue
            where = f"{rel}:{node.lineno}"
            names = _event_names(node.args[0]) if node.args else None
            if names is None or not all(EVENT_NAME.fullmatch(n) for n in names):
                unreadable.append(f"{where}: event is not a literal name")
                continue
            if any(k.arg is None for k in node.keywords):
                unreadable.append(f"{where}: **fields cannot be listed")
            if len(loggers) != 1:
                unreadable.append(f"{where}: one log.get(name) per module expected, found {sorted(loggers)}")
            for name in names:
                ev = events[name]
                ev.levels.add(LEVEL_OF[node.func.attr])
                ev.loggers |= loggers
                ev.fields |= {"exception" if k.arg == "exc_info" else k.arg for k in node.keywords if k.arg}
                ev.where.add(where)
    return dict(events), unreadable


def doc_rows(section: str) -> list[list[str]]:
    text = DOC.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_scan_reads_vipds_log_calls():
    events, unreadable = logged_events()
    assert unreadable == []
    # The scan finds what is there (a scan that finds nothing would pass everything below).
    assert events["backend.down"].fields == {"backend", "reason", "sessions"}
    assert events["backend.down"].levels == {"warning"} and events["backend.down"].loggers == {"proxy"}
    assert events["task.failed"].fields == {"group", "error", "exception"}
    assert {"link.up", "link.down"} <= set(events)
    assert len(events) >= 50


def test_every_event_at_info_and_above_is_documented_with_all_its_fields():
    events, _ = logged_events()
    rows = doc_rows("Every event at info and above")
    documented = {}
    for event, level, logger, fields, _meaning in rows:
        name = event.strip("`")
        assert name not in documented, f"{name} listed twice"
        documented[name] = ({lv.strip() for lv in level.split(",")}, logger, set(re.findall(r"`([^`]+)`", fields)))
    missing = sorted(set(events) - set(documented))
    assert not missing, f"docs/logging.md lacks {missing} (logged at {[sorted(events[m].where) for m in missing]})"
    stale = sorted(set(documented) - set(events))
    assert not stale, f"docs/logging.md lists {stale}, which vipd no longer logs at info or above"
    for name, ev in events.items():
        levels, logger, fields = documented[name]
        assert levels == ev.levels, f"{name}: level {sorted(ev.levels)} in {sorted(ev.where)}, doc says {levels}"
        assert {logger} == ev.loggers, f"{name}: logger {sorted(ev.loggers)}, doc says {logger}"
        assert fields == ev.fields, (f"{name}: fields {sorted(ev.fields)} in {sorted(ev.where)}, "
                                     f"doc lists {sorted(fields)}")


def test_alert_table_names_real_events_at_their_levels():
    events, _ = logged_events()
    rows = doc_rows("Events to alert on (stable names)")
    assert rows
    for names, level, _meaning in rows:
        for name in re.findall(r"`([^`]+)`", names):
            assert name in events, name
            assert events[name].levels == {level}, f"{name}: {sorted(events[name].levels)}, doc says {level}"
