"""release="transaction": cursors that give the connection back between statements, and pins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

if TYPE_CHECKING:
    from .base import DatabaseWrapper

# Command tags after which the session holds state the next statement may rely on. The
# pool's reset policy ("auto") sees the first group when the connection comes back and
# resets it; the second is undone here with DISCARD ALL at request end.
PIN_TAGS = ("SET", "RESET", "LISTEN", "LOAD", "BEGIN", "START")
DISCARD_TAGS = ("DECLARE", "PREPARE")
# Session state no command tag shows: temporary tables, session advisory locks (the _xact_
# variants end with the statement), set_config(). A false match only keeps the connection
# (and costs one DISCARD ALL).
PIN_SQL = re.compile(
    r"\btemp(orary)?\b|pg_(try_)?advisory_lock|set_config|dblink_connect", re.IGNORECASE
)
PIN, DISCARD = 1, 2


def pins(cursor: Any, sql: Any) -> int:
    """0, PIN (the session changed, the pool's reset undoes it) or DISCARD (the session
    changed in a way only DISCARD ALL undoes) for the statement just run on `cursor`."""
    tag = getattr(cursor, "statusmessage", None)
    if tag:
        if tag.startswith(DISCARD_TAGS):
            return DISCARD
        if tag.startswith(PIN_TAGS):
            return PIN
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    return DISCARD if isinstance(sql, str) and PIN_SQL.search(sql) is not None else 0


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
            self._pk_note(sql)

    def _pk_note(self, sql: Any) -> None:
        db = self.db
        if db._pk_pinned < DISCARD:
            level = pins(self.cursor, sql)
            if level > db._pk_pinned:
                db._pk_pinned = level

    def executemany(self, sql: Any, param_list: Any) -> Any:
        try:
            return super().executemany(sql, param_list)  # type: ignore[misc]
        finally:
            self._pk_note(sql)

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        self.db._pk_pinned = DISCARD  # a procedure may do anything to the session
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
