"""A database as pgsni made it before tenants lost SUPERUSER: initdb with bootstrap superuser
`postgres`, whatever that superuser did to it (`setup_sql`, run over a trust socket), its
password set, and roles.json written in the old format (no superuser attribute)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from gateway.wire.scram import scram_verifier
from storage.osuser import RunAs

from .pginstalls import install


def make_legacy_database(root: Path, db_id: str, password: str, setup_sql: str = "") -> Path:
    run_as = RunAs.resolve("postgres")
    bindir = install().bindir
    db_dir = run_as.make_dir(root / db_id)
    pgdata = db_dir / "pgdata"
    kw = dict(capture_output=True, text=True, check=True, **run_as.popen_kwargs())
    subprocess.run([str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"], cwd="/tmp", **kw)
    sock = run_as.make_dir(Path(tempfile.mkdtemp(prefix="pgsni-legacy-", dir="/tmp")))
    opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off"
    subprocess.run([str(bindir / "pg_ctl"), "-D", str(pgdata), "-o", opts, "-l",
                    str(db_dir / "postgres.log"), "-w", "start"], **kw)
    try:
        verifier = scram_verifier(password)
        # one session: setup_sql may stop later logins (session_preload_libraries, say)
        sql = (f"alter role postgres password '{verifier}';\n{setup_sql}\n"
               "select rolname, coalesce(rolpassword, ''), rolcanlogin from pg_authid;\n")
        rows = subprocess.run(["psql", "-h", str(sock), "-U", "postgres", "-d", "postgres", "-X", "-q",
                               "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1"], input=sql, **kw).stdout
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"], **kw)
        subprocess.run(["rm", "-rf", str(sock)], check=False)
    roles = []
    for line in rows.splitlines():
        name, secret, can_login = line.split("\t")
        roles.append({"name": name, "verifier": secret if secret.startswith("SCRAM-SHA-256$") else None,
                      "can_login": can_login == "t", "valid_until": None})
    (db_dir / "roles.json").write_text(json.dumps({"roles": roles}))
    (db_dir / "roles.json").chmod(0o600)
    (db_dir / "state.json").write_text(json.dumps({"version": None, "dirty": True, "running": False,
                                                   "last_used": 0.0}))
    return pgdata
