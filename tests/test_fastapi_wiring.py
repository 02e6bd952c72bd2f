"""poolkit_fastapi wiring that cannot go wrong: one connection per pool per request, generator
endpoints, borrow sites attributed to the endpoint; against a real server and real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from psycopg import AsyncConnection, Connection
from pydantic import BaseModel, Field

from poolkit import PoolConfig
from poolkit_fastapi import (
    Conn,
    PoolLifespan,
    StreamConn,
    SyncConn,
    WiringError,
    conn_dependency,
    get_conn,
    get_pools,
    get_sync_conn,
    pool_router,
)
from tests.test_fastapi import Hooks, audit, serve, until

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()

_IDS = "SELECT pg_backend_pid(), pg_current_xact_id()::text"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def one_conn(dsn: str, **settings: Any) -> PoolConfig:
    """A pool of exactly one connection: a second borrow in the same request would deadlock."""
    settings.setdefault("timeout", 2.0)
    return PoolConfig.from_url(dsn, min_size=1, max_size=1, **settings)


# Module level so FastAPI resolves the annotations; each asks for the default pool its own way.
async def bare_get_conn(
    conn: Annotated[AsyncConnection[Any], Depends(get_conn)],
) -> AsyncConnection[Any]:
    return conn


async def uncached_conn(
    conn: Annotated[AsyncConnection[Any], Depends(get_conn, use_cache=False)],
) -> AsyncConnection[Any]:
    return conn


def bare_get_sync_conn(
    conn: Annotated[Connection[Any], Depends(get_sync_conn)],
) -> Connection[Any]:
    return conn


async def _ids(conn: AsyncConnection[Any]) -> list[str]:
    row = await (await conn.execute(_IDS)).fetchone()
    assert row is not None
    return [str(row[0]), str(row[1])]


def _sync_ids(conn: Connection[Any]) -> list[str]:
    row = conn.execute(_IDS).fetchone()
    assert row is not None
    return [str(row[0]), str(row[1])]


def sharing_app(lifespan: PoolLifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.get("/conn-and-bare")
    async def conn_and_bare(
        conn: Conn, other: Annotated[AsyncConnection[Any], Depends(get_conn)]
    ) -> dict[str, Any]:
        return {"same": conn is other, "ids": [await _ids(conn), await _ids(other)]}

    @app.get("/conn-and-sub-dependency")
    async def conn_and_sub(
        conn: Conn,
        bare: Annotated[AsyncConnection[Any], Depends(bare_get_conn)],
        uncached: Annotated[AsyncConnection[Any], Depends(uncached_conn)],
        spelled: Annotated[AsyncConnection[Any], conn_dependency()],
    ) -> dict[str, Any]:
        conns = [conn, bare, uncached, spelled]
        return {"same": all(c is conn for c in conns), "ids": [await _ids(c) for c in conns]}

    @app.get("/conn-and-stream")
    async def conn_and_stream(conn: Conn, stream: StreamConn) -> dict[str, Any]:
        return {"same": conn is stream, "ids": [await _ids(conn), await _ids(stream)]}

    @app.get("/stream-and-conn")
    async def stream_and_conn(stream: StreamConn, conn: Conn) -> dict[str, Any]:
        return {"same": conn is stream, "ids": [await _ids(stream), await _ids(conn)]}

    @app.get("/auth-then-stream")
    async def auth_then_stream(
        user: Annotated[AsyncConnection[Any], Depends(audit)], stream: StreamConn
    ) -> StreamingResponse:
        # The realistic shape: an auth sub-dependency on Conn, the route streaming.
        async def body() -> AsyncIterator[str]:
            ids = [await _ids(user), await _ids(stream)]
            yield json.dumps({"same": user is stream, "ids": ids})

        return StreamingResponse(body(), media_type="application/json")

    @app.get("/sync-and-sync-stream")
    def sync_and_sync_stream(
        conn: SyncConn, stream: Annotated[Connection[Any], conn_dependency(sync=True, stream=True)]
    ) -> dict[str, Any]:
        return {"same": conn is stream, "ids": [_sync_ids(conn), _sync_ids(stream)]}

    @app.get("/sync-and-bare")
    def sync_and_bare(
        conn: SyncConn, other: Annotated[Connection[Any], Depends(bare_get_sync_conn)]
    ) -> dict[str, Any]:
        return {"same": conn is other, "ids": [_sync_ids(conn), _sync_ids(other)]}

    return app


# ---- One connection and one transaction per pool per request ------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "/conn-and-bare",
        "/conn-and-sub-dependency",
        "/sync-and-bare",
        "/conn-and-stream",
        "/stream-and-conn",
        "/auth-then-stream",
        "/sync-and-sync-stream",
    ],
)
async def test_every_spelling_shares_one_connection_and_one_transaction(
    path: str, app_dsn: str
) -> None:
    cfg = one_conn(app_dsn)
    lifespan = PoolLifespan(cfg, sync_pools=cfg.replace(name="default-sync"))
    async with serve(sharing_app(lifespan)) as (client, state):
        # max_size=1: a second borrow would wait for the first and time out (503).
        r = await client.get(path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["same"] is True
        pids = {pid for pid, _ in body["ids"]}
        xacts = {xact for _, xact in body["ids"]}
        assert len(pids) == 1 and len(xacts) == 1, body
        for _, pool in get_pools(state).items():
            assert pool.stats()["in_use"] == 0
            assert pool.stats()["timeouts"] == 0


def thread_app(lifespan: PoolLifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.get("/owner")
    def owner(conn: SyncConn, request: Request) -> dict[str, Any]:
        (borrow,) = get_pools(request).get_sync().borrowed()
        return {"owner": borrow.owner, "me": f"thread {threading.current_thread().name!r}"}

    @app.get("/inline")
    def inline(request: Request) -> dict[str, Any]:
        with get_pools(request).get_sync().connection() as conn:
            conn.execute("SELECT 1")
        return {"owner": "", "me": ""}

    @app.get("/fail-after-write")
    def fail_after_write(conn: SyncConn, other: SyncConn, t: str) -> dict[str, Any]:
        assert conn is other
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS pk_w (t text)")
        raise HTTPException(409, "refused after writing")

    return app


@pytest.mark.anyio
async def test_def_route_borrows_and_commits_in_its_own_thread(
    app_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route's worker thread borrows, runs the route, serializes its answer as FastAPI
    would and, that done, commits: one hop where an inline `with pool.connection()` takes
    two (FastAPI validates a `def` route's answer in a thread of its own). A commit after
    FastAPI's own serialization took a hop more than inline, with the connection held
    meanwhile: 0.7x the inline route's throughput."""
    hops = 0
    run_sync = anyio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)

    cfg = one_conn(app_dsn)
    async with serve(thread_app(PoolLifespan(sync_pools=cfg))) as (client, state):
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        await client.get("/inline")
        inline_hops, hops = hops, 0  # FastAPI validates a `def` route's answer in a thread too
        for n in range(1, 4):
            body = (await client.get("/owner")).json()
            assert body["owner"] == body["me"]
            assert inline_hops == 2
            assert hops == n * (inline_hops - 1)
        monkeypatch.undo()
        r = await client.get("/fail-after-write", params={"t": "x"})
        assert r.status_code == 409
        pool = get_pools(state).get_sync()
        assert pool.stats()["in_use"] == 0
        with pool.connection() as conn:  # rolled back: the temp table is gone
            assert conn.execute("SELECT to_regclass('pk_w')").fetchone() == (None,)


def _real_repo() -> str:
    return "real"


@pytest.mark.anyio
async def test_an_override_that_takes_sync_conn_gets_the_requests_connection(
    app_dsn: str,
) -> None:
    """A test's `app.dependency_overrides` may replace a dependency the fast path did not
    see with one that takes SyncConn itself: it gets the request's connection, the same
    one the route gets (not the route wrapper's placeholder), and one commit covers both."""
    app = FastAPI(lifespan=PoolLifespan(sync_pools=one_conn(app_dsn)))

    @app.post("/write")
    def write(conn: SyncConn, repo: Annotated[str, Depends(_real_repo)]) -> dict[str, Any]:
        conn.execute("INSERT INTO pk_override VALUES (%s)", (repo,))
        return {"pid": conn.info.backend_pid}

    def fake_repo(conn: SyncConn) -> str:
        conn.execute("INSERT INTO pk_override VALUES ('fake')")
        return f"fake {conn.info.backend_pid}"

    async with serve(app, raise_app_exceptions=True) as (client, state):
        pool = get_pools(state).get_sync()
        with pool.connection() as conn:
            conn.execute("DROP TABLE IF EXISTS pk_override")
            conn.execute("CREATE TABLE pk_override (who text)")
        app.dependency_overrides[_real_repo] = fake_repo
        try:
            r = await client.post("/write")
        finally:
            app.dependency_overrides.clear()
        assert r.status_code == 200, r.text
        with pool.connection() as conn:
            rows = conn.execute("SELECT who FROM pk_override ORDER BY who").fetchall()
        assert rows == [("fake",), (f"fake {r.json()['pid']}",)]  # one connection, committed
        assert pool.stats()["in_use"] == 0
        # Without the override, the fast path is back.
        r = await client.post("/write")
        assert r.status_code == 200, r.text
        with pool.connection() as conn:
            conn.execute("DROP TABLE pk_override")


@pytest.mark.anyio
async def test_each_route_is_inspected_once(app_dsn: str) -> None:
    """The endpoint's site, kind and tag are worked out on the first request only (routes
    cannot key a dict: Starlette's Route defines __eq__ without __hash__)."""
    from poolkit_fastapi._lease import endpoint_of

    app = sharing_app(PoolLifespan(one_conn(app_dsn)))
    seen: list[Any] = []

    @app.get("/seen")
    async def see(conn: Conn, request: Request) -> dict[str, bool]:
        seen.append(endpoint_of(request.scope))
        return {"ok": True}

    async with serve(app) as (client, _):
        for _ in range(3):
            assert (await client.get("/seen")).status_code == 200
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]


class Out(BaseModel):
    n: int


def sync_user(conn: SyncConn) -> str:
    """A sub-dependency asking for SyncConn: its route takes the general path."""
    return "u"


def unserializable_app(lifespan: PoolLifespan, release: threading.Event) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.post("/fast", response_model=Out)
    def fast(conn: SyncConn, t: str) -> Any:
        conn.execute("INSERT INTO pk_w2 VALUES (%s)", (t,))
        return {"n": "not a number"}  # fails response_model validation after the route

    @app.post("/nan")
    def nan(conn: SyncConn, t: str):  # type: ignore[no-untyped-def]  # (no response model)
        conn.execute("INSERT INTO pk_w2 VALUES (%s)", (t,))
        return {"x": float("nan")}  # valid, but JSONResponse refuses to render NaN

    @app.post("/general", response_model=Out)
    def general(u: Annotated[str, Depends(sync_user)], conn: SyncConn, t: str) -> Any:
        conn.execute("INSERT INTO pk_w2 VALUES (%s)", (t,))
        return {"n": "not a number"}

    @app.post("/held")
    def held(conn: SyncConn, t: str) -> dict[str, bool]:
        conn.execute("INSERT INTO pk_w2 VALUES (%s)", (t,))
        release.wait(10)
        return {"ok": True}

    return app


def _written(dsn: str, t: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pk_w2 WHERE t = %s", (t,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/fast", "/nan", "/general"])
async def test_def_route_answer_failing_validation_writes_nothing(
    path: str, dsn: str, app_dsn: str, app_name: str
) -> None:
    """FastAPI validates a route's answer after the route returned: a 500 from that must
    roll back, on the fast path (SyncConn a parameter of the route only) as elsewhere."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS pk_w2 (t text)")
    app = unserializable_app(PoolLifespan(sync_pools=one_conn(app_dsn)), threading.Event())
    async with serve(app) as (client, state):
        r = await client.post(path, params={"t": app_name})
        assert r.status_code == 500
        route: Any
        (route,) = [r for r in app.routes if getattr(r, "path", "") == path]
        fast = route.dependant.call is not route.endpoint
        assert fast is (path != "/general")  # the fast path wraps the endpoint's call
        assert get_pools(state).get_sync().stats()["in_use"] == 0
    assert _written(app_dsn, app_name) == 0


def test_answer_preflight_understands_this_fastapi() -> None:
    """The fast path commits in the route's thread only after serializing the answer as
    FastAPI would (fastapi.routing.serialize_response and the route's response_model_*
    settings, read in _preflight.py). If FastAPI changes them, every `def` route silently
    loses its in-thread commit: fail loudly here instead."""
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.responses import Response

    from poolkit_fastapi._preflight import preflight_for

    app = FastAPI()

    @app.get("/model", response_model=Out)
    def model() -> Any:
        return {"n": 1}

    @app.get("/plain")
    def plain():  # type: ignore[no-untyped-def]
        return {"x": 1}

    @app.get("/html", response_class=HTMLResponse)
    def html() -> str:
        return "<p>"

    routes = {getattr(r, "path", ""): r for r in app.routes}
    check = preflight_for(routes["/model"])
    assert check is not None
    ok, answer = check({"n": 1})
    assert ok and isinstance(answer, Response) and answer.body == b'{"n":1}'
    assert check({"n": "not a number"}) == (False, {"n": "not a number"})
    mine = JSONResponse({"n": "anything"})
    assert check(mine) == (True, mine)  # sent as returned
    check = preflight_for(routes["/plain"])
    assert check is not None
    assert check({"x": 1})[0] is True
    assert check({"x": float("nan")})[0] is False  # JSONResponse refuses NaN when rendering
    assert preflight_for(routes["/html"]) is None  # a class of its own: commit deferred


class Maybe(BaseModel):
    n: int
    note: str | None = None
    item_id: int = Field(0, alias="itemId")


def _no_conn() -> None:
    return None


def _tell(background: BackgroundTasks, request: Request) -> None:
    background.add_task(request.app.state.told.append, request.url.path)


def same_answer_app(lifespan: PoolLifespan) -> FastAPI:
    """Each shape twice: on the fast path (SyncConn) and on FastAPI's own (no connection)."""
    app = FastAPI(lifespan=lifespan)
    app.state.told = []

    def take(conn: Any) -> None:
        if conn is not None:
            conn.execute("SELECT 1")

    def register(prefix: str, fast: bool) -> None:
        # (set as objects: this module's annotations are strings FastAPI could not resolve)
        conn_type = SyncConn if fast else Annotated[None, Depends(_no_conn)]

        def get(path: str, **kw: Any) -> Callable[[Any], Any]:
            def deco(fn: Any) -> Any:
                fn.__annotations__["conn"] = conn_type
                return app.api_route(prefix + path, **kw)(fn)

            return deco

        @get(
            "/model",
            methods=["GET", "HEAD"],
            response_model=Maybe,
            response_model_exclude_none=True,
        )
        def model(conn: Any) -> Any:
            take(conn)
            return {"n": 1, "note": None, "itemId": 2}

        @get("/created", methods=["POST"], status_code=201)
        def created(conn: Any) -> dict[str, int]:
            take(conn)
            return {"n": 1}

        @get("/gone", methods=["DELETE"], status_code=204)
        def gone(conn: Any) -> None:
            take(conn)

        @get("/plain")
        def plain(conn: Any):  # type: ignore[no-untyped-def]
            take(conn)
            return [{"a": "é"}, None, 1.5]

        @get("/header")
        def header(response: Response, conn: Any) -> dict[str, int]:
            take(conn)
            response.headers["x-set"] = "1"
            response.status_code = 202
            return {"n": 1}

        @get("/later", dependencies=[Depends(_tell)])
        def later(conn: Any) -> dict[str, int]:
            take(conn)
            return {"n": 1}

        @get("/lazy", response_model=list[int])
        def lazy(response: Response, conn: Any) -> Any:
            take(conn)
            response.headers["x-set"] = "1"  # so FastAPI builds the answer, from the value
            return (n for n in (1, 2, 3))  # one pass only: the pre-flight must not take it

    register("/fast", True)
    register("/own", False)
    return app


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/model"), ("POST", "/created"), ("DELETE", "/gone"), ("GET", "/plain"),
     ("GET", "/header"), ("GET", "/later"), ("HEAD", "/model"), ("GET", "/lazy")],
)  # fmt: skip
async def test_fast_path_answers_exactly_as_fastapi_does(
    app_dsn: str, method: str, path: str
) -> None:
    """The fast path builds the answer in the route's thread (so it can commit there): the
    status, headers and body must be FastAPI's own, background tasks included."""
    app = same_answer_app(PoolLifespan(sync_pools=one_conn(app_dsn)))
    async with serve(app) as (client, state):
        fast = await client.request(method, "/fast" + path)
        own = await client.request(method, "/own" + path)
        assert get_pools(state).get_sync().stats()["in_use"] == 0
        wrapped = {
            r.path: r.dependant.call is not r.endpoint
            for r in app.routes
            if isinstance(r, APIRoute) and r.path.endswith(path)
        }
        assert wrapped == {"/fast" + path: True, "/own" + path: False}
    assert (fast.status_code, fast.content) == (own.status_code, own.content)
    assert dict(fast.headers) == dict(own.headers)
    if path == "/later":
        assert app.state.told == ["/fast/later", "/own/later"]


@pytest.mark.anyio
async def test_def_route_cancelled_while_running_writes_nothing(
    dsn: str, app_dsn: str, app_name: str
) -> None:
    """What uvicorn's --timeout-graceful-shutdown does: the request is cancelled while the
    route's thread runs; the thread finishes, but the client got no answer: no commit."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS pk_w2 (t text)")
    release = threading.Event()
    lifespan = PoolLifespan(sync_pools=one_conn(app_dsn))
    async with serve(unserializable_app(lifespan, release)) as (client, state):
        pool = get_pools(state).get_sync()
        request = asyncio.ensure_future(client.post("/held", params={"t": app_name}))
        await until(lambda: pool.stats()["in_use"] == 1, "the route to borrow")
        request.cancel()
        await asyncio.sleep(0.05)  # the cancellation waits for the route's thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(lambda: pool.stats()["in_use"] == 0, "the connection to come back")
    assert _written(app_dsn, app_name) == 0


def _teardown_fails() -> Iterator[None]:
    yield
    raise RuntimeError("a function-scoped dependency failed after the route returned")


class _FailsAfterRoute(APIRoute):
    """A route class whose handler fails once FastAPI's own handler returned its response."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def failing(request: Request) -> Response:
            await handler(request)
            raise RuntimeError("the route class's handler failed after the route")

        return failing


def late_failure_app(lifespan: PoolLifespan) -> FastAPI:
    """Routes on the fast path that FastAPI answers 500 only after the route returned."""
    app = FastAPI(lifespan=lifespan)
    app.state.in_thread = []

    def write(conn: Connection[Any], t: str, request: Request) -> None:
        (borrow,) = get_pools(request).get_sync().borrowed()  # by the route's own thread?
        app.state.in_thread.append(borrow.owner == f"thread {threading.current_thread().name!r}")
        conn.execute("INSERT INTO pk_w2 VALUES (%s)", (t,))

    @app.post("/teardown")
    def teardown(
        conn: SyncConn,
        t: str,
        request: Request,
        _: Annotated[None, Depends(_teardown_fails, scope="function")],
    ) -> dict[str, int]:
        write(conn, t, request)
        return {"n": 1}

    router = APIRouter(route_class=_FailsAfterRoute)

    @router.post("/handler")
    def handler(conn: SyncConn, t: str, request: Request) -> dict[str, int]:
        write(conn, t, request)
        return {"n": 1}

    app.include_router(router)

    @app.post("/lazy-invalid", response_model=list[Out])
    def lazy_invalid(conn: SyncConn, t: str, request: Request) -> Any:
        write(conn, t, request)
        return (row for row in [{"n": 1}, {"n": "not a number"}])  # consumed by validation

    @app.post("/lazy-nan")
    def lazy_nan(conn: SyncConn, t: str, request: Request):  # type: ignore[no-untyped-def]  # (no response model)
        write(conn, t, request)
        return {"xs": (x for x in [1.0, float("nan")])}  # JSONResponse refuses the NaN

    @app.post("/other-pool")
    def other_pool(conn: SyncConn, aconn: Conn, t: str, request: Request) -> dict[str, int]:
        write(conn, t, request)
        # (a deferred foreign key: this pool's commit, on the function stack, fails)
        anyio.from_thread.run(aconn.execute, "INSERT INTO pk_w3 (parent) VALUES (-1)")
        return {"n": 1}

    return app


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path", ["/teardown", "/handler", "/lazy-invalid", "/lazy-nan", "/other-pool"]
)
async def test_def_route_failing_after_it_returned_writes_nothing(
    path: str, dsn: str, app_dsn: str, app_name: str
) -> None:
    """What still runs between a `def` route's return and its response can make FastAPI
    answer 500: a function-scoped `yield` dependency's cleanup, a route class's own handler,
    another pool's commit, or FastAPI's serialization of a generator (handed to FastAPI
    after the pre-flight had used it up, it serialized as `[]`: a 200). No commit in the
    route's thread may come before them: the route commits as the general path does."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS pk_w2 (t text)")
        admin.execute(
            "CREATE TABLE IF NOT EXISTS pk_w3 (id serial PRIMARY KEY, parent int"
            " REFERENCES pk_w3 DEFERRABLE INITIALLY DEFERRED)"
        )
    lifespan = PoolLifespan(one_conn(app_dsn), sync_pools=one_conn(app_dsn))
    app = late_failure_app(lifespan)
    async with serve(app) as (client, state):
        r = await client.post(path, params={"t": app_name})
        assert r.status_code == 500
        if path == "/other-pool":
            assert r.json()["detail"]["sqlstate"] == "23503"  # the deferred foreign key
        else:
            assert r.text == "Internal Server Error"
        assert app.state.in_thread == [True]  # the fast path borrowed
        assert get_pools(state).get_sync().stats()["in_use"] == 0
    assert _written(app_dsn, app_name) == 0


# ---- Generator endpoints ------------------------------------------------------------------------


def generator_app(lifespan: PoolLifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.get("/lines", response_class=StreamingResponse)
    async def lines(conn: Conn) -> AsyncIterator[str]:
        yield "x"

    return app


def stream_app(lifespan: PoolLifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.get("/lines", response_class=StreamingResponse)
    async def lines(conn: StreamConn, request: Request) -> AsyncIterator[str]:
        pool = get_pools(request).get()
        for _ in range(3):
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            assert row is not None
            yield json.dumps({"pid": row[0], "in_use": pool.stats()["in_use"]}) + "\n"

    return app


@pytest.mark.anyio
async def test_generator_endpoint_with_conn_fails_at_startup_pointing_to_stream_conn(
    app_dsn: str,
) -> None:
    with pytest.raises(WiringError, match="StreamConn") as info:
        async with serve(generator_app(PoolLifespan(one_conn(app_dsn)))):
            pass
    assert "lines" in str(info.value) and HERE.name in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("nested", [False, True])
async def test_generator_endpoint_in_an_included_router_fails_at_startup(
    nested: bool, app_dsn: str
) -> None:
    """FastAPI 0.16x keeps an included router as one object in `app.routes`; older ones
    copy its routes: the startup check must see them either way."""
    router = APIRouter(prefix="/api")

    @router.get("/lines", response_class=StreamingResponse)
    async def lines_in_router(conn: Conn) -> AsyncIterator[str]:
        yield "x"

    app = FastAPI(lifespan=PoolLifespan(one_conn(app_dsn)))
    if nested:
        outer = APIRouter(prefix="/v1")
        outer.include_router(router)
        app.include_router(outer)
    else:
        app.include_router(router)
    with pytest.raises(WiringError, match="StreamConn") as info:
        async with serve(app):
            pass
    assert "lines_in_router" in str(info.value)


@pytest.mark.anyio
async def test_routes_of_an_included_router_use_their_full_path_and_the_def_fast_path(
    app_dsn: str,
) -> None:
    router = APIRouter(prefix="/api")

    @router.get("/sync")
    def sync_in_router(conn: SyncConn) -> dict[str, Any]:
        return {"ids": _sync_ids(conn)}

    @router.get("/async")
    async def async_in_router(conn: Conn) -> dict[str, Any]:
        return {"ids": await _ids(conn)}

    app = FastAPI(lifespan=PoolLifespan(one_conn(app_dsn), sync_pools=one_conn(app_dsn)))
    app.include_router(router)
    async with serve(app) as (client, state):
        for path in ("/api/sync", "/api/sync", "/api/async"):
            r = await client.get(path)
            assert r.status_code == 200, r.text
        pools = get_pools(state)
        assert set(pools.get_sync().hold_time_by_tag()) == {"GET /api/sync"}
        assert set(pools.get().hold_time_by_tag()) == {"GET /api/async"}


@pytest.mark.anyio
async def test_generator_endpoint_added_after_startup_fails_at_its_first_request(
    app_dsn: str,
) -> None:
    app = FastAPI(lifespan=PoolLifespan(one_conn(app_dsn)))
    async with serve(app, raise_app_exceptions=True) as (client, state):

        @app.get("/late")
        async def late(conn: Conn) -> AsyncIterator[str]:
            yield "x"

        with pytest.raises(WiringError, match="StreamConn"):
            await client.get("/late")
        assert get_pools(state).get().stats()["in_use"] == 0
        assert get_pools(state).get().stats()["borrows"] == 0


@pytest.mark.anyio
async def test_generator_endpoint_with_stream_conn_keeps_it_until_the_stream_ends(
    app_dsn: str,
) -> None:
    async with serve(stream_app(PoolLifespan(one_conn(app_dsn)))) as (client, state):
        r = await client.get("/lines")
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert len(lines) == 3 and {line["in_use"] for line in lines} == {1}
        assert len({line["pid"] for line in lines}) == 1
        await until(lambda: get_pools(state).get().stats()["in_use"] == 0, "the return")


OtherStreamConn = Annotated[AsyncConnection[Any], conn_dependency("other", stream=True)]


@pytest.mark.anyio
@pytest.mark.parametrize("level", ["app", "router", "route"])
async def test_conn_in_dependencies_list_is_allowed_next_to_a_generator_endpoint(
    level: str, app_dsn: str
) -> None:
    """`dependencies=[Depends(auth)]` values are discarded: the body cannot reach their Conn,
    which is ended before the stream as usual."""
    guard = [Depends(audit)]  # audit takes Conn (the "default" pool)
    app = FastAPI(
        lifespan=PoolLifespan({"default": one_conn(app_dsn), "other": one_conn(app_dsn)}),
        dependencies=guard if level == "app" else None,
    )
    router = APIRouter(dependencies=guard if level == "router" else None)
    route_deps = guard if level == "route" else None

    @router.get("/ticks", response_class=StreamingResponse, dependencies=route_deps)
    async def ticks() -> AsyncIterator[str]:
        yield "tick"

    @router.get("/events", response_class=StreamingResponse, dependencies=route_deps)
    async def events(conn: OtherStreamConn, request: Request) -> AsyncIterator[str]:
        yield json.dumps(
            {"ids": await _ids(conn), "in_use": get_pools(request).get().stats()["in_use"]}
        )

    app.include_router(router)
    async with serve(app, raise_app_exceptions=True) as (client, state):
        assert (await client.get("/ticks")).text == "tick"
        r = await client.get("/events")
        assert r.status_code == 200
        assert r.json()["in_use"] == 0  # audit's Conn went back before the stream
        for _, pool in get_pools(state).items():
            assert pool.stats()["in_use"] == 0
            assert pool.stats()["borrows"] >= 1


@pytest.mark.anyio
async def test_conn_the_generator_body_can_reach_through_a_dependency_is_refused(
    app_dsn: str,
) -> None:
    app = FastAPI(lifespan=PoolLifespan(one_conn(app_dsn)))

    @app.get("/lines", response_class=StreamingResponse)
    async def lines(user: Annotated[AsyncConnection[Any], Depends(audit)]) -> AsyncIterator[str]:
        yield "x"  # `user` is audit's Conn: ended before this runs

    with pytest.raises(WiringError, match="StreamConn"):
        async with serve(app):
            pass


# ---- Borrow sites are the endpoint's own file:line ----------------------------------------------


def site_app(lifespan: PoolLifespan, hooks: Hooks) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.include_router(pool_router(dashboard=True))

    @app.get("/hold")
    async def hold_here(conn: Conn) -> dict[str, bool]:
        hooks.held += 1
        await hooks.release.wait()
        return {"ok": True}

    @app.get("/quick")
    async def quick(conn: Conn) -> dict[str, bool]:
        return {"ok": True}

    return app


def _site_of(func_name: str) -> str:
    """`file:line in name` of a function defined in this file: its first line, the first
    decorator's (what Python calls the function's first line)."""
    lines = HERE.read_text().splitlines()
    for i, line in enumerate(lines):
        if f"def {func_name}(" in line:
            while lines[i - 1].strip().startswith("@"):
                i -= 1
            return f"{HERE}:{i + 1} in {func_name}"
    raise AssertionError(func_name)


@pytest.mark.anyio
async def test_borrow_site_is_the_endpoint_in_borrowed_timeout_and_dashboard(
    app_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = Hooks()
    site = _site_of("hold_here")
    caplog.set_level(logging.WARNING, logger="poolkit")
    async with serve(site_app(PoolLifespan(one_conn(app_dsn, timeout=0.3)), hooks)) as (
        client,
        state,
    ):
        holder = asyncio.ensure_future(client.get("/hold"))
        await until(lambda: hooks.held == 1, "the holder to borrow")
        pool = get_pools(state).get()
        assert [b.site for b in pool.borrowed()] == [f"{site} [GET /hold]"]
        data = (await client.get("/_poolkit/data")).json()
        assert site in json.dumps(data)
        # The PoolTimeout message (logged with the 503) names the longest borrower.
        r = await client.get("/quick")
        assert r.status_code == 503
        timeouts = [m for m in caplog.messages if "answering 503" in m]
        assert timeouts and site in timeouts[0], timeouts
        hooks.release.set()
        assert (await holder).status_code == 200


@pytest.mark.anyio
async def test_leak_warning_names_the_endpoint(
    app_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = Hooks()
    site = _site_of("hold_here")
    caplog.set_level(logging.WARNING, logger="poolkit.leak")
    cfg = one_conn(app_dsn, leak_threshold=0.05)
    async with serve(site_app(PoolLifespan(cfg), hooks)) as (client, state):
        holder = asyncio.ensure_future(client.get("/hold"))
        await until(lambda: hooks.held == 1, "the holder to borrow")
        pool = get_pools(state).get()
        pool.housekeeping_interval = 0.02
        await until(
            lambda: any(site in r.getMessage() for r in caplog.records if r.name == "poolkit.leak"),
            "the leak warning",
        )
        hooks.release.set()
        assert (await holder).status_code == 200


def sync_site_app() -> FastAPI:
    """For uvicorn: a `def` route on a sync pool, holding its connection until told."""
    import os

    cfg = PoolConfig.from_url(os.environ["DATABASE_URL"], min_size=1, max_size=2, name="s")
    app = FastAPI(lifespan=PoolLifespan(sync_pools=cfg))
    app.include_router(pool_router(dashboard=True))

    @app.get("/sync-hold")
    def sync_hold_here(conn: SyncConn, s: float) -> dict[str, bool]:
        conn.execute("SELECT pg_sleep(%s)", (s,))
        return {"ok": True}

    return app


@pytest.fixture
def uvicorn_url(app_dsn: str, tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "app.sock")
    env = {"DATABASE_URL": app_dsn, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "uvicorn.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory",
             "tests.test_fastapi_wiring:sync_site_app", "--uds", sock, "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield sock
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.anyio
async def test_sync_borrow_site_under_uvicorn(uvicorn_url: str) -> None:
    site = _site_of("sync_hold_here")
    transport = httpx.AsyncHTTPTransport(uds=uvicorn_url)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=20) as c:
        for _ in range(400):
            try:
                if (await c.get("/_poolkit/data")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        holder = asyncio.ensure_future(c.get("/sync-hold", params={"s": 2}))
        sites: list[str] = []
        while not holder.done() and not sites:
            pools = (await c.get("/_poolkit/data")).json()["pools"]
            sites = [b["site"] for p in pools for b in p["borrowed"]]
            await asyncio.sleep(0.02)
        assert sites == [f"{site} [GET /sync-hold]"]
        assert (await holder).status_code == 200


# ---- Cancellation while committing --------------------------------------------------------------


SLOW_COMMIT = """
CREATE TABLE IF NOT EXISTS pk_slow_commit (t text);
CREATE OR REPLACE FUNCTION pk_slow_commit_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS pk_slow_commit_tr ON pk_slow_commit;
CREATE CONSTRAINT TRIGGER pk_slow_commit_tr AFTER INSERT ON pk_slow_commit
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pk_slow_commit_fn();
"""


@pytest.mark.anyio
async def test_request_cancelled_during_commit_gives_the_slot_back(dsn: str, app_dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(SLOW_COMMIT)
    app = FastAPI(lifespan=PoolLifespan(one_conn(app_dsn, timeout=5)))

    @app.post("/slow")
    async def slow(conn: Conn) -> dict[str, bool]:
        await conn.execute("INSERT INTO pk_slow_commit VALUES ('x')")
        return {"ok": True}  # the commit takes a second (the deferred trigger)

    @app.get("/quick")
    async def quick(conn: Conn) -> dict[str, bool]:
        await conn.execute("SELECT 1")
        return {"ok": True}

    async with serve(app) as (client, state):
        pool = get_pools(state).get()
        request = asyncio.ensure_future(client.post("/slow"))
        await until(lambda: pool.stats()["in_use"] == 1, "the borrow")
        await asyncio.sleep(0.3)  # inside the commit now
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(lambda: pool.stats()["in_use"] == 0, "the slot to come back")
        # max_size=1: the next request can only succeed if the slot was not lost.
        assert (await client.get("/quick")).status_code == 200


# ---- A generator left unfinished in a route ------------------------------------------------------


def unfinished_app(lifespan: PoolLifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    kept: list[Any] = []  # the generators, closed by the test (they hold psycopg's lock)
    app.state.kept = kept

    @app.get("/async")
    async def in_async(conn: Conn, fail: bool = False) -> dict[str, int]:
        gen = conn.cursor().stream("SELECT generate_series(1, 100000)")
        kept.append(gen)
        row = await anext(gen)
        if fail:
            raise HTTPException(409, "refused")
        return {"first": row[0]}

    @app.get("/sync")
    def in_sync(conn: SyncConn, fail: bool = False) -> dict[str, int]:
        gen = conn.cursor().stream("SELECT generate_series(1, 100000)")
        kept.append(gen)
        row = next(gen)
        if fail:
            raise HTTPException(409, "refused")
        return {"first": row[0]}

    return app


@pytest.mark.anyio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_route_leaving_a_stream_unfinished_answers_and_gives_the_slot_back(
    app_dsn: str, kind: str
) -> None:
    """A cursor.stream() generator suspended in the route holds psycopg's lock: the
    lease's commit (or, after an error, its rollback) waited for it forever."""
    cfg = one_conn(app_dsn)
    app = unfinished_app(PoolLifespan(cfg, sync_pools=cfg.replace(name="default-sync")))
    async with serve(app) as (client, state):
        pools = get_pools(state)
        pool: Any = pools.get() if kind == "async" else pools.get_sync()
        with anyio.fail_after(20):
            r = await client.get(f"/{kind}", params={"fail": True})  # (the rollback hung)
            assert r.status_code == 409
            r = await client.get(f"/{kind}")
            assert r.status_code == 500
            assert "left unfinished" in r.json()["detail"]["message"]
        assert pool.stats()["in_use"] == 0
        for gen in app.state.kept:
            with contextlib.suppress(Exception):  # the connection was returned: refused
                await gen.aclose() if kind == "async" else gen.close()
