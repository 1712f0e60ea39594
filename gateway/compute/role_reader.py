"""Roles read fresh from a running instance for every login, as Postgres itself would check
them: `CREATE ROLE` or `ALTER ROLE ... PASSWORD` count from the next login on. One long-lived
connection per instance (the gateway's admin, over the private socket) answers; logins that
arrive while a read is under way share the next one, which starts after they arrived, so a
burst of startups costs a query or two and never a backend each. A login asks for its own
role only (a tenant may make any number of roles: what a login costs the gateway must not
grow with them); the next read then covers every name asked for meanwhile, or all roles if
anyone asked for all."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable, Generic, Iterable, TypeVar

import psycopg

T = TypeVar("T")


class RoleReader(Generic[T]):
    """`read(names)` returns the result of `query(conn, names)` run after the call began, where
    `names` covers the caller's (None: all); `connect()` opens the connection it runs on
    (again after a failure)."""

    def __init__(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection]],
                 query: Callable[[psycopg.AsyncConnection, frozenset[str] | None], Awaitable[T]],
                 timeout: float) -> None:
        self._connect, self._query, self.timeout = connect, query, timeout
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one query at a time on the one connection
        self._next: asyncio.Future | None = None  # the read that callers arriving now will share
        self._names: set[str] | None = None  # what it reads (None: every role)
        self.queries = 0  # (tests)

    async def read(self, names: Iterable[str] | None = None) -> T:
        batch = self._next
        if batch is None or batch.done():
            batch = self._next = asyncio.get_running_loop().create_future()
            self._names = None if names is None else set(names)
            asyncio.ensure_future(self._run(batch))
        elif self._names is not None:
            self._names = None if names is None else self._names | set(names)
        return await asyncio.shield(batch)  # a caller that gives up does not end the read

    async def _run(self, batch: asyncio.Future) -> None:
        async with self._lock:
            names = None
            if self._next is batch:  # from here on, callers start the next batch
                self._next, names = None, self._names
            try:
                batch.set_result(await asyncio.wait_for(
                    self._fetch(None if names is None else frozenset(names)), self.timeout))
            except Exception as e:  # noqa: BLE001 -- every waiter gets it
                batch.set_exception(e)
                await self._drop()
        if batch.exception() is not None:
            batch.exception()  # retrieved: a batch nobody awaits any more must not warn

    async def open(self) -> None:
        """Open the connection now (it is otherwise opened by the first read)."""
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await asyncio.wait_for(self._connect(), self.timeout)

    async def _fetch(self, names: frozenset[str] | None) -> T:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        self.queries += 1
        return await self._query(self._conn, names)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
