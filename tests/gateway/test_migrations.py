"""gateway/ops/migrations.py without a database: file names and numeric version order, every file
parsed up front, and the checks against the history (edited, out-of-order, missing files)."""

from __future__ import annotations

import pytest

from gateway.ops.migrations import Applied, MigrationError, checksum, discover, plan, version_key
from gateway.ops.sqlfiles import SqlFileError


def _dir(tmp_path, files: dict[str, str]):
    tmp_path.mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_versions_compare_numerically():
    keys = ["10", "2_1", "1.1", "1", "1.10", "1.9"]
    assert sorted(keys, key=version_key) == ["1", "1.1", "1.9", "1.10", "2_1", "10"]
    assert version_key("1.0") == version_key("1") == (1,)
    assert version_key("2_1") == version_key("2.1")


def test_discover_orders_parses_and_describes(tmp_path):
    d = _dir(tmp_path, {"V10__ten.sql": "select 10;", "V2__two_words.sql": "select 2; select 22;",
                        "V1.5__half.sql": "select 1;", "notes.sql": "select 0;", "README": "x"})
    migrations, warnings = discover(d)
    assert [m.version for m in migrations] == ["1.5", "2", "10"]
    assert migrations[1].description == "two words" and len(migrations[1].statements) == 2
    assert warnings == ["notes.sql: ignored (not V<version>__<description>.sql)"]


def test_discover_refuses_bad_names_duplicates_and_syntax(tmp_path):
    with pytest.raises(MigrationError, match="two underscores"):
        discover(_dir(tmp_path / "a", {"V1_init.sql": "select 1;"}))
    with pytest.raises(MigrationError, match="same version"):
        discover(_dir(tmp_path / "b", {"V1__a.sql": "select 1;", "V1.0__b.sql": "select 1;"}))
    with pytest.raises(SqlFileError, match=r"V2__bad\.sql:2:1: syntax error"):
        discover(_dir(tmp_path / "c", {"V1__ok.sql": "select 1;", "V2__bad.sql": "select 1;\nselec 2;"}))
    with pytest.raises(MigrationError, match="not a directory"):
        discover(tmp_path / "missing")


def test_plan_checks_history(tmp_path):
    d = _dir(tmp_path, {"V1__a.sql": "select 1;\n", "V2__b.sql": "select 2;\n", "V3__c.sql": "select 3;\n"})
    migrations, _ = discover(d)
    row = lambda v, text: Applied(v, f"V{v}__x.sql", checksum(text), "2026-01-01")  # noqa: E731
    pending, warnings = plan(migrations, [row("1", "select 1;\r\n")])  # CRLF: the same migration
    assert [m.version for m in pending] == ["2", "3"] and warnings == []
    with pytest.raises(MigrationError, match=r"V2__b\.sql: checksum differs"):
        plan(migrations, [row("1", "select 1;\n"), row("2", "select 2 + 0;\n")])
    with pytest.raises(MigrationError, match=r"V2__b\.sql: version 2 is older"):
        plan(migrations, [row("1", "select 1;\n"), row("3", "select 3;\n")])
    pending, warnings = plan(migrations, [row("0.5", "gone")])
    assert len(pending) == 3 and "0.5" in warnings[0] and "not in the directory" in warnings[0]
