"""Drains in a fleet (issue 17): a gateway told to shut down (SIGTERM) saves and gives up its
databases and hands its new clients to the others. Three gateways on one moto bucket; A holds
a database with a session open, so its drain lasts its shutdown_grace; clients arriving
meanwhile at A, B and C are all served, by the one successor every gateway picks, once A has
saved the database and let it go."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from ..support.harness import conninfo
from .test_cancel_fleet import cluster_dir, fleet  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def connect(gt, tls, db: str = "app1", **extra) -> psycopg.Connection:
    return psycopg.connect(conninfo(gt.port, tls["ca"], db, **extra), autocommit=True, connect_timeout=30)


def test_a_draining_holder_hands_new_clients_to_one_successor_and_loses_nothing(fleet, tls):
    a, b, c = fleet
    a.create_db("app1")
    held = connect(a, tls)
    held.execute("CREATE TABLE t (via text)")
    held.execute("INSERT INTO t VALUES ('before')")
    draining = asyncio.run_coroutine_threadsafe(a.gw.shutdown(), a.loop)
    deadline = time.monotonic() + 5
    while not a.gw.proxy.shutting_down:
        assert time.monotonic() < deadline, "A did not begin to shut down"
        time.sleep(0.01)
    time.sleep(0.3)  # its heartbeat says it drains (the session open keeps it at it for 2 s)
    results: dict[str, object] = {}

    def client(gt, via: str) -> None:
        try:
            with connect(gt, tls) as conn:
                conn.execute("INSERT INTO t VALUES (%s)", (via,))
                results[via] = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        except Exception as e:  # noqa: BLE001  (reported below)
            results[via] = e

    threads = [threading.Thread(target=client, args=(gt, via)) for gt, via in ((a, "a"), (b, "b"), (c, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    draining.result(60)
    held.close()
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    successors = [gt for gt in (b, c) if "app1" in gt.gw.instances.instances]
    assert len(successors) == 1, "one gateway took the database over"
    with connect(successors[0], tls) as conn:
        rows = sorted(r[0] for r in conn.execute("SELECT via FROM t").fetchall())
    assert rows == ["a", "b", "before", "c"]
    assert a.gw.fleet is None or not a.gw.instances.instances
