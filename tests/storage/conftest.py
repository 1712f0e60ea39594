"""Storage fixtures: one moto S3 server per session (tests that stop it get it back running
for the next test), fresh bucket names per test."""

from __future__ import annotations

import pytest

from ..support.moto import MotoServer


@pytest.fixture(scope="session")
def _moto_session():
    server = MotoServer().start()
    yield server
    server.close()


@pytest.fixture
def moto_server(_moto_session) -> MotoServer:
    """The running moto server: `.endpoint_url`, `.port`, `.stop()`, `.start()`,
    `.create_bucket(name=None, versioning=False)`. A test may stop it; it is started again
    (on the same port, with empty state) before the next test uses it."""
    _moto_session.start()
    yield _moto_session
    _moto_session.start()
