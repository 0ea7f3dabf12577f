"""Processes the lab starts inside its namespaces: start, signal, wait, stop.

Owns: ``LabProcess`` — one child started with ``ip netns exec NS cmd`` (which execs, so the
child's pid is the program's own), its own session (Ctrl-C in the terminal reaches only the
lab, which then stops the children itself), output to a log file in the lab directory, and
the bounded stop (SIGTERM, then SIGKILL of its whole process group), also of several at once
with one shared grace period (``stop_all``: the lab's clean-up never waits node after node).

Must never: signal a process it did not start (everything goes through the recorded pid or
process group of a child it still owns).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vipd.lab.nsutil import LabError


@dataclass
class LabProcess:
    name: str
    ns: str
    cmd: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> LabProcess:
        if self.running:
            raise LabError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns, *self.cmd], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
                )
            except OSError as exc:
                raise LabError(f"cannot start {self.name}: {exc}") from exc
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int, *, group: bool = False) -> None:
        if not self.running:
            raise LabError(f"{self.name} is not running")
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after ``timeout``."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (and SIGCONT, in case it was stopped); SIGKILL the group after ``grace``."""
        stop_all([self], grace)
        return self.proc.returncode if self.proc else None

    def ask_to_stop(self) -> None:
        if self.running:
            assert self.proc is not None
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)

    def _reap_group(self) -> None:
        """Children left in the process group (keepalived's VRRP child) go too."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(procs: Iterable[LabProcess], grace: float) -> None:
    """Stop several processes together: SIGTERM to all, one shared ``grace``, then SIGKILL."""
    procs = [p for p in procs if p.proc is not None]
    for p in procs:
        p.ask_to_stop()
    deadline = time.monotonic() + grace
    for p in procs:
        if p.wait(max(0.0, deadline - time.monotonic())) is None:
            p.kill()
        p._reap_group()


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
