"""compose.yaml (the local stack) and docker/Corefile, checked without a Docker engine:
services, start order (depends_on conditions that can actually be met), healthchecks,
profiles, the fixed addresses that make wildcard DNS work, settings the gateway accepts, and
the two gateways of the fleet: one bucket, distinct names, links with the certificates
cluster-init makes (its command is run for real), both behind the one DNS name."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys

import pytest
import yaml

from certs.cluster import link_server_context
from gateway.config import host_port, load

from .conftest import (DOCKER, ROOT, check_lease_timing, entrypoint_vars, parse_dockerfile, setting_default,
                       setting_env_names)

CORE = {"dns", "minio", "minio-init", "tls-init", "cluster-init", "proxy", "proxy2"}


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


def _volumes(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (volume or host path, read-only)"""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *mode = v.split(":")
        out[dst] = (src, mode == ["ro"])
    return out


@pytest.fixture(scope="module")
def gateways(services) -> dict:
    """The long-running services that run our image's default command: the gateways."""
    found = {n: s for n, s in services.items()
             if s.get("image") == "pgsni:dev" and not s.get("profiles") and "command" not in s
             and "entrypoint" not in s and str(s.get("restart", "no")) != "no"}
    assert len(found) >= 2, f"a fleet of at least two gateways, not {sorted(found)}"
    return found


def _settings(service: dict):
    """The settings a gateway service starts with: the image's ENV, then its environment."""
    _, stages = parse_dockerfile(DOCKER / "Dockerfile")
    return load(env=stages[-1].env() | _env(service))


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


def test_start_order(services, gateways):
    def cond(a, b):
        return services[a]["depends_on"][b]["condition"]

    assert cond("minio-init", "minio") == "service_healthy"
    assert cond("tls-init", "minio-init") == "service_completed_successfully"
    for gw in gateways:
        assert cond(gw, "minio-init") == "service_completed_successfully"
        assert cond(gw, "tls-init") == "service_completed_successfully"
        assert cond(gw, "cluster-init") == "service_completed_successfully"
        assert cond("psql", gw) == "service_healthy", "psql may be sent to either gateway"
        assert _has_healthcheck(services[gw])
    assert "dns" in services["psql"]["depends_on"]
    assert _has_healthcheck(services["minio"])


def test_gateways_are_built_from_the_dockerfile_and_run_in_s3_mode(gateways):
    for name, gw in gateways.items():
        assert (ROOT / gw["build"]["context"] / gw["build"]["dockerfile"]) == DOCKER / "Dockerfile"
        env = _env(gw)
        assert env["PGSNI_STORAGE"] == "s3"
        assert env["PGSNI_S3_ENDPOINT"] == "http://minio:9000"
        assert env["PGSNI_TLS_FROM_STORAGE"] == "true"
        # the image's settings plus these must be accepted by the gateway as they are
        settings = _settings(gw)
        assert settings.storage_kind == "s3" and settings.s3_bucket
        ports = {p.rsplit(":", 1)[-1] for p in gw["ports"]}
        assert str(settings.listen_port) in ports and str(settings.admin_port) in ports
        # docker compose stop: SIGTERM, then time for drain, instance stop and snapshots
        assert gw["stop_signal"] == "SIGTERM"
        grace = int(re.fullmatch(r"(\d+)s", gw["stop_grace_period"]).group(1))
        assert grace >= settings.shutdown_grace + settings.stop_timeout + 30, name
    published = [p.split(":")[1] for gw in gateways.values() for p in gw["ports"]]
    assert len(published) == len(set(published)), "each gateway on host ports of its own"


def test_the_gateways_share_one_bucket_under_distinct_names(gateways):
    settings = {n: _settings(gw) for n, gw in gateways.items()}
    names = {s.gateway_id for s in settings.values()}
    assert "" not in names and len(names) == len(gateways), "distinct, stated gateway names"
    shared = {(s.storage_location(), s.s3_endpoint, s.lease_seconds, s.cluster_ca, tuple(s.domains))
              for s in settings.values()}
    assert len(shared) == 1, f"one bucket, prefix, endpoint, lease_seconds, cluster CA and domains: {shared}"
    for s in settings.values():
        check_lease_timing(s)
    data = [_volumes(gw)["/data"][0] for gw in gateways.values()]
    assert len(set(data)) == len(data), "a local cache (volume) per gateway"


def test_the_gateways_link_on_their_own_addresses_on_an_unpublished_port(gateways):
    advertised = set()
    for name, gw in gateways.items():
        s = _settings(gw)
        assert s.advertise_address and s.cluster_listen, f"{name} has links"
        host, port = host_port("advertise_address", s.advertise_address)
        assert host == gw["networks"]["pgsni"]["ipv4_address"], "the others reach it at its address"
        listen_host, listen_port = host_port("cluster_listen", s.cluster_listen)
        assert listen_port == port and listen_host in (host, "0.0.0.0")
        assert port not in (s.listen_port, s.admin_port)
        assert all(p.rsplit(":", 1)[-1] != str(port) for p in gw["ports"]), "never published"
        advertised.add(s.advertise_address)
    assert len(advertised) == len(gateways)


def test_cluster_init_makes_the_certificates_the_gateways_use(services, gateways, tmp_path):
    """Run cluster-init's command for real (the real `pgsni certs cluster`), with its volumes
    as directories, twice (a second `docker compose up`), and load each gateway's link context
    from what its volumes then hold; the CA's key is in no gateway's volume."""
    init = services["cluster-init"]
    assert init["image"] == "pgsni:dev" and str(init.get("restart", "no")) == "no"
    mounts = _volumes(init)
    dirs = {vol: tmp_path / vol for vol, _ in mounts.values()}
    script = init["command"][-1].replace("$$", "$")
    for path, (vol, _) in mounts.items():
        dirs[vol].mkdir()
        script = script.replace(path + "/", f"{dirs[vol]}/").replace(path + " ", f"{dirs[vol]} ")
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for _ in range(2):
        r = subprocess.run(init["command"][:-1] + [script], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    ca_key_volumes = {vol for vol, d in dirs.items() if (d / "ca-key.pem").exists()}
    assert ca_key_volumes, "cluster-init keeps the CA (and its key) for the next gateway"
    for name, gw in gateways.items():
        s = _settings(gw)
        gw_mounts = _volumes(gw)
        assert not ca_key_volumes & {vol for vol, _ in gw_mounts.values()}, f"{name} can read the CA's key"

        def on_host(path: str) -> str:
            mount = max((m for m in gw_mounts if path.startswith(m + "/")), key=len)
            vol, read_only = gw_mounts[mount]
            assert read_only and vol in dirs, f"{name}: {path} comes from cluster-init, read-only"
            return str(dirs[vol] / path[len(mount) + 1:])

        link_server_context(on_host(s.cluster_ca), on_host(s.cluster_cert), on_host(s.cluster_key))
        assert s.gateway_id in s.cluster_cert, "its own member certificate (logs name it)"


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


def test_psql_resolves_through_the_dns_service(compose, services, gateways):
    net = compose["networks"]["pgsni"]
    subnet = ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
    dns_ip = services["dns"]["networks"]["pgsni"]["ipv4_address"]
    gateway_ips = [gw["networks"]["pgsni"]["ipv4_address"] for gw in gateways.values()]
    for ip in [dns_ip, *gateway_ips]:
        assert ipaddress.ip_address(ip) in subnet
    assert len({dns_ip, *gateway_ips}) == 1 + len(gateways)
    psql = services["psql"]
    assert psql["dns"] == [dns_ip]
    assert "pgsni" in psql["networks"]
    assert psql["entrypoint"] == ["psql"]
    corefile = services["dns"]["volumes"][0].split(":")
    assert (ROOT / corefile[0]).resolve() == DOCKER / "Corefile"
    assert corefile[1] in services["dns"]["command"]


def _template_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"template\s+IN\s+(\w+)[^{]*\{(.*?)\n\s*\}", text, re.S)


def test_the_one_name_resolves_to_every_gateway(services, gateways):
    """CoreDNS's template plugin gives one A record per `answer` line, with {$VAR} from the
    dns service's environment: a client gets every gateway's address for any database."""
    blocks = _template_blocks((DOCKER / "Corefile").read_text())
    (a,) = [body for kind, body in blocks if kind == "A"]
    answers = re.findall(r'answer\s+"([^"]+)"', a)
    env = _env(services["dns"])
    addresses = set()
    for answer in answers:
        assert answer.startswith("{{ .Name }} ") and " IN A " in answer, answer
        addresses.add(re.sub(r"\{\$(\w+)\}", lambda m: env[m.group(1)], answer.split(" IN A ")[1]).strip())
    assert addresses == {gw["networks"]["pgsni"]["ipv4_address"] for gw in gateways.values()}


def test_corefile_answers_every_name_under_the_domain():
    text = (DOCKER / "Corefile").read_text()
    assert re.search(r"^db\.example\.com(:53)?\s*\{", text, re.M), "a server block for the domain"
    blocks = dict(_template_blocks(text))
    a = blocks["A"]
    match = re.search(r'match\s+"([^"]+)"', a).group(1)
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
    assert {"minio-init", "tls-init", "cluster-init"} <= one_shot
    long_running = set(core) - one_shot
    for job in one_shot:
        adopters = [n for n in long_running
                    if (core[n].get("depends_on") or {}).get(job, {}).get("condition")
                    == "service_completed_successfully"]
        assert adopters, f"no long-running service waits for {job} to complete"
