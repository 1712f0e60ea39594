"""Graceful shutdown of the gateway as a real process (`pgsni serve`): SIGTERM and SIGINT
exit 0, connected clients are told by Postgres itself, no postmaster is left behind, and
committed data survives a restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from ..conftest import PG_OPTIONS, pg_bindir
from ..support.harness import DOMAIN, conninfo, postmasters
from ..support.ports import free_port

PGSNI = Path(sys.executable).parent / "pgsni"
DEV_PASSWORD = "dev-pw-shutdown-test"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gateway still running after {timeout}s; log:\n{self.log()}") from None


@pytest.fixture
def serve(tls, data_root, tmp_path):
    """Start `pgsni --config FILE serve --listen 127.0.0.1:PORT`; wait until the port accepts."""
    socket_dir = f"/tmp/pgsni-x-{data_root.name[-8:]}"
    started: list[GatewayProcess] = []

    def start(**overrides) -> GatewayProcess:
        settings = dict(domains=[DOMAIN], tls_cert=str(tls["cert"]), tls_key=str(tls["key"]),
                        data_root=str(data_root), socket_dir=socket_dir,
                        storage_path=str(data_root / "_storage"),
                        postgres_options=dict(PG_OPTIONS), pg_bindir=pg_bindir(), create_on_connect=True,
                        dev_password=DEV_PASSWORD, shutdown_grace=1.0, log_level="DEBUG",
                        admin_port=0, spare_clones=0)
        settings.update(overrides)
        n = len(started)
        config = tmp_path / f"pgsni-{n}.toml"
        config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
        port = free_port()
        log_path = tmp_path / f"gateway-{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGSNI_")}
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([str(PGSNI), "--config", str(config), "serve",
                                     "--listen", f"127.0.0.1:{port}"],
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env)
        gp = GatewayProcess(proc, port, log_path)
        started.append(gp)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{gp.log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway did not listen on {port}:\n{gp.log()}")
                time.sleep(0.05)
        # the listener is up a moment before the signal handlers are installed
        time.sleep(0.2)
        return gp

    yield start
    for gp in started:
        if gp.proc.poll() is None:
            gp.proc.kill()
            gp.proc.wait(10)
    # a killed gateway leaves its postmasters behind: do not leak them past the test
    for db_dir in data_root.iterdir():
        for pid in postmasters(db_dir / "pgdata"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(socket_dir, ignore_errors=True)


def _connect(gp: GatewayProcess, ca: Path) -> psycopg.Connection:
    return psycopg.connect(conninfo(gp.port, ca, "app1", password=DEV_PASSWORD), autocommit=True)


def test_sigterm_ends_sessions_stops_postgres_and_keeps_data(serve, tls, data_root):
    gp = serve()
    pgdata = data_root / "app1" / "pgdata"
    conn = _connect(gp, tls["ca"])  # create_on_connect makes app1
    try:
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (42)")
        assert postmasters(pgdata) != []

        sent = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait_exit(15) == 0, gp.log()
        assert time.monotonic() - sent < 15

        # the session was ended by Postgres' fast shutdown, relayed through the gateway
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "terminating connection due to administrator command" in str(info.value)
    finally:
        conn.close()
    assert postmasters(pgdata) == []
    assert "stopped" in gp.log()

    again = serve()
    with _connect(again, tls["ca"]) as conn2:
        assert conn2.execute("select x from t").fetchall() == [(42,)]
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit(15) == 0, again.log()
    assert postmasters(pgdata) == []


def test_sigint_exits_zero_and_stops_postgres(serve, tls, data_root):
    gp = serve()
    pgdata = data_root / "app1" / "pgdata"
    conn = _connect(gp, tls["ca"])
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        assert postmasters(pgdata) != []
        gp.proc.send_signal(signal.SIGINT)
        assert gp.wait_exit(15) == 0, gp.log()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    assert postmasters(pgdata) == []
    assert "Traceback" not in gp.log()  # no KeyboardInterrupt


def test_idle_client_does_not_delay_exit_past_grace(serve, tls, data_root):
    grace = 1.0
    gp = serve(shutdown_grace=grace)
    conn = _connect(gp, tls["ca"])
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        sent = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait_exit(15) == 0, gp.log()
        elapsed = time.monotonic() - sent
    finally:
        conn.close()
    assert postmasters(data_root / "app1" / "pgdata") == []
    # grace, then a fast shutdown of Postgres (well under a second here), then exit
    assert elapsed < grace + 3.0, f"shutdown took {elapsed:.1f}s with grace {grace}s"


def test_sigterm_without_clients_exits_promptly(serve, data_root):
    gp = serve(shutdown_grace=30.0)
    sent = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)
    assert gp.wait_exit(15) == 0, gp.log()
    assert time.monotonic() - sent < 5  # nothing to wait for: the grace period is not spent


def test_shutdown_ends_when_last_client_leaves_not_after_full_grace(serve, tls, data_root):
    grace = 5.0
    gp = serve(shutdown_grace=grace)
    pgdata = data_root / "app1" / "pgdata"
    conn = _connect(gp, tls["ca"])
    try:
        conn.execute("create table t (x int)")
        sent = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # during the grace period the gateway is still running: no new clients...
        assert gp.proc.poll() is None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gp.port), timeout=2).close()
        # ...but the connected one may finish its work
        conn.execute("insert into t values (7)")
        assert conn.execute("select count(*) from t").fetchone() == (1,)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
    finally:
        conn.close()  # the client leaves by itself about 1 s after SIGTERM
    assert gp.wait_exit(15) == 0, gp.log()
    elapsed = time.monotonic() - sent
    assert elapsed >= 1.0  # it did wait for the client
    assert elapsed < grace - 1.5, f"shutdown took {elapsed:.1f}s with grace {grace}s"
    assert postmasters(pgdata) == []

    again = serve()
    with _connect(again, tls["ca"]) as conn2:
        assert conn2.execute("select x from t").fetchall() == [(7,)]
