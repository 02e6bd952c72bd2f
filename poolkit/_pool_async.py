"""AsyncPool: psycopg_pool's AsyncConnectionPool with poolkit's borrow/return path."""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import current_task as _current_task
from collections import deque
from collections.abc import Callable
from sys import _getframe
from time import monotonic
from traceback import format_stack
from types import FrameType, TracebackType
from typing import Any, Generic, TypeVar, cast
from weakref import ref as _ref

from psycopg import AsyncConnection
from psycopg.errors import InFailedSqlTransaction
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.pool_async import AddConnection, MaintenanceTask, Schedule

from ._base import (
    PEEK_AFTER,
    SKIP_PREFIXES,
    TASK,
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

ACT = TypeVar("ACT", bound=AsyncConnection[Any])

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


class _Waiter(Generic[ACT]):
    """A client queued for a connection; resolved once, by a hand-off, an error or its timeout."""

    __slots__ = ("conn", "error", "fut")

    def __init__(self) -> None:
        self.conn: ACT | None = None
        self.error: Any = None
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self, conn: ACT) -> bool:
        if self.fut.done():
            return False
        self.conn = conn
        self.fut.set_result(None)
        return True

    async def fail(self, error: BaseException) -> bool:
        return self.fail_now(error)

    def fail_now(self, error: Any) -> bool:
        if self.fut.done():
            return False
        self.error = error
        self.fut.set_result(None)
        return True


class _Lease(Generic[ACT]):
    """`async with pool.connection() as conn`: commit on success, rollback on error, return."""

    __slots__ = ("_conn", "_pool", "_tag", "_timeout")

    def __init__(self, pool: AsyncPool[ACT], timeout: float | None, tag: str | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._tag = tag

    async def __aenter__(self) -> ACT:
        self._conn = conn = await self._pool._pk_borrow(self._timeout, self._tag, _getframe(1))
        return conn

    async def __aexit__(
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
                    await conn.rollback()
                    raise InFailedSqlTransaction(_FAILED_TX)
                if exc_type is None:
                    await conn.commit()
                else:
                    try:
                        await conn.rollback()
                    except Exception as ex:
                        logger.warning("pool %r: rollback failed: %s", self._pool.name, ex)
        finally:
            pool = self._pool
            if conn._pool is pool:
                await pool._pk_put(conn)
            else:
                await pool.putconn(conn)


class AsyncPool(PoolCore, AsyncConnectionPool[ACT]):
    """An asyncio PostgreSQL pool, drop-in for psycopg_pool.AsyncConnectionPool.

    Adds validation with a bypass window, bulk recovery after a lost connection,
    lifetime/idle checks at borrow, session reset, leak tracking, fork safety,
    graceful drain, `stats()` and timeout errors that describe the pool.
    """

    def __init__(
        self,
        conninfo: str | Callable[..., Any] = "",
        *,
        config: PoolConfig | None = None,
        connection_class: type[ACT] = cast(type[ACT], AsyncConnection),  # noqa: B008
        kwargs: dict[str, Any] | None = None,
        open: bool | None = None,
        configure: Callable[[ACT], Any] | None = None,
        check: Callable[[ACT], Any] | None = None,
        reset: Any = None,
        reconnect_failed: Callable[[AsyncPool[ACT]], Any] | None = None,
        close_returns: bool = False,
        **settings: Any,
    ) -> None:
        cfg = build_config(type(self).__name__, conninfo, config, kwargs, reset, settings)
        self._pk_init(cfg, check)
        self._pk_drained = asyncio.Event()
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

    def connection(self, timeout: float | None = None, *, tag: str | None = None) -> _Lease[ACT]:  # type: ignore[override]
        """Borrow a connection for an `async with` block; the way to use the pool."""
        return _Lease(self, timeout, tag)

    async def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> ACT:
        """Borrow a connection; pair every call with `putconn()` (prefer `connection()`)."""
        return await self._pk_borrow(timeout, tag, _getframe(1))

    async def _pk_borrow(self, timeout: float | None, tag: str | None, f: FrameType) -> ACT:
        if self._pk_forked:
            await self._pk_rebuild_after_fork()
        if self._pk_reclaim:
            self._pk_give_back_reclaimed()
        now = monotonic()
        conn: ACT | None = None
        if self._closed or self._pk_draining:
            self._pk_raise_closed()
        idle = self._pool
        if idle:
            conn = idle.pop()
            if len(idle) < self._nconns_min:
                self._nconns_min = len(idle)
        else:
            return await self._pk_getconn_wait(now, timeout, tag, f, self._pk_enqueue())
        assert conn is not None
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
        elif await self._pk_ready(conn, now, now + (timeout or self.timeout)):
            self._pk_wait_q.append(monotonic() - now)
        else:
            conn = None
        if conn is None:
            return await self._pk_getconn_wait(now, timeout, tag, f, None)
        if f.f_code.co_filename.startswith(SKIP_PREFIXES):
            f = borrow_frame(f)
        conn._pk_wr = wr = _ref(conn, self._pk_gc_cb)
        self._pk_borrowed[wr] = [
            now, f.f_code, f.f_lineno, 0, _current_task(), tag, False,
            format_stack(f) if self._pk_capture_stack else None,
        ]  # fmt: skip
        conn._pool = self
        return conn

    def _pk_enqueue(self) -> _Waiter[ACT]:
        """Put a borrower in line, or refuse it past max_waiting."""
        if self.max_waiting and len(self._waiting) >= self.max_waiting:
            self._n_rejected += 1
            raise TooManyRequests(
                f"the pool {self.name!r} has already {len(self._waiting)} requests "
                f"waiting ({self._pk_state_line()}): raise max_waiting or max_size"
            )
        waiter: _Waiter[ACT] = _Waiter()
        self._waiting.append(waiter)
        self._maybe_grow_pool()
        return waiter

    async def _pk_getconn_wait(
        self,
        t0: float,
        timeout: float | None,
        tag: str | None,
        f: FrameType,
        waiter: _Waiter[ACT] | None,
    ) -> ACT:
        deadline = t0 + (self.timeout if timeout is None else timeout)
        while True:
            conn: ACT | None = None
            if waiter is None:
                if self._pk_reclaim:
                    self._pk_give_back_reclaimed()
                if self._closed or self._pk_draining:
                    self._pk_raise_closed()
                if self._pool:
                    conn = self._pool.pop()
                    if len(self._pool) < self._nconns_min:
                        self._nconns_min = len(self._pool)
                else:
                    waiter = self._pk_enqueue()
            if waiter is not None:
                conn = await self._pk_wait_in_line(waiter, t0, deadline)
                waiter = None
            assert conn is not None
            now = monotonic()
            if await self._pk_ready(conn, now, deadline):
                self._pk_wait_q.append(now - t0)
                conn._pool = self
                self._pk_register(conn, now, tag, asyncio.current_task(), f)
                return conn
            if now >= deadline:
                self._n_timeouts += 1
                self._pk_event("timeout", self._pk_state_line())
                raise PoolTimeout(self._pk_timeout_message(now - t0))

    async def _pk_wait_in_line(self, waiter: _Waiter[ACT], t0: float, deadline: float) -> ACT:
        loop = asyncio.get_running_loop()
        handle = loop.call_at(
            loop.time() + max(0.0, deadline - monotonic()), waiter.fail_now, _TIMED_OUT
        )
        try:
            await waiter.fut
        except BaseException:
            # Cancelled: never lose a connection that was handed over meanwhile.
            self._pk_forget_waiter(waiter)
            if waiter.conn is not None:
                await self._pk_give_back(waiter.conn)
            raise
        finally:
            handle.cancel()
        if waiter.conn is not None:
            return waiter.conn
        self._pk_forget_waiter(waiter)
        if waiter.error is _TIMED_OUT:
            self._n_timeouts += 1
            self._pk_event("timeout", self._pk_state_line())
            raise PoolTimeout(self._pk_timeout_message(monotonic() - t0))
        raise waiter.error

    def _pk_forget_waiter(self, waiter: _Waiter[ACT]) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiter)

    async def _pk_ready(self, conn: ACT, now: float, deadline: float) -> bool:
        """Make a popped idle connection ready to lend, or dispose of it and return False.

        Round trips are bounded by the borrower's deadline: a black-holed network costs
        the borrower its timeout, never more.
        """
        if conn._pk_pending is not None:
            # Usually already answered while the connection sat idle: no waiting here.
            try:
                check_result(
                    await conn.wait(drain_gen(conn.pgconn), timeout=max(0.001, deadline - now))
                )
                if self._configure is not None:
                    await self._configure(conn)
            except Exception:
                await self._pk_lost(conn, now, bulk=True)
                return False
            conn._pk_pending = None
            conn._pk_touched = False
        if now >= conn._expire_at:
            await self._pk_replace(conn)
            return False
        idle_for = now - conn._pk_returned_at
        if idle_for > self.max_idle:
            # Idle past max_idle: a firewall may have dropped it silently; a ping could
            # hang until TCP gives up, so replace it instead.
            await self._pk_replace(conn, shrink=self._nconns > self._min_size)
            return False
        if self._pk_validate:
            if idle_for >= self._pk_bypass:
                self._n_valid_run += 1
                try:
                    if self._pk_check is not None:
                        await self._pk_check(conn)
                    else:
                        check_result(
                            await conn.wait(
                                ping_gen(conn.pgconn), timeout=max(0.001, deadline - now)
                            )
                        )
                except Exception:
                    self._n_valid_fail += 1
                    await self._pk_lost(conn, now, bulk=True)
                    return False
                conn._pk_touched = False
            elif idle_for >= PEEK_AFTER and self._pk_socket_broken(conn):
                self._n_valid_fail += 1
                await self._pk_lost(conn, now, bulk=True)
                return False
            else:
                self._n_valid_skip += 1
        return True

    # -- return ------------------------------------------------------------------------

    async def putconn(self, conn: ACT) -> None:
        """Give back a connection obtained with `getconn()`."""
        if getattr(conn, "_pool", None) is not self:
            self._check_pool_putconn(conn)
        await self._pk_put(conn)

    async def _pk_put(self, conn: ACT) -> None:
        now = monotonic()
        rec = self._pk_borrowed.pop(conn._pk_wr, None)
        if rec is not None:
            self._pk_account(rec, now)
        if self._pk_draining and not self._pk_borrowed:
            self._pk_drained.set()
        if (
            self._pk_plain_return
            and not conn._pk_touched
            and conn.pgconn.transaction_status == _IDLE
            and now < conn._expire_at
            and conn._created_at > self._drained_at
            and not self._closed
        ):
            conn._pk_returned_at = now
            conn._pool = None
            waiting = self._waiting
            while waiting:
                if waiting.popleft().set(conn):
                    return
            self._pool.append(conn)
            return
        if self._closed:
            await self._close_connection(conn)
            return
        try:
            await self._pk_return(conn, now)
        except BaseException:
            # Cancelled mid-return (anyio cancel scopes cancel every await): if the
            # connection was not placed yet, drop it without awaiting and refill.
            if getattr(conn, "_pool", None) is self:
                self._pk_abandon(conn)
            raise

    async def _pk_return(self, conn: ACT, now: float) -> None:
        pgconn = conn.pgconn
        status = pgconn.transaction_status
        if status != _IDLE:
            if status == _UNKNOWN:
                await self._pk_lost(conn, now, bulk=conn.broken)
                return
            if status == _ACTIVE:
                logger.warning("pool %r: connection returned mid-operation: closed", self.name)
                await self._pk_replace(conn)
                return
            logger.warning(
                "pool %r: connection returned inside a transaction: rolled back", self.name
            )
            try:
                await conn.rollback()
            except Exception as ex:
                logger.warning("pool %r: rollback failed (%s): connection replaced", self.name, ex)
                await self._pk_replace(conn)
                return
        if conn._created_at <= self._drained_at or now >= conn._expire_at:
            await self._pk_replace(conn)
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
                await self._pk_lost(conn, now, bulk=True)
                return
            conn._pk_pending = sql
            self._n_resets += 1
        conn._pk_touched = False
        conn._pk_dirty = None
        conn._pk_returned_at = now
        await self._add_to_pool(conn)

    async def _pk_give_back(self, conn: ACT) -> None:
        """Return a connection that was handed to a waiter who is gone."""
        conn._pk_returned_at = monotonic()
        await self._add_to_pool(conn)

    async def _add_to_pool(self, conn: ACT) -> None:
        conn._pool = None
        if self._closed:
            await self._close_connection(conn)
            return
        waiting = self._waiting
        while waiting:
            if waiting.popleft().set(conn):
                return
        self._pool.append(conn)
        if self._pool_full_event and len(self._pool) >= self._min_size:
            self._pool_full_event.set()

    # -- disposal ----------------------------------------------------------------------

    async def _pk_replace(self, conn: ACT, shrink: bool = False) -> None:
        # Book the replacement before awaiting: a cancellation during close must not
        # cost the pool its slot.
        if shrink:
            self._nconns -= 1
        else:
            self.run_task(AddConnection(self))
        await self._close_connection(conn)

    async def _pk_lost(self, conn: ACT, now: float, bulk: bool) -> None:
        """A connection is found broken; with bulk, so is every idle one older than now."""
        self._n_lost += 1
        stale = self._pk_invalidate_older(now) if bulk else []
        self._pk_event("connection-lost", f"{len(stale)} older idle connections invalidated")
        logger.warning(
            "pool %r: connection lost; replacing it and %d older idle connections",
            self.name,
            len(stale),
        )
        for c in (conn, *stale):
            await self._pk_replace(c)

    def _pk_abandon(self, conn: ACT) -> None:
        conn._pool = None
        self._n_closed += 1
        with contextlib.suppress(Exception):  # already gone
            conn.pgconn.finish()
        self.run_task(AddConnection(self))

    async def _close_connection(self, conn: ACT) -> None:
        self._n_closed += 1
        conn._pool = None
        try:
            await conn.close()
        except Exception as ex:  # a dead socket must not break the caller
            logger.debug("pool %r: error closing connection: %s", self.name, ex)

    async def _connect(self, timeout: float | None = None) -> ACT:
        t0 = monotonic()
        try:
            conn = await super()._connect(timeout or self._pk_connect_timeout)
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

    async def _return_connection(self, conn: ACT, from_getconn: bool) -> None:
        await self._pk_return(conn, monotonic())

    # -- housekeeping ------------------------------------------------------------------

    def _start_initial_tasks(self) -> None:
        super()._start_initial_tasks()
        self.run_task(Schedule(self, _Housekeeping(self), self.housekeeping_interval))

    def _pk_give_back_reclaimed(self) -> None:
        for _ in self._pk_take_reclaimed():
            self.run_task(AddConnection(self))

    async def _pk_housekeep(self) -> None:
        if self._pk_reclaim:
            self._pk_give_back_reclaimed()
        self._pk_fold()
        self._pk_leak_scan(monotonic())
        interval = self.config.keepalive_interval
        if interval:
            await self._pk_keepalive(interval)

    async def _pk_keepalive(self, interval: float) -> None:
        now = monotonic()
        due = [c for c in self._pool if now - c._pk_returned_at >= interval]
        for conn in due:
            try:
                self._pool.remove(conn)
            except ValueError:
                continue  # borrowed meanwhile
            if conn._pk_pending is None:
                self._n_valid_run += 1
                try:
                    check_result(await conn.wait(ping_gen(conn.pgconn), timeout=self.timeout))
                except Exception:
                    self._n_valid_fail += 1
                    await self._pk_lost(conn, monotonic(), bulk=True)
                    continue
                conn._pk_touched = False
            elif not await self._pk_ready(conn, now, now + self.timeout):
                continue
            conn._pk_returned_at = monotonic()
            await self._add_to_pool(conn)

    async def check(self) -> None:
        """Validate every idle connection now; replace the broken ones."""
        conns = list(self._pool)
        self._pool.clear()
        now = monotonic()
        for conn in conns:
            conn._pk_returned_at = min(conn._pk_returned_at, now - self._pk_bypass - 1.0)
            saved, self._pk_validate = self._pk_validate, True
            try:
                ok = await self._pk_ready(conn, now, now + self.timeout)
            finally:
                self._pk_validate = saved
            if ok:
                conn._pk_returned_at = monotonic()
                await self._add_to_pool(conn)

    # -- shutdown and fork -------------------------------------------------------------

    def _pk_raise_closed(self) -> None:
        if self._pk_draining and not self._closed:
            raise PoolClosed(f"the pool {self.name!r} is closing: it lends no more connections")
        self._check_open_getconn()
        raise PoolClosed(f"the pool {self.name!r} is closed")

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until min_size connections are open; on failure say why."""
        try:
            await super().wait(timeout)
        except PoolTimeout:
            why = f": {self._pk_last_error}" if self._pk_last_error else ""
            raise PoolTimeout(
                f"pool {self.name!r} could not open {self._min_size} connection(s) to "
                f"{mask_conninfo(self._pk_dsn())} within {timeout} s{why}"
            ) from None

    async def close(self, timeout: float | None = None) -> None:
        """Stop lending, wait up to `timeout` (default: drain_timeout) for borrowers, close."""
        if self._closed:
            return
        if timeout is None:
            timeout = self.config.drain_timeout
        self._pk_draining = True
        waiting = list(self._waiting)
        self._waiting.clear()
        for w in waiting:
            w.fail_now(PoolClosed(f"the pool {self.name!r} is closing"))
        # The caller's own borrows cannot come back while it waits here: wait for others'.
        me = asyncio.current_task()
        deadline = monotonic() + timeout
        while (left := deadline - monotonic()) > 0 and any(
            r[TASK] is not me for r in list(self._pk_borrowed.values())
        ):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pk_drained.wait(), min(left, 0.05))
        if self._pk_borrowed:
            # close(timeout=0) means "now": worth a note, not a warning.
            (leak_logger.warning if timeout > 0 else leak_logger.info)(
                "pool %r: closing with %d connection(s) still borrowed after a %.1f s drain: %s",
                self.name,
                len(self._pk_borrowed),
                timeout,
                "; ".join(f"{b.site} ({b.held_for:.1f} s)" for b in self.borrowed()),
            )
        await super().close(timeout=5.0)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _pk_rebuild_after_fork(self) -> None:
        # Several tasks may reach a forked pool at once: one rebuilds, the others wait,
        # and the flag drops only when the new state is complete.
        if self._pk_fork_alock is None:
            self._pk_fork_alock = asyncio.Lock()
        async with self._pk_fork_alock:
            if not self._pk_forked:
                return
            was_open = not self._closed
            self.__dict__.pop("_lock", None)
            self._pool = deque()
            self._waiting = deque()
            self._pk_borrowed = {}
            self._pk_reclaim = deque()
            self._pk_drained = asyncio.Event()
            self._workers = []
            self._sched_runner = None
            self._pool_full_event = None
            self._nconns = self._nconns_min = self._min_size
            self._growing = False
            self._closed, self._opened = True, False
            logger.info("pool %r: rebuilt in a forked child process", self.name)
            if was_open:
                await self.open()
            self._pk_forked = False


class _Housekeeping(MaintenanceTask):
    """Periodic: give back slots of garbage-collected borrows, warn about leaks, keepalive."""

    async def _run(self, pool: AsyncConnectionPool[Any]) -> None:
        assert isinstance(pool, AsyncPool)
        await pool.schedule_task(self, pool.housekeeping_interval)
        await pool._pk_housekeep()


class _ResetTask(MaintenanceTask):
    """Run a user reset callable off the borrower's path, then put the connection back."""

    def __init__(self, pool: AsyncPool[Any], conn: Any) -> None:
        super().__init__(pool)
        self.conn = conn

    async def _run(self, pool: AsyncConnectionPool[Any]) -> None:
        assert isinstance(pool, AsyncPool)
        conn = self.conn
        try:
            assert pool._pk_reset_callable is not None
            await pool._pk_reset_callable(conn)
            if conn.pgconn.transaction_status != _IDLE:
                raise RuntimeError("reset function left the connection inside a transaction")
        except Exception as ex:
            logger.warning("pool %r: reset failed (%s): connection replaced", pool.name, ex)
            await pool._pk_replace(conn)
            return
        pool._n_resets += 1
        conn._pk_touched = False
        conn._pk_returned_at = monotonic()
        await pool._add_to_pool(conn)
