"""Packaging: the wheel and the sdist build, each installs into a fresh virtualenv (the wheel
through install.sh, the systemd path) and runs; the Containerfile is checked statically (no
container runtime here: see docs/container.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.ops_fixtures import REPO
from vipd import __version__

CONTAINERFILE = Path(REPO) / "packaging" / "Containerfile"


def containerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Stages as lists of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, args.strip()))
    return stages


def test_containerfile_is_multi_stage_slim_and_compiler_free():
    text = CONTAINERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    stages = containerfile_stages(text)
    assert len(stages) == 2
    build, final = stages
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    build_runs = " ".join(a for i, a in build if i == "RUN")
    assert "python -m build --wheel" in build_runs and "pip wheel" in build_runs
    final_text = " ".join(a for _, a in final)
    for forbidden in ("gcc", "build-essential", "apt-get install", "python -m build", "-dev "):
        assert forbidden not in final_text, forbidden
    final_runs = [a for i, a in final if i == "RUN"]
    installs = [r for r in final_runs if "pip install" in r]
    assert installs and all("--no-index" in r for r in installs)  # wheels only, nothing compiled
    # The wheels are bind-mounted for the install step only: never COPYed into a layer (a later
    # `rm` would not take them out of the COPY's layer).
    mount = "--mount=type=bind,from=build,source=/wheels,target=/wheels"
    assert all(r.startswith(mount + " ") and "--find-links /wheels" in r for r in installs), installs
    assert not [a for i, a in final if i in ("COPY", "ADD")], "nothing is copied into the image stage"
    entry = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    cmd = [json.loads(a) for i, a in final if i == "CMD"]
    assert entry == [["vipd"]] and cmd == [["start"]]  # `vipd start` by default; other sub-commands by args
    for instr, a in build:
        if instr == "COPY" and not a.startswith("--"):
            for src in a.split()[:-1]:
                assert (Path(REPO) / src).exists(), src


def test_containerfile_build_command_is_documented():
    """docs/container.md says how to build the image (the build itself cannot run here: no
    Docker daemon, Podman or Buildah on the test machines; the doc says so)."""
    doc = (Path(REPO) / "docs" / "container.md").read_text()
    block = doc.split("## Build", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    builds = [line for line in block.splitlines() if line.startswith(("podman build", "docker build"))]
    assert len(builds) == 2
    for line in builds:
        # run from the checkout's root: the Containerfile path and the context "." are the repo's
        assert line.split()[2:4] == ["-f", "packaging/Containerfile"] and line.endswith(" ."), line
        assert "-t ghcr.io/vipd/vipd:$VERSION" in line
    # the tag is the one the manifests name by default
    from vipd.manifest import default_image
    assert default_image() == f"ghcr.io/vipd/vipd:{__version__}"
    assert "cannot run there" in doc and "docs/container.md" in CONTAINERFILE.read_text()
    assert "docs/container.md" in (Path(REPO) / "docs" / "quickstart-kubeadm.md").read_text()


@pytest.mark.slow
def test_wheel_and_sdist_build_install_fresh_venv_and_run(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), REPO],
                           capture_output=True, text=True, timeout=80)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(dist.glob("vipd-*.whl"))
    sdist = next(dist.glob("vipd-*.tar.gz"))
    assert wheel.name == f"vipd-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "vipd/status.py" in names and "vipd/py.typed" in names
        entry_points = zf.read(f"vipd-{__version__}.dist-info/entry_points.txt").decode()
        assert "vipd = vipd.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
        assert {"pyproject.toml", "vipd/cli.py", "vipd/manifest.py"} <= members

    # The systemd path: install.sh into a scratch root, a fresh virtualenv (no site packages).
    root = tmp_path / "root"
    env = {**os.environ, "VIPD_PREFIX": str(root / "opt/vipd"), "VIPD_BINDIR": str(root / "bin"),
           "VIPD_UNITDIR": str(root / "units"), "VIPD_CONFDIR": str(root / "etc/vipd"),
           "VIPD_DOCDIR": str(root / "doc"), "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    inst = subprocess.run(["bash", str(Path(REPO) / "packaging" / "install.sh"), str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    venv_cfg = (root / "opt/vipd/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in venv_cfg
    vipd = root / "bin" / "vipd"
    assert vipd.is_symlink()
    unit = (root / "units" / "vipd.service").read_text()
    assert f"ExecStart={root}/bin/vipd start" in unit
    # Documentation= points at the installed copy of docs/systemd.md, which exists.
    docs = re.findall(r"^Documentation=(.*)$", unit, re.M)[0].split()
    assert f"file:{root}/doc/systemd.md" in docs and (root / "doc" / "systemd.md").is_file()
    assert (root / "etc/vipd/vipd.env").stat().st_mode & 0o777 == 0o600

    env_file = {}
    for line in (root / "etc/vipd/vipd.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env_file[key] = value
    _run_installed(vipd, root / "opt/vipd", env_file, tmp_path)

    # The sdist too: its own fresh virtualenv, built from source by pip.
    sdist_venv = tmp_path / "sdist-venv"
    subprocess.run([sys.executable, "-m", "venv", str(sdist_venv)], check=True, timeout=60)
    from_sdist = subprocess.run([str(sdist_venv / "bin/python"), "-m", "pip", "install", "--quiet", str(sdist)],
                                capture_output=True, text=True, timeout=300, env=env)
    assert from_sdist.returncode == 0, from_sdist.stdout[-3000:] + from_sdist.stderr[-3000:]
    _run_installed(sdist_venv / "bin" / "vipd", sdist_venv, env_file, tmp_path)

    # Running install.sh again keeps the operator's env file.
    (root / "etc/vipd/vipd.env").write_text("VIPD_ADDRESS=192.0.2.99\n")
    again = subprocess.run(["bash", str(Path(REPO) / "packaging" / "install.sh"), str(wheel)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "keeping existing" in again.stdout
    assert (root / "etc/vipd/vipd.env").read_text() == "VIPD_ADDRESS=192.0.2.99\n"


def _run_installed(vipd: Path, venv: Path, env_file: dict[str, str], cwd: Path) -> None:
    """An installed vipd runs from its own virtualenv: --version, config check (good and bad)."""
    clean_env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(vipd), "--version"], capture_output=True, text=True, timeout=30, env=clean_env)
    assert out.returncode == 0 and out.stdout.strip() == f"vipd {__version__}", out.stderr
    # The installed code is the package's, not this checkout's.
    where = subprocess.run([str(venv / "bin/python"), "-c", "import vipd; print(vipd.__file__)"],
                           capture_output=True, text=True, timeout=30, env=clean_env, cwd=cwd)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    check = subprocess.run([str(vipd), "config", "check"], capture_output=True, text=True, timeout=30,
                           env={**clean_env, **env_file})
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("configuration is valid")
    bad = subprocess.run([str(vipd), "config", "check", "--lb-port", "70000"], capture_output=True, text=True,
                         timeout=30, env={**clean_env, **env_file})
    assert bad.returncode == 2 and "proxy.port" in bad.stderr
