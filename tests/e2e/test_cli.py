"""The `pgsni` console script, driven as a real executable: databases (create, list, delete),
development certificates, configuration, and `serve` refusing to start without a certificate."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import PG_OPTIONS, pg_bindir
from ..support.harness import DOMAIN, conninfo, postmasters, psql

PGSNI = Path(sys.executable).parent / "pgsni"


def _base_env() -> dict[str, str]:
    """The test process's environment without any PGSNI_* setting leaking in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PGSNI_")}


@pytest.fixture
def cli(tls, data_root):
    """Run `pgsni ARGS...` against the test's data root; returns the CompletedProcess."""
    socket_dir = f"/tmp/pgsni-c-{data_root.name[-8:]}"
    env = _base_env() | {
        "PGSNI_DATA_ROOT": str(data_root),
        "PGSNI_STORAGE_PATH": str(data_root / "_storage"),
        "PGSNI_SOCKET_DIR": socket_dir,
        "PGSNI_POSTGRES_OPTIONS": ",".join(f"{k}={v}" for k, v in PG_OPTIONS.items()),
        "PGSNI_PG_BINDIR": pg_bindir(),  # the installs the tests' gateways run, not a copy in data_root
        "PGSNI_TLS_CERT": str(tls["cert"]),
        "PGSNI_TLS_KEY": str(tls["key"]),
        "PGSNI_DOMAINS": DOMAIN,
        "PGSNI_ADMIN_PORT": "0",  # `serve` must not take the admin API's default port 8080
    }

    def run(*args: str, input: str | None = None, timeout: float = 120,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(PGSNI), *args], input=input if input is not None else "",
                              capture_output=True, text=True, timeout=timeout,
                              env=env | (extra_env or {}))

    yield run
    shutil.rmtree(socket_dir, ignore_errors=True)


def _password(stdout: str) -> str:
    m = re.search(r"^password:\s*(\S+)\s*$", stdout, re.MULTILINE)
    assert m, f"no password line in output:\n{stdout}"
    return m.group(1)


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_create_list_connect_delete(cli, start_gateway, tls, data_root):
    out = cli("db", "create", "app1")
    assert out.returncode == 0, out.stderr
    password = _password(out.stdout)
    assert len(password) >= 16
    assert out.stdout.count(password) == 1  # shown once
    assert 'created database "app1"' in out.stdout
    pgdata = data_root / "app1" / "pgdata"
    assert (pgdata / "PG_VERSION").is_file()
    # the CLI started Postgres to set the password, and stopped it again
    assert postmasters(pgdata) == []

    again = cli("db", "create", "app1")
    assert again.returncode != 0
    assert 'database "app1" already exists' in again.stderr
    assert postmasters(pgdata) == []

    listed = cli("db", "list")
    assert listed.returncode == 0, listed.stderr
    # the template is not a database; a created database is saved to storage when it stops
    assert listed.stdout.split() == ["app1", "local+stored"]
    as_json = cli("--json", "db", "list")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["id"] for r in json.loads(as_json.stdout)] == ["app1"]
    assert json.loads(as_json.stdout)[0]["stored"] is True

    # a gateway on the same data root accepts the printed password, and only that
    gw = start_gateway()
    ok = psql(conninfo(gw.port, tls["ca"], "app1", password=password), "select current_user")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "postgres"
    bad = psql(conninfo(gw.port, tls["ca"], "app1", password=password + "x"), "select 1")
    assert bad.returncode != 0
    assert 'password authentication failed for user "postgres"' in bad.stderr

    # the gateway is running app1 now: the CLI refuses to delete it from under it
    busy = cli("db", "delete", "app1", "--yes")
    assert busy.returncode != 0
    assert "in use" in busy.stderr
    assert (pgdata / "PG_VERSION").is_file()
    gw.stop()
    assert postmasters(pgdata) == []

    # confirmation answered "n": nothing happens
    kept = cli("db", "delete", "app1", input="n\n")
    assert kept.returncode != 0
    assert "Aborted" in kept.stderr
    assert (pgdata / "PG_VERSION").is_file()
    assert cli("db", "list").stdout.split() == ["app1", "local+stored"]

    gone = cli("db", "delete", "app1", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert 'deleted database "app1"' in gone.stdout
    assert not (data_root / "app1").exists()
    assert cli("db", "list").stdout.strip() == ""
    assert json.loads(cli("--json", "db", "list").stdout) == []

    missing = cli("db", "delete", "app1", "--yes")
    assert missing.returncode != 0
    assert 'database "app1" does not exist' in missing.stderr


def test_delete_confirmed_with_y(cli, data_root):
    assert cli("db", "create", "app3").returncode == 0
    out = cli("db", "delete", "app3", input="y\n")
    assert out.returncode == 0, out.stderr
    assert not (data_root / "app3").exists()


def test_create_json(cli, data_root):
    out = cli("--json", "db", "create", "app2")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["id"] == "app2"
    assert made["user"] == "postgres"
    assert isinstance(made["password"], str) and len(made["password"]) >= 16
    assert postmasters(data_root / "app2" / "pgdata") == []

    chosen = cli("--json", "db", "create", "app4", "--password", "my-own-pw")
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["password"] == "my-own-pw"
    assert [r["id"] for r in json.loads(cli("--json", "db", "list").stdout)] == ["app2", "app4"]


@pytest.mark.parametrize("bad_id", ["Bad_Id", "../x", "x-", "xn--abc", "a" * 64])
def test_invalid_id_is_refused_and_creates_nothing(cli, data_root, bad_id):
    before = _entries(data_root)
    x_existed = (data_root.parent / "x").exists()
    out = cli("db", "create", bad_id)
    assert out.returncode != 0
    assert "a database id is 1-63 lowercase letters, digits or inner hyphens" in out.stderr
    assert _entries(data_root) == before
    assert (data_root.parent / "x").exists() == x_existed  # "../x" did not escape the root
    assert cli("--json", "db", "list").stdout.strip() == "[]"
    deleted = cli("db", "delete", bad_id, "--yes")
    assert deleted.returncode != 0
    assert "a database id is" in deleted.stderr


def test_certs_generate(cli, tmp_path):
    from cryptography import x509

    out_dir = tmp_path / "dev"
    out = cli("certs", "generate", "--domain", DOMAIN, "--out", str(out_dir))
    assert out.returncode == 0, out.stderr
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        assert (out_dir / name).is_file(), name
    assert f"host=ID.{DOMAIN}" in out.stdout
    cert = x509.load_pem_x509_certificate((out_dir / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"*.{DOMAIN}" in names.get_values_for_type(x509.DNSName)
    assert (out_dir / "server-key.pem").stat().st_mode & 0o077 == 0  # the key is private

    first = (out_dir / "server.pem").read_bytes()
    again = cli("certs", "generate", "--domain", DOMAIN, "--out", str(out_dir))
    assert again.returncode != 0
    assert "--force" in again.stderr
    assert (out_dir / "server.pem").read_bytes() == first  # not overwritten

    forced = cli("certs", "generate", "--domain", DOMAIN, "--out", str(out_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out_dir / "server.pem").read_bytes() != first


def test_config_reference_is_a_markdown_table(cli):
    out = cli("config", "reference")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| setting |")
    assert lines[1].startswith("| --- |")
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "PGSNI_LISTEN_PORT" in out.stdout
    assert "PGSNI_SHUTDOWN_GRACE" in out.stdout


def test_config_file_unknown_key_is_named(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('listen_port = 6543\nlisten_prot = 6544\n')
    out = cli("--config", str(bad), "config", "show")
    assert out.returncode != 0
    assert "listen_prot" in out.stderr
    assert "unknown setting" in out.stderr


def test_config_file_is_read(cli, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('listen_port = 6543\nshutdown_grace = 3\n')
    out = cli("--config", str(good), "config", "show")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["listen_port"] == 6543
    assert shown["shutdown_grace"] == 3.0
    assert shown["postgres_options"] == PG_OPTIONS  # the environment layer is still applied


def test_serve_without_certificate_fails_fast(cli, tmp_path):
    started = time.monotonic()
    out = cli("serve", "--listen", "127.0.0.1:0", timeout=30,
              extra_env={"PGSNI_TLS_CERT": str(tmp_path / "missing.pem"),
                         "PGSNI_TLS_KEY": str(tmp_path / "missing-key.pem")})
    assert out.returncode != 0
    assert time.monotonic() - started < 15
    assert "pgsni certs generate" in out.stderr
    assert "missing.pem" in out.stderr


def test_create_refuses_an_id_that_is_a_remote_route(cli, data_root):
    routes = '{"ext1": {"host": "127.0.0.1", "port": 5999, "sslmode": "disable"}}'
    out = cli("db", "create", "ext1", extra_env={"PGSNI_REMOTE_ROUTES": routes})
    assert out.returncode != 0
    assert "routed to a remote server" in out.stderr, out.stderr
    assert not (data_root / "ext1").exists()


def test_list_shows_remote_routes_and_info_says_where_they_go(cli, data_root):
    routes = '{"ext1": {"host": "db.internal", "port": 5999, "sslmode": "disable"}}'
    env = {"PGSNI_REMOTE_ROUTES": routes}
    assert cli("db", "create", "app1", extra_env=env).returncode == 0
    listed = cli("db", "list", extra_env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["app1", "local+stored", "ext1", "remote", "db.internal:5999"]
    rows = json.loads(cli("--json", "db", "list", extra_env=env).stdout)
    assert [(r["id"], r["remote"]) for r in rows] == [("app1", None), ("ext1", "db.internal:5999")]
    info = cli("db", "info", "ext1", extra_env=env)
    assert info.returncode != 0
    assert "routed to the remote server db.internal:5999" in info.stderr, info.stderr
