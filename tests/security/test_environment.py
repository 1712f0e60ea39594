"""At run time: with secrets in the gateway's environment, no process the gateway starts for
a database (postmaster, its backends and helpers) holds any of them."""

from __future__ import annotations

import os
from pathlib import Path

from ..support.harness import conninfo, psql

SECRETS = {"PGSNI_ADMIN_TOKEN": "tok-SECRET-1", "PGSNI_S3_SECRET_KEY": "s3-SECRET-2",
           "AWS_SECRET_ACCESS_KEY": "aws-SECRET-3", "PGHOST": "/redirected"}


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Postgres children start sessions of their own, so
    the parent links are followed, not the session id)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])  # field 4 of stat: the parent pid
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_instances_inherit_nothing_from_the_gateway(monkeypatch, start_gateway, tls):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    gt = start_gateway()
    gt.create_db("app1")
    dsn = conninfo(gt.port, tls["ca"], "app1")
    assert psql(dsn, "select 1").stdout.strip() == "1"
    inst = gt.gw.instances.instances["app1"]
    pids = descendants(inst.process.pid)
    assert inst.process.pid in pids and len(pids) >= 4  # postmaster, checkpointer, walwriter...
    for pid in pids:
        try:
            env = environ(pid)
        except (ProcessLookupError, FileNotFoundError):
            assert pid != inst.process.pid
            continue  # a backend that ended meanwhile
        leaked = {k for k in env if k in SECRETS or k.startswith(("PGSNI_", "AWS_"))}
        assert not leaked, f"pid {pid} inherited {sorted(leaked)}"
        assert not any("SECRET" in v for v in env.values())
    assert os.environ["PGSNI_ADMIN_TOKEN"] == SECRETS["PGSNI_ADMIN_TOKEN"]  # the gateway had them
