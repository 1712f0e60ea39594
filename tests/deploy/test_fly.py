"""fly.toml: parses, its ports and checks match the gateway's settings (as the entrypoint hands
them to `pgsni serve` on a machine: the image's ENV, else fly.toml's [env], else the secrets,
else the defaults), TLS stays the gateway's own, the kill timeout leaves time for the drain and
the snapshots, and the machines form a fleet: links over 6PN that no service exposes, with the
cluster certificates as secret files."""

from __future__ import annotations

import tomllib

import pytest

from gateway.config import ConfigError, host_port, load
from .conftest import DOCKER, ROOT, EntrypointStub, check_lease_timing, documented_in_deploy_doc, parse_dockerfile

# what `fly storage create` sets as secrets, and ours
SECRETS = {"AWS_ACCESS_KEY_ID": "tid_x", "AWS_SECRET_ACCESS_KEY": "tsec_x",
           "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev", "BUCKET_NAME": "pgsni-example",
           "PGSNI_ADMIN_TOKEN": "admin-secret"}
# what Fly sets on every machine: its own 6PN address
FLY_RUNTIME = {"FLY_PRIVATE_IP": "fdaa:0:1:a7b:1f5:2e1c:9f3b:2"}


@pytest.fixture(scope="module")
def fly() -> dict:
    return tomllib.loads((ROOT / "fly.toml").read_text())


@pytest.fixture
def machine(fly, tmp_path):
    """The gateway's settings on a Fly machine with these secrets: the entrypoint runs for
    real (its S3 mapping, the advertised address) with a stub in place of pgsni, and the
    environment it serves with is loaded as the gateway loads it."""
    stub = EntrypointStub(tmp_path)
    _, stages = parse_dockerfile(DOCKER / "Dockerfile")
    image = {k: v for k, v in stages[-1].env().items() if k != "PATH"}  # this machine's PATH

    def settings(secrets: dict[str, str] = SECRETS):
        r = stub.run(**image | fly["env"] | secrets | FLY_RUNTIME)
        assert r.returncode == 0, r.stderr
        return load(env=stub.env)

    return settings


def test_builds_our_dockerfile(fly):
    assert (ROOT / fly["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert fly["app"]


def test_tcp_service_on_the_gateway_port_without_handlers(fly, machine):
    settings = machine()
    (svc,) = fly["services"]
    assert svc["protocol"] == "tcp"
    assert svc["internal_port"] == settings.listen_port == 5432
    assert settings.listen_host == "0.0.0.0", "Fly's proxy reaches the machine from outside"
    assert [p["port"] for p in svc["ports"]] == [5432]
    for p in svc["ports"]:
        assert not p.get("handlers"), "no tls/http handlers: TLS and SNI are the gateway's own"


def test_health_check_hits_readiness_on_the_admin_port(fly, machine):
    settings = machine()
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


def test_kill_timeout_covers_drain_and_snapshot(fly, machine):
    settings = machine()
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["kill_timeout"] <= 300, "Fly's maximum"
    # drain (shutdown_grace) + fast shutdown (stop_timeout) + at least a minute for uploads
    assert fly["kill_timeout"] >= settings.shutdown_grace + settings.stop_timeout + 60


def test_volume_holds_the_local_cache(fly, machine):
    settings = machine()
    (mount,) = fly["mounts"]
    assert settings.data_path.is_relative_to(mount["destination"])
    assert settings.storage_kind == "s3"
    assert settings.tls_from_storage


def test_secrets_are_required_and_documented(fly, machine):
    assert machine().s3_bucket == "pgsni-example"
    for name in SECRETS:
        assert name not in fly["env"], f"{name} is a secret: `fly secrets set`, not [env]"
        assert documented_in_deploy_doc(name), f"docs/deploy.md does not mention {name}"
    # without the admin token the gateway refuses to start (admin API on 0.0.0.0)
    with pytest.raises(ConfigError, match="admin_token"):
        machine({k: v for k, v in SECRETS.items() if k != "PGSNI_ADMIN_TOKEN"})
    # without a bucket too
    with pytest.raises(ConfigError, match="s3_bucket"):
        machine({k: v for k, v in SECRETS.items() if k != "BUCKET_NAME"})


def test_each_database_runs_as_its_own_uid(machine):
    """A Fly deployment serves many tenants: their Postgres instances must not share a uid."""
    settings = machine()
    assert settings.instance_uid_base >= 65536, "above the image's own users and groups"
    assert settings.instance_uid_base + settings.instance_uid_count < 2**31


# --- a fleet of machines on one bucket ---------------------------------------------------------
def test_machines_link_over_6pn_on_a_port_no_service_exposes(fly, machine):
    settings = machine()
    host, port = host_port("cluster_listen", settings.cluster_listen)
    assert host == "fly-local-6pn", "the machine's private address, never 0.0.0.0"
    # the entrypoint made the address the others reach this machine at
    assert "PGSNI_ADVERTISE_ADDRESS" not in fly["env"], "each machine has its own: derived at start"
    assert settings.advertise_address == f"[{FLY_RUNTIME['FLY_PRIVATE_IP']}]:{port}"
    assert port not in (settings.listen_port, settings.admin_port)
    for svc in fly["services"]:
        assert svc["internal_port"] != port, "the internal listener is never a public service"
        assert all(p["port"] != port for p in svc["ports"])
    assert all(c["port"] != port for c in fly["checks"].values())


def test_every_machine_uses_the_same_lease_seconds_that_this_storage_allows(fly, machine):
    settings = machine()
    assert "PGSNI_LEASE_SECONDS" in fly["env"], "the same value on every machine, stated"
    # the gateway refuses to start with a lease its storage's retries cannot renew in time
    check_lease_timing(settings)


def test_cluster_certificates_are_secrets_written_as_files(fly, machine):
    settings = machine()
    files = {f["guest_path"]: f for f in fly.get("files", [])}
    wanted = {settings.cluster_ca, settings.cluster_cert, settings.cluster_key}
    assert wanted <= set(files), "Fly writes the files the settings name"
    mounts = [m["destination"] for m in fly["mounts"]]
    for path in wanted:
        entry = files[path]
        assert set(entry) == {"guest_path", "secret_name"}, "from a secret, not the repository"
        name = entry["secret_name"]
        assert name not in fly["env"], f"{name} is a secret: `fly secrets set`, not [env]"
        assert documented_in_deploy_doc(name), f"docs/deploy.md does not say how to set {name}"
        assert not any(path.startswith(m.rstrip("/") + "/") for m in mounts), "not on the volume"
    assert not any("ca-key" in p for p in files), "the CA's key stays off the machines"


def test_rolling_deploys_replace_one_machine_at_a_time(fly):
    deploy = fly["deploy"]
    assert deploy["strategy"] == "rolling", "machines with volumes are replaced in place"
    assert deploy["max_unavailable"] == 1, "the others serve (and take over) meanwhile"
