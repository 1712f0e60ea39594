"""Test harness: a real gateway running in its own thread and event loop (uvloop), so tests
can drive it with blocking clients (psql, psycopg) and still look inside it."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import uvloop

from gateway.compute import dbroles
from gateway.config import Settings
from gateway.app import Gateway

DOMAIN = "db.example.com"
TEST_PASSWORD = "s3cret-test-pw"


class GatewayThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gw: Gateway | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            try:
                self.gw = Gateway(self.settings)
                await self.gw.start()
            except BaseException as e:
                self._ready.set_exception(e)
                return
            self._ready.set_result(None)
            await self.gw.serve_forever()

        uvloop.run(main())

    def start(self) -> "GatewayThread":
        self._thread.start()
        self._ready.result(timeout=60)
        return self

    def call(self, coro_fn, timeout: float = 60):
        """Run `coro_fn()` on the gateway's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.gw is not None and self.loop is not None and self._thread.is_alive():
            self.call(self.gw.shutdown)
        self._thread.join(timeout=30)

    @property
    def port(self) -> int:
        assert self.gw is not None
        return self.gw.port

    def create_db(self, db_id: str, password: str = TEST_PASSWORD, major: str | None = None) -> None:
        gw = self.gw
        assert gw is not None
        self.call(lambda: gw.instances.create(db_id, password, major=major))

    def admin_sql(self, db_id: str, sql: str, dbname: str = "postgres"):
        """Run `sql` as the gateway's own superuser on `db_id` (started if need be): what the
        operator can do and a tenant cannot (on Postgres 15 a tenant cannot create roles).
        Returns the rows, if the statement returns any."""
        gw = self.gw
        assert gw is not None

        async def run():
            inst = await gw.instances.acquire(db_id)
            try:
                async with await dbroles.connect(inst.socket_dir, dbname) as conn:
                    cur = await conn.execute(sql)
                    rows = await cur.fetchall() if cur.description else None
                return rows
            finally:
                gw.instances.release(inst)
        return self.call(run)

    def running(self) -> set[str]:
        assert self.gw is not None
        return set(self.gw.instances.instances)


def conninfo(port: int, ca: Path, db_id: str | None = "app1", *, password: str = TEST_PASSWORD,
             user: str = "postgres", **extra: str) -> str:
    host = f"host={db_id}.{DOMAIN} hostaddr=127.0.0.1" if db_id else "host=127.0.0.1"
    parts = [host, f"port={port}", f"user={user}", f"password={password}", "dbname=postgres",
             "sslmode=verify-full" if db_id else "sslmode=require", f"sslrootcert={ca}",
             "connect_timeout=20"]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def psql(dsn: str, sql: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, timeout=timeout)


def processes(program: bytes, path: Path) -> list[int]:
    """Pids of live processes whose executable ends with `program` and whose command line
    names `path`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(program) and str(path).encode() in argv:
            pids.append(int(proc.name))
    return pids


def postmasters(pgdata: Path) -> list[int]:
    """Pids of live postmasters whose command line names this PGDATA. A process a postmaster
    has just forked shows the same command line until Postgres renames it: one whose parent
    is among them is not counted."""
    pids = processes(b"/postgres", pgdata)
    return [pid for pid in pids if _parent(pid) not in pids]


def _parent(pid: int) -> int | None:
    return _stat_field(pid, 4)


def started_at(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if it is gone: with the pid,
    it names one process (pids are reused)."""
    return _stat_field(pid, 22)


def _stat_field(pid: int, number: int) -> int | None:
    """Field `number` (1-based, as proc(5) counts) of /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[number - 3])  # the name in parentheses may hold spaces


def connect_sqlstate(port: int, ca: Path, db_id: str, *, user: str = "postgres",
                     password: str = TEST_PASSWORD) -> str | None:
    """Try to connect with asyncpg (which reports the SQLSTATE of a refused login, unlike libpq);
    return the SQLSTATE, or None if the connection succeeded."""
    import ssl

    import asyncpg

    async def attempt() -> str | None:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                         database="postgres", ssl=ctx, timeout=30,
                                         server_settings={"options": f"endpoint={db_id}"})
        except asyncpg.PostgresError as e:
            return e.sqlstate
        await conn.close()
        return None

    return asyncio.run(attempt())


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `cond()` every 50 ms until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
