"""Storage benchmark: how long pgsni takes to snapshot a stopped database to S3 (moto) and to
restore it, next to the raw baseline of `tar | zstd` plus a plain S3 copy of the same bytes,
for a fresh database and a pgbench one. Ratios are measured in the same run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gateway.config import Settings
from gateway.compute.instances import InstanceManager
from gateway.app import open_databases
from gateway.compute.template import local_catalog
from storage.factory import open_backend
from tests.support.moto import ACCESS_KEY, SECRET_KEY, MotoServer

console = Console(stderr=True)


def _reachable_tmp(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)
    return path


async def _timed(coro_fn) -> float:
    started = time.perf_counter()
    await coro_fn()
    return time.perf_counter() - started


def _sh(cmd: str) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True)
    return time.perf_counter() - started


async def _bench(runs: int, scale: int, moto: MotoServer) -> list[dict]:
    bucket = moto.create_bucket()
    root = _reachable_tmp("pgsni-bench-")
    settings = Settings(data_root=str(root / "data"), socket_dir=f"/tmp/pgsni-b-{root.name[-6:]}",
                        storage=f"s3://{bucket}/bench", s3_endpoint=moto.endpoint_url,
                        s3_region="us-east-1", s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY,
                        retention_keep=100, tls_cert="-", tls_key="-")
    catalog = local_catalog(settings)
    catalog.prepare()
    backend = open_backend(settings)
    databases = open_databases(settings, catalog, backend)
    manager = InstanceManager(settings, databases)
    results = []
    try:
        for name, size_scale in (("fresh", 0), (f"pgbench-s{scale}", scale)):
            db_id = name.replace("pgbench-s", "pgb")
            console.print(f"[bold]{name}[/]: creating")
            inst = await manager.create(db_id, "bench-password")
            if size_scale:
                subprocess.run(["pgbench", "-i", "-q", "-s", str(size_scale), "-h", str(inst.socket_dir),
                                "-U", "postgres", "postgres"], check=True, capture_output=True,
                               env={**os.environ, "PGPASSWORD": "bench-password"})
            await manager.stop(db_id)  # saves the first version
            pgdata = catalog.pgdata(db_id)
            data_mb = sum(p.stat().st_size for p in pgdata.rglob("*") if p.is_file()) / 1e6
            results.append(await _measure(name, db_id, pgdata, data_mb, runs, databases, backend, root))
    finally:
        await manager.stop_all()
        await backend.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(settings.socket_path, ignore_errors=True)
    return results


async def _measure(name, db_id, pgdata, data_mb, runs, databases, backend, root) -> dict:
    store = databases.store
    roles = databases.catalog.roles(db_id) or {}
    snap, restore, base_snap, base_restore = [], [], [], []
    raw = root / "raw.tar.zst"
    for i in range(runs):
        console.print(f"  {name}: run {i + 1}/{runs}")
        snap.append(await _timed(lambda: store.snapshot(db_id, pgdata, roles)))
        manifest = (await store.current(db_id)).manifest
        target = root / f"restore-{i}"
        target.mkdir()
        restore.append(await _timed(lambda: store.restore(manifest, target / "pgdata")))
        shutil.rmtree(target)
        # baseline: the same bytes through plain tools and a plain S3 copy
        t_tar = _sh(f"tar -C {pgdata} -cf - . | zstd -3 -q -T1 -o {raw} -f")
        t_up = await _timed(lambda: backend.upload_file(f"raw/{db_id}.tar.zst", raw))
        base_snap.append(t_tar + t_up)
        dl = root / "dl.tar.zst"

        async def download() -> None:
            with open(dl, "wb") as f:
                async for chunk in backend.download(f"raw/{db_id}.tar.zst"):
                    f.write(chunk)

        t_down = await _timed(download)
        out = root / "raw-out"
        out.mkdir()
        t_untar = _sh(f"zstd -d -q -c {dl} | tar -C {out} -xf -")
        base_restore.append(t_down + t_untar)
        shutil.rmtree(out)
        dl.unlink()
    archive_mb = manifest.archive["size"] / 1e6
    med = statistics.median
    return {"database": name, "data_mb": round(data_mb, 1), "archive_mb": round(archive_mb, 1),
            "snapshot_s": round(med(snap), 3), "baseline_snapshot_s": round(med(base_snap), 3),
            "snapshot_ratio": round(med(snap) / med(base_snap), 2),
            "restore_s": round(med(restore), 3), "baseline_restore_s": round(med(base_restore), 3),
            "restore_ratio": round(med(restore) / med(base_restore), 2), "runs": runs}


def run(*, runs: int, scale: int, out: str) -> None:
    moto = MotoServer().start()
    try:
        results = asyncio.run(_bench(runs, scale, moto))
    finally:
        moto.close()
    table = Table(title="Snapshot and restore through S3 (moto on 127.0.0.1), median of runs")
    for col in ("database", "data MB", "archive MB", "snapshot s", "tar|zstd+copy s", "ratio",
                "restore s", "copy+unzstd|tar s", "ratio"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["database"], str(r["data_mb"]), str(r["archive_mb"]), str(r["snapshot_s"]),
                      str(r["baseline_snapshot_s"]), f"{r['snapshot_ratio']}x", str(r["restore_s"]),
                      str(r["baseline_restore_s"]), f"{r['restore_ratio']}x")
    Console(width=160).print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"suite": "storage", "results": results}, indent=2) + "\n")
    console.print(f"wrote {out}")
