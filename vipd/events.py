"""The messages tasks exchange over trio memory channels, and the fan-out that carries them.

Owns: ``Leadership`` (what the election tells everyone else) and ``Fanout`` (one sender,
many receivers; a receiver that has gone away is dropped, never an error for the sender).

Must never: import any other vipd module or do I/O beyond channel sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Leadership:
    """The election's word on who leads.

    ``leader``       whether *this* node leads now.
    ``holder``       the node that holds the lease as far as this node knows (None: nobody).
    ``term``         grows with every change of holder (Lease ``leaseTransitions``, etcd
                     revision of the leader key); consumers ignore events older than the last
                     term they acted on.
    ``safe_until``   leader only: trio-clock time until which this node's leadership is
                     guaranteed (its renew deadline). Sent again after every successful renew.
    ``fence_until``  leader only: trio-clock time before which no other node can take the
                     lease (last renew request start + lease duration). The address task turns
                     it into a kernel address lifetime, so the kernel drops the VIP even if
                     this process is frozen or killed.
    ``reason``       short machine-readable reason (acquired, renewed, lost, released, ...).
    """

    leader: bool
    holder: str | None
    term: int
    safe_until: float | None = None
    fence_until: float | None = None
    reason: str = ""


class Fanout:
    """Send each message to every subscriber; closed subscribers are dropped silently."""

    def __init__(self) -> None:
        self._senders: list[trio.MemorySendChannel] = []
        self.last: object | None = None

    def subscribe(self, buffer: int = 16) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(buffer)
        self._senders.append(send)
        return recv

    async def send(self, message: object) -> None:
        self.last = message
        for sender in list(self._senders):
            try:
                await sender.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(sender)

    def send_nowait(self, message: object) -> None:
        """For shielded cleanup paths: never blocks; a full subscriber misses this message."""
        self.last = message
        for sender in list(self._senders):
            try:
                sender.send_nowait(message)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(sender)

    async def aclose(self) -> None:
        for sender in self._senders:
            await sender.aclose()
        self._senders.clear()


@dataclass(frozen=True)
class VipChange:
    """The address task's word to the announcer: the VIPs are now on ``interface`` or gone.

    Sent after the kernel confirmed the change, so announcing always follows adding.
    ``reason``: acquired | restored (drift repaired) | lost | stopping | standby (sent once at
    start with present=False, so the announcer can open its socket and build frames early).
    """

    present: bool
    interface: str
    reason: str = ""
