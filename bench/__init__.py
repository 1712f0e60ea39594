"""Benchmarks: `python -m bench <datapath|connect|coldstart|density|storage|all>` starts what it
needs on 127.0.0.1 (pgsni, Postgres, PgBouncer, moto), prints a table, and writes JSON results
and PNG charts under docs/benchmarks/. `python -m bench.profile` profiles one path."""
