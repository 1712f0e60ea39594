"""Shared by the suites: medians and percentiles, the rich table, and writing results as
JSON (docs/benchmarks/<suite>.json) next to the machine's description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .env import bench_install

console = Console(stderr=True)


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else 0.0


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not len(values):
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of each run's own a ÷ b: the two were measured seconds apart, so their ratio
    is steadier than a ratio of medians on a machine whose speed drifts."""
    return round(median([ratio(x, y) for x, y in zip(a, b)]), 3)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1048576, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "postgres": version([str(bench_install()[1] / "postgres"), "--version"]),  # servers compared
            "pgbench": version(["pgbench", "--version"]),
            "pgbouncer": version(["/usr/sbin/pgbouncer", "--version"]),
            "loadavg": os.getloadavg()[0]}


def write_json(out_dir: Path, suite: str, params: dict, results) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    doc = {"suite": suite, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine(), "params": params, "results": results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {path}")
    return path


def table(title: str, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) and abs(v) < 1000 else
                    (f"{v:,.0f}" if isinstance(v, float) else str(v)) for v in r])
    Console(width=200).print(t)
