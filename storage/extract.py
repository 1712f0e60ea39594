"""Checked extraction of snapshot and user archives (zstd, gzip or plain tar, read strictly as
a stream): nothing lands outside the target, and every file can be checked against a manifest."""

from __future__ import annotations

import errno
import gzip
import os
import stat
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

import zstandard

from .archive_format import CHUNK as _CHUNK
from .archive_format import FileEntry, HashingReader, _symlink_problem
from .errors import CorruptArchive, DiskFull, StorageError, UnsafeArchive

_TAR_READ = 64 << 10  # what tarfile asks of the decompressed stream at a time
# How far tarfile may read past the end of the previous member's data: enough for any sane
# header (PAX records, GNU long names) plus tarfile's read-ahead, but tarfile reads a PAX or
# long-name header into memory whole, so without a bound a tiny compressed archive could
# declare a multi-gigabyte "header" and exhaust memory.
_HEADER_ALLOWANCE = 1 << 20
# Data after the end-of-archive marker (record padding; GNU tar pads to 10 KiB by default).
_TRAILING_ALLOWANCE = 4 << 20
_BLOCK = tarfile.BLOCKSIZE
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_COMPRESSIONS = ("auto", "zstd", "gzip", "none")
# Errors from decoding the stream; anything of these types means the bytes are bad.
_DECODE_ERRORS = (tarfile.TarError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error, EOFError,
                  UnicodeError)


# --- extracting -----------------------------------------------------------------------------------

def _failure(what: str, e: OSError) -> StorageError:
    """A file-system error while extracting: no space (ENOSPC, EDQUOT, whether creating a file
    or writing it) is DiskFull, anything else a StorageError naming what failed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: {e.strerror}")
    return StorageError(f"{what}: {e.strerror}")

def extract(stream: BinaryIO, target: Path, *, compression: str = "auto", max_bytes: int = 64 << 30,
            max_files: int = 1_000_000,
            expected: dict[str, FileEntry] | None = None) -> dict[str, FileEntry]:
    """Extract the archive read from `stream` (read(n) only: never seeks) into `target`, which
    must not exist or be an empty directory; it is created with mode 0700. Returns the regular
    files extracted: relative path -> size and sha256.

    Directories get mode 0700 and files 0600; the archive's owners, modes and mtimes are not
    applied. Refused with UnsafeArchive: absolute or '..' names, anything through a symlink,
    symlinks leading out of target, hard links, devices, fifos and other member types,
    duplicate files, empty or NUL names, more than `max_bytes` of file data or `max_files`
    members (files, directories and symlinks; each costs the file system work). A damaged or
    truncated stream raises CorruptArchive, as does a mismatch with `expected` (exact file
    set, sizes and sha256). The stream is read to its end.

    On any error, `target` is left as it is, partly extracted: the caller deletes it. Nothing
    is ever written outside it (files are created relative to directory descriptors opened
    with O_NOFOLLOW, one component at a time)."""
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {_COMPRESSIONS}, not {compression!r}")
    root_fd = _make_target(Path(target))
    writer = _TreeWriter(root_fd, max_bytes, max_files, expected)
    try:
        peek = _PeekReader(stream)
        if compression == "auto":
            head = peek.peek(4)
            compression = ("zstd" if head.startswith(_ZSTD_MAGIC) else
                           "gzip" if head.startswith(_GZIP_MAGIC) else "none")
        frames = None
        try:
            if compression == "zstd":
                frames = _ZstdFrameCheck(peek)
                decoded = zstandard.ZstdDecompressor().stream_reader(
                    frames, read_size=_TAR_READ, read_across_frames=True, closefd=False)
            elif compression == "gzip":
                decoded = gzip.GzipFile(fileobj=peek, mode="rb")
            else:
                decoded = peek
            tap = _TarTap(decoded, limit=_HEADER_ALLOWANCE)
            tar = tarfile.open(fileobj=tap, mode="r|", bufsize=_TAR_READ)
            while (member := tar.next()) is not None:
                tap.limit = tar.offset + _HEADER_ALLOWANCE
                writer.add(tar, member)
                tar.members.clear()  # tarfile keeps every header otherwise; we never look back
            tap.check_end(tar.offset)
            _drain(decoded)
            if frames is not None:
                _drain(frames)
                frames.finish()
        except _DECODE_ERRORS as e:
            raise CorruptArchive(f"archive is corrupt or truncated: {e}") from None
        return writer.finish()
    finally:
        writer.close()


def _make_target(target: Path) -> int:
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"cannot extract into {target}: it exists and is not a directory") from None
        with os.scandir(target) as it:
            if next(it, None) is not None:
                raise StorageError(f"cannot extract into {target}: it is not empty") from None
    except OSError as e:
        raise _failure(f"cannot create {target}", e) from None
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.fchmod(fd, 0o700)
    return fd


def _member_path(name: str) -> str:
    """The normalised relative path of a member ("" for the root itself), or UnsafeArchive."""
    if not name or "\x00" in name:
        raise UnsafeArchive(f"archive member {name!r} has an empty name or one containing NUL")
    if name.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {name!r} has a '..' component")
    return "/".join(parts)


class _TreeWriter:
    """Creates the members under the target's descriptor without ever following a symlink,
    counting and hashing file data."""

    def __init__(self, root_fd: int, max_bytes: int, max_files: int,
                 expected: dict[str, FileEntry] | None) -> None:
        self.root_fd = root_fd
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.members = 0
        self.expected = expected
        self.total = 0
        self.files: dict[str, FileEntry] = {}
        self.symlinks: set[str] = set()
        self._dir_key: tuple[str, ...] = ()
        self._dir_fd = root_fd  # cached descriptor of the last parent directory used

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        rel = _member_path(name)
        self.members += 1
        if self.members > self.max_files:
            raise UnsafeArchive(f"archive has more than {self.max_files} members (files, "
                                f"directories, links); refusing it")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise UnsafeArchive(f"archive member {name!r} is a {_member_kind(member)}; only "
                                f"regular files, directories and symlinks are accepted")
        if rel == "":
            if member.isdir():
                return  # "./": the target itself, already made
            raise UnsafeArchive(f"archive member {name!r} names the target directory itself")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.symlinks:
                raise UnsafeArchive(f"archive member {name!r} goes through symlink "
                                    f"{'/'.join(parts[:i])!r}")
        if member.issym():
            reason = _symlink_problem(rel, member.linkname)
            if reason:
                raise UnsafeArchive(f"archive member {name!r} is a symlink to "
                                    f"{member.linkname!r} that {reason}")
        parent = self._parent_fd(tuple(parts[:-1]), name)
        leaf = parts[-1]
        if member.isdir():
            self._mkdir(parent, leaf, name)
        elif member.issym():
            try:
                os.symlink(member.linkname, leaf, dir_fd=parent)
            except FileExistsError:
                raise UnsafeArchive(f"archive member {name!r} collides with an earlier member") from None
            except OSError as e:
                raise _failure(f"cannot extract {name!r}", e) from None
            self.symlinks.add(rel)
        else:
            self._file(tar, member, rel, parent, leaf)

    def _file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, parent: int,
              leaf: str) -> None:
        name = member.name
        if rel in self.files:
            raise UnsafeArchive(f"archive member {name!r} is a duplicate")
        want = None
        if self.expected is not None:
            want = self.expected.get(rel)
            if want is None:
                raise CorruptArchive(f"archive file {rel} is not in the manifest")
            if want.size != member.size:
                raise CorruptArchive(f"archive file {rel} is {member.size} bytes, the manifest "
                                     f"says {want.size}")
        if self.total + member.size > self.max_bytes:
            raise UnsafeArchive(f"archive member {name!r} ({member.size} bytes) takes the "
                                f"archive over its limit of {self.max_bytes} bytes")
        try:
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
        except FileExistsError:
            raise UnsafeArchive(f"archive member {name!r} collides with an earlier member") from None
        except OSError as e:
            raise _failure(f"cannot extract {name!r}", e) from None
        try:  # a full disk may show when writing or only when closing
            try:
                os.fchmod(fd, 0o600)
                src = HashingReader(_data_of(tar, member))
                while chunk := src.read(_CHUNK):
                    self.total += len(chunk)
                    if self.total > self.max_bytes:  # never trust the header alone
                        raise UnsafeArchive(f"archive member {name!r} takes the archive over its "
                                            f"limit of {self.max_bytes} bytes")
                    _write_all(fd, chunk)
            finally:
                os.close(fd)
        except OSError as e:
            raise _failure(f"cannot extract {name!r}", e) from None
        entry = FileEntry(src.bytes, src.sha256.hexdigest())
        if want is not None and entry != want:
            raise CorruptArchive(f"archive file {rel} does not match its checksum in the manifest")
        self.files[rel] = entry

    def _parent_fd(self, key: tuple[str, ...], name: str) -> int:
        if key == self._dir_key:
            return self._dir_fd
        self._drop_cached()
        fd = self.root_fd
        try:
            for i, part in enumerate(key):
                nfd = self._open_dir(fd, part, name, "/".join(key[: i + 1]))
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        self._dir_key, self._dir_fd = key, fd
        return fd

    def _open_dir(self, parent: int, part: str, name: str, path: str) -> int:
        """Open (creating if missing, for archives without directory entries) a directory
        below `parent`, never through a symlink."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(part, flags, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(f"archive member {name!r} goes through {path!r}, which is "
                                    f"not a directory") from None
            raise _failure(f"cannot extract {name!r}", e) from None
        self._mkdir(parent, part, name)
        return os.open(part, flags, dir_fd=parent)

    def _mkdir(self, parent: int, leaf: str, name: str) -> None:
        try:
            os.mkdir(leaf, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # a repeated directory entry, or made earlier as a parent: checked below
        except OSError as e:
            raise _failure(f"cannot extract {name!r}", e) from None
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(f"archive member {name!r} collides with an earlier member") from None
            raise _failure(f"cannot extract {name!r}", e) from None
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    def finish(self) -> dict[str, FileEntry]:
        if self.expected is not None:
            missing = sorted(self.expected.keys() - self.files.keys())
            if missing:
                raise CorruptArchive(f"archive lacks file {missing[0]} listed in the manifest"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return self.files

    def _drop_cached(self) -> None:
        if self._dir_fd != self.root_fd:
            os.close(self._dir_fd)
        self._dir_key, self._dir_fd = (), self.root_fd

    def close(self) -> None:
        self._drop_cached()
        os.close(self.root_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _PlainData:
    """The data of a plain file member, read straight from the tar stream (tarfile's
    extractfile() adds layers that cost more than the copying for small files)."""

    def __init__(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.stream, self.left, self.name = tar.fileobj, member.size, member.name

    def read(self, n: int) -> bytes:
        data = self.stream.read(min(n, self.left)) if self.left else b""
        if self.left and not data:  # reported as tarfile's own reading would be
            raise tarfile.ReadError(f"unexpected end of data in member {self.name!r}")
        self.left -= len(data)
        return data


def _data_of(tar: tarfile.TarFile, member: tarfile.TarInfo):
    if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.sparse:
        return _PlainData(tar, member)
    return tar.extractfile(member)  # sparse and other variants: tarfile knows their layout


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return "hard link"
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    if member.isfifo():
        return "fifo"
    return f"member of type {member.type!r}"


def _drain(reader) -> None:
    """Read to the end (so checksums at the end of a compressed stream are verified and the
    source is consumed), refusing more than a little trailing data."""
    extra = 0
    while chunk := reader.read(_TAR_READ):
        extra += len(chunk)
        if extra > _TRAILING_ALLOWANCE:
            raise CorruptArchive("archive has unexpected data after its end")


class _PeekReader:
    """A non-seekable stream with a look-ahead buffer, for sniffing the compression."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.buf = b""

    def readable(self) -> bool:
        return True

    def peek(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.raw.read(n - len(self.buf))
            if not chunk:
                break
            self.buf += chunk
        return self.buf[:n]

    def read(self, n: int = -1) -> bytes:
        if not self.buf:
            return self.raw.read(n) or b""
        if n is None or n < 0:
            data, self.buf = self.buf + (self.raw.read() or b""), b""
            return data
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


class _TarTap:
    """What tarfile reads from. Tracks the position in the tar stream, refuses to read past
    `limit` (see _HEADER_ALLOWANCE) and keeps the last bytes read, so that the end of the
    archive can be checked: tarfile silently treats a truncated or garbled header as the end."""

    _KEEP = 4 * _TAR_READ

    def __init__(self, raw, limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.pos = 0
        self.tail = bytearray()
        self.tail_start = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _TAR_READ
        data = self.raw.read(n)
        if data:
            self.pos += len(data)
            if self.pos > self.limit:
                raise UnsafeArchive("archive has a tar header over "
                                    f"{_HEADER_ALLOWANCE >> 20} MiB; refusing it")
            self.tail += data
            if len(self.tail) > 4 * self._KEEP:
                cut = len(self.tail) - self._KEEP
                del self.tail[:cut]
                self.tail_start += cut
        return data

    def check_end(self, offset: int) -> None:
        """tarfile stopped at `offset`: there must be a whole zero block (end of archive)."""
        if self.pos < offset + _BLOCK:
            raise CorruptArchive(f"archive is truncated (tar stream ends at byte {self.pos} "
                                 f"without an end-of-archive marker)")
        start = offset - self.tail_start
        block = self.tail[start:start + _BLOCK] if start >= 0 else b""
        if len(block) != _BLOCK or block.count(0) != _BLOCK:
            raise CorruptArchive(f"archive is corrupt: invalid tar header at byte {offset}")


class _ZstdFrameCheck:
    """Follows zstd frame and block boundaries in the compressed bytes as they stream past
    (block contents are skipped, not decoded). The decompressor silently accepts a stream cut
    short; this notices, even when only the final checksum is missing."""

    _MAGIC, _SKIP_SIZE, _FHD, _BLOCK_HEADER = range(4)

    def __init__(self, raw) -> None:
        self.raw = raw
        self.state = self._MAGIC
        self.need = 4  # bytes of the next field
        self.field = bytearray()
        self.skip = 0  # bytes to pass over before that field
        self.checksum = False
        self.frames = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self._feed(data)
        return data

    def _feed(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end:
            if self.skip:
                k = min(self.skip, end - i)
                self.skip -= k
                i += k
                continue
            k = min(self.need - len(self.field), end - i)
            self.field += data[i:i + k]
            i += k
            if len(self.field) == self.need:
                value = bytes(self.field)
                self.field.clear()
                self._step(value)

    def _step(self, value: bytes) -> None:
        if self.state == self._MAGIC:
            magic = int.from_bytes(value, "little")
            if value == _ZSTD_MAGIC:
                self.state, self.need = self._FHD, 1
            elif 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                self.state, self.need = self._SKIP_SIZE, 4
            else:
                raise CorruptArchive("archive is corrupt: bad zstd frame magic")
        elif self.state == self._SKIP_SIZE:
            self.skip = int.from_bytes(value, "little")
            self.state, self.need = self._MAGIC, 4
        elif self.state == self._FHD:
            fhd = value[0]
            if fhd & 0x08:
                raise CorruptArchive("archive is corrupt: bad zstd frame header")
            single_segment = bool(fhd & 0x20)
            fcs = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
            self.checksum = bool(fhd & 0x04)
            self.skip = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs
            self.state, self.need = self._BLOCK_HEADER, 3
        else:  # block header: last flag, type, size
            header = int.from_bytes(value, "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise CorruptArchive("archive is corrupt: reserved zstd block type")
            self.skip = 1 if kind == 1 else size  # an RLE block stores one byte
            if header & 1:  # the frame's last block
                self.skip += 4 if self.checksum else 0
                self.frames += 1
                self.state, self.need = self._MAGIC, 4

    def finish(self) -> None:
        if self.state != self._MAGIC or self.skip or self.field:
            raise CorruptArchive("archive is truncated (the zstd stream ends inside a frame)")
        if not self.frames:
            raise CorruptArchive("archive is corrupt: no zstd frame")


# --- locating the data directory -------------------------------------------------------------
_MAX_SEARCH_DEPTH = 4


def refuse_tablespaces(pgdata: Path) -> None:
    """UnsafeArchive if the data directory has tablespaces: entries in `pg_tblspc/` (links,
    which extraction keeps only inside the archive) or a `tablespace_map` (plain text beside a
    backup_label, from which the first start makes links to wherever it says: outside the
    database's directory, as the Postgres OS user). A database of this gateway never has one
    (creating a tablespace needs a superuser)."""
    try:
        with os.scandir(pgdata / "pg_tblspc") as it:
            names = sorted(e.name for e in it)
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise _failure(f"cannot read {pgdata / 'pg_tblspc'}", e) from None
    if names:
        raise UnsafeArchive(f"archive holds tablespaces (pg_tblspc/{names[0]}): not supported, "
                            f"a database's data stays in its own directory")
    try:
        if os.lstat(pgdata / "tablespace_map").st_size > 0:
            raise UnsafeArchive("archive holds a tablespace_map: tablespaces are not supported, a "
                                "database's data stays in its own directory")
    except FileNotFoundError:
        pass


def find_pgdata_root(target: Path) -> Path:
    """The Postgres data directory inside an extracted user archive: `target` itself if it
    holds PG_VERSION, else the single directory below it (at most a few levels down, never
    through a symlink) that does. A directory holding PG_VERSION is not searched further:
    each of its database directories (base/<oid>/) holds one too."""
    target = Path(target)
    found: list[Path] = []
    level = [target]
    for _ in range(_MAX_SEARCH_DEPTH + 1):
        below: list[Path] = []
        for d in level:
            if _is_regular(d / "PG_VERSION"):
                found.append(d)
                continue
            try:
                with os.scandir(d) as it:
                    below.extend(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
        level = sorted(below)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(target)) for p in found)
        raise StorageError(f"archive contains more than one Postgres data directory ({names})")
    raise StorageError("archive does not contain a Postgres data directory (no PG_VERSION)")


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
