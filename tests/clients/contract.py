"""The scenarios every client module runs through the gateway and the checks on their results:
a module supplies `scenario` (name -> result dict) and subclasses ClientContract."""

from __future__ import annotations

# Each scenario's result, whoever produces it (a Python function, or a script printing JSON):
#   sni, endpoint, direct_tls  {server_name, data_directory, tls}: LANDING_SQL's three columns,
#                on a connection made with SNI / with options=endpoint=<id> and no SNI / with
#                direct TLS (ALPN "postgresql")
#   extended     {sum, text, null, prepared, server_prepared}: EXTENDED_SQL with parameters
#                (40, 2, TEXT, null); a prepared statement PREPARED_SQL run with 1 then 2; then
#                count(*) from pg_prepared_statements on that connection
#   copy         {rows_in, sum_in, out_lines, out_first, out_last}: copy_data() into
#                `create temp table t(id int, v text)` with COPY FROM STDIN; count(*), sum(id);
#                then COPY (select * from t order by id) TO STDOUT: line count, first and last
#   notify       {pid, sql_pid, note_pid, payload}: the backend pid as the library reports it,
#                pg_backend_pid(), and the sender pid of the connection's own
#                `notify <channel>, 'hello'` received after `listen <channel>`
#   cancel       {sqlstate, seconds, after}: the library's cancel of a running CANCEL_SQL: the
#                error's SQLSTATE, seconds from sending the query to the error, then `select 1`
#   terminate    {pid, sql_pid, terminated, failed, detail}: a second session runs
#                pg_terminate_backend(pid as the library reports it, 5000) (the timeout: it
#                returns once the backend is gone); then the first runs `select 1`: did it
#                fail, and with what error
#   channel_binding  {mechanism, one}: the SASL mechanism used and `select 1`
# Scripts put "error" in the result of a scenario that raised. Scenarios a client cannot do are
# in its class's UNSUPPORTED, with the reason.

import pytest

LANDING_SQL = ("select current_setting('pgsni.server_name'), current_setting('data_directory'), "
               "current_setting('pgsni.tls')")
EXTENDED_SQL = "select $1::int + $2::int, $3::text, $4::text"
PREPARED_SQL = "select $1::int + 10"
TEXT = "héllo wörld ✓"
CANCEL_SQL = "select pg_sleep(30)"
COPY_ROWS = 20000
PLUS = "SCRAM-SHA-256-PLUS"


def copy_line(i: int) -> str:
    return f"{i}\trow {i} é"


def copy_data() -> str:
    """What scripts COPY in; they build the same text themselves: "<i>\\trow <i> é\\n", i=1..N."""
    return "".join(copy_line(i) + "\n" for i in range(1, COPY_ROWS + 1))


def script_env() -> dict[str, str]:
    """The constants above, for scenario scripts in other languages (PGSNI_* variables)."""
    return {"PGSNI_LANDING_SQL": LANDING_SQL, "PGSNI_EXTENDED_SQL": EXTENDED_SQL,
            "PGSNI_PREPARED_SQL": PREPARED_SQL, "PGSNI_TEXT": TEXT, "PGSNI_CANCEL_SQL": CANCEL_SQL,
            "PGSNI_COPY_ROWS": str(COPY_ROWS)}


def landing(row) -> dict:
    server_name, data_directory, tls = row
    return {"server_name": server_name, "data_directory": data_directory, "tls": tls}


def assert_lands(r: dict, target, server_name: str) -> None:
    """A landing result is the target's database, reached over TLS with this SNI ('' for none)."""
    # pgsni.server_name is the SNI the gateway saw, so it tells the two routes apart
    assert r["server_name"] == server_name
    assert f"/{target.db}/" in r["data_directory"]  # <data_root>/<id>/...: this database's own server
    assert r["tls"] == "on"


class ClientContract:
    """Mixin of the contract's tests; subclasses are named Test<Client>."""

    UNSUPPORTED: dict[str, str] = {}
    # whether the client's error after pg_terminate_backend carries Postgres' FATAL message (as
    # on a direct connection) or only says the connection is gone
    TERMINATE_SAYS_WHY = True

    def result(self, scenario, name: str, feature: str | None = None) -> dict:
        """The scenario's result, or a skip when the client cannot do it (or `feature` of it)."""
        for key in (name, feature):
            if key in self.UNSUPPORTED:
                pytest.skip(self.UNSUPPORTED[key])
        r = scenario(name)
        if r.get("error"):
            pytest.fail(f"scenario {name!r} failed in the client: {r['error']}", pytrace=False)
        return r

    def test_connect_with_sni(self, scenario, target):
        assert_lands(self.result(scenario, "sni"), target, target.sni_name)

    def test_connect_with_endpoint_option(self, scenario, target):
        assert_lands(self.result(scenario, "endpoint"), target, "")

    def test_extended_protocol(self, scenario, target):
        r = self.result(scenario, "extended")
        assert (r["sum"], r["text"], r["null"]) == (42, TEXT, None)
        assert r["prepared"] == [11, 12]
        assert r["server_prepared"] >= 1  # a named statement lives on the backend

    def test_copy_both_ways(self, scenario, target):
        r = self.result(scenario, "copy")
        assert (r["rows_in"], r["sum_in"]) == (COPY_ROWS, COPY_ROWS * (COPY_ROWS + 1) // 2)
        assert r["out_lines"] == COPY_ROWS
        assert (r["out_first"], r["out_last"]) == (copy_line(1), copy_line(COPY_ROWS))

    def test_notify_reaches_own_connection(self, scenario, target):
        r = self.result(scenario, "notify")
        assert r["pid"] == r["sql_pid"]
        assert r["payload"] == "hello"

    def test_notify_sender_is_own_backend(self, scenario, target):
        r = self.result(scenario, "notify", feature="notify_sender_pid")
        assert r["note_pid"] == r["pid"] == r["sql_pid"]  # libraries skip their own notifications by this

    def test_cancel(self, scenario, target):
        r = self.result(scenario, "cancel")
        assert r["sqlstate"] == "57014", r
        assert r["seconds"] < 10
        assert r["after"] == 1  # the connection survives a cancel

    def test_terminate_backend(self, scenario, target):
        r = self.result(scenario, "terminate")
        assert r["pid"] == r["sql_pid"]
        assert r["terminated"] is True
        assert r["failed"] is True, r
        if self.TERMINATE_SAYS_WHY:  # the gateway relays the backend's FATAL before closing
            assert "terminating connection due to administrator command" in r["detail"]

    def test_channel_binding(self, scenario, target):
        r = self.result(scenario, "channel_binding")
        assert r["mechanism"] == PLUS
        assert r["one"] == 1

    def test_direct_tls(self, scenario, target):
        r = self.result(scenario, "direct_tls")
        assert_lands(r, target, target.sni_name)
        assert r["openings"], "no TLS opening seen: did gateway/proxy/server.py's 'TLS from' debug line change?"
        assert (True, target.sni_name, "postgresql") in r["openings"]
