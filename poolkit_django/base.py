"""Database backend ENGINE "poolkit_django": Django's PostgreSQL backend on a poolkit pool."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql import base as pg
from django.db.backends.signals import connection_created
from django.db.utils import DatabaseErrorWrapper
from django.utils.asyncio import async_unsafe
from django.utils.functional import cached_property
from psycopg import IsolationLevel, ServerCursor, sql
from psycopg.pq import TransactionStatus

from poolkit import ClusterPool, PoolConfig
from poolkit._psycopg import adopt_adapters, note_hold_cursor

from . import _checks, _lending, _registry
from ._creation import DatabaseCreation
from ._features import DatabaseFeatures
from ._options import pool_config, release_per_transaction
from ._release import DISCARD, ReleasingCursor, ReleasingDebugCursor

__all__ = ["DatabaseWrapper"]

_checks.register()
_IDLE = TransactionStatus.IDLE


def _discard(conn: Any) -> None:
    """End session state the pool's reset cannot see (temporary tables, advisory locks,
    set_config(), cursors, prepared statements) before the connection goes back."""
    try:
        if conn.pgconn.transaction_status != _IDLE:
            conn.rollback()
        conn.execute("DISCARD ALL")
    except Exception:  # the pool examines what comes back: a broken one is replaced
        pass


class _ErrorWrapper(DatabaseErrorWrapper):
    """Django's error translation; an error on a multi-host alias's connection that may
    reveal a failover (25006 on a demoted primary, a shutdown, a broken connection) also
    has that host probed now instead of at the next topology_interval."""

    wrapper: Any  # set by Django's __init__ (the stubs leave it out)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None:
            return  # as Django's own first line: no call into it on every statement
        wrapper = self.wrapper
        entry = wrapper._pk_lease
        if entry is not None and entry.cluster and isinstance(entry.pool, ClusterPool):
            entry.pool._suspect(wrapper._pk_conn, exc_value)
        super().__exit__(exc_type, exc_value, traceback)


class DatabaseWrapper(pg.DatabaseWrapper):
    """Django's PostgreSQL backend with connections borrowed from a poolkit pool.

    A connection is borrowed at the first query and returned when Django closes it: at
    the end of a request with CONN_MAX_AGE = 0, when a thread that used it ends, or on
    `connection.close()`. With CONN_MAX_AGE > 0 (or None) it is parked at the end of a
    request: reserved for this thread's next request, unless the pool needs it for
    another thread first. With OPTIONS["pool"]["release"] = "transaction" it goes back
    after every statement or transaction outside atomic(), unless the session was
    pinned. ``vendor`` stays "postgresql".
    """

    creation_class = DatabaseCreation
    features_class = DatabaseFeatures
    _pk_lease: _registry.Entry | None = None  # the pool entry of the connection held
    _pk_guarded = False  # set once a thread's exit guard watches this wrapper
    _pk_conn: Any = None  # what Django calls self.connection (see the property)
    _pk_parked = False  # _pk_conn is parked: reserved for this thread, not in use
    _pk_release_tx = False  # release="transaction" for the connection held
    _pk_pinned = 0  # the session holds state (_release.PIN/DISCARD): keep it to request end
    _pk_used = False  # a cursor was made since the borrow
    _pk_cursors = 0  # open cursors (release="transaction")
    _pk_gen = 0  # borrows so far: a cursor from an earlier borrow does not count
    _pk_connecting = False  # inside connect(): its own queries must not release
    # release="transaction": the pool entry to borrow from again, without Django's
    # connect(), while a request runs between two statements.
    _pk_between: _registry.Entry | None = None
    _pk_isolation = False  # OPTIONS["isolation_level"] is set on each borrowed connection

    if TYPE_CHECKING:  # Django internals the stubs leave out
        _thread_ident: int
        health_check_enabled: bool

        def _configure_connection(self, connection: Any) -> bool: ...

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return _ErrorWrapper(self)

    # -- pool ----------------------------------------------------------------------------

    def _pk_config(self) -> PoolConfig | None:
        if self.alias == NO_DB_ALIAS:
            return None
        return pool_config(self.alias, self.settings_dict)

    def _pk_entry(self, conn_params: dict[str, Any] | None = None) -> _registry.Entry | None:
        """The current pool entry of this alias (built if needed), or None when not pooled."""
        config = self._pk_config()
        if config is None:
            return None
        if conn_params is None:
            conn_params = self.get_connection_params()
        return _registry.entry_for(self, conn_params, config)

    @property
    def pool(self) -> _registry.AnyPool | None:
        """The pool of this alias (not opened here, as in Django's own backend), or None."""
        entry = self._pk_entry()
        return None if entry is None else entry.pool

    def close_pool(self) -> None:
        _registry.retire_alias(self.alias)

    # -- connections ---------------------------------------------------------------------

    @property
    def connection(self) -> Any:
        # Every use of a parked connection (a query, commit, is_usable, user code reading
        # connection.connection) first takes it back from the pool; with
        # release="transaction", every use between two statements borrows again.
        conn = self._pk_conn
        if self._pk_parked:
            self._pk_parked = False
            if _lending.unpark(self, conn, sys._getframe(1)):
                return conn
            # The pool lent it to another thread or closed it: as if Django had closed
            # it; the next ensure_connection() borrows anew.
            self._pk_conn = None
            return None
        if conn is None and self._pk_between is not None:
            return self._pk_reborrow()
        return conn

    @connection.setter
    def connection(self, value: Any) -> None:
        self._pk_conn = value
        self._pk_parked = False

    @async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        config = self._pk_config()
        if config is None:
            return super().get_new_connection(conn_params)
        # As Django's backend: isolation_level is known before set_autocommit() runs.
        set_isolation_level = False
        try:
            isolation_level_value = self.settings_dict["OPTIONS"]["isolation_level"]
        except KeyError:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                self.isolation_level = IsolationLevel(isolation_level_value)
                set_isolation_level = True
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {isolation_level_value} "
                    f"specified. Use one of the psycopg.IsolationLevel values."
                ) from None
        entry = _registry.entry_for(self, conn_params, config)
        connection = _lending.lend(self, entry, sys._getframe(1))
        self._pk_isolation = set_isolation_level
        self._pk_release_tx = release_per_transaction(self.settings_dict)
        self._pk_pinned = 0
        self._pk_used = False
        self._pk_cursors = 0
        self._pk_gen += 1
        if set_isolation_level:
            connection.isolation_level = self.isolation_level
        return connection

    def init_connection_state(self) -> None:
        if self._pk_lease is None:
            super().init_connection_state()
        else:
            # The pool configured the connection (time zone, role) when it opened it.
            BaseDatabaseWrapper.init_connection_state(self)

    def connect(self) -> None:
        # connect() itself may query (the server version check): releasing there would
        # hand the caller a closed connection.
        self._pk_connecting = True
        try:
            super().connect()
        finally:
            self._pk_connecting = False
        if self._pk_lease is not None:
            # Types registered by connection_created receivers (django.contrib.postgres)
            # are the connection's setup: kept, and no reason not to park it.
            adopt_adapters(self._pk_conn)

    def _pk_reborrow(self) -> Any:
        """The next statement of a request after a release: borrow again, keeping the
        state Django's connect() would rebuild (settings checked, version known, autocommit
        on, no transaction open), which a release outside atomic() leaves as it was."""
        entry, self._pk_between = self._pk_between, None
        if entry is None or _registry.current_entry(self.alias) is not entry:
            return None  # settings changed meanwhile: Django's connect() does it all
        try:
            conn = _lending.lend(self, entry, sys._getframe(2))
        except Exception:
            # Reached from reads of self.connection that Django does outside
            # wrap_database_errors (`if self.connection is None:` in ensure_connection()
            # and close_if_health_check_failed()): translate here as the first borrow
            # inside connect() is (PoolTimeout -> django.db.OperationalError, the original
            # as __cause__), so `except DatabaseError` and PoolkitMiddleware see it.
            # In the except clause, not a `with` around lend(): no cost when it works.
            with self.wrap_database_errors:
                raise
        if self._pk_isolation:
            conn.isolation_level = self.isolation_level
        self._pk_pinned = 0
        self._pk_used = False
        self._pk_cursors = 0
        self._pk_gen += 1
        self.connection = conn
        self.run_on_commit = []
        self.health_check_done = True
        if connection_created.receivers:  # e.g. django.contrib.postgres type handlers
            self._pk_connecting = True  # a receiver's query must not release it
            try:
                connection_created.send(sender=self.__class__, connection=self)
            finally:
                self._pk_connecting = False
            adopt_adapters(conn)  # (as in connect())
        return conn

    def close(self) -> None:
        self._pk_between = None
        if self._pk_parked:
            # Not Django's close(): reading self.connection would take it back first.
            self.validate_thread_sharing()
            self.run_on_commit = []
            self._close()
            return
        super().close()

    def _close(self) -> None:
        connection = self._pk_conn
        if connection is None:
            return
        if self._pk_lease is None:
            with self.wrap_database_errors:
                connection.close()
            return
        try:
            with self.wrap_database_errors:
                if self._pk_parked:
                    _lending.release_parked(self, connection)
                else:
                    if self._pk_pinned == DISCARD:
                        _discard(connection)
                    _lending.give_back(self, connection)
        finally:
            # Connection can no longer be used.
            self.connection = None

    def _set_autocommit(self, autocommit: bool) -> None:
        # Every connect() sets Django's mode; the pool lends connections in autocommit
        # (restored on return), so the usual call changes nothing and can be skipped.
        if self._pk_lease is None or self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def close_if_unusable_or_obsolete(self) -> None:
        # Start and end of every request (Django's request_started/request_finished).
        self._pk_between = None
        if self._pk_lease is None:
            super().close_if_unusable_or_obsolete()
            return
        if self._pk_parked:
            # Django's rules for a connection kept from an earlier request: checked again
            # at this request's first query (CONN_HEALTH_CHECKS), even when the end of the
            # last one, after an error, had found it usable; given back once too old.
            self.health_check_done = False
            if self.close_at is not None and time.monotonic() >= self.close_at:
                self.close()
            return
        if self._pk_conn is None:
            return
        if self._pk_release_tx or self.settings_dict["CONN_MAX_AGE"] == 0:
            self.close()
            return
        # Persistent connections (CONN_MAX_AGE): Django's rules, then park instead of keep.
        self.health_check_done = False
        # self.autocommit, not get_autocommit(): the connection is held, nothing to ensure.
        if self.autocommit != self.settings_dict["AUTOCOMMIT"]:
            self.close()
            return
        if self.errors_occurred:
            if not self.is_usable():
                self._pk_close_unusable()
                return
            self.errors_occurred = False
            self.health_check_done = True
        if self.close_at is not None and time.monotonic() >= self.close_at:
            self.close()
            return
        # Parked (inline: this runs at the end of every request).
        conn = self._pk_conn
        if conn.pgconn.transaction_status != _IDLE:
            # AUTOCOMMIT=False leaves a transaction open at request end: it ends with it.
            try:
                with self.wrap_database_errors:
                    conn.rollback()
            except Exception:
                self.close()
                return
            self.needs_rollback = False
        if _lending.park(self, conn):
            self._pk_parked = True
        else:
            self.close()

    def chunked_cursor(self) -> Any:
        # Django makes its server-side cursors with its own class, not through the
        # connection's server_cursor_factory, so the pool's "auto" reset never sees their
        # DECLARE. In autocommit they are WITH HOLD and outlive the request when not
        # closed (an iterator kept or dropped unfinished): the pool is told, so such a
        # session is not parked and its return closes them (CLOSE ALL) before another
        # thread or request gets it. Here rather than in create_cursor(): named cursors
        # only, no cost per ordinary cursor.
        cursor = super().chunked_cursor()
        entry = self._pk_lease
        if entry is not None and entry.auto_reset:
            raw = cursor.cursor
            if raw.withhold:
                note_hold_cursor(raw.connection)
        return cursor

    def close_if_health_check_failed(self) -> None:
        # Django's rule (a check at the first query of a request, with CONN_HEALTH_CHECKS,
        # on a connection kept from an earlier request), not PostgreSQL's: its `if
        # self.pool` would build the pool. A fresh borrow needs none: the pool validated it.
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if not self.is_usable():
            self._pk_close_unusable()
        self.health_check_done = True

    def _pk_close_unusable(self) -> None:
        # Django judged it unusable: the pool must not lend it again, so it goes back closed
        # (the pool replaces it).
        conn = self._pk_conn
        if self._pk_lease is not None and conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self.close()

    # -- release="transaction" -----------------------------------------------------------

    def make_cursor(self, cursor: Any) -> Any:
        if not self._pk_release_tx:
            return super().make_cursor(cursor)
        return self._pk_releasing(ReleasingCursor, cursor)

    def make_debug_cursor(self, cursor: Any) -> Any:
        if not self._pk_release_tx:
            return super().make_debug_cursor(cursor)
        return self._pk_releasing(ReleasingDebugCursor, cursor)

    def _pk_releasing(self, cls: Any, cursor: Any) -> Any:
        """`cursor` wrapped so that closing the last one releases the connection."""
        if isinstance(cursor, ServerCursor):
            self._pk_pinned = DISCARD  # a server-side cursor lives in the session
        self._pk_cursors += 1
        self._pk_used = True
        wrapped = cls(cursor, self)
        wrapped._pk_gen = self._pk_gen
        return wrapped

    def _pk_cursor_closed(self, gen: int) -> None:
        if gen == self._pk_gen and self._pk_cursors > 0:
            self._pk_cursors -= 1
            if self._pk_cursors == 0:
                self._pk_release()

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        super().set_autocommit(autocommit, force_begin_transaction_with_broken_autocommit)
        if autocommit and self._pk_release_tx:
            self._pk_release()  # the end of an outermost atomic()

    def _pk_release(self) -> None:
        """Give the connection back between statements, unless something needs the session."""
        conn = self._pk_conn
        if (
            conn is not None
            and self._pk_used
            and not self._pk_connecting
            and not self._pk_pinned
            and self._pk_cursors == 0
            and not self.in_atomic_block
            and self.autocommit
            and not self._pk_parked
            and conn.pgconn.transaction_status == _IDLE
        ):
            entry = self._pk_lease
            self.close()
            self._pk_between = entry

    def _configure_role(self, connection: Any) -> bool:
        # Django's version renders SQL through this wrapper's cursor, which fails when the
        # pool configures a connection in its own thread.
        role = self.settings_dict["OPTIONS"].get("assume_role")
        if not role:
            return False
        connection.execute(sql.SQL("SET ROLE {}").format(sql.Literal(role)))
        return True
