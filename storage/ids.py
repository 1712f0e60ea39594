"""Database ids: lowercase DNS labels, so an id is always safe as a host label and a path part.

The one rule for ids. The proxy, operations, the CLI and the settings check with `valid_id`
and say `ID_RULE` in their own kind of error."""

from __future__ import annotations

import re

# letters, digits and inner hyphens, 1 to 63 characters
_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# what a refusal says a database id is
ID_RULE = "1-63 lowercase letters, digits or inner hyphens"


def valid_id(db_id: str) -> bool:
    """True for a lowercase DNS label that is not punycode (`xn--`)."""
    return bool(_ID.fullmatch(db_id)) and not db_id.startswith("xn--")


# stored version ids (storage/snapshots.py `new_version`: 20261122T184901.123Z-3f9a1c), as far
# as what storage names must be trusted: one path component of letters, digits, dots and
# hyphens, beginning with a letter or digit (never "." nor ".."), at most 80 characters
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]{0,79}")


def valid_version(version: object) -> bool:
    """Whether `version` (read from storage: a pointer, a manifest, a base backup's WAL prefix)
    is safe as a key part and a local file name."""
    return isinstance(version, str) and bool(_VERSION.fullmatch(version))
