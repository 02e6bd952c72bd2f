"""Writes through `Conn` (the primary), reads through `ReadConn` (a replica), on AsyncClusterPool.

Configured from the environment: CHAOS_CLUSTER_URLS (a JSON list of URLs), CHAOS_APP_NAME,
CHAOS_POOL (JSON PoolConfig settings, applied per host).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from poolkit import AsyncClusterPool
from poolkit_fastapi import ClusterLifespan, Conn, ReadConn, pool_router

SCHEMA = "CREATE TABLE IF NOT EXISTS chaos_items (name text NOT NULL)"


class Item(BaseModel):
    name: str


def create_app() -> FastAPI:
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(
        json.loads(os.environ["CHAOS_CLUSTER_URLS"]),
        name="db",
        application_name=os.environ["CHAOS_APP_NAME"],
        **json.loads(os.environ["CHAOS_POOL"]),
    )
    serve = ClusterLifespan(cluster)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with serve(app) as state:
            async with cluster.connection() as conn:
                await conn.execute(SCHEMA)
            yield state

    app = FastAPI(lifespan=lifespan)
    app.include_router(pool_router())  # /ready, /metrics

    @app.post("/items", status_code=201)
    async def create(item: Item, conn: Conn) -> dict[str, str]:
        await conn.execute("INSERT INTO chaos_items (name) VALUES (%s)", (item.name,))
        return {"name": item.name}

    @app.get("/items")
    async def read(conn: ReadConn) -> dict[str, Any]:
        cur = await conn.execute("SELECT count(*), inet_server_port() FROM chaos_items")
        row = await cur.fetchone()
        assert row is not None
        return {"rows": row[0], "port": row[1]}

    @app.get("/chaos/pool")
    async def pool() -> dict[str, Any]:
        return {"pid": os.getpid(), "pools": {"db": cluster.stats()}}

    return app


app = create_app()
