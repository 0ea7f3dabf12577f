"""The messages tasks exchange over trio memory channels, and the fan-out that carries them.

Owns: ``Leadership`` (what the election tells everyone else), ``VipChange`` (address task →
announcer, with the announcer's stop acknowledgement), ``ReleaseGate`` (address task → election
at stop: may the lease be released?) and ``Fanout`` (one sender, many receivers; a receiver that
has gone away is dropped, never an error for the sender).

Must never: import any other vipd module or do I/O beyond channel sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    async def send(self, message: object) -> int:
        """Deliver to every live subscriber; returns how many got it. Every subscriber with
        room gets the message at once; only then does the sender wait for those whose buffer
        is full, in subscription order, so one slow subscriber never delays the others'
        copy of this message (it holds back the next one: per-subscriber order is kept)."""
        self.last = message
        delivered = 0
        full: list[trio.MemorySendChannel] = []
        for sender in list(self._senders):
            try:
                sender.send_nowait(message)
            except trio.WouldBlock:
                full.append(sender)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(sender)
            else:
                delivered += 1
        for sender in full:
            try:
                await sender.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(sender)
            else:
                delivered += 1
        return delivered

    def send_nowait(self, message: object) -> int:
        """For shielded cleanup paths: never blocks; a full subscriber misses this message.
        Returns how many subscribers got it."""
        self.last = message
        delivered = 0
        for sender in list(self._senders):
            try:
                sender.send_nowait(message)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(sender)
            else:
                delivered += 1
        return delivered

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
    ``ifindex``: the interface's index (0: unknown); a new index for the same name means the
    interface was recreated (new MAC), so the announcer reopens its socket and rebuilds frames.
    ``stopped``: on present=False, set by the announcer once it will send nothing more; the
    address task removes the address only after that (stop announcing, then remove).
    """

    present: bool
    interface: str
    reason: str = ""
    ifindex: int = 0
    stopped: trio.Event | None = field(default=None, compare=False, repr=False)


class ReleaseGate:
    """The address task's word to the election at stop: may the lease be released now?

    The election reads it like a ``trio.Event``: ``wait()`` returns once the word is given,
    ``is_set()`` is True only when every VIP was confirmed gone. ``withhold`` (removal failed or
    timed out) makes ``wait()`` return with ``is_set()`` False: the election then lets the lease
    expire instead of handing it over while the VIP may still be on this node. The first word
    counts.
    """

    def __init__(self) -> None:
        self._given = trio.Event()
        self._released = False
        self.withheld: str | None = None  # why, when withheld

    def set(self) -> None:
        """Every VIP is confirmed off this node."""
        if not self._given.is_set():
            self._released = True
            self._given.set()

    def withhold(self, reason: str) -> None:
        if not self._given.is_set():
            self.withheld = reason
            self._given.set()

    def is_set(self) -> bool:
        return self._released

    @property
    def given(self) -> bool:
        return self._given.is_set()

    async def wait(self) -> None:
        await self._given.wait()
