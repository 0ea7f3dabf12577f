"""Status endpoint (placeholder until the operations issue lands)."""

from __future__ import annotations

from typing import Any

import trio

from vipd.config import Config
from vipd.state import RuntimeState


async def run_status(cfg: Config, state: RuntimeState, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep_forever()
