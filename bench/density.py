"""Density: N databases active at once (N = 10, 50, 100), each with a client connected, then
idle (client gone, instance still up): unique memory (USS, Private_* of smaps_rollup) per
instance summed over its postmaster and children, the gateway's RSS, and the latency of a
query on every database, to see that all of them stay responsive."""

from __future__ import annotations

import time

import psycopg

from . import procstat
from .env import GatewayProcess, Workdir, dsn
from .report import console, median, percentile, table, write_json


def _instances(gw: GatewayProcess, ids) -> list[dict]:
    out = []
    for db in ids:
        pid = procstat.postmaster_of(gw.pgdata(db))
        if pid is not None:
            out.append(procstat.tree_memory(pid))
    return out


def _query_ms(conns, runs: int) -> list[float]:
    lat = []
    for conn in conns:
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            samples.append((time.perf_counter() - started) * 1000)
        lat.append(median(samples))
    return lat


def _measure(gw: GatewayProcess, n: int, runs: int) -> dict:
    ids = [f"d{i}" for i in range(n)]
    started = time.monotonic()
    conns = [psycopg.connect(dsn(gw.port, db), autocommit=True) for db in ids]
    wake_s = time.monotonic() - started
    try:
        time.sleep(0.5)
        lat = _query_ms(conns, runs)
        active = _instances(gw, ids)
        gw_rss_active = procstat.rss_mb(gw.pid)
    finally:
        for c in conns:
            c.close()
    time.sleep(1.0)  # let the backends exit; the instances stay (idle_timeout is long)
    idle = _instances(gw, ids)
    reconnect = []
    for db in ids:
        started = time.perf_counter()
        with psycopg.connect(dsn(gw.port, db)) as c:
            c.execute("SELECT 1").fetchone()
        reconnect.append((time.perf_counter() - started) * 1000)
    return {
        "n": n, "running": len(idle), "open_s": round(wake_s, 2),
        "active_uss_mb_per_instance": round(median([i["uss_mb"] for i in active]), 2),
        "idle_uss_mb_per_instance": round(median([i["uss_mb"] for i in idle]), 2),
        "idle_pss_mb_per_instance": round(median([i["pss_mb"] for i in idle]), 2),
        "idle_processes_per_instance": median([i["processes"] for i in idle]),
        "idle_uss_mb_total": round(sum(i["uss_mb"] for i in idle), 1),
        "gateway_rss_mb": round(procstat.rss_mb(gw.pid), 1),
        "gateway_rss_active_mb": round(gw_rss_active, 1),
        "gateway_uss_mb": round(procstat.uss_mb(gw.pid), 1),
        "query_p50_ms": round(percentile(lat, 0.5), 2), "query_p95_ms": round(percentile(lat, 0.95), 2),
        "query_max_ms": round(max(lat), 2),
        "reconnect_p50_ms": round(percentile(reconnect, 0.5), 1),
        "reconnect_max_ms": round(max(reconnect), 1),
        "all_responsive": len(lat) == n and len(idle) == n,
    }


def run(*, runs: int, quick: bool, out, sizes: tuple[int, ...] | None = None) -> dict:
    sizes = sizes or ((3, 6) if quick else (10, 50, 100))
    work = Workdir()
    results = []
    try:
        gw = GatewayProcess(work, "density", idle_timeout=3600, max_instances=max(sizes) + 10,
                            max_connections_per_db=0).start()
        try:
            for n in sizes:
                console.print(f"[bold]density[/]: {n} databases at once")
                results.append(_measure(gw, n, max(runs, 3)))
        finally:
            gw.stop()
    finally:
        work.close()
    table("Density: N databases running at once (USS = Private_Clean + Private_Dirty, summed per instance)",
          ["N", "running", "USS MB/instance active", "USS MB/instance idle", "PSS idle", "gateway RSS MB",
           "query p50 ms", "query max ms", "reconnect max ms"],
          [[r["n"], r["running"], r["active_uss_mb_per_instance"], r["idle_uss_mb_per_instance"],
            r["idle_pss_mb_per_instance"], r["gateway_rss_mb"], r["query_p50_ms"], r["query_max_ms"],
            r["reconnect_max_ms"]] for r in results])
    write_json(out, "density", {"sizes": list(sizes), "query_repeats": max(runs, 3)}, results)
    return {"results": results}
