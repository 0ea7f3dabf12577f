"""Live runtime state that tasks write and the status endpoint reads.

Owns: plain mutable records (no locks: everything runs on one trio thread) for the election,
each VIP, the announcer, the proxy and its backends, plus the set of tasks that reported
ready. The status module turns these into /status JSON and Prometheus metrics at scrape
time, so no task needs to know about Prometheus.

Must never: do I/O or import trio.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ElectionState:
    role: str = "candidate"  # leader | follower | candidate
    holder: str | None = None
    term: int = 0
    transitions: int = 0  # times this node gained or lost leadership
    renew_failures: int = 0
    backend_up: bool = True


@dataclass
class VipState:
    address: str  # with prefix, e.g. 10.0.0.5/32
    interface: str | None = None
    present: bool = False
    restored: int = 0  # re-added after drift (ip addr del, link flap)


@dataclass
class AnnounceState:
    sent: int = 0  # frames put on the wire
    errors: int = 0


@dataclass
class BackendState:
    address: str  # host:port
    healthy: bool = False
    active_connections: int = 0
    total_connections: int = 0
    failed_connects: int = 0
    bytes_in: int = 0  # client → backend
    bytes_out: int = 0  # backend → client
    transitions: int = 0


@dataclass
class ProxyState:
    listening: bool = False
    active_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0  # closed at once: no healthy backend
    backends: dict[str, BackendState] = field(default_factory=dict)


@dataclass
class RuntimeState:
    node: str
    election: ElectionState = field(default_factory=ElectionState)
    vips: list[VipState] = field(default_factory=list)
    announce: AnnounceState = field(default_factory=AnnounceState)
    proxy: ProxyState = field(default_factory=ProxyState)
    ready: set[str] = field(default_factory=set)  # tasks that reported started
    expected: set[str] = field(default_factory=set)  # tasks that must be ready for /readyz
    stopping: bool = False
    last_tick: float = 0.0  # trio clock of the supervisor's last liveness tick

    @property
    def is_ready(self) -> bool:
        return bool(self.expected) and not self.stopping and self.expected <= self.ready
