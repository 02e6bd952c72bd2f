"""The only module that touches psycopg's private attributes; tests/test_psycopg_internals.py
fails loudly when a psycopg release changes any of them.

Each use is here because psycopg has no public way to do it:
- `_pool`: psycopg's Connection checks it in close() (close_returns), __exit__ (a pooled
  connection is not closed by `with conn:`) and __del__ (no ResourceWarning).
- `_prepared`'s caches (`_counts`, `_names`, `_to_flush`) and `prepared_max`: after DISCARD
  ALL the server has no prepared statements left, and psycopg's cache must learn it or the
  next query fails with `_pg3_0 does not exist`.
- `_check_results`: every result of a cursor passes there, with its command tag; it is how
  the "auto" reset policy learns that a borrow left session state behind.
- the client-side settings read in one call from the instance dict (`snapshot()`); they are
  restored through psycopg's public setters.
- `_notice_handlers`, `_notify_handlers`: the lists add_notice_handler()/add_notify_handler()
  append to, compared on every return and put back as they were (a borrower's handler would
  otherwise see the next borrowers' notices and notifications); `_notifies_backlog`: the
  notifications psycopg keeps for the next notifies() call, dropped with the LISTENs.
- `_adapters`: the map behind the read-only `adapters` property, replaced by a copy that
  notes a borrower's register_loader()/register_dumper()/types.add() (subclasses of the
  public AdaptersMap and TypesRegistry), and put back fresh on return.
- a cursor's `_statusmessage` (its command tag, undecoded) and `_results` (every result of
  a multi-statement string): poolkit_django's release="transaction" pins a connection on
  session commands, after each statement.
- the instance dict itself: each borrow gets a new handle sharing it (`handle_classes()`),
  which holds because psycopg keeps every attribute of a connection there (no __slots__).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter, itemgetter
from typing import Any, get_origin

from psycopg.abc import Dumper, Loader
from psycopg.adapt import AdaptersMap
from psycopg.types import TypeInfo, TypesRegistry

# Attributes of a psycopg connection holding the client-side settings a borrower may
# change: autocommit, isolation_level, read_only, deferrable, row/cursor factories.
_SNAPSHOT_ATTRS = (
    "_autocommit",
    "_isolation_level",
    "_read_only",
    "_deferrable",
    "row_factory",
    "cursor_factory",
    "server_cursor_factory",
)
_snapshot_dict = itemgetter(*_SNAPSHOT_ATTRS)
# C-level getters for the hot path (no Python frame): ATTRS_OF(conn.__dict__) and
# THRESHOLD_OF(conn) equal to snapshot()'s two parts means nothing changed.
ATTRS_OF = _snapshot_dict
# (prepare_threshold, prepared_max): the prepared-statement settings, as one tuple.
THRESHOLD_OF = attrgetter("_prepared.prepare_threshold", "_prepared.prepared_max")


# A cursor's command tag as libpq gives it (bytes, or None), and its results: C-level getters,
# read after every statement by poolkit_django (release="transaction").
RAW_TAG_OF = attrgetter("_statusmessage")
RESULTS_OF = attrgetter("_results")

# The handler lists, as HANDLERS_OF(conn.__dict__) (C-level, for the return path), and a
# copy of them to compare with (handlers()).
HANDLERS_OF = itemgetter("_notice_handlers", "_notify_handlers")


def handlers(conn: Any) -> tuple[list[Any], list[Any]]:
    """Copies of the connection's notice and notify handler lists."""
    notice, notify = HANDLERS_OF(conn.__dict__)
    return list(notice), list(notify)


def restore_handlers(conn: Any, saved: tuple[list[Any], list[Any]]) -> None:
    """Put the handler lists back as `handlers()` copied them (in place: psycopg holds them)."""
    notice, notify = HANDLERS_OF(conn.__dict__)
    notice[:] = saved[0]
    notify[:] = saved[1]


def forget_notifies(conn: Any) -> None:
    """Drop the notifications received for a borrower's LISTENs, kept by psycopg for the
    next notifies() call (the next borrower's, after the reset's UNLISTEN)."""
    backlog = conn.__dict__.get("_notifies_backlog")
    if backlog:
        backlog.clear()


def snapshot(conn: Any) -> tuple[tuple[Any, ...], tuple[int | None, int]]:
    """The connection's client-side settings: the attributes above, and THRESHOLD_OF's."""
    return _snapshot_dict(conn.__dict__), THRESHOLD_OF(conn)


def unchanged(conn: Any, attrs: tuple[Any, ...], threshold: tuple[int | None, int]) -> bool:
    """True if no client-side setting differs from `snapshot()`'s (cheap: every return)."""
    now: tuple[Any, ...] = _snapshot_dict(conn.__dict__)
    return now == attrs and THRESHOLD_OF(conn) == threshold


# The attribute's name, for setattr() on the hot path (a C call, cheaper than set_pool()).
POOL_ATTR = "_pool"


def set_pool(conn: Any, pool: Any) -> None:
    """Mark `conn` as pooled (psycopg reads this attribute in close/__exit__/__del__)."""
    conn._pool = pool


def get_pool(conn: Any) -> Any:
    return getattr(conn, "_pool", None)


def close_now(conn: Any) -> None:
    """Close without waiting (no await needed): what psycopg's close() does, minus the pool
    hook that would hand the connection back to us."""
    conn._closed = True
    conn.pgconn.finish()


def finished(conn: Any) -> bool:
    """True when the client side closed the libpq connection (PQfinish), psycopg's own
    close or its drop of a connection after an interrupted query cancellation; False for
    one the server or the network broke (libpq keeps it, in status BAD)."""
    return conn.pgconn.pgconn_ptr is None


def forget_prepared(conn: Any) -> None:
    """Tell psycopg that the server dropped every prepared statement (DISCARD ALL).

    Not `_prepared.clear()`: it queues a DEALLOCATE ALL of its own, which psycopg sends
    after the next statement was prepared again, dropping that one (the next query fails
    with `_pg3_1 does not exist`).
    """
    prepared = conn._prepared
    prepared._counts.clear()
    prepared._names.clear()
    prepared._to_flush.clear()


# State a borrow left behind, as a bit mask per state_key(): learned from command tags
# (see _reset.py), WITH HOLD cursors and registered adapters.
DIRTY: dict[int, int] = {}

SESSION_TAGS: dict[bytes, int] = {}  # filled by _reset.py: tag prefix -> bit
SESSION_PREFIXES: tuple[bytes, ...] = ()  # its keys, for one startswith() call
HOLD_CURSOR_BIT = 0  # set by _reset.py: the bit of a cursor declared WITH HOLD


def _note(key: int, bit: int) -> None:
    """Add `bit` to the state noted under `key` (a state_key())."""
    DIRTY[key] = DIRTY.get(key, 0) | bit


def _note_tags(conn: Any, results: list[Any]) -> None:
    prefixes = SESSION_PREFIXES
    for res in results:
        tag = res.command_status
        # One C call rejects the common case (SELECT, INSERT, ...): a quarter of the loop's cost.
        if not tag or not tag.startswith(prefixes):
            continue
        for prefix, bit in SESSION_TAGS.items():
            if tag.startswith(prefix):
                _note(id(conn.__dict__), bit)  # (state_key(): shared by a connection's handles)


# The bit of DIRTY noting adapters a borrower registered: client-side, no SQL resets it.
ADAPTERS_BIT = 32


class _TrackedTypes(TypesRegistry):
    """A pooled connection's type registry: a borrower's add() is noted (ADAPTERS_BIT)."""

    def __init__(self, template: TypesRegistry, key: int) -> None:
        super().__init__(template)
        self._pk_key = key

    def add(self, info: TypeInfo) -> None:
        super().add(info)
        _note(self._pk_key, ADAPTERS_BIT)


class _TrackedAdapters(AdaptersMap):
    """A pooled connection's adapters: psycopg's own map, copied on write from the one the
    connection had once configured (`base`), noting in DIRTY a borrower's
    register_dumper()/register_loader()/types.add(), so that its return puts a fresh copy
    of `base` back (restore_adapters). Nothing on the lending path reads it: a borrow that
    registers nothing costs nothing."""

    def __init__(self, base: AdaptersMap, key: int) -> None:
        super().__init__(base)
        self.types = _TrackedTypes(base.types, key)
        self._pk_base = base
        self._pk_key = key

    def register_dumper(self, cls: type | str | None, dumper: type[Dumper]) -> None:
        super().register_dumper(cls, dumper)
        _note(self._pk_key, ADAPTERS_BIT)

    def register_loader(self, oid: int | str, loader: type[Loader]) -> None:
        super().register_loader(oid, loader)
        _note(self._pk_key, ADAPTERS_BIT)


def install_adapters(conn: Any) -> None:
    """Give `conn` a tracked copy of its adapters as they are now (after `configure`: what
    it registered is every borrower's). Writes psycopg's private `_adapters`: its public
    `adapters` is a read-only property."""
    base = conn.adapters
    if isinstance(base, _TrackedAdapters):
        base = AdaptersMap(base)  # configure ran again: its registrations are the new base
    conn.__dict__["_adapters"] = _TrackedAdapters(base, id(conn.__dict__))


def adopt_adapters(conn: Any) -> None:
    """Make what was registered on `conn` so far part of its setup, kept for every borrower:
    for registrations that come with each connect (Django's connection_created receivers,
    django.contrib.postgres's hstore and citext), which are not a borrower's leftover."""
    key = id(conn.__dict__)  # state_key()
    mask = DIRTY.get(key, 0)
    if mask & ADAPTERS_BIT:
        install_adapters(conn)
        mask &= ~ADAPTERS_BIT
        if mask:
            DIRTY[key] = mask
        else:
            del DIRTY[key]


def restore_adapters(conn: Any) -> None:
    """Undo a borrower's registrations: a fresh copy of the configured adapters."""
    current = conn.__dict__.get("_adapters")
    if isinstance(current, _TrackedAdapters):
        conn.__dict__["_adapters"] = _TrackedAdapters(current._pk_base, current._pk_key)


# What PostgreSQL says when it ends one session for a reason of that session's own
# (25P03, 57P05, 25P04): nothing about the server or the other connections. English
# server messages only (lc_messages): otherwise the loss counts as an outage, as before.
_SESSION_ONLY = (
    b"terminating connection due to idle-in-transaction timeout",
    b"terminating connection due to idle-session timeout",
    b"terminating connection due to transaction timeout",
)


def session_ended(conn: Any) -> str | None:
    """The server's reason if it closed `conn`'s session alone (a session timeout), else None."""
    if conn is None:
        return None
    message = conn.pgconn.error_message or b""
    for known in _SESSION_ONLY:
        if known in message:
            return known.decode()
    return None


def note_hold_cursor(conn: Any) -> None:
    """Note that `conn`'s session holds a cursor declared WITH HOLD (it outlives its
    transaction): the "auto" reset closes it (CLOSE ALL) on return, and parking refuses.
    For cursors made past the connection's factories too (Django's own ServerSideCursor)."""
    _note(id(conn.__dict__), HOLD_CURSOR_BIT)  # (state_key())


_tracking: dict[tuple[type, bool], type] = {}


def tracking_cursor(cls: type[Any], server: bool = False) -> type[Any]:
    """A subclass of cursor class `cls` that notes commands leaving session state behind.

    `server`: a class for named cursors, whose DECLARE psycopg reads without
    `_check_results`: one declared WITH HOLD (it outlives the transaction) is noted when
    made.
    """
    if getattr(cls, "_poolkit_tracking", False):
        return cls
    sub = _tracking.get((cls, server))
    if sub is not None:
        return sub
    base_check = cls._check_results

    def _check_results(self: Any, results: list[Any]) -> None:
        # Noted first: a failed statement's results carry the tags of those before it
        # ("SET ...; COMMIT; SELECT 1/0" leaves the SET), and base_check raises.
        # _note_tags() inlined for the common case of one result: a call per statement.
        if len(results) == 1:
            tag = results[0].command_status
            if tag and tag.startswith(SESSION_PREFIXES):
                _note_tags(self._conn, results)
        else:
            _note_tags(self._conn, results)
        base_check(self, results)

    ns: dict[str, Any] = {
        "_check_results": _check_results,
        "_poolkit_tracking": True,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if server:
        base_init = cls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            base_init(self, *args, **kwargs)
            if kwargs.get("withhold"):
                note_hold_cursor(self._conn)

        ns["__init__"] = __init__
    sub = type(cls.__name__, (cls,), ns)
    _tracking[cls, server] = sub
    return sub


def install_tracking(conn: Any) -> None:
    conn.cursor_factory = tracking_cursor(conn.cursor_factory)
    conn.server_cursor_factory = tracking_cursor(conn.server_cursor_factory, server=True)


# Methods refused on a returned handle: every statement, commit, rollback, transaction,
# pipeline, COPY and settings change goes through wait(); cursor() and close() are refused
# before anything; cancel() and cancel_safe() open a connection of their own (they would
# cancel the next borrower's query); the handler lists are shared with the next borrower.
GUARDED = (
    "wait",
    "cursor",
    "close",
    "cancel",
    "cancel_safe",
    "add_notice_handler",
    "remove_notice_handler",
    "add_notify_handler",
    "remove_notify_handler",
)


def check_connection_class(cls: Any, base: type[Any]) -> None:
    """Refuse a `connection_class` the pool cannot lend handles of, naming the setting.

    A generic alias (`Connection[DictRow]`, as psycopg's typing docs show) stands for its
    class. Slots are refused: a handle shares the connection's instance dict only, so an
    attribute kept in a slot (set by `configure=`, say) would be missing on every borrow.
    """
    origin = get_origin(cls) or cls
    if not isinstance(origin, type) or not issubclass(origin, base):
        raise TypeError(
            f"connection_class={cls!r} is not a connection class: pass "
            f"{base.__module__}.{base.__qualname__} or a subclass of it"
        )
    slots: list[str] = []
    for k in origin.__mro__:
        declared = k.__dict__.get("__slots__", ())
        names = (declared,) if isinstance(declared, str) else declared
        slots.extend(n for n in names if n not in ("__dict__", "__weakref__"))
    if slots:
        raise TypeError(
            f"connection_class={origin.__qualname__} declares __slots__ {tuple(slots)}: "
            "the pool lends each borrow a new handle sharing the connection's instance "
            "dict, so values kept in slots would not follow the connection; remove "
            "__slots__ from the class (its attributes then live in the instance dict)"
        )


def handle_classes(
    cls: type[Any],
    refuse: Callable[[Any], BaseException],
    reclaim: Callable[[int, dict[str, Any]], None],
) -> tuple[type[Any], type[Any]]:
    """The two classes of the handles lent on connections of class `cls` (callers cache it).

    A handle is a new instance sharing the pooled connection's instance dict (psycopg keeps
    all of a connection's state there): one per borrow, so a handle kept after its return
    stays refused even once the same server connection is lent again (see new_handle()).
    - lent: what the borrower holds; collected while still lent, it tells `reclaim` (its
      id and the shared dict; it may run inside the garbage collector: reclaim only
      queues). It replaces psycopg's __del__, whose warning is for unpooled connections.
    - returned: what the handle wears once returned, for good: the I/O entry points raise
      `refuse(handle)`, so do attribute writes and `adapters`, and its __del__ does nothing.
    """

    def lent_del(self: Any) -> None:
        state = self.__dict__
        if state.get(POOL_ATTR) is not None:
            reclaim(id(self), state)

    def returned_del(self: Any) -> None:
        pass  # nothing to warn about or reclaim: runs once per borrow

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise refuse(self)

    def refused_setattr(self: Any, name: str, value: Any) -> None:
        # The instance dict is the next borrower's too: `old.row_factory = dict_row` would
        # change what its fetchone() returns. (Its class may still change: a handle's
        # class is how the pool marks it.)
        if name != "__class__":
            raise refuse(self)
        object.__setattr__(self, name, value)

    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    lent = type(cls.__name__, (cls,), {"__del__": lent_del, **names})
    ns: dict[str, Any] = dict.fromkeys(GUARDED, refused)
    ns["__setattr__"] = refused_setattr
    ns["adapters"] = property(refused)  # shared too: a dumper registered would be theirs
    returned = type(cls.__name__, (lent,), {**ns, "__del__": returned_del, **names})
    return lent, returned


_new = object.__new__


def new_handle(conn: Any, lent: type[Any]) -> Any:
    """A new handle of class `lent` on pooled connection `conn` (the pools inline this)."""
    handle = _new(lent)
    handle.__dict__ = conn.__dict__
    return handle


def state_key(conn: Any) -> int:
    """The key of a connection's DIRTY bits: the same for the connection and its handles."""
    return id(conn.__dict__)
