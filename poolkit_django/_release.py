"""release="transaction": cursors that give the connection back between statements, and pins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

if TYPE_CHECKING:
    from .base import DatabaseWrapper

# Command tags after which the session holds state the next statement may rely on: settings,
# LISTEN, a loaded library, a cursor or prepared statement, an open transaction. The pool's
# reset policy watches the same tags (SET/RESET/LISTEN/LOAD).
PIN_TAGS = ("SET", "RESET", "LISTEN", "LOAD", "DECLARE", "PREPARE", "BEGIN", "START")
# Session state no command tag shows: temporary tables, session advisory locks (the _xact_
# variants end with the statement), set_config(). A false match only keeps the connection.
PIN_SQL = re.compile(
    r"\btemp(orary)?\b|pg_(try_)?advisory_lock|set_config|dblink_connect", re.IGNORECASE
)


def pins(cursor: Any, sql: Any) -> bool:
    """True when the statement just run on `cursor` left state in the session."""
    tag = getattr(cursor, "statusmessage", None)
    if tag and tag.startswith(PIN_TAGS):
        return True
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    return isinstance(sql, str) and PIN_SQL.search(sql) is not None


class _Releasing:
    """Mixin for Django's cursor wrappers: notes pins, counts open cursors, and offers the
    connection back when the last cursor closes outside a transaction."""

    cursor: Any
    db: DatabaseWrapper
    _pk_open = True
    _pk_gen = 0  # the wrapper's borrow this cursor belongs to

    def execute(self, sql: Any, params: Any = None) -> Any:
        try:
            return super().execute(sql, params)  # type: ignore[misc]
        finally:
            if not self.db._pk_pinned and pins(self.cursor, sql):
                self.db._pk_pinned = True

    def executemany(self, sql: Any, param_list: Any) -> Any:
        try:
            return super().executemany(sql, param_list)  # type: ignore[misc]
        finally:
            if not self.db._pk_pinned and pins(self.cursor, sql):
                self.db._pk_pinned = True

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        self.db._pk_pinned = True  # a procedure may do anything to the session
        return super().callproc(procname, params, kparams)  # type: ignore[misc]

    def close(self) -> None:
        try:
            with self.db.wrap_database_errors:
                self.cursor.close()
        finally:
            if self._pk_open:
                self._pk_open = False
                self.db._pk_cursor_closed(self._pk_gen)


class ReleasingCursor(_Releasing, CursorWrapper):
    pass


class ReleasingDebugCursor(_Releasing, CursorDebugWrapper):
    pass
