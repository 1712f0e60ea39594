"""Unit tests for gateway/config.py: defaults < TOML file < PGSNI_* environment < overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import ENV_PREFIX, ConfigError, Settings, load, reference_markdown


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgsni.toml"
    path.write_text(text)
    return path


def test_defaults():
    s = load(env={})
    assert s == Settings()
    assert s.listen_host == "127.0.0.1"
    assert s.listen_port == 5432
    assert s.domains == ["db.example.com"]
    assert s.require_tls is True
    assert s.create_on_connect is False
    assert s.max_message_size == 65536
    assert s.max_instances == 50
    assert s.idle_timeout == 300.0
    assert s.postgres_options == {}
    assert s.tls_cert == "certs/dev/server.pem"


def test_mutable_defaults_are_not_shared():
    a, b = Settings(), Settings()
    a.domains.append("other.example.org")
    a.postgres_options["fsync"] = "off"
    assert b.domains == ["db.example.com"]
    assert b.postgres_options == {}
    assert Settings().domains == ["db.example.com"]


def test_load_ignores_the_real_environment_when_env_given(monkeypatch):
    monkeypatch.setenv("PGSNI_LISTEN_PORT", "7777")
    assert load(env={}).listen_port == 5432
    assert load().listen_port == 7777  # env=None means os.environ


TOML = """
listen_port = 6543
domains = ["pg.example.org", "db.example.net"]
require_tls = false
idle_timeout = 12
max_message_size = 4096
log_level = "DEBUG"

[postgres_options]
fsync = "off"
work_mem = "8MB"
"""


def test_file_layer(tmp_path):
    s = load(write_toml(tmp_path, TOML), env={})
    assert s.listen_port == 6543
    assert s.domains == ["pg.example.org", "db.example.net"]
    assert s.require_tls is False
    assert s.idle_timeout == 12.0 and isinstance(s.idle_timeout, float)
    assert s.max_message_size == 4096
    assert s.log_level == "DEBUG"
    assert s.postgres_options == {"fsync": "off", "work_mem": "8MB"}
    assert s.listen_host == "127.0.0.1"  # untouched settings keep their defaults


def test_config_file_from_env_variable(tmp_path):
    path = write_toml(tmp_path, "listen_port = 6000\n")
    assert load(env={"PGSNI_CONFIG": str(path)}).listen_port == 6000


def test_explicit_config_file_beats_env_config_variable(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text("listen_port = 1111\n")
    b = tmp_path / "b.toml"
    b.write_text("listen_port = 2222\n")
    assert load(a, env={"PGSNI_CONFIG": str(b)}).listen_port == 1111


def test_env_layer_overrides_file(tmp_path):
    env = {
        "PGSNI_DOMAINS": "a.example.com, b.example.com ,c.example.com",
        "PGSNI_REQUIRE_TLS": "false",
        "PGSNI_POSTGRES_OPTIONS": "fsync=off,shared_buffers=16MB",
        "PGSNI_LISTEN_PORT": "7000",
        "PGSNI_IDLE_TIMEOUT": "2.5",
    }
    s = load(write_toml(tmp_path, TOML), env=env)
    assert s.domains == ["a.example.com", "b.example.com", "c.example.com"]
    assert s.require_tls is False
    assert s.postgres_options == {"fsync": "off", "shared_buffers": "16MB"}
    assert s.listen_port == 7000
    assert s.idle_timeout == 2.5
    assert s.log_level == "DEBUG"  # from the file, not overridden


@pytest.mark.parametrize("text,value", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" True ", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("Off", False),
])
def test_env_bool_spellings(text, value):
    assert load(env={"PGSNI_REQUIRE_TLS": text}).require_tls is value


def test_env_bool_garbage_refused():
    with pytest.raises(ConfigError, match="PGSNI_REQUIRE_TLS"):
        load(env={"PGSNI_REQUIRE_TLS": "maybe"})


def test_env_empty_postgres_options():
    assert load(env={"PGSNI_POSTGRES_OPTIONS": ""}).postgres_options == {}


def test_env_postgres_option_without_value_refused():
    with pytest.raises(ConfigError, match="PGSNI_POSTGRES_OPTIONS"):
        load(env={"PGSNI_POSTGRES_OPTIONS": "fsync=off,oops"})


def test_env_empty_domains_refused():
    with pytest.raises(ConfigError, match="domain"):
        load(env={"PGSNI_DOMAINS": " , "})


def test_overrides_beat_env_and_file(tmp_path):
    env = {"PGSNI_LISTEN_PORT": "7000", "PGSNI_DOMAINS": "env.example.com"}
    s = load(write_toml(tmp_path, TOML), env=env, listen_port=8000, domains=["cli.example.com"],
             require_tls=True)
    assert s.listen_port == 8000
    assert s.domains == ["cli.example.com"]
    assert s.require_tls is True  # the file said false


def test_overrides_are_coerced():
    s = load(env={}, listen_port="9000", domains="x.example.com,y.example.com", require_tls="no")
    assert s.listen_port == 9000
    assert s.domains == ["x.example.com", "y.example.com"]
    assert s.require_tls is False


def test_none_overrides_ignored(tmp_path):
    env = {"PGSNI_LISTEN_PORT": "7000"}
    s = load(write_toml(tmp_path, TOML), env=env, listen_port=None, domains=None, require_tls=None,
             no_such_setting=None)
    assert s.listen_port == 7000
    assert s.domains == ["pg.example.org", "db.example.net"]
    assert s.require_tls is False


def test_unknown_override_refused():
    with pytest.raises(ConfigError, match="no_such_setting"):
        load(env={}, no_such_setting=1)


def test_unknown_key_in_file_refused(tmp_path):
    path = write_toml(tmp_path, "listen_port = 1\nlisten_prot = 5433\n")
    with pytest.raises(ConfigError, match="listen_prot") as info:
        load(path, env={})
    assert str(path) in str(info.value)


def test_missing_config_file_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml", env={})


def test_invalid_toml_refused(tmp_path):
    path = write_toml(tmp_path, "listen_port = = 5\n")
    with pytest.raises(ConfigError, match=str(path)):
        load(path, env={})


@pytest.mark.parametrize("var,value", [
    ("PGSNI_LISTEN_PORT", "abc"),
    ("PGSNI_LISTEN_PORT", "5432.0"),
    ("PGSNI_MAX_INSTANCES", ""),
    ("PGSNI_MAX_MESSAGE_SIZE", "64k"),
    ("PGSNI_IDLE_TIMEOUT", "soon"),
])
def test_bad_number_in_env_names_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        load(env={var: value})


def test_bad_int_in_file_names_the_file(tmp_path):
    path = write_toml(tmp_path, 'listen_port = "five"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(path) in str(info.value) and "listen_port" in str(info.value)


def test_bad_int_override_names_the_flag():
    with pytest.raises(ConfigError, match="--listen-port"):
        load(env={}, listen_port="x")


@pytest.mark.parametrize("domains", [
    "DB.example.com", ".db.example.com", "db.example.com.", "ok.example.com,Bad.example.com",
])
def test_invalid_domain_refused(domains):
    with pytest.raises(ConfigError, match="domains"):
        load(env={"PGSNI_DOMAINS": domains})


def test_invalid_domain_in_settings_refused():
    with pytest.raises(ConfigError, match="domains"):
        Settings(domains=[""])
    with pytest.raises(ConfigError, match="domains"):
        Settings(domains=[])


@pytest.mark.parametrize("kw,match", [
    ({"listen_port": 70000}, "listen_port"),
    ({"listen_port": -1}, "listen_port"),
    ({"max_instances": 0}, "max_instances"),
    ({"max_message_size": 1023}, "max_message_size"),
])
def test_range_checks(kw, match):
    with pytest.raises(ConfigError, match=match):
        load(env={}, **kw)


def test_socket_path_default_is_short_and_stable(tmp_path):
    s = load(env={}, data_root=str(tmp_path / "data"))
    assert s.data_path == (tmp_path / "data").absolute()
    assert s.socket_path == load(env={}, data_root=str(tmp_path / "data")).socket_path
    assert str(s.socket_path).startswith("/tmp/pgsni-")
    assert len(str(s.socket_path)) < 40  # unix socket paths are limited to ~107 bytes
    assert s.socket_path != load(env={}, data_root=str(tmp_path / "other")).socket_path
    assert load(env={}, socket_dir=str(tmp_path / "s")).socket_path == tmp_path / "s"


def test_reference_markdown_lists_every_field():
    text = reference_markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| setting | environment |")
    rows = lines[2:]
    fields = dataclasses.fields(Settings)
    assert len(rows) == len(fields)
    for f, row in zip(fields, rows):
        assert row.startswith(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` |")
        assert f.metadata["doc"] in row
    assert "| `domains` | `PGSNI_DOMAINS` | `db.example.com` |" in text
    assert "| `listen_port` | `PGSNI_LISTEN_PORT` | `5432` |" in text
    assert "| `require_tls` | `PGSNI_REQUIRE_TLS` | `True` |" in text


def test_reference_env_names_are_the_ones_load_reads():
    # every variable the reference documents must really be read by load()
    for f in dataclasses.fields(Settings):
        var = ENV_PREFIX + f.name.upper()
        assert f"`{var}`" in reference_markdown()
        if f.type == "int":
            value = 6000 if f.name == "instance_cpu_weight" else 60000  # 1-10000
            assert getattr(load(env={var: str(value)}), f.name) == value
        elif f.type == "float":
            assert getattr(load(env={var: "1.5"}), f.name) == 1.5
        elif f.type == "str":
            # storage only takes a kind or a URL, log_format a format, admin_host without a
            # token a loopback address, pg_major a major version, durability and sync_fallback a
            # mode; any other string setting takes any text
            value = {"storage": "s3://bucket/prefix", "log_format": "json", "admin_host": "::1",
                     "pg_major": "17", "durability": "snapshot", "sync_fallback": "async"}.get(f.name, "zz")
            others = {}
            if f.name in FLEET:  # the fleet settings come as a set
                value = FLEET[f.name]
                others = {ENV_PREFIX + k.upper(): v for k, v in FLEET.items()}
            assert getattr(load(env=others | {var: value}), f.name) == value


def test_file_rejects_bool_or_float_for_an_int(tmp_path):
    import pytest

    from gateway.config import ConfigError, load

    for bad in ("6543.9", "true"):
        f = tmp_path / "c.toml"
        f.write_text(f"listen_port = {bad}\n")
        with pytest.raises(ConfigError, match="listen_port"):
            load(f, env={})


def test_durability_modes():
    import pytest

    from gateway.config import ConfigError, load

    assert load(env={}).durability == "async" and load(env={}).rpo_seconds == 1.0
    assert load(env={"PGSNI_DURABILITY": "snapshot"}).durability == "snapshot"
    sync = load(env={"PGSNI_DURABILITY": "sync"})
    assert (sync.durability, sync.sync_fallback, sync.sync_timeout_seconds) == ("sync", "fail", 10.0)
    assert load(env={"PGSNI_DURABILITY": "sync", "PGSNI_SYNC_FALLBACK": "async"}).sync_fallback == "async"
    with pytest.raises(ConfigError, match="must be snapshot, async or sync"):
        load(env={"PGSNI_DURABILITY": "always"})
    with pytest.raises(ConfigError, match="sync_fallback: 'wait' must be fail or async"):
        load(env={"PGSNI_SYNC_FALLBACK": "wait"})
    with pytest.raises(ConfigError, match="rpo_seconds and sync_timeout_seconds must be positive"):
        load(env={"PGSNI_RPO_SECONDS": "0"})
    with pytest.raises(ConfigError, match="rpo_seconds and sync_timeout_seconds must be positive"):
        load(env={"PGSNI_SYNC_TIMEOUT_SECONDS": "0"})


FLEET = dict(advertise_address="10.0.0.5:5433", cluster_listen="0.0.0.0:5433", cluster_ca="ca.pem",
             cluster_cert="gw.pem", cluster_key="gw-key.pem")


def test_fleet_links_are_off_by_default_and_a_full_set_is_accepted():
    assert Settings().advertise_address == ""
    s = Settings(**FLEET)
    assert (s.advertise_address, s.cluster_listen) == ("10.0.0.5:5433", "0.0.0.0:5433")
    assert Settings(**FLEET | {"advertise_address": "[fdaa:0:1::3]:5433", "cluster_listen": "[::]:5433"})


@pytest.mark.parametrize("kw, match", [
    ({"cluster_listen": ""}, "advertise_address is set, so cluster_listen is required"),
    ({"cluster_ca": ""}, "so cluster_ca is required"),
    ({"cluster_cert": ""}, "so cluster_cert is required"),
    ({"cluster_key": ""}, "so cluster_key is required"),
    ({"advertise_address": "10.0.0.5"}, "advertise_address: '10.0.0.5' is not HOST:PORT"),
    ({"advertise_address": "10.0.0.5:99999"}, "advertise_address: .* is not HOST:PORT"),
    ({"advertise_address": "0.0.0.0:5433"}, "wildcard, not an address other gateways can reach"),
    ({"advertise_address": "[::]:5433"}, "wildcard"),
    ({"cluster_listen": "5433"}, "cluster_listen: '5433' is not HOST:PORT"),
    ({"cluster_listen": "0.0.0.0:5432"}, "coincides with listen_port .*never the public one"),
    ({"cluster_listen": "127.0.0.1:5432"}, "coincides with listen_port"),
    ({"cluster_listen": "127.0.0.1:8080"}, "coincides with admin_port"),
    ({"lease_seconds": 0}, "heartbeats, which lease_seconds = 0 turns off"),
])
def test_fleet_settings_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**FLEET | kw)


def test_the_internal_listener_may_share_a_port_number_on_another_address():
    s = Settings(**FLEET | {"cluster_listen": "10.0.0.5:5432", "listen_host": "203.0.113.7"})
    assert s.cluster_listen == "10.0.0.5:5432"


def test_workers_go_together_with_links_each_on_a_port_of_its_own():
    s = Settings(**FLEET | {"workers": 4, "cluster_listen": "0.0.0.0:5433", "listen_port": 5432, "admin_port": 5437})
    assert (s.worker_count, s.advertise_address) == (4, "10.0.0.5:5433")  # ports 5433-5436


@pytest.mark.parametrize("kw, match", [
    ({"cluster_listen": "0.0.0.0:65534", "advertise_address": "10.0.0.5:7000"},
     r"cluster_listen: workers = 4 need the ports 65534-65537 .* above 65535"),
    ({"advertise_address": "10.0.0.5:65533"}, r"advertise_address: workers = 4 need the ports 65533-65536"),
    ({"cluster_listen": "0.0.0.0:5430"}, r"cluster_listen ports 5430-5433 \(one per worker, workers = 4\) "
                                         r"include listen_port \(127.0.0.1:5432\)"),
    ({"cluster_listen": "127.0.0.1:8077"}, r"cluster_listen ports 8077-8080 .* include admin_port"),
])
def test_workers_with_links_refuse_port_ranges_that_cannot_work(kw, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**FLEET | {"workers": 4} | kw)


@pytest.mark.parametrize("name", ["cluster_listen", "cluster_ca", "cluster_cert", "cluster_key"])
def test_fleet_settings_without_an_advertised_address_are_refused(name):
    with pytest.raises(ConfigError, match=f"{name} is set but advertise_address is empty"):
        Settings(**{name: FLEET[name]})
