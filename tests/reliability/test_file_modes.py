"""Files the gateway creates are private: nothing under the data root (database directories,
PGDATA, roles.json with verifiers, state.json, logs, locks, local storage objects, the snapshot
spool) and nothing in the socket directory is readable or writable by group or others, and
generated private keys are 0600. The data root itself may be 0711 (traversable only) so the
Postgres OS user can reach its directories. Two directories hold public copies of installed
software the Postgres OS user must read: `_postgres` (binaries that user could not reach where
they are installed) and `_extensions` (allow-listed extension control files marked trusted);
they may be readable, never writable, by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from certs.generate import generate

from ..support.harness import DOMAIN, conninfo, psql


PUBLIC = ("_postgres", "_extensions")


def _loose(root: Path) -> list[str]:
    """Entries under `root` (and root itself) with any group/other read or write bit (only a
    write bit under the public copies)."""
    found = []
    paths = [root] + [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files]
    for path in paths:
        public = path != root and path.relative_to(root).parts[0] in PUBLIC
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # a temp file that was renamed or removed meanwhile
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & (0o022 if public else 0o066):
            found.append(f"{path} {stat.filemode(st.st_mode)}")
    return found


@pytest.mark.slow
def test_database_files_sockets_and_storage_are_private(start_gateway, tls):
    gw = start_gateway()
    gw.create_db("modes")
    dsn = conninfo(gw.port, tls["ca"], "modes")
    assert psql(dsn, "create table t(x int); insert into t values (1)").returncode == 0
    gw.call(lambda: gw.gw.instances.stop("modes"))  # snapshot to local storage
    assert psql(dsn, "select count(*) from t").stdout.strip() == "1"  # running again

    root = gw.settings.data_path
    db = gw.gw.catalog.db_dir("modes")
    for must in (db / "pgdata" / "PG_VERSION", db / "roles.json", db / "state.json",
                 db / "postgres.log", root / "_storage", root / ".leases" / "modes"):
        assert must.exists(), must
    objects = [p for p in (root / "_storage").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".tar.zst") for p in objects), objects
    assert _loose(root) == []
    if int(gw.gw.instances.installs.default.major) >= 18:  # 18 reads the trusted control files
        assert (root / "_extensions").is_dir()
    assert stat.S_IMODE(root.stat().st_mode) in (0o700, 0o711)

    sockets = gw.settings.socket_path
    assert (sockets / "modes" / ".s.PGSQL.5432").exists()
    assert _loose(sockets) == []
    for d in (sockets, sockets / "modes"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_generated_private_keys_are_0600(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    p = generate([DOMAIN], out)
    for key in (p.key, p.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    # a key file that existed with loose modes is tightened when overwritten
    os.chmod(p.key, 0o644)
    generate([DOMAIN], out)
    assert stat.S_IMODE(p.key.stat().st_mode) == 0o600
