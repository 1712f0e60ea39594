"""The admin API's bearer token when `admin_token` is not set: generated once into
`<data_root>/.admin-token` (mode 0600, owned by the gateway's OS user) and required like a
configured one. Local users other than the gateway's cannot read it, so a loopback admin API
is no longer open to every process on the machine; `pgsni` commands run as the gateway's user
read it from the same data root. The name begins with a dot: never a database id."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from gateway.config import Settings

FILE_NAME = ".admin-token"


class TokenFileError(OSError):
    """The token file exists but cannot be used (unreadable, not a private regular file)."""


def token_path(settings: Settings) -> Path:
    return settings.data_path / FILE_NAME


def ensure(settings: Settings) -> str:
    """The admin API's token: `admin_token`, or the data root's generated one, made on first
    use (several workers starting at once agree on one: the first link wins)."""
    if settings.admin_token:
        return settings.admin_token
    path = token_path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        return _read(path, strict=True)
    tmp = path.with_name(f"{FILE_NAME}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs is the token
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read(path, strict=True)


def for_client(settings: Settings) -> str | None:
    """The token a command sends to the gateway of these settings: `admin_token`, or the data
    root's file (None when there is none: that gateway has not started yet)."""
    if settings.admin_token:
        return settings.admin_token
    try:
        return _read(token_path(settings), strict=False)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise TokenFileError(f"cannot read the admin token {token_path(settings)}: run the command "
                             "as the gateway's OS user, or set admin_token (PGSNI_ADMIN_TOKEN) "
                             "for both") from None


def _read(path: Path, *, strict: bool) -> str:
    """The token in `path`. The gateway (`strict`) trusts only a private file of its own: one
    another user could have planted or read is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if strict and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise TokenFileError(f"{path} must be a regular file of this user (uid {os.geteuid()}) "
                                 "with mode 0600: remove it and restart the gateway to make a new one")
        token = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(token) < 16:
        raise TokenFileError(f"{path} holds no usable token (fewer than 16 characters): remove it "
                             "and restart the gateway to make a new one")
    return token
