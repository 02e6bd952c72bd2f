"""The FastAPI integration and the Django backend behind a real PgBouncer in transaction mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from poolkit import PoolConfig
from poolkit_fastapi import Conn, PoolLifespan, SyncConn, get_pools
from tests._pgbouncer import DEFAULT_POOL_SIZE, PgBouncer

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 160


@pytest.fixture
def table(admin_conn: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"pk_bouncer_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f"CREATE TABLE {name} (n int, kind text, pid int)")
    admin_conn.execute(f"GRANT ALL ON {name} TO PUBLIC")
    try:
        yield name
    finally:
        admin_conn.execute(f"DROP TABLE {name}")


def check_rows(admin_conn: psycopg.Connection[Any], table: str, kind: str, expected: int) -> None:
    row = admin_conn.execute(
        f"SELECT count(*), count(DISTINCT pid) FROM {table} WHERE kind = %s", (kind,)
    ).fetchone()
    assert row is not None
    assert row[0] == expected
    assert 1 <= row[1] <= DEFAULT_POOL_SIZE  # many client connections, few server ones


def fastapi_app(dsn: str, table: str) -> FastAPI:
    config = PoolConfig.from_url(
        dsn, pgbouncer=True, min_size=6, max_size=10, timeout=30.0, name="bouncer-api"
    )
    app = FastAPI(lifespan=PoolLifespan(config, sync_pools=config.replace(name="bouncer-api-sync")))

    @app.post("/items/{n}")
    async def add(n: int, conn: Conn) -> dict[str, Any]:
        # The request is one transaction: PgBouncer keeps it on one server connection.
        for _ in range(8):  # psycopg would prepare this after 5 runs without pgbouncer=True
            await conn.execute("SELECT %s::int", (n,))
        cur = await conn.execute("SELECT pg_backend_pid()")
        (pid,) = await cur.fetchone()  # type: ignore[misc]
        await conn.execute(f"INSERT INTO {table} VALUES (%s, 'async', %s)", (n, pid))
        cur = await conn.execute("SELECT pg_backend_pid()")
        return {"same": await cur.fetchone() == (pid,)}

    @app.post("/sync-items/{n}")
    def add_sync(n: int, conn: SyncConn) -> dict[str, Any]:
        for _ in range(8):
            conn.execute("SELECT %s::int", (n,))
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        conn.execute(f"INSERT INTO {table} VALUES (%s, 'sync', %s)", (n, pid))
        return {"same": conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)}

    return app


@pytest.mark.slow
@pytest.mark.asyncio
async def test_fastapi_behind_pgbouncer(
    pgbouncer: PgBouncer, pgbouncer_dsn: str, table: str, admin_conn: psycopg.Connection[Any]
) -> None:
    app = fastapi_app(pgbouncer_dsn, table)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            gate = asyncio.Semaphore(40)

            async def call(path: str) -> httpx.Response:
                async with gate:
                    return await client.post(path)

            answers = await asyncio.gather(
                *(call(f"/items/{i}") for i in range(REQUESTS)),
                *(call(f"/sync-items/{i}") for i in range(REQUESTS // 4)),
            )
        bad = [(r.status_code, r.text[:300]) for r in answers if r.status_code != 200]
        assert not bad, bad[:3]
        assert all(r.json()["same"] for r in answers)
        pools = get_pools(manager._state)
        for pool in pools.by_name().values():
            st = pool.stats()
            assert st["timeouts"] == 0 and st["connections_lost"] == 0 and st["resets"] == 0
    check_rows(admin_conn, table, "async", REQUESTS)
    check_rows(admin_conn, table, "sync", REQUESTS // 4)


# The Django side runs in its own interpreter: Django's settings are process-wide, and the
# tests under tests/django configure them for their own project.
DJANGO_SCRIPT = r"""
import io, json, os, sys, threading
import django
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

p = conninfo_to_dict(os.environ["PK_URL"])
TABLE = os.environ["PK_TABLE"]
settings.configure(
    DEBUG=False, SECRET_KEY="not-secret", ALLOWED_HOSTS=["*"], USE_TZ=False,
    TIME_ZONE="Europe/Paris", ROOT_URLCONF=__name__,
    INSTALLED_APPS=["poolkit_django"], MIDDLEWARE=["poolkit_django.PoolkitMiddleware"],
    DATABASES={"default": {
        "ENGINE": "poolkit_django", "NAME": p["dbname"], "USER": p["user"],
        "PASSWORD": p.get("password", ""), "HOST": p["host"], "PORT": p["port"],
        "CONN_MAX_AGE": 0, "ATOMIC_REQUESTS": True,
        "OPTIONS": {
            "application_name": os.environ["PK_APP_NAME"],
            # server-side binding: psycopg would prepare repeated statements
            "server_side_binding": True,
            "pool": {"pgbouncer": True, "min_size": 6, "max_size": 10, "timeout": 10},
        },
    }},
)
django.setup()

from django.core.handlers.wsgi import WSGIHandler
from django.db import connection
from django.http import JsonResponse
from django.urls import path
from django.utils import timezone

def item(request, n):
    with connection.cursor() as cur:
        for _ in range(8):
            cur.execute("SELECT %s::int", [n])
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cur.execute(f"INSERT INTO {TABLE} VALUES (%s, 'django', %s)", [n, pid])
        # USE_TZ=False: Django sets TIME_ZONE on the connection; PgBouncer must carry it to
        # every server connection the client lands on
        cur.execute("SELECT current_setting('TimeZone'), pg_backend_pid()")
        tz, pid2 = cur.fetchone()
    return JsonResponse({"same": pid2 == pid, "tz": tz})

urlpatterns = [path("item/<int:n>", item)]
handler = WSGIHandler()
results, errors = [], []

def call(n):
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": f"/item/{n}", "QUERY_STRING": "",
        "SERVER_NAME": "testserver", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    seen = {}
    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status.split()[0])
    result = handler(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # request_finished: the connection goes back to the pool
    if seen["status"] != 200:
        raise RuntimeError(seen["status"], body[:300].decode(errors="replace"))
    results.append(json.loads(body))

def worker(w):
    try:
        for i in range(int(os.environ["PK_ROUNDS"])):
            call(w * 1000 + i)
    except BaseException as exc:  # one failure per thread is enough to report
        errors.append(repr(exc))

threads = [threading.Thread(target=worker, args=(w,)) for w in range(int(os.environ["PK_THREADS"]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
import poolkit_django
stats = {k: v for k, v in poolkit_django.pools()["default"].stats().items()
         if isinstance(v, int)}
print(json.dumps({"results": results, "errors": errors, "stats": stats}))
"""


@pytest.mark.slow
def test_django_behind_pgbouncer(
    pgbouncer: PgBouncer, app_name: str, table: str, admin_conn: psycopg.Connection[Any]
) -> None:
    threads, rounds = 12, 12
    env = {
        **os.environ,
        "PK_URL": pgbouncer.dsn,
        "PK_TABLE": table,
        "PK_APP_NAME": app_name,
        "PK_THREADS": str(threads),
        "PK_ROUNDS": str(rounds),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.run(
        [sys.executable, "-c", DJANGO_SCRIPT],
        capture_output=True, text=True, timeout=100, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["errors"], out["errors"][:3]
    assert len(out["results"]) == threads * rounds
    assert all(r["same"] for r in out["results"])
    assert {r["tz"] for r in out["results"]} == {"Europe/Paris"}
    st = out["stats"]
    assert st["borrows"] >= threads * rounds
    assert st["timeouts"] == 0 and st["connections_lost"] == 0
    check_rows(admin_conn, table, "django", threads * rounds)
