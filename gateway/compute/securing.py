"""Bring any stopped data directory to the roles layout of gateway/compute/dbroles.py: the template
right after initdb, an imported archive, or a database made by an older pgsni whose clients
logged in as the superuser `postgres` (`pgsni db secure`). Idempotent; nothing is deleted
unless `drop_untrusted` asks for it.

1. Single-user mode, as the bootstrap superuser: create `pgsni_setup` (superuser, peer only).
2. A maintenance server on a private socket whose pg_hba.conf admits only the gateway's roles.
3. As `pgsni_setup`: disable event triggers (they would run inside the gateway's superuser
   sessions); look for what would let a non-superuser reach the operating system or hide code
   where a superuser's query finds it (routines in untrusted languages, languages not from an
   extension, file_fdw tables, routines and operators a user put in pg_catalog, casts between
   built-in types) and refuse, or drop them; then rename the bootstrap superuser to
   `pgsni_admin`.
4. As `pgsni_admin`: create or demote the tenant role `postgres` (a renamed `postgres` hands
   its password and memberships to the new one), demote every other superuser, revoke the
   roles that read or write server files or run programs from everyone, create the agent;
   in every database give the tenant what the old superuser owned (schemas, tables, routines,
   types, ...); reset settings stored for roles and databases that a non-superuser could not
   set (session_preload_libraries, say); check the result.
5. Drop `pgsni_setup` and stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from storage.osuser import RunAs, clean_env

from . import dbroles
from .dbroles import ADMIN, AGENT, SETUP, TENANT
from .postgres import PostgresError, PostgresProcess, safe_settings

log = logging.getLogger("pgsni.securing")

# what the tenant role is a member of: none of these reads server files or runs programs
# (checked against the predefined-roles docs of Postgres 15 to 18); granted where they exist
TENANT_ROLES = ("pg_read_all_data", "pg_write_all_data", "pg_monitor", "pg_signal_backend",
                "pg_read_all_settings", "pg_checkpoint")
# never granted to anyone but the superuser
OS_ROLES = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")
FIRST_USER_OID = 16384  # objects below this were made by initdb


class SecureError(Exception):
    """The data directory cannot be brought to the layout; the message says why and what to do."""


@dataclass
class Report:
    renamed: str | None = None  # the bootstrap superuser's former name
    created_tenant: bool = False
    demoted: list[str] = field(default_factory=list)  # roles that lost SUPERUSER
    revoked: list[str] = field(default_factory=list)  # "role from member"
    transferred: int = 0  # objects given to the tenant role
    dropped: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)  # event triggers (they run as whoever does DDL)
    settings_reset: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # what could not be changed, and why

    @property
    def changed_roles(self) -> bool:
        return bool(self.renamed or self.created_tenant or self.demoted or self.revoked)


# --- what a non-superuser could use to reach the operating system -----------------------------
_SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema')"
UNTRUSTED_QUERY = f"""
SELECT min(what), stmt FROM (
SELECT format('routine %s in language %s', p.oid::regprocedure, l.lanname) AS what,
       format('DROP ROUTINE %s', p.oid::regprocedure) AS stmt
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE NOT l.lanpltrusted AND p.oid >= {FIRST_USER_OID}
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                   AND d.objid = p.oid AND d.deptype = 'e')
UNION ALL
SELECT format('routine %s in schema %I', p.oid::regprocedure, n.nspname),
       format('DROP ROUTINE %s', p.oid::regprocedure)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname IN {_SYSTEM_SCHEMAS} AND p.oid >= {FIRST_USER_OID}
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                   AND d.objid = p.oid AND d.deptype = 'e')
UNION ALL
SELECT format('operator %s in schema pg_catalog', o.oid::regoperator),
       format('DROP OPERATOR %s', o.oid::regoperator)
  FROM pg_operator o
 WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oid >= {FIRST_USER_OID}
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_operator'::regclass
                   AND d.objid = o.oid AND d.deptype = 'e')
UNION ALL
SELECT format('cast from %s to %s', c.castsource::regtype, c.casttarget::regtype),
       format('DROP CAST (%s AS %s)', c.castsource::regtype, c.casttarget::regtype)
  FROM pg_cast c
 WHERE c.oid >= {FIRST_USER_OID} AND c.castsource < {FIRST_USER_OID} AND c.casttarget < {FIRST_USER_OID}
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_cast'::regclass
                   AND d.objid = c.oid AND d.deptype = 'e')
UNION ALL
SELECT format('language %I', l.lanname), format('DROP LANGUAGE %I', l.lanname)
  FROM pg_language l
 WHERE l.oid >= {FIRST_USER_OID}
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_language'::regclass
                   AND d.objid = l.oid AND d.deptype = 'e')
UNION ALL
SELECT format('file_fdw table %s', c.oid::regclass), format('DROP FOREIGN TABLE %s', c.oid::regclass)
  FROM pg_foreign_table t JOIN pg_class c ON c.oid = t.ftrelid
  JOIN pg_foreign_server s ON s.oid = t.ftserver JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
 WHERE w.fdwname = 'file_fdw'
) found GROUP BY stmt ORDER BY 1
"""

# --- what the bootstrap superuser owned that is the tenant's --------------------------------
_SYSTEM = ("SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema') "
           "OR nspname LIKE 'pg\\_toast%' OR nspname LIKE 'pg\\_temp\\_%'")


def _not_extension_member(catalog: str, alias: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
            f"AND d.objid = {alias}.oid AND d.deptype = 'e')")


TRANSFER_QUERY = f"""
SELECT format('ALTER SCHEMA %I OWNER TO {TENANT}', n.nspname) FROM pg_namespace n
 WHERE n.nspowner = 10 AND n.oid NOT IN ({_SYSTEM}) AND {_not_extension_member('pg_namespace', 'n')}
UNION ALL
SELECT format('ALTER %s %s OWNER TO {TENANT}', CASE c.relkind WHEN 'S' THEN 'SEQUENCE'
              WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, c.oid::regclass)
  FROM pg_class c
 WHERE c.relowner = 10 AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND c.oid >= {FIRST_USER_OID}
   AND c.relnamespace NOT IN ({_SYSTEM}) AND {_not_extension_member('pg_class', 'c')}
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
            AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT format('ALTER %s %s OWNER TO {TENANT}', CASE p.prokind WHEN 'a' THEN 'AGGREGATE'
              WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, p.oid::regprocedure)
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.proowner = 10 AND p.oid >= {FIRST_USER_OID} AND l.lanpltrusted
   AND p.pronamespace NOT IN ({_SYSTEM}) AND {_not_extension_member('pg_proc', 'p')}
UNION ALL
SELECT format('ALTER %s %s OWNER TO {TENANT}', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
              t.oid::regtype)
  FROM pg_type t
 WHERE t.typowner = 10 AND t.oid >= {FIRST_USER_OID} AND t.typnamespace NOT IN ({_SYSTEM})
   AND (t.typtype IN ('d', 'e', 'r')
        OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
   AND {_not_extension_member('pg_type', 't')}
UNION ALL
SELECT format('ALTER COLLATION %I.%I OWNER TO {TENANT}', n.nspname, o.collname)
  FROM pg_collation o JOIN pg_namespace n ON n.oid = o.collnamespace
 WHERE o.collowner = 10 AND o.oid >= {FIRST_USER_OID} AND {_not_extension_member('pg_collation', 'o')}
UNION ALL
SELECT format('ALTER CONVERSION %I.%I OWNER TO {TENANT}', n.nspname, o.conname)
  FROM pg_conversion o JOIN pg_namespace n ON n.oid = o.connamespace
 WHERE o.conowner = 10 AND o.oid >= {FIRST_USER_OID} AND {_not_extension_member('pg_conversion', 'o')}
UNION ALL
SELECT format('ALTER OPERATOR %s OWNER TO {TENANT}', o.oid::regoperator) FROM pg_operator o
 WHERE o.oprowner = 10 AND o.oid >= {FIRST_USER_OID} AND {_not_extension_member('pg_operator', 'o')}
UNION ALL
SELECT format('ALTER TEXT SEARCH CONFIGURATION %s OWNER TO {TENANT}', o.oid::regconfig)
  FROM pg_ts_config o
 WHERE o.cfgowner = 10 AND o.oid >= {FIRST_USER_OID} AND {_not_extension_member('pg_ts_config', 'o')}
UNION ALL
SELECT format('ALTER TEXT SEARCH DICTIONARY %s OWNER TO {TENANT}', o.oid::regdictionary)
  FROM pg_ts_dict o
 WHERE o.dictowner = 10 AND o.oid >= {FIRST_USER_OID} AND {_not_extension_member('pg_ts_dict', 'o')}
UNION ALL
SELECT format('ALTER STATISTICS %I.%I OWNER TO {TENANT}', n.nspname, o.stxname)
  FROM pg_statistic_ext o JOIN pg_namespace n ON n.oid = o.stxnamespace
 WHERE o.stxowner = 10
UNION ALL
SELECT format('ALTER PUBLICATION %I OWNER TO {TENANT}', o.pubname) FROM pg_publication o
 WHERE o.pubowner = 10
UNION ALL
SELECT format('ALTER LARGE OBJECT %s OWNER TO {TENANT}', o.oid) FROM pg_largeobject_metadata o
 WHERE o.lomowner = 10
UNION ALL
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE {TENANT} %s GRANT %s ON %s TO %s%s',
              CASE WHEN d.defaclnamespace = 0 THEN '' ELSE format('IN SCHEMA %I', n.nspname) END,
              a.privilege_type,
              CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES'
                   WHEN 'f' THEN 'FUNCTIONS' WHEN 'T' THEN 'TYPES' ELSE 'SCHEMAS' END,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
              CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
  FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
       CROSS JOIN LATERAL aclexplode(d.defaclacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE d.defaclrole = 10 AND a.grantee <> 10
"""

SETTINGS_QUERY = """
SELECT coalesce(d.datname, ''), coalesce(r.rolname, ''), s.setrole = 10, cfg,
       coalesce((SELECT context FROM pg_settings WHERE name = lower(split_part(cfg, '=', 1))), 'user')
  FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase
       LEFT JOIN pg_authid r ON r.oid = s.setrole, unnest(s.setconfig) cfg
"""


# one line (single-user mode ends a statement at a newline). A pgsni_setup left by a securing
# that was interrupted is a superuser with no settings (nobody else can give a role SUPERUSER
# or change a superuser's settings); any other was made by someone else (a tenant with
# CREATEROLE, an archive's superuser), with settings and memberships they chose: never used.
SETUP_SCRIPT = (
    f"DO $$BEGIN IF EXISTS (SELECT FROM pg_catalog.pg_authid WHERE rolname = '{SETUP}' AND NOT "
    f"rolsuper) THEN RAISE EXCEPTION 'a role named {SETUP} exists that was not made by pgsni (it is "
    f"not a superuser); the gateway uses that name while it secures a database: rename the role "
    f"(ALTER ROLE {SETUP} RENAME TO another_name) and try again'; END IF; IF NOT EXISTS (SELECT "
    f"FROM pg_catalog.pg_authid WHERE rolname = '{SETUP}') THEN CREATE ROLE {SETUP} SUPERUSER "
    f"LOGIN; END IF; END$$;\n")


async def secure(bindir: Path, pgdata: Path, run_as: RunAs, socket_dir: Path, log_path: Path, *,
                 options: dict[str, str] | None = None, timeout: float = 30.0,
                 drop_untrusted: bool = False) -> Report:
    """Bring the stopped data directory `pgdata` to the layout (see the module docstring). On
    failure the data directory may be half changed: callers discard it (a build, an import)
    or put the stored version back (`db secure`)."""
    major = int((pgdata / "PG_VERSION").read_text().strip().split(".")[0])
    await asyncio.to_thread(_single_user, bindir, pgdata, run_as, options or {}, SETUP_SCRIPT)
    process = PostgresProcess(bindir, pgdata, socket_dir, log_path, run_as, options or {},
                              maintenance=True)
    report = Report()
    try:
        await process.start(timeout)
        async with await _connect(socket_dir, SETUP) as setup:
            databases = [r[0] for r in await _rows(setup, "SELECT datname FROM pg_database "
                                                          "WHERE datallowconn ORDER BY datname")]
            await _disable_event_triggers(socket_dir, databases, report)
            await _untrusted(socket_dir, databases, drop_untrusted, report)
            old_name, verifier = await _rename_bootstrap(setup, report)
        async with await _connect(socket_dir, ADMIN) as admin:
            await _roles(admin, old_name, verifier, major, report)
            for dbname in databases:
                async with await _connect(socket_dir, ADMIN, dbname) as conn:
                    await _transfer(conn, dbname, report)
            await _settings(admin, report)
            await dbroles.keep_admin_settings(admin)
            await _check(admin)
            await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(SETUP)))
    except (psycopg.Error, PostgresError) as e:
        raise SecureError(f"securing {pgdata} failed: {_first_line(e)}") from e
    finally:
        await process.stop(timeout)
        await asyncio.to_thread(_remove_socket_dir, socket_dir)
    log.info("secured %s: %s", pgdata, _summary(report))
    return report


def _summary(r: Report) -> str:
    parts = [f"bootstrap superuser {r.renamed!r} renamed to {ADMIN}"] if r.renamed else []
    parts += [f"demoted {', '.join(r.demoted)}"] if r.demoted else []
    parts += [f"{r.transferred} objects given to {TENANT}"] if r.transferred else []
    parts += [f"dropped {len(r.dropped)}"] if r.dropped else []
    parts += [f"disabled {len(r.disabled)} event triggers"] if r.disabled else []
    parts += [f"{len(r.left)} left as they were"] if r.left else []
    return "; ".join(parts) or "already in the layout"


# --- the steps ---------------------------------------------------------------------------------
def _single_user(bindir: Path, pgdata: Path, run_as: RunAs, options: dict[str, str], script: str) -> None:
    """Run `script` in single-user mode (no socket at all) as the bootstrap superuser."""
    argv = [str(bindir / "postgres"), "--single", "-D", str(pgdata)]
    for name, value in {**safe_settings(pgdata), **options}.items():
        argv += ["-c", f"{name}={value}"]
    proc = subprocess.run([*argv, "template1"], input=script, capture_output=True, text=True,
                          env=clean_env(), **run_as.popen_kwargs())
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "ERROR:" in output or "FATAL:" in output:
        problem = [ln for ln in output.splitlines() if "ERROR" in ln or "FATAL" in ln] or [output[-300:]]
        raise SecureError(f"single-user mode on {pgdata} failed: {problem[0].strip()}")


async def _connect(socket_dir: Path, user: str, dbname: str = "postgres") -> psycopg.AsyncConnection:
    return await dbroles.connect(socket_dir, dbname, user=user, app="pgsni secure")


async def _rows(conn: psycopg.AsyncConnection, query, params=None) -> list[tuple]:
    return await (await conn.execute(query, params)).fetchall()


async def _disable_event_triggers(socket_dir: Path, databases: list[str], report: Report) -> None:
    """Before any DDL: an event trigger a former superuser made would run its function inside
    the gateway's superuser sessions. Only superusers make event triggers; none run from now."""
    for dbname in databases:
        async with await _connect(socket_dir, SETUP, dbname) as conn:
            for (name,) in await _rows(conn, "SELECT evtname FROM pg_event_trigger WHERE evtenabled <> 'D'"):
                await conn.execute(sql.SQL("ALTER EVENT TRIGGER {} DISABLE").format(sql.Identifier(name)))
                report.disabled.append(f"event trigger {name} in database {dbname}")


async def _untrusted(socket_dir: Path, databases: list[str], drop: bool, report: Report) -> None:
    found: list[tuple[str, str, str]] = []
    for dbname in databases:
        async with await _connect(socket_dir, SETUP, dbname) as conn:
            found += [(dbname, what, stmt) for what, stmt in await _rows(conn, UNTRUSTED_QUERY)]
    if not found:
        return
    listing = "; ".join(f"{what} in database {db}" for db, what, _ in found[:10])
    if len(found) > 10:
        listing += f"; and {len(found) - 10} more"
    if not drop:
        raise SecureError(
            f"it holds what only a superuser may create and what would let its tenant run programs "
            f"or read files on the server: {listing}. Remove them from the source, or pass "
            f"--drop-untrusted to drop them (nothing that depends on them is dropped: that fails)")
    for dbname, what, stmt in found:
        async with await _connect(socket_dir, SETUP, dbname) as conn:
            try:
                await conn.execute(stmt)
            except psycopg.Error as e:
                raise SecureError(f"cannot drop {what} in database {dbname}: {_first_line(e)}") from e
        report.dropped.append(f"{what} in database {dbname}")


async def _rename_bootstrap(setup: psycopg.AsyncConnection, report: Report) -> tuple[str, str | None]:
    """Rename the bootstrap superuser to pgsni_admin; return its old name and SCRAM verifier."""
    (name, password), = await _rows(setup, "SELECT rolname, rolpassword FROM pg_authid WHERE oid = 10")
    verifier = password if password and password.startswith("SCRAM-SHA-256$") else None
    if name == ADMIN:
        return name, verifier
    if await _rows(setup, "SELECT 1 FROM pg_authid WHERE rolname = %s", (ADMIN,)):
        raise SecureError(f'it has a role named "{ADMIN}" that is not its bootstrap superuser; '
                          "rename that role first")
    await setup.execute(sql.SQL("ALTER ROLE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(ADMIN)))
    report.renamed = name
    return name, verifier


async def _roles(admin: psycopg.AsyncConnection, old_name: str, verifier: str | None, major: int,
                 report: Report) -> None:
    ident = sql.Identifier
    await admin.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(ident(ADMIN)))
    if not await _rows(admin, "SELECT 1 FROM pg_authid WHERE rolname = %s", (TENANT,)):
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident(TENANT)))
        report.created_tenant = True
        if old_name == TENANT:  # the tenant was the bootstrap superuser: it keeps its password
            if verifier:
                await admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident(TENANT), verifier))
            for role, admin_option in await _rows(admin, (
                    "SELECT r.rolname, m.admin_option FROM pg_auth_members m JOIN pg_authid r "
                    "ON r.oid = m.roleid WHERE m.member = 10 AND NOT r.rolname = ANY(%s)"), (list(OS_ROLES),)):
                grant = "GRANT {} TO {} WITH ADMIN OPTION" if admin_option else "GRANT {} TO {}"
                await admin.execute(sql.SQL(grant).format(ident(role), ident(TENANT)))
    createrole = "CREATEROLE" if major >= 16 else "NOCREATEROLE"  # 15: CREATEROLE grants any role
    await admin.execute(sql.SQL(f"ALTER ROLE {{}} WITH NOSUPERUSER LOGIN INHERIT CREATEDB {createrole} "
                                "NOREPLICATION BYPASSRLS").format(ident(TENANT)))
    for (name,) in await _rows(admin, "SELECT rolname FROM pg_authid WHERE rolsuper AND oid <> 10 "
                                      "AND rolname <> %s ORDER BY rolname", (SETUP,)):
        await admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(ident(name)))
        report.demoted.append(name)
    for role, member, grantor in await _rows(admin, (
            "SELECT r.rolname, m2.rolname, g.rolname FROM pg_auth_members m "
            "JOIN pg_authid r ON r.oid = m.roleid JOIN pg_authid m2 ON m2.oid = m.member "
            "JOIN pg_authid g ON g.oid = m.grantor WHERE r.rolname = ANY(%s) AND m.member <> 10"),
            (list(OS_ROLES),)):
        await admin.execute(sql.SQL("REVOKE {} FROM {} GRANTED BY {}").format(
            ident(role), ident(member), ident(grantor)))
        report.revoked.append(f"{role} from {member}")
    present = {r[0] for r in await _rows(admin, "SELECT rolname FROM pg_authid WHERE rolname = ANY(%s)",
                                         (list(TENANT_ROLES),))}
    for role in TENANT_ROLES:
        if role in present:
            await admin.execute(sql.SQL("GRANT {} TO {}").format(ident(role), ident(TENANT)))
    await _agent(admin)
    if await _rows(admin, "SELECT 1 FROM pg_database WHERE datname = 'postgres'"):
        await admin.execute(sql.SQL("ALTER DATABASE postgres OWNER TO {}").format(ident(TENANT)))


async def _agent(admin: psycopg.AsyncConnection) -> None:
    """The agent: a member of the tenant role and of nothing else, with no rights of its own."""
    ident = sql.Identifier
    if not await _rows(admin, "SELECT 1 FROM pg_authid WHERE rolname = %s", (AGENT,)):
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT").format(ident(AGENT)))
    await admin.execute(sql.SQL("ALTER ROLE {} WITH NOSUPERUSER LOGIN NOINHERIT NOCREATEDB NOCREATEROLE "
                                "NOREPLICATION NOBYPASSRLS PASSWORD NULL").format(ident(AGENT)))
    for (role,) in await _rows(admin, (
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_authid r ON r.oid = m.roleid "
            "JOIN pg_authid a ON a.oid = m.member WHERE a.rolname = %s AND r.rolname <> %s"), (AGENT, TENANT)):
        await admin.execute(sql.SQL("REVOKE {} FROM {}").format(ident(role), ident(AGENT)))
    await admin.execute(sql.SQL("GRANT {} TO {}").format(ident(TENANT), ident(AGENT)))


async def _transfer(conn: psycopg.AsyncConnection, dbname: str, report: Report) -> None:
    """In one database: what the bootstrap superuser owned becomes the tenant's. A statement
    that fails is reported and skipped (in a savepoint), not fatal."""
    if dbname == "postgres":
        await conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(TENANT)))
    statements = [r[0] for r in await _rows(conn, TRANSFER_QUERY)]
    if dbname not in ("template1",):
        owned = await _rows(conn, "SELECT datdba = 10 FROM pg_database WHERE datname = %s", (dbname,))
        if owned and owned[0][0]:
            statements.append(f"ALTER DATABASE {sql.Identifier(dbname).as_string(conn)} OWNER TO {TENANT}")
    for statement in statements:
        try:
            async with conn.transaction():
                await conn.execute(statement)
            report.transferred += 1
        except psycopg.Error as e:
            report.left.append(f"{statement} (database {dbname}): {_first_line(e)}")


async def _settings(admin: psycopg.AsyncConnection, report: Report) -> None:
    """Reset settings stored for roles and databases that the tenant could not set itself (a
    superuser-only one like session_preload_libraries would apply to its logins), and those of
    the former superuser, which are now pgsni_admin's."""
    ours = {f"{name}={value}" for name, (value, _) in dbroles.ADMIN_ROLE_SETTINGS.items()}
    for dbname, rolname, was_bootstrap, cfg, context in await _rows(admin, SETTINGS_QUERY):
        name = cfg.split("=", 1)[0]
        if context == "user" and not was_bootstrap:
            continue
        if was_bootstrap and not dbname and cfg in ours:
            continue  # the gateway's own (dbroles.keep_admin_settings)
        target = (sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(rolname), sql.Identifier(dbname))
                  if rolname and dbname else
                  sql.SQL("ALTER ROLE {}").format(sql.Identifier(rolname)) if rolname else
                  sql.SQL("ALTER DATABASE {}").format(sql.Identifier(dbname)) if dbname else
                  sql.SQL("ALTER ROLE ALL"))
        await admin.execute(target + sql.SQL(" RESET {}").format(sql.SQL(".").join(
            sql.Identifier(part) for part in name.split("."))))
        who = " ".join(w for w in (f"role {rolname}" if rolname else "", f"database {dbname}" if dbname else "") if w)
        report.settings_reset.append(f"{cfg} ({who or 'all'})")


async def _check(admin: psycopg.AsyncConnection) -> None:
    """The layout holds, or securing failed."""
    supers = [r[0] for r in await _rows(admin, "SELECT rolname FROM pg_authid WHERE rolsuper AND "
                                               "oid <> 10 AND rolname <> %s", (SETUP,))]
    (name,), = await _rows(admin, "SELECT rolname FROM pg_authid WHERE oid = 10")
    os_members = await _rows(admin, "SELECT 1 FROM pg_auth_members m JOIN pg_authid r ON r.oid = m.roleid "
                                    "WHERE r.rolname = ANY(%s) AND m.member <> 10", (list(OS_ROLES),))
    agent = await _rows(admin, "SELECT pg_has_role(%s, %s, 'MEMBER')", (AGENT, TENANT))
    if supers or name != ADMIN or os_members or agent != [(True,)]:
        raise SecureError(f"the roles are not as expected after securing (superusers {supers}, "
                          f"bootstrap {name!r}, members of {OS_ROLES}: {len(os_members)})")


def _remove_socket_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
