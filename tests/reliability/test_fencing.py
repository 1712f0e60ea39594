"""A gateway whose lease heartbeat cannot reach storage stops its databases before any other
gateway may take them over (storage/leases.py): every instance at once, without waiting on
saves against the dead store; the saves follow once storage is back, under a fresh lease."""

from __future__ import annotations

import time

import psycopg

from ..support.harness import conninfo, wait_until

TTL = 6.0  # margin = ttl/6 = 1 s: fenced within ttl - margin of the last heartbeat


def test_a_hanging_store_fences_every_instance_in_time(start_gateway, s3_settings, s3_proxy, tls):
    gw = start_gateway(**s3_settings, lease_seconds=TTL)
    for db_id in ("fence1", "fence2", "fence3"):
        gw.create_db(db_id)
        with psycopg.connect(conninfo(gw.port, tls["ca"], db_id), autocommit=True) as conn:
            conn.execute("create table t(x int); insert into t values (1)")  # unsaved changes
    leases = gw.gw.instances.leases
    wait_until(lambda: leases.valid(), what="a heartbeat")
    s3_proxy.delay = 3600.0  # the store accepts connections and never answers
    hung = time.monotonic()
    last_beat = leases._beat_at
    # others may take over once the heartbeat is ttl + margin old; the holder must be gone by
    # ttl - margin, checked here with a second of slack for scheduling
    deadline = last_beat + TTL - leases.margin + 1.0
    wait_until(lambda: gw.running() == set(), timeout=30, what="every instance fenced")
    fenced = time.monotonic()
    assert fenced <= deadline, (f"fenced {fenced - hung:.1f} s after the store hung, "
                                f"{fenced - last_beat:.1f} s after the last heartbeat (ttl {TTL})")
    for db_id in ("fence1", "fence2", "fence3"):
        assert gw.gw.databases.state(db_id).dirty  # kept, to be saved later

    s3_proxy.delay = 0.0  # storage is back: the copies are saved under a fresh lease
    gw.call(gw.gw.instances.maintain, timeout=120)
    for db_id in ("fence1", "fence2", "fence3"):
        assert not gw.gw.databases.state(db_id).dirty, db_id
        with psycopg.connect(conninfo(gw.port, tls["ca"], db_id)) as conn:
            assert conn.execute("select x from t").fetchall() == [(1,)]
