"""Durability (issue 16): what shipping WAL to storage costs and what it buys, storage on a moto
S3 server on 127.0.0.1.

1. Cost: TPC-B-like pgbench TPS at 1 and 8 clients through the gateway for each `durability`
   (snapshot, async, sync), one gateway per mode running side by side, the order rotating from
   run to run; each mode's ratio to snapshot is the median of the per-run ratios. A mode the
   gateway's settings refuse (sync, until it exists) is reported as not available.
2. RPO: during the runs each gateway's `pgsni_wal_lag_seconds` and `_bytes` (/metrics) are
   sampled every 0.2 s (snapshot's too, so every mode bears the same polling), reported for the
   modes that ship WAL, with the lag in bytes also as seconds of writes at the run's WAL rate.
3. Restore after a lost node: with durability=async, N MB of WAL are written after the stored
   base, storage is let catch up, the gateway and everything it ran are SIGKILLed (no
   stop-time snapshot), and a gateway with an empty data root on the same bucket is timed from
   connect to the first query result (it restores the base and replays the stored WAL).
   Baseline: pg_receivewal and pg_basebackup against a direct Postgres with the same WAL
   written, then a copy of the base started with a restore_command copying from the received
   directory, timed from the copy to the first query result."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg

from gateway.compute.dbroles import ADMIN
from gateway.compute.postgres import START_OPTIONS
from gateway.config import ConfigError, Settings
from storage.wal import parse_lsn
from tests.support.moto import ACCESS_KEY, SECRET_KEY, MotoServer

from .coldstart import Phases, first_result_ms
from .datapath import pgbench
from .env import DirectPostgres, GatewayProcess, Workdir, dsn, pgbench_init
from .procstat import cpu_seconds
from .report import console, median, paired_ratio, percentile, table, write_json

MODES = ("snapshot", "async", "sync")
TARGETS = {("async", 1): 0.9, ("async", 8): 0.9, ("sync", 8): 0.5}  # TPS ÷ snapshot
BATCH = 2000  # rows of ~0.5 kB per INSERT while writing WAL


def _refused(gw: GatewayProcess) -> str | None:
    """Why the gateway's settings refuse its durability mode, or None if they take it."""
    try:
        Settings(**gw.settings)
    except ConfigError as e:
        if "durability" not in str(e):
            raise
        return str(e)
    return None


class RunWatch:
    """What a mode's runs cost and how far its storage was behind, added up over every entry:
    the gateway's WAL lag gauges every `interval` seconds in a thread; per entry the database's
    WAL rate (so each lag in bytes can be told as seconds of writes, `behind`: how far back
    storage was), and the CPU of the gateway process and of the storage server, in cores.
    (The gauge in seconds counts from when storage last held all the flushed WAL, which under a
    steady write load it may not do for a whole run.)"""

    def __init__(self, gw: GatewayProcess, storage_pid: int, interval: float = 0.2) -> None:
        self.gw, self.storage_pid, self.interval = gw, storage_pid, interval
        self.seconds: list[float] = []
        self.bytes: list[float] = []
        self.behind: list[float] = []
        self.rates: list[float] = []  # WAL bytes per second, per entry
        self.gateway_cpu: list[float] = []
        self.storage_cpu: list[float] = []

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            s, b = self.gw.gauge("pgsni_wal_lag_seconds"), self.gw.gauge("pgsni_wal_lag_bytes")
            if s is not None and b is not None:
                self.seconds.append(s)
                self.bytes.append(b)

    def _now(self) -> tuple[int, float, float, float]:
        with psycopg.connect(dsn(self.gw.port)) as conn:
            lsn = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        return lsn, time.monotonic(), cpu_seconds(self.gw.pid), cpu_seconds(self.storage_pid)

    def __enter__(self) -> "RunWatch":
        self._first, self._from = len(self.bytes), self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        (lsn0, t0, gw0, st0), (lsn1, t1, gw1, st1) = self._from, self._now()
        rate = (lsn1 - lsn0) / (t1 - t0)
        self.rates.append(rate)
        self.gateway_cpu.append((gw1 - gw0) / (t1 - t0))
        self.storage_cpu.append((st1 - st0) / (t1 - t0))
        self.behind += [b / rate if rate else 0.0 for b in self.bytes[self._first:]]


def _tps(work: Workdir, s3, storage_pid: int, scale: int, seconds: float, runs: int, clients) -> list[dict]:
    gateways: dict[str, GatewayProcess] = {}
    refused: dict[str, str] = {}
    try:
        for mode in MODES:
            gw = GatewayProcess(work, f"tps-{mode}", durability=mode, idle_timeout=3600, **s3(mode))
            reason = _refused(gw)
            if reason:
                console.print(f"  durability={mode}: not available ({reason})")
                refused[mode] = reason
                continue
            console.print(f"  durability={mode}: pgbench -i -s {scale}")
            gateways[mode] = gw.start()
            pgbench_init(gw.port, scale, checkpoint=True)
        for gw in gateways.values():  # the WAL of the init is in storage before anything is measured
            _until("the init's WAL in storage", lambda: not gw.gauge("pgsni_wal_lag_bytes") and not gw.gauge(
                "pgsni_wal_lag_seconds"))
        modes = list(gateways)
        rows = []
        for c in clients:
            samples: dict[str, list[dict]] = {m: [] for m in modes}
            watches = {m: RunWatch(gw, storage_pid) for m, gw in gateways.items()}  # every mode polled alike
            for run in range(runs):
                for mode in modes[run % len(modes):] + modes[:run % len(modes)]:
                    console.print(f"  tpcb-like c={c} run {run + 1}/{runs}: durability={mode}")
                    with watches[mode]:
                        samples[mode].append(pgbench(gateways[mode].port, c, "tpcb-like", seconds,
                                                     work.path / "pgbench-logs"))
            for mode in MODES:
                rows.append(_tps_row(mode, c, samples, refused, watches.get(mode)))
        return rows
    finally:
        for gw in gateways.values():
            gw.kill()  # nothing to keep: a SIGTERM would save each database first


def _tps_row(mode: str, clients: int, samples: dict, refused: dict, watch: RunWatch | None) -> dict:
    row: dict = {"mode": mode, "clients": clients, "available": mode not in refused}
    target = TARGETS.get((mode, clients))
    if target:
        row["target_vs_snapshot"] = target
    if mode in refused:
        row["reason"] = refused[mode]
        return row
    mine = samples[mode]
    row.update(tps=round(median([r["tps"] for r in mine]), 1), tps_runs=[round(r["tps"], 1) for r in mine],
               p50_ms=round(median([r["p50_ms"] for r in mine]), 3),
               p99_ms=round(median([r["p99_ms"] for r in mine]), 3), runs=len(mine))
    if "snapshot" in samples:
        row["vs_snapshot"] = paired_ratio([r["tps"] for r in mine], [r["tps"] for r in samples["snapshot"]])
        if target:
            row["meets_target"] = row["vs_snapshot"] >= target
    if watch is None:
        return row
    row.update(wal_mb_s=round(median(watch.rates) / 2**20, 2), gateway_cpu=round(median(watch.gateway_cpu), 3),
               storage_cpu=round(median(watch.storage_cpu), 3))
    if mode != "snapshot":
        for name, values in (("lag_seconds", watch.seconds), ("behind_seconds", watch.behind)):
            row.update({f"{name}_max": round(max(values, default=0.0), 3),
                        f"{name}_p95": round(percentile(values, 0.95), 3),
                        f"{name}_p50": round(percentile(values, 0.5), 3)})
        row.update(lag_samples=len(watch.seconds), lag_bytes_max=int(max(watch.bytes, default=0)),
                   lag_bytes_p50=int(percentile(watch.bytes, 0.5)))
    return row


def fill_wal(port: int, db_id: str, mb: int) -> dict:
    """Insert rows until the database has written `mb` MB of WAL: the rows, the WAL bytes and
    the end LSN (as an int)."""
    with psycopg.connect(dsn(port, db_id), autocommit=True) as conn:
        conn.execute("CREATE TABLE fill (id bigint, pad text)")
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        rows = written = 0
        while written < mb << 20:
            conn.execute("INSERT INTO fill SELECT g, repeat('x', 500) FROM generate_series(%s::bigint, %s::bigint) g",
                         (rows + 1, rows + BATCH))
            rows += BATCH
            written, end = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn), "
                                        "pg_current_wal_lsn()", (start,)).fetchone()
    return {"rows": rows, "wal_bytes": int(written), "end_lsn": parse_lsn(str(end))}


def _rows(port: int, db_id: str) -> int:
    with psycopg.connect(dsn(port, db_id)) as conn:
        return conn.execute("SELECT count(*) FROM fill").fetchone()[0]


def _until(what: str, check, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)


def _stored_lsn(gw: GatewayProcess, db_id: str) -> int:
    lsn = (gw.info(db_id).get("wal") or {}).get("stored_lsn")
    return parse_lsn(lsn) if lsn else 0


def _lose_node(work: Workdir, settings: dict, ids: dict[str, int]) -> dict[str, dict]:
    """Write each database's MB of WAL through a gateway, let storage catch up, then lose the
    node: SIGKILL the gateway and all it ran, delete its data root. What each was written."""
    written = {}
    lost = GatewayProcess(work, "restore-lost", **settings).start()
    try:
        for db, mb in ids.items():
            console.print(f"  pgsni: writing {mb} MB of WAL into {db} (durability=async)")
            first_result_ms(lost.port, db)  # creates it: its first version is the base
            written[db] = fill_wal(lost.port, db, mb)
        for db in ids:
            _until(f"{db}'s WAL in storage", lambda: _stored_lsn(lost, db) >= written[db]["end_lsn"])
    finally:
        lost.kill()
    shutil.rmtree(lost.root, ignore_errors=True)
    return written


def _psql(server: DirectPostgres, sql: str) -> str:
    return subprocess.run(["psql", "-h", str(server.sockdir), "-p", str(server.port), "-U", ADMIN,
                           "-XAtqc", sql, "postgres"], check=True, capture_output=True, text=True).stdout.strip()


def _baseline_restore(work: Workdir, template: Path, mb: int) -> dict:
    """pg_receivewal + pg_basebackup against a direct Postgres, `mb` MB of WAL written, then a
    copy of the base started with a restore_command from the received WAL."""
    run_as, bindir = work.run_as, work.bindir
    received = run_as.make_dir(work.path / f"received-{mb}")
    base = work.path / f"base-{mb}"
    primary = DirectPostgres(work, dict(START_OPTIONS), name=f"primary-{mb}").start(template)
    conn = ["-h", str(primary.sockdir), "-p", str(primary.port), "-U", ADMIN, "-w"]  # the template's superuser
    _psql(primary, "SELECT pg_create_physical_replication_slot('bench', true)")  # as the shipper: no WAL lost
    with open(work.path / f"receivewal-{mb}.log", "ab") as log:
        receiver = subprocess.Popen([str(bindir / "pg_receivewal"), "-D", str(received), *conn, "--slot", "bench",
                                     "--synchronous", "--no-loop"], stdout=log, stderr=subprocess.STDOUT,
                                    **run_as.popen_kwargs())
    try:
        _until("pg_receivewal streaming", lambda: _psql(primary, "SELECT count(*) FROM pg_stat_replication") == "1"
               or receiver.poll() is not None)
        if receiver.poll() is not None:
            raise RuntimeError(f"pg_receivewal exited: {log.name}: {Path(log.name).read_text()[-1000:]}")
        run_as.make_dir(base)
        subprocess.run([str(bindir / "pg_basebackup"), "-D", str(base), *conn, "-c", "fast"],
                       check=True, capture_output=True, **run_as.popen_kwargs())
        console.print(f"  baseline: writing {mb} MB of WAL into a direct Postgres")
        written = fill_wal(primary.port, "bench", mb)
        _until("pg_receivewal caught up", lambda: parse_lsn(_psql(
            primary, "SELECT flush_lsn FROM pg_stat_replication") or "0/0") >= written["end_lsn"])
    finally:
        primary.stop()
        receiver.terminate()
        receiver.wait(30)
    (base / "recovery.signal").touch()
    run_as.chown(base / "recovery.signal")
    options = {**START_OPTIONS, "hot_standby": "off",  # accepts logins once recovery ended
               "restore_command": f"test -f {received}/%f && cp {received}/%f %p || cp {received}/%f.partial %p"}
    console.print(f"  baseline: restoring base + {mb} MB of WAL")
    restored = DirectPostgres(work, options, name=f"restored-{mb}")
    started = time.perf_counter()
    try:
        restored.start(base)
        elapsed = time.perf_counter() - started + first_result_ms(restored.port, "bench") / 1000
        found = _rows(restored.port, "bench")
    finally:
        restored.stop()
    for path in (base, received, primary.pgdata.parent, restored.pgdata.parent):
        shutil.rmtree(path, ignore_errors=True)
    return {"baseline_s": elapsed, "baseline_rows_lost": written["rows"] - found, "baseline_wal_bytes": written["wal_bytes"]}


def _restore(work: Workdir, s3, sizes, runs: int) -> list[dict]:
    """Per run and WAL size: a database restored by a new gateway after the node was lost,
    then the baseline with the same WAL (interleaved, so both see the same machine)."""
    settings = dict(s3("restore"), durability="async", lease_seconds=0, idle_timeout=3600, spare_clones=0)
    plan = [(run, mb, f"wal{mb}-{run}") for run in range(runs) for mb in sizes]
    written = _lose_node(work, settings, {db: mb for _, mb, db in plan})
    new = GatewayProcess(work, "restore-new", **settings).start()
    template = new.pgdata(f"_template-{work.major}")  # the baseline's: the same postgresql.conf
    samples: dict[int, list[dict]] = {mb: [] for mb in sizes}
    try:
        phases = Phases(new)
        for run, mb, db in plan:
            console.print(f"  run {run + 1}/{runs}, {mb} MB: pgsni restores {db} on a gateway with an empty data root")
            sample = {"pgsni_s": first_result_ms(new.port, db) / 1000, "pgsni_phases_ms": phases.since(),
                      "pgsni_rows_lost": written[db]["rows"] - _rows(new.port, db), **written[db]}
            samples[mb].append({**sample, **_baseline_restore(work, template, mb)})
    finally:
        new.kill()
    return [_restore_row(mb, samples[mb]) for mb in sizes]


def _restore_row(mb: int, samples: list[dict]) -> dict:
    def each(key):
        return [s[key] for s in samples]

    phases = dict.fromkeys(k for s in samples for k in s["pgsni_phases_ms"])  # in the order they came
    return {"wal_mb": mb, "runs": len(samples), "wal_bytes": int(median(each("wal_bytes"))),
            "baseline_wal_bytes": int(median(each("baseline_wal_bytes"))),
            "rows": int(median(each("rows"))),
            "pgsni_s": round(median(each("pgsni_s")), 3), "baseline_s": round(median(each("baseline_s")), 3),
            "ratio": paired_ratio(each("pgsni_s"), each("baseline_s")),
            "pgsni_phases_ms": {k: round(median([p.get(k) for p in each("pgsni_phases_ms")]), 1) for k in phases},
            "pgsni_rows_lost": sum(each("pgsni_rows_lost")), "baseline_rows_lost": sum(each("baseline_rows_lost")),
            "pgsni_samples_s": [round(x, 3) for x in each("pgsni_s")],
            "baseline_samples_s": [round(x, 3) for x in each("baseline_s")]}


def run(*, runs: int, quick: bool, out: Path, seconds: float | None = None, scale: int | None = None,
        clients: tuple[int, ...] = (1, 8), wal_mb: tuple[int, ...] | None = None) -> dict:
    seconds = seconds or (3 if quick else 10)
    scale = scale or (2 if quick else 10)
    wal_mb = wal_mb or ((16, 64) if quick else (16, 256))
    restore_runs = 1 if quick else runs
    moto = MotoServer().start()
    work = Workdir()
    try:
        bucket = moto.create_bucket()

        def s3(prefix: str) -> dict:  # gateway settings: storage under s3://bucket/prefix
            return {"storage": f"s3://{bucket}/{prefix}", "s3_endpoint": moto.endpoint_url,
                    "s3_region": "us-east-1", "s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY}

        console.print(f"[bold]durability[/]: TPC-B-like TPS per mode, scale {scale}")
        tps = _tps(work, s3, moto.proc.pid, scale, seconds, runs, clients)
        console.print(f"[bold]durability[/]: restore after a lost node, WAL {wal_mb} MB")
        restore = _restore(work, s3, wal_mb, restore_runs)
    finally:
        work.close()
        moto.close()
    _print(tps, restore)
    params = {"runs": runs, "seconds": seconds, "scale": scale, "clients": list(clients), "wal_mb": list(wal_mb), "restore_runs": restore_runs,
              "storage": "s3 (moto server on 127.0.0.1)", "rpo_seconds": 1.0, "lag_sample_interval_s": 0.2}
    doc = {"tps": tps, "restore": restore}
    write_json(out, "durability", params, doc)
    return doc


def _print(tps: list[dict], restore: list[dict]) -> None:
    def lag(r, name):
        if f"{name}_max" not in r:
            return ""
        return f"{r[f'{name}_max']:.2f} / {r[f'{name}_p95']:.2f} / {r[f'{name}_p50']:.2f}"

    table("Durability: TPC-B-like TPS through pgsni, storage on moto S3 (median of runs)",
          ["durability", "clients", "TPS", "p50/p99 ms", "÷ snapshot", "target", "met", "WAL MB/s",
           "gw / S3 CPU", "storage behind, s of writes: max / p95 / p50", "lag gauge s", "lag KiB max / p50"],
          [[r["mode"], r["clients"], r["tps"], f"{r['p50_ms']:.2f}/{r['p99_ms']:.1f}", r.get("vs_snapshot", ""),
            r.get("target_vs_snapshot", ""), {True: "yes", False: "no"}.get(r.get("meets_target"), ""),
            r["wal_mb_s"], f"{r['gateway_cpu']:.2f} / {r['storage_cpu']:.2f}", lag(r, "behind_seconds"),
            lag(r, "lag_seconds"),
            f"{r['lag_bytes_max'] / 1024:,.0f} / {r['lag_bytes_p50'] / 1024:,.0f}" if "lag_bytes_max" in r else ""]
           if r["available"] else [r["mode"], r["clients"], "not available", "", "", r.get("target_vs_snapshot", "")]
           + [""] * 6 for r in tps])
    table("Restore after a lost node: connect to first query result (median of runs)",
          ["WAL MB", "runs", "pgsni s", "gateway's phases ms", "basebackup+receivewal s", "pgsni ÷ baseline",
           "rows lost (pgsni / baseline)"],
          [[round(r["wal_bytes"] / 2**20, 1), r["runs"], r["pgsni_s"],
            " ".join(f"{k}={v:g}" for k, v in r["pgsni_phases_ms"].items()), r["baseline_s"], r["ratio"],
            f"{r['pgsni_rows_lost']} / {r['baseline_rows_lost']}"] for r in restore])
