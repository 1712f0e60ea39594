"""A backend that never answers the login (its postmaster stopped: the socket still accepts,
no backend is forked): the client gets 57P03 after start_timeout, which says the server side
is late, not 08P01 blaming the client; the login that ran ahead during SCRAM gives up the same
way and the session's own attempt is the one that answers; the database serves again once the
postmaster runs."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from ..support.harness import connect_sqlstate, conninfo


@pytest.mark.slow
def test_a_login_the_backend_never_answers_is_57P03(start_gateway, tls):
    gw = start_gateway(start_timeout=2.0, auth_cache_seconds=300)  # roles stay as read at start
    gw.create_db("slow")
    with psycopg.connect(conninfo(gw.port, tls["ca"], "slow")):
        pass  # running, with its roles read: the next client's early login will be tried
    early = gw.gw.early_logins_started
    postmaster = gw.gw.instances.instances["slow"].process.pid
    os.kill(postmaster, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(conninfo(gw.port, tls["ca"], "slow"))
        took = time.monotonic() - began
        assert "did not finish the login in time" in str(refused.value)
        assert "waiting for the client" not in str(refused.value)
        assert 2.0 <= took < 8.0, took  # the early login's wait and then the session's own
        assert gw.gw.early_logins_started == early + 1
        assert connect_sqlstate(gw.port, tls["ca"], "slow") == "57P03"
    finally:
        os.kill(postmaster, signal.SIGCONT)
    with psycopg.connect(conninfo(gw.port, tls["ca"], "slow")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
