"""Logging: structlog configured to write one JSON object per line (or console text).

Owns: the processor chain (``ts`` RFC 3339 UTC with milliseconds, ``level``, ``event``,
``logger``, ``node``, event fields), routing of standard-library logging (aiohttp,
kubernetes-asyncio, pyroute2, trio-asyncio, scapy) and of ``warnings.warn`` through the same
renderer, and redaction of fields that could carry secrets.

Must never: log a secret (tokens, passwords, private keys), or import other vipd modules.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Field names whose values are never written.
SECRET_FIELDS = frozenset(
    {"password", "token", "authorization", "bearer_token", "api_key", "key_data", "client_key", "secret"}
)


def _timestamp(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.UTC)
    event["ts"] = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return event


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_FIELDS and event[key] is not None:
            event[key] = "<redacted>"
    return event


def _order(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Stable leading fields so lines read well and diff well; the rest follow."""
    head = {k: event.pop(k) for k in ("ts", "level", "event", "logger", "node") if k in event}
    head.update(event)
    return head


def _stdlib_logger_name(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    record = event.get("_record")
    if record is not None:
        event.setdefault("logger", record.name)
    return event


def configure(*, fmt: str = "json", level: str = "info", node: str = "", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's root logger. Safe to call again."""
    stream = stream or sys.stdout
    lvl = _LEVELS[level]
    def add_node(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if node:
            event.setdefault("node", node)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_node,
        _timestamp,
        _redact,
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(default=str)
        final: list[Any] = [structlog.processors.format_exc_info, _order, renderer]
    else:
        final = [structlog.dev.ConsoleRenderer(colors=False)]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _stdlib_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    _route_libraries_to_root()
    # Libraries are chatty at debug; keep them at warning unless vipd itself is at debug.
    for noisy in ("asyncio", "aiohttp", "kubernetes_asyncio", "pyroute2", "trio_asyncio", "httpx", "httpcore",
                  "scapy", "scapy.runtime", "scapy.loading", "scapy.interactive", "hpack"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if lvl <= logging.DEBUG and noisy != "hpack" else logging.WARNING)


def _route_libraries_to_root() -> None:
    """Make libraries that write around the root logger write through it (so, as JSON).

    Each is imported first, because importing it (re)installs what is undone here: pyroute2
    resets its logger's level, and scapy gives its ``scapy`` logger a stderr handler of its
    own and ``propagate = False``. ``warnings.warn`` from libraries prints plain text on
    stderr unless captured into the ``py.warnings`` logger.
    """
    try:
        import pyroute2  # noqa: F401
        import scapy.error  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    for name in ("scapy", "scapy.runtime", "scapy.loading", "scapy.interactive"):
        lib = logging.getLogger(name)
        for old in list(lib.handlers):
            lib.removeHandler(old)
        lib.propagate = True
    # Off then on: a second configure() (or a test harness that swapped showwarning) re-installs it.
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def get(name: str) -> Any:
    """A bound logger for one component; ``logger`` names it in every line."""
    return structlog.get_logger(name).bind(logger=name)
