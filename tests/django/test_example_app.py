"""The Django example shop: migrations in step, client errors are 400, 5xx logged, dashboard."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from example_apps._embedded_pg import EmbeddedPostgres
from tests.django._support import (
    PYTHON,
    ROOT,
    Server,
    free_port,
    scratch_database,
    server_env,
)

SETTINGS = "example_apps.django_app.settings"


@pytest.fixture
def example_db(pg_server: Any) -> Iterator[str]:
    with scratch_database(pg_server.admin_dsn, pg_server.dsn, prefix="pk_djex") as url:
        yield url


def example(url: str, log: Path, **env: str) -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "example_apps.django_app", "--port", str(port), "--workers", "1"]
    return Server(argv, server_env(url, DJANGO_SETTINGS_MODULE=SETTINGS, **env), log, port, "/")


def test_models_and_migrations_agree(dsn: str) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "django", "makemigrations", "--check", "--dry-run", "shop"],
        cwd=ROOT, env=server_env(dsn, DJANGO_SETTINGS_MODULE=SETTINGS),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No changes detected" in proc.stdout


def test_bad_input_is_400_and_a_500_is_logged_with_its_traceback(
    example_db: str, tmp_path: Path, pg_server: Any
) -> None:
    with example(example_db, tmp_path / "example.log") as app:
        bad_products = [
            {"name": "a", "price": "1e400"},
            {"name": "b", "price": "1", "stock": 10**30},
            {"name": "c", "price": "1", "stock": -1},
            {"name": "d", "price": "NaN"},
            {"name": "e\x00", "price": "1"},
            {"name": "f", "price": 1e308 * 10},  # JSON Infinity
            {"name": "g", "price": "1", "stock": "1e400"},
        ]
        for body in bad_products:
            status, answer = app.request_json("POST", "/products/", body)
            assert status == 400, (body, status, answer)
            assert answer["error"]
        status, tea = app.request_json("POST", "/products/", {"name": "tea", "price": "2"})
        assert status == 201
        bad_orders = [
            {"customer": "x\x00", "lines": [{"product": tea["id"], "quantity": 1}]},
            {"lines": [{"product": tea["id"], "quantity": 10**30}]},
            {"lines": [{"product": 10**30, "quantity": 1}]},
            {"lines": [{"product": tea["id"], "quantity": 0}]},
        ]
        for body in bad_orders:
            status, answer = app.request_json("POST", "/orders/", body)
            assert status in (400, 404, 409), (body, status, answer)
        assert app.json("/products/")["products"] == [tea]
        assert app.get(f"/products/{10**30}/")[0] == 404
        assert " 500 " not in app.logs() and "Traceback" not in app.logs(), app.logs()

        # A real server-side failure (the table is gone): 500, and logged with DEBUG off.
        with psycopg.connect(pg_server.admin_dsn, dbname=_dbname(example_db)) as conn:
            conn.execute("ALTER TABLE shop_product RENAME TO shop_product_gone")
        assert app.get("/products/")[0] == 500
        deadline = time.monotonic() + 10
        while "Traceback" not in app.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        logs = app.logs()
        assert re.search(r"ERROR django\.request: Internal Server Error: /products/", logs), logs
        assert "Traceback (most recent call last)" in logs
        assert 'relation "shop_product" does not exist' in logs


def test_dashboard_is_on_in_the_example_and_shows_the_masked_url(
    example_db: str, tmp_path: Path
) -> None:
    password = str(conninfo_to_dict(example_db)["password"])
    with example(example_db, tmp_path / "on.log") as app:
        status, _, page = app.get("/poolkit/dashboard/")
        assert status == 200 and b"poolkit" in page
        assert app.json("/products/")["products"] == []  # the pool is built at first use
        # Sampled every second by the worker since then, not only when the page asks: the
        # chart has the last seconds as soon as the page opens.
        time.sleep(3.5)
        snap = app.json("/poolkit/dashboard/data")
        assert len(snap["pools"][0]["history"]["t"]) >= 3, snap["pools"][0]["history"]
        (pool,) = snap["pools"]
        params = conninfo_to_dict(example_db)
        assert pool["conninfo"] == (
            f"postgresql://{params['user']}:***@{params['host']}:{params['port']}/{params['dbname']}"
        )
        assert password not in json.dumps(snap)
        assert "pool dashboard: http://127.0.0.1:" in app.logs()
        assert app.json("/")["dashboard"] == "/poolkit/dashboard/"  # the index lists it
    with example(example_db, tmp_path / "off.log", POOLKIT_DASHBOARD="0") as app:
        assert app.get("/poolkit/dashboard/")[0] == 404
        assert "dashboard" not in app.json("/")
        assert "pool dashboard" not in app.logs()


def test_embedded_server_is_stopped_on_exit(tmp_path: Path) -> None:
    env = server_env("", DJANGO_SETTINGS_MODULE=SETTINGS)
    del env["DATABASE_URL"]
    port = free_port()
    log = tmp_path / "example.log"
    argv = [PYTHON, "-m", "example_apps.django_app", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    data_dir = tmp_path / ".poolkit" / "pgdata"
    try:
        server = Server(argv, env, log, port, "/")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if server.get("/", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert EmbeddedPostgres(data_dir, stop_at_exit=False).is_running()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        text = log.read_text()
        assert "stopped the embedded PostgreSQL in .poolkit/pgdata (port " in text, text
        assert not EmbeddedPostgres(data_dir, stop_at_exit=False).is_running()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        EmbeddedPostgres(data_dir, stop_at_exit=False).cleanup()


def _dbname(url: str) -> str:
    return str(conninfo_to_dict(url)["dbname"])
