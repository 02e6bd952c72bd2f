"""Fixtures of the chaos suite: the session's server, the table written to, the secret to hunt."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests._helpers import PgServer

from ._harness import secret_forms
from ._scenarios import Env


@pytest.fixture(scope="session")
def db_password(pg_server: PgServer) -> str:
    """The password of the app's database user; the suite proves it never leaks."""
    password = conninfo_to_dict(pg_server.dsn).get("password")
    if not password:
        # Without one the secrets checks would pass vacuously.
        pytest.fail(
            "the chaos suite needs a server with password authentication: the test DSN has no"
            " password (unset POOLKIT_TEST_DSN to use the embedded server, which has one)"
        )
    return str(password)


@pytest.fixture
def chaos_env(pg_server: PgServer, db_password: str) -> Env:
    return Env(server=pg_server, control=None, secret_forms=secret_forms(db_password))
