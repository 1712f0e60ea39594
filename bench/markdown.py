"""`python -m bench.markdown [DIR]`: the results tables of docs/benchmarks.md, as markdown,
from the suites' JSON files (so the page carries exactly what the last run measured)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(out: Path, suite: str) -> dict | None:
    p = out / f"{suite}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def datapath(doc: dict) -> list[str]:
    lines = [_row(["mode", "clients", "pgsni TPS", "direct TPS", "PgBouncer TPS", "pgsni ÷ direct",
                   "pgsni ÷ PgBouncer", "p50 / p99 ms pgsni", "direct", "PgBouncer", "gateway CPU (cores)"]),
             _row(["---"] * 2 + ["---:"] * 9)]
    for r in doc["results"]["pgbench"]:
        lines.append(_row([r["mode"], r["clients"], f"{r['pgsni_tps']:,.0f}", f"{r['direct_tps']:,.0f}",
                           f"{r['pgbouncer_tps']:,.0f}", f"**{r['tps_vs_direct']:.2f}×**",
                           f"**{r['tps_vs_pgbouncer']:.2f}×**",
                           f"{r['pgsni_p50_ms']:.2f} / {r['pgsni_p99_ms']:.1f}",
                           f"{r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.1f}",
                           f"{r['pgbouncer_p50_ms']:.2f} / {r['pgbouncer_p99_ms']:.1f}",
                           f"{r['pgsni_cpu_cores']:.2f}"]))
    lines += ["", _row(["COPY", "size", "pgsni MB/s", "direct MB/s", "PgBouncer MB/s", "pgsni ÷ direct",
                        "gateway RSS before → peak", "gateway CPU"]), _row(["---"] + ["---:"] * 7)]
    for b in doc["results"]["bulk"]:
        lines.append(_row([b["mode"], f"{b['size_mb']} MB", b["pgsni_mb_s"], b["direct_mb_s"], b["pgbouncer_mb_s"],
                           f"**{b['speed_vs_direct']:.2f}×**",
                           f"{b['pgsni_rss_before_mb']:.0f} → {b['pgsni_rss_peak_mb']:.0f} MB",
                           f"{b['pgsni_cpu_cores']:.2f}"]))
    return lines


def connect(doc: dict) -> list[str]:
    r = doc["results"]
    lines = [_row(["target", "connections/s", "pgsni ÷ this", "connect p50", "p95", "p50 − client PBKDF2"]),
             _row(["---"] + ["---:"] * 5)]
    for t in ("pgsni", "direct", "pgbouncer"):
        x = r[t]
        lines.append(_row([t, x["conn_per_s"], f"{r['pgsni']['conn_per_s'] / x['conn_per_s']:.2f}×",
                           f"{x['p50_ms']} ms", f"{x['p95_ms']} ms", f"{x['p50_minus_client_scram_ms']} ms"]))
    c = r["client_scram"]
    lines += ["", f"Client-side SCRAM at {c['iterations']} iterations: PBKDF2 {c['pbkdf2_ms']} ms (libpq's "
              f"share, C), a whole scramp exchange {c['scramp_exchange_ms']} ms (Python). Gateway CPU per "
              f"new connection: {r['pgsni_gateway_cpu_ms_per_conn']} ms."]
    return lines


def coldstart(doc: dict) -> list[str]:
    lines = [_row(["case", "p50", "p95", "n", "target p50", "met", "gateway's own phases (mean ms)"]),
             _row(["---"] + ["---:"] * 5 + ["---"])]
    for r in doc["results"]:
        target = f"< {r['target_p50_ms']} ms" if "target_p50_ms" in r else ""
        met = ("yes" if r["meets_target"] else "**no**") if "meets_target" in r else ""
        phases = ", ".join(f"{k} {v:g}" for k, v in r.get("server_phases_mean_ms", {}).items())
        lines.append(_row([r["case"], f"{r['p50_ms']:,.0f} ms", f"{r['p95_ms']:,.0f} ms", r["n"], target, met, phases]))
    return lines


def density(doc: dict) -> list[str]:
    lines = [_row(["databases", "running", "USS/instance idle", "USS/instance with a client", "PSS idle",
                   "gateway RSS", "SELECT 1 p50 / max", "reconnect p50 / max", "all responsive"]),
             _row(["---:"] * 8 + ["---"])]
    for r in doc["results"]:
        lines.append(_row([r["n"], r["running"], f"{r['idle_uss_mb_per_instance']} MB",
                           f"{r['active_uss_mb_per_instance']} MB", f"{r['idle_pss_mb_per_instance']} MB",
                           f"{r['gateway_rss_mb']} MB", f"{r['query_p50_ms']} / {r['query_max_ms']} ms",
                           f"{r['reconnect_p50_ms']} / {r['reconnect_max_ms']} ms",
                           "yes" if r["all_responsive"] else "**no**"]))
    return lines


def relays(doc: dict) -> list[str]:
    lines = [_row(["clients (2 × N)", "1 relay TPS", "2 relays TPS", "2 ÷ 1"]), _row(["---:"] * 4)]
    for r in doc["results"]:
        lines.append(_row([r["total_clients"], f"{r['one_relay_tps']:,.0f}", f"{r['two_relays_tps']:,.0f}",
                           f"{r['two_vs_one']:.2f}×"]))
    return lines


def floor(doc: dict) -> list[str]:
    head = ["clients", "pgsni TPS", "floor TPS", "floor ×2 TPS", "PgBouncer TPS", "direct TPS",
            "pgsni ÷ floor", "pgsni ÷ PgBouncer", "floor ÷ PgBouncer", "floor ×2 ÷ PgBouncer"]
    lines = [_row(head), _row(["---:"] * len(head))]
    for r in doc["results"]:
        lines.append(_row([r["clients"], *(f"{r[t + '_tps']:,.0f}" for t in ("pgsni", "floor", "floor_x2",
                                                                             "pgbouncer", "direct")),
                           *(f"**{r[k]:.2f}×**" for k in ("pgsni_vs_floor", "pgsni_vs_pgbouncer",
                                                          "floor_vs_pgbouncer", "floor_x2_vs_pgbouncer"))]))
    return lines


def durability(doc: dict) -> list[str]:
    head = ["durability", "clients", "TPS", "p50 / p99 ms", "÷ snapshot", "target", "met", "WAL written",
            "CPU: gateway / S3 server (cores)",
            "storage behind, in seconds of writes: max / p95 / p50", "pgsni_wal_lag_seconds: max / p95 / p50",
            "lag bytes: max / p50"]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]

    def three(r, name):
        return f"{r[name + '_max']:.2f} / {r[name + '_p95']:.2f} / {r[name + '_p50']:.2f} s" if name + "_max" in r else ""

    for r in doc["results"]["tps"]:
        target = f"≥ {r['target_vs_snapshot']}×" if "target_vs_snapshot" in r else ""
        if not r["available"]:
            lines.append(_row([r["mode"], r["clients"], "not available", "", "", target] + [""] * 6))
            continue
        met = ("yes" if r["meets_target"] else "**no**") if "meets_target" in r else ""
        size = f"{r['lag_bytes_max'] / 1024:,.0f} / {r['lag_bytes_p50'] / 1024:,.0f} KiB" if "lag_bytes_max" in r else ""
        lines.append(_row([r["mode"], r["clients"], f"{r['tps']:,.0f}", f"{r['p50_ms']:.2f} / {r['p99_ms']:.1f}",
                           f"**{r['vs_snapshot']:.2f}×**", target, met, f"{r['wal_mb_s']:.2f} MB/s",
                           f"{r['gateway_cpu']:.2f} / {r['storage_cpu']:.2f}",
                           three(r, "behind_seconds"), three(r, "lag_seconds"), size]))
    lines += ["", _row(["WAL after the base", "runs", "pgsni: new gateway, connect to first result",
                        "gateway's phases (ms)", "pg_basebackup + pg_receivewal: copy, replay, first result",
                        "pgsni ÷ baseline", "rows lost (pgsni / baseline)"]),
              _row(["---:"] * 3 + ["---"] + ["---:"] * 3)]
    for r in doc["results"]["restore"]:
        phases = ", ".join(f"{k} {v:,.0f}" for k, v in r["pgsni_phases_ms"].items())
        lines.append(_row([f"{r['wal_bytes'] / 2**20:.0f} MiB", r["runs"], f"{r['pgsni_s']:.2f} s", phases,
                           f"{r['baseline_s']:.2f} s", f"**{r['ratio']:.2f}×**",
                           f"{r['pgsni_rows_lost']} / {r['baseline_rows_lost']}"]))
    return lines


def forwarding(doc: dict) -> list[str]:
    head = ["mode", "clients", "holder TPS", "forwarded TPS", "forwarded ÷ holder", "target", "met",
            "p50 ms: holder / forwarded"]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for r in doc["results"]["pgbench"]:
        met = ("yes" if r["meets_target"] else "**no**") if "meets_target" in r else ""
        lines.append(_row([r["mode"], r["clients"], f"{r['holder_tps']:,.0f}", f"{r['forwarded_tps']:,.0f}",
                           f"**{r['ratio']:.2f}×**", f"≥ {r['target']}×" if "target" in r else "", met,
                           f"{r['holder_p50_ms']:.2f} / {r['forwarded_p50_ms']:.2f}"]))
    lines += ["", _row(["connection set-up (connect() to an authenticated session)", "p50 ms", "p99 ms",
                        "connections"]), _row(["---", "---:", "---:", "---:"])]
    for route, v in doc["results"]["connect"].items():
        lines.append(_row([route, f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}", v["count"]]))
    return lines


def workers(doc: dict) -> list[str]:
    head = ["mode", "1 worker TPS", "2 workers TPS", "2 ÷ 1", "target", "met",
            "gateway CPU ms/tx (1 / 2)", "Postgres CPU ms/tx (1 / 2)", "pgbench CPU ms/tx (1 / 2)"]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for r in doc["results"]["pgbench"]:
        met = ("yes" if r["meets_target"] else "**no**") if "meets_target" in r else ""
        lines.append(_row([r["mode"], f"{r['one_tps']:,.0f}", f"{r['two_tps']:,.0f}", f"**{r['ratio']:.2f}×**",
                           f"≥ {r['target']}×" if "target" in r else "", met,
                           *(f"{r[f'one_{k}_ms_per_tx']:.3f} / {r[f'two_{k}_ms_per_tx']:.3f}"
                             for k in ("gateway", "postgres", "client"))]))
    cores = sorted({c for m in doc["results"]["model"] for c in m["predicted"]}, key=lambda c: int(c.split()[0]))
    lines += ["", _row(["model: TPS by workers (N) and cores (C)", "1 worker here: model / measured",
                        "2 workers here: model / measured", *cores]), _row(["---"] + ["---:"] * (2 + len(cores)))]
    for m in doc["results"]["model"]:
        lines.append(_row([m["mode"], f"{m['predicted_one_here']:,.0f} / {m['measured_one_here']:,.0f}",
                           f"{m['predicted_two_here']:,.0f} / {m['measured_two_here']:,.0f}",
                           *(", ".join(f"{n.split()[0]}: {v:,.0f}" for n, v in m["predicted"][c].items())
                             for c in cores)]))
    return lines


def main(out: Path) -> None:
    for suite in ("datapath", "connect", "coldstart", "density", "relays", "floor", "durability", "forwarding",
                  "workers"):
        doc = _load(out, suite)
        if doc is None:
            continue
        m = doc["machine"]
        params = ", ".join(f"{k} {v}" for k, v in doc["params"].items())
        print(f"### {suite}\n\n*Run of {doc['date']}, load average {m['loadavg']:.1f} at the end; {params}.*\n")
        print("\n".join(globals()[suite](doc)) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks"))
