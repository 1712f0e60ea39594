"""Cold start: from TCP connect to the first query result, for (a) a new database
(create_on_connect), (b) a database stopped with its copy on local disk, (c) a database only in
the bucket (moto server), each fresh and large (pgbench data); p50 and p95.

One gateway subprocess with storage on a moto bucket and a short idle timeout: a database
stops (and is saved) a moment after its client leaves. For (c) the gateway is stopped, the
local copies removed and the gateway started again, so only the bucket holds them."""

from __future__ import annotations

import json
import shutil
import time

import psycopg

from tests.support.moto import ACCESS_KEY, SECRET_KEY, MotoServer

from .env import GatewayProcess, Workdir, dsn, pgbench_init
from .report import console, percentile, table, write_json

IDLE = 0.5


def first_result_ms(port: int, db_id: str) -> float:
    """TCP connect, TLS, SCRAM, wake, login, `SELECT 1`: milliseconds to its row."""
    started = time.perf_counter()
    with psycopg.connect(dsn(port, db_id)) as conn:
        conn.execute("SELECT 1").fetchone()
        elapsed = (time.perf_counter() - started) * 1000
    return elapsed


def _state(gw: GatewayProcess, db_id: str) -> dict:
    try:
        return json.loads((gw.pgdata(db_id).parent / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_saved(gw: GatewayProcess, ids, timeout: float = 300) -> None:
    """Until every database is stopped and its changes are in storage."""
    deadline = time.monotonic() + timeout
    for db_id in ids:
        while True:
            s = _state(gw, db_id)
            if s and not s.get("running") and not s.get("dirty"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{db_id} not stopped and saved after {timeout}s: {s}")
            time.sleep(0.05)


def wait_spares(gw: GatewayProcess, count: int = 1, timeout: float = 30) -> bool:
    """Until the gateway has `count` ready copies of the template and none in the making (its
    steady state once it has made a database); False if not after `timeout`."""
    root = gw.pgdata("x").parent.parent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.name for p in root.iterdir() if p.name.startswith(".spare-")]
        making = [n for n in names if n.startswith(".spare-tmp-")]
        if len(names) - len(making) >= count and not making:
            return True
        time.sleep(0.05)
    return False


def _summary(name: str, samples: list[float], phases: dict | None = None) -> dict:
    return {"case": name, "p50_ms": round(percentile(samples, 0.5), 1),
            "p95_ms": round(percentile(samples, 0.95), 1), "n": len(samples),
            "samples_ms": [round(s, 1) for s in samples], "server_phases_mean_ms": phases or {}}


class Phases:
    """The gateway's own account of its wakes (pgsni_wake_seconds by phase: restore, start,
    login, total), as mean milliseconds over the wakes since the last call."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.last = gw.wake_phases()

    def since(self) -> dict:
        now = self.gw.wake_phases()
        out = {}
        for phase, (total, count) in now.items():
            t0, c0 = self.last.get(phase, (0.0, 0))
            if count > c0:
                out[phase] = round((total - t0) / (count - c0) * 1000, 1)
        self.last = now
        return out


def _mean(phase_dicts: list[dict]) -> dict:
    keys = {k for d in phase_dicts for k in d}
    return {k: round(sum(d.get(k, 0) for d in phase_dicts) / len(phase_dicts), 1) for k in sorted(keys)}


def _local_storage(work: Workdir, samples: int) -> list[dict]:
    """The embedded default (storage=local, no bucket): new and stopped, fresh databases."""
    gw = GatewayProcess(work, "cold-local", idle_timeout=IDLE).start()
    root = gw.pgdata("x").parent.parent
    try:
        ids = [f"loc{i}" for i in range(samples)]
        cloned = [f"cp{i}" for i in range(samples)]
        phases = Phases(gw)
        new, local, no_spare = [], [], []
        new_phases, no_spare_phases = [], []
        for db, other in zip(ids, cloned):
            wait_spares(gw)
            new.append(first_result_ms(gw.port, db))
            wait_saved(gw, [db])
            new_phases.append(phases.since())
            # the same, but with the ready copies removed: the create clones the template
            wait_spares(gw, count=2)  # both made, no refill running: safe to take them away
            for spare in root.glob(".spare-*"):
                shutil.rmtree(spare, ignore_errors=True)
            no_spare.append(first_result_ms(gw.port, other))
            wait_saved(gw, [other])
            no_spare_phases.append(phases.since())
        for db in ids:
            local.append(first_result_ms(gw.port, db))
            wait_saved(gw, [db])
        return [_summary("storage=local: new database", new, _mean(new_phases)),
                _summary("storage=local: new, no spare clone", no_spare, _mean(no_spare_phases)),
                _summary("storage=local: stopped, fresh", local, phases.since())]
    finally:
        gw.stop()


def run(*, runs: int, quick: bool, out, samples: int | None = None, scale: int | None = None) -> dict:
    samples = samples or (3 if quick else 10)
    scale = scale or (2 if quick else 30)
    big_runs = max(1, min(runs, 3))
    moto = MotoServer().start()
    work = Workdir()
    results = []
    try:
        bucket = moto.create_bucket()
        gw = GatewayProcess(work, "cold", storage=f"s3://{bucket}/bench", s3_endpoint=moto.endpoint_url,
                            s3_region="us-east-1", s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY,
                            idle_timeout=IDLE, retention_keep=2).start()
        try:
            fresh = [f"new{i}" for i in range(samples)]
            console.print(f"[bold]cold start[/]: {samples} new databases")
            phases = Phases(gw)
            new = []
            spares = []
            for db in fresh:  # one at a time: the previous one's save must not overlap
                spares.append(wait_spares(gw))
                new.append(first_result_ms(gw.port, db))
                wait_saved(gw, [db])
            results.append(_summary("new database", new, phases.since()))
            results[-1]["spare_clone_ready"] = sum(spares)
            console.print(f"  large database: pgbench -i -s {scale}")
            pgbench_init(gw.port, scale, "big", checkpoint=True)
            wait_saved(gw, fresh + ["big"])
            phases.since()
            size_mb = sum(p.stat().st_size for p in gw.pgdata("big").rglob("*") if p.is_file()) / 1e6
            local, local_big = [], []
            for db in fresh:
                local.append(first_result_ms(gw.port, db))
                wait_saved(gw, [db])
            local_phases = phases.since()
            for r in range(big_runs):
                console.print(f"  stopped on local disk, large: run {r + 1}/{big_runs}")
                local_big.append(first_result_ms(gw.port, "big"))
                wait_saved(gw, ["big"])
            results.append(_summary("stopped, local disk, fresh", local, local_phases))
            results.append(_summary(f"stopped, local disk, {size_mb:.0f} MB", local_big, phases.since()))
            bucket_fresh, bucket_big = [], []
            for r in range(big_runs):
                console.print(f"  only in the bucket: run {r + 1}/{big_runs}")
                gw.stop()
                for db in fresh + ["big"]:
                    shutil.rmtree(gw.pgdata(db).parent, ignore_errors=True)  # may be gone already
                gw.start()
                phases = Phases(gw)
                if r == 0:  # one round of every fresh database is enough samples
                    for db in fresh:
                        bucket_fresh.append(first_result_ms(gw.port, db))
                        wait_saved(gw, [db])
                    fresh_phases = phases.since()
                bucket_big.append(first_result_ms(gw.port, "big"))
                big_phases = phases.since()
            results.append(_summary("only in bucket, fresh", bucket_fresh, fresh_phases))
            results.append(_summary(f"only in bucket, {size_mb:.0f} MB", bucket_big, big_phases))
        finally:
            gw.stop()
        results += _local_storage(work, samples)
    finally:
        work.close()
        moto.close()
    targets = {"new database": 300, "stopped, local disk, fresh": 250, "only in bucket, fresh": 600,
               "storage=local: new database": 300, "storage=local: stopped, fresh": 250}
    for r in results:
        if r["case"] in targets:
            r["target_p50_ms"] = targets[r["case"]]
            r["meets_target"] = r["p50_ms"] < targets[r["case"]]
    table("Cold start: TCP connect to first query result (psycopg, TLS + SCRAM, SELECT 1)",
          ["case", "p50 ms", "p95 ms", "n", "target p50", "gateway's mean phases, ms"],
          [[r["case"], r["p50_ms"], r["p95_ms"], r["n"], r.get("target_p50_ms", ""),
            " ".join(f"{k}={v:g}" for k, v in r["server_phases_mean_ms"].items())] for r in results])
    write_json(out, "coldstart", {"samples": samples, "scale": scale, "large_runs": big_runs,
                                  "storage": "s3 (moto server on 127.0.0.1)", "idle_timeout": IDLE}, results)
    return {"results": results}
