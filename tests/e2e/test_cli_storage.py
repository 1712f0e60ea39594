"""The storage verbs of the CLI against a real data root and storage: versions, snapshot,
restore (roll-back, undoable), and listing databases that live only in storage."""

from __future__ import annotations

import json
import shutil

import psycopg

from ..support.harness import conninfo, psql
from .test_cli import _password, cli  # noqa: F401  (fixture)


def _versions(cli) -> list[dict]:
    out = cli("--json", "db", "versions", "app1")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_versions_snapshot_restore_round_trip(cli, start_gateway, tls, data_root):
    created = cli("db", "create", "app1")
    assert created.returncode == 0, created.stderr
    password = _password(created.stdout)
    first = _versions(cli)
    assert len(first) == 1 and first[0]["current"]
    assert "nothing to do" in cli("db", "snapshot", "app1").stdout  # unchanged since creation

    gw = start_gateway()
    dsn = conninfo(gw.port, tls["ca"], "app1", password=password)
    assert psql(dsn, "create table t(v text); insert into t values ('later')").returncode == 0
    refused = cli("db", "restore", "app1", "--version", first[0]["version"])
    assert refused.returncode != 0 and "in use" in refused.stderr  # the gateway has it open
    gw.stop()  # stopping saves the change as a new version

    second = _versions(cli)
    assert len(second) == 2 and second[-1]["current"]
    back = cli("db", "restore", "app1", "--version", first[0]["version"])
    assert back.returncode == 0, back.stderr
    # the gateway shipped WAL after the first version (durability=async): the restored copy
    # starts a new timeline and is stored as a new version holding the first one's data
    assert f"(version {first[0]['version']} on a new timeline)" in back.stdout
    assert [v["current"] for v in _versions(cli)] == [False, False, True]

    gw = start_gateway()
    dsn = conninfo(gw.port, tls["ca"], "app1", password=password)
    assert "does not exist" in psql(dsn, "select * from t").stderr
    gw.stop()
    assert cli("db", "restore", "app1", "--version", second[-1]["version"]).returncode == 0
    gw = start_gateway()
    with psycopg.connect(conninfo(gw.port, tls["ca"], "app1", password=password)) as conn:
        assert conn.execute("select v from t").fetchone() == ("later",)


def test_restore_unknown_version_is_a_clear_error(cli):
    assert cli("db", "create", "app1").returncode == 0
    out = cli("db", "restore", "app1", "--version", "19990101T000000.000Z-000000")
    assert out.returncode != 0 and "Error" in out.stderr
    assert len(_versions(cli)) == 1  # nothing changed


def test_list_shows_databases_only_in_storage(cli, data_root):
    assert cli("db", "create", "app1").returncode == 0
    shutil.rmtree(data_root / "app1")
    out = cli("db", "list")
    assert out.stdout.split() == ["app1", "stored"]
    assert "no local copy" in cli("db", "snapshot", "app1").stderr
