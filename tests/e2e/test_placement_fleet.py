"""Placement by load (issue 17): a database nobody holds is started where its client arrives,
unless that gateway is full (max_instances running, none idle to stop) and another has room:
the client is then forwarded there, and that gateway starts the database."""

from __future__ import annotations

import time

import psycopg
import pytest

from ..support.harness import conninfo
from .test_cancel_fleet import cluster_dir, fleet  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet_settings() -> dict:
    return {"max_instances": 1}


def connect(gt, tls, db: str) -> psycopg.Connection:
    return psycopg.connect(conninfo(gt.port, tls["ca"], db), autocommit=True)


def test_a_full_gateway_places_a_new_client_on_a_gateway_with_room(fleet, tls):
    a, b, c = fleet
    for db in ("app1", "app2"):  # both in storage, nobody holding them
        a.create_db(db)
        a.call(lambda db=db: a.gw.instances.stop(db))
    deadline = time.monotonic() + 10
    while a.call(lambda: a.gw.instances.leases.holder_of("app2")) is not None:
        assert time.monotonic() < deadline, "A did not give the lease up"
        time.sleep(0.1)
    with connect(a, tls, "app1") as busy:  # A's one slot, in use
        busy.execute("SELECT 1")
        with connect(a, tls, "app2") as placed:
            assert placed.execute("SELECT current_database()").fetchone() == ("postgres",)
            where = [gt for gt in (b, c) if "app2" in gt.gw.instances.instances]
        assert "app2" not in a.gw.instances.instances and len(where) == 1
        assert a.gw.fleet.forwarding.forwarded == 1
