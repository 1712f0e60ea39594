"""The floor of a Python relay: pgsni against the least a Python TLS relay can do
(bench/floor_relay.py — uvloop, TLS, raw pipe, nothing else), that same relay in two processes
sharing the port, PgBouncer and Postgres directly, all in one run of `pgbench -S`. It answers
two questions with measurements: how much of pgsni's gap to PgBouncer is pgsni's own code
(pgsni ÷ floor), and whether any relay of this kind, in one process or two, reaches
PgBouncer on this machine (floor ÷ PgBouncer)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from .datapath import pgbench
from .env import Stack, Workdir, _terminate, free_port
from .report import console, median, paired_ratio, table, write_json

TARGETS = ("pgsni", "floor", "floor_x2", "pgbouncer", "direct")
ROOT = Path(__file__).resolve().parent.parent


def _start_floor(work: Workdir, unix_path: str, processes: int) -> tuple[int, list[subprocess.Popen]]:
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            proc = subprocess.Popen([sys.executable, "-m", "bench.floor_relay", str(port), unix_path,
                                     str(work.certs.cert), str(work.certs.key)],
                                    cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            if proc.stdout.readline().strip() != "ready":  # listening: the next one shares the port
                raise RuntimeError(f"floor relay did not start (exit {proc.wait()})")
    except BaseException:
        for proc in procs:
            _terminate(proc, signal.SIGTERM, 5)
        raise
    return port, procs


def run(*, runs: int, quick: bool, out: Path, seconds: float | None = None, scale: int | None = None,
        clients: tuple[int, ...] = (8, 32)) -> list[dict]:
    seconds = seconds or (2 if quick else 5)
    scale = scale or (1 if quick else 10)
    work = Workdir()
    floors: list[subprocess.Popen] = []
    results = []
    try:
        with Stack(work) as stack:
            console.print(f"[bold]floor[/]: pgbench -i -s {scale} on pgsni and direct")
            stack.init_pgbench(scale)
            unix_path = f"{stack.direct.sockdir}/.s.PGSQL.{stack.direct.port}"
            ports = stack.ports()
            for name, n in (("floor", 1), ("floor_x2", 2)):
                ports[name], procs = _start_floor(work, unix_path, n)
                floors += procs
            for n in clients:
                samples: dict[str, list[float]] = {t: [] for t in TARGETS}
                for run_no in range(runs):
                    k = run_no % len(TARGETS)
                    for target in TARGETS[k:] + TARGETS[:k]:  # rotate who goes first
                        console.print(f"  select-only c={n} run {run_no + 1}/{runs}: {target}")
                        samples[target].append(pgbench(ports[target], n, "select-only", seconds,
                                                       work.path / "pgbench-logs" / target)["tps"])
                row: dict = {"clients": n, **{f"{t}_tps": round(median(samples[t]), 1) for t in TARGETS}}
                for a, b in (("pgsni", "floor"), ("pgsni", "pgbouncer"), ("floor", "pgbouncer"),
                             ("floor_x2", "pgbouncer"), ("floor_x2", "floor")):
                    row[f"{a}_vs_{b}"] = paired_ratio(samples[a], samples[b])
                row["samples"] = samples
                results.append(row)
    finally:
        for proc in floors:
            _terminate(proc, signal.SIGTERM, 5)
        work.close()
    table("The floor of a Python relay (select-only TPS, median of runs; ratios from the same runs)",
          ["clients", "pgsni", "floor", "floor ×2", "PgBouncer", "direct", "pgsni ÷ floor",
           "pgsni ÷ PgBouncer", "floor ÷ PgBouncer", "floor ×2 ÷ PgBouncer"],
          [[r["clients"], r["pgsni_tps"], r["floor_tps"], r["floor_x2_tps"], r["pgbouncer_tps"], r["direct_tps"],
            r["pgsni_vs_floor"], r["pgsni_vs_pgbouncer"], r["floor_vs_pgbouncer"], r["floor_x2_vs_pgbouncer"]]
           for r in results])
    write_json(out, "floor", {"runs": runs, "seconds": seconds, "scale": scale, "clients": list(clients)}, results)
    return results
