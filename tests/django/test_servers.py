"""poolkit_django behind real servers: gunicorn (sync, gthread), uvicorn (ASGI), the example app."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests._helpers import backend_count
from tests.django._support import (
    PYTHON,
    Server,
    free_port,
    gunicorn,
    run_manage,
    scratch_database,
    server_env,
    uvicorn,
)


@pytest.fixture(scope="module")
def server_db(pg_server: Any) -> Iterator[str]:
    """A database with the test project's tables, for the servers of this module."""
    with scratch_database(pg_server.admin_dsn, pg_server.dsn, prefix="pk_djsrv") as url:
        run_manage(url, "migrate", "-v0")
        yield url


class PeakBackends:
    """Samples how many backends carry `app_name` while the block runs."""

    def __init__(self, admin_dsn: str, app_name: str) -> None:
        self.admin_dsn, self.app_name = admin_dsn, app_name
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, backend_count(self.admin_dsn, self.app_name))

    def __enter__(self) -> PeakBackends:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _burst(server: Server, path: str, n: int, concurrency: int) -> list[int]:
    def one(_: int) -> int:
        return server.get(path, timeout=60)[0]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def test_200_concurrent_requests_through_gthread_never_exceed_the_pool(
    server_db: str, admin_dsn: str, app_name: str, tmp_path: Path
) -> None:
    """gunicorn gthread, 16 threads, pool max_size=4: 200 requests at once all succeed
    (they queue for connections), and the server never sees more than 4 connections."""
    server = gunicorn(
        server_db, tmp_path / "gthread.log", worker_class="gthread", threads=16,
        PK_POOL=json.dumps({"min_size": 1, "max_size": 4, "timeout": 30}), PK_APP_NAME=app_name,
    )  # fmt: skip
    with server, PeakBackends(admin_dsn, app_name) as peak:
        statuses = _burst(server, "/sleep?s=0.02", 200, 200)
        stats = server.json("/stats")["default"]
    assert statuses == [200] * 200, server.logs()
    assert 1 <= peak.peak <= 4
    assert stats["in_use"] == 0
    assert stats["size"] <= 4
    assert stats["borrows"] >= 200
    assert stats["timeouts"] == 0


def test_sync_workers_return_the_connection_after_each_request(
    server_db: str, admin_dsn: str, app_name: str, tmp_path: Path
) -> None:
    server = gunicorn(
        server_db, tmp_path / "sync.log", workers=1,
        PK_POOL=json.dumps({"min_size": 1, "max_size": 2}), PK_APP_NAME=app_name,
    )  # fmt: skip
    with server:
        for _ in range(5):
            assert server.get("/notes", method="POST")[0] == 201
            assert server.json("/stats")["default"]["in_use"] == 0
        backends = {server.json("/pid")["backend"] for _ in range(5)}
        assert len(backends) == 1  # one worker, one request at a time: one connection reused
        stats = server.json("/stats")["default"]
        assert stats["borrows"] >= 10
        assert stats["connections_created"] <= 2
        assert backend_count(admin_dsn, app_name) <= 2
        # The status command can read a running server's pools through its health view.
        out = io.StringIO()
        call_command(
            "poolkit_status", url=f"http://127.0.0.1:{server.port}/poolkit/health", stdout=out
        )
        assert "default: ok" in out.getvalue()
        assert "in_use=0" in out.getvalue()


def test_uvicorn_async_views(server_db: str, tmp_path: Path) -> None:
    """ASGI: async views reach the ORM through sync_to_async; every request gives back."""
    server = uvicorn(
        server_db, tmp_path / "uvicorn.log", PK_POOL=json.dumps({"min_size": 1, "max_size": 4})
    )
    with server:
        before = server.json("/anotes")["count"]
        statuses = _burst(server, "/anotes", 40, 20)
        assert statuses == [200] * 40, server.logs()
        assert server.json("/anotes")["count"] == before + 41
        stats = server.json("/stats")["default"]
        assert stats["in_use"] == 0
        assert stats["size"] <= 4
        health = server.json("/poolkit/health")
        assert health["status"] == "ok"


@pytest.fixture
def example_db(pg_server: Any) -> Iterator[str]:
    with scratch_database(pg_server.admin_dsn, pg_server.dsn, prefix="pk_djex") as url:
        yield url


@pytest.mark.parametrize("mode", ["wsgi", "asgi"])
def test_example_app_end_to_end(example_db: str, tmp_path: Path, mode: str) -> None:
    """One command migrates and serves the example shop; its views work end to end."""
    port = free_port()
    argv = [PYTHON, "-m", "example_apps.django_app", "--port", str(port), "--workers", "1"]
    if mode == "asgi":
        argv.append("--asgi")
    env = server_env(example_db, DJANGO_SETTINGS_MODULE="example_apps.django_app.settings")
    with Server(argv, env, tmp_path / "example.log", port, ready_path="/") as app:
        assert app.json("/")["products"] == "/products/"
        created = app.request_json(
            "POST", "/products/", {"name": "tea", "price": "3.50", "stock": 5}
        )
        assert created == (
            201,
            {"id": created[1]["id"], "name": "tea", "price": "3.50", "stock": 5},
        )
        tea = created[1]["id"]
        assert app.request_json("POST", "/products/", {"name": "tea", "price": "1"})[0] == 409
        assert app.json(f"/products/{tea}/")["stock"] == 5
        assert [p["name"] for p in app.json("/products/")["products"]] == ["tea"]

        status, placed = app.request_json(
            "POST", "/orders/", {"customer": "ann", "lines": [{"product": tea, "quantity": 2}]}
        )
        assert status == 201 and placed["total"] == "7.00"
        assert app.json(f"/orders/{placed['id']}/")["lines"] == [
            {"product": tea, "quantity": 2, "price": "3.50"}
        ]
        # Too many: the order, its first line and the stock change are all rolled back.
        lines = [{"product": tea, "quantity": 1}, {"product": tea, "quantity": 9}]
        status, refused = app.request_json("POST", "/orders/", {"customer": "bob", "lines": lines})
        assert status == 409 and "only 2" in refused["error"]
        assert app.json(f"/products/{tea}/")["stock"] == 3
        assert app.get(f"/orders/{placed['id'] + 1}/")[0] == 404
        health = app.json("/poolkit/health")
        assert health["databases"]["default"]["stats"]["in_use"] == 0
        status, _, metrics = app.get("/poolkit/metrics")
        assert status == 200 and b"db_client_connection_count" in metrics
