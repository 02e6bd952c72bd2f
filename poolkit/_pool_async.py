"""AsyncPool: an asyncio PostgreSQL pool, drop-in for psycopg_pool.AsyncConnectionPool.

This file is the source of _pool.py: scripts/async_to_sync.py generates the sync pool
from it, and tests/test_generated.py fails when _pool.py is stale. Edit this file only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from sys import _getframe
from threading import get_ident
from time import monotonic
from types import CodeType, FrameType, TracebackType
from typing import Any, Generic, TypeVar, cast
from weakref import ref

from psycopg import AsyncConnection, ProgrammingError
from psycopg.errors import InFailedSqlTransaction
from psycopg.pq import TransactionStatus

from . import _psycopg, _reset
from ._acompat import ASYNC, current_owner, ensure, spawn
from ._config import PoolConfig, config_for_pool
from ._conn import check_result, connect_timeout_default, ping_gen
from ._core import PoolCore
from ._errors import ConnectFailed, PoolTimeout, TooManyRequests
from ._leaks import SKIP_PREFIXES, Site, logger, user_frame
from ._lifecycle_async import AsyncLifecycle
from ._messages import describe_error
from ._peek import PEEK_AFTER
from ._slot import Slot

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


class _ConnectionBlock(Generic[ACT]):
    """`async with pool.connection() as conn`: commit on success, rollback on error, return."""

    __slots__ = ("_conn", "_pool", "_site", "_tag", "_timeout")

    def __init__(
        self, pool: AsyncPool[ACT], timeout: float | None, tag: str | None, site: Site
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._tag = tag
        self._site = site

    async def __aenter__(self) -> ACT:
        self._conn = conn = await self._pool._borrow(self._timeout, self._tag, self._site)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        pool = self._pool
        try:
            status = conn.pgconn.transaction_status
            if status != _IDLE and status != _UNKNOWN:
                await pool._end_transaction(conn, exc_type is None, status)
        finally:
            await pool._return(conn, None)


class AsyncPool(AsyncLifecycle[ACT], PoolCore, Generic[ACT]):
    """An asyncio PostgreSQL pool, drop-in for psycopg_pool.AsyncConnectionPool.

    Adds validation with a bypass window, recovery without backoff lag while borrowers
    wait, lifetime/idle checks at borrow, a complete session reset, a use-after-return
    guard, leak tracking, fork safety, graceful drain, `stats()` and errors that say why.
    """

    def __init__(
        self,
        conninfo: str | PoolConfig | Callable[..., Any] = "",
        *,
        config: PoolConfig | None = None,
        connection_class: type[ACT] = cast(type[ACT], AsyncConnection),  # noqa: B008
        kwargs: dict[str, Any] | Callable[..., Any] | None = None,
        open: bool | None = None,
        configure: Callable[[ACT], Any] | None = None,
        check: Callable[[ACT], Any] | None = None,
        reset: Any = None,
        reconnect_failed: Callable[[AsyncPool[ACT]], Any] | None = None,
        close_returns: bool = False,
        **settings: Any,
    ) -> None:
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
        self._check = check
        self._reconnect_failed = reconnect_failed
        self._init_core(cfg, cfg.name)
        policy = cfg.resolved_reset
        self._reset_fn: Callable[[ACT], Any] | None = policy if callable(policy) else None
        self._auto = policy == "auto"
        self._reset_sql = (
            None if callable(policy) or self._auto else _reset.FIXED[policy]
        )
        self._peek = cfg.validate
        self._connect_timeout = connect_timeout_default(cfg)
        self._init_lifecycle()
        self._open_implicit = False
        if ASYNC and open:
            warnings.warn(
                f"opening the async pool {type(self).__name__} in the constructor is "
                "deprecated: use `await pool.open()` or `async with pool:`",
                RuntimeWarning,
                stacklevel=2,
            )
        if open is None:
            open = self._open_implicit = True
        if open:
            self._open()

    # -- borrow ------------------------------------------------------------------------

    def connection(
        self, timeout: float | None = None, *, tag: str | None = None
    ) -> _ConnectionBlock[ACT]:
        """Borrow a connection for an `async with` block; the way to use the pool."""
        return _ConnectionBlock(self, timeout, tag, _getframe(1))

    async def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> ACT:
        """Borrow a connection; pair every call with `putconn()` (prefer `connection()`)."""
        return await self._borrow(timeout, tag, _getframe(1))

    async def _borrow(self, timeout: float | None, tag: str | None, site: Site) -> ACT:
        """Borrow, attributing the borrow to `site` (a frame, a function's code, or None)."""
        now = monotonic()
        with self._lock:
            if self._idle and not self._draining:
                slot: Slot | None = self._idle.popleft() if self._fifo else self._idle.pop()
            else:
                slot = None
        if slot is not None:
            conn = slot.conn
            idle_for = now - slot.returned_at
            if (
                slot.pending is None
                and idle_for < self._fast_window
                and now < slot.expire_at
                and slot.created_at >= self._invalid_before
                and (not self._check or slot.checked)
                and (idle_for < PEEK_AFTER or not self._peek or not slot.peek.broken(conn))
            ):
                _psycopg.unguard(conn)
                self._lend(slot, now, tag, site, None)
                return cast(ACT, conn)
        return await self._borrow_slow(now, timeout, tag, site, slot)

    def _lend(
        self, slot: Slot, now: float, tag: str | None, site: Site, waited: float | None
    ) -> None:
        """Book `slot` as lent to the caller (the connection is unguarded already)."""
        conn = slot.conn
        if site is None:
            site = _getframe(2)
        if type(site) is CodeType:
            slot.code, slot.lineno = site, site.co_firstlineno
        else:
            f = site
            if f.f_code.co_filename.startswith(SKIP_PREFIXES):
                f = user_frame(f)
            slot.code, slot.lineno = f.f_code, f.f_lineno
            if self._capture_stack:
                import traceback

                slot.stack = traceback.format_stack(f)
        slot.t0 = now
        slot.owner = get_ident()
        slot.task = current_owner()
        slot.tag = tag
        slot.warned = False
        slot.wr = ref(conn, self._gc_cb)
        slot.conn = None
        _psycopg.set_pool(conn, self)
        with self._lock:
            self._lent[id(conn)] = slot
            if waited is None:
                self._n_fast += 1
        if waited is not None:
            self._wait_q.append(waited)

    async def _borrow_slow(
        self, t0: float, timeout: float | None, tag: str | None, site: Site, slot: Slot | None
    ) -> ACT:
        deadline = t0 + (self.timeout if timeout is None else timeout)
        if site is None:
            site = _getframe(2)
        while True:
            if slot is None:
                slot = await self._take_slot(t0, deadline)
            if await self._ready(slot, deadline):
                conn = slot.conn
                self._lend(slot, monotonic(), tag, site, monotonic() - t0)
                return cast(ACT, conn)
            slot = None

    async def _take_slot(self, t0: float, deadline: float) -> Slot:
        """An idle slot, a stolen parked one, or one handed over after a wait in line."""
        stolen: Slot | None = None
        with self._lock:
            if self._open_implicit and not ASYNC:
                self._open_implicit = False
                warnings.warn(
                    f"the default for the {type(self).__name__} 'open' parameter will "
                    "become 'False' in a future release: pass open=True/False, or use "
                    f"`with {type(self).__name__}(...) as pool:`",
                    DeprecationWarning,
                    stacklevel=5,
                )
            if self._open_implicit and ASYNC:
                self._open_implicit = False
                warnings.warn(
                    f"opening the async pool {type(self).__name__} in the constructor is "
                    "deprecated: use `await pool.open()` or `async with pool:`",
                    RuntimeWarning,
                    stacklevel=5,
                )
            if self._closed or self._draining:
                raise self._closed_error()
            if self._forked:
                self._forked = False
                self._worker = spawn(self._run, name=f"{self.name}-worker")
            gone = self._take_reclaimed()
            if self._idle:
                return self._idle.popleft() if self._fifo else self._idle.pop()
            if self._parked and self._nconns + self._connecting >= self._max_size:
                # At max_size with nothing idle: take a connection parked by a thread
                # between two requests (Django's CONN_MAX_AGE) rather than wait.
                _, stolen = self._parked.popitem()
                stolen.parked = False
                stolen.conn = stolen.wr() if stolen.wr is not None else None
                stolen.wr = None
                self._n_stolen += 1
                if stolen.conn is None:
                    self._nconns -= 1
                    stolen = None
            if stolen is None:
                if self._permanent_fix and not self._nconns:
                    raise ConnectFailed(self._connect_failed_message())
                if self.max_waiting and len(self._waiting) >= self.max_waiting:
                    self._n_rejected += 1
                    raise TooManyRequests(
                        f"the pool {self.name!r} has already {len(self._waiting)} requests "
                        f"waiting ({self._state_line()}): raise max_waiting or max_size"
                    )
                waiter = self._new_waiter()
                self._waiting.append(waiter)
                self._n_queued += 1
        self._report_reclaimed(gone)
        if stolen is not None:
            await self._recycle(stolen, monotonic())
            return stolen
        self._wakeup.set()
        try:
            await waiter.wait(deadline)
        except BaseException:
            # Cancelled while in line: a connection handed over meanwhile goes back.
            with self._lock:
                if waiter.give_up():
                    self._forget_waiter(waiter)
                    handed = None
                else:
                    handed = waiter.item
                    if handed is not None:
                        self._put_idle_locked(handed)
            raise
        with self._lock:
            if waiter.give_up():
                self._forget_waiter(waiter)
                self._n_timeouts += 1
                self._failed_wait += monotonic() - t0
                timed_out = True
            else:
                timed_out = False
        if not timed_out:
            if waiter.error is not None:
                raise waiter.error
            return cast(Slot, waiter.item)
        self._event("timeout", self._state_line())
        raise PoolTimeout(self._timeout_message(monotonic() - t0))

    async def _ready(self, slot: Slot, deadline: float) -> bool:
        """Make a slot taken from idle ready to lend, or dispose of it and return False.

        Round trips are bounded by the borrower's deadline: a black-holed network costs
        the borrower its timeout, never more. A cancellation at any await closes the
        connection and gives its slot back to the pool's books (never lost).
        """
        conn = slot.conn
        _psycopg.unguard(conn)
        try:
            now = monotonic()
            if slot.pending is not None and not await self._drain_reset(slot, deadline):
                return False
            if now >= slot.expire_at or slot.created_at < self._invalid_before:
                self._retire(slot)
                return False
            idle_for = now - slot.returned_at
            if idle_for > self.max_idle:
                # Idle past max_idle: a firewall may have dropped it silently; a ping could
                # hang until TCP gives up, so replace it instead.
                self._retire(slot)
                return False
            if self._check is not None and (idle_for >= self._bypass or not slot.checked):
                with self._lock:
                    self._n_valid_run += 1
                try:
                    await ensure(self._check(cast(ACT, conn)))
                except Exception as ex:
                    self._check_failed(slot, ex)
                    return False
                slot.checked = True
                slot.last_good = monotonic()
            elif idle_for >= self._bypass:
                with self._lock:
                    self._n_valid_run += 1
                try:
                    check_result(
                        await conn.wait(ping_gen(conn.pgconn), timeout=max(0.001, deadline - now))
                    )
                except Exception:
                    with self._lock:
                        self._n_valid_fail += 1
                    self._lost(slot)
                    return False
                slot.last_good = monotonic()
            elif self._peek and idle_for >= PEEK_AFTER and slot.peek.broken(conn):
                with self._lock:
                    self._n_valid_fail += 1
                self._lost(slot)
                return False
            else:
                with self._lock:
                    self._n_valid_skip += 1
        except BaseException:
            self._retire(slot)
            raise
        if conn.pgconn.transaction_status != _IDLE:
            # Safety net: nothing may reach a borrower mid-transaction.
            logger.warning(
                "pool %r: connection found %s at borrow: closed",
                self.name,
                TransactionStatus(conn.pgconn.transaction_status).name,
            )
            self._retire(slot)
            return False
        return True

    # -- return ------------------------------------------------------------------------

    async def putconn(self, conn: ACT) -> None:
        """Give back a connection obtained with `getconn()`."""
        await self._return(conn, _getframe(1))

    async def _return(self, conn: ACT, f: FrameType | None) -> None:
        now = monotonic()
        with self._lock:
            slot = self._lent.pop(id(conn), None)
            if slot is not None and (slot.wr is None or slot.wr() is not conn):
                self._lent[id(conn)] = slot
                slot = None
        if slot is None:
            self._not_mine(conn)
            return
        slot.wr = None
        slot.conn = conn
        if f is not None:
            slot.returned_code, slot.returned_line = f.f_code, f.f_lineno
        else:
            slot.returned_code, slot.returned_line = slot.code, slot.lineno
        self._account_return(slot, now)
        _psycopg.set_pool(conn, None)
        if (
            conn.pgconn.transaction_status == _IDLE
            and not self._closed
            and now < slot.expire_at
            and slot.created_at >= self._invalid_before
            and _psycopg.snapshot(conn) == slot.attrs
            and self._reset_sql is None
            and self._reset_fn is None
            and (not self._auto or id(conn) not in _psycopg.DIRTY)
        ):
            slot.returned_at = slot.last_good = now
            _psycopg.guard(conn, slot.guards)
            with self._lock:
                self._put_idle_locked(slot)
            return
        try:
            if await self._recycle(slot, now):
                with self._lock:
                    self._put_idle_locked(slot)
        except BaseException:
            # Cancelled mid-return (anyio cancel scopes cancel every await): close it
            # and give the slot back to the books.
            if slot.conn is not None and not slot.conn.closed:
                self._retire(slot)
            raise

    def _not_mine(self, conn: Any) -> None:
        owner = _psycopg.get_pool(conn)
        if owner is None:
            raise ValueError(
                f"can't return connection to pool {self.name!r}, it doesn't belong to any "
                "pool (returned twice?)"
            )
        raise ValueError(
            f"can't return connection to pool {self.name!r}, it belongs to pool "
            f"{getattr(owner, 'name', owner)!r}"
        )

    async def _recycle(self, slot: Slot, now: float) -> bool:
        """Bring a connection back to a clean idle state; False if it was disposed of."""
        conn = slot.conn
        pgconn = conn.pgconn
        status = pgconn.transaction_status
        if status == _UNKNOWN:
            if conn.broken:
                self._lost(slot)
            else:
                self._retire(slot)  # closed by its borrower
            return False
        if self._closed or now >= slot.expire_at or slot.created_at < self._invalid_before:
            self._retire(slot)
            return False
        self._deadlines[id(slot)] = (now + self.timeout, conn)
        try:
            if status == _ACTIVE:
                logger.warning("pool %r: connection returned mid-operation: closed", self.name)
                self._retire(slot)
                return False
            if status != _IDLE:
                logger.warning(
                    "pool %r: connection returned inside a transaction: rolled back", self.name
                )
                try:
                    await conn.rollback()
                except Exception as ex:
                    logger.warning(
                        "pool %r: rollback failed (%s): connection replaced", self.name, ex
                    )
                    self._retire(slot)
                    return False
            if _psycopg.snapshot(conn) != slot.attrs:
                await self._restore(conn, slot.attrs)
            if self._reset_fn is not None:
                try:
                    await ensure(self._reset_fn(cast(ACT, conn)))
                    if pgconn.transaction_status != _IDLE:
                        raise ProgrammingError("the reset function left a transaction open")
                except Exception as ex:
                    logger.warning("pool %r: reset failed (%s): connection replaced", self.name, ex)
                    self._retire(slot)
                    return False
                with self._lock:
                    self._n_resets += 1
            sql = self._reset_sql
            if self._auto:
                mask = _psycopg.DIRTY.pop(id(conn), 0)
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
        _psycopg.guard(conn, slot.guards)
        return True

    async def _restore(self, conn: Any, attrs: tuple[Any, ...]) -> None:
        """Undo a borrow's client-side changes through psycopg's public setters.

        The setters also drop psycopg's cached BEGIN statement, which direct writes
        would leave behind (the next transaction would run READ ONLY, say).
        """
        autocommit, isolation, read_only, deferrable, rows, cursors, server, threshold = attrs
        if conn.autocommit != autocommit:
            await conn.set_autocommit(autocommit)
        if conn.isolation_level != isolation:
            await conn.set_isolation_level(isolation)
        if conn.read_only != read_only:
            await conn.set_read_only(read_only)
        if conn.deferrable != deferrable:
            await conn.set_deferrable(deferrable)
        conn.row_factory = rows
        conn.cursor_factory = cursors
        conn.server_cursor_factory = server
        conn.prepare_threshold = threshold

    async def _end_transaction(self, conn: ACT, ok: bool, status: int) -> None:
        """Commit or roll back at the end of a `connection()` block, within a deadline."""
        key = id(conn)
        self._deadlines[key] = (monotonic() + self.timeout, conn)
        try:
            if ok and status == _INERROR:
                await conn.rollback()
                raise InFailedSqlTransaction(_FAILED_TX)
            if ok:
                await conn.commit()
            else:
                try:
                    await conn.rollback()
                except Exception as ex:
                    logger.warning("pool %r: rollback failed: %s", self.name, ex)
        finally:
            self._deadlines.pop(key, None)

    # -- parking (Django's CONN_MAX_AGE) -------------------------------------------------

    async def _park(self, conn: ACT) -> None:
        """End a borrow but keep `conn` reserved for its borrower, unless someone needs it.

        The pool takes a parked connection back when a borrower would otherwise wait at
        max_size; `_unpark()` tells the parker whether it still has it.
        """
        now = monotonic()
        with self._lock:
            slot = self._lent.pop(id(conn), None)
            if slot is not None and self._waiting:
                self._lent[id(conn)] = slot
                slot = None
                give_back = True
            else:
                give_back = False
            if slot is not None:
                slot.parked = True
                slot.returned_at = now
                self._parked[id(conn)] = slot
        if give_back:
            await self._return(conn, _getframe(1))
            return
        if slot is None:
            self._not_mine(conn)
            return
        self._account_return(slot, now)

    def _unpark(self, conn: ACT, tag: str | None = None, site: Site = None) -> bool:
        """Take back a parked connection: False if the pool gave it to someone else."""
        now = monotonic()
        with self._lock:
            slot = self._parked.pop(id(conn), None)
            if slot is None or slot.wr is None or slot.wr() is not conn:
                if slot is not None:
                    self._parked[id(conn)] = slot
                return False
            slot.parked = False
            slot.wr = None
            slot.conn = conn
        self._lend(slot, now, tag, site if site is not None else _getframe(1), None)
        return True

    def _check_failed(self, slot: Slot, error: Exception) -> None:
        with self._lock:
            self._n_valid_fail += 1
            fresh = not slot.checked
        logger.warning("pool %r: check failed: %s", self.name, describe_error(error))
        self._retire(slot)
        if fresh:
            # A brand-new connection failing its check: retry connecting with backoff,
            # as for a failed connection attempt, instead of a tight loop.
            self._note_connect_failure(error, monotonic())

    async def __aenter__(self) -> AsyncPool[ACT]:
        await self.open(wait=True, timeout=self.config.open_timeout or 30.0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()
