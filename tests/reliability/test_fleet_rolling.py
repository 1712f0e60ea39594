"""A rolling restart of a fleet under load (issue 17): three gateway processes on one moto
bucket behind a load balancer (tests/support/tcpproxy.py: each connection to the next gateway
that accepts it, as Fly's proxy or any balancer retries another machine). Writers insert rows
in autocommit through the balancer, reconnecting when their session ends. Each gateway in turn
gets SIGTERM, drains (saves and gives up its databases, hands new clients to the others) and is
started again. No connection attempt fails, and every acknowledged row is there at the end;
sessions on a draining holder end (57P01, as for any Postgres shut down) and reconnect."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from ..support.harness import conninfo
from ..support.tcpproxy import TCPProxy
from .test_fleet_failover import PASSWORD, Writer, gateways

pytestmark = pytest.mark.slow

DATABASES = ("app1", "app2")
SETTLE = 4.0  # after a gateway is back, before the next one goes: its heartbeat is seen by all


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rolling_restart_fails_no_connection_attempt_and_loses_no_commit(tls, s3_settings, tmp_path, workers):
    """With 2 workers, each machine's workers hand clients to each other over their local
    channel and reach the other machines over links on port + i (gateway/workers.py): the
    SIGTERM goes to `pgsni serve`, which drains every worker of the machine at once."""
    fleet = gateways(tls, s3_settings, tmp_path, shutdown_grace=2.0, workers=workers)
    balancer = None
    try:
        for g in fleet:
            g.start()
        balancer = TCPProxy([g.port for g in fleet])
        dsns = {db: conninfo(balancer.port, tls["ca"], db, password=PASSWORD) for db in DATABASES}
        for db in DATABASES:
            with psycopg.connect(dsns[db], autocommit=True) as conn:
                conn.execute("create table t (client int not null, seq int not null, primary key (client, seq))")
        stop = threading.Event()
        writers = [Writer(i, [dsns[DATABASES[i % len(DATABASES)]]], stop, connect_timeout=60) for i in range(4)]
        for w in writers:
            w.start()
        time.sleep(3.0)
        for g in fleet:
            marks = [len(w.acked) for w in writers]
            assert g.terminate() == 0, g.process.log()[-3000:]
            g.start()
            time.sleep(SETTLE)
            assert all(len(w.acked) > m for w, m in zip(writers, marks)), \
                [w.errors[-3:] for w in writers]
        stop.set()
        for w in writers:
            w.join(60)
        print(f"\nFLEET rolling restart: acknowledged {[len(w.acked) for w in writers]}, sessions ended "
              f"{[len(w.errors) - len(w.connect_failures) for w in writers]}, connection attempts failed "
              f"{[len(w.connect_failures) for w in writers]}, balancer found no gateway {balancer.refused} times")
        if workers > 1:  # each machine ran its workers (and each start of it did)
            assert all(g.process.log().count(f"worker {workers - 1} started") >= 2 for g in fleet)
        assert not [w.connect_failures for w in writers if w.connect_failures], \
            [w.connect_failures[:3] for w in writers]
        assert balancer.refused == 0
        for db in DATABASES:
            with psycopg.connect(dsns[db], autocommit=True) as conn:
                rows = set(conn.execute("select client, seq from t").fetchall())
            lost = [(w.client, s) for w in writers if w.dsns == [dsns[db]] for s in w.acked if (w.client, s) not in rows]
            assert not lost, f"{db}: {len(lost)} acknowledged commits lost: {lost[:5]}"
    finally:
        if balancer is not None:
            balancer.close()
        for g in fleet:
            g.stop()
