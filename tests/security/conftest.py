"""The attack suite's gateway: default settings but for the test ports, storage=s3 on a moto
server, the admin API on with a token, and secrets in the gateway's environment as in a real
deployment (Fly.io secrets, compose env files), each carrying a marker an attacker would look
for."""

from __future__ import annotations

import pytest

from gateway.compute.pgbins import PgInstalls

from ..e2e.conftest import s3_proxy, s3_settings  # noqa: F401  (fixtures)
from ..storage.conftest import _moto_session, moto_server  # noqa: F401  (fixtures)
from ..support.ports import free_port

MARKER = "ATTACK-MARKER"
S3_SECRET = f"s3-secret-{MARKER}"
ADMIN_TOKEN = f"admin-token-{MARKER}"
TENANT_PW = "tenant-pw-123456"
VICTIM_PW = "victim-pw-654321"


@pytest.fixture
def attacked(s3_settings, start_gateway, monkeypatch):  # noqa: F811  (the gateway stops first)
    """(gateway, admin port): databases "tenant" and "victim", both running."""
    for name, value in {"PGSNI_S3_SECRET_KEY": S3_SECRET, "PGSNI_ADMIN_TOKEN": ADMIN_TOKEN,
                        "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ACCESS_KEY_ID": f"key-{MARKER}"}.items():
        monkeypatch.setenv(name, value)

    def start(major: str | None = None, **kw):
        settings = {**s3_settings, "s3_secret_key": S3_SECRET, "admin_port": free_port(),
                    "admin_token": ADMIN_TOKEN, **kw}
        gw = start_gateway(**settings)
        gw.create_db("tenant", TENANT_PW, major)
        gw.create_db("victim", VICTIM_PW, major)
        return gw
    return start


MAJORS = sorted(PgInstalls().by_major, key=int)  # every installed major is attacked
