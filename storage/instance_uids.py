"""One OS uid per database (setting `instance_uid_base`): each postmaster runs as its own
uid and gid, so a tenant's superuser — who can run programs and read files as the Postgres
OS user (`COPY ... PROGRAM`, `pg_read_file`) — finds every other tenant's files closed to it.

The owner of `<root>/<id>/pgdata` is the record of which uid a database has; nothing else is
stored. Copies arrive owned by the shared `pg_user` (create, restore, import, upload) or by
another database's uid (a fork copies its source), and are given a uid of their own the first
time they start: the data directory is chowned to it (once, ~1000 files), and the database
directory becomes the gateway's own and 0711, so the tenant can reach its PGDATA but cannot
list, rename or unlink the gateway's files beside it (roles.json, the lock, the log)."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path

from .ids import valid_id
from .osuser import OSUserError, RunAs


class InstanceUids:
    def __init__(self, base: int, count: int, catalog) -> None:
        if os.geteuid() != 0:
            raise OSUserError("instance_uid_base needs the gateway to run as root (it starts each "
                              "database's Postgres as its own OS user); set it to 0 or run as root")
        self.base, self.count, self.catalog = base, count, catalog
        self._claims: dict[int, str] | None = None  # uid -> database, from the owners on disk
        self._lock = threading.Lock()

    def owns(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count

    def run_as(self, db_id: str) -> RunAs:
        """The OS user that runs `db_id`'s Postgres, giving the database a uid first if it has
        none of its own. Blocking (stat, and on first use a chown of the whole PGDATA)."""
        return self.claim(db_id, self.catalog.db_dir(db_id), self.catalog.pgdata(db_id))

    def claim(self, key: str, db_dir: Path, pgdata: Path) -> RunAs:
        """The same for any data directory, under a name of its own (an upload's build)."""
        with self._lock:
            claims = self._scan()
            uid = os.lstat(pgdata).st_uid
            if not (self.owns(uid) and claims.setdefault(uid, key) == key):
                uid = self._allocate(claims, key)
                try:
                    _hand_over(db_dir, pgdata, _user(uid))
                except BaseException:
                    del claims[uid]
                    raise
            return _user(uid)

    def release(self, key: str) -> None:
        """Forget `key`'s uid (an upload's build, renamed into place: the database it becomes
        keeps the uid when it first starts)."""
        with self._lock:
            if self._claims is not None:
                for uid in [u for u, k in self._claims.items() if k == key]:
                    del self._claims[uid]

    def _scan(self) -> dict[int, str]:
        """Which uid each local database has (the first in name order keeps a shared one)."""
        catalog = self.catalog
        if self._claims is None:
            self._claims = {}
            for name in sorted(os.listdir(catalog.root)) if catalog.root.is_dir() else []:
                if not valid_id(name):
                    continue
                try:
                    uid = os.lstat(catalog.pgdata(name)).st_uid
                except OSError:
                    continue
                if self.owns(uid):
                    self._claims.setdefault(uid, name)
        return self._claims

    def _allocate(self, claims: dict[int, str], db_id: str) -> int:
        start = zlib.crc32(db_id.encode()) % self.count
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            if uid not in claims:
                claims[uid] = db_id
                return uid
        raise OSUserError(f"all {self.count} uids from instance_uid_base={self.base} are taken; "
                          "raise instance_uid_count")


def _user(uid: int) -> RunAs:
    """A database's OS user: its uid, and a group of the same number."""
    return RunAs(uid, uid, f"uid {uid}")


def _hand_over(db_dir: Path, pgdata: Path, user: RunAs) -> None:
    os.chown(db_dir, os.geteuid(), os.getegid(), follow_symlinks=False)
    os.chmod(db_dir, 0o711)
    try:
        user.chown_tree(pgdata)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise OSUserError(f"{user.name} does not exist here (a user namespace maps fewer uids); "
                          "choose instance_uid_base and instance_uid_count inside the mapped "
                          "range (see /proc/self/uid_map)") from None
    os.chmod(pgdata, 0o700)
