"""`pgsni serve --workers 2` with links to other machines (issue 17): one machine's two workers
(a `pgsni serve` process; worker i has its own internal listener, port p + i) and one single
gateway (in this process) share a moto bucket, all with cluster certificates. A client that
reaches either side for a database the other side holds is forwarded over a network (bare)
link; between the two workers of the machine the client's socket is still passed over their
local channel; a cancel reaching the side without the session reaches it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psycopg
import pytest

from gateway.config import Settings

from ..conftest import reachable_tmpdir, seed_template
from ..support.adminclient import AdminClient
from ..support.harness import TEST_PASSWORD, GatewayThread, conninfo, postmasters, wait_until
from ..support.ports import free_port, free_ports
from ..support.tcpproxy import TCPProxy
from .test_cancel_fleet import CLIENT, cluster_dir  # noqa: F401  (fixture)
from .test_shutdown import DEV_PASSWORD, serve  # noqa: F401  (fixture)
from .test_workers import children

CONNECTIONS = 12  # clients per round: both workers get some of them, but for a chance of 2 in 2**12


def links(cluster_dir, name: str, port: int) -> dict:
    address = f"127.0.0.1:{port}"
    return dict(advertise_address=address, cluster_listen=address, cluster_ca=str(cluster_dir / "ca.pem"),
                cluster_cert=str(cluster_dir / f"{name}.pem"), cluster_key=str(cluster_dir / f"{name}-key.pem"))


@pytest.fixture
def single(make_settings, template_pgdata, s3_settings, cluster_dir):
    """A gateway of another machine: one process, links on a port of its own."""
    root = reachable_tmpdir("pgsni-single-")
    seed_template(root, template_pgdata)
    settings = make_settings(**s3_settings, **links(cluster_dir, "gw-b", free_port()))
    gt = GatewayThread(Settings(**{**settings.__dict__, "data_root": str(root), "gateway_id": "gw-s",
                                   "socket_dir": f"/tmp/pgsni-s-{root.name[-8:]}"})).start()
    yield gt
    gt.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(gt.settings.socket_path, ignore_errors=True)


@pytest.fixture
def machine(serve, single, data_root, template_pgdata, s3_settings, cluster_dir):
    """`pgsni serve --workers 2` with links: its workers' internal ports are p and p + 1."""
    (data_root / ".worker-1").mkdir(mode=0o711)
    seed_template(data_root / ".worker-1", template_pgdata)
    admin = free_port()
    gp = serve(workers=2, admin_port=admin, log_level="INFO", idle_timeout=600.0, gateway_id="gw-m",
               **s3_settings, **links(cluster_dir, "gw-a", free_ports(2)))
    gp.admin = AdminClient(admin, token_file=data_root / ".admin-token")
    wait_until(lambda: gp.log().count("links to other gateways: listening on") == 2, 60,
               "both workers' links")
    yield gp
    if gp.proc.poll() is None:
        for pid in children(gp.proc.pid):
            os.kill(pid, signal.SIGKILL)
    for db in ("app1", "app2"):
        for pid in postmasters(data_root / ".worker-1" / db / "pgdata"):
            os.kill(pid, signal.SIGKILL)
    socket_dir = f"/tmp/pgsni-x-{data_root.name[-8:]}"  # as the serve fixture sets it
    for extra in ("-1", "-w"):
        shutil.rmtree(socket_dir + extra, ignore_errors=True)


def counted(gp, name: str, direction: str) -> float:
    """Both workers' count of `name` in `direction` (worker 0's admin API serves them all)."""
    return sum(gp.admin.metric(name, direction=direction, worker=w) for w in ("0", "1"))


def forwarded(gp, direction: str) -> tuple[float, float]:
    """(all clients handed over in `direction`, those passed between the workers locally)."""
    return (counted(gp, "pgsni_forwarded_clients_total", direction),
            counted(gp, "pgsni_passed_clients_total", direction))


def connect(port: int, ca, db_id: str, password: str) -> psycopg.Connection:
    return psycopg.connect(conninfo(port, ca, db_id, password=password), autocommit=True)


def test_clients_cross_between_a_machine_of_workers_and_another_gateway(machine, single, tls):
    # (a) a database the single gateway holds, reached through the workers' port: over the network
    single.create_db("app1")
    for _ in range(CONNECTIONS):
        with connect(machine.port, tls["ca"], "app1", TEST_PASSWORD) as conn:
            assert conn.execute("select current_setting('port') is not null").fetchone() == (True,)
    assert single.gw.fleet.forwarding.served == CONNECTIONS
    wait_until(lambda: forwarded(machine, "out") == (CONNECTIONS, 0), 15, "the workers' metrics")
    # a database one of the workers holds (made on connect), reached through the single gateway
    with connect(machine.port, tls["ca"], "app2", DEV_PASSWORD) as conn:
        conn.execute("create table t (n int)")
    before_in = forwarded(machine, "in")
    for n in range(CONNECTIONS):
        with connect(single.port, tls["ca"], "app2", DEV_PASSWORD) as conn:
            conn.execute("insert into t values (%s)", (n,))
    assert single.gw.fleet.forwarding.forwarded == CONNECTIONS
    assert single.gw.metrics.forwarded_clients.labels("out")._value.get() == CONNECTIONS
    wait_until(lambda: forwarded(machine, "in")[0] - before_in[0] == CONNECTIONS, 15, "the workers' metrics")
    assert forwarded(machine, "in")[1] == before_in[1]  # none of those came over the local channel
    # (b) between the two workers the socket is still passed locally, never over a link
    before_out = forwarded(machine, "out")
    for n in range(CONNECTIONS):
        with connect(machine.port, tls["ca"], "app2", DEV_PASSWORD) as conn:
            assert conn.execute("select count(*) from t").fetchone() == (CONNECTIONS,)

    def passed_locally() -> bool:
        out, passed = forwarded(machine, "out")
        return out - before_out[0] == passed - before_out[1] > 0 and forwarded(machine, "in")[1] > before_in[1]

    wait_until(passed_locally, 15, "clients passed between the workers")
    assert single.gw.fleet.forwarding.served == CONNECTIONS  # none of them went to the single gateway


def cancelled(session_port: int, cancel_port: int, dsn: str, protocol: str) -> str:
    """A session through `session_port` whose cancel request's connection reaches `cancel_port`
    (a proxy standing for a load balancer): what the cancelled query says."""
    balancer = TCPProxy(session_port)
    try:
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, dsn.format(port=balancer.port, protocol=protocol),
                                 "cancel"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "connected\n", proc.stderr.read()
        balancer.target = ("127.0.0.1", cancel_port)
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        balancer.close()
    return out + err


@pytest.mark.parametrize("protocol", ["3.0", "3.2"])  # a key that names no gateway, or its issuer
def test_a_cancel_reaching_the_other_side_cancels_the_query(machine, single, tls, protocol):
    single.create_db("app1")
    with connect(machine.port, tls["ca"], "app2", DEV_PASSWORD):  # made on connect by a worker
        pass
    for db, pw in (("app1", TEST_PASSWORD), ("app2", DEV_PASSWORD)):
        dsn = conninfo(0, tls["ca"], db, password=pw).replace("port=0", "port={port}") \
            + " max_protocol_version={protocol}"
        # a session on the single gateway, its cancel through the machine; then the other way round
        session_port, cancel_port = (single.port, machine.port) if db == "app1" else (machine.port, single.port)
        assert cancelled(session_port, cancel_port, dsn, protocol) == "57014\n", db


def test_sessions_naming_their_database_in_options_cross_both_ways(machine, single, tls):
    """No server name (connected by IP address), `options=endpoint=<id>`: handed over after TLS
    with a `session` link, from a worker to the single gateway and the other way round."""
    single.create_db("app1")
    with connect(machine.port, tls["ca"], "app2", DEV_PASSWORD) as conn:  # made on connect by a worker
        conn.execute("create table t (n int)")
    for port, db, password in ((machine.port, "app1", TEST_PASSWORD), (single.port, "app2", DEV_PASSWORD)):
        for n in range(CONNECTIONS // 2):
            with psycopg.connect(conninfo(port, tls["ca"], None, password=password, options=f"endpoint={db}",
                                          channel_binding="require"), autocommit=True) as conn:
                assert conn.execute("select current_database()").fetchone() == ("postgres",)
    assert single.gw.fleet.forwarding.served == CONNECTIONS // 2  # the sessions of app1
    assert single.gw.fleet.forwarding.forwarded == CONNECTIONS // 2  # those of app2, to its worker
    wait_until(lambda: forwarded(machine, "out")[0] - forwarded(machine, "out")[1] == CONNECTIONS // 2,
               15, "the workers' metrics")  # over the network: not passed locally
