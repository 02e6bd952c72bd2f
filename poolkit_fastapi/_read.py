"""Read routing for FastAPI: a ClusterPool behind Conn, ReadConn from replicas, read-your-writes."""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, cast

import anyio
from fastapi import Depends
from fastapi import params as fastapi_params
from psycopg import AsyncConnection, Connection
from starlette.requests import HTTPConnection

from poolkit import (
    AsyncClusterPool,
    ClusterPool,
    ConfigError,
    PoolClosed,
    PoolTimeout,
    TooManyRequests,
)

from ._deps import _AsyncLease, _dependency, _end_before_response, _SyncLease, _tag, _unavailable
from ._lease import route_of
from ._lifespan import DEFAULT, STATE_KEY, Pools, PoolStartupError, WiringError, get_pools

__all__ = [
    "ClusterLifespan",
    "ReadConn",
    "StickyAfterWrite",
    "SyncReadConn",
    "get_read_conn",
    "get_sync_read_conn",
    "read_conn_dependency",
]

CLUSTERS_KEY = "poolkit.clusters"
STICKY_COOKIE = "poolkit_primary_until"
_UNAVAILABLE = (PoolTimeout, TooManyRequests, PoolClosed)


class _RequestWrites:
    """What one request did on the primaries: set by the write view, read by ReadConn."""

    __slots__ = ("conns", "wrote")

    def __init__(self) -> None:
        self.conns: dict[int, Any] = {}  # id(cluster) -> the connection Conn holds now
        self.wrote = False


_writes: contextvars.ContextVar[_RequestWrites | None] = contextvars.ContextVar(
    "poolkit_request_writes", default=None
)


def _current_writes() -> _RequestWrites:
    # Async dependencies run in the request task's context, so a value set here is
    # seen by the dependencies resolved after it; StickyAfterWrite sets one per request
    # up front, which sync dependencies (run in copied contexts) share too.
    writes = _writes.get()
    if writes is None:
        writes = _RequestWrites()
        _writes.set(writes)
    return writes


class _Primary:
    """A cluster seen as the plain pool `Conn`/`SyncConn` borrow from: writes, on the primary."""

    __slots__ = ("_cluster",)

    def __init__(self, cluster: AsyncClusterPool[Any] | ClusterPool[Any]) -> None:
        self._cluster = cluster

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster, name)

    def _lent(self, conn: Any) -> Any:
        writes = _current_writes()
        writes.wrote = True
        writes.conns[id(self._cluster)] = conn
        return conn

    def _returned(self, conn: Any) -> None:
        writes = _writes.get()
        if writes is not None and writes.conns.get(id(self._cluster)) is conn:
            del writes.conns[id(self._cluster)]


class _AsyncPrimary(_Primary):
    async def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> Any:
        return self._lent(await cast(Any, self._cluster).getconn(timeout, tag=tag))

    async def putconn(self, conn: Any) -> None:
        self._returned(conn)
        await cast(Any, self._cluster).putconn(conn)


class _SyncPrimary(_Primary):
    def getconn(self, timeout: float | None = None, *, tag: str | None = None) -> Any:
        return self._lent(cast(Any, self._cluster).getconn(timeout, tag=tag))

    def putconn(self, conn: Any) -> None:
        self._returned(conn)
        cast(Any, self._cluster).putconn(conn)


class ClusterLifespan:
    """An ASGI lifespan opening a primary/replica cluster for `Conn`, `ReadConn` and friends.

    `cluster` (an unopened AsyncClusterPool, or a factory returning one) serves `Conn`
    (writes, on the current primary) and `ReadConn` (replicas); `sync_cluster` a
    ClusterPool for `SyncConn` and `SyncReadConn`. `name` is the pool name the
    dependencies ask for ("default" for the plain aliases). `pools` is an optional
    PoolLifespan for other, single-server pools, entered inside this one.
    """

    __module__ = "poolkit_fastapi"

    def __init__(
        self,
        cluster: Any = None,
        *,
        sync_cluster: Any = None,
        name: str = DEFAULT,
        pools: Callable[[object], AbstractAsyncContextManager[Mapping[str, Any]]] | None = None,
        open_timeout: float = 30.0,
        drain_timeout: float | None = None,
        retry_after: int = 1,
    ) -> None:
        if cluster is None and sync_cluster is None:
            fix = "pass AsyncClusterPool(...) and/or sync_cluster=ClusterPool(...)"
            raise ConfigError("cluster", None, "no cluster given", fix)
        self._sources = (cluster, sync_cluster)
        self.name = name
        self._pools = pools
        self.open_timeout = open_timeout
        self.drain_timeout = drain_timeout
        self.retry_after = retry_after

    def __call__(self, app: object) -> AbstractAsyncContextManager[dict[str, Any]]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: object) -> AsyncIterator[dict[str, Any]]:
        built: list[Any] = [
            s() if callable(s) and not hasattr(s, "getconn") else s for s in self._sources
        ]
        acluster, scluster = built
        for value, kind, setting in ((acluster, AsyncClusterPool, "cluster"),
                                     (scluster, ClusterPool, "sync_cluster")):  # fmt: skip
            if value is not None and not isinstance(value, kind):
                raise ConfigError(setting, value, f"is not a {kind.__name__}",
                                  f"pass an unopened {kind.__name__}(...)")  # fmt: skip
        opened: list[Any] = []
        try:
            for cluster in (acluster, scluster):
                if cluster is None:
                    continue
                opened.append(cluster)
                await _call(cluster, "open")
                try:
                    await _call(cluster, "wait", self.open_timeout)
                except PoolTimeout as exc:
                    raise PoolStartupError(
                        f"could not open cluster {cluster.name!r}: {exc}"
                    ) from None
            async with _inner_lifespan(self._pools, app) as inner:
                base = inner.get(STATE_KEY) if inner else None
                async_pools = dict(base._async) if isinstance(base, Pools) else {}
                sync_pools = dict(base._sync) if isinstance(base, Pools) else {}
                if acluster is not None:
                    async_pools[self.name] = cast(Any, _AsyncPrimary(acluster))
                if scluster is not None:
                    sync_pools[self.name] = cast(Any, _SyncPrimary(scluster))
                state = dict(inner or {})
                state[STATE_KEY] = Pools(async_pools, sync_pools, self.retry_after)
                state[CLUSTERS_KEY] = {"async": acluster, "sync": scluster, "name": self.name}
                yield state
        finally:
            for cluster in opened:
                await _call(cluster, "close", self.drain_timeout)


async def _call(cluster: Any, method: str, *args: Any) -> Any:
    if isinstance(cluster, AsyncClusterPool):
        return await getattr(cluster, method)(*args)
    return await anyio.to_thread.run_sync(functools.partial(getattr(cluster, method), *args))


@asynccontextmanager
async def _inner_lifespan(
    lifespan: Callable[[object], AbstractAsyncContextManager[Mapping[str, Any]]] | None,
    app: object,
) -> AsyncIterator[Mapping[str, Any] | None]:
    if lifespan is None:
        yield None
        return
    async with lifespan(app) as state:
        yield state


def _clusters(request: HTTPConnection) -> dict[str, Any]:
    state = request.scope.get("state") or {}
    clusters = state.get(CLUSTERS_KEY)
    if not isinstance(clusters, dict):
        raise WiringError(
            "ReadConn needs a cluster: `app = FastAPI(lifespan=ClusterLifespan("
            "AsyncClusterPool([...primary, ...replicas])))` (see docs/cluster.md)"
        )
    return clusters


def _retry_after(request: HTTPConnection) -> int:
    return get_pools(request).retry_after


def _route_writes(request: HTTPConnection, name: str) -> bool:
    """True when the route also takes Conn/SyncConn for `name`: it may have written."""
    dependant = getattr(route_of(request.scope), "dependant", None)
    writers = {_dependency(name, s, st) for s in (False, True) for st in (False, True)}
    stack = [dependant] if dependant is not None else []
    while stack:
        dep = stack.pop()
        if getattr(dep, "call", None) in writers:
            return True
        stack.extend(getattr(dep, "dependencies", []))
    return False


def _sticky(request: HTTPConnection, cookie: str | None, header: str | None) -> bool:
    raw = (request.cookies.get(cookie) if cookie else None) or (
        request.headers.get(header) if header else None
    )
    try:
        return raw is not None and float(raw) > time.time()
    except ValueError:
        return False


def _to_primary(request: HTTPConnection, name: str, sticky: tuple[str | None, str | None]) -> bool:
    return _route_writes(request, name) or _sticky(request, *sticky)


@functools.cache
def _read_dependency(sync: bool, cookie: str | None, header: str | None) -> Callable[..., Any]:
    if sync:

        def sync_dependency(request: HTTPConnection) -> Iterator[Connection[Any]]:
            clusters = _clusters(request)
            cluster: ClusterPool[Any] | None = clusters["sync"]
            if cluster is None:
                raise WiringError(
                    "SyncReadConn needs ClusterLifespan(..., sync_cluster=ClusterPool(...))"
                )
            writes = _writes.get()
            shared = writes.conns.get(id(cluster)) if writes else None
            if shared is not None:  # this request's own write transaction: read your writes
                yield shared
                return
            primary = _to_primary(request, clusters["name"], (cookie, header))
            try:
                conn = cluster.getconn(tag=_tag(request), read_only=True, primary=primary)
            except _UNAVAILABLE as exc:
                raise _unavailable(cast(Any, cluster), exc, _retry_after(request)) from None
            lease = _SyncLease(cast(Any, cluster), conn, _retry_after(request))
            _end_before_response(request, lease)
            try:
                yield conn
            except BaseException as exc:
                lease.end(exc)
                raise
            lease.end(None)

        return sync_dependency

    async def dependency(request: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
        clusters = _clusters(request)
        cluster: AsyncClusterPool[Any] | None = clusters["async"]
        if cluster is None:
            raise WiringError("ReadConn needs ClusterLifespan(AsyncClusterPool(...))")
        writes = _writes.get()
        shared = writes.conns.get(id(cluster)) if writes else None
        if shared is not None:
            yield shared
            return
        primary = _to_primary(request, clusters["name"], (cookie, header))
        try:
            conn = await cluster.getconn(tag=_tag(request), read_only=True, primary=primary)
        except _UNAVAILABLE as exc:
            raise _unavailable(cast(Any, cluster), exc, _retry_after(request)) from None
        lease = _AsyncLease(cast(Any, cluster), conn, _retry_after(request))
        _end_before_response(request, lease)
        try:
            yield conn
        except BaseException as exc:
            await lease.end(exc)
            raise
        await lease.end(None)

    return dependency


def read_conn_dependency(
    *, sync: bool = False, cookie: str | None = STICKY_COOKIE, header: str | None = None
) -> fastapi_params.Depends:
    """`Depends(...)` lending a read-only connection from a replica of the app's cluster.

    It reads from the primary instead when the route also takes `Conn`/`SyncConn` (the
    same connection when Conn was resolved first: read-your-writes), or when the client
    sent a `cookie`/`header` holding a future Unix time (set by `StickyAfterWrite`).
    """
    return fastapi_params.Depends(_read_dependency(sync, cookie, header), scope="function")


get_read_conn = _read_dependency(False, STICKY_COOKIE, None)
get_sync_read_conn = _read_dependency(True, STICKY_COOKIE, None)

ReadConn = Annotated[AsyncConnection[Any], Depends(get_read_conn, scope="function")]
SyncReadConn = Annotated[Connection[Any], Depends(get_sync_read_conn, scope="function")]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class StickyAfterWrite:
    """ASGI middleware: after a request that borrowed `Conn`, send that client's reads to
    the primary for `seconds`, through a cookie (default) or a response header the client
    echoes back. Replicas lag; this hides the lag from the client who just wrote.
    """

    __module__ = "poolkit_fastapi"

    def __init__(
        self, app: Any, *, seconds: float = 5.0, cookie: str | None = STICKY_COOKIE,
        header: str | None = None,
    ) -> None:  # fmt: skip
        if not (isinstance(seconds, int | float) and seconds > 0):
            raise ConfigError("seconds", seconds, "must be a positive number", "use e.g. 5.0")
        if cookie is None and header is None:
            raise ConfigError("cookie", None, "and header are both None", "name one of them")
        self.app = app
        self.seconds = float(seconds)
        self.cookie = cookie
        self.header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        writes = _RequestWrites()
        token = _writes.set(writes)

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and writes.wrote:
                until = f"{time.time() + self.seconds:.3f}"
                headers = list(message.get("headers", []))
                if self.cookie:
                    value = f"{self.cookie}={until}; Max-Age={int(self.seconds) + 1}; Path=/; "
                    headers.append((b"set-cookie", (value + "HttpOnly; SameSite=Lax").encode()))
                if self.header:
                    headers.append((self.header.lower().encode(), until.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _writes.reset(token)
