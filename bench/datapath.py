"""Data path: pgbench select-only and TPC-B-like at 1, 8 and 32 clients through pgsni (TLS),
Postgres directly (TLS) and PgBouncer (TLS, session pooling), interleaved in each run, with
latency percentiles from pgbench's per-transaction logs (-l) and the gateway's CPU and RSS
from /proc; then COPY of a large stream out and in, with the gateway's RSS sampled."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from . import procstat
from .env import Stack, Workdir, libpq_env
from .report import console, median, paired_ratio, percentile, table, write_json

TARGETS = ("pgsni", "direct", "pgbouncer")
MODES = {"select-only": ["-S"], "tpcb-like": ["-b", "tpcb-like"]}
LINE = 1000  # bytes of text per COPY row (plus the newline)


def _psql(port: int, sql: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          env=libpq_env(port), check=True, capture_output=True, text=True, **kw)


def pgbench(port: int, clients: int, mode: str, seconds: float, logdir: Path) -> dict:
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    argv = ["pgbench", "-n", "-T", str(seconds), "-c", str(clients), "-j", str(min(clients, 2)),
            "-l", "--log-prefix", str(logdir / "tx"), *MODES[mode]]
    proc = subprocess.run(argv, env=libpq_env(port), capture_output=True, text=True, cwd=logdir)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed on port {port}: {proc.stderr[-1500:]}")
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout)
    latencies = []
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000.0)  # µs -> ms
    return {"tps": float(m.group(1)) if m else 0.0, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99), "transactions": len(latencies)}


def _run_pgbench(stack: Stack, clients_list, seconds, runs, logroot) -> list[dict]:
    ports = stack.ports()
    pids = {"pgsni": stack.gateway.pid, "pgbouncer": stack.bouncer.pid}
    results = []
    for mode in MODES:
        for clients in clients_list:
            samples: dict[str, list[dict]] = {t: [] for t in TARGETS}
            for run in range(runs):
                order = TARGETS[run % 3:] + TARGETS[:run % 3]  # rotate who goes first
                for target in order:
                    console.print(f"  {mode} c={clients} run {run + 1}/{runs}: {target}")
                    pid = pids.get(target)
                    if pid:
                        with procstat.Sampler(pid, 0.1) as s:
                            r = pgbench(ports[target], clients, mode, seconds, logroot / target)
                        r.update(cpu_cores=s.cpu, rss_peak_mb=s.peak)
                    else:
                        r = pgbench(ports[target], clients, mode, seconds, logroot / target)
                    samples[target].append(r)
            row = {"mode": mode, "clients": clients, "runs": runs, "seconds": seconds}
            for t in TARGETS:
                for key in ("tps", "p50_ms", "p99_ms", "cpu_cores", "rss_peak_mb"):
                    vals = [r[key] for r in samples[t] if key in r]
                    if vals:
                        row[f"{t}_{key}"] = round(median(vals), 3)
            for other in ("direct", "pgbouncer"):
                row[f"tps_vs_{other}"] = paired_ratio([r["tps"] for r in samples["pgsni"]],
                                                      [r["tps"] for r in samples[other]])
            results.append(row)
    return results


def _copy_out(port: int, rows: int) -> float:
    started = time.perf_counter()
    subprocess.run(["psql", "-XAtq", "-c", f"COPY (SELECT repeat('x', {LINE}) FROM "
                    f"generate_series(1, {rows})) TO STDOUT"], env=libpq_env(port), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def _copy_in(port: int, rows: int) -> float:
    _psql(port, "TRUNCATE bulk")
    line = "x" * LINE
    started = time.perf_counter()
    subprocess.run(["bash", "-c",  # the status is psql's; yes ends by SIGPIPE
                    f"yes {line} | head -n {rows} | psql -XAtq -v ON_ERROR_STOP=1 -c 'COPY bulk FROM STDIN'"],
                   env=libpq_env(port), check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    _psql(port, "TRUNCATE bulk")
    return elapsed


def _run_bulk(stack: Stack, size_mb: int, runs: int) -> list[dict]:
    ports = stack.ports()
    rows = max(1, size_mb * 1_000_000 // (LINE + 1))
    for port in (ports["pgsni"], ports["direct"]):
        _psql(port, "CREATE UNLOGGED TABLE IF NOT EXISTS bulk (x text)")
    results = []
    for direction, fn in (("copy-out", _copy_out), ("copy-in", _copy_in)):
        secs: dict[str, list[float]] = {t: [] for t in TARGETS}
        rss: list[dict] = []
        for run in range(runs):
            for target in TARGETS:
                console.print(f"  {direction} {size_mb} MB run {run + 1}/{runs}: {target}")
                if target == "pgsni":
                    with procstat.Sampler(stack.gateway.pid, 0.05) as s:
                        secs[target].append(fn(ports[target], rows))
                    rss.append({"before": s.first, "peak": s.peak, "cpu": s.cpu,
                                "trace": [(round(t, 2), round(m, 1)) for t, m in s.samples[::4]]})
                else:
                    secs[target].append(fn(ports[target], rows))
        row = {"mode": direction, "size_mb": size_mb, "runs": runs}
        for t in TARGETS:
            row[f"{t}_s"] = round(median(secs[t]), 3)
            row[f"{t}_mb_s"] = round(size_mb / median(secs[t]), 1)
        row["speed_vs_direct"] = paired_ratio(secs["direct"], secs["pgsni"])
        row["pgsni_rss_before_mb"] = round(median([r["before"] for r in rss]), 1)
        row["pgsni_rss_peak_mb"] = round(median([r["peak"] for r in rss]), 1)
        row["pgsni_rss_growth_mb"] = round(max(r["peak"] - r["before"] for r in rss), 1)
        row["pgsni_cpu_cores"] = round(median([r["cpu"] for r in rss]), 3)
        row["pgsni_rss_trace"] = rss[-1]["trace"]
        results.append(row)
    return results


def run(*, runs: int, quick: bool, out: Path, seconds: float | None = None, scale: int | None = None,
        clients: tuple[int, ...] = (1, 8, 32), bulk_mb: int | None = None) -> dict:
    seconds = seconds or (2 if quick else 5)
    scale = scale or (1 if quick else 10)
    bulk_mb = bulk_mb or (20 if quick else 1024)
    work = Workdir()
    try:
        with Stack(work) as stack:
            console.print(f"[bold]data path[/]: pgbench -i -s {scale} on pgsni and direct")
            stack.init_pgbench(scale)
            results = _run_pgbench(stack, clients, seconds, runs, work.path / "pgbench-logs")
            bulk = _run_bulk(stack, bulk_mb, max(1, min(runs, 3)))
    finally:
        work.close()
    params = {"runs": runs, "seconds": seconds, "scale": scale, "clients": list(clients),
              "bulk_mb": bulk_mb, "latency_source": "pgbench -l per-transaction logs"}
    table("Data path: pgbench TPS (median of runs) and pgsni's ratio in the same runs",
          ["mode", "clients", "pgsni", "direct", "pgbouncer", "÷direct", "÷pgbouncer",
           "p50/p99 ms pgsni", "p50/p99 direct", "p50/p99 bouncer", "gw CPU", "gw RSS MB"],
          [[r["mode"], r["clients"], r["pgsni_tps"], r["direct_tps"], r["pgbouncer_tps"],
            r["tps_vs_direct"], r["tps_vs_pgbouncer"],
            f"{r['pgsni_p50_ms']:.2f}/{r['pgsni_p99_ms']:.2f}",
            f"{r['direct_p50_ms']:.2f}/{r['direct_p99_ms']:.2f}",
            f"{r['pgbouncer_p50_ms']:.2f}/{r['pgbouncer_p99_ms']:.2f}",
            r["pgsni_cpu_cores"], r["pgsni_rss_peak_mb"]] for r in results])
    table(f"Bulk COPY of {bulk_mb} MB", ["direction", "pgsni MB/s", "direct MB/s", "pgbouncer MB/s",
                                         "÷direct", "gw RSS before", "gw RSS peak", "gw CPU"],
          [[b["mode"], b["pgsni_mb_s"], b["direct_mb_s"], b["pgbouncer_mb_s"], b["speed_vs_direct"],
            b["pgsni_rss_before_mb"], b["pgsni_rss_peak_mb"], b["pgsni_cpu_cores"]] for b in bulk])
    doc = {"pgbench": results, "bulk": bulk}
    write_json(out, "datapath", params, doc)
    return doc
