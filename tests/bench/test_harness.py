"""Smoke run of the benchmark harness with the smallest settings: every suite starts what it
needs, finishes, and writes JSON with the expected keys and positive numbers, and the charts
render. Keeps `python -m bench` working; the figures themselves mean nothing at this size."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

needs = pytest.mark.skipif(not shutil.which("pgbench") or not shutil.which("psql"),
                           reason="pgbench and psql (postgresql-client-15) are needed")


def _doc(out, suite):
    doc = json.loads((out / f"{suite}.json").read_text())
    assert doc["suite"] == suite and doc["machine"]["cores"] >= 1
    return doc["results"]


@needs
def test_datapath(tmp_path):
    from bench import datapath

    datapath.run(runs=1, quick=True, out=tmp_path, seconds=1, clients=(2,), bulk_mb=2, scale=1)
    res = _doc(tmp_path, "datapath")
    assert {r["mode"] for r in res["pgbench"]} == {"select-only", "tpcb-like"}
    for r in res["pgbench"]:
        for t in ("pgsni", "direct", "pgbouncer"):
            assert r[f"{t}_tps"] > 0 and r[f"{t}_p50_ms"] > 0 and r[f"{t}_p99_ms"] >= r[f"{t}_p50_ms"]
        assert r["tps_vs_direct"] > 0 and r["tps_vs_pgbouncer"] > 0
        assert r["pgsni_rss_peak_mb"] > 0 and r["pgsni_cpu_cores"] >= 0
    assert [b["mode"] for b in res["bulk"]] == ["copy-out", "copy-in"]
    for b in res["bulk"]:
        assert b["pgsni_mb_s"] > 0 and b["direct_mb_s"] > 0 and b["pgbouncer_mb_s"] > 0
        assert b["pgsni_rss_peak_mb"] > 0 and b["pgsni_rss_trace"]
    from bench import charts

    made = charts.render(tmp_path, ["datapath"])
    assert [p.name for p in made] == ["datapath.png", "bulk.png"]


@needs
def test_connect(tmp_path):
    from bench import connect

    connect.run(runs=1, quick=True, out=tmp_path, seconds=1, clients=2)
    res = _doc(tmp_path, "connect")
    for t in ("pgsni", "direct", "pgbouncer"):
        assert res[t]["conn_per_s"] > 0 and res[t]["p50_ms"] > 0 and res[t]["p95_ms"] > 0
    assert res["client_scram"]["iterations"] > 0 and res["client_scram"]["pbkdf2_ms"] > 0
    assert res["rate_vs_direct"] > 0 and res["pgsni_gateway_cpu_ms_per_conn"] > 0


@needs
def test_relays(tmp_path):
    from bench import relays

    relays.run(runs=1, quick=True, out=tmp_path, seconds=1, clients=(2,))
    (row,) = _doc(tmp_path, "relays")
    assert row["total_clients"] == 4 and row["one_relay_tps"] > 0 and row["two_relays_tps"] > 0
    assert row["two_vs_one"] > 0


@needs
def test_floor(tmp_path):
    from bench import floor

    floor.run(runs=1, quick=True, out=tmp_path, seconds=1, clients=(2,))
    (row,) = _doc(tmp_path, "floor")
    assert row["clients"] == 2
    for t in floor.TARGETS:
        assert row[f"{t}_tps"] > 0
    assert row["pgsni_vs_floor"] > 0 and row["floor_vs_pgbouncer"] > 0 and row["floor_x2_vs_pgbouncer"] > 0
    from bench import markdown

    assert "floor ÷ PgBouncer" in "\n".join(markdown.floor(json.loads((tmp_path / "floor.json").read_text())))


@needs
def test_coldstart(tmp_path):
    from bench import coldstart

    coldstart.run(runs=1, quick=True, out=tmp_path, samples=1, scale=1)
    res = _doc(tmp_path, "coldstart")
    cases = [r["case"] for r in res]
    assert cases[0] == "new database" and "only in bucket, fresh" in cases and len(cases) == 8
    assert all(r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["n"] >= 1 for r in res)
    assert res[0]["server_phases_mean_ms"]["total"] > 0


@needs
def test_density_and_charts(tmp_path):
    from bench import charts, density

    density.run(runs=1, quick=True, out=tmp_path, sizes=(2,))
    (r,) = _doc(tmp_path, "density")
    assert r["n"] == 2 and r["running"] == 2 and r["all_responsive"]
    assert r["idle_uss_mb_per_instance"] > 0 and r["gateway_rss_mb"] > 0 and r["query_max_ms"] > 0
    made = charts.render(tmp_path, ["density"])
    assert made and all(p.stat().st_size > 1000 for p in made)


@needs
def test_durability(tmp_path):
    from bench import durability, markdown

    durability.run(runs=1, quick=True, out=tmp_path, seconds=1, scale=1, clients=(2,), wal_mb=(2,))
    res = _doc(tmp_path, "durability")
    rows = {r["mode"]: r for r in res["tps"]}
    assert list(rows) == ["snapshot", "async", "sync"]
    for mode, r in rows.items():
        assert r["clients"] == 2
        if mode != "sync" or r["available"]:  # sync: measured once the gateway takes it
            assert r["available"] and r["tps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["vs_snapshot"] > 0
            assert r["wal_mb_s"] > 0 and r["gateway_cpu"] > 0 and r["storage_cpu"] >= 0
        else:
            assert "durability" in r["reason"]
    lag = rows["async"]
    assert lag["lag_samples"] > 0 and lag["lag_seconds_max"] >= lag["lag_seconds_p50"]
    assert lag["behind_seconds_max"] >= lag["behind_seconds_p50"] >= 0
    (r,) = res["restore"]
    assert r["wal_bytes"] >= 2 << 20 and r["baseline_wal_bytes"] >= 2 << 20
    assert r["rows"] > 0 and r["pgsni_rows_lost"] == r["baseline_rows_lost"] == 0  # every row back, both ways
    assert r["runs"] == 1 and r["pgsni_s"] > 0 and r["baseline_s"] > 0 and r["ratio"] > 0
    assert r["pgsni_phases_ms"]["replay"] > 0  # the new gateway replayed stored WAL
    text = "\n".join(markdown.durability(json.loads((tmp_path / "durability.json").read_text())))
    assert "÷ snapshot" in text and ("not available" in text) != rows["sync"]["available"]


@needs
def test_forwarding(tmp_path):
    from bench import forwarding, markdown

    forwarding.run(runs=1, quick=True, out=tmp_path, seconds=1, clients=(2,), connects=3)
    res = _doc(tmp_path, "forwarding")
    assert [(r["mode"], r["clients"]) for r in res["pgbench"]] == [("select-only", 2), ("tpcb-like", 2)]
    for r in res["pgbench"]:
        assert r["holder_tps"] > 0 and r["forwarded_tps"] > 0 and r["ratio"] > 0
    assert res["connect"]["holder"]["count"] == res["connect"]["forwarded"]["count"] == 3
    assert res["forwarded_clients"] >= 2 + 3  # pgbench's clients, the connects: all went over a link
    text = "\n".join(markdown.forwarding(json.loads((tmp_path / "forwarding.json").read_text())))
    assert "forwarded ÷ holder" in text


@needs
def test_workers(tmp_path):
    from bench import markdown, workers

    workers.run(runs=1, quick=True, out=tmp_path, seconds=1, databases=2)
    res = _doc(tmp_path, "workers")
    assert [r["mode"] for r in res["pgbench"]] == ["select-only", "tpcb-like"]
    for r in res["pgbench"]:
        assert r["one_tps"] > 0 and r["two_tps"] > 0 and r["ratio"] > 0
        for key in ("gateway", "postgres", "client"):  # the CPU of each party was seen
            assert r[f"one_{key}_ms_per_tx"] > 0 and r[f"two_{key}_ms_per_tx"] > 0
    for m in res["model"]:
        assert m["predicted_two_here"] >= m["predicted_one_here"] > 0
    text = "\n".join(markdown.workers(json.loads((tmp_path / "workers.json").read_text())))
    assert "2 ÷ 1" in text and "16 cores" in text


def test_cli_lists_every_suite():
    from click.testing import CliRunner

    from bench.__main__ import main

    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for suite in ("datapath", "connect", "coldstart", "density", "storage", "durability", "forwarding", "workers", "all"):
        assert suite in out.output
    sub = CliRunner().invoke(main, ["datapath", "--help"])
    assert "--quick" in sub.output and "--runs" in sub.output and "--out" in sub.output
