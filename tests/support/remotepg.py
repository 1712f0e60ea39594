"""A real, separate Postgres server on 127.0.0.1:<free port> with TLS (a trustme certificate) and
SCRAM over `hostssl` only: the "external" server that remote routes point at."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

from storage.osuser import RunAs

from .pginstalls import installs
from .ports import free_port

REMOTE_NAME = "pg.remote.test"  # the name in the remote server's certificate
REMOTE_PASSWORD = "remote-only-pw"  # differs from the gateway tests' password on purpose


class RemotePostgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pgsni-remote-", dir="/tmp"))
        os.chmod(self.root, 0o711)
        self.pgdata = self.root / "pgdata"
        self.port = free_port()
        self.run_as = RunAs.resolve("postgres")
        self.bindir = installs().with_ssl().bindir  # a remote speaks TLS itself
        self.proc: subprocess.Popen | None = None
        ca = trustme.CA()
        cert = ca.issue_cert(REMOTE_NAME, "127.0.0.1")
        self.ca_path = self.root / "remote-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path, self.key_path = self.root / "server.crt", self.root / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        cert.private_key_pem.write_to_path(str(self.key_path))
        for path in (self.cert_path, self.key_path):
            os.chmod(path, 0o600)
            self.run_as.chown(path)

    def start(self) -> "RemotePostgres":
        pwfile = self.root / "pw"
        pwfile.write_text(REMOTE_PASSWORD + "\n")
        self.run_as.chown(pwfile)
        self.run_as.chown(self.root)
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                        "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, **self.run_as.popen_kwargs())
        (self.pgdata / "pg_hba.conf").write_text(
            "hostssl all md5user 127.0.0.1/32 md5\n"  # roles for the older methods
            "hostssl all clearuser 127.0.0.1/32 password\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n")
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                    "unix_socket_directories": str(self.root), "ssl": "on",
                    "ssl_cert_file": str(self.cert_path), "ssl_key_file": str(self.key_path),
                    "password_encryption": "scram-sha-256", "fsync": "off",
                    "logging_collector": "off"}
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with open(self.root / "postgres.log", "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, **self.run_as.popen_kwargs())
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("remote Postgres did not start: "
                                   + (self.root / "postgres.log").read_text()[-2000:])
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) > 7 and lines[7].strip() == "ready"

    def dsn(self, password: str = REMOTE_PASSWORD, user: str = "postgres") -> str:
        """A direct connection (not through the gateway), verified against the remote's CA."""
        return (f"host={REMOTE_NAME} hostaddr=127.0.0.1 port={self.port} user={user} "
                f"password={password} dbname=postgres sslmode=verify-full sslrootcert={self.ca_path}")

    def sql(self, query: str) -> str:
        out = subprocess.run(["psql", self.dsn(), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", query],
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout.strip()

    def route(self, **kw) -> dict:
        """A remote_routes entry for this server."""
        base = {"host": "127.0.0.1", "port": self.port, "sslmode": "verify-full",
                "sslrootcert": str(self.ca_path), "server_name": REMOTE_NAME}
        base.update(kw)
        return base

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
