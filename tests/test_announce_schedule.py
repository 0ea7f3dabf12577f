"""The announcement schedule: pure table tests, and the announcer task under MockClock with a
recording fake sender (tests/wire_fixtures.py): timeline, errors, stop acknowledgement, reopening
on a recreated interface."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.wire_fixtures import FakeSender
from vipd.announce import AnnounceSchedule, run_announcer
from vipd.config import load
from vipd.events import VipChange
from vipd.state import RuntimeState


def _drain(schedule: AnnounceSchedule, until: float) -> list[tuple[float, str]]:
    out = []
    while schedule.next_due is not None and schedule.next_due <= until:
        assert len(out) < 10_000, "the schedule does not move forward"
        now = schedule.next_due
        out.append((round(now, 6), schedule.pop_due(now)))
    return out


def test_burst_repeats_then_refresh():
    s = AnnounceSchedule(refresh=3.0)
    assert s.next_due is None and s.pop_due(0.0) is None
    s.start(100.0)
    assert _drain(s, 114.0) == [
        (100.0, "burst"), (101.1, "repeat"), (102.2, "repeat"), (103.3, "repeat"), (104.4, "repeat"),
        (107.4, "refresh"), (110.4, "refresh"), (113.4, "refresh"),
    ]


def test_refresh_zero_disables_periodic():
    s = AnnounceSchedule(refresh=0.0)
    s.start(0.0)
    assert [k for _t, k in _drain(s, 1000.0)] == ["burst"] + ["repeat"] * 4
    assert s.next_due is None


def test_not_due_yet_and_stop():
    s = AnnounceSchedule(refresh=3.0)
    s.start(10.0)
    assert s.pop_due(10.0) == "burst"
    assert s.pop_due(11.0) is None  # repeat is at 11.1
    s.stop()
    assert s.next_due is None and s.pop_due(50.0) is None and not s.active


def test_late_loop_skips_backlog():
    s = AnnounceSchedule(refresh=3.0)
    s.start(0.0)
    assert s.pop_due(0.0) == "burst"
    assert s.pop_due(3.5) == "repeat"  # 1.1 and 2.2 and 3.3 missed: one round, next is 4.4
    assert s.next_due == pytest.approx(4.4)
    assert s.pop_due(20.0) == "repeat"
    assert s.next_due == pytest.approx(22.4)  # next refresh slot after now, on the 4.4 + k*3 grid


def test_refresh_always_moves_forward():
    # 0.7 / 0.1 == 6.999...: the next slot must still be after now, never "due again now"
    s = AnnounceSchedule(refresh=0.1)
    s.start(0.0)
    times = [t for t, _k in _drain(s, 10.0)]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert len(times) == 5 + 56  # burst + 4 repeats, then 4.5, 4.6, ... 10.0 (rounded)


def test_restart_begins_a_new_burst():
    s = AnnounceSchedule(refresh=3.0)
    s.start(0.0)
    _drain(s, 8.0)
    s.start(9.0)
    assert _drain(s, 10.5) == [(9.0, "burst"), (10.1, "repeat")]


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_announcer_task_timeline(mock_clock):
    cfg = load(environ={}, flags={"vip.address": ["10.0.0.50", "fd00::50"], "announce.refresh": "2s",
                                  "election.backend": "none", "proxy.enabled": False})
    state = RuntimeState(node="n1")
    sent: list = []
    senders: list[FakeSender] = []

    def open_sender(ifname: str) -> FakeSender:
        senders.append(FakeSender(ifname, sent))
        return senders[-1]

    send, recv = trio.open_memory_channel(4)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_announcer(cfg, state, recv, open_sender=open_sender, **kw))
            t0 = trio.current_time()
            await send.send(VipChange(True, "eth0", "acquired"))
            await trio.sleep(8.0)
            await send.send(VipChange(False, "eth0", "lost"))
            await trio.lowlevel.checkpoint()
            stopped_at = trio.current_time()
            await trio.sleep(10.0)
            await send.aclose()
    rounds = sorted({round(t - t0, 6) for t, _i, _f in sent})
    # burst at once, 1.1 s repeats to 4.4 s, then every 2 s; nothing after the loss
    assert rounds == [0.0, 1.1, 2.2, 3.3, 4.4, 6.4]
    assert all(t <= stopped_at for t, _i, _f in sent)
    assert len(sent) == 6 * 3  # request + reply + NA per round
    assert state.announce.sent == 18 and state.announce.errors == 0
    assert senders[0].closed


async def test_announcer_counts_errors_and_restarts_on_restore(mock_clock):
    cfg = load(environ={}, flags={"vip.address": ["10.0.0.50"], "announce.refresh": "0",
                                  "election.backend": "none", "proxy.enabled": False})
    state = RuntimeState(node="n1")

    send, recv = trio.open_memory_channel(4)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_announcer(
                cfg, state, recv, open_sender=lambda i: FakeSender(i, [], fail=OSError(100, "Network is down")),
                **kw))
            await send.send(VipChange(True, "eth0", "acquired"))
            await trio.sleep(2.0)
            await send.send(VipChange(True, "eth0", "restored"))  # restart: a new burst at once
            await trio.sleep(10.0)
            await send.aclose()
    assert state.announce.sent == 0
    # first burst + repeat at 1.1, then restart at 2.0: burst + 4 repeats; 2 frames each
    assert state.announce.errors == 2 * (2 + 5)


def _cfg(refresh: str):
    return load(environ={}, flags={"vip.address": ["10.0.0.50"], "announce.refresh": refresh,
                                  "election.backend": "none", "proxy.enabled": False})


async def test_stop_is_acknowledged_and_nothing_is_sent_after(mock_clock):
    state, sent = RuntimeState(node="n1"), []
    send, recv = trio.open_memory_channel(4)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_announcer(
                _cfg("0.1s"), state, recv, open_sender=lambda i: FakeSender(i, sent), **kw))
            await send.send(VipChange(True, "eth0", "acquired", 2))
            await trio.sleep(6.0)  # refresh rounds every 0.1 s by now
            stopped = trio.Event()
            await send.send(VipChange(False, "eth0", "lost", 2, stopped))
            await stopped.wait()
            acked_at, count = trio.current_time(), len(sent)
            await trio.sleep(5.0)
            # a stop queued when the task is cancelled is acknowledged on the way out
            late = trio.Event()
            # Both queued before the announcer can run (send() is a checkpoint: the task could
            # take the start and send a round before the stop is even queued).
            send.send_nowait(VipChange(True, "eth0", "acquired", 2))
            send.send_nowait(VipChange(False, "eth0", "lost", 2, late))
            nursery.cancel_scope.cancel()
    assert count > 20 and all(t <= acked_at for t, _i, _f in sent[:count])
    assert len(sent) == count  # the queued start was never acted on: the stop behind it won
    assert late.is_set()


async def test_reopens_when_the_interface_is_recreated(mock_clock):
    state, sent, senders = RuntimeState(node="n1"), [], []
    macs = {2: bytes.fromhex("02000000000a"), 7: bytes.fromhex("02000000000b")}
    current = {"ifindex": 2}

    def open_sender(ifname: str) -> FakeSender:
        index = current["ifindex"]
        senders.append(FakeSender(ifname, sent, mac=macs[index], ifindex=index))
        return senders[-1]

    send, recv = trio.open_memory_channel(4)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: run_announcer(_cfg("1s"), state, recv, open_sender=open_sender,
                                                           **kw))
            await send.send(VipChange(False, "eth0", "standby", 2))
            await send.send(VipChange(True, "eth0", "acquired", 2))
            await trio.sleep(0.5)
            # same name, new ifindex (deleted and re-added): a new socket, frames with the new MAC
            current["ifindex"] = 7
            await send.send(VipChange(True, "eth0", "restored", 7))
            await trio.sleep(0.5)
            # the interface is recreated again, but this time the sends find out first (ENXIO)
            senders[-1].fail = OSError(6, "No such device or address")
            current["ifindex"] = 2
            await trio.sleep(2.0)
            await send.aclose()
    assert [s.ifindex for s in senders] == [2, 7, 2]
    assert senders[0].closed and senders[1].closed
    first_mac = {f[6:12] for _t, _i, f in sent[:2]}
    second_mac = {f[6:12] for _t, _i, f in sent[2:4]}
    assert first_mac == {macs[2]} and second_mac == {macs[7]}
    assert sent[-1][2][6:12] == macs[2]  # after the send error: reopened, the current MAC again
    assert state.announce.errors == 1  # one failed frame, then the round stopped and reopened
