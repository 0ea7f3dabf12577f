"""The Makefile's .venv rule, run by the real make with a stand-in for python3 (no install).

A .venv that `python3 -m venv` left half-made (python but no pip: python3-venv was missing)
is rebuilt; a whole one is kept. The Debian lists name python3-venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# Stands in for `python3 -m venv DIR`: records the call and creates DIR/bin/{python,pip}, which
# only record their own calls.
FAKE_PY = """#!/bin/sh
echo "py $*" >> "$CALLS"
mkdir -p "$3/bin"
for tool in python pip; do
  printf '#!/bin/sh\\necho "%s $*" >> "$CALLS"\\n' "$tool" > "$3/bin/$tool"
  chmod +x "$3/bin/$tool"
done
"""


def _tool(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _make_venv(tmp_path: Path) -> list[str]:
    fake = tmp_path / "fakepy"
    _tool(fake, FAKE_PY)
    (tmp_path / "pyproject.toml").write_text("")
    calls = tmp_path / "calls"
    calls.write_text("")
    subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "venv", f"PY={fake}"], cwd=tmp_path,
                   env={**os.environ, "CALLS": str(calls)}, check=True, capture_output=True, text=True)
    return calls.read_text().splitlines()


def test_half_made_venv_is_rebuilt(tmp_path: Path) -> None:
    _tool(tmp_path / ".venv" / "bin" / "python", "#!/bin/sh\nexit 1\n")  # no pip beside it
    (tmp_path / ".venv" / "leftover").write_text("")
    calls = _make_venv(tmp_path)
    assert calls[0] == "py -m venv .venv"
    assert not (tmp_path / ".venv" / "leftover").exists()  # removed, not patched up
    assert "python -m pip install -q -e .[test,lab]" in calls
    assert (tmp_path / ".venv" / ".installed").exists()


def test_whole_venv_is_kept(tmp_path: Path) -> None:
    for tool in ("python", "pip"):
        _tool(tmp_path / ".venv" / "bin" / tool, f'#!/bin/sh\necho "{tool} $*" >> "$CALLS"\n')
    calls = _make_venv(tmp_path)
    assert not any(c.startswith("py ") for c in calls)
    assert "python -m pip install -q -e .[test,lab]" in calls


def test_debian_lists_have_python3_venv() -> None:
    text = (ROOT / "Makefile").read_text()
    for name in ("DEB_TEST", "DEB_DEMO"):
        packages = re.search(rf"^{name} := (.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
        assert "python3-venv" in packages, name
