"""Docs that are generated from code stay in sync with it."""

import ast
import re
from pathlib import Path

from vipd.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_table_in_sync() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in text, "docs/configuration.md is stale: run tools/gen-config-doc"


# -- the import table of docs/architecture.md --------------------------------------------------

VIPD = ROOT / "vipd"
IO_MODULES = {"trio", "trio_asyncio", "socket", "select", "selectors", "asyncio", "httpx", "h11", "pyroute2",
              "scapy", "kubernetes_asyncio", "ssl"}
# config uses socket only for gethostname() and the AF_INET/AF_INET6 constants.
SANS_IO = {"config": IO_MODULES - {"socket"}, "election.machine": IO_MODULES, "proxy.backends": IO_MODULES}


def _module_names() -> dict[str, Path]:
    """'election.kube' → path, '' (vipd itself) and packages ('proxy') included."""
    out = {}
    for path in VIPD.rglob("*.py"):
        parts = path.relative_to(VIPD).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(vipd modules imported, other top-level packages imported), lazy imports included."""
    vipd, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                (vipd.add(rest) if top == "vipd" else other.add(top))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top, _, rest = node.module.partition(".")
            if top != "vipd":
                other.add(top)
                continue
            for alias in node.names:  # `from vipd.lab import apiserver` imports vipd.lab.apiserver
                sub = f"{rest}.{alias.name}" if rest else alias.name
                vipd.add(sub if sub in modules else rest)
    return vipd, other


def _import_table() -> list[tuple[list[str], str]]:
    """[(module patterns of a row, its "may import" cell)] from the architecture doc."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Module map and import rules", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        patterns = [p.removesuffix(".py").replace("/", ".") for p in re.findall(r"`([^`]+)`", cells[0])]
        rows.append((patterns, cells[2]))
    return rows


def _row_of(module: str, rows: list[tuple[list[str], str]]) -> tuple[set[str], str]:
    """(the modules/packages of the row naming ``module``, its "may import" cell)."""
    name = module or "__init__"
    for patterns, allowed in rows:
        own = {p.rstrip(".").removesuffix(".__init__") for p in patterns}
        for pattern in patterns:
            if pattern.endswith("."):  # a package row: `proxy/`
                if name == pattern[:-1] or name.startswith(pattern):
                    return own, allowed
            elif name == pattern or (pattern.endswith(".__init__") and name == pattern[: -len(".__init__")]):
                return own, allowed
    raise AssertionError(f"vipd/{module or '__init__'} has no row in the import table of docs/architecture.md")


def test_import_table_is_kept() -> None:
    modules = _module_names()
    rows = _import_table()
    for _, allowed in rows:  # every module the table names exists
        for name in re.findall(r"`([^`]+)`", allowed):
            assert name in modules, f"docs/architecture.md names `{name}`, which is not a vipd module"
    wrong = []
    for module, path in sorted(modules.items()):
        own, allowed = _row_of(module, rows)
        names = own | set(re.findall(r"`([^`]+)`", allowed))  # a row's own modules, and what it allows
        imported, _ = _imports(path, modules)
        for target in sorted(imported):
            ok = (allowed.startswith("everything") or target == ""
                  or any(target == n or target.startswith(n + ".") for n in names))
            if not ok:
                wrong.append(f"vipd/{path.relative_to(VIPD)} imports vipd.{target}; its row allows: {allowed}")
    assert not wrong, "\n".join(wrong)


def test_sans_io_modules_import_no_io() -> None:
    modules = _module_names()
    for module, forbidden in sorted(SANS_IO.items()):
        _, other = _imports(modules[module], modules)
        assert not other & forbidden, f"vipd.{module} is sans-IO but imports {sorted(other & forbidden)}"
