"""A DELIBERATELY BROKEN vipd (a fake, named as one): vipd with some of its protection removed.

It exists to prove that the lab's fault suite can fail: run in the lab in place of vipd
(``Lab(vipd=broken_vipd.command(...))``), the scenario that guards a protection must report
two VIP holders once that protection is gone (tests/test_lab_broken.py, docs/lab.md).

    python tests/broken_vipd.py --remove step-down,userspace-fence,kernel-lifetime -- start ...

What each removal does (monkeypatches, then vipd's own CLI ``main`` runs as usual):

- ``step-down``: the lease machine never tells the node it stopped leading when its renew
  deadline passes (it still stops renewing and learns the truth once etcd answers again);
- ``userspace-fence``: the address task never drops the VIP itself when ``safe_until``
  passes without a renew;
- ``kernel-lifetime``: the VIP is added without an address lifetime (permanent), so the
  kernel never removes it from a leader that was killed or frozen.

Never use it anywhere but in a lab a test built.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

REMOVALS = ("step-down", "userspace-fence", "kernel-lifetime")


def command(*removals: str) -> tuple[str, ...]:
    """The lab's ``vipd`` command prefix for a vipd without ``removals``."""
    unknown = set(removals) - set(REMOVALS)
    if unknown or not removals:
        raise ValueError(f"removals: expected some of {REMOVALS}, got {removals}")
    return (sys.executable, str(Path(__file__).resolve()), "--remove", ",".join(removals), "--")


def remove(what: str) -> None:
    if what == "step-down":
        from vipd.election import machine

        def _step_down(self, reason, changes):
            self.role = machine.Role.CANDIDATE
            if reason is not machine.Reason.RENEW_DEADLINE:
                self._publish(machine.Change(False, None, self.held.term if self.held else 0, reason), changes)

        machine.LeaseMachine._step_down = _step_down
    elif what == "userspace-fence":
        from vipd import netlink

        async def _on_deadline(self):
            self.safe_until = None  # forget the deadline; keep the VIP

        netlink.AddressManager.deadline = property(lambda self: math.inf)
        netlink.AddressManager.on_deadline = _on_deadline
    elif what == "kernel-lifetime":
        from vipd import netlink

        netlink.lifetime_for = lambda remaining: netlink.PERMANENT
    else:
        raise SystemExit(f"broken_vipd: --remove: unknown {what!r}; expected some of {', '.join(REMOVALS)}")


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if len(argv) < 3 or argv[0] != "--remove" or "--" not in argv:
        raise SystemExit("usage: broken_vipd.py --remove WHAT[,WHAT] -- VIPD-ARGS")
    for what in argv[1].split(","):
        remove(what)
    from vipd.cli import main as vipd_main

    print(f"broken_vipd: running vipd WITHOUT {argv[1]} (deliberately broken, for tests)",
          file=sys.stderr, flush=True)
    return vipd_main(argv[argv.index("--") + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
