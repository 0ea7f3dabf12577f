"""Every time bound the lab asserts, in one place, derived from the configured timers.

Theory: a crashed leader's lease blocks the others for ``lease_duration`` measured on their
own clocks from the last change they saw, then a candidate notices within ``retry_period``
and acquires (one etcd round trip). etcd drops an expired lease up to 0.5 s late.

Two fences take the VIP off a leader that can no longer renew, and the scenarios check the
one that applies:

- **step-down** (``step_down``): a leader that runs but cannot renew (etcd cut off or down,
  link cut) removes the VIP itself by ``renew_deadline`` after its last successful renew
  started, which is before the fault;
- **kernel lifetime** (``kernel_fence``): a leader that cannot act (SIGKILL, SIGSTOP) loses
  the VIP when the address lifetime vipd refreshed on its last renew (at most one retry
  period before the fault) runs out, late by up to ``netlink.kernel_late``. vipd picks the
  lifetime so that this is before any other node can take the lease *when the lease is long
  enough* (``fence_strict``); at vipd's defaults (2 s lease) it is not: the lifetime is 1 s,
  the worst case 2.3 s, and vipd logs ``vip.fence_weak``. The suite still asserts "never two
  holders" at the defaults, because that is what operators run: the real margin comes from
  the kernel usually removing the address well inside its worst case and from etcd expiring
  the key no earlier than its TTL (see docs/lab.md, "Lease margins").

A SIGTERM releases the lease after the VIP is gone, so the next node takes over within about
one retry period. ``STALL`` is the honest margin for a 2-core machine running other test
suites at the same time (seconds-long stalls happen).

Must never: be bypassed: tests, demo and bench read their bounds from here only, and they
are computed from the very command line the lab's vipd nodes run (``for_vipd_args``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from vipd import config as config_mod
from vipd import netlink
from vipd.lab.daemons import vipd_args
from vipd.lab.net import ETCD_IP

ETCD_EXPIRY_SLACK = 0.5  # etcd 3.4 removes expired keys up to this late
STALL = 3.0  # margin for a loaded 2-core machine (not a performance target)
STARTUP = 5.0  # python + a daemon's start-up in a namespace on a loaded machine
CLIENT_BACK = 3.0  # a client probe's next success once the VIP is settled (connect timeouts)


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
    def for_vipd_args(cls, args: Sequence[str]) -> Bounds:
        """Bounds for a node running ``vipd start ARGS`` (the flags parsed as vipd parses them)."""
        args = list(args)
        if args[:1] == ["start"]:
            args = args[1:]
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--config")
        config_mod.add_flags(parser)
        return cls.from_config(config_mod.load_args(parser.parse_args(args), environ={}))

    @classmethod
    def defaults(cls, extra: Sequence[str] = ()) -> Bounds:
        """Bounds for the lab's vipd nodes (vipd's defaults, plus ``extra`` flags if any)."""
        return cls.for_vipd_args(vipd_args("n1", f"http://{ETCD_IP}:2379", extra=extra))

    @property
    def lifetime(self) -> netlink.Lifetime:
        """The address lifetime vipd gives the VIP on each renew (see vipd/netlink.py)."""
        return netlink.renew_lifetime(self.lease_duration)

    @property
    def fence_strict(self) -> bool:
        """Whether the kernel lifetime is sure to remove the VIP before a take-over."""
        return self.lifetime.strict

    @property
    def takeover(self) -> float:
        """Crash / freeze / partition of the leader → another node holds the VIP."""
        return self.lease_duration + 2 * self.retry_period + ETCD_EXPIRY_SLACK + STALL

    @property
    def handover(self) -> float:
        """SIGTERM of the leader → another node holds the VIP (lease released)."""
        return 2 * self.retry_period + STALL

    @property
    def step_down(self) -> float:
        """A running leader that can no longer renew → it removed its VIP itself."""
        return self.renew_deadline + STALL

    @property
    def kernel_fence(self) -> float:
        """A leader that cannot run (SIGKILL, SIGSTOP) → the kernel removed its VIP."""
        seconds = self.lifetime.seconds
        assert seconds is not None  # the etcd election always gives a fence
        return self.retry_period + netlink.expiry_bound(seconds) + STALL

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

    @property
    def startup(self) -> float:
        """A daemon started → it runs and answers (keepalived has no status to ask)."""
        return STARTUP

    @property
    def client_back(self) -> float:
        """The VIP settled → the client probe succeeds again."""
        return CLIENT_BACK

    @property
    def settle(self) -> float:
        """How long one holder must last to call the lab settled (no flapping after restarts)."""
        return max(1.0, 2 * self.retry_period)

    @property
    def stays(self) -> float:
        """How long to watch that the VIP stays put (a returning node must not take it)."""
        return 2 * self.lease_duration + self.retry_period
