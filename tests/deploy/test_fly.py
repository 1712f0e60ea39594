"""fly.toml: parses, its ports and checks match the gateway's settings (from its [env], else
the image's ENV, else the defaults), TLS stays the gateway's own, and the kill timeout leaves
time for the drain and the snapshots."""

from __future__ import annotations

import tomllib

import pytest

from gateway.config import ConfigError, load

from .conftest import DOCKER, ROOT, documented_in_deploy_doc, parse_dockerfile

# what `fly storage create` sets as secrets, and ours
SECRETS = {"AWS_ACCESS_KEY_ID": "tid_x", "AWS_SECRET_ACCESS_KEY": "tsec_x",
           "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev", "BUCKET_NAME": "pgsni-example",
           "PGSNI_ADMIN_TOKEN": "admin-secret"}


@pytest.fixture(scope="module")
def fly() -> dict:
    return tomllib.loads((ROOT / "fly.toml").read_text())


def _settings(fly: dict, secrets: dict[str, str]):
    """The gateway's settings on a Fly machine: image ENV < fly [env] < secrets, with the
    entrypoint's mapping of BUCKET_NAME / AWS_ENDPOINT_URL_S3."""
    _, stages = parse_dockerfile(DOCKER / "Dockerfile")
    env = stages[-1].env() | fly["env"] | secrets
    env.setdefault("PGSNI_S3_BUCKET", env.get("BUCKET_NAME", ""))
    env.setdefault("PGSNI_S3_ENDPOINT", env.get("AWS_ENDPOINT_URL_S3", ""))
    return load(env=env)


def test_builds_our_dockerfile(fly):
    assert (ROOT / fly["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert fly["app"]


def test_tcp_service_on_the_gateway_port_without_handlers(fly):
    settings = _settings(fly, SECRETS)
    (svc,) = fly["services"]
    assert svc["protocol"] == "tcp"
    assert svc["internal_port"] == settings.listen_port == 5432
    assert settings.listen_host == "0.0.0.0", "Fly's proxy reaches the machine from outside"
    assert [p["port"] for p in svc["ports"]] == [5432]
    for p in svc["ports"]:
        assert not p.get("handlers"), "no tls/http handlers: TLS and SNI are the gateway's own"


def test_health_check_hits_readiness_on_the_admin_port(fly):
    settings = _settings(fly, SECRETS)
    checks = list(fly["checks"].values())
    http = [c for c in checks if c["type"] == "http"]
    assert http, "an http check"
    for c in http:
        assert c["port"] == settings.admin_port == 8080
        assert c["path"] == "/readyz"
    try:
        from gateway.admin.server import OPEN_PATHS
    except ImportError:  # the admin API is not in this tree yet
        OPEN_PATHS = ("/readyz",)
    assert "/readyz" in OPEN_PATHS, "Fly's checks send no bearer token"
    # the admin port is not a public service
    assert all(s["internal_port"] != settings.admin_port for s in fly["services"])


def test_kill_timeout_covers_drain_and_snapshot(fly):
    settings = _settings(fly, SECRETS)
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["kill_timeout"] <= 300, "Fly's maximum"
    # drain (shutdown_grace) + fast shutdown (stop_timeout) + at least a minute for uploads
    assert fly["kill_timeout"] >= settings.shutdown_grace + settings.stop_timeout + 60


def test_volume_holds_the_local_cache(fly):
    settings = _settings(fly, SECRETS)
    (mount,) = fly["mounts"]
    assert settings.data_path.is_relative_to(mount["destination"])
    assert settings.storage_kind == "s3"
    assert settings.tls_from_storage


def test_secrets_are_required_and_documented(fly):
    assert _settings(fly, SECRETS).s3_bucket == "pgsni-example"
    for name in SECRETS:
        assert name not in fly["env"], f"{name} is a secret: `fly secrets set`, not [env]"
        assert documented_in_deploy_doc(name), f"docs/deploy.md does not mention {name}"
    # without the admin token the gateway refuses to start (admin API on 0.0.0.0)
    with pytest.raises(ConfigError, match="admin_token"):
        _settings(fly, {k: v for k, v in SECRETS.items() if k != "PGSNI_ADMIN_TOKEN"})
    # without a bucket too
    with pytest.raises(ConfigError, match="s3_bucket"):
        _settings(fly, {k: v for k, v in SECRETS.items() if k != "BUCKET_NAME"})


def test_each_database_runs_as_its_own_uid(fly):
    """A Fly deployment serves many tenants: their Postgres instances must not share a uid."""
    settings = _settings(fly, SECRETS)
    assert settings.instance_uid_base >= 65536, "above the image's own users and groups"
    assert settings.instance_uid_base + settings.instance_uid_count < 2**31
