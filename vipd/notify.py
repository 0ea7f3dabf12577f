"""systemd notifications: READY=1, STATUS=, STOPPING=1 and WATCHDOG=1, spoken natively.

Owns: the sd_notify datagram (AF_UNIX/SOCK_DGRAM to ``$NOTIFY_SOCKET``; a leading ``@`` is
an abstract socket name), when each message is sent, and the watchdog pings.

Theory of operation:
    * READY=1 once ``state.is_ready`` (every expected task reported started), STOPPING=1 as
      soon as ``state.stopping`` (also from the cancelled path, so a fast shutdown still says
      it), STATUS= with the role from the election's ``Leadership`` events.
    * WATCHDOG=1 every half ``$WATCHDOG_USEC`` (only when ``$WATCHDOG_PID`` is unset or ours),
      and only while the supervisor's tick (``state.last_tick``, written every 0.5 s by the
      supervisor in vipd.app) is fresh. A blocked event loop stops every task, the pings
      included; the tick check adds that the supervisor itself must be alive, not just this
      task. Right after a loop stall the tick is old only because its task has not run yet
      (both wake in the same batch, in either order), so a stale tick is looked at again
      every ``RECHECK`` seconds instead of a whole period later: a stall of S seconds delays a
      ping by at most S + RECHECK, never S + a period. ``watchdog.withheld`` is logged only
      when the tick has not moved for ``STALE_GRACE`` while this task kept running (the
      supervisor is really gone, not just late).
    * Sending never blocks: the socket is non-blocking and a message that cannot be queued
      is dropped (systemd keeps only the latest state anyway).
    * Without ``$NOTIFY_SOCKET`` the task only drains its leadership channel (so the fan-out
      never waits on it).

Must never: depend on libsystemd, fail the daemon because systemd is absent or gone, or
change ``RuntimeState``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.events import Leadership
from vipd.state import RuntimeState

# The supervisor ticks every 0.5 s; a tick older than four ticks' time is stale: no ping.
WATCHDOG_STALE = 2.0
# A stale tick is looked at again this soon (it is usually just a tick task that a loop stall
# woke in the same batch as the watchdog, and that runs a moment later).
RECHECK = 0.25
# Stale for this long while the watchdog itself runs: the supervisor is gone, say so.
STALE_GRACE = 1.0
# How often READY/STOPPING conditions are looked at (RuntimeState has no events).
POLL = 0.1


def notify_address(environ: Mapping[str, str]) -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or ``\\0name`` for ``@name``."""
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000 / 2


def role_text(event: Leadership, vips: list[str]) -> str:
    if event.leader:
        return f"leader (term {event.term}), serving {', '.join(vips) or 'no VIP'}"
    if event.holder:
        return f"follower, leader is {event.holder} (term {event.term})"
    return "candidate, no leader"


class Notifier:
    """A non-blocking datagram socket to systemd's notify socket."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self._warned = False
        self.status = "starting"  # the last STATUS= sent; READY=1 repeats it

    def send(self, *lines: str) -> bool:
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone, queue full, socket removed: never fatal
            if not self._warned:
                self._warned = True
                log.get("notify").warning("notify.send_failed", error=str(exc), message=lines[0])
            return False

    def close(self) -> None:
        self.sock.close()


async def _lifecycle(state: RuntimeState, notifier: Notifier) -> None:
    logger = log.get("notify")
    ready_sent = stopping_sent = False
    try:
        while not state.stopping:
            if not ready_sent and state.is_ready:
                ready_sent = notifier.send("READY=1", f"STATUS={notifier.status}")
                logger.debug("notify.ready")
            await trio.sleep(POLL)
        stopping_sent = notifier.send("STOPPING=1", "STATUS=stopping")
        await trio.sleep_forever()
    finally:
        if state.stopping and not stopping_sent:
            notifier.send("STOPPING=1", "STATUS=stopping")


async def _follow_leadership(state: RuntimeState, leadership: trio.MemoryReceiveChannel,
                             notifier: Notifier | None) -> None:
    last = ""
    async for event in leadership:
        if notifier is None or not isinstance(event, Leadership):
            continue
        text = role_text(event, [v.address for v in state.vips])
        if text != last:
            last = notifier.status = text
            notifier.send(f"STATUS={text}")


async def _watchdog(state: RuntimeState, notifier: Notifier, period: float) -> None:
    logger = log.get("notify")
    withheld = False
    stale_tick, stale_since = -1.0, 0.0  # the stale tick value seen, and since when (this task's view)
    while True:
        now = trio.current_time()
        age = now - state.last_tick
        if state.last_tick > 0 and age <= WATCHDOG_STALE:
            notifier.send("WATCHDOG=1")
            if withheld:
                logger.info("watchdog.resumed")
            withheld = False
            await trio.sleep(period)
            continue
        if state.last_tick != stale_tick:  # first look, or the tick moved (alive, only late)
            stale_tick, stale_since = state.last_tick, now
        elif not withheld and now - stale_since >= STALE_GRACE:
            withheld = True
            logger.error("watchdog.withheld", tick_age=round(age, 3))
        await trio.sleep(RECHECK)


async def run_notify(cfg: Config, state: RuntimeState, leadership: trio.MemoryReceiveChannel, *,
                     environ: Mapping[str, str] | None = None,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Tell systemd how vipd is doing, for as long as vipd runs (no-op without systemd)."""
    environ = os.environ if environ is None else environ
    address = notify_address(environ)
    if address is None:
        task_status.started()
        await _follow_leadership(state, leadership, None)
        await trio.sleep_forever()
    notifier = Notifier(address)
    period = watchdog_period(environ, os.getpid())
    log.get("notify").debug("notify.enabled", socket=environ.get("NOTIFY_SOCKET"), watchdog_period=period)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_lifecycle, state, notifier)
            nursery.start_soon(_follow_leadership, state, leadership, notifier)
            if period is not None:
                nursery.start_soon(_watchdog, state, notifier, period)
            task_status.started()
    finally:
        notifier.close()
