"""Attacks on the fleet surfaces (docs/fleet.md): the links between gateways, forwarding, the
workers' channel, cancel keys across gateways. Each test reproduces one defect found in a
review; it fails on the code that has the defect."""

from __future__ import annotations

import psycopg
import pytest

from ..e2e.conftest import fleet_settings  # noqa: F401  (fixture)
from ..e2e.conftest import s3_proxy, s3_settings  # noqa: F401  (fixtures)
from ..e2e.test_cancel_fleet import cluster_dir, fleet  # noqa: F401  (fixtures)
from ..storage.conftest import _moto_session, moto_server  # noqa: F401  (fixtures)
from ..support.harness import conninfo

pytestmark = pytest.mark.slow


def connect(gt, tls, db: str = "app1", **extra) -> psycopg.Connection:
    return psycopg.connect(conninfo(gt.port, tls["ca"], db, **extra), autocommit=True)


@pytest.mark.parametrize("cap, refusal", [("per_ip", "too many connections from"),
                                          ("total", "at its connection limit")])
def test_the_forwarding_gateways_connection_caps_hold_for_clients_it_forwards(fleet, tls, cap, refusal):
    """A gateway's connection caps (max_connections_per_ip, max_client_connections) are
    checked at accept, and a refused client gets 53300 after its startup message. A client
    whose ClientHello names a database another gateway holds is handed over before that:
    the refusal was dropped, the client forwarded and spliced for as long as it likes, and
    not even counted. So one IP holds any number of connections (each a socket pair, a
    link and its handshake) on a gateway whose cap says 1, and a gateway at its total cap
    still opens a link for every new client of the databases the others hold. The
    `endpoint=` path (handed after TLS) does raise the refusal first: the SNI path should
    too."""
    a, b, _ = fleet
    a.create_db("app1")  # held and run by A
    b.create_db("app2")  # held and run by B
    limits = b.gw.proxy.limits
    counter = getattr(limits, cap)
    counter.limit = 1  # B: one connection at a time (from one address, or at all)
    key = "127.0.0.1" if cap == "per_ip" else None
    with connect(a, tls):
        with connect(b, tls, "app2") as held:  # the one connection 127.0.0.1 may hold on B
            assert held.execute("SELECT 1").fetchone() == (1,)
            assert counter[key] == 1
            # the cap works for a database B serves itself: refused
            with pytest.raises(psycopg.OperationalError, match=refusal):
                connect(b, tls, "app2")
            # ... and for a client that names its database only in options (handed after TLS)
            with pytest.raises(psycopg.OperationalError, match=refusal):
                psycopg.connect(conninfo(b.port, tls["ca"], None, options="endpoint=app1"),
                                autocommit=True).close()
            forwarded_before = b.gw.fleet.forwarding.forwarded
            # the same address, a database A holds, named by SNI: forwarded despite the cap
            over = []
            try:
                for _ in range(3):
                    over.append(connect(b, tls))
                    assert over[-1].execute("SELECT 1").fetchone() == (1,)
            except psycopg.OperationalError as e:
                assert refusal in str(e)
            finally:
                extra, counted = len(over), counter[key]
                for conn in over:
                    conn.close()
            assert b.gw.fleet.forwarding.forwarded > forwarded_before or extra == 0  # path taken
            assert extra == 0, (f"B's {cap} cap of 1 connection was reached, yet {extra} more clients were "
                                f"forwarded through B to A and served (B counted {counted})")
