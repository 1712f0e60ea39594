"""Workers (issue 17, every core of one machine): `pgsni serve --workers 2` vs one process,
over 16 databases with 2 clients each (one pgbench per database, all at once). Each gateway
has its own local storage and data root; the databases are made and filled through it first
(with two workers, each database is held by the worker its first client reached, and about
half of every database's clients are passed to it by the other). In one run, interleaved and
with the order rotating: select-only and TPC-B-like. CPU seconds of the gateway processes, of
their Postgres instances and of the pgbench clients are taken per run, for the model of how
throughput scales with cores (docs/benchmarks.md). Ratios are medians of per-run ratios."""

from __future__ import annotations

import os
import re
import resource
import subprocess

from . import procstat
from .datapath import MODES
from .env import GatewayProcess, Workdir, libpq_env, pgbench_init
from .report import console, machine, median, paired_ratio, table, write_json

TARGET = ("select-only", 1.3)  # two workers ÷ one, the target on this 2-core machine
SHAPES = ("1 worker", "2 workers")
TICK = os.sysconf("SC_CLK_TCK")


def _ids(databases: int) -> list[str]:
    return [f"w{i:02d}" for i in range(databases)]


def _gateway_pids(gw: GatewayProcess) -> list[int]:
    """The gateway's own processes: the supervisor and the workers it forked (the same command
    line), or the one process; not its postmasters."""
    own = _cmdline(gw.pid)
    return [gw.pid] + [p for p in procstat.children(gw.pid) if _cmdline(p) == own]


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += procstat.cpu_seconds(pid)
        except OSError:
            pass
    return total


def _postgres_cpu(gateway: list[int]) -> float:
    """CPU seconds of the gateway's postmasters and of every backend they have reaped (a
    pgbench connection's backend is gone by the time a round ends)."""
    total = 0.0
    for pid in (c for g in gateway for c in procstat.children(g) if c not in gateway):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / TICK  # utime, stime, cutime, cstime
            total += _cpu([c for c in procstat.tree(pid) if c != pid])  # backends still alive
        except OSError:
            pass
    return total


def _round(gw: GatewayProcess, ids: list[str], clients: int, mode: str, seconds: float) -> dict:
    """One pgbench per database, all at once; summed TPS and the CPU each party used."""
    gateway = _gateway_pids(gw)
    before = (_cpu(gateway), _postgres_cpu(gateway))
    clients_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pgbench processes, once reaped
    procs = [subprocess.Popen(["pgbench", "-n", "-T", str(seconds), "-c", str(clients), "-j", "1", *MODES[mode]],
                              env=libpq_env(gw.port, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for db in ids]
    tps = 0.0
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed: {err[-1500:]}")
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        tps += float(m.group(1)) if m else 0.0
    clients_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = (_cpu(gateway), _postgres_cpu(gateway))
    return {"tps": tps, "gateway_cpu": after[0] - before[0], "postgres_cpu": after[1] - before[1],
            "client_cpu": (clients_after.ru_utime + clients_after.ru_stime
                           - clients_before.ru_utime - clients_before.ru_stime),
            "transactions": tps * seconds}


def run(*, runs: int, quick: bool, out, seconds: float | None = None, databases: int | None = None,
        clients: int = 2, modes: tuple[str, ...] = tuple(MODES)) -> dict:
    seconds = seconds or (3 if quick else 10)
    databases = databases or (4 if quick else 16)
    ids = _ids(databases)
    work = Workdir()
    gateways: dict[str, GatewayProcess] = {}
    try:
        for shape, n in zip(SHAPES, (1, 2)):
            gateways[shape] = GatewayProcess(work, f"workers-{n}", durability="snapshot", idle_timeout=3600,
                                             workers=n, log_level="WARNING").start()
            console.print(f"  {shape}: pgbench -i -s 1 in {databases} databases")
            for db in ids:
                pgbench_init(gateways[shape].port, 1, db)
        rows = []
        for mode in modes:
            samples: dict[str, list[dict]] = {s: [] for s in SHAPES}
            for run_no in range(runs):
                for shape in SHAPES[run_no % 2:] + SHAPES[:run_no % 2]:
                    console.print(f"  {mode} {databases}x{clients} run {run_no + 1}/{runs}: {shape}")
                    samples[shape].append(_round(gateways[shape], ids, clients, mode, seconds))
            rows.append(_row(mode, samples))
    finally:
        for gw in gateways.values():
            gw.stop()
        work.close()
    cores = machine()["cores"]
    doc = {"pgbench": rows, "model": [_model(r, cores) for r in rows]}
    _print(rows, doc["model"])
    write_json(out, "workers", {"runs": runs, "seconds": seconds, "databases": databases,
                                "clients_per_database": clients, "scale": 1, "storage": "local"}, doc)
    return doc


def _row(mode: str, samples: dict[str, list[dict]]) -> dict:
    row: dict = {"mode": mode}
    for shape, key in zip(SHAPES, ("one", "two")):
        s = samples[shape]
        tx = sum(x["transactions"] for x in s) or 1.0
        row |= {f"{key}_tps": round(median([x["tps"] for x in s]), 1),
                f"{key}_gateway_ms_per_tx": round(1000 * sum(x["gateway_cpu"] for x in s) / tx, 4),
                f"{key}_postgres_ms_per_tx": round(1000 * sum(x["postgres_cpu"] for x in s) / tx, 4),
                f"{key}_client_ms_per_tx": round(1000 * sum(x["client_cpu"] for x in s) / tx, 4)}
    row["ratio"] = paired_ratio([x["tps"] for x in samples[SHAPES[1]]], [x["tps"] for x in samples[SHAPES[0]]])
    if mode == TARGET[0]:
        row["target"], row["meets_target"] = TARGET[1], row["ratio"] >= TARGET[1]
    return row


def _model(row: dict, cores: int) -> dict:
    """Throughput with N workers on C cores. Each worker's relay runs on at most one core, so
    TPS(N) <= N / g; and everything shares the cores, so TPS <= C / (g + p + b), where g, p
    and b are the CPU seconds per transaction of the gateway, of Postgres and of the client
    (pgbench, on the same machine here). Fitted on the one-worker run (g, p, b measured),
    checked against the two-worker run, and predicted for more workers and cores."""
    g, p, b = (row[f"one_{k}_ms_per_tx"] / 1000 for k in ("gateway", "postgres", "client"))

    def tps(n: int, c: int) -> float:
        return min(n / g, c / (g + p + b)) if g else 0.0

    return {"mode": row["mode"], "gateway_ms_per_tx": round(1000 * g, 4), "postgres_ms_per_tx": round(1000 * p, 4),
            "client_ms_per_tx": round(1000 * b, 4),
            "predicted_one_here": round(tps(1, cores), 1), "measured_one_here": row["one_tps"],
            "predicted_two_here": round(tps(2, cores), 1), "measured_two_here": row["two_tps"],
            "workers_worth_having_per_core": round(g / (g + p + b), 2) if g else 0.0,
            "predicted": {f"{c} cores": {f"{n} workers": round(tps(n, c)) for n in (1, 2, 4, 8, 16) if n <= c}
                          for c in (2, 4, 8, 16)}}


def _print(rows: list[dict], model: list[dict]) -> None:
    table("Two workers vs one process, 16 databases x 2 clients (median of runs)",
          ["mode", "1 worker TPS", "2 workers TPS", "2 ÷ 1", "target", "met",
           "gateway ms CPU/tx (1 / 2)", "Postgres ms CPU/tx (1 / 2)"],
          [[r["mode"], r["one_tps"], r["two_tps"], r["ratio"], r.get("target", ""),
            {True: "yes", False: "no"}.get(r.get("meets_target"), ""),
            f"{r['one_gateway_ms_per_tx']:.3f} / {r['two_gateway_ms_per_tx']:.3f}",
            f"{r['one_postgres_ms_per_tx']:.3f} / {r['two_postgres_ms_per_tx']:.3f}"] for r in rows])
    table("Model: TPS = min(N / g, C / (g + p + b)), g, p, b in CPU ms per transaction from the one-worker run",
          ["mode", "g (gateway)", "p (Postgres)", "b (pgbench)", "1 worker: model / measured",
           "2 workers: model / measured", "workers per core worth having"],
          [[m["mode"], m["gateway_ms_per_tx"], m["postgres_ms_per_tx"], m["client_ms_per_tx"],
            f"{m['predicted_one_here']:.0f} / {m['measured_one_here']:.0f}",
            f"{m['predicted_two_here']:.0f} / {m['measured_two_here']:.0f}", m["workers_worth_having_per_core"]]
           for m in model])
