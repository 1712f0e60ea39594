"""PNG charts (matplotlib, Agg) from the suites' JSON files in the output directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import console  # noqa: E402

TARGETS = ("pgsni", "direct", "pgbouncer")
COLORS = {"pgsni": "#2b6cb0", "direct": "#718096", "pgbouncer": "#dd6b20"}


def _load(out: Path, suite: str) -> dict | None:
    path = out / f"{suite}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=COLORS.get(name))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def datapath(doc: dict, out: Path) -> list[Path]:
    rows = doc["results"]["pgbench"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, mode in enumerate(("select-only", "tpcb-like")):
        mine = [r for r in rows if r["mode"] == mode]
        groups = [f"{r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in mine]
        _bars(axes[0][col], groups, {t: [r[f"{t}_tps"] for r in mine] for t in TARGETS}, "TPS")
        for g, r in enumerate(mine):
            axes[0][col].annotate(f"{r['tps_vs_direct']:.2f}× direct\n{r['tps_vs_pgbouncer']:.2f}× bouncer",
                                  (g, max(r[f"{t}_tps"] for t in TARGETS)), ha="center", va="bottom",
                                  fontsize=7)
        axes[0][col].set_title(f"pgbench {mode}: TPS (median)")
        axes[0][col].margins(y=0.25)
        _bars(axes[1][col], groups, {t: [r[f"{t}_p99_ms"] for r in mine] for t in TARGETS}, "p99 latency, ms")
        axes[1][col].set_title(f"pgbench {mode}: p99 latency")
    axes[0][0].legend()
    paths = [_save(fig, out / "datapath.png")]
    bulk = doc["results"].get("bulk") or []
    if bulk:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        _bars(a1, [b["mode"] for b in bulk], {t: [b[f"{t}_mb_s"] for b in bulk] for t in TARGETS}, "MB/s")
        a1.set_title(f"COPY of {bulk[0]['size_mb']} MB: throughput")
        a1.legend()
        for b in bulk:
            trace = b.get("pgsni_rss_trace") or []
            a2.plot([t for t, _ in trace], [m for _, m in trace], label=b["mode"])
        a2.set_ylim(bottom=0)
        a2.set_xlabel("seconds")
        a2.set_ylabel("gateway RSS, MB")
        a2.set_title("pgsni gateway RSS during COPY")
        a2.legend()
        paths.append(_save(fig, out / "bulk.png"))
    return paths


def connect(doc: dict, out: Path) -> list[Path]:
    r = doc["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar(TARGETS, [r[t]["conn_per_s"] for t in TARGETS], color=[COLORS[t] for t in TARGETS])
    a1.set_title(f"new TLS + SCRAM connections/s ({r['clients']} clients)")
    a1.grid(axis="y", alpha=0.3)
    _bars(a2, list(TARGETS), {"p50": [r[t]["p50_ms"] for t in TARGETS],
                               "p95": [r[t]["p95_ms"] for t in TARGETS]}, "ms")
    a2.axhline(r["client_scram"]["pbkdf2_ms"], color="black", lw=0.8, ls="--",
               label=f"client PBKDF2 ({r['client_scram']['iterations']} it.)")
    a2.set_title("connect latency, one at a time")
    a2.legend()
    return [_save(fig, out / "connect.png")]


def coldstart(doc: dict, out: Path) -> list[Path]:
    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = [r["case"].replace(": ", "\n").replace(", ", "\n") for r in rows]
    _bars(ax, names, {"p50": [r["p50_ms"] for r in rows], "p95": [r["p95_ms"] for r in rows]}, "ms")
    for g, r in enumerate(rows):
        if "target_p50_ms" in r:
            ax.hlines(r["target_p50_ms"], g - 0.45, g + 0.45, colors="red", lw=1.5,
                      label="target p50" if g == 0 else None)
    ax.set_yscale("log")
    ax.set_title("cold start: TCP connect to first query result")
    ax.legend()
    return [_save(fig, out / "coldstart.png")]


def density(doc: dict, out: Path) -> list[Path]:
    rows = doc["results"]
    ns = [r["n"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ns, [r["idle_uss_mb_per_instance"] for r in rows], "o-", label="USS per idle instance")
    a1.plot(ns, [r["active_uss_mb_per_instance"] for r in rows], "s-", label="USS per instance, 1 client")
    a1.axhline(15, color="red", lw=1, ls="--", label="target 15 MB")
    a1.set_xlabel("databases running")
    a1.set_ylabel("MB")
    a1.set_ylim(bottom=0)
    a1.legend()
    a1.set_title("unique memory per instance")
    a2.plot(ns, [r["gateway_rss_mb"] for r in rows], "o-", label="gateway RSS, MB")
    a2.plot(ns, [r["query_max_ms"] for r in rows], "s-", label="slowest SELECT 1, ms")
    a2.set_xlabel("databases running")
    a2.set_ylim(bottom=0)
    a2.legend()
    a2.set_title("gateway memory and responsiveness")
    return [_save(fig, out / "density.png")]


def render(out: Path, suites) -> list[Path]:
    made = []
    for suite in suites:
        doc = _load(out, suite)
        fn = globals().get(suite)
        if doc is None or fn is None:
            continue
        made += fn(doc, out)
    for p in made:
        console.print(f"wrote {p}")
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
