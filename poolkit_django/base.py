"""Database backend ENGINE "poolkit_django": Django's PostgreSQL backend on a poolkit pool."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql import base as pg
from django.utils.asyncio import async_unsafe
from psycopg import IsolationLevel, sql

from poolkit import Pool, PoolConfig

from . import _checks, _registry
from ._creation import DatabaseCreation
from ._options import pool_config

__all__ = ["DatabaseWrapper"]

_checks.register()


class DatabaseWrapper(pg.DatabaseWrapper):
    """Django's PostgreSQL backend with connections borrowed from a poolkit pool.

    A connection is borrowed at the first query and returned when Django closes it: at
    the end of every request (whatever CONN_MAX_AGE says), when a thread that used it
    ends, or on `connection.close()`. ``vendor`` stays "postgresql".
    """

    creation_class = DatabaseCreation
    _pk_lease: _registry.Entry | None = None  # the pool entry of the connection held
    _pk_guarded = False  # set once a thread's exit guard watches this wrapper

    if TYPE_CHECKING:  # Django internals the stubs leave out
        _thread_ident: int

        def _configure_connection(self, connection: Any) -> bool: ...

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
    def pool(self) -> Pool[Any] | None:
        """The pool of this alias (not opened here, as in Django's own backend), or None."""
        entry = self._pk_entry()
        return None if entry is None else entry.pool

    def close_pool(self) -> None:
        _registry.retire_alias(self.alias)

    # -- connections ---------------------------------------------------------------------

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
        connection = _registry.lend(self, entry, sys._getframe(1))
        if set_isolation_level:
            connection.isolation_level = self.isolation_level
        return connection

    def init_connection_state(self) -> None:
        if self._pk_lease is None:
            super().init_connection_state()
        else:
            # The pool configured the connection (time zone, role) when it opened it.
            BaseDatabaseWrapper.init_connection_state(self)

    def _close(self) -> None:
        connection = self.connection
        if connection is None:
            return
        if self._pk_lease is None:
            with self.wrap_database_errors:
                connection.close()
            return
        try:
            with self.wrap_database_errors:
                _registry.give_back(self, connection)
        finally:
            # Connection can no longer be used.
            self.connection = None

    def _set_autocommit(self, autocommit: bool) -> None:
        # Every connect() sets Django's mode; the pool lends connections in autocommit
        # (restored on return), so the usual call changes nothing and can be skipped.
        if self._pk_lease is None or self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def close_if_unusable_or_obsolete(self) -> None:
        if self._pk_lease is not None and self.connection is not None:
            # Start or end of a request: hand the connection back. CONN_MAX_AGE is
            # ignored (see the poolkit_django.W001 check); the pool does the reuse.
            self.close()
            return
        super().close_if_unusable_or_obsolete()

    def close_if_health_check_failed(self) -> None:
        if self.connection is None or self._pk_lease is not None:
            return  # the pool validates connections when it lends them
        # Not Django's PostgreSQL version: its `if self.pool` would build the pool.
        BaseDatabaseWrapper.close_if_health_check_failed(self)

    def _configure_role(self, connection: Any) -> bool:
        # Django's version renders SQL through this wrapper's cursor, which fails when the
        # pool configures a connection in its own thread.
        role = self.settings_dict["OPTIONS"].get("assume_role")
        if not role:
            return False
        connection.execute(sql.SQL("SET ROLE {}").format(sql.Literal(role)))
        return True
