"""vipd's error types. Adapters translate library errors into these once, at the boundary.

This module imports nothing of vipd so that every other module may import it.
"""

from __future__ import annotations


class VipdError(Exception):
    """Base of every error vipd raises on purpose."""


class ConfigError(VipdError):
    """The configuration is invalid. Carries every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = [_one_line(p) for p in problems]
        super().__init__("\n".join(self.problems))


def _one_line(text: str) -> str:
    """Escape control and line-separator characters so each problem stays one line."""
    import unicodedata

    return "".join(
        repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text
    )


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class NetlinkError(VipdError):
    """A netlink operation (address add/remove, link lookup) failed; ``errno`` when known."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class ElectionBackendError(VipdError):
    """The lease backend could not be reached or answered with an error."""


class ProxyError(VipdError):
    """The load balancer could not start or serve."""
