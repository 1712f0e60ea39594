"""What the database lifecycle operations (`gateway/ops/operations.py`) return and raise: small
JSON-able dataclasses (`to_dict()`) and `OperationError`, whose `kind` maps to an HTTP status."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# kind -> HTTP status, for the admin API
STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "busy": 409,
          "unavailable": 503, "failed": 500}


class OperationError(Exception):
    """A refused or failed operation. `kind`: invalid, not_found, conflict, busy,
    unavailable (storage down) or failed (anything else, e.g. a damaged snapshot)."""

    def __init__(self, kind: str, message: str, *, hint: str | None = None) -> None:
        assert kind in STATUS, kind
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    def to_dict(self) -> dict:
        return {"error": self.kind, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return self.message + (f" ({self.hint})" if self.hint else "")


class _Result:
    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan(_Result):
    """A dry run: what the operation would change; nothing was changed."""
    action: str
    id: str
    changes: list[str] = field(default_factory=list)
    dry_run: bool = True


@dataclass
class Created(_Result):
    id: str
    user: str
    password: str  # shown once
    owner: str | None = None
    owner_password: str | None = None  # shown once
    source: str | None = None
    init_files: list[str] = field(default_factory=list)
    statements: int = 0  # statements run from init files
    version: str | None = None  # the first stored version (None if storage was unavailable)
    pg_major: str | None = None  # the Postgres major it runs


@dataclass
class Summary(_Result):
    id: str
    local: bool
    stored: bool
    running: bool
    version: str | None
    unsaved_changes: bool
    remote: str | None = None  # host:port of a remote route (remote_routes); None: a database here


@dataclass
class Version(_Result):
    version: str
    size: int
    current: bool


@dataclass
class Info(_Result):
    id: str
    local: bool
    stored: bool
    running: bool
    connections: int | None  # clients connected now (None: not known)
    local_bytes: int  # size of the local copy on disk (0 if none)
    stored_bytes: int  # size of the current version's archive (0 if none)
    version: str | None  # the current stored version
    local_version: str | None  # the version the local copy descends from
    unsaved_changes: bool
    last_used: str | None  # ISO 8601 (UTC): now if running, else when it last stopped
    pg_major: str | None
    versions: list[Version] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)  # local copies with changes storage lacks
    state: str = ""  # gateway/compute/lifecycle.py's State
    # durability=async, running in the gateway asked: {"stored_lsn", "timeline", "lag_bytes",
    # "lag_seconds", "upload_errors", "paused", "last_error"} of its WAL shipping
    wal: dict | None = None
    # what a restore to a point can reach: {"from": the oldest kept version's time, "to": now
    # minus the WAL lag while it runs here with WAL shipping, else the current version's time
    # (WAL stored after it may reach later), "rpo_seconds": the lag now, while it runs here}
    restorable: dict | None = None


@dataclass
class Deleted(_Result):
    id: str
    local_removed: bool
    objects_removed: int
    stopped: bool = False


@dataclass
class Forked(_Result):
    id: str
    source: str
    source_version: str
    version: str
    bytes: int
    source_saved: str | None = None  # a version of SRC saved first (it had unsaved changes)
    time: str | None = None  # forked SRC as it was at this time (its WAL replayed up to it)
    lsn: str | None = None  # ... or at this LSN


@dataclass
class Snapshot(_Result):
    id: str
    version: str | None  # None: nothing changed since the stored version
    saved: bool
    stopped: bool = False
    base_backup: bool = False  # an online base backup of the running database (it kept running)


@dataclass
class Restored(_Result):
    id: str
    version: str  # current now: the version restored, or a new one holding it (see base)
    saved_version: str | None  # unsaved changes saved first (the roll-back can be undone)
    stopped: bool = False
    base: str | None = None  # the stored version restored from
    time: str | None = None  # restored to this point in time (WAL replayed up to it)
    lsn: str | None = None  # restored to this LSN (WAL replayed up to the record at it)


@dataclass
class Verified(_Result):
    id: str
    version: str | None
    ok: bool
    archive_ok: bool  # archive sha256 and size, and every file's sha256, match the manifest
    files_checked: int
    started: bool
    query_ok: bool  # SELECT 1 answered
    problems: list[str] = field(default_factory=list)


@dataclass
class PasswordSet(_Result):
    id: str
    role: str
    password: str  # shown once


@dataclass
class Secured(_Result):
    """`db secure`: what changed to bring the database to the roles layout (SECURITY.md)."""
    id: str
    changed: bool  # False: it already was in the layout
    version: str | None = None  # the stored version with the result
    renamed: str | None = None  # the bootstrap superuser's former name (now pgsni_admin)
    demoted: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    transferred: int = 0
    dropped: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)  # event triggers
    settings_reset: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


@dataclass
class UpgradedResult(_Result):
    """`db upgrade`: the database now runs the newer major; the version before stays stored."""
    id: str
    from_major: str
    to_major: str
    version: str
    previous_version: str | None = None
