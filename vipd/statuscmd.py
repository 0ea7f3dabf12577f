"""``vipd status``: the local daemon's /status (and /readyz) as a readable table or JSON.

Owns: finding the endpoint (``--endpoint``, else ``status.listen`` from ``--config`` or the
environment, else 127.0.0.1:2112), fetching it with a short timeout, and rendering.
Exit 0 when the daemon answered, 1 when it is unreachable or answered nonsense (one line on
stderr), 2 for bad input.

Must never: change the daemon, or load more configuration than the status address (a node's
full configuration need not be valid to ask how the daemon is doing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from vipd.config import FIELDS_BY_KEY, parse_listen, read_file
from vipd.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:2112"


def endpoint_from(config_file: str | None, environ: Mapping[str, str]) -> str:
    """The URL of the local status endpoint from status.listen (flags > env > file > default)."""
    spec = FIELDS_BY_KEY["status.listen"]
    raw: Any = None
    source = "default"
    if config_file:
        data, problems = read_file(config_file)
        if problems:
            raise ConfigError(problems)
        if "status.listen" in data:
            raw, source = data["status.listen"], f"file {config_file}"
    for name in (spec.vipd_env, *(e.name for e in spec.kubevip_env)):
        if name in environ:
            raw, source = environ[name], f"env {name}"
            break
    try:
        listen = parse_listen(raw) if raw is not None else DEFAULT_LISTEN
    except ValueError as exc:
        raise ConfigError([f"status.listen ({source}): got {raw!r}; {exc}"]) from None
    if not listen:
        raise ConfigError([f"status.listen ({source}): the status endpoint is disabled; expected HOST:PORT "
                           "or --endpoint URL"])
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"http://{host}:{port}"


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(doc: Mapping[str, Any], readiness: str) -> str:
    """The /status document as text for a person."""
    lines = _table([
        ["node", str(doc.get("node"))],
        ["role", str(doc.get("role"))],
        ["holder", str(doc.get("holder") or "-")],
        ["term", str(doc.get("term"))],
        ["ready", readiness],
    ])
    vips = doc.get("vips") or []
    lines.append("")
    if vips:
        lines += _table([["VIP", "INTERFACE", "PRESENT"]]
                        + [[str(v.get("address")), str(v.get("interface") or "-"), _yes(v.get("present"))]
                           for v in vips])
    else:
        lines.append("no VIP configured")
    backends = doc.get("backends") or []
    lines.append("")
    if backends:
        lines += _table([["BACKEND", "HEALTHY", "ACTIVE"]]
                        + [[str(b.get("address")), _yes(b.get("healthy")), str(b.get("active_connections"))]
                           for b in backends])
    else:
        lines.append("no backends (load balancer off or none discovered yet)")
    return "\n".join(lines) + "\n"


def fetch(endpoint: str, timeout: float) -> tuple[dict[str, Any], str]:
    """GET /status and /readyz; raises OSError-like ``StatusUnavailable`` with one line of why."""
    import httpx

    base = endpoint.rstrip("/")
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            r = client.get(base + "/status")
            if r.status_code != 200:
                raise StatusUnavailable(f"{base}/status answered HTTP {r.status_code}")
            doc = r.json()
            ready = client.get(base + "/readyz")
    except httpx.HTTPError as exc:
        raise StatusUnavailable(f"cannot reach the daemon at {base}: {exc or type(exc).__name__}") from None
    except ValueError:
        raise StatusUnavailable(f"{base}/status did not answer JSON; is this vipd's status endpoint?") from None
    if not isinstance(doc, dict):
        raise StatusUnavailable(f"{base}/status answered {type(doc).__name__}; expected a JSON object")
    text = ready.text.strip()
    readiness = "yes" if ready.status_code == 200 else f"no ({text.removeprefix('not ready: ')})"
    return doc, readiness


class StatusUnavailable(Exception):
    pass


def cmd_status(args: argparse.Namespace) -> int:
    endpoint = args.endpoint or endpoint_from(args.config, os.environ)
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError([f"--endpoint: got {endpoint!r}; expected a URL such as http://127.0.0.1:2112"])
    try:
        doc, readiness = fetch(endpoint, args.timeout)
    except StatusUnavailable as exc:
        print(f"vipd: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(doc, readiness))
    return 0


def register_cli(subparsers: Any, config_args: Any) -> None:
    p = subparsers.add_parser("status", help="show the running daemon's state (exit 1 when unreachable)")
    p.add_argument("--endpoint", metavar="URL",
                   help="status endpoint (default: from status.listen, else http://127.0.0.1:2112)")
    p.add_argument("--config", metavar="FILE", help="YAML configuration file to read status.listen from")
    p.add_argument("--json", action="store_true", help="print the /status JSON as it is")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="request timeout (default 3)")
    p.set_defaults(func=cmd_status)
