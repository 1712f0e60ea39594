"""Role metadata: saved atomically with a safe mode, loaded back, expiry understood."""

import datetime as dt
import stat

from gateway.compute.dbroles import from_rows
from storage.roles import Role, load, save


def test_save_and_load_round_trip_with_mode_0600(tmp_path):
    roles = {"postgres": Role("postgres", "SCRAM-SHA-256$4096:c2FsdA==$a2V5:c2Vy", True, None)}
    path = tmp_path / "roles.json"
    save(path, roles)
    assert load(path) == roles
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load(tmp_path / "missing.json") is None


def test_only_scram_verifiers_are_kept():
    rows = [("a", "SCRAM-SHA-256$4096:x$y:z", True, None, False), ("b", "md5abc", True, None, False),
            ("c", None, False, None, True)]
    roles = from_rows(rows)
    assert roles["a"].verifier.startswith("SCRAM-SHA-256$")
    assert roles["b"].verifier is None and roles["c"].verifier is None
    assert roles["c"].can_login is False
    assert (roles["a"].superuser, roles["c"].superuser) == (False, True)


def test_roles_saved_by_an_older_pgsni_load_with_superuser_unknown(tmp_path):
    path = tmp_path / "roles.json"
    path.write_text('{"roles": [{"name": "postgres", "verifier": null, "can_login": true, "valid_until": null}]}')
    assert load(path)["postgres"].superuser is None


def test_expiry_with_and_without_an_offset():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert Role("r", None, True, "2025-12-31T00:00:00+00:00").expired(now)
    assert Role("r", None, True, "2025-12-31T00:00:00").expired(now)
    assert not Role("r", None, True, "2026-06-01T00:00:00").expired(now)
    assert not Role("r", None, True, None).expired(now)
