"""storage=s3fs: mount a bucket with s3fs-fuse (s3fs_mount) or insist on an existing mount, and
a LocalDirBackend that refuses to work while nothing is mounted (never the local disk)."""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import StorageError, StorageUnavailable
from .keys import normalize_root_prefix
from .localdir import LocalDirBackend
from .osuser import clean_env
from .settings import StorageSettings


log = logging.getLogger("pgsni.s3fs")

MOUNT_TIMEOUT = 15.0
AWS_URL = "https://s3.amazonaws.com"
INSTALL_HINT = "s3fs-fuse is not installed (on Debian/Ubuntu: apt-get install s3fs)"


def mounted(path: str | os.PathLike) -> bool:
    """Whether a file system is mounted at `path`, from /proc/self/mountinfo: unlike
    os.path.ismount this never touches the mount, so it cannot hang on a stuck FUSE daemon,
    and it still sees a dead one ("Transport endpoint is not connected")."""
    absolute = os.path.abspath(path)  # resolve symlinks above it only: never stat the mount
    want = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split(" ", 5)[4]
                if _unescape(point) == want:
                    return True
    except OSError:
        return os.path.ismount(absolute)
    return False


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def require_mount(path: str | os.PathLike) -> None:
    """For an existing mount (s3fs_mount off): refuse unless something live is mounted at
    `path`; otherwise snapshots would silently land on the local disk underneath."""
    if not os.path.ismount(path):
        raise StorageError(
            f"storage=s3fs: nothing is mounted at storage_path {os.path.abspath(path)} (or the "
            f"mount is dead); mount the bucket there with s3fs first, or set s3fs_mount = true "
            f"to let the gateway mount it. Refusing to start: snapshots would go to the local disk")


class MountedDirBackend(LocalDirBackend):
    """A LocalDirBackend on a mount point: every operation first checks that the mount is
    still there (an unmounted or dead mount raises StorageUnavailable, nothing is written)."""

    def describe(self) -> str:
        return f"s3fs mount {self.base}"

    def _check_mounted(self) -> None:
        if not os.path.ismount(self.root):
            raise StorageUnavailable(f"storage {self.describe()} is unavailable: nothing is "
                                     f"mounted at {self.root}")

    async def _run(self, fn, *args):
        def checked(*a):
            self._check_mounted()
            return fn(*a)

        return await super()._run(checked, *args)

    async def upload_file(self, key, path, *, progress=None):
        await self._run(lambda: None)  # its first step creates directories outside _run
        return await super().upload_file(key, path, progress=progress)


class Mount:
    """A running `s3fs -f` process and its mount point. `unmount()` is idempotent."""

    def __init__(self, path: Path, proc: subprocess.Popen, output: collections.deque) -> None:
        self.path = path
        self.proc = proc
        self._output = output

    def unmount(self, timeout: float = 30.0) -> None:
        if mounted(self.path):
            _unmount(self.path, timeout)
        try:
            self.proc.wait(timeout=timeout)  # s3fs exits once unmounted
        except subprocess.TimeoutExpired:
            log.warning("s3fs for %s did not exit after unmounting; killing it", self.path)
            self.proc.kill()
            self.proc.wait(timeout=5)
        log.info("unmounted s3fs from %s", self.path)


def _unmount(path: Path, timeout: float) -> None:
    """Unmount, retrying while busy; as a last resort detach lazily (never leave it stale)."""
    if tool := shutil.which("fusermount") or shutil.which("fusermount3"):
        normal, lazy = [tool, "-u", str(path)], [tool, "-u", "-z", str(path)]
    else:
        normal, lazy = ["umount", str(path)], ["umount", "-l", str(path)]
    deadline = time.monotonic() + timeout
    err = ""
    while mounted(path):
        r = subprocess.run(normal, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env=clean_env())
        if r.returncode == 0 or not mounted(path):
            return
        err = r.stderr.strip()
        if time.monotonic() >= deadline:
            log.warning("unmounting %s failed (%s); detaching it lazily", path, err)
            subprocess.run(lazy, capture_output=True, stdin=subprocess.DEVNULL, env=clean_env())
            return
        time.sleep(0.2)


def _s3fs_options(settings: StorageSettings, passwd_file: str | None) -> list[str]:
    opts = [f"url={(settings.s3_endpoint or AWS_URL).rstrip('/')}",
            f"retries={max(1, settings.storage_attempts)}",
            f"connect_timeout={max(1, math.ceil(settings.storage_timeout))}",
            f"readwrite_timeout={max(1, math.ceil(settings.storage_timeout))}",
            f"uid={os.getuid()}", f"gid={os.getgid()}", "umask=077", "mp_umask=077",
            "dbglevel=err"]
    if os.getuid() == 0:
        opts.append("allow_other")  # for non-root users it needs user_allow_other in fuse.conf
    if settings.s3_path_style:
        opts.append("use_path_request_style")
    if settings.s3_region:
        opts.append(f"endpoint={settings.s3_region}")  # s3fs 1.90's name for the SigV4 region
    if passwd_file:
        opts.append(f"passwd_file={passwd_file}")
    for o in opts:
        if "," in o:
            raise StorageError(f"storage=s3fs: option {o.split('=')[0]} may not contain a comma")
    return ["-o", ",".join(opts)]


def _credentials(settings: StorageSettings) -> tuple[str, str] | None:
    """The key pair for s3fs's passwd file: the settings', else the standard AWS variables."""
    if settings.s3_access_key:
        return settings.s3_access_key, settings.s3_secret_key
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return (access, secret) if access and secret else None


def _s3fs_env() -> dict[str, str]:
    """s3fs's environment: clean, plus where to find ~/.aws/credentials (no keys: those go
    in the passwd file)."""
    extra = {k: os.environ[k] for k in ("HOME", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")
             if os.environ.get(k)}
    return clean_env(**extra)


def mount(settings: StorageSettings, timeout: float = MOUNT_TIMEOUT) -> Mount:
    """Mount `s3_bucket` (sub-path `s3_prefix`, as `bucket:/prefix`, so the backend on top
    uses no prefix of its own) at `storage_path` with s3fs-fuse running in the foreground
    as our child, and wait (at most `timeout`) until the mount is live.

    Credentials (s3_access_key/s3_secret_key, else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    from the gateway's environment) go to a 0600 passwd file in a private 0700 directory
    that is removed as soon as s3fs has read it: never on a command line or in s3fs's
    environment, never logged. With neither, s3fs reads ~/.aws/credentials itself. s3fs's own messages go to the `pgsni.s3fs` logger.
    Raises StorageError if s3fs is missing or the settings are unusable, and
    StorageUnavailable (with s3fs's output) if the mount does not come up."""
    exe = shutil.which("s3fs")
    if exe is None:
        raise StorageError(f"storage=s3fs with s3fs_mount: {INSTALL_HINT}")
    bucket = settings.s3_bucket
    prefix = normalize_root_prefix(settings.s3_prefix)
    path = Path(settings.storage_path).absolute()
    if not bucket:
        raise StorageError("storage=s3fs: s3_bucket is required")
    if bool(settings.s3_access_key) != bool(settings.s3_secret_key):
        raise StorageError("storage=s3fs: set both s3_access_key and s3_secret_key, or neither")
    if mounted(path):
        raise StorageError(f"storage=s3fs: storage_path {path} is already a mount point; unmount "
                           f"it (fusermount -u {path}) or set s3fs_mount = false to use that mount")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)

    private = tempfile.mkdtemp(prefix="pgsni-s3fs-")  # 0700
    try:
        passwd = None
        keys = _credentials(settings)
        if keys is not None:
            passwd = os.path.join(private, "passwd")
            fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{keys[0]}:{keys[1]}\n")
        source = f"{bucket}:/{prefix}" if prefix else bucket
        argv = [exe, source, str(path), "-f", *_s3fs_options(settings, passwd)]
        try:
            # own session: a Ctrl-C meant for the gateway must not take the mount away under it
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_s3fs_env())
        except OSError as e:
            raise StorageError(f"storage=s3fs: cannot run {exe}: {e.strerror}") from None
        output: collections.deque[str] = collections.deque(maxlen=50)
        threading.Thread(target=_pump, args=(proc, output), name="s3fs-output", daemon=True).start()
        m = Mount(path, proc, output)
        try:
            _wait_live(m, timeout)
        except BaseException:
            _abandon(m)
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)  # s3fs read the passwd file at start-up
    log.info("mounted s3fs bucket %s at %s", source, path)
    return m


def _pump(proc: subprocess.Popen, output: collections.deque) -> None:
    """Forward s3fs's output to our log (and keep the tail for start-up errors)."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            continue
        output.append(line)
        serious = any(t in line for t in ("[ERR]", "[CRT]", "[WAN]")) and "LowSetLogLevel" not in line
        log.log(logging.WARNING if serious else logging.DEBUG, "s3fs: %s", line)


def _wait_live(m: Mount, timeout: float) -> None:
    # The mount shows up in mountinfo before s3fs has checked the bucket; a stat of the mount
    # point blocks until that check is done, so do it in a thread and bound the wait.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.proc.poll() is not None:
            break
        if mounted(m.path):
            done = threading.Event()
            result: list[bool] = []

            def probe() -> None:
                result.append(os.path.ismount(m.path))
                done.set()

            threading.Thread(target=probe, name="s3fs-probe", daemon=True).start()
            done.wait(max(0.0, deadline - time.monotonic()))
            if result and result[0] and m.proc.poll() is None:
                return
            if not done.is_set():
                break
        time.sleep(0.05)
    if m.proc.poll() is None:
        reason = f"the mount did not come up within {timeout:.0f} s (is the endpoint reachable?)"
    else:
        m.proc.wait()
        reason = f"s3fs exited with status {m.proc.returncode}"
    time.sleep(0.1)  # let the output thread catch up
    tail = "\n".join(m._output) or "(no output)"
    raise StorageUnavailable(f"storage=s3fs: cannot mount bucket at {m.path}: {reason}; "
                             f"s3fs said:\n{tail}")


def _abandon(m: Mount) -> None:
    """After a failed start: stop s3fs and make sure nothing (not even a dead mount) is left."""
    if m.proc.poll() is None:
        m.proc.kill()
        m.proc.wait(timeout=5)
    if mounted(m.path):
        _unmount(m.path, timeout=2.0)


def attach(settings: StorageSettings) -> Callable[[], None] | None:
    """At gateway start for storage=s3fs: mount (returning the unmount) or check the mount."""
    if settings.s3fs_mount:
        return mount(settings).unmount
    require_mount(settings.storage_path)
    return None
