"""Postgres processes of databases: preparing and starting a postmaster on a local copy
(options, socket, cgroup, OS user, its file lock), stopping it, judging from pg_control whether
it wrote anything, and reading its roles. Nothing here decides when: the lifecycle
(gateway/compute/lifecycle.py) does, and records what happened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import time
from typing import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from gateway import errors
from gateway.config import SUPERUSER_RESERVE, Settings
from storage import roles as roles_mod
from storage.errors import StorageError
from storage.instance_uids import InstanceUids
from storage.local import LocalCatalog

from . import dbroles, extensions, pgbins, pgcontrol, securing, walship
from .cgroups import Cgroups, Limits
from .pgbins import PgNotInstalled
from .postgres import PostgresProcess, stop_orphan
from .role_reader import RoleReader
from .walship import WalShipper

log = logging.getLogger("pgsni.instances")


@dataclass(eq=False)
class Instance:
    db_id: str
    process: PostgresProcess
    lock: object
    clients: int = 0
    early: int = 0  # of `clients`, early logins whose client has not authenticated yet
    last_used: float = field(default_factory=time.monotonic)  # when a client last left
    roles: dict[str, roles_mod.Role] | None = None  # as last read
    reader: RoleReader | None = None  # fresh roles for every login (gateway/compute/role_reader.py)
    control: pgcontrol.Control | None = None  # pg_control before it started: nothing written since = nothing to save
    watcher: asyncio.Task | None = None
    started_at: float = field(default_factory=time.monotonic)  # when it became ready
    shipper: WalShipper | None = None  # streams its WAL to storage (durability=async)
    # its newest stored base: where a replay would start (an LSN) and since when (unix time);
    # a base backup is due by the WAL since (gateway/compute/basebackup.py)
    base_lsn: int | None = None
    base_at: float = field(default_factory=time.time)

    @property
    def in_use(self) -> bool:
        """Whether an authenticated client holds it: what keeps it from an idle stop or an
        eviction (a stranger's unauthenticated connections must not keep a database up)."""
        return self.clients > self.early

    @property
    def socket_dir(self) -> Path:
        return self.process.socket_dir

    @property
    def socket_path(self) -> Path:
        return self.process.socket_path

    @property
    def alive(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.returncode is None and not self.process.stopping


class Launcher:
    """Starts and stops the postmasters of one data root's databases."""

    def __init__(self, settings: Settings, catalog: LocalCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.installs = pgbins.for_settings(settings)  # each database runs with its own major's
        # instance_uid_base: each database's Postgres as its own OS user (storage/instance_uids.py)
        self.uids = InstanceUids(settings.instance_uid_base, settings.instance_uid_count,
                                 catalog) if settings.instance_uid_base else None
        # instance_memory_mb & co. (gateway/compute/cgroups.py): the groups are set up at the first start
        self.limits = Limits(settings.instance_memory_mb, settings.instance_cpu_weight,
                             settings.instance_max_pids)
        self._cgroups: Cgroups | None | bool = False  # False: not set up yet

    def make_socket_root(self) -> None:
        """The directory of the instances' socket directories; with instance uids, every uid
        must pass through it to its own."""
        self.catalog.run_as.make_dir(self.settings.socket_path, 0o711 if self.uids else 0o700)

    async def prepare(self, db_id: str, *, locked: bool = False) -> Instance:
        """An instance of `db_id`, not started yet: its file lock taken (refused while another
        process holds it; `locked`: the caller holds it already), a postmaster an earlier
        process left on the copy stopped, and pg_control read (to tell after the stop whether
        anything was written)."""
        lock = _HeldElsewhere() if locked else self.catalog.lock(db_id)
        try:
            lock.acquire()
        except StorageError as e:
            raise errors.GatewayError(errors.CANNOT_CONNECT_NOW, str(e),
                                      hint="Stop the other process or wait for it to finish.") from e
        s = self.settings
        try:
            install = self.installs.for_pgdata(self.catalog.pgdata(db_id))
        except PgNotInstalled as e:
            lock.release()
            raise errors.startup_failed(db_id, str(e)) from e
        options = {**extensions.instance_options(install, self.catalog.root, s.trusted_extensions),
                   **instance_connections(s), **s.postgres_options,
                   # after the operator's options: WAL shipping needs them whatever those say
                   **(walship.instance_options(s.wal_keep_mb) if s.durability != "snapshot" else {})}
        process = PostgresProcess(install.bindir, self.catalog.pgdata(db_id), s.socket_path / db_id,
                                  self.catalog.log_file(db_id), self.catalog.run_as, options)
        inst = Instance(db_id, process, lock)
        try:
            self.make_socket_root()
            process.cgroup = self._cgroup(db_id)
            if self.uids is not None:
                process.run_as = await asyncio.to_thread(self.uids.run_as, db_id)
            await stop_orphan(process.pgdata, s.stop_timeout)
            inst.control = await self.control(inst)
        except BaseException:
            self.abandon(inst)
            raise
        return inst

    async def launch(self, inst: Instance) -> None:
        """Start the prepared instance's postmaster and its role reader."""
        s = self.settings
        await inst.process.start(s.start_timeout)
        inst.started_at = time.monotonic()
        inst.reader = RoleReader(lambda: dbroles.connect_reader(inst.process.socket_dir), dbroles.read_some_roles,
                                 timeout=min(10.0, s.handshake_timeout / 2))
        # as saved at the last stop: a login reads its own role fresh, a stop all of them
        inst.roles = await asyncio.to_thread(self.catalog.roles, inst.db_id)

    @staticmethod
    def abandon(inst: Instance) -> None:
        """After a failed or cancelled start: nothing of it keeps running, and its lock is free
        (Postgres' own too: a postmaster killed between creating postmaster.pid and writing it
        leaves it empty, which the next start takes for a server starting and refuses; one
        with a dead pid in it is cleared by Postgres itself)."""
        inst.process.kill_group()
        lockfile = inst.process.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError):
            if lockfile.stat().st_size == 0:
                lockfile.unlink()
        inst.lock.release()

    async def halt(self, inst: Instance, *, read_roles: bool = True) -> None:
        """Stop the postmaster (fast shutdown), reading the roles first (saved beside the copy)
        unless its files are about to go. On failure the process group is killed. The file
        lock stays held: the caller records the stop first."""
        try:
            if inst.alive and read_roles:
                try:
                    await self.refresh_roles(inst)
                except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
                    log.warning("could not save roles of %s before stopping: %s", inst.db_id, e)
            if inst.reader is not None:
                await inst.reader.close()
            await inst.process.stop(self.settings.stop_timeout)
        except BaseException:
            inst.process.kill_group()
            raise

    async def control(self, inst: Instance) -> pgcontrol.Control | None:
        """The data directory's pg_control now (None if it cannot be read: then any stop
        counts as a change)."""
        try:
            return await asyncio.to_thread(pgcontrol.read, inst.process.bindir, inst.process.pgdata)
        except (pgcontrol.ControlError, OSError, subprocess.SubprocessError) as e:
            log.warning("could not read pg_control of %s: %s", inst.db_id, e)
            return None

    async def written(self, inst: Instance) -> bool:
        """Whether the instance wrote anything since it started, judged after it stopped."""
        if inst.control is None:
            return True
        after = await self.control(inst)
        if after is None:
            return True
        return await asyncio.to_thread(pgcontrol.written_between, inst.process.pgdata, inst.control, after)

    async def refresh_roles(self, inst: Instance,
                            names: Iterable[str] | None = None) -> dict[str, roles_mod.Role]:
        """Read roles now (those of `names` only, once a whole read was made since the start),
        saving them beside the database when they changed; returns them all as last read."""
        assert inst.reader is not None
        read, roles = await inst.reader.read(None if inst.roles is None else names)
        if read is None:
            changed = roles != inst.roles
        else:  # only what was read may have changed: no work that grows with every role
            changed = any(roles.get(name) != inst.roles.get(name) for name in read)
            if changed:
                roles = {**{k: v for k, v in inst.roles.items() if k not in read}, **roles}
        if changed:
            await asyncio.to_thread(self.catalog.save_roles, inst.db_id, roles)
            inst.roles = roles
        return inst.roles

    async def take_over(self, inst: Instance, verifier: str) -> None:
        """Give role postgres of a new database the SCRAM `verifier`, and read its roles."""
        try:
            async with await dbroles.connect(inst.socket_dir) as conn:
                # the verifier, not the password, goes to Postgres: the plaintext never leaves here
                await conn.execute(psycopg.sql.SQL("ALTER ROLE postgres PASSWORD {}").format(verifier))
            await self.refresh_roles(inst)
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise errors.GatewayError(errors.INTERNAL_ERROR, f'cannot set up role "postgres" in '
                                      f'database "{inst.db_id}": {reason}') from e

    async def secure_copy(self, db_id: str, drop_untrusted: bool = False) -> securing.Report:
        """Bring the stopped local copy to the roles layout (gateway/compute/securing.py)."""
        lock = self.catalog.lock(db_id).acquire()
        try:
            self.make_socket_root()
            return await securing.secure(
                self.installs.for_pgdata(self.catalog.pgdata(db_id)).bindir,
                self.catalog.pgdata(db_id), self.catalog.run_as,
                self.settings.socket_path / f"sec-{secrets.token_hex(4)}", self.catalog.log_file(db_id),
                options=self.settings.postgres_options, timeout=self.settings.start_timeout,
                drop_untrusted=drop_untrusted)
        finally:
            lock.release()

    async def stop_orphans(self) -> list[str]:
        """At start: stop postmasters an earlier gateway left running (it died without stopping
        them), before anything saves or restarts those databases. A database whose lock another
        live process holds (a CLI command) is left alone."""
        stopped = []
        for db_id in self.catalog.list():
            try:
                lock = self.catalog.lock(db_id).acquire()
            except StorageError:
                continue
            try:
                if await stop_orphan(self.catalog.pgdata(db_id), self.settings.stop_timeout):
                    stopped.append(db_id)
            finally:
                lock.release()
        return stopped

    def _cgroup(self, db_id: str):
        if self._cgroups is False:
            self._cgroups = Cgroups.setup(self.limits)
        return self._cgroups.group(db_id) if self._cgroups else None


class _HeldElsewhere:
    """The file lock of a copy its caller already holds."""

    def acquire(self) -> "_HeldElsewhere":
        return self

    def release(self) -> None:
        pass


async def exited(inst: Instance, wait: float = 5.0) -> bool:
    """After a login found the instance's socket gone or refusing: whether its postmaster
    has exited, waiting up to `wait` for it (one on its way out removes its socket first,
    and the loop may not have seen the exit yet)."""
    proc = inst.process.proc
    if proc is None:
        return True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), wait)
        return True
    return False


POSTGRES_DEFAULT_CONNECTIONS = 100  # never fewer than Postgres would allow on its own


def instance_connections(s: Settings) -> dict[str, str]:
    """Postgres' max_connections sized so that every client the gateway admits to one
    database gets a backend (the gateway's own connections use the superuser reserve)."""
    if s.max_connections_per_db <= 0:
        return {}
    return {"max_connections": str(max(POSTGRES_DEFAULT_CONNECTIONS, s.max_connections_per_db + SUPERUSER_RESERVE))}
