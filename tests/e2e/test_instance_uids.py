"""instance_uid_base: each database's Postgres runs as its own OS uid, so even a superuser a
tenant is allowed (allow_superuser_login) cannot read another tenant's files; without it,
every instance shares pg_user and it can (the control case that shows the check can fail,
in development mode, the only one that allows superusers without per-database uids)."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from gateway.config import ConfigError, Settings
from gateway.compute.pgbins import PgInstalls
from storage.local import copy_tree

from ..support.harness import connect_sqlstate, conninfo
from .test_cli import _password, cli  # noqa: F401  (the `cli` fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="instance uids need the gateway to run as root")

BASE = 300000
MAJOR = PgInstalls().default_major


def _uid_of_backend(conn: psycopg.Connection) -> int:
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError("no Uid line")


def _read_file(conn: psycopg.Connection, path: Path) -> str | None:
    """The file's text as this tenant's superuser can read it, or None if refused."""
    try:
        return conn.execute("select pg_read_file(%s)", (str(path),)).fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return None


def _connect(gt, tls, db_id, **kw):
    return psycopg.connect(conninfo(gt.port, tls["ca"], db_id, **kw), autocommit=True)


def _as_superuser(gt, tls, db_id):
    """A superuser of `db_id`, which the operator made and the settings let log in."""
    gt.admin_sql(db_id, "create role boss superuser login password 'boss-pw-123'")
    return _connect(gt, tls, db_id, user="boss", password="boss-pw-123")


def test_each_database_runs_as_its_own_uid_and_cannot_read_the_others(start_gateway, tls):
    gt = start_gateway(instance_uid_base=BASE, instance_uid_count=1000, allow_superuser_login=True)
    for db in ("app1", "app2"):
        gt.create_db(db)
    catalog = gt.gw.catalog
    with _as_superuser(gt, tls, "app1") as one, _as_superuser(gt, tls, "app2") as two:
        uid1, uid2 = _uid_of_backend(one), _uid_of_backend(two)
        assert uid1 != uid2 and BASE <= uid1 < BASE + 1000 and BASE <= uid2 < BASE + 1000
        assert catalog.pgdata("app1").stat().st_uid == uid1  # the owner is the record
        assert catalog.pgdata("app2").stat().st_uid == uid2
        assert _read_file(one, catalog.pgdata("app1") / "PG_VERSION") == f"{MAJOR}\n"  # its own: yes
        assert _read_file(one, catalog.pgdata("app2") / "PG_VERSION") is None  # the other's: no
        assert _read_file(two, catalog.pgdata("app1") / "PG_VERSION") is None
        assert _read_file(one, catalog.roles_file("app1")) is None  # the gateway's files: no
        assert _read_file(one, catalog.template() / "PG_VERSION") is None  # the shared template: no
        assert catalog.db_dir("app1").stat().st_mode & 0o777 == 0o711
        assert catalog.db_dir("app1").stat().st_uid == 0
    # a restart keeps each database's uid (nothing but the owner records it)
    gt.stop()
    gt2 = start_gateway(instance_uid_base=BASE, instance_uid_count=1000)
    with _connect(gt2, tls, "app1") as one:
        assert _uid_of_backend(one) == uid1


def test_a_copy_of_a_database_gets_a_uid_of_its_own(start_gateway, tls):
    gt = start_gateway(instance_uid_base=BASE, instance_uid_count=1000)
    gt.create_db("app1")
    with _connect(gt, tls, "app1") as one:
        uid1 = _uid_of_backend(one)
        one.execute("create table t as select 42 as x")
    gt.call(lambda: gt.gw.instances.stop("app1"))
    catalog = gt.gw.catalog
    # a copy that keeps its source's owner, as a fork's copy does
    copy_tree(catalog.db_dir("app1"), catalog.db_dir("app3"))
    assert catalog.pgdata("app3").stat().st_uid == uid1
    with _connect(gt, tls, "app3") as three, _connect(gt, tls, "app1") as one:
        uid3 = _uid_of_backend(three)
        assert uid3 != uid1 and _uid_of_backend(one) == uid1
        assert three.execute("select x from t").fetchone()[0] == 42
        assert catalog.pgdata("app3").stat().st_uid == uid3


def test_without_instance_uids_tenants_share_one_os_user(start_gateway, tls):
    gt = start_gateway(create_on_connect=True, allow_superuser_login=True)
    for db in ("app1", "app2"):
        gt.create_db(db)
    with _as_superuser(gt, tls, "app1") as one, _connect(gt, tls, "app2") as two:
        assert _uid_of_backend(one) == _uid_of_backend(two)
        # why superusers need instance_uid_base: one reads another tenant's files
        assert _read_file(one, gt.gw.catalog.pgdata("app2") / "PG_VERSION") == f"{MAJOR}\n"
        assert _read_file(two, gt.gw.catalog.pgdata("app1") / "PG_VERSION") is None  # a tenant: no


@pytest.mark.parametrize("base, count", [(5, 10), (-1, 10), (2**31 - 5, 10), (300000, 0)])
def test_bad_uid_ranges_are_refused(base, count, tmp_path):
    with pytest.raises(ConfigError, match="instance_uid"):
        Settings(domains=["db.example.com"], data_root=str(tmp_path), instance_uid_base=base,
                 instance_uid_count=count).validate()



def test_an_uploaded_dump_runs_under_a_uid_of_its_own(start_gateway, tls, cli, tmp_path):
    """`db upload` runs the dump's SQL as the tenant role (no superuser), and with instance
    uids not as pg_user either: two walls between it and the template or other databases."""
    env = {"PGSNI_INSTANCE_UID_BASE": str(BASE), "PGSNI_INSTANCE_UID_COUNT": "1000"}
    gt = start_gateway(instance_uid_base=BASE, instance_uid_count=1000)
    gt.create_db("app1")
    with _connect(gt, tls, "app1") as one:
        uid1 = _uid_of_backend(one)
    catalog = gt.gw.catalog
    gt.stop()
    for target in (catalog.pgdata("app1") / "PG_VERSION", catalog.template() / "PG_VERSION"):
        spy = tmp_path / "spy.sql"
        spy.write_text(f"create table loot as select pg_read_file('{target}') as text;\n")
        out = cli("db", "upload", "spy1", str(spy), extra_env=env)
        assert out.returncode != 0 and "permission denied" in out.stderr.lower(), (target, out.stderr)
        assert not catalog.db_dir("spy1").exists()
    ok = tmp_path / "ok.sql"
    ok.write_text("create table t as select 7 as x;\n")
    out = cli("db", "upload", "up1", str(ok), extra_env=env)
    assert out.returncode == 0, out.stderr
    password = _password(out.stdout)
    gt2 = start_gateway(instance_uid_base=BASE, instance_uid_count=1000)
    with psycopg.connect(conninfo(gt2.port, tls["ca"], "up1", password=password)) as up:
        assert up.execute("select x from t").fetchone()[0] == 7
        uid = _uid_of_backend(up)
        assert uid != uid1 and BASE <= uid < BASE + 1000


def test_a_uid_the_machine_cannot_give_is_a_clear_startup_error(start_gateway, tls, monkeypatch):
    """In a user namespace, chown to an unmapped uid fails with EINVAL: the client gets 57P03
    naming the setting, and the database is left as it was."""
    import errno

    from storage.osuser import RunAs

    def unmapped(self, root):
        raise OSError(errno.EINVAL, "Invalid argument")

    gt = start_gateway(instance_uid_base=BASE, instance_uid_count=1000)
    gt.create_db("app1")
    gt.call(lambda: gt.gw.instances.stop("app1"))
    catalog = gt.gw.catalog
    # a copy with app1's uid needs one of its own
    copy_tree(catalog.db_dir("app1"), catalog.db_dir("app3"))
    owner = catalog.pgdata("app3").stat().st_uid
    monkeypatch.setattr(RunAs, "chown_tree", unmapped)
    with pytest.raises(psycopg.OperationalError, match="instance_uid_base and instance_uid_count inside"):
        _connect(gt, tls, "app3")
    assert connect_sqlstate(gt.port, tls["ca"], "app3") == "57P03"
    assert catalog.pgdata("app3").stat().st_uid == owner
    monkeypatch.undo()
    with _connect(gt, tls, "app3") as three:  # and it starts once uids can be given
        uid3 = _uid_of_backend(three)
        assert uid3 != owner and BASE <= uid3 < BASE + 1000
