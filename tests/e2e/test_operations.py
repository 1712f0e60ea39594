"""The lifecycle operations (`gateway/ops/operations.py`) inside a running gateway, as its admin
API calls them: a database with clients is refused (`busy`) unless forced; an idle running
one is stopped through the manager first (saved for snapshot and restore, discarded for
delete). A snapshot of a database that ships its WAL is an online base backup instead, unless
asked to stop it (tests/e2e/test_base_backups.py)."""

from __future__ import annotations

import psycopg
import pytest

from gateway.ops.results import OperationError
from gateway.ops.operations import Ops

from ..support.harness import conninfo, postmasters, wait_until

pytestmark = pytest.mark.slow


def _ops(gw) -> Ops:
    g = gw.gw
    return Ops(gw.settings, g.catalog, g.databases, g.instances)


def _idle(gw, db_id: str = "app1") -> None:
    """Wait until the gateway has seen the last client of `db_id` go (it learns asynchronously)."""
    insts = gw.gw.instances.instances
    wait_until(lambda: db_id not in insts or insts[db_id].clients == 0, what="the client to go")


def test_running_database_snapshot_restore_delete(gateway, tls, data_root):
    gateway.create_db("app1")
    ops = _ops(gateway)
    first = gateway.call(lambda: ops.snapshot("app1"))
    assert first.saved and first.stopped  # create leaves it running: stopped and saved
    dsn = conninfo(gateway.port, tls["ca"], "app1")

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(v int); insert into t values (1)")
        for call in (lambda: ops.snapshot("app1", stop=True), lambda: ops.delete("app1"),
                     lambda: ops.restore("app1", first.version)):
            with pytest.raises(OperationError) as e:
                gateway.call(call)
            assert e.value.kind == "busy" and e.value.status == 409
        info = gateway.call(lambda: ops.info("app1"))
        assert info.running and info.connections == 1 and info.to_dict()["connections"] == 1

    _idle(gateway)
    # the client is gone: snapshot stops the instance through the manager and saves it
    second = gateway.call(lambda: ops.snapshot("app1", stop=True))
    assert second.stopped and second.saved and second.version != first.version
    assert "app1" not in gateway.running()
    versions = gateway.call(lambda: ops.versions("app1"))
    assert [v.current for v in versions] == [False, True]

    with psycopg.connect(dsn) as conn:  # wakes it again
        assert conn.execute("select v from t").fetchone() == (1,)
    _idle(gateway)
    back = gateway.call(lambda: ops.restore("app1", first.version))
    assert back.stopped and back.base == first.version  # held by a new version over stored WAL
    with psycopg.connect(dsn) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select v from t")
    _idle(gateway)

    gone = gateway.call(lambda: ops.delete("app1"))
    assert gone.stopped and gone.local_removed
    assert postmasters(data_root / "app1" / "pgdata") == []
    with pytest.raises(OperationError) as e:
        gateway.call(lambda: ops.info("app1"))
    assert e.value.kind == "not_found" and e.value.to_dict()["error"] == "not_found"


def test_errors_have_kinds(gateway):
    ops = _ops(gateway)
    gateway.create_db("app1")
    cases = [(lambda: ops.info("Bad_Id"), "invalid"), (lambda: ops.delete("nope"), "not_found"),
             (lambda: ops.fork("app1", "app1"), "conflict"),
             (lambda: ops.restore("app1", "19990101T000000.000Z-000000"), "not_found"),
             (lambda: ops.create("app2", owner="Not A Role"), "invalid")]
    for call, kind in cases:
        with pytest.raises(OperationError) as e:
            gateway.call(call)
        assert e.value.kind == kind, (kind, e.value)
