"""The admin HTTP API against a real gateway: health and readiness (storage cut and back,
draining on shutdown), bearer-token enforcement, and JSON errors."""

from __future__ import annotations

import concurrent.futures
import os
import stat

import psycopg
import pytest

from gateway import admintoken
from gateway.config import ConfigError, Settings, load

from ..support.adminclient import AdminClient
from ..support.harness import conninfo, wait_until
from ..support.ports import free_port
from .test_cli import cli  # noqa: F401  (fixture)

TOKEN = "admin-test-token-0123456789"


@pytest.fixture
def admin_gateway(start_gateway):
    """start(**settings) -> (GatewayThread, AdminClient with the token)."""
    def start(**kw):
        kw.setdefault("admin_token", TOKEN)
        gt = start_gateway(admin_port=free_port(), **kw)
        return gt, AdminClient.of(gt.settings)
    return start


def test_health_and_ready_need_no_token(admin_gateway):
    gt, admin = admin_gateway()
    health = admin.get("/healthz", token="")
    assert health.status == 200 and health.json() == {"status": "ok"}
    ready = admin.get("/readyz", token="")
    assert ready.status == 200, ready.body
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"listening": True, "tls": True, "draining": False, "storage": True}


@pytest.mark.parametrize("path", ["/metrics", "/v1/databases", "/v1/openapi.json"])
def test_token_is_enforced(admin_gateway, path):
    gt, admin = admin_gateway()
    for token in ("", "wrong", TOKEN + "x", TOKEN[:-1]):
        reply = admin.get(path, token=token)
        assert reply.status == 401, (token, reply.body)
        assert reply.json()["error"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert admin.request("GET", path, token=TOKEN).status == 200
    # the scheme is case-insensitive, the token is not
    raw = admin.request("GET", path, token=TOKEN.upper())
    assert raw.status == 401


def test_without_admin_token_a_generated_token_is_required(admin_gateway, start_gateway):
    """No admin_token: the gateway generates one into its data root, private to its OS user,
    and requires it like a chosen one (other local users have no way in: SECURITY.md)."""
    gt, admin = admin_gateway(admin_token="")
    path = admintoken.token_path(gt.settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.geteuid()
    token = path.read_text().strip()
    assert len(token) >= 32
    for anyone in ("/metrics", "/v1/databases"):
        refused = admin.get(anyone, token="wrong")
        assert refused.status == 401 and str(path) in refused.json()["hint"], refused.body
        assert admin.get(anyone, token="").status == 401
    scraped = admin.get("/metrics", token=token)
    assert scraped.status == 200
    assert scraped.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"pgsni_connections_total" in scraped.body
    assert admin.get("/healthz", token="").status == 200
    gt.stop()
    again = start_gateway(admin_port=free_port(), data_root=gt.settings.data_root)
    assert AdminClient(again.settings.admin_port, token).get("/v1/databases").status == 200, \
        "a restart on the same data root keeps the token (scrapers and scripts keep working)"


def test_a_token_file_others_could_read_is_refused(start_gateway, tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    planted = root / admintoken.FILE_NAME
    planted.write_text("x" * 40 + "\n")
    planted.chmod(0o644)
    with pytest.raises(OSError, match="mode 0600"):
        start_gateway(admin_port=free_port(), data_root=str(root))


def test_unknown_path_and_wrong_method_are_json(admin_gateway):
    gt, admin = admin_gateway()
    missing = admin.get("/v1/nothing-here")
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    wrong = admin.request("PUT", "/healthz")
    assert wrong.status == 405 and wrong.json()["error"] == "invalid"
    assert "GET" in wrong.headers.get("Allow", "")


def test_public_admin_host_without_token_is_a_config_error():
    with pytest.raises(ConfigError, match="admin_token"):
        Settings(admin_host="0.0.0.0")
    with pytest.raises(ConfigError, match="admin_token"):
        load(env={"PGSNI_ADMIN_HOST": "10.1.2.3"})
    assert load(env={"PGSNI_ADMIN_HOST": "0.0.0.0", "PGSNI_ADMIN_TOKEN": "t"}).admin_token == "t"
    assert load(env={"PGSNI_ADMIN_HOST": "0.0.0.0", "PGSNI_ADMIN_PORT": "0"}).admin_port == 0
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert Settings(admin_host=host).admin_host == host
    with pytest.raises(ConfigError, match="log_format"):
        Settings(log_format="xml")


def test_admin_port_in_use_is_a_clear_error(start_gateway):
    first = start_gateway(admin_port=free_port())
    with pytest.raises(OSError, match="admin"):
        start_gateway(admin_port=first.settings.admin_port)


@pytest.mark.slow
def test_ready_flips_when_storage_is_cut(admin_gateway, s3_settings, s3_proxy):
    gt, admin = admin_gateway(**s3_settings)
    assert admin.get("/readyz").status == 200
    errors_before = admin.metric("pgsni_storage_errors_total", kind="unavailable")
    s3_proxy.cut()
    try:
        wait_until(lambda: admin.get("/readyz").status == 503, timeout=30, what="readyz 503")
        body = admin.get("/readyz").json()
        assert body["status"] == "unavailable"
        assert "storage" in body["reason"] and body["checks"]["storage"] is False
        assert admin.get("/healthz").status == 200  # alive all the same
        assert admin.metric("pgsni_storage_errors_total", kind="unavailable") > errors_before
    finally:
        s3_proxy.restore()
    wait_until(lambda: admin.get("/readyz").status == 200, timeout=30, what="readyz 200 again")


def test_ready_says_draining_during_shutdown(admin_gateway, tls):
    gt, admin = admin_gateway(shutdown_grace=20.0)
    gt.create_db("app1")
    conn = psycopg.connect(conninfo(gt.port, tls["ca"], "app1"))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        stopping = pool.submit(gt.call, gt.gw.shutdown)
        wait_until(lambda: admin.get("/readyz").status == 503, what="readyz 503 while draining")
        body = admin.get("/readyz").json()
        assert body["status"] == "draining" and body["checks"]["draining"] is True
        assert admin.get("/healthz").status == 200
        assert not stopping.done()  # still waiting for our client
    finally:
        conn.close()
    stopping.result(timeout=30)
    pool.shutdown()


def test_serve_refuses_a_public_admin_api_without_token(cli):  # noqa: F811
    out = cli("serve", "--listen", "127.0.0.1:0", timeout=60,
              extra_env={"PGSNI_ADMIN_HOST": "0.0.0.0", "PGSNI_ADMIN_PORT": "8080"})
    assert out.returncode != 0
    assert "admin_token" in out.stderr and "PGSNI_ADMIN_TOKEN" in out.stderr
    assert "Traceback" not in out.stderr
