"""poolkit_fastapi against a real server: transactions, exhaustion, drain, wiring, routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from psycopg import AsyncConnection

from poolkit import AsyncPool, PoolConfig
from poolkit_fastapi import (
    Conn,
    PoolLifespan,
    PoolStartupError,
    StreamConn,
    SyncConn,
    WiringError,
    conn_dependency,
    get_conn,
    get_pools,
    pool_router,
)
from tests._helpers import backend_count, wait_until
from tests._proxy import TcpProxy

TABLE = "pk_fastapi_items"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg_pool's async pool runs on asyncio only


# ---- The app under test -------------------------------------------------------------------------


@dataclass
class Hooks:
    """Lets a test hold requests inside a route until it says so."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0


def _fail(how: str | None) -> None:
    if how == "http":
        raise HTTPException(409, "the route refused")
    if how == "error":
        raise RuntimeError("the route crashed")


async def audit(conn: Conn) -> AsyncConnection[Any]:
    """A sub-dependency asking for a connection too (module level: FastAPI resolves names here)."""
    return conn


async def naive_conn(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    """The usual hand-written dependency: request scope, ends after the response."""
    async with get_pools(request).get().connection() as conn:
        yield conn


INSERT = f"INSERT INTO {TABLE} (test, label, parent_id) VALUES (%s, %s, %s) RETURNING id"
ReplicaConn = Annotated[AsyncConnection[Any], conn_dependency("replica")]


def build_app(lifespan: PoolLifespan | None, hooks: Hooks | None = None) -> FastAPI:
    """The test app; with lifespan=None it is left unwired on purpose."""
    app = FastAPI(lifespan=lifespan)
    app.include_router(pool_router(ready_timeout=0.5))
    hooks = hooks or Hooks()

    @app.post("/async/items", status_code=201)
    async def add_async(
        conn: Conn, t: str, label: str = "x", parent: int | None = None, fail: str | None = None
    ) -> dict[str, Any]:
        row = await (await conn.execute(INSERT, (t, label, parent))).fetchone()
        _fail(fail)
        assert row is not None
        return {"id": row[0], "conn": type(conn).__name__}

    @app.post("/sync/items", status_code=201)
    def add_sync(
        conn: SyncConn, t: str, label: str = "x", parent: int | None = None, fail: str | None = None
    ) -> dict[str, Any]:
        row = conn.execute(INSERT, (t, label, parent)).fetchone()
        _fail(fail)
        assert row is not None
        return {"id": row[0], "conn": type(conn).__name__}

    # get_conn declared with FastAPI's default (request) scope: must still end in time.
    @app.post("/async/items-request-scope", status_code=201)
    async def add_request_scope(
        conn: Annotated[AsyncConnection[Any], Depends(get_conn)], t: str, parent: int | None = None
    ) -> dict[str, Any]:
        await conn.execute(INSERT, (t, "x", parent))
        return {}

    @app.post("/async/swallow")
    async def swallow_async(conn: Conn, t: str) -> dict[str, Any]:
        await conn.execute(INSERT, (t, "x", None))
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1/0")  # caught, not rolled back: the insert is gone
        return {"ok": True}

    @app.post("/sync/swallow")
    def swallow_sync(conn: SyncConn, t: str) -> dict[str, Any]:
        conn.execute(INSERT, (t, "x", None))
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        return {"ok": True}

    @app.get("/async/shared")
    async def shared(
        conn: Conn, other: Annotated[AsyncConnection[Any], Depends(audit)]
    ) -> dict[str, Any]:
        return {"same": conn is other}

    @app.get("/async/hold")
    async def hold(conn: Conn, t: str) -> dict[str, Any]:
        await conn.execute(INSERT, (t, "held", None))
        hooks.held += 1
        await hooks.release.wait()
        return {"ok": True}

    @app.get("/async/sleep")
    async def sleep(conn: Conn, t: str, s: float) -> dict[str, Any]:
        await conn.execute("SELECT pg_sleep(%s)", (s,))
        await conn.execute(INSERT, (t, "slept", None))
        return {"ok": True}

    @app.get("/async/stream")
    async def stream(conn: StreamConn, request: Request, n: int) -> StreamingResponse:
        pool = get_pools(request).get()

        async def lines() -> AsyncIterator[str]:
            async with conn.cursor(name="pk_stream") as cur:  # server-side: needs the conn
                await cur.execute("SELECT g FROM generate_series(1, %s) g", (n,))
                async for (g,) in cur:
                    yield json.dumps({"g": g, "in_use": pool.stats()["in_use"]}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/async/stream-with-conn")
    async def stream_with_conn(conn: Conn, request: Request) -> StreamingResponse:
        pool = get_pools(request).get()

        async def lines() -> AsyncIterator[str]:
            yield json.dumps({"in_use": pool.stats()["in_use"]}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/replica/who")
    async def who(conn: ReplicaConn, request: Request) -> dict[str, Any]:
        row = await (await conn.execute("SELECT current_setting('application_name')")).fetchone()
        assert row is not None
        return {"application_name": row[0], "pool": get_pools(request).get("replica").name}

    return app


def uvicorn_app() -> FastAPI:
    """Factory for `uvicorn --factory`: configured from DATABASE_URL and POOLKIT_* only."""
    return build_app(PoolLifespan(drain_timeout=30))


# ---- Fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(pg_server: Any) -> str:
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " id bigserial PRIMARY KEY, test text NOT NULL, label text NOT NULL,"
            f" parent_id bigint REFERENCES {TABLE} (id) DEFERRABLE INITIALLY DEFERRED)"
        )
    return TABLE


def rows(dsn: str, test: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE test = %s", (test,)).fetchone()
    assert row is not None
    return int(row[0])


@asynccontextmanager
async def serve(
    app: FastAPI, *, raise_app_exceptions: bool = False
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any]]]:
    """Run the app's real lifespan and an httpx client on it; yields (client, state)."""
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(manager.app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, manager._state


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10) -> None:
    """Poll a cheap, in-process predicate without blocking the event loop."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def until_db(predicate: Callable[[], Any], what: str, timeout: float = 10) -> None:
    """Poll a predicate that queries the database, from a thread."""
    await anyio.to_thread.run_sync(lambda: wait_until(predicate, timeout=timeout, what=what))


def lifespan_for(dsn: str, **settings: Any) -> PoolLifespan:
    settings.setdefault("min_size", 1)
    settings.setdefault("max_size", 4)
    settings.setdefault("timeout", 10.0)
    return PoolLifespan(PoolConfig.from_url(dsn, **settings))


# ---- 1. A 2xx means committed; a failed commit is a 5xx and writes nothing ----------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_2xx_write_is_committed(kind: str, table: str, app_dsn: str, app_name: str) -> None:
    lifespan = PoolLifespan(app_dsn, sync_pools=app_dsn)
    async with serve(build_app(lifespan)) as (client, _):
        r = await client.post(f"/{kind}/items", params={"t": app_name})
        assert r.status_code == 201, r.text
        # Committed before the response: visible to another session right away.
        assert rows(app_dsn, app_name) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_failed_commit_is_5xx_and_writes_nothing(
    kind: str, table: str, app_dsn: str, app_name: str
) -> None:
    lifespan = PoolLifespan(app_dsn, sync_pools=app_dsn)
    async with serve(build_app(lifespan)) as (client, state):
        # parent=-1 breaks a deferred foreign key: only COMMIT fails.
        r = await client.post(f"/{kind}/items", params={"t": app_name, "parent": -1})
        assert r.status_code == 500, r.text
        body = r.json()["detail"]
        assert body["sqlstate"] == "23503"
        assert "nothing was written" in body["message"]
        pools = get_pools(state)
        pool = pools.get() if kind == "async" else pools.get_sync()
        assert pool.stats()["in_use"] == 0
    assert rows(app_dsn, app_name) == 0


@pytest.mark.anyio
async def test_failed_commit_is_5xx_even_with_default_request_scope(
    table: str, app_dsn: str, app_name: str
) -> None:
    # Depends(get_conn) without scope="function" would run its exit after the response.
    async with serve(build_app(PoolLifespan(app_dsn))) as (client, _):
        r = await client.post("/async/items-request-scope", params={"t": app_name, "parent": -1})
        assert r.status_code == 500, r.text
        r = await client.post("/async/items-request-scope", params={"t": app_name})
        assert r.status_code == 201, r.text
    assert rows(app_dsn, app_name) == 1


@pytest.mark.anyio
async def test_naive_request_scope_dependency_acknowledges_a_lost_write(
    table: str, app_dsn: str, app_name: str
) -> None:
    """What the tests above guard against: the usual hand-written dependency answers 201."""
    app = build_app(PoolLifespan(app_dsn))

    @app.post("/naive", status_code=201)
    async def naive(
        conn: Annotated[AsyncConnection[Any], Depends(naive_conn)], t: str
    ) -> dict[str, Any]:
        await conn.execute(INSERT, (t, "x", -1))
        return {}

    async with serve(app) as (client, _):
        r = await client.post("/naive", params={"t": app_name})
    assert r.status_code == 201
    assert rows(app_dsn, app_name) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_caught_db_error_then_normal_return_is_5xx(
    kind: str, table: str, app_dsn: str, app_name: str
) -> None:
    # psycopg's commit() on a failed transaction silently rolls back: a 200 would lie.
    async with serve(build_app(PoolLifespan(app_dsn, sync_pools=app_dsn))) as (client, _):
        r = await client.post(f"/{kind}/swallow", params={"t": app_name})
        assert r.status_code == 500, r.text
        message = r.json()["detail"]["message"]
        assert "not committed" in message
        assert "a database error was caught inside the route" in message  # not "lost"
    assert rows(app_dsn, app_name) == 0


# ---- 2. A route that raises writes nothing ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("fail", ["http", "error"])
async def test_route_that_raises_writes_nothing(
    kind: str, fail: str, table: str, app_dsn: str, app_name: str
) -> None:
    async with serve(build_app(PoolLifespan(app_dsn, sync_pools=app_dsn))) as (client, state):
        r = await client.post(f"/{kind}/items", params={"t": app_name, "fail": fail})
        assert r.status_code == (409 if fail == "http" else 500)
        pools = get_pools(state)
        assert pools.get().stats()["in_use"] == pools.get_sync().stats()["in_use"] == 0
        # The connection came back clean and is reused.
        r = await client.post(f"/{kind}/items", params={"t": app_name, "label": "ok"})
        assert r.status_code == 201
    assert rows(app_dsn, app_name) == 1


async def refuse_after_the_route() -> AsyncIterator[None]:
    """A function-scope dependency whose cleanup refuses the request after the route ran."""
    yield
    raise HTTPException(403, "refused after the route")


def refuse_after_the_route_sync() -> Iterator[None]:
    yield
    raise HTTPException(403, "refused after the route")


async def swallow_errors() -> AsyncIterator[None]:
    """A function-scope dependency that swallows the route's error (FastAPI says re-raise)."""
    with contextlib.suppress(RuntimeError):
        yield


LateAsync = Annotated[None, Depends(refuse_after_the_route, scope="function")]
LateSync = Annotated[None, Depends(refuse_after_the_route_sync, scope="function")]
Swallow = Annotated[None, Depends(swallow_errors, scope="function")]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync", "sync-with-async-dependency"])
@pytest.mark.parametrize("order", ["dependency-first", "conn-first"])
async def test_dependency_refusing_after_the_route_writes_nothing(
    kind: str, order: str, table: str, app_dsn: str, app_name: str
) -> None:
    # A function-scope dependency's cleanup runs before the response: its HTTPException is
    # the answer, so the route's work must be rolled back, whatever the parameter order
    # (a dependency declared first exits after a lease pushed on the stack later).
    app = FastAPI(lifespan=PoolLifespan(app_dsn, sync_pools=app_dsn))
    if kind == "async":

        @app.post("/dependency-first")
        async def a1(_: LateAsync, conn: Conn, t: str) -> dict[str, Any]:
            await conn.execute(INSERT, (t, "x", None))
            return {}

        @app.post("/conn-first")
        async def a2(conn: Conn, t: str, _: LateAsync) -> dict[str, Any]:
            await conn.execute(INSERT, (t, "x", None))
            return {}

    else:
        if kind == "sync":

            @app.post("/dependency-first")
            def s1(_: LateSync, conn: SyncConn, t: str) -> dict[str, Any]:
                conn.execute(INSERT, (t, "x", None))
                return {}

            @app.post("/conn-first")
            def s2(conn: SyncConn, t: str, _: LateSync) -> dict[str, Any]:
                conn.execute(INSERT, (t, "x", None))
                return {}

        else:

            @app.post("/dependency-first")
            def m1(_: LateAsync, conn: SyncConn, t: str) -> dict[str, Any]:
                conn.execute(INSERT, (t, "x", None))
                return {}

            @app.post("/conn-first")
            def m2(conn: SyncConn, t: str, _: LateAsync) -> dict[str, Any]:
                conn.execute(INSERT, (t, "x", None))
                return {}

    async with serve(app) as (client, state):
        with anyio.fail_after(20):
            r = await client.post(f"/{order}", params={"t": app_name})
        assert r.status_code == 403, r.text
        pools = get_pools(state)
        assert pools.get().stats()["in_use"] == pools.get_sync().stats()["in_use"] == 0
    assert rows(app_dsn, app_name) == 0


@pytest.mark.anyio
async def test_route_error_swallowed_by_a_dependency_still_writes_nothing(
    table: str, app_dsn: str, app_name: str
) -> None:
    # The lease sees the route's exception where it sits on the stack, before an outer
    # dependency can hide it: rolled back even though FastAPI then has no answer (500).
    app = FastAPI(lifespan=PoolLifespan(app_dsn))

    @app.post("/swallowed")
    async def swallowed(_: Swallow, conn: Conn, t: str) -> dict[str, Any]:
        await conn.execute(INSERT, (t, "x", None))
        raise RuntimeError("the route crashed")

    async with serve(app) as (client, state):
        with anyio.fail_after(20):
            r = await client.post("/swallowed", params={"t": app_name})
        assert r.status_code == 500, r.text
        assert get_pools(state).get().stats()["in_use"] == 0
    assert rows(app_dsn, app_name) == 0


# ---- 3. 200 concurrent requests on a pool of 4 --------------------------------------------------


class BackendSampler(threading.Thread):
    """Counts this test's server backends until stopped; keeps the maximum seen."""

    def __init__(self, admin_dsn: str, app_name: str) -> None:
        super().__init__(daemon=True)
        self.admin_dsn, self.app_name = admin_dsn, app_name
        self.stop_event = threading.Event()
        self.max_seen = self.samples = 0

    def run(self) -> None:
        query = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND application_name = %s"
        )
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self.stop_event.is_set():
                row = conn.execute(query, (self.app_name,)).fetchone()
                assert row is not None
                self.max_seen = max(self.max_seen, int(row[0]))
                self.samples += 1


@pytest.mark.anyio
async def test_200_concurrent_requests_never_exceed_max_size(
    table: str, app_dsn: str, app_name: str, admin_dsn: str
) -> None:
    sampler = BackendSampler(admin_dsn, app_name)
    async with serve(build_app(lifespan_for(app_dsn, min_size=1, max_size=4))) as (client, state):
        sampler.start()
        try:
            params: dict[str, str | float] = {"t": app_name, "s": 0.01}
            responses = await asyncio.gather(
                *(client.get("/async/sleep", params=params) for _ in range(200))
            )
        finally:
            sampler.stop_event.set()
            await anyio.to_thread.run_sync(sampler.join)
        assert [r.status_code for r in responses] == [200] * 200
        stats = get_pools(state).get().stats()
        assert stats["in_use"] == 0 and stats["waiting"] == 0
        assert stats["size"] <= 4
        assert stats["wait_time"]["max"] > 0, "no request queued: the test proves nothing"
    assert sampler.samples > 0
    assert 1 <= sampler.max_seen <= 4
    assert rows(app_dsn, app_name) == 200


# ---- 4. Exhaustion: 503 + Retry-After -----------------------------------------------------------


@pytest.mark.anyio
async def test_pool_timeout_is_503_with_retry_after(
    table: str, app_dsn: str, app_name: str
) -> None:
    hooks = Hooks()
    cfg = PoolConfig.from_url(app_dsn, min_size=1, max_size=1, timeout=0.2)
    app = build_app(PoolLifespan(cfg, retry_after=7), hooks)
    async with serve(app) as (client, state):
        holder = asyncio.ensure_future(client.get("/async/hold", params={"t": app_name}))
        await until(lambda: hooks.held == 1, "the holder to borrow")
        r = await client.post("/async/items", params={"t": app_name})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        assert r.json()["detail"]["reason"] == "timeout"
        assert r.json()["detail"]["pool"] == "default"
        hooks.release.set()
        assert (await holder).status_code == 200
        assert get_pools(state).get().stats()["timeouts"] == 1
    assert rows(app_dsn, app_name) == 1


@pytest.mark.anyio
async def test_max_waiting_is_503_with_retry_after(table: str, app_dsn: str, app_name: str) -> None:
    hooks = Hooks()
    cfg = PoolConfig.from_url(app_dsn, min_size=1, max_size=1, timeout=30, max_waiting=1)
    app = build_app(PoolLifespan(cfg), hooks)
    async with serve(app) as (client, state):
        pool = get_pools(state).get()
        holder = asyncio.ensure_future(client.get("/async/hold", params={"t": app_name}))
        await until(lambda: hooks.held == 1, "the holder to borrow")
        queued = asyncio.ensure_future(client.post("/async/items", params={"t": app_name}))
        await until(lambda: pool.stats()["waiting"] == 1, "a request to queue")
        r = await client.post("/async/items", params={"t": app_name})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["detail"]["reason"] == "queue_full"
        hooks.release.set()
        assert (await holder).status_code == 200
        assert (await queued).status_code == 201
    assert rows(app_dsn, app_name) == 2


# ---- 5. Shutdown with requests in flight --------------------------------------------------------


@pytest.mark.anyio
async def test_lifespan_shutdown_drains_requests_in_flight(
    table: str, app_dsn: str, app_name: str, admin_dsn: str
) -> None:
    hooks = Hooks()
    app = build_app(lifespan_for(app_dsn, min_size=2, max_size=2), hooks)
    manager = LifespanManager(app, startup_timeout=30, shutdown_timeout=60)
    await manager.__aenter__()
    transport = httpx.ASGITransport(manager.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        pool = get_pools(manager._state).get()
        held = [
            asyncio.ensure_future(client.get("/async/hold", params={"t": app_name}))
            for _ in range(2)
        ]
        await until(lambda: hooks.held == 2, "two requests to hold connections")
        shutdown = asyncio.ensure_future(manager.__aexit__(None, None, None))
        await until(lambda: pool._draining, "the drain to start")
        # Draining: new borrows are refused with a 503, borrowed connections stay.
        r = await client.post("/async/items", params={"t": app_name})
        assert r.status_code == 503 and r.json()["detail"]["reason"] == "closing"
        assert not shutdown.done()
        assert await anyio.to_thread.run_sync(backend_count, admin_dsn, app_name) == 2
        hooks.release.set()
        assert [(await h).status_code for h in held] == [200, 200]
        await shutdown
    assert pool.closed
    await until_db(lambda: backend_count(admin_dsn, app_name) == 0, "backends to go")
    assert rows(app_dsn, app_name) == 2


def _subprocess_env(dsn: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_")}
    env.update(settings, DATABASE_URL=dsn, PYTHONPATH=str(ROOT))
    return env


@pytest.fixture
def uvicorn_server(
    tmp_path: Path, app_dsn: str
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**settings: str) -> tuple[subprocess.Popen[bytes], str]:
        sock = str(tmp_path / "app.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "tests.test_fastapi:uvicorn_app",
             "--uds", sock, "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=_subprocess_env(app_dsn, **settings),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        return proc, sock

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(30):
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_uvicorn_sigterm_completes_requests_in_flight_then_closes(
    table: str,
    app_dsn: str,
    app_name: str,
    admin_dsn: str,
    uvicorn_server: Callable[..., tuple[subprocess.Popen[bytes], str]],
) -> None:
    proc, sock = uvicorn_server(POOLKIT_MIN_SIZE="1", POOLKIT_MAX_SIZE="4")
    transport = httpx.AsyncHTTPTransport(uds=sock)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
        await _wait_ready(client, proc)
        # A commit failure over a real socket: 5xx, nothing written.
        r = await client.post("/async/items", params={"t": app_name, "parent": -1})
        assert r.status_code == 500
        params: dict[str, str | float] = {"t": app_name, "s": 1.0}
        flying = [
            asyncio.ensure_future(client.get("/async/sleep", params=params)) for _ in range(4)
        ]
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'"
        )

        def sleeping() -> bool:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                row = conn.execute(query, (app_name,)).fetchone()
            return row is not None and row[0] == 4

        await until_db(sleeping, "four requests in flight")
        proc.send_signal(signal.SIGTERM)
        assert [(await f).status_code for f in flying] == [200] * 4
    code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=30))
    output = proc.stdout.read().decode() if proc.stdout else ""
    # uvicorn re-raises the signal once its graceful shutdown is over.
    assert code in (0, -signal.SIGTERM), output
    assert output.count("Traceback") == 1, output  # the failed commit's log, nothing else
    assert backend_count(admin_dsn, app_name) == 0
    assert rows(app_dsn, app_name) == 4


# ---- 6. def and async def routes in one app -----------------------------------------------------


@pytest.mark.anyio
async def test_def_and_async_routes_share_one_app(table: str, app_dsn: str, app_name: str) -> None:
    lifespan = PoolLifespan(
        app_dsn, sync_pools=PoolConfig.from_url(app_dsn, min_size=1, max_size=2)
    )
    async with serve(build_app(lifespan)) as (client, state):
        a, s = await asyncio.gather(
            client.post("/async/items", params={"t": app_name}),
            client.post("/sync/items", params={"t": app_name}),
        )
        assert (a.status_code, s.status_code) == (201, 201)
        assert a.json()["conn"] == "AsyncConnection"
        assert s.json()["conn"] == "Connection"
        pools = get_pools(state)
        assert pools.get().name == "default"
        assert pools.get_sync().name == "default-sync"
        assert set(pools.by_name()) == {"default", "default-sync"}
    assert rows(app_dsn, app_name) == 2


# ---- 7. Wiring mistakes say how to fix them -----------------------------------------------------


@pytest.mark.anyio
async def test_missing_lifespan_says_how_to_wire_it() -> None:
    transport = httpx.ASGITransport(build_app(None))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(WiringError) as err:
            await client.post("/async/items", params={"t": "x"})
    message = str(err.value)
    assert "FastAPI(lifespan=PoolLifespan(" in message
    assert "yield {**state" in message


@pytest.mark.anyio
async def test_unknown_pool_name_lists_the_configured_ones(app_dsn: str) -> None:
    async with serve(build_app(PoolLifespan(app_dsn)), raise_app_exceptions=True) as (client, _):
        with pytest.raises(WiringError, match=r"no async pool named 'replica'.*\['default'\]"):
            await client.get("/replica/who")
        with pytest.raises(WiringError, match=r"no sync pool named 'default'.*sync_pools="):
            await client.post("/sync/items", params={"t": "x"})


@pytest.mark.anyio
async def test_unreachable_database_fails_startup_clearly(proxy: TcpProxy, proxy_dsn: str) -> None:
    proxy.stop()
    app = build_app(PoolLifespan(proxy_dsn, open_timeout=0.5))
    with pytest.raises(PoolStartupError) as err:
        async with LifespanManager(app, startup_timeout=30):
            pass
    message = str(err.value)
    assert "could not open pool 'default' within 0.5 s" in message
    assert f"127.0.0.1:{proxy.port}" in message
    assert "refused" in message.lower()
    assert "POOLKIT_OPEN_TIMEOUT" in message
    password = psycopg.conninfo.conninfo_to_dict(proxy_dsn).get("password")
    assert password and str(password) not in message


def test_bad_lifespan_arguments_are_config_errors(app_dsn: str) -> None:
    from poolkit import ConfigError

    with pytest.raises(ConfigError, match="retry_after"):
        PoolLifespan(app_dsn, retry_after=-1)
    with pytest.raises(ConfigError, match=r"pools\[''\]"):
        PoolLifespan({"": app_dsn})


@pytest.mark.anyio
async def test_duplicate_pool_names_fail_startup(app_dsn: str) -> None:
    from poolkit import ConfigError

    cfg = PoolConfig.from_url(app_dsn, name="same")
    app = build_app(PoolLifespan({"a": cfg, "b": cfg}))
    with pytest.raises(ConfigError, match="distinct name"):
        async with LifespanManager(app):
            pass


# ---- Configuration sources, named pools, composition --------------------------------------------


@pytest.mark.anyio
async def test_default_config_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, app_dsn: str
) -> None:
    for var in list(os.environ):
        if var.startswith("POOLKIT_") and not var.startswith("POOLKIT_TEST_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("DATABASE_URL", app_dsn)
    monkeypatch.setenv("POOLKIT_MAX_SIZE", "3")
    monkeypatch.setenv("POOLKIT_MIN_SIZE", "1")
    async with serve(build_app(PoolLifespan())) as (client, state):
        pool = get_pools(state).get()
        assert (pool.name, pool.max_size, pool.min_size) == ("default", 3, 1)
        assert (await client.get("/ready")).status_code == 200


@pytest.mark.anyio
async def test_named_pools_and_a_pool_factory(app_dsn: str, app_name: str) -> None:
    replica_app = app_name[:55] + "-replica"

    def replica() -> AsyncPool[Any]:
        cfg = PoolConfig.from_url(app_dsn, application_name=replica_app, min_size=1)
        return AsyncPool(config=cfg, name="replica", open=False)

    lifespan = PoolLifespan({"default": app_dsn, "replica": replica})
    async with serve(build_app(lifespan)) as (client, state):
        r = await client.get("/replica/who")
        assert r.json() == {"application_name": replica_app, "pool": "replica"}
        assert set(get_pools(state).by_name()) == {"default", "replica"}


@pytest.mark.anyio
async def test_composes_with_the_apps_own_lifespan(table: str, app_dsn: str, app_name: str) -> None:
    pools_lifespan = PoolLifespan(app_dsn)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with pools_lifespan(app) as state:
            async with get_pools(state).get().connection() as conn:  # startup work on the pool
                await conn.execute(INSERT, (app_name, "startup", None))
            events.append("started")
            yield {**state, "greeting": "hello"}
            events.append("stopping")

    app = build_app(None)
    app.router.lifespan_context = lifespan

    @app.get("/greeting")
    async def greeting(request: Request, conn: Conn) -> dict[str, Any]:
        return {"greeting": request.state.greeting}

    async with serve(app) as (client, _):
        assert (await client.get("/greeting")).json() == {"greeting": "hello"}
    assert events == ["started", "stopping"]
    assert rows(app_dsn, app_name) == 1


@pytest.mark.anyio
async def test_route_and_sub_dependency_share_one_connection(app_dsn: str) -> None:
    async with serve(build_app(PoolLifespan(app_dsn))) as (client, _):
        assert (await client.get("/async/shared")).json() == {"same": True}


# ---- Streaming ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_conn_is_held_until_the_stream_ends(app_dsn: str) -> None:
    async with serve(build_app(PoolLifespan(app_dsn))) as (client, state):
        r = await client.get("/async/stream", params={"n": 50})
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert [line["g"] for line in lines] == list(range(1, 51))
        assert {line["in_use"] for line in lines} == {1}
        await until(lambda: get_pools(state).get().stats()["in_use"] == 0, "the return")
        # With Conn the connection is already back when the body is streamed.
        r = await client.get("/async/stream-with-conn")
        assert json.loads(r.text) == {"in_use": 0}


async def _get_then_disconnect(app: Any, state: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """GET `path` as a client that goes away once the first chunk of the body arrives
    (httpx's ASGITransport always reads the whole body); returns what the app sent."""
    sent: list[dict[str, Any]] = []
    first_chunk = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"app")], "client": ("127.0.0.1", 1),
        "server": ("app", 80), "state": dict(state),
    }  # fmt: skip
    with anyio.fail_after(20):
        await app(scope, receive, send)
    return sent


@pytest.mark.anyio
# The route's own server cursor: the disconnect interrupted its close(), psycopg warns.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ServerCursorMixin.__del__:pytest.PytestUnraisableExceptionWarning"
)
async def test_client_disconnecting_mid_stream_is_a_quiet_rollback(
    app_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The docs' StreamConn example, its client gone mid-stream: the interrupted query can
    leave the connection closed; nothing is left to answer, so no error and no exception
    after the response started (uvicorn: "Caught handled exception, but response already
    started")."""
    app = FastAPI(lifespan=lifespan_for(app_dsn))

    @app.get("/export")
    async def export(conn: StreamConn) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            async with conn.cursor("export") as cur:
                await cur.execute("SELECT g FROM generate_series(1, 100000) g")
                async for row in cur:
                    await asyncio.sleep(0.001)
                    yield f"{row[0]}\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    caplog.set_level(logging.INFO, logger="poolkit")
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        pool = get_pools(manager._state).get()
        for _ in range(3):
            sent = await _get_then_disconnect(manager.app, manager._state, "/export")
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
            await until(lambda: pool.stats()["in_use"] == 0, "the connection to come back")
        async with pool.connection() as conn:  # the pool still lends working connections
            await conn.execute("SELECT 1")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ---- Readiness and metrics ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_ready_follows_the_database(proxy: TcpProxy, proxy_dsn: str) -> None:
    cfg = PoolConfig.from_url(proxy_dsn, min_size=1, max_size=2, timeout=0.5)
    async with serve(build_app(PoolLifespan(cfg))) as (client, _):
        r = await client.get("/ready")
        assert r.status_code == 200, r.text
        assert r.json()["pools"]["default"]["ok"] is True
        proxy.stop()
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        entry = r.json()["pools"]["default"]
        assert entry["ok"] is False and entry["error"]
        proxy.start()
        with anyio.fail_after(15):
            while (await client.get("/ready")).status_code != 200:
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_metrics_report_pools_and_hold_time_per_route(
    table: str, app_dsn: str, app_name: str
) -> None:
    lifespan = PoolLifespan(app_dsn, sync_pools=app_dsn)
    async with serve(build_app(lifespan)) as (client, state):
        for kind in ("async", "sync"):
            assert (await client.post(f"/{kind}/items", params={"t": app_name})).status_code == 201
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert 'db_client_connection_count{pool_name="default",state="idle"}' in text
        assert 'db_client_connection_count{pool_name="default-sync",state="used"}' in text
        assert (
            'poolkit_hold_time_seconds_count{pool_name="default",route="POST /async/items"} 1.0'
            in text
        )
        assert 'route="POST /sync/items"' in text
        assert set(get_pools(state).get().hold_time_by_tag()) >= {"POST /async/items"}


# ---- The dashboard ------------------------------------------------------------------------------


def _dashboard_app(lifespan: PoolLifespan, **options: Any) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.include_router(pool_router(**options))

    @app.get("/work")
    async def work(conn: Conn) -> dict[str, Any]:
        await conn.execute("SELECT 1")
        return {}

    return app


@pytest.mark.anyio
async def test_dashboard_is_off_by_default(app_dsn: str) -> None:
    async with serve(_dashboard_app(lifespan_for(app_dsn))) as (client, _):
        assert (await client.get("/ready")).status_code == 200
        for path in ("/_poolkit/", "/_poolkit/data"):
            assert (await client.get(path)).status_code == 404, path


@pytest.mark.anyio
async def test_dashboard_page_and_data_match_stats(app_dsn: str, dsn: str) -> None:
    password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    assert password, "the test server must use a password, or the masking check proves nothing"
    lifespan = PoolLifespan(app_dsn, sync_pools=app_dsn)
    async with serve(_dashboard_app(lifespan, dashboard=True)) as (client, state):
        assert (await client.get("/work")).status_code == 200
        page = await client.get("/_poolkit/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<canvas" in page.text and password not in page.text
        r = await client.get("/_poolkit/data")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert password not in r.text
        pools = get_pools(state).by_name()
        items = {item["key"]: item for item in r.json()["pools"]}
        assert set(items) == set(pools) == {"default", "default-sync"}
        for name, pool in pools.items():
            assert set(items[name]["stats"]) == set(pool.stats()), name
            assert "***" in items[name]["conninfo"]
        assert items["default"]["stats"]["borrows"] == pools["default"].stats()["borrows"] >= 1
        assert items["default"]["history"]["t"], "each snapshot samples the history"
        # Operator pages stay out of the API's schema.
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert not [p for p in paths if p.startswith("/_poolkit")]


async def require_operator(request: Request) -> None:
    if request.headers.get("x-operator") != "yes":
        raise HTTPException(403, "operators only")


@pytest.mark.anyio
async def test_dashboard_dependencies_guard_it(app_dsn: str) -> None:
    app = _dashboard_app(
        lifespan_for(app_dsn),
        dashboard=True,
        dashboard_prefix="/ops/pool/",
        dashboard_dependencies=[Depends(require_operator)],
    )
    async with serve(app) as (client, _):
        for path in ("/ops/pool/", "/ops/pool/data"):
            assert (await client.get(path)).status_code == 403, path
            r = await client.get(path, headers={"X-Operator": "yes"})
            assert r.status_code == 200, (path, r.text)
        assert (await client.get("/ready")).status_code == 200  # the guard is the dashboard's


def test_the_exit_stack_internals_the_leases_rely_on() -> None:
    """_deps._end_last() puts the request's commit under every function-scope exit callback
    through AsyncExitStack's `_exit_callbacks` (no public way exists); without it the
    commit silently moves back to its own place, before a later cleanup that may refuse
    the request. Loud here instead."""
    import collections
    import contextlib

    stack = contextlib.AsyncExitStack()
    callbacks = getattr(stack, "_exit_callbacks", None)
    assert isinstance(callbacks, collections.deque), "AsyncExitStack internals changed"
    stack.push_async_exit(lambda *exc: None)  # type: ignore[arg-type, return-value]
    assert callbacks[-1][0] is False, "AsyncExitStack's (is_sync, callback) entries changed"
