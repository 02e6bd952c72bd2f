"""Connection dependencies: one transaction per request, ended before the response is sent."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Annotated, Any

import anyio
import psycopg
from fastapi import Depends, HTTPException
from fastapi import params as fastapi_params
from psycopg import AsyncConnection, Connection
from psycopg.pq import TransactionStatus
from starlette.requests import HTTPConnection

from poolkit import AsyncPool, Pool, PoolClosed, PoolTimeout, TooManyRequests

from ._lifespan import DEFAULT, get_pools

__all__ = [
    "Conn",
    "StreamConn",
    "SyncConn",
    "conn_dependency",
    "get_conn",
    "get_stream_conn",
    "get_sync_conn",
]

logger = logging.getLogger("poolkit.fastapi")

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
# Errors where the client may simply try again: answered 503 + Retry-After.
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
_UNAVAILABLE = {PoolTimeout: "timeout", TooManyRequests: "queue_full", PoolClosed: "closing"}


def _tag(conn: HTTPConnection) -> str:
    """The borrow tag: method and route template, so hold time is reported per endpoint."""
    scope = conn.scope
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None) or "(no route)"
    return f"{scope.get('method', 'WS')} {path}"


def _unavailable(
    pool: AsyncPool[Any] | Pool[Any], exc: Exception, retry_after: int
) -> HTTPException:
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
    pool: AsyncPool[Any] | Pool[Any], conn: Any, exc: BaseException | None, retry_after: int
) -> HTTPException:
    """The error answered when a route returned normally but its work is not committed."""
    if exc is None:
        status = conn.pgconn.transaction_status
        if status == TransactionStatus.INERROR:
            why = (
                "a database error was caught inside the route and the transaction was not rolled"
                " back (roll back, use a savepoint with conn.transaction(), or raise)"
            )
        elif status == TransactionStatus.ACTIVE:
            why = "a query was still running on the connection when the route returned"
        else:
            why = "the connection was lost during the request"
        logger.error("pool %r: the route returned normally but %s: answering 500", pool.name, why)
        detail = f"the transaction was not committed: {why}; nothing was written"
        return HTTPException(500, detail={"message": detail, "pool": pool.name})
    sqlstate = getattr(exc, "sqlstate", None)
    logger.error("pool %r: commit failed: %s", pool.name, exc, exc_info=exc)
    if conn.broken or not isinstance(exc, psycopg.Error) or sqlstate is None:
        detail = "the connection failed while committing: the outcome is unknown"
        return HTTPException(500, detail={"message": detail, "pool": pool.name})
    detail = "the transaction could not be committed; nothing was written"
    body = {"message": detail, "pool": pool.name, "sqlstate": sqlstate}
    if sqlstate in _RETRYABLE:
        return HTTPException(503, detail=body, headers={"Retry-After": str(retry_after)})
    return HTTPException(500, detail=body)


class _AsyncLease:
    """One request's borrow: ended once, by the dependency's exit or the function stack."""

    __slots__ = ("conn", "done", "pool", "retry_after")

    def __init__(self, pool: AsyncPool[Any], conn: AsyncConnection[Any], retry_after: int) -> None:
        self.pool = pool
        self.conn = conn
        self.retry_after = retry_after
        self.done = False

    async def end(self, exc: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        # Shielded: under a cancelled scope every await would raise again and the
        # connection would never go back.
        with anyio.CancelScope(shield=True):
            conn = self.conn
            try:
                status = conn.pgconn.transaction_status
                if exc is None:
                    if status == _INTRANS:
                        try:
                            await conn.commit()
                        except Exception as ex:
                            raise _not_committed(self.pool, conn, ex, self.retry_after) from ex
                    elif status != _IDLE:
                        if status == TransactionStatus.INERROR:
                            with contextlib.suppress(Exception):
                                await conn.rollback()
                        raise _not_committed(self.pool, conn, None, self.retry_after)
                elif status != _IDLE and status != TransactionStatus.UNKNOWN:
                    try:
                        await conn.rollback()
                    except Exception as ex:
                        logger.warning("pool %r: rollback failed: %s", self.pool.name, ex)
            finally:
                await self.pool.putconn(conn)

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end(exc)


class _SyncLease:
    """The sync twin of _AsyncLease, for `def` routes."""

    __slots__ = ("conn", "done", "pool", "retry_after")

    def __init__(self, pool: Pool[Any], conn: Connection[Any], retry_after: int) -> None:
        self.pool = pool
        self.conn = conn
        self.retry_after = retry_after
        self.done = False

    def end(self, exc: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        try:
            status = conn.pgconn.transaction_status
            if exc is None:
                if status == _INTRANS:
                    try:
                        conn.commit()
                    except Exception as ex:
                        raise _not_committed(self.pool, conn, ex, self.retry_after) from ex
                elif status != _IDLE:
                    if status == TransactionStatus.INERROR:
                        with contextlib.suppress(Exception):
                            conn.rollback()
                    raise _not_committed(self.pool, conn, None, self.retry_after)
            elif status != _IDLE and status != TransactionStatus.UNKNOWN:
                try:
                    conn.rollback()
                except Exception as ex:
                    logger.warning("pool %r: rollback failed: %s", self.pool.name, ex)
        finally:
            self.pool.putconn(conn)

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.done:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.end, exc, limiter=anyio.CapacityLimiter(1))


def _end_before_response(request: HTTPConnection, lease: _AsyncLease | _SyncLease) -> None:
    # With Depends(..., scope="function") the dependency's own exit ends the borrow before
    # the response is sent, and this callback finds it done. Declared with the default
    # request scope, the exit would run after the response (a failed commit after a 200):
    # FastAPI's function exit stack ends it in time instead. Missing before FastAPI 0.121.
    stack = request.scope.get("fastapi_function_astack")
    if isinstance(stack, AsyncExitStack):
        stack.push_async_exit(lease)


def _async_dependency(
    name: str, stream: bool
) -> Callable[..., AsyncIterator[AsyncConnection[Any]]]:
    async def dependency(request: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
        pools = get_pools(request)
        pool = pools.get(name)
        try:
            conn = await pool.getconn(tag=_tag(request))
        except (PoolTimeout, TooManyRequests, PoolClosed) as exc:
            raise _unavailable(pool, exc, pools.retry_after) from None
        lease = _AsyncLease(pool, conn, pools.retry_after)
        if not stream:
            _end_before_response(request, lease)
        try:
            yield conn
        except BaseException as exc:
            await lease.end(exc)
            raise
        await lease.end(None)

    return dependency


def _sync_dependency(name: str, stream: bool) -> Callable[..., Iterator[Connection[Any]]]:
    def dependency(request: HTTPConnection) -> Iterator[Connection[Any]]:
        pools = get_pools(request)
        pool = pools.get_sync(name)
        try:
            conn = pool.getconn(tag=_tag(request))
        except (PoolTimeout, TooManyRequests, PoolClosed) as exc:
            raise _unavailable(pool, exc, pools.retry_after) from None
        lease = _SyncLease(pool, conn, pools.retry_after)
        if not stream:
            _end_before_response(request, lease)
        try:
            yield conn
        except BaseException as exc:
            lease.end(exc)
            raise
        lease.end(None)

    return dependency


@functools.cache
def _dependency(name: str, sync: bool, stream: bool) -> Callable[..., Any]:
    # Cached: the same callable for the same pool lets FastAPI share one connection
    # between a route and its sub-dependencies within a request.
    make = _sync_dependency if sync else _async_dependency
    dep: Callable[..., Any] = make(name, stream)
    kind = ("get_sync" if sync else "get") + ("_stream" if stream else "") + "_conn"
    dep.__name__ = dep.__qualname__ = kind if name == DEFAULT else f"{kind}[{name}]"
    return dep


def conn_dependency(
    name: str = DEFAULT, *, sync: bool = False, stream: bool = False
) -> fastapi_params.Depends:
    """`Depends(...)` lending a connection from the pool `name` for one request.

    The route's work is committed if it returns normally and rolled back if it raises,
    and the connection goes back to the pool before the response is sent. `sync=True`
    borrows from the sync pool (`def` routes); `stream=True` keeps the connection until
    the response has been sent, for a StreamingResponse that reads from the database:
    its commit then happens after the status line was sent, so use it for reads.
    Example: ``ReplicaConn = Annotated[AsyncConnection, conn_dependency("replica")]``.
    """
    return fastapi_params.Depends(
        _dependency(name, sync, stream), scope="request" if stream else "function"
    )


get_conn = _dependency(DEFAULT, False, False)
get_conn.__doc__ = """Dependency: an AsyncConnection from the "default" pool for one request.

Committed on normal return, rolled back on an exception, returned to the pool before the
response is sent. Prefer the `Conn` alias; in `Depends()` write `scope="function"`.
"""
get_sync_conn = _dependency(DEFAULT, True, False)
get_sync_conn.__doc__ = (
    """Dependency: a sync Connection from the "default" sync pool, for `def` routes."""
)
get_stream_conn = _dependency(DEFAULT, False, True)
get_stream_conn.__doc__ = """Dependency: an AsyncConnection held until a streaming response ends."""

Conn = Annotated[AsyncConnection[Any], Depends(get_conn, scope="function")]
SyncConn = Annotated[Connection[Any], Depends(get_sync_conn, scope="function")]
StreamConn = Annotated[AsyncConnection[Any], Depends(get_stream_conn, scope="request")]
