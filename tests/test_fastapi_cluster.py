"""poolkit_fastapi on a real primary + standby: ReadConn, read-your-writes, /ready, /metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from poolkit import AsyncClusterPool, ClusterPool, PoolConfig
from poolkit_fastapi import (
    ClusterLifespan,
    Conn,
    PoolLifespan,
    ReadConn,
    StickyAfterWrite,
    SyncConn,
    SyncReadConn,
    WiringError,
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
    app.include_router(pool_router(dashboard=True))

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

    @app.post("/sync-write-then-read")
    def sync_write_then_read(conn: SyncConn, rconn: SyncReadConn) -> dict[str, Any]:
        row = rconn.execute(RECOVERY).fetchone()
        return {"replica": row[0] if row else None, "same": conn is rconn}

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
    # A def route reads from the primary (its own connection without StickyAfterWrite).
    assert (await client.post("/sync-write-then-read")).json()["replica"] is False


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
            # def routes share the write connection too once the middleware is installed.
            same = await client.post("/sync-write-then-read")
            assert same.json() == {"replica": False, "same": True}


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
    data = (await client.get("/_poolkit/data")).json()
    assert f"db[{standby}]" in [p["key"] for p in data["pools"]]


async def test_replica_down_reads_move_to_primary(
    client: httpx.AsyncClient, replication: Replication
) -> None:
    assert (await client.get("/read")).json()["replica"] is True
    replication.stop_standby()
    for _ in range(10):
        response = await client.get("/read")
        assert response.status_code == 200, response.text
        assert response.json()["replica"] is False


@pytest.mark.slow
async def test_failover_under_load_loses_no_acknowledged_write(
    replication: Replication, app_name: str
) -> None:
    with psycopg.connect(replication.primary.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pk_fa_items")
        conn.execute("CREATE TABLE pk_fa_items (id int PRIMARY KEY)")
    replication.repair()
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(
        replication.dsns, name="db", min_size=2, max_size=8, timeout=8,
        application_name=app_name,
    )  # fmt: skip
    app = FastAPI(lifespan=ClusterLifespan(cluster))

    @app.post("/items/{item}")
    async def create(item: int, conn: Conn) -> dict[str, int]:
        await conn.execute("INSERT INTO pk_fa_items VALUES (%s)", (item,))
        return {"id": item}

    @app.get("/items")
    async def count(conn: ReadConn) -> dict[str, int]:
        row = await (await conn.execute("SELECT count(*) FROM pk_fa_items")).fetchone()
        return {"n": row[0] if row else 0}

    acked: list[tuple[int, float]] = []
    statuses: list[int] = []
    ids = iter(range(1, 10**6))
    stop = anyio.Event()

    async def writer(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            item = next(ids)
            response = await client.post(f"/items/{item}")
            statuses.append(response.status_code)
            if response.status_code == 200:
                acked.append((item, time.monotonic()))

    async def reader(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            statuses.append((await client.get("/items")).status_code)

    async with LifespanManager(app) as manager:
        # A route's unhandled error is a 500, as a real server answers it.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(4):
                tg.start_soon(writer, client)
                tg.start_soon(reader, client)
            await anyio.sleep(1.0)
            new_primary = await anyio.to_thread.run_sync(replication.failover)
            promoted = time.monotonic()
            with anyio.fail_after(8):
                while not any(t > promoted for _, t in acked):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.5)
            stop.set()
        assert cluster.stats()["in_use"] == 0
    with psycopg.connect(new_primary.dsn, autocommit=True) as conn:
        found = {r[0] for r in conn.execute("SELECT id FROM pk_fa_items").fetchall()}
    lost = [item for item, _ in acked if item not in found]
    assert lost == [], f"{len(lost)} acknowledged writes lost"
    assert set(statuses) <= {200, 500, 503}, set(statuses)


async def test_read_conn_without_a_cluster_says_how_to_wire(dsn: str) -> None:
    app = FastAPI(lifespan=PoolLifespan(PoolConfig.from_url(dsn, min_size=1)))

    @app.get("/read")
    async def read(conn: ReadConn) -> None: ...

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with pytest.raises(WiringError, match="ClusterLifespan"):
                await client.get("/read")


async def test_no_replica_with_fallback_error_is_503(
    replication: Replication, app_name: str
) -> None:
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(
        replication.dsns, name="db", min_size=1, fallback="error", application_name=app_name
    )
    app = FastAPI(lifespan=ClusterLifespan(cluster, retry_after=7))

    @app.get("/read")
    async def read(conn: ReadConn) -> None: ...

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/read")).status_code == 200
            replication.stop_standby()
            with anyio.fail_after(10):
                while cluster.stats()["hosts"][1]["healthy"]:
                    await anyio.sleep(0.01)
            response = await client.get("/read")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "7"
