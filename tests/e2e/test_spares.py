"""A running gateway keeps `spare_clones` ready copies of the template after a create, and
the next create takes one (a rename instead of a copy)."""

from __future__ import annotations

from storage.local import SPARE

from ..support.harness import conninfo, psql, wait_until


def _spares(root) -> list:
    return [p for p in root.iterdir() if p.name.startswith(SPARE) and not p.name.startswith(f"{SPARE}tmp")]


def test_gateway_refills_spares_and_creates_from_them(start_gateway, tls, data_root):
    gw = start_gateway(spare_clones=2)
    gw.create_db("first")
    wait_until(lambda: len(_spares(data_root)) == 2, what="two spare clones")
    before = {p.name for p in _spares(data_root)}
    gw.create_db("second")  # takes one of them
    assert psql(conninfo(gw.port, tls["ca"], "second"), "select 1").stdout.strip() == "1"
    wait_until(lambda: len(_spares(data_root)) == 2, what="the spare to be refilled")
    assert {p.name for p in _spares(data_root)} != before
    assert gw.gw.catalog.list() == ["first", "second"]
