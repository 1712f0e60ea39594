"""Failover in a fleet (issue 17): three gateways as real processes on one moto bucket, each with
its own data root and links to the others. Clients write through B and C, which forward them
to A, the holder. A is SIGKILLed with its Postgres (a lost machine); the clients reconnect
through B and C, and once A's lease has expired one of them takes the database over from
storage. With durability=sync every acknowledged commit is there."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from certs.cluster import make_cluster
from storage.leases import STAMP_RESOLUTION, default_margin

from ..conftest import PG_OPTIONS, reachable_tmpdir
from ..e2e.test_shutdown import PGSNI, GatewayProcess, _toml_value
from ..support.harness import DOMAIN, conninfo, postmasters
from ..support.ports import free_port, free_ports

PASSWORD = "dev-pw-failover-test"
LEASE = 12.0  # lease_seconds: its margin is 2 s
NAMES = ("gw-a", "gw-b", "gw-c")
LISTENING = "pgsni listening on"

pytestmark = pytest.mark.slow


class Gateway:
    def __init__(self, name: str, settings: dict, workdir) -> None:
        self.name, self.root = name, reachable_tmpdir(f"pgsni-{name}-")
        self.port = free_port()
        self.settings = {**settings, "data_root": str(self.root), "socket_dir": f"/tmp/pgsni-f-{self.root.name[-8:]}",
                         "gateway_id": name}
        self.config = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.process: GatewayProcess | None = None

    def start(self) -> "Gateway":
        started = self.process.log().count(LISTENING) if self.process is not None else 0
        self.config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in self.settings.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGSNI_")}
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen([str(PGSNI), "--config", str(self.config), "serve", "--listen",
                                     f"127.0.0.1:{self.port}"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
        self.process = GatewayProcess(proc, self.port, self.log_path)
        deadline = time.monotonic() + 60
        while self.process.log().count(LISTENING) <= started:
            assert proc.poll() is None, f"{self.name} exited:\n{self.process.log()}"
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{self.process.log()}"
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """A lost machine: the gateway and its Postgres die at once."""
        self.process.proc.kill()
        for pid in postmasters(self.root / "app1" / "pgdata"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM (a deploy, a drain): returns once the gateway has exited, with its code."""
        if self.process is not None and self.process.proc.poll() is None:
            self.process.proc.send_signal(signal.SIGTERM)
            try:
                self.process.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.proc.returncode if self.process is not None else 0

    def stop(self) -> None:
        self.terminate()
        shutil.rmtree(self.root, ignore_errors=True)


def gateways(tls, s3_settings, tmp_path, workers: int = 1, **extra) -> list[Gateway]:
    """Three gateway processes (not started) on one bucket, with links to each other (each
    worker of one at a port of its own, from its cluster_listen's on)."""
    cluster = make_cluster(tmp_path / "cluster", list(NAMES))
    made = []
    for name in NAMES:
        cert, key = cluster.members[name]
        address = f"127.0.0.1:{free_ports(workers)}"
        made.append(Gateway(name, {
            **s3_settings, "domains": [DOMAIN], "tls_cert": str(tls["cert"]), "tls_key": str(tls["key"]),
            "postgres_options": dict(PG_OPTIONS), "create_on_connect": True, "dev_password": PASSWORD,
            "shutdown_grace": 1.0, "admin_port": 0, "spare_clones": 0, "log_level": "INFO",
            "lease_seconds": LEASE, "storage_timeout": 2.0, "storage_attempts": 2,
            "advertise_address": address, "cluster_listen": address, "cluster_ca": str(cluster.ca),
            "cluster_cert": str(cert), "cluster_key": str(key), "workers": workers, **extra}, tmp_path))
    return made


@pytest.fixture
def fleet(tls, s3_settings, tmp_path):
    made = gateways(tls, s3_settings, tmp_path, durability="sync")
    try:
        yield [g.start() for g in made]
    finally:
        for g in made:
            g.stop()


class Writer(threading.Thread):
    """Inserts (client, seq) rows through its gateways in turn, reconnecting on any error;
    records each acknowledged seq, the errors (those of connection attempts apart), and the
    longest time without a connection that worked."""

    def __init__(self, client: int, dsns: list[str], stop: threading.Event, connect_timeout: int = 5) -> None:
        super().__init__(name=f"writer-{client}", daemon=True)
        self.client, self.dsns, self.stop, self.connect_timeout = client, dsns, stop, connect_timeout
        self.acked: list[int] = []
        self.longest_outage = 0.0
        self.errors: list[str] = []
        self.connect_failures: list[str] = []
        self._failing_since: float | None = None

    def run(self) -> None:
        seq, turn = 0, 0
        while not self.stop.is_set():
            dsn = self.dsns[turn % len(self.dsns)]
            turn += 1
            try:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=self.connect_timeout)
            except psycopg.Error as e:
                self.connect_failures.append(str(e).strip().splitlines()[-1][:160])
                self._failed(e)
                continue
            try:
                with conn:
                    if self._failing_since is not None:
                        self.longest_outage = max(self.longest_outage, time.monotonic() - self._failing_since)
                        self._failing_since = None
                    while not self.stop.is_set():
                        seq += 1
                        conn.execute("insert into t (client, seq) values (%s, %s)", (self.client, seq))
                        self.acked.append(seq)
                        time.sleep(0.01)
            except psycopg.Error as e:
                self._failed(e)

    def _failed(self, e: psycopg.Error) -> None:
        self.errors.append(str(e).splitlines()[0][:120])
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        time.sleep(0.2)


def test_the_holder_dies_and_the_others_serve_its_database_with_nothing_acknowledged_lost(fleet, tls):
    a, b, c = fleet
    dsn = {g.name: conninfo(g.port, tls["ca"], "app1", password=PASSWORD) for g in fleet}
    with psycopg.connect(dsn["gw-a"], autocommit=True) as conn:  # made on connect: A holds it
        conn.execute("create table t (client int not null, seq int not null, primary key (client, seq))")
    stop = threading.Event()
    writers = [Writer(i, [dsn["gw-b"], dsn["gw-c"]], stop) for i in range(4)]
    for w in writers:
        w.start()
    time.sleep(3.0)
    assert all(w.acked for w in writers), [w.errors[-3:] for w in writers]  # forwarded to A
    before = [len(w.acked) for w in writers]
    a.kill()
    killed = time.monotonic()
    time.sleep(0.5)
    assert all(w.errors for w in writers), "the writers did not notice the holder die"
    deadline = killed + LEASE + 2 + 40  # lease and margin, then a restore from the bucket
    while time.monotonic() < deadline:
        marks = [len(w.acked) for w in writers]
        time.sleep(1.0)
        if all(len(w.acked) > m for w, m in zip(writers, marks)):
            break  # every writer commits again
    assert before
    served_after = time.monotonic() - killed
    time.sleep(2.0)
    stop.set()
    for w in writers:
        w.join(30)
    print(f"\nFLEET failover: writers commit again {served_after:.1f} s after the holder died "
          f"(lease {LEASE:g} s); longest outage per writer "
          f"{[round(w.longest_outage, 1) for w in writers]} s; acknowledged {sum(len(w.acked) for w in writers)}; "
          f"errors {[len(w.errors) for w in writers]}")
    # a takeover may begin lease_seconds + margin + 1 s (S3's whole-second stamps) after the
    # holder's last heartbeat, which came before the kill; then the restore from the bucket
    # and the writers' next retry (every 0.2 s), a few seconds at most here
    assert served_after < LEASE + default_margin(LEASE) + STAMP_RESOLUTION + 6, [w.errors[-3:] for w in writers]
    with psycopg.connect(dsn["gw-b"], autocommit=True) as conn:
        rows = set(conn.execute("select client, seq from t").fetchall())
    missing = [(w.client, s) for w in writers for s in w.acked if (w.client, s) not in rows]
    assert not missing, f"{len(missing)} acknowledged commits lost: {missing[:5]}"
