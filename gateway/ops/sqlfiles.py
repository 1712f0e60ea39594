"""SQL files checked before they run: split into statements with Postgres' own parser (pglast),
so a syntax error is reported as `file:line:column: message` before anything executes, and run
in order on a psycopg connection, one transaction per file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import psycopg
from pglast import parser as pg_parser


class SqlFileError(Exception):
    """A problem at a place in an SQL file: a syntax error, or an error Postgres raised while
    running one of its statements (then `sqlstate` is set)."""

    def __init__(self, path: str | PathLike, line: int, column: int, message: str,
                 sqlstate: str | None = None) -> None:
        super().__init__(path, line, column, message)
        self.path, self.line, self.column, self.message = str(path), line, column, message
        self.sqlstate = sqlstate

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}" if self.line else self.path
        return f"{where}: {self.message}"


class Statement(str):
    """One statement's text, knowing where it starts in its file (1-based line and column)."""

    line: int
    column: int
    offset: int  # character offset of the statement in the file

    def __new__(cls, text: str, source: str, offset: int) -> "Statement":
        self = super().__new__(cls, text)
        self.offset = offset
        self.line, self.column = line_column(source, offset)
        return self


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of the character at `offset` (clamped to the text)."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def read_sql(path: str | PathLike) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SqlFileError(path, 0, 0, f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = line_column(data[: e.start].decode("utf-8", "replace"), e.start)
        raise SqlFileError(path, line, column, "not UTF-8 text") from None


def parse_sql_text(text: str, name: str | PathLike = "<sql>") -> list[Statement]:
    """The statements of `text`, in order, or SqlFileError at the first syntax error."""
    try:
        pg_parser.parse_sql(text)
        slices = pg_parser.split(text, with_parser=True, only_slices=True)
    except pg_parser.ParseError as e:
        message, index = (e.args + (None, None))[:2]
        # pglast gives a character offset; none for "at end of input"
        offset = index if isinstance(index, int) else len(text.rstrip())
        line, column = line_column(text, offset)
        raise SqlFileError(name, line, column, str(message)) from None
    return [Statement(text[s], text, s.start) for s in slices]


def parse_sql_file(path: str | PathLike) -> list[Statement]:
    """Read and parse one SQL file (UTF-8): its statements, or SqlFileError."""
    return parse_sql_text(read_sql(path), path)


@dataclass(frozen=True)
class SqlFile:
    path: str
    statements: list[Statement]


def parse_files(paths: Iterable[str | PathLike]) -> list[SqlFile]:
    """Parse every file first, so nothing runs unless all of them are valid."""
    return [SqlFile(str(p), parse_sql_file(p)) for p in paths]


def execution_error(path: str, stmt: Statement, e: psycopg.Error) -> SqlFileError:
    """An error Postgres raised for `stmt`, placed in its file (the error's own position in
    the statement when Postgres gives one, else the statement's start)."""
    diag = e.diag
    offset = stmt.offset
    if diag.statement_position and diag.statement_position.isdigit():
        offset += int(diag.statement_position) - 1
    text = str(e).strip()
    primary = diag.message_primary or (text.splitlines()[0] if text else type(e).__name__)
    severity = diag.severity_nonlocalized or diag.severity or "ERROR"
    message = f"{severity}: {primary}" + (f" (SQLSTATE {diag.sqlstate})" if diag.sqlstate else "")
    if diag.message_detail:
        message += f"\nDETAIL: {diag.message_detail}"
    err = SqlFileError(path, 0, 0, message, sqlstate=diag.sqlstate)
    err.line, err.column = _position(stmt, offset)
    return err


def _position(stmt: Statement, offset: int) -> tuple[int, int]:
    before = str(stmt)[: max(0, offset - stmt.offset)]
    if "\n" not in before:
        return stmt.line, stmt.column + len(before)
    return stmt.line + before.count("\n"), len(before) - before.rfind("\n")


def run_files(conn: psycopg.Connection, files: Sequence[SqlFile]) -> None:
    """Run each file's statements in order, each file in its own transaction (committed when
    the file succeeds). The first error rolls its file back and raises SqlFileError."""
    for f in files:
        try:
            with conn.transaction():
                for stmt in f.statements:
                    _execute(conn, f.path, stmt)
        except Failed as failed:
            raise failed.error from None


async def run_files_async(conn: psycopg.AsyncConnection, files: Sequence[SqlFile]) -> None:
    """`run_files` for an async connection."""
    for f in files:
        try:
            async with conn.transaction():
                await execute_async(conn, f.path, f.statements)
        except Failed as failed:
            raise failed.error from None


async def execute_async(conn: psycopg.AsyncConnection, path: str, statements: Sequence[Statement]) -> None:
    """Run statements in the caller's transaction; the first error raises Failed (leave the
    transaction block with it, so it rolls back, then raise its `.error`)."""
    for stmt in statements:
        try:
            await conn.execute(str(stmt), prepare=False)
        except psycopg.Error as e:
            raise Failed(execution_error(path, stmt, e)) from e


def _execute(conn: psycopg.Connection, path: str, stmt: Statement) -> None:
    try:
        conn.execute(str(stmt), prepare=False)
    except psycopg.Error as e:
        raise Failed(execution_error(path, stmt, e)) from e


class Failed(Exception):
    """Carries the SqlFileError out of the transaction block (which then rolls back)."""

    def __init__(self, error: SqlFileError) -> None:
        super().__init__(str(error))
        self.error = error


_PSQL_META = re.compile(r"^\s*\\")
_COPY_STDIN = re.compile(r"^\s*COPY\b.*\bFROM\s+stdin\b.*;\s*$", re.IGNORECASE)
# what a plain pg_dump (15.14, 16.10, 17.6, 18 and later) puts around its script
_DUMP_RESTRICT = re.compile(r"^\\(un)?restrict [A-Za-z0-9]+\s*$")


def psql_lines(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Each line of a psql script with what it is to psql: "copy" (the data of a `COPY ...
    FROM stdin;` up to its `\\.` line), "meta" (a line beginning with a meta-command) or "sql"
    (which may still hold a meta-command after its SQL: psql's own lexer decides that)."""
    in_copy = False
    for line in lines:
        if in_copy:
            in_copy = line.rstrip("\r\n") != "\\."
            yield "copy", line
        elif _PSQL_META.match(line):
            yield "meta", line
        else:
            in_copy = bool(_COPY_STDIN.match(line))
            yield "sql", line


def without_psql_parts(text: str) -> str:
    """`text` with psql meta-commands (`\\connect`, `\\restrict`, ...) and the data of
    `COPY ... FROM stdin;` blocks blanked out line by line (line numbers stay), so that what is
    left of a psql script such as a plain pg_dump can be checked by the SQL parser."""
    return "\n".join(line if kind == "sql" else "" for kind, line in psql_lines(text.split("\n")))


def psql_meta_command(path: str | PathLike) -> SqlFileError | None:
    """The first line of a psql script that begins with a meta-command other than a plain
    pg_dump's `\\restrict` / `\\unrestrict` lines, as an error to raise (None if none).
    Streams the file: any size."""
    with open(path, "rb") as f:
        lines = (raw.decode("latin-1") for raw in f)  # bytes as they are: any encoding
        for n, (kind, line) in enumerate(psql_lines(lines), 1):
            if kind == "meta" and not _DUMP_RESTRICT.match(line):
                command = line.strip().split(None, 1)[0]
                return SqlFileError(path, n, 1, f"psql meta-command {command}: an uploaded script "
                                                f"must be SQL only (meta-commands would run on the "
                                                f"gateway's machine)")
    return None


def restricted_script(path: str | PathLike) -> Iterator[bytes]:
    """The bytes of a psql script for a psql in restricted mode (`\\restrict` with a key of
    the caller's): a plain pg_dump's own `\\restrict` / `\\unrestrict` lines are blanked (line
    numbers stay), as psql refuses them there; every other meta-command stays, for that psql
    to refuse."""
    with open(path, "rb") as f:
        for kind, line in psql_lines(raw.decode("latin-1") for raw in f):
            if kind == "meta" and _DUMP_RESTRICT.match(line):
                line = "\n" if line.endswith("\n") else ""
            yield line.encode("latin-1")
