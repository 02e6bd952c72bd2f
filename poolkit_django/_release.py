"""release="transaction": cursors that give the connection back between statements, and pins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from poolkit._psycopg import RAW_TAG_OF, RESULTS_OF

if TYPE_CHECKING:
    from .base import DatabaseWrapper

# Command tags after which the session holds state the next statement may rely on. The
# pool's reset policy ("auto") sees the first group when the connection comes back and
# resets it; the second is undone here with DISCARD ALL at request end. Bytes, as libpq
# gives them: nothing is decoded per statement.
PIN_TAGS = (b"SET", b"RESET", b"LISTEN", b"LOAD", b"BEGIN", b"START")
DISCARD_TAGS = (b"DECLARE", b"PREPARE")
_SESSION_TAGS = DISCARD_TAGS + PIN_TAGS  # one startswith() rejects the common case
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
    # psycopg's raw tag (bytes: statusmessage would decode it): the first result's, or
    # after executemany(), which keeps no results, the last statement's.
    tag = RAW_TAG_OF(cursor)
    if tag and tag.startswith(_SESSION_TAGS):
        if tag.startswith(DISCARD_TAGS):
            return DISCARD
        level = PIN
    else:
        level = 0
    results = RESULTS_OF(cursor)
    if len(results) > 1:
        # "SELECT 1; SET ...": the other statements' tags are only in the results (the
        # pool's own tag tracking reads the same); nextset() would move the cursor past
        # the rows the caller is about to fetch.
        for res in results:
            tag = res.command_status
            if tag and tag.startswith(_SESSION_TAGS):
                if tag.startswith(DISCARD_TAGS):
                    return DISCARD
                level = PIN
    if level:
        return level
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
