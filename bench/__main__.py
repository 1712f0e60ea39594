"""`python -m bench <datapath|connect|coldstart|density|relays|floor|storage|durability|forwarding|workers|all> [--quick] [--runs N] [--out DIR]`."""

from __future__ import annotations

import time
from pathlib import Path

import click

SUITES = ("datapath", "connect", "coldstart", "density")


def _suite(name: str, runs: int, quick: bool, out: Path) -> None:
    import importlib

    from .report import console

    started = time.monotonic()
    console.rule(f"[bold]{name}")
    module = importlib.import_module(f"bench.{name}")
    module.run(runs=runs, quick=quick, out=out)
    console.print(f"{name} took {time.monotonic() - started:.0f} s")


def _options(fn):
    fn = click.option("--out", default="docs/benchmarks", show_default=True, type=click.Path(file_okay=False),
                      help="Directory for the JSON results and PNG charts.")(fn)
    fn = click.option("--runs", default=None, type=int, help="Runs per figure (median reported); default 3, 2 with --quick.")(fn)
    fn = click.option("--quick", is_flag=True, help="Small sizes and short runs (seconds, for CI).")(fn)
    return fn


@click.group()
def main() -> None:
    """pgsni benchmarks: everything is started here on 127.0.0.1."""


def _make(name: str, doc: str):
    @_options
    def command(quick: bool, runs: int | None, out: str) -> None:
        from .charts import render

        _suite(name, runs or (2 if quick else 3), quick, Path(out))
        render(Path(out), [name])

    command.__doc__ = doc
    main.command(name)(command)


_make("datapath", "pgbench -S / TPC-B-like at 1, 8, 32 clients and bulk COPY: pgsni vs direct vs PgBouncer.")
_make("connect", "New TLS+SCRAM connections per second and connect latency: pgsni vs direct vs PgBouncer.")
_make("coldstart", "TCP connect to first result: new database, stopped on local disk, only in the bucket.")
_make("density", "10, 50, 100 databases active at once: unique memory per instance, gateway RSS, latency.")
_make("forwarding", "A client forwarded through another gateway vs connected to its database's holder: "
      "pgbench at 1, 8, 32 clients and connection set-up time.")
_make("workers", "pgsni serve --workers 2 vs one process: 16 databases with 2 clients each, "
      "select-only and TPC-B-like, with the CPU per transaction of gateway, Postgres and clients.")
_make("durability", "TPC-B-like TPS per durability mode, WAL lag (RPO), restore after a lost node vs "
      "pg_basebackup + pg_receivewal.")


@main.command()
@_options
def relays(quick: bool, runs: int | None, out: str) -> None:
    """One relay process vs two, the same two instances: what a multi-process mode would buy."""
    _suite("relays", runs or (2 if quick else 3), quick, Path(out))


@main.command()
@_options
def floor(quick: bool, runs: int | None, out: str) -> None:
    """pgsni vs the least a Python TLS relay can do (one process and two) vs PgBouncer."""
    _suite("floor", runs or (2 if quick else 3), quick, Path(out))


@main.command("all")
@_options
def all_(quick: bool, runs: int | None, out: str) -> None:
    """Every suite above (not storage), then the charts."""
    from .charts import render

    for name in SUITES:
        _suite(name, runs or (2 if quick else 3), quick, Path(out))
    render(Path(out), list(SUITES))


@main.command()
@click.option("--runs", default=3, show_default=True, help="Runs per figure; the median is reported.")
@click.option("--scale", default=30, show_default=True, help="pgbench scale of the large database (30 ≈ 500 MB).")
@click.option("--quick", is_flag=True, help="Scale 2, 1 run.")
@click.option("--out", default="docs/benchmarks", show_default=True, type=click.Path(file_okay=False))
def storage(runs: int, scale: int, quick: bool, out: str) -> None:
    """Snapshot and restore time vs. `tar | zstd` plus a plain S3 copy of the same bytes."""
    from .storage import run

    if quick:
        runs, scale = 1, 2
    run(runs=runs, scale=scale, out=str(Path(out) / "storage.json"))


if __name__ == "__main__":
    main()
