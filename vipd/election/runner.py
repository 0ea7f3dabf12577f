"""The election task (placeholder until the lease machine lands: static backend only).

Owns: turning backend outcomes into ``Leadership`` events on the fan-out, updating
``state.election``, and releasing the lease on shutdown only after the VIP is gone.
"""

from __future__ import annotations

from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.election.static import StaticBackend
from vipd.errors import ConfigError
from vipd.events import Fanout, Leadership
from vipd.state import RuntimeState


def build_backend(cfg: Config) -> Any:
    if cfg.election.backend == "none":
        return StaticBackend(cfg.node, leader=True)
    raise ConfigError([f"election.backend ({cfg.sources.get('election.backend', 'default')}): "
                       f"{cfg.election.backend!r} is not available in this build; expected none"])


async def run_election(
    cfg: Config,
    backend: Any,
    fanout: Fanout,
    state: RuntimeState,
    release_gate: trio.Event,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    logger = log.get("election")
    task_status.started()
    if not backend.leader:
        state.election.role = "follower"
        await trio.sleep_forever()
    term = 1
    state.election.role, state.election.holder, state.election.term = "leader", cfg.node, term
    state.election.transitions += 1
    logger.info("leadership.acquired", holder=cfg.node, term=term, backend="none")
    try:
        while True:
            now = trio.current_time()
            # A static leader never loses its lease: safety horizon is always one period ahead.
            await fanout.send(Leadership(True, cfg.node, term, safe_until=now + 3600,
                                         fence_until=now + 3600, reason="acquired"))
            await trio.sleep(3000)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(cfg.shutdown_timeout):
                await release_gate.wait()
            state.election.role = "follower"
            logger.info("leadership.released", holder=cfg.node, term=term)
