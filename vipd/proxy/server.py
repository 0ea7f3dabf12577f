"""Listener and accept loop (placeholder until the proxy issue lands)."""

from __future__ import annotations

from typing import Any

import trio

from vipd.config import Config
from vipd.state import RuntimeState


async def run_proxy(cfg: Config, state: RuntimeState, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    raise NotImplementedError("the proxy is not in this build yet; run with --no-proxy")
