"""Pool and AsyncPool behind a real PgBouncer in transaction mode, with and without the setting."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from poolkit import AsyncPool, Pool
from tests._pgbouncer import DEFAULT_POOL_SIZE, SINGLE_DB, PgBouncer

THREADS = 16
ROUNDS = 30
TASKS = 48


@pytest.fixture
def table(admin_conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table, created and dropped directly on the server."""
    name = f"pk_bouncer_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f"CREATE TABLE {name} (worker int, round int, pid int)")
    admin_conn.execute(f"GRANT ALL ON {name} TO PUBLIC")
    try:
        yield name
    finally:
        admin_conn.execute(f"DROP TABLE {name}")


def one_borrow(conn: Any, table: str, worker: int, i: int) -> int:
    """The same statements over and over (psycopg would prepare them after 5 runs), then a
    multi-statement transaction that must stay on one server connection."""
    for _ in range(8):
        row = conn.execute("SELECT %s::int + 1", (i,)).fetchone()
        assert row == (i + 1,)
    with conn.transaction():
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (worker, i, pid))
        # PgBouncer gives a transaction one server connection from BEGIN to COMMIT
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    return int(pid)


def check_results(
    admin_conn: psycopg.Connection[Any], table: str, expected: int, pids: set[int]
) -> None:
    row = admin_conn.execute(f"SELECT count(*), count(DISTINCT pid) FROM {table}").fetchone()
    assert row is not None
    assert row[0] == expected
    # every client connection of the pool was served by PgBouncer's few server connections
    assert row[1] == len(pids) <= DEFAULT_POOL_SIZE


@pytest.mark.slow
def test_pool_under_concurrency(
    pgbouncer: PgBouncer, pgbouncer_dsn: str, table: str, admin_conn: psycopg.Connection[Any]
) -> None:
    pids: set[int] = set()
    failures: list[BaseException] = []
    with Pool(
        pgbouncer_dsn, pgbouncer=True, min_size=8, max_size=12, name="bouncer-sync",
        validation_bypass=0.0, timeout=20.0,
    ) as pool:  # fmt: skip
        pool.wait(timeout=20)
        assert pool.stats()["size"] >= 2 * DEFAULT_POOL_SIZE  # more clients than servers

        def worker(w: int) -> None:
            try:
                for i in range(ROUNDS):
                    with pool.connection() as conn:
                        assert conn.prepare_threshold is None
                        pids.add(one_borrow(conn, table, w, i))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not failures, failures[:3]
        st = pool.stats()
        assert st["borrows"] == THREADS * ROUNDS
        assert st["timeouts"] == 0 and st["connections_lost"] == 0
        assert st["resets"] == 0  # no session to reset behind PgBouncer: reset="auto" is off
        assert st["validations_run"] > 0 and st["validations_failed"] == 0  # the ping works
        assert pgbouncer.server_connections() <= DEFAULT_POOL_SIZE
    check_results(admin_conn, table, THREADS * ROUNDS, pids)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_async_pool_under_concurrency(
    pgbouncer: PgBouncer, pgbouncer_dsn: str, table: str, admin_conn: psycopg.Connection[Any]
) -> None:
    pids: set[int] = set()
    async with AsyncPool(
        pgbouncer_dsn, pgbouncer=True, min_size=8, max_size=12, name="bouncer-async",
        validation_bypass=0.0, timeout=20.0,
    ) as pool:  # fmt: skip
        await pool.wait(timeout=20)

        async def task(w: int) -> None:
            for i in range(ROUNDS // 2):
                async with pool.connection() as conn:
                    assert conn.prepare_threshold is None
                    for _ in range(8):
                        cur = await conn.execute("SELECT %s::int + 1", (i,))
                        assert await cur.fetchone() == (i + 1,)
                    async with conn.transaction():
                        cur = await conn.execute("SELECT pg_backend_pid()")
                        (pid,) = await cur.fetchone()
                        await conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (w, i, pid))
                        cur = await conn.execute("SELECT pg_backend_pid()")
                        assert await cur.fetchone() == (pid,)
                    pids.add(pid)

        await asyncio.gather(*(task(w) for w in range(TASKS)))
        st = pool.stats()
        assert st["borrows"] == TASKS * (ROUNDS // 2)
        assert st["timeouts"] == 0 and st["connections_lost"] == 0 and st["resets"] == 0
        assert st["validations_failed"] == 0
    check_results(admin_conn, table, TASKS * (ROUNDS // 2), pids)


@pytest.mark.parametrize("bouncer_setting", [True, False], ids=["pgbouncer", "plain"])
def test_prepared_statements_need_the_setting(
    pgbouncer: PgBouncer, app_name: str, bouncer_setting: bool
) -> None:
    """Two clients on one server connection (the alias has pool_size=1), like any two
    clients that PgBouncer happens to route to the same server.

    Without pgbouncer=True, psycopg prepares a statement run 5 times under a name such as
    _pg3_0 on whichever server connection runs it; the other client then prepares the same
    name there and PostgreSQL refuses (or, routed elsewhere, finds no such statement).
    PgBouncer 1.21+ can track protocol-level prepared statements (max_prepared_statements);
    the suite sets it to 0, as Debian's 1.18 behaves.
    """
    dsn = pgbouncer.dsn_for(SINGLE_DB, application_name=app_name)
    # autocommit: an open transaction would keep the only server connection to itself
    with Pool(
        dsn, pgbouncer=bouncer_setting, autocommit=True, min_size=2, max_size=2, timeout=10.0
    ) as pool:
        a = pool.getconn()
        b = pool.getconn()
        try:
            for _ in range(10):
                a.execute("SELECT %s::int * 2", (21,))
            if bouncer_setting:
                for _ in range(10):
                    assert b.execute("SELECT %s::int * 2", (21,)).fetchone() == (42,)
            else:
                with pytest.raises(
                    (errors.DuplicatePreparedStatement, errors.InvalidSqlStatementName)
                ):
                    for _ in range(10):
                        b.execute("SELECT %s::int * 2", (21,))
        finally:
            pool.putconn(a)
            pool.putconn(b)


@pytest.mark.parametrize("bouncer_setting", [True, False], ids=["pgbouncer", "plain"])
def test_no_session_reset_behind_pgbouncer(
    pgbouncer: PgBouncer, app_name: str, bouncer_setting: bool
) -> None:
    """A borrow that changed session state is followed by RESET ALL (reset="auto"); behind
    PgBouncer that would run on a server connection other clients share, so pgbouncer=True
    sends nothing."""
    dsn = pgbouncer.dsn_for(application_name=app_name)
    with Pool(dsn, pgbouncer=bouncer_setting, autocommit=True, min_size=1, max_size=1) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                conn.execute("SET work_mem = '8MB'")
        st = pool.stats()
        with pool.connection() as conn:
            conn.execute("RESET work_mem")  # the shared server connection, as we found it
        assert (st["resets"] == 0) is bouncer_setting, st["resets"]


def test_session_state_leaks_between_clients(pgbouncer: PgBouncer, app_name: str) -> None:
    """What transaction pooling means for session state, and why poolkit assumes none:
    a session-level SET made by one client is seen by the next client that PgBouncer
    routes to that server connection; SET LOCAL stays inside its transaction."""
    dsn = pgbouncer.dsn_for(SINGLE_DB, application_name=app_name)
    with Pool(dsn, pgbouncer=True, autocommit=True, min_size=2, max_size=2, timeout=10.0) as pool:
        a, b = pool.getconn(), pool.getconn()
        try:
            a.execute("SET statement_timeout = '12345ms'")
            assert b.execute("SHOW statement_timeout").fetchone() == ("12345ms",)
            a.execute("RESET statement_timeout")
            with a.transaction():
                a.execute("SET LOCAL statement_timeout = '2345ms'")
                assert a.execute("SHOW statement_timeout").fetchone() == ("2345ms",)
            assert b.execute("SHOW statement_timeout").fetchone() != ("2345ms",)
        finally:
            pool.putconn(a)
            pool.putconn(b)
