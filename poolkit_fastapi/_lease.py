"""One request's borrow: where it is attributed, how it ends (commit/rollback), and its errors."""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import MutableMapping
from types import CodeType, TracebackType
from typing import Any, NamedTuple

import anyio
import psycopg
from fastapi import HTTPException
from psycopg import AsyncConnection, Connection
from psycopg.pq import TransactionStatus

from poolkit import AsyncPool, Pool, PoolClosed, PoolTimeout, TooManyRequests

logger = logging.getLogger("poolkit.fastapi")

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR
_UNKNOWN = TransactionStatus.UNKNOWN
# Errors where the client may simply try again: answered 503 + Retry-After.
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
_UNAVAILABLE = {PoolTimeout: "timeout", TooManyRequests: "queue_full", PoolClosed: "closing"}
UNAVAILABLE = (PoolTimeout, TooManyRequests, PoolClosed)


class Endpoint:
    """What the dependencies need to know about one route, worked out once per route."""

    __slots__ = (
        "_path",
        "code",
        "ended_conn",
        "fast_sync",
        "name",
        "stream_pools",
        "tags",
    )

    def __init__(self, route: Any, endpoint: Any) -> None:
        func = inspect.unwrap(endpoint) if endpoint is not None else None
        self.code: CodeType | None = getattr(func, "__code__", None)
        self.name = getattr(func, "__qualname__", repr(endpoint))
        # A generator endpoint runs its body while the response streams: after the
        # function exit stack has ended every Conn.
        streams = inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)
        held, reached = _pools_in(getattr(route, "dependant", None))
        # The pools (name, sync) a StreamConn of this route borrows from: every dependency
        # on them lends that connection, held until the response ends (one per request).
        self.stream_pools = frozenset(held)
        # A generator endpoint whose body can reach a connection ended before it runs.
        self.ended_conn = streams and not reached <= held
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        self.tags: dict[str, str] = {}
        self._path = path or "(no route)"
        # Whether SyncConn parameters are lent by the route's wrapper (see _wrap.py);
        # None until the first sync dependency of this route asks.
        self.fast_sync: bool | None = None

    def tag(self, method: str) -> str:
        """The borrow tag: method and route template, so hold time is reported per endpoint."""
        tag = self.tags.get(method)
        if tag is None:
            tag = self.tags[method] = f"{method} {self._path}"
        return tag

    def where(self) -> str:
        if self.code is None:
            return self.name
        return f"{self.code.co_filename}:{self.code.co_firstlineno} in {self.name}"


# By id(route): Starlette's routes define __eq__ without __hash__, so they cannot key a
# dict (or a WeakKeyDictionary) themselves. The weak reference guards against a reused id;
# the finalizer forgets a route's entry when the route goes.
_endpoints: dict[int, tuple[weakref.ref[Any], Endpoint]] = {}


def route_of(scope: MutableMapping[str, Any]) -> Any:
    """The route whose `dependant` FastAPI solves for this request.

    FastAPI 0.16x runs a route of an included router through a per-inclusion context
    (its own dependant with the router's and app's dependencies, its full path) and puts
    that in the scope next to `scope["route"]`, the router's original APIRoute; older
    versions copy the routes into the app, and `scope["route"]` is the one that runs.
    """
    route = scope.get("route")
    fastapi_scope = scope.get("fastapi")
    if fastapi_scope is not None:
        context = fastapi_scope.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            return context
    return route


def endpoint_of(scope: MutableMapping[str, Any]) -> Endpoint:
    """The Endpoint of the route serving this request (worked out once per route)."""
    route = route_of(scope)
    key = id(route)
    entry = _endpoints.get(key)
    if entry is not None and entry[0]() is route:
        return entry[1]
    info = Endpoint(route, getattr(route, "endpoint", None) or scope.get("endpoint"))
    if route is not None:
        try:
            ref = weakref.ref(route)
        except TypeError:  # not weak-referenceable: worked out per request
            return info
        _endpoints[key] = (ref, info)
        weakref.finalize(route, _endpoints.pop, key, None)
    return info


class Kind(NamedTuple):
    """What one dependency callable lends: from which pool, sync or async, until when."""

    name: str
    sync: bool
    stream: bool


# Every dependency callable poolkit_fastapi made, so routes can be searched for them.
KINDS: dict[Any, Kind] = {}


def _pools_in(dependant: Any) -> tuple[set[tuple[str, bool]], set[tuple[str, bool]]]:
    """The pools a route's StreamConns borrow from, and those of the Conns its body can reach.

    The body reaches the values of its own parameters and, through them, of their
    dependencies' parameters; not those of `dependencies=[...]` (path operation, router
    or app), whose values FastAPI discards: those sub-dependants have no name.
    """
    held: set[tuple[str, bool]] = set()
    reached: set[tuple[str, bool]] = set()
    todo = [(dependant, True)] if dependant is not None else []
    while todo:
        dep, named = todo.pop()
        kind = KINDS.get(dep.call) if dep.call is not None else None
        if kind is not None:
            if kind.stream:
                held.add((kind.name, kind.sync))
            elif named:
                reached.add((kind.name, kind.sync))
        todo.extend((sub, named and sub.name is not None) for sub in dep.dependencies)
    return held, reached


# -- the one place that borrows, attributed to the endpoint's code ----------------------


async def borrow_async(pool: AsyncPool[Any], tag: str, ep: Endpoint) -> AsyncConnection[Any]:
    conn: AsyncConnection[Any]
    if isinstance(pool, AsyncPool):
        conn = await pool._borrow(None, tag, ep.code)
    else:  # a stand-in with the pool's public API (a cluster's primary, _read.py)
        conn = await pool.getconn(tag=tag)
    return conn


def borrow_sync(pool: Pool[Any], tag: str, ep: Endpoint) -> Connection[Any]:
    if isinstance(pool, Pool):
        return pool._borrow(None, tag, ep.code)  # type: ignore[no-any-return]
    return pool.getconn(tag=tag)


# -- errors -------------------------------------------------------------------------------


def unavailable(
    pool: AsyncPool[Any] | Pool[Any], exc: Exception, retry_after: int
) -> HTTPException:
    """The 503 answered when the pool cannot lend: exhausted, queue full or closing."""
    reason = next((r for cls, r in _UNAVAILABLE.items() if isinstance(exc, cls)), "unavailable")
    # The full message (state, longest borrower's code site) is for operators, not clients.
    logger.warning("pool %r: answering 503: %s", pool.name, exc)
    messages = {
        "timeout": f"no database connection became free within {pool.timeout:g} s",
        "queue_full": "too many requests are already waiting for a database connection",
        "closing": "the server is shutting down",
    }
    return HTTPException(
        503,
        detail={
            "message": messages.get(reason, str(exc)) + "; retry later",
            "pool": pool.name,
            "reason": reason,
        },
        headers={"Retry-After": str(retry_after)},
    )


def _not_committed(
    lease: AsyncLease | SyncLease, exc: BaseException | None, status: int
) -> HTTPException | None:
    """The error answered when a route returned normally but its work is not committed.

    `status` is the transaction status read before any rollback (which makes it IDLE).
    None for a stream's lease: it ends after the response was sent, or after its client
    went away, so there is nothing left to answer; raising would only make the server
    log "response already started".
    """
    pool, conn = lease.pool, lease.conn
    if exc is None:
        if status == _INERROR:
            why = (
                "a database error was caught inside the route and the transaction was not rolled"
                " back (roll back, use a savepoint with conn.transaction(), or raise)"
            )
        elif conn.lock.locked():
            why = (
                "a cursor.stream(), copy() or notifies() generator was left unfinished (run"
                " it to its end, or close it, inside the route)"
            )
        elif status == TransactionStatus.ACTIVE:
            why = "a query was still running on the connection when the route returned"
        elif lease.stream:
            # Usually a client that disconnected: the stream's task is cancelled, which
            # interrupts its query, and psycopg closes the connection.
            logger.info(
                "pool %r: the connection was closed while the response streamed (a client"
                " that disconnects interrupts the running query): nothing was committed",
                pool.name,
            )
            return None
        else:
            why = "the connection was lost during the request"
        if lease.stream:
            logger.warning(
                "pool %r: the response was streamed but %s: nothing was committed", pool.name, why
            )
            return None
        logger.error("pool %r: the route returned normally but %s: answering 500", pool.name, why)
        detail = f"the transaction was not committed: {why}; nothing was written"
        return HTTPException(500, detail={"message": detail, "pool": pool.name})
    sqlstate = getattr(exc, "sqlstate", None)
    logger.error("pool %r: commit failed: %s", pool.name, exc, exc_info=exc)
    if lease.stream:
        return None
    if conn.broken or not isinstance(exc, psycopg.Error) or sqlstate is None:
        detail = "the connection failed while committing: the outcome is unknown"
        return HTTPException(500, detail={"message": detail, "pool": pool.name})
    detail = "the transaction could not be committed; nothing was written"
    body = {"message": detail, "pool": pool.name, "sqlstate": sqlstate}
    if sqlstate in _RETRYABLE:
        return HTTPException(503, detail=body, headers={"Retry-After": str(lease.retry_after)})
    return HTTPException(500, detail=body)


# -- ending a borrow ----------------------------------------------------------------------


class AsyncLease:
    """One request's borrow from an async pool; an async exit callback of FastAPI's stacks."""

    __slots__ = ("conn", "done", "pool", "retry_after", "stream")

    def __init__(
        self,
        pool: AsyncPool[Any],
        conn: AsyncConnection[Any],
        retry_after: int,
        stream: bool = False,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.retry_after = retry_after
        # Ended after the response was sent (StreamConn): a failure can only be logged.
        self.stream = stream
        self.done = False

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end(exc)

    async def end(self, exc: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        status = conn.pgconn.transaction_status
        if status != _IDLE:
            try:
                error = await self._finish(status, exc)
            except BaseException:
                # Cancelled mid-commit or mid-rollback: no cancel scope on the common
                # path (it costs more than the pool), so shield only the return here:
                # under a cancelled scope every await would raise again.
                with anyio.CancelScope(shield=True):
                    await self.pool.putconn(conn)
                raise
            await self.pool.putconn(conn)
            if error is not None:
                raise error
        else:
            # putconn's fast path does not suspend, so nothing can interrupt it (its
            # slow path copes with cancellation itself).
            await self.pool.putconn(conn)

    async def _finish(self, status: int, exc: BaseException | None) -> HTTPException | None:
        """Commit or roll back; the error to answer with, if any."""
        conn = self.conn
        if conn.lock.locked():
            # A generator of the route holds psycopg's lock: commit or rollback would wait
            # for it forever. The pool closes the connection (nothing is committed).
            return None if exc is not None else _not_committed(self, None, status)
        if exc is None:
            if status == _INTRANS:
                try:
                    await conn.commit()
                except Exception as ex:
                    error = _not_committed(self, ex, status)
                    if error is not None:
                        error.__cause__ = ex
                    return error
                return None
            if status == _INERROR:
                with contextlib.suppress(Exception):
                    await conn.rollback()
            return _not_committed(self, None, status)
        if status != _UNKNOWN:
            try:
                await conn.rollback()
            except Exception as ex:
                logger.warning("pool %r: rollback failed: %s", self.pool.name, ex)
        return None


class SyncLease:
    """The sync twin of AsyncLease, for `def` routes: ends in a worker thread."""

    __slots__ = ("conn", "done", "pool", "retry_after", "stream")

    def __init__(
        self, pool: Pool[Any], conn: Connection[Any], retry_after: int, stream: bool = False
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.retry_after = retry_after
        # Ended after the response was sent (StreamConn): a failure can only be logged.
        self.stream = stream
        self.done = False

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.done:
            # Its own limiter: with every default worker blocked in getconn, the thread
            # that gives a connection back must not wait behind them.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.end, exc, limiter=anyio.CapacityLimiter(1))

    def end(self, exc: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        try:
            status = conn.pgconn.transaction_status
            if status != _IDLE and conn.lock.locked():
                # As in AsyncLease._finish: the pool closes it, nothing is committed.
                if exc is None:
                    error = _not_committed(self, None, status)
                    if error is not None:
                        raise error
            elif exc is None:
                if status == _INTRANS:
                    try:
                        conn.commit()
                    except Exception as ex:
                        error = _not_committed(self, ex, status)
                        if error is not None:
                            raise error from ex
                elif status != _IDLE:
                    if status == _INERROR:
                        with contextlib.suppress(Exception):
                            conn.rollback()
                    error = _not_committed(self, None, status)
                    if error is not None:
                        raise error
            elif status != _IDLE and status != _UNKNOWN:
                try:
                    conn.rollback()
                except Exception as ex:
                    logger.warning("pool %r: rollback failed: %s", self.pool.name, ex)
        finally:
            self.pool.putconn(conn)
