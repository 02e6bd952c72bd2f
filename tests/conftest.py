"""Session fixtures: a real PostgreSQL (embedded, or $POOLKIT_TEST_DSN), a fault proxy, helpers."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from example_apps._embedded_pg import EmbeddedPostgres, find_pg_bindir
from tests._helpers import PgControl, PgServer, mask_dsn
from tests._proxy import TcpProxy

# ---- Pool fixtures: not here. ------------------------------------------------------------------
# This conftest knows nothing about pools. Put pool fixtures in their own module (for example
# tests/fix_pool.py) and register it by adding its dotted name to this list.
pytest_plugins: list[str] = ["tests._pgbouncer", "tests._replication"]

EXTERNAL_DSN_ENV = "POOLKIT_TEST_DSN"
EXTERNAL_ADMIN_DSN_ENV = "POOLKIT_TEST_ADMIN_DSN"
ADMIN_APP_NAME = "poolkit-test-admin"


def pytest_configure(config: pytest.Config) -> None:
    # A hung test must fail, not hang CI: refuse to run without a per-test timeout.
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError(
            "pytest-timeout is not active, and every poolkit test needs a timeout: "
            'install it with `pip install -e ".[dev]"` (or `bash scripts/setup.sh`)'
        )
    import pytest_timeout  # type: ignore[import-untyped]

    settings = pytest_timeout.get_env_settings(config)
    if not settings.timeout or settings.timeout <= 0:
        raise pytest.UsageError(
            f"timeout={settings.timeout!r}: every poolkit test needs a timeout; keep "
            "`timeout = 120` in pyproject.toml or pass --timeout=SECONDS"
        )


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get(EXTERNAL_DSN_ENV)
    if external:
        return f"postgresql: external, {EXTERNAL_DSN_ENV}={mask_dsn(external)}"
    try:
        return f"postgresql: embedded, binaries in {find_pg_bindir()}"
    except RuntimeError as exc:
        return f"postgresql: NOT AVAILABLE\n{exc}"


# ---- The server ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's server: $POOLKIT_TEST_DSN if set, else an embedded one (password on)."""
    external = os.environ.get(EXTERNAL_DSN_ENV)
    if external:
        yield _external_server(external)
        return
    tmp = Path(tempfile.mkdtemp(prefix="poolkit-pg-"))
    try:
        server = EmbeddedPostgres(tmp / "data")
        server.start()
    except Exception as exc:
        _abort_session(tmp, exc)
    try:
        yield PgServer(dsn=server.dsn, admin_dsn=server.admin_dsn, embedded=server)
    finally:
        server.cleanup(remove=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _abort_session(tmp: Path, exc: Exception) -> NoReturn:
    with contextlib.suppress(Exception):
        EmbeddedPostgres(tmp / "data").cleanup()
    shutil.rmtree(tmp, ignore_errors=True)
    # Never skip: a suite that skips every database test looks green.
    pytest.exit(
        f"could not start the test PostgreSQL server:\n{exc}",
        returncode=pytest.ExitCode.TESTS_FAILED,
    )


def _external_server(dsn: str) -> PgServer:
    admin_dsn = os.environ.get(EXTERNAL_ADMIN_DSN_ENV) or dsn
    for name, value in ((EXTERNAL_DSN_ENV, dsn), (EXTERNAL_ADMIN_DSN_ENV, admin_dsn)):
        try:
            with psycopg.connect(value, connect_timeout=10) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            pytest.exit(
                f"{name}={mask_dsn(value)} does not accept connections: {exc}\n"
                f"fix the server or unset {EXTERNAL_DSN_ENV} to let the suite start its own",
                returncode=pytest.ExitCode.TESTS_FAILED,
            )
    return PgServer(dsn=dsn, admin_dsn=admin_dsn)


@pytest.fixture(scope="session")
def dsn(pg_server: PgServer) -> str:
    """URL of the test database, password included."""
    return pg_server.dsn


@pytest.fixture(scope="session")
def admin_dsn(pg_server: PgServer) -> str:
    """Superuser DSN (unix socket for the embedded server) for inspection and faults."""
    return pg_server.admin_dsn


@pytest.fixture
def admin_conn(admin_dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit superuser connection, closed after the test."""
    conn = psycopg.connect(admin_dsn, autocommit=True, application_name=ADMIN_APP_NAME)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def pg_control(pg_server: PgServer) -> Iterator[PgControl]:
    """Stop/start/restart the server; the server is running again after the test."""
    if pg_server.embedded is None:
        pytest.skip(f"{EXTERNAL_DSN_ENV} is set: the suite cannot stop or start an external server")
    control = PgControl(pg_server.embedded)
    try:
        yield control
    finally:
        if not control.is_running():
            control.start()


# ---- Per-test identity and faults ---------------------------------------------------------------


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """A unique application_name (max 63 bytes) so a test can count its own backends."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    return f"pk-{uuid.uuid4().hex[:8]}-{slug}"[:63]


@pytest.fixture
def app_dsn(dsn: str, app_name: str) -> str:
    """``dsn`` with this test's application_name."""
    return make_conninfo(dsn, application_name=app_name)


@pytest.fixture
def proxy(pg_server: PgServer) -> Iterator[TcpProxy]:
    """A TcpProxy in front of the server, closed after the test."""
    host = pg_server.host
    if not host or host.startswith("/") or "," in host:
        pytest.skip(f"the proxy needs one TCP host, and the server DSN has host={host!r}")
    with TcpProxy(host, pg_server.port) as proxy:
        yield proxy


@pytest.fixture
def proxy_dsn(proxy: TcpProxy, dsn: str) -> str:
    """``dsn`` rewritten to connect through ``proxy``."""
    return proxy.dsn_for(dsn)
