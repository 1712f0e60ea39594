"""`python -m bench storage [--runs N] [--scale S]`."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """pgsni benchmarks."""


@main.command()
@click.option("--runs", default=3, show_default=True, help="Runs per figure; the median is reported.")
@click.option("--scale", default=30, show_default=True, help="pgbench scale of the large database (30 ≈ 500 MB).")
@click.option("--out", default="docs/benchmarks/storage.json", show_default=True)
def storage(runs: int, scale: int, out: str) -> None:
    """Snapshot and restore time vs. `tar | zstd` plus a plain S3 copy of the same bytes."""
    from .storage import run

    run(runs=runs, scale=scale, out=out)


if __name__ == "__main__":
    main()
