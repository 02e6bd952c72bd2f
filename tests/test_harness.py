"""Prove the harness works and can fail: the server, the fault proxy, the helpers."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from example_apps import _embedded_pg
from example_apps._embedded_pg import DEFAULT_PASSWORD, EmbeddedPostgres, ensure_server
from tests._helpers import (
    PgControl,
    PgServer,
    backend_count,
    backend_pids,
    terminate_backends,
    wait_until,
)
from tests._proxy import TcpProxy


def _query_state(admin_dsn: str, application_name: str) -> list[tuple[str, str]]:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return [(str(state), str(query)) for state, query in rows]


# ---- server ------------------------------------------------------------------------------------


def test_server_accepts_password_connection(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user, current_setting('max_connections')").fetchone()
    assert row is not None
    assert conninfo_to_dict(dsn).get("user") in (None, row[0])


def test_server_rejects_wrong_password(dsn: str) -> None:
    if not conninfo_to_dict(dsn).get("password"):
        pytest.skip("the server DSN has no password to get wrong")
    wrong = make_conninfo(dsn, password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)


def test_embedded_server_settings_and_safe_strings(pg_server: PgServer, admin_conn: object) -> None:
    server = pg_server.embedded
    if server is None:
        pytest.skip("POOLKIT_TEST_DSN is set: settings belong to the external server")
    assert isinstance(admin_conn, psycopg.Connection)
    settings = dict(
        admin_conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('max_connections', 'fsync', 'listen_addresses', 'password_encryption')"
        ).fetchall()
    )
    assert settings == {
        "max_connections": "200",
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
        "password_encryption": "scram-sha-256",
    }
    assert server.password == DEFAULT_PASSWORD
    assert DEFAULT_PASSWORD in server.dsn
    for text in (server.dsn_without_password, server.admin_dsn, repr(server)):
        assert DEFAULT_PASSWORD not in text


def test_missing_binaries_error_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POOLKIT_PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="POOLKIT_PG_BINDIR="):
        _embedded_pg.find_pg_bindir()

    monkeypatch.delenv("POOLKIT_PG_BINDIR")
    for finder in ("_pgserver_bindir", "_pg_config_bindir", "_debian_bindir"):
        monkeypatch.setattr(_embedded_pg, finder, lambda: None)
    with pytest.raises(RuntimeError) as info:
        EmbeddedPostgres(tmp_path / "data")
    message = str(info.value)
    for fix in ('pip install -e ".[dev]"', "apt-get install postgresql", "POOLKIT_TEST_DSN"):
        assert fix in message
    assert "DATABASE_URL" in message


def test_ensure_server_prefers_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone@db.example/app")
    assert ensure_server("/nonexistent/never-created") == "postgresql://someone@db.example/app"


@pytest.mark.slow
def test_ensure_server_persists_and_reuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    # A private 0700 parent and a path too long for a unix socket: both must be handled.
    root = Path(tempfile.mkdtemp(prefix="poolkit-ensure-"))
    data_dir = root / ("x" * 80) / "data"
    try:
        first = ensure_server(data_dir)
        with psycopg.connect(first, connect_timeout=10) as conn:
            pid = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
        assert ensure_server(data_dir) == first  # adopted, not restarted
        with psycopg.connect(first, connect_timeout=10) as conn:
            assert conn.execute("SELECT pg_postmaster_start_time()::text").fetchone() == pid
    finally:
        EmbeddedPostgres(data_dir).cleanup(remove=True)
        shutil.rmtree(root, ignore_errors=True)
    assert not data_dir.exists()


@pytest.mark.slow
def test_embedded_retries_when_its_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(tempfile.mkdtemp(prefix="poolkit-port-"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = _embedded_pg._free_port
        # The race being simulated: the port was free when probed, taken when bound.
        monkeypatch.setattr(
            _embedded_pg, "_free_port", lambda: next(ports, None) or real_free_port()
        )
        server = EmbeddedPostgres(root / "data")
        try:
            server.start()
            assert server.port not in (None, taken)
            assert "Address already in use" in server.log_tail(100)  # the first try failed
            with psycopg.connect(server.dsn, connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            server.cleanup(remove=True)
            shutil.rmtree(root, ignore_errors=True)


def test_server_stop_and_start(pg_control: PgControl, dsn: str) -> None:
    conn = psycopg.connect(dsn, connect_timeout=10)
    try:
        pg_control.stop()
        assert not pg_control.is_running()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5)
        pg_control.start()
        assert pg_control.server.dsn == dsn  # same port: existing DSNs stay valid
        with psycopg.connect(dsn, connect_timeout=10) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()


def test_server_restart_immediate(pg_control: PgControl, dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        pg_control.restart("immediate")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with psycopg.connect(dsn, connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


# ---- backends ----------------------------------------------------------------------------------


def test_terminate_backends_by_application_name(
    app_dsn: str, app_name: str, admin_dsn: str
) -> None:
    with psycopg.connect(app_dsn, connect_timeout=10) as conn:
        pid = conn.info.backend_pid
        assert backend_pids(admin_dsn, app_name) == [pid]
        assert terminate_backends(admin_dsn, application_name=app_name) == [pid]
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert backend_count(admin_dsn, app_name) == 0


def test_terminate_backends_by_pid_spares_others(
    app_dsn: str, app_name: str, admin_dsn: str, admin_conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    with (
        psycopg.connect(app_dsn, connect_timeout=10) as victim,
        psycopg.connect(app_dsn, connect_timeout=10) as bystander,
    ):
        assert backend_count(admin_dsn, app_name) == 2
        killed = terminate_backends(admin_dsn, pids=[victim.info.backend_pid])
        assert killed == [victim.info.backend_pid]
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        assert admin_conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")


def test_terminate_backends_requires_a_filter(admin_dsn: str) -> None:
    with pytest.raises(ValueError, match="application_name= or pids="):
        terminate_backends(admin_dsn)


def test_wait_until_returns_value_or_fails() -> None:
    assert wait_until(lambda: 7) == 7
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for nothing"):
        wait_until(lambda: 0, timeout=0.05, what="nothing")


def test_app_name_is_unique_and_fits(app_name: str, request: pytest.FixtureRequest) -> None:
    assert app_name.startswith("pk-")
    assert len(app_name.encode()) <= 63


# ---- proxy -------------------------------------------------------------------------------------


def test_proxy_relays_query(proxy: TcpProxy, proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)
        assert conn.info.port == proxy.port
        assert proxy.active == 1
    assert proxy.accepted == 1
    wait_until(lambda: proxy.active == 0, what="the relay to end after close")


def test_proxy_dsn_for_keeps_credentials(proxy: TcpProxy) -> None:
    url = proxy.dsn_for("postgresql://u:p%40ss@db.example:5432/app?sslmode=disable&port=6000")
    assert url == f"postgresql://u:p%40ss@127.0.0.1:{proxy.port}/app?sslmode=disable"
    params = conninfo_to_dict(proxy.dsn_for("host=db.example port=5432 user=u password=s dbname=a"))
    assert params == {
        "host": "127.0.0.1",
        "port": str(proxy.port),
        "user": "u",
        "password": "s",
        "dbname": "a",
    }


def test_proxy_stop_cuts_in_flight_query_and_refuses_new(
    proxy: TcpProxy, proxy_dsn: str, app_name: str, admin_dsn: str
) -> None:
    conn = psycopg.connect(make_conninfo(proxy_dsn, application_name=app_name), connect_timeout=10)
    errors: list[Exception] = []

    def sleep_on_server() -> None:
        try:
            conn.execute("SELECT pg_sleep(60)")
        except psycopg.OperationalError as exc:
            errors.append(exc)

    worker = threading.Thread(target=sleep_on_server, daemon=True)
    try:
        worker.start()
        wait_until(
            lambda: ("active", "SELECT pg_sleep(60)") in _query_state(admin_dsn, app_name),
            what="the query to run on the server",
        )
        proxy.stop()
        worker.join(10)
        assert not worker.is_alive()
        assert len(errors) == 1
        assert conn.closed
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy_dsn, connect_timeout=5)

        proxy.start()
        with psycopg.connect(proxy_dsn, connect_timeout=10) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()
        # The server has not noticed the cut yet: its backend still sleeps.
        terminate_backends(admin_dsn, application_name=app_name)
    assert proxy.accepted == 2


@pytest.mark.timing
def test_proxy_deaf_holds_traffic_until_heard_again(proxy: TcpProxy, proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, connect_timeout=10, autocommit=True) as conn:
        proxy.deaf(True)
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(proxy_dsn, connect_timeout=1)
        assert proxy.accepted == 2  # accepted, never answered

        results: list[object] = []
        worker = threading.Thread(
            target=lambda: results.append(conn.execute("SELECT 7").fetchone()), daemon=True
        )
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not results  # held by the black hole

        proxy.deaf(False)
        worker.join(10)
        assert results == [(7,)]  # delivered late, not lost
    with psycopg.connect(proxy_dsn, connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timing
def test_proxy_delay_adds_latency(proxy: TcpProxy, proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, connect_timeout=10, autocommit=True) as conn:
        proxy.delay(0.2)
        started = time.monotonic()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # A lower bound only: one delayed chunk each way; a slow machine only adds to it.
        assert time.monotonic() - started >= 0.39
        proxy.delay(0)
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_proxy_stop_releases_connections_held_while_deaf(proxy: TcpProxy) -> None:
    proxy.deaf(True)
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
        client.sendall(b"hello?")
        wait_until(lambda: proxy.active == 1, what="the proxy to hold the connection")
        proxy.stop()
        assert proxy.active == 0
        with contextlib.suppress(ConnectionResetError):  # a reset is as good as an EOF
            assert client.recv(10) == b""


def test_proxy_close_cuts_and_is_idempotent(pg_server: PgServer) -> None:
    proxy = TcpProxy(pg_server.host, pg_server.port)
    conn = psycopg.connect(proxy.dsn_for(pg_server.dsn), connect_timeout=10)
    try:
        proxy.close()
        proxy.close()
        assert proxy.active == 0
        assert not proxy.listening
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(RuntimeError, match="closed"):
            proxy.start()
    finally:
        conn.close()


def test_proxy_to_dead_target_resets_client() -> None:
    with TcpProxy("127.0.0.1", _embedded_pg._free_port()) as proxy:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"host=127.0.0.1 port={proxy.port} user=x dbname=x connect_timeout=5")
        wait_until(lambda: proxy.active == 0, what="the failed relay to end")
