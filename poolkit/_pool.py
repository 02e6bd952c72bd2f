# WARNING: generated from poolkit/_pool_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Pool: a threaded PostgreSQL pool, drop-in for psycopg_pool.ConnectionPool.

Generated from poolkit/_pool_async.py: edit that file, not this one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from sys import _getframe
from threading import get_ident
from time import monotonic
from traceback import format_stack
from types import CodeType, FrameType, TracebackType
from typing import Any, Generic, TypeVar, cast
from weakref import ref

from psycopg import Connection
from psycopg.pq import TransactionStatus

from . import _psycopg, _reset
from ._compat import ASYNC
from ._config import PoolConfig, config_for_pool
from ._conn import check_callbacks, connect_timeout_default, is_builtin_check
from ._leaks import FRAMEWORK_FILES, Site, is_framework, user_frame
from ._peek import PEEK_AFTER
from ._psycopg import ATTRS_OF, HANDLERS_OF, POOL_ATTR, THRESHOLD_OF
from ._slot import NO_REF, Slot
from ._waits import Waits

CT = TypeVar("CT", bound=Connection[Any])

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN
_new = object.__new__


class _ConnectionBlock(Generic[CT]):
    """`with pool.connection() as conn`: commit on success, rollback on error, return."""

    __slots__ = ("_conn", "_pool", "_site", "_tag", "_timeout")

    # Filled in by Pool.connection() (no __init__: one Python call less per borrow).
    _pool: Pool[CT]
    _timeout: float | None
    _tag: str | None
    _site: Site

    def __enter__(self) -> CT:
        self._conn = conn = self._pool._borrow(self._timeout, self._tag, self._site)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        pool = self._pool
        status: int = _UNKNOWN
        try:
            status = conn.pgconn.transaction_status
            if status != _IDLE and status != _UNKNOWN:
                if conn.lock.locked():
                    # A generator of the block still holds psycopg's lock: a commit would
                    # wait for it forever. _return() closes the connection.
                    pool._busy_at_exit(conn, exc_type is None)
                else:
                    pool._end_transaction(conn, exc_type is None, status)
                status = _UNKNOWN  # changed: _return() reads it again
        finally:
            pool._return(conn, None, status == _IDLE)


class Pool(Waits[CT], Generic[CT]):
    """An asyncio PostgreSQL pool, drop-in for psycopg_pool.ConnectionPool.

    Adds validation with a bypass window, recovery without backoff lag while borrowers
    wait, lifetime/idle checks at borrow, a complete session reset, a use-after-return
    guard, leak tracking, fork safety, graceful drain, `stats()` and errors that say why.
    """

    def __init__(
        self,
        conninfo: str | PoolConfig | Callable[..., Any] = "",
        *,
        config: PoolConfig | None = None,
        connection_class: type[CT] = cast(type[CT], Connection),  # noqa: B008
        kwargs: dict[str, Any] | Callable[..., Any] | None = None,
        open: bool | None = None,
        configure: Callable[[CT], Any] | None = None,
        check: Callable[[CT], Any] | None = None,
        reset: Any = None,
        reconnect_failed: Callable[[Pool[CT]], Any] | None = None,
        close_returns: bool = False,
        **settings: Any,
    ) -> None:
        _psycopg.check_connection_class(connection_class, Connection)
        check_callbacks(configure=configure, check=check, reconnect_failed=reconnect_failed)
        kwargs_fn = kwargs if callable(kwargs) else None
        cfg = config_for_pool(
            type(self).__name__, conninfo, config, None if kwargs_fn else kwargs, reset, settings
        )
        if isinstance(conninfo, PoolConfig):
            conninfo = ""
        # Callables are called for each new connection (rotated passwords, IAM tokens).
        self.conninfo: str | Callable[..., Any] = conninfo if callable(conninfo) else cfg.conninfo
        self.kwargs: dict[str, Any] | Callable[..., Any] = kwargs_fn or cfg.connect_kwargs()
        self.connection_class = connection_class
        self.close_returns = close_returns
        self._configure = configure
        # psycopg_pool's attribute, kept as given (Django's own suite reads it). The pools'
        # own check_connection means the built-in validation (unless validate=False turned
        # it off); any other callable runs as the user's check (see _waits._ready).
        self._check = check
        self._check_fn = None if cfg.validate and is_builtin_check(check) else check
        self._reconnect_failed = reconnect_failed
        self._init_core(cfg, cfg.name)
        policy = cfg.resolved_reset
        self._reset_fn: Callable[[CT], Any] | None = policy if callable(policy) else None
        self._auto = policy == "auto"
        self._reset_sql = None if callable(policy) or self._auto else _reset.FIXED[policy]
        self._peek = cfg.validate
        # Back for less than this: lent without even the socket peek (see PEEK_AFTER).
        self._instant_window = min(PEEK_AFTER, self._fast_window)
        # No reset statement or callback on every return ("auto" decides per borrow).
        self._no_reset = self._reset_sql is None and self._reset_fn is None
        self._connect_timeout = connect_timeout_default(cfg)
        self._init_lifecycle()
        self._open_implicit = False
        if ASYNC and open:
            warnings.warn(
                f"opening the async pool {type(self).__name__} in the constructor is "
                "deprecated: use `pool.open()` or `with pool:`",
                RuntimeWarning,
                stacklevel=2,
            )
        if open is None:
            open = self._open_implicit = True
            # The first borrow must take the slow path, where the warning is given: the
            # fast path stays free of the check (windows restored by _end_implicit_open).
            self._fast_window = self._instant_window = -1.0
        if open:
            self._open()

    # -- borrow ------------------------------------------------------------------------

    def connection(
        self, timeout: float | None = None, *, tag: str | None = None
    ) -> _ConnectionBlock[CT]:
        """Borrow a connection for an `with` block; the way to use the pool."""
        block: _ConnectionBlock[CT] = _new(_ConnectionBlock)
        block._pool = self
        block._timeout = timeout
        block._tag = tag
        block._site = _getframe(1)
        return block

    def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> CT:
        """Borrow a connection; pair every call with `putconn()` (prefer `connection()`)."""
        return self._borrow(timeout, tag, _getframe(1))

    def _borrow(self, timeout: float | None, tag: str | None, site: Site) -> CT:
        """Borrow, attributing the borrow to `site` (a frame, a function's code, or None)."""
        now = monotonic()
        if not self._idle:
            # Nothing idle (read without the lock: the line re-checks under it): straight
            # to the line, one lock round less per contended borrow.
            return self._borrow_slow(now, timeout, tag, site, None)
        slot: Slot | None = None
        # acquire()/release() rather than `with`: half the cost, on the path of every borrow.
        lock = self._lock
        lock.acquire()
        try:
            idle = self._idle
            if idle and not self._draining:
                slot = idle.popleft() if self._fifo else idle.pop()
                # _lendable_now(), inlined: this is the path of nearly every borrow.
                if (
                    now - slot.returned_at < self._instant_window
                    and slot.pending is None
                    and now < slot.expire_at
                    and slot.created_at >= self._invalid_before
                    and (slot.checked or not self._check_fn)
                ):
                    # Back a moment ago: nothing to check, book it in the same lock.
                    # A new handle for this borrow (_psycopg.new_handle(), inlined).
                    conn = _new(slot.cls)
                    conn.__dict__ = state = slot.conn.__dict__
                    if self._lent.setdefault(id(conn), slot) is not slot:
                        self._book(self._lent, id(conn), slot)
                    self._n_fast += 1
                    # _lend(), inlined (a Python call is ~2% of a borrow+return): keep the
                    # two in step.
                    if site is None:
                        site = _getframe(1)
                    if site.__class__ is CodeType:
                        slot.code, slot.lasti = site, -1
                    else:
                        f: FrameType = site  # type: ignore[assignment]
                        skip = FRAMEWORK_FILES.get(f.f_code.co_filename)
                        if skip or (skip is None and is_framework(f.f_code.co_filename)):
                            f = user_frame(f)
                        slot.code, slot.lasti = f.f_code, f.f_lasti
                        if self._capture_stack:
                            slot.stack = format_stack(f)
                    slot.t0 = now
                    slot.owner = get_ident()
                    slot.task = None
                    slot.tag = tag
                    slot.warned = False
                    state[POOL_ATTR] = self
                    return conn  # type: ignore[no-any-return]
        finally:
            lock.release()
        if slot is not None:
            conn = slot.conn
            idle_for = now - slot.returned_at
            if (
                slot.pending is None
                and idle_for < self._fast_window
                and now < slot.expire_at
                and slot.created_at >= self._invalid_before
                and (slot.checked or not self._check_fn)
                and not (self._peek and not slot.peek.quiet(conn))
            ):
                return self._lend(slot, now, tag, site, None, None)
        return self._borrow_slow(now, timeout, tag, site, slot)

    def _lendable_now(self, slot: Slot, now: float) -> bool:
        """True if `slot` may be lent with no check at all: back a moment ago, nothing
        pending, within its lifetime, not invalidated, and past the user's check once."""
        return (
            now - slot.returned_at < self._instant_window
            and slot.pending is None
            and now < slot.expire_at
            and slot.created_at >= self._invalid_before
            and (slot.checked or not self._check_fn)
        )

    def _lend(
        self,
        slot: Slot,
        now: float,
        tag: str | None,
        site: Site,
        waited: float | None,
        handle: CT | None,
    ) -> CT:
        """Record the borrow on `slot`, lending a new handle (or `handle`, already booked).

        The pool keeps no reference to the handle: a borrower that drops it unreturned
        lets it be collected, and the slot comes back (_reclaim).
        """
        if handle is None:
            conn: CT = _psycopg.new_handle(slot.conn, slot.cls)
        else:
            conn = handle
        if site is None:
            site = _getframe(2)
        if site.__class__ is CodeType:
            slot.code, slot.lasti = site, -1
        else:
            f: FrameType = site  # type: ignore[assignment]  # (no cast(): a call per borrow)
            skip = FRAMEWORK_FILES.get(f.f_code.co_filename)
            if skip or (skip is None and is_framework(f.f_code.co_filename)):
                f = user_frame(f)
            slot.code, slot.lasti = f.f_code, f.f_lasti
            if self._capture_stack:
                slot.stack = format_stack(f)
        slot.t0 = now
        slot.owner = get_ident()
        slot.task = None
        slot.tag = tag
        slot.warned = False
        setattr(conn, POOL_ATTR, self)  # psycopg's mark of a lent pooled connection
        if handle is None:
            with self._lock:
                self._book(self._lent, id(conn), slot)
                if waited is None:
                    self._n_fast += 1
        if waited is not None:
            self._wait_q.append(waited)
        return conn

    def _borrow_slow(
        self, t0: float, timeout: float | None, tag: str | None, site: Site, slot: Slot | None
    ) -> CT:
        deadline = t0 + (self.timeout if timeout is None else timeout)
        if site is None:
            site = _getframe(2)
        if self._fast_window < 0:
            self._end_implicit_open()
        while True:
            if slot is None:
                slot = self._take_slot(t0, deadline)
                now = monotonic()
                if self._lendable_now(slot, now):
                    # Handed over as it came back (the common case under contention).
                    return self._lend(slot, now, tag, site, now - t0, None)
            if self._ready(slot, deadline):
                now = monotonic()
                return self._lend(slot, now, tag, site, now - t0, None)
            slot = None

    def _end_implicit_open(self) -> None:
        """First slow borrow of a pool opened by default: warn (once), restore the windows."""
        with self._lock:
            implicit, self._open_implicit = self._open_implicit, False
            self._fast_window = min(self._bypass, self.config.max_idle)
            self._instant_window = min(PEEK_AFTER, self._fast_window)
        if implicit and not ASYNC:
            warnings.warn(
                f"the default for the {type(self).__name__} 'open' parameter will "
                "become 'False' in a future release: pass open=True/False, or use "
                f"`with {type(self).__name__}(...) as pool:`",
                DeprecationWarning,
                stacklevel=5,
            )
        if implicit and ASYNC:
            warnings.warn(
                f"opening the async pool {type(self).__name__} in the constructor is "
                "deprecated: use `pool.open()` or `with pool:`",
                RuntimeWarning,
                stacklevel=5,
            )

    # -- parking (Django's CONN_MAX_AGE) -------------------------------------------------

    def _park(self, conn: CT) -> bool:
        """End a borrow but keep `conn` reserved for its borrower, unless someone needs it.

        False, and nothing done, when it must go back through putconn() instead: a
        borrower is waiting, or its session needs a reset (the reset policy runs on
        return). The pool takes a parked connection back when a borrower would otherwise
        wait at max_size; `_unpark()` tells the parker whether it still has it.

        No lock: this runs at the end of every Django request. The slot stays booked as
        lent and is only marked, in `_parked`; whoever pops it from there owns it (the
        parker unparking, a borrower stealing, housekeeping expiring), and `dict.pop` is
        atomic. In-use counts leave the parked slots out.
        """
        now = monotonic()
        key = id(conn)
        if (
            not self._no_reset
            or id(conn.__dict__) in _psycopg.DIRTY  # (state_key(), inlined)
            or conn.pgconn.transaction_status != _IDLE
            or conn.lock.locked()  # (a generator left unfinished: putconn() closes it)
        ):
            return False
        slot = self._lent.get(key)
        if slot is None or conn.__class__ is not slot.cls or slot.parked:
            self._not_mine(conn)
        # The borrower's own connection: its settings are read outside the lock.
        state = conn.__dict__
        if (
            ATTRS_OF(state) != slot.attrs
            or THRESHOLD_OF(conn) != slot.threshold
            or HANDLERS_OF(state) != slot.handlers
        ):
            return False
        if self._waiting:
            return False
        # Read before the slot is offered: a stealer may lend it at once.
        tag, held = slot.tag, now - slot.t0
        if slot.warned:
            self._late_return(slot, now)
            slot.warned = False  # reported: not again if putconn() follows after all
        # The request ended well: its last success, which a broken connection found later
        # compares the parked ones against (see _unpark).
        slot.returned_at = slot.last_good = now
        # Weak, so that a parker that goes away lets its handle be collected; the pool
        # needs it only to refuse it if it takes the connection back (Slot.disown()).
        slot.wr = ref(conn)
        slot.parked = True
        parked = self._parked
        parked[key] = slot
        # A borrower that joined the line before the slot was offered did not see it; it
        # looks again after joining (_take_slot), so one of the two sees the other.
        if self._waiting and parked.pop(key, None) is slot:
            slot.parked = False
            slot.wr = NO_REF
            return False
        self._hold_q.append((tag, held))
        return True

    def _unpark(self, conn: CT, tag: str | None = None, site: Site = None) -> bool:
        """Take back a parked connection: False if the pool gave it to someone else."""
        now = monotonic()
        # One atomic pop decides between the parker and a stealer (see _park).
        slot = self._parked.pop(id(conn), None)
        if slot is None:
            return False
        if slot.wr() is not conn:
            # A stale entry of a collected handle whose id `conn` reuses: the reclaim
            # settles that slot; `conn` was never parked.
            slot.parked = False
            return False
        if slot.created_at < self._invalid_before:
            # Older than the last success of a connection found broken since it was
            # parked (an outage, a restart): replaced, as the idle ones were; the parker
            # borrows anew instead of failing its next query.
            with self._lock:
                self._unbook_parked(id(conn), slot)
            self._retire(slot)
            return False
        slot.parked = False
        slot.wr = NO_REF
        self._unparks.append(None)  # counted as an immediate borrow by _fold()
        self._lend(slot, now, tag, site if site is not None else _getframe(1), None, conn)
        return True

    def __enter__(self) -> Pool[CT]:
        """Open the pool (as psycopg_pool does: without waiting; call wait() for that)."""
        self._open_implicit = False  # used as a context manager: the way to open it
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()
