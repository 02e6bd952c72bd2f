"""psycopg2's pool API (`SimpleConnectionPool`, `ThreadedConnectionPool`) on a poolkit `Pool`.

For code written against `psycopg2.pool`: change the import, keep `getconn(key)`,
`putconn(conn, key, close)` and `closeall()`. The connections are psycopg 3 connections
(see docs/migration-psycopg2.md), lent by a `poolkit.Pool` with every safety feature on:
validation, session reset, leak tracking, fork safety, stats. New code should use
`poolkit.Pool` and `with pool.connection() as conn:` directly.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

from psycopg import Connection

from ._errors import PoolkitError, PoolTimeout
from ._pool import Pool

__all__ = ["AbstractConnectionPool", "PoolError", "SimpleConnectionPool", "ThreadedConnectionPool"]


class PoolError(PoolkitError):
    """psycopg2's `pool.PoolError`: the pool is closed, exhausted, or the connection unknown."""

    __module__ = "poolkit.compat"


class AbstractConnectionPool:
    """psycopg2's keyed pool on a `poolkit.Pool` (reached as `.pool`, for `stats()` and metrics).

    `minconn`/`maxconn` become `min_size`/`max_size`; the remaining arguments are what
    `psycopg2.connect()` took: a DSN or URL, and connection keywords (`dbname=`, `user=`, ...).
    Unlike psycopg2, `getconn()` waits up to `timeout` seconds (poolkit's, 30 s by default)
    for a connection when all `maxconn` are lent, then raises `PoolError`; with `timeout=0`
    it takes an idle connection or fails at once (it does not wait for a new one to open).
    Every method is thread-safe.
    """

    def __init__(
        self, minconn: int, maxconn: int, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> None:
        if len(args) > 1:
            raise TypeError("one positional argument (the DSN); connection settings go in keywords")
        dsn = args[0] if args else kwargs.pop("dsn", None) or ""
        if "database" in kwargs:  # psycopg2's alias, used by many tutorials; libpq says dbname
            kwargs["dbname"] = kwargs.pop("database")
        self.minconn = minconn
        self.maxconn = maxconn
        self.closed = False
        # Given to each borrow rather than as the pool's setting, which must be above 0.
        self._timeout = timeout
        self.pool: Pool[Connection[Any]] = Pool(
            dsn, min_size=minconn, max_size=maxconn, kwargs=kwargs, open=False
        )
        # psycopg2 opens minconn connections in the constructor and fails there if it cannot.
        self.pool.open(wait=minconn > 0)
        self._lock = threading.Lock()
        self._used: dict[Hashable, Connection[Any]] = {}  # key -> lent connection
        self._rused: dict[int, Hashable] = {}  # id(connection) -> key

    def getconn(self, key: Hashable | None = None) -> Connection[Any]:
        """A connection; the same one again for the same `key` until it is put back."""
        with self._lock:
            self._check_open()
            if key is not None and key in self._used:
                return self._used[key]
        # Borrow outside the lock: a borrower waiting for a connection must not stop others
        # from putting theirs back.
        try:
            conn = self.pool.getconn(self._timeout)
        except PoolTimeout as exc:
            raise PoolError(f"connection pool exhausted: {exc}") from exc
        with self._lock:
            if self.closed or (key is not None and key in self._used):
                # Closed meanwhile, or another thread borrowed for the same key first.
                self.pool.putconn(conn)
                self._check_open()
                return self._used[key]
            key = object() if key is None else key
            self._used[key] = conn
            self._rused[id(conn)] = key
        return conn

    def putconn(
        self, conn: Connection[Any] | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Give a connection back (by object or by key); `close=True` discards it instead."""
        with self._lock:
            self._check_open()
            if key is None:
                if conn is None or id(conn) not in self._rused:
                    raise PoolError("trying to put unkeyed connection")
                key = self._rused[id(conn)]
            if conn is None:
                if key not in self._used:
                    raise PoolError(f"no connection is lent under key {key!r}")
                conn = self._used[key]
            elif self._used.get(key) is not conn:
                raise PoolError("trying to put a connection this pool did not lend under that key")
            del self._used[key]
            del self._rused[id(conn)]
        self._give_back(conn, close)

    def closeall(self) -> None:
        """Close every connection, lent ones included (as psycopg2 does), and the pool."""
        with self._lock:
            self._check_open()
            self.closed = True
            lent = list(self._used.values())
            self._used.clear()
            self._rused.clear()
        for conn in lent:
            self._give_back(conn, close=True)
        self.pool.close()

    def _give_back(self, conn: Connection[Any], close: bool) -> None:
        if close:
            # A closed connection handed back is dropped by the pool, which opens a new one
            # if it is below min_size.
            conn.close()
        self.pool.putconn(conn)

    def _check_open(self) -> None:
        if self.closed:
            raise PoolError("connection pool is closed")


class SimpleConnectionPool(AbstractConnectionPool):
    """psycopg2's `SimpleConnectionPool`; thread-safe here, unlike psycopg2's."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """psycopg2's `ThreadedConnectionPool`: the same pool (every poolkit pool is thread-safe)."""
