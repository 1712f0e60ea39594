"""gateway/ops/sqlfiles.py: statements split by Postgres' parser with their places, syntax errors
as file:line:column before anything runs, and files run one transaction each on a real
Postgres (an instance of a real gateway, reached over its unix socket)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from gateway.compute import dbroles
from gateway.ops import sqlfiles
from gateway.ops.sqlfiles import SqlFileError, parse_files, parse_sql_file, parse_sql_text


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- parsing ----------------------------------------------------------------------------------
def test_statements_in_order_with_their_places(tmp_path):
    path = _write(tmp_path, "init.sql", "-- setup\ncreate table t (x int);\n\n"
                  "  insert into t values (1), (2);\ncreate function f() returns int\n"
                  "language sql as $$ select 1; $$;\n")
    stmts = parse_sql_file(path)
    assert [s.split()[0] for s in stmts] == ["create", "insert", "create"]
    assert all(isinstance(s, str) for s in stmts)
    assert (stmts[1].line, stmts[1].column) == (4, 3)
    assert (stmts[2].line, stmts[2].column) == (5, 1)
    assert "select 1; $$" in stmts[2]  # the dollar-quoted body is not split


def test_syntax_error_has_file_line_and_column(tmp_path):
    path = _write(tmp_path, "init.sql", "create table t (x int);\n\nselect * frm t;\n")
    with pytest.raises(SqlFileError) as err:
        parse_sql_file(path)
    e = err.value
    assert (e.line, e.column) == (3, 10)
    assert str(e) == f'{path}:3:10: syntax error at or near "frm"'


def test_column_counts_characters_not_bytes():
    with pytest.raises(SqlFileError) as err:
        parse_sql_text("select 'ééé' as x;\nselect 'ü', 1 2;\n", "u.sql")
    assert (err.value.line, err.value.column) == (2, 15)
    assert str(err.value).startswith("u.sql:2:15: syntax error")


def test_error_at_end_of_input_points_at_the_end():
    with pytest.raises(SqlFileError) as err:
        parse_sql_text("select 1;\nselect * from t where\n", "end.sql")
    assert (err.value.line, err.value.column) == (2, 22)
    assert "end of input" in str(err.value)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(SqlFileError, match="missing.sql: cannot read"):
        parse_sql_file(tmp_path / "missing.sql")
    bad = tmp_path / "latin1.sql"
    bad.write_bytes(b"select 1;\nselect '\xe9';\n")
    with pytest.raises(SqlFileError) as err:
        parse_sql_file(bad)
    assert (err.value.line, err.value.column) == (2, 9)
    assert "not UTF-8" in str(err.value)


def test_parse_files_checks_every_file_first(tmp_path):
    good = _write(tmp_path, "1.sql", "create table a (x int);")
    bad = _write(tmp_path, "2.sql", "create table b (x int;")
    with pytest.raises(SqlFileError, match=r"2\.sql:1:22:"):
        parse_files([good, bad])


def test_psql_parts_are_blanked_keeping_lines():
    script = ("\\restrict abc\nSET x = 1;\nCOPY public.t (x) FROM stdin;\n1\n2 {\n\\.\n"
              "SELECT 1;\n\\unrestrict abc\n")
    cleaned = sqlfiles.without_psql_parts(script)
    assert cleaned.count("\n") == script.count("\n")
    stmts = parse_sql_text(cleaned)
    assert [s.split()[0] for s in stmts] == ["SET", "COPY", "SELECT"]
    assert stmts[2].line == 7


def test_meta_commands_are_found_outside_copy_data_and_dump_restrict_lines(tmp_path):
    dump = ("\\restrict Abc1\nCOPY public.t (x, y) FROM stdin;\n\\N\t1\n\\!\t2\n\\.\n"
            "SELECT 1;\n\\unrestrict Abc1\n").encode()
    path = tmp_path / "d.sql"
    path.write_bytes(dump + b"-- caf\xe9 (latin-1)\n")
    assert sqlfiles.psql_meta_command(path) is None  # COPY data may begin with a backslash
    # the dump's own restrict lines are blanked for a psql restricted under another key; the
    # rest, COPY data included, goes through byte for byte
    fed = b"".join(sqlfiles.restricted_script(path))
    assert fed == b"\n" + dump[dump.index(b"COPY"):dump.index(b"\\unrestrict")] + b"\n-- caf\xe9 (latin-1)\n"
    for line, command in (("\\! id", "\\!"), ("  \\copy t from '/etc/passwd'", "\\copy"),
                          ("\\connect other", "\\connect"), ("\\restrict k\\! id", "\\restrict")):
        path.write_text(f"select 1;\n{line}\nselect 2;\n")
        found = sqlfiles.psql_meta_command(path)
        assert found is not None and found.line == 2 and f"psql meta-command {command}:" in str(found), line


# --- running on a real Postgres ---------------------------------------------------------------
@pytest.fixture
def pg(gateway):
    """A sync psycopg connection to database app1's instance, over its unix socket."""
    gateway.create_db("app1")
    sock = gateway.gw.instances.instances["app1"].socket_dir
    with psycopg.connect(dbroles.conninfo(sock, act_as=dbroles.TENANT), autocommit=True) as conn:
        yield conn


def _tables(conn) -> list[str]:
    rows = conn.execute("select tablename from pg_tables where schemaname = 'public' "
                        "order by 1").fetchall()
    return [r[0] for r in rows]


def test_run_files_one_transaction_per_file(pg, tmp_path):
    first = _write(tmp_path, "1.sql", "create table a (x int);\ninsert into a values (1);")
    second = _write(tmp_path, "2.sql", "create table b (x int);\n\ninsert into b\n"
                    "  select y from nowhere;\n")
    files = parse_files([first, second])
    with pytest.raises(SqlFileError) as err:
        sqlfiles.run_files(pg, files)
    e = err.value
    assert e.sqlstate == "42P01"
    assert (e.path, e.line, e.column) == (str(second), 4, 17)  # Postgres' position, in the file
    assert 'relation "nowhere" does not exist' in str(e)
    # the first file committed; the failed file rolled back as a whole (table b is gone)
    assert _tables(pg) == ["a"]
    assert pg.execute("select count(*) from a").fetchone()[0] == 1


def test_run_files_async(gateway, tmp_path):
    gateway.create_db("app2")
    sock = gateway.gw.instances.instances["app2"].socket_dir
    files = parse_files([_write(tmp_path, "1.sql", "create table c (s text);\n"
                                "insert into c values ('100%');"),
                         _write(tmp_path, "2.sql", "insert into c values (1/0);")])

    async def run():
        async with await dbroles.connect(sock, act_as=dbroles.TENANT) as conn:
            with pytest.raises(SqlFileError) as err:
                await sqlfiles.run_files_async(conn, files)
            rows = await (await conn.execute("select s from c")).fetchall()
            return err.value, rows

    e, rows = asyncio.run(run())
    assert e.sqlstate == "22012" and (e.line, e.column) == (1, 1)
    assert str(e).startswith(f"{tmp_path / '2.sql'}:1:1: ERROR: division by zero")
    assert rows == [("100%",)]  # a '%' in a statement is not taken for a parameter
