"""The supervisor: one trio nursery, start order, channels, signals and bounded shutdown.

Owns: which tasks run, the order they start in, how they are wired (memory channels and the
shared ``RuntimeState``), and the shutdown sequence. Theory of operation:

    start:     services (status, notify)  →  data plane (address, announcer, proxy)
               →  election (last, so every consumer is listening before the first event)
    shutdown:  (SIGTERM/SIGINT, or a task failed)
               1. mark stopping (/readyz fails, STOPPING=1)
               2. the announcer stops, the address task removes the VIP in its shielded
                  cleanup
               3. once the address task confirmed the VIP gone (``vip_released``), the election
                  releases the lease; if it could not confirm, the lease is left to expire
               4. the proxy stops accepting (it served the VIP until the hand-over) and drains
               5. services stop; exit 0, or 1 if a task failed or the deadline passed
    A second signal during shutdown forces exit at once (exit 1); the kernel address
    lifetime still removes the VIP (see docs/announce.md).

This is the only module that imports every other; the CLI is the only one that imports it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from vipd import log
from vipd.config import Config
from vipd.errors import ConfigError, leaves
from vipd.events import Fanout, ReleaseGate
from vipd.state import RuntimeState, VipState

# A task: async fn(*, task_status) already bound to its dependencies.
Task = Callable[..., Awaitable[Any]]


@dataclass
class Wiring:
    """Channels and shared state handed to the task factories."""

    cfg: Config
    state: RuntimeState
    leadership: Fanout = field(default_factory=Fanout)  # election → address, status
    vip_changes: Fanout = field(default_factory=Fanout)  # address → announcer
    # address task at stop → election: set = VIP confirmed removed, release; withheld = let it expire
    vip_released: ReleaseGate = field(default_factory=ReleaseGate)


@dataclass
class Plan:
    """What the supervisor runs, as (name, task) pairs in start order per group."""

    services: list[tuple[str, Task]]
    vip: list[tuple[str, Task]]  # address + announcer: cancelled first on shutdown
    proxy: list[tuple[str, Task]]
    election: tuple[str, Task]


class ShutdownTimeout(Exception):
    pass


def default_plan(w: Wiring) -> Plan:
    """The production wiring. Imports adapters lazily so `vipd config check` stays light."""
    from vipd.announce import run_announcer
    from vipd.election import build_backend, run_election
    from vipd.netlink import run_address_task
    from vipd.notify import run_notify
    from vipd.proxy.server import run_proxy
    from vipd.status import run_status

    cfg, state = w.cfg, w.state
    # Subscribe now, before anything starts, so no task misses the first messages of another
    # (the address task sends a "standby" VipChange at start so the announcer can prepare).
    notify_rx = w.leadership.subscribe()
    address_rx = w.leadership.subscribe()
    announce_rx = w.vip_changes.subscribe() if cfg.announce.enabled else None
    services: list[tuple[str, Task]] = [("notify", lambda **kw: run_notify(cfg, state, notify_rx, **kw))]
    if cfg.status.listen:
        services.insert(0, ("status", lambda **kw: run_status(cfg, state, **kw)))
    vip: list[tuple[str, Task]] = [
        ("address", lambda **kw: run_address_task(cfg, state, address_rx, w.vip_changes, w.vip_released, **kw)),
    ]
    if announce_rx is not None:
        vip.append(("announce", lambda **kw: run_announcer(cfg, state, announce_rx, **kw)))
    proxy: list[tuple[str, Task]] = []
    if cfg.proxy.enabled:
        proxy.append(("proxy", lambda **kw: run_proxy(cfg, state, **kw)))
    backend = build_backend(cfg)
    election = ("election", lambda **kw: run_election(cfg, backend, w.leadership, state, w.vip_released, **kw))
    return Plan(services=services, vip=vip, proxy=proxy, election=election)


async def _group(
    name: str, tasks: list[tuple[str, Task]], state: RuntimeState, done: trio.Event | None = None,
    *, task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run tasks in one nursery, started in order; report the group's cancel scope."""
    logger = log.get("app")
    try:
        async with trio.open_nursery() as nursery:
            for task_name, task in tasks:
                await nursery.start(_named(task_name, task, state))
                logger.debug("task.started", task=task_name)
            task_status.started(nursery.cancel_scope)
    finally:
        if done is not None:
            done.set()


def _named(name: str, task: Task, state: RuntimeState) -> Task:
    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        class _Status:
            def started(self, value: Any = None) -> None:
                state.ready.add(name)
                task_status.started(value)

        try:
            await task(task_status=_Status())
        finally:
            state.ready.discard(name)

    return run


async def supervise(
    cfg: Config,
    state: RuntimeState,
    plan_factory: Callable[[Wiring], Plan] = default_plan,
    *,
    stop: trio.Event | None = None,
    handle_signals: bool = True,
    hard_exit: Callable[[int], None] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run until ``stop`` is set or SIGTERM/SIGINT; return the exit code.

    ``hard_exit(code)`` is called when the shutdown deadline passes or a second signal
    arrives while some cleanup is still running (a shielded cleanup cannot be abandoned
    from inside trio); production passes ``os._exit``.
    """
    logger = log.get("app")
    stop = trio.Event() if stop is None else stop
    forced = trio.Event()
    wiring = Wiring(cfg=cfg, state=state)
    state.vips = [VipState(address=str(v), interface=cfg.vip.interface) for v in cfg.vip.addresses]
    failure: list[BaseException] = []
    exit_code = 0

    async def watch_signals(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if not stop.is_set():
                    logger.info("signal.received", signal=signal.Signals(signum).name)
                    stop.set()
                else:
                    logger.warning("shutdown.forced", signal=signal.Signals(signum).name)
                    forced.set()

    async def tick() -> None:
        while True:
            state.last_tick = trio.current_time()
            await trio.sleep(0.5)

    def record(exc: BaseException, group: str) -> None:
        failure.append(exc)
        if isinstance(exc, ConfigError):
            for problem in exc.problems:
                logger.error("config.invalid", group=group, problem=problem)
        else:
            logger.error("task.failed", group=group, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    async def guarded(group: str, tasks: list[tuple[str, Task]], done: trio.Event | None = None,
                      *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await _group(group, tasks, state, done, task_status=task_status)
        except* Exception as eg:  # a task failed: record it and start the shutdown
            for exc in leaves(eg):
                record(exc, group)
            stop.set()
            if done is not None:
                done.set()

    async with trio.open_nursery() as outer:
        if handle_signals:
            await outer.start(watch_signals)
        outer.start_soon(tick)
        services_done, vip_done, proxy_done, election_done = (trio.Event() for _ in range(4))

        async def vip_group(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await guarded("vip", plan.vip, vip_done, task_status=task_status)
            finally:
                # The address task gives its word in its own cleanup; if it never did (it never
                # ran, or a plan without it), nothing confirmed the VIP gone: no release.
                wiring.vip_released.withhold("vip tasks ended without confirming the VIP removed")

        scopes: dict[str, trio.CancelScope] = {}
        try:
            # Building the plan is part of the guarded start-up: a backend that cannot be built
            # (e.g. an etcd CA file that does not exist) is a logged config.invalid and exit 2,
            # never a traceback.
            plan = plan_factory(wiring)
            state.expected = {n for n, _ in plan.services + plan.vip + plan.proxy} | {plan.election[0]}
            scopes["services"] = await outer.start(guarded, "services", plan.services, services_done)
            scopes["vip"] = await outer.start(vip_group)
            scopes["proxy"] = await outer.start(guarded, "proxy", plan.proxy, proxy_done)
            scopes["election"] = await outer.start(guarded, "election", [plan.election], election_done)
        except Exception as exc:
            if not failure:  # a group that failed before it started has recorded why already
                record(exc, "startup")
            stop.set()
        else:
            logger.info("started", tasks=sorted(state.ready), vips=[v.address for v in state.vips],
                        election=cfg.election.backend)
            task_status.started()

        await stop.wait()
        state.stopping = True
        reason = ("startup failed" if "election" not in scopes else "task failed") if failure else "signal"
        logger.info("shutdown.started", reason=reason)
        with trio.move_on_after(cfg.shutdown_timeout) as deadline:

            async def forced_exit() -> None:
                await forced.wait()
                deadline.cancel()

            async with trio.open_nursery() as sd:
                sd.start_soon(forced_exit)
                # The VIP goes first, then the lease is handed over. The proxy keeps accepting
                # until then: a client that still reaches this node through the VIP is served
                # instead of refused, so the hand-over costs clients only the VIP's move. Then
                # it stops accepting and drains.
                if "vip" in scopes:
                    scopes["vip"].cancel()
                    await vip_done.wait()
                if "election" in scopes:
                    scopes["election"].cancel()
                    await election_done.wait()
                if "proxy" in scopes:
                    scopes["proxy"].cancel()
                    await proxy_done.wait()
                if "services" in scopes:
                    scopes["services"].cancel()
                    await services_done.wait()
                sd.cancel_scope.cancel()
        if deadline.cancelled_caught:
            exit_code = 1
            if forced.is_set():
                logger.error("shutdown.forced_exit")
            else:
                logger.error("shutdown.deadline_exceeded", timeout=cfg.shutdown_timeout)
            if hard_exit is not None:
                hard_exit(exit_code)
        outer.cancel_scope.cancel()

    if failure:
        # A configuration problem only found at start (e.g. a missing interface) is bad input: 2.
        exit_code = 2 if all(isinstance(f, ConfigError) for f in failure) else 1
    logger.info("shutdown.completed", exit_code=exit_code)
    return exit_code


def run(cfg: Config) -> int:
    """Blocking entry for ``vipd start``: one trio.run (with trio-asyncio for the kube client)."""
    import trio_asyncio

    state = RuntimeState(node=cfg.node)

    def hard_exit(code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    async def main() -> int:
        async with trio_asyncio.open_loop():
            return await supervise(cfg, state, hard_exit=hard_exit)

    return trio.run(main)
