"""pg8000 (pure Python) through the gateway: SNI (through its `sock` argument), the endpoint
option, prepared statements, COPY, NOTIFY's pid, pg_terminate_backend and SCRAM-SHA-256-PLUS."""

from __future__ import annotations

import io
import re
import socket
import struct
from contextlib import suppress

import pytest

from .conftest import INSTALL_HINT, tls_openings
from .contract import EXTENDED_SQL, LANDING_SQL, PREPARED_SQL, TEXT, ClientContract, copy_data, landing

native = pytest.importorskip("pg8000.native", reason=f"pg8000 is not installed: {INSTALL_HINT}")


def connect(target, sni: bool = True):
    if sni:
        # pg8000 sends SNI for `host` also when handed a socket: connect that to 127.0.0.1
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=20)
        return native.Connection(target.user, host=target.sni_name, sock=sock, password=target.password,
                                 database="postgres", ssl_context=target.ssl_context(), timeout=20)
    return native.Connection(target.user, host="127.0.0.1", port=target.port, password=target.password,
                             database="postgres", ssl_context=target.ssl_context(), timeout=20,
                             startup_params={"options": f"endpoint={target.db}"})


def backend_pid(con) -> int:
    # pg8000 keeps BackendKeyData (pid, secret) but has no public accessor for it
    return struct.unpack("!i", con._backend_key_data[:4])[0]


def named(sql: str) -> str:
    """pg8000.native takes :name parameters: $1 becomes :p1."""
    return re.sub(r"\$(\d+)", r":p\1", sql)


def landing_of(con) -> dict:
    with con:
        return landing(con.run(LANDING_SQL)[0])


def sni(target) -> dict:
    return landing_of(connect(target))


def endpoint(target) -> dict:
    return landing_of(connect(target, sni=False))


def extended(target) -> dict:
    with connect(target) as con:
        (total, text, null), = con.run(named(EXTENDED_SQL), p1=40, p2=2, p3=TEXT, p4=None)
        ps = con.prepare(named(PREPARED_SQL))  # a named statement on the server
        prepared = [ps.run(p1=1)[0][0], ps.run(p1=2)[0][0]]
        (count,), = con.run("select count(*) from pg_prepared_statements")
        return {"sum": total, "text": text, "null": null, "prepared": prepared, "server_prepared": count}


def copy(target) -> dict:
    with connect(target) as con:
        con.run("create temp table t(id int, v text)")
        con.run("copy t from stdin", stream=io.StringIO(copy_data()))
        (rows, total), = con.run("select count(*), sum(id) from t")
        out = io.StringIO()
        con.run("copy (select * from t order by id) to stdout", stream=out)
        lines = out.getvalue().splitlines()
        return {"rows_in": rows, "sum_in": total, "out_lines": len(lines),
                "out_first": lines[0], "out_last": lines[-1]}


def notify(target) -> dict:
    with connect(target) as con:
        con.run("listen pg8000_ch")
        con.run("notify pg8000_ch, 'hello'")
        note_pid, _channel, payload = con.notifications.popleft()
        return {"pid": backend_pid(con), "sql_pid": con.run("select pg_backend_pid()")[0][0],
                "note_pid": note_pid, "payload": payload}


def terminate(target) -> dict:
    con, other = connect(target), connect(target)
    try:
        pid, sql_pid = backend_pid(con), con.run("select pg_backend_pid()")[0][0]
        # with a timeout it returns once the backend is gone, so the next query cannot race it
        (terminated,), = other.run("select pg_terminate_backend(:p, 5000)", p=pid)
        try:
            con.run("select 1")
            failed, detail = False, ""
        except (native.DatabaseError, native.InterfaceError) as e:
            failed, detail = True, str(e)
        return {"pid": pid, "sql_pid": sql_pid, "terminated": terminated, "failed": failed, "detail": detail}
    finally:
        other.close()
        with suppress(native.InterfaceError):  # saying goodbye on a dead socket
            con.close()


def channel_binding(target) -> dict:
    with connect(target) as con:
        # pg8000 picks SCRAM-SHA-256-PLUS by itself whenever TLS is on and the server offers it
        return {"mechanism": con.auth.mechanism_name, "one": con.run("select 1")[0][0]}


SCENARIOS = {f.__name__: f for f in (sni, endpoint, extended, copy, notify, terminate, channel_binding)}


@pytest.fixture
def scenario(target):
    def run(name: str) -> dict:
        with tls_openings() as seen:
            result = SCENARIOS[name](target)
        return {**result, "openings": seen}
    return run


class TestPg8000(ClientContract):
    TERMINATE_SAYS_WHY = False  # pg8000 reports "network error", as on a direct connection
    UNSUPPORTED = {
        "cancel": "pg8000 has no cancel API (no CancelRequest; users run pg_cancel_backend from another session)",
        "direct_tls": "pg8000 1.31 always sends SSLRequest first (no direct TLS / sslnegotiation option)",
    }

