"""Test driver: runs vipd's address task and announcer in *this* process's network namespace.

Started by tests/netns_fixtures.py as ``ip netns exec NS python tests/wire_driver.py ...``, so
every socket (rtnetlink, AF_PACKET) and every pyroute2 call lives in the node namespace exactly
as under ``vipd start`` (and, like it, inside ``trio_asyncio.open_loop()``). The test plays the
election: one JSON object per stdin line, times relative to when the line is read:

    {"leader": true, "term": 1, "safe_in": 3.0, "fence_in": 4.0}
    {"leader": false, "term": 2}

EOF on stdin stops the tasks (the shielded cleanup removes the VIP) and exits 0. Logs are JSON
lines on stdout (debug level), which the tests read for ``address.started`` and friends; each
Leadership message is logged as ``driver.leadership`` with ``t``, the wall-clock time (s, float)
just before it is handed to the address task, and the stop as ``driver.stopped`` with the
release gate's verdict (``released``).

Must never: be imported by vipd; it is a fake election, named as one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import trio
import trio_asyncio

from vipd import log
from vipd.announce import run_announcer
from vipd.config import load
from vipd.events import Fanout, Leadership, ReleaseGate
from vipd.netlink import open_event_socket, run_address_task
from vipd.state import RuntimeState


async def _lines(fd: int):
    stream = trio.lowlevel.FdStream(os.dup(fd))
    buf = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line


async def main(args: argparse.Namespace) -> int:
    flags = {"vip.address": args.address, "vip.interface": args.interface,
             "announce.refresh": args.refresh, "election.backend": "none", "proxy.enabled": False,
             "node": args.node}
    cfg = load(environ={}, flags=flags)
    state = RuntimeState(node=cfg.node)
    logger = log.get("driver")
    leadership, vip_changes, gate = Fanout(), Fanout(), ReleaseGate()
    rcvbuf = args.event_rcvbuf

    def open_events():
        return open_event_socket(rcvbuf) if rcvbuf else open_event_socket()

    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            announcer_rx = vip_changes.subscribe()  # before the address task names the interface
            await nursery.start(lambda **kw: run_address_task(cfg, state, leadership.subscribe(),
                                                              vip_changes, gate, open_events=open_events,
                                                              **kw))
            await nursery.start(lambda **kw: run_announcer(cfg, state, announcer_rx, **kw))
            logger.info("driver.ready")
            async for line in _lines(0):
                msg = json.loads(line)
                now = trio.current_time()
                ev = Leadership(
                    leader=msg["leader"], holder=cfg.node if msg["leader"] else msg.get("holder"),
                    term=msg["term"],
                    safe_until=now + msg["safe_in"] if msg.get("safe_in") is not None else None,
                    fence_until=now + msg["fence_in"] if msg.get("fence_in") is not None else None,
                    reason=msg.get("reason", "acquired" if msg["leader"] else "lost"),
                )
                t = time.time()
                await leadership.send(ev)
                logger.debug("driver.leadership", leader=ev.leader, term=ev.term, t=t)
            nursery.cancel_scope.cancel()
    logger.info("driver.stopped", present=[v.present for v in state.vips],
                sent=state.announce.sent, errors=state.announce.errors, released=gate.is_set())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", action="append", required=True)
    parser.add_argument("--interface", default=None)
    parser.add_argument("--refresh", default="3s")
    parser.add_argument("--node", default="driver")
    parser.add_argument("--event-rcvbuf", type=int, default=None)
    log.configure(fmt="json", level="debug", node="driver")
    import pyroute2  # noqa: F401  (importing it resets its logger's level: quiet it afterwards)

    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its per-message debug costs ms
    sys.exit(trio.run(main, parser.parse_args()))
