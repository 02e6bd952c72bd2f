"""poolkit_fastapi on a real primary + standby: ReadConn, read-your-writes, /ready, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from poolkit import AsyncClusterPool, ClusterPool
from poolkit_fastapi import (
    ClusterLifespan,
    Conn,
    ReadConn,
    StickyAfterWrite,
    SyncConn,
    SyncReadConn,
    pool_router,
)
from tests._replication import Replication

pytestmark = pytest.mark.anyio
RECOVERY = "SELECT pg_is_in_recovery()"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(replication: Replication, app_name: str, *, sticky: bool = False) -> FastAPI:
    settings: dict[str, Any] = {"min_size": 1, "max_size": 4, "application_name": app_name}
    lifespan = ClusterLifespan(
        AsyncClusterPool(replication.dsns, name="db", **settings),
        sync_cluster=ClusterPool(replication.dsns, name="db-sync", **settings),
    )
    app = FastAPI(lifespan=lifespan)
    app.include_router(pool_router())

    @app.get("/read")
    async def read(conn: ReadConn) -> dict[str, Any]:
        row = await (await conn.execute(RECOVERY)).fetchone()
        ro = await (await conn.execute("SHOW transaction_read_only")).fetchone()
        return {"replica": row[0] if row else None, "read_only": ro[0] if ro else None}

    @app.post("/write")
    async def write(conn: Conn) -> dict[str, Any]:
        row = await (await conn.execute(RECOVERY)).fetchone()
        return {"replica": row[0] if row else None}

    @app.post("/write-then-read")
    async def write_then_read(conn: Conn, rconn: ReadConn) -> dict[str, Any]:
        await conn.execute("CREATE TEMP TABLE mine (x int)")
        await conn.execute("INSERT INTO mine VALUES (42)")
        row = await (await rconn.execute("SELECT x FROM mine")).fetchone()
        return {"seen": row[0] if row else None, "same": conn is rconn}

    @app.get("/sync-read")
    def sync_read(conn: SyncReadConn) -> dict[str, Any]:
        row = conn.execute(RECOVERY).fetchone()
        return {"replica": row[0] if row else None}

    @app.post("/sync-write")
    def sync_write(conn: SyncConn) -> dict[str, Any]:
        row = conn.execute(RECOVERY).fetchone()
        return {"replica": row[0] if row else None}

    if sticky:
        app.add_middleware(StickyAfterWrite, seconds=30)
    return app


@pytest.fixture
async def client(replication: Replication, app_name: str) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(replication, app_name)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def test_read_conn_on_replica_conn_on_primary(client: httpx.AsyncClient) -> None:
    assert (await client.get("/read")).json() == {"replica": True, "read_only": "on"}
    assert (await client.post("/write")).json() == {"replica": False}
    assert (await client.get("/sync-read")).json() == {"replica": True}
    assert (await client.post("/sync-write")).json() == {"replica": False}


async def test_read_after_write_in_a_request_reads_the_write(client: httpx.AsyncClient) -> None:
    assert (await client.post("/write-then-read")).json() == {"seen": 42, "same": True}


async def test_sticky_after_write(replication: Replication, app_name: str) -> None:
    app = make_app(replication, app_name, sticky=True)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert "set-cookie" not in (await client.get("/read")).headers
            response = await client.post("/write")
            assert "poolkit_primary_until=" in response.headers["set-cookie"]
            # The client that wrote reads from the primary, the others from the replica.
            assert (await client.get("/read")).json() == {"replica": False, "read_only": "on"}
            assert (await client.get("/sync-read")).json() == {"replica": False}
            client.cookies.clear()
            assert (await client.get("/read")).json()["replica"] is True


async def test_ready_and_metrics_show_every_host(
    client: httpx.AsyncClient, replication: Replication
) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200, response.text
    hosts = {h["host"]: h for h in response.json()["pools"]["db"]["hosts"]}
    assert hosts[replication.label(replication.primary)]["role"] == "primary"
    assert hosts[replication.label(replication.standby)]["role"] == "replica"
    text = (await client.get("/metrics")).text
    standby = replication.label(replication.standby)
    assert f'poolkit_host_up{{host="{standby}",pool_name="db",role="replica"}} 1.0' in text
    assert "poolkit_host_replication_lag_seconds{" in text
    assert f'pool_name="db[{standby}]"' in text  # each host's pool metrics


async def test_replica_down_reads_move_to_primary(
    client: httpx.AsyncClient, replication: Replication
) -> None:
    assert (await client.get("/read")).json()["replica"] is True
    replication.stop_standby()
    for _ in range(10):
        response = await client.get("/read")
        assert response.status_code == 200, response.text
        assert response.json()["replica"] is False
