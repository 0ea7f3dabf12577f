"""Announcer (placeholder until the wire issue lands)."""

from __future__ import annotations

from typing import Any

import trio

from vipd.config import Config
from vipd.state import RuntimeState


async def run_announcer(
    cfg: Config, state: RuntimeState, vip_changes: trio.MemoryReceiveChannel, *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async for _change in vip_changes:
        pass
