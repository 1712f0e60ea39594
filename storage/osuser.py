"""Who owns database files and runs Postgres: the gateway's own user, or an unprivileged
OS user (default `postgres`) when the gateway runs as root. Postgres refuses to run as root.
Also the one place that builds the environment of every process the gateway starts."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path


class OSUserError(Exception):
    pass


SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(**extra: str) -> dict[str, str]:
    """The whole environment for a process the gateway starts (postgres, initdb, pg_dump,
    psql, cp, s3fs...): built from nothing, never copied from `os.environ`, which holds the
    storage keys and the admin token. A tenant who can run programs in its database sees
    exactly this. `extra` adds what one tool needs (PGAPPNAME, say)."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    if os.environ.get("TZ"):  # the operator's time zone is no secret; initdb records it
        env["TZ"] = os.environ["TZ"]
    env.update(extra)
    return env


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    name: str

    @classmethod
    def resolve(cls, pg_user: str) -> "RunAs":
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)
        try:
            entry = pwd.getpwnam(pg_user)
        except KeyError:
            raise OSUserError(
                f"the gateway runs as root, so Postgres must run as another user, but OS user "
                f"{pg_user!r} does not exist; create it or set pg_user") from None
        if entry.pw_uid == 0:
            raise OSUserError(f"pg_user {pg_user!r} is root; Postgres refuses to run as root")
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    @property
    def switches_user(self) -> bool:
        return self.uid != os.geteuid()

    def popen_kwargs(self) -> dict:
        """Keyword arguments for subprocess/asyncio process creation."""
        kw: dict = {"start_new_session": True}
        if self.switches_user:
            kw.update(user=self.uid, group=self.gid, extra_groups=[])
        return kw

    def make_dir(self, path: Path, mode: int = 0o700) -> Path:
        """Create (or fix) a directory owned by this user with `mode`. An existing one must be
        a real directory owned by us or this user: under /tmp, another local user could have
        planted a symlink or a directory of their own at a predictable name."""
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), self.uid):
            raise OSUserError(f"{path} exists but is not a directory owned by this gateway or "
                              f"{self.name!r}; remove it or choose another path")
        self.chown(path)
        os.chmod(path, mode)
        return path

    def write_file(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Replace `path` with a new file owned by this user, never writing through a symlink
        or into a file someone planted there (the directory may be the Postgres user's)."""
        if path.is_symlink() or path.exists():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with open(fd, "w") as f:
            f.write(text)
        self.chown(path)

    def chown(self, path: Path) -> None:
        if self.switches_user:
            os.chown(path, self.uid, self.gid)

    def chown_tree(self, root: Path) -> None:
        if not self.switches_user:
            return
        os.chown(root, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid, follow_symlinks=False)

    def check_reachable(self, path: Path) -> None:
        """Fail early if this user cannot traverse every parent of `path` (a common set-up trap,
        e.g. a data root under /root when Postgres runs as `postgres`)."""
        if not self.switches_user:
            return
        for parent in reversed(path.absolute().parents):
            try:
                st = parent.stat()
            except FileNotFoundError:
                return  # from here down the gateway creates it, 0755 or wider: reachable
            if st.st_uid == self.uid:
                ok = st.st_mode & 0o100
            elif st.st_gid == self.gid:
                ok = st.st_mode & 0o010
            else:
                ok = st.st_mode & 0o001
            if not ok:
                raise OSUserError(
                    f"OS user {self.name!r} cannot enter {parent}, so Postgres cannot reach "
                    f"{path}; choose a path it can reach or run `chmod o+x {parent}`")
