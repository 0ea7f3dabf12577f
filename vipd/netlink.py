"""Address manager (placeholder until the wire issue lands).

Owns: putting the VIP on the interface while leader and taking it off otherwise.
"""

from __future__ import annotations

from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.events import Fanout, Leadership, VipChange
from vipd.state import RuntimeState


async def run_address_task(
    cfg: Config,
    state: RuntimeState,
    leadership: trio.MemoryReceiveChannel,
    vip_changes: Fanout,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    logger = log.get("address")
    task_status.started()
    iface = cfg.vip.interface or "auto"
    try:
        async for event in leadership:
            assert isinstance(event, Leadership)
            for vip in state.vips:
                if vip.present != event.leader:
                    vip.present = event.leader
                    logger.info("vip.added" if event.leader else "vip.removed", address=vip.address,
                                interface=iface, term=event.term)
            await vip_changes.send(VipChange(event.leader, iface, event.reason))
    finally:
        with trio.CancelScope(shield=True):
            for vip in state.vips:
                if vip.present:
                    vip.present = False
                    logger.info("vip.removed", address=vip.address, interface=iface, reason="stopping")
