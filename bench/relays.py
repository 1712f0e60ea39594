"""What a second relay process buys: two `pgsni serve` processes, each relaying to its own
database, against one process relaying to both — the same two running instances, two
`pgbench -S` runs side by side with N clients each. The ratio answers the multi-process
question in docs/benchmarks.md with a measurement instead of an estimate."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .env import GatewayProcess, Workdir, libpq_env, pgbench_init
from .report import console, median, paired_ratio, table, write_json


def _side_by_side(targets: list[tuple[GatewayProcess, str]], clients: int, seconds: float) -> float:
    """Total TPS of one pgbench per (gateway, database), all running at once."""
    procs = [subprocess.Popen(["pgbench", "-n", "-T", str(seconds), "-c", str(clients), "-j", "1", "-S"],
                              env=libpq_env(gw.port, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for gw, db in targets]
    total = 0.0
    for proc in procs:
        out, err = proc.communicate()
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"pgbench failed: {err[-1500:]}")
        total += float(m.group(1))
    return total


def run(*, runs: int, quick: bool, out: Path, seconds: float | None = None, scale: int | None = None,
        clients: tuple[int, ...] = (4, 16)) -> list[dict]:
    seconds = seconds or (2 if quick else 5)
    scale = scale or (1 if quick else 10)
    work = Workdir()
    gateways: list[GatewayProcess] = []
    results = []
    try:
        one = GatewayProcess(work, "one").start()
        gateways.append(one)
        two = GatewayProcess(work, "two").start()
        gateways.append(two)
        # b1 and b2 on the first gateway; the second gateway has its own b2
        for gw, db in ((one, "b1"), (one, "b2"), (two, "b2")):
            pgbench_init(gw.port, scale, db)
        for n in clients:
            single, double = [], []
            for run_no in range(runs):
                console.print(f"  2 x {n} clients, run {run_no + 1}/{runs}")
                single.append(_side_by_side([(one, "b1"), (one, "b2")], n, seconds))
                double.append(_side_by_side([(one, "b1"), (two, "b2")], n, seconds))
            results.append({"clients_per_database": n, "total_clients": 2 * n,
                            "one_relay_tps": round(median(single), 1), "two_relays_tps": round(median(double), 1),
                            "two_vs_one": paired_ratio(double, single),
                            "samples": {"one": single, "two": double}})
    finally:
        for gw in gateways:
            gw.stop()
        work.close()
    table("One relay process vs two (select-only, the same two instances)",
          ["clients", "1 relay TPS", "2 relays TPS", "2 ÷ 1"],
          [[r["total_clients"], r["one_relay_tps"], r["two_relays_tps"], r["two_vs_one"]] for r in results])
    write_json(out, "relays", {"runs": runs, "seconds": seconds, "scale": scale, "clients": list(clients)}, results)
    return results
