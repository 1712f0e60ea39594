"""SQLAlchemy 2 through the gateway over its psycopg, pg8000 and asyncpg dialects: routing, bound
parameters and the ORM, disconnect detection after pg_terminate_backend, pool pre-ping, TLS."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import INSTALL_HINT, tls_openings
from .contract import LANDING_SQL, PLUS, TEXT, assert_lands, landing

sa = pytest.importorskip("sqlalchemy", reason=f"SQLAlchemy is not installed: {INSTALL_HINT}")
from sqlalchemy import bindparam, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

DRIVERS = ("psycopg", "pg8000", "asyncpg")
NO_HOSTADDR = {  # where SNI is covered for the driver itself
    "pg8000": "tests/clients/test_pg8000.py hands pg8000 a socket instead",
    "asyncpg": "tests/e2e/test_connect.py patches name resolution instead",
}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    qty: Mapped[int]


class Runner:
    """Runs fn(Connection) on a pooled connection of a sync engine."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def run(self, fn):
        with self.engine.connect() as conn:
            return fn(conn)

    def close(self) -> None:
        self.engine.dispose()


class AsyncRunner:
    """The same for an AsyncEngine: fn runs through run_sync, on one event loop for the engine's
    life (asyncpg connections belong to the loop that opened them)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()

    def run(self, fn):
        async def go():
            async with self.engine.connect() as conn:
                return await conn.run_sync(fn)
        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()


def driver_options(driver: str, target, *, sni: bool, direct: bool, channel_binding: bool):
    """(URL query, connect_args) that route `driver` to the target's database."""
    endpoint = f"endpoint={target.db}"
    if driver == "psycopg":  # libpq: every option is a URL query parameter
        query = {"sslmode": "verify-full", "sslrootcert": str(target.ca), "connect_timeout": "20"}
        query |= {"hostaddr": "127.0.0.1"} if sni else {"options": endpoint}
        query |= {"sslnegotiation": "direct"} if direct else {}
        query |= {"channel_binding": "require"} if channel_binding else {}
        return query, {}
    if sni:
        pytest.skip(f"SQLAlchemy's {driver} dialect connects to the host name it would send as SNI, "
                    f"which needs DNS for <id>.db.example.com ({NO_HOSTADDR[driver]})")
    ctx = target.ssl_context()
    if driver == "pg8000":
        if direct:
            pytest.skip("pg8000 1.31 always sends SSLRequest first (no direct TLS)")
        return {}, {"ssl_context": ctx, "startup_params": {"options": endpoint}, "timeout": 20}
    if channel_binding:
        pytest.skip("asyncpg speaks SCRAM-SHA-256 only (channel binding hard-coded to 'n')")
    if direct:
        ctx.set_alpn_protocols(["postgresql"])  # asyncpg leaves a caller's context as it is
    return {}, {"ssl": ctx, "server_settings": {"options": endpoint}, "timeout": 20, "direct_tls": direct}


def make_runner(driver: str, target, *, sni=False, direct=False, channel_binding=False, **engine_kw):
    query, args = driver_options(driver, target, sni=sni, direct=direct, channel_binding=channel_binding)
    url = sa.URL.create(f"postgresql+{driver}", username=target.user, password=target.password,
                        host=target.sni_name if sni else "127.0.0.1", port=target.port,
                        database="postgres", query=query)
    if driver == "asyncpg":
        pytest.importorskip("greenlet", reason=f"greenlet (for SQLAlchemy's asyncio) is not installed: {INSTALL_HINT}")
        from sqlalchemy.ext.asyncio import create_async_engine
        return AsyncRunner(create_async_engine(url, connect_args=args, **engine_kw))
    return Runner(sa.create_engine(url, connect_args=args, **engine_kw))


@pytest.fixture
def engines(target):
    made: list = []

    def make(driver: str, **kw):
        made.append(make_runner(driver, target, **kw))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


def backend_pid(conn) -> int:
    return conn.exec_driver_sql("select pg_backend_pid()").scalar_one()


def terminate(conn, pid: int) -> bool:
    # with a timeout it returns once the backend is gone, so what follows cannot race it
    return conn.exec_driver_sql(f"select pg_terminate_backend({int(pid)}, 5000)").scalar_one()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("sni", [True, False], ids=["sni", "endpoint"])
def test_lands_in_its_database(engines, target, driver, sni):
    runner = engines(driver, sni=sni)
    r = runner.run(lambda conn: landing(conn.exec_driver_sql(LANDING_SQL).one()))
    assert_lands(r, target, target.sni_name if sni else "")


def orm_round_trip(conn) -> dict:
    """Left uncommitted: the connection's rollback at close undoes it."""
    Base.metadata.drop_all(conn)
    Base.metadata.create_all(conn)
    with Session(bind=conn) as session:
        items = [Item(name=f"{TEXT} {i}", qty=i) for i in range(1, 101)]
        session.add_all(items)
        session.flush()  # batched INSERT .. RETURNING: the ids come back
        found = session.scalars(select(Item).where(Item.qty > bindparam("q")).order_by(Item.qty), {"q": 98})
        total = session.execute(sa.text("select sum(qty) from sa_items where name like :p"), {"p": f"{TEXT}%"})
        return {"ids": [item.id for item in items], "found": [(i.qty, i.name) for i in found],
                "total": total.scalar_one()}


@pytest.mark.parametrize("driver", DRIVERS)
def test_bound_parameters_and_orm(engines, driver):
    r = engines(driver).run(orm_round_trip)
    assert sorted(r["ids"]) == r["ids"] and len(set(r["ids"])) == 100
    assert r["found"] == [(99, f"{TEXT} 99"), (100, f"{TEXT} 100")]
    assert r["total"] == 5050


def terminate_and_retry(conn) -> dict:
    pid = backend_pid(conn)
    with conn.engine.connect() as other:
        terminated = terminate(other, pid)
    try:
        conn.exec_driver_sql("select 1")
        return {"pid": pid, "terminated": terminated, "invalidated": None}
    except sa.exc.DBAPIError as e:
        invalidated = e.connection_invalidated
    conn.rollback()  # an invalidated Connection reconnects on its next use
    return {"pid": pid, "terminated": terminated, "invalidated": invalidated, "new_pid": backend_pid(conn)}


@pytest.mark.parametrize("driver", DRIVERS)
def test_terminated_connection_is_detected_as_a_disconnect(engines, driver):
    """SQLAlchemy invalidates the pool's connection only if the driver's error reads as a
    disconnect, as Postgres' FATAL and close do on a direct connection."""
    r = engines(driver).run(terminate_and_retry)
    assert r["terminated"] is True
    assert r["invalidated"] is True, r
    assert r["new_pid"] != r["pid"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_pre_ping_replaces_a_terminated_pooled_connection(engines, driver):
    runner = engines(driver, pool_pre_ping=True, pool_size=1, max_overflow=0)
    pid = runner.run(backend_pid)
    assert engines(driver, poolclass=sa.pool.NullPool).run(lambda conn: terminate(conn, pid)) is True
    assert runner.run(backend_pid) != pid  # no error: the ping found the dead one


def sasl_mechanism(driver: str, conn) -> str:
    if driver == "psycopg":
        return PLUS  # libpq finishes no login without it under channel_binding=require
    return conn.connection.driver_connection.auth.mechanism_name  # pg8000 keeps its ScramClient


@pytest.mark.parametrize("driver", DRIVERS)
def test_channel_binding(engines, driver):
    runner = engines(driver, channel_binding=True)
    assert runner.run(lambda conn: (sasl_mechanism(driver, conn), conn.exec_driver_sql("select 1").scalar_one())) == (PLUS, 1)


@pytest.mark.parametrize("driver", DRIVERS)
def test_direct_tls(engines, target, driver):
    sni = driver == "psycopg"
    runner = engines(driver, direct=True, sni=sni)
    with tls_openings() as seen:
        r = runner.run(lambda conn: landing(conn.exec_driver_sql(LANDING_SQL).one()))
    assert_lands(r, target, target.sni_name if sni else "")
    assert seen, "no TLS opening seen: did gateway/proxy/server.py's 'TLS from' debug line change?"
    assert (True, target.sni_name if sni else None, "postgresql") in seen


@pytest.mark.parametrize("scenario, reason", [
    ("copy", "SQLAlchemy has no COPY API: COPY goes through the driver's own connection"),
    ("notify", "SQLAlchemy has no LISTEN/NOTIFY API"),
    ("cancel", "SQLAlchemy has no API to cancel a running statement"),
])
def test_not_in_sqlalchemy(scenario, reason):
    pytest.skip(reason)
