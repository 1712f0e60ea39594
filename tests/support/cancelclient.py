"""Cancel a running query with psycopg from a separate process (PQcancel blocks holding the
GIL, which would stall an in-process gateway thread), and check the outcome."""

from __future__ import annotations

import subprocess
import sys

CLIENT = """
import sys, threading, time, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    threading.Timer(1.0, getattr(conn, sys.argv[2])).start()
    started = time.monotonic()
    try:
        conn.execute("select pg_sleep(30)")
        print("not cancelled")
    except psycopg.errors.QueryCanceled:
        print(f"cancelled after {time.monotonic() - started:.1f}s")
    conn.rollback()
    print(conn.execute("select 'still usable'").fetchone()[0])
"""


def assert_cancels(dsn: str, method: str) -> None:
    """`method` is `cancel` (libpq's classic PQcancel: a new plain connection without SNI) or
    `cancel_safe` (libpq 17+: over the connection's own encryption). The query must be
    cancelled within 10 s and the connection stay usable."""
    out = subprocess.run([sys.executable, "-c", CLIENT, dsn, method],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0].startswith("cancelled after") and float(lines[0].split()[-1][:-1]) < 10, out.stdout
    assert lines[1] == "still usable"
