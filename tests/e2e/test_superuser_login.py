"""Clients never log in as a superuser unless the operator allows it, and allowing it needs
per-database OS users and a protected admin API (outside development mode)."""

from __future__ import annotations

import os

import psycopg
import pytest

from gateway.config import ConfigError, Settings

from ..support.harness import connect_sqlstate, conninfo

BOSS = "create role boss superuser login password 'boss-pw-123456'"


def test_a_superuser_login_is_refused_with_a_hint(gateway, tls):
    gateway.create_db("app1")
    gateway.admin_sql("app1", BOSS)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", user="boss", password="boss-pw-123456"))
    assert 'role "boss" is a superuser' in str(refused.value) and "allow_superuser_login" in str(refused.value)
    assert connect_sqlstate(gateway.port, tls["ca"], "app1", user="boss", password="boss-pw-123456") == "28000"
    # with the wrong password the answer is the usual one: no hint that boss is special
    assert connect_sqlstate(gateway.port, tls["ca"], "app1", user="boss", password="nope") == "28P01"
    # the gateway's own roles have no password: like unknown roles
    for user in ("pgsni_admin", "pgsni_agent"):
        assert connect_sqlstate(gateway.port, tls["ca"], "app1", user=user, password="x") == "28P01"


@pytest.mark.skipif(os.geteuid() != 0, reason="instance_uid_base needs root")
def test_superusers_may_log_in_where_the_operator_allows_it(start_gateway, tls):
    gw = start_gateway(instance_uid_base=320000, instance_uid_count=100,
                       superuser_login_databases=["app1"])
    for db in ("app1", "app2"):
        gw.create_db(db)
        gw.admin_sql(db, BOSS)
    with psycopg.connect(conninfo(gw.port, tls["ca"], "app1", user="boss", password="boss-pw-123456")) as c:
        assert c.execute("show is_superuser").fetchone() == ("on",)
    assert connect_sqlstate(gw.port, tls["ca"], "app2", user="boss", password="boss-pw-123456") == "28000"


@pytest.mark.parametrize("settings, problem", [
    ({"allow_superuser_login": True}, "set instance_uid_base"),
    ({"superuser_login_databases": ["app1"]}, "set instance_uid_base"),
])
def test_allowing_superusers_without_their_safeguards_is_refused_at_start(settings, problem, tmp_path):
    with pytest.raises(ConfigError, match=problem):
        Settings(data_root=str(tmp_path), **settings)


def test_development_mode_may_allow_superusers_on_one_os_user(tmp_path):
    Settings(data_root=str(tmp_path), create_on_connect=True, allow_superuser_login=True)
    # the admin API needs a token in any case: admin_token, or the data root's private one
    Settings(data_root=str(tmp_path), allow_superuser_login=True, instance_uid_base=200000, admin_port=8080)
