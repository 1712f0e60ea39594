"""At start-up the gateway refuses lease timings its storage cannot keep
(storage/leases.py's check_timing, with storage/factory.py's retry_budget)."""

from __future__ import annotations

import pytest

from gateway.app import Gateway
from gateway.config import Settings
from storage.errors import StorageError
from storage.leases import LeaseTimingError

from ..support.harness import DOMAIN


async def test_a_gateway_refuses_leases_shorter_than_a_storage_request_with_retries(tls, tmp_path):
    settings = Settings(domains=[DOMAIN], tls_cert=str(tls["cert"]), tls_key=str(tls["key"]),
                        data_root=str(tmp_path / "data"), storage="s3", s3_bucket="b",
                        s3_endpoint="http://127.0.0.1:9", storage_attempts=4, storage_timeout=10,
                        lease_seconds=30, listen_port=0, admin_port=0)
    gw = Gateway(settings)
    try:
        with pytest.raises(LeaseTimingError, match=r"lease_seconds = 30 is too short .* 41\.4 s") as e:
            await gw.start()
        # a ValueError, and a StorageError so that `pgsni serve` prints it as a plain message
        assert isinstance(e.value, ValueError) and isinstance(e.value, StorageError)
        assert not gw.listening
    finally:
        await gw.backend.close()
