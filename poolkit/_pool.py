"""Pool: psycopg_pool's ConnectionPool with poolkit's borrow/return path (twin of _pool_async)."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from sys import _getframe
from threading import get_ident as _get_ident
from time import monotonic
from traceback import format_stack
from types import FrameType, TracebackType
from typing import Any, Generic, TypeVar, cast
from weakref import ref as _ref

from psycopg import Connection
from psycopg.errors import InFailedSqlTransaction
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool
from psycopg_pool.pool import AddConnection, MaintenanceTask, Schedule

from ._base import (
    OWNER,
    PEEK_AFTER,
    SKIP_PREFIXES,
    PoolCore,
    borrow_frame,
    leak_logger,
    logger,
)
from ._config import PoolConfig, mask_conninfo
from ._conn import (
    build_config,
    check_result,
    drain_gen,
    install_tracking_cursors,
    ping_gen,
    remember_attrs,
    restore_attrs,
    tracking_class,
)
from ._errors import PoolClosed, PoolTimeout, TooManyRequests

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
_TIMED_OUT = object()


class _Waiter(Generic[CT]):
    """A client queued for a connection; resolved once, by a hand-off, an error or its timeout.

    A pre-acquired plain lock is the cheapest one-shot wake-up threading offers: the
    hand-off releases it, the waiter blocks acquiring it. Resolution happens under the
    pool lock, so a hand-off and a timeout cannot both win.
    """

    __slots__ = ("conn", "error", "sem", "t0")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.conn: CT | None = None
        self.error: Any = None
        self.sem = threading.Lock()
        self.sem.acquire()

    def set(self, conn: CT) -> bool:
        if self.conn is not None or self.error is not None:
            return False
        self.conn = conn
        self.sem.release()
        return True

    def fail(self, error: BaseException) -> bool:
        return self.fail_now(error)

    def fail_now(self, error: Any) -> bool:
        if self.conn is not None or self.error is not None:
            return False
        self.error = error
        self.sem.release()
        return True


class _Lease(Generic[CT]):
    """`with pool.connection() as conn`: commit on success, rollback on error, return."""

    __slots__ = ("_conn", "_pool", "_tag", "_timeout")

    def __init__(self, pool: Pool[CT], timeout: float | None, tag: str | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._tag = tag

    def __enter__(self) -> CT:
        self._conn = conn = self._pool._pk_borrow(self._timeout, self._tag, _getframe(1))
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        try:
            status = conn.pgconn.transaction_status
            if status != _IDLE and status != _UNKNOWN:
                if exc_type is None and status == _INERROR:
                    conn.rollback()
                    raise InFailedSqlTransaction(_FAILED_TX)
                if exc_type is None:
                    conn.commit()
                else:
                    try:
                        conn.rollback()
                    except Exception as ex:
                        logger.warning("pool %r: rollback failed: %s", self._pool.name, ex)
        finally:
            pool = self._pool
            if conn._pool is pool:
                pool._pk_put(conn)
            else:
                pool.putconn(conn)


class Pool(PoolCore, ConnectionPool[CT]):
    """A PostgreSQL pool for threads, drop-in for psycopg_pool.ConnectionPool.

    Adds validation with a bypass window, bulk recovery after a lost connection,
    lifetime/idle checks at borrow, session reset, leak tracking, fork safety,
    graceful drain, `stats()` and timeout errors that describe the pool.
    """

    def __init__(
        self,
        conninfo: str | Callable[..., Any] = "",
        *,
        config: PoolConfig | None = None,
        connection_class: type[CT] = cast(type[CT], Connection),  # noqa: B008
        kwargs: dict[str, Any] | None = None,
        open: bool | None = None,
        configure: Callable[[CT], Any] | None = None,
        check: Callable[[CT], Any] | None = None,
        reset: Any = None,
        reconnect_failed: Callable[[Pool[CT]], Any] | None = None,
        close_returns: bool = False,
        **settings: Any,
    ) -> None:
        cfg = build_config(type(self).__name__, conninfo, config, kwargs, reset, settings)
        self._pk_init(cfg, check)
        self._pk_drained = threading.Event()
        if self._pk_reset_auto:
            connection_class = tracking_class(connection_class)
        pool_kwargs = cfg.pool_kwargs()
        pool_kwargs.pop("conninfo")
        pool_kwargs.pop("kwargs")
        super().__init__(
            conninfo if callable(conninfo) else cfg.conninfo,
            connection_class=connection_class,
            kwargs=cfg.connect_kwargs(),
            open=open,
            configure=configure,
            close_returns=close_returns,
            reconnect_failed=cast(Any, reconnect_failed),
            **pool_kwargs,
        )

    # -- borrow ------------------------------------------------------------------------

    def connection(self, timeout: float | None = None, *, tag: str | None = None) -> _Lease[CT]:  # type: ignore[override]
        """Borrow a connection for an `with` block; the way to use the pool."""
        return _Lease(self, timeout, tag)

    def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> CT:
        """Borrow a connection; pair every call with `putconn()` (prefer `connection()`)."""
        return self._pk_borrow(timeout, tag, _getframe(1))

    def _pk_borrow(self, timeout: float | None, tag: str | None, f: FrameType) -> CT:
        if self._pk_forked:
            self._pk_rebuild_after_fork()
        if self._pk_reclaim:
            self._pk_give_back_reclaimed()
        now = monotonic()
        conn: CT | None = None
        waiter: _Waiter[CT] | None = None
        fast = False
        with self._lock:
            if self._closed or self._pk_draining:
                self._pk_raise_closed()
            idle = self._pool
            if idle:
                conn = idle.pop()
                if len(idle) < self._nconns_min:
                    self._nconns_min = len(idle)
                # Checked inside the lock so the counter only ever goes up.
                if (
                    conn._pk_pending is None
                    and (idle_for := now - conn._pk_returned_at) < self._pk_fast_window
                    and now < conn._expire_at
                    and (
                        # The peek is a syscall; a connection back for under a
                        # millisecond has had no time to be dropped.
                        idle_for < PEEK_AFTER
                        or not self._pk_validate
                        or not conn._pk_poll.poll(0)
                        or not self._pk_socket_broken(conn)
                    )
                ):
                    self._n_fast += 1
                    fast = True
            else:
                # Queue up in the same critical section that found nothing idle.
                waiter = self._pk_enqueue(now)
        if waiter is not None:
            return self._pk_getconn_wait(now, timeout, tag, f, waiter)
        assert conn is not None
        if not fast:
            if self._pk_ready(conn, now, now + (timeout or self.timeout)):
                self._pk_wait_q.append(monotonic() - now)
            else:
                conn = None
        if conn is None:
            return self._pk_getconn_wait(now, timeout, tag, f, None)
        # Registering needs no lock: a dict store is atomic, readers copy the dict first.
        if f.f_code.co_filename.startswith(SKIP_PREFIXES):
            f = borrow_frame(f)
        conn._pk_wr = wr = _ref(conn, self._pk_gc_cb)
        self._pk_borrowed[wr] = [
            now, f.f_code, f.f_lineno, _get_ident(), None, tag, False,
            format_stack(f) if self._pk_capture_stack else None,
        ]  # fmt: skip
        conn._pool = self
        return conn

    def _pk_hand_off(self, conn: CT) -> bool:
        """Give conn to the longest waiter still waiting (caller holds the lock)."""
        waiting = self._waiting
        while waiting:
            w = waiting.popleft()
            if w.set(conn):
                return True
        return False

    def _pk_enqueue(self, t0: float) -> _Waiter[CT]:
        """Put a borrower in line (caller holds the lock), or refuse it past max_waiting."""
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            self._n_rejected += 1
            raise TooManyRequests(
                f"the pool {self.name!r} has already {len(self._waiting)} requests "
                f"waiting ({self._pk_state_line()}): raise max_waiting or max_size"
            )
        waiter: _Waiter[CT] = _Waiter(t0)
        self._waiting.append(waiter)
        self._maybe_grow_pool()
        return waiter

    def _pk_getconn_wait(
        self,
        t0: float,
        timeout: float | None,
        tag: str | None,
        f: FrameType,
        waiter: _Waiter[CT] | None,
    ) -> CT:
        deadline = t0 + (self.timeout if timeout is None else timeout)
        while True:
            conn: CT | None = None
            if waiter is None:
                if self._pk_reclaim:
                    self._pk_give_back_reclaimed()
                with self._lock:
                    if self._closed or self._pk_draining:
                        self._pk_raise_closed()
                    if self._pool:
                        conn = self._pool.pop()
                        if len(self._pool) < self._nconns_min:
                            self._nconns_min = len(self._pool)
                    else:
                        waiter = self._pk_enqueue(t0)
            if waiter is not None:
                conn = self._pk_wait_in_line(waiter, t0, deadline)
                waiter = None
            assert conn is not None
            now = monotonic()
            if self._pk_ready(conn, now, deadline):
                self._pk_wait_q.append(now - t0)
                self._pk_register(conn, now, tag, None, f)
                conn._pool = self
                return conn
            if now >= deadline:
                with self._lock:
                    self._n_timeouts += 1
                self._pk_event("timeout", self._pk_state_line())
                raise PoolTimeout(self._pk_timeout_message(now - t0))

    def _pk_wait_in_line(self, waiter: _Waiter[CT], t0: float, deadline: float) -> CT:
        try:
            waiter.sem.acquire(timeout=max(0.0, deadline - monotonic()))
        except BaseException:
            # Interrupted: never lose a connection that was handed over meanwhile.
            with self._lock:
                waiter.fail_now(_TIMED_OUT)
                self._pk_forget_waiter(waiter)
            if waiter.conn is not None:
                self._pk_give_back(waiter.conn)
            raise
        if waiter.conn is not None:  # set before the release that woke us
            return waiter.conn
        if waiter.error is None:
            with self._lock:
                # Timed out: settle it against a hand-off that may be happening now.
                waiter.fail_now(_TIMED_OUT)
                if waiter.conn is not None:
                    return waiter.conn
                self._pk_forget_waiter(waiter)
        if waiter.error is _TIMED_OUT:
            with self._lock:
                self._n_timeouts += 1
            self._pk_event("timeout", self._pk_state_line())
            raise PoolTimeout(self._pk_timeout_message(monotonic() - t0))
        raise waiter.error

    def _pk_forget_waiter(self, waiter: _Waiter[CT]) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiter)

    def _pk_ready(self, conn: CT, now: float, deadline: float) -> bool:
        """Make a popped idle connection ready to lend, or dispose of it and return False.

        Round trips are bounded by the borrower's deadline: a black-holed network costs
        the borrower its timeout, never more.
        """
        if conn._pk_pending is not None:
            # Usually already answered while the connection sat idle: no waiting here.
            try:
                check_result(conn.wait(drain_gen(conn.pgconn), timeout=max(0.001, deadline - now)))
                if self._configure is not None:
                    self._configure(conn)
            except Exception:
                self._pk_lost(conn, now, bulk=True)
                return False
            conn._pk_pending = None
            conn._pk_touched = False
        if now >= conn._expire_at:
            self._pk_replace(conn)
            return False
        idle_for = now - conn._pk_returned_at
        if idle_for > self.max_idle:
            # Idle past max_idle: a firewall may have dropped it silently; a ping could
            # hang until TCP gives up, so replace it instead.
            self._pk_replace(conn, shrink=self._nconns > self._min_size)
            return False
        if self._pk_validate:
            if idle_for >= self._pk_bypass:
                self._n_valid_run += 1
                try:
                    if self._pk_check is not None:
                        self._pk_check(conn)
                    else:
                        check_result(
                            conn.wait(ping_gen(conn.pgconn), timeout=max(0.001, deadline - now))
                        )
                except Exception:
                    self._n_valid_fail += 1
                    self._pk_lost(conn, now, bulk=True)
                    return False
                conn._pk_touched = False
            elif idle_for >= PEEK_AFTER and self._pk_socket_broken(conn):
                self._n_valid_fail += 1
                self._pk_lost(conn, now, bulk=True)
                return False
            else:
                self._n_valid_skip += 1
        return True

    # -- return ------------------------------------------------------------------------

    def putconn(self, conn: CT) -> None:
        """Give back a connection obtained with `getconn()`."""
        if getattr(conn, "_pool", None) is not self:
            self._check_pool_putconn(conn)
        self._pk_put(conn)

    def _pk_put(self, conn: CT) -> None:
        now = monotonic()
        rec = self._pk_borrowed.pop(conn._pk_wr, None)
        if (
            self._pk_plain_return
            and not conn._pk_touched
            and conn.pgconn.transaction_status == _IDLE
            and now < conn._expire_at
            and conn._created_at > self._drained_at
        ):
            conn._pk_returned_at = now
            conn._pool = None
            if rec is not None:
                self._pk_account(rec, now)
            with self._lock:
                if not self._closed:
                    if not self._pk_hand_off(conn):
                        self._pool.append(conn)
                    if self._pk_draining and not self._pk_borrowed:
                        self._pk_drained.set()
                    return
        elif rec is not None:
            self._pk_account(rec, now)
        if self._pk_draining and not self._pk_borrowed:
            self._pk_drained.set()
        if self._closed:
            self._close_connection(conn)
            return
        try:
            self._pk_return(conn, now)
        except BaseException:
            # Interrupted mid-return (KeyboardInterrupt during a rollback): if the
            # connection was not placed yet, drop it and refill.
            if getattr(conn, "_pool", None) is self:
                self._pk_abandon(conn)
            raise

    def _pk_return(self, conn: CT, now: float) -> None:
        pgconn = conn.pgconn
        status = pgconn.transaction_status
        if status != _IDLE:
            if status == _UNKNOWN:
                self._pk_lost(conn, now, bulk=conn.broken)
                return
            if status == _ACTIVE:
                logger.warning("pool %r: connection returned mid-operation: closed", self.name)
                self._pk_replace(conn)
                return
            logger.warning(
                "pool %r: connection returned inside a transaction: rolled back", self.name
            )
            try:
                conn.rollback()
            except Exception as ex:
                logger.warning("pool %r: rollback failed (%s): connection replaced", self.name, ex)
                self._pk_replace(conn)
                return
        if conn._created_at <= self._drained_at or now >= conn._expire_at:
            self._pk_replace(conn)
            return
        if conn._pk_touched or self._pk_restore_always:
            restore_attrs(conn)
        if self._pk_reset_callable is not None:
            self.run_task(_ResetTask(self, conn))
            return
        sql = conn._pk_dirty if self._pk_reset_auto else self._pk_reset_sql
        if sql is not None:
            # Pipelined: the reset travels now and its answer is read by the next
            # borrower, so nobody waits a round trip for it.
            try:
                pgconn.send_query(sql)
                pgconn.flush()
            except Exception:
                self._pk_lost(conn, now, bulk=True)
                return
            conn._pk_pending = sql
            self._n_resets += 1
        conn._pk_touched = False
        conn._pk_dirty = None
        conn._pk_returned_at = now
        self._add_to_pool(conn)

    def _pk_give_back(self, conn: CT) -> None:
        """Return a connection that was handed to a waiter who is gone."""
        conn._pk_returned_at = monotonic()
        self._add_to_pool(conn)

    def _add_to_pool(self, conn: CT) -> None:
        conn._pool = None
        with self._lock:
            if not self._closed:
                if self._pk_hand_off(conn):
                    return
                self._pool.append(conn)
                if self._pool_full_event and len(self._pool) >= self._min_size:
                    self._pool_full_event.set()
                return
        self._close_connection(conn)

    # -- disposal ----------------------------------------------------------------------

    def _pk_replace(self, conn: CT, shrink: bool = False) -> None:
        # Book the replacement before closing: an interruption during close must not
        # cost the pool its slot.
        if shrink:
            with self._lock:
                self._nconns -= 1
        else:
            self.run_task(AddConnection(self))
        self._close_connection(conn)

    def _pk_lost(self, conn: CT, now: float, bulk: bool) -> None:
        """A connection is found broken; with bulk, so is every idle one older than now."""
        with self._lock:
            self._n_lost += 1
            stale = self._pk_invalidate_older(now) if bulk else []
        self._pk_event("connection-lost", f"{len(stale)} older idle connections invalidated")
        logger.warning(
            "pool %r: connection lost; replacing it and %d older idle connections",
            self.name,
            len(stale),
        )
        for c in (conn, *stale):
            self._pk_replace(c)

    def _pk_abandon(self, conn: CT) -> None:
        conn._pool = None
        self._n_closed += 1
        with contextlib.suppress(Exception):  # already gone
            conn.pgconn.finish()
        self.run_task(AddConnection(self))

    def _close_connection(self, conn: CT) -> None:
        self._n_closed += 1
        conn._pool = None
        try:
            conn.close()
        except Exception as ex:  # a dead socket must not break the caller
            logger.debug("pool %r: error closing connection: %s", self.name, ex)

    def _connect(self, timeout: float | None = None) -> CT:
        t0 = monotonic()
        try:
            conn = super()._connect(timeout or self._pk_connect_timeout)
        except BaseException as ex:
            self._n_failed += 1
            self._pk_last_error = mask_conninfo(f"{type(ex).__name__}: {ex}".strip())
            raise
        self._pk_new_conn(conn, monotonic() - t0)
        if self._pk_reset_auto:
            install_tracking_cursors(conn)
        remember_attrs(conn)
        if self._pk_events and self._pk_events[-1][1] == "connection-lost":
            self._pk_event("recovered", "new connection established")
        return conn

    def _return_connection(self, conn: CT, from_getconn: bool) -> None:
        self._pk_return(conn, monotonic())

    # -- housekeeping ------------------------------------------------------------------

    def _start_initial_tasks(self) -> None:
        super()._start_initial_tasks()
        self.run_task(Schedule(self, _Housekeeping(self), self.housekeeping_interval))

    def _pk_give_back_reclaimed(self) -> None:
        with self._lock:
            lost = self._pk_take_reclaimed()
        for _ in lost:
            self.run_task(AddConnection(self))

    def _pk_housekeep(self) -> None:
        if self._pk_reclaim:
            self._pk_give_back_reclaimed()
        self._pk_fold()
        self._pk_leak_scan(monotonic())
        interval = self.config.keepalive_interval
        if interval:
            self._pk_keepalive(interval)

    def _pk_keepalive(self, interval: float) -> None:
        now = monotonic()
        with self._lock:
            due = [c for c in self._pool if now - c._pk_returned_at >= interval]
        for conn in due:
            with self._lock:
                try:
                    self._pool.remove(conn)
                except ValueError:
                    continue  # borrowed meanwhile
            if conn._pk_pending is None:
                self._n_valid_run += 1
                try:
                    check_result(conn.wait(ping_gen(conn.pgconn), timeout=self.timeout))
                except Exception:
                    self._n_valid_fail += 1
                    self._pk_lost(conn, monotonic(), bulk=True)
                    continue
                conn._pk_touched = False
            elif not self._pk_ready(conn, now, now + self.timeout):
                continue
            conn._pk_returned_at = monotonic()
            self._add_to_pool(conn)

    def check(self) -> None:
        """Validate every idle connection now; replace the broken ones."""
        with self._lock:
            conns = list(self._pool)
            self._pool.clear()
        now = monotonic()
        for conn in conns:
            conn._pk_returned_at = min(conn._pk_returned_at, now - self._pk_bypass - 1.0)
            saved, self._pk_validate = self._pk_validate, True
            try:
                ok = self._pk_ready(conn, now, now + self.timeout)
            finally:
                self._pk_validate = saved
            if ok:
                conn._pk_returned_at = monotonic()
                self._add_to_pool(conn)

    # -- shutdown and fork -------------------------------------------------------------

    def _pk_raise_closed(self) -> None:
        if self._pk_draining and not self._closed:
            raise PoolClosed(f"the pool {self.name!r} is closing: it lends no more connections")
        self._check_open_getconn()
        raise PoolClosed(f"the pool {self.name!r} is closed")

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until min_size connections are open; on failure say why."""
        try:
            super().wait(timeout)
        except PoolTimeout:
            why = f": {self._pk_last_error}" if self._pk_last_error else ""
            raise PoolTimeout(
                f"pool {self.name!r} could not open {self._min_size} connection(s) to "
                f"{mask_conninfo(self._pk_dsn())} within {timeout} s{why}"
            ) from None

    def close(self, timeout: float | None = None) -> None:
        """Stop lending, wait up to `timeout` (default: drain_timeout) for borrowers, close."""
        if self._closed:
            return
        if timeout is None:
            timeout = self.config.drain_timeout
        self._pk_draining = True
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            for w in waiting:
                w.fail_now(PoolClosed(f"the pool {self.name!r} is closing"))
        # The caller's own borrows cannot come back while it waits here: wait for others'.
        me = _get_ident()
        deadline = monotonic() + timeout
        while (left := deadline - monotonic()) > 0 and any(
            r[OWNER] != me for r in list(self._pk_borrowed.values())
        ):
            self._pk_drained.wait(min(left, 0.05))
        if self._pk_borrowed:
            # close(timeout=0) means "now": worth a note, not a warning.
            (leak_logger.warning if timeout > 0 else leak_logger.info)(
                "pool %r: closing with %d connection(s) still borrowed after a %.1f s drain: %s",
                self.name,
                len(self._pk_borrowed),
                timeout,
                "; ".join(f"{b.site} ({b.held_for:.1f} s)" for b in self.borrowed()),
            )
        super().close(timeout=5.0)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def _pk_rebuild_after_fork(self) -> None:
        # Several threads may reach a forked pool at once: one rebuilds, the others wait,
        # and the flag drops only when the new state is complete.
        with self._pk_fork_lock:
            if not self._pk_forked:
                return
            was_open = not self._closed
            # The parent's lock may have been held by a thread that does not exist here.
            self._lock = threading.RLock()
            self._pool = deque()
            self._waiting = deque()
            self._pk_borrowed = {}
            self._pk_reclaim = deque()
            self._pk_drained = threading.Event()
            self._workers = []
            self._sched_runner = None
            self._pool_full_event = None
            self._nconns = self._nconns_min = self._min_size
            self._growing = False
            self._closed, self._opened = True, False
            logger.info("pool %r: rebuilt in a forked child process", self.name)
            if was_open:
                self.open()
            self._pk_forked = False


class _Housekeeping(MaintenanceTask):
    """Periodic: give back slots of garbage-collected borrows, warn about leaks, keepalive."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, Pool)
        pool.schedule_task(self, pool.housekeeping_interval)
        pool._pk_housekeep()


class _ResetTask(MaintenanceTask):
    """Run a user reset callable off the borrower's path, then put the connection back."""

    def __init__(self, pool: Pool[Any], conn: Any) -> None:
        super().__init__(pool)
        self.conn = conn

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, Pool)
        conn = self.conn
        try:
            assert pool._pk_reset_callable is not None
            pool._pk_reset_callable(conn)
            if conn.pgconn.transaction_status != _IDLE:
                raise RuntimeError("reset function left the connection inside a transaction")
        except Exception as ex:
            logger.warning("pool %r: reset failed (%s): connection replaced", pool.name, ex)
            pool._pk_replace(conn)
            return
        pool._n_resets += 1
        conn._pk_touched = False
        conn._pk_returned_at = monotonic()
        pool._add_to_pool(conn)
