"""One Postgres server process: start it on a private unix socket, wait until it is ready,
stop it (fast shutdown, then immediate, then kill), and clean up after a crash."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from storage.osuser import RunAs, clean_env

from . import dbroles
from .cgroups import Group

log = logging.getLogger("pgsni.postgres")

SOCKET_NAME = ".s.PGSQL.5432"
MAX_SOCKET_PATH = 107


# what every instance runs with besides its paths and sockets; bench/env.py starts its direct
# Postgres with the same, so that benchmarks compare like with like
START_OPTIONS = {
    "logging_collector": "off",
    "password_encryption": "scram-sha-256",
    # a client that vanishes mid-query closes the gateway's backend connection; without this
    # check a long query would run on (and hold its locks) until it next writes
    "client_connection_check_interval": "1000",
}


# settings that a data directory's own configuration (an imported postgresql.conf, an ALTER
# SYSTEM from when its tenant was a superuser) must not choose: values given on the command
# line win over both files. None of them may run a program, load a library or connect out.
SAFE_SETTINGS = {
    "archive_mode": "off", "archive_command": "", "archive_library": "",
    "restore_command": "", "archive_cleanup_command": "", "recovery_end_command": "",
    "primary_conninfo": "", "shared_preload_libraries": "", "session_preload_libraries": "",
    "local_preload_libraries": "", "dynamic_library_path": "$libdir", "jit_provider": "llvmjit",
    "ssl": "off", "ssl_passphrase_command": "", "external_pid_file": "",
}


# the same, for settings that only later majors have (an older server refuses an unknown one)
SAFE_SETTINGS_FROM = {18: {"extension_control_path": "$system"}}


def safe_settings(pgdata: Path) -> dict[str, str]:
    """SAFE_SETTINGS with those of the data directory's major (from its PG_VERSION)."""
    try:
        major = int((pgdata / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        major = 0  # the server cannot start either; its own error says why
    out = dict(SAFE_SETTINGS)
    for since, pins in SAFE_SETTINGS_FROM.items():
        if major >= since:
            out.update(pins)
    return out


class PostgresError(Exception):
    pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _pid_file_state(pgdata: Path) -> tuple[int | None, str]:
    """(pid, status) from postmaster.pid; status is 'ready' once connections are accepted."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None, ""
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return pid, status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


async def stop_orphan(pgdata: Path, timeout: float) -> bool:
    """Stop a postmaster left running on `pgdata` by an earlier gateway that died.
    The caller holds the database's lock, so a live postmaster here belongs to no one."""
    pid, _ = _pid_file_state(pgdata)
    if pid is None or not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not cmdline or not cmdline[0].endswith(b"postgres") or str(pgdata).encode() not in cmdline:
        return False  # the pid was reused by something else; Postgres will sort out the stale file
    log.warning("stopping leftover postmaster %d on %s", pid, pgdata)
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            await asyncio.sleep(0.02)
    return not _alive(pid)


class ChildProcess:
    """A `subprocess.Popen` child whose exit the event loop notices through a pidfd.

    uvloop's subprocess support cannot switch users; Popen can (user=, group=)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.popen.wait()
        if not self._exited.done():
            self._exited.set_result(self.popen.returncode)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if not self._exited.done():
            os.kill(self.pid, sig)


class PostgresProcess:
    """A postmaster listening only on `<socket_dir>/.s.PGSQL.5432` (no TCP)."""

    def __init__(self, bindir: Path, pgdata: Path, socket_dir: Path, log_path: Path,
                 run_as: RunAs, options: dict[str, str], *, maintenance: bool = False) -> None:
        self.bindir, self.pgdata, self.socket_dir = bindir, pgdata, socket_dir
        self.log_path, self.run_as, self.options = log_path, run_as, options
        self.maintenance = maintenance  # gateway/compute/securing.py: only the gateway's roles log in
        self.cgroup: Group | None = None  # resource limits (gateway/compute/cgroups.py), if any
        self.proc: ChildProcess | None = None
        self.stopping = False
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise PostgresError(f"socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} "
                                "bytes; set a shorter socket_dir")

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / SOCKET_NAME

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _argv(self) -> list[str]:
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            **START_OPTIONS,
            **safe_settings(self.pgdata),
            # pinned: a postgresql.conf from an imported archive must not point elsewhere
            "data_directory": str(self.pgdata),
            "hba_file": str(self.pgdata / "pg_hba.conf"),
            "ident_file": str(self.pgdata / "pg_ident.conf"),
            **self.options,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def write_auth_files(self) -> None:
        """pg_hba.conf and pg_ident.conf are the gateway's, written at every start: whatever
        an archive or an earlier tenant left there does not count."""
        self.run_as.write_file(self.pgdata / "pg_hba.conf", dbroles.hba(maintenance=self.maintenance))
        self.run_as.write_file(self.pgdata / "pg_ident.conf", dbroles.ident(
            dbroles.gateway_os_user(), maintenance=self.maintenance))

    async def start(self, timeout: float) -> None:
        self.run_as.make_dir(self.socket_dir)
        self.write_auth_files()
        if self.log_path.exists() and self.log_path.stat().st_size > 10 << 20:
            self.log_path.replace(self.log_path.with_suffix(".log.1"))
        # private: the log can hold statements, role names and errors quoting data
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._limit(Group.create)
        with open(fd, "ab") as logf:
            self.proc = ChildProcess(subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=clean_env(), **self.run_as.popen_kwargs()))
        self._limit(Group.add, self.proc.pid)  # before it forks its first child, as a rule
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
            self._limit(Group.adopt, self.proc.pid)  # and any it forked before the move
        except asyncio.TimeoutError:
            reason = _tail(self.log_path)
            await self.stop(5.0)
            raise PostgresError(f"not ready after {timeout:g}s" + (f": {reason}" if reason else "")) from None
        except PostgresError:
            await self.stop(5.0)
            raise

    def _limit(self, step, *args) -> None:
        """One step of putting the instance into its cgroup; a failure costs the limits (with
        a log line), never the start."""
        if self.cgroup is None:
            return
        try:
            step(self.cgroup, *args)
        except OSError as e:
            log.warning("resource limits for %s are off: %s", self.pgdata, e)
            self.cgroup = None

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        delay = 0.002
        while True:
            if self.proc.returncode is not None:
                raise PostgresError(f"exited with code {self.proc.returncode}: {_tail(self.log_path)}")
            pid, status = _pid_file_state(self.pgdata)
            if pid == self.proc.pid and status == "ready":
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.005)  # ready is 40-150 ms away: poll finely, it is one small read

    async def stop(self, timeout: float) -> None:
        """Fast shutdown (SIGINT); immediate (SIGQUIT) if it hangs; SIGKILL as a last resort."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self.kill_group()
            return
        self.stopping = True
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), wait)
                break
            except asyncio.TimeoutError:
                log.warning("postgres %s did not stop after %s; escalating", self.pgdata, sig.name)
        self.kill_group()

    def kill_group(self) -> None:
        """Kill what is left of the process group: backends orphaned by a dead postmaster would
        otherwise hold shared memory and block the next start. Then remove its cgroup."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup is not None and self.proc.returncode is not None:
            self.cgroup.remove()
