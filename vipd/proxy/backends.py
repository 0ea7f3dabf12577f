"""The backend pool: which backends exist, which are healthy, and which one gets the next client.

Owns: the per-backend health counter (HAProxy's rise/fall arithmetic, fed by active checks and
by failed connects), the balancing choice (round-robin or least-connections) over the healthy
backends, and applying a new backend list (discovery) without touching open connections:
a backend that disappears stops being chosen, its open connections keep running.

Must never: do I/O, import trio, read the clock, or log. Callers get a ``Transition`` back and
decide what to log or close. Tests drive it synchronously.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vipd.state import BackendState


class Transition(enum.Enum):
    UP = "up"
    DOWN = "down"


def backend_key(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets: the key of ``state.proxy.backends``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class HealthCounter:
    """HAProxy's check arithmetic (src/check.c): ``health`` runs from 0 to rise+fall-1.

    A backend is up while health >= rise. A failure while up walks health down and the
    ``fall``-th one in a row marks it down (health 0); a success while down walks it up and
    the ``rise``-th marks it up (health rise+fall-1). A new backend starts up at health = rise,
    as HAProxy's servers do, so the first failed check marks it down at once and clients are
    served before the first check completes.
    """

    rise: int
    fall: int
    health: int = -1
    up: bool = True

    def __post_init__(self) -> None:
        if self.health < 0:
            self.health = self.rise

    def observe(self, ok: bool) -> Transition | None:
        top = self.rise + self.fall - 1
        if ok:
            if self.health < top:
                self.health += 1
                if not self.up and self.health >= self.rise:
                    self.health = top
                    self.up = True
                    return Transition.UP
            return None
        if self.health > self.rise:
            self.health -= 1
            return None
        self.health = 0
        if self.up:
            self.up = False
            return Transition.DOWN
        return None


@dataclass(eq=False)
class Backend:
    host: str
    port: int
    health: HealthCounter
    stats: BackendState
    removed: bool = False
    # Opaque per-connection handles (the server puts cancel scopes here) so that
    # "shutdown-sessions" can find a backend's connections; the pool never looks inside.
    sessions: set[Any] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.stats.address

    @property
    def up(self) -> bool:
        return self.health.up and not self.removed


class BackendPool:
    """The current backends in order, balancing over the healthy ones."""

    def __init__(
        self,
        addresses: Iterable[tuple[str, int]],
        *,
        balance: str = "roundrobin",
        rise: int = 2,
        fall: int = 3,
        stats: dict[str, BackendState] | None = None,
    ) -> None:
        if balance not in ("roundrobin", "leastconn"):
            raise ValueError(f"unknown balance {balance!r}")
        self.balance = balance
        self.rise = rise
        self.fall = fall
        self.stats = {} if stats is None else stats
        self.backends: list[Backend] = []
        self._next = 0
        self.update(addresses)

    def __iter__(self):  # noqa: ANN204
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def get(self, key: str) -> Backend | None:
        for b in self.backends:
            if b.key == key:
                return b
        return None

    def update(self, addresses: Iterable[tuple[str, int]]) -> tuple[list[Backend], list[Backend]]:
        """Apply a new backend list; returns (added, removed). Kept backends keep their health."""
        wanted: dict[str, tuple[str, int]] = {}
        for host, port in addresses:
            wanted.setdefault(backend_key(host, port), (host, port))
        current = {b.key: b for b in self.backends}
        added: list[Backend] = []
        removed: list[Backend] = []
        kept: list[Backend] = []
        for key, (host, port) in wanted.items():
            b = current.get(key)
            if b is None:
                st = BackendState(address=key, healthy=True)
                b = Backend(host, port, HealthCounter(self.rise, self.fall), st)
                added.append(b)
            kept.append(b)
        for key, b in current.items():
            if key not in wanted:
                b.removed = True
                removed.append(b)
                self.stats.pop(key, None)
        self.backends = kept
        for b in kept:
            self.stats[b.key] = b.stats
        if self._next >= max(1, len(kept)):
            self._next = 0
        return added, removed

    def observe(self, backend: Backend, ok: bool) -> Transition | None:
        """One check result or connect outcome; returns the transition it caused, if any."""
        t = backend.health.observe(ok)
        if t is not None:
            backend.stats.healthy = backend.health.up
            backend.stats.transitions += 1
        return t

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.up]

    def pick(self, exclude: Iterable[Backend] = ()) -> Backend | None:
        """The backend for the next connection, skipping ``exclude`` (already tried); None if
        no healthy backend is left."""
        n = len(self.backends)
        if n == 0:
            return None
        skip = set(exclude) if exclude else ()
        if self.balance == "leastconn":
            best: Backend | None = None
            start = self._next % n
            for i in range(n):
                b = self.backends[(start + i) % n]
                if b.up and b not in skip and (
                    best is None or b.stats.active_connections < best.stats.active_connections
                ):
                    best = b
            self._next = (start + 1) % n
            return best
        for i in range(n):
            idx = (self._next + i) % n
            b = self.backends[idx]
            if b.up and b not in skip:
                self._next = (idx + 1) % n
                return b
        return None
