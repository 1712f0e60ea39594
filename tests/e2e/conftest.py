"""End-to-end fixtures: the moto S3 server (shared with the storage tests), a TCP proxy in
front of it to simulate outages, and a gateway in S3 mode."""

from __future__ import annotations

import pytest

from ..storage.conftest import _moto_session, moto_server  # noqa: F401  (fixtures)
from ..support.moto import ACCESS_KEY, SECRET_KEY
from ..support.tcpproxy import TCPProxy


@pytest.fixture
def s3_proxy(moto_server):
    proxy = TCPProxy(moto_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_settings(moto_server, s3_proxy):
    """Settings overrides for a gateway storing into a fresh bucket, through the proxy."""
    bucket = moto_server.create_bucket()
    return dict(storage="s3", s3_bucket=bucket, s3_prefix="pgsni/", s3_endpoint=s3_proxy.url,
                s3_region="us-east-1", s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY,
                storage_attempts=2, storage_timeout=2.0)


@pytest.fixture
def fleet_settings() -> dict:
    """Settings every gateway of test_cancel_fleet's `fleet` gets (a module overrides this
    fixture to change them)."""
    return {}
