"""Connection dependencies: one connection per pool per request, ended before the response."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Annotated, Any

import anyio
from fastapi import Depends
from fastapi import params as fastapi_params
from psycopg import AsyncConnection, Connection
from starlette.requests import HTTPConnection

from poolkit import Pool

from ._lease import (
    KINDS,
    UNAVAILABLE,
    AsyncLease,
    Kind,
    SyncLease,
    borrow_async,
    borrow_sync,
    endpoint_of,
    route_of,
    unavailable,
)
from ._lifespan import DEFAULT, WiringError, get_pools
from ._wrap import Pending, install

__all__ = [
    "Conn",
    "StreamConn",
    "SyncConn",
    "conn_dependency",
    "get_conn",
    "get_stream_conn",
    "get_sync_conn",
]

# The request scope key holding this request's connections, by (pool name, sync): every
# spelling of a dependency for one pool (Conn, StreamConn, Depends(get_conn),
# use_cache=False, a sub-dependency) gets the same connection, so one request is one
# transaction per pool, and max_size=1 cannot deadlock a request against itself.
_LEASES = "poolkit.leases"
_FUNCTION_STACK = "fastapi_function_astack"  # closed before the response is sent
_REQUEST_STACK = "fastapi_inner_astack"  # closed after the response was sent


def _tag(conn: HTTPConnection) -> str:
    """The borrow tag of a request: method and route template."""
    return endpoint_of(conn.scope).tag(conn.scope.get("method", "WS"))


def _stack(scope: MutableMapping[str, Any], stream: bool) -> AsyncExitStack:
    stack = scope.get(_REQUEST_STACK if stream else _FUNCTION_STACK)
    if not isinstance(stack, AsyncExitStack):
        raise WiringError(
            "poolkit_fastapi's connection dependencies run inside FastAPI (0.121 or later) "
            "request handling; call them through Depends(), not directly"
        )
    return stack


def stream_error(where: str) -> WiringError:
    return WiringError(
        f"{where} is a generator endpoint: its body runs while the response streams, after "
        "Conn/SyncConn have committed and returned their connection. Use StreamConn "
        "(conn_dependency(stream=True)) to keep the connection until the stream ends, or "
        "read what you need and return a list"
    )


def _async_dependency(kind: Kind) -> Callable[..., Awaitable[AsyncConnection[Any]]]:
    name, _, stream = kind
    key = (name, False)

    async def dependency(request: HTTPConnection) -> AsyncConnection[Any]:
        scope = request.scope
        leases = scope.get(_LEASES)
        if leases is None:
            leases = scope[_LEASES] = {}
        else:
            shared = leases.get(key)
            if shared is not None:
                return shared  # type: ignore[no-any-return]
        ep = endpoint_of(scope)
        if ep.ended_conn:
            raise stream_error(ep.where())
        # A Conn of a route that also takes StreamConn on this pool is the stream's one.
        held = stream or key in ep.stream_pools
        stack = _stack(scope, held)
        pools = get_pools(request)
        pool = pools.get(name)
        try:
            conn = await borrow_async(pool, ep.tag(scope.get("method", "WS")), ep)
        except UNAVAILABLE as exc:
            raise unavailable(pool, exc, pools.retry_after) from None
        leases[key] = conn
        _end_last(scope, stack, AsyncLease(pool, conn, pools.retry_after, held), held)
        return conn

    return dependency


def _sync_dependency(kind: Kind) -> Callable[..., Awaitable[Connection[Any]]]:
    name, _, stream = kind
    key = (name, True)

    async def dependency(request: HTTPConnection) -> Connection[Any]:
        scope = request.scope
        leases = scope.get(_LEASES)
        if leases is None:
            leases = scope[_LEASES] = {}
        else:
            shared = leases.get(key)
            if shared is not None:
                return shared  # type: ignore[no-any-return]
        ep = endpoint_of(scope)
        if ep.ended_conn:
            raise stream_error(ep.where())
        held = stream or key in ep.stream_pools
        pools = get_pools(request)
        pool = pools.get_sync(name)
        tag = ep.tag(scope.get("method", "WS"))
        fast = ep.fast_sync
        if fast is None:
            fast = ep.fast_sync = install(route_of(scope))
        # Not for a cluster's primary (_read.py): a SyncReadConn of the same request must
        # see the write connection borrowed here, before the route runs.
        if fast and not held and isinstance(pool, Pool) and not _overridden(scope):
            # The route's wrapper borrows in the route's own worker thread (no hop of its
            # own); the Pending commits on the function stack, after serialization.
            pending = leases[key] = Pending(pool, tag, ep, pools.retry_after)
            _end_last(scope, _stack(scope, False), pending, False)
            return pending  # type: ignore[return-value]
        stack = _stack(scope, held)
        try:
            conn = await anyio.to_thread.run_sync(borrow_sync, pool, tag, ep)
        except UNAVAILABLE as exc:
            raise unavailable(pool, exc, pools.retry_after) from None
        leases[key] = conn
        _end_last(scope, stack, SyncLease(pool, conn, pools.retry_after, held), held)
        return conn

    return dependency


_ExitCallback = Callable[
    [type[BaseException] | None, BaseException | None, TracebackType | None], Awaitable[Any]
]


class _RollbackOnError:
    """A lease's place in the function stack, where it was borrowed: rolls back at once if
    the route (or a dependency that got the connection) raised, before a dependency
    further out, which exits later, could swallow the exception and leave a commit."""

    __slots__ = ("lease",)

    def __init__(self, lease: _ExitCallback) -> None:
        self.lease = lease

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self.lease(exc_type, exc, tb)


class _EndLast:
    """The request's function-stack leases, ended after every other exit callback there.

    A `Depends(scope="function")` dependency solved before the connection (declared
    first, or not needing it) has its cleanup run after the lease's own exit callback;
    if that cleanup raises (an HTTPException refusing the request), the answer is that
    error, so the commit must wait for it: ending last sees the request's final outcome.
    """

    __slots__ = ("leases",)

    def __init__(self) -> None:
        self.leases: list[_ExitCallback] = []

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Last borrowed first, as the stack would; a failed commit rolls back the others,
        # and the first error raised is the answer. (Leases already ended do nothing.)
        error: BaseException | None = None
        for lease in reversed(self.leases):
            seen = exc if error is None else error
            try:
                await lease(type(seen) if seen is not None else None, seen, None)
            except BaseException as ex:
                error = error or ex
        if error is not None:
            raise error


_END_LAST = "poolkit.end_last"


def _end_last(
    scope: MutableMapping[str, Any], stack: AsyncExitStack, lease: _ExitCallback, held: bool
) -> None:
    """End `lease` on the function stack after every callback pushed there, before or after.

    A `held` lease (a stream's) is on the stack that closes when the stream ends: it ends
    at its own place there."""
    if held:
        stack.push_async_exit(lease)
        return
    stack.push_async_exit(_RollbackOnError(lease))
    # One per stack: a router's own dependencies are solved on a function stack of their
    # own (FastAPI's APIRouter._solve_dependencies), which closes at another time.
    entry = scope.get(_END_LAST)
    if entry is not None and entry[0] is stack:
        last = entry[1]
    else:
        last = _EndLast()
        scope[_END_LAST] = (stack, last)
        # AsyncExitStack has no public way to put a callback under those already pushed;
        # its callbacks are a deque of (is_sync, callback) popped from the right (CPython
        # 3.7+). Without it, the lease ends at its own place, as a plain push would.
        callbacks = getattr(stack, "_exit_callbacks", None)
        if isinstance(callbacks, deque):
            callbacks.appendleft((False, last))
        else:
            stack.push_async_exit(last)
    last.leases.append(lease)


def _overridden(scope: MutableMapping[str, Any]) -> bool:
    """True while the app has dependency overrides (as tests set them): an override can ask
    for SyncConn where install() did not look, and must get the connection itself, not the
    route wrapper's placeholder, so such a request takes the general path."""
    provider = getattr(route_of(scope), "dependency_overrides_provider", None)
    return bool(getattr(provider, "dependency_overrides", None))


@functools.cache
def _dependency(name: str, sync: bool, stream: bool) -> Callable[..., Any]:
    # Cached: the same callable for the same pool lets FastAPI's own dependency cache
    # share it between a route and its sub-dependencies too.
    kind = Kind(name, sync, stream)
    dep: Callable[..., Any] = (_sync_dependency if sync else _async_dependency)(kind)
    label = ("get_sync" if sync else "get") + ("_stream" if stream else "") + "_conn"
    dep.__name__ = dep.__qualname__ = label if name == DEFAULT else f"{label}[{name}]"
    KINDS[dep] = kind
    return dep


def conn_dependency(
    name: str = DEFAULT, *, sync: bool = False, stream: bool = False
) -> fastapi_params.Depends:
    """`Depends(...)` lending a connection from the pool `name` for one request.

    The route's work is committed if it returns normally and rolled back if it raises,
    and the connection goes back to the pool before the response is sent. Every
    dependency on the same pool in one request (this, `Conn`, `Depends(get_conn)`, a
    sub-dependency) gets the same connection: one transaction. `sync=True` borrows from
    the sync pool (`def` routes); `stream=True` keeps the connection until the response
    has been sent, for a StreamingResponse or a generator endpoint that reads from the
    database: its commit then happens after the status line was sent, so use it for reads.
    Example: ``ReplicaConn = Annotated[AsyncConnection, conn_dependency("replica")]``.
    """
    return fastapi_params.Depends(_dependency(name, sync, stream))


get_conn = _dependency(DEFAULT, False, False)
get_conn.__doc__ = """Dependency: an AsyncConnection from the "default" pool for one request.

Committed on normal return, rolled back on an exception, returned to the pool before the
response is sent, whatever the `Depends()` scope. Prefer the `Conn` alias.
"""
get_sync_conn = _dependency(DEFAULT, True, False)
get_sync_conn.__doc__ = (
    """Dependency: a sync Connection from the "default" sync pool, for `def` routes."""
)
get_stream_conn = _dependency(DEFAULT, False, True)
get_stream_conn.__doc__ = """Dependency: an AsyncConnection held until a streaming response ends."""

Conn = Annotated[AsyncConnection[Any], Depends(get_conn)]
SyncConn = Annotated[Connection[Any], Depends(get_sync_conn)]
StreamConn = Annotated[AsyncConnection[Any], Depends(get_stream_conn)]


def check_routes(app: object) -> None:
    """Refuse, at startup, generator endpoints that depend on a Conn ended before the response."""
    bad = []
    for route in _routes(app):
        ep = endpoint_of({"route": route})
        if ep.ended_conn:
            bad.append(ep.where())
    if bad:
        raise stream_error(", ".join(bad))


def _routes(app: object) -> list[Any]:
    """The app's FastAPI routes (those with a dependant), mounted and included routers too.

    FastAPI 0.16x keeps an included router as one `_IncludedRouter` in `app.routes`,
    whose `effective_route_contexts()` are the routes as they run (see `route_of`);
    older versions copy the included routes into `app.routes`.
    """
    out: list[Any] = []
    todo = list(getattr(app, "routes", ()))
    while todo:
        route = todo.pop()
        if getattr(route, "dependant", None) is not None:
            out.append(route)
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            todo.extend(contexts())
        todo.extend(getattr(route, "routes", ()) or ())
    return out


# -- for _read.py (ClusterLifespan's read dependencies), which ends its leases itself ------

_AsyncLease = AsyncLease
_SyncLease = SyncLease
_unavailable = unavailable


def _end_before_response(request: HTTPConnection, lease: AsyncLease | SyncLease) -> None:
    """Also end `lease` on FastAPI's function exit stack (a no-op if already ended)."""
    stack = request.scope.get(_FUNCTION_STACK)
    if isinstance(stack, AsyncExitStack):
        stack.push_async_exit(lease)
