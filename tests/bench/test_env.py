"""The benchmark stack compares like with like: the direct Postgres (which PgBouncer also
fronts) runs with the settings pgsni gives its instances."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gateway.compute.postgres import START_OPTIONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("psql"), reason="psql (postgresql-client-15) is needed")]


def _setting(port: int, name: str) -> str:
    from bench.env import libpq_env

    return subprocess.run(["psql", "-XAtq", "-c", f"SHOW {name}"], env=libpq_env(port), check=True,
                          capture_output=True, text=True).stdout.strip()


def test_direct_server_runs_the_instance_settings():
    from bench.env import Stack, Workdir

    work = Workdir()
    try:
        with Stack(work) as stack:
            for name in START_OPTIONS:
                through_pgsni = _setting(stack.gateway.port, name)
                assert through_pgsni == _setting(stack.direct.port, name) == _setting(stack.bouncer.port, name), name
    finally:
        work.close()
