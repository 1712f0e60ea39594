"""Snapshot archives: streamed round trips (synthetic and a real initdb PGDATA), hostile archives
refused without writing outside the target, corruption and truncation detected."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storage import archive
from storage.archive import ArchiveInfo, FileEntry, HashingReader, HashingWriter
from storage.errors import CorruptArchive, StorageError, UnsafeArchive


# --- helpers --------------------------------------------------------------------------------
class OneWayReader:
    """read(n) only, in chunks of at most `chunk` bytes: proves nothing seeks or rewinds."""

    def __init__(self, data: bytes, chunk: int = 1 << 20) -> None:
        self._src = io.BytesIO(data)
        self._chunk = chunk
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if n is None or n < 0 or n > self._chunk:
            n = self._chunk
        return self._src.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *a):
        raise io.UnsupportedOperation("not seekable")

    def tell(self):
        raise io.UnsupportedOperation("not seekable")

    def at_eof(self) -> bool:
        return self._src.tell() == len(self._src.getbuffer())


class OneWayWriter:
    """write() only; seek/tell raise."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()

    def write(self, data) -> int:
        return self._buf.write(data)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *a):
        raise io.UnsupportedOperation("not seekable")

    def tell(self):
        raise io.UnsupportedOperation("not seekable")

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def node(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, None


def make_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, kind: str) -> bytes:
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    if kind == "gzip":
        return gzip.compress(raw)
    return raw


def archive_bytes(src: Path) -> tuple[bytes, ArchiveInfo]:
    out = OneWayWriter()
    info = archive.create(src, out)
    return out.getvalue(), info


def tree_listing(root: Path) -> dict[str, tuple[str, object]]:
    """path -> (kind, bytes | link target) for everything under root."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = ("dir", None)
            else:
                found[rel] = ("file", p.read_bytes())
    return found


@pytest.fixture
def synthetic(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "base" / "1").mkdir(parents=True)
    (src / "PG_VERSION").write_text("15\n")
    (src / "base" / "1" / "1259").write_bytes(os.urandom(3 << 20))
    (src / "base" / "1" / "empty").write_bytes(b"")
    (src / "global").mkdir()
    (src / "global" / "pg_control").write_bytes(b"control" * 100)
    (src / "pg_replslot").mkdir()  # an empty directory
    (src / "pg_stat_tmp").mkdir()
    (src / "pg_stat_tmp" / "global.stat").write_bytes(b"stale")
    (src / "postmaster.pid").write_text("123\n")
    (src / "postmaster.opts").write_text("postgres\n")
    os.symlink("base/1/1259", src / "relation-link")
    return src


# --- round trips ------------------------------------------------------------------------------
def test_round_trip_of_a_synthetic_tree_through_one_way_streams(synthetic, tmp_path):
    data, info = archive_bytes(synthetic)
    assert info.size == len(data) and info.sha256 == sha(data)
    assert set(info.files) == {"PG_VERSION", "base/1/1259", "base/1/empty", "global/pg_control"}
    assert info.files["base/1/1259"] == FileEntry(3 << 20, sha((synthetic / "base/1/1259").read_bytes()))
    assert info.files["base/1/empty"] == FileEntry(0, sha(b""))

    target = tmp_path / "restored"
    stream = OneWayReader(data, chunk=7777)  # odd, short reads
    got = archive.extract(stream, target, expected=info.files)
    assert got == info.files
    assert stream.at_eof(), "extract must consume the whole stream"

    source, restored = tree_listing(synthetic), tree_listing(target)
    for skipped in ("postmaster.pid", "postmaster.opts", "pg_stat_tmp/global.stat"):
        del source[skipped]
    assert restored == source
    assert restored["relation-link"] == ("link", "base/1/1259")
    assert restored["pg_stat_tmp"] == ("dir", None) and restored["pg_replslot"] == ("dir", None)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for rel, (kind, _) in restored.items():
        mode = stat.S_IMODE(os.lstat(target / rel).st_mode)
        if kind == "dir":
            assert mode == 0o700, rel
        elif kind == "file":
            assert mode == 0o600, rel


def test_archive_layout_is_deterministic_and_carries_no_owners(synthetic):
    first, info = archive_bytes(synthetic)
    second, _ = archive_bytes(synthetic)
    assert first == second
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(first)).read()
    members = list(tarfile.open(fileobj=io.BytesIO(raw), mode="r|"))
    names = [m.name for m in members]
    assert names == ["PG_VERSION", "base", "base/1", "base/1/1259", "base/1/empty", "global",
                     "global/pg_control", "pg_replslot", "pg_stat_tmp", "relation-link"]
    assert all(m.uid == 0 and m.gid == 0 and not m.uname and not m.gname for m in members)
    assert [m.name for m in members if m.issym()] == ["relation-link"]


def test_the_archive_stream_is_read_to_its_end_so_a_caller_can_hash_it(synthetic, tmp_path):
    data, info = archive_bytes(synthetic)
    reader = HashingReader(OneWayReader(data))
    archive.extract(reader, tmp_path / "t", compression="zstd")
    assert (reader.bytes, reader.sha256.hexdigest()) == (info.size, info.sha256)


@pytest.mark.parametrize("kind", ["zstd", "gzip", "none"])
def test_compression_is_sniffed_or_named(kind, tmp_path):
    raw = make_tar([reg("PG_VERSION", b"15\n"), node("d", tarfile.DIRTYPE), reg("d/f", b"abc")])
    blob = compress(raw, kind)
    want = {"PG_VERSION": FileEntry(3, sha(b"15\n")), "d/f": FileEntry(3, sha(b"abc"))}
    assert archive.extract(OneWayReader(blob), tmp_path / "auto") == want
    assert archive.extract(OneWayReader(blob), tmp_path / "named", compression=kind) == want
    wrong = "none" if kind != "none" else "zstd"
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(blob), tmp_path / "wrong", compression=wrong)


def test_multiple_and_skippable_zstd_frames_are_accepted(synthetic, tmp_path):
    data, info = archive_bytes(synthetic)
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    half = len(raw) // 2
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = (zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw[:half])
            + skippable
            + zstandard.ZstdCompressor(level=19, write_checksum=False).compress(raw[half:]))
    assert archive.extract(OneWayReader(blob, 4096), tmp_path / "t", expected=info.files) == info.files


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("zstd") is None,
                    reason="needs GNU tar and zstd")
@pytest.mark.parametrize("flags", [["-z"], ["--zstd"], []])
def test_archives_made_by_gnu_tar_extract(flags, synthetic, tmp_path):
    """User archives: `./` prefixes, a root entry, owner names; then find the data directory."""
    inner = subprocess.run(["tar", *flags, "-C", str(synthetic), "-cf", "-", "."],
                           check=True, capture_output=True).stdout
    got = archive.extract(OneWayReader(inner), tmp_path / "flat")
    assert got["base/1/1259"].size == 3 << 20
    assert archive.find_pgdata_root(tmp_path / "flat") == tmp_path / "flat"
    nested = subprocess.run(["tar", *flags, "-C", str(synthetic.parent), "-cf", "-", synthetic.name],
                            check=True, capture_output=True).stdout
    archive.extract(OneWayReader(nested), tmp_path / "nested")
    assert archive.find_pgdata_root(tmp_path / "nested") == tmp_path / "nested" / synthetic.name


def test_a_real_pgdata_round_trips_byte_for_byte(template_pgdata, tmp_path):
    """template_pgdata (tests/conftest.py) is one initdb per session, run as the postgres OS
    user in a /tmp directory it can reach."""
    data, info = archive_bytes(template_pgdata)
    assert "global/pg_control" in info.files and "PG_VERSION" in info.files
    target = tmp_path / "restored"
    assert archive.extract(OneWayReader(data), target, expected=info.files) == info.files
    source = tree_listing(template_pgdata)
    for rel in list(source):
        if archive._excluded(rel):
            del source[rel]
    assert tree_listing(target) == source
    assert archive.find_pgdata_root(target) == target


# --- create refusals --------------------------------------------------------------------------------
def test_create_refuses_fifos_and_sockets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(StorageError, match="pipe.*fifo"):
        archive.create(src, io.BytesIO())
    os.unlink(src / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        with pytest.raises(StorageError, match="sock.*socket"):
            archive.create(src, io.BytesIO())
    finally:
        sock.close()


@pytest.mark.parametrize("link", ["/etc", "../outside", "a/../../x"])
def test_create_refuses_symlinks_that_would_not_restore(link, tmp_path):
    """A tablespace or external pg_wal would be silently missing from the snapshot, and the
    archive would be refused on restore anyway."""
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(link, src / "pg_wal")
    with pytest.raises(StorageError, match="pg_wal"):
        archive.create(src, io.BytesIO())


@pytest.mark.parametrize("victim", ["base/1/1259", "base"])
def test_create_names_a_file_or_directory_that_vanishes(victim, synthetic, monkeypatch):
    real_walk = archive._walk  # recurses through the module attribute, i.e. this wrapper

    def walk_then_delete(root, *rest):
        for item in real_walk(root, *rest):
            path = os.path.join(root, item[0])
            if item[0] == victim and os.path.lexists(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            yield item

    monkeypatch.setattr(archive, "_walk", walk_then_delete)
    with pytest.raises(StorageError, match=f"{victim}.*vanished"):
        archive.create(synthetic, io.BytesIO())


def test_a_directory_swapped_for_a_link_while_archived_is_not_followed(synthetic, monkeypatch, tmp_path):
    """A process an allowed superuser left running (as its database's OS user) swaps a
    directory of the stopped data directory for a symlink between the walk's look at it and
    its reading: the snapshot, read by the gateway's OS user, must not archive what the link
    points at (another tenant's files, the gateway's), for the tenant to restore and read."""
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "1259").write_bytes(b"the gateway's secret")
    real_walk = archive._walk

    def walk_then_swap(root, *rest):
        for item in real_walk(root, *rest):
            yield item
            if item[0] == "base":  # looked at as a directory: now it becomes a link
                shutil.rmtree(os.path.join(root, "base"))
                os.symlink(outside, os.path.join(root, "base"))

    monkeypatch.setattr(archive, "_walk", walk_then_swap)
    out = io.BytesIO()
    with pytest.raises(StorageError, match="cannot archive base"):
        archive.create(synthetic, out)
    assert b"the gateway's secret" not in zstandard.ZstdDecompressor().decompressobj().decompress(out.getvalue())


def test_a_file_that_shrinks_while_read_is_named():
    reader = archive._SourceFile(io.BytesIO(b"abc"), "base/1/2", size=10)
    with pytest.raises(StorageError, match="base/1/2.*shrank"):
        reader.read(10)


def test_a_failed_create_leaves_an_unusable_archive(synthetic, monkeypatch, tmp_path):
    real_walk = archive._walk

    def walk_then_fail(root, *rest):
        for item in real_walk(root, *rest):
            yield item
            if item[0] == "global/pg_control":
                raise StorageError("boom")

    monkeypatch.setattr(archive, "_walk", walk_then_fail)
    out = io.BytesIO()
    with pytest.raises(StorageError, match="boom"):
        archive.create(synthetic, out)
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(out.getvalue()), tmp_path / "t")


# --- hostile archives ---------------------------------------------------------------------------
ETC_MARKER = f"pgsni-archive-test-{secrets.token_hex(4)}"

HOSTILE = {
    "absolute path": lambda s: [reg(f"{s}/abs")],
    "dot-dot": lambda s: [reg("../sentinel/escape")],
    "dot-dot after a name": lambda s: [node("a", tarfile.DIRTYPE), reg("a/../../sentinel/escape")],
    "symlink to /etc then a file through it": lambda s: [
        node("a", tarfile.SYMTYPE, "/etc"), reg(f"a/{ETC_MARKER}")],
    "symlink to the sentinel then a file through it": lambda s: [
        node("a", tarfile.SYMTYPE, str(s)), reg("a/escape")],
    "symlink to .. then a file through it": lambda s: [
        node("a", tarfile.SYMTYPE, ".."), reg("a/sentinel/escape")],
    "relative symlink outside": lambda s: [node("out", tarfile.SYMTYPE, "../sentinel")],
    "deep relative symlink outside": lambda s: [
        node("d", tarfile.DIRTYPE), node("d/out", tarfile.SYMTYPE, "../../sentinel")],
    "symlink chain that only escapes when resolved": lambda s: [
        node("x", tarfile.DIRTYPE), node("x/up", tarfile.SYMTYPE, ".."),
        node("y", tarfile.SYMTYPE, "x/up/../..")],
    "symlink through a sibling symlink to the root": lambda s: [
        node("x", tarfile.DIRTYPE), node("x/up", tarfile.SYMTYPE, ".."),
        node("x/y", tarfile.SYMTYPE, "up/..")],  # ".." counts 1 <= depth 1, yet x/up/.. is outside
    "file through an inside symlink": lambda s: [
        node("d", tarfile.DIRTYPE), node("s", tarfile.SYMTYPE, "d"), reg("s/f")],
    "hard link": lambda s: [reg("PG_VERSION"), node("h", tarfile.LNKTYPE, "PG_VERSION")],
    "hard link outside": lambda s: [node("h", tarfile.LNKTYPE, "/etc/passwd")],
    "character device": lambda s: [node("null", tarfile.CHRTYPE)],
    "block device": lambda s: [node("disk", tarfile.BLKTYPE)],
    "fifo": lambda s: [node("pipe", tarfile.FIFOTYPE)],
    "duplicate file": lambda s: [reg("f", b"one"), reg("f", b"two")],
    "file replacing a symlink": lambda s: [node("f", tarfile.SYMTYPE, "g"), reg("f", b"two")],
    "file bigger than max_bytes": lambda s: [reg("big", b"z" * 5000)],
    "small files adding up past max_bytes": lambda s: [reg(f"f{i}", b"z" * 100) for i in range(20)],
    "empty name": lambda s: [reg("")],
    "NUL in name": lambda s: [_with_pax_path(reg("x"), "a\x00b")],
    "huge pax header": lambda s: [_with_pax(reg("x"), comment="c" * (2 << 20))],
}


def _with_pax_path(member, path):
    member[0].pax_headers = {"path": path}
    return member


def _with_pax(member, **headers):
    member[0].pax_headers = headers
    return member


@pytest.mark.parametrize("kind", ["zstd", "none", "gzip"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_without_writing_outside(case, kind, tmp_path):
    base = tmp_path / "case"
    sentinel = base / "sentinel"
    sentinel.mkdir(parents=True)
    target = base / "target"
    blob = compress(make_tar(HOSTILE[case](sentinel)), kind)
    with pytest.raises(UnsafeArchive) as caught:
        archive.extract(OneWayReader(blob), target, max_bytes=1000)
    assert "archive" in str(caught.value)
    assert sorted(p.name for p in base.iterdir()) == ["sentinel", "target"]
    assert list(sentinel.iterdir()) == []
    assert not os.path.lexists(f"/etc/{ETC_MARKER}")
    for path in target.rglob("*"):  # whatever was extracted stays inside
        if path.is_symlink():
            assert Path(os.path.realpath(path)).is_relative_to(target.resolve()), path


@pytest.mark.parametrize("case, name, why", [
    ("dot-dot", "../sentinel/escape", "'..'"), ("symlink to /etc then a file through it", "a", "absolute"),
    ("file through an inside symlink", "s/f", "through symlink"), ("hard link", "h", "hard link"),
    ("character device", "null", "device"), ("duplicate file", "f", "duplicate"),
    ("small files adding up past max_bytes", "f10", "limit")])
def test_refusals_name_the_member(case, name, why, tmp_path):
    members = HOSTILE[case](tmp_path / "s")
    with pytest.raises(UnsafeArchive, match=f"{re.escape(repr(name))}.*{why}"):
        archive.extract(OneWayReader(compress(make_tar(members), "zstd")), tmp_path / "t",
                        max_bytes=1000)


def test_a_symlink_staying_inside_is_kept(tmp_path):
    members = [node("d", tarfile.DIRTYPE), node("d/e", tarfile.DIRTYPE),
               node("d/e/up", tarfile.SYMTYPE, "../.."), node("d/sib", tarfile.SYMTYPE, "../PG_VERSION"),
               reg("PG_VERSION", b"15\n")]
    archive.extract(OneWayReader(make_tar(members)), tmp_path / "t")
    assert os.readlink(tmp_path / "t" / "d" / "e" / "up") == "../.."
    assert (tmp_path / "t" / "d" / "sib").read_text() == "15\n"


def test_max_bytes_counts_exactly(tmp_path):
    blob = make_tar([reg(f"f{i}", b"z" * 100) for i in range(10)])
    assert len(archive.extract(OneWayReader(blob), tmp_path / "ok", max_bytes=1000)) == 10
    with pytest.raises(UnsafeArchive, match="f9"):
        archive.extract(OneWayReader(blob), tmp_path / "over", max_bytes=999)
    assert not (tmp_path / "over" / "f9").exists(), "refused on its header, before writing"


def test_max_files_counts_every_member(tmp_path):
    blob = make_tar([node("d", tarfile.DIRTYPE), node("d/l", tarfile.SYMTYPE, "..")]
                    + [reg(f"d/f{i}") for i in range(8)])
    assert len(archive.extract(OneWayReader(blob), tmp_path / "ok", max_files=10)) == 8
    with pytest.raises(UnsafeArchive, match="more than 9 members"):
        archive.extract(OneWayReader(blob), tmp_path / "over", max_files=9)
    assert not (tmp_path / "over" / "d" / "f7").exists()


def test_file_data_is_read_through_tarfile_for_sparse_members(tmp_path):
    """Plain members are copied straight from the stream; GNU sparse ones (tar -S) still
    expand to their real size."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holey", "wb") as f:
        f.write(b"start")
        f.seek(1 << 20)
        f.write(b"end")
    (src / "plain").write_bytes(b"p" * 1000)
    blob = subprocess.run(["tar", "-C", str(src), "-S", "--format=gnu", "-cf", "-", "."],
                          check=True, capture_output=True).stdout
    archive.extract(OneWayReader(blob), tmp_path / "out")
    holey = (tmp_path / "out" / "holey").read_bytes()
    assert len(holey) == (1 << 20) + 3 and holey.startswith(b"start") and holey.endswith(b"end")
    assert (tmp_path / "out" / "plain").read_bytes() == b"p" * 1000


link_name = st.sampled_from(["a", "b", "d/a", "d/b", "d/e/a"])
link_target = st.one_of(
    st.sampled_from(["..", "../..", "a/..", "a/../..", "../a", "a", "d", "."]),
    st.lists(st.sampled_from(["..", "a", "b", "d", "e", "."]), min_size=1, max_size=4).map("/".join))


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(link_name, link_target, min_size=1, max_size=5))
@example({"d/a": "..", "d/b": "a/.."})  # random search finds these only now and then
@example({"d/e/a": "../..", "d/b": "e/a/../.."})
def test_whatever_symlinks_are_accepted_resolve_inside(links):
    """Random sets of relative symlinks, some pointing at each other: extraction may refuse,
    but every link it leaves resolves inside the target (e.g. with "d/a -> ..", "d/b -> a/.."
    is inside by its text but outside when resolved)."""
    members = [node(name, tarfile.SYMTYPE, target) for name, target in links.items()]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        target = base / "t"
        try:
            archive.extract(OneWayReader(make_tar(members)), target)
        except UnsafeArchive:
            pass
        assert [p.name for p in base.iterdir()] == ["t"]
        real_target = target.resolve()
        for path in target.rglob("*"):
            assert Path(os.path.realpath(path)).is_relative_to(real_target), (path, links)


# --- corruption and manifests ---------------------------------------------------------------------
@pytest.fixture
def small_archive(tmp_path) -> tuple[bytes, ArchiveInfo]:
    src = tmp_path / "small"
    (src / "base").mkdir(parents=True)
    (src / "PG_VERSION").write_text("15\n")
    (src / "base" / "rel").write_bytes(os.urandom(200_000))
    (src / "base" / "zeros").write_bytes(bytes(300_000))
    return archive_bytes(src)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -2])
def test_a_flipped_byte_is_detected(where, small_archive, tmp_path):
    data, info = small_archive
    bad = bytearray(data)
    bad[int(len(bad) * where) if where > 0 else where] ^= 0x10  # -2: in the frame checksum
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(bytes(bad)), tmp_path / "t", expected=info.files)
    with pytest.raises(CorruptArchive):  # the zstd checksum alone catches it too
        archive.extract(OneWayReader(bytes(bad)), tmp_path / "u")


@pytest.mark.parametrize("cut", [1, 4, 5, 1000, "half", "most"])
def test_a_truncated_zstd_archive_is_detected(cut, small_archive, tmp_path):
    data, _ = small_archive
    keep = {"half": len(data) // 2, "most": 100}.get(cut, None)
    short = data[:keep] if keep is not None else data[:-cut]
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(short), tmp_path / "t")


@pytest.mark.parametrize("kind", ["none", "gzip"])
def test_truncated_tar_and_gzip_archives_are_detected(kind, tmp_path):
    raw = make_tar([reg("a", b"1" * 2000), reg("b", b"2" * 2000)])
    members = list(tarfile.open(fileobj=io.BytesIO(raw)))
    boundary = members[1].offset  # cut exactly before the second member's header
    # before a header, inside a header, inside the last file's data, inside the first's
    for short, inside_data in ((raw[:boundary], False), (raw[:boundary + 100], False),
                               (raw[:5000], True), (raw[:700], True)):
        blob = compress(short, kind) if kind == "gzip" else short
        with pytest.raises(CorruptArchive, match="corrupt or truncated" if inside_data else None):
            archive.extract(OneWayReader(blob), tmp_path / f"t{len(short)}")
    if kind == "gzip":
        with pytest.raises(CorruptArchive):
            archive.extract(OneWayReader(gzip.compress(raw)[:-10]), tmp_path / "gz")


@pytest.mark.parametrize("kind, at", [("gzip", -6), ("zstd", -2)])
def test_a_bad_trailer_after_long_tar_padding_is_detected(kind, at, small_archive, tmp_path):
    """The CRC / checksum sits after the tar's end, here beyond 200 kB of (legal) zero padding:
    extract must read on to it, and to the end of the stream."""
    data, _ = small_archive
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read() + bytes(200 << 10)
    good = compress(raw, kind)
    stream = OneWayReader(good)
    archive.extract(stream, tmp_path / "good")
    assert stream.at_eof()
    bad = bytearray(good)
    bad[at] ^= 0xFF  # in the gzip CRC32/ISIZE trailer, in the zstd frame checksum
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(bytes(bad)), tmp_path / "bad")


def test_data_longer_than_its_header_says_is_corrupt(tmp_path):
    raw = bytearray(make_tar([reg("a", b"1" * 100), reg("b", b"2" * 100)]))
    # grow "a" by a block of junk: tarfile then finds garbage where the next header should be
    raw[512:512] = os.urandom(512)
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(bytes(raw)), tmp_path / "t")


@pytest.mark.parametrize("blob", [b"", b"not an archive at all" * 50, b"\x28\xb5\x2f\xfd" + b"\0" * 20,
                                  b"\x1f\x8b" + b"\0" * 20])
def test_garbage_is_corrupt(blob, tmp_path):
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(blob), tmp_path / "t")


def test_trailing_data_after_the_zstd_frame_is_corrupt(small_archive, tmp_path):
    data, _ = small_archive
    with pytest.raises(CorruptArchive):
        archive.extract(OneWayReader(data + b"junk"), tmp_path / "t")


def test_manifest_mismatches_name_the_file(small_archive, tmp_path):
    data, info = small_archive
    files = info.files

    def run(expected, n):
        with pytest.raises(CorruptArchive) as caught:
            archive.extract(OneWayReader(data), tmp_path / f"t{n}", expected=expected)
        return str(caught.value)

    changed = dict(files, **{"base/rel": dataclasses.replace(files["base/rel"], sha256="0" * 64)})
    assert "base/rel" in run(changed, 1)
    resized = dict(files, **{"base/zeros": FileEntry(1, files["base/zeros"].sha256)})
    assert "base/zeros" in run(resized, 2)
    missing = {k: v for k, v in files.items() if k != "base/zeros"}
    assert "base/zeros" in run(missing, 3)  # in the archive, not in the manifest
    extra = dict(files, **{"global/pg_control": FileEntry(8192, "1" * 64)})
    assert "global/pg_control" in run(extra, 4)  # in the manifest, not in the archive
    assert archive.extract(OneWayReader(data), tmp_path / "ok", expected=files) == files


# --- the target -------------------------------------------------------------------------------------
def test_target_must_be_new_or_empty(small_archive, tmp_path):
    data, info = small_archive
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(StorageError, match="not empty"):
        archive.extract(OneWayReader(data), busy)
    assert (busy / "x").read_text() == "keep"

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    assert archive.extract(OneWayReader(data), empty) == info.files
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700

    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(StorageError):
        archive.extract(OneWayReader(data), tmp_path / "link")
    assert list(real.iterdir()) == []

    with pytest.raises(ValueError):
        archive.extract(OneWayReader(data), tmp_path / "new", compression="lz4")


# --- find_pgdata_root --------------------------------------------------------------------------------
def test_find_pgdata_root(tmp_path):
    direct = tmp_path / "direct"
    (direct / "base" / "1").mkdir(parents=True)
    (direct / "PG_VERSION").write_text("15\n")
    (direct / "base" / "1" / "PG_VERSION").write_text("15\n")
    assert archive.find_pgdata_root(direct) == direct

    one = tmp_path / "one"
    shutil.copytree(direct, one / "pgdata", symlinks=True)
    (one / "README").write_text("a loose file does not matter")
    assert archive.find_pgdata_root(one) == one / "pgdata"

    two = tmp_path / "two"
    shutil.copytree(direct, two / "backup" / "data", symlinks=True)
    assert archive.find_pgdata_root(two) == two / "backup" / "data"

    none = tmp_path / "none"
    (none / "a" / "b").mkdir(parents=True)
    (none / "a" / "b" / "pg_control").write_text("")
    with pytest.raises(StorageError, match="no PG_VERSION"):
        archive.find_pgdata_root(none)

    two_roots = tmp_path / "two_roots"
    shutil.copytree(direct, two_roots / "x", symlinks=True)
    shutil.copytree(direct, two_roots / "y", symlinks=True)
    with pytest.raises(StorageError):
        archive.find_pgdata_root(two_roots)

    via_link = tmp_path / "via_link"
    via_link.mkdir()
    os.symlink(direct, via_link / "elsewhere")
    with pytest.raises(StorageError, match="no PG_VERSION"):
        archive.find_pgdata_root(via_link)


# --- hashing wrappers --------------------------------------------------------------------------------
def test_hashing_reader_and_writer():
    payload = os.urandom(100_000)
    reader = HashingReader(io.BytesIO(payload))
    parts = [reader.read(3000) for _ in range(40)]
    assert b"".join(parts) == payload and reader.read(10) == b""
    assert reader.bytes == len(payload) and reader.sha256.hexdigest() == sha(payload)

    class Dribble(io.RawIOBase):  # accepts at most 1000 bytes per write
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b[:1000])
            return min(len(b), 1000)

    sink = Dribble()
    writer = HashingWriter(sink)
    assert writer.write(payload[:5000]) == 5000
    assert writer.write(memoryview(payload)[5000:]) == len(payload) - 5000
    assert bytes(sink.data) == payload
    assert writer.bytes == len(payload) and writer.sha256.hexdigest() == sha(payload)


@pytest.mark.parametrize("when", ["creating a file", "writing it"])
def test_no_space_while_extracting_is_disk_full_wherever_it_happens(when, tmp_path, monkeypatch):
    """ENOSPC when a file is created used to be a plain StorageError (the client got XX000)
    while ENOSPC when writing one was DiskFull (53100): the caller sees DiskFull either way."""
    import errno as errno_mod

    from storage import extract as extract_mod
    from storage.errors import DiskFull

    data = make_tar([reg("PG_VERSION", b"15\n"), reg("base/1/1234", b"x" * 100)])
    real_open = os.open

    def full_open(path, flags, *args, **kw):
        if when == "creating a file" and flags & os.O_CREAT and str(path) == "1234":
            raise OSError(errno_mod.ENOSPC, "No space left on device")
        return real_open(path, flags, *args, **kw)

    def full_write(fd, data):
        raise OSError(errno_mod.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract_mod.os, "open", full_open)
    if when == "writing it":
        monkeypatch.setattr(extract_mod.os, "write", full_write)
    with pytest.raises(DiskFull, match="No space left"):
        archive.extract(io.BytesIO(data), tmp_path / "out", compression="none")
