"""Disk full on the data root: the data root is a small tmpfs (mounted by the test, which
needs root), filled through a real client until Postgres runs out of space. The client gets a
clear error, data committed before the fault is intact, the gateway keeps serving, and once
space is freed (the tmpfs is remounted larger) the same database works again. Creating or
restoring a database onto a full disk is refused with SQLSTATE 53100 and leaves no partial
directory behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from ..conftest import reachable_tmpdir, seed_template
from ..support.harness import connect_sqlstate, conninfo, psql

MB = 1 << 20


class SmallDisk:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"

    def used(self) -> int:
        st = os.statvfs(self.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size // 4096 * 4096}", str(self.root)],
                       check=True, capture_output=True)

    def leave_free(self, size: int) -> None:
        self.resize(self.used() + size)

    def leftovers(self) -> list[str]:
        """Work directories of unfinished creates and restores."""
        return [p.name for p in self.root.iterdir() if p.name.startswith((".new-", ".restore-", ".trash-"))]


@pytest.fixture
def small_disk(template_pgdata):
    base = reachable_tmpdir("pgsni-full-")
    root = base / "root"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0711", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        seed_template(root, template_pgdata)
        yield SmallDisk(base)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _gateway(start_gateway, disk: SmallDisk, **kw):
    return start_gateway(data_root=str(disk.root), storage_path=str(disk.base / "storage"), **kw)


def _fill(conn: psycopg.Connection, table: str, *, unlogged: bool = False) -> psycopg.Error:
    """Insert 4.5 MB at a time into a new table until Postgres refuses; return the error the
    client saw."""
    conn.execute(f"create {'unlogged ' if unlogged else ''}table {table} (id int, pad text)")
    for _ in range(200):
        try:
            conn.execute(f"insert into {table} select g, repeat(md5(g::text), 47) "
                         "from generate_series(1, 3000) g")
        except psycopg.Error as e:
            return e
    raise AssertionError("the disk never filled up")


@pytest.mark.slow
def test_disk_full_while_writing_is_a_clear_error_and_recovers(small_disk, start_gateway, tls):
    gw = _gateway(start_gateway, small_disk)
    gw.create_db("full")
    dsn = conninfo(gw.port, tls["ca"], "full")
    setup = "create table t(id int primary key, pad text); " \
            "insert into t select g, md5(g::text) from generate_series(1, 5000) g"
    assert psql(dsn, setup).returncode == 0
    check = "select count(*), sum(hashtext(pad)) from t"
    before = psql(dsn, check).stdout.strip()
    small_disk.leave_free(24 * MB)

    # 1. a table without WAL fills the disk until a data file cannot grow: a plain ERROR,
    #    and the same session goes on working
    with psycopg.connect(dsn, autocommit=True) as conn:
        error = _fill(conn, "big1", unlogged=True)
        _report(error)
        assert error.sqlstate == "53100" and error.diag.severity == "ERROR", error
        assert "could not extend file" in str(error) and "No space left on device" in str(error)
        assert small_disk.free() < 1 * MB
        assert conn.execute(check).fetchone() is not None
        conn.execute("drop table big1")  # gives the space back

    # 2. with WAL: a new WAL segment cannot be made. Postgres says 53100 with the reason as
    #    PANIC, then restarts (crash recovery), or, when recovery has no room either, exits
    with psycopg.connect(dsn, autocommit=True) as conn:
        error = _fill(conn, "big2")
    _report(error)
    assert error.sqlstate == "53100" and "No space left on device" in str(error), error
    assert small_disk.free() < 17 * MB  # less than one WAL segment left

    # the gateway keeps serving: it answers, and a database it cannot start is a clear 57P03
    assert connect_sqlstate(gw.port, tls["ca"], "nosuchdb") == "3D000"
    state = connect_sqlstate(gw.port, tls["ca"], "full")
    print("disk full: after the PANIC the first login got", state)
    assert state in (None, "57P03"), state
    if state == "57P03":  # from the gateway: the server could not be started again (with
        # the log line). The gateway waits out Postgres's own crash recovery and its "not yet
        # accepting connections" (up to start_timeout), and starts a postmaster that exited
        # again, so a client sees either a working connection or the reason it cannot have one
        out = psql(dsn, "select 1")
        print("disk full: after the PANIC a new login got", out.returncode, out.stderr.strip())
        assert out.returncode == 0 or "No space left on device" in out.stderr, out.stderr

    # stopped with no byte left, it cannot even spool a snapshot: the copy stays, marked
    # unsaved, and the maintenance pass that retries saves survives the failure
    small_disk.leave_free(0)
    versions = len(gw.call(lambda: gw.gw.databases.store.versions("full")))
    gw.call(lambda: gw.gw.instances.stop("full"))
    gw.call(lambda: gw.gw.instances.maintain())
    assert gw.gw.databases.state("full").dirty
    assert len(gw.call(lambda: gw.gw.databases.store.versions("full"))) == versions

    small_disk.resize(small_disk.used() + 128 * MB)
    gw.call(lambda: gw.gw.instances.maintain())  # the retry saves it now
    assert not gw.gw.databases.state("full").dirty
    assert len(gw.call(lambda: gw.gw.databases.store.versions("full"))) == versions + 1
    assert psql(dsn, check).stdout.strip() == before  # committed data intact
    out = psql(dsn, "insert into t values (0, 'after'); select count(*) from t")
    assert out.returncode == 0 and out.stdout.split()[-1] == "5001", out.stderr


def _report(error: psycopg.Error) -> None:
    print(f"disk full: client saw sqlstate={error.sqlstate} severity={error.diag.severity}: "
          f"{str(error).strip()[:160]}")


def test_create_on_a_full_disk_is_53100_and_leaves_nothing(small_disk, start_gateway, tls):
    gw = _gateway(start_gateway, small_disk, create_on_connect=True, dev_password="pw")
    small_disk.leave_free(4 * MB)  # far less than a new PGDATA (about 40 MB)
    dsn = conninfo(gw.port, tls["ca"], "fresh", password="pw")
    assert connect_sqlstate(gw.port, tls["ca"], "fresh", password="pw") == "53100"
    out = psql(dsn, "select 1")
    assert 'no disk space left for database "fresh"' in out.stderr, out.stderr
    assert small_disk.leftovers() == [] and not (small_disk.root / "fresh").exists()
    assert gw.gw.catalog.list() == []
    small_disk.resize(small_disk.used() + 128 * MB)
    out = psql(dsn, "select 1")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_restore_onto_a_full_disk_is_53100_and_leaves_nothing(small_disk, start_gateway, tls):
    gw = _gateway(start_gateway, small_disk)
    gw.create_db("cold")
    dsn = conninfo(gw.port, tls["ca"], "cold")
    assert psql(dsn, "create table t(x int); insert into t values (99)").returncode == 0
    gw.call(lambda: gw.gw.instances.stop("cold"))  # saved to storage (outside the tmpfs)
    shutil.rmtree(gw.gw.catalog.db_dir("cold"))
    gw.gw.databases.forget("cold")
    small_disk.leave_free(4 * MB)

    assert connect_sqlstate(gw.port, tls["ca"], "cold") == "53100"
    assert 'no disk space left for database "cold"' in psql(dsn, "select 1").stderr
    assert small_disk.leftovers() == [] and not (small_disk.root / "cold").exists()
    small_disk.resize(small_disk.used() + 128 * MB)
    out = psql(dsn, "select x from t")
    assert out.returncode == 0 and out.stdout.strip() == "99", out.stderr
