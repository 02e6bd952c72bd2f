"""Reset policies: what is sent to the server when a connection comes back (no I/O here)."""

from __future__ import annotations

from . import _psycopg

# Session state a borrow can leave behind, learned from command tags (policy "auto").
SETTINGS = 1  # SET, RESET, SET ROLE, SET SESSION AUTHORIZATION, LOAD
LISTEN = 2  # LISTEN: needs UNLISTEN
CURSORS = 4  # DECLARE CURSOR: a WITH HOLD cursor survives the transaction
PREPARED = 8  # PREPARE: SQL-level prepared statements
TEMP = 16  # CREATE TABLE, VIEW or SEQUENCE: maybe a temporary one
EVERYTHING = SETTINGS | LISTEN | CURSORS | PREPARED | TEMP  # when nothing was tracked

_psycopg.SESSION_TAGS.update(
    {
        b"SET": SETTINGS,
        b"RESET": SETTINGS,
        b"LOAD": SETTINGS,
        b"LISTEN": LISTEN,
        b"DECLARE CURSOR": CURSORS,
        b"PREPARE": PREPARED,
        b"CREATE TABLE": TEMP,
        b"CREATE VIEW": TEMP,
        b"CREATE SEQUENCE": TEMP,
        b"CREATE FUNCTION": TEMP,  # maybe in pg_temp
        # Code whose statements show no tags of their own: anything may be left.
        b"DO": EVERYTHING,
        b"CALL": EVERYTHING,
    }
)
_psycopg.SESSION_PREFIXES = tuple(_psycopg.SESSION_TAGS)
_psycopg.HOLD_CURSOR_BIT = CURSORS

# Identity first: RESET ALL alone leaves SET ROLE and SET SESSION AUTHORIZATION in force.
_IDENTITY = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL"
_PARTS = (
    (SETTINGS, _IDENTITY),
    (LISTEN, "UNLISTEN *"),
    (CURSORS, "CLOSE ALL"),
    (PREPARED, "DEALLOCATE ALL"),
    (TEMP, "DISCARD TEMP"),
)

# Policy name -> statement sent on every return ("auto" is decided per borrow, below).
FIXED: dict[str, bytes | None] = {
    "none": None,
    # asyncpg's reset, with identity: everything but prepared statements and temp tables.
    "reset_all": (f"{_IDENTITY}; CLOSE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all()").encode(),
    # DISCARD ALL cannot run inside a transaction block, so it travels alone.
    "discard_all": b"DISCARD ALL",
}

_auto_cache: dict[int, bytes] = {}


def auto_sql(mask: int) -> bytes:
    """The statement undoing the session state noted in `mask`."""
    sql = _auto_cache.get(mask)
    if sql is None:
        parts = [p for bit, p in _PARTS if mask & bit]
        sql = _auto_cache[mask] = "; ".join(parts).encode()
    return sql


def drops_prepared(sql: bytes) -> bool:
    """True if `sql` removes psycopg's server-side prepared statements too."""
    return sql == b"DISCARD ALL" or b"DEALLOCATE ALL" in sql


def undoes_configure(sql: bytes) -> bool:
    """True if `sql` resets settings that a configure callback may have made."""
    return b"RESET ALL" in sql or sql == b"DISCARD ALL"
