"""`pgsni serve --workers 2` (issue 17, every core of one machine): two gateway processes on one
port and one data root, with the default local-directory storage. The kernel spreads new
connections over the two (SO_REUSEPORT); the lease decides which worker serves a database, and
the other passes its clients' sockets to it. Worker 0 serves the admin port, whose metrics show
which path each client took."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from ..conftest import reachable_tmpdir, seed_template
from ..support.adminclient import AdminClient
from ..support.harness import conninfo, postmasters, wait_until
from ..support.ports import free_port
from .test_shutdown import DEV_PASSWORD, _connect, serve  # noqa: F401  (fixture)

CONNECTIONS = 16  # both workers get some of them, but for a chance of 2 in 2**16


@pytest.fixture
def workers(serve, data_root, template_pgdata):
    (data_root / ".worker-1").mkdir(mode=0o711)  # worker 1's own data root
    seed_template(data_root / ".worker-1", template_pgdata)
    admin = free_port()
    gp = serve(workers=2, admin_port=admin, log_level="INFO", idle_timeout=600.0)
    gp.admin = AdminClient(admin, token_file=data_root / ".admin-token")
    wait_until(lambda: gp.log().count("pgsni listening on") == 2, 60, "both workers listening")
    yield gp
    if gp.proc.poll() is None:  # the fixture kills what is left, the supervisor first
        for pid in children(gp.proc.pid):
            os.kill(pid, signal.SIGKILL)
    for pid in postmasters(data_root / ".worker-1" / "app1" / "pgdata"):
        os.kill(pid, signal.SIGKILL)
    socket_dir = f"/tmp/pgsni-x-{data_root.name[-8:]}"  # as the serve fixture sets it
    for extra in ("-1", "-w"):  # worker 1's instances' sockets, the workers' channel
        shutil.rmtree(socket_dir + extra, ignore_errors=True)


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def passed(gp, worker: str) -> dict[str, float]:
    """Clients `worker` passed to the other (out) or took from it (in), from worker 0's admin
    API, which serves both workers' metrics labelled by worker."""
    return {d: gp.admin.metric("pgsni_forwarded_clients_total", direction=d, worker=worker) for d in ("in", "out")}


def test_clients_reaching_either_worker_share_one_database(workers, tls):
    with _connect(workers, tls["ca"]) as conn:  # made on connect by one worker, which holds it
        conn.execute("create table t (n int)")
    for n in range(CONNECTIONS):
        with _connect(workers, tls["ca"]) as conn:
            conn.execute("insert into t values (%s)", (n,))
            assert conn.execute("select count(*) from t").fetchone()[0] == n + 1
    # every client reached the holder: some through the other worker, some not
    first = passed(workers, "0")
    assert 0 < first["in"] + first["out"] < CONNECTIONS + 1, workers.log()[-3000:]
    # what one worker passed, the other took (worker 1's figures arrive every 5 s; not all
    # zero, by the line above)
    wait_until(lambda: passed(workers, "0")["out"] == passed(workers, "1")["in"]
               and passed(workers, "1")["out"] == passed(workers, "0")["in"], 15, "worker 1's metrics")


CLIENT = """
import sys, threading, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    threading.Timer(0.5, conn.cancel).start()
    try:
        conn.execute("select pg_sleep(30)")
        print("not cancelled")
    except psycopg.Error as e:
        print(e.sqlstate)
"""


def test_a_cancel_reaching_the_other_worker_cancels_the_query(workers, tls):
    _connect(workers, tls["ca"]).close()
    dsn = conninfo(workers.port, tls["ca"], "app1", password=DEV_PASSWORD)

    def through_the_other() -> float:
        # worker 0 relayed a cancel to worker 1, or took one worker 1 relayed
        return (workers.admin.metric("pgsni_cancel_requests_total", result="relayed", worker="0")
                + workers.admin.metric("pgsni_link_requests_total", kind="cancel", result="done", worker="0"))

    rounds = 0
    while through_the_other() == 0:
        rounds += 1
        assert rounds <= 12, "no cancel request reached the worker without the session"
        out = subprocess.run([sys.executable, "-c", CLIENT, dsn], capture_output=True, text=True, timeout=40)
        assert out.stdout == "57014\n", out.stderr


def test_a_killed_worker_is_restarted_and_sigterm_drains_them_all(workers, serve, tls, data_root, template_pgdata):
    with _connect(workers, tls["ca"]) as conn:
        conn.execute("create table t (n int)")
        conn.execute("insert into t values (1)")
    before = children(workers.proc.pid)
    assert len(before) == 2
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(workers.proc.pid) - {victim}) == 2, 30, "the worker restarted")
    wait_until(lambda: workers.log().count("pgsni listening on") == 3, 60, "the new worker listening")
    for n in range(CONNECTIONS // 2):  # whichever worker held app1, it is served again
        deadline = time.monotonic() + 30
        while True:
            try:
                with _connect(workers, tls["ca"]) as conn:
                    conn.execute("insert into t values (%s)", (n,))
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, workers.log()[-3000:]
                time.sleep(0.5)
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.wait_exit(60) == 0, workers.log()[-3000:]
    assert "all workers stopped" in workers.log()
    for root in (data_root, data_root / ".worker-1"):
        assert postmasters(root / "app1" / "pgdata") == []
    # what they served is in storage: a single gateway on a fresh data root reads it back
    fresh = reachable_tmpdir("pgsni-fresh-")
    try:
        seed_template(fresh, template_pgdata)
        single = serve(data_root=str(fresh), storage_path=str(data_root / "_storage"))
        with _connect(single, tls["ca"]) as conn:
            assert conn.execute("select count(*) from t").fetchone()[0] == 1 + CONNECTIONS // 2
        single.proc.send_signal(signal.SIGTERM)
        assert single.wait_exit(60) == 0
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def test_workers_drain_when_their_supervisor_dies(workers, tls, data_root):
    with _connect(workers, tls["ca"]) as conn:
        conn.execute("create table t (n int)")
    pids = children(workers.proc.pid)
    workers.proc.kill()  # no chance to pass anything on: the kernel tells the workers
    workers.proc.wait(10)

    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "the workers stopped")
    for root in (data_root, data_root / ".worker-1"):
        assert postmasters(root / "app1" / "pgdata") == []
    assert workers.log().count("shutting down:") == 2, workers.log()[-3000:]  # each drained


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_clients_naming_the_database_in_options_reach_the_holder_through_either_worker(workers, tls):
    """No server name (connected by IP address), `options=endpoint=app1`: the database is known
    only after TLS, when the client's socket can no longer be passed; the worker it reached
    hands the session to the holder over a socket pair, and the holder serves it."""
    with _connect(workers, tls["ca"]) as conn:  # made on connect by one worker, which holds it
        conn.execute("create table t (n int)")
    before = {w: passed(workers, w) for w in ("0", "1")}
    for n in range(CONNECTIONS):
        with psycopg.connect(conninfo(workers.port, tls["ca"], None, password=DEV_PASSWORD,
                                      options="endpoint=app1", channel_binding="require"),
                             autocommit=True) as conn:
            conn.execute("insert into t values (%s)", (n,))
            assert conn.execute("select count(*) from t").fetchone()[0] == n + 1
    handed = sum(passed(workers, "0")[d] - before["0"][d] for d in ("in", "out"))
    assert 0 < handed < CONNECTIONS + 1, workers.log()[-3000:]  # some sessions went over the pair
