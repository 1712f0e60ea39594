"""A `Backend` on a local directory: the embedded default, and also a bucket mounted with
s3fs-fuse. Every object is a plain file `<root>/<prefix>/<key>`.

Files and atomicity
  A write goes to a temp file in the target's own directory, is fsynced and then renamed
  over the target (os.replace), so readers see the old or the new object, never half of
  one. New files are 0600, new directories 0700. On s3fs a rename is a server-side copy
  plus delete: still all-or-nothing for readers, but not atomic against other machines.

Etags
  The etag is the hex sha256 of the content. It is cached in a sidecar `.<name>.etag`
  (written atomically next to the object) together with the size, mtime and inode the
  object had when it was written. `head()` and `list()` trust the sidecar only while those
  still match the file, and otherwise re-hash the file in 1 MiB chunks in a worker thread
  (never reading it whole) and rewrite the sidecar. The sidecar is advisory: `get()` and
  the conditions of `put()` always hash the content itself, so a stale sidecar (say, a
  crash between the rename and the sidecar write, on a file system with coarse mtimes)
  can at worst make a conditional write fail, never let one through wrongly.

Conditional writes
  `put(if_match=...)` / `put(if_none_match=True)` check and write under an exclusive
  fcntl.flock on `<root>/.pgsni-storage.lock`, so they are atomic against other
  processes (and threads) on the same machine. Across machines sharing an s3fs mount the
  lock is local to each kernel: there the conditions are best effort only.

Keys
  Keys are validated (`validate_key`) by both backends alike, so that a bucket can be
  read through either one: no absolute paths, no empty, "." or ".." components, no
  leading or trailing "/", no NUL or other control characters, and no component that
  starts with "." -- dot names are reserved for temp, sidecar and lock files, which
  `list()` therefore never returns.

Errors
  An absent object raises NotFound; any other OS error (EIO, ENOTCONN from a dead s3fs
  mount, ENOSPC, EACCES, ...) raises StorageUnavailable naming the directory. Local
  operations are not retried: a failing disk does not get better within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from . import backend as backend_mod
from .atomic import fsync_dir, temp_name, write_atomic, write_temp
from .backend import Backend, ObjectInfo
from .errors import NotFound, PreconditionFailed, StorageError, StorageUnavailable
from .keys import normalize_root_prefix, validate_key, validate_prefix

CHUNK = 1 << 20
SMALL_READ = 256 << 10  # download reads files up to this size in one go
LOCK_NAME = ".pgsni-storage.lock"


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.etag")


def _stamp(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to a new file `dst` (0600), fsynced."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
        while chunk := f.read(CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _write_sidecar(path: Path, etag: str, st: os.stat_result) -> None:
    body = json.dumps({"etag": etag, **_stamp(st)}).encode()
    write_atomic(_sidecar(path), body)


def _read_sidecar(path: Path, st: os.stat_result) -> str | None:
    try:
        meta = json.loads(_sidecar(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or {k: meta.get(k) for k in ("size", "mtime_ns", "ino")} != _stamp(st):
        return None
    etag = meta.get("etag")
    return etag if isinstance(etag, str) else None


class LocalDirBackend(Backend):
    def __init__(self, root: Path, prefix: str = "") -> None:
        self.root = Path(root).absolute()
        self.prefix = normalize_root_prefix(prefix)
        self.base = self.root / self.prefix if self.prefix else self.root

    def describe(self) -> str:
        return f"directory {self.base}"

    # --- paths, locking, errors -------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.base / validate_key(key)

    def _unavailable(self, e: OSError) -> StorageUnavailable:
        reason = e.strerror or type(e).__name__
        return StorageUnavailable(f"storage {self.describe()} is unavailable: {reason}")

    def _mkdirs(self, d: Path) -> None:
        """Create `d` and missing parents (0700); the root itself too if absent."""
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            if p == p.parent:
                break
            p = p.parent
        for p in reversed(missing):
            try:
                os.mkdir(p, 0o700)
            except FileExistsError:
                pass
        if not d.is_dir():
            raise StorageError(f"storage {self.describe()}: {d} is not a directory")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._mkdirs(self.root)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _run(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except StorageError:
            raise
        except (IsADirectoryError, NotADirectoryError) as e:
            # e.g. key "a" when "a/b" exists: fine on S3, impossible in a file system
            raise StorageError(f"storage {self.describe()}: {e.filename} conflicts with an "
                               f"object or directory of the same name") from e
        except OSError as e:
            raise self._unavailable(e) from e

    # --- reads --------------------------------------------------------------------------------
    async def get(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)

        def read() -> tuple[bytes, str]:
            try:
                f = open(path, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"{key} not found in {self.describe()}") from None
            with f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise NotFound(f"{key} not found in {self.describe()}")
                if st.st_size > backend_mod.MAX_SMALL_OBJECT:
                    raise StorageError(f"{key} in {self.describe()} is {st.st_size} bytes, too "
                                       f"large to read whole (limit {backend_mod.MAX_SMALL_OBJECT})")
                data = f.read(backend_mod.MAX_SMALL_OBJECT + 1)
            if len(data) > backend_mod.MAX_SMALL_OBJECT:
                raise StorageError(f"{key} in {self.describe()} grew too large to read whole")
            return data, hashlib.sha256(data).hexdigest()

        return await self._run(read)

    def _info_sync(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        etag = _read_sidecar(path, st)
        if etag is None:
            etag, _ = _hash_file(path)
            st2 = path.stat()
            if _stamp(st2) == _stamp(st):  # unchanged while hashing: cache it
                with contextlib.suppress(OSError):
                    _write_sidecar(path, etag, st2)
        return ObjectInfo(key, st.st_size, etag, st.st_mtime)

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return await self._run(self._info_sync, key, path)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)

        def walk() -> list[ObjectInfo]:
            # Walk only the directory the prefix names completely, filter the rest by name.
            head, _, _ = prefix.rpartition("/")
            start = self.base / head if head else self.base
            if not start.is_dir():
                return []
            out = []
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, self.base)
                for name in filenames:
                    if name.startswith("."):
                        continue  # temp, sidecar and lock files
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if not key.startswith(prefix):
                        continue
                    try:
                        validate_key(key)
                    except StorageError:
                        continue  # a stray file no key could name
                    info = self._info_sync(key, self.base / key)
                    if info is not None:
                        out.append(info)
            out.sort(key=lambda i: i.key)
            return out

        return await self._run(walk)

    async def download(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)

        def open_() -> tuple[object, int]:
            try:
                f = open(path, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"{key} not found in {self.describe()}") from None
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                f.close()
                raise NotFound(f"{key} not found in {self.describe()}")
            return f, st.st_size

        f, size = await self._run(open_)
        try:
            if size <= SMALL_READ:
                try:
                    data = f.read()
                except OSError as e:
                    raise self._unavailable(e) from e
                if data:
                    yield data
                return
            while chunk := await self._run(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    # --- writes -------------------------------------------------------------------------------
    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        path = self._path(key)
        data = bytes(data)
        etag = hashlib.sha256(data).hexdigest()

        def write() -> str:
            self._mkdirs(path.parent)
            with self._locked():
                if if_none_match and path.exists():
                    raise PreconditionFailed(f"{key} already exists in {self.describe()}")
                if if_match is not None:
                    try:
                        current, _ = _hash_file(path)
                    except (FileNotFoundError, NotADirectoryError):
                        raise PreconditionFailed(f"{key} no longer exists in {self.describe()}") from None
                    if current != if_match.strip('"'):
                        raise PreconditionFailed(f"{key} changed in {self.describe()}")
                self._commit_bytes(path, data, etag)
            return etag

        return await self._run(write)

    def _commit_bytes(self, path: Path, data: bytes, etag: str) -> None:
        tmp, st = write_temp(path, data)
        try:
            self._commit_tmp(tmp, path, etag, st)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _commit_tmp(self, tmp: Path, path: Path, etag: str, st: os.stat_result) -> None:
        """Sidecar first (describing the temp file's inode/mtime, which the rename keeps),
        then the object itself. A crash in between leaves a sidecar that matches no file."""
        _write_sidecar(path, etag, st)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    async def upload_file(self, key: str, path: Path, *,
                          progress: Callable[[int], None] | None = None) -> ObjectInfo:
        target = self._path(key)
        src_path = Path(path)

        def begin():
            src = open(src_path, "rb")  # FileNotFoundError here is the caller's problem
            try:
                self._mkdirs(target.parent)
                tmp = temp_name(target)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except BaseException:
                src.close()
                raise
            return src, tmp, os.fdopen(fd, "wb", buffering=0)

        try:
            src, tmp, dst = await asyncio.to_thread(begin)
        except FileNotFoundError as e:
            if not src_path.exists():
                raise StorageError(f"cannot upload {src_path}: no such file") from e
            raise self._unavailable(e) from e
        except OSError as e:
            raise self._unavailable(e) from e

        h = hashlib.sha256()

        def copy_chunk() -> int:
            chunk = src.read(CHUNK)
            if chunk:
                h.update(chunk)
                dst.write(chunk)
            return len(chunk)

        def finish() -> ObjectInfo:
            os.fsync(dst.fileno())
            st = os.fstat(dst.fileno())
            dst.close()
            etag = h.hexdigest()
            with self._locked():
                self._commit_tmp(tmp, target, etag, st)
            return ObjectInfo(key, st.st_size, etag, st.st_mtime)

        committed = False
        try:
            while n := await self._run(copy_chunk):
                if progress is not None:
                    progress(n)
            info = await self._run(finish)
            committed = True
            return info
        finally:
            src.close()
            if not dst.closed:
                dst.close()
            if not committed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        """A hard link where the file system allows it (objects are never modified in place:
        writes replace them by rename), else a file copy (s3fs: a server-side copy there)."""
        src_path, dst_path = self._path(src), self._path(dst)

        def run() -> ObjectInfo:
            info = self._info_sync(src, src_path)
            if info is None:
                raise NotFound(f"{src} not found in {self.describe()}")
            self._mkdirs(dst_path.parent)
            tmp = temp_name(dst_path)
            try:
                try:
                    os.link(src_path, tmp)
                except OSError:
                    _copy_file(src_path, tmp)
                st = os.stat(tmp)
                with self._locked():
                    self._commit_tmp(tmp, dst_path, info.etag, st)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return ObjectInfo(dst, info.size, info.etag, st.st_mtime)

        return await self._run(run)

    async def delete(self, keys: list[str]) -> None:
        paths = [self._path(k) for k in keys]  # validate them all before deleting any
        if not paths:
            return

        def remove() -> None:
            with self._locked():
                for p in paths:
                    for victim in (p, _sidecar(p)):
                        try:
                            os.unlink(victim)
                        except (FileNotFoundError, NotADirectoryError):
                            pass
                        except IsADirectoryError:
                            break  # a "directory key": not an object
            # Empty directories are left in place: removing them would race with a writer
            # that has just created one; list() does not see them.

        await self._run(remove)
