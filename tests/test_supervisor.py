"""Supervisor start order, shutdown order, deadlines and failure exit codes (MockClock)."""

from __future__ import annotations

import io
import json
import os
import signal
from typing import Any

import pytest
import trio
import trio.testing

from vipd import app, config, log
from vipd.errors import ConfigError
from vipd.events import Leadership
from vipd.state import RuntimeState


def make_cfg(**flags: Any) -> config.Config:
    base = {"vip.address": ["10.0.0.5"], "election.backend": "none", "proxy.enabled": False}
    base.update(flags)
    return config.load(environ={}, flags=base)


class Recorder:
    """Fake tasks that log what happens to them, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def task(self, name: str, *, cleanup: float = 0.0, fail: BaseException | None = None,
             fail_before_start: bool = False) -> app.Task:
        async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            if fail is not None and fail_before_start:
                raise fail
            self.events.append(f"start {name}")
            task_status.started()
            try:
                if fail is not None:
                    await trio.sleep(1)
                    raise fail
                await trio.sleep_forever()
            finally:
                self.events.append(f"cancel {name}")
                with trio.CancelScope(shield=True):
                    if cleanup:
                        await trio.sleep(cleanup)
                    self.events.append(f"stop {name}")

        return run


def plan_of(rec: Recorder, **overrides: app.Task) -> Any:
    def factory(w: app.Wiring) -> app.Plan:
        async def election(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            rec.events.append("start election")
            task_status.started()
            await w.leadership.send(Leadership(True, "n1", 1, reason="acquired"))
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await w.vip_released.wait()
                    rec.events.append("release lease")

        tasks = {
            "status": rec.task("status"),
            "address": rec.task("address", cleanup=0.2),
            "announce": rec.task("announce"),
            "proxy": rec.task("proxy", cleanup=1.0),
            "election": election,
        }
        tasks.update(overrides)
        return app.Plan(
            services=[("status", tasks["status"])],
            vip=[("address", tasks["address"]), ("announce", tasks["announce"])],
            proxy=[("proxy", tasks["proxy"])],
            election=("election", tasks["election"]),
        )

    return factory


async def run_until(cfg: config.Config, factory: Any, stop_after: float | None,
                    hard_exit: Any = None) -> tuple[int, RuntimeState]:
    state = RuntimeState(node=cfg.node)
    stop = trio.Event()
    result: list[int] = []
    async with trio.open_nursery() as nursery:
        async def go() -> None:
            result.append(await app.supervise(cfg, state, factory, stop=stop, handle_signals=False,
                                              hard_exit=hard_exit))

        nursery.start_soon(go)
        if stop_after is not None:
            await trio.sleep(stop_after)
            assert state.is_ready, (state.ready, state.expected)
            stop.set()
    return result[0], state


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_start_order_and_shutdown_order(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    code, state = await run_until(make_cfg(), plan_of(rec), stop_after=5)
    assert code == 0
    starts = [e for e in rec.events if e.startswith("start")]
    assert starts == ["start status", "start address", "start announce", "start proxy", "start election"]
    # The VIP is off the interface before the lease is released; services stop last.
    assert rec.events.index("stop address") < rec.events.index("release lease")
    assert rec.events.index("release lease") < rec.events.index("stop status")
    assert rec.events[-1] == "stop status"
    assert state.ready == set()


async def test_proxy_serves_until_the_handover_then_drains(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    await run_until(make_cfg(), plan_of(rec), stop_after=5)
    # The proxy keeps accepting while the VIP is removed and the lease handed over (a client
    # still reaching this node through the VIP is served, not refused), then stops and drains;
    # its 1 s drain never delays the release.
    assert rec.events.index("stop address") < rec.events.index("release lease") < rec.events.index("cancel proxy")
    assert rec.events.index("cancel proxy") < rec.events.index("stop proxy") < rec.events.index("cancel status")


async def test_shutdown_deadline_exceeded_exits_1(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    cfg = make_cfg(shutdown_timeout="3s", **{"proxy.drain_timeout": "1s"})
    start = trio.current_time()
    exits: list[tuple[int, float]] = []
    code, _ = await run_until(cfg, plan_of(rec, address=rec.task("address", cleanup=60)), stop_after=1,
                              hard_exit=lambda c: exits.append((c, trio.current_time() - start)))
    assert code == 1
    # The process is told to exit hard at the deadline, not after the 60 s cleanup.
    assert exits == [(1, pytest.approx(1 + 3))]


async def test_task_failure_stops_everything_and_exits_1(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    code, _ = await run_until(make_cfg(), plan_of(rec, proxy=rec.task("proxy", fail=OSError("boom"))),
                              stop_after=None)
    assert code == 1
    assert "stop address" in rec.events and "release lease" in rec.events
    assert rec.events.index("stop address") < rec.events.index("release lease")


async def test_config_error_at_start_exits_2(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    bad = rec.task("address", fail=ConfigError(["vip.interface (flag --interface): 'eth9' does not exist"]),
                   fail_before_start=True)
    code, _ = await run_until(make_cfg(), plan_of(rec, address=bad), stop_after=None)
    assert code == 2
    assert "start election" not in rec.events  # nothing after the failed group started


async def test_readiness_follows_tasks(mock_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    cfg = make_cfg()
    state = RuntimeState(node=cfg.node)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        assert not state.is_ready
        await nursery.start(lambda task_status: app.supervise(cfg, state, plan_of(rec), stop=stop,
                                                               handle_signals=False, task_status=task_status))
        assert state.is_ready
        assert state.last_tick > 0 or trio.current_time() == 0
        stop.set()
    assert not state.is_ready and state.stopping


# -- plan building is part of the guarded start-up ---------------------------------------------

async def test_plan_that_cannot_be_built_exits_2_with_config_invalid(mock_clock: trio.testing.MockClock) -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="n1", stream=buf)

    def factory(w: app.Wiring) -> app.Plan:
        raise ConfigError(["election.etcd.ca (flag --etcd-ca): '/nonexistent.pem' cannot be read"])

    code, state = await run_until(make_cfg(), factory, stop_after=None)
    assert code == 2
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    invalid = [r for r in records if r["event"] == "config.invalid"]
    assert [r["problem"] for r in invalid] == ["election.etcd.ca (flag --etcd-ca): '/nonexistent.pem' cannot be read"]
    assert [r["exit_code"] for r in records if r["event"] == "shutdown.completed"] == [2]
    assert not state.ready


async def test_plan_that_crashes_exits_1_with_task_failed(mock_clock: trio.testing.MockClock) -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="n1", stream=buf)

    def factory(w: app.Wiring) -> app.Plan:
        raise OSError("no such device")

    code, _ = await run_until(make_cfg(), factory, stop_after=None)
    assert code == 1
    failed = [json.loads(line) for line in buf.getvalue().splitlines() if '"task.failed"' in line]
    assert len(failed) == 1 and failed[0]["error"] == "OSError: no such device"


# -- signals: real SIGTERM/SIGINT delivered to this process ------------------------------------

async def _start_with_signals(cfg: config.Config, factory: Any, nursery: trio.Nursery,
                              hard_exit: Any = None) -> tuple[list[int], RuntimeState]:
    """Start supervise() with its signal handling on; returns (exit code box, state) once started."""
    state = RuntimeState(node=cfg.node)
    result: list[int] = []

    async def go(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await app.supervise(cfg, state, factory, handle_signals=True, hard_exit=hard_exit,
                                          task_status=task_status))

    await nursery.start(go)  # the signal receiver is installed before supervise reports started
    return result, state


def _events(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_starts_graceful_shutdown_exit_0(mock_clock: trio.testing.MockClock,
                                                      signum: signal.Signals) -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="n1", stream=buf)
    rec = Recorder()
    exits: list[int] = []
    with trio.fail_after(60):  # mock time: a signal that is not handled fails instead of hanging
        async with trio.open_nursery() as nursery:
            result, state = await _start_with_signals(make_cfg(), plan_of(rec), nursery, hard_exit=exits.append)
            assert state.is_ready
            os.kill(os.getpid(), signum)
    assert result == [0] and exits == []
    # The same orderly stop as a stop request: VIP off before the lease is released, services last.
    assert rec.events.index("stop address") < rec.events.index("release lease") < rec.events.index("stop status")
    events = _events(buf)
    received = [e for e in events if e["event"] == "signal.received"]
    assert [e["signal"] for e in received] == [signum.name]
    assert [e["reason"] for e in events if e["event"] == "shutdown.started"] == ["signal"]
    assert not any(e["event"] in ("shutdown.forced", "shutdown.forced_exit") for e in events)


async def test_second_signal_forces_exit(mock_clock: trio.testing.MockClock) -> None:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", node="n1", stream=buf)
    rec = Recorder()
    cfg = make_cfg(shutdown_timeout="100s")
    exits: list[tuple[int, float]] = []
    with trio.fail_after(300):  # mock time: the 60 s cleanup still ends; a lost signal fails
        async with trio.open_nursery() as nursery:
            # The address task's cleanup hangs for 60 s (a stuck netlink call, say).
            result, _ = await _start_with_signals(
                cfg, plan_of(rec, address=rec.task("address", cleanup=60)), nursery,
                hard_exit=lambda code: exits.append((code, trio.current_time() - t_first)))
            t_first = trio.current_time()
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(2)  # shutdown is under way, stuck in the address cleanup
            assert exits == [] and "stop address" not in rec.events
            os.kill(os.getpid(), signal.SIGINT)
    # The second signal ends it at once (2 s after the first), not at the 100 s deadline.
    assert exits == [(1, pytest.approx(2))]
    assert result == [1]
    events = [e["event"] for e in _events(buf)]
    assert events.count("signal.received") == 1
    assert "shutdown.forced" in events and "shutdown.forced_exit" in events
    assert "shutdown.deadline_exceeded" not in events
