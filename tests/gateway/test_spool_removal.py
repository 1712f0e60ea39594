"""A deleted database's WAL spools go (one per version its WAL continued), with what the
earlier pg_receivewal-based shipper kept beside them (gateway/compute/durability.py
drop_spool), and nothing of another database's."""

from __future__ import annotations

from gateway.compute.durability import drop_spool, spool_of


def test_a_dropped_spool_takes_its_backlogs_and_log_and_nothing_else(tmp_path):
    spool = spool_of(tmp_path, "app")
    for d in (spool / "v1", spool / "v2", spool.with_name("app.backlog-1"), spool_of(tmp_path, "app-2") / "v1"):
        d.mkdir(parents=True)
        (d / "000000010000000000000001.00000000.part").write_bytes(b"wal")
    for f in ("app.log", "app.log.1", "app-2.log"):
        spool.with_name(f).write_text("receiver log")
    drop_spool(tmp_path, "app")
    assert sorted(p.name for p in spool.parent.iterdir()) == ["app-2", "app-2.log"]
