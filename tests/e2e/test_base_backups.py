"""Online base backups of running databases (durability=async, gateway/compute/basebackup.py):
`db snapshot` of a running database stores one and the database keeps serving; one is taken
on its own once enough WAL was written; a gateway that has nothing of the database starts
from the newest base backup and replays only the WAL after it; restore to a time before a
base backup uses the older version; forks and roll-backs of a base backup hold exactly it;
retention keeps the WAL kept base backups need."""

from __future__ import annotations

import datetime as dt
import re
import time

import psycopg
import pytest

from gateway.compute.pgbins import PgInstalls
from gateway.ops.operations import Ops
from storage.wal import parse_lsn

from ..conftest import PG_OPTIONS
from ..support.harness import conninfo, wait_until
from ..support.ports import free_port
from .test_cli import cli  # noqa: F401  (the `cli` fixture)
from .test_durability import _until_stored, other_root  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow


def _ops(gt) -> Ops:
    gw = gt.gw
    return Ops(gw.settings, gw.catalog, gw.databases, gw.instances)


def _manifest(gt, db_id: str, version: str):
    return gt.call(lambda: gt.gw.databases.store.manifest(db_id, version))


def _current(gt, db_id: str):
    return gt.call(lambda: gt.gw.databases.current(db_id, fresh=True)).manifest


def _count(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("select count(*), coalesce(max(x), 0) from t").fetchone()


def _insert(dsn: str, first: int, last: int) -> dt.datetime:
    """Insert rows first..last; returns the time just after the commit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into t select generate_series(%s::int, %s::int)", (first, last))
        return conn.execute("select clock_timestamp()").fetchone()[0]


def _running(gt, tls, db_id: str, table: str = "create table t(x int)", **create) -> tuple[str, str]:
    """Create `db_id` and stop it once (its first version: from then on a running copy ships
    its WAL), then run `table`; returns (that version, the database's dsn)."""
    gt.create_db(db_id, **create)
    gt.call(lambda: gt.gw.instances.stop(db_id))
    dsn = conninfo(gt.port, tls["ca"], db_id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(table)
    return gt.gw.databases.state(db_id).version, dsn


def _elsewhere(start_gateway, other_root, data_root, **kw):
    """A second gateway with its own (empty) data root on the first one's storage."""
    return start_gateway(lease_seconds=0, data_root=str(other_root),
                         socket_dir=f"/tmp/pgsni-s-{other_root.name[-8:]}",
                         storage_path=str(data_root / "_storage"), **kw)


def _redo_start(log_text: str) -> int:
    found = re.findall(r"redo starts at ([0-9A-F]+/[0-9A-F]+)", log_text)
    assert found, "no replay in the log"
    return parse_lsn(found[-1])


def test_db_snapshot_of_a_running_database_is_an_online_base_backup(start_gateway, tls, data_root, other_root):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    gw, ops = gt.gw, _ops(gt)
    first, dsn = _running(gt, tls, "bb")
    _insert(dsn, 1, 1000)
    with psycopg.connect(dsn, autocommit=True) as client:  # a client stays connected throughout
        plan = gt.call(lambda: ops.snapshot("bb", dry_run=True))
        assert "online base backup" in plan.changes[0]
        snap = gt.call(lambda: ops.snapshot("bb"))
        assert snap.base_backup and snap.saved and not snap.stopped and snap.version != first
        client.execute("insert into t values (1001)")  # the same session goes on
    inst = gw.instances.instances["bb"]
    wait_until(lambda: inst.clients == 0, what="the clients' release")  # the backup's too
    assert inst.alive
    manifest = _current(gt, "bb")
    assert manifest.version == snap.version and manifest.parent == first
    base = manifest.base_backup
    assert base["wal"] == first and parse_lsn(base["start_lsn"]) <= parse_lsn(base["end_lsn"])
    state = gw.databases.state("bb")
    assert (state.version, state.wal, state.pending_base) == (snap.version, first, None)
    assert "postgres" in manifest.roles
    _insert(dsn, 1002, 2000)
    _until_stored(gt, "bb")

    # another gateway with nothing of it starts from the base backup and replays from its start
    b = _elsewhere(start_gateway, other_root, data_root)
    assert _count(conninfo(b.port, tls["ca"], "bb")) == (2000, 2000)
    there = b.gw.databases.state("bb")
    assert (there.version, there.wal_prefix, there.dirty) == (snap.version, first, True)
    redo = _redo_start((other_root / "bb" / "postgres.log").read_text())
    assert redo == parse_lsn(base["start_lsn"])


def test_a_base_backup_is_taken_once_enough_wal_was_written(start_gateway, tls):
    # one that is due waits for a spread checkpoint, paced over checkpoint_timeout unless this
    options = dict(PG_OPTIONS, checkpoint_completion_target="0")
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5, base_backup_wal_mb=16, postgres_options=options)
    gw = gt.gw
    first, dsn = _running(gt, tls, "auto", "create table t(x int, pad text)")
    gt.call(gw.instances.maintain)
    assert _current(gt, "auto").version == first  # not due yet
    with psycopg.connect(dsn, autocommit=True) as conn:  # about 24 MB of WAL
        conn.execute("insert into t select g, repeat('x', 1000) from generate_series(1, 20000) g")
    _until_stored(gt, "auto")
    gt.call(gw.instances.maintain)  # the background loop's round, now
    wait_until(lambda: _current(gt, "auto").version != first, timeout=120, what="the base backup")
    manifest = _current(gt, "auto")
    assert manifest.base_backup["wal"] == first and "WAL since its newest base" in manifest.note
    inst = gw.instances.instances["auto"]
    wait_until(lambda: inst.base_lsn == parse_lsn(manifest.base_backup["start_lsn"]),
               what="the newest base's position")
    gt.call(gw.instances.maintain)
    time.sleep(0.5)
    assert _current(gt, "auto").version == manifest.version  # due again only after more WAL

    # the running copy descends from the base backup now: its stop saves on top of it
    gt.call(lambda: gw.instances.stop("auto"))
    saved = _current(gt, "auto")
    assert saved.parent == manifest.version and saved.base_backup is None
    assert not gw.databases.set_aside_copies("auto")
    assert _count(dsn) == (20000, 20000)


def test_restore_to_a_time_before_a_base_backup_uses_the_older_version(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    ops = _ops(gt)
    first, dsn = _running(gt, tls, "pt")
    before = _insert(dsn, 1, 10)
    time.sleep(0.3)
    _insert(dsn, 11, 20)
    base = gt.call(lambda: ops.snapshot("pt")).version
    time.sleep(0.3)
    after = _insert(dsn, 21, 30)
    time.sleep(0.3)
    _insert(dsn, 31, 40)
    _until_stored(gt, "pt")

    restored = gt.call(lambda: ops.restore("pt", time=before, force=True))
    assert restored.base == first  # the base backup is younger than the target
    assert _count(dsn) == (10, 10)
    restored = gt.call(lambda: ops.restore("pt", time=after, force=True))
    assert restored.base == base  # the newest version before the target: the base backup
    assert _count(dsn) == (30, 30)


def test_a_fork_and_a_roll_back_of_a_base_backup_hold_exactly_it(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    ops = _ops(gt)
    _, dsn = _running(gt, tls, "fk")
    _insert(dsn, 1, 10)
    forked = gt.call(lambda: ops.fork("fk", "fk2"))  # running: saved by a base backup first
    assert forked.source_saved == forked.source_version
    assert _manifest(gt, "fk", forked.source_version).base_backup
    _insert(dsn, 11, 20)  # after the base backup: in the source's WAL, not in the fork
    _until_stored(gt, "fk")
    fork = _manifest(gt, "fk2", forked.version)
    assert fork.base_backup["wal"] == forked.version  # its own copy of the backup's WAL
    assert _count(conninfo(gt.port, tls["ca"], "fk2")) == (10, 10)

    rolled = gt.call(lambda: ops.restore("fk", version=forked.source_version, force=True))
    assert rolled.base == forked.source_version and rolled.version != rolled.base  # a new timeline
    assert _count(dsn) == (10, 10)
    assert _current(gt, "fk").base_backup is None  # a snapshot of the replayed, stopped copy


def test_retention_keeps_the_wal_kept_base_backups_need(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5, retention_keep=3)
    gw, ops = gt.gw, _ops(gt)
    first, dsn = _running(gt, tls, "rt")
    bases, times = [], []
    for n in range(3):
        _insert(dsn, n * 10 + 1, n * 10 + 10)
        time.sleep(0.3)
        times.append(dt.datetime.now(dt.timezone.utc))
        time.sleep(0.3)
        bases.append(gt.call(lambda: ops.snapshot("rt")).version)
    _insert(dsn, 31, 40)
    _until_stored(gt, "rt")

    def stored_segments() -> list[int]:
        wal = gt.call(lambda: gw.databases.store.backend.list(f"dbs/rt/wal/{first}/"))
        return [int(o.key.rsplit("/", 1)[1][8:24], 16) for o in wal if o.key.endswith(".zst")]

    assert [v.version for v in gt.call(lambda: ops.versions("rt"))] == bases  # the first went
    oldest = _manifest(gt, "rt", bases[0]).base_backup
    assert oldest["wal"] == first
    # its WAL stays from where the oldest base backup's replay starts; what ends before went
    assert min(stored_segments()) == parse_lsn(oldest["start_lsn"]) // oldest["segment_size"]

    # the restore's save of the running copy takes the oldest base backup's place: the WAL
    # goes up to the next one's start, whose replay to a time between it and the newest works
    restored = gt.call(lambda: ops.restore("rt", time=times[2], force=True))
    assert restored.base == bases[1] and _count(dsn) == (30, 30)
    assert bases[0] not in [v.version for v in gt.call(lambda: ops.versions("rt"))]


def test_restore_to_an_lsn_after_retention_starts_from_a_base_backup(start_gateway, tls):
    """Retention removed the version the running copy came from and kept its WAL from the
    oldest kept base backup's start: a restore to an LSN past that base backup starts from it
    (its own WAL prefix is empty: what it replays is under the removed version's)."""
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5, retention_keep=2)
    ops = _ops(gt)
    first, dsn = _running(gt, tls, "rl")
    bases = []
    for n in range(2):
        _insert(dsn, n * 10 + 1, n * 10 + 10)
        bases.append(gt.call(lambda: ops.snapshot("rl")).version)
    _insert(dsn, 21, 30)
    with psycopg.connect(dsn) as conn:
        (lsn,), = conn.execute("select pg_current_wal_insert_lsn()::text").fetchall()
    _insert(dsn, 31, 40)
    _until_stored(gt, "rl")
    assert [v.version for v in gt.call(lambda: ops.versions("rl"))] == bases  # the first went
    restored = gt.call(lambda: ops.restore("rl", lsn=lsn, force=True))
    assert restored.base == bases[1] and _count(dsn) == (30, 30)


@pytest.mark.skipif(not {"15", "18"} <= set(PgInstalls().by_major), reason="needs Postgres 15 and 18")
def test_an_upgrade_of_a_base_backup_replays_its_wal_first(start_gateway, tls, data_root, other_root):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    ops = _ops(gt)
    _, dsn = _running(gt, tls, "up", major="15")
    _insert(dsn, 1, 10)
    assert gt.call(lambda: ops.snapshot("up")).base_backup
    _insert(dsn, 11, 20)
    _until_stored(gt, "up")
    # a gateway with nothing of it (the first one is as good as lost) restores the base backup,
    # replays the stored WAL and only then upgrades
    b = _elsewhere(start_gateway, other_root, data_root)
    done = b.call(lambda: _ops(b).upgrade("up", "18"), timeout=300)
    assert done.to_major == "18"
    with psycopg.connect(conninfo(b.port, tls["ca"], "up")) as conn:
        assert conn.info.parameter_status("server_version").startswith("18.")
        assert conn.execute("select count(*), max(x) from t").fetchone() == (20, 20)


def test_the_cli_asks_the_gateway_that_runs_it(cli, start_gateway, tls):
    gt = start_gateway(rpo_seconds=0.5, admin_port=(port := free_port()))
    _, dsn = _running(gt, tls, "viacli")
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = cli("db", "snapshot", "viacli", extra_env={"PGSNI_ADMIN_PORT": str(port)})
        assert out.returncode == 0, out.stderr
        version = re.search(r"stored an online base backup of viacli as version (\S+) \(it keeps running\)",
                            out.stdout).group(1)
        conn.execute("insert into t values (1)")  # the same session: nothing was stopped
    assert _current(gt, "viacli").version == version
    # without the gateway's admin API the CLI says who has it
    refused = cli("db", "snapshot", "viacli")
    assert refused.returncode != 0 and "admin API" in refused.stderr


def test_a_base_backup_is_not_made_current_by_a_gateway_that_lost_the_lease(start_gateway, tls, monkeypatch):
    """The lease lapsed while the backup was stored (and the heartbeat was renewed since, so
    the gateway looks alive again): another gateway may have taken the database over, so the
    backup stays a kept version and the pointer does not move."""
    gt = start_gateway(lease_seconds=30, rpo_seconds=0.5)
    gw, ops = gt.gw, _ops(gt)
    first, dsn = _running(gt, tls, "bl")
    _insert(dsn, 1, 100)
    backend = gw.databases.store.backend
    upload = backend.upload_file

    async def lapse_meanwhile(key, path):  # a lapse before the upload uploads nothing (test_fencing)
        done = await upload(key, path)
        if "/versions/" in key:
            gw.instances.leases.held.discard("bl")  # what a lapse does to the holdings, whatever comes after
        return done
    monkeypatch.setattr(backend, "upload_file", lapse_meanwhile)
    assert gw.instances.leases.valid()
    with pytest.raises(Exception, match="lost its lease"):
        gt.call(lambda: ops.snapshot("bl"))
    assert gw.instances.leases.valid() and _current(gt, "bl").version == first
