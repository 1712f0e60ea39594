"""Connection set-up: new TLS connections per second with SCRAM (`pgbench -C`, a new
connection for every `SELECT 1`) and the latency of one connect (a sequential psycopg loop),
through pgsni, Postgres directly and PgBouncer. The client's own SCRAM work (PBKDF2 over the
verifier's iteration count) is timed separately so the figure can be read as the server's."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time

import psycopg
import scramp

from . import procstat
from .env import PASSWORD, Stack, Workdir, dsn, libpq_env
from .report import console, median, paired_ratio, percentile, ratio, table, write_json

TARGETS = ("pgsni", "direct", "pgbouncer")


def _pgbench_connect(port: int, clients: int, seconds: float, script) -> dict:
    proc = subprocess.run(["pgbench", "-n", "-C", "-f", str(script), "-T", str(seconds), "-c", str(clients),
                           "-j", str(min(clients, 2))], env=libpq_env(port), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -C failed on port {port}: {proc.stderr[-1500:]}")
    tps = re.search(r"tps = ([\d.]+)", proc.stdout)
    conn = re.search(r"average connection time = ([\d.]+) ms", proc.stdout)
    return {"conn_per_s": float(tps.group(1)) if tps else 0.0,
            "avg_connect_ms": float(conn.group(1)) if conn else 0.0}


def _sequential(port: int, count: int) -> list[float]:
    """Milliseconds from connect() to an authenticated session, one connection at a time."""
    out = []
    conninfo = dsn(port)
    for _ in range(count):
        started = time.perf_counter()
        conn = psycopg.connect(conninfo)
        out.append((time.perf_counter() - started) * 1000)
        conn.close()
    return out


def client_scram_cost(iterations: int, repeat: int = 20) -> dict:
    """What the client spends on SCRAM: PBKDF2-HMAC-SHA256 over `iterations` (libpq's part,
    in C) and a whole scramp client exchange (in Python, for scale), in ms."""
    salt = os.urandom(16)
    t = []
    for _ in range(repeat):
        s = time.perf_counter()
        hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), salt, iterations)
        t.append((time.perf_counter() - s) * 1000)
    server = scramp.ScramMechanism("SCRAM-SHA-256")
    salt_b, stored, server_key, _ = server.make_auth_info(PASSWORD, iteration_count=iterations)
    exch = []
    for _ in range(max(3, repeat // 4)):
        s = time.perf_counter()
        client = scramp.ScramClient(["SCRAM-SHA-256"], "postgres", PASSWORD)
        srv = server.make_server(lambda u: (salt_b, stored, server_key, iterations))
        srv.set_client_first(client.get_client_first())
        client.set_server_first(srv.get_server_first())
        srv.set_client_final(client.get_client_final())
        client.set_server_final(srv.get_server_final())
        exch.append((time.perf_counter() - s) * 1000)
    return {"iterations": iterations, "pbkdf2_ms": round(median(t), 3),
            "scramp_exchange_ms": round(median(exch), 3)}


def _iterations(verifier: str) -> int:
    try:
        return int(verifier.split("$", 2)[1].split(":", 1)[0])
    except (IndexError, ValueError):
        return 4096


def run(*, runs: int, quick: bool, out, seconds: float | None = None, clients: int = 8) -> dict:
    seconds = seconds or (2 if quick else 5)
    sequential = 20 if quick else 100
    work = Workdir()
    script = work.path / "select1.sql"
    script.write_text("SELECT 1;\n")
    try:
        with Stack(work) as stack:
            ports = stack.ports()
            psycopg.connect(dsn(ports["pgsni"])).close()  # creates the database and starts it
            pgsni_iter = _iterations(_pgsni_verifier(stack))
            direct_iter = _iterations(stack.direct.verifier())
            rate: dict[str, list[dict]] = {t: [] for t in TARGETS}
            lat: dict[str, list[float]] = {t: [] for t in TARGETS}
            gw_cpu_ms = []
            for run_no in range(runs):
                for target in TARGETS:
                    console.print(f"  connect run {run_no + 1}/{runs}: {target}")
                    if target == "pgsni":
                        cpu0 = procstat.cpu_seconds(stack.gateway.pid)
                        r = _pgbench_connect(ports[target], clients, seconds, script)
                        used = procstat.cpu_seconds(stack.gateway.pid) - cpu0
                        gw_cpu_ms.append(used * 1000 / max(1.0, r["conn_per_s"] * seconds))
                    else:
                        r = _pgbench_connect(ports[target], clients, seconds, script)
                    rate[target].append(r)
                    lat[target] += _sequential(ports[target], sequential)
    finally:
        work.close()
    cost = client_scram_cost(direct_iter)
    results = {"clients": clients, "runs": runs, "seconds": seconds,
               "client_scram": cost, "pgsni_iterations": pgsni_iter, "direct_iterations": direct_iter}
    for t in TARGETS:
        results[t] = {
            "conn_per_s": round(median([r["conn_per_s"] for r in rate[t]]), 1),
            "pgbench_avg_connect_ms": round(median([r["avg_connect_ms"] for r in rate[t]]), 2),
            "p50_ms": round(percentile(lat[t], 0.5), 2), "p95_ms": round(percentile(lat[t], 0.95), 2),
            "p50_minus_client_scram_ms": round(percentile(lat[t], 0.5) - cost["pbkdf2_ms"], 2)}
    for other in ("direct", "pgbouncer"):
        results[f"rate_vs_{other}"] = paired_ratio([r["conn_per_s"] for r in rate["pgsni"]],
                                                   [r["conn_per_s"] for r in rate[other]])
        results[f"p50_vs_{other}"] = ratio(results["pgsni"]["p50_ms"], results[other]["p50_ms"])
    results["pgsni_gateway_cpu_ms_per_conn"] = round(median(gw_cpu_ms), 3)
    table(f"New TLS + SCRAM connections ({clients} clients with pgbench -C; latency: one at a time, psycopg)",
          ["target", "conn/s", "pgsni ÷ this", "p50 ms", "p95 ms", "p50 − client SCRAM"],
          [[t, results[t]["conn_per_s"], ratio(results["pgsni"]["conn_per_s"], results[t]["conn_per_s"]),
            results[t]["p50_ms"], results[t]["p95_ms"], results[t]["p50_minus_client_scram_ms"]]
           for t in TARGETS])
    console.print(f"client SCRAM cost at {cost['iterations']} iterations: PBKDF2 {cost['pbkdf2_ms']} ms "
                  f"(libpq's share), scramp exchange {cost['scramp_exchange_ms']} ms; "
                  f"gateway CPU per connection {results['pgsni_gateway_cpu_ms_per_conn']} ms")
    write_json(out, "connect", {"runs": runs, "seconds": seconds, "clients": clients,
                                "sequential_connects": sequential}, results)
    return results


def _pgsni_verifier(stack: Stack) -> str:
    proc = subprocess.run(["psql", "-XAtq", "-c", "SELECT rolpassword FROM pg_authid WHERE rolname='postgres'"],
                          env=libpq_env(stack.gateway.port), capture_output=True, text=True)
    return proc.stdout.strip()
