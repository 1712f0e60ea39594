"""The seams of a database's life that once lost data or capacity (issue 15): the instance cap
under concurrent cold starts, changes made just before a stop, a stale version pointer, a
background loop meeting an error, shutdown meeting one, the instance's own connection limit,
and concurrent first connects in development mode."""

from __future__ import annotations

import asyncio
import errno
import threading
import time

import psycopg
import pytest

from gateway.compute import dbroles

from storage.snapshots import SnapshotStore

from ..support.harness import TEST_PASSWORD, connect_sqlstate, conninfo, postmasters, started_at, wait_until


def another_gateways_store(gw) -> SnapshotStore:
    """The same storage as another gateway sees it (this gateway's own store refuses to move
    the pointer of a database whose lease it does not hold)."""
    return SnapshotStore(gw.databases.store.backend, gw.catalog.root / ".spool-other")


def _connect_all(port: int, ca, ids: list[str], *, hold: float = 0.0) -> list[BaseException | None]:
    """Connect to each id from its own thread at once (select 1, keep the session `hold` s)."""
    results: list[BaseException | None] = [None] * len(ids)
    barrier = threading.Barrier(len(ids))

    def client(n: int) -> None:
        barrier.wait()
        try:
            with psycopg.connect(conninfo(port, ca, ids[n]), connect_timeout=60) as conn:
                conn.execute("select 1")
                time.sleep(hold)
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            results[n] = e

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_cold_starts_never_exceed_max_instances(start_gateway, tls, data_root):
    gw = start_gateway(max_instances=2)
    ids = [f"cap{n}" for n in range(20)]
    for db_id in ids:
        gw.create_db(db_id)
    gw.call(gw.gw.instances.stop_all)
    gw.gw.instances.closing = False  # stop_all is the shutdown's: open the manager again
    most, done = 0, threading.Event()

    def watch() -> None:
        # a scan of /proc takes a while, and a postmaster may stop and another start during
        # it; one seen in the scan and still the same process after it was running at the
        # moment the scan ended: only those ran at once
        nonlocal most
        while not done.is_set():
            seen = {pid: started_at(pid) for i in ids for pid in postmasters(data_root / i / "pgdata")}
            most = max(most, sum(began is not None and started_at(pid) == began for pid, began in seen.items()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = _connect_all(gw.port, tls["ca"], ids)
    finally:
        done.set()
        watcher.join()
    assert most <= 2, f"{most} postmasters ran at once with max_instances = 2"
    # a client either got in or was told the cap is reached, nothing else
    for e in results:
        assert e is None or "too many databases are active" in str(e), e
    assert sum(e is None for e in results) >= 2


def test_a_commit_just_before_the_stop_is_saved(gateway, tls):
    """The stop decides "nothing changed" from the instance's WAL after it stopped, not from
    a reading taken before: a commit landing in between must reach storage."""
    gateway.create_db("late")
    gw = gateway.gw
    dsn = conninfo(gateway.port, tls["ca"], "late")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int)")
    gateway.call(lambda: gw.instances.stop("late"))
    saved = gateway.call(lambda: gw.databases.current("late", fresh=True)).manifest.version
    with psycopg.connect(dsn, autocommit=True):
        pass  # running again, nothing written
    inst = gw.instances.instances["late"]
    real = inst.reader.read

    async def read_then_someone_commits(names=None):
        out = await real(names)
        async with await dbroles.connect(inst.socket_dir) as admin:
            await admin.execute("insert into public.t values (42)")
        return out

    inst.reader.read = read_then_someone_commits
    gateway.call(lambda: gw.instances.stop("late"))
    cur = gateway.call(lambda: gw.databases.current("late", fresh=True))
    assert cur.manifest.version != saved, "the commit was left unsaved on a copy marked clean"
    assert not gw.databases.state("late").dirty


def test_a_stop_without_writes_saves_nothing(gateway, tls):
    gateway.create_db("quiet")
    gw = gateway.gw
    gateway.call(lambda: gw.instances.stop("quiet"))
    saved = gateway.call(lambda: gw.databases.current("quiet", fresh=True)).manifest.version
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "quiet")) as conn:
        assert conn.execute("select count(*) from pg_class").fetchone()[0] > 0
    gateway.call(lambda: gw.instances.stop("quiet"))
    assert gateway.call(lambda: gw.databases.current("quiet", fresh=True)).manifest.version == saved


def test_a_restore_reads_the_version_pointer_fresh(start_gateway, tls):
    """A pointer read moments ago (by authentication) may be stale by the time the copy is
    restored: another gateway saved since. The restore reads it again. (Snapshot durability:
    with WAL in storage, a restore replays the WAL beyond whichever version it starts from,
    so the raw pointer move below would not show.)"""
    gateway = start_gateway(durability="snapshot")
    gateway.create_db("ptr")
    gw = gateway.gw
    dsn = conninfo(gateway.port, tls["ca"], "ptr")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int); insert into t values (1)")
    gateway.call(lambda: gw.instances.stop("ptr"))
    first = gateway.call(lambda: gw.databases.current("ptr", fresh=True))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into t values (2)")
    gateway.call(lambda: gw.instances.stop("ptr"))
    second = gateway.call(lambda: gw.databases.current("ptr", fresh=True))  # cached from here on
    assert second.manifest.version != first.manifest.version

    async def another_gateway_moves_the_pointer_back():
        # as if another gateway had saved: the pointer moves behind this gateway's cache
        await another_gateways_store(gw).set_current("ptr", first.manifest.version, second)
        await asyncio.to_thread(gw.catalog.delete, "ptr")  # no local copy: restored on connect
    gateway.call(another_gateway_moves_the_pointer_back)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select array_agg(x order by x) from t").fetchone()[0] == [1]


def test_the_reaper_survives_an_error_and_frees_the_database(start_gateway, tls):
    """ENOSPC writing state.json while the reaper stops an idle instance: logged and counted,
    the database's file lock is released, the reaper goes on and the database starts again."""
    gw = start_gateway(idle_timeout=0.3)
    gw.create_db("enospc")
    real, failed = gw.gw.databases.mark_stopped, []

    def disk_full_once(db_id, **kw):
        if not failed:
            failed.append(db_id)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(db_id, **kw)

    gw.gw.databases.mark_stopped = disk_full_once
    wait_until(lambda: failed and gw.running() == set(), what="the failing idle stop")
    time.sleep(0.5)
    assert all(not t.done() for t in gw.gw._tasks), "a background loop died"
    errors_seen = gw.gw.metrics.background_errors.labels(loop="reap_idle")._value.get()
    assert errors_seen >= 1
    with psycopg.connect(conninfo(gw.port, tls["ca"], "enospc")) as conn:  # starts again
        assert conn.execute("select 1").fetchone() == (1,)
    wait_until(lambda: gw.running() == set(), what="the next idle stop")  # the reaper still runs


def test_shutdown_finishes_when_stopping_an_instance_fails(start_gateway, tls):
    gw = start_gateway()
    gw.create_db("stuck")

    def disk_full(db_id, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    gw.gw.databases.mark_stopped = disk_full
    gw.call(gw.gw.shutdown, timeout=60)  # returns, rather than raising or hanging
    assert gw.gw._stopped.is_set()
    assert gw.running() == set()


def test_an_instance_admits_as_many_clients_as_the_gateway_allows(start_gateway, tls):
    gw = start_gateway(max_connections_per_db=150)
    gw.create_db("wide")
    with psycopg.connect(conninfo(gw.port, tls["ca"], "wide")) as conn:
        allowed = int(conn.execute("show max_connections").fetchone()[0])
        reserved = int(conn.execute("show superuser_reserved_connections").fetchone()[0])
    assert allowed - reserved >= 150


def test_concurrent_first_connects_in_development_mode_all_succeed(start_gateway, tls, data_root):
    gw = start_gateway(create_on_connect=True, dev_password=TEST_PASSWORD)
    results = _connect_all(gw.port, tls["ca"], ["fresh1"] * 12)
    assert results == [None] * 12, [e for e in results if e is not None]
    # one start to create it, one after its first version was stored (durability=async)
    assert gw.gw.instances.starts == 2
    assert len(postmasters(data_root / "fresh1" / "pgdata")) >= 1


def test_development_mode_never_creates_an_id_that_storage_knows(start_gateway, tls):
    """Another gateway's lease (or any object) under the id: it exists elsewhere, perhaps with
    acknowledged commits not yet saved; creating it empty here would hide them."""
    gw = start_gateway(create_on_connect=True, dev_password=TEST_PASSWORD)

    async def a_lease_of_another_gateway():
        await gw.gw.databases.store.backend.put("dbs/taken/lease.json", b'{"holder": "gone"}')
    gw.call(a_lease_of_another_gateway)
    assert connect_sqlstate(gw.port, tls["ca"], "taken") == "57P03"
    assert "taken" not in gw.running() and not gw.gw.catalog.exists("taken")


def test_a_lease_given_up_does_not_make_an_id_known(start_gateway, tls):
    """Leases are given up by writing them free (storage/leases.py), not deleted: a free lease
    under an id that has nothing else in storage holds nothing, and the id may be created."""
    gw = start_gateway(create_on_connect=True, dev_password=TEST_PASSWORD)

    async def a_lease_given_up():
        await gw.gw.databases.store.backend.put("dbs/freed/lease.json",
                                                b'{"holder": null, "released_by": "gone"}')
    gw.call(a_lease_given_up)
    assert connect_sqlstate(gw.port, tls["ca"], "freed") is None
    assert "freed" in gw.running()


def test_changes_storage_moved_past_are_set_aside_logged_and_listed(start_gateway, tls, caplog):
    """A copy with unsaved changes whose database another gateway took over and saved
    meanwhile (this one was killed or cut off): the stored version wins, the copy is kept aside,
    one log line says where, and `db info` lists it. (Snapshot durability: the raw pointer move
    below stands for the other gateway's save; with WAL in storage the restore would replay
    this copy's shipped WAL onto it.)"""
    from gateway.ops.operations import Ops

    gateway = start_gateway(durability="snapshot")
    gateway.create_db("moved")
    gw = gateway.gw
    dsn = conninfo(gateway.port, tls["ca"], "moved")
    gateway.call(lambda: gw.instances.stop("moved"))
    first = gateway.call(lambda: gw.databases.current("moved", fresh=True))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int); insert into t values (1)")
    gateway.call(lambda: gw.instances.stop("moved"))
    second = gateway.call(lambda: gw.databases.current("moved", fresh=True))
    state = gw.databases.state("moved")
    state.dirty = True  # acknowledged commits the killed holder never saved
    gw.databases.save_state("moved", state)

    async def another_gateway_saved_meanwhile():
        await another_gateways_store(gw).set_current("moved", first.manifest.version, second)
    gateway.call(another_gateway_saved_meanwhile)
    wait_until(lambda: "moved" not in gw.instances.leases.held, what="the lease given up")
    with psycopg.connect(dsn) as conn:  # the stored version, without table t
        assert conn.execute("select to_regclass('public.t')").fetchone() == (None,)
    info = gateway.call(lambda: Ops(gw.settings, gw.catalog, gw.databases, gw.instances).info("moved"))
    assert len(info.set_aside) == 1 and ".conflict-moved-" in info.set_aside[0]
    said = [r.getMessage() for r in caplog.records if "only in" in r.getMessage()]
    assert len(said) == 1 and info.set_aside[0] in said[0]


def test_a_start_cancelled_half_way_leaves_no_postmaster_and_no_lock(gateway, tls, data_root):
    gateway.create_db("halfway")
    gw = gateway.gw
    gateway.call(lambda: gw.instances.stop("halfway"))
    pgdata = data_root / "halfway" / "pgdata"

    async def cancel_once_the_postmaster_runs():
        task = asyncio.create_task(gw.instances.acquire("halfway"))
        while not postmasters(pgdata) and not task.done():
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False  # the start won the race: nothing half-way to check

    if not gateway.call(cancel_once_the_postmaster_runs):
        pytest.skip("the start finished before it could be cancelled")
    wait_until(lambda: postmasters(pgdata) == [], timeout=10, what="the half-started postmaster gone")
    assert "halfway" not in gw.instances.instances
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "halfway")) as conn:  # lock free again
        assert conn.execute("select 1").fetchone() == (1,)
