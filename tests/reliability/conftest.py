"""Reliability tests use the same S3 fixtures as the end-to-end tests."""

from ..e2e.conftest import _moto_session, moto_server, s3_proxy, s3_settings  # noqa: F401
