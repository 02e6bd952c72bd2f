"""pool_router(): readiness, Prometheus metrics and, when enabled, the live dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any, cast

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import Request

from poolkit import (
    AsyncPool,
    DashboardHistory,
    Pool,
    dashboard_html,
    dashboard_snapshot,
    mask_conninfo,
    render_prometheus,
)

from ._deps import _tag
from ._lifespan import get_pools, opened_pools

__all__ = ["pool_router"]

logger = logging.getLogger("poolkit.fastapi")


def pool_router(
    *,
    prefix: str = "",
    ready_path: str = "/ready",
    metrics_path: str = "/metrics",
    ready_timeout: float = 2.0,
    include_in_schema: bool = False,
    tags: Sequence[str | Enum] | None = None,
    dashboard: bool = False,
    dashboard_prefix: str = "/_poolkit",
    dashboard_dependencies: Sequence[Any] = (),
) -> APIRouter:
    """Routes for operators: `GET {prefix}/ready` and `GET {prefix}/metrics`.

    Readiness answers 200 when every pool is open and lends a connection that answers
    `SELECT 1` within `ready_timeout` seconds, else 503 with the failing pools. The
    metrics endpoint serves the Prometheus text format (OpenTelemetry
    `db.client.connection.*` names, hold time per route); it needs prometheus-client.

    With `dashboard=True`, also the live dashboard: the page at `GET {dashboard_prefix}/`
    and the JSON it polls at `GET {dashboard_prefix}/data`, never in the OpenAPI schema.
    It shows code sites and pool state: guard it with `dashboard_dependencies`, such as
    `[Depends(require_operator)]`, applied to both routes.
    """
    router = APIRouter(prefix=prefix, tags=list(tags or []), include_in_schema=include_in_schema)

    async def ready(request: Request) -> JSONResponse:
        pools = get_pools(request).by_name()
        tag = _tag(request)
        checks = await asyncio.gather(*(_check(p, ready_timeout, tag) for p in pools.values()))
        report: dict[str, Any] = {}
        for (name, pool), error in zip(pools.items(), checks, strict=True):
            stats = pool.stats()
            entry: dict[str, Any] = {"ok": error is None}
            entry.update({k: stats[k] for k in ("size", "idle", "in_use", "waiting")})
            hosts = cast(dict[str, Any], stats).get("hosts")
            if hosts is not None:  # a ClusterPool: every host with its role and lag
                keys = ("host", "role", "healthy", "lag", "error")
                entry["hosts"] = [{k: h[k] for k in keys} for h in hosts]
            if error is not None:
                entry["error"] = error
            report[name] = entry
        ok = all(error is None for error in checks)
        body = {"status": "ready" if ok else "unavailable", "pools": report}
        headers = None if ok else {"Retry-After": str(get_pools(request).retry_after)}
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    async def metrics(request: Request) -> Response:
        pools = get_pools(request)
        try:
            body, content_type = render_prometheus(pools.by_name())
        except ImportError as exc:  # prometheus-client is an optional extra
            raise HTTPException(501, detail=str(exc)) from None
        return Response(body, media_type=content_type)

    # HEAD too: load balancers and uptime checks probe with it.
    router.add_api_route(ready_path, ready, methods=["GET", "HEAD"], name="poolkit_ready")
    router.add_api_route(metrics_path, metrics, methods=["GET"], name="poolkit_metrics")
    if dashboard:
        _add_dashboard(router, dashboard_prefix.rstrip("/"), list(dashboard_dependencies))
    return router


def _add_dashboard(router: APIRouter, prefix: str, dependencies: list[Any]) -> None:
    history = DashboardHistory(interval=1.0, window=300.0)
    html = dashboard_html()

    @asynccontextmanager
    async def sampling(app: Any) -> AsyncIterator[None]:
        # FastAPI runs an included router's lifespan inside the app's, so PoolLifespan's
        # pools are open here: sample them from startup on, on the serving loop, so the
        # chart shows the last minutes as soon as the page opens. Without PoolLifespan,
        # each snapshot samples instead (the chart fills while the page is open).
        pools = opened_pools.get()
        task = None
        if pools is not None:
            history.pools = pools.by_name
            task = asyncio.create_task(_sample_every(history), name="poolkit-dashboard")
        try:
            yield None
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    router.lifespan_context = sampling

    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def data(request: Request) -> JSONResponse:
        # Counters and lists only, no I/O: fine on the event loop.
        snapshot = dashboard_snapshot(get_pools(request).by_name(), history)
        return JSONResponse(snapshot, headers={"Cache-Control": "no-store"})

    options: dict[str, Any] = {
        "methods": ["GET"],
        "dependencies": dependencies,
        "include_in_schema": False,
    }
    router.add_api_route(f"{prefix}/", page, name="poolkit_dashboard", **options)
    router.add_api_route(f"{prefix}/data", data, name="poolkit_dashboard_data", **options)


async def _sample_every(history: DashboardHistory) -> None:
    while True:
        try:
            history.sample()
        except Exception:  # a pool closing under us must not end the sampling
            logger.debug("dashboard sample failed", exc_info=True)
        await asyncio.sleep(history.interval)


# Checks still running after their answer was given up on; referenced until they end.
_stragglers: set[asyncio.Task[None]] = set()


async def _check(pool: AsyncPool[Any] | Pool[Any], timeout: float, tag: str) -> str | None:
    """None if `pool` lends a connection that answers a ping, else why not."""
    if pool.closed:
        return "the pool is closed"
    # Not cancelled on timeout: cancelling a query mid-flight on a dead network can hang
    # the rollback that follows. The ping goes on in the background; the answer does not.
    task = asyncio.ensure_future(_ping(pool, timeout, tag))
    done, _ = await asyncio.wait({task}, timeout=2 * timeout)
    if not done:
        _stragglers.add(task)
        task.add_done_callback(_forget)
        return f"no answer to a ping within {2 * timeout:g} s"
    exc = task.exception()
    if exc is None:
        return None
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return mask_conninfo(f"{type(exc).__name__}: {first_line}")


def _forget(task: asyncio.Task[None]) -> None:
    _stragglers.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the answer already said the pool is not ready


async def _ping(pool: AsyncPool[Any] | Pool[Any], timeout: float, tag: str) -> None:
    if isinstance(pool, AsyncPool) or inspect.iscoroutinefunction(pool.getconn):
        async with cast(AsyncPool[Any], pool).connection(timeout=timeout, tag=tag) as conn:
            await conn.execute("SELECT 1")
    else:
        await asyncio.to_thread(_ping_sync, pool, timeout, tag)


def _ping_sync(pool: Pool[Any], timeout: float, tag: str) -> None:
    with pool.connection(timeout=timeout, tag=tag) as conn:
        conn.execute("SELECT 1")
