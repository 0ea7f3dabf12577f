"""Leader election: picks the backend and runs the election task.

Owns: ``build_backend(cfg)`` (kubernetes | etcd | none) and ``run_election`` (the task that
drives the sans-IO machine with a backend and publishes ``Leadership`` events).
"""

from __future__ import annotations

from vipd.election.runner import build_backend, run_election

__all__ = ["build_backend", "run_election"]
