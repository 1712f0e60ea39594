"""Instances: one postmaster per database however many clients arrive, idle stop, restart
after a crash, the instance cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import psycopg
import pytest

from gateway.compute import dbroles
from gateway.proxy import relay

from ..support.harness import connect_sqlstate, conninfo, postmasters, psql, wait_until


def test_concurrent_first_connects_start_one_server(gateway, tls, data_root):
    gateway.create_db("cold")
    gateway.call(lambda: gateway.gw.instances.stop("cold"))
    starts = gateway.gw.instances.starts
    results, barrier = [], threading.Barrier(12)

    def client():
        barrier.wait()
        with psycopg.connect(conninfo(gateway.port, tls["ca"], "cold")) as conn:
            results.append(conn.execute("select pg_postmaster_start_time()").fetchone()[0])

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    assert len(set(results)) == 1  # all were served by the same postmaster
    assert gateway.gw.instances.starts == starts + 1
    assert len([p for p in postmasters(data_root / "cold" / "pgdata")]) >= 1


def test_idle_stop_then_reconnect_keeps_data(start_gateway, tls, data_root):
    gw = start_gateway(idle_timeout=0.5)
    gw.create_db("idle1")
    dsn = conninfo(gw.port, tls["ca"], "idle1")
    assert psql(dsn, "create table t(x int); insert into t select generate_series(1, 100)").returncode == 0
    wait_until(lambda: gw.running() == set(), what="idle stop")
    assert postmasters(data_root / "idle1" / "pgdata") == []
    out = psql(dsn, "select count(*) from t")
    assert out.returncode == 0 and out.stdout.strip() == "100"


def test_busy_instance_is_not_stopped_for_idleness(start_gateway, tls):
    gw = start_gateway(idle_timeout=0.3)
    gw.create_db("busy")
    with psycopg.connect(conninfo(gw.port, tls["ca"], "busy")) as conn:
        time.sleep(1.2)
        assert conn.execute("select 7").fetchone() == (7,)
        assert gw.running() == {"busy"}


def test_instance_killed_then_reconnect(gateway, tls, data_root):
    gateway.create_db("crashy")
    dsn = conninfo(gateway.port, tls["ca"], "crashy")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("create table t(x int); insert into t values (1), (2)")
    pid = gateway.gw.instances.instances["crashy"].process.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "crashy" not in gateway.running(), what="crash noticed")
    # the gateway killed the orphaned backends too, so the client's session is gone
    wait_until(lambda: postmasters(data_root / "crashy" / "pgdata") == [], what="orphans gone")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    with psycopg.connect(dsn) as again:
        assert again.execute("select count(*) from t").fetchone() == (2,)
    log = (data_root / "crashy" / "postgres.log").read_text()
    assert "database system was interrupted" in log or "not properly shut down" in log


def test_instance_dead_before_its_watcher_ran_restarts(gateway, tls, data_root):
    """A client can arrive after a postmaster died but before the task watching it has run
    (CI saw this after a disk-full PANIC): the connect retires the dead instance itself
    instead of reporting its own file lock as another process."""
    gateway.create_db("raced")
    dsn = conninfo(gateway.port, tls["ca"], "raced")
    assert psql(dsn, "create table t(x int); insert into t values (3)").returncode == 0
    inst = gateway.gw.instances.instances["raced"]

    async def unwatch():
        inst.watcher.cancel()
    gateway.call(unwatch)  # as if the exit had not been noticed yet
    os.kill(inst.process.pid, signal.SIGKILL)
    wait_until(lambda: inst.process.proc.returncode is not None, what="exit seen by the loop")
    assert gateway.running() == {"raced"}  # still listed: nothing has retired it
    out = psql(dsn, "select x from t")
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr
    new = gateway.gw.instances.instances["raced"]
    assert new is not inst and new.alive and inst.lock.fd is None
    assert gateway.gw.databases.state("raced").running


def test_instance_exiting_as_a_client_logs_in_restarts(gateway, tls):
    """The step before the one above (CI saw it after a disk-full PANIC): the postmaster has
    exited and its socket is unusable, but the loop has not noticed the exit yet, so the
    instance still looks alive. The login waits for the exit and starts a new postmaster
    instead of telling the client "could not reach the database server"."""
    gateway.create_db("exiting")
    dsn = conninfo(gateway.port, tls["ca"], "exiting")
    assert psql(dsn, "create table t(x int); insert into t values (4)").returncode == 0
    inst = gateway.gw.instances.instances["exiting"]
    child = inst.process.proc

    async def notice_late():  # the exit is seen 3 s late
        loop = asyncio.get_running_loop()
        loop.remove_reader(child._pidfd)
        loop.call_later(3, loop.add_reader, child._pidfd, child._on_exit)
    gateway.call(notice_late)
    os.kill(inst.process.pid, signal.SIGKILL)
    assert inst.alive  # not noticed yet
    out = psql(dsn, "select x from t")
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr
    new = gateway.gw.instances.instances["exiting"]
    assert new is not inst and new.alive and child.returncode == -signal.SIGKILL


@contextlib.contextmanager
def _crash_recovery_held(gw, dsn: str, db_id: str, release_after: float):
    """Crash a backend of `db_id` and hold the postmaster's crash recovery back for
    `release_after` seconds (recovery cannot begin until every backend has exited, and a
    SIGSTOPped one waits). Yields once the server itself refuses logins "in recovery mode"."""
    inst = gw.gw.instances.instances[db_id]
    with psycopg.connect(dsn, autocommit=True) as stuck, \
            psycopg.connect(dsn, autocommit=True) as crashing:
        stuck_pid = stuck.execute("select pg_backend_pid()").fetchone()[0]
        release = threading.Timer(0, lambda: None)
        os.kill(stuck_pid, signal.SIGSTOP)
        try:
            os.kill(crashing.execute("select pg_backend_pid()").fetchone()[0], signal.SIGKILL)

            async def probe():
                try:
                    # the gateway's admin logs in by peer: no SCRAM keys are ever asked for
                    never = asyncio.get_running_loop().create_future()
                    (await relay.login(inst.socket_path, {"user": dbroles.ADMIN, "database": "postgres"},
                                       5, never)).conn.close()
                except relay.BackendRefused as e:
                    return e.error.code, e.error.message
                except relay.BackendClosed:
                    pass  # a login caught as the crash recovery began
                return None
            wait_until(lambda: gw.call(probe) is not None, 10, "the crash to be seen")
            assert gw.call(probe) == ("57P03", "the database system is in recovery mode")
            release = threading.Timer(release_after, os.kill, (stuck_pid, signal.SIGCONT))
            release.start()
            yield
        finally:
            release.cancel()
            with contextlib.suppress(ProcessLookupError):  # it has gone once recovery began
                os.kill(stuck_pid, signal.SIGCONT)


def test_login_during_crash_recovery_waits_for_it(gateway, tls):
    """A backend crash sends the postmaster into crash recovery, and while it lasts Postgres
    refuses logins with 57P03 "in recovery mode" (CI saw this after a disk-full PANIC). The
    gateway asks again until the server accepts, so the client only sees a slower login."""
    gateway.create_db("recovering")
    dsn = conninfo(gateway.port, tls["ca"], "recovering")
    assert psql(dsn, "create table t(x int); insert into t values (5)").returncode == 0
    inst = gateway.gw.instances.instances["recovering"]
    with _crash_recovery_held(gateway, dsn, "recovering", release_after=2):
        began = time.monotonic()
        out = psql(dsn, "select x from t")
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
    assert time.monotonic() - began >= 1.5  # it did wait for the recovery
    assert gateway.gw.instances.instances["recovering"] is inst and inst.alive  # no restart


def test_login_during_crash_recovery_gives_up_after_start_timeout(start_gateway, tls):
    gw = start_gateway(start_timeout=2)
    gw.create_db("slowrec")
    dsn = conninfo(gw.port, tls["ca"], "slowrec")
    # (Postgres itself SIGKILLs backends that have not exited 5 s after the crash)
    with _crash_recovery_held(gw, dsn, "slowrec", release_after=6):
        began = time.monotonic()
        out = psql(dsn, "select 1")
        waited = time.monotonic() - began
    assert out.returncode != 0 and "the database system is in recovery mode" in out.stderr, out.stderr
    assert waited >= 1.5, waited  # it waited, then gave up before recovery ended
    assert psql(dsn, "select 1").returncode == 0  # and once recovery is done, logins work


def test_login_waiting_out_crash_recovery_ends_at_gateway_shutdown(start_gateway, tls, data_root,
                                                                   caplog):
    """A client waiting for crash recovery when the gateway shuts down is told so (57P01),
    and the postmaster that was recovering is stopped, not started again."""
    gw = start_gateway(shutdown_grace=10)
    gw.create_db("closing")
    dsn = conninfo(gw.port, tls["ca"], "closing")
    starts = gw.gw.instances.starts
    with _crash_recovery_held(gw, dsn, "closing", release_after=3):
        waiting = {}

        def client():
            waiting["out"] = psql(dsn, "select 1")
            waiting["told"] = time.monotonic()
        thread = threading.Thread(target=client)
        thread.start()
        wait_until(lambda: "refused a login for now" in caplog.text, 10, "the client to wait")
        began = time.monotonic()
        gw.stop()
        thread.join(30)
    out = waiting["out"]
    assert out.returncode != 0 and "the gateway is shutting down" in out.stderr, out.stderr
    assert waiting["told"] - began < 2, waiting["told"] - began  # not held for the grace
    assert gw.gw.instances.starts == starts and not gw.gw.instances.instances
    assert list(postmasters(data_root / "closing" / "pgdata")) == []


def test_cap_evicts_least_recently_used_idle(start_gateway, tls):
    gw = start_gateway(max_instances=2)
    for name in ("cap1", "cap2"):
        gw.create_db(name)
    assert gw.running() == {"cap1", "cap2"}
    psycopg.connect(conninfo(gw.port, tls["ca"], "cap1")).close()  # cap2 is now the LRU
    gw.create_db("cap3")
    assert gw.running() == {"cap1", "cap3"}


def test_cap_with_no_idle_instance_is_53300(start_gateway, tls):
    gw = start_gateway(max_instances=1)
    gw.create_db("only")
    gw.create_db("other")  # evicts "only" (idle)
    with psycopg.connect(conninfo(gw.port, tls["ca"], "other")):
        assert connect_sqlstate(gw.port, tls["ca"], "only") == "53300"
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(conninfo(gw.port, tls["ca"], "only"))
        assert "too many databases are active" in str(info.value)
