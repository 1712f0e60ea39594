"""Role metadata saved beside each database: the SCRAM verifiers from `pg_authid`, so the
gateway can authenticate a client before it wakes (or restores) the database."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import write_atomic


@dataclass(frozen=True)
class Role:
    name: str
    verifier: str | None  # "SCRAM-SHA-256$..." or None (no password, or not SCRAM)
    can_login: bool = True
    valid_until: str | None = None  # ISO 8601, or None for no expiry
    superuser: bool | None = None  # None: saved by a pgsni that did not record it

    def expired(self, now: dt.datetime | None = None) -> bool:
        if not self.valid_until:
            return False
        now = now or dt.datetime.now(dt.timezone.utc)
        until = dt.datetime.fromisoformat(self.valid_until)
        if until.tzinfo is None:  # a hand-written file without an offset: read it as UTC
            until = until.replace(tzinfo=dt.timezone.utc)
        return until <= now


def save(path: Path, roles: dict[str, Role]) -> None:
    """Write atomically (temp file, fsync, rename) with mode 0600: verifiers are secrets."""
    data = json.dumps({"roles": [asdict(r) for r in roles.values()]}, indent=1, sort_keys=True)
    write_atomic(path, data.encode())


def load(path: Path) -> dict[str, Role] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return {r["name"]: Role(**r) for r in data["roles"]}
