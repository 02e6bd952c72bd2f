"""PoolLifespan: opens named pools on the serving loop, hands them to requests, drains them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeAlias

import psycopg
from starlette.requests import HTTPConnection

from poolkit import AsyncPool, ConfigError, Pool, PoolConfig, PoolkitError, mask_conninfo

__all__ = [
    "STATE_KEY",
    "PoolLifespan",
    "PoolSource",
    "PoolStartupError",
    "Pools",
    "WiringError",
    "get_pools",
]

logger = logging.getLogger("poolkit.fastapi")

# The Pools of the PoolLifespan being run, for code running inside it at startup.
opened_pools: ContextVar[Pools | None] = ContextVar("poolkit_fastapi_pools", default=None)
# The lifespan state key holding the Pools; merged with the application's own state.
STATE_KEY = "poolkit"
DEFAULT = "default"
# psycopg_pool.wait() needs a number: "no limit" becomes a year.
_FOREVER = 365 * 86400.0
_DIAGNOSE_TIMEOUT = 5
# Read the environment at startup, not at import: a bad setting fails the startup.
_FROM_ENV: Any = object()

PoolSource: TypeAlias = "PoolConfig | str | Callable[[], AsyncPool[Any] | Pool[Any]]"

_HOW_TO_WIRE = (
    "pass the lifespan to the app: `app = FastAPI(lifespan=PoolLifespan(DATABASE_URL))`; if the "
    "app has its own lifespan, enter ours inside it and yield its state: `async with "
    "PoolLifespan(...)(app) as state: yield {**state, ...}` (see docs/fastapi.md)"
)


class PoolStartupError(PoolkitError, RuntimeError):
    """A pool could not be opened at startup; the message names the pool, server and cause."""

    __module__ = "poolkit_fastapi"


class WiringError(PoolkitError, RuntimeError):
    """A route asked for a pool the lifespan did not open, or the lifespan is not wired."""

    __module__ = "poolkit_fastapi"


class Pools:
    """The open pools of one application, by name; reach them with `get_pools(request)`."""

    __module__ = "poolkit_fastapi"
    __slots__ = ("_async", "_sync", "retry_after")

    def __init__(
        self,
        async_pools: Mapping[str, AsyncPool[Any]],
        sync_pools: Mapping[str, Pool[Any]],
        retry_after: int,
    ) -> None:
        self._async = dict(async_pools)
        self._sync = dict(sync_pools)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"<Pools async={list(self._async)} sync={list(self._sync)}>"

    def get(self, name: str = DEFAULT) -> AsyncPool[Any]:
        """The async pool configured under `name` (for `async def` code)."""
        try:
            return self._async[name]
        except KeyError:
            raise WiringError(self._missing("async", name, "PoolLifespan({...})")) from None

    def get_sync(self, name: str = DEFAULT) -> Pool[Any]:
        """The sync pool configured under `name` (for `def` routes, which run in threads)."""
        try:
            return self._sync[name]
        except KeyError:
            where = "PoolLifespan(..., sync_pools={...})"
            raise WiringError(self._missing("sync", name, where)) from None

    def _missing(self, kind: str, name: str, where: str) -> str:
        return (
            f"no {kind} pool named {name!r}: the lifespan opened async pools "
            f"{sorted(self._async)} and sync pools {sorted(self._sync)}; add {name!r} to "
            f"{where} or ask for one of those names"
        )

    def by_name(self) -> dict[str, AsyncPool[Any] | Pool[Any]]:
        """Every pool keyed by its pool name (what logs and metrics call it)."""
        out: dict[str, AsyncPool[Any] | Pool[Any]] = {p.name: p for p in self._async.values()}
        out.update((p.name, p) for p in self._sync.values())
        return out

    def items(self) -> Iterator[tuple[str, AsyncPool[Any] | Pool[Any]]]:
        """(configured name, pool) pairs, async pools first."""
        yield from self._async.items()
        yield from self._sync.items()


def get_pools(source: HTTPConnection | Mapping[str, Any]) -> Pools:
    """The Pools opened by PoolLifespan, from a request (also a dependency) or lifespan state."""
    state = source.scope.get("state") if isinstance(source, HTTPConnection) else source
    pools = state.get(STATE_KEY) if state is not None else None
    if not isinstance(pools, Pools):
        raise WiringError(f"no poolkit pools in this app's lifespan state: {_HOW_TO_WIRE}")
    return pools


class PoolLifespan:
    """An ASGI lifespan that opens pools at startup and drains them at shutdown.

    `pools` is one source or a mapping of names to sources for async pools (`Conn`);
    `sync_pools` the same for sync pools (`SyncConn`, `def` routes). A source is a
    PoolConfig, a URL, or a zero-argument factory returning an unopened AsyncPool/Pool
    (for `configure=` or a custom connection class). With neither, the "default" async
    pool is configured from the environment (DATABASE_URL and POOLKIT_*) at startup.

    Startup waits up to `open_timeout` (default: each pool's `open_timeout`) for each
    pool's `min_size` connections (at least one), and fails with PoolStartupError naming
    the server and the cause. Shutdown stops lending and waits up to `drain_timeout`
    (default: each pool's `drain_timeout`) for borrowed connections before closing.
    `retry_after` is the Retry-After header (seconds) of 503 answers on exhaustion.
    """

    __module__ = "poolkit_fastapi"

    def __init__(
        self,
        pools: PoolSource | Mapping[str, PoolSource] | None = None,
        *,
        sync_pools: PoolSource | Mapping[str, PoolSource] | None = None,
        open_timeout: float | None = None,
        drain_timeout: float | None = None,
        retry_after: int = 1,
    ) -> None:
        if pools is None and sync_pools is None:
            pools = {DEFAULT: _FROM_ENV}
        self._async_sources = _named(pools, "pools")
        self._sync_sources = _named(sync_pools, "sync_pools")
        for setting, value in (("open_timeout", open_timeout), ("drain_timeout", drain_timeout)):
            if value is not None and not (isinstance(value, int | float) and value >= 0):
                raise ConfigError(setting, value, "must be seconds >= 0", "use e.g. 10.0")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigError(
                "retry_after", retry_after, "must be whole seconds >= 0", "use e.g. 1"
            )
        self.open_timeout = open_timeout
        self.drain_timeout = drain_timeout
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"<PoolLifespan pools={list(self._async_sources)} "
            f"sync_pools={list(self._sync_sources)}>"
        )

    def __call__(self, app: object) -> AbstractAsyncContextManager[dict[str, Any]]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: object) -> AsyncIterator[dict[str, Any]]:
        from ._deps import check_routes  # _deps imports this module

        check_routes(app)
        async_pools: dict[str, AsyncPool[Any]] = {}
        sync_pools: dict[str, Pool[Any]] = {}
        try:
            for key, source in self._async_sources.items():
                async_pools[key] = _build(source, key, AsyncPool, key)
            for key, source in self._sync_sources.items():
                sync_pools[key] = _build(source, key, Pool, f"{key}-sync")
            _check_unique([*async_pools.values(), *sync_pools.values()])
            await self._open_all([*async_pools.values(), *sync_pools.values()])
        except BaseException:
            await self._close_all([*async_pools.values(), *sync_pools.values()])
            raise
        pools = Pools(async_pools, sync_pools, self.retry_after)
        # Seen by lifespans entered inside this one, such as pool_router's dashboard
        # sampler (FastAPI runs an included router's lifespan within the app's).
        opened_pools.set(pools)
        try:
            yield {STATE_KEY: pools}
        finally:
            opened_pools.set(None)
            await self._close_all([*async_pools.values(), *sync_pools.values()])

    async def _open_all(self, pools: list[AsyncPool[Any] | Pool[Any]]) -> None:
        results = await asyncio.gather(*(self._open(p) for p in pools), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for extra in errors[1:]:
            logger.error("%s", extra)
        if errors:
            raise errors[0]

    async def _open(self, pool: AsyncPool[Any] | Pool[Any]) -> None:
        timeout = self.open_timeout
        if timeout is None:
            timeout = pool.config.open_timeout
        wait = _FOREVER if timeout is None else float(timeout)
        try:
            if isinstance(pool, AsyncPool):
                await pool.open(wait=True, timeout=wait)
                if pool.min_size == 0:  # open() waited for nothing: prove the server answers
                    async with pool.connection(timeout=wait, tag="startup") as conn:
                        await conn.execute("SELECT 1")
            else:
                await asyncio.to_thread(_open_sync, pool, wait)
        except Exception as exc:
            cause = await _diagnose(pool)
            raise PoolStartupError(_startup_message(pool, timeout, exc, cause)) from None
        logger.info("pool %r open: %s", pool.name, mask_conninfo(_conninfo(pool)))

    async def _close_all(self, pools: list[AsyncPool[Any] | Pool[Any]]) -> None:
        await asyncio.gather(*(self._close(p) for p in pools))

    async def _close(self, pool: AsyncPool[Any] | Pool[Any]) -> None:
        if pool.closed:
            return
        try:
            if isinstance(pool, AsyncPool):
                await pool.close(self.drain_timeout)
            else:
                await asyncio.to_thread(pool.close, self.drain_timeout)
        except Exception:
            # Shutdown must close the other pools: report and carry on.
            logger.exception("pool %r: error while closing", pool.name)
        else:
            logger.info("pool %r closed", pool.name)


def _named(
    sources: PoolSource | Mapping[str, PoolSource] | None, setting: str
) -> dict[str, PoolSource]:
    if sources is None:
        return {}
    if isinstance(sources, Mapping):
        for key in sources:
            if not isinstance(key, str) or not key:
                raise ConfigError(
                    f"{setting}[{key!r}]",
                    key,
                    "pool names must be non-empty str",
                    "use e.g. 'replica'",
                )
        return dict(sources)
    return {DEFAULT: sources}


def _build(source: PoolSource, key: str, kind: type[Any], default_name: str) -> Any:
    """An unopened pool of `kind` (AsyncPool or Pool) for one configured source."""
    where = f"{'pools' if kind is AsyncPool else 'sync_pools'}[{key!r}]"
    if isinstance(source, str):
        source = PoolConfig.from_url(source)
    elif source is _FROM_ENV:
        source = PoolConfig.from_env()
    if isinstance(source, PoolConfig):
        if source.name is None:
            source = source.replace(name=default_name)
        return kind(config=source, open=False)
    if not callable(source):
        raise ConfigError(
            where,
            source,
            f"is a {type(source).__name__}",
            "use a PoolConfig, a postgresql:// URL or a function returning an unopened pool",
        )
    pool = source()
    expected = "an AsyncPool" if kind is AsyncPool else "a Pool"
    if not isinstance(pool, kind):
        problem = f"the factory returned {type(pool).__name__}, not {expected}"
        raise ConfigError(where, source, problem, f"return {expected}(..., open=False) from it")
    if not pool.closed:
        raise ConfigError(
            where,
            source,
            "the factory returned an open pool",
            "create it with open=False: the lifespan opens it on the serving loop",
        )
    return pool


def _check_unique(pools: list[AsyncPool[Any] | Pool[Any]]) -> None:
    seen: set[str] = set()
    for pool in pools:
        if pool.name in seen:
            raise ConfigError(
                "name",
                pool.name,
                "two pools have this name, so logs and metrics would mix them up",
                "give each PoolConfig a distinct name=",
            )
        seen.add(pool.name)


def _open_sync(pool: Pool[Any], wait: float) -> None:
    pool.open(wait=True, timeout=wait)
    if pool.min_size == 0:
        with pool.connection(timeout=wait, tag="startup") as conn:
            conn.execute("SELECT 1")


def _conninfo(pool: AsyncPool[Any] | Pool[Any]) -> str:
    return pool.conninfo if isinstance(pool.conninfo, str) else "<callable conninfo>"


async def _diagnose(pool: AsyncPool[Any] | Pool[Any]) -> str:
    """What one direct connection attempt says, since the pool only reports a timeout."""
    if not isinstance(pool.conninfo, str):
        return ""
    kwargs = pool.config.connect_kwargs()
    kwargs.setdefault("connect_timeout", _DIAGNOSE_TIMEOUT)
    kwargs.pop("autocommit", None)
    kwargs.pop("prepare_threshold", None)
    try:
        conn = await psycopg.AsyncConnection.connect(pool.conninfo, **kwargs)
    except Exception as exc:
        return mask_conninfo(" ".join(str(exc).split()))
    await conn.close()
    return "a direct connection attempt just succeeded, so the server is slow or refuses some"


def _startup_message(
    pool: AsyncPool[Any] | Pool[Any], timeout: float | None, exc: BaseException, cause: str
) -> str:
    conninfo = _conninfo(pool)
    where = mask_conninfo(conninfo) if conninfo else "'' (libpq defaults: is DATABASE_URL set?)"
    limit = "" if timeout is None else f" within {timeout:g} s"
    need = max(pool.min_size, 1)
    msg = f"could not open pool {pool.name!r}{limit} ({need} connection(s) to {where})"
    cause = (cause or mask_conninfo(" ".join(str(exc).split()))).rstrip(". ")
    msg += f": {cause}" + ("" if cause.endswith("?") else ".")
    if "Is the server running" not in cause:  # libpq's own hint says it already
        msg += " Is the server running and reachable from here, and is the URL right?"
    return msg + " If the server is only slow to start, raise open_timeout (POOLKIT_OPEN_TIMEOUT)."
