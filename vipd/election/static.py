"""The ``none`` backend: a single node that always leads (or, for tests, never does).

Owns: a backend that needs no I/O. Must never: pretend to coordinate with other nodes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StaticBackend:
    """Always-leader (single node) or never-leader (tests)."""

    node: str
    leader: bool = True
