"""Who is who inside every database, and how each logs in over the instance's private socket.

- `pgsni_admin`: the bootstrap superuser (OID 10), the gateway's own. No password: it logs in
  only by peer authentication, mapped from the gateway's OS user, so a tenant's backend
  (another OS user) cannot become it even if it reaches the socket.
- `pgsni_agent`: no privileges of its own, a NOINHERIT member of the tenant role. The gateway
  runs SQL that comes from users (migrations, uploaded dumps, init files) as the agent with
  `role` set to the tenant role: a script's RESET ROLE gains nothing.
- `postgres`: the tenant's owner role, without SUPERUSER (gateway/compute/securing.py gives it its
  rights). Clients log in as it, or as roles it creates, with SCRAM: the gateway relays
  the login with the keys the client's proof revealed (gateway/wire/scram.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from storage.roles import Role

ADMIN = "pgsni_admin"
AGENT = "pgsni_agent"
SETUP = "pgsni_setup"  # exists only while gateway/compute/securing.py runs
TENANT = "postgres"
RESERVED = (ADMIN, AGENT, SETUP)  # never a client's login
IDENT_MAP = "pgsni"
CONNECT_TIMEOUT = 10
# the gateway's superuser sessions set these themselves: a database's owner may store
# settings for its logins (ALTER DATABASE ... SET search_path = public, pg_catalog would let
# its objects shadow what a superuser query calls), and a former superuser may have stored
# worse (session_preload_libraries, role). Startup options win over all stored settings.
ADMIN_SESSION = {"search_path": "pg_catalog", "role": "none", "session_preload_libraries": "",
                 "local_preload_libraries": "", "default_transaction_read_only": "off",
                 "statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0",
                 # the role reader's connection lives between logins
                 "idle_session_timeout": "0",
                 # psycopg reads text only in UTF8 (SQL_ASCII gives bytes), timestamps and
                 # intervals only in these styles
                 "client_encoding": "UTF8", "DateStyle": "ISO", "IntervalStyle": "postgres",
                 "TimeZone": "UTC"}
ADMIN_OPTIONS = " ".join(f"-c {name}={value}" for name, value in ADMIN_SESSION.items())
# the same for settings older majors lack (a startup option they do not know fails the login):
# stored for the admin role itself (`keep_admin_settings`), which beats what a database's
# owner stores for every login (ALTER DATABASE ... SET): {name: (value, first server_version_num)}
ADMIN_ROLE_SETTINGS = {"transaction_timeout": ("0", 170000)}


def gateway_os_user() -> str:
    """The OS user name peer authentication sees for the gateway's own connections."""
    return pwd.getpwuid(os.geteuid()).pw_name


def hba(*, maintenance: bool = False) -> str:
    """pg_hba.conf: the gateway's roles by peer, everyone else by SCRAM; while a data directory
    is being secured, only the gateway's roles at all."""
    ours = f"{SETUP},{ADMIN}" if maintenance else f"{ADMIN},{AGENT}"
    rest = "reject" if maintenance else "scram-sha-256"
    # `all` never matches a replication connection: only the admin's WAL shipper
    # (gateway/compute/walship.py) may open one, whatever role attributes a tenant gets
    shipper = "" if maintenance else f"local replication {ADMIN} peer map={IDENT_MAP}\n"
    return ("# written by pgsni at every start: the gateway's roles log in by peer (only the\n"
            "# gateway's OS user), every other role with its SCRAM password\n"
            f"local all {ours} peer map={IDENT_MAP}\n"
            f"{shipper}"
            f"local all all {rest}\n")


def ident(os_user: str, *, maintenance: bool = False) -> str:
    roles = (SETUP, ADMIN) if maintenance else (ADMIN, AGENT)
    return "# written by pgsni at every start\n" + "".join(
        f"{IDENT_MAP} {os_user} {role}\n" for role in roles)


def secured(roles: dict[str, Role] | None) -> bool:
    """Whether saved role metadata shows the layout above: the gateway's admin is the superuser
    and every role's SUPERUSER attribute is known. Metadata saved by older versions of pgsni
    (whose clients logged in as a superuser `postgres`) does not."""
    if not roles:
        return False
    admin = roles.get(ADMIN)
    return admin is not None and admin.superuser is True and all(
        r.superuser is not None for r in roles.values())


def superusers(roles: dict[str, Role]) -> list[str]:
    return sorted(name for name, r in roles.items() if r.superuser and name != ADMIN)


def conninfo(socket_dir: Path, dbname: str = "postgres", *, act_as: str | None = None,
             user: str = ADMIN, app: str = "pgsni") -> str:
    """A libpq connection string to an instance: as the admin (or `user`, another superuser
    of the gateway's: SETUP while securing runs) with ADMIN_SESSION, or as the agent acting
    as role `act_as`. Every value is quoted, so a database name cannot add parameters."""
    if act_as and user != ADMIN:
        raise ValueError("act_as logs in as the agent, not as another user")
    return make_conninfo(host=str(socket_dir), user=AGENT if act_as else user, dbname=dbname,
                         application_name=app, connect_timeout=CONNECT_TIMEOUT,
                         options=f"-c role={act_as}" if act_as else ADMIN_OPTIONS)


async def connect(socket_dir: Path, dbname: str = "postgres", *, act_as: str | None = None,
                  user: str = ADMIN, app: str = "pgsni", autocommit: bool = True) -> psycopg.AsyncConnection:
    """The gateway's own connection to an instance (see `conninfo`)."""
    return await psycopg.AsyncConnection.connect(
        conninfo(socket_dir, dbname, act_as=act_as, user=user, app=app), autocommit=autocommit)


def tool_args(socket_dir: Path, dbname: str = "postgres", *, act_as: str | None = None) -> list[str]:
    """Connection arguments for pg_dump, pg_restore and psql. The database goes inside a
    quoted connection string: a bare -d holding "=" would be expanded, and its host= would
    win over -h."""
    return ["-d", conninfo(socket_dir, dbname, act_as=act_as), "--no-password"]


# VALID UNTIL 'infinity' is "never expires" and '-infinity' "always expired": Python has no
# such datetimes (psycopg refuses to load them), so they come as no limit and as year 1
_ROLE_COLUMNS = ("rolname, rolpassword, rolcanlogin, CASE WHEN rolvaliduntil = 'infinity' THEN NULL "
                 "WHEN rolvaliduntil = '-infinity' THEN timestamptz '0001-01-01 00:00:00+00' "
                 "ELSE rolvaliduntil END, rolsuper")
ROLE_QUERY = f"SELECT {_ROLE_COLUMNS} FROM pg_authid ORDER BY rolname"
ROLES_NAMED_QUERY = f"SELECT {_ROLE_COLUMNS} FROM pg_authid WHERE rolname = ANY(%s::text[]) ORDER BY rolname"


def from_rows(rows) -> dict[str, Role]:
    """Roles as saved beside a database, from ROLE_QUERY's rows (only SCRAM verifiers kept)."""
    roles = {}
    for name, password, can_login, valid_until, superuser in rows:
        verifier = password if password and password.startswith("SCRAM-SHA-256$") else None
        until = None
        if valid_until is not None and valid_until != dt.datetime.max.replace(tzinfo=dt.timezone.utc):
            until = valid_until.isoformat() if valid_until.year < 9999 else None
        roles[name] = Role(name, verifier, bool(can_login), until, bool(superuser))
    return roles


async def keep_admin_settings(conn: psycopg.AsyncConnection) -> None:
    """Store ADMIN_ROLE_SETTINGS for the admin role where the server has them and they are not
    stored yet (nothing is written otherwise: a start must not count as a change)."""
    wanted = [f"{name}={value}" for name, (value, since) in ADMIN_ROLE_SETTINGS.items()
              if conn.info.server_version >= since]
    if not wanted:
        return
    row = await (await conn.execute(
        "SELECT setconfig FROM pg_catalog.pg_db_role_setting WHERE setdatabase = 0 AND setrole = "
        "(SELECT oid FROM pg_catalog.pg_authid WHERE rolname = %s)", (ADMIN,))).fetchone()
    stored = set(row[0] or []) if row else set()
    for setting in wanted:
        if setting not in stored:
            name, value = setting.split("=", 1)
            await conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                sql.Identifier(ADMIN), sql.Identifier(name), sql.Literal(value)))


async def connect_reader(socket_dir: Path) -> psycopg.AsyncConnection:
    """The role reader's connection (see `connect`), which also stores the admin role's own
    settings in a database made before they existed."""
    conn = await connect(socket_dir, app="pgsni")
    try:
        await keep_admin_settings(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


ROLE_BATCH = 2000  # rows made into Roles between two turns of the event loop


async def read_roles(conn: psycopg.AsyncConnection) -> dict[str, Role]:
    """Every role of the instance `conn` is connected to, with its verifier. A tenant may have
    made any number (Postgres 16 on): they are converted a batch at a time, the event loop
    serving every other session in between."""
    cur = await conn.execute(ROLE_QUERY)
    roles: dict[str, Role] = {}
    while rows := await cur.fetchmany(ROLE_BATCH):
        roles.update(from_rows(rows))
        await asyncio.sleep(0)
    return roles


async def read_some_roles(conn: psycopg.AsyncConnection,
                          names: frozenset[str] | None) -> tuple[frozenset[str] | None, dict[str, Role]]:
    """(names, roles): the roles of `names` that exist, or every role (names None): the role
    reader's query (gateway/compute/role_reader.py)."""
    if names is None:
        return None, await read_roles(conn)
    return names, from_rows(await (await conn.execute(ROLES_NAMED_QUERY, (sorted(names),))).fetchall())
