"""Forwarding (issue 17): a client that reaches a gateway other than its database's holder is
handed to the holder over a link (gateway/proxy/forward.py). Two gateways on one moto bucket,
with links: H holds the database, F forwards to it. In one run, interleaved and with the
order rotating: pgbench through H (the holder, direct) and through F (forwarded), select-only
and TPC-B-like at 1, 8 and 32 clients; then connection set-up time (connect() to an
authenticated session, one at a time) through each. Ratios are medians of per-run ratios."""

from __future__ import annotations

import re

from certs.cluster import make_cluster
from tests.support.moto import ACCESS_KEY, SECRET_KEY, MotoServer
from tests.support.ports import free_port

from .connect import _sequential
from .datapath import MODES, pgbench
from .env import GatewayProcess, Workdir, pgbench_init
from .report import console, median, paired_ratio, percentile, table, write_json

TARGET = ("select-only", 1, 0.7)  # forwarded ÷ holder TPS at 1 client, the target
ROUTES = ("holder", "forwarded")


def _fleet(work: Workdir, moto: MotoServer) -> dict[str, GatewayProcess]:
    bucket = moto.create_bucket()
    cluster = make_cluster(work.path / "cluster", ["gw-h", "gw-f"])
    out = {}
    for route, name in zip(ROUTES, ("gw-h", "gw-f")):
        cert, key = cluster.members[name]
        address = f"127.0.0.1:{free_port()}"
        out[route] = GatewayProcess(
            work, f"fwd-{route}", durability="snapshot", idle_timeout=3600, gateway_id=name,
            storage=f"s3://{bucket}/fleet", s3_endpoint=moto.endpoint_url, s3_region="us-east-1",
            s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY, advertise_address=address,
            cluster_listen=address, cluster_ca=str(cluster.ca), cluster_cert=str(cert), cluster_key=str(key))
    return out


def _forwarded(gw: GatewayProcess) -> float:
    m = re.search(r'^pgsni_forwarded_clients_total\{direction="out"\} ([\d.e+]+)$',
                  (gw._admin("/metrics") or b"").decode(), re.M)
    return float(m.group(1)) if m else 0.0


def run(*, runs: int, quick: bool, out, seconds: float | None = None,
        clients: tuple[int, ...] = (1, 8, 32), connects: int | None = None) -> dict:
    seconds = seconds or (3 if quick else 10)
    connects = connects or (30 if quick else 200)
    moto = MotoServer().start()
    work = Workdir()
    gateways: dict[str, GatewayProcess] = {}
    try:
        gateways = {r: g.start() for r, g in _fleet(work, moto).items()}
        console.print("  pgbench -i -s 2 through the holder (it then holds the database)")
        pgbench_init(gateways["holder"].port, 2, checkpoint=True)
        rows = []
        for mode in MODES:
            for c in clients:
                samples: dict[str, list[dict]] = {r: [] for r in ROUTES}
                for run_no in range(runs):
                    for route in ROUTES[run_no % 2:] + ROUTES[:run_no % 2]:
                        console.print(f"  {mode} c={c} run {run_no + 1}/{runs}: {route}")
                        samples[route].append(pgbench(gateways[route].port, c, mode, seconds,
                                                      work.path / "pgbench-logs"))
                rows.append(_row(mode, c, samples))
        setup = {}
        for run_no in range(runs):
            for route in ROUTES[run_no % 2:] + ROUTES[:run_no % 2]:
                setup.setdefault(route, []).extend(_sequential(gateways[route].port, connects))
        forwarded = _forwarded(gateways["forwarded"])
    except Exception:
        for route, gw in gateways.items():
            state = "running" if gw.proc is not None and gw.proc.poll() is None else "exited"
            console.print(f"  the {route} gateway ({state}), its log:\n{gw.log_tail()}")
        raise
    finally:
        for gw in gateways.values():
            gw.kill()
        work.close()
        moto.close()
    connect = {r: {"p50_ms": round(percentile(v, 0.5), 2), "p99_ms": round(percentile(v, 0.99), 2),
                   "count": len(v)} for r, v in setup.items()}
    _print(rows, connect)
    doc = {"pgbench": rows, "connect": connect, "forwarded_clients": forwarded}
    write_json(out, "forwarding", {"runs": runs, "seconds": seconds, "clients": list(clients),
                                   "connects": connects, "scale": 2,
                                   "storage": "s3 (moto server on 127.0.0.1)"}, doc)
    return doc


def _row(mode: str, clients: int, samples: dict[str, list[dict]]) -> dict:
    tps = {r: [s["tps"] for s in samples[r]] for r in ROUTES}
    row = {"mode": mode, "clients": clients,
           **{f"{r}_tps": round(median(tps[r]), 1) for r in ROUTES},
           **{f"{r}_p50_ms": round(median([s["p50_ms"] for s in samples[r]]), 3) for r in ROUTES},
           "ratio": paired_ratio(tps["forwarded"], tps["holder"])}
    if (mode, clients) == TARGET[:2]:
        row["target"], row["meets_target"] = TARGET[2], row["ratio"] >= TARGET[2]
    return row


def _print(rows: list[dict], connect: dict) -> None:
    table("Forwarded through another gateway vs connected to the holder (median of runs)",
          ["mode", "clients", "holder TPS", "forwarded TPS", "forwarded ÷ holder", "target", "met",
           "p50 ms holder / forwarded"],
          [[r["mode"], r["clients"], r["holder_tps"], r["forwarded_tps"], r["ratio"], r.get("target", ""),
            {True: "yes", False: "no"}.get(r.get("meets_target"), ""),
            f"{r['holder_p50_ms']:.2f} / {r['forwarded_p50_ms']:.2f}"] for r in rows])
    table("Connection set-up: connect() to an authenticated session, one at a time",
          ["route", "p50 ms", "p99 ms", "connections"],
          [[route, v["p50_ms"], v["p99_ms"], v["count"]] for route, v in connect.items()])
