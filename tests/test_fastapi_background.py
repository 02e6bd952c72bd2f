"""A request's connection kept for a background task refuses any use (it went back to the
pool before the task ran), and the documented way, borrowing in the task, works."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import BackgroundTasks, FastAPI, Request

from poolkit import ConnectionReturned, PoolConfig
from poolkit_fastapi import Conn, PoolLifespan, get_pools

pytestmark = pytest.mark.asyncio


async def test_conn_kept_for_a_background_task_is_refused(
    app_dsn: str, admin_conn: psycopg.Connection[Any]
) -> None:
    admin_conn.execute("CREATE TABLE IF NOT EXISTS pk_bg (v text)")
    admin_conn.execute("TRUNCATE pk_bg")
    outcome: list[BaseException | str] = []
    done = asyncio.Event()

    async def wrong(conn: Any) -> None:  # the mistake: the request's connection
        try:
            await conn.execute("INSERT INTO pk_bg VALUES ('wrong')")
            outcome.append("ran")
        except BaseException as ex:
            outcome.append(ex)
        finally:
            done.set()

    async def right(request: Request) -> None:  # the documented way: borrow in the task
        async with get_pools(request).get().connection() as conn:
            await conn.execute("INSERT INTO pk_bg VALUES ('right')")
        done.set()

    app = FastAPI(lifespan=PoolLifespan(PoolConfig.from_url(app_dsn, min_size=1, max_size=2)))

    @app.post("/wrong")
    async def post_wrong(conn: Conn, tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(wrong, conn)
        return {"ok": "yes"}

    @app.post("/right")
    async def post_right(request: Request, conn: Conn, tasks: BackgroundTasks) -> dict[str, str]:
        await conn.execute("SELECT 1")
        tasks.add_task(right, request)
        return {"ok": "yes"}

    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.post("/wrong")).status_code == 200
            await asyncio.wait_for(done.wait(), 10)
            (error,) = outcome
            assert isinstance(error, ConnectionReturned), error
            assert "was returned to pool" in str(error)
            done.clear()
            assert (await client.post("/right")).status_code == 200
            await asyncio.wait_for(done.wait(), 10)
    rows = admin_conn.execute("SELECT v FROM pk_bg ORDER BY v").fetchall()
    assert rows == [("right",)]  # the refused statement never reached the server
