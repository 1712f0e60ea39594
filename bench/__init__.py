"""Benchmarks: `python -m bench <suite>` starts what it needs on 127.0.0.1, prints a table,
and writes JSON results under docs/benchmarks/."""
