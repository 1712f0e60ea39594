"""Extensions the tenant role may create although their control files do not mark them
trusted (`trusted_extensions`, by default pgvector), the way hosted services allow-list them.

Postgres 18 reads extension control files along `extension_control_path` (superuser-only,
set on each instance's command line): a directory the gateway owns comes first, holding a
copy of each allowed extension's control file with `trusted = true` and links to its scripts;
`$system` follows for all the rest. `CREATE EXTENSION vector` then runs the extension's
script as the bootstrap superuser, as for any trusted extension, and the tenant owns the
extension. Before 18 there is no such path: those majors offer only what their packages
mark trusted."""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Sequence

from .pgbins import PgInstall

log = logging.getLogger("pgsni.extensions")

FIRST_MAJOR = 18
_TRUSTED = re.compile(r"^\s*trusted\s*=.*$", re.MULTILINE)


def instance_options(install: PgInstall, root: Path, allowed: Sequence[str]) -> dict[str, str]:
    """The `extension_control_path` setting for an instance of `install` (pinned even with no
    allowed extension, so that an old ALTER SYSTEM cannot choose it)."""
    if int(install.major) < FIRST_MAJOR:
        return {}
    base = root / "_extensions" / install.major
    if not _prepare(base / "extension", install.sharedir / "extension", allowed):
        return {"extension_control_path": "$system"}
    return {"extension_control_path": f"{base}:$system"}


def _prepare(target: Path, system: Path, allowed: Sequence[str]) -> bool:
    """Fill `target` with trusted copies of the allowed control files; whether any is there."""
    any_found = False
    for name in allowed:
        control = system / f"{name}.control"
        if not control.is_file():
            log.debug("trusted extension %s is not installed for %s", name, system)
            continue
        if not any_found:
            for directory in (target.parent.parent, target.parent, target):
                directory.mkdir(mode=0o755, exist_ok=True)
                os.chmod(directory, 0o755)  # the Postgres OS user reads it, only we write
            any_found = True
        text = control.read_text()
        text = _TRUSTED.sub("trusted = true", text) if _TRUSTED.search(text) else text.rstrip("\n") + "\ntrusted = true\n"
        _replace(target / control.name, lambda tmp: tmp.write_text(text))
        for script in system.glob(f"{name}--*"):
            _replace(target / script.name, lambda tmp, s=script: tmp.symlink_to(s))
    return any_found


def _replace(path: Path, make) -> None:
    """Create `path` anew in one rename: instances starting at once may be reading it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    make(tmp)
    if not tmp.is_symlink():
        os.chmod(tmp, 0o644)
    os.replace(tmp, path)
