"""Settings of the test project: used in-process by pytest-django and by the servers tests start.

The database comes from $DATABASE_URL; $PK_ENGINE picks the backend ("poolkit" or
"native", Django's own pool), $PK_POOL is OPTIONS["pool"] as JSON, $PK_CONN_MAX_AGE and
$PK_APP_NAME (application_name) complete it. In-process, tests/django/conftest.py fills in
the session's server before the test database is created.
"""

from __future__ import annotations

import json
import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict

ENGINES = {"poolkit": "poolkit_django", "native": "django.db.backends.postgresql"}
DEFAULT_POOL: dict[str, Any] = {"min_size": 1, "max_size": 4, "timeout": 10}


def database(
    url: str,
    *,
    engine: str = "poolkit",
    pool: Any = None,
    conn_max_age: int | None = 0,
    application_name: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A DATABASES entry for `url` (a postgresql:// URL or key=value string)."""
    params = conninfo_to_dict(url)
    options: dict[str, Any] = {"pool": DEFAULT_POOL if pool is None else pool}
    if application_name:
        options["application_name"] = application_name
    return {
        "ENGINE": ENGINES[engine],
        "NAME": params.get("dbname", ""),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "CONN_MAX_AGE": conn_max_age,
        "OPTIONS": options,
        **extra,
    }


_max_age = os.environ.get("PK_CONN_MAX_AGE", "0")
DATABASES = {
    "default": database(
        # A placeholder in-process: the conftest points it at the session's server.
        os.environ.get("DATABASE_URL", "postgresql://poolkit@127.0.0.1:9/poolkit"),
        engine=os.environ.get("PK_ENGINE", "poolkit"),
        pool=json.loads(os.environ["PK_POOL"]) if "PK_POOL" in os.environ else None,
        conn_max_age=None if _max_age == "None" else int(_max_age),
        application_name=os.environ.get("PK_APP_NAME"),
    )
}

SECRET_KEY = "poolkit-django-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["poolkit_django", "tests.django.project.testapp"]
MIDDLEWARE = ["poolkit_django.PoolkitMiddleware"]
ROOT_URLCONF = "tests.django.project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"poolkit": {"handlers": ["console"], "level": "INFO"}},
}
