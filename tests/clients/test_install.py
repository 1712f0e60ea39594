"""tests/clients/install.sh passes shellcheck, and the npm packages it installs are pinned:
exact versions in node/package.json, the same versions in the committed package-lock.json."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import HERE, NODE_DIR


def test_install_script_passes_shellcheck():
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; ./dev does it)")
    r = subprocess.run([tool, "--severity=style", str(HERE / "install.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_npm_packages_are_pinned_and_locked():
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    locked = json.loads((NODE_DIR / "package-lock.json").read_text())["packages"]
    for name, version in wanted.items():
        assert version[0].isdigit(), f"{name}: {version} is a range, not an exact version"
        assert locked[f"node_modules/{name}"]["version"] == version
    assert locked[""]["dependencies"] == wanted  # the lock was made from this package.json
