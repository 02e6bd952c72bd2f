"""poolkit.compat: psycopg2's pool API on a poolkit Pool, against the real server."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolkit import PoolkitError
from poolkit.compat import PoolError, SimpleConnectionPool, ThreadedConnectionPool


def test_psycopg2_tutorial_snippet_runs_unchanged(dsn: str) -> None:
    # The snippet most psycopg2 tutorials show, with only the import changed; `database=`
    # is psycopg2's alias of dbname.
    params: dict[str, Any] = conninfo_to_dict(dsn)
    params["database"] = params.pop("dbname")

    from poolkit.compat import SimpleConnectionPool as pool_SimpleConnectionPool

    connection_pool = pool_SimpleConnectionPool(1, 10, **params)
    assert connection_pool
    conn = connection_pool.getconn()
    cursor = conn.cursor()
    cursor.execute("CREATE TEMP TABLE mobile (id int, model text, price int)")
    cursor.execute("INSERT INTO mobile VALUES (%s, %s, %s)", (1, "iPhone 12", 800))
    cursor.execute("SELECT * FROM mobile WHERE price > %s", (500,))
    records = cursor.fetchall()
    cursor.close()
    conn.commit()
    connection_pool.putconn(conn)
    connection_pool.closeall()

    assert records == [(1, "iPhone 12", 800)]
    assert connection_pool.closed
    assert conn.closed


def test_dsn_positional_and_keyword(dsn: str) -> None:
    for pool in (SimpleConnectionPool(0, 2, dsn), SimpleConnectionPool(0, 2, dsn=dsn)):
        conn = pool.getconn()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(conn)
        pool.closeall()


def test_same_key_same_connection(dsn: str) -> None:
    pool = SimpleConnectionPool(1, 3, dsn)
    try:
        a = pool.getconn("a")
        assert pool.getconn("a") is a
        b = pool.getconn("b")
        assert b is not a
        assert pool.pool.stats()["in_use"] == 2
        pool.putconn(key="a")
        pool.putconn(b)
        assert pool.pool.stats()["in_use"] == 0
        with pytest.raises(PoolError, match="no connection is lent under key 'a'"):
            pool.putconn(key="a")
    finally:
        pool.closeall()


def test_putconn_close_discards_the_connection(dsn: str) -> None:
    pool = SimpleConnectionPool(1, 1, dsn)
    try:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        pool.putconn(conn, close=True)
        assert conn.closed
        again = pool.getconn()
        assert again.info.backend_pid != pid
        pool.putconn(again)
        stats = pool.pool.stats()
        assert stats["in_use"] == 0
        assert stats["connections_created"] == 2
    finally:
        pool.closeall()


def test_the_pool_resets_session_state_between_borrowers(dsn: str) -> None:
    # One connection, two borrowers: the first one's SET must not reach the second
    # (psycopg2's pool hands the connection over as it was left).
    pool = SimpleConnectionPool(1, 1, dsn)
    try:
        conn = pool.getconn()
        pid = conn.info.backend_pid
        conn.execute("SET statement_timeout = '1234ms'")
        conn.commit()
        pool.putconn(conn)
        conn = pool.getconn()
        assert conn.info.backend_pid == pid
        assert conn.execute("SHOW statement_timeout").fetchone() != ("1234ms",)
        pool.putconn(conn)
    finally:
        pool.closeall()


def test_threads_share_one_threaded_pool(dsn: str) -> None:
    pool = ThreadedConnectionPool(1, 3, dsn)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(20):
                conn = pool.getconn()
                try:
                    assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
                    conn.commit()
                finally:
                    pool.putconn(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        stats = pool.pool.stats()
        assert stats["in_use"] == 0
        assert stats["borrows"] == 160
        assert stats["size"] <= 3
    finally:
        pool.closeall()


@pytest.mark.parametrize("timeout", [0, 0.2])
def test_exhausted_pool_raises_pool_error(dsn: str, timeout: float) -> None:
    pool = SimpleConnectionPool(1, 1, dsn, timeout=timeout)
    try:
        held = pool.getconn()
        with pytest.raises(PoolError, match="connection pool exhausted") as info:
            pool.getconn()
        assert isinstance(info.value, PoolkitError)
        pool.putconn(held)
    finally:
        pool.closeall()


def test_errors_psycopg2_code_relies_on(dsn: str) -> None:
    pool = SimpleConnectionPool(0, 2, dsn)
    stranger = psycopg.connect(dsn)
    try:
        with pytest.raises(PoolError, match="trying to put unkeyed connection"):
            pool.putconn(stranger)
        lent = pool.getconn()
        pool.closeall()
        # closeall() closes lent connections too, as psycopg2's does.
        assert lent.closed
        assert pool.pool.closed
        for call in (pool.getconn, lambda: pool.putconn(lent), pool.closeall):
            with pytest.raises(PoolError, match="connection pool is closed"):
                call()
    finally:
        stranger.close()
