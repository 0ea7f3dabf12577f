"""Command line: sub-commands, their flags, and exit codes.

Owns: argv parsing and turning outcomes into exit codes (0 ok, 1 runtime failure,
2 bad input). Config problems are printed one per line on stderr, never as a traceback.
Other modules add sub-commands through ``COMMANDS`` (module, register-function) without
touching the rest of this file.

Must never: contain daemon logic; it loads config and hands over to ``vipd.app``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from vipd import __version__
from vipd import config as config_mod
from vipd.errors import ConfigError, VipdError, leaves

# Sub-commands defined in other modules: (module, function(subparsers) -> None).
COMMANDS: list[tuple[str, str]] = [
    ("vipd.manifest", "register_cli"),
    ("vipd.statuscmd", "register_cli"),
    ("vipd.lab.cli", "register_cli"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (argparse's own code) without usage noise."""

    def error(self, message: str) -> Any:  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def print_problems(problems: Sequence[str]) -> None:
    for line in problems:
        print(f"vipd: error: {line}", file=sys.stderr)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    config_mod.add_flags(p)


def cmd_start(args: argparse.Namespace) -> int:
    from vipd import app, log

    cfg = config_mod.load_args(args)
    log.configure(fmt=cfg.log.format, level=cfg.log.level, node=cfg.node)
    logger = log.get("app")
    code = 1
    # The supervisor reports what fails inside it; this catches what escapes it, bare or (through
    # trio-asyncio's loop nursery) in an exception group: bad input is exit 2, the rest exit 1.
    try:
        code = app.run(cfg)
    except* ConfigError as group:
        for exc in leaves(group):
            for problem in getattr(exc, "problems", [str(exc)]):
                logger.error("config.invalid", problem=problem)
        code = 2
    except* VipdError as group:
        for exc in leaves(group):
            logger.error("startup.failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    return code


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config_mod.load_args(args)
    print(f"configuration is valid: node {cfg.node}, {len(cfg.vip.addresses)} VIP(s), "
          f"election {cfg.election.backend}, proxy {'on' if cfg.proxy.enabled else 'off'}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    cfg = config_mod.load_args(args, warnings=warnings)
    sys.stdout.write(config_mod.render_show(cfg))
    for line in warnings:
        print(f"vipd: warning: {line} (vipd config check rejects this)", file=sys.stderr)
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"vipd {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vipd", description="Virtual IP and load balancer for Kubernetes control planes.")
    parser.add_argument("--version", action="version", version=f"vipd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("start", help="run the daemon")
    _config_args(p)
    p.set_defaults(func=cmd_start)

    pc = sub.add_parser("config", help="check or show the effective configuration")
    csub = pc.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    p = csub.add_parser("check", help="validate; print every problem (exit 2 when invalid)")
    _config_args(p)
    p.set_defaults(func=cmd_config_check)
    p = csub.add_parser("show", help="effective configuration as YAML with each value's source")
    _config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    for module_name, func in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that sub-command is not in this build
            raise
        getattr(module, func)(sub, _config_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print_problems(exc.problems)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
