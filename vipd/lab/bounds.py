"""Every time bound the lab asserts, in one place, derived from the configured timers.

Theory: a crashed leader's lease blocks the others for ``lease_duration`` measured on their
own clocks from the last change they saw, then a candidate notices within ``retry_period``
and acquires (one etcd round trip). etcd drops an expired lease up to 0.5 s late. A leader
that cannot renew steps down (removes the VIP) by ``renew_deadline``; if the process cannot
act (SIGKILL, SIGSTOP) the kernel removes the VIP when its address lifetime runs out, which
vipd keeps below the lease duration. A SIGTERM releases the lease after the VIP is gone, so
the next node takes over within about one retry period. ``STALL`` is the honest margin for
a 2-core machine running other test suites at the same time (seconds-long stalls happen).

Must never: be bypassed: tests, demo and bench read their bounds from here only.
"""

from __future__ import annotations

from dataclasses import dataclass

from vipd import config as config_mod

ETCD_EXPIRY_SLACK = 0.5  # etcd 3.4 removes expired keys up to this late
STALL = 3.0  # margin for a loaded 2-core machine (not a performance target)
STARTUP = 5.0  # python + vipd start-up in a namespace on a loaded machine


@dataclass(frozen=True)
class Bounds:
    lease_duration: float
    renew_deadline: float
    retry_period: float
    shutdown_timeout: float
    health_interval: float
    health_fall: int
    health_timeout: float

    @classmethod
    def from_config(cls, cfg: config_mod.Config) -> Bounds:
        e, h = cfg.election, cfg.proxy.health
        return cls(e.lease_duration, e.renew_deadline, e.retry_period, cfg.shutdown_timeout,
                   h.interval, h.fall, h.timeout)

    @classmethod
    def defaults(cls, **flags: object) -> Bounds:
        """Bounds for vipd started with the lab's flags (at vipd's defaults unless overridden)."""
        base: dict[str, object] = {"vip.address": ["10.251.72.100"], "election.backend": "none",
                                   "proxy.backends": ["10.251.72.11:6444"]}
        base.update(flags)
        return cls.from_config(config_mod.load(environ={}, flags=base))

    @property
    def takeover(self) -> float:
        """Crash / freeze / partition of the leader → another node holds the VIP."""
        return self.lease_duration + 2 * self.retry_period + ETCD_EXPIRY_SLACK + STALL

    @property
    def handover(self) -> float:
        """SIGTERM of the leader → another node holds the VIP (lease released)."""
        return 2 * self.retry_period + STALL

    @property
    def fence(self) -> float:
        """A leader that can no longer renew (or run) → its VIP is gone."""
        return self.lease_duration + STALL

    @property
    def first_leader(self) -> float:
        """Daemons (re)started, or etcd back → some node holds the VIP."""
        return STARTUP + self.lease_duration + 2 * self.retry_period + ETCD_EXPIRY_SLACK + STALL

    @property
    def restore_vip(self) -> float:
        """VIP deleted by hand on the leader → it is back (drift watch, or next renewal)."""
        return self.retry_period + STALL

    @property
    def backend_down(self) -> float:
        """A backend stops → the proxy stops sending clients to it (active health checks)."""
        return self.health_fall * (self.health_interval + self.health_timeout) + STALL

    @property
    def graceful_exit(self) -> float:
        return self.shutdown_timeout + STALL
