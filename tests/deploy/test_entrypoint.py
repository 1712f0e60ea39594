"""docker/entrypoint.sh and docker/healthcheck.py, run for real outside a container.

Fast tests put a stub in place of `pgsni` (PGSNI_BIN) that records how `serve` would be
called, and check the certificate and storage preparation. The slow tests run the real
gateway through the entrypoint against a moto S3 server: development certificates, psql
through TLS with SNI, SIGTERM with a snapshot to the bucket, then a second start that takes
its certificate from the bucket (as `tls-init` + `proxy` do in compose.yaml) and restores the
database from storage."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ..conftest import PG_OPTIONS, reachable_tmpdir, seed_template
from ..storage.conftest import _moto_session, moto_server  # noqa: F401  (fixtures)
from ..support.harness import DOMAIN, postmasters, psql, wait_until
from ..support.moto import ACCESS_KEY, REGION, SECRET_KEY
from ..support.ports import free_port
from .conftest import (DOCKER, ENTRYPOINT, PGSNI, ROOT, EntrypointStub, base_env, documented_in_deploy_doc,
                       entrypoint_vars, image_healthcheck_here, setting_env_names)

HEALTHCHECK = DOCKER / "healthcheck.py"
PY_ENV = {"PYTHONPATH": str(ROOT)}  # healthcheck.py imports gateway.config


# --- every variable it reads is documented ----------------------------------------------------
def test_every_variable_the_entrypoint_reads_is_a_setting_or_documented():
    names = entrypoint_vars()
    assert {"PGSNI_BIN", "PGSNI_DEV_CERTS", "PGSNI_TLS_FROM_STORAGE"} <= names, "the parser found them"
    settings = setting_env_names()
    undocumented = sorted(n for n in names - settings if not documented_in_deploy_doc(n))
    assert not undocumented, f"docs/deploy.md must describe {undocumented}"
    # the entrypoint's own PGSNI_* names must not shadow a setting of the gateway
    own = {n for n in names - settings if n.startswith("PGSNI_")}
    assert own and not own & settings


# --- fast: a stub instead of pgsni ------------------------------------------------------------
@pytest.fixture
def stub(tmp_path):
    return EntrypointStub(tmp_path)


def test_refuses_to_start_without_a_certificate(stub):
    r = stub.run()
    assert r.returncode == 64
    assert "no TLS certificate" in r.stderr and "PGSNI_DEV_CERTS=1" in r.stderr
    assert not stub.served


def test_missing_certificate_file_is_named(stub, tmp_path):
    r = stub.run(PGSNI_TLS_CERT=str(tmp_path / "nope.pem"), PGSNI_TLS_KEY=str(tmp_path / "k.pem"))
    assert r.returncode == 64
    assert "nope.pem, which is not a file" in r.stderr
    assert not stub.served


def test_dev_certificates_are_generated_once_and_used(stub, tmp_path):
    certs = tmp_path / "certs"
    r = stub.run("--listen", "127.0.0.1:6543", PGSNI_DEV_CERTS="1", PGSNI_DEV_CERTS_DIR=str(certs),
                 PGSNI_DOMAINS="db.example.com,db.example.net")
    assert r.returncode == 0, r.stderr
    assert stub.argv == ["serve", "--listen", "127.0.0.1:6543"]
    assert stub.env["PGSNI_TLS_CERT"] == str(certs / "server.pem")
    assert stub.env["PGSNI_TLS_KEY"] == str(certs / "server-key.pem")
    assert "DEVELOPMENT certificate" in r.stderr
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"*.db.example.com", "*.db.example.net"} <= set(names.get_values_for_type(x509.DNSName))
    before = (certs / "server.pem").read_bytes()
    again = stub.run("serve", PGSNI_DEV_CERTS="yes", PGSNI_DEV_CERTS_DIR=str(certs))
    assert again.returncode == 0, again.stderr
    assert (certs / "server.pem").read_bytes() == before, "an existing certificate is kept"
    assert stub.argv == ["serve"]


def test_pem_text_from_the_environment_becomes_private_files(stub, tmp_path, tls):
    cert, key = tls["cert"].read_text(), tls["key"].read_text()
    pem_dir = tmp_path / "pem"
    r = stub.run(PGSNI_TLS_CERT_PEM=cert, PGSNI_TLS_KEY_PEM=key, PGSNI_TLS_PEM_DIR=str(pem_dir))
    assert r.returncode == 0, r.stderr
    assert Path(stub.env["PGSNI_TLS_CERT"]).read_text().strip() == cert.strip()
    key_file = Path(stub.env["PGSNI_TLS_KEY"])
    assert key_file.read_text().strip() == key.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pem_dir.stat().st_mode) == 0o700
    assert "PGSNI_TLS_KEY_PEM" not in stub.env and "PGSNI_TLS_CERT_PEM" not in stub.env
    half = stub.run(PGSNI_TLS_CERT_PEM=cert)
    assert half.returncode == 64 and "both" in half.stderr
    # without PGSNI_TLS_PEM_DIR: a fresh private directory under TMPDIR
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = stub.run(PGSNI_TLS_CERT_PEM=cert, PGSNI_TLS_KEY_PEM=key, TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr
    made = Path(stub.env["PGSNI_TLS_KEY"]).parent
    assert made.parent == tmp and made.name.startswith("pgsni-tls-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    # a PGSNI_TLS_PEM_DIR that is a symlink is refused
    (tmp_path / "link").symlink_to(tmp)
    r = stub.run(PGSNI_TLS_CERT_PEM=cert, PGSNI_TLS_KEY_PEM=key, PGSNI_TLS_PEM_DIR=str(tmp_path / "link"))
    assert r.returncode == 64 and "must be a directory owned by" in r.stderr


def test_tls_from_storage_needs_no_files(stub):
    r = stub.run(PGSNI_TLS_FROM_STORAGE="true")
    assert r.returncode == 0, r.stderr
    assert stub.argv == ["serve"]
    assert "PGSNI_TLS_CERT" not in stub.env
    assert "from storage" in r.stderr


def test_tigris_variables_fill_the_s3_settings(stub):
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", BUCKET_NAME="from-fly",
                 AWS_ENDPOINT_URL_S3="https://fly.storage.tigris.dev")
    assert r.returncode == 0, r.stderr
    assert stub.env["PGSNI_S3_BUCKET"] == "from-fly"
    assert stub.env["PGSNI_S3_ENDPOINT"] == "https://fly.storage.tigris.dev"
    explicit = stub.run(PGSNI_TLS_FROM_STORAGE="1", BUCKET_NAME="from-fly", PGSNI_S3_BUCKET="mine")
    assert explicit.returncode == 0
    assert stub.env["PGSNI_S3_BUCKET"] == "mine"


def test_mount_mode_without_fuse_fails_early_with_a_hint(stub, tmp_path):
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_STORAGE="s3fs", PGSNI_S3FS_MOUNT="true",
                 PGSNI_FUSE_DEVICE=str(tmp_path / "no-fuse"))
    assert r.returncode == 64
    assert "--device /dev/fuse --cap-add SYS_ADMIN" in r.stderr
    assert not stub.served
    # without s3fs_mount the gateway checks the existing mount itself
    ok = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_STORAGE="s3fs",
                  PGSNI_FUSE_DEVICE=str(tmp_path / "no-fuse"))
    assert ok.returncode == 0, ok.stderr


def test_other_commands_run_as_given_with_the_s3_mapping(stub, tmp_path):
    r = stub.run("sh", "-c", "echo hello $0 $PGSNI_S3_BUCKET", "there", BUCKET_NAME="b1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello there b1\n"
    assert not stub.served
    assert "TLS certificate" not in r.stderr, "no certificate preparation for other commands"


# --- fleet: the advertised address on Fly.io ---------------------------------------------------
FLY_IP = "fdaa:0:1:a7b:1f5:2e1c:9f3b:2"


def test_a_fly_machine_advertises_its_6pn_address_with_the_cluster_port(stub):
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN="fly-local-6pn:5433", FLY_PRIVATE_IP=FLY_IP)
    assert r.returncode == 0, r.stderr
    assert stub.env["PGSNI_ADVERTISE_ADDRESS"] == f"[{FLY_IP}]:5433"
    assert stub.env["PGSNI_CLUSTER_LISTEN"] == "fly-local-6pn:5433", "left as it was"
    assert f"[{FLY_IP}]:5433" in r.stderr
    # the port is cluster_listen's, also when that is a bracketed address
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN=f"[{FLY_IP}]:7000", FLY_PRIVATE_IP=FLY_IP)
    assert r.returncode == 0, r.stderr
    assert stub.env["PGSNI_ADVERTISE_ADDRESS"] == f"[{FLY_IP}]:7000"
    # an IPv4 address has no brackets
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN="0.0.0.0:5433", FLY_PRIVATE_IP="10.0.0.7")
    assert stub.env["PGSNI_ADVERTISE_ADDRESS"] == "10.0.0.7:5433"


def test_the_address_is_derived_only_when_it_is_missing_and_links_are_configured(stub):
    explicit = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN="fly-local-6pn:5433",
                        FLY_PRIVATE_IP=FLY_IP, PGSNI_ADVERTISE_ADDRESS="gw1.internal:5433")
    assert explicit.returncode == 0, explicit.stderr
    assert stub.env["PGSNI_ADVERTISE_ADDRESS"] == "gw1.internal:5433"
    # a single gateway on Fly (no cluster_listen) has no links: nothing is derived
    single = stub.run(PGSNI_TLS_FROM_STORAGE="1", FLY_PRIVATE_IP=FLY_IP)
    assert single.returncode == 0, single.stderr
    assert "PGSNI_ADVERTISE_ADDRESS" not in stub.env
    # not on Fly: nothing to derive from; the gateway names what is missing
    elsewhere = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN="10.0.0.7:5433")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "PGSNI_ADVERTISE_ADDRESS" not in stub.env
    # a cluster_listen without a port cannot give one
    bad = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_LISTEN="fly-local-6pn", FLY_PRIVATE_IP=FLY_IP)
    assert bad.returncode == 64 and "PGSNI_CLUSTER_LISTEN" in bad.stderr
    assert not stub.served


def test_other_commands_get_the_derived_address_too(stub, tmp_path):
    """`fly ssh console -C "entrypoint.sh pgsni db list"` loads the same settings as the
    gateway: with cluster_listen but no advertise_address they would be refused."""
    fly = dict(PGSNI_STORAGE="local", PGSNI_STORAGE_PATH=str(tmp_path / "st"), PGSNI_DATA_ROOT=str(tmp_path / "d"),
               PGSNI_CLUSTER_LISTEN="fly-local-6pn:5433", PGSNI_CLUSTER_CA="/c/ca.pem",
               PGSNI_CLUSTER_CERT="/c/gw.pem", PGSNI_CLUSTER_KEY="/c/gw-key.pem", FLY_PRIVATE_IP=FLY_IP)
    r = stub.run(str(PGSNI), "config", "show", **fly)
    assert r.returncode == 0, r.stderr
    assert f'"advertise_address": "[{FLY_IP}]:5433"' in r.stdout
    assert not stub.served


def test_secrets_stay_out_of_the_gateways_environment_with_links_too(stub, tls):
    """The derivation adds one variable and keeps the PEM texts out, as without links."""
    cert, key = tls["cert"].read_text(), tls["key"].read_text()
    r = stub.run(PGSNI_TLS_CERT_PEM=cert, PGSNI_TLS_KEY_PEM=key, PGSNI_CLUSTER_LISTEN="fly-local-6pn:5433",
                 FLY_PRIVATE_IP=FLY_IP)
    assert r.returncode == 0, r.stderr
    assert "PGSNI_TLS_KEY_PEM" not in stub.env and "PGSNI_TLS_CERT_PEM" not in stub.env
    assert not any("PRIVATE KEY" in v for v in stub.env.values())
    added = {k for k in stub.env if k.startswith("PGSNI_")} - {
        "PGSNI_BIN", "PGSNI_CLUSTER_LISTEN", "PGSNI_TLS_CERT", "PGSNI_TLS_KEY"}
    assert added == {"PGSNI_ADVERTISE_ADDRESS"}


def test_a_cluster_key_readable_by_others_is_made_private(stub, tmp_path):
    """Fly writes [[files]] with a mode of its own: the key must not stay readable by the
    uids Postgres runs as."""
    key = tmp_path / "member-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_KEY=str(key))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # a private key is left alone (it may be on a read-only mount), as is a missing one,
    # which the gateway reports by its setting's name
    r = stub.run(PGSNI_TLS_FROM_STORAGE="1", PGSNI_CLUSTER_KEY=str(tmp_path / "missing.pem"))
    assert r.returncode == 0, r.stderr


# --- healthcheck.py -------------------------------------------------------------------------------
def _healthcheck(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=base_env(**PY_ENV, **env),
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_tcp_mode_follows_the_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        up = _healthcheck(PGSNI_ADMIN_PORT="0", PGSNI_LISTEN_HOST="0.0.0.0", PGSNI_LISTEN_PORT=str(port))
        assert up.returncode == 0, up.stderr
    down = _healthcheck(PGSNI_ADMIN_PORT="0", PGSNI_LISTEN_PORT=str(port))
    assert down.returncode == 1
    assert f"127.0.0.1:{port}" in down.stderr


def test_healthcheck_fails_when_the_admin_api_does_not_answer():
    port = free_port()
    r = _healthcheck(PGSNI_ADMIN_PORT=str(port))
    assert r.returncode == 1
    assert f"http://127.0.0.1:{port}/readyz" in r.stderr
    bad = _healthcheck(PGSNI_ADMIN_HOST="0.0.0.0", PGSNI_ADMIN_PORT="8080")  # no token
    assert bad.returncode == 1 and "configuration" in bad.stderr


def test_the_images_health_check_loads_the_settings_the_gateway_was_given():
    """Docker runs HEALTHCHECK with the container's environment, not with what the entrypoint
    exported for the gateway: on a Fly machine (bucket from BUCKET_NAME, advertise_address
    from FLY_PRIVATE_IP) the settings alone are refused, so the image's check must complete
    them the same way."""
    fly = dict(PGSNI_ADMIN_PORT="0", PGSNI_LISTEN_HOST="0.0.0.0", PGSNI_STORAGE="s3", BUCKET_NAME="from-fly",
               PGSNI_CLUSTER_LISTEN="fly-local-6pn:5433", PGSNI_CLUSTER_CA="/c/ca.pem",
               PGSNI_CLUSTER_CERT="/c/gw.pem", PGSNI_CLUSTER_KEY="/c/gw-key.pem", FLY_PRIVATE_IP=FLY_IP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = base_env(**PY_ENV, **fly, PGSNI_LISTEN_PORT=str(s.getsockname()[1]))
        r = subprocess.run(image_healthcheck_here(), env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(image_healthcheck_here(), env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "unhealthy" in r.stderr, "and it still fails when nothing listens"


# --- slow: the real gateway through the entrypoint, against moto ---------------------------------
HAS_ADMIN = importlib.util.find_spec("gateway.admin") is not None


class Entrypoint:
    """docker/entrypoint.sh running the real gateway as a subprocess."""

    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        self.env = env
        self.log = log
        self.port = port
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT)

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {self.proc.returncode}:\n{self.output()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK, with the environment the entrypoint was started with."""
        return subprocess.run(image_healthcheck_here(), env=self.env | PY_ENV,
                              capture_output=True, text=True, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def run_entrypoint(moto_server, tmp_path, template_pgdata):
    started: list[Entrypoint] = []
    bucket = moto_server.create_bucket()
    work = reachable_tmpdir("pgsni-ep-")
    socket_dir = f"/tmp/pgsni-ep-{work.name[-8:]}"

    def start(data_root: str, **extra: str) -> Entrypoint:
        port = free_port()
        admin = free_port() if HAS_ADMIN else 0
        env = base_env(
            PGSNI_BIN=str(PGSNI), PGSNI_STORAGE="s3", PGSNI_S3_BUCKET=bucket, PGSNI_S3_PREFIX="ep/",
            PGSNI_S3_ENDPOINT=moto_server.endpoint_url, PGSNI_S3_REGION=REGION,
            PGSNI_S3_ACCESS_KEY=ACCESS_KEY, PGSNI_S3_SECRET_KEY=SECRET_KEY,
            PGSNI_LISTEN_HOST="127.0.0.1", PGSNI_LISTEN_PORT=str(port), PGSNI_ADMIN_PORT=str(admin),
            PGSNI_DATA_ROOT=str(work / data_root), PGSNI_SOCKET_DIR=socket_dir,
            PGSNI_DOMAINS=DOMAIN, PGSNI_CREATE_ON_CONNECT="true", PGSNI_DEV_PASSWORD="ep-secret",
            PGSNI_SHUTDOWN_GRACE="2", PGSNI_LOG_FORMAT="text",
            PGSNI_POSTGRES_OPTIONS=",".join(f"{k}={v}" for k, v in PG_OPTIONS.items()), **extra)
        root = work / data_root
        root.mkdir()
        seed_template(root, template_pgdata)
        ep = Entrypoint(env, tmp_path / f"gateway-{len(started)}.log", port)
        ep.admin_port = admin
        started.append(ep)
        wait_until(ep.listening, timeout=90, what="the gateway to listen")
        health = ep.healthcheck()
        assert health.returncode == 0, health.stderr + ep.output()
        return ep

    start.bucket = bucket
    start.work = work
    yield start
    for ep in started:
        ep.kill()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(socket_dir, ignore_errors=True)


def _dsn(port: int, ca: Path, db_id: str = "app1") -> str:
    return (f"host={db_id}.{DOMAIN} hostaddr=127.0.0.1 port={port} user=postgres password=ep-secret "
            f"dbname=postgres sslmode=verify-full sslrootcert={ca} connect_timeout=20")


@pytest.mark.slow
def test_entrypoint_serves_from_s3_and_restores_after_restart(run_entrypoint, moto_server):
    certs = run_entrypoint.work / "certs"
    first = run_entrypoint("data1", PGSNI_DEV_CERTS="1", PGSNI_DEV_CERTS_DIR=str(certs))
    ca = certs / "ca.pem"
    assert ca.is_file()
    if HAS_ADMIN:  # the image's health check asks /readyz
        with urllib.request.urlopen(f"http://127.0.0.1:{first.admin_port}/readyz", timeout=10) as r:
            assert r.status == 200
    made = psql(_dsn(first.port, ca), "create table t (x int); insert into t values (42); "
                                      "select sum(x) from t")
    assert made.returncode == 0, made.stderr + first.output()
    assert made.stdout.splitlines()[-1] == "42"
    # the database came from the SNI name: without SNI the gateway cannot route the client
    no_sni = psql(_dsn(first.port, ca) + " sslsni=0", "select 1")
    assert no_sni.returncode != 0
    assert "endpoint=" in no_sni.stderr, no_sni.stderr

    pgdata = run_entrypoint.work / "data1" / "app1" / "pgdata"
    assert postmasters(pgdata)
    assert first.terminate() == 0, first.output()
    assert postmasters(pgdata) == []
    assert "stopped" in first.output()
    s3 = moto_server.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=run_entrypoint.bucket)["Contents"]}
    assert "ep/dbs/app1/current.json" in keys, sorted(keys)

    # tls-init's job: upload the pair; then a gateway with an empty cache and no local files
    up = subprocess.run([str(PGSNI), "certs", "upload", "--cert", str(certs / "server.pem"),
                         "--key", str(certs / "server-key.pem")], env=first.env,
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    second = run_entrypoint("data2", PGSNI_TLS_FROM_STORAGE="true")
    assert "from storage" in second.output()
    back = psql(_dsn(second.port, ca), "select sum(x) from t")
    assert back.returncode == 0, back.stderr + second.output()
    assert back.stdout.strip() == "42", "restored from the bucket"
    assert second.terminate() == 0, second.output()


@pytest.mark.slow
def test_sigterm_while_a_client_is_connected_exits_cleanly(run_entrypoint):
    certs = run_entrypoint.work / "certs"
    ep = run_entrypoint("data", PGSNI_DEV_CERTS="1", PGSNI_DEV_CERTS_DIR=str(certs))
    import psycopg

    conn = psycopg.connect(_dsn(ep.port, certs / "ca.pem"), autocommit=True)
    assert conn.execute("select 1").fetchone() == (1,)
    started = time.monotonic()
    assert ep.terminate() == 0, ep.output()
    # shutdown_grace is 2 s here: the open client does not hold the gateway up for long
    assert time.monotonic() - started < 30
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    assert postmasters(run_entrypoint.work / "data" / "app1" / "pgdata") == []


@pytest.mark.slow
def test_two_fly_style_gateways_link_on_the_addresses_the_entrypoint_derives(run_entrypoint):
    """Two gateways on one bucket, configured as fly.toml configures a machine (cluster_listen
    on the machine's own IPv6 address, no advertise_address, FLY_PRIVATE_IP set by the
    platform, the member key written world-readable as a file): each advertises
    [FLY_PRIVATE_IP]:port, and a client of the second reaches a database the first holds."""
    from certs.cluster import make_cluster

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here: Fly's 6PN addresses are IPv6")
    made = make_cluster(run_entrypoint.work / "cluster", ["fleet"])
    cert, key = made.members["fleet"]
    key.chmod(0o644)  # as a platform may write it
    certs = run_entrypoint.work / "certs"

    def machine(data_root: str) -> Entrypoint:
        cluster_port = free_port()
        return run_entrypoint(
            data_root, PGSNI_DEV_CERTS="1", PGSNI_DEV_CERTS_DIR=str(certs),
            FLY_PRIVATE_IP="::1", PGSNI_CLUSTER_LISTEN=f"[::1]:{cluster_port}",
            PGSNI_CLUSTER_CA=str(made.ca), PGSNI_CLUSTER_CERT=str(cert), PGSNI_CLUSTER_KEY=str(key))

    first = machine("m1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, "made private before the gateway read it"
    second = machine("m2")
    for ep in (first, second):
        assert "advertise_address: [::1]:" in ep.output()
    held = psql(_dsn(first.port, certs / "ca.pem"), "create table t (x int); insert into t values (7); "
                                                   "select sum(x) from t")
    assert held.returncode == 0, held.stderr + first.output()
    # through the second gateway: forwarded to the first, which runs the database
    through = psql(_dsn(second.port, certs / "ca.pem"), "select sum(x) from t")
    assert through.returncode == 0, through.stderr + second.output() + first.output()
    assert through.stdout.strip() == "7"
    assert postmasters(run_entrypoint.work / "m1" / "app1" / "pgdata")
    assert not (run_entrypoint.work / "m2" / "app1" / "pgdata").exists(), "not started twice"
    if HAS_ADMIN:
        token = (run_entrypoint.work / "m2" / ".admin-token").read_text().strip()  # no PGSNI_ADMIN_TOKEN
        scrape = urllib.request.Request(f"http://127.0.0.1:{second.admin_port}/metrics",
                                        headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(scrape, timeout=10) as r:
            metrics = r.read().decode()
        assert 'pgsni_forwarded_clients_total{direction="out"} 1' in metrics, metrics[-2000:]
    for ep in (second, first):
        assert ep.terminate() == 0, ep.output()
