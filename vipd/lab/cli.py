"""``vipd lab up|down|status|demo``: the lab from the command line (root only).

Owns: the sub-command flags and turning lab outcomes into exit codes (0 when every step
behaved, 1 when a step failed or the lab could not be built, 2 on bad arguments via the
parser). ``up`` leaves a lab running and recorded; ``down`` removes recorded labs (also one
whose owner was killed); ``status`` shows them; ``demo`` runs the story and always cleans up.

Must never: contain lab logic (that lives in ``vipd.lab.lab``, ``faults`` and ``story``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vipd.lab.nsutil import LabError


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from vipd.lab.daemons import missing_vipd_pieces
    from vipd.lab.lab import Lab

    if args.daemon == "vipd" and (missing := missing_vipd_pieces()):
        _say("vipd lab: note: this build lacks " + ", ".join(missing))
    lab = Lab(kind=args.daemon, progress=_say)
    try:
        lab.up()
        if lab.fleet:
            holder = lab.wait_single_holder(lab.bounds().first_leader)
            _say(f"VIP {lab.vip} held by: {holder or 'nobody yet'}")
        if lab.sampler:
            lab.sampler.stop()
            lab.sampler = None
    except BaseException:
        lab.down()
        raise
    _say(f"lab {lab.prefix} is up; directory {lab.dir}")
    for what, path in lab.logs().items():
        _say(f"  log {what}: {path}")
    _say(f"  try: ip netns exec {lab.net.ns('cl')} curl -sk https://{lab.vip}:6444/readyz")
    _say(f"  remove it with: vipd lab down --prefix {lab.prefix}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from vipd.lab.lab import recorded_labs, teardown_recorded

    labs = [s for s in recorded_labs() if not args.prefix or s.get("prefix") == args.prefix]
    if not labs:
        _say("vipd lab: no lab recorded" + (f" as {args.prefix}" if args.prefix else ""))
        return 0
    left = teardown_recorded(args.prefix)
    for s in labs:
        _say(f"removed lab {s['prefix']}")
    if left:
        print("vipd lab: could not remove: " + ", ".join(left), file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vipd.lab.lab import recorded_labs
    from vipd.lab.nsutil import namespaces
    from vipd.lab.watch import holders_now

    labs = recorded_labs()
    if not labs:
        _say("no lab recorded")
        return 0
    present = set(namespaces())
    for s in labs:
        nss = s.get("namespaces", [])
        alive = [p for p in s.get("pids", []) if Path(f"/proc/{p}").exists()]
        _say(f"lab {s['prefix']} ({s.get('kind')}), directory {s.get('dir')}, "
             f"owner pid {s.get('owner')}")
        _say(f"  namespaces: {sum(ns in present for ns in nss)}/{len(nss)} present; "
             f"processes alive: {len(alive)}/{len(s.get('pids', []))}")
        nodes = {n: ns for n, ns in s.get("nodes", {}).items() if ns in present}
        if nodes:
            holders = holders_now(nodes, s.get("vip", "10.251.72.100"))
            _say(f"  VIP {s.get('vip')} held by: {', '.join(holders) or 'nobody'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vipd.lab.story import run_demo

    return run_demo(_say, kind=args.daemon, keep_logs=Path(args.keep_logs) if args.keep_logs else None)


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        import os

        if os.geteuid() != 0:
            print("vipd lab: needs root (network namespaces)", file=sys.stderr)
            return 1
        try:
            return func(args)
        except LabError as exc:
            print(f"vipd lab: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the lab cleaned up on the way out (Lab.down)
            print("vipd lab: interrupted; the lab was removed", file=sys.stderr)
            return 130

    return run


def register_cli(subparsers, config_args=None) -> None:
    p = subparsers.add_parser("lab", help="three-node network-namespace lab (root): up, down, status, demo")
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=type(p))
    sub.required = True
    q = sub.add_parser("up", help="build a lab and leave it running")
    q.add_argument("--daemon", choices=("vipd", "keepalived", "none"), default="vipd",
                   help="what runs on the nodes (default vipd)")
    q.set_defaults(func=_guard(cmd_up))
    q = sub.add_parser("down", help="remove recorded labs (all, or --prefix)")
    q.add_argument("--prefix", help="only this lab (e.g. vl3f2a)")
    q.set_defaults(func=_guard(cmd_down))
    q = sub.add_parser("status", help="show recorded labs and who holds the VIP")
    q.set_defaults(func=_guard(cmd_status))
    q = sub.add_parser("demo", help="the failover story: SIGKILL and SIGTERM of the leader, measured")
    q.add_argument("--keep-logs", metavar="DIR",
                   help="copy the lab's logs here before clean-up (a run that fails keeps them anyway, "
                        "under $VIPD_LAB_LOGS or /var/tmp/vipd-lab-logs)")
    q.add_argument("--daemon", choices=("vipd", "keepalived"), default="vipd",
                   help="tell the story with vipd (default) or keepalived for comparison")
    q.set_defaults(func=_guard(cmd_demo))
