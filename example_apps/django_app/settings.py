"""Settings of the example shop: ENGINE "poolkit_django", database from $DATABASE_URL.

Without $DATABASE_URL an embedded PostgreSQL is started (or reused) in .poolkit/pgdata.
"""

from __future__ import annotations

import os
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from example_apps._embedded_pg import ensure_server

_url = os.environ.get("DATABASE_URL") or ensure_server(Path(".poolkit/pgdata"))
_db = conninfo_to_dict(_url)

DATABASES = {
    "default": {
        "ENGINE": "poolkit_django",
        "NAME": _db.get("dbname", ""),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
        "OPTIONS": {
            # poolkit's settings (the same keys as Django's own OPTIONS["pool"]).
            "pool": {
                "min_size": 2,
                "max_size": int(os.environ.get("POOL_MAX_SIZE", "8")),
                "timeout": 10,
                "leak_threshold": 30,
            },
            "application_name": "poolkit-django-example",
        },
    }
}

SECRET_KEY = os.environ.get("SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DEBUG") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["poolkit_django", "example_apps.django_app.shop"]
MIDDLEWARE = [
    # First: turns pool exhaustion into 503 + Retry-After and tags borrows by view.
    "poolkit_django.PoolkitMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "example_apps.django_app.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The live pool dashboard at /poolkit/dashboard/: on in this demo unless POOLKIT_DASHBOARD=0.
# A real project leaves it off (the default) or guards it with POOLKIT_DASHBOARD_CHECK.
_dashboard = os.environ.get("POOLKIT_DASHBOARD", "1").strip().lower()
POOLKIT_DASHBOARD = _dashboard not in {"0", "false", "no", "off"}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "poolkit": {"handlers": ["console"], "level": "INFO"},
        # Django's default sends django.request errors to the console only with DEBUG on
        # (and to mail_admins): here every 5xx is logged with its traceback, DEBUG or not.
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
