"""gateway/compute/dbroles.py: the private socket's auth files, the 'secured' test on saved roles, and
connection strings that a database name cannot extend."""

from __future__ import annotations

from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from gateway.compute import dbroles
from storage.roles import Role


def test_hba_admits_the_gateways_roles_by_peer_and_everyone_else_by_scram():
    rules = [line.split() for line in dbroles.hba().splitlines() if line and not line.startswith("#")]
    assert rules == [["local", "all", "pgsni_admin,pgsni_agent", "peer", "map=pgsni"],
                     ["local", "replication", "pgsni_admin", "peer", "map=pgsni"],
                     ["local", "all", "all", "scram-sha-256"]]
    assert "trust" not in dbroles.hba() and "host" not in dbroles.hba()


def test_maintenance_hba_admits_only_the_gateways_roles():
    rules = [line.split() for line in dbroles.hba(maintenance=True).splitlines()
             if line and not line.startswith("#")]
    assert rules[-1] == ["local", "all", "all", "reject"]
    assert "pgsni_agent" not in dbroles.hba(maintenance=True)
    assert "replication" not in dbroles.hba(maintenance=True)


def test_ident_maps_only_the_gateways_os_user():
    lines = [line.split() for line in dbroles.ident("root").splitlines() if not line.startswith("#")]
    assert lines == [["pgsni", "root", "pgsni_admin"], ["pgsni", "root", "pgsni_agent"]]


def role(name: str, superuser: bool | None) -> Role:
    return Role(name, None, superuser=superuser)


def test_secured_needs_the_admin_as_superuser_and_known_attributes():
    ok = {"pgsni_admin": role("pgsni_admin", True), "postgres": role("postgres", False)}
    assert dbroles.secured(ok)
    assert not dbroles.secured(None) and not dbroles.secured({})
    # saved by an older pgsni: no attribute recorded, no admin
    assert not dbroles.secured({"postgres": role("postgres", None)})
    assert not dbroles.secured({**ok, "app": role("app", None)})
    assert not dbroles.secured({"pgsni_admin": role("pgsni_admin", False), "postgres": role("postgres", False)})
    assert dbroles.superusers({**ok, "boss": role("boss", True)}) == ["boss"]


def test_a_database_name_cannot_add_connection_parameters():
    info = conninfo_to_dict(dbroles.conninfo(Path("/tmp/s"), "x host=/tmp/other user=postgres"))
    assert info["host"] == "/tmp/s" and info["user"] == "pgsni_admin"
    assert info["dbname"] == "x host=/tmp/other user=postgres"
    args = dbroles.tool_args(Path("/tmp/s"), "postgres", act_as="postgres")
    info = conninfo_to_dict(args[args.index("-d") + 1])
    assert info["user"] == "pgsni_agent" and info["options"] == "-c role=postgres"
    assert "--no-password" in args


async def test_many_roles_are_read_without_holding_the_event_loop():
    """A tenant may make any number of roles: a whole read (at a stop) converts them a batch
    at a time, and other sessions are served in between."""
    import asyncio

    n = dbroles.ROLE_BATCH * 3 + 1
    rows = [(f"r{i}", None, True, None, False) for i in range(n)]

    class Cursor:
        async def fetchmany(self, size):
            out, rows[:] = rows[:size], rows[size:]
            return out

    class Conn:
        async def execute(self, query, params=None):
            assert query == dbroles.ROLE_QUERY
            return Cursor()

    turns = 0

    async def another_session():
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(another_session())
    await asyncio.sleep(0)
    before = turns
    roles = await dbroles.read_roles(Conn())
    other.cancel()
    assert len(roles) == n and roles["r0"].can_login
    assert turns - before >= 3, "the other session waited for the whole read"
