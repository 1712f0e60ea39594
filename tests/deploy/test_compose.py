"""compose.yaml (the local stack) and docker/Corefile, checked without a Docker engine:
services, start order (depends_on conditions that can actually be met), healthchecks,
profiles, the fixed addresses that make wildcard DNS work, and settings the gateway accepts."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from gateway.config import load

from .conftest import DOCKER, ROOT, entrypoint_vars, parse_dockerfile, setting_default, setting_env_names

CORE = {"dns", "minio", "minio-init", "tls-init", "proxy"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _has_healthcheck(service: dict) -> bool:
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    build = service.get("build")
    if build:  # our image: the Dockerfile's HEALTHCHECK
        _, stages = parse_dockerfile(ROOT / build["context"] / build["dockerfile"])
        return bool(stages[-1].all("HEALTHCHECK"))
    return False


def test_the_stack_has_its_services(services):
    assert CORE | {"psql"} <= set(services)
    for name in CORE:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    assert services["psql"].get("profiles"), "the psql helper is optional (run on demand)"


def test_depends_on_conditions_can_be_met(services):
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            assert cond in allowed, f"{name} -> {dep}: {cond}"
            if cond == "service_healthy":
                assert _has_healthcheck(services[dep]), f"{name} waits for {dep} to be healthy, but it has no healthcheck"
            if cond == "service_completed_successfully":
                restart = str(services[dep].get("restart", "no"))
                assert restart in ("no", "on-failure"), f"{dep} must run to completion (restart: {restart})"
            # a core service must not wait for an optional one
            if not svc.get("profiles"):
                assert not services[dep].get("profiles"), f"{name} depends on optional {dep}"


def test_start_order(services):
    def cond(a, b):
        return services[a]["depends_on"][b]["condition"]

    assert cond("minio-init", "minio") == "service_healthy"
    assert cond("tls-init", "minio-init") == "service_completed_successfully"
    assert cond("proxy", "minio-init") == "service_completed_successfully"
    assert cond("proxy", "tls-init") == "service_completed_successfully"
    assert cond("psql", "proxy") == "service_healthy"
    assert "dns" in services["psql"]["depends_on"]
    assert _has_healthcheck(services["minio"]) and _has_healthcheck(services["proxy"])


def test_proxy_is_built_from_the_dockerfile_and_runs_in_s3_mode(services):
    proxy = services["proxy"]
    assert (ROOT / proxy["build"]["context"] / proxy["build"]["dockerfile"]) == DOCKER / "Dockerfile"
    env = _env(proxy)
    assert env["PGSNI_STORAGE"] == "s3"
    assert env["PGSNI_S3_ENDPOINT"] == "http://minio:9000"
    assert env["PGSNI_TLS_FROM_STORAGE"] == "true"
    # the image's settings plus these must be accepted by the gateway as they are
    _, stages = parse_dockerfile(DOCKER / "Dockerfile")
    settings = load(env=stages[-1].env() | env)
    assert settings.storage_kind == "s3" and settings.s3_bucket
    ports = {p.rsplit(":", 1)[-1] for p in proxy["ports"]}
    assert str(settings.listen_port) in ports and str(settings.admin_port) in ports
    # docker compose stop: SIGTERM, then time for drain, instance stop and snapshots
    assert proxy["stop_signal"] == "SIGTERM"
    grace = int(re.fullmatch(r"(\d+)s", proxy["stop_grace_period"]).group(1))
    assert grace >= settings.shutdown_grace + settings.stop_timeout + 30


def test_bucket_and_credentials_agree(services):
    proxy, tls_init = _env(services["proxy"]), _env(services["tls-init"])
    minio = _env(services["minio"])
    init_cmd = " ".join(services["minio-init"]["command"])
    assert f"local/{proxy['PGSNI_S3_BUCKET']}" in init_cmd, "minio-init creates the proxy's bucket"
    for k in ("PGSNI_S3_BUCKET", "PGSNI_S3_PREFIX", "PGSNI_S3_ENDPOINT", "PGSNI_S3_ACCESS_KEY"):
        assert tls_init[k] == proxy[k], f"tls-init uploads where the proxy reads: {k}"
    assert proxy["PGSNI_S3_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert proxy["PGSNI_S3_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    minio_init_env = _env(services["minio-init"])
    assert minio_init_env["MINIO_ROOT_USER"] == minio["MINIO_ROOT_USER"]


def test_env_names_are_real(services):
    known = setting_env_names() | entrypoint_vars()
    for name, svc in services.items():
        unknown = {k for k in _env(svc) if k.startswith("PGSNI_")} - known
        assert not unknown, f"{name}: {sorted(unknown)} are not pgsni settings"


def test_tls_init_writes_what_psql_trusts_and_uploads_it(services):
    tls_init, psql = services["tls-init"], services["psql"]
    cmd = " ".join(tls_init["command"])
    assert "pgsni certs generate --domain db.example.com --out /certs" in cmd
    assert "pgsni certs upload --cert /certs/server.pem --key /certs/server-key.pem" in cmd
    assert tls_init.get("build") or tls_init["image"] == services["proxy"]["image"]
    vol_of = {v.split(":")[1]: v.split(":")[0] for v in tls_init["volumes"]}
    psql_vols = {v.split(":")[1]: v.split(":")[0] for v in psql["volumes"]}
    root_cert = _env(psql)["PGSSLROOTCERT"]
    assert root_cert == "/certs/ca.pem"
    assert psql_vols["/certs"] == vol_of["/certs"], "psql mounts the volume tls-init writes"
    assert _env(psql)["PGSSLMODE"] == "verify-full"


def test_psql_resolves_through_the_dns_service(compose, services):
    net = compose["networks"]["pgsni"]
    subnet = ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
    dns_ip = services["dns"]["networks"]["pgsni"]["ipv4_address"]
    proxy_ip = services["proxy"]["networks"]["pgsni"]["ipv4_address"]
    assert ipaddress.ip_address(dns_ip) in subnet and ipaddress.ip_address(proxy_ip) in subnet
    assert dns_ip != proxy_ip
    psql = services["psql"]
    assert psql["dns"] == [dns_ip]
    assert "pgsni" in psql["networks"]
    assert psql["entrypoint"] == ["psql"]
    # CoreDNS answers with the proxy's address
    assert _env(services["dns"])["GATEWAY_IP"] == proxy_ip
    corefile = services["dns"]["volumes"][0].split(":")
    assert (ROOT / corefile[0]).resolve() == DOCKER / "Corefile"
    assert corefile[1] in services["dns"]["command"]


def _template_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"template\s+IN\s+(\w+)[^{]*\{(.*?)\n\s*\}", text, re.S)


def test_corefile_answers_every_name_under_the_domain():
    text = (DOCKER / "Corefile").read_text()
    assert re.search(r"^db\.example\.com(:53)?\s*\{", text, re.M), "a server block for the domain"
    blocks = dict(_template_blocks(text))
    a = blocks["A"]
    match = re.search(r'match\s+"([^"]+)"', a).group(1)
    answer = re.search(r'answer\s+"([^"]+)"', a).group(1)
    assert "{$GATEWAY_IP}" in answer and " IN A " in answer
    rx = re.compile(match)
    for name in ("12345.db.example.com.", "my-app.db.example.com.", "a.b.db.example.com."):
        assert rx.search(name), name
    for name in ("12345.db.example.org.", "db.example.com.evil.", "x.notdb.example.com."):
        assert not rx.search(name), name
    assert "AAAA" in blocks, "AAAA queries get an empty NOERROR, not NXDOMAIN"
    assert re.search(r"^\.(:53)?\s*\{[^}]*forward \. ", text, re.M | re.S), "other names are forwarded"
    assert setting_default("domains") == ["db.example.com"]


def test_images_are_pinned(services):
    for name, svc in services.items():
        if "build" in svc:
            continue
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"



def test_one_shot_services_are_adopted_so_up_wait_succeeds(services):
    # `docker compose up --wait` counts an exited container as a failure unless a running
    # service depends on it with service_completed_successfully
    core = {n: s for n, s in services.items() if not s.get("profiles")}
    one_shot = {n for n, s in core.items() if str(s.get("restart", "no")) == "no"}
    assert {"minio-init", "tls-init"} <= one_shot
    long_running = set(core) - one_shot
    for job in one_shot:
        adopters = [n for n in long_running
                    if (core[n].get("depends_on") or {}).get(job, {}).get("condition")
                    == "service_completed_successfully"]
        assert adopters, f"no long-running service waits for {job} to complete"
