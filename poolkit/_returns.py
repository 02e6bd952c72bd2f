# WARNING: generated from poolkit/_returns_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Pool's return path: commit or roll back, restore, reset, and back to idle.

Generated from poolkit/_returns_async.py: edit that file, not this one.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import _getframe
from time import monotonic
from types import FrameType
from typing import Any, Generic, NoReturn, TypeVar, cast

from psycopg import Connection, ProgrammingError
from psycopg.errors import InFailedSqlTransaction
from psycopg.pq import TransactionStatus

from . import _psycopg, _reset
from ._compat import ensure
from ._leaks import logger
from ._lifecycle import Lifecycle
from ._psycopg import ATTRS_OF, HANDLERS_OF, POOL_ATTR, THRESHOLD_OF
from ._slot import NO_REF, Slot

CT = TypeVar("CT", bound=Connection[Any])

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN
_ACTIVE = TransactionStatus.ACTIVE
_INERROR = TransactionStatus.INERROR
# psycopg's commit() of a failed transaction rolls back silently; a block that swallowed
# a database error must not look committed.
_FAILED_TX = (
    "a statement failed inside this connection() block and its error was caught: "
    "the transaction was rolled back, nothing was committed"
)


class Returns(Lifecycle[CT], Generic[CT]):
    """Connections coming back: never lost, never carrying anything to the next borrower."""

    _reset_fn: Callable[[CT], Any] | None
    _reset_sql: bytes | None
    _auto: bool
    _no_reset: bool

    def putconn(self, conn: CT) -> None:
        """Give back a connection obtained with `getconn()`."""
        self._return(conn, _getframe(1))

    def _return(self, conn: CT, f: FrameType | None, idle: bool = False) -> None:
        """Take `conn` back (`idle`: the caller just saw it IDLE, the common case)."""
        now = monotonic()
        key = id(conn)
        slot = self._lent.get(key)
        # Booked under its id, of this pool's handle class: the handle lent on this slot
        # (a foreign object, or a handle of another pool, has another class).
        if slot is None or conn.__class__ is not slot.cls:
            self._not_mine(conn)
            return
        if slot.parked:
            # Given back while parked, without _unpark(): claim it first, as _unpark does.
            if self._parked.pop(key, None) is not slot:
                self._not_mine(conn)  # the pool took it back meanwhile
                return
            slot.parked = False
            slot.wr = NO_REF
        elif conn.__class__ is not slot.cls:
            # Parked, and taken back by a borrower between the two reads above (it refuses
            # the handle before it clears `parked`): the slot is someone else's now.
            self._not_mine(conn)
            return
        # From now on this handle refuses any use, for good: the next borrow of the same
        # server connection gets a new one.
        conn.__class__ = slot.guarded
        # Where it came back: putconn()'s caller; None for the end of a connection() block.
        slot.returned_at_frame = (f.f_code, f.f_lasti) if f is not None else None
        self._hold_q.append((slot.tag, now - slot.t0))
        if slot.warned:
            self._late_return(slot, now)
        # As psycopg_pool does: a connection kept after its return must not keep the pool
        # alive, and psycopg reads this attribute in close(), __exit__ and __del__.
        state = conn.__dict__
        state[POOL_ATTR] = None
        if (
            (idle or conn.pgconn.transaction_status == _IDLE)
            and now < slot.expire_at
            and slot.created_at >= self._invalid_before
            and self._no_reset
            and id(state) not in _psycopg.DIRTY  # (state_key(), inlined)
            and ATTRS_OF(state) == slot.attrs  # _psycopg.unchanged(), inlined
            and HANDLERS_OF(state) == slot.handlers
            and THRESHOLD_OF(conn) == slot.threshold
            and not conn.pgconn.pipeline_status  # (a pipeline left open reads IDLE)
            and not conn.lock.locked()  # (nor a notifies() generator left unfinished)
            and not self._closed
        ):
            slot.returned_at = slot.last_good = now
            lock = self._lock
            lock.acquire()  # (not `with`: half the cost, on the path of every return)
            try:
                if self._lent.pop(key, None) is slot:
                    if self._waiting:
                        self._put_idle_locked(slot)
                    else:
                        self._idle.append(slot)
            finally:
                lock.release()
            return
        with self._lock:
            if self._lent.pop(key, None) is not slot:
                return  # returned twice, concurrently: the other return wins
        if self._recycle_or_close(slot, now):
            with self._lock:
                self._put_idle_locked(slot)

    def _note_connect_failure(self, error: BaseException, t0: float) -> None:
        super()._note_connect_failure(error, t0)
        # A borrower waits for a connection that cannot be opened while a thread keeps one
        # parked between requests: lend that one rather than let the wait time out.
        with self._lock:
            stolen = self._steal_due_locked() if self._waiting else None
        if stolen is not None and self._recycle_or_close(stolen, monotonic()):
            with self._lock:
                self._put_idle_locked(stolen)  # (to the first waiter)

    def _recycle_or_close(self, slot: Slot, now: float) -> bool:
        """_recycle(), closing the connection if cancelled meanwhile (anyio cancel scopes
        cancel every await): the slot goes back to the books, never lost."""
        try:
            return self._recycle(slot, now)
        except BaseException:
            if slot.conn is not None and not slot.conn.closed:
                self._retire(slot)
            raise

    def _not_mine(self, conn: Any) -> NoReturn:
        owner = _psycopg.get_pool(conn)
        if owner is self:
            raise ValueError(
                f"can't return connection to pool {self.name!r}: it is not lent (returned twice?)"
            )
        if owner is None:
            raise ValueError(
                f"can't return connection to pool {self.name!r}, it doesn't belong to any pool"
            )
        raise ValueError(
            f"can't return connection to pool {self.name!r}, it belongs to pool "
            f"{getattr(owner, 'name', owner)!r}"
        )

    def _recycle(self, slot: Slot, now: float) -> bool:
        """Bring a connection back to a clean idle state; False if it was disposed of."""
        conn = slot.conn
        pgconn = conn.pgconn
        status = pgconn.transaction_status
        # A pipeline left open with nothing pending reads IDLE or INTRANS; a generator
        # left suspended (cursor.stream(), copy(), notifies()) holds psycopg's lock.
        pipeline = status != _UNKNOWN and bool(pgconn.pipeline_status)
        busy = status != _UNKNOWN and conn.lock.locked()
        if status in (_UNKNOWN, _ACTIVE) or pipeline or busy:
            with self._lock:
                self._n_bad_returns += 1
        if status == _UNKNOWN:
            if conn.broken and not _psycopg.finished(conn):
                self._lost(slot)  # the server or the network broke it
            else:
                # Closed by its borrower, or by psycopg itself (it drops a connection
                # whose query cancellation was interrupted: a task cancelled twice, a
                # client gone mid-stream): nothing says the server is gone, so the other
                # connections stay.
                self._retire(slot)
            return False
        if self._closed or now >= slot.expire_at or slot.created_at < self._invalid_before:
            self._retire(slot)
            return False
        if busy:
            # Its next use would wait for the lock forever, or the generator, resumed,
            # would read the next borrower's results.
            logger.warning(
                "pool %r: connection returned busy (a cursor.stream(), copy() or "
                "notifies() generator was left unfinished): closed",
                self.name,
            )
            self._retire(slot)
            return False
        if pipeline:
            # psycopg still holds the pipeline the borrower entered: nothing short of a
            # new connection leaves it in a state the next borrower can trust.
            logger.warning(
                "pool %r: connection returned in pipeline mode (a pipeline was entered "
                "and not left before the return): closed",
                self.name,
            )
            self._retire(slot)
            return False
        self._deadlines[id(slot)] = (now + self.timeout, conn)
        try:
            if status == _ACTIVE:
                logger.warning(
                    "pool %r: connection returned in state ACTIVE (mid-operation): closed",
                    self.name,
                )
                self._retire(slot)
                return False
            if status != _IDLE:
                logger.warning(
                    "pool %r: connection returned inside a transaction (%s): rolled back",
                    self.name,
                    TransactionStatus(status).name,
                )
                try:
                    conn.rollback()
                except Exception as ex:
                    logger.warning(
                        "pool %r: rollback failed (%s): connection replaced", self.name, ex
                    )
                    self._retire(slot)
                    return False
            # Cursors of a class the borrower chose ran untracked: "auto" saw nothing.
            untracked = (
                conn.cursor_factory is not slot.attrs[5]
                or conn.server_cursor_factory is not slot.attrs[6]
            )
            if not _psycopg.unchanged(conn, slot.attrs, slot.threshold):
                self._restore(conn, slot.attrs, slot.threshold)
            if HANDLERS_OF(conn.__dict__) != slot.handlers:
                _psycopg.restore_handlers(conn, slot.handlers)
            if self._reset_fn is not None:
                try:
                    ensure(self._reset_fn(cast(CT, conn)))
                    if (st := pgconn.transaction_status) != _IDLE:
                        raise ProgrammingError(
                            "the reset function left the connection in state "
                            f"{TransactionStatus(st).name}"
                        )
                except Exception as ex:
                    logger.warning("pool %r: reset failed (%s): connection replaced", self.name, ex)
                    self._retire(slot)
                    return False
                with self._lock:
                    self._n_resets += 1
            sql = self._reset_sql
            # Whatever the policy: adapters a borrower registered are client-side state.
            mask = _psycopg.DIRTY.pop(_psycopg.state_key(conn), 0)
            if mask & _psycopg.ADAPTERS_BIT:
                _psycopg.restore_adapters(conn)
                mask &= ~_psycopg.ADAPTERS_BIT  # (no SQL for it)
            if self._auto:
                if untracked:
                    mask = _reset.EVERYTHING
                sql = _reset.auto_sql(mask) if mask else None
            if sql is not None:
                # Pipelined: the reset travels now and its answer is read by the next
                # borrower, so nobody waits a round trip for it.
                try:
                    pgconn.send_query(sql)
                    pgconn.flush()
                except Exception:
                    self._lost(slot)
                    return False
                if _reset.drops_prepared(sql):
                    _psycopg.forget_prepared(conn)
                slot.pending = sql
                with self._lock:
                    self._n_resets += 1
        finally:
            self._deadlines.pop(id(slot), None)
        slot.returned_at = monotonic()
        if status == _IDLE:
            slot.last_good = now
        return True

    def _restore(
        self, conn: Any, attrs: tuple[Any, ...], threshold: tuple[int | None, int]
    ) -> None:
        """Undo a borrow's client-side changes through psycopg's public setters.

        The setters also drop psycopg's cached BEGIN statement, which direct writes
        would leave behind (the next transaction would run READ ONLY, say).
        """
        autocommit, isolation, read_only, deferrable, rows, cursors, server = attrs
        if conn.autocommit != autocommit:
            conn.set_autocommit(autocommit)
        if conn.isolation_level != isolation:
            conn.set_isolation_level(isolation)
        if conn.read_only != read_only:
            conn.set_read_only(read_only)
        if conn.deferrable != deferrable:
            conn.set_deferrable(deferrable)
        conn.row_factory = rows
        conn.cursor_factory = cursors
        conn.server_cursor_factory = server
        conn.prepare_threshold, conn.prepared_max = threshold

    def _busy_at_exit(self, conn: CT, ok: bool) -> None:
        """A `connection()` block ends while a generator of its own holds the connection."""
        if ok:
            # Raised, not only logged: the block ended normally, yet its statement in
            # progress never completed and its transaction cannot be committed.
            raise ProgrammingError(
                f"pool {self.name!r}: the connection was busy at the end of the "
                "connection() block: a cursor.stream(), copy() or notifies() generator "
                "was left unfinished (run it to its end, or close it, inside the block). "
                "Its statement did not complete and nothing of the transaction was "
                "committed; the connection is closed"
            )

    def _end_transaction(self, conn: CT, ok: bool, status: int) -> None:
        """Commit or roll back at the end of a `connection()` block, within a deadline."""
        key = id(conn)
        self._deadlines[key] = (monotonic() + self.timeout, conn)
        try:
            if ok and status == _INERROR:
                conn.rollback()
                raise InFailedSqlTransaction(_FAILED_TX)
            if ok:
                conn.commit()
            else:
                try:
                    conn.rollback()
                except Exception as ex:
                    logger.warning("pool %r: rollback failed: %s", self.name, ex)
        finally:
            self._deadlines.pop(key, None)
