"""An instance that never becomes ready: `pg_bindir` points at a directory whose `postgres`
is a wrapper around the real one (initdb and the rest are links to the real binaries). While a
flag file exists the wrapper writes a FATAL line to the instance log and hangs instead. The
client gets 57P03 within `start_timeout`, the gateway's log names the reason from the
instance log, nothing is left running, and once the flag is gone the next connect works."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from ..conftest import reachable_tmpdir
from ..support.harness import connect_sqlstate, conninfo, psql
from ..support.pginstalls import install

REASON = "FATAL:  could not create shared memory segment: simulated by the pgsni test"


def _stuck_processes(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _wrapper_bindir() -> tuple[Path, Path, str]:
    real = install().bindir
    d = reachable_tmpdir("pgsni-bin-")
    os.chmod(d, 0o755)
    for entry in real.iterdir():
        if entry.name != "postgres":
            (d / entry.name).symlink_to(entry)
    flag = d / "broken"
    marker = f"pgsni-stuck-{d.name}"
    (d / "postgres").write_text(f"""#!/bin/bash
if [ -e {flag} ] && [ "$1" != "--version" ] && [ "$1" != "-V" ]; then
    echo "{REASON}" >&2
    exec -a {marker} sleep 600
fi
exec {real / 'postgres'} "$@"
""")
    os.chmod(d / "postgres", 0o755)
    return d, flag, marker


@pytest.mark.slow
def test_instance_that_never_gets_ready_is_57P03_with_the_reason_logged(start_gateway, tls, caplog):
    bindir, flag, marker = _wrapper_bindir()
    try:
        gw = start_gateway(pg_bindir=str(bindir), start_timeout=2.0)
        gw.create_db("stuck")
        dsn = conninfo(gw.port, tls["ca"], "stuck")
        assert psql(dsn, "create table t(x int); insert into t values (7)").returncode == 0
        gw.call(lambda: gw.gw.instances.stop("stuck"))

        flag.touch()
        caplog.set_level(logging.INFO, logger="pgsni")
        started = time.monotonic()
        assert connect_sqlstate(gw.port, tls["ca"], "stuck") == "57P03"
        elapsed = time.monotonic() - started
        assert 2.0 <= elapsed < 2.0 + 6.0  # start_timeout, plus stopping the stuck process
        failures = [r.getMessage() for r in caplog.records if "starting stuck failed" in r.getMessage()]
        assert failures and "not ready after 2s" in failures[0] and REASON in failures[0], failures
        # psql shows what the client reads: the SQLSTATE's message and the log line as detail
        out = psql(dsn, "select 1")
        assert 'database "stuck" could not be started' in out.stderr
        assert "simulated by the pgsni test" in out.stderr
        assert _stuck_processes(marker) == []  # the hanging "postgres" was stopped
        assert "stuck" not in gw.running()

        flag.unlink()
        out = psql(dsn, "select x from t")
        assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
