"""The local data root: `<root>/<id>/` per database, holding `pgdata/` (owned by the Postgres
user, 0700), `roles.json` and `postgres.log`. New databases are cloned from a template
PGDATA, made once by the maker the gateway hands in (gateway/compute/template.py); creation and
deletion are atomic renames."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator, Protocol

from . import roles as roles_mod
from .atomic import fsync_dir, sync_tree, write_atomic, write_temp
from .errors import CopyError, DiskFull, StorageError, disk_full_as
from .ids import valid_id
from .osuser import RunAs, clean_env

TEMPLATE = "_template"  # <root>/_template-<major>/pgdata: one template per Postgres major
LAYOUT_FILE = "layout"  # <root>/_template-<major>/layout: which maker layout it was made for
SPARE = ".spare-"  # <root>/.spare-<major>-<token>/pgdata: a ready copy of a template
IDENTITY_FILE = ".gateway-id"  # this root's name as a lease holder (a dot: never a database id)


class TemplateMaker(Protocol):
    layout: str  # a template made for another layout is made again
    default_major: str  # the major of new databases unless one is asked for

    def __call__(self, pgdata: Path, major: str) -> None:
        """Make a template data directory of Postgres `major` at `pgdata` (its parent exists;
        it does not)."""


class DatabaseExists(StorageError):
    pass


def _already_exists(db_id: str) -> DatabaseExists:
    return DatabaseExists(f'database "{db_id}" already exists')


class DatabaseBusy(StorageError):
    pass


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a data directory with `cp -a --reflink=auto` (modes and ownership kept, blocks
    shared where the file system can, faster than a Python tree walk), spawned with
    clean_env(). `dst` must not exist. Raises CopyError."""
    done = subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)],
                          capture_output=True, text=True, errors="replace", env=clean_env())
    if done.returncode != 0:
        said = done.stderr.strip()
        raise CopyError(said.splitlines()[-1] if said else f"exit {done.returncode}", said,
                        disk_full="No space left" in said or "Disk quota" in said)


class LocalCatalog:
    def __init__(self, root: Path, run_as: RunAs, template_maker: TemplateMaker | None = None) -> None:
        self.root = root.absolute()
        self.run_as = run_as
        self.template_maker = template_maker

    # --- layout ---------------------------------------------------------------------------
    def db_dir(self, db_id: str) -> Path:
        if not valid_id(db_id):  # never build a path from an unchecked id
            raise StorageError(f"invalid database id {db_id!r}")
        return self.root / db_id

    def pgdata(self, db_id: str) -> Path:
        return self.db_dir(db_id) / "pgdata"

    def roles_file(self, db_id: str) -> Path:
        return self.db_dir(db_id) / "roles.json"

    def log_file(self, db_id: str) -> Path:
        return self.db_dir(db_id) / "postgres.log"

    def lock_file(self, db_id: str) -> Path:
        return self.db_dir(db_id) / "instance.lock"

    def prepare(self) -> None:
        self.run_as.check_reachable(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711 if self.run_as.switches_user else 0o700)

    def identity(self) -> str:
        """This data root's name as a lease holder: kept in `<root>/.gateway-id`, so a gateway
        restarted on the same data root is the same holder (see storage/leases.py). Older
        versions kept it in `gateway-id`, which is also a valid database id: moved over."""
        path = self.root / IDENTITY_FILE
        with contextlib.suppress(FileNotFoundError):
            return path.read_text().strip()
        old = self.root / "gateway-id"
        if old.is_file() and not old.is_symlink():
            with contextlib.suppress(FileExistsError):
                os.link(old, path)  # another process of this root may have moved it already
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
            fsync_dir(self.root)
            return path.read_text().strip()
        name = f"{socket.gethostname().split('.')[0][:40] or 'gateway'}-{secrets.token_hex(4)}"
        tmp, _ = write_temp(path, name.encode())
        try:
            os.link(tmp, path)  # fails if another process named this root first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_text().strip()

    # --- queries ----------------------------------------------------------------------------
    def exists(self, db_id: str) -> bool:
        return (self.pgdata(db_id) / "PG_VERSION").is_file()

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if valid_id(p.name) and self.exists(p.name))

    def roles(self, db_id: str) -> dict[str, roles_mod.Role] | None:
        return roles_mod.load(self.roles_file(db_id))

    def save_roles(self, db_id: str, roles: dict[str, roles_mod.Role]) -> None:
        roles_mod.save(self.roles_file(db_id), roles)

    # --- template ---------------------------------------------------------------------------
    def _maker(self) -> TemplateMaker:
        if self.template_maker is None:
            raise StorageError("no template maker: this catalog cannot make new databases")
        return self.template_maker

    def template(self, major: str | None = None) -> Path:
        """PGDATA of the template for Postgres `major` (default: the maker's), made once by the
        template maker (about a second)."""
        major = major or self._maker().default_major
        tpl_dir = self.root / f"{TEMPLATE}-{major}"
        if self._template_ready(tpl_dir):
            return tpl_dir / "pgdata"
        self.prepare()
        with self._flock(self.root / ".template.lock"):
            if self._template_ready(tpl_dir):
                return tpl_dir / "pgdata"
            work = self.root / f".{TEMPLATE}-{secrets.token_hex(4)}"
            self.run_as.make_dir(work)
            try:
                self._maker()(work / "pgdata", major)
                write_atomic(work / LAYOUT_FILE, self._maker().layout.encode())
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            shutil.rmtree(tpl_dir, ignore_errors=True)
            shutil.rmtree(self.root / TEMPLATE, ignore_errors=True)  # from before one per major
            os.rename(work, tpl_dir)
        return tpl_dir / "pgdata"

    def _template_ready(self, tpl_dir: Path) -> bool:
        if not (tpl_dir / "pgdata" / "PG_VERSION").is_file():
            return False
        if self.template_maker is None:  # a catalog that only clones takes what is there
            return True
        try:
            return (tpl_dir / LAYOUT_FILE).read_text().strip() == self.template_maker.layout
        except OSError:
            return False

    # --- lifecycle --------------------------------------------------------------------------
    def create(self, db_id: str, major: str | None = None) -> Path:
        """Clone the template of Postgres `major` (default: the maker's) into
        `<root>/<id>/pgdata`; atomic: a half-made copy never shows."""
        major = major or self._maker().default_major
        if self._take_spare(db_id, major):
            return self.pgdata(db_id)
        with disk_full_as(f'creating database "{db_id}"'), self.staging(db_id) as pgdata:
            try:
                copy_tree(self.template(major), pgdata)
            except CopyError as e:
                if e.disk_full:
                    raise DiskFull(f'no space left on the data root for creating database "{db_id}"') from e
                raise StorageError(f'cannot create database "{db_id}": {e}') from e
        return self.pgdata(db_id)

    # --- spare clones: with a copy of the template waiting, creating is one rename ----------
    # (cloning ~1000 files and syncing them takes 0.2-1 s on a busy disk; a running gateway
    # refills in a thread)
    def _spares(self, major: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"{SPARE}{major}-*"))

    def _take_spare(self, db_id: str, major: str) -> bool:
        """Make a spare `<root>/<id>` with one rename (a spare has the layout of a database
        directory), durable with one fsync of the data root: fill_spares synced its files
        before it made it ready, so a create does no sync of the tree itself."""
        target = self.db_dir(db_id)
        for spare in self._spares(major):
            if target.exists():  # checked first: a rename would replace an empty directory
                raise _already_exists(db_id)
            if not _whole(spare / "pgdata"):
                shutil.rmtree(spare, ignore_errors=True)  # damaged (tampered with?): clone instead
                continue
            try:
                os.rename(spare, target)
            except FileNotFoundError:
                continue  # a concurrent create took it
            except OSError:  # a concurrent create of this id made it first
                raise _already_exists(db_id) from None
            fsync_dir(self.root)
            return True
        return False

    def fill_spares(self, count: int) -> int:
        """Clone the template until `count` spare copies wait ready; how many were made.
        A failed clone (disk full, say) just stops: creates then clone as usual."""
        made, major = 0, self._maker().default_major  # new databases are mostly of that one
        while len(self._spares(major)) < count:
            token = secrets.token_hex(4)
            work = self.root / f"{SPARE}tmp-{token}"
            self.run_as.make_dir(work)
            try:
                try:
                    copy_tree(self.template(major), work / "pgdata")
                except CopyError:
                    return made
                # durable before it is ready, here in the background: a create that takes it
                # (_take_spare) then only renames it and syncs the data root, and a cloned file
                # Postgres never writes cannot be empty after a power loss
                sync_tree(work)
                os.rename(work, self.root / f"{SPARE}{major}-{token}")
                fsync_dir(self.root)
                made += 1
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
        return made

    def drop_spares(self) -> None:
        """Remove spare copies (at gateway start: they may be half-made or from an older template)."""
        if self.root.is_dir():
            for spare in self.root.glob(f"{SPARE}*"):
                shutil.rmtree(spare, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self, db_id: str) -> Iterator[Path]:
        """Yield where a new database's PGDATA is to be made, in a work directory beside the
        databases; when the block succeeds it becomes `<root>/<id>` with one rename, else it
        is removed: a half-made database never shows, and nothing is left behind."""
        target = self.db_dir(db_id)
        if target.exists():
            raise _already_exists(db_id)
        self.prepare()
        work = self.root / f".new-{db_id}-{secrets.token_hex(4)}"
        self.run_as.make_dir(work)
        try:
            yield work / "pgdata"
            # durable before it shows: Postgres syncs only the files it writes, so a cloned
            # file it never touched could be empty after a power loss
            sync_tree(work)
            try:
                os.rename(work, target)
            except OSError:
                raise _already_exists(db_id) from None
            fsync_dir(self.root)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def delete(self, db_id: str) -> None:
        target = self.db_dir(db_id)
        if not target.exists():
            raise StorageError(f'database "{db_id}" does not exist')
        with self.lock(db_id):
            trash = self.root / f".trash-{db_id}-{secrets.token_hex(4)}"
            os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def lock(self, db_id: str) -> "_Flock":
        """Exclusive, non-blocking lock held by whichever process runs this database's
        postmaster (a gateway or a CLI command), so two never run on one PGDATA."""
        return self._flock(self.lock_file(db_id), blocking=False,
                           busy=f'database "{db_id}" is in use by another pgsni process')

    def _flock(self, path: Path, blocking: bool = True, busy: str = "") -> "_Flock":
        return _Flock(path, blocking, busy)


def _whole(pgdata: Path) -> bool:
    return (pgdata / "global" / "pg_control").is_file() and (pgdata / "PG_VERSION").is_file()


class _Flock:
    def __init__(self, path: Path, blocking: bool, busy: str) -> None:
        self.path, self.blocking, self.busy = path, blocking, busy
        self.fd: int | None = None

    def acquire(self) -> "_Flock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise DatabaseBusy(self.busy) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "_Flock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
