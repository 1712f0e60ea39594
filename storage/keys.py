"""Object keys: the one set of rules every backend enforces, so that a bucket written through
the S3 API can also be used as a directory (s3fs) and the other way round."""

from __future__ import annotations

from .errors import StorageError

MAX_KEY_BYTES = 1024  # the S3 limit
MAX_COMPONENT_BYTES = 200  # leaves room for ".<name>.etag.tmp-<token>" under NAME_MAX (255)


def validate_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise StorageError."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: empty")
    _check_chars(key, "key")
    if key.startswith("/") or key.endswith("/"):
        raise StorageError(f"invalid storage key {key!r}: leading or trailing '/'")
    for part in key.split("/"):
        _check_component(key, part, "key")
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix for list(): "" or the start of a key (it may end inside a component, or with
    '/'). Raises StorageError for anything no valid key could start with."""
    if not isinstance(prefix, str):
        raise StorageError(f"invalid storage prefix {prefix!r}")
    if not prefix:
        return prefix
    _check_chars(prefix, "prefix")
    if prefix.startswith("/"):
        raise StorageError(f"invalid storage prefix {prefix!r}: leading '/'")
    parts = prefix.split("/")
    for part in parts[:-1]:  # complete components
        _check_component(prefix, part, "prefix")
    if parts[-1].startswith("."):
        raise StorageError(f"invalid storage prefix {prefix!r}: component starts with '.'")
    return prefix


def normalize_root_prefix(prefix: str) -> str:
    """A backend's own prefix ("", "a", "a/b/") as a validated path without slashes at
    either end."""
    p = (prefix or "").strip("/")
    if p:
        validate_key(p)
    return p


def _check_chars(s: str, what: str) -> None:
    if any(ord(c) < 0x20 or c == "\x7f" for c in s):
        raise StorageError(f"invalid storage {what} {s!r}: NUL or control character")
    if "\\" in s:
        raise StorageError(f"invalid storage {what} {s!r}: backslash")
    if len(s.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise StorageError(f"invalid storage {what}: longer than {MAX_KEY_BYTES} bytes")


def _check_component(s: str, part: str, what: str) -> None:
    if not part:
        raise StorageError(f"invalid storage {what} {s!r}: empty path component")
    if part in (".", ".."):
        raise StorageError(f"invalid storage {what} {s!r}: '.' or '..' component")
    if part.startswith("."):
        raise StorageError(f"invalid storage {what} {s!r}: component starts with '.' (reserved)")
    if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        raise StorageError(f"invalid storage {what}: a component is longer than "
                           f"{MAX_COMPONENT_BYTES} bytes")
