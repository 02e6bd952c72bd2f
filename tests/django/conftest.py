"""Django for these tests: settings from tests/django/project, the database from pg_server.

Django is configured when this file is imported (pytest-django needs settings before
collecting test modules that import models); the session's server is only known once the
`pg_server` fixture runs, so `django_db_modify_db_settings` points DATABASES at it before
pytest-django creates the test database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from django.db import connections
from psycopg.conninfo import conninfo_to_dict

from tests._helpers import PgServer
from tests.django.project import settings as project_settings

if not settings.configured:
    settings.configure(
        **{
            name: getattr(project_settings, name)
            for name in dir(project_settings)
            if name.isupper()
        }
    )
    django.setup()


@pytest.fixture(scope="session")
def django_server_settings(pg_server: PgServer) -> dict[str, Any]:
    """Point DATABASES['default'] at the session's server (before any connection is made)."""
    params = conninfo_to_dict(pg_server.dsn)
    db = settings.DATABASES["default"]
    db.update(
        NAME=params.get("dbname", "poolkit"),
        USER=params.get("user", ""),
        PASSWORD=params.get("password", ""),
        HOST=params.get("host", ""),
        PORT=params.get("port", ""),
    )
    # connections.settings is the same dict object; a wrapper made earlier keeps a reference too.
    assert connections.settings["default"] is db
    return db


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, django_server_settings: dict[str, Any]
) -> None:
    """pytest-django's hook: runs before the test database is created."""


@pytest.fixture(autouse=True, scope="session")
def _block_django_db(
    django_db_blocker: Any, django_server_settings: dict[str, Any]
) -> Iterator[None]:
    # pytest-django blocks database access outside django_db tests only when Django was
    # set up before its own pytest_configure (running `pytest tests/django`); do it in
    # every case so the results do not depend on how the suite was invoked.
    blocked = not django_db_blocker.is_active
    if blocked:
        django_db_blocker.block()
    yield
    if blocked:
        django_db_blocker.restore()
