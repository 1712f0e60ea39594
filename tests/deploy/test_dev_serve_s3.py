"""`./dev serve-s3`, the one command for a gateway against a local S3 server without
containers: it comes up, serves a client, and on SIGTERM stops the gateway (which uploads its
snapshot to moto) before it stops moto."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import reachable_tmpdir
from ..support.harness import DOMAIN, psql
from ..support.ports import free_port
from .conftest import ROOT, wait_listening


def _dev_would_install() -> str | None:
    """Why running ./dev here would install something (then the test is skipped), or None."""
    venv = ROOT / ".venv"
    if Path(sys.executable).parent != venv / "bin":
        return "the tests do not run from the project's .venv"
    stamp = venv / ".pgsni-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        return "pyproject.toml or constraints.txt changed since the last ./dev set-up (it would reinstall)"
    for tool in ("psql", "s3fs", "shellcheck"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (./dev would apt-get install it)"
    if not Path("/usr/sbin/pgbouncer").exists() and shutil.which("pgbouncer") is None:
        return "pgbouncer is missing (./dev would apt-get install it)"
    if not (ROOT / "certs" / "dev" / "server.pem").exists():
        return "no development certificate yet (./dev serve creates certs/dev)"
    return None


@pytest.mark.slow
def test_dev_serve_s3_serves_and_stops_moto_after_the_gateway(tmp_path):
    reason = _dev_would_install()
    if reason:
        pytest.skip(reason)
    work = reachable_tmpdir("pgsni-dev-s3-")
    port = free_port()
    log = tmp_path / "dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSNI_", "AWS_"))}
    env |= {"DEV_S3_DIR": str(work), "PGSNI_ADMIN_PORT": "0", "PGSNI_SHUTDOWN_GRACE": "2",
            "PGSNI_POSTGRES_OPTIONS": "fsync=off", "PGSNI_SOCKET_DIR": f"/tmp/pgsni-d-{work.name[-8:]}",
            "PGSNI_LOG_FORMAT": "text"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ROOT / "dev"), "serve-s3", "--listen", f"127.0.0.1:{port}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, log, "./dev serve-s3 to listen", timeout=90)
        moto_port = int(re.search(r"moto S3 server on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        ca = ROOT / "certs" / "dev" / "ca.pem"
        dsn = (f"host=app1.{DOMAIN} hostaddr=127.0.0.1 port={port} user=postgres password=postgres "
               f"sslmode=verify-full sslrootcert={ca} connect_timeout=20")
        r = psql(dsn, "create table t (x int); insert into t values (7); select sum(x) from t")
        assert r.returncode == 0, r.stderr + log.read_text()[-3000:]
        assert r.stdout.splitlines()[-1] == "7"
        assert "storage s3://pgsni" in log.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "snapshot app1/" in text, "the gateway uploaded before moto went away"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", moto_port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(env["PGSNI_SOCKET_DIR"], ignore_errors=True)
